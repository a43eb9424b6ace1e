"""gearmand's text admin protocol: `status`, `workers`, `version`, for the master, CLI and tests."""

from __future__ import annotations

import errno
import socket
from dataclasses import dataclass


class AdminError(Exception):
    """The job server could not be reached or answered something unexpected."""


@dataclass(frozen=True)
class FunctionStatus:
    function: str
    queued: int  # total jobs, including running ones
    running: int
    workers: int  # capable workers


@dataclass(frozen=True)
class WorkerInfo:
    fd: int
    ip: str
    client_id: str  # "-" when the worker sent no SET_CLIENT_ID
    functions: tuple[str, ...]


def command(host: str, port: int, cmd: str, timeout: float = 5.0) -> list[str]:
    """Send one admin command; return the reply lines (without the final "." line)."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            # CRLF: gearmand cuts 2 bytes off some commands otherwise (`create function`,
            # `drop function`).
            sock.sendall(cmd.encode() + b"\r\n")
            buf = b""
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                buf += chunk
                if complete(buf) or (cmd in ("version", "getpid") and buf.endswith(b"\n")):
                    break
    except OSError as e:
        raise AdminError(f"job server {host}:{port}: {e}") from e
    return _lines(buf, host, port)


def _lines(buf: bytes, host: str, port: int) -> list[str]:
    text = buf.decode(errors="replace")
    if text.startswith("ERR "):
        raise AdminError(f"job server {host}:{port}: {text.strip()}")
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if lines and lines[-1] == ".":
        lines.pop()
    return lines


MAX_ANSWER = 16 * 1024 * 1024  # an admin answer longer than this is refused, not buffered


class WorkersPoll:
    """A non-blocking `workers` query, driven by the master's selector loop (the master
    never blocks on a job server). on_ready() after each selector event; `done` then
    `result` (None when the server could not be asked)."""

    def __init__(self, host: str, port: int, deadline: float) -> None:
        self.host, self.port, self.deadline = host, port, deadline
        self.buf = b""
        self.done = False
        self.sent = False
        self.result: list[WorkerInfo] | None = None
        family, stype, proto, _, addr = socket.getaddrinfo(host, port,
                                                           type=socket.SOCK_STREAM)[0]
        self.sock = socket.socket(family, stype, proto)
        self.sock.setblocking(False)
        if self.sock.connect_ex(addr) not in (0, errno.EINPROGRESS):
            self.finish(ok=False)

    def on_ready(self) -> None:
        try:
            if not self.sent:
                if self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
                    self.finish(ok=False)
                    return
                self.sock.send(b"workers\r\n")  # a few bytes into an empty buffer
                self.sent = True
                return
            chunk = self.sock.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            self.finish(ok=False)
            return
        self.buf += chunk
        if len(self.buf) > MAX_ANSWER:
            self.finish(ok=False)  # a server that never ends its answer: not believed
        elif not chunk or complete(self.buf):
            self.finish(ok=complete(self.buf))

    def finish(self, ok: bool) -> None:
        if ok:
            try:
                self.result = parse_workers(_lines(self.buf, self.host, self.port))
            except AdminError:
                self.result = None
        self.done = True  # the owner unregisters the socket from its selector, then closes


def status(host: str, port: int, timeout: float = 5.0) -> dict[str, FunctionStatus]:
    """`status`: per function, queued/running jobs and capable workers."""
    out = {}
    for line in command(host, port, "status", timeout):
        parts = line.split("\t")
        if len(parts) == 4:
            out[parts[0]] = FunctionStatus(parts[0], int(parts[1]), int(parts[2]),
                                           int(parts[3]))
    return out


def workers(host: str, port: int, timeout: float = 5.0) -> list[WorkerInfo]:
    """`workers`: one entry per connection, with its client id and registered functions."""
    return parse_workers(command(host, port, "workers", timeout))


def complete(buf: bytes) -> bool:
    """A multi-line admin reply (status, workers) has arrived whole."""
    return buf.endswith(b"\n.\n") or buf == b".\n"


def parse_workers(lines: list[str]) -> list[WorkerInfo]:
    """The lines of a `workers` reply (without the final ".")."""
    out = []
    for line in lines:
        head, sep, fns = line.partition(" : ")
        if not sep:
            head, fns = line.rstrip(" :"), ""
        parts = head.split(" ", 2)
        if len(parts) < 3:
            continue
        out.append(WorkerInfo(int(parts[0]), parts[1], parts[2].strip(), tuple(fns.split())))
    return out


def version(host: str, port: int, timeout: float = 5.0) -> str:
    lines = command(host, port, "version", timeout)
    return lines[0].strip() if lines else ""
