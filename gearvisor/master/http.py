"""A small non-blocking HTTP/1.1 server on the master's loop (no thread: never
prometheus-client's start_http_server, which starts threads the master must not have).

One request per connection: accept, read the request head (at most MAX_HEAD bytes, within
REQUEST_TIMEOUT), route it to the handler, write the buffered reply when the socket is
writable, close. Whatever a client sends or fails to send costs the master a bounded
buffer and one timer: at most MAX_CONNECTIONS are open (a new one evicts the oldest that is
still sending its request, so slow clients cannot lock a scraper out), and when accept()
fails for lack of file descriptors the listener pauses for ACCEPT_PAUSE instead of spinning
the loop on a socket that stays readable.
"""

from __future__ import annotations

import errno
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gearvisor.master.loop import Loop, Timer

MAX_HEAD = 8192  # request line + headers
REQUEST_TIMEOUT = 5.0  # to send the request head
REPLY_TIMEOUT = 10.0  # to read the reply
MAX_CONNECTIONS = 32
ACCEPT_PAUSE = 1.0  # out of fds: try accept() again after this long
ACCEPTS_PER_WAKE = 64  # connections accepted per readable event, so others get a turn
REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
           408: "Request Timeout", 431: "Request Header Fields Too Large",
           500: "Internal Server Error", 503: "Service Unavailable",
           505: "HTTP Version Not Supported"}


@dataclass(frozen=True)
class Request:
    method: str
    path: str  # without the query string
    headers: dict[str, str]  # names lower-cased


@dataclass(frozen=True)
class Response:
    status: int
    body: bytes = b""
    content_type: str = "text/plain; charset=utf-8"
    headers: tuple[tuple[str, str], ...] = ()


Handler = Callable[[Request], Response]


@dataclass(eq=False)
class _Connection:
    sock: socket.socket
    buf: bytearray = field(default_factory=bytearray)
    out: bytes | memoryview = b""
    writing: bool = False
    timer: Timer | None = None


class HttpError(Exception):
    """The request cannot be answered by the handler: the status and why."""

    def __init__(self, status: int, why: str) -> None:
        super().__init__(why)
        self.status = status


def parse_head(head: bytes) -> Request:
    """The request line and headers of one request (the bytes before the blank line);
    HttpError(400/505) for anything that is not HTTP/1.x."""
    try:
        text = head.decode("latin-1")
    except UnicodeDecodeError:  # pragma: no cover - latin-1 decodes any byte
        raise HttpError(400, "undecodable request") from None
    lines = text.split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[0].isalpha() or not parts[1].startswith("/"):
        raise HttpError(400, "malformed request line")
    method, target, version = parts
    if not version.startswith("HTTP/1."):
        raise HttpError(505, "only HTTP/1.x is served")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip():
            raise HttpError(400, "malformed header line")
        headers[name.lower()] = value.strip()
    return Request(method, target.split("?", 1)[0], headers)


def render(response: Response, head_only: bool = False) -> bytes:
    """The bytes of a whole HTTP/1.1 reply; the connection closes after it."""
    lines = [f"HTTP/1.1 {response.status} {REASONS.get(response.status, 'Unknown')}",
             f"Content-Type: {response.content_type}",
             f"Content-Length: {len(response.body)}", "Connection: close",
             *(f"{k}: {v}" for k, v in response.headers)]
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    return head if head_only else head + response.body


