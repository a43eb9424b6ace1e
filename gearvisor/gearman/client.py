"""A small blocking Gearman client: submit foreground/background jobs. For tests, demos, bench.

Not a full client library: one server, one connection, jobs tracked by handle.
"""

from __future__ import annotations

import socket
import time
import uuid
from dataclasses import dataclass, field

from gearvisor.gearman.protocol import Decoder, Frame, Packet, encode


class ClientError(Exception):
    pass


@dataclass
class Result:
    """What happened to one foreground job."""

    handle: str
    ok: bool = False
    done: bool = False
    data: bytes = b""
    warnings: list[bytes] = field(default_factory=list)
    partial: list[bytes] = field(default_factory=list)
    statuses: list[tuple[int, int]] = field(default_factory=list)
    exception: bytes | None = None


class Client:
    """Submit jobs to one job server and collect their results."""

    def __init__(self, host: str, port: int, timeout: float = 10.0) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.decoder = Decoder()
        self.pending: list[Frame] = []
        self.results: dict[str, Result] = {}

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _frames(self) -> list[Frame]:
        while not self.pending:
            data = self.sock.recv(1 << 20)
            if not data:
                raise ClientError("job server closed the connection")
            self.pending.extend(self.decoder.feed(data))
        frames, self.pending = self.pending, []
        return frames

    def _submit(self, ptype: int, function: str, data: bytes | str, unique: str | None) -> str:
        unique = uuid.uuid4().hex if unique is None else unique
        self.sock.sendall(encode(ptype, function, unique, data))
        while True:
            frames = self._frames()
            for i, f in enumerate(frames):
                if f.type == Packet.JOB_CREATED:
                    self.pending = frames[i + 1:] + self.pending
                    handle = f.args[0].decode()
                    return handle
                if f.type == Packet.ERROR:
                    raise ClientError(f"{f.args[0].decode()}: {f.args[1].decode()}")
                self._absorb(f)

    def submit(self, function: str, data: bytes | str, unique: str | None = None) -> str:
        """Submit a foreground job; returns its handle. Collect it with wait()."""
        handle = self._submit(Packet.SUBMIT_JOB, function, data, unique)
        self.results.setdefault(handle, Result(handle))
        return handle

    def submit_background(self, function: str, data: bytes | str,
                          unique: str | None = None) -> str:
        """Submit a background job, always with a unique id: with a persistent queue,
        gearmand collapses background jobs with an empty unique id into one row."""
        return self._submit(Packet.SUBMIT_JOB_BG, function, data, unique)

    def submit_background_many(self, function: str, uniques: list[str], data: bytes | str = b"",
                               batch: int = 500, deadline: float | None = None) -> None:
        """Queue one background job per unique id, `batch` submits to a write, then their
        JOB_CREATEDs: a deep queue in a second or two, where one submit per round trip takes
        many. `deadline` (a time.monotonic() value) bounds the whole; TimeoutError past it."""
        for first in range(0, len(uniques), batch):
            chunk = uniques[first:first + batch]
            self.sock.sendall(b"".join(encode(Packet.SUBMIT_JOB_BG, function, u, data)
                                       for u in chunk))
            created = 0
            while created < len(chunk):
                if deadline is not None and time.monotonic() >= deadline:
                    raise TimeoutError(f"queued {first + created} of {len(uniques)} jobs")
                for f in self._frames():
                    if f.type == Packet.JOB_CREATED:
                        created += 1
                    elif f.type == Packet.ERROR:
                        raise ClientError(f"{f.args[0].decode()}: {f.args[1].decode()}")
                    else:
                        self._absorb(f)

    def _absorb(self, f: Frame) -> None:
        handle = f.args[0].decode() if f.args else ""
        r = self.results.setdefault(handle, Result(handle))
        if f.type == Packet.WORK_COMPLETE:
            r.ok, r.done, r.data = True, True, f.args[1]
        elif f.type == Packet.WORK_FAIL:
            r.ok, r.done = False, True
        elif f.type == Packet.WORK_EXCEPTION:
            r.exception = f.args[1]
        elif f.type == Packet.WORK_WARNING:
            r.warnings.append(f.args[1])
        elif f.type == Packet.WORK_DATA:
            r.partial.append(f.args[1])
        elif f.type == Packet.WORK_STATUS:
            r.statuses.append((int(f.args[1]), int(f.args[2])))

    def wait(self, handles: list[str] | None = None) -> dict[str, Result]:
        """Block until every given (default: every submitted) foreground job is done."""
        wanted = set(handles if handles is not None else self.results)
        while not all(self.results[h].done for h in wanted):
            for f in self._frames():
                self._absorb(f)
        return {h: self.results[h] for h in wanted}

    def call(self, function: str, data: bytes | str, unique: str | None = None) -> Result:
        """Submit one foreground job and wait for it."""
        handle = self.submit(function, data, unique)
        return self.wait([handle])[handle]
