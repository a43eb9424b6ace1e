"""YAML pool spec -> frozen dataclasses, with every error naming file, line, key path and value.

Each setting is declared once in SETTINGS (key, parser, default, one-line doc, scope). That one
declaration drives validation, defaults, per-pool overrides and the reference table in
README.md (`python -m gearvisor.config --markdown`), so the docs cannot drift from the code.

Scopes:
  global  only at the top level (servers list aside, these are fleet-wide)
  pool    only inside a pool
  both    a fleet-wide default at the top level, overridable in each pool
"""

from __future__ import annotations

import difflib
import grp
import math
import os
import pwd
import re
import resource
import shlex
import signal
import socket
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import yaml

# ---------------------------------------------------------------------------------------------
# Errors


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a config: where it is and what is expected there."""

    path: str  # dotted key path, e.g. "pools.images.processes"
    message: str
    line: int | None = None


class ConfigError(Exception):
    """A config that cannot be used. str() lists every problem, one per line."""

    def __init__(self, file: str, problems: list[Problem]) -> None:
        self.file = file
        self.problems = problems
        super().__init__(self.render())

    def render(self) -> str:
        lines = []
        for p in self.problems:
            where = f"{self.file}:{p.line}" if p.line else self.file
            key = f" {p.path}:" if p.path else ""
            lines.append(f"{where}:{key} {p.message}")
        return "\n".join(lines)


class Invalid(ValueError):
    """Raised by a parser; its text says what was expected.

    `at` and `value` point inside a list or mapping, so the error names the exact item.
    """

    def __init__(self, message: str, at: tuple = (), value: Any = ...) -> None:
        super().__init__(message)
        self.at = at
        self.value = value


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


# ---------------------------------------------------------------------------------------------
# Parsers: each takes the raw YAML value and returns the typed value or raises Invalid.

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def duration(value: Any) -> float:
    """Seconds as a number, or a string like "500ms", "30s", "2m", "1h"."""
    if isinstance(value, bool):
        raise Invalid("expected a duration such as 30, 30s, 500ms or 2m")
    if isinstance(value, (int, float)):
        if not math.isfinite(value) or value < 0:
            raise Invalid("expected a finite duration >= 0")
        return float(value)
    if isinstance(value, str):
        m = _DURATION.match(value)
        if m:
            return float(m.group(1)) * _UNITS[m.group(2)]
    raise Invalid("expected a duration such as 30, 30s, 500ms or 2m")


def int_range(lo: int, hi: int | None = None) -> Callable[[Any], int]:
    def parse(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise Invalid(f"expected a whole number >= {lo}")
        if value < lo or (hi is not None and value > hi):
            raise Invalid(f"expected a whole number from {lo} to {hi}" if hi
                          else f"expected a whole number >= {lo}")
        return value

    parse.__doc__ = f"whole number >= {lo}" + (f" and <= {hi}" if hi else "")
    return parse


def float_range(lo: float, hi: float | None = None) -> Callable[[Any], float]:
    def parse(value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(
                value):
            raise Invalid("expected a finite number")
        if value < lo or (hi is not None and value > hi):
            raise Invalid(f"expected a number from {lo} to {hi}" if hi is not None
                          else f"expected a number >= {lo}")
        return float(value)

    return parse


def choice(*options: str) -> Callable[[Any], str]:
    def parse(value: Any) -> str:
        if value not in options:
            raise Invalid("expected one of " + ", ".join(options))
        return value

    return parse


def optional(inner: Callable[[Any], Any]) -> Callable[[Any], Any]:
    def parse(value: Any) -> Any:
        return None if value is None else inner(value)

    return parse


def text(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise Invalid("expected a non-empty string")
    return value


def token(value: Any) -> str:
    """A string with no whitespace: it goes into gearmand's space-separated admin output."""
    value = text(value)
    if re.search(r"\s|\0", value):
        raise Invalid("expected a string with no spaces")
    return value


