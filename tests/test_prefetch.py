"""Adaptive prefetch and held-back results in the worker runtime (gearman/worker.py), driven by
hand over a socketpair with an injected clock: how many GRABs are in flight after each kind
of job, when results leave, and that stopping or pausing never drops an assigned job."""

from __future__ import annotations

import collections
import os
import signal
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import HOST, wait_for, write_module
from wired import RecordingHooks

from gearvisor.gearman.client import Client
from gearvisor.gearman.protocol import RES, Packet, encode
from gearvisor.gearman.worker import PREFETCH_FAST, ConnState, JobTimer, Worker
from gearvisor.job import Job

GRAB = (Packet.GRAB_JOB_ALL, ())


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FlushTimer(JobTimer):
    """A job timer that records the writes it was asked to hold a timeout over."""

    def __init__(self) -> None:
        self.held = False
        self.holds = 0

    def hold(self) -> None:
        self.held = True
        self.holds += 1

    def release(self) -> None:
        self.held = False


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
# Results leave before the next job starts, with the GRAB that tops the connection up


def test_each_result_leaves_before_the_next_job_of_the_read_starts(wired) -> None:
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
    # Four jobs in one read; each one's result was out before the next one ran.
    assert sent_before == {b"H:1": [], b"H:2": [b"H:1"], b"H:3": [b"H:2"], b"H:4": [b"H:3"]}
    assert completed(server.received()) == [b"H:4"]
    # Each short job doubled the depth (4 -> 8) and its write topped the GRABs up to it.
    assert conn.outstanding == conn.depth == 8
    assert hooks.finished == [("H:1", True), ("H:2", True), ("H:3", True), ("H:4", True)]
    # (the results go after each job's timer stopped: no timeout can cut them, no hold)
    assert timer.holds == 0


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


def test_a_job_that_sends_status_writes_it_after_the_results_before_it(wired) -> None:
    def body(worker: Worker, server: Any, timer: FlushTimer, job: Job) -> None:
        if job.data == b"H:2":
            job.send_status(1, 2)

    batch = Batch(wired, body)
    _, server = batch.read("H:1", "H:2")
    # The job's own write went under hold() (its soft timeout waits for the packet)
    assert batch.timer.holds == 1 and not batch.timer.held
    kinds = [(p, a[0]) for p, a in server.received() if p != Packet.GRAB_JOB_ALL]
    assert kinds == [(Packet.WORK_COMPLETE, b"H:1"), (Packet.WORK_STATUS, b"H:2"),
                     (Packet.WORK_COMPLETE, b"H:2")]


def test_a_dropped_connection_forgets_its_grabs(wired) -> None:
    worker, server, _ = make(wired)
    conn = worker.conns[0]
    conn.outstanding = 5
    worker._drop(conn, "test")
    # gearmand requeues every job it had assigned on that connection: none is ours now.
    assert conn.outstanding == 0 and conn.state is ConnState.DOWN


def after(packets: list, handle: bytes) -> list:
    """The packets the worker sent after the result of `handle`."""
    at = next(i for i, (p, a) in enumerate(packets)
              if p == Packet.WORK_COMPLETE and a[0] == handle)
    return packets[at + 1:]


def test_a_stop_during_a_job_sends_its_result_without_grabs(wired) -> None:
    def body(worker: Worker, server: Any, timer: FlushTimer, job: Job) -> None:
        if job.data == b"H:2":
            worker.stop()  # SIGHUP while H:2 runs

    worker, server = read_batch(wired, body, "H:1", "H:2")
    packets = server.received()
    assert completed(packets) == [b"H:1", b"H:2"]
    assert after(packets, b"H:2") == []  # no GRAB once stopping
    assert worker.conns[0].state is ConnState.GRABBING  # run() hands the rest back


def test_a_pause_during_a_job_sends_its_result_and_resets_once_grabs_are_answered(
        wired) -> None:
    def body(worker: Worker, server: Any, timer: FlushTimer, job: Job) -> None:
        if job.data == b"H:2":
            worker.pause()  # quarantine (or the circuit) while H:2 runs

    worker, server = read_batch(wired, body, "H:1", "H:2")
    conn = worker.conns[0]
    packets = server.received()
    assert completed(packets) == [b"H:1", b"H:2"] and after(packets, b"H:2") == []
    worker._apply_pause()
    assert server.received() == []  # GRABs unanswered: a RESET now would requeue a job
    feed(worker, server, encode(Packet.NO_JOB, magic=RES) * conn.outstanding)
    assert server.received() == [(Packet.RESET_ABILITIES, ())]


def test_job_code_exiting_does_not_lose_the_results_held_before_it(wired) -> None:
    def body(worker: Worker, server: Any, timer: FlushTimer, job: Job) -> None:
        if job.data == b"H:2":
            raise SystemExit(3)

    batch = Batch(wired, body)
    with pytest.raises(SystemExit):
        batch.read("H:1", "H:2")
    assert completed(batch.server.received()) == [b"H:1"]


# ---------------------------------------------------------------------------------------------
# Stopping with jobs prefetched: they go back to gearmand unstarted. Pausing: they run, then
# no more GRABs


