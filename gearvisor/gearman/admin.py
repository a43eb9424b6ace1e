"""gearmand's text admin protocol: `status`, `workers`, `version`, `getpid`.

The master asks only through ProbePoll (non-blocking, bounded: master/probe.py); the CLI
and tests use the blocking helpers (command, status, workers, version).
"""

from __future__ import annotations

import errno
import os
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
            buf = bytearray()
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                buf += chunk
                if len(buf) > MAX_ANSWER:
                    raise AdminError(f"job server {host}:{port}: the answer to {cmd!r} is "
                                     f"longer than {MAX_ANSWER} bytes; not a job server?")
                if complete(buf) or (cmd in ("version", "getpid") and buf.endswith(b"\n")):
                    break
    except OSError as e:
        raise AdminError(f"job server {host}:{port}: {e}") from e
    return _lines(bytes(buf), host, port)


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


MAX_ANSWER = 16 * 1024 * 1024  # a blocking command() answer: not the master's probe

# The master's probe: `version`, `getpid`, `status` and `workers` pipelined on one
# connection, CRLF-terminated (gearmand cuts 2 bytes off some commands otherwise).
PROBE_REQUEST = b"version\r\ngetpid\r\nstatus\r\nworkers\r\n"
PROBE_MAX_BYTES = 8 * 1024 * 1024  # a whole probe answer; more is a broken server
PROBE_MAX_LINES = 50_000  # status + workers lines; a fleet of 50k connections is not ours
PROBE_MAX_LINE = 64 * 1024  # one line (a worker registered for ~2000 functions)
MAX_COUNT = 2**53  # a count above this in `status` is nonsense, not a number to export
MAX_PID = 2**22  # Linux's pid_max limit


class ProbeError(Exception):
    """The probe's answer broke a bound or the protocol: the server is not believed."""


@dataclass(frozen=True)
class ProbeAnswer:
    """What one probe read: `version`, `getpid` (None when the server refused either),
    `status` per function and the `workers` list. `skipped` counts lines that could not be
    parsed (each is dropped on its own: one odd line does not discard the answer)."""

    version: str | None
    pid: int | None
    functions: dict[str, FunctionStatus]
    workers: tuple[WorkerInfo, ...]
    skipped: int = 0


def _count(text: str) -> int | None:
    """A non-negative count no larger than MAX_COUNT, or None."""
    if not text.isascii() or not text.isdigit() or len(text) > 16:
        return None
    value = int(text)
    return value if value <= MAX_COUNT else None


def parse_status_line(line: str) -> FunctionStatus | None:
    """One `status` line, `fn TAB total TAB running TAB capable`; None when malformed."""
    parts = line.split("\t")
    if len(parts) != 4 or not parts[0]:
        return None
    total, running, capable = (_count(p) for p in parts[1:])
    if total is None or running is None or capable is None:
        return None
    return FunctionStatus(parts[0], total, running, capable)


def parse_worker_line(line: str) -> WorkerInfo | None:
    """One `workers` line, `fd ip client_id : fn fn ...`; None when malformed."""
    head, sep, fns = line.partition(" : ")
    if not sep:
        head, fns = line.rstrip(" :"), ""
    parts = head.split(" ", 2)
    if len(parts) < 3:
        return None
    fd = _count(parts[0])
    if fd is None:
        return None
    return WorkerInfo(fd, parts[1], parts[2].strip(), tuple(fns.split()))


