"""YAML data -> a Config: every setting parsed, defaults and top-level values merged into
each pool, and every problem collected, so one error lists them all.

parse() takes the text of a file, load() the file itself; both either return a Config or
raise ConfigError (never OSError or YAMLError). The YAML is read by
gearvisor.config.yamlload, each value parsed by its Setting (gearvisor.config.settings), and
the checks between settings (backoff.max >= backoff.initial, a pool's functions and its
command, user needing root, paths that must exist) are made here.
"""

from __future__ import annotations

import difflib
import os
import socket
from collections.abc import Mapping
from typing import Any

from gearvisor.config.alerts import RULES
from gearvisor.config.errors import ConfigError, Invalid, Problem, dotted, key_text, show
from gearvisor.config.model import (
    AlertsConfig,
    AutoscaleConfig,
    BackoffConfig,
    CircuitConfig,
    Config,
    FindingsConfig,
    JournalConfig,
    KeepaliveConfig,
    MetricsConfig,
    PoolConfig,
    QuarantineConfig,
)
from gearvisor.config.settings import (
    BLOCKS,
    BY_KEY,
    POOL_KEYS,
    POOL_NAME,
    SETTINGS,
    TOP_KEYS,
    Setting,
)
from gearvisor.config.values import servers, token
from gearvisor.config.yamlload import compose, decode, read_file

SOCKET_PATH_MAX = 107  # bytes in a Unix socket path (sun_path is 108, with its NUL)


class _Collector:
    """Gathers every problem in one pass, so the operator fixes them all at once."""

    def __init__(self, lines: dict[tuple, int]) -> None:
        self.lines = lines
        self.problems: list[Problem] = []
        self._seen: set[tuple[str, str]] = set()

    def add(self, path: tuple, message: str) -> None:
        """Record a problem at key `path`, on the line of the nearest key the file has."""
        where = dotted(path)
        if (where, message) in self._seen:
            return  # a top-level value inherited by several pools is reported once
        self._seen.add((where, message))
        line = None
        for n in range(len(path), -1, -1):
            line = self.lines.get(path[:n])
            if line:
                break
        self.problems.append(Problem(where, message, line))

    def unknown(self, path: tuple, key: Any, allowed: set[str]) -> None:
        """Record an unknown key, with the closest known one as a hint."""
        name = key_text(key)
        hint = difflib.get_close_matches(name, sorted(allowed), n=1)
        suggestion = f'; did you mean "{hint[0]}"?' if hint else ""
        if name in _FUNCTION_KEYS and "functions" in allowed:
            suggestion = (f"; {name} is a function's: functions: {{NAME: {{callable: ..., "
                          f"{name}: ...}}}}")
        self.add(path + (key,), f"unknown key{suggestion} (known: {', '.join(sorted(allowed))})")


# Keys a function may have that a user may put on the pool instead (`timeout:` next to
# `processes:`): the hint says where they go rather than the nearest pool key.
_FUNCTION_KEYS = frozenset({"timeout", "retry", "failed_payload", "callable", "buckets"})


def _parse_value(col: _Collector, path: tuple, setting: Setting, raw: Any) -> Any:
    try:
        return setting.parse(raw)
    except Invalid as e:
        col.add(path + e.at, f"{e}, got {show(raw if e.value is ... else e.value)}")
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
                col.add(path + (key,), f"expected a mapping, got {show(raw)}")
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


_IN_COMMAND_POOLS = {"timeout", "retry", "failed_payload"}
_NOT_IN_COMMAND_POOLS = {
    "callable": "a command pool's functions are the names its command registers; "
                "`callable` is for Python pools: remove it",
    "buckets": "a command pool's children do not count their jobs, so it has no job "
               "histogram; remove `buckets`",
}


def _command_functions(col: _Collector, path: tuple, raw: dict) -> dict:
    """A command pool's `functions` mapping without what only a Python pool may have (each
    reported here), for the `functions` parser: a command pool's function takes `timeout`,
    `retry` and `failed_payload`, or nothing."""
    out: dict = {}
    for name, target in raw.items():
        if isinstance(target, dict):
            for key in sorted(target.keys() - _IN_COMMAND_POOLS, key=str):
                col.add(path + (name, key), _NOT_IN_COMMAND_POOLS.get(
                    key, f"unknown key {show(key)}; a command pool's function takes "
                    "timeout, retry and failed_payload"))
            out[name] = {k: v for k, v in target.items() if k in _IN_COMMAND_POOLS}
        else:
            if target is not None:
                col.add(path + (name,), "a command pool's function maps to nothing or to "
                        "its keys such as {timeout: 30s}; Python callables are for Python "
                        f"pools, got {show(target)}")
            out[name] = None
    return out


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


