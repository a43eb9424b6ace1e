"""Lanes (hold_next, the default): a child holds the next job on a second connection per
server while the queue is busy, and the master gives it back to gearmand when the job in
front of it is slow and another child is idle (master/lanes.py, docs/prefetch.md).

The integration tests check what gearmand and the jobs themselves report: every job runs
exactly once, none waits for a slow job while a sibling idles, and a stop runs only the
current job. The unit tests check the scoreboard's lock protocol between child and master.
"""

from __future__ import annotations

import collections
import errno
import io
import json
import os
import signal
import socket
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import HOST, Gearmand, wait_for, write_module
from fakeos import FakeMaster
from wired import Log

from gearvisor.gearman.client import Client
from gearvisor.gearman.protocol import Decoder, Packet, encode
from gearvisor.gearman.worker import ConnState, JobTimer, Lanes, Worker
from gearvisor.job import Job, JobTimeout
from gearvisor.master.lanes import STEAL_AFTER, HeldLanes
from gearvisor.messages import Holding
from gearvisor.policy.child import Child
from gearvisor.shm.lanes import LaneHints
from gearvisor.shm.scoreboard import Scoreboard, Take

# -- the scoreboard's lock: child and master never both win --------------------------------------


@pytest.fixture
def board():
    board = Scoreboard(lanes=True)
    try:
        yield board
    finally:
        board.close()


def test_the_master_closes_a_held_lane_only_while_its_job_runs(board: Scoreboard) -> None:
    closed: list[tuple[int, int]] = []

    def close(fd: int, port: int) -> bool:
        closed.append((fd, port))
        return True

    assert board.take_held(100.0, 0.5, close) is Take.NOTHING  # nothing held
    board.hold([(7, 4242), (11, 4250)], since=10.0)  # its other lane, another server's
    assert board.held() == 10.0
    assert board.take_held(10.4, 0.5, close) is Take.NOTHING  # not slow yet
    assert board.take_held(10.5, 0.5, close) is Take.CLOSED
    assert closed == [(7, 4242), (11, 4250)]
    assert board.held() is None
    assert board.release() == 0b11  # the child learns it: nothing from those runs
    board.hold([(8, 4243)], since=20.0)
    assert board.release() == 0  # ended before the master looked: the lane is kept
    assert board.take_held(100.0, 0.5, close) is Take.NOTHING
    assert closed == [(7, 4242), (11, 4250)]


def test_the_master_never_waits_for_a_child_changing_lanes(board: Scoreboard) -> None:
    board.hold([(7, 4242)], since=10.0)
    assert board.lock is not None
    board.lock.acquire()  # the child, mid-change
    try:
        assert board.take_held(100.0, 0.5, lambda fd, port: True) is Take.BUSY
    finally:
        board.lock.release()
    assert board.held() == 10.0  # still held: nothing was closed


def test_a_close_that_fails_leaves_the_lane_recorded(board: Scoreboard) -> None:
    board.hold([(7, 4242)], since=10.0)
    assert board.take_held(100.0, 0.5, lambda fd, port: False) is Take.REFUSED
    assert board.release() == 0  # not closed: the child keeps it


def test_a_child_forked_after_the_hold_sees_the_master_close(board: Scoreboard) -> None:
    """Across fork, as in a real master: the child records, the parent closes."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child
        try:
            os.close(r)
            board.hold([(5, 1234)], since=1.0)
            os.write(w, b"h")
            # Until the parent has closed it (past the deadline the child writes nothing,
            # and the parent's read below fails the test).
            wait_for(lambda: board.held() is None, timeout=10, interval=0.001,
                     message="the parent closed the held lane")
            os.write(w, b"y" if board.release() == 1 else b"n")
        finally:
            os._exit(0)
    os.close(w)
    try:
        assert os.read(r, 1) == b"h"
        assert board.take_held(2.0, 0.5, lambda fd, port: (fd, port) == (5, 1234)) is Take.CLOSED
        assert os.read(r, 1) == b"y"
    finally:
        os.close(r)
        os.waitpid(pid, 0)


# -- a real master and a real gearmand ----------------------------------------------------------

JOBS = """
import os, time