@dataclass(frozen=True)
class Server:
    """One job server address."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


_SERVER = re.compile(r"^(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<host>[^\s:\[\]]+))(?::(?P<port>\d+))?$")


def server(value: Any) -> Server:
    if not isinstance(value, str):
        raise Invalid('expected "host:port" (IPv6 as "[::1]:4730")')
    m = _SERVER.match(value.strip())
    if not m:
        raise Invalid('expected "host:port" (IPv6 as "[::1]:4730")')
    port = int(m.group("port") or 4730)
    if not 1 <= port <= 65535:
        raise Invalid("expected a port from 1 to 65535")
    return Server(m.group("v6") or m.group("host"), port)


def servers(value: Any) -> tuple[Server, ...]:
    """A list of "host:port"; a single string is taken as a list of one."""
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not items:
        raise Invalid('expected a non-empty list of "host:port"')
    parsed = []
    for i, item in enumerate(items):
        try:
            parsed.append(server(item))
        except Invalid as e:
            raise Invalid(str(e), at=(i,), value=item) from None
    if len(set(parsed)) != len(parsed):
        raise Invalid("lists the same server twice")
    return tuple(parsed)


def string_list(value: Any) -> tuple[str, ...]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(i, str) and i for i in items):
        raise Invalid("expected a list of strings")
    return tuple(items)


def command(value: Any) -> tuple[str, ...]:
    """argv as a list (run with no shell), or a string split like a shell would (shlex)."""
    if isinstance(value, str):
        try:
            argv = shlex.split(value)
        except ValueError as e:
            raise Invalid(f"cannot split the command: {e}") from None
    elif isinstance(value, list) and all(isinstance(a, (str, int, float)) for a in value):
        argv = [str(a) for a in value]
    else:
        raise Invalid('expected an argv list such as ["php", "worker.php"] or a string')
    if not argv or not argv[0]:
        raise Invalid('expected an argv list such as ["php", "worker.php"] or a string')
    return tuple(argv)


def signal_name(value: Any) -> str:
    """A signal: "TERM", "SIGTERM", "QUIT"..."""
    if isinstance(value, str):
        name = value.strip().upper()
        name = name if name.startswith("SIG") else "SIG" + name
        if name in signal.Signals.__members__:
            return name
    raise Invalid("expected a signal name such as TERM, QUIT, INT, HUP or USR1")


def umask(value: Any) -> int:
    """An octal umask: 22, "022" or "0o022"."""
    text = str(value).strip().lower().removeprefix("0o") if not isinstance(value, bool) else "x"
    if re.fullmatch(r"[0-7]{1,4}", text):
        return int(text, 8)
    raise Invalid('expected an octal umask such as "022"')


_RLIMITS = {name[len("RLIMIT_"):].lower(): getattr(resource, name)
            for name in dir(resource) if name.startswith("RLIMIT_")}


def rlimits(value: Any) -> dict[str, int]:
    """Soft resource limits by name: {nofile: 4096, core: 0, as: 2G, nproc: 64}."""
    if not isinstance(value, dict):
        raise Invalid("expected a mapping such as {nofile: 4096, core: 0}")
    out = {}
    for k, v in value.items():
        if k not in _RLIMITS:
            raise Invalid(f"unknown limit; known: {', '.join(sorted(_RLIMITS))}", at=(k,),
                          value=k)
        if v == "unlimited":
            out[k] = resource.RLIM_INFINITY
            continue
        try:
            out[k] = v if isinstance(v, int) and not isinstance(v, bool) and v >= 0 else size(v)
        except Invalid:
            raise Invalid("expected a whole number >= 0, a size such as 2G, or unlimited",
                          at=(k,), value=v) from None
    return out


def boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise Invalid("expected true or false")
    return value


def watch_list(value: Any) -> tuple[str, ...] | None:
    """`false` (watch nothing), `true` (the default set) or a list of paths and globs."""
    if value is False:
        return ()
    if value is True:
        return None
    try:
        return string_list(value)
    except Invalid:
        raise Invalid('expected a list of paths or globs such as "app/**/*.py", or false') \
            from None


def env_map(value: Any) -> dict[str, str]:
    if not isinstance(value, dict):
        raise Invalid("expected a mapping of NAME: value")
    out = {}
    for k, v in value.items():
        if not isinstance(k, str) or not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", k):
            raise Invalid("expected an environment variable name", at=(k,), value=k)
        if isinstance(v, (dict, list)) or v is None:
            raise Invalid("expected a string or number", at=(k,), value=v)
        out[k] = str(v).lower() if isinstance(v, bool) else str(v)
    return out


_FUNCTION_NAME = re.compile(r"^[^\s\0]{1,255}$")
_CALLABLE = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")


class Functions(dict):
    """Gearman function name -> "module:attr", plus each function's `timeout` (seconds)."""

    timeouts: dict[str, float]