def default_state_dir(euid: int | None = None, environ: Mapping[str, str] | None = None) -> str:
    """state_dir when the config names none: /var/lib/gearvisor as root (systemd's
    StateDirectory=), else $XDG_STATE_HOME/gearvisor, else ~/.local/state/gearvisor."""
    euid = os.geteuid() if euid is None else euid
    environ = os.environ if environ is None else environ
    if euid == 0:
        return "/var/lib/gearvisor"
    base = environ.get("XDG_STATE_HOME") or os.path.join(
        environ.get("HOME") or os.path.expanduser("~"), ".local", "state")
    return os.path.join(base, "gearvisor")


def parse(text_: str, file: str, *, euid: int | None = None) -> Config:
    """Validate the YAML text of a config file; raise ConfigError listing every problem."""
    file = os.path.abspath(file)
    directory = os.path.dirname(file)
    doc = compose(text_, file)
    data = doc.data
    col = _Collector(doc.lines)
    col.problems.extend(doc.duplicates)
    if data is None:
        raise ConfigError(file, [Problem("", "has no settings (it is empty, or only comments); "
                                         "a config needs at least `pools:`, see "
                                         "conf/pools.yaml")])
    if not isinstance(data, dict):
        raise ConfigError(file, [Problem("", f"expected a mapping at the top, got {show(data)}",
                                         1)])
    top = _read_scope(col, (), data, "global")
    pools_raw = data.get("pools")
    if not isinstance(pools_raw, dict) or not pools_raw:
        col.add(("pools",), "expected a mapping of pool name -> pool settings, with at least "
                f"one pool, got {show(pools_raw)}")
        pools_raw = {}

    default_buckets = top.get("metrics.buckets", BY_KEY["metrics.buckets"].default)
    metrics = None
    if "metrics" in data and isinstance(data["metrics"], dict):
        if top.get("metrics.listen") is not None:
            metrics = MetricsConfig(top["metrics.listen"], default_buckets)
        elif "listen" not in data["metrics"]:
            col.add(("metrics",), 'missing "listen": the address to serve metrics on, such '
                    'as "127.0.0.1:9464" (remove the metrics block to turn metrics off)')
    pools: dict[str, PoolConfig] = {}
    for name, praw in pools_raw.items():
        path = ("pools", name)
        if not isinstance(name, str) or not POOL_NAME.fullmatch(name):
            col.add(path, "pool names are 1-64 letters, digits, '_', '.' or '-'")
            continue
        if not isinstance(praw, dict):
            col.add(path, f"expected a mapping of pool settings, got {show(praw)}")
            continue
        if "command" in praw and isinstance(praw.get("functions"), dict):
            praw = {**praw, "functions": _command_functions(col, path + ("functions",),
                                                            praw["functions"])}
        own = _read_scope(col, path, praw, "pool")
        if "functions" not in praw and "command" not in praw:
            col.add(path, 'missing "functions": map each gearman function name to '
                    '"module:callable" (or give a `command:` to run an external worker)')
        elif "command" not in praw and isinstance(praw.get("functions"), list):
            col.add(path + ("functions",), 'a list of names needs `command:`; a Python pool '
                    'maps each name to "module:callable"')
        elif "command" not in praw and isinstance(praw.get("functions"), dict):
            for fname, target in praw["functions"].items():
                if target is None or isinstance(target, dict) and "callable" not in target:
                    col.add(path + ("functions", fname), 'missing "callable": map the '
                            'function to "module:callable" (or give the pool a `command:`)')
        if praw.get("ready") == "registered" and not isinstance(praw.get("functions"),
                                                                (list, dict)):
            col.add(path + ("ready",), "`ready: registered` needs `functions:`, the function "
                    "names the command registers")
        merged: dict[str, Any] = {}
        origin: dict[str, tuple] = {}  # where a value was written, for error messages
        for s in SETTINGS:
            if s.scope in ("global", "function"):
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
                 if s.scope in ("pool", "both") and s.block is None and s.key not in special}
        autoscale = None
        if isinstance(praw.get("autoscale"), dict):
            autoscale = AutoscaleConfig(**_block(merged, "autoscale"))
            if autoscale.min > autoscale.max:
                col.add(origin["autoscale.max"], f"must be >= autoscale.min ({autoscale.min}), "
                        f"got {autoscale.max}")
            # `processes` is where the pool starts; the autoscaler never leaves [min, max].
            plain["processes"] = max(autoscale.min, min(autoscale.max, plain["processes"]))
        fns = merged["functions"] or {}
        extra = getattr(merged["functions"], "extra", {})
        retries = {f: extra[f]["retry"] for f in fns if extra.get(f, {}).get("retry")}
        pools[name] = PoolConfig(
            name=name,
            functions=merged["functions"] or {},
            env=merged["env"],
            cwd=merged["cwd"],
            watch=(None if merged["watch"] is None
                   else tuple(_resolve(directory, w) for w in merged["watch"])),
            timeouts=dict(getattr(merged["functions"], "timeouts", {})),
            buckets={f: getattr(merged["functions"], "buckets", {}).get(f, default_buckets)
                     for f in (merged["functions"] or {})},
            command=merged["command"],
            log_file=_resolve(directory, merged["log_file"]) if merged["log_file"] else None,
            backoff=BackoffConfig(**_block(merged, "backoff")),
            keepalive=KeepaliveConfig(**_block(merged, "keepalive")),
            quarantine=QuarantineConfig(**_block(merged, "quarantine")),
            circuit=CircuitConfig(**_block(merged, "circuit")),
            autoscale=autoscale,
            retry=retries,
            failed_payload={f: extra.get(f, {}).get("failed_payload",
                                                    BY_KEY["failed_payload"].default)
                            for f in fns},
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

    alerts = _alerts(col, top)
    state_dir = (_resolve(directory, top["state_dir"]) if top.get("state_dir")
                 else default_state_dir(euid))
    journal = _journal(top, state_dir)

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
        state_dir=state_dir,
        watch_config=top.get("watch_config", True),
        watch_debounce=top.get("watch_debounce", BY_KEY["watch_debounce"].default),
        probe_interval=top.get("probe_interval", BY_KEY["probe_interval"].default),
        findings=FindingsConfig(**{s.key.split(".", 1)[1]: top.get(s.key, s.default)
                                   for s in SETTINGS if s.block == "findings"}),
        metrics=metrics,
        alerts=alerts,
        journal=journal,
    )


