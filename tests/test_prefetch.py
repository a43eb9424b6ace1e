"""Adaptive prefetch and held-back results in the worker runtime (gearman/worker.py), driven by
hand over a socketpair with an injected clock: how many GRABs are in flight after each kind
of job, when results leave, and that stopping or pausing never drops an assigned job."""

from __future__ import annotations

import collections
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import HOST, wait_for, write_module
from wired import RecordingHooks

from gearvisor.gearman.client import Client
from gearvisor.gearman.protocol import RES, Packet, encode
from gearvisor.gearman.worker import FLUSH_AFTER, PREFETCH_FAST, ConnState, JobTimer, Worker
from gearvisor.job import Job

GRAB = (Packet.GRAB_JOB_ALL, ())


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FlushTimer(JobTimer):
    """A timer that can send held-back results: records the alarms asked for; the test
    "fires" one by calling the callback."""

    def __init__(self) -> None:
        self.armed: list[float] = []
        self.cancelled = 0
        self.callback: Callable[[], None] | None = None
        self.held = False

    def hold(self) -> None:
        self.held = True

    def release(self) -> None:
        self.held = False

    def flush_in(self, seconds: float, callback: Callable[[], None]) -> bool:
        self.armed.append(seconds)
        self.callback = callback
        return True

    def flush_cancel(self) -> None:
        # Held results are taken only inside hold(): a soft timeout raised in between
        # would drop them.
        assert self.held, "held-back results taken outside hold()"
        self.cancelled += 1


def jobs(*specs: tuple[str, str]) -> bytes:
    """JOB_ASSIGN_UNIQ packets as gearmand writes them: (handle, function)."""
    return b"".join(encode(Packet.JOB_ASSIGN_UNIQ, h, f, "", h.encode(), magic=RES)
                    for h, f in specs)


def timed(clock: Clock, seconds: dict[bytes, float], fail: set[bytes] = frozenset()
          ) -> Callable[[Job], bytes]:
    """A job function that takes seconds[data] on the injected clock (default 10 us) and
    fails when its data is in `fail`."""

    def run(job: Job) -> bytes:
        clock.now += seconds.get(job.data, 0.00001)
        if job.data in fail:
            raise RuntimeError("no")
        return job.data

    return run


def make(wired: Any, prefetch: int = 8, timer: JobTimer | None = None, **fn: Any
         ) -> tuple[Worker, Any, Clock]:
    clock = Clock()
    functions = {"f": timed(clock, fn.pop("seconds", {}), fn.pop("fail", set()))}
    worker, server = wired(functions=functions, prefetch=prefetch, clock=clock,
                           timer=timer or FlushTimer(), **fn)
    return worker, server, clock


def feed(worker: Worker, server: Any, data: bytes) -> None:
    """gearmand writes `data`; the worker reads it (all of it: one recv)."""
    server.sock.sendall(data)
    worker._read(worker.conns[0])


def completed(packets: list) -> list[bytes]:
    return [args[0] for ptype, args in packets if ptype == Packet.WORK_COMPLETE]


def grabs(packets: list) -> int:
    return sum(1 for p in packets if p == GRAB)


# ---------------------------------------------------------------------------------------------
# How deep: doubling after short successes, back to one after anything else


def test_short_successes_double_the_grabs_in_flight_up_to_prefetch(wired) -> None:
    worker, server, _ = make(wired, prefetch=8)
    conn = worker.conns[0]
    seen = []
    for i in range(5):
        feed(worker, server, jobs((f"H:{i}", "f")))
        packets = server.received()
        assert completed(packets) == [f"H:{i}".encode()]
        seen.append((grabs(packets), conn.outstanding))
        # The test plays a server that answers one GRAB (an answer to none would be a
        # protocol error) and whose other answers never come.
        conn.outstanding = 1
    # depth 2, 4, 8, 8, 8: with nothing else in flight, that many GRABs go with each result.
    assert seen == [(2, 2), (4, 4), (8, 8), (8, 8), (8, 8)]


