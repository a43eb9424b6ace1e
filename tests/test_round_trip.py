"""Jobs that come one at a time (gearman/worker.py): a GRAB written while the queue is dry
carries the PRE_SLEEP too, so a NO_JOB puts the worker to sleep without another write, and a
job that came that way is answered with its result alone: gearmand has the worker asleep
already (Connection.nap), unless a NOOP behind the job says another waits. A busy queue never
gets a PRE_SLEEP (gearmand answers one with a NOOP while jobs wait). Driven by hand over a
socketpair (tests/wired.py), then against a real gearmand."""

from __future__ import annotations

import socket
from typing import Any

import pytest
from conftest import HOST, wait_for
from wired import RecordingHooks

from gearvisor.gearman.client import Client
from gearvisor.gearman.protocol import RES, Packet, encode
from gearvisor.gearman.worker import Connection, ConnState, Worker

GRAB = (Packet.GRAB_JOB_ALL, ())
PRE_SLEEP = (Packet.PRE_SLEEP, ())


class WaitingHooks(RecordingHooks):
    def __init__(self) -> None:
        super().__init__()
        self.waits = 0

    def waiting(self) -> None:
        self.waits += 1


def job(handle: str) -> bytes:
    return encode(Packet.JOB_ASSIGN_UNIQ, handle, "echo", "", handle.encode(), magic=RES)


def feed(worker: Worker, server: Any, data: bytes, index: int = 0) -> None:
    server.sock.sendall(data)
    worker._read(worker.conns[index])


def asleep(worker: Worker, server: Any) -> None:
    """The connection as the loop leaves it once gearmand said NO_JOB: EMPTY, then PRE_SLEEP
    from the tick."""
    conn = worker.conns[0]
    worker._handle(conn, Packet.NO_JOB, ())
    assert conn.state is ConnState.EMPTY and server.received() == []
    worker._tick(worker.clock())
    assert server.received() == [PRE_SLEEP] and conn.state is ConnState.SLEEPING


def test_a_job_that_came_alone_is_answered_with_its_result_alone(wired) -> None:
    hooks = WaitingHooks()
    worker, server = wired(hooks=hooks)
    conn = worker.conns[0]
    asleep(worker, server)
    assert hooks.waits == 1
    for i in range(3):
        # a job came: wake and grab, and the PRE_SLEEP for when another worker was quicker
        feed(worker, server, encode(Packet.NOOP, magic=RES))
        assert server.received() == [GRAB, PRE_SLEEP]
        feed(worker, server, job(f"H:{i}"))
        # gearmand has us asleep since that PRE_SLEEP: the result goes alone, no GRAB (so no
        # NO_JOB to wake up for), and the host hears the worker waits
        assert server.received() == [(Packet.WORK_COMPLETE, (f"H:{i}".encode(),) * 2)]
        assert conn.state is ConnState.SLEEPING and conn.outstanding == 0
        assert hooks.waits == 2 + i
        worker._tick(worker.clock())
        assert server.received() == []
        assert worker._timeout(worker.clock()) is None  # asleep: no wake-up due


def test_a_job_that_came_with_a_grab_and_pre_sleep_after_a_result_is_answered_alone(wired
                                                                                    ) -> None:
    worker, server = wired()
    conn = worker.conns[0]
    conn.dry, conn.outstanding = True, 0  # the last GRAB was answered NO_JOB
    worker._top_up(conn, b"")
    assert server.received() == [GRAB, PRE_SLEEP]
    feed(worker, server, job("H:0"))
    assert server.received() == [(Packet.WORK_COMPLETE, (b"H:0", b"H:0"))]
    assert conn.state is ConnState.SLEEPING


def test_a_noop_that_came_while_the_job_ran_gets_the_grab_with_the_result(wired) -> None:
    """gearmand queued a NOOP while the job ran (another job came): it waits unread in the
    socket, and the result goes with the GRAB for that job."""
    def run(worker, server, job):
        server.sock.sendall(encode(Packet.NOOP, magic=RES))
        return job.data

    worker, server = wired(on_job=run)
    conn = worker.conns[0]
    asleep(worker, server)
    feed(worker, server, encode(Packet.NOOP, magic=RES))
    assert server.received() == [GRAB, PRE_SLEEP]
    feed(worker, server, encode(Packet.JOB_ASSIGN_UNIQ, "H:0", "f", "", b"x", magic=RES))
    assert server.received() == [(Packet.WORK_COMPLETE, (b"H:0", b"x")), GRAB, PRE_SLEEP]
    assert conn.state is ConnState.GRABBING and conn.outstanding == 1
    worker._read(conn)  # the NOOP: a GRAB is out already, so nothing more
    assert server.received() == [] and conn.outstanding == 1