def functions(value: Any) -> Functions:
    """Gearman function name -> "module:attr" of the Python callable that runs it, or a
    mapping {callable: "module:attr", timeout: 30s}. In a `command:` pool: a list of the
    function names the command registers (for `ready: registered`)."""
    if isinstance(value, list) and value:
        out = Functions()
        out.timeouts = {}
        for i, name in enumerate(value):
            if not isinstance(name, str) or not _FUNCTION_NAME.match(name):
                raise Invalid("function names are 1-255 characters with no spaces", at=(i,),
                              value=name)
            out[name] = ""  # registered by an external command, not a Python callable
        return out
    if not isinstance(value, dict) or not value:
        raise Invalid('expected a mapping of gearman function name -> "module:callable"')
    out = Functions()
    out.timeouts = {}
    for name, target in value.items():
        if not isinstance(name, str) or not _FUNCTION_NAME.match(name):
            raise Invalid("function names are 1-255 characters with no spaces", at=(name,),
                          value=name)
        if isinstance(target, dict):
            unknown = sorted(set(target) - {"callable", "timeout"})
            if unknown:
                raise Invalid(f"unknown key {unknown[0]!r}; a function takes callable and "
                              "timeout", at=(name, unknown[0]), value=unknown[0])
            if "timeout" in target:
                try:
                    timeout = duration(target["timeout"])
                except Invalid as e:
                    raise Invalid(str(e), at=(name, "timeout"), value=target["timeout"]) \
                        from None
                if timeout <= 0:
                    raise Invalid("expected a timeout > 0", at=(name, "timeout"),
                                  value=target["timeout"])
                out.timeouts[name] = timeout
            target = target.get("callable")
        if not isinstance(target, str) or not _CALLABLE.match(target):
            raise Invalid('expected "module:callable" such as "examples.text:reverse"',
                          at=(name,), value=target)
        out[name] = target
    return out


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B?|B)?\s*$", re.IGNORECASE)


def size(value: Any) -> int:
    """Bytes as a number, or a string like "512M", "2G", "300MiB"."""
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    if isinstance(value, str):
        m = _SIZE.match(value)
        if m and float(m.group(1)) > 0:
            unit = (m.group(2) or "B").upper()[0]
            n = int(float(m.group(1)) * 1024 ** "BKMGT".index(unit))
            if n >= 1:
                return n
    raise Invalid('expected a size such as 512M, 2G or a number of bytes')


def surge(value: Any) -> int | str:
    """A number of children (>= 1) or a percentage of the pool, like "25%"."""
    if isinstance(value, str) and re.match(r"^\s*\d+(\.\d+)?%\s*$", value):
        if float(value.strip()[:-1]) <= 0:
            raise Invalid('expected a whole number >= 1 or a percentage such as "25%"')
        return value.strip()
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return value
    raise Invalid('expected a whole number >= 1 or a percentage such as "25%"')


def user(value: Any) -> str:
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    value = text(value)
    try:
        pwd.getpwuid(int(value)) if value.isdigit() else pwd.getpwnam(value)
    except (KeyError, ValueError):
        raise Invalid("expected a user that exists on this machine") from None
    return value


def group(value: Any) -> str:
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    value = text(value)
    try:
        grp.getgrgid(int(value)) if value.isdigit() else grp.getgrnam(value)
    except (KeyError, ValueError):
        raise Invalid("expected a group that exists on this machine") from None
    return value


# ---------------------------------------------------------------------------------------------
# The declaration


@dataclass(frozen=True)
class Setting:
    key: str  # dotted for nested blocks: "backoff.initial"
    parse: Callable[[Any], Any]
    default: Any
    doc: str
    scope: str = "both"  # "global" | "pool" | "both"
    shown_default: str | None = None  # for docs, when the default is computed

    @property
    def block(self) -> str | None:
        return self.key.split(".", 1)[0] if "." in self.key else None