def test_in_flight_grabs_are_only_topped_up(wired) -> None:
    worker, server, _ = make(wired, prefetch=4)
    conn = worker.conns[0]
    conn.depth, conn.outstanding = 4, 4
    feed(worker, server, jobs(("H:1", "f")))  # one answered: 3 left, one GRAB tops up
    assert server.received() == [(Packet.WORK_COMPLETE, (b"H:1", b"H:1")), GRAB]
    assert conn.outstanding == 4 and conn.state is ConnState.GRABBING


def test_a_slow_job_drops_prefetch_to_one(wired) -> None:
    worker, server, _ = make(wired, prefetch=8, seconds={b"H:slow": PREFETCH_FAST * 2})
    conn = worker.conns[0]
    conn.depth, conn.outstanding = 8, 8
    feed(worker, server, jobs(("H:slow", "f")))
    assert conn.depth == 1
    # Seven GRABs are still unanswered: no new one until they are.
    assert server.received() == [(Packet.WORK_COMPLETE, (b"H:slow", b"H:slow"))]
    assert conn.outstanding == 7 and conn.state is ConnState.GRABBING


def test_a_failed_job_drops_prefetch_to_one(wired) -> None:
    worker, server, _ = make(wired, prefetch=8, fail={b"H:bad"})
    conn = worker.conns[0]
    conn.depth, conn.outstanding = 8, 1
    feed(worker, server, jobs(("H:bad", "f")))
    packets = server.received()
    assert [p[0] for p in packets] == [Packet.WORK_WARNING, Packet.WORK_FAIL,
                                       Packet.GRAB_JOB_ALL]
    assert conn.depth == 1 and conn.outstanding == 1


def test_no_job_drops_prefetch_and_only_the_last_answer_empties_the_connection(wired) -> None:
    worker, server, _ = make(wired)
    conn = worker.conns[0]
    conn.depth, conn.outstanding = 8, 3
    worker._handle(conn, Packet.NO_JOB, ())
    assert conn.depth == 1 and conn.outstanding == 2 and conn.state is ConnState.GRABBING
    worker._handle(conn, Packet.NO_JOB, ())
    assert conn.state is ConnState.GRABBING
    worker._handle(conn, Packet.NO_JOB, ())
    assert conn.outstanding == 0 and conn.state is ConnState.EMPTY
    assert server.received() == []  # PRE_SLEEP comes from the loop's tick, once all are empty


def test_prefetch_one_keeps_one_grab_in_flight(wired) -> None:
    worker, server, _ = make(wired, prefetch=1)
    conn = worker.conns[0]
    for i in range(4):
        feed(worker, server, jobs((f"H:{i}", "f")))
        assert server.received() == [(Packet.WORK_COMPLETE, (f"H:{i}".encode(),) * 2), GRAB]
        assert conn.outstanding == 1 and conn.depth == 1


def test_a_refused_poison_job_drops_prefetch_to_one(wired) -> None:
    worker, server, _ = make(wired, is_poison=lambda job: True)
    conn = worker.conns[0]
    conn.depth, conn.outstanding = 8, 1
    feed(worker, server, jobs(("H:p", "f")))
    assert server.received() == [(Packet.WORK_FAIL, (b"H:p",)), GRAB]
    assert conn.depth == 1


# ---------------------------------------------------------------------------------------------
# Held-back results


def test_results_of_one_read_leave_together_after_its_last_job(wired) -> None:
    timer = FlushTimer()
    hooks = RecordingHooks()
    sent_before: dict[bytes, list[bytes]] = {}

    def f(worker: Worker, server: Any, job: Job) -> bytes:
        sent_before[job.data] = completed(server.received())
        return job.data

    worker, server = wired(on_job=f, prefetch=8, timer=timer, hooks=hooks)
    conn = worker.conns[0]
    conn.depth, conn.outstanding = 4, 4
    feed(worker, server, jobs(("H:1", "f"), ("H:2", "f"), ("H:3", "f"), ("H:4", "f")))
    assert sent_before == {b"H:1": [], b"H:2": [], b"H:3": [], b"H:4": []}
    packets = server.received()
    assert completed(packets) == [b"H:1", b"H:2", b"H:3", b"H:4"]
    # Each short job doubled the depth (4 -> 8): GRABs topped up to 8 in flight.
    assert grabs(packets) == 8 and conn.outstanding == conn.depth == 8
    assert hooks.finished == [("H:1", True), ("H:2", True), ("H:3", True), ("H:4", True)]
    assert timer.armed == [FLUSH_AFTER]  # one alarm for the read, cancelled when sent
    assert timer.cancelled == 1 and conn.out == []


