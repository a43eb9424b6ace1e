"""The value parsers: each takes a raw YAML value and returns the typed value or raises Invalid.

One parser per kind of value (duration, size, int_range, server, command, rlimits, ...),
used by the declarations in gearvisor.config.settings. Every number, duration and size has a
maximum, so no value accepted here overflows later in the master or a child (a timer,
setitimer, setrlimit). A parser with limits says them in its `limit` attribute, which the
README reference table shows.
"""

from __future__ import annotations

import datetime
import grp
import ipaddress
import math
import pwd
import re
import resource
import shlex
import signal
from collections.abc import Callable
from typing import Any

from gearvisor.config.errors import Invalid
from gearvisor.config.model import RETRY_OUTCOMES, RetryConfig, Server

MINUTE = 60.0
HOUR = 3600.0
DAY = 86400.0


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


def duration_between(minimum: float, maximum: float) -> Callable[[Any], float]:
    """A duration parser with a minimum above 0 as well, for periods the master repeats
    (a probe every 0 seconds would spin the loop)."""

    def parse(value: Any) -> float:
        seconds = duration(value, maximum)
        if seconds < minimum:
            raise Invalid(f"expected a duration of at least {minimum * 1000:g}ms")
        return seconds

    parse.limit = (f"From {minimum * 1000:g}ms to "  # type: ignore[attr-defined]
                   f"{_span(maximum)}.")
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
    """A parser that takes one of `options`, exactly as written."""

    def parse(value: Any) -> str:
        if value not in options:
            raise Invalid("expected one of " + ", ".join(options))
        return value

    return parse


def optional(inner: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """`inner`, or None for a null (`key:` with no value, or `~`); keeps inner's limit."""

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


# A host name or IPv4 address, or anything in brackets (checked as IPv6 below); then a port.
_SERVER = re.compile(r"(?:\[(?P<v6>[^\[\]]*)\]|(?P<host>[^\s\x00-\x1f\x7f:\[\]/]{1,253}))"
                     r"(?::(?P<port>[0-9]+))?")


def server(value: Any) -> Server:
    """One job server: "host", "host:port" or "[v6]:port"; the port defaults to 4730."""
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


def listen_address(value: Any) -> Server:
    """Where the master listens (the metrics endpoint): "host:port" or "[v6]:port", the
    port required, so the address in the config is the one a scraper is pointed at."""
    if not isinstance(value, str) or not re.search(r":[0-9]+\s*$", value):
        raise Invalid('expected "host:port" such as "127.0.0.1:9464" (IPv6 as "[::1]:9464")')
    return server(value)


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
    """A list of non-empty strings the OS can take; a single string is a list of one."""
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


class OctalLiteral(int):
    """An int YAML 1.1 read as octal (`077` is 63). It keeps the digits as written, so a
    setting that is octal anyway (umask) reads `077` as 0o077, not as the digits of 63."""

    text: str

    def __new__(cls, value: int, text: str) -> OctalLiteral:
        number = super().__new__(cls, value)
        number.text = text
        return number


def umask(value: Any) -> int:
    """An octal umask: 22, 022, "022" or "0o022"."""
    if isinstance(value, OctalLiteral):
        text_ = value.text
    elif isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 7777:
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
    """A YAML true or false; 0, 1 or a string is an error, not taken for truthy."""
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
    """Environment variables NAME: value; a number or date is passed on as its text."""
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
    """Gearman function name -> "module:attr", plus each function's `timeout` (seconds), its
    own histogram `buckets` (seconds), and its other keys (`retry`, `failed_payload`: see
    FUNCTION_KEYS in gearvisor.config.settings), where it sets them."""

    timeouts: dict[str, float]
    buckets: dict[str, tuple[float, ...]]
    extra: dict[str, dict[str, Any]]  # function -> key -> parsed value


BUCKETS_MAX = 64  # histogram buckets per function: each is a series per function and pool
BUCKET_MAX = 30 * DAY
DEFAULT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                   120.0, 300.0, 600.0, 1800.0, 3600.0)