SETTINGS: tuple[Setting, ...] = (
    Setting("servers", servers, ("127.0.0.1:4730",),
            'Job servers, "host:port" (IPv6 as "[::1]:4730"). Every child connects to all '
            "of them."),
    Setting("pythonpath", string_list, (),
            "Extra import paths, relative to the config file. The config's own directory is "
            "always on it.", scope="global"),
    Setting("control_socket", optional(text), None,
            "Unix socket of `gearvisor reload/status/stop/restart/scale` (mode 0600).",
            scope="global", shown_default="`/run/gearvisor/gearvisor.sock` as root, else "
            "`$XDG_RUNTIME_DIR/gearvisor.sock`, else `/tmp/gearvisor-$UID/gearvisor.sock`"),
    Setting("watch_config", boolean, True,
            "Reload when the config file changes (as `gearvisor reload` does).",
            scope="global"),
    Setting("watch_debounce", duration, 1.0,
            "Quiet period after the last file change before anything rolls, so a deploy "
            "that touches many files causes one roll.", scope="global"),
    Setting("processes", int_range(0), 1, "How many children the pool runs.", scope="pool"),
    Setting("functions", functions, None,
            'Gearman function name -> Python callable "module:attr". Required.', scope="pool"),
    Setting("watch", watch_list, None,
            "Files whose change rolls the pool: paths or globs (`**` spans directories), "
            "relative to the config file; a directory means everything under it. `false` "
            "turns watching off.",
            shown_default="`*.py` in the directory of each function's module"),
    Setting("command", command, None,
            "Run an external worker (PHP, Perl, any language) instead of Python functions: "
            "an argv list, no shell (a string is split with shlex).", scope="pool",
            shown_default="none (a Python pool)"),
    Setting("stop_signal", signal_name, "SIGTERM",
            "Command pools: the signal that stops a child; SIGKILL after graceful_timeout."),
    Setting("reload_signal", optional(signal_name), None,
            "Command pools: the signal that retires a child in a graceful roll.",
            shown_default="stop_signal"),
    Setting("startsecs", duration, 1.0,
            "Command pools: a child that exits sooner failed to start; one that lives this "
            "long is ready (unless `ready: registered`)."),
    Setting("ready", choice("started", "registered"), "started",
            "Command pools: `registered` waits until gearmand's `workers` list shows the "
            "pool's `functions` from the child's client id ($GEARVISOR_CLIENT_ID)."),
    Setting("max_restarts", optional(int_range(0)), None,
            "Give a slot up after this many consecutive failed starts or crashes (status "
            "shows `fatal`; `gearvisor restart` tries again).", shown_default="never"),
    Setting("umask", optional(umask), None, "Command pools: the children's umask, octal.",
            shown_default="inherited"),
    Setting("rlimits", rlimits, {},
            "Soft resource limits for each child by name, e.g. `{nofile: 4096, core: 0}`."),
    Setting("log_file", optional(text), None,
            "Command pools: write the children's stdout/stderr lines to this file (rotated "
            "by size) instead of gearvisor's log; relative to the config file.",
            shown_default="gearvisor's log"),
    Setting("log_file_max", size, 10 * 1024 * 1024, "Rotate `log_file` at this size."),
    Setting("log_file_backups", int_range(0, 100), 3, "Rotated `log_file`s kept."),
    Setting("output_rate", int_range(1), 1000,
            "Command pools: output lines per second a pool may log; more are dropped and "
            "counted, so a chatty worker never stalls the master or itself."),
    Setting("graceful_timeout", duration, 30.0,
            "How long a child told to stop may finish its current job before SIGKILL."),
    Setting("timeout_grace", duration, 5.0,
            "A job past its function's `timeout` gets an exception (soft); this much later "
            "the master kills the child (hard), which counts toward `poison_after`."),
    Setting("quarantine.enabled", boolean, True,
            "A child that fails fast, job after job, stops taking jobs (self-quarantine)."),
    Setting("quarantine.window", int_range(1, 10000), 20,
            "How many of a child's latest jobs its failure ratio is taken over."),
    Setting("quarantine.min_jobs", int_range(1, 10000), 5,
            "Jobs in the window before a child may quarantine itself."),
    Setting("quarantine.ratio", float_range(0.0, 1.0), 0.8,
            "Share of fast failures in the window that quarantines the child."),
    Setting("quarantine.fast", duration, 1.0,
            "A failure quicker than this counts as fast (a broken worker, not a hard job)."),
    Setting("quarantine.cooldown", duration, 5.0,
            "How long a quarantined child waits before a fresh child replaces it; doubles "
            "on each repeat, up to `quarantine.cooldown_max`."),
    Setting("quarantine.cooldown_max", duration, 300.0, "Longest quarantine cooldown."),
    Setting("quarantine.probation_jobs", int_range(1, 10000), 3,
            "A replacement starts on probation: its first fast failure quarantines it "
            "again, and this many successes end the probation."),
    Setting("circuit.ratio", float_range(0.0, 1.0), 0.6,
            "When this share of a pool's children is quarantined, the pool stops consuming "
            "(jobs stay queued in gearmand) and probes with one child after a cooldown."),
    Setting("circuit.cooldown", duration, 10.0,
            "Wait before the first probe of an open circuit; doubles on each failed probe."),
    Setting("circuit.cooldown_max", duration, 300.0, "Longest wait between probes."),
    Setting("poison_after", int_range(0), 2,
            "A job that crashed or hung this many children is failed without running when "
            "it comes back (0: never)."),
    Setting("prefetch", int_range(1, 64), 1,
            "Most jobs a child may hold per job server while it drains a queue of short jobs "
            "(it asks for more before it has finished the current one). Above 1 it grows only "
            "while jobs succeed in under 1 ms and drops to 1 on a slower or failed job; see "
            "Prefetch. 1: one job at a time."),
    Setting("max_job_size", size, 64 * 1024 * 1024,
            "Largest job payload a child accepts (e.g. 16M). A bigger job is failed without "
            "being read (the client gets WORK_FAIL and a warning saying why; the log names "
            "it), so no job server can make a child allocate more. A job costs a child about "
            "its size once.", shown_default="`64M`"),
    Setting("max_jobs", optional(int_range(1)), None,
            "Recycle a child after this many jobs (+/- `recycle_jitter`).",
            shown_default="no limit"),
    Setting("max_memory", optional(size), None,
            "Recycle a child whose RSS exceeds this, checked between jobs (e.g. 512M).",
            shown_default="no limit"),
    Setting("max_lifetime", optional(duration), None,
            "Recycle a child after it has run this long (+/- `recycle_jitter`).",
            shown_default="no limit"),
    Setting("recycle_jitter", float_range(0.0, 0.5), 0.1,
            "Spread of `max_jobs` and `max_lifetime` per child, as a fraction."),
    Setting("max_surge", surge, "25%",
            "During a roll, how many new children may start beside the old ones at once: a "
            'number or a percentage of `processes` (at least 1).'),
    Setting("connect_timeout", duration, 5.0, "TCP connect timeout to a job server."),
    Setting("reconnect_max_delay", duration, 2.0,
            "Longest wait between reconnect attempts to a job server that went away."),
    Setting("backoff.initial", duration, 0.1, "Delay before restarting a crashed child."),
    Setting("backoff.max", duration, 30.0, "Longest delay between restarts of a crash loop."),
    Setting("backoff.multiplier", float_range(1.0), 2.0, "Delay growth per consecutive crash."),
    Setting("backoff.jitter", float_range(0.0, 1.0), 0.1,
            "Random spread of each delay, as a fraction (0.1 = +/-10%)."),
    Setting("backoff.reset_after", duration, 10.0,
            "A child that stays up this long resets its slot's backoff."),
    Setting("keepalive.idle", int_range(1, 32767), 30,
            "Seconds a connection is idle before TCP keepalive probes start."),
    Setting("keepalive.interval", int_range(1, 32767), 10,
            "Seconds between TCP keepalive probes."),
    Setting("keepalive.count", int_range(1, 127), 3,
            "Unanswered probes before the connection is declared dead."),
    Setting("env", env_map, {}, "Extra environment variables; a pool's env is merged over the "
            "top-level env."),
    Setting("cwd", optional(text), None,
            "Working directory of the children, relative to the config file.",
            shown_default="the config file's directory"),
    Setting("user", optional(user), None, "Run children as this user (gearvisor must be root)."),
    Setting("group", optional(group), None,
            "Run children as this group (gearvisor must be root).",
            shown_default="the user's primary group"),
    Setting("rlimit_nofile", optional(int_range(16)), None,
            "Soft limit on open files for each child (RLIMIT_NOFILE).",
            shown_default="inherited"),
    Setting("client_id_prefix", token, None,
            "First part of each child's gearman client id `<prefix>:<pool>:<slot>`.",
            shown_default="the host name"),
    Setting("exception_packet", choice("warning", "exception"), "warning",
            "How a job that raised is reported: `warning` sends WORK_WARNING(text) + WORK_FAIL, "
            "which every client sees as a failure; `exception` sends WORK_EXCEPTION(text) + "
            "WORK_FAIL (libgearman clients such as the gearman CLI hang on it, gearmand #166)."),
    Setting("log_level", choice("debug", "info", "warning", "error"), "info", "Log level."),
    Setting("log_format", choice("auto", "console", "json"), "auto",
            "`console` is key=value, `json` is one JSON object per line, `auto` picks console "
            "on a terminal and json otherwise."),
)