def test_a_busy_queue_gets_no_pre_sleep(wired) -> None:
    worker, server = wired()
    conn = worker.conns[0]
    asleep(worker, server)
    feed(worker, server, encode(Packet.NOOP, magic=RES))
    assert server.received() == [GRAB, PRE_SLEEP]
    # gearmand answered that PRE_SLEEP with a NOOP at once (jobs wait): the result goes
    # with a GRAB, and a PRE_SLEEP (the queue looked dry)
    feed(worker, server, job("H:0") + encode(Packet.NOOP, magic=RES))
    assert server.received() == [(Packet.WORK_COMPLETE, (b"H:0", b"H:0")), GRAB, PRE_SLEEP]
    # ...but the GRAB brought a job: the queue is busy, so no PRE_SLEEP from now on.
    # The NOOP for that PRE_SLEEP: no GRAB for it.
    feed(worker, server, job("H:1") + encode(Packet.NOOP, magic=RES))
    assert server.received() == [(Packet.WORK_COMPLETE, (b"H:1", b"H:1")), GRAB]
    for i in range(2, 5):
        feed(worker, server, job(f"H:{i}"))
        assert server.received() == [(Packet.WORK_COMPLETE, (f"H:{i}".encode(),) * 2), GRAB]
    assert conn.state is ConnState.GRABBING and conn.outstanding == 1


def test_a_worker_woken_for_a_job_another_took_is_asleep_again_without_a_write(wired
                                                                               ) -> None:
    hooks = WaitingHooks()
    worker, server = wired(hooks=hooks)
    conn = worker.conns[0]
    asleep(worker, server)
    for _ in range(3):
        feed(worker, server, encode(Packet.NOOP, magic=RES))
        assert server.received() == [GRAB, PRE_SLEEP]
        feed(worker, server, encode(Packet.NO_JOB, magic=RES))
        assert conn.state is ConnState.SLEEPING and server.received() == []
        worker._tick(worker.clock())
        assert server.received() == []
    assert hooks.waits == 4 and hooks.started == []


def test_a_pause_that_comes_while_pre_sleep_is_in_flight_unregisters(wired) -> None:
    worker, server = wired()
    conn = worker.conns[0]
    asleep(worker, server)
    feed(worker, server, encode(Packet.NOOP, magic=RES))
    assert server.received() == [GRAB, PRE_SLEEP]
    worker.pause()
    worker._handle(conn, Packet.NO_JOB, ())
    assert server.received() == [(Packet.RESET_ABILITIES, ())]
    assert conn.state is ConnState.IDLE and not conn.can_do


@pytest.mark.parametrize("asked", ["stop", "pause"])
def test_a_stop_or_pause_asked_while_a_lone_job_runs_sends_no_grab(wired, asked) -> None:
    """The result goes alone either way; a pause then unregisters."""
    def run(worker, server, job):
        getattr(worker, asked)()
        return job.data

    worker, server = wired(on_job=run)
    conn = worker.conns[0]
    asleep(worker, server)
    feed(worker, server, encode(Packet.NOOP, magic=RES))
    server.received()
    feed(worker, server, encode(Packet.JOB_ASSIGN_UNIQ, "H:0", "f", "", b"x", magic=RES))
    after = [(Packet.RESET_ABILITIES, ())] if asked == "pause" else []
    assert server.received() == [(Packet.WORK_COMPLETE, (b"H:0", b"x")), *after]
    assert conn.state is ConnState.IDLE and not conn.nap
    assert conn.can_do is (asked == "stop")
    feed(worker, server, encode(Packet.NOOP, magic=RES))  # gearmand had us asleep
    assert server.received() == [] and conn.state is ConnState.IDLE


def test_one_server_asleep_and_another_empty_sleeps_on_both(wired) -> None:
    hooks = WaitingHooks()
    worker, server = wired(hooks=hooks)
    first = worker.conns[0]
    first.state, first.outstanding = ConnState.SLEEPING, 0  # its PRE_SLEEP went with a result
    second = Connection("127.0.0.2", 4730)
    ours, theirs = socket.socketpair()
    second.sock, second.state, second.answered, second.can_do = ours, ConnState.EMPTY, True, True
    second.empty_since = worker.clock()
    worker.conns.append(second)
    worker.all.append(second)  # (no lanes: every connection is a first lane)
    try:
        worker._tick(worker.clock())
        theirs.setblocking(False)
        assert theirs.recv(100) == encode(Packet.PRE_SLEEP)
        assert second.state is ConnState.SLEEPING and hooks.waits == 1
        assert server.received() == []  # the one asleep already gets nothing
        worker._tick(worker.clock())
        assert hooks.waits == 1
        assert worker._timeout(worker.clock()) is None  # asleep on both: no wake-up due
    finally:
        worker.conns.remove(second)
        worker.all.remove(second)
        ours.close()
        theirs.close()


