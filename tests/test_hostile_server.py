"""Children facing a broken or hostile job server: its nonsense is its own fault, never the
child's. It may not quarantine the child, make it allocate more than max_job_size, or flood
the log; a good server beside it keeps being served.

The hostile server is a small TCP server in this file (a real gearmand never sends nonsense),
beside a REAL gearmand feeding real jobs, with a real master and forked children. The
worker's handling of each kind of nonsense is also tested byte by byte on a socketpair.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import psutil
import pytest
from conftest import HOST, wait_for
from wired import RecordingHooks, assign

from gearvisor.gearman.client import Client
from gearvisor.gearman.protocol import RES, Decoder, Frame, Packet, encode
from gearvisor.gearman.worker import FAULT_BURST, FAULT_INTERVAL, ConnState, FaultLog

MiB = 1024 * 1024
GRAB = (Packet.GRAB_JOB_ALL, ())
QUARANTINED = "quarantined: failing fast; no more jobs taken"  # the child's own log line

Answer = Callable[[int, Frame], "bytes | Iterable[bytes] | None"]


# ---------------------------------------------------------------------------------------------
# A hostile job server


class FakeJobServer:
    """Accepts worker connections on 127.0.0.1 and answers each packet a worker sends with
    answer(connection number, frame): bytes, an iterable of chunks (a big packet sent
    piece by piece), or None. Records every packet received. Bounded: at most
    `max_connections`, and every thread ends by `lifetime` seconds or stop()."""

    def __init__(self, answer: Answer, max_connections: int = 20, lifetime: float = 90.0,
                 hang_up: bool = False) -> None:
        self.answer = answer
        self.hang_up = hang_up  # close every connection at once, before answering anything
        self.max_connections = max_connections
        self.deadline = time.monotonic() + lifetime
        self.received: list[tuple[int, int, tuple[bytes, ...]]] = []
        self.connections = 0
        self.probes = 0  # the master's probe connections (closed at once, not counted)
        self.closed = 0  # connections the worker closed
        self.sent_big = threading.Event()  # set by answers that send a big packet
        self._stop = threading.Event()
        self._socks: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self.listener = socket.socket()
        self.listener.bind((HOST, 0))
        self.listener.listen(16)
        self.listener.settimeout(0.1)
        self.port = self.listener.getsockname()[1]
        self._spawn(self._accept)

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"

    def packets(self, ptype: int) -> list[tuple[bytes, ...]]:
        """The arguments of every packet of this type received so far."""
        return [args for _, t, args in list(self.received) if t == ptype]

    def _running(self) -> bool:
        return not self._stop.is_set() and time.monotonic() < self.deadline

    def _spawn(self, target: Callable[..., None], *args: Any) -> None:
        t = threading.Thread(target=target, args=args, daemon=True)
        self._threads.append(t)
        t.start()

    def _accept(self) -> None:
        while self._running() and self.connections < self.max_connections:
            try:
                sock, _ = self.listener.accept()
            except (TimeoutError, OSError):
                continue
            if self._is_probe(sock):
                sock.close()  # the master's gearmand probe: not a worker, not counted
                continue
            self.connections += 1
            if self.hang_up:
                sock.close()
                continue
            self._socks.append(sock)
            self._spawn(self._serve, self.connections, sock)

    def _is_probe(self, sock: socket.socket) -> bool:
        """The master probes every job server with admin text (`version` first); a worker
        speaks binary. Peeked, so a worker's first packet stays unread."""
        sock.settimeout(1.0)
        try:
            first = sock.recv(7, socket.MSG_PEEK)
        except OSError:
            return False
        if first.startswith(b"version"):
            self.probes += 1
            return True
        return False

    def _serve(self, number: int, sock: socket.socket) -> None:
        sock.settimeout(0.1)
        decoder = Decoder()
        try:
            while self._running():
                try:
                    data = sock.recv(65536)
                except TimeoutError:
                    continue
                if not data:
                    self.closed += 1
                    return
                for frame in decoder.feed(data):
                    self.received.append((number, frame.type, frame.args))
                    reply = self.answer(number, frame)
                    if reply is None:
                        continue
                    for chunk in [reply] if isinstance(reply, bytes) else reply:
                        sock.sendall(chunk)
        except OSError:  # the worker closed the connection (what it does with nonsense)
            self.closed += 1

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=5)
        self.listener.close()
        for sock in self._socks:
            sock.close()


@pytest.fixture
def fake_server() -> Iterator[Callable[[Answer], FakeJobServer]]:
    started: list[FakeJobServer] = []

    def make(answer: Answer, **kw: Any) -> FakeJobServer:
        server = FakeJobServer(answer, **kw)
        started.append(server)
        return server

    yield make
    for server in started:
        server.stop()