BY_KEY = {s.key: s for s in SETTINGS}
BLOCKS = sorted({s.block for s in SETTINGS if s.block})
TOP_KEYS = {s.key.split(".")[0] for s in SETTINGS if s.scope != "pool"} | {"pools"}
POOL_KEYS = {s.key.split(".")[0] for s in SETTINGS if s.scope != "global"}
POOL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


# ---------------------------------------------------------------------------------------------
# The typed result


@dataclass(frozen=True)
class BackoffConfig:
    initial: float
    max: float
    multiplier: float
    jitter: float
    reset_after: float


@dataclass(frozen=True)
class KeepaliveConfig:
    idle: int
    interval: int
    count: int


@dataclass(frozen=True)
class QuarantineConfig:
    enabled: bool = True
    window: int = 20
    min_jobs: int = 5
    ratio: float = 0.8
    fast: float = 1.0
    cooldown: float = 5.0
    cooldown_max: float = 300.0
    probation_jobs: int = 3


@dataclass(frozen=True)
class CircuitConfig:
    ratio: float = 0.6
    cooldown: float = 10.0
    cooldown_max: float = 300.0


@dataclass(frozen=True)
class PoolConfig:
    """Everything one pool needs, with the top-level defaults already applied."""

    name: str
    processes: int
    functions: dict[str, str]
    servers: tuple[Server, ...]
    graceful_timeout: float
    connect_timeout: float
    reconnect_max_delay: float
    backoff: BackoffConfig
    keepalive: KeepaliveConfig
    env: dict[str, str]
    cwd: str
    user: str | None
    group: str | None
    rlimit_nofile: int | None
    client_id_prefix: str
    exception_packet: str
    log_level: str
    log_format: str
    max_surge: int | str = "25%"
    timeouts: dict[str, float] = field(default_factory=dict)  # function -> seconds
    timeout_grace: float = 5.0
    quarantine: QuarantineConfig = field(default_factory=lambda: QuarantineConfig())
    circuit: CircuitConfig = field(default_factory=lambda: CircuitConfig())
    poison_after: int = 2
    prefetch: int = 1
    max_job_size: int = 64 * 1024 * 1024
    max_jobs: int | None = None
    max_memory: int | None = None
    max_lifetime: float | None = None
    recycle_jitter: float = 0.1
    command: tuple[str, ...] | None = None  # an external worker's argv (a command pool)
    stop_signal: str = "SIGTERM"
    reload_signal: str | None = None
    startsecs: float = 1.0
    ready: str = "started"
    max_restarts: int | None = None
    umask: int | None = None
    rlimits: dict[str, int] = field(default_factory=dict)
    log_file: str | None = None
    log_file_max: int = 10 * 1024 * 1024
    log_file_backups: int = 3
    output_rate: int = 1000
    # None: the directories of the functions' modules, *.py; (): not watched
    watch: tuple[str, ...] | None = None