class Batch:
    """A worker (prefetch 8, depth 4, a FlushTimer) serving f, which calls
    body(worker, server, timer, job) and returns the job's data."""

    def __init__(self, wired, body: Callable[[Worker, Any, FlushTimer, Job], None]) -> None:
        self.timer = FlushTimer()

        def f(worker: Worker, server: Any, job: Job) -> bytes:
            body(worker, server, self.timer, job)
            return job.data

        self.worker, self.server = wired(on_job=f, prefetch=8, timer=self.timer)

    def read(self, *handles: str) -> tuple[Worker, Any]:
        """gearmand answers len(handles) GRABs with these jobs, all in one recv."""
        self.worker.conns[0].depth, self.worker.conns[0].outstanding = 4, len(handles)
        feed(self.worker, self.server, jobs(*((h, "f") for h in handles)))
        return self.worker, self.server


def read_batch(wired, body: Callable[[Worker, Any, FlushTimer, Job], None], *handles: str
               ) -> tuple[Worker, Any]:
    return Batch(wired, body).read(*handles)


def test_held_results_leave_before_the_next_job_runs_when_the_alarm_came_between_jobs(
        wired) -> None:
    seen_by_server: dict[bytes, list[bytes]] = {}

    def body(worker: Worker, server: Any, timer: FlushTimer, job: Job) -> None:
        if job.data == b"H:2":
            worker._in_job = False
            timer.callback()  # the alarm fires in the runtime, between two jobs
            worker._in_job = True
        seen_by_server[job.data] = completed(server.received())

    _, server = read_batch(wired, body, "H:1", "H:2", "H:3")
    # H:1's result was held; the alarm asked for a flush; it left before H:3 ran.
    assert seen_by_server == {b"H:1": [], b"H:2": [], b"H:3": [b"H:1", b"H:2"]}
    assert completed(server.received()) == [b"H:3"]


def test_the_alarm_sends_held_results_while_a_long_job_runs(wired) -> None:
    seen: list[list[bytes]] = []

    def body(worker: Worker, server: Any, timer: FlushTimer, job: Job) -> None:
        if job.data == b"H:3":  # the long one: the alarm fires inside it
            timer.callback()
            seen.append(completed(server.received()))

    worker, server = read_batch(wired, body, "H:1", "H:2", "H:3")
    conn = worker.conns[0]
    assert seen == [[b"H:1", b"H:2"]]  # out while H:3 still ran
    packets = server.received()
    assert completed(packets) == [b"H:3"]
    # Nothing lost or doubled: three results; the GRABs leave with the last one, topping
    # the connection up to the depth (now 8).
    assert grabs(packets) == 8 and conn.outstanding == 8 and conn.out == []


def test_a_job_that_sends_status_flushes_held_results_first(wired) -> None:
    def body(worker: Worker, server: Any, timer: FlushTimer, job: Job) -> None:
        if job.data == b"H:2":
            job.send_status(1, 2)

    _, server = read_batch(wired, body, "H:1", "H:2")
    kinds = [(p, a[0]) for p, a in server.received() if p != Packet.GRAB_JOB_ALL]
    assert kinds == [(Packet.WORK_COMPLETE, b"H:1"), (Packet.WORK_STATUS, b"H:2"),
                     (Packet.WORK_COMPLETE, b"H:2")]


