"""The pool's bell (`wake_one`; shm/bell.py): of a pool's idle children only the one that
holds the token sleeps on the job servers, the others wait on the bell, so gearmand wakes
one child per job. Workers driven by hand over socketpairs (tests/wired.py), sharing a real
eventfd; then real children on a real gearmand."""

from __future__ import annotations

import os
import select
import signal
import socket
from typing import Any

import psutil
import pytest
import yaml
from conftest import HOST, wait_for
from fakeos import FakeMaster
from wired import Log, Server

from gearvisor.gearman.client import Client
from gearvisor.gearman.epoll import READ
from gearvisor.gearman.protocol import RES, Packet, encode
from gearvisor.gearman.worker import FOLLOWING, HOLDING_BELL, LENT, Bell, ConnState, Worker
from gearvisor.master.arbiter import BELL_CHECK, BELL_RECHECK
from gearvisor.shm.bell import Bell as PoolBell

GRAB = (Packet.GRAB_JOB_ALL, ())
PRE_SLEEP = (Packet.PRE_SLEEP, ())
NOOP = encode(Packet.NOOP, magic=RES)
NO_JOB = encode(Packet.NO_JOB, magic=RES)


class ChildBell(Bell):
    """The real eventfd and timerfd, and the standings the worker reported."""

    def __init__(self, bell: PoolBell) -> None:
        self.fd = bell.fd
        self.take = bell.take  # type: ignore[method-assign]
        self.ring = bell.ring  # type: ignore[method-assign]
        self.heard = bell.heard  # type: ignore[method-assign]
        self.states: list[int] = []

    def standing(self, state: int) -> None:
        self.states.append(state)


@pytest.fixture
def bell():
    b = PoolBell()
    yield b
    b.close()


def rung(bell: PoolBell, within: float = 0.0) -> bool:
    """A follower is woken (what followers wait on is readable), now or `within` seconds."""
    return bool(select.select([bell.fd], [], [], within)[0])


def given(bell: PoolBell) -> bool:
    """The token is in the bell, for a follower to take."""
    return bool(select.select([bell.token], [], [], 0)[0])


def job(handle: str, function: str = "echo") -> bytes:
    return encode(Packet.JOB_ASSIGN_UNIQ, handle, function, "", handle.encode(), magic=RES)


def feed(worker: Worker, server: Any, data: bytes) -> None:
    server.sock.sendall(data)
    worker._read(worker.conns[0])


def idle(worker: Worker, server: Any) -> list:
    """gearmand said NO_JOB to the connect's GRAB; the loop's tick decides how to wait."""
    feed(worker, server, NO_JOB)
    assert worker.conns[0].state is ConnState.EMPTY
    worker._tick(worker.clock())
    return server.received()


def pair(wired, bell: PoolBell, **kw: Any):
    """Two workers of one pool: the first holds the token and sleeps, the second follows."""
    a, sa = wired(bell=ChildBell(bell), **kw)
    b, sb = wired(bell=ChildBell(bell))
    assert idle(a, sa) == [PRE_SLEEP] and a.holds
    assert idle(b, sb) == [] and b.following and not b.holds
    return a, sa, b, sb


def test_one_idle_worker_sleeps_on_the_servers_the_other_follows_at_no_cost(wired,
                                                                            bell) -> None:
    a, sa, b, sb = pair(wired, bell)
    assert a.bell.states == [HOLDING_BELL] and b.bell.states == [FOLLOWING]
    assert a.conns[0].state is ConnState.SLEEPING
    assert b.sel.data(bell.fd) is not None  # b's loop watches the bell
    assert b._timeout(b.clock()) is None  # nothing due: a follower sleeps until rung
    b._tick(b.clock())
    assert sb.received() == [] and not rung(bell)