@dataclass(frozen=True)
class Config:
    """A whole validated config file."""

    path: str
    pythonpath: tuple[str, ...]
    pools: dict[str, PoolConfig]
    log_level: str
    log_format: str
    graceful_timeout: float
    control_socket: str | None = None
    watch_config: bool = True
    watch_debounce: float = 1.0
    raw: Mapping[str, Any] = field(repr=False, compare=False, default_factory=dict)

    @property
    def directory(self) -> str:
        return os.path.dirname(self.path)


# ---------------------------------------------------------------------------------------------
# Loading


def _line_map(text_: str) -> dict[tuple, int]:
    """Map each key path to its 1-based line, and record duplicate keys under ("!dup", ...)."""
    lines: dict[tuple, int] = {}
    try:
        root = yaml.compose(text_, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return lines

    def walk(node: yaml.Node, path: tuple) -> None:
        lines.setdefault(path, node.start_mark.line + 1)
        if isinstance(node, yaml.MappingNode):
            seen = set()
            for k, v in node.value:
                key = k.value
                if key in seen:
                    lines[("!dup",) + path + (key,)] = k.start_mark.line + 1
                seen.add(key)
                lines[path + (key,)] = k.start_mark.line + 1
                walk(v, path + (key,))
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                walk(item, path + (i,))

    if root is not None:
        walk(root, ())
    return lines


class _Collector:
    """Gathers every problem in one pass, so the operator fixes them all at once."""

    def __init__(self, lines: dict[tuple, int]) -> None:
        self.lines = lines
        self.problems: list[Problem] = []

    def add(self, path: tuple, message: str) -> None:
        dotted = ".".join(str(p) for p in path)
        if any(p.path == dotted and p.message == message for p in self.problems):
            return  # a top-level value inherited by several pools is reported once
        line = None
        for n in range(len(path), -1, -1):
            line = self.lines.get(path[:n])
            if line:
                break
        self.problems.append(Problem(dotted, message, line))

    def unknown(self, path: tuple, key: Any, allowed: set[str]) -> None:
        hint = difflib.get_close_matches(str(key), sorted(allowed), n=1)
        suggestion = f'; did you mean "{hint[0]}"?' if hint else ""
        self.add(path + (key,), f"unknown key{suggestion} (known: {', '.join(sorted(allowed))})")


def _parse_value(col: _Collector, path: tuple, setting: Setting, raw: Any) -> Any:
    try:
        return setting.parse(raw)
    except Invalid as e:
        col.add(path + e.at, f"{e}, got {_show(raw if e.value is ... else e.value)}")
        return setting.default


def _read_scope(col: _Collector, path: tuple, data: dict, scope: str) -> dict[str, Any]:
    """Parse the settings of one scope ("global" or "pool") present in `data`."""
    allowed = TOP_KEYS if scope == "global" else POOL_KEYS
    values: dict[str, Any] = {}
    for key, raw in data.items():
        if key not in allowed:
            col.unknown(path, key, allowed)
            continue
        if key == "pools":
            continue
        if key in BLOCKS:
            if not isinstance(raw, dict):
                col.add(path + (key,), f"expected a mapping, got {_show(raw)}")
                continue
            sub = {s.key.split(".")[1] for s in SETTINGS if s.block == key}
            for subkey, subraw in raw.items():
                if subkey not in sub:
                    col.unknown(path + (key,), subkey, sub)
                    continue
                s = BY_KEY[f"{key}.{subkey}"]
                values[s.key] = _parse_value(col, path + (key, subkey), s, subraw)
            continue
        values[key] = _parse_value(col, path + (key,), BY_KEY[key], raw)
    return values


def _default(setting: Setting) -> Any:
    if setting.key == "client_id_prefix":
        return token(socket.gethostname().split(".")[0] or "gearvisor")
    if setting.key == "servers":
        return servers(list(setting.default))
    return setting.default


def _block(merged: dict[str, Any], block: str) -> dict[str, Any]:
    """The values of one nested block ("backoff.initial" -> {"initial": ...})."""
    return {k.split(".", 1)[1]: v for k, v in merged.items() if k.startswith(block + ".")}


def _resolve(directory: str, p: str) -> str:
    return os.path.normpath(os.path.join(directory, os.path.expanduser(p)))


def parse(text_: str, file: str, *, euid: int | None = None) -> Config:
    """Validate the YAML text of a config file; raise ConfigError listing every problem."""
    file = os.path.abspath(file)
    directory = os.path.dirname(file)
    try:
        data = yaml.safe_load(text_)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        problem = getattr(e, "problem", None) or str(e)
        line = mark.line + 1 if mark else None
        col = f" column {mark.column + 1}" if mark else ""
        raise ConfigError(file, [Problem("", f"YAML syntax error{col}: {problem}", line)]) from None
    lines = _line_map(text_)
    col = _Collector(lines)
    for key, line in lines.items():
        if key and key[0] == "!dup":
            col.problems.append(Problem(".".join(map(str, key[1:])),
                                        "key is given twice; remove one", line))
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(file, [Problem("", f"expected a mapping at the top, got {_show(data)}",
                                         1)])
    top = _read_scope(col, (), data, "global")
    pools_raw = data.get("pools")
    if not isinstance(pools_raw, dict) or not pools_raw:
        col.add(("pools",), "expected a mapping of pool name -> pool settings, with at least "
                f"one pool, got {_show(pools_raw)}")
        pools_raw = {}

    pools: dict[str, PoolConfig] = {}
    for name, praw in pools_raw.items():
        path = ("pools", name)
        if not isinstance(name, str) or not POOL_NAME.match(name):
            col.add(path, "pool names are 1-64 letters, digits, '_', '.' or '-'")
            continue
        if not isinstance(praw, dict):
            col.add(path, f"expected a mapping of pool settings, got {_show(praw)}")
            continue
        own = _read_scope(col, path, praw, "pool")
        if "functions" not in praw and "command" not in praw:
            col.add(path, 'missing "functions": map each gearman function name to '
                    '"module:callable" (or give a `command:` to run an external worker)')
        elif "command" in praw and isinstance(praw.get("functions"), dict):
            col.add(path + ("functions",), "a command pool lists the function names its "
                    "command registers (a list), not Python callables")
        elif "command" not in praw and isinstance(praw.get("functions"), list):
            col.add(path + ("functions",), 'a list of names needs `command:`; a Python pool '
                    'maps each name to "module:callable"')
        if praw.get("ready") == "registered" and not isinstance(praw.get("functions"), list):
            col.add(path + ("ready",), "`ready: registered` needs `functions:`, the list of "
                    "function names the command registers")
        merged: dict[str, Any] = {}
        origin: dict[str, tuple] = {}  # where a value was written, for error messages
        for s in SETTINGS:
            if s.scope == "global":
                continue
            key_path = tuple(s.key.split("."))
            if s.key in own:
                merged[s.key] = own[s.key]
                origin[s.key] = path + key_path
            elif s.scope == "both" and s.key in top:
                merged[s.key] = top[s.key]
                origin[s.key] = key_path
            else:
                merged[s.key] = _default(s)
                origin[s.key] = path + key_path
        merged["env"] = {**top.get("env", {}), **own.get("env", {})}
        merged["cwd"] = _resolve(directory, merged["cwd"]) if merged["cwd"] else directory
        if not os.path.isdir(merged["cwd"]):
            col.add(origin["cwd"], f"directory {merged['cwd']} does not exist")
        if merged["backoff.max"] < merged["backoff.initial"]:
            col.add(origin["backoff.max"], f"must be >= backoff.initial "
                    f"({merged['backoff.initial']}), got {merged['backoff.max']}")
        if merged["quarantine.min_jobs"] > merged["quarantine.window"]:
            col.add(origin["quarantine.min_jobs"], "must be <= quarantine.window "
                    f"({merged['quarantine.window']}), or the child can never quarantine, "
                    f"got {merged['quarantine.min_jobs']}")
        if (merged["user"] or merged["group"]) and (os.geteuid() if euid is None else euid) != 0:
            which = "user" if merged["user"] else "group"
            col.add(origin[which], f"switching {which} needs gearvisor to run as root; "
                    f"remove {which} or start gearvisor as root")
        special = {"functions", "env", "cwd", "watch", "log_file", "command"}
        plain = {s.key: merged[s.key] for s in SETTINGS
                 if s.scope != "global" and s.block is None and s.key not in special}
        pools[name] = PoolConfig(
            name=name,
            functions=merged["functions"] or {},
            env=merged["env"],
            cwd=merged["cwd"],
            watch=(None if merged["watch"] is None
                   else tuple(_resolve(directory, w) for w in merged["watch"])),
            timeouts=dict(getattr(merged["functions"], "timeouts", {})),
            command=merged["command"],
            log_file=_resolve(directory, merged["log_file"]) if merged["log_file"] else None,
            backoff=BackoffConfig(**_block(merged, "backoff")),
            keepalive=KeepaliveConfig(**_block(merged, "keepalive")),
            quarantine=QuarantineConfig(**_block(merged, "quarantine")),
            circuit=CircuitConfig(**_block(merged, "circuit")),
            **plain,
        )

    pythonpath = []
    for i, p in enumerate(top.get("pythonpath", ())):
        resolved = _resolve(directory, p)
        if not os.path.isdir(resolved):
            col.add(("pythonpath", i), f"directory {resolved} does not exist")
        pythonpath.append(resolved)
    if directory not in pythonpath:
        pythonpath.append(directory)

    if col.problems:
        col.problems.sort(key=lambda p: p.line or 0)
        raise ConfigError(file, col.problems)
    return Config(
        path=file,
        pythonpath=tuple(pythonpath),
        pools=pools,
        log_level=top.get("log_level", BY_KEY["log_level"].default),
        log_format=top.get("log_format", BY_KEY["log_format"].default),
        graceful_timeout=top.get("graceful_timeout", BY_KEY["graceful_timeout"].default),
        control_socket=(_resolve(directory, top["control_socket"])
                        if top.get("control_socket") else None),
        watch_config=top.get("watch_config", True),
        watch_debounce=top.get("watch_debounce", BY_KEY["watch_debounce"].default),
        raw=data,
    )


def load(path: str) -> Config:
    """Read and validate a config file; raise ConfigError (never OSError or YAMLError)."""
    try:
        with open(path, encoding="utf-8") as f:
            text_ = f.read()
    except FileNotFoundError:
        raise ConfigError(os.path.abspath(path), [Problem(
            "", "file not found; pass the pool spec with -c FILE (see conf/pools.yaml)")]) from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(os.path.abspath(path), [Problem("", f"cannot read: {e}")]) from None
    return parse(text_, path)


# ---------------------------------------------------------------------------------------------
# Docs


def markdown_reference() -> str:
    """The config reference table for README.md, generated from SETTINGS."""
    rows = ["| key | where | default | meaning |", "| --- | --- | --- | --- |"]
    where = {"global": "top level", "pool": "pool", "both": "top level or pool"}
    for s in SETTINGS:
        if s.shown_default is not None:
            default = s.shown_default
        elif s.default is None:
            default = "required" if s.key == "functions" else "none"
        elif isinstance(s.default, (tuple, list)):
            default = "`[" + ", ".join(f'"{v}"' for v in s.default) + "]`"
        elif isinstance(s.default, dict):
            default = "`{}`"
        else:
            default = f"`{s.default}`"
        rows.append(f"| `{s.key}` | {where[s.scope]} | {default} | {s.doc} |")
    return "\n".join(rows)


if __name__ == "__main__":  # pragma: no cover - a docs helper
    if sys.argv[1:] == ["--markdown"]:
        print(markdown_reference())
    else:
        print("usage: python -m gearvisor.config --markdown", file=sys.stderr)
        sys.exit(2)


__all__ = ["Config", "ConfigError", "PoolConfig", "Server", "load", "parse", "SETTINGS"]