@pytest.mark.integration
def test_jobs_one_at_a_time_with_gaps_all_come_back_from_a_real_gearmand(gearmand, master
                                                                         ) -> None:
    """A worker asleep after every job (its PRE_SLEEP sent with the result) is woken for
    each next one: no wake-up is lost, back to back or after the child fell asleep; and
    it is one connection, registered once, in gearmand's own view."""
    m = master({"servers": [gearmand.address],
                "pools": {"work": {"processes": 1,
                                   "functions": {"reverse": "examples.text:reverse"}}}})
    wait_for(lambda: len(gearmand.workers("work")) == 1, message="child registered")
    with Client(HOST, gearmand.port, timeout=5.0) as client:
        for i in range(300):
            if i % 60 == 59:
                # asleep for sure: the title says idle only once it waited IDLE_TITLE_DELAY
                wait_for(lambda: m.child_with_title("work[0] idle"), message="child asleep")
            r = client.call("reverse", f"job-{i}")
            assert r.ok and r.data == f"job-{i}"[::-1].encode(), (i, r)
    assert len(gearmand.workers("work")) == 1
    wait_for(lambda: m.child_with_title("work[0] idle"), message="the idle title")


@pytest.mark.integration
def test_a_job_that_comes_while_a_lone_job_runs_is_run_next(gearmand, master) -> None:
    """The first job came alone, so its result goes without a GRAB; the second came while it
    ran, and gearmand's NOOP for it (the worker was asleep in its eyes) is what gets it run:
    nothing else would wake the child. gearmand's own status says both ran."""
    m = master({"servers": [gearmand.address],
                "pools": {"work": {"processes": 1,
                                   "functions": {"sleep": "examples.tasks:sleep"}}}})
    wait_for(lambda: len(gearmand.workers("work")) == 1, message="child registered")
    wait_for(lambda: m.child_with_title("work[0] idle"), message="child asleep")
    for _ in range(3):
        with Client(HOST, gearmand.port, timeout=10.0) as first, \
                Client(HOST, gearmand.port, timeout=10.0) as second:
            slow = first.submit("sleep", "0.5")
            wait_for(lambda: m.child_with_title("work[0] busy sleep"), message="first job runs")
            quick = second.submit("sleep", "0")
            assert first.wait([slow])[slow].data == b"slept 0.5"
            assert second.wait([quick])[quick].data == b"slept 0"
        wait_for(lambda: gearmand.status()["sleep"].queued == 0 and
                 gearmand.status()["sleep"].running == 0, message="gearmand: nothing left")
        wait_for(lambda: m.child_with_title("work[0] idle"), message="child asleep again")


class AnsweringHooks(WaitingHooks):
    """Records, when job_answered runs, what the server had received by then."""

    def __init__(self, server: list) -> None:
        super().__init__()
        self.server = server
        self.answered: list[tuple[str, bool, list]] = []
        self.order: list[str] = []

    def job_finished(self, job: Any, ok: bool, seconds: float) -> None:
        super().job_finished(job, ok, seconds)
        self.order.append("finished")

    def job_answered(self, job: Any, ok: bool, seconds: float) -> None:
        self.answered.append((job.handle, ok, self.server[0].received()))
        self.order.append("answered")

    def waiting(self) -> None:
        super().waiting()
        self.order.append("waiting")


def test_the_result_goes_out_before_the_bookkeeping_after_it(wired) -> None:
    # job_finished (the quarantine decision) comes first, then the result is sent, then
    # job_answered (metrics, the journal's record, the title): the client does not wait for
    # those. A lone job's connection is marked asleep only after job_answered, so the
    # host's waiting() (which flushes the journal) sees this job's record.
    box: list = []
    hooks = AnsweringHooks(box)
    worker, server = wired(hooks=hooks)
    box.append(server)
    asleep(worker, server)
    hooks.order.clear()
    feed(worker, server, encode(Packet.NOOP, magic=RES))
    assert server.received() == [GRAB, PRE_SLEEP]
    feed(worker, server, job("H:gm:1"))
    assert hooks.answered == [("H:gm:1", True, [(Packet.WORK_COMPLETE, (b"H:gm:1", b"H:gm:1"))])]
    assert hooks.order == ["finished", "answered", "waiting"]
    # a busy queue: the result goes with the next GRAB, before job_answered too
    conn = worker.conns[0]
    conn.state = ConnState.GRABBING
    conn.outstanding = 1
    feed(worker, server, job("H:gm:2") + encode(Packet.NOOP, magic=RES))
    assert hooks.answered[1][0] == "H:gm:2"
    assert (Packet.WORK_COMPLETE, (b"H:gm:2", b"H:gm:2")) in hooks.answered[1][2]
    assert GRAB in hooks.answered[1][2]


def test_a_failed_job_is_answered_once_and_recorded_after(wired) -> None:
    box: list = []
    hooks = AnsweringHooks(box)

    def boom(job: Any) -> bytes:
        raise ValueError("no")

    worker, server = wired(hooks=hooks, functions={"echo": boom})
    box.append(server)
    feed(worker, server, job("H:gm:3"))
    assert len(hooks.answered) == 1
    handle, ok, received = hooks.answered[0]
    assert handle == "H:gm:3" and not ok
    assert any(ptype in (Packet.WORK_FAIL, Packet.WORK_EXCEPTION) for ptype, _ in received)