def f(job):
    started = time.monotonic()
    if job.unique.startswith("slow"):
        time.sleep({slow})
    until = time.perf_counter() + {spin}  # every job's own work
    while time.perf_counter() < until:
        pass
    fd = os.open({log!r}, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    os.write(fd, ("%s %d %.6f %.6f\\n" % (job.unique, os.getpid(), started,
                                         time.monotonic())).encode())
    os.close(fd)
    return b""
"""


def ran(log: Path) -> list[tuple[str, int, float, float]]:
    if not log.exists():
        return []
    out = []
    for line in log.read_text().splitlines():
        u, pid, start, end = line.split()
        out.append((u, int(pid), float(start), float(end)))
    return out


def fleet(gearmand: Gearmand, master: Any, tmp_path: Path, processes: int, slow: float,
          spin: float = 0.0):
    log = tmp_path / "ran.txt"
    write_module(tmp_path, "lanejobs", JOBS.format(log=str(log), slow=slow, spin=spin))
    m = master({"servers": [gearmand.address], "watch_config": False,
                "pools": {"lanes": {"processes": processes, "functions": {"f": "lanejobs:f"},
                                    "backoff": {"initial": 0}}}})
    wait_for(lambda: len(gearmand.workers("lanes")) == processes,
             message=f"{processes} children registered")
    return m, log


def submit(gearmand: Gearmand, uniques: list[str]) -> None:
    with Client(HOST, gearmand.port) as client:
        client.submit_background_many("f", uniques, deadline=time.monotonic() + 30)


def queued(gearmand: Gearmand) -> int | None:
    st = gearmand.status().get("f")
    return None if st is None else st.queued


@pytest.mark.integration
def test_a_job_held_behind_a_slow_one_goes_to_the_idle_child(gearmand, master,
                                                            tmp_path) -> None:
    m, log = fleet(gearmand, master, tmp_path, processes=2, slow=3.0)
    # Whether the slow job's child holds the next one depends on which of its lanes had a
    # GRAB out at that moment: a round in which it held none proves nothing, so up to three.
    for attempt in range(3):
        uniques = ([f"u{attempt}-{i}" for i in range(40)] + [f"slow{attempt}"]
                   + [f"v{attempt}-{i}" for i in range(40)])
        submit(gearmand, uniques)
        want = set(uniques)
        wait_for(lambda want=want: {u for u, *_ in ran(log)} >= want, timeout=20,
                 message="every job of the round ran, the slow one too")
        wait_for(lambda: queued(gearmand) == 0, message="gearmand's queue empty")
        done = [row for row in ran(log) if row[0] in want]
        counts = collections.Counter(u for u, *_ in done)
        assert [u for u, c in counts.items() if c != 1] == []  # each job exactly once
        slow = next(row for row in done if row[0].startswith("slow"))
        late = [(u, round(end - slow[2], 3)) for u, _, _, end in done
                if u != slow[0] and end > slow[2] + 1.0]
        assert late == [], "short jobs waited for the slow one while a child was idle"
        if m.status().get("held_jobs_returned", {}).get("lanes", 0) >= 1:
            break  # the slow child held one, and the master gave it back
    else:
        pytest.fail("in 3 rounds the slow job's child never held the next job")


@pytest.mark.integration
def test_a_stop_runs_only_the_current_job_and_hands_the_held_one_back(gearmand, master,
                                                                      tmp_path) -> None:
    m, log = fleet(gearmand, master, tmp_path, processes=1, slow=1.0)
    after = [f"v{i}" for i in range(20)]
    submit(gearmand, [f"u{i}" for i in range(20)] + ["slow"] + after)
    # The slow job is running once gearmand says so and the short ones before it are done.
    wait_for(lambda: len(ran(log)) >= 20 and (gearmand.status().get("f") or 0)
             and gearmand.status()["f"].running >= 1, timeout=20,
             message="the slow job running")
    m.signal(signal.SIGTERM)  # graceful: finish the current job, then exit
    assert m.wait_exit(timeout=30) == 0
    names = [u for u, *_ in ran(log)]
    assert "slow" in names
    assert [u for u in names if u.startswith("v")] == []  # nothing after the current job
    assert queued(gearmand) == len(after)  # gearmand has all the rest back, held one too
    assert m.events("stopping: handed the jobs this child took but did not start back to "
                    "the job server")


@pytest.mark.integration
def test_a_roll_in_the_middle_of_a_drain_runs_every_job_once_with_lanes(gearmand, master,
                                                                       tmp_path) -> None:
    m, log = fleet(gearmand, master, tmp_path, processes=2, slow=0, spin=0.0002)
    first = {c.pid for c in m.children()}
    uniques = [f"u{i}" for i in range(12000)]
    submit(gearmand, uniques)
    wait_for(lambda: len(ran(log)) >= 500, timeout=30, message="the drain under way")
    out = m.ctl("reload")
    assert out.returncode == 0, out.stderr
    wait_for(lambda: queued(gearmand) == 0 and len(ran(log)) >= len(uniques), timeout=60,
             message="every job ran")
    done = ran(log)
    counts = collections.Counter(u for u, *_ in done)
    assert set(counts) == set(uniques)
    assert [u for u, c in counts.items() if c != 1] == []
    pids = {pid for _, pid, *_ in done}
    assert pids & first and pids - first, "the roll did not happen during the drain"


@pytest.mark.integration
def test_an_idle_fleet_shows_one_connection_per_child_again(gearmand, master,
                                                            tmp_path) -> None:
    """Second lanes open while the queue is busy and close once the child has slept a while,
    so gearmand's `workers` list of an idle fleet is what it was without lanes."""
    m, log = fleet(gearmand, master, tmp_path, processes=2, slow=0)
    submit(gearmand, [f"u{i}" for i in range(3000)])
    wait_for(lambda: len(gearmand.workers("lanes")) > 2, timeout=20,
             message="second lanes opened during the drain")
    wait_for(lambda: queued(gearmand) == 0, timeout=30, message="the drain")
    wait_for(lambda: len(gearmand.workers("lanes")) == 2, timeout=10,
             message="one connection per child once idle")
    assert len({w.client_id for w in gearmand.workers("lanes")}) == 2
    assert len(ran(log)) == 3000


@pytest.mark.integration
def test_job_retries_count_a_given_back_job_once(master, tmp_path) -> None:
    """gearmand --job-retries counts each hand-back as a try: with 2, a job given back once
    still runs."""
    server = Gearmand(args=("--job-retries", "2")).start()
    try:
        test_a_job_held_behind_a_slow_one_goes_to_the_idle_child(server, master, tmp_path)
    finally:
        server.stop()


# -- the lane hints ------------------------------------------------------------------------------


def test_hints_find_a_sibling_of_the_same_pool_never_the_child_itself() -> None:
    hints = LaneHints(16)
    try:
        hints.set_asleep(3, 7)
        assert not hints.others_asleep(7, 3)  # only itself
        assert hints.others_asleep(7, 5)
        assert not hints.others_asleep(8, 5)  # another pool's tag
        hints.set_holding(3, 7)
        hints.set_holding(4, 7)
        assert hints.others_holding(7, 3) and hints.others_holding(7, 4)
        hints.clear(4)
        assert not hints.others_holding(7, 3)
        assert hints.asleep(3) and not hints.asleep(4)
        hints.set_asleep(99, 7)  # out of range: ignored, never an IndexError
        assert not hints.others_asleep(0, 5)  # tag 0 is "none"
    finally:
        hints.close()


def test_the_holding_setter_writes_what_set_holding_would() -> None:
    hints = LaneHints(16)
    try:
        asleep_elsewhere = hints.others_asleep_check(7, 3)
        assert not asleep_elsewhere()
        hints.set_asleep(5, 7)
        assert asleep_elsewhere() and not hints.others_asleep_check(7, 5)()
        hints.set_asleep(5, 0)
        mine = hints.holding_setter(3)
        mine(7)
        assert hints.others_holding(7, 4) and not hints.others_holding(7, 3)
        assert not hints.others_asleep(7, 4)  # the holding byte, not the asleep one
        mine(0)
        assert not hints.others_holding(7, 4)
        hints.holding_setter(99)(7)  # out of range: ignored, as set_holding
        assert not hints.others_holding(7, 4)
    finally:
        hints.close()


def test_the_asleep_and_bell_setters_and_the_holding_check_match_their_methods() -> None:
    hints = LaneHints(16)
    try:
        holding_elsewhere = hints.others_holding_check(7, 3)
        hints.set_holding(3, 7)
        assert not holding_elsewhere()  # only itself
        hints.set_holding(5, 7)
        assert holding_elsewhere() and hints.others_holding(7, 3)
        asleep = hints.asleep_setter(3)
        asleep(7)
        assert hints.asleep(3) and hints.others_asleep(7, 4)
        assert not hints.asleep(4)
        asleep(0)
        assert not hints.asleep(3)
        bell = hints.bell_setter(3)
        bell(2)
        assert hints.bell(3) == 2 and hints.bell(4) == 0
        assert not hints.asleep(3) and hints.others_holding(7, 4)  # its own bytes only
        hints.clear(3)
        assert hints.bell(3) == 0
        hints.asleep_setter(99)(7)  # out of range: ignored, as set_asleep and set_bell
        hints.bell_setter(99)(2)
        assert not hints.others_asleep(7, 4) and hints.bell(99) == 0
    finally:
        hints.close()


# -- the master's side, on a fake OS and a fake clock (tests/fakeos.py) ---------------------------


@pytest.fixture
def pool_of_two(tmp_path: Path, log: io.StringIO):
    path = tmp_path / "gearvisor.yaml"
    path.write_text(yaml.safe_dump({
        "watch_config": False,
        "pools": {"web": {"processes": 2, "functions": {"f": "examples.text:echo"},
                          "watch": False}}}))
    m = FakeMaster(str(path), (HeldLanes(),))
    try:
        m.start_ready()
        yield m
    finally:
        m.close()


def children_of(m: FakeMaster) -> list[Child]:
    return sorted((c for c, _ in m.arbiter.children.values()), key=lambda c: c.slot)


def asleep(m: FakeMaster, child: Child) -> None:
    m.arbiter.lane_hints.set_asleep(child.running_index, m.arbiter.pool_tag("web"))


def say_holding(m: FakeMaster, child: Child) -> None:
    next(f for f in m.system.forked if f.pid == child.pid).say(Holding())
    m.step()


def test_a_held_job_goes_back_once_the_job_in_front_is_slow_and_a_sibling_sleeps(
        pool_of_two: FakeMaster) -> None:
    m = pool_of_two
    idle, busy = children_of(m)
    assert busy.scoreboard is not None
    busy.scoreboard.hold([(9, 40001)], since=m.clock.now)
    asleep(m, idle)
    say_holding(m, idle)  # it fell asleep while a sibling holds: the master looks
    assert m.system.shutdowns == []  # the job in front has not run 2 ms yet
    m.advance(STEAL_AFTER / 2)
    assert m.system.shutdowns == []
    m.advance(STEAL_AFTER / 2 + 1e-6)  # the master's timer: now it is slow
    assert m.system.shutdowns == [(busy.pid, 9, 40001)]
    assert busy.scoreboard.release() == 1  # the child learns: that lane is gone
    assert m.arbiter.status(m.clock.now)["held_jobs_returned"] == {"web": 1}


def test_nothing_goes_back_while_no_sibling_sleeps(pool_of_two: FakeMaster) -> None:
    m = pool_of_two
    _, busy = children_of(m)
    assert busy.scoreboard is not None
    busy.scoreboard.hold([(9, 40001)], since=m.clock.now)
    say_holding(m, busy)
    m.advance(1.0)
    assert m.system.shutdowns == []
    assert busy.scoreboard.release() == 0


def test_a_refused_close_turns_the_pools_lanes_off_and_says_so_once(
        pool_of_two: FakeMaster, log: io.StringIO) -> None:
    m = pool_of_two
    idle, busy = children_of(m)
    assert busy.scoreboard is not None and idle.scoreboard is not None
    m.system.refuse_shutdown = PermissionError(errno.EPERM, "Operation not permitted")
    busy.scoreboard.hold([(9, 40001)], since=m.clock.now - 1.0)
    asleep(m, idle)
    say_holding(m, idle)
    assert busy.scoreboard.lanes_off()
    assert busy.scoreboard.release() == 0  # not closed: its held job runs after this one
    say_holding(m, idle)
    warned = [line for line in map(json.loads, log.getvalue().splitlines())
              if line["event"].startswith("cannot close a child's held lane")]
    assert len(warned) == 1 and "Operation not permitted" in warned[0]["error"]
    # A child started in that pool from now on holds nothing either.
    m.system.forked[0].exit(1)
    for _ in range(60):
        m.advance(1.0)
    assert len(m.system.forked) == 3, "the dead child was not replaced"
    newest = next(c for c, _ in m.arbiter.children.values()
                  if c.pid == m.system.forked[-1].pid)
    assert newest.scoreboard is not None and newest.scoreboard.lanes_off()


# -- the worker runtime when a held lane is closed under it ---------------------------------------


class ClosingLanes(Lanes):
    """Plays the master at its most eager: every held lane is shut down (as pidfd_getfd +
    shutdown would) before the job in front ends."""

    def __init__(self, every: int = 1) -> None:
        self.held: list[int] = []
        self.released_calls = 0
        self.every = every  # close every this many held lanes (1: all)

    def holding(self, lanes: list[tuple[int, int]], now: float) -> None:
        self.held.append([fd for fd, _ in lanes])

    def released(self) -> int:
        self.released_calls += 1
        fds = self.held.pop()
        if self.released_calls % self.every:
            return 0
        for fd in fds:
            try:
                copy = socket.socket(fileno=os.dup(fd))
                with copy:
                    copy.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        return (1 << len(fds)) - 1


def serve_in_a_fork(servers: list[tuple[str, int]], functions: dict, **kw: Any) -> int:
    """A Worker with ClosingLanes run in a forked process; returns its pid (the caller kills
    it). It exits 3 if the runtime raised."""
    pid = os.fork()
    if pid == 0:
        code = 3
        try:
            Worker(servers, functions, "test:lanes:0", Log(), lanes=ClosingLanes(), **kw).run()
            code = 0
        finally:
            os._exit(code)
    return pid


def test_a_lane_closed_in_the_middle_of_a_batch_never_crashes_the_child(gearmand) -> None:
    """Two servers (the same gearmand twice): both lanes of one may be ready in one select()
    batch when the job of the first closes the second; the loop must skip the closed one."""
    def slow(job: Job) -> bytes:
        time.sleep(0.003)
        return job.data

    pid = serve_in_a_fork([(HOST, gearmand.port), (HOST, gearmand.port)], {"f": slow})
    try:
        with Client(HOST, gearmand.port, timeout=30) as c:
            handles = [c.submit("f", f"x{i}".encode()) for i in range(60)]
            c.wait(handles)
            assert all(c.results[h].ok for h in handles)
        assert os.waitpid(pid, os.WNOHANG) == (0, 0), "the child died"
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)


