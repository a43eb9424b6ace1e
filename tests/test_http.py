"""master/http.HttpServer in this process, on a real loopback socket and the master's real
Loop with an injected clock: request parsing, the connection cap, and accept() running
out of file descriptors (it must pause, log once, and never spin the loop)."""

from __future__ import annotations

import os
import resource
import socket
from collections.abc import Iterator

import pytest
from conftest import HOST, free_port

from gearvisor.master import http
from gearvisor.master.http import HttpServer, Request, Response, parse_head
from gearvisor.master.loop import Loop


class Log:
    def __init__(self) -> None:
        self.records: list[tuple[str, str, dict]] = []

    def __getattr__(self, level: str):
        return lambda msg, **kw: self.records.append((level, msg, kw))


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def served() -> Iterator[tuple[Loop, HttpServer, Log, Clock, int]]:
    clock, log = Clock(), Log()
    loop = Loop(clock, log)
    server = HttpServer(loop, log, lambda r: Response(200, f"{r.method} {r.path}\n".encode()))
    port = free_port()
    server.open(HOST, port)
    try:
        yield loop, server, log, clock, port
    finally:
        server.close()
        loop.close()


def pump(loop: Loop, times: int = 20) -> None:
    """Run what is ready now, never waiting."""
    for _ in range(times):
        if loop.sel.select(0):
            loop.run_once()
        loop.run_due()


def test_parse_head() -> None:
    r = parse_head(b"GET /metrics?x=1 HTTP/1.1\r\nHost: a\r\nAccept: text/plain")
    assert r == Request("GET", "/metrics", {"host": "a", "accept": "text/plain"})
    for bad, status in ((b"GET", 400), (b"GET metrics HTTP/1.1", 400), (b"\x00 / HTTP/1.1", 400),
                        (b"GET / HTTP/2", 505), (b"GET / HTTP/1.1\r\nnocolon", 400),
                        (b"GET / HTTP/1.1\r\n folded: x", 400)):
        with pytest.raises(http.HttpError) as e:
            parse_head(bad)
        assert e.value.status == status


def test_a_request_is_answered_and_closed(served) -> None:
    loop, server, _, _, port = served
    with socket.create_connection((HOST, port), timeout=5) as c:
        c.sendall(b"GET /x HTTP/1.1\r\n\r\n")
        pump(loop)
        reply = c.recv(4096)
        assert reply.startswith(b"HTTP/1.1 200 OK\r\n") and reply.endswith(b"\r\n\r\nGET /x\n")
        assert b"Connection: close" in reply and b"Content-Length: 7" in reply
        pump(loop)
        assert c.recv(10) == b""  # closed
    assert not server.connections


def test_at_the_cap_a_new_connection_evicts_the_oldest_slow_one(served) -> None:
    loop, server, _, _, port = served
    slow = []
    try:
        for _ in range(http.MAX_CONNECTIONS):
            s = socket.create_connection((HOST, port), timeout=5)
            s.sendall(b"GET /slo")
            slow.append(s)
        pump(loop)
        assert len(server.connections) == http.MAX_CONNECTIONS
        with socket.create_connection((HOST, port), timeout=5) as c:
            c.sendall(b"GET /fast HTTP/1.1\r\n\r\n")
            pump(loop)
            assert c.recv(4096).endswith(b"GET /fast\n")
        assert server.evicted == 1 and slow[0].recv(10) == b""
        assert len(server.connections) <= http.MAX_CONNECTIONS
    finally:
        for s in slow:
            s.close()


def test_a_request_not_sent_in_time_gets_408(served) -> None:
    loop, server, _, clock, port = served
    with socket.create_connection((HOST, port), timeout=5) as c:
        c.sendall(b"GET / HTTP/1.1\r\n")
        pump(loop)
        clock.now += http.REQUEST_TIMEOUT
        pump(loop)
        assert c.recv(4096).startswith(b"HTTP/1.1 408 ")
    pump(loop)
    assert not server.connections


def test_out_of_fds_pauses_accepting_logs_once_and_resumes(served) -> None:
    loop, server, log, clock, port = served
    clients = [socket.create_connection((HOST, port), timeout=5) for _ in range(2)]
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    lowest_free = os.dup(0)
    os.close(lowest_free)
    try:
        # The next fd would be the lowest free one: at the limit, accept() gets EMFILE.
        resource.setrlimit(resource.RLIMIT_NOFILE, (lowest_free, hard))
        pump(loop, 50)
        warnings = [r for r in log.records if r[0] == "warning"]
        assert len(warnings) == 1 and "out of file descriptors" in warnings[0][1]
        # Paused: the listener is off the selector, so a readable listener cannot spin.
        assert all(key.fileobj is not server.listener for key in loop.sel.get_map().values())
        assert loop.next_timeout(clock.now) > 0
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    clock.now += http.ACCEPT_PAUSE
    pump(loop)
    for c in clients:
        c.sendall(b"GET /again HTTP/1.1\r\n\r\n")
    pump(loop)
    for c in clients:
        assert c.recv(4096).endswith(b"GET /again\n")
        c.close()
    assert len([r for r in log.records if r[0] == "warning"]) == 1