def test_the_sleeper_rings_before_its_job_runs_and_the_follower_takes_over(wired,
                                                                          bell) -> None:
    seen = []

    def run(worker, server, job):
        # rung before the job runs: the token is given, and a follower is woken once the
        # job has run RING_LATER (a job coming now waits no longer than that for this one)
        seen.append((given(bell), worker.holds, worker.bell.states[-1]))
        assert rung(bell, within=5.0)
        # b is woken: it takes the token and sends PRE_SLEEP alone (gearmand answers with
        # a NOOP at once if a job waits, with nothing if none does)
        b._rung()
        return b"ok"

    a, sa, b, sb = pair(wired, bell, on_job=run, function="echo")
    feed(a, sa, NOOP)
    assert sa.received() == [GRAB, PRE_SLEEP]  # the sleeper's GRAB carries its PRE_SLEEP
    feed(a, sa, job("H:1"))
    # (LENT while the job runs: the master's look does not take it for a pool with no
    # sleeper, and a crash is rung for)
    assert seen == [(True, False, LENT)]
    # (FOLLOWING to HOLDING_BELL with no 0 between: the master rings for a dead child
    # that was either)
    assert b.holds and not b.following and b.bell.states == [FOLLOWING, HOLDING_BELL]
    assert a.bell.states[-1] == LENT and not a.holds  # (until it takes a token or follows)
    assert sb.received() == [PRE_SLEEP] and b.conns[0].state is ConnState.SLEEPING
    assert bell.fd not in b.sel
    # a's result went with a GRAB and no PRE_SLEEP (b sleeps for the pool now); its NO_JOB
    # makes a follower of it
    assert sa.received() == [(Packet.WORK_COMPLETE, (b"H:1", b"ok")), GRAB]
    assert idle(a, sa) == [] and a.following and not rung(bell)
    assert a.bell.states[-1] == FOLLOWING and not a.lent


def test_a_worker_alone_takes_its_token_back_and_answers_alone(wired, bell) -> None:
    w, s = wired(bell=ChildBell(bell))
    assert idle(w, s) == [PRE_SLEEP] and w.holds
    for i in range(3):
        feed(w, s, NOOP)
        assert s.received() == [GRAB, PRE_SLEEP]
        feed(w, s, job(f"H:{i}"))
        # nobody took the token it rang: it holds it again, so gearmand has the sleeper
        # it needs, and the result goes alone
        assert s.received() == [(Packet.WORK_COMPLETE, (f"H:{i}".encode(),) * 2)]
        assert w.holds and w.conns[0].state is ConnState.SLEEPING and not given(bell)
    # The timer its ring armed fires (nobody disarms it): a follower woken by it finds no
    # token, and goes on following.
    f, sf = wired(bell=ChildBell(bell))
    assert idle(f, sf) == [] and f.following
    assert rung(bell, within=5.0)
    f._rung()
    assert f.following and not f.holds and sf.received() == [] and not rung(bell)


def test_two_tokens_fold_into_one_at_the_next_take(bell) -> None:
    bell.ring()  # (the master rang while a sibling held the token and gave it back)
    assert bell.take() and not bell.take()


@pytest.mark.parametrize("how", ["stop", "pause", "drop"])
def test_a_sleeper_that_stops_pauses_or_loses_its_server_hands_the_token_on(wired, bell,
                                                                            how) -> None:
    a, sa, b, sb = pair(wired, bell)
    assert not rung(bell)
    if how == "stop":
        a.stop()
        a.run()  # stopping: hands back nothing (no GRAB out), leaves the bell, returns
    elif how == "pause":
        a.pause()
        a._apply_pause()
        assert sa.received() == [(Packet.RESET_ABILITIES, ())]
    else:
        a._drop(a.conns[0], "test")
    assert rung(bell, within=5.0) and not a.holds and a.bell.states[-1] == 0
    b._rung()
    assert b.holds and sb.received() == [PRE_SLEEP]


@pytest.mark.parametrize("how", ["stop", "pause"])
def test_a_follower_that_leaves_passes_on_a_ring_it_may_have_been_woken_for(wired, bell,
                                                                           how) -> None:
    a, sa, b, sb = pair(wired, bell)
    a._give()  # the sleeper took a job: b is woken (EPOLLEXCLUSIVE: b alone)...
    getattr(b, how)()  # ...and is asked to stop or pause before its loop reads the bell
    if how == "stop":
        b.run()
    else:
        b._apply_pause()
    assert not b.following and not b.holds and b.bell.states[-1] == 0
    assert rung(bell, within=5.0) and given(bell)  # still there for another follower
    if how == "pause":
        assert bell.fd not in b.sel


def test_a_follower_woken_for_a_ring_another_took_goes_on_following(wired, bell) -> None:
    a, sa, b, sb = pair(wired, bell)
    b._rung()  # (woken, but a still holds it)
    assert b.following and not b.holds and sb.received() == []


# -- real children, a real gearmand ----------------------------------------------------------


def pool(gearmand, master, processes: int = 4, **settings: Any):
    m = master({"servers": [gearmand.address], "watch_config": False,
                "pools": {"bells": {"processes": processes, "backoff": {"initial": 0},
                                    "functions": {"sleep": "examples.tasks:sleep"},
                                    **settings}}})
    wait_for(lambda: len(gearmand.workers("bells")) == processes,
             message=f"{processes} children registered")
    return m