class ProbeParser:
    """Reads the four answers of PROBE_REQUEST as bytes arrive, within fixed bounds: at most
    PROBE_MAX_BYTES in all, PROBE_MAX_LINES lines and PROBE_MAX_LINE bytes per line, so a
    hostile or broken server costs the master a bounded amount of memory and work. Only
    the unfinished last line is buffered. feed() raises ProbeError on a broken bound;
    `done` once the `workers` list has ended."""

    def __init__(self) -> None:
        self.stage = 0  # 0 version, 1 getpid, 2 status, 3 workers, 4 done
        self.partial = b""
        self.received = 0
        self.lines = 0
        self.skipped = 0
        self.version: str | None = None
        self.pid: int | None = None
        self.functions: dict[str, FunctionStatus] = {}
        self.workers: list[WorkerInfo] = []

    @property
    def done(self) -> bool:
        return self.stage == 4

    def feed(self, data: bytes) -> None:
        """Take the next bytes of the answer (bytes after the last answer are ignored)."""
        if self.done:
            return
        self.received += len(data)
        if self.received > PROBE_MAX_BYTES:
            raise ProbeError(f"answer longer than {PROBE_MAX_BYTES} bytes")
        buf = self.partial + data
        start = 0
        while not self.done:
            end = buf.find(b"\n", start)
            if end < 0:
                break
            if end - start > PROBE_MAX_LINE:
                raise ProbeError(f"a line longer than {PROBE_MAX_LINE} bytes")
            self._line(buf[start:end].rstrip(b"\r").decode("utf-8", "replace"))
            start = end + 1
        self.partial = b"" if self.done else buf[start:]
        if len(self.partial) > PROBE_MAX_LINE:
            raise ProbeError(f"a line longer than {PROBE_MAX_LINE} bytes")

    def _line(self, line: str) -> None:
        self.lines += 1
        if self.lines > PROBE_MAX_LINES:
            raise ProbeError(f"more than {PROBE_MAX_LINES} lines")
        if self.stage < 2:
            # "OK 1.1.20" / "OK 4242"; an ERR (an old server without getpid) leaves None.
            ok, _, value = line.partition(" ")
            if ok == "OK" and self.stage == 0:
                self.version = value.strip()[:100] or None
            elif ok == "OK":
                pid = _count(value.strip())
                self.pid = pid if pid is not None and 0 < pid <= MAX_PID else None
            self.stage += 1
            return
        if line == "." or line.startswith("ERR "):
            self.stage += 1  # a list ends with ".", a refused command with one ERR line
            return
        if self.stage == 2:
            row = parse_status_line(line)
            if row is not None:
                self.functions[row.function] = row
        else:
            row = parse_worker_line(line)
            if row is not None:
                self.workers.append(row)
        self.skipped += row is None

    def answer(self) -> ProbeAnswer:
        return ProbeAnswer(self.version, self.pid, self.functions, tuple(self.workers),
                           self.skipped)


Address = tuple[int, tuple]  # (address family, sockaddr)


def resolve(host: str, port: int) -> Address:
    """The address to connect to. A numeric address resolves without any lookup; a host
    name asks the resolver (which may block: the probe caches the result)."""
    try:
        info = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                  flags=socket.AI_NUMERICHOST)
    except socket.gaierror:
        info = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    family, _, _, _, addr = info[0]
    return family, addr


class ProbePoll:
    """One non-blocking probe of a job server, driven by the master's selector loop (the
    master never blocks on a job server): connect, send PROBE_REQUEST, read the four
    answers. Call on_ready() after each selector event (writable until `sent`, readable
    after); once `done`, `answer` is the ProbeAnswer or `error` says why there is none.
    The owner enforces the deadline with finish(error) and closes `sock`."""

    def __init__(self, address: Address, deadline: float) -> None:
        self.deadline = deadline
        self.parser = ProbeParser()
        self.done = False
        self.sent = False
        self.answer: ProbeAnswer | None = None
        self.error: str | None = None
        self._out = PROBE_REQUEST
        family, addr = address
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.setblocking(False)
        code = self.sock.connect_ex(addr)
        if code not in (0, errno.EINPROGRESS):
            self.finish(f"connect: {os.strerror(code)}")

    def on_ready(self) -> None:
        """Make progress: finish connecting and send, or read what arrived."""
        if self.done:
            return
        try:
            if not self.sent:
                code = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if code:
                    self.finish(f"connect: {os.strerror(code)}")
                    return
                self._out = self._out[self.sock.send(self._out):]
                self.sent = not self._out
                return
            chunk = self.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            self.finish(e.strerror or str(e))
            return
        if not chunk:
            self.finish("closed the connection before it answered")
            return
        try:
            self.parser.feed(chunk)
        except ProbeError as e:
            self.finish(str(e))
            return
        if self.parser.done:
            self.answer = self.parser.answer()
            self.done = True

    def finish(self, error: str) -> None:
        """End without an answer (a failure, or the deadline passed)."""
        if not self.done:
            self.error, self.done = error, True


def status(host: str, port: int, timeout: float = 5.0) -> dict[str, FunctionStatus]:
    """`status`: per function, queued/running jobs and capable workers."""
    rows = (parse_status_line(line) for line in command(host, port, "status", timeout))
    return {row.function: row for row in rows if row is not None}


def workers(host: str, port: int, timeout: float = 5.0) -> list[WorkerInfo]:
    """`workers`: one entry per connection, with its client id and registered functions."""
    return parse_workers(command(host, port, "workers", timeout))


def complete(buf: bytes | bytearray) -> bool:
    """A multi-line admin reply (status, workers) has arrived whole."""
    return buf.endswith(b"\n.\n") or buf == b".\n"


def parse_workers(lines: list[str]) -> list[WorkerInfo]:
    """The lines of a `workers` reply (without the final "."); malformed lines are left out."""
    return [w for w in map(parse_worker_line, lines) if w is not None]


def version(host: str, port: int, timeout: float = 5.0) -> str:
    lines = command(host, port, "version", timeout)
    return lines[0].strip() if lines else ""