def test_without_a_flush_capable_timer_every_result_leaves_at_once(wired) -> None:
    sent_before: dict[bytes, list[bytes]] = {}

    def f(worker: Worker, server: Any, job: Job) -> bytes:
        sent_before[job.data] = completed(server.received())
        return job.data

    worker, server = wired(on_job=f, prefetch=8, timer=JobTimer())
    conn = worker.conns[0]
    conn.depth, conn.outstanding = 4, 3
    feed(worker, server, jobs(("H:1", "f"), ("H:2", "f"), ("H:3", "f")))
    assert sent_before == {b"H:1": [], b"H:2": [b"H:1"], b"H:3": [b"H:2"]}


def test_a_dropped_connection_forgets_held_results(wired) -> None:
    worker, server, _ = make(wired)
    conn = worker.conns[0]
    conn.out.append(b"held")
    conn.outstanding = 5
    worker._drop(conn, "test")
    # gearmand requeues every job it had assigned on that connection: none is ours now.
    assert conn.out == [] and conn.outstanding == 0 and conn.state is ConnState.DOWN


def test_the_alarm_between_jobs_looks_again_soon(wired) -> None:
    def body(worker: Worker, server: Any, timer: FlushTimer, job: Job) -> None:
        if job.data == b"H:2":
            worker._in_job = False
            timer.callback()
            worker._in_job = True

    batch = Batch(wired, body)
    batch.read("H:1", "H:2", "H:3")
    # H:1 held: armed once; the alarm came between jobs: armed again, in case H:3 runs long.
    assert batch.timer.armed == [FLUSH_AFTER, FLUSH_AFTER]


def test_results_held_before_a_stop_leave_without_grabs(wired) -> None:
    def body(worker: Worker, server: Any, timer: FlushTimer, job: Job) -> None:
        if job.data == b"H:2":
            worker.stop()  # SIGHUP while H:1's result is held back

    worker, server = read_batch(wired, body, "H:1", "H:2")
    packets = server.received()
    assert completed(packets) == [b"H:1", b"H:2"] and grabs(packets) == 0
    assert worker.conns[0].state is ConnState.IDLE and worker.conns[0].outstanding == 0


def test_results_held_before_a_pause_leave_then_reset_without_grabs(wired) -> None:
    def body(worker: Worker, server: Any, timer: FlushTimer, job: Job) -> None:
        if job.data == b"H:2":
            worker.pause()  # quarantine (or the circuit) while H:1's result is held back

    worker, server = read_batch(wired, body, "H:1", "H:2")
    assert server.received() == [(Packet.WORK_COMPLETE, (b"H:1", b"H:1")),
                                 (Packet.WORK_COMPLETE, (b"H:2", b"H:2")),
                                 (Packet.RESET_ABILITIES, ())]


def test_job_code_exiting_does_not_lose_the_results_held_before_it(wired) -> None:
    def body(worker: Worker, server: Any, timer: FlushTimer, job: Job) -> None:
        if job.data == b"H:2":
            raise SystemExit(3)

    batch = Batch(wired, body)
    with pytest.raises(SystemExit):
        batch.read("H:1", "H:2")
    assert completed(batch.server.received()) == [b"H:1"]


# ---------------------------------------------------------------------------------------------
# Stopping and pausing with jobs prefetched: they run, then no more GRABs


def test_stop_runs_the_prefetched_jobs_then_goes_idle(wired) -> None:
    ran: list[bytes] = []

    def f(worker: Worker, server: Any, job: Job) -> bytes:
        ran.append(job.data)
        if job.data == b"H:1":
            worker.stop()  # SIGHUP during the first job
        return job.data

    worker, server = wired(on_job=f, prefetch=8, timer=FlushTimer())
    conn = worker.conns[0]
    conn.depth, conn.outstanding = 4, 4
    feed(worker, server, jobs(("H:1", "f"), ("H:2", "f")))
    packets = server.received()
    assert ran == [b"H:1", b"H:2"] and completed(packets) == [b"H:1", b"H:2"]
    assert grabs(packets) == 0
    assert conn.state is ConnState.GRABBING and conn.outstanding == 2  # two answers to come
    feed(worker, server, jobs(("H:3", "f")) + encode(Packet.NO_JOB, magic=RES))
    assert ran[-1] == b"H:3" and completed(server.received()) == [b"H:3"]
    assert conn.state is ConnState.IDLE and conn.outstanding == 0


