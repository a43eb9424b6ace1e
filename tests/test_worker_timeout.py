"""Worker._timeout: how long the loop may sleep (pure: a fake clock, no sockets). An idle
worker, asleep on every server, has no limit at all; whatever is due bounds it; nothing
that cannot happen (a reconnect while stopping) makes it spin."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from wired import Log

from gearvisor.gearman.worker import REPOLL_EMPTY, ConnState, Lanes, Worker


class Clock:
    def __init__(self) -> None:
        self.now = 50.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def worker() -> Iterator[Worker]:
    clock = Clock()
    w = Worker([("127.0.0.1", 1), ("127.0.0.1", 2)], {"f": lambda job: b""}, "t:p:0", Log(),
               clock=clock)
    for conn in w.conns:
        conn.state = ConnState.SLEEPING
    try:
        yield w
    finally:
        w.close()


def test_asleep_on_every_server_the_loop_sleeps_without_a_limit(worker) -> None:
    assert worker._timeout(worker.clock()) is None  # (the old loop woke every 1.0 s)


def test_paused_or_idle_connections_need_no_wake_up_either(worker) -> None:
    worker.conns[0].state = ConnState.IDLE
    worker.paused = True
    assert worker._timeout(worker.clock()) is None


def test_a_reconnect_a_connect_deadline_and_a_repoll_are_due(worker) -> None:
    now = worker.clock()
    a, b = worker.conns
    a.state, a.retry_at = ConnState.DOWN, now + 0.3
    assert worker._timeout(now) == pytest.approx(0.3)
    a.state, a.deadline = ConnState.CONNECTING, now + 4.0
    assert worker._timeout(now) == pytest.approx(4.0)
    a.state, a.empty_since = ConnState.EMPTY, now - 0.1
    assert worker._timeout(now) == pytest.approx(REPOLL_EMPTY - 0.1)


def test_a_fault_summary_and_a_host_check_are_due(worker) -> None:
    now = worker.clock()
    worker._summary_due = now + 7.0
    assert worker._timeout(now) == pytest.approx(7.0)
    later = [now + 2.0]
    worker.every_tick(lambda: None, due=lambda: later[0])
    assert worker._timeout(now) == pytest.approx(2.0)
    later[0] = now - 1.0  # overdue: at once, never negative
    assert worker._timeout(now) == 0.0


def test_stopping_a_down_server_is_not_due_no_spin(worker) -> None:
    # Stopping, one GRAB still unanswered on one server, the other down with its retry time
    # passed: nothing reconnects while stopping, so the loop must not wake for it (it would
    # spin at timeout 0 until the answer came).
    now = worker.clock()
    a, b = worker.conns
    a.state, a.retry_at = ConnState.DOWN, now - 1.0
    b.state = ConnState.GRABBING
    worker.stopping = True
    assert worker._timeout(now) is None
    a.state, a.empty_since = ConnState.EMPTY, now - 5.0  # (no re-poll while stopping)
    assert worker._timeout(now) is None


def test_settled_only_the_timers_bound_the_sleep(worker) -> None:
    # The loop's pass while asleep on its only server (_settled): the connections are not
    # looked at, every timer still is.
    now = worker.clock()
    a, b = worker.conns
    a.state, a.retry_at = ConnState.DOWN, now + 0.3
    assert worker._timeout(now, True) is None
    worker._close_lanes_at = now + 0.5
    assert worker._timeout(now, True) == pytest.approx(0.5)
    worker._summary_due = now + 0.2
    assert worker._timeout(now, True) == pytest.approx(0.2)
    worker.every_tick(lambda: None, due=lambda: now + 0.1)
    assert worker._timeout(now, True) == pytest.approx(0.1)


def test_settled_means_taking_jobs_with_the_second_lane_at_rest() -> None:
    w = Worker([("127.0.0.1", 1)], {"f": lambda job: b""}, "t:p:0", Log(), clock=Clock(),
               lanes=Lanes())
    try:
        first = w.conns[0]
        mate = first.mate
        assert mate is not None and mate.second
        assert w._settled(None)
        for state, settled in ((ConnState.IDLE, True), (ConnState.DOWN, True),
                               (ConnState.GRABBING, False), (ConnState.CONNECTING, False)):
            mate.state = state
            assert w._settled(mate) is settled, state
        mate.state = ConnState.IDLE
        w.pause()  # wanted, not applied yet: _apply_pause has work
        assert not w._settled(mate)
        w.paused = True
        assert not w._settled(mate)
        w.resume()
        assert not w._settled(mate)  # (paused, resume wanted)
        w.paused = False
        assert w._settled(mate)
    finally:
        w.close()
