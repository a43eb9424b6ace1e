"""What children and helpers tell the master: typed messages, one JSON line each.

Both sides use these classes, so no event name is spelled out anywhere else. A child
writes `encode(Ready())` to its event pipe; the master reads a line and gets a `Ready`
back from `decode()`, or a `MessageError` naming what is wrong with a line (it is logged
and dropped: a child's bytes never raise out of the master's loop).

The name of each message on the wire (`Ready.name == "ready"`) is stable: tests and
operators grep for it.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, ClassVar

MAX_TEXT = 4096  # longer reasons and messages are cut (a child's text is not trusted)
# A field declared with metadata {"max": n} is cut to n characters instead: a JobStarted
# payload (base64) is bounded by the event line's cap; the journal cuts it to its own cap.
MAX_PAYLOAD_TEXT = 1 << 20


class MessageError(ValueError):
    """A line from a child or helper that is not a message; the text says why."""


@dataclass(frozen=True)
class Message:
    name: ClassVar[str] = ""


# -- from a child (Python pool, command pool) -----------------------------------------------------

@dataclass(frozen=True)
class Ready(Message):
    """Registered on every reachable job server: the child serves."""

    name: ClassVar[str] = "ready"


@dataclass(frozen=True)
class BootError(Message):
    """The pool's code cannot be loaded (or the command cannot be run); exit follows."""

    name: ClassVar[str] = "boot_error"
    reason: str = "unknown"


@dataclass(frozen=True)
class Quarantined(Message):
    """The child fails fast, job after job, and stopped taking jobs."""

    name: ClassVar[str] = "quarantined"
    reason: str = ""
    failed: int = 0
    done: int = 0


@dataclass(frozen=True)
class ProbationPassed(Message):
    """A child started on probation (after a quarantine, or as a circuit's probe) did well."""

    name: ClassVar[str] = "probation_passed"


@dataclass(frozen=True)
class Recycle(Message):
    """A recycling limit (max_jobs, max_memory) was reached: replace me gracefully."""

    name: ClassVar[str] = "recycle"
    reason: str = ""


@dataclass(frozen=True)
class Modules(Message):
    """Part of an import report: files this child's code came from (see helpers/watcher)."""

    name: ClassVar[str] = "modules"
    files: list = field(default_factory=list)
    more: bool = False
    dropped: int = 0


@dataclass(frozen=True)
class JobStarted(Message):
    """A command child (through its reporting shim) took a job: the master keeps it as the
    child's current job, so a death before JobEnded is recorded as a crash of this job.
    `payload_b64` is the payload's first bytes, base64 (at most GEARVISOR_PAYLOAD_CAP of
    them), `size` the whole payload's length."""

    name: ClassVar[str] = "job_started"
    function: str = ""
    handle: str = ""
    unique: str = ""
    payload_b64: str = field(default="", metadata={"max": MAX_PAYLOAD_TEXT})
    size: int = 0
    key: str = ""  # the shim's poison key (shm/poison.shim_key), 40 hex digits


@dataclass(frozen=True)
class JobEnded(Message):
    """A command child finished the job of its last JobStarted (answered or failed)."""

    name: ClassVar[str] = "job_ended"


@dataclass(frozen=True)
class Holding(Message):
    """A Python child started holding the next job on a second lane while it runs one: the
    master watches the pool's held lanes until none is held (master/lanes.py)."""

    name: ClassVar[str] = "holding"


# -- from the file-watcher helper -----------------------------------------------------------------

@dataclass(frozen=True)
class Watching(Message):
    name: ClassVar[str] = "watching"
    paths: list = field(default_factory=list)
    missing: list = field(default_factory=list)
    polling: bool = False


@dataclass(frozen=True)
class Changed(Message):
    name: ClassVar[str] = "changed"
    pools: list = field(default_factory=list)
    config: bool = False
    files: list = field(default_factory=list)
    count: int = 0
    why: str = ""


@dataclass(frozen=True)
class WatcherError(Message):
    name: ClassVar[str] = "error"
    message: str = ""
    fatal: bool = False


# -- from the alert delivery helper (helpers/notifier.py) ---------------------------------------

