"""YAML pool spec -> frozen dataclasses, with every error naming file, line, key path and value.

Each setting is declared once in SETTINGS (key, parser, default, one-line doc, scope). That one
declaration drives validation, defaults, per-pool overrides and the reference table in
README.md (`python -m gearvisor.config --markdown`), so the docs cannot drift from the code.

Scopes:
  global  only at the top level (servers list aside, these are fleet-wide)
  pool    only inside a pool
  both    a fleet-wide default at the top level, overridable in each pool

Any bytes may be in the file (it is edited by hand, and the watcher reloads every save): the
loader either returns a Config or raises ConfigError, within a bounded time and memory. The
file is read up to MAX_FILE_BYTES; YAML is composed with limits on nesting and on what aliases
expand to before anything walks the tree; numbers, durations and sizes have maxima, so no value
overflows later in the master or a child.
"""

from __future__ import annotations

import datetime
import difflib
import grp
import ipaddress
import math
import os
import pwd
import re
import reprlib
import resource
import shlex
import signal
import socket
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import yaml
from yaml.composer import Composer
from yaml.constructor import SafeConstructor
from yaml.events import AliasEvent, ScalarEvent
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode
from yaml.parser import Parser
from yaml.reader import Reader
from yaml.resolver import Resolver
from yaml.scanner import Scanner

try:  # libyaml scans and parses ~5x faster; the composer with the limits stays ours
    from yaml.cyaml import CParser
except ImportError:  # pragma: no cover - PyYAML built without libyaml
    CParser = None

# What a config may be. A real one is a few KiB, about 6 levels deep and a few hundred nodes;
# each limit is far above that and far below what would take seconds or much memory.
MAX_FILE_BYTES = 1024 * 1024
MAX_DEPTH = 32  # nesting levels, counting what aliases expand to
MAX_NODES = 20_000  # YAML nodes (keys, values, items), counting what aliases expand to
MAX_NUMBER_CHARS = 1000  # a YAML int or float literal; the largest setting needs 19 digits
# An int of more digits is refused: str() of it may fail (PYTHONINTMAXSTRDIGITS can be as low
# as 640), and a 400-digit one still reaches the setting, which says what range it takes.
MAX_INT_DIGITS = 600
MAX_SHOWN = 50  # problems printed; the rest are counted
SOCKET_PATH_MAX = 107  # bytes in a Unix socket path (sun_path is 108, with its NUL)

MINUTE = 60.0
HOUR = 3600.0
DAY = 86400.0