def buckets(value: Any) -> tuple[float, ...]:
    """Histogram bucket bounds of job durations: a list of durations (seconds or "250ms"),
    each > 0, in increasing order; +Inf is always added."""
    if not isinstance(value, list) or not value:
        raise Invalid('expected a list of increasing durations such as [0.01, 0.1, 1, 10]')
    if len(value) > BUCKETS_MAX:
        raise Invalid(f"expected at most {BUCKETS_MAX} buckets")
    out: list[float] = []
    for i, item in enumerate(value):
        try:
            bound = duration(item, BUCKET_MAX)
        except Invalid as e:
            raise Invalid(str(e), at=(i,), value=item) from None
        if bound <= 0:
            raise Invalid("expected a bucket bound > 0", at=(i,), value=item)
        if out and bound <= out[-1]:
            raise Invalid(f"expected bounds in increasing order ({bound:g} after {out[-1]:g})",
                          at=(i,), value=item)
        out.append(bound)
    return tuple(out)


buckets.limit = f"At most {BUCKETS_MAX} bounds."  # type: ignore[attr-defined]


def functions(value: Any, extra: dict[str, Callable[[Any], Any]] | None = None) -> Functions:
    """Gearman function name -> "module:attr" of the Python callable that runs it, or a
    mapping {callable: "module:attr", timeout: 30s, buckets: [0.1, 1, 10]} plus the keys of
    `extra` (key -> its parser). In a `command:` pool: a list of the function names the
    command registers (for `ready: registered`), or a mapping of them to their keys with no
    `callable` (or to nothing). A function given no callable maps to "": the loader says
    which pools may have one (gearvisor.config.load)."""
    extra = extra or {}
    if isinstance(value, list) and value:
        out = Functions()
        out.timeouts, out.buckets, out.extra = {}, {}, {}
        for i, name in enumerate(value):
            if not _function_name(name):
                raise Invalid("function names are 1-255 characters with no spaces", at=(i,),
                              value=name)
            out[name] = ""  # registered by an external command, not a Python callable
        return out
    if not isinstance(value, dict) or not value:
        raise Invalid('expected a mapping of gearman function name -> "module:callable"')
    out = Functions()
    out.timeouts, out.buckets, out.extra = {}, {}, {}
    known = {"callable", "timeout", "buckets", *extra}
    known_text = ", ".join(["callable", "timeout", "buckets", *extra][:-1]) + (
        f" and {[*extra][-1] if extra else 'buckets'}")
    for name, target in value.items():
        if not _function_name(name):
            raise Invalid("function names are 1-255 characters with no spaces", at=(name,),
                          value=name)
        if isinstance(target, dict):
            # key=str: YAML keys may be numbers too, and ints and strs do not sort together
            unknown = sorted(set(target) - known, key=str)
            if unknown:
                raise Invalid(f"unknown key {unknown[0]!r}; a function takes {known_text}",
                              at=(name, unknown[0]), value=unknown[0])
            for key, parse in extra.items():
                if key in target:
                    try:
                        out.extra.setdefault(name, {})[key] = parse(target[key])
                    except Invalid as e:
                        raise Invalid(str(e), at=(name, key, *e.at),
                                      value=target[key] if e.value is ... else e.value) \
                            from None
            if "buckets" in target:
                try:
                    out.buckets[name] = buckets(target["buckets"])
                except Invalid as e:
                    raise Invalid(str(e), at=(name, "buckets", *e.at),
                                  value=target["buckets"] if e.value is ... else e.value) \
                        from None
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
            if "callable" not in target:
                out[name] = ""  # (a command pool's function; load.py checks the pool)
                continue
            target = target["callable"]
        elif target is None:
            out[name] = ""
            continue
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


def size_upto(maximum: int) -> Callable[[Any], int]:
    """A size parser with its own maximum (what must fit somewhere: a journal line)."""

    def parse(value: Any) -> int:
        n = size(value)
        if n > maximum:
            raise Invalid(f"expected a size of at most {maximum // 1024}K")
        return n

    parse.limit = f"At most {maximum // 1024}K."  # type: ignore[attr-defined]
    return parse


_DAYS = re.compile(r"\s*([0-9]+(?:\.[0-9]+)?)\s*d\s*")


def duration_days(maximum: float) -> Callable[[Any], float]:
    """A duration that may also be given in days ("14d"), for retention periods; only
    these take days (elsewhere "1d" is refused: no job timeout is meant to be a day)."""

    def parse(value: Any) -> float:
        if isinstance(value, str) and (m := _DAYS.fullmatch(value)):
            seconds = float(m.group(1)) * DAY
            if not seconds <= maximum:
                raise Invalid(f"expected a duration of at most {_span(maximum)}")
            return seconds
        try:
            return duration(value, maximum)
        except Invalid as e:
            if "at most" in str(e):
                raise
            raise Invalid("expected a duration such as 14d, 36h or 30m") from None

    parse.limit = f"At most {_span(maximum)}."  # type: ignore[attr-defined]
    return parse


