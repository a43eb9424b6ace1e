"""The Job object a user function receives: `def resize(job): ...`."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from gearvisor.gearman.protocol import Packet

Send = Callable[[int, bytes, bytes], None]  # (packet type, handle, payload)


class Job:
    """One assigned job: its identity, its payload, and ways to talk back to the client.

    Attributes:
        function: the gearman function name it was submitted to.
        handle: the job server's handle, e.g. "H:host:17".
        unique: the client's unique id ("" when the client gave none). A retry or replay
            of a failed job has the original job's unique here, not the one gearvisor
            submitted it with.
        data: the payload, as bytes.
        attempt: 1 for a job's first run, n for its n-th (a retry, see `retry:`).
    """

    __slots__ = ("function", "handle", "unique", "data", "_send", "server", "key", "attempt",
                 "retry_of", "strikes")

    def __init__(self, function: str, handle: str, unique: str, data: bytes, send: Send,
                 server: str = "", attempt: int = 1, retry_of: int | None = None) -> None:
        self.function = function
        self.handle = handle
        self.unique = unique
        self.data = data
        self._send = send
        self.server = server  # "host:port" of the job server that assigned it
        self.key = 0  # its poison key, once computed (gearvisor.poison.job_key)
        self.strikes = 0  # children that died running it before (when poison is checked)
        self.attempt = attempt
        self.retry_of = retry_of  # the journal's failure record this run retries, or None

    def text(self, encoding: str = "utf-8") -> str:
        """The payload decoded as text."""
        return self.data.decode(encoding)

    def json(self) -> Any:
        """The payload parsed as JSON (raises ValueError on bad JSON, failing the job)."""
        return json.loads(self.data)

    def send_status(self, numerator: int, denominator: int) -> None:
        """Report progress (WORK_STATUS), e.g. send_status(3, 10)."""
        self._send(Packet.WORK_STATUS, self.handle.encode(),
                   b"%d\0%d" % (int(numerator), int(denominator)))

    def send_data(self, data: bytes | str) -> None:
        """Stream a partial result to the client (WORK_DATA)."""
        self._send(Packet.WORK_DATA, self.handle.encode(), encode_result(data))

    def send_warning(self, data: bytes | str) -> None:
        """Send a warning to the client (WORK_WARNING); the job goes on."""
        self._send(Packet.WORK_WARNING, self.handle.encode(), encode_result(data))

    def __repr__(self) -> str:
        return (f"Job(function={self.function!r}, handle={self.handle!r}, "
                f"unique={self.unique!r}, size={len(self.data)})")


def encode_result(value: Any) -> bytes:
    """bytes and str go out as they are, None as empty, anything else as JSON."""
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode()
    if value is None:
        return b""
    if isinstance(value, (bytearray, memoryview)):
        return bytes(value)
    return json.dumps(value, separators=(",", ":"), default=str).encode()


class JobTimeout(Exception):
    """Raised inside a job that ran past its function's `timeout` (the soft limit). Catch it
    to clean up; if it escapes, the job ends in WORK_FAIL. The master kills the child
    `timeout_grace` seconds later if the job still has not returned."""
