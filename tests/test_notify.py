"""notify.Notifier against a real AF_UNIX datagram socket standing in for systemd's
$NOTIFY_SOCKET. Datagrams on a Unix socket are queued in the receiver before sendto() returns,
so "nothing was sent" is checked with a non-blocking recv right after the call, no waiting."""

from __future__ import annotations

import os
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from gearvisor.master.notify import Notifier


class Listener:
    """A bound SOCK_DGRAM socket: what systemd listens on."""

    def __init__(self, address: str | bytes) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)

    def recv(self, timeout: float = 5.0) -> list[str]:
        """The next datagram, split into its lines; fails the test after `timeout`."""
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(65536)
        except TimeoutError:
            pytest.fail(f"no notification within {timeout}s")
        return data.decode().split("\n")

    def pending(self) -> list[list[str]]:
        """Every datagram already queued, without waiting."""
        self.sock.setblocking(False)
        out = []
        while True:
            try:
                out.append(self.sock.recv(65536).decode().split("\n"))
            except BlockingIOError:
                return out

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[Listener]:
    sock = Listener(str(tmp_path / "notify"))
    try:
        yield sock
    finally:
        sock.close()


@pytest.fixture
def notifier(listener: Listener) -> Iterator[Notifier]:
    n = Notifier({"NOTIFY_SOCKET": listener.sock.getsockname()})
    try:
        yield n
    finally:
        n.close()


def test_enabled_with_a_path(notifier: Notifier, listener: Listener) -> None:
    assert notifier.enabled
    assert notifier.address == listener.sock.getsockname()


def test_ready(notifier: Notifier, listener: Listener) -> None:
    notifier.ready()
    assert listener.recv() == ["READY=1"]


def test_ready_with_status(notifier: Notifier, listener: Listener) -> None:
    notifier.ready("4/4 children ready in 1 pool(s)")
    assert listener.recv() == ["READY=1", "STATUS=4/4 children ready in 1 pool(s)"]


def test_reloading_sends_monotonic_usec(notifier: Notifier, listener: Listener) -> None:
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    notifier.reloading()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    lines = listener.recv()
    assert lines[0] == "RELOADING=1"
    assert len(lines) == 2 and lines[1].startswith("MONOTONIC_USEC=")
    usec = int(lines[1].removeprefix("MONOTONIC_USEC="))
    assert before <= usec <= after


def test_stopping(notifier: Notifier, listener: Listener) -> None:
    notifier.stopping()
    assert listener.recv() == ["STOPPING=1"]


def test_watchdog(notifier: Notifier, listener: Listener) -> None:
    notifier.watchdog()
    assert listener.recv() == ["WATCHDOG=1"]


def test_status_is_sent_and_deduplicated(notifier: Notifier, listener: Listener) -> None:
    notifier.status("2/2 children ready")
    assert listener.recv() == ["STATUS=2/2 children ready"]
    notifier.status("2/2 children ready")  # same text again: nothing sent
    assert listener.pending() == []
    notifier.status("1/2 children ready; images: 1 restarting")
    notifier.status("2/2 children ready")  # differs from the previous one: sent again
    assert listener.pending() == [["STATUS=1/2 children ready; images: 1 restarting"],
                                  ["STATUS=2/2 children ready"]]
    assert notifier.last_status == "2/2 children ready"


def test_sequence_arrives_in_order(notifier: Notifier, listener: Listener) -> None:
    notifier.ready("up")
    notifier.reloading()
    notifier.ready()
    notifier.stopping()
    got = [lines[0] for lines in listener.pending()]
    assert got == ["READY=1", "RELOADING=1", "READY=1", "STOPPING=1"]


def test_close_then_send_reopens(notifier: Notifier, listener: Listener) -> None:
    notifier.ready()
    notifier.close()
    notifier.close()  # twice is harmless
    notifier.stopping()
    assert listener.pending() == [["READY=1"], ["STOPPING=1"]]


def test_abstract_socket() -> None:
    name = f"gearvisor-test-{uuid.uuid4().hex}"
    listener = Listener(b"\0" + name.encode())
    n = Notifier({"NOTIFY_SOCKET": "@" + name})
    try:
        assert n.enabled
        assert n.address == b"\0" + name.encode()
        n.ready("abstract")
        assert listener.recv() == ["READY=1", "STATUS=abstract"]
    finally:
        n.close()
        listener.close()


@pytest.mark.parametrize("environ", [{}, {"NOTIFY_SOCKET": ""},
                                     {"NOTIFY_SOCKET": "relative/notify"}],
                         ids=["unset", "empty", "relative"])
def test_without_notify_socket_is_a_silent_no_op(environ: dict[str, str],
                                                  listener: Listener) -> None:
    n = Notifier(environ)
    assert not n.enabled
    assert n.address is None
    n.ready("x")
    n.reloading()
    n.stopping()
    n.status("y")
    n.watchdog()
    n.send("READY=1")
    n.close()
    assert listener.pending() == []


def test_default_environ_is_os_environ(monkeypatch: pytest.MonkeyPatch,
                                       listener: Listener) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", listener.sock.getsockname())
    monkeypatch.setenv("WATCHDOG_USEC", "4000000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    n = Notifier()
    try:
        assert n.enabled
        assert n.watchdog_interval == 2.0
        n.watchdog()
        assert listener.recv() == ["WATCHDOG=1"]
    finally:
        n.close()


def test_missing_socket_path_does_not_raise(tmp_path: Path) -> None:
    n = Notifier({"NOTIFY_SOCKET": str(tmp_path / "nobody-here")})
    try:
        assert n.enabled
        n.ready("x")
        n.status("y")
        n.watchdog()
        n.stopping()
    finally:
        n.close()


def test_dead_socket_does_not_raise(tmp_path: Path) -> None:
    """The path exists but nobody listens any more (ECONNREFUSED): still silent."""
    path = str(tmp_path / "dead")
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    dead.bind(path)
    dead.close()
    assert os.path.exists(path)
    n = Notifier({"NOTIFY_SOCKET": path})
    try:
        n.ready()
        n.reloading()
        n.watchdog()
    finally:
        n.close()


def test_full_socket_does_not_block_or_raise(notifier: Notifier, listener: Listener) -> None:
    """A receiver that does not read: the queue fills and sends are dropped, never blocking."""
    for _ in range(5000):
        notifier.watchdog()
    got = listener.pending()
    assert 0 < len(got) < 5000
    assert all(lines == ["WATCHDOG=1"] for lines in got)


@pytest.mark.parametrize(("environ", "interval"), [
    ({"WATCHDOG_USEC": "30000000"}, 15.0),
    ({"WATCHDOG_USEC": "1000000"}, 0.5),
    ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "<self>"}, 15.0),
    ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "<other>"}, None),
    ({}, None),
    ({"WATCHDOG_USEC": ""}, None),
    ({"WATCHDOG_USEC": "0"}, None),
    ({"WATCHDOG_USEC": "-5"}, None),
    ({"WATCHDOG_USEC": "soon"}, None),
], ids=["30s", "1s", "own-pid", "other-pid", "unset", "empty", "zero", "negative", "junk"])
def test_watchdog_interval(environ: dict[str, str], interval: float | None) -> None:
    env = {"NOTIFY_SOCKET": "/run/systemd/notify"}
    for key, value in environ.items():
        if value == "<self>":
            value = str(os.getpid())
        elif value == "<other>":
            value = str(os.getpid() + 1)
        env[key] = value
    assert Notifier(env).watchdog_interval == interval