class TimeoutAtTheEnd(JobTimer):
    """The soft timeout fires just as the job returns: stop() is where it raises."""

    def stop(self) -> None:
        raise JobTimeout("the job ran past its timeout")


def test_a_timeout_as_the_job_returns_still_releases_the_held_lane() -> None:
    lanes = ClosingLanes()
    worker = Worker([(HOST, 4730)], {"f": lambda job: b"done"}, "test:lanes:0", Log(),
                    lanes=lanes, timer=TimeoutAtTheEnd(), timeouts={"f": 5.0})
    ours, theirs = socket.socketpair()
    mate_ours, mate_theirs = socket.socketpair()
    try:
        conn = worker.conns[0]
        conn.sock, conn.state = ours, ConnState.GRABBING
        mate = conn.mate
        assert mate is not None
        mate.sock, mate.state, mate.outstanding = mate_ours, ConnState.GRABBING, 1
        mate.lane = (mate_ours.fileno(), 0)  # (as _finish_connect sets it)
        worker._run_job(conn, Packet.JOB_ASSIGN, (b"H:gm:1", b"f", b"x"))
        assert lanes.released_calls == 1  # before: skipped, and the lane stayed "held"
        assert mate.sock is None and mate.state is ConnState.DOWN  # nothing of it is read
    finally:
        for s in (ours, theirs, mate_theirs):
            s.close()
        worker.close()