def standings(m) -> dict[int, str | None]:
    """pid -> "holds" / "follows" / None, of the pool's ready children (status --json)."""
    (p,) = m.status()["pools"]
    return {c["pid"]: c["bell"] for c in p["children"] if c["state"] == "idle"}


def one_holder(m, processes: int) -> int:
    def found():
        s = standings(m)
        holders = [pid for pid, b in s.items() if b == "holds"]
        if len(s) == processes and len(holders) == 1 and \
                sum(b == "follows" for b in s.values()) == processes - 1:
            return holders[0]
        return None
    return wait_for(found, message="one child holds the token, the others follow")


def wake_ups(pids: list[int]) -> int:
    return sum(psutil.Process(p).num_ctx_switches().voluntary for p in pids)


@pytest.mark.integration
@pytest.mark.parametrize("wake_one", [True, False])
def test_gearmand_wakes_one_idle_child_per_job_not_all(gearmand, master, wake_one) -> None:
    """Four idle children, 200 jobs one at a time: with the bell the children wake about
    twice per job in all (the sleeper for the NOOP and the job; a follower only when the
    sleeper's job or the gap after it outlasts RING_LATER); with `wake_one: false` gearmand
    wakes all four for each job."""
    m = pool(gearmand, master, wake_one=wake_one)
    if wake_one:
        one_holder(m, 4)
    else:
        wait_for(lambda: len(standings(m)) == 4, message="four idle children")
        assert set(standings(m).values()) == {None}
    pids = list(standings(m))
    with Client(HOST, gearmand.port, timeout=10.0) as client:
        client.call("sleep", "0")
        before = wake_ups(pids)
        for _ in range(200):
            assert client.call("sleep", "0").data == b"slept 0"
        per_job = (wake_ups(pids) - before) / 200
    if wake_one:
        assert per_job < 5, per_job
        one_holder(m, 4)
    else:
        assert per_job > 6, per_job


@pytest.mark.integration
def test_a_job_that_comes_while_the_sleeper_runs_a_slow_one_runs_at_once(gearmand,
                                                                        master) -> None:
    m = pool(gearmand, master, processes=3)
    holder = one_holder(m, 3)
    with Client(HOST, gearmand.port, timeout=10.0) as first, \
            Client(HOST, gearmand.port, timeout=10.0) as second:
        slow = first.submit("sleep", "6")
        # the sleeper takes it (gearmand woke only it), and rang before it ran it
        wait_for(lambda: m.child_with_title("bells[") and any(
            c["pid"] == holder and c["state"] == "busy"
            for c in m.status()["pools"][0]["children"]), message="the sleeper runs it")
        for i in range(5):
            quick = second.submit("sleep", "0")
            assert second.wait([quick])[quick].data == b"slept 0", i
        assert not first.results[slow].done  # all five ran while the slow one did
        assert first.wait([slow])[slow].data == b"slept 6"


@pytest.mark.integration
def test_a_sleeper_killed_with_the_token_is_rung_for_by_the_master(gearmand, master) -> None:
    m = pool(gearmand, master, processes=3)
    holder = one_holder(m, 3)
    os.kill(holder, signal.SIGKILL)
    # the master reaped it and rang: one of the two followers holds the token now (the
    # replacement starts as a follower); without that ring none would, and no job would
    # wake the pool until a child took one by its own GRAB
    wait_for(lambda: holder not in standings(m), message="the dead sleeper reaped")
    new = one_holder(m, 3)
    assert new != holder
    with Client(HOST, gearmand.port, timeout=10.0) as client:
        for _ in range(20):
            assert client.call("sleep", "0").data == b"slept 0"
    one_holder(m, 3)


@pytest.mark.integration
def test_after_a_roll_the_new_generation_has_its_own_sleeper(gearmand, master) -> None:
    m = pool(gearmand, master, processes=3)
    one_holder(m, 3)
    (before,) = m.status()["pools"]
    assert m.ctl("reload").returncode == 0
    wait_for(lambda: m.status()["pools"][0]["generation"] > before["generation"] and all(
        c["generation"] > before["generation"] for c in m.status()["pools"][0]["children"]),
        timeout=30, message="the roll")
    one_holder(m, 3)
    with Client(HOST, gearmand.port, timeout=10.0) as client:
        for _ in range(20):
            assert client.call("sleep", "0").data == b"slept 0"


# -- the master (a fake OS and clock: tests/fakeos.py) -----------------------------------------