# ---------------------------------------------------------------------------------------------
# Errors


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a config: where it is and what is expected there."""

    path: str  # dotted key path, e.g. "pools.images.processes"
    message: str
    line: int | None = None


# Control characters, line separators and lone surrogates: escaped in error text, so one
# problem stays one line and any terminal or log can print it.
_UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")


def _printable(text_: str) -> str:
    return _UNPRINTABLE.sub(lambda m: ascii(m.group())[1:-1], text_)


class ConfigError(Exception):
    """A config that cannot be used. str() lists every problem, one per line."""

    def __init__(self, file: str, problems: list[Problem]) -> None:
        self.file = file
        self.problems = problems
        super().__init__(self.render())

    def render(self) -> str:
        """One `file:line: key.path: message` line per problem (the first MAX_SHOWN)."""
        lines = []
        for p in self.problems[:MAX_SHOWN]:
            where = f"{self.file}:{p.line}" if p.line else self.file
            key = f" {p.path}:" if p.path else ""
            lines.append(_printable(f"{where}:{key} {p.message}"))
        if len(self.problems) > MAX_SHOWN:
            lines.append(_printable(f"{self.file}: ... and {len(self.problems) - MAX_SHOWN} "
                                    "more problems; fix these first"))
        return "\n".join(lines)


class Invalid(ValueError):
    """Raised by a parser; its text says what was expected.

    `at` and `value` point inside a list or mapping, so the error names the exact item.
    """

    def __init__(self, message: str, at: tuple = (), value: Any = ...) -> None:
        super().__init__(message)
        self.at = at
        self.value = value


_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxdict, _REPR.maxlist, _REPR.maxtuple, _REPR.maxset = 3, 4, 6, 6, 6
_REPR.maxstring = _REPR.maxother = _REPR.maxlong = 80


def _show(value: Any) -> str:
    # reprlib, not repr: aliases can make a value a large shared tree, and a string may be
    # most of the file; the text shown stays short whatever the value.
    try:
        text_ = _REPR.repr(value)
    except ValueError:  # an int past sys.get_int_max_str_digits()
        text_ = f"<{type(value).__name__} too long to show>"
    return text_ if len(text_) <= 80 else text_[:77] + "..."


# ---------------------------------------------------------------------------------------------
# Parsers: each takes the raw YAML value and returns the typed value or raises Invalid.
# A parser with limits says them in its `limit` attribute, which the README table shows.


def _clean(value: str) -> str:
    """`value`, if the OS can take it: no NUL byte (it ends a C string, so a path or an
    argument would be cut short) and no lone surrogate (it cannot be encoded to bytes)."""
    if "\0" in value:
        raise Invalid("must not contain a NUL byte (\\0)")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise Invalid(f"must not contain a lone surrogate ({ascii(value[e.start])[1:-1]}); "
                      "write the character itself, in UTF-8") from None
    return value


def _span(seconds: float) -> str:
    """A maximum duration for the operator: "1h", "168h (7 days)"."""
    if seconds >= DAY and seconds % DAY == 0:
        days = seconds / DAY
        return f"{seconds / HOUR:g}h ({days:g} day{'s' if days != 1 else ''})"
    if seconds >= HOUR and seconds % HOUR == 0:
        return f"{seconds / HOUR:g}h"
    if seconds >= MINUTE and seconds % MINUTE == 0:
        return f"{seconds / MINUTE:g}m"
    return f"{seconds:g}s"


_DURATION = re.compile(r"\s*([0-9]+(?:\.[0-9]+)?)\s*(ms|s|m|h)?\s*")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}
DURATION_MAX = 30 * DAY  # the longest any duration setting takes (max_lifetime)


def duration(value: Any, maximum: float = DURATION_MAX) -> float:
    """Seconds as a number, or a string like "500ms", "30s", "2m", "1h", up to `maximum`.

    A maximum for each kind, because a huge or infinite duration is accepted here but
    overflows later (a timer, setitimer, math.ceil) in the master or a child."""
    if isinstance(value, bool):
        raise Invalid("expected a duration such as 30, 30s, 500ms or 2m")
    if isinstance(value, int):
        seconds: float | int = value  # compared as an int: a 400-digit one cannot overflow
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise Invalid("expected a finite duration >= 0")
        seconds = value
    elif isinstance(value, str) and (m := _DURATION.fullmatch(value)):
        seconds = float(m.group(1)) * _UNITS[m.group(2)]  # 400 digits: inf, refused below
    else:
        raise Invalid("expected a duration such as 30, 30s, 500ms or 2m")
    if seconds < 0:
        raise Invalid("expected a finite duration >= 0")
    if not seconds <= maximum:
        raise Invalid(f"expected a duration of at most {_span(maximum)}")
    return float(seconds)


def duration_upto(maximum: float) -> Callable[[Any], float]:
    """A duration parser with its own maximum."""

    def parse(value: Any) -> float:
        return duration(value, maximum)

    parse.limit = f"At most {_span(maximum)}."  # type: ignore[attr-defined]
    return parse


def int_range(lo: int, hi: int) -> Callable[[Any], int]:
    """A whole number from lo to hi (every count has a maximum: nothing downstream has to
    survive a 400-digit one)."""

    def parse(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise Invalid(f"expected a whole number >= {lo}")
        if not lo <= value <= hi:
            raise Invalid(f"expected a whole number from {lo} to {hi}")
        return value

    parse.__doc__ = f"whole number >= {lo} and <= {hi}"
    parse.limit = f"From {lo} to {hi}."  # type: ignore[attr-defined]
    return parse


def float_range(lo: float, hi: float) -> Callable[[Any], float]:
    """A finite number from lo to hi; an int is range-checked before it becomes a float (a
    400-digit int overflows float())."""

    def parse(value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (
                isinstance(value, float) and not math.isfinite(value)):
            raise Invalid("expected a finite number")
        if not lo <= value <= hi:
            raise Invalid(f"expected a number from {lo} to {hi}")
        return float(value)

    parse.limit = f"From {lo:g} to {hi:g}."  # type: ignore[attr-defined]
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

    if hasattr(inner, "limit"):
        parse.limit = inner.limit  # type: ignore[attr-defined]
    return parse


def text(value: Any) -> str:
    """A non-empty string the OS can take as a path or name."""
    if not isinstance(value, str) or not value.strip():
        raise Invalid("expected a non-empty string")
    return _clean(value)


def token(value: Any) -> str:
    """A string with no whitespace: it goes into gearmand's space-separated admin output."""
    value = text(value)
    if re.search(r"\s", value):
        raise Invalid("expected a string with no spaces")
    return value