def test_a_stop_hands_back_the_prefetched_jobs_unstarted(wired) -> None:
    ran: list[bytes] = []

    def f(worker: Worker, server: Any, job: Job) -> bytes:
        ran.append(job.data)
        if job.data == b"H:1":
            worker.stop()  # SIGHUP during the first job
        return job.data

    worker, server = wired(on_job=f, prefetch=8, timer=FlushTimer())
    conn = worker.conns[0]
    conn.depth, conn.outstanding = 4, 4
    server.sock.sendall(jobs(("H:1", "f"), ("H:2", "f"), ("H:3", "f")))
    server.sock.shutdown(socket.SHUT_WR)  # gearmand closes its end once it sees ours close
    worker._read(conn)
    assert ran == [b"H:1"]  # the job running at the stop, and no other
    # Its result, then the connection closed (gearmand requeues H:2, H:3 and whatever the
    # other GRABs brought): nothing after the result, not even a GRAB.
    assert server.received() == [(Packet.WORK_COMPLETE, (b"H:1", b"H:1"))]
    assert server.sock.recv(1) == b""
    assert conn.sock is None and conn.state is ConnState.DOWN and conn.outstanding == 0
    assert any(msg.startswith("stopping: handed the jobs") and kw["held"] == 2
               for _, msg, kw in worker.log.records)


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


def test_a_stop_after_the_last_job_of_a_read_sends_nothing_more(wired) -> None:
    worker, server = read_ending_in_an_error_then(wired, Worker.stop)
    packets = server.received()
    # H:2's write topped the GRABs up (the stop came later); nothing was written after it.
    assert completed(packets) == [b"H:1", b"H:2"] and after(packets, b"H:2") == [GRAB]
    assert server.received() == [] and worker.conns[0].state is ConnState.GRABBING


def test_a_pause_after_the_last_job_of_a_read_unregisters_and_resumes(wired) -> None:
    worker, server = read_ending_in_an_error_then(wired, Worker.pause)
    conn = worker.conns[0]
    worker._apply_pause()
    packets = server.received()
    assert completed(packets) == [b"H:1", b"H:2"] and after(packets, b"H:2") == [GRAB]
    feed(worker, server, encode(Packet.NO_JOB, magic=RES) * conn.outstanding)
    assert server.received() == [(Packet.RESET_ABILITIES, ())]
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


HANDED_BACK = ("stopping: handed the jobs this child took but did not start back to the job "
               "server")

STOP_MODULE = """
import os, signal, time

def f(job):
    fd = os.open({log!r}, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    os.write(fd, ("%s %d\\n" % (job.unique, os.getpid())).encode())
    os.close(fd)
    if job.unique == "stop-me":
        os.kill(os.getpid(), signal.SIGTERM)  # the graceful stop arrives during this job
    until = time.perf_counter() + 0.0002
    while time.perf_counter() < until:
        pass
    return b""
"""


@pytest.mark.integration
def test_a_stopped_child_runs_only_its_current_job_and_hands_back_the_rest(
        gearmand, master, tmp_path) -> None:
    log = tmp_path / "ran.txt"
    write_module(tmp_path, "stopjobs", STOP_MODULE.format(log=str(log)))
    m = master({"servers": [gearmand.address], "watch_config": False,
                "pools": {"drain": {"processes": 2, "functions": {"f": "stopjobs:f"},
                                    "backoff": {"initial": 0}, "prefetch": 8}}})
    wait_for(lambda: len(gearmand.workers("drain")) == 2, message="2 children registered")
    # Deep enough that prefetch is at its full depth when the stop comes.
    uniques = [f"u{i}" for i in range(3000)] + ["stop-me"] + [f"v{i}" for i in range(3000)]
    with Client(HOST, gearmand.port) as client:
        client.submit_background_many("f", uniques, deadline=time.monotonic() + 30)
    wait_for(lambda: drained(gearmand) and len(ran(log)) >= len(uniques), timeout=60,
             message="every job ran")
    done = ran(log)
    counts = collections.Counter(u for u, _ in done)
    assert set(counts) == set(uniques)
    assert [u for u, c in counts.items() if c != 1] == []  # exactly once, none lost
    at = next(i for i, (u, _) in enumerate(done) if u == "stop-me")
    stopped = done[at][1]
    assert [u for u, pid in done[at + 1:] if pid == stopped] == [], \
        "the stopped child started jobs after its current one"
    wait_for(lambda: m.events(HANDED_BACK), message="the hand-back logged")


INTERRUPT_MODULE = """
import signal, time

def f(job):
    if job.data != b"sleeper":
        until = time.perf_counter() + 0.0002  # short: prefetch grows
        while time.perf_counter() < until:
            pass
        return b"short"
    # Any signal sent to the job while it sleeps stays pending here, where we can see it.
    signal.pthread_sigmask(signal.SIG_BLOCK, {{signal.SIGALRM}})
    try:
        for _ in range(20):
            time.sleep(0.001)
        return b"alarm" if signal.SIGALRM in signal.sigpending() else b"clean"
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {{signal.SIGALRM}})
"""


@pytest.mark.integration
def test_no_signal_interrupts_a_job_while_prefetch_is_on(gearmand, master, tmp_path) -> None:
    write_module(tmp_path, "sleepjobs", INTERRUPT_MODULE.format())
    master({"servers": [gearmand.address], "watch_config": False,
            "pools": {"nap": {"processes": 1, "functions": {"f": "sleepjobs:f"},
                              "prefetch": 8}}})
    wait_for(lambda: len(gearmand.workers("nap")) == 1, message="the child registered")
    with Client(HOST, gearmand.port, timeout=30) as c:
        handles = []
        for _ in range(8):  # sleepers in the middle of batches of short jobs
            handles += [c.submit("f", b"short") for _ in range(100)]
            handles.append(c.submit("f", b"sleeper"))
        c.wait(handles)
        answers = collections.Counter(c.results[h].data for h in handles)
    assert answers == {b"short": 800, b"clean": 8}, answers
