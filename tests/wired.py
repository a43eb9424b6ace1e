"""A Worker wired to one end of a socketpair, as if it had connected to a job server: unit
tests drive its packet handling by hand and read what it sent from the other end."""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import Any

from gearvisor.gearman.protocol import Decoder, Packet
from gearvisor.gearman.worker import ConnState, Hooks, JobTimer, Worker
from gearvisor.job import Job


class Log:
    def __init__(self) -> None:
        self.records: list[tuple[str, str, dict]] = []

    def _record(self, level: str):
        return lambda msg, **kw: self.records.append((level, msg, kw))

    def __getattr__(self, level: str):
        return self._record(level)


class RecordingHooks(Hooks):
    def __init__(self) -> None:
        self.finished: list[tuple[str, bool]] = []
        self.refused: list[str] = []
        self.started: list[str] = []

    def job_started(self, job: Job) -> None:
        self.started.append(job.handle)

    def job_finished(self, job: Job, ok: bool, seconds: float) -> None:
        self.finished.append((job.handle, ok))

    def job_refused(self, job: Job) -> None:
        self.refused.append(job.handle)


class RecordingTimer(JobTimer):
    def __init__(self) -> None:
        self.calls: list[tuple[str, float | None]] = []

    def start(self, seconds: float) -> None:
        self.calls.append(("start", seconds))

    def stop(self) -> None:
        self.calls.append(("stop", None))


class Server:
    """The job server's end of a socketpair: what the worker sent, decoded packet by packet."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.sock.setblocking(False)
        self.decoder = Decoder()

    def received(self) -> list[tuple[int, tuple[bytes, ...]]]:
        frames = []
        while True:
            try:
                data = self.sock.recv(65536)
            except BlockingIOError:
                break
            if not data:
                break
            frames += self.decoder.feed(data)
        assert self.decoder.pending == 0
        return [(f.type, f.args) for f in frames]


def assign(worker: Worker, function: bytes, handle: bytes = b"H:gm:1", unique: bytes = b"",
           data: bytes = b"hello") -> None:
    worker._handle(worker.conns[0], Packet.JOB_ASSIGN_UNIQ, (handle, function, unique, data))


def make_wired(made: list, on_job: Callable[[Worker, Server, Job], bytes] | None = None,
               function: str = "f", **kw: Any) -> tuple[Worker, Server]:
    """A Worker serving "echo" and "upper" (or `functions=`) whose one connection is a
    socketpair, as if it had connected and asked for a job (one GRAB in flight). `made`
    collects what to close.

    on_job: instead, the one function `function` is on_job(worker, server, job), for job
    code that acts on its worker (a stop, a pause) or looks at what the server has received.
    """
    if on_job is not None:
        kw["functions"] = {function: lambda job: on_job(worker, server, job)}
    functions = kw.pop("functions", None) or {
        "echo": lambda job: job.data, "upper": lambda job: job.data.upper()}
    worker = Worker([("127.0.0.1", 4730)], functions, "test:mail:0", Log(), **kw)
    ours, theirs = socket.socketpair()
    conn = worker.conns[0]
    conn.sock = ours
    conn.lane = (ours.fileno(), 0)  # (as _finish_connect sets it; a socketpair has no port)
    conn.state = ConnState.GRABBING
    conn.outstanding = 1
    conn.answered = True
    conn.can_do = True
    made.append((worker, theirs))
    server = Server(theirs)
    return worker, server