def fake_master(tmp_path, processes: int) -> FakeMaster:
    path = tmp_path / "gearvisor.yaml"
    path.write_text(yaml.safe_dump({
        "watch_config": False,
        "pools": {"web": {"processes": processes, "functions": {"f": "examples.text:echo"},
                          "watch": False, "backoff": {"initial": 5}}}}))
    return FakeMaster(str(path))


@pytest.fixture
def fake_pool(tmp_path):
    m = fake_master(tmp_path, 3)
    try:
        m.start_ready()
        yield m
    finally:
        m.close()


def test_a_pool_of_one_child_has_no_bell(tmp_path) -> None:
    m = fake_master(tmp_path, 1)
    try:
        m.start_ready()
        assert len(m.arbiter.children) == 1
        assert m.arbiter.bells == {}  # nobody to hand over to: no ring and take per job
        assert m.arbiter._bell_timer is None  # (and no safety net looking)
    finally:
        m.close()


def the_bell(m: FakeMaster) -> PoolBell:
    (bell,) = m.arbiter.bells.values()
    return bell


def kids(m: FakeMaster):
    """(the child's record, its fake process), by slot."""
    procs = {f.pid: f for f in m.system.forked}
    return [(c, procs[c.pid]) for c in sorted((c for c, _ in m.arbiter.children.values()),
                                              key=lambda c: c.slot)]


def stand(m: FakeMaster, *states: int) -> None:
    for (child, _), state in zip(kids(m), states, strict=True):
        m.arbiter.lane_hints.set_bell(child.running_index, state)


def test_one_bell_per_generation_made_with_its_token(fake_pool) -> None:
    bell = the_bell(fake_pool)
    assert bell.take() and not bell.take()


@pytest.mark.parametrize("dead, ring", [(HOLDING_BELL, True), (FOLLOWING, True), (LENT, True),
                                        (0, False)])
def test_the_master_rings_for_a_dead_child_that_held_the_token_or_followed(fake_pool, dead,
                                                                         ring) -> None:
    m = fake_pool
    bell = the_bell(m)
    assert bell.take()  # (a child has it)
    stand(m, dead, FOLLOWING, FOLLOWING)
    kids(m)[0][1].die(signal.SIGKILL)
    m.step()
    assert rung(bell, within=5.0 if ring else 0.0) is ring


def test_no_ring_for_a_dead_follower_while_a_sibling_holds_the_token(fake_pool) -> None:
    m = fake_pool
    bell = the_bell(m)
    assert bell.take()
    stand(m, FOLLOWING, HOLDING_BELL, FOLLOWING)
    kids(m)[0][1].die(signal.SIGKILL)
    m.step()
    assert not rung(bell)  # one token, one sleeper: a second would only cost wake-ups


def test_followers_left_without_a_holder_are_rung_for_at_the_second_look(fake_pool) -> None:
    """The master's safety net: a bug that lost the token costs at most BELL_CHECK +
    BELL_RECHECK of deafness, and costs the idle master one wake-up every BELL_CHECK."""
    m = fake_pool
    bell = the_bell(m)
    assert bell.take()
    stand(m, FOLLOWING, FOLLOWING, 0)  # (a bug lost the token: nobody holds it)
    m.advance(BELL_CHECK)
    assert not rung(bell)  # the first look: a hand-over may be under way
    m.advance(BELL_RECHECK)
    assert rung(bell, within=5.0)
    bell.heard()
    assert bell.take()
    stand(m, HOLDING_BELL, FOLLOWING, 0)
    m.advance(BELL_CHECK)
    m.advance(BELL_RECHECK)
    m.advance(BELL_CHECK)
    assert not rung(bell)


def test_a_sleeper_running_a_job_with_its_token_lent_is_not_taken_for_deafness(
        tmp_path, log) -> None:
    """Jobs one at a time keep the sleeper LENT much of the time (its token rung for
    later while each job runs): the safety net must neither ring nor warn for that."""
    m = fake_master(tmp_path, 3)
    try:
        m.start_ready()
        bell = the_bell(m)
        assert bell.take()
        stand(m, LENT, FOLLOWING, FOLLOWING)
        for _ in range(3):
            m.advance(BELL_CHECK)
            m.advance(BELL_RECHECK)
        assert not rung(bell) and not given(bell)
        assert "rang the pool's bell" not in log.getvalue()
        stand(m, 0, FOLLOWING, FOLLOWING)  # (and a pool with no sleeper at all is rung for)
        m.advance(BELL_CHECK)
        m.advance(BELL_RECHECK)
        assert given(bell) and "rang the pool's bell" in log.getvalue()
    finally:
        m.close()