def store_url(value: Any) -> str:
    """Where the job journal is kept: `sqlite` (journal.sqlite3 in state_dir),
    `sqlite:///absolute/path`, or a `postgresql://` (or `postgres://`) URL, which is passed
    to psycopg as it is (not checked here beyond its scheme: psycopg is not imported by
    the config)."""
    if not isinstance(value, str) or not value.strip():
        raise Invalid("expected sqlite, sqlite:///absolute/path or postgresql://user@host/db")
    value = _clean(value.strip())
    if value == "sqlite":
        return value
    if value.startswith("sqlite://"):
        path = value[len("sqlite://"):]
        if not path.startswith("/") or path.rstrip("/") == "":
            raise Invalid("expected sqlite:/// and an absolute path, such as "
                          "sqlite:///var/lib/gearvisor/journal.sqlite3 (or just sqlite: "
                          "journal.sqlite3 in state_dir)")
        return value
    if re.match(r"postgres(ql)?://\S+$", value):
        return value
    raise Invalid("expected sqlite, sqlite:///absolute/path or postgresql://user@host/db "
                  "(no other store is supported)")


RETRY_ATTEMPTS_MAX = 1000
RETRY_KEYS = ("max_attempts", "backoff", "outcomes")
RETRY_BACKOFF_KEYS = ("initial", "max", "multiplier")


def retry(value: Any) -> RetryConfig:
    """A function's `retry:` mapping {max_attempts, backoff: {initial, max, multiplier},
    outcomes}; every key may be left out (RetryConfig's defaults). Errors point at the
    sub-key (`at`), so the message names e.g. retry.backoff.initial."""
    if not isinstance(value, dict):
        raise Invalid("expected a mapping such as {max_attempts: 8, backoff: {initial: 10s, "
                      "max: 30m}, outcomes: [error, timeout, crash]}")
    defaults = RetryConfig()
    for key in value:
        if key not in RETRY_KEYS:
            raise Invalid(f"unknown key; retry takes {', '.join(RETRY_KEYS)}", at=(key,),
                          value=key)
    fields: dict[str, Any] = {}
    if "max_attempts" in value:
        try:
            fields["max_attempts"] = int_range(1, RETRY_ATTEMPTS_MAX)(value["max_attempts"])
        except Invalid as e:
            raise Invalid(str(e), at=("max_attempts",), value=value["max_attempts"]) from None
    raw_backoff = value.get("backoff", {})
    if not isinstance(raw_backoff, dict):
        raise Invalid("expected a mapping such as {initial: 10s, max: 30m, multiplier: 2}",
                      at=("backoff",), value=raw_backoff)
    for key in raw_backoff:
        if key not in RETRY_BACKOFF_KEYS:
            raise Invalid(f"unknown key; backoff takes {', '.join(RETRY_BACKOFF_KEYS)}",
                          at=("backoff", key), value=key)
    parsers = {"initial": duration_upto(DAY), "max": duration_upto(7 * DAY),
               "multiplier": float_range(1.0, 10.0)}
    for key, parse in parsers.items():
        if key in raw_backoff:
            try:
                fields[key] = parse(raw_backoff[key])
            except Invalid as e:
                raise Invalid(str(e), at=("backoff", key), value=raw_backoff[key]) from None
    initial = fields.get("initial", defaults.initial)
    if fields.get("max", max(defaults.max, initial)) < initial:
        raise Invalid(f"must be >= backoff.initial ({initial:g}s)", at=("backoff", "max"),
                      value=raw_backoff["max"])
    fields.setdefault("max", max(defaults.max, initial))
    if "outcomes" in value:
        raw = value["outcomes"]
        if not isinstance(raw, list) or not raw:
            raise Invalid(f"expected a non-empty list of {', '.join(RETRY_OUTCOMES)}",
                          at=("outcomes",), value=raw)
        for i, item in enumerate(raw):
            if item not in RETRY_OUTCOMES:
                raise Invalid(f"expected one of {', '.join(RETRY_OUTCOMES)}",
                              at=("outcomes", i), value=item)
        fields["outcomes"] = tuple(dict.fromkeys(raw))
    return RetryConfig(**fields)
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