def test_pause_waits_for_every_answer_then_resets_abilities(wired) -> None:
    worker, server, _ = make(wired)
    conn = worker.conns[0]
    conn.depth, conn.outstanding = 8, 3
    worker.pause()
    worker._apply_pause()
    assert server.received() == []  # answers pending: RESET would requeue a job we then run
    feed(worker, server, jobs(("H:1", "f"), ("H:2", "f")))
    assert completed(server.received()) == [b"H:1", b"H:2"]  # assigned jobs still run
    assert conn.outstanding == 1 and conn.state is ConnState.GRABBING
    feed(worker, server, encode(Packet.NO_JOB, magic=RES))
    assert server.received() == [(Packet.RESET_ABILITIES, ())]
    assert conn.state is ConnState.IDLE and conn.outstanding == 0


def read_ending_in_an_error_then(wired, action: Callable[[Worker], None]) -> tuple[Worker, Any]:
    """Two jobs and then a non-job frame (gearmand's ERROR) in one read, with a stop or pause
    arriving right after that last frame: the held results leave at the end of the read."""
    batch = Batch(wired, lambda *a: None)
    worker = batch.worker
    handle = worker._handle

    def handle_then_act(conn: Any, ptype: int, args: tuple[bytes, ...]) -> None:
        handle(conn, ptype, args)
        if ptype == Packet.ERROR:
            action(worker)  # the SIGTERM or SIGUSR1 handler runs here

    worker._handle = handle_then_act
    worker.exception_packet = "exception"  # (the JOB_NOT_FOUND it answers is not news)
    error = encode(Packet.ERROR, "JOB_NOT_FOUND", "x", magic=RES)
    worker.conns[0].depth, worker.conns[0].outstanding = 4, 2
    feed(worker, batch.server, jobs(("H:1", "f"), ("H:2", "f")) + error)
    return worker, batch.server


def test_a_stop_after_the_last_job_of_a_read_leaves_the_connection_idle(wired) -> None:
    worker, server = read_ending_in_an_error_then(wired, Worker.stop)
    packets = server.received()
    assert completed(packets) == [b"H:1", b"H:2"] and grabs(packets) == 0
    # run() ends only once no connection is GRABBING: nothing is in flight, so idle.
    assert worker.conns[0].state is ConnState.IDLE


def test_a_pause_after_the_last_job_of_a_read_unregisters_and_resumes(wired) -> None:
    worker, server = read_ending_in_an_error_then(wired, Worker.pause)
    worker._apply_pause()
    assert server.received() == [(Packet.WORK_COMPLETE, (b"H:1", b"H:1")),
                                 (Packet.WORK_COMPLETE, (b"H:2", b"H:2")),
                                 (Packet.RESET_ABILITIES, ())]
    worker.resume()
    worker._apply_pause()
    assert grabs(server.received()) == 1


# ---------------------------------------------------------------------------------------------
# Integration: a real gearmand, real children, a deep queue of short jobs

DRAIN_MODULE = """
import os, time

def f(job):
    until = time.perf_counter() + 0.0002  # a short job (prefetch grows) that takes some time
    while time.perf_counter() < until:
        pass
    fd = os.open({log!r}, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    os.write(fd, ("%s %d\\n" % (job.unique, os.getpid())).encode())
    os.close(fd)
    return b""
"""


def drain_fleet(gearmand, master, tmp_path: Path, n_jobs: int, **pool: Any):
    log = tmp_path / "ran.txt"
    write_module(tmp_path, "drainjobs", DRAIN_MODULE.format(log=str(log)))
    m = master({"servers": [gearmand.address], "watch_config": False,
                "pools": {"drain": {"processes": 2, "functions": {"f": "drainjobs:f"},
                                    "backoff": {"initial": 0}, "prefetch": 8, **pool}}})
    wait_for(lambda: len(gearmand.workers("drain")) == 2, message="2 children registered")
    uniques = [f"u{i}" for i in range(n_jobs)]
    with Client(HOST, gearmand.port) as client:
        client.submit_background_many("f", uniques, deadline=time.monotonic() + 30)
    return m, log, uniques