def test_a_generation_bell_is_closed_once_its_last_child_is_gone(fake_pool) -> None:
    m = fake_pool
    bell = the_bell(m)
    m.arbiter.pools["web"].generation += 1  # (as a roll does: no more children of it)
    for _, proc in kids(m):
        proc.die(signal.SIGKILL)
    m.step()
    assert bell.fd == -1 and not m.arbiter.bells


def test_the_bell_of_a_generation_that_died_out_before_a_roll_is_closed(fake_pool) -> None:
    m = fake_pool
    bell = the_bell(m)
    for _, proc in kids(m):
        proc.die(signal.SIGKILL)  # (a crash loop: every slot in backoff)
    m.step()
    assert bell.fd != -1  # the generation may still fork again
    m.arbiter.pools["web"].generation += 1  # a roll
    m.advance(BELL_CHECK)
    assert bell.fd == -1 and ("web", 1) not in m.arbiter.bells


# -- more than one server; a connection that drops under a lone job -----------------------


def two_servers(bell: PoolBell) -> tuple[Worker, list[Server]]:
    """A worker with two servers (socketpairs), a GRAB out on each."""
    w = Worker([("127.0.0.1", 1), ("127.0.0.1", 2)], {"echo": lambda j: j.data}, "t:p:0",
               Log(), bell=ChildBell(bell))
    servers = []
    for c in w.conns:
        c.sock, theirs = socket.socketpair()
        c.state, c.outstanding, c.answered, c.can_do = ConnState.GRABBING, 1, True, True
        w.sel.register(c.sock, READ, c)
        servers.append(Server(theirs))
    return w, servers


def test_a_child_with_a_server_down_takes_no_token_and_sleeps_on_the_rest(bell) -> None:
    """The pool's sleeper must be asleep on every server: one that is not would leave jobs
    on the missing server to nobody, while its siblings follow."""
    assert bell.take()  # another child holds it...
    x, (xa, xb) = two_servers(bell)
    try:
        x._drop(x.conns[1], "B restarted")
        xa.sock.sendall(NO_JOB)
        x._read(x.conns[0])
        bell.ring()  # ...and took a job: the token is free
        x._tick(x.clock())
        assert not x.holds and not x.following and given(bell)  # left for a whole child
        assert xa.received() == [PRE_SLEEP]  # asleep on the server it has, by itself
    finally:
        x.close()
        for s in (xa, xb):
            s.sock.close()


def test_a_lone_job_whose_connection_dropped_while_it_ran_does_not_crash_the_worker(
        wired, bell) -> None:
    def run(worker, server, job):
        server.sock.close()  # gearmand restarted
        job.send_status(1, 2)  # the send fails: the connection is dropped under the job
        return b"done"

    w, s = wired(on_job=run, function="echo", bell=ChildBell(bell))
    idle(w, s)
    feed(w, s, NOOP)
    s.sock.sendall(job("H:1"))
    w._read(w.conns[0])
    assert w.conns[0].state is ConnState.DOWN and not w.conns[0].nap
    assert not w.holds and rung(bell, within=5.0)  # the token went on when the server went


def test_a_timer_os_cannot_make_leaves_a_bell_on_its_count_and_no_fd_behind(
        monkeypatch) -> None:
    """Python 3.13+ makes the timer with os.timerfd_create (simulated here): if it fails
    (EMFILE), the bell is still made, its followers waiting on the count as without a timer
    (as the ctypes path does), and the eventfd made first is not left open."""
    def fail(*_args: Any, **_kw: Any) -> int:
        raise OSError(24, "Too many open files")

    monkeypatch.setattr(os, "timerfd_create", fail, raising=False)
    monkeypatch.setattr(os, "timerfd_settime", fail, raising=False)
    monkeypatch.setattr(os, "TFD_NONBLOCK", os.O_NONBLOCK, raising=False)
    monkeypatch.setattr(os, "TFD_CLOEXEC", os.O_CLOEXEC, raising=False)
    before = set(os.listdir("/proc/self/fd"))
    try:
        b = PoolBell()
    except OSError:
        assert set(os.listdir("/proc/self/fd")) == before, "the eventfd was left open"
        raise
    try:
        assert b.fd == b.token and b.fds == {b.token}
        assert b.take() and not rung(b)
        b.ring(later=True)
        assert rung(b) and b.take()
    finally:
        b.close()
    assert set(os.listdir("/proc/self/fd")) == before