class HttpServer:
    """Serves `handler` on one listening socket from `loop`. `open()` binds (OSError on
    failure, e.g. the port is taken), `close()` drops the listener and every connection."""

    def __init__(self, loop: Loop, log: Any, handler: Handler) -> None:
        self.loop = loop
        self.log = log
        self.handler = handler
        self.listener: socket.socket | None = None
        self.address: tuple[str, int] | None = None
        self.connections: dict[_Connection, None] = {}  # insertion order: oldest first
        self._paused: Timer | None = None
        self._fd_warned = False
        self.served = 0
        self.evicted = 0

    def open(self, host: str, port: int) -> None:
        """Bind and listen on host:port (IPv4, IPv6 or a name)."""
        info = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(info[0], socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(info[4])
            sock.listen(128)
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        self.listener, self.address = sock, (host, port)
        self.loop.add_reader(sock, self._accept)

    def close(self) -> None:
        """Stop listening and drop every connection."""
        for conn in list(self.connections):
            self._close(conn)
        if self._paused is not None:
            self._paused.cancel()
            self._paused = None
        if self.listener is not None:
            self.loop.remove_reader(self.listener)
            self.listener.close()
            self.listener = None

    # -- connections ----------------------------------------------------------------------------

    def _accept(self) -> None:
        assert self.listener is not None
        for _ in range(ACCEPTS_PER_WAKE):
            try:
                sock, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    self._pause(e)
                # else ECONNABORTED and friends: that client is gone; nothing to do
                return
            self._fd_warned = False
            sock.setblocking(False)
            if len(self.connections) >= MAX_CONNECTIONS and not self._evict():
                self._refuse(sock)
                continue
            conn = _Connection(sock)
            self.connections[conn] = None
            conn.timer = self.loop.call_later(REQUEST_TIMEOUT, lambda c=conn: self._late(c))
            self.loop.add_reader(sock, lambda c=conn: self._read(c))

    def _pause(self, error: OSError) -> None:
        """Out of file descriptors: the listener stays readable, so accepting again at once
        would spin the loop. Stop watching it for ACCEPT_PAUSE; log once per episode."""
        if not self._fd_warned:
            self._fd_warned = True
            self.log.warning("metrics connection not accepted: out of file descriptors; "
                             "pausing the listener", error=str(error), pause=ACCEPT_PAUSE)
        assert self.listener is not None
        self.loop.remove_reader(self.listener)
        self._paused = self.loop.call_later(ACCEPT_PAUSE, self._resume)

    def _resume(self) -> None:
        self._paused = None
        if self.listener is not None:
            self.loop.add_reader(self.listener, self._accept)

    def _evict(self) -> bool:
        """At the connection cap: close the oldest connection still sending its request
        (a slow or idle client); False if every one is being answered."""
        for conn in self.connections:
            if not conn.writing:
                self.evicted += 1
                self._close(conn)
                return True
        return False

    def _refuse(self, sock: socket.socket) -> None:
        try:
            sock.send(render(Response(503, b"too many connections\n")))
        except OSError:
            pass
        sock.close()

    def _read(self, conn: _Connection) -> None:
        try:
            data = conn.sock.recv(MAX_HEAD + 1 - len(conn.buf))
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._close(conn)  # gone before the request was whole
            return
        conn.buf += data
        end = conn.buf.find(b"\r\n\r\n")
        if end < 0:
            if len(conn.buf) > MAX_HEAD:
                self._reply(conn, Response(431, b"request head too large\n"))
            return
        try:
            request = parse_head(bytes(conn.buf[:end]))
        except HttpError as e:
            self._reply(conn, Response(e.status, f"{e}\n".encode()))
            return
        try:
            response = self.handler(request)
        except Exception:  # a bug in a handler must not take the loop down
            self.log.exception("metrics request failed", path=request.path[:200])
            response = Response(500, b"internal error\n")
        self.served += 1
        self._reply(conn, response, head_only=request.method == "HEAD")

    def _reply(self, conn: _Connection, response: Response, head_only: bool = False) -> None:
        """Stop reading, and write the reply as the socket takes it."""
        self.loop.remove_reader(conn.sock)
        conn.buf = bytearray()
        conn.writing = True
        conn.out = memoryview(render(response, head_only))
        if conn.timer is not None:
            conn.timer.cancel()
        conn.timer = self.loop.call_later(REPLY_TIMEOUT, lambda: self._late(conn))
        self._write(conn)
        if conn in self.connections and conn.out:
            self.loop.add_writer(conn.sock, lambda: self._write(conn))

    def _write(self, conn: _Connection) -> None:
        try:
            sent = conn.sock.send(conn.out)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._close(conn)
            return
        conn.out = conn.out[sent:]
        if not conn.out:
            self._close(conn)

    def _late(self, conn: _Connection) -> None:
        if conn not in self.connections:
            return
        if conn.writing:
            self._close(conn)  # not reading its reply
        else:
            conn.timer = None
            self._reply(conn, Response(408, b"request not received in time\n"))

    def _close(self, conn: _Connection) -> None:
        self.connections.pop(conn, None)
        if conn.timer is not None:
            conn.timer.cancel()
        self.loop.remove_reader(conn.sock)
        self.loop.remove_writer(conn.sock)
        try:
            # Unread bytes (a request larger than we read) would make close() send a
            # reset that can destroy the reply before the client reads it: drain a little.
            conn.sock.shutdown(socket.SHUT_WR)
            conn.sock.recv(65536)
        except OSError:
            pass
        conn.sock.close()