@dataclass(frozen=True)
class Delivered(Message):
    """One notification's outcome: sent (`ok`) or given up on after `attempts` tries, or
    dropped unsent (attempts 0) because its channel's queue was full. `dropped` counts the
    channel's drops so far. Field names follow the notification's payload (groupKey)."""

    name: ClassVar[str] = "delivered"
    channel: str = ""
    groupKey: str = ""  # the payload's own spelling
    ok: bool = False
    error: str = ""
    attempts: int = 0
    dropped: int = 0
    # The notification's "id" as the master numbered it (0: none): what the master stops
    # holding for a resend once the outcome is in.
    id: int = 0
    # Not an outcome: the helper stopped before it was done; the master sends it again.
    pending: bool = False


# -- from the job store helper (helpers/store.py) --------------------------------------------------

@dataclass(frozen=True)
class Stored(Message):
    """Every journal line the master numbered up to `seq` is committed (or was refused as
    unreadable): the master can forget them."""

    name: ClassVar[str] = "stored"
    seq: int = 0


@dataclass(frozen=True)
class StoreState(Message):
    """The store helper's state, sent after a change (at most once a second): whether the
    store is `up` (else `error` says why), dead letters per function, retries submitted
    since the last report as [pool, function, n] triples, journal lines held unwritten
    (`buffered`), and `refused`: records and fields refused as malformed so far."""

    name: ClassVar[str] = "store"
    up: bool = False
    error: str = ""
    dead: dict = field(default_factory=dict)
    retries: list = field(default_factory=list)
    buffered: int = 0
    refused: int = 0


# -- from the resolver helper (helpers/resolver.py) ------------------------------------------------

@dataclass(frozen=True)
class Resolved(Message):
    """A job server's host name, looked up: its first address (`family`, and `address` as
    the socket module's sockaddr, a list), or `error` saying why there is none."""

    name: ClassVar[str] = "resolved"
    host: str = ""
    port: int = 0
    family: int = 0
    address: list = field(default_factory=list)
    error: str = ""


KINDS: dict[str, type[Message]] = {
    cls.name: cls for cls in (Ready, BootError, Quarantined, ProbationPassed, Recycle, Modules,
                              JobStarted, JobEnded, Holding, Watching, Changed, WatcherError,
                              Delivered, Stored, StoreState, Resolved)}


def encode(message: Message) -> bytes:
    """One JSON line for the pipe."""
    return json.dumps({"event": message.name, **dataclasses.asdict(message)}).encode() + b"\n"


def _checked(value: Any, default: Any, key: str, limit: int = MAX_TEXT) -> Any:
    """`value` if it has the default's type (bounded; a string to `limit` characters),
    else MessageError."""
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
    elif isinstance(default, int):
        if isinstance(value, int) and not isinstance(value, bool):
            return max(0, min(value, 1 << 62))
    elif isinstance(default, str):
        if isinstance(value, str):
            value = value[:limit]
            if not value.isascii():
                # (JSON may carry a lone surrogate, "\ud800": no UTF-8 encodes it, and a
                # name that cannot be encoded would raise wherever it is written later)
                value = value.encode("utf-8", "replace").decode("utf-8")
            return value
        if value is None:
            return default
    elif isinstance(default, list):
        if isinstance(value, list):
            return value
    elif isinstance(default, dict):
        if isinstance(value, dict):
            return value
    raise MessageError(f"{key}: expected {type(default).__name__}, got {type(value).__name__}")


def decode(line: bytes) -> Message:
    """The message a line holds; MessageError (with the reason) for anything else."""
    try:
        raw = json.loads(line)
    except (ValueError, RecursionError) as e:
        raise MessageError(f"not JSON: {str(e)[:100]}") from None
    if not isinstance(raw, dict):
        raise MessageError("not a JSON object")
    kind = KINDS.get(raw.get("event"))  # type: ignore[arg-type]
    if kind is None:
        raise MessageError(f"unknown event {str(raw.get('event'))[:60]!r}")
    values = {}
    for f in dataclasses.fields(kind):
        if f.name in raw:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            values[f.name] = _checked(raw[f.name], default, f.name,
                                      f.metadata.get("max", MAX_TEXT))
    return kind(**values)