@dataclass(frozen=True)
class Server:
    """One job server address."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


# A host name or IPv4 address, or anything in brackets (checked as IPv6 below); then a port.
_SERVER = re.compile(r"(?:\[(?P<v6>[^\[\]]*)\]|(?P<host>[^\s\x00-\x1f\x7f:\[\]/]{1,253}))"
                     r"(?::(?P<port>[0-9]+))?")


def server(value: Any) -> Server:
    if not isinstance(value, str):
        raise Invalid('expected "host:port" (IPv6 as "[::1]:4730")')
    m = _SERVER.fullmatch(value.strip())
    if not m:
        raise Invalid('expected "host:port" (IPv6 as "[::1]:4730")')
    host = m.group("host")
    if host is None:
        try:
            ipaddress.IPv6Address(m.group("v6"))
        except ValueError:
            raise Invalid('expected an IPv6 address in the brackets, such as "[::1]:4730"') \
                from None
        host = m.group("v6")
    port = m.group("port") or "4730"
    if len(port) > 5 or not 1 <= int(port) <= 65535:
        raise Invalid("expected a port from 1 to 65535")
    return Server(_clean(host), int(port))


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
    for i, item in enumerate(items):
        try:
            _clean(item)
        except Invalid as e:
            raise Invalid(str(e), at=(i,) if isinstance(value, list) else (), value=item) \
                from None
    return tuple(items)


def command(value: Any) -> tuple[str, ...]:
    """argv as a list (run with no shell), or a string split like a shell would (shlex)."""
    if isinstance(value, str):
        try:
            argv = shlex.split(_clean(value))
        except ValueError as e:
            raise Invalid(f"cannot split the command: {e}") from None
    elif isinstance(value, list) and all(isinstance(a, (str, int, float)) for a in value):
        argv = [str(a) for a in value]
        for i, arg in enumerate(argv):
            try:
                _clean(arg)
            except Invalid as e:
                raise Invalid(str(e), at=(i,), value=arg) from None
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
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 7777:
        text_ = str(value)
    elif isinstance(value, str):
        text_ = value.strip().lower().removeprefix("0o")
    else:
        text_ = "x"
    if re.fullmatch(r"[0-7]{1,4}", text_):
        return int(text_, 8)
    raise Invalid('expected an octal umask such as "022"')


_RLIMITS = {name[len("RLIMIT_"):].lower(): getattr(resource, name)
            for name in dir(resource) if name.startswith("RLIMIT_")}
RLIMIT_MAX = 2**63 - 1  # setrlimit takes a signed 64-bit value


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
            if isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= RLIMIT_MAX:
                out[k] = v
            else:
                out[k] = size(v)
        except Invalid:
            raise Invalid(f"expected a whole number from 0 to {RLIMIT_MAX}, a size such as 2G, "
                          "or unlimited", at=(k,), value=v) from None
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
    except Invalid as e:
        if e.at:  # one item is unusable: say which and why
            raise
        raise Invalid('expected a list of paths or globs such as "app/**/*.py", or false') \
            from None


_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# date and datetime: `DAY: 2024-01-01` unquoted is a YAML date, passed on as its text
_ENV_VALUE = (str, int, float, datetime.date)


def env_map(value: Any) -> dict[str, str]:
    if not isinstance(value, dict):
        raise Invalid("expected a mapping of NAME: value")
    out = {}
    for k, v in value.items():
        if not isinstance(k, str) or not _ENV_NAME.fullmatch(k):
            raise Invalid("expected an environment variable name", at=(k,), value=k)
        if not isinstance(v, _ENV_VALUE):
            raise Invalid("expected a string or number", at=(k,), value=v)
        try:
            out[k] = str(v).lower() if isinstance(v, bool) else _clean(str(v))
        except Invalid as e:
            raise Invalid(str(e), at=(k,), value=v) from None
    return out


# Sent to gearmand as bytes; whitespace would split gearmand's admin output.
_FUNCTION_NAME = re.compile(r"[^\s\0]{1,255}")
_CALLABLE = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_][\w.]*")
TIMEOUT_MAX = 7 * DAY


def _function_name(name: Any) -> bool:
    if not isinstance(name, str) or not _FUNCTION_NAME.fullmatch(name):
        return False
    try:
        _clean(name)
    except Invalid:
        return False
    return True


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
            if not _function_name(name):
                raise Invalid("function names are 1-255 characters with no spaces", at=(i,),
                              value=name)
            out[name] = ""  # registered by an external command, not a Python callable
        return out
    if not isinstance(value, dict) or not value:
        raise Invalid('expected a mapping of gearman function name -> "module:callable"')
    out = Functions()
    out.timeouts = {}
    for name, target in value.items():
        if not _function_name(name):
            raise Invalid("function names are 1-255 characters with no spaces", at=(name,),
                          value=name)
        if isinstance(target, dict):
            # key=str: YAML keys may be numbers too, and ints and strs do not sort together
            unknown = sorted(set(target) - {"callable", "timeout"}, key=str)
            if unknown:
                raise Invalid(f"unknown key {unknown[0]!r}; a function takes callable and "
                              "timeout", at=(name, unknown[0]), value=unknown[0])
            if "timeout" in target:
                try:
                    timeout = duration(target["timeout"], TIMEOUT_MAX)
                except Invalid as e:
                    raise Invalid(str(e), at=(name, "timeout"), value=target["timeout"]) \
                        from None
                if timeout <= 0:
                    raise Invalid("expected a timeout > 0", at=(name, "timeout"),
                                  value=target["timeout"])
                out.timeouts[name] = timeout
            target = target.get("callable")
        if not isinstance(target, str) or not _CALLABLE.fullmatch(target):
            raise Invalid('expected "module:callable" such as "examples.text:reverse"',
                          at=(name,), value=target)
        out[name] = target
    return out


_SIZE = re.compile(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([KMGT]i?B?|B)?\s*", re.IGNORECASE)
SIZE_MAX = 1024**5  # 1024T: more than any machine has; float() keeps it exact


def size(value: Any) -> int:
    """Bytes as a number, or a string like "512M", "2G", "300MiB", up to 1024T."""
    if isinstance(value, int) and not isinstance(value, bool) and 0 < value <= SIZE_MAX:
        return value
    if isinstance(value, str) and (m := _SIZE.fullmatch(value)):
        unit = (m.group(2) or "B").upper()[0]
        n = float(m.group(1)) * 1024 ** "BKMGT".index(unit)  # 400 digits: inf, refused below
        if 1 <= n <= SIZE_MAX:
            return int(n)
    if isinstance(value, (int, str)) and not isinstance(value, bool):
        raise Invalid("expected a size from 1 byte to 1024T, such as 512M, 2G or a number of "
                      "bytes")
    raise Invalid('expected a size such as 512M, 2G or a number of bytes')


size.limit = "At most 1024T."  # type: ignore[attr-defined]
MAX_PROCESSES = 10_000  # per pool; also the most max_surge may be


def surge(value: Any) -> int | str:
    """A number of children (1 to MAX_PROCESSES) or a percentage of the pool up to 100%."""
    if isinstance(value, str) and re.fullmatch(r"\s*[0-9]+(\.[0-9]+)?%\s*", value):
        if not 0 < float(value.strip()[:-1]) <= 100:
            raise Invalid('expected a percentage above 0% and up to 100%, such as "25%"')
        return value.strip()
    if isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= MAX_PROCESSES:
        return value
    raise Invalid(f"expected a whole number from 1 to {MAX_PROCESSES} or a percentage such "
                  'as "25%"')


surge.limit = f"At most {MAX_PROCESSES}, or 100%."  # type: ignore[attr-defined]


ID_MAX = 2**32 - 2  # uid_t/gid_t; 2**32 - 1 is (uid_t)-1, "no change"


def _account(value: Any, lookup_id: Callable[[int], Any], lookup_name: Callable[[str], Any],
             what: str) -> str:
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    value = text(value)
    try:
        if re.fullmatch(r"[0-9]+", value):
            # bounded first: getpwuid(400 digits) raises OverflowError, int() past 4300
            # digits ValueError
            if len(value) > 10 or int(value) > ID_MAX:
                raise KeyError(value)
            lookup_id(int(value))
        else:
            lookup_name(value)
    except (KeyError, ValueError, OverflowError):
        raise Invalid(f"expected a {what} that exists on this machine") from None
    return value


def user(value: Any) -> str:
    """A user name or uid that exists here (the child switches to it after fork)."""
    return _account(value, pwd.getpwuid, pwd.getpwnam, "user")


def group(value: Any) -> str:
    """A group name or gid that exists here."""
    return _account(value, grp.getgrgid, grp.getgrnam, "group")


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
    Setting("watch_debounce", duration_upto(HOUR), 1.0,
            "Quiet period after the last file change before anything rolls, so a deploy "
            "that touches many files causes one roll.", scope="global"),
    Setting("processes", int_range(0, MAX_PROCESSES), 1, "How many children the pool runs.",
            scope="pool"),
    Setting("functions", functions, None,
            'Gearman function name -> Python callable "module:attr". Required.', scope="pool"),
    Setting("watch", watch_list, None,
            "Files whose change rolls the pool: paths or globs (`**` spans directories), "
            "relative to the config file; a directory means everything under it. A Python "
            "pool watches these besides the files its code imported; a command pool watches "
            "these instead of its script's directory. `false` turns watching off.",
            shown_default="the files the pool's code imported (outside the stdlib and "
                          "site-packages); a command pool: its script's directory"),
    Setting("command", command, None,
            "Run an external worker (PHP, Perl, any language) instead of Python functions: "
            "an argv list, no shell (a string is split with shlex).", scope="pool",
            shown_default="none (a Python pool)"),
    Setting("stop_signal", signal_name, "SIGTERM",
            "Command pools: the signal that stops a child; SIGKILL after graceful_timeout."),
    Setting("reload_signal", optional(signal_name), None,
            "Command pools: the signal that retires a child in a graceful roll.",
            shown_default="stop_signal"),
    Setting("startsecs", duration_upto(HOUR), 1.0,
            "Command pools: a child that exits sooner failed to start; one that lives this "
            "long is ready (unless `ready: registered`)."),
    Setting("ready", choice("started", "registered"), "started",
            "Command pools: `registered` waits until gearmand's `workers` list shows the "
            "pool's `functions` from the child's client id ($GEARVISOR_CLIENT_ID)."),
    Setting("max_restarts", optional(int_range(0, 1_000_000)), None,
            "Give a slot up after this many consecutive failed starts or crashes (status "
            "shows `fatal`; `gearvisor restart` tries again).", shown_default="never"),
    Setting("umask", optional(umask), None, "The children's umask, octal.",
            shown_default="inherited"),
    Setting("rlimits", rlimits, {},
            "Soft resource limits for each child by name, e.g. `{nofile: 4096, core: 0}`."),
    Setting("log_file", optional(text), None,
            "Command pools: write the children's stdout/stderr lines to this file (rotated "
            "by size) instead of gearvisor's log; relative to the config file.",
            shown_default="gearvisor's log"),
    Setting("log_file_max", size, 10 * 1024 * 1024, "Rotate `log_file` at this size."),
    Setting("log_file_backups", int_range(0, 100), 3, "Rotated `log_file`s kept."),
    Setting("output_rate", int_range(1, 1_000_000), 1000,
            "Command pools: output lines per second a pool may log; more are dropped and "
            "counted, so a chatty worker never stalls the master or itself."),
    Setting("graceful_timeout", duration_upto(TIMEOUT_MAX), 30.0,
            "How long a child told to stop may finish its current job before SIGKILL."),
    Setting("kill_group", boolean, True,
            "Each child runs in its own process group. The stop signal goes to the child; "
            "SIGKILL goes to its whole group; what is left of the group when the child "
            "exits gets SIGTERM, then SIGKILL after graceful_timeout. `false` leaves "
            "descendants alone (workers that daemonize on purpose)."),
    Setting("timeout_grace", duration_upto(HOUR), 5.0,
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
    Setting("quarantine.fast", duration_upto(HOUR), 1.0,
            "A failure quicker than this counts as fast (a broken worker, not a hard job)."),
    Setting("quarantine.cooldown", duration_upto(DAY), 5.0,
            "How long a quarantined child waits before a fresh child replaces it; doubles "
            "on each repeat, up to `quarantine.cooldown_max`."),
    Setting("quarantine.cooldown_max", duration_upto(7 * DAY), 300.0,
            "Longest quarantine cooldown."),
    Setting("quarantine.probation_jobs", int_range(1, 10000), 3,
            "A replacement starts on probation: its first fast failure quarantines it "
            "again, and this many successes end the probation."),
    Setting("circuit.ratio", float_range(0.0, 1.0), 0.6,
            "When this share of a pool's children is quarantined, the pool stops consuming "
            "(jobs stay queued in gearmand) and probes with one child after a cooldown."),
    Setting("circuit.cooldown", duration_upto(DAY), 10.0,
            "Wait before the first probe of an open circuit; doubles on each failed probe."),
    Setting("circuit.cooldown_max", duration_upto(7 * DAY), 300.0, "Longest wait between probes."),
    Setting("poison_after", int_range(0, 1000), 2,
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
    Setting("max_jobs", optional(int_range(1, 10**12)), None,
            "Recycle a child after this many jobs (+/- `recycle_jitter`).",
            shown_default="no limit"),
    Setting("max_memory", optional(size), None,
            "Recycle a child whose RSS exceeds this, checked between jobs (e.g. 512M).",
            shown_default="no limit"),
    Setting("max_lifetime", optional(duration_upto(30 * DAY)), None,
            "Recycle a child after it has run this long (+/- `recycle_jitter`).",
            shown_default="no limit"),
    Setting("recycle_jitter", float_range(0.0, 0.5), 0.1,
            "Spread of `max_jobs` and `max_lifetime` per child, as a fraction."),
    Setting("max_surge", surge, "25%",
            "During a roll, how many new children may start beside the old ones at once: a "
            'number or a percentage of `processes` (at least 1).'),
    Setting("connect_timeout", duration_upto(HOUR), 5.0, "TCP connect timeout to a job server."),
    Setting("reconnect_max_delay", duration_upto(HOUR), 2.0,
            "Longest wait between reconnect attempts to a job server that went away."),
    Setting("backoff.initial", duration_upto(HOUR), 0.1,
            "Delay before restarting a crashed child."),
    Setting("backoff.max", duration_upto(DAY), 30.0,
            "Longest delay between restarts of a crash loop."),
    Setting("backoff.multiplier", float_range(1.0, 10.0), 2.0,
            "Delay growth per consecutive crash."),
    Setting("backoff.jitter", float_range(0.0, 1.0), 0.1,
            "Random spread of each delay, as a fraction (0.1 = +/-10%)."),
    Setting("backoff.reset_after", duration_upto(DAY), 10.0,
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
    Setting("rlimit_nofile", optional(int_range(16, 2**31 - 1)), None,
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
POOL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


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
    kill_group: bool = True  # signal and clean up the child's whole process group
    # None: the files the children report importing (a command pool: its script's dir);
    # (): not watched
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

    @property
    def directory(self) -> str:
        return os.path.dirname(self.path)


# ---------------------------------------------------------------------------------------------
# Loading: YAML with limits


class _Refused(Exception):
    """The YAML is over a limit (nesting, alias expansion, a number's length) or holds a
    value no setting can take; `mark` is where, `path` the key path when known."""

    def __init__(self, message: str, mark: Any, path: tuple = (), node: Node | None = None
                 ) -> None:
        super().__init__(message)
        self.mark = mark
        self.path = path
        self.node = node  # refused by the constructor: its key path is looked up


class _BoundedComposer(Composer):
    """PyYAML's composer, counting as it composes, so a hostile document is refused before
    anything (the constructor, the line map, a repr) walks it.

    Aliases are counted as what they expand to: `a: &a [x, x]; b: &b [*a, *a] ...` (an alias
    bomb, "billion laughs") is small as nodes but huge as a tree. An alias inside the node
    it names (`x: &r [*r]`) is a cycle: refused, since nothing in a config is recursive.
    """

    def _start_budget(self) -> None:
        self._depth = 0
        self._deepest = 0  # the deepest level the node being composed reaches
        self._nodes = 0
        self._chars = 0
        self._open: set[str] = set()  # anchors whose node is being composed
        self._sizes: dict[str, tuple[int, int, int]] = {}  # anchor -> nodes, chars, height
        self._path: list[Any] = []

    def _spend(self, nodes: int, chars: int, depth: int, mark: Any) -> None:
        self._nodes += nodes
        self._chars += chars
        self._deepest = max(self._deepest, depth)
        if depth > MAX_DEPTH:
            self._refuse(f"nested deeper than {MAX_DEPTH} levels (a config needs about 6)",
                         mark)
        if self._nodes > MAX_NODES:
            self._refuse(f"more than {MAX_NODES} values, counting what aliases (*name) "
                         "expand to; is this the right file, or an alias bomb?", mark)
        if self._chars > MAX_FILE_BYTES:
            self._refuse(f"aliases (*name) expand the text to more than {MAX_FILE_BYTES} "
                         "characters", mark)

    def _refuse(self, message: str, mark: Any) -> None:
        path = tuple(p for p in self._path if p is not None)
        raise _Refused(message, mark, path[:6] + (("...",) if len(path) > 6 else ()))

    def compose_node(self, parent: Node | None, index: Any) -> Node:
        event = self.peek_event()
        if isinstance(event, AliasEvent):
            if event.anchor in self._open:
                self._refuse(f"the alias *{event.anchor} is inside the node it names (a "
                             "recursive alias); a config has no cycles", event.start_mark)
            nodes, chars, height = self._sizes.get(event.anchor, (1, 0, 1))
            self._spend(nodes, chars, self._depth + height, event.start_mark)
            return super().compose_node(parent, index)
        depth = self._depth + 1
        chars = len(event.value) if isinstance(event, ScalarEvent) else 0
        self._path.append(index.value if isinstance(index, ScalarNode) else
                          index if isinstance(index, int) else None)
        self._spend(1, chars, depth, event.start_mark)
        nodes_before, chars_before, outer = self._nodes, self._chars, self._deepest
        self._depth = self._deepest = depth
        anchor = event.anchor
        if anchor is not None:
            self._open.add(anchor)
        node = super().compose_node(parent, index)
        if anchor is not None:
            self._open.discard(anchor)
            self._sizes[anchor] = (self._nodes - nodes_before + 1,
                                   self._chars - chars_before + chars, self._deepest - depth + 1)
        self._depth = depth - 1
        self._deepest = max(outer, self._deepest)
        self._path.pop()
        return node


class _Constructor(SafeConstructor):
    """SafeConstructor whose scalars cannot raise anything but _Refused: PyYAML lets
    ValueError out for `0x_` or `2001-13-45`, IndexError for `!!int ""`, KeyError for
    `!!bool x`, and int() refuses past 4,300 digits."""

    def construct_object(self, node: Node, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep)
        except (ValueError, TypeError, KeyError, IndexError, AttributeError,
                OverflowError) as e:
            # PyYAML's scalar constructors assume the text matched the tag's pattern; an
            # explicit tag (`!!int ""`) skips that match
            tag = re.sub(r"^tag:yaml\.org,2002:", "!!", node.tag or "")
            raise _Refused(f"{_show(node.value)} is not a valid {tag} ({type(e).__name__})",
                           node.start_mark, node=node) from None

    def construct_yaml_int(self, node: ScalarNode) -> int:
        value = self._number(node, super().construct_yaml_int)
        if value.bit_length() > MAX_INT_DIGITS * 3.32:  # log2(10): about that many digits
            raise _Refused(f"a number of more than {MAX_INT_DIGITS} digits is too long (no "
                           "setting takes more than 19)", node.start_mark, node=node)
        return value

    def construct_yaml_float(self, node: ScalarNode) -> float:
        return self._number(node, super().construct_yaml_float)

    def _number(self, node: ScalarNode, construct: Callable[[ScalarNode], Any]) -> Any:
        if len(node.value) > MAX_NUMBER_CHARS:
            # also keeps sexagesimal `1:0:0:...` (one multiplication per part) cheap
            raise _Refused(f"a number of {len(node.value)} characters is too long (no "
                           f"setting takes more than {MAX_NUMBER_CHARS})", node.start_mark,
                           node=node)
        try:
            return construct(node)
        except (ValueError, OverflowError):
            raise _Refused(f"{_show(node.value)} looks like a number but is not one; quote "
                           "it if it is text", node.start_mark, node=node) from None

    def construct_yaml_timestamp(self, node: ScalarNode) -> Any:
        try:
            return super().construct_yaml_timestamp(node)
        except (ValueError, OverflowError):
            raise _Refused(f"{_show(node.value)} looks like a date but is not a valid one; "
                           "quote it if it is text", node.start_mark, node=node) from None

    def construct_undefined(self, node: Node) -> Any:
        tag = re.sub(r"^tag:yaml\.org,2002:", "!!", node.tag or "")
        raise _Refused(f"the YAML tag {_show(tag)} is not allowed: a config holds plain "
                       "text, numbers, true/false, lists and mappings", node.start_mark,
                       node=node)


_Constructor.add_constructor("tag:yaml.org,2002:int", _Constructor.construct_yaml_int)
_Constructor.add_constructor("tag:yaml.org,2002:float", _Constructor.construct_yaml_float)
_Constructor.add_constructor("tag:yaml.org,2002:timestamp",
                             _Constructor.construct_yaml_timestamp)
_Constructor.add_constructor(None, _Constructor.construct_undefined)


# What a number too long to resolve looks like: one pass, no backtracking
_LONG_NUMBER = re.compile(r"[-+]?(?:0[xXbBoO][0-9a-fA-F_]*|[0-9.][0-9_.:eE+-]*)")


class _Resolver(Resolver):
    """PyYAML's patterns for int, float and date are not run on a plain scalar longer than any
    number (on a 1 MiB `1:00:00:...` the regex engine's backtracking stack took 50 MB): one
    that looks like a number is an int, which the constructor refuses as too long; anything
    else is text."""

    def resolve(self, kind: type, value: Any, implicit: Any) -> str:
        if kind is ScalarNode and implicit[0] and len(value) > MAX_NUMBER_CHARS:
            if _LONG_NUMBER.fullmatch(value):
                return "tag:yaml.org,2002:int"
            return self.DEFAULT_SCALAR_TAG
        return super().resolve(kind, value, implicit)


class _PyLoader(Reader, Scanner, Parser, _BoundedComposer, _Constructor, _Resolver):
    def __init__(self, stream: str) -> None:
        Reader.__init__(self, stream)
        Scanner.__init__(self)
        Parser.__init__(self)
        _BoundedComposer.__init__(self)
        self._start_budget()
        _Constructor.__init__(self)
        _Resolver.__init__(self)


if CParser is not None:
    class _CLoader(_BoundedComposer, CParser, _Constructor, _Resolver):  # type: ignore
        """libyaml scans and parses; our composer (first in the MRO) builds the nodes."""

        def __init__(self, stream: str) -> None:
            CParser.__init__(self, stream)
            _BoundedComposer.__init__(self)
            self._start_budget()
            _Constructor.__init__(self)
            _Resolver.__init__(self)

    _LOADER: type = _CLoader
else:  # pragma: no cover
    _LOADER = _PyLoader


@dataclass
class _Document:
    """A config file's YAML: its data, the line of each key path, duplicate keys."""

    data: Any
    lines: dict[tuple, int]
    duplicates: list[Problem]


def _key_text(key: Any) -> str:
    text_ = str(key)
    return text_ if len(text_) <= 40 else text_[:37] + "..."


def _dotted(path: tuple) -> str:
    return ".".join(_key_text(p) for p in path)


def _line_of(text_: str, position: int, in_bytes: bool) -> tuple[int, int]:
    """1-based line and column of a character (or, from libyaml, byte) offset."""
    before = text_.encode("utf-8", "replace")[:position] if in_bytes else text_[:position]
    nl = "\n" if isinstance(before, str) else b"\n"
    return before.count(nl) + 1, position - (before.rfind(nl) + 1) + 1  # type: ignore[arg-type]


def _compose(text_: str, file: str) -> _Document:
    """The YAML of a config, within the limits; raise ConfigError for anything else."""
    loader_class = _LOADER  # read at each call: tests switch it to the pure-Python one
    if len(text_) > MAX_FILE_BYTES:
        raise ConfigError(file, [Problem("", f"is larger than {MAX_FILE_BYTES // 1024} KiB; a "
                                         "pool spec is a few KiB: is this the right file?")])
    try:
        text_.encode("utf-8")
    except UnicodeEncodeError as e:  # only through parse(): a read file is decoded UTF-8
        line, column = _line_of(text_, e.start, False)
        raise ConfigError(file, [Problem("", f"column {column}: a lone surrogate is not "
                                         "text; save the file as UTF-8", line)]) from None
    in_bytes = loader_class is not _PyLoader  # libyaml reports byte offsets
    ldr = None
    try:
        ldr = loader_class(text_)  # PyYAML's Reader checks the characters here already
        root = ldr.get_single_node()
        lines: dict[tuple, int] = {}
        paths: dict[int, tuple] = {}  # id(node) -> its first key path, for _Refused below
        duplicates: list[Problem] = []

        def walk(node: Node, path: tuple) -> None:
            # Bounded: the composer counted every node an alias expands to.
            lines.setdefault(path, node.start_mark.line + 1)
            paths.setdefault(id(node), path)
            if isinstance(node, MappingNode):
                seen = set()
                for k, v in node.value:
                    key = k.value if isinstance(k, ScalarNode) else None
                    if key is not None and key in seen:
                        duplicates.append(Problem(_dotted(path + (key,)),
                                                  "key is given twice; remove one",
                                                  k.start_mark.line + 1))
                    seen.add(key)
                    lines[path + (key,)] = k.start_mark.line + 1
                    paths.setdefault(id(k), path + (key,))
                    walk(v, path + (key,))
            elif isinstance(node, SequenceNode):
                for i, item in enumerate(node.value):
                    walk(item, path + (i,))

        if root is not None:
            walk(root, ())
        try:
            data = ldr.construct_document(root) if root is not None else None
        except _Refused as e:
            e.path = paths.get(id(e.node), ())
            raise
        except (ValueError, TypeError, KeyError, IndexError, AttributeError,
                OverflowError) as e:
            # outside any one node (a mapping's items are built after the mapping):
            # PyYAML's, not the operator's, so no line to give
            raise ConfigError(file, [Problem("", f"YAML cannot be read ({type(e).__name__}: "
                                             f"{_show(str(e))})")]) from None
    except _Refused as e:
        column = f" column {e.mark.column + 1}" if e.mark else ""
        raise ConfigError(file, [Problem(_dotted(e.path), f"YAML{column}: {e}",
                                         e.mark.line + 1 if e.mark else None)]) from None
    except yaml.reader.ReaderError as e:
        line, column = _line_of(text_, e.position, in_bytes)
        raise ConfigError(file, [Problem("", f"column {column}: the character #x"
                                         f"{e.character:04x} is not allowed in YAML ("
                                         f"{e.reason}); remove it", line)]) from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        problem = getattr(e, "problem", None) or str(e)
        line = mark.line + 1 if mark else None
        col = f" column {mark.column + 1}" if mark else ""
        if problem == "exceeded maximum nesting depth":
            # libyaml's own limit (1000 levels): its scanner looks ahead in a flow
            # collection, so it can get there before our composer's MAX_DEPTH
            raise ConfigError(file, [Problem("", f"YAML{col}: nested deeper than {MAX_DEPTH} "
                                             "levels (a config needs about 6)", line)]) from None
        raise ConfigError(file, [Problem("", f"YAML syntax error{col}: {problem}", line)]) \
            from None
    finally:
        if ldr is not None:
            ldr.dispose()
    return _Document(data, lines, duplicates)


class _Collector:
    """Gathers every problem in one pass, so the operator fixes them all at once."""

    def __init__(self, lines: dict[tuple, int]) -> None:
        self.lines = lines
        self.problems: list[Problem] = []
        self._seen: set[tuple[str, str]] = set()

    def add(self, path: tuple, message: str) -> None:
        dotted = _dotted(path)
        if (dotted, message) in self._seen:
            return  # a top-level value inherited by several pools is reported once
        self._seen.add((dotted, message))
        line = None
        for n in range(len(path), -1, -1):
            line = self.lines.get(path[:n])
            if line:
                break
        self.problems.append(Problem(dotted, message, line))

    def unknown(self, path: tuple, key: Any, allowed: set[str]) -> None:
        hint = difflib.get_close_matches(_key_text(key), sorted(allowed), n=1)
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
    doc = _compose(text_, file)
    data = doc.data
    col = _Collector(doc.lines)
    col.problems.extend(doc.duplicates)
    if data is None:
        raise ConfigError(file, [Problem("", "has no settings (it is empty, or only comments); "
                                         "a config needs at least `pools:`, see "
                                         "conf/pools.yaml")])
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
        if not isinstance(name, str) or not POOL_NAME.fullmatch(name):
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

    control_socket = (_resolve(directory, top["control_socket"])
                      if top.get("control_socket") else None)
    if control_socket is not None and len(os.fsencode(control_socket)) > SOCKET_PATH_MAX:
        col.add(("control_socket",), f"the socket path {control_socket} is "
                f"{len(os.fsencode(control_socket))} bytes; a Unix socket path has at most "
                f"{SOCKET_PATH_MAX}: choose a shorter one")

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
        control_socket=control_socket,
        watch_config=top.get("watch_config", True),
        watch_debounce=top.get("watch_debounce", BY_KEY["watch_debounce"].default),
    )


def read_file(path: str) -> bytes:
    """The bytes of a config file, at most MAX_FILE_BYTES; raise ConfigError (never OSError).

    Only a regular file is opened for reading: a FIFO would block the read forever, and
    /dev/zero never ends."""
    file = os.path.abspath(path)

    def refuse(message: str) -> ConfigError:
        return ConfigError(file, [Problem("", message)])

    try:
        st = os.stat(path)
        if stat.S_ISDIR(st.st_mode):
            raise refuse("is a directory; pass the config file itself with -c FILE (see "
                         "conf/pools.yaml)")
        if not stat.S_ISREG(st.st_mode):
            raise refuse("is not a regular file (a FIFO, socket or device); pass the config "
                         "file itself with -c FILE")
        # O_NONBLOCK: if a FIFO took the file's place since the stat, open does not wait
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise refuse("is not a regular file; pass the config file itself with -c FILE")
            chunks, size_ = [], 0
            while size_ <= MAX_FILE_BYTES:
                chunk = os.read(fd, MAX_FILE_BYTES + 1 - size_)
                if not chunk:
                    break
                chunks.append(chunk)
                size_ += len(chunk)
        finally:
            os.close(fd)
    except FileNotFoundError:
        raise refuse("file not found; pass the pool spec with -c FILE (see conf/pools.yaml)") \
            from None
    except PermissionError:
        raise refuse("permission denied; let the user gearvisor runs as read the file (and "
                     "enter its directories)") from None
    except OSError as e:
        raise refuse(f"cannot read: {e.strerror or e}") from None
    except ValueError as e:  # a NUL byte in the path
        raise refuse(f"cannot read: {e}") from None
    if size_ > MAX_FILE_BYTES:
        raise refuse(f"is larger than {MAX_FILE_BYTES // 1024} KiB; a pool spec is a few KiB: "
                     "is this the right file?")
    return b"".join(chunks)


def decode(data: bytes, file: str) -> str:
    """The text of a config file: UTF-8, or a ConfigError naming the first bad byte."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        column = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise ConfigError(os.path.abspath(file), [Problem(
            "", f"column {column}: byte {data[e.start]:#04x} is not UTF-8 text; save the file "
            "as UTF-8", line)]) from None


def load_yaml(path: str) -> Any:
    """Just the YAML data of a config file, read and composed with the same limits as
    load(); raise ConfigError. For the CLI, which finds control_socket in a config before
    (or without) validating it."""
    file = os.path.abspath(path)
    return _compose(decode(read_file(path), file), file).data


def load(path: str) -> Config:
    """Read and validate a config file; raise ConfigError (never OSError or YAMLError)."""
    return parse(decode(read_file(path), path), path)


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
        limit = getattr(s.parse, "limit", None)
        doc = f"{s.doc} {limit}" if limit else s.doc
        rows.append(f"| `{s.key}` | {where[s.scope]} | {default} | {doc} |")
    return "\n".join(rows)


__all__ = ["Config", "ConfigError", "PoolConfig", "Server", "load", "load_yaml", "parse",
           "SETTINGS"]
