"""A worker's job server named by host name: the lookup (getaddrinfo) blocks the child, for
seconds when DNS is down, so it is made at most every RESOLVE_EVERY per server, and a
lookup that fails falls back on the last address the name had. Both lanes of a server
share one lookup. A real listening socket on 127.0.0.1 stands in for the job server; the
clock is injected."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from typing import Any

import pytest
from wired import Log

from gearvisor.gearman import worker as worker_mod
from gearvisor.gearman.worker import RESOLVE_EVERY, Lanes, Worker

NAME = "gearmand.example"


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Resolver:
    """getaddrinfo for NAME: the listener's address while `up`, else the resolver's
    'temporary failure' (DNS down)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.up = True
        self.calls = 0
        self.real = socket.getaddrinfo

    def __call__(self, host: str, port: int, *args: Any, **kw: Any) -> list:
        if host != NAME:
            return self.real(host, port, *args, **kw)
        self.calls += 1
        if not self.up:
            raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port))]


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(16)
    try:
        yield s
    finally:
        s.close()


@pytest.fixture
def resolver(listener: socket.socket, monkeypatch: pytest.MonkeyPatch) -> Resolver:
    r = Resolver(listener.getsockname()[1])
    monkeypatch.setattr(worker_mod.socket, "getaddrinfo", r)
    return r


def make(port: int, lanes: bool = False) -> tuple[Worker, Clock, Log]:
    clock, log = Clock(), Log()
    w = Worker([(NAME, port)], {"f": lambda job: b""}, "t:p:0", log, clock=clock,
               lanes=Lanes() if lanes else None)
    return w, clock, log


def test_reconnects_within_resolve_every_do_not_look_the_name_up_again(resolver) -> None:
    w, clock, _ = make(resolver.port, lanes=True)
    try:
        conn = w.conns[0]
        w._connect(conn, clock.now)
        assert conn.sock is not None and resolver.calls == 1
        w._connect(conn.mate, clock.now)  # the second lane: the same lookup
        assert conn.mate.sock is not None and resolver.calls == 1
        for _ in range(5):
            w._disconnect(conn)
            clock.now += RESOLVE_EVERY / 6
            w._connect(conn, clock.now)
            assert conn.sock is not None
        assert resolver.calls == 1
        w._disconnect(conn)
        clock.now += RESOLVE_EVERY / 6  # RESOLVE_EVERY since the lookup: asked again
        w._connect(conn, clock.now)
        assert resolver.calls == 2
    finally:
        w.close()


def test_while_the_lookup_fails_the_last_address_is_used_and_asked_once_per_resolve_every(
        resolver, listener) -> None:
    w, clock, log = make(resolver.port)
    try:
        conn = w.conns[0]
        w._connect(conn, clock.now)
        resolver.up = False  # DNS goes down
        w._disconnect(conn)
        clock.now += RESOLVE_EVERY
        w._connect(conn, clock.now)  # looked up, failed: the last address
        assert resolver.calls == 2
        assert conn.sock is not None
        listener.settimeout(5.0)
        for _ in range(2):  # the job server saw both connections, the one before and this
            listener.accept()[0].close()
        warned = [kw for level, msg, kw in log.records if msg.startswith("cannot look up")]
        assert warned == [{"server": f"{NAME}:{resolver.port}", "address": "127.0.0.1",
                           "error": "[Errno -3] Temporary failure in name resolution"}]
        for _ in range(10):  # reconnects for a while: not a lookup each
            w._disconnect(conn)
            clock.now += 2.0
            w._connect(conn, clock.now)
            assert conn.sock is not None
        assert resolver.calls == 2
    finally:
        w.close()


def test_a_name_never_resolved_is_a_failed_connect_retried_with_backoff(resolver) -> None:
    resolver.up = False
    w, clock, log = make(resolver.port)
    try:
        conn = w.conns[0]
        w._connect(conn, clock.now)
        assert conn.sock is None and conn.retry_at > clock.now and resolver.calls == 1
        (warning,) = [kw for level, msg, kw in log.records if level == "warning"]
        assert "Temporary failure in name resolution" in warning["reason"]
    finally:
        w.close()


def test_a_failed_connect_has_the_next_one_look_the_name_up_unless_dns_is_down(
        resolver) -> None:
    """The name may point elsewhere now: a refused or timed-out connect after a lookup that
    worked looks it up again at the next connect. After a lookup that failed it does not:
    while DNS is down, each lookup would block the child again."""
    w, clock, _ = make(resolver.port)
    try:
        conn = w.conns[0]
        w._connect(conn, clock.now)
        assert resolver.calls == 1
        w._drop(conn, "connect: Connection refused")  # (as _finish_connect or the deadline)
        clock.now += 1.0
        w._connect(conn, clock.now)
        assert resolver.calls == 2 and conn.sock is not None
        resolver.up = False
        w._drop(conn, "connect: Connection refused")
        clock.now += 1.0
        w._connect(conn, clock.now)  # looked up, failed: the last address
        assert resolver.calls == 3 and conn.sock is not None
        for _ in range(10):
            w._drop(conn, "connect: Connection refused")
            clock.now += 1.0
            w._connect(conn, clock.now)
            assert conn.sock is not None
        assert resolver.calls == 3  # until RESOLVE_EVERY after the failed lookup
        w._disconnect(conn)
        w._connect(conn, clock.now + RESOLVE_EVERY)
        assert resolver.calls == 4
    finally:
        w.close()


def test_addresses_the_master_had_at_fork_are_used_without_a_lookup(resolver) -> None:
    """A child forked while DNS hangs connects at once to the address the master's
    resolver helper gave (gearman/addresses.py), and looks the name up itself only once
    RESOLVE_EVERY has passed, or a connect failed."""
    resolver.up = False
    clock = Clock()
    w = Worker([(NAME, resolver.port)], {"f": lambda job: b""}, "t:p:0", Log(), clock=clock,
               addresses={(NAME, resolver.port): (socket.AF_INET, ("127.0.0.1", resolver.port)),
                          ("other.example", 1): (socket.AF_INET, ("10.0.0.1", 1))})
    try:
        conn = w.conns[0]
        w._connect(conn, clock.now)
        assert conn.sock is not None and resolver.calls == 0
        assert list(w._addresses) == [(NAME, resolver.port)]  # only its own servers
        w._drop(conn, "connect: Connection refused")
        w._connect(conn, clock.now + 1.0)  # looked up (DNS down): the master's address
        assert conn.sock is not None and resolver.calls == 1
    finally:
        w.close()