def ran(log: Path) -> list[tuple[str, int]]:
    if not log.exists():
        return []
    return [(u, int(pid)) for u, pid in (line.split() for line in log.read_text().splitlines())]


def drained(gearmand) -> bool:
    st = gearmand.status().get("f")
    return st is not None and st.queued == 0


@pytest.mark.integration
def test_a_roll_in_the_middle_of_a_drain_runs_every_job_exactly_once(gearmand, master,
                                                                        tmp_path) -> None:
    m, log, uniques = drain_fleet(gearmand, master, tmp_path, 12000)
    first = {c.pid for c in m.children()}
    wait_for(lambda: len(ran(log)) >= 1000, timeout=30, message="the drain under way")
    out = m.ctl("reload")  # every child is replaced; the old ones stop with jobs prefetched
    assert out.returncode == 0, out.stderr
    wait_for(lambda: drained(gearmand), timeout=60, message="gearmand's queue empty")
    done = ran(log)
    counts = collections.Counter(u for u, _ in done)
    assert set(counts) == set(uniques), f"{len(set(uniques) - set(counts))} jobs never ran"
    assert [u for u, c in counts.items() if c != 1] == []
    pids = {pid for _, pid in done}
    assert pids & first and pids - first, "the roll did not happen during the drain"
    assert not m.events("child did not finish in time; killing")


@pytest.mark.integration
def test_a_child_killed_with_jobs_prefetched_loses_none(gearmand, master, tmp_path) -> None:
    m, log, uniques = drain_fleet(gearmand, master, tmp_path, 8000)
    wait_for(lambda: len(ran(log)) >= 1000, timeout=30, message="the drain under way")
    victim = m.children()[0].pid
    os.kill(victim, signal.SIGKILL)
    wait_for(lambda: drained(gearmand), timeout=60, message="gearmand's queue empty")
    wait_for(lambda: len(gearmand.workers("drain")) == 2, message="the replacement registered")
    done = ran(log)
    counts = collections.Counter(u for u, _ in done)
    # gearmand requeued what the dead child held (prefetched, or done with the result still
    # held back): every job ran; only those few may have run twice.
    assert set(counts) == set(uniques), f"{len(set(uniques) - set(counts))} jobs lost"
    twice = [u for u, c in counts.items() if c > 1]
    assert len(twice) <= 8, twice
    assert all(victim in {pid for v, pid in done if v == u} for u in twice)


@pytest.mark.integration
def test_results_held_back_leave_while_a_long_job_runs(gearmand, master, tmp_path) -> None:
    """The child's SIGALRM sends the results of short jobs that arrived in the same read as a
    long one, instead of letting them wait for it."""
    write_module(tmp_path, "mixjobs", """
        import time

        def f(job):
            if job.data == b"long":
                time.sleep(3.0)  # the long job under test (the alarm's handler runs meanwhile)
                return job.data
            until = time.perf_counter() + 0.0003  # short (prefetch grows), but not instant
            while time.perf_counter() < until:
                pass
            return job.data
    """)
    master({"servers": [gearmand.address], "watch_config": False,
            "pools": {"mix": {"processes": 1, "functions": {"f": "mixjobs:f"},
                              "prefetch": 8}}})
    wait_for(lambda: len(gearmand.workers("mix")) == 1, message="the child registered")
    with Client(HOST, gearmand.port, timeout=20) as c:
        short = [c.submit("f", b"short") for _ in range(60)]
        long_one = c.submit("f", b"long")
        started = time.monotonic()
        c.wait(short)  # in queue order, all before the long job: none may wait for it
        took = time.monotonic() - started
        assert all(c.results[h].ok for h in short)
        c.wait([long_one])
        assert c.results[long_one].data == b"long"
    assert took < 2.0, f"short results took {took:.1f}s: held back behind the long job"