def _journal(top: dict[str, Any], state_dir: str) -> JournalConfig:
    """The `journal:` block, with `store: sqlite` made a path in state_dir."""
    values = {s.key.split(".", 1)[1]: top.get(s.key, s.default)
              for s in SETTINGS if s.block == "journal"}
    store = values.pop("store")
    url = ("sqlite://" + os.path.join(state_dir, "journal.sqlite3") if store == "sqlite"
           else store)
    return JournalConfig(url=url, state_dir=state_dir, **values)


def _alerts(col: _Collector, top: dict[str, Any]) -> AlertsConfig:
    """The `alerts:` block, and the checks between its keys: every channel a route names
    exists (with a did-you-mean), and the group intervals are in order."""
    values = {s.key.split(".", 1)[1]: top.get(s.key, s.default)
              for s in SETTINGS if s.block == "alerts"}
    if not values["rules"]:
        values["rules"] = {name: spec.defaults() for name, spec in RULES.items()}
    known = sorted(values["channels"])
    for i, route in enumerate(values["routes"]):
        steps = [("notify", route.notify)] + [(("escalate", j, "notify"), step.notify)
                                              for j, step in enumerate(route.escalate)]
        for where, names in steps:
            path = ("alerts", "routes", i) + (where if isinstance(where, tuple) else (where,))
            for k, name in enumerate(names):
                if name not in values["channels"]:
                    hint = difflib.get_close_matches(name, known, n=1)
                    col.add(path + (k,), f"no channel named {show(name)} in alerts.channels"
                            + (f'; did you mean "{hint[0]}"?' if hint else "")
                            + (f" (channels: {', '.join(known)})" if known else
                               " (there are none: add it under alerts.channels)"))
    if values["repeat_interval"] < values["group_interval"]:
        col.add(("alerts", "repeat_interval"), "must be >= alerts.group_interval "
                f"({values['group_interval']:g}s), got {values['repeat_interval']:g}s")
    return AlertsConfig(**values)


def load(path: str) -> Config:
    """Read and validate a config file; raise ConfigError (never OSError or YAMLError)."""
    return parse(decode(read_file(path), path), path)