class CountingLanes(ClosingLanes):
    """ClosingLanes that also writes a byte to `fd` for each hold, so the parent counts."""

    def __init__(self, fd: int) -> None:
        super().__init__(every=2)  # the lane closed is then the first one now and then
        self.fd = fd

    def holding(self, lanes: list[tuple[int, int]], now: float) -> None:
        super().holding(lanes, now)
        os.write(self.fd, b"h")


def test_a_first_lane_closed_under_a_job_is_reopened_and_holds_again(gearmand) -> None:
    """After the master closes a child's first lane, the child must reopen it while its
    second lane keeps draining, and go on holding the next job (before, the one-server fast
    path read only the second lane until the queue ran dry)."""
    with Client(HOST, gearmand.port) as client:
        client.submit_background_many("f", [f"u{i}" for i in range(80)],
                                      deadline=time.monotonic() + 30)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 3
        try:
            os.close(r)
            Worker([(HOST, gearmand.port)], {"f": lambda job: time.sleep(0.002) or b""},
                   "test:lanes:0", Log(), lanes=CountingLanes(w)).run()
            code = 0
        finally:
            os._exit(code)
    os.close(w)
    try:
        wait_for(lambda: queued(gearmand) == 0, timeout=30, message="the queue drained")
        os.set_blocking(r, False)
        holds = len(os.read(r, 4096))
        assert holds >= 20, f"only {holds} of 80 jobs were held behind another"
    finally:
        os.close(r)
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)