def res(ptype: int, *args: bytes | str) -> bytes:
    return encode(ptype, *args, magic=RES)


# ---------------------------------------------------------------------------------------------
# Helpers for the master


def one_pool(servers: list[str], **pool: Any) -> dict:
    """One child serving reverse (examples.text) on `servers`; quick reconnects."""
    return {"servers": servers, "watch_config": False,
            "pools": {"p": {"processes": 1, "watch": False, "reconnect_max_delay": "200ms",
                            "functions": {"reverse": "examples.text:reverse"}, **pool}}}


def serving(gearmand) -> Callable[[], bool]:
    return lambda: any(w.functions for w in gearmand.workers("p"))


def good_server_serves(gearmand, n: int = 5) -> None:
    """The real gearmand's jobs are still done by the child (bounded: n round trips)."""
    with Client(HOST, gearmand.port, timeout=20) as c:
        for i in range(n):
            r = c.call("reverse", f"job {i}")
            assert r.ok and r.data == f"{i} boj".encode()


def lines_about(m, server: str, levels: tuple[str, ...] = ("warning", "error")) -> list[dict]:
    """Every line the child logged at these levels about this one job server."""
    return [e for e in m.logs() if e.get("server") == server and e.get("level") in levels]


def peak_rss(pid: int) -> int:
    """The process's high-water mark of resident memory (VmHWM), in bytes."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def the_child(m) -> psutil.Process:
    kids = wait_for(m.children, message="the child")
    assert len(kids) == 1
    return kids[0]


def not_quarantined(m, pid: int) -> None:
    assert [c["state"] for c in m.status()["pools"][0]["children"] if c["pid"] == pid] != [
        "quarantined"]
    assert m.events(QUARANTINED) == []
    assert [p.pid for p in m.children()] == [pid]  # never crashed or replaced


# ---------------------------------------------------------------------------------------------
# A real master, a real gearmand and a hostile server


@pytest.mark.integration
def test_jobs_for_a_function_never_registered_do_not_quarantine_the_child(
        gearmand, master, fake_server):
    bad_jobs = 60  # quarantine needs only 5 fast failures (4 of 5 in the window)
    handed = []

    def answer(conn: int, frame: Frame) -> bytes | None:
        if frame.type != Packet.GRAB_JOB_ALL:
            return None
        if len(handed) >= bad_jobs:
            return res(Packet.NO_JOB)
        handed.append(f"H:bad:{len(handed)}")
        return res(Packet.JOB_ASSIGN_ALL, handed[-1], "nosuch", "", "", "x")

    bad = fake_server(answer)
    m = master(one_pool([gearmand.address, bad.address]))
    wait_for(lambda: gearmand.workers("p"), message="connected to the real gearmand")
    pid = the_child(m).pid
    wait_for(lambda: len(bad.packets(Packet.WORK_FAIL)) >= bad_jobs or m.events(QUARANTINED),
             timeout=30, message=f"all {bad_jobs} jobs of the bad server failed")
    assert m.events(QUARANTINED) == []
    failed = bad.packets(Packet.WORK_FAIL)
    # each failed once, by its handle (on either of the child's lanes: in any order)
    assert sorted(args[0].decode() for args in failed) == sorted(handed)
    warning = bad.packets(Packet.WORK_WARNING)[0]
    assert b"does not serve function 'nosuch'" in warning[1]  # the client is told why
    good_server_serves(gearmand)
    not_quarantined(m, pid)
    logged = [e for e in lines_about(m, bad.address)
              if e["event"] == "job for a function this worker does not serve; failed it"]
    assert 1 <= len(logged) <= FAULT_BURST
    assert logged[0]["function"] == "nosuch" and logged[0]["handle"] == "H:bad:0"


@pytest.mark.integration
def test_a_flood_of_protocol_nonsense_writes_a_bounded_log(gearmand, master, fake_server):
    # Per connection: ERRORs, NO_JOBs nobody asked for, then a client's packet (which ends
    # that connection). Each connection registers first (its first GRAB gets a NO_JOB).
    flood = 2000
    nonsense = (res(Packet.ERROR, "BOGUS", "nonsense") * flood + res(Packet.NO_JOB) * flood
                + res(Packet.WORK_COMPLETE, "H:1", "r"))
    floods = []

    def answer(conn: int, frame: Frame) -> bytes | None:
        if frame.type == Packet.PRE_SLEEP:
            return res(Packet.NOOP)  # wake it at once: it grabs again
        if frame.type != Packet.GRAB_JOB_ALL:
            return None
        grabs = sum(1 for c, t, _ in list(bad.received) if c == conn and t == frame.type)
        if grabs == 1:
            return res(Packet.NO_JOB)
        floods.append(conn)
        return nonsense

    bad = fake_server(answer)
    m = master(one_pool([gearmand.address, bad.address]))
    wait_for(serving(gearmand), message="registered on the real gearmand")
    pid = the_child(m).pid
    everything = ("debug", "info", "warning", "error", "critical")
    # Four floods, each closing its connection (a fifth connection follows): 16,000 problems.
    wait_for(lambda: len(floods) >= 4 and (bad.connections >= 5 or len(
        lines_about(m, bad.address, everything)) > FAULT_BURST + 1), timeout=30,
             message="4 floods handled")
    lines = lines_about(m, bad.address, everything)
    assert 1 <= len(lines) <= FAULT_BURST + 1, f"{len(lines)} lines"
    assert bad.connections >= 5
    good_server_serves(gearmand)
    not_quarantined(m, pid)


@pytest.mark.integration
def test_a_server_that_hangs_up_on_every_connection_costs_one_line(gearmand, master,
                                                                   fake_server):
    bad = fake_server(lambda conn, frame: None, hang_up=True, max_connections=100)
    m = master(one_pool([gearmand.address, bad.address]))
    wait_for(serving(gearmand), message="registered on the real gearmand")
    pid = the_child(m).pid
    # Retried with backoff (up to reconnect_max_delay), not every 50 ms: a connection that
    # closes before the server answered anything does not end the outage.
    wait_for(lambda: bad.connections >= 8, timeout=20, message="8 connections")
    lines = lines_about(m, bad.address, ("info", "warning", "error"))
    assert [e["event"] for e in lines] == ["job server unavailable; reconnecting with backoff"]
    # Unreachable in effect, so it does not hold the child's readiness back (nor a roll).
    wait_for(lambda: m.status()["pools"][0]["ready"] == 1, message="the child is ready")
    good_server_serves(gearmand)
    not_quarantined(m, pid)


@pytest.mark.integration
def test_an_oversized_job_is_failed_without_the_child_holding_it(gearmand, master,
                                                                 fake_server):
    size = 96 * MiB  # over the default max_job_size (64M)
    chunk = b"x" * MiB

    def big_job() -> Iterator[bytes]:
        body = b"H:big:1\0resize\0u-big\0\0"
        yield b"\0RES" + (Packet.JOB_ASSIGN_ALL).to_bytes(4, "big") + (
            len(body) + size).to_bytes(4, "big") + body
        for _ in range(size // MiB):
            yield chunk
        bad.sent_big.set()

    def answer(conn: int, frame: Frame) -> Iterable[bytes] | bytes | None:
        if frame.type != Packet.GRAB_JOB_ALL:
            return None
        return big_job() if conn == 1 and not bad.sent_big.is_set() else res(Packet.NO_JOB)

    bad = fake_server(answer)
    m = master(one_pool([gearmand.address, bad.address]))
    child = the_child(m)
    wait_for(serving(gearmand), message="registered on the real gearmand")
    wait_for(lambda: bad.sent_big.is_set() or bad.closed, timeout=30,
             message="the 96 MiB job sent")
    assert not bad.closed, "the child closed the connection instead of failing the job"
    failed = wait_for(lambda: bad.packets(Packet.WORK_FAIL), message="the job failed")
    assert failed == [(b"H:big:1",)]
    warning = bad.packets(Packet.WORK_WARNING)[0]
    assert warning[0] == b"H:big:1" and b"max_job_size" in warning[1]
    assert bad.connections == 1  # failed, not dropped: gearmand would requeue it forever
    logged = wait_for(lambda: m.events("job larger than max_job_size; failed it without "
                                       "reading it"), message="the oversized job logged")
    assert {k: logged[0][k] for k in ("server", "function", "handle", "unique", "size",
                                      "max_job_size")} == {
        "server": bad.address, "function": "resize", "handle": "H:big:1", "unique": "u-big",
        "size": size, "max_job_size": 64 * MiB}
    # The 96 MiB went through a 256 KiB receive buffer: the child never held the job.
    assert peak_rss(child.pid) < 60 * MiB, f"peak RSS {peak_rss(child.pid) / MiB:.0f} MiB"
    good_server_serves(gearmand)
    not_quarantined(m, child.pid)


@pytest.mark.integration
def test_max_job_size_fails_a_real_client_job_and_the_child_goes_on(gearmand, master):
    m = master(one_pool([gearmand.address], max_job_size="1M",
                        functions={"echo": "examples.text:echo"}))
    wait_for(serving(gearmand), message="registered")
    pid = the_child(m).pid
    with Client(HOST, gearmand.port, timeout=20) as c:
        r = c.call("echo", b"y" * (MiB + 1))
        assert not r.ok and r.done
        assert b"over this worker's max_job_size (1048576 bytes)" in r.warnings[0]
        r = c.call("echo", b"y" * MiB)  # at the limit: served
        assert r.ok and len(r.data) == MiB
    event = wait_for(lambda: m.events("job larger than max_job_size; failed it without reading "
                                      "it"), message="logged")[0]
    assert event["size"] == MiB + 1 and event["max_job_size"] == MiB
    assert event["function"] == "echo" and event["server"] == gearmand.address
    assert [p.pid for p in m.children()] == [pid]


@pytest.mark.integration
def test_a_big_job_costs_the_child_about_one_copy_of_its_payload(gearmand, master, tmp_path):
    size = 48 * MiB
    (tmp_path / "sizemod.py").write_text("def size(job):\n    return str(len(job.data))\n")
    m = master(one_pool([gearmand.address], functions={"size": "sizemod:size"}))
    wait_for(lambda: any(w.functions for w in gearmand.workers("p")), message="registered")
    child = the_child(m)
    before = peak_rss(child.pid)
    with Client(HOST, gearmand.port, timeout=60) as c:
        r = c.call("size", b"\0x" * (size // 2))
    assert r.ok and r.data == str(size).encode()
    grown = peak_rss(child.pid) - before
    # The payload is received into a buffer of its size that becomes job.data: one copy.
    # (It was three: the stream buffer, a slice of it and the split argument.)
    assert grown < 1.4 * size, f"peak RSS grew {grown / MiB:.0f} MiB for a 48 MiB job"


# ---------------------------------------------------------------------------------------------
# The worker, byte by byte on a socketpair


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def records(worker, event: str) -> list[tuple[str, dict]]:
    return [(level, kw) for level, msg, kw in worker.log.records if msg == event]


def test_a_job_for_an_unregistered_function_is_refused_not_failed_by_the_child(wired) -> None:
    hooks = RecordingHooks()
    worker, server = wired(hooks=hooks)
    assign(worker, b"nosuch", b"H:gm:5")
    packets = server.received()
    assert [p[0] for p in packets] == [Packet.WORK_WARNING, Packet.WORK_FAIL,
                                       Packet.GRAB_JOB_ALL]
    assert packets[1] == (Packet.WORK_FAIL, (b"H:gm:5",))
    # Refused (like a poison job): never job_finished, so never in the quarantine window.
    assert hooks.refused == ["H:gm:5"] and hooks.started == [] and hooks.finished == []


def test_a_job_nobody_asked_for_closes_the_connection_and_does_not_run(wired) -> None:
    hooks = RecordingHooks()
    clock = Clock()
    worker, server = wired(hooks=hooks, clock=clock, reconnect_max_delay=2.0)
    conn = worker.conns[0]
    assign(worker, b"echo", b"H:gm:1")  # answers our one GRAB: runs
    assert hooks.finished == [("H:gm:1", True)]
    conn.outstanding = 0  # (as if that GRAB had not gone out)
    assign(worker, b"echo", b"H:gm:2")
    assert hooks.started == ["H:gm:1"]  # not run: a paused worker must not be pushed jobs
    assert conn.state is ConnState.DOWN
    assert conn.retry_at >= clock.now + 0.9 * 2.0  # a misbehaving server waits the longest
    [(level, kw)] = records(worker, "unexpected packet from job server; closing that "
                                    "connection")
    assert level == "error" and kw["packet"] == "JOB_ASSIGN_UNIQ"


@pytest.mark.parametrize("packet", [
    res(Packet.WORK_COMPLETE, "H:1", "r"),  # a client's
    res(Packet.JOB_CREATED, "H:1"),
    res(Packet.STATUS_RES, "H:1", "1", "0", "1", "2"),
    res(Packet.ECHO_RES, "hi"),  # we never ECHO_REQ
    res(Packet.CAN_DO, "f"),  # a worker's packet, from the server
    encode(Packet.NOOP),  # REQ magic: a request, not a response
])
def test_what_a_job_server_never_sends_a_worker_closes_that_connection(wired,
                                                                       packet: bytes) -> None:
    worker, server = wired()
    conn = worker.conns[0]
    server.sock.sendall(packet)
    worker._read(conn)
    assert conn.state is ConnState.DOWN and conn.sock is None
    assert conn.faulted
    assert [level for level, msg, _ in worker.log.records
            if "closing that connection" in msg] == ["error"]


def test_a_no_job_nobody_asked_for_is_ignored(wired) -> None:
    worker, server = wired()
    conn = worker.conns[0]
    worker._handle(conn, Packet.NO_JOB, ())  # answers the GRAB
    conn.state = ConnState.SLEEPING  # PRE_SLEEP sent: only a NOOP wakes it
    worker._handle(conn, Packet.NO_JOB, ())
    assert conn.state is ConnState.SLEEPING and conn.sock is not None
    assert server.received() == []
    assert [lv for lv, _ in records(worker, "NO_JOB from job server without a GRAB "
                                            "outstanding; ignored")] == ["warning"]


def test_an_oversized_job_is_failed_by_its_handle_and_logged(wired) -> None:
    hooks = RecordingHooks()
    worker, server = wired(hooks=hooks, max_job_size=1000)
    server.sock.sendall(res(Packet.JOB_ASSIGN_ALL, "H:gm:9", "echo", "u-9", "", b"z" * 5000))
    worker._read(worker.conns[0])
    packets = server.received()
    assert [p[0] for p in packets] == [Packet.WORK_WARNING, Packet.WORK_FAIL,
                                       Packet.GRAB_JOB_ALL]
    assert packets[0][1] == (b"H:gm:9", b"gearvisor: the job's 5000 bytes are over this "
                                        b"worker's max_job_size (1000 bytes)\n")
    assert hooks.refused == ["H:gm:9"] and hooks.started == [] and hooks.finished == []
    [(level, kw)] = records(worker, "job larger than max_job_size; failed it without reading it")
    assert level == "error"
    assert kw == {"server": "127.0.0.1:4730", "function": "echo", "handle": "H:gm:9",
                  "unique": "u-9", "size": 5000, "max_job_size": 1000}
    assert worker.conns[0].state is ConnState.GRABBING  # the connection goes on


def test_a_flood_from_one_server_logs_a_few_lines_then_one_summary(wired) -> None:
    clock = Clock()
    worker, server = wired(clock=clock)
    conn = worker.conns[0]
    server.sock.sendall(res(Packet.ERROR, "BOGUS", "nonsense") * 1000)
    worker._read(conn)
    assert len(records(worker, "job server reported an error")) == FAULT_BURST
    summary = "more problems with this job server; not logged one by one"
    worker._tick(clock.now + FAULT_INTERVAL - 1)
    assert records(worker, summary) == []  # not due yet
    clock.now += FAULT_INTERVAL
    worker._tick(clock.now)
    [(level, kw)] = records(worker, summary)
    assert (level, kw["server"], kw["suppressed"]) == ("warning", conn.label,
                                                       1000 - FAULT_BURST)
    worker._tick(clock.now + 10 * FAULT_INTERVAL)
    assert len(records(worker, summary)) == 1  # nothing more to report
    assert len(worker.log.records) == FAULT_BURST + 1


def test_fault_log_bursts_counts_and_summarises_once_per_interval() -> None:
    log = FaultLog(burst=3, interval=10.0)
    assert [log.allow(100.0 + i * 0.1) for i in range(5)] == [True] * 3 + [False] * 2
    assert log.due_at == 110.0 and log.due(109.9) == 0
    assert log.due(110.0) == 2 and log.due_at == float("inf")
    # The flood goes on: counted, one summary per interval.
    assert [log.allow(111.0 + i) for i in range(4)] == [False] * 4
    assert log.due(120.0) == 4
    # Quiet for a whole interval: the next problem is news again.
    assert log.allow(130.0) is True
    assert log.due(200.0) == 0


def test_the_flood_is_counted_across_reconnects(wired) -> None:
    """The rate limit is per server, not per TCP connection: a server that misbehaves on
    every new connection stays at its few lines."""
    clock = Clock()
    worker, server = wired(clock=clock)
    conn = worker.conns[0]
    for _ in range(20):
        worker._unexpected(conn, Packet.WORK_COMPLETE, "test")  # closes the connection
        assert conn.sock is None and conn.state is ConnState.DOWN
        clock.now += 0.5
        ours, theirs = socket.socketpair()  # reconnected (the fixture closes the last one)
        theirs.close()
        conn.sock, conn.state, conn.outstanding = ours, ConnState.GRABBING, 1
    assert len(records(worker, "unexpected packet from job server; closing that "
                               "connection")) == FAULT_BURST