def test_a_child_that_cannot_be_reached_now_keeps_its_pools_lanes(
        pool_of_two: FakeMaster, log: io.StringIO) -> None:
    """ESRCH (a child dying, not reaped yet) is no refusal: lanes stay on, nothing logged."""
    m = pool_of_two
    idle, busy = children_of(m)
    assert busy.scoreboard is not None
    m.system.refuse_shutdown = ProcessLookupError(errno.ESRCH, "No such process")
    busy.scoreboard.hold([(9, 40001)], since=m.clock.now - 1.0)
    asleep(m, idle)
    say_holding(m, idle)
    assert not busy.scoreboard.lanes_off()
    assert "cannot close a child's held lane" not in log.getvalue()


@pytest.mark.integration
def test_gearmand_drops_a_job_given_back_job_retries_times() -> None:
    """What README tells users of `gearmand -j N` rests on this: each connection closed with
    the job assigned is a try, and the N-th drops the job (so -j 1 and hold_next clash)."""
    for retries, left_after_one in ((1, 0), (2, 1)):
        server = Gearmand(args=("--job-retries", str(retries))).start()
        try:
            submit(server, ["u"])
            with socket.create_connection((HOST, server.port), timeout=5) as w:
                w.sendall(encode(Packet.CAN_DO, "f") + encode(Packet.GRAB_JOB_UNIQ))
                decoder, got = Decoder(), []
                while not got:
                    got = decoder.feed(w.recv(65536))
                assert got[0].type == Packet.JOB_ASSIGN_UNIQ
            # The connection closed with the job assigned: what a give-back does.
            wait_for(lambda s=server, n=left_after_one: queued(s) == n, timeout=5,
                     message=f"-j {retries}: {left_after_one} job(s) queued after one")
        finally:
            server.stop()
