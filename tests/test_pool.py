"""pool.Pool decisions (backoff, exits, rolls with surge, scale, removal) and process.Child
states, without a single process: children are records with fake pids and time is a float."""

from __future__ import annotations

import dataclasses
import os
import signal
from pathlib import Path

import pytest
from fleet import Fleet, next_pid

from gearvisor.config import BackoffConfig, KeepaliveConfig, PoolConfig, Server, parse
from gearvisor.policy.child import (
    EXIT_BOOT_ERROR,
    EXIT_CRASH,
    Child,
    ChildState,
    TransitionError,
    describe_status,
)
from gearvisor.policy.pool import ExitDecision, ExitKind, Pool, Retire, Slot, Spawn, surge_count

BOOT_ERROR = "function resize: cannot import module 'examples.images'"


def pool_config(processes: int = 2, *, initial: float = 1.0, maximum: float = 30.0,
                reset_after: float = 10.0, max_surge: int | str = "25%") -> PoolConfig:
    return PoolConfig(
        name="images",
        processes=processes,
        functions={"resize": "examples.images:resize"},
        servers=(Server("127.0.0.1", 4730),),
        graceful_timeout=30.0,
        connect_timeout=5.0,
        reconnect_max_delay=2.0,
        # No jitter: delays are exact, and Backoff never calls random.
        backoff=BackoffConfig(initial=initial, max=maximum, multiplier=2.0, jitter=0.0,
                              reset_after=reset_after),
        keepalive=KeepaliveConfig(idle=30, interval=10, count=3),
        env={},
        cwd="/",
        user=None,
        group=None,
        rlimit_nofile=None,
        client_id_prefix="test",
        exception_packet="warning",
        log_level="info",
        log_format="console",
        max_surge=max_surge,
    )


def start(pool: Pool, slot: Slot, now: float, *, successor: bool = False) -> Child:
    """Place a new child of the pool's current generation in `slot`, as the arbiter does."""
    child = Child(pool=pool.name, slot=slot.index, generation=pool.generation, started_at=now,
                  pid=next_pid())
    pool.placed(Spawn(slot, successor=successor), child)
    return child


def started_pool(processes: int, **kw) -> tuple[Pool, Fleet]:
    """A pool whose every slot has a ready child of generation 1."""
    pool = Pool(pool_config(processes, **kw))
    fleet = Fleet(pool)
    fleet.step()
    fleet.ready_all()
    assert fleet.capacity() == processes
    assert pool.ready
    return pool, fleet


def spawns(actions: list) -> list[Spawn]:
    return [a for a in actions if isinstance(a, Spawn)]


def retires(actions: list) -> list[Retire]:
    return [a for a in actions if isinstance(a, Retire)]


def due(pool: Pool, now: float) -> list[Slot]:
    return [a.slot for a in spawns(pool.plan(now)) if not a.successor]


def assert_no_child_retired_twice(fleet: Fleet) -> None:
    ids = [id(c) for c in fleet.retired_log]
    assert len(ids) == len(set(ids))


# ---------------------------------------------------------------------------------------------
# Exit decisions


@pytest.mark.parametrize("code", [None, EXIT_CRASH, EXIT_BOOT_ERROR, 0])
def test_retired_child_exit_is_never_a_failure(code: int | None) -> None:
    pool, fleet = started_pool(2)
    slot = pool.slots[0]
    child = slot.child
    fleet.now = 100.0
    fleet.retire(child)
    assert child in pool.retired and slot.child is None
    # Killed by SIGKILL after the graceful timeout, or exited 1 or 3: requested either way.
    d = fleet.exit(child, code)
    assert d == ExitDecision(ExitKind.STOPPED, None, False, 0)
    assert slot.backoff.failures == 0
    assert slot.last_reason is None
    assert pool.retired == []
    assert child not in pool.children()


def test_fleet_stop_exit_is_never_a_failure() -> None:
    pool, fleet = started_pool(2)
    slot = pool.slots[1]
    child = slot.child
    child.transition(ChildState.DRAINING)
    child.stop_requested_at = 50.0  # what the arbiter does on SIGTERM, without retiring()
    d = pool.child_exited(child, EXIT_CRASH, 50.5, stopping=True)
    assert d.kind is ExitKind.STOPPED
    assert d.restart_in is None
    assert d.log_reason is False
    assert slot.child is None
    assert slot.backoff.failures == 0
    assert pool.retired == []


def test_stop_of_a_starting_successor_is_not_a_failed_roll() -> None:
    pool, fleet = started_pool(2)
    pool.roll()
    fleet.step()
    (successor,) = fleet.successors()
    successor.transition(ChildState.DRAINING)
    successor.stop_requested_at = 3.0  # a fleet stop reaches it before it is ready
    d = pool.child_exited(successor, EXIT_CRASH, 3.5, stopping=True)
    assert d.kind is ExitKind.STOPPED
    assert pool.halted is None
    assert fleet.successors() == []


def test_requested_stop_keeps_an_existing_streak_unchanged() -> None:
    pool = Pool(pool_config())
    fleet = Fleet(pool)
    slot = pool.slots[0]
    fleet.exit(start(pool, slot, 10.0), EXIT_CRASH)
    fleet.exit(start(pool, slot, 20.0), EXIT_CRASH)
    assert slot.backoff.failures == 2
    child = start(pool, slot, 30.0)
    fleet.retire(child)
    d = fleet.exit(child, None)
    assert d.kind is ExitKind.STOPPED
    assert slot.backoff.failures == 2


def test_crash_schedules_restart_after_backoff() -> None:
    pool = Pool(pool_config(initial=1.0))
    slot = pool.slots[0]
    d = pool.child_exited(start(pool, slot, 100.0), EXIT_CRASH, 100.5, stopping=False)
    assert d.kind is ExitKind.CRASHED
    assert d.restart_in == 1.0
    assert d.streak == 1
    assert slot.restart_at == 101.5
    assert slot.child is None
    d = pool.child_exited(start(pool, slot, 101.5), EXIT_CRASH, 102.0, stopping=False)
    assert d.restart_in == 2.0
    assert d.streak == 2
    assert slot.restart_at == 104.0


def test_slot_counts_restarts_of_crashes_not_of_requested_stops() -> None:
    """`restarts` (status, `gearvisor top`) counts the slot's children that died unasked;
    a streak reset by uptime does not reset it, and a retired child's exit is no restart."""
    pool, fleet = started_pool(2, reset_after=10.0)
    slot = pool.slots[0]
    fleet.now = 100.0
    fleet.exit(slot.child, EXIT_CRASH)
    assert slot.restarts == 1
    pool.child_exited(start(pool, slot, 200.0), EXIT_BOOT_ERROR, 300.0, stopping=False)
    assert slot.restarts == 2 and slot.backoff.failures == 1  # the streak started again
    child = start(pool, slot, 400.0)
    fleet.now = 500.0
    fleet.retire(child)
    fleet.exit(child, EXIT_CRASH)
    assert slot.restarts == 2
    assert pool.slots[1].restarts == 0


def test_backoff_is_capped_at_max() -> None:
    pool = Pool(pool_config(initial=1.0, maximum=5.0))
    slot = pool.slots[0]
    delays = []
    t = 0.0
    for _ in range(6):
        d = pool.child_exited(start(pool, slot, t), EXIT_CRASH, t + 0.1, stopping=False)
        delays.append(d.restart_in)
        t = slot.restart_at
    assert delays == [1.0, 2.0, 4.0, 5.0, 5.0, 5.0]


def test_killed_by_signal_is_a_crash() -> None:
    pool = Pool(pool_config())
    slot = pool.slots[0]
    d = pool.child_exited(start(pool, slot, 0.0), None, 0.1, stopping=False)
    assert d.kind is ExitKind.CRASHED
    assert slot.last_reason == "crashed"


def test_boot_error_vs_crash() -> None:
    pool = Pool(pool_config())
    slot = pool.slots[0]
    child = start(pool, slot, 0.0)
    child.boot_error = BOOT_ERROR
    d = pool.child_exited(child, EXIT_BOOT_ERROR, 0.1, stopping=False)
    assert d.kind is ExitKind.BOOT_ERROR
    assert d.restart_in == 1.0
    assert slot.last_reason == f"boot_error: {BOOT_ERROR}"
    other = pool.slots[1]
    d = pool.child_exited(start(pool, other, 0.0), EXIT_CRASH, 0.1, stopping=False)
    assert d.kind is ExitKind.CRASHED
    assert other.last_reason == "crashed"


def test_crash_while_stopping_does_not_restart_but_counts() -> None:
    pool = Pool(pool_config())
    slot = pool.slots[0]
    d = pool.child_exited(start(pool, slot, 0.0), EXIT_CRASH, 0.1, stopping=True)
    assert d.kind is ExitKind.CRASHED
    assert d.restart_in is None
    assert d.streak == 1
    assert slot.child is None


def test_log_reason_only_on_first_failure_of_a_streak() -> None:
    pool = Pool(pool_config(initial=1.0, reset_after=10.0))
    slot = pool.slots[0]
    logged = []
    t = 0.0
    for _ in range(4):
        d = pool.child_exited(start(pool, slot, t), EXIT_CRASH, t + 0.1, stopping=False)
        logged.append(d.log_reason)
        t = slot.restart_at
    assert logged == [True, False, False, False]
    # A child that stayed up past reset_after starts a new streak: logged again.
    d = pool.child_exited(start(pool, slot, t), EXIT_CRASH, t + 60.0, stopping=False)
    assert d.streak == 1
    assert d.restart_in == 1.0
    assert d.log_reason is True


def test_log_reason_again_when_the_reason_changes() -> None:
    pool = Pool(pool_config())
    slot = pool.slots[0]
    first = pool.child_exited(start(pool, slot, 0.0), EXIT_CRASH, 0.1, False)
    same = pool.child_exited(start(pool, slot, 2.0), EXIT_CRASH, 2.1, False)
    booting = start(pool, slot, 5.0)
    booting.boot_error = "function resize: no attribute 'resize'"
    changed = pool.child_exited(booting, EXIT_BOOT_ERROR, 5.1, False)
    again = start(pool, slot, 10.0)
    again.boot_error = "function resize: no attribute 'resize'"
    same_boot = pool.child_exited(again, EXIT_BOOT_ERROR, 10.1, False)
    assert [first.log_reason, same.log_reason, changed.log_reason, same_boot.log_reason] == [
        True, False, True, False]
    assert same_boot.streak == 4


def test_child_ready_reports_streak_but_does_not_reset_backoff() -> None:
    pool = Pool(pool_config())
    fleet = Fleet(pool)
    slot = pool.slots[0]
    fleet.exit(start(pool, slot, 0.0), EXIT_CRASH)
    child = start(pool, slot, 2.0)
    child.transition(ChildState.READY)
    assert pool.child_ready(child) == (1, None)
    assert slot.last_reason is None
    assert slot.backoff.failures == 1
    assert slot.child is child
    # The reason is logged again after a ready child: last_reason was cleared.
    d = pool.child_exited(child, EXIT_CRASH, 2.5, stopping=False)
    assert d.streak == 2
    assert d.log_reason is True


def test_child_ready_of_an_unknown_child_changes_nothing() -> None:
    pool, _ = started_pool(2)
    before = [s.child for s in pool.slots]
    stranger = Child(pool="images", slot=0, generation=1, started_at=0.0, pid=next_pid())
    assert pool.child_ready(stranger) == (0, None)
    assert [s.child for s in pool.slots] == before


# ---------------------------------------------------------------------------------------------
# Scheduling


def test_new_pool_plans_a_child_for_every_slot() -> None:
    pool = Pool(pool_config(processes=3))
    assert [s.index for s in pool.slots] == [0, 1, 2]
    actions = pool.plan(0.0)
    assert [(type(a), a.slot.index, a.successor) for a in actions] == [
        (Spawn, 0, False), (Spawn, 1, False), (Spawn, 2, False)]
    assert pool.next_due() == 0.0
    assert pool.children() == []
    assert pool.backing_off == []
    assert not pool.ready
    assert not pool.settled()


def test_plan_and_next_due_follow_backoff() -> None:
    pool = Pool(pool_config(processes=3, initial=1.0))
    s0, s1, s2 = pool.slots
    c0 = start(pool, s0, 10.0)
    c1 = start(pool, s1, 10.0)
    c2 = start(pool, s2, 10.0)
    pool.child_exited(c0, EXIT_CRASH, 10.2, stopping=False)
    assert s0.restart_at == pytest.approx(11.2)
    assert due(pool, 11.1) == []
    assert due(pool, 11.2) == [s0]
    assert pool.next_due() == pytest.approx(11.2)
    assert pool.backing_off == [s0]
    assert pool.children() == [c1, c2]

    pool.child_exited(c1, EXIT_CRASH, 10.5, stopping=False)
    assert s1.restart_at == pytest.approx(11.5)
    assert pool.next_due() == pytest.approx(11.2)
    assert due(pool, 11.3) == [s0]
    assert due(pool, 12.0) == [s0, s1]
    assert pool.backing_off == [s0, s1]


def test_next_due_none_when_every_slot_is_filled() -> None:
    pool, _ = started_pool(2)
    assert pool.next_due() is None
    assert pool.plan(1e9) == []
    assert pool.progress() == (True, None)


def test_reconfigure_keeps_the_streak() -> None:
    pool = Pool(pool_config(initial=1.0))
    slot = pool.slots[0]
    pool.child_exited(start(pool, slot, 0.0), EXIT_CRASH, 0.1, stopping=False)
    slot.reconfigure(pool_config(initial=5.0))
    assert slot.backoff.failures == 1
    assert slot.backoff.initial == 5.0
    d = pool.child_exited(start(pool, slot, 1.0), EXIT_CRASH, 1.1, stopping=False)
    assert d.restart_in == 10.0


def test_roll_retries_a_backing_off_slot_at_once() -> None:
    pool = Pool(pool_config(processes=1, initial=8.0))
    slot = pool.slots[0]
    pool.child_exited(start(pool, slot, 0.0), EXIT_CRASH, 0.1, stopping=False)
    assert due(pool, 1.0) == []
    assert pool.roll() == []
    assert due(pool, 1.0) == [slot]
    assert slot.backoff.failures == 1  # a reload is not proof the crash loop is over


# ---------------------------------------------------------------------------------------------
# settled()


def test_settled_when_each_slot_is_ready_or_has_failed() -> None:
    pool = Pool(pool_config(processes=3))
    fleet = Fleet(pool)
    assert not pool.settled()
    fleet.step()
    assert not pool.settled()
    c0, c1, c2 = (s.child for s in pool.slots)
    fleet.ready(c0)
    fleet.ready(c1)
    assert not pool.settled()  # slot 2 is still starting and has not failed
    c2.boot_error = BOOT_ERROR
    fleet.exit(c2, EXIT_BOOT_ERROR)
    assert pool.settled()  # a pool that cannot boot must not hold up READY=1
    fleet.now = 5.0
    fleet.step()
    assert pool.slots[2].child.state is ChildState.STARTING
    assert pool.backing_off == []  # it has a child again
    assert pool.settled()  # still in its streak
    fleet.ready(pool.slots[2].child)
    assert pool.settled()


def test_retiring_twice_tracks_the_child_once() -> None:
    pool, _ = started_pool(2)
    child = pool.slots[0].child
    pool.retiring(child)
    pool.retiring(child)
    assert pool.retired == [child]
    assert pool.children().count(child) == 1
    assert pool.child_exited(child, 0, 1.0, stopping=False).kind is ExitKind.STOPPED
    assert pool.retired == []


def test_settled_false_when_a_never_failed_slot_is_empty() -> None:
    pool, fleet = started_pool(2)
    assert pool.settled()
    fleet.retire(pool.slots[1].child)  # e.g. an outdated child retired, not yet replaced
    assert not pool.settled()


# ---------------------------------------------------------------------------------------------
# surge


@pytest.mark.parametrize(("max_surge", "processes", "expected"), [
    ("25%", 8, 2),
    ("25%", 1, 1),
    ("25%", 5, 2),  # rounded up
    ("50%", 3, 2),
    ("100%", 4, 4),
    ("1%", 10, 1),  # at least 1
    ("12.5%", 8, 1),
    (1, 8, 1),
    (3, 8, 3),
    (10, 3, 10),
])
def test_surge_count(max_surge: int | str, processes: int, expected: int) -> None:
    assert surge_count(max_surge, processes) == expected


def test_max_surge_from_a_parsed_config(tmp_path: Path) -> None:
    text = """\
pools:
  images:
    processes: 4
    max_surge: 3
    functions:
      resize: "examples.images:resize"
"""
    pc = parse(text, str(tmp_path / "pools.yaml")).pools["images"]
    assert pc.max_surge == 3
    pool = Pool(pc)
    fleet = Fleet(pool)
    fleet.step()
    fleet.ready_all()
    pool.roll()
    assert len([a for a in spawns(fleet.step()) if a.successor]) == 3


def test_max_surge_defaults_to_a_quarter(tmp_path: Path) -> None:
    text = 'pools:\n  images:\n    processes: 8\n    functions:\n      resize: "m:f"\n'
    pc = parse(text, str(tmp_path / "pools.yaml")).pools["images"]
    pool = Pool(pc)
    fleet = Fleet(pool)
    fleet.step()
    fleet.ready_all()
    pool.roll()
    assert len(spawns(fleet.step())) == 2


# ---------------------------------------------------------------------------------------------
# Rolls


def run_roll(pool: Pool, fleet: Fleet, *, surge: int, min_capacity: int) -> int:
    """Drive a roll to its end: each round, plan, check the surge, then make the successors
    ready one by one and reap the old children. Returns the number of rounds."""
    rounds = 0
    while pool.rolling:
        rounds += 1
        assert rounds <= 100, "the roll never ends"
        told_before = len(fleet.retired_log)
        actions = fleet.step()
        # Planning alone never retires a serving child: only a ready successor does.
        assert all(a.child.state is not ChildState.READY for a in retires(actions))
        assert len(fleet.retired_log) == told_before + len(retires(actions))
        in_flight = fleet.successors()
        assert 0 < len(in_flight) <= surge
        assert all(c.generation == pool.generation for c in in_flight)
        assert fleet.capacity() >= min_capacity
        assert pool.progress() == (False, None)
        for successor in in_flight:
            slot = pool.slots[successor.slot]
            old = slot.child
            assert old is not None and old.generation < pool.generation
            assert old.state is ChildState.READY  # untouched until its successor is ready
            assert old not in fleet.retired_log
            fleet.now += 0.5
            assert fleet.ready(successor) == (0, old)
            assert slot.child is successor and slot.successor is None
            assert fleet.retired_log[-1] is old
            assert old.state is ChildState.DRAINING
            assert fleet.capacity() >= min_capacity
        for d in fleet.reap_retired():
            assert d.kind is ExitKind.STOPPED
            assert fleet.capacity() >= min_capacity
    return rounds


def assert_rolled(pool: Pool, fleet: Fleet, processes: int) -> None:
    assert len(pool.slots) == processes
    assert all(s.child is not None and s.child.state is ChildState.READY
               and s.child.generation == pool.generation and s.successor is None
               for s in pool.slots)
    assert pool.ready
    assert not pool.rolling
    assert pool.progress() == (True, None)
    assert fleet.step() == []
    assert_no_child_retired_twice(fleet)


def test_roll_of_eight_with_quarter_surge_never_drops_capacity() -> None:
    pool, fleet = started_pool(8, max_surge="25%")
    originals = [s.child for s in pool.slots]
    assert pool.roll() == []  # nothing in flight to supersede
    assert pool.generation == 2
    assert pool.rolling
    assert not pool.ready
    assert pool.progress() == (False, None)

    first = fleet.step()
    assert [(type(a), a.slot.index, a.successor) for a in first] == [
        (Spawn, 0, True), (Spawn, 1, True)]
    assert fleet.step() == []  # surge is full: nothing more until one is ready
    assert fleet.retired_log == []

    rounds = run_roll(pool, fleet, surge=2, min_capacity=8)
    assert rounds == 4
    assert_rolled(pool, fleet, 8)
    # Every original child was retired exactly once, and only those.
    assert sorted(id(c) for c in fleet.retired_log) == sorted(id(c) for c in originals)
    assert pool.retired == []
    assert pool.children() == [s.child for s in pool.slots]


def test_roll_refills_the_surge_as_each_successor_becomes_ready() -> None:
    pool, fleet = started_pool(8, max_surge="25%")
    pool.roll()
    fleet.step()
    s0, s1 = fleet.successors()
    fleet.ready(s0)
    actions = fleet.step()
    assert [(a.slot.index, a.successor) for a in spawns(actions)] == [(2, True)]
    assert len(fleet.successors()) == 2
    assert fleet.capacity() == 8


@pytest.mark.parametrize(("max_surge", "processes", "rounds"), [
    (1, 3, 3),
    (2, 5, 3),
    (10, 3, 1),  # more than the pool: everything at once, no more
    ("100%", 4, 1),
])
def test_roll_with_max_surge(max_surge: int | str, processes: int, rounds: int) -> None:
    pool, fleet = started_pool(processes, max_surge=max_surge)
    pool.roll()
    surge = min(surge_count(max_surge, processes), processes)
    assert run_roll(pool, fleet, surge=surge, min_capacity=processes) == rounds
    assert_rolled(pool, fleet, processes)


def test_roll_with_surge_one_starts_one_successor_at_a_time() -> None:
    pool, fleet = started_pool(3, max_surge=1)
    pool.roll()
    assert [(a.slot.index, a.successor) for a in fleet.step()] == [(0, True)]
    assert fleet.step() == []
    fleet.ready(fleet.successors()[0])
    assert [(a.slot.index, a.successor) for a in fleet.step()] == [(1, True)]


def test_roll_after_a_roll_bumps_generation_again() -> None:
    pool, fleet = started_pool(2)
    pool.roll()
    run_roll(pool, fleet, surge=1, min_capacity=2)
    assert pool.generation == 2
    pool.roll()
    assert pool.generation == 3
    run_roll(pool, fleet, surge=1, min_capacity=2)
    assert_rolled(pool, fleet, 2)
    assert len(fleet.retired_log) == 4


@pytest.mark.parametrize(("code", "boot_error", "words"), [
    (EXIT_BOOT_ERROR, BOOT_ERROR, f"failed to boot: {BOOT_ERROR}"),
    (EXIT_BOOT_ERROR, None, "failed to boot: boot error"),
    (EXIT_CRASH, None, "crashed before it was ready"),
    (None, None, "crashed before it was ready"),  # killed by a signal
    (0, None, "crashed before it was ready"),
])
def test_successor_failing_before_ready_halts_the_roll(
        code: int | None, boot_error: str | None, words: str) -> None:
    pool, fleet = started_pool(4, max_surge=1)
    originals = [s.child for s in pool.slots]
    pool.roll()
    fleet.now = 1.0
    fleet.step()
    (successor,) = fleet.successors()
    successor.boot_error = boot_error
    fleet.now = 1.5
    d = fleet.exit(successor, code)
    assert d.kind is ExitKind.ROLL_FAILED
    assert d.restart_in is None
    assert d.log_reason is True
    assert pool.halted == f"images[0] of generation 2 {words}"
    assert pool.progress() == (True, pool.halted)
    # The old children keep serving, untouched; nothing more is started.
    assert [s.child for s in pool.slots] == originals
    assert all(c.state is ChildState.READY and c.stop_requested_at is None for c in originals)
    assert fleet.successors() == []
    assert pool.retired == []
    assert fleet.retired_log == []
    assert fleet.capacity() == 4
    fleet.now = 100.0
    assert fleet.step() == []
    assert pool.next_due() is None
    assert all(s.backoff.failures == 0 for s in pool.slots)  # not a crash of the slot
    assert pool.rolling and not pool.ready
    assert pool.settled()


def test_halted_roll_lets_in_flight_successors_finish_and_starts_no_more() -> None:
    pool, fleet = started_pool(8, max_surge="25%")
    pool.roll()
    fleet.step()
    bad, good = fleet.successors()
    fleet.exit(bad, EXIT_CRASH)
    assert pool.halted is not None
    assert fleet.step() == []
    old = pool.slots[good.slot].child
    assert fleet.ready(good) == (0, old)  # replacing it is safe: capacity is kept
    assert fleet.capacity() == 8
    assert fleet.step() == []
    assert pool.progress() == (True, pool.halted)
    generations = sorted(s.child.generation for s in pool.slots)
    assert generations == [1] * 7 + [2]


def test_roll_after_a_halt_starts_over() -> None:
    pool, fleet = started_pool(3, max_surge=1)
    pool.roll()
    fleet.step()
    fleet.exit(fleet.successors()[0], EXIT_BOOT_ERROR)
    assert pool.halted is not None
    assert pool.roll() == []
    assert pool.halted is None
    assert pool.generation == 3
    assert pool.progress() == (False, None)
    run_roll(pool, fleet, surge=1, min_capacity=3)
    assert_rolled(pool, fleet, 3)
    assert {s.child.generation for s in pool.slots} == {3}


def test_second_roll_during_a_roll_supersedes_unready_successors() -> None:
    pool, fleet = started_pool(4, max_surge="50%")
    pool.roll()
    fleet.step()
    s0, s1 = fleet.successors()
    fleet.ready(s0)  # slot 0 is now generation 2
    fleet.reap_retired()
    fleet.step()
    s1_, s2 = fleet.successors()
    assert s1_ is s1
    assert [s.child.generation for s in pool.slots] == [2, 1, 1, 1]

    actions = pool.roll()
    assert pool.generation == 3
    assert all(isinstance(a, Retire) for a in actions)
    assert [a.child for a in actions] == [s1, s2]  # only the unready successors
    assert all(a.why == "superseded by a newer reload" for a in actions)
    fleet.execute(actions)
    assert fleet.successors() == []
    assert fleet.capacity() == 4
    # A superseded successor that reports ready late is ignored: it is not serving.
    assert fleet.ready(s1) is None
    assert pool.child_ready(s1) == (0, None)
    assert [s.child.generation for s in pool.slots] == [2, 1, 1, 1]
    for d in fleet.reap_retired():
        assert d.kind is ExitKind.STOPPED
    assert pool.halted is None

    run_roll(pool, fleet, surge=2, min_capacity=4)
    assert_rolled(pool, fleet, 4)
    assert {s.child.generation for s in pool.slots} == {3}  # no mixed generations


def test_second_roll_right_after_the_first_before_any_plan() -> None:
    pool, fleet = started_pool(2)
    assert pool.roll() == []
    assert pool.roll() == []
    assert pool.generation == 3
    run_roll(pool, fleet, surge=1, min_capacity=2)
    assert_rolled(pool, fleet, 2)
    assert len(fleet.retired_log) == 2


def test_old_child_crashing_mid_roll_hands_its_slot_to_the_successor() -> None:
    pool, fleet = started_pool(2, max_surge=1, initial=1.0)
    pool.roll()
    fleet.step()
    slot = pool.slots[0]
    old = slot.child
    (successor,) = fleet.successors()
    fleet.now = 3.0
    d = fleet.exit(old, EXIT_CRASH)
    assert d.kind is ExitKind.CRASHED
    assert d.restart_in is None  # nothing to restart: the successor is already starting
    assert d.streak == 1
    assert slot.child is successor and slot.successor is None
    assert pool.halted is None
    assert pool.next_due() is None
    assert pool.progress() == (False, None)
    actions = fleet.step()
    # No extra child for slot 0; the surge moves on to slot 1.
    assert [(a.slot.index, a.successor) for a in spawns(actions)] == [(1, True)]
    assert retires(actions) == []
    assert fleet.ready(successor) == (1, None)  # nothing left to retire in slot 0
    assert fleet.retired_log == []
    run_roll(pool, fleet, surge=1, min_capacity=1)
    assert_rolled(pool, fleet, 2)


def test_outdated_starting_child_is_retired_outright() -> None:
    pool = Pool(pool_config(processes=2, max_surge=1))
    fleet = Fleet(pool)
    fleet.step()
    starting, serving = (s.child for s in pool.slots)
    fleet.ready(serving)
    assert pool.roll() == []  # a starting slot child is not a successor
    actions = fleet.step()
    assert [(type(a), getattr(a, "child", None)) for a in retires(actions)] == [
        (Retire, starting)]
    assert retires(actions)[0].why == "outdated before it was ready"
    # It is not surged: the only successor goes to the serving slot.
    assert [(a.slot.index, a.successor) for a in spawns(actions)] == [(1, True)]
    assert pool.slots[0].successor is None
    assert pool.slots[0].child is None
    assert starting in pool.retired and starting.state is ChildState.DRAINING
    # The next pass fills slot 0 with the current generation, not as a successor.
    actions = fleet.step()
    assert [(a.slot.index, a.successor) for a in spawns(actions)] == [(0, False)]
    assert pool.slots[0].child.generation == 2
    assert fleet.exit(starting, EXIT_CRASH).kind is ExitKind.STOPPED
    assert pool.slots[0].backoff.failures == 0
    run_roll(pool, fleet, surge=1, min_capacity=0)
    fleet.ready_all()
    assert_rolled(pool, fleet, 2)


def test_progress_unfinished_while_a_retired_outdated_child_awaits_its_replacement() -> None:
    pool = Pool(pool_config(processes=1))
    fleet = Fleet(pool)
    fleet.step()  # the child is still starting
    pool.roll()
    actions = fleet.step()
    assert [a.why for a in retires(actions)] == ["outdated before it was ready"]
    # No child of generation 2 exists yet, nothing failed: the roll is not over.
    assert pool.progress() == (False, None)


def test_retired_children_are_stopped_whatever_the_exit_code_mid_roll() -> None:
    pool, fleet = started_pool(4, max_surge="50%")
    pool.roll()
    fleet.step()
    for successor in fleet.successors():
        fleet.ready(successor)
    codes = [EXIT_CRASH, None]  # a retired child crashing or SIGKILLed is still a stop
    decisions = [fleet.exit(c, code) for c, code in zip(list(pool.retired), codes, strict=True)]
    assert [d.kind for d in decisions] == [ExitKind.STOPPED, ExitKind.STOPPED]
    assert all(s.backoff.failures == 0 for s in pool.slots)
    assert pool.halted is None
    assert pool.retired == []


# ---------------------------------------------------------------------------------------------
# Scale, reconfigure, remove


def test_scale_up_and_down() -> None:
    pool, fleet = started_pool(2)
    pool.scaled_to = 4
    assert pool.desired == 4
    assert not pool.ready  # two wanted slots have no child yet
    actions = fleet.step()
    assert [(type(a), a.slot.index, a.successor) for a in actions] == [
        (Spawn, 2, False), (Spawn, 3, False)]
    assert [s.index for s in pool.slots] == [0, 1, 2, 3]
    fleet.ready_all()
    assert pool.ready
    victims = [pool.slots[i].child for i in (3, 2, 1)]
    pool.scaled_to = 1
    actions = fleet.step()
    # The highest slots go first.
    assert [a.child for a in actions] == victims
    assert all(a.why == "scaled down" for a in actions)
    assert len(pool.slots) == 1
    assert pool.ready
    assert pool.retired == victims
    for d in fleet.reap_retired():
        assert d.kind is ExitKind.STOPPED
    assert pool.children() == [pool.slots[0].child]


def test_scale_down_retires_idle_children_before_busy_ones() -> None:
    pool, fleet = started_pool(5)
    busy = {pool.slots[i].child.pid for i in (4, 1, 0)}
    pool.scaled_to = 3
    actions = pool.plan(0.0, lambda c: c.pid in busy)
    fleet.execute(actions)
    # The idle ones (slots 3 and 2) go, not the highest (4, which runs a job).
    assert [a.child.slot for a in retires(actions)] == [3, 2]
    assert [s.index for s in pool.slots] == [0, 1, 4]
    # Only when nothing idle is left does a busy child go (retired: it finishes its job).
    pool.scaled_to = 2
    actions = pool.plan(0.0, lambda c: c.pid in busy)
    assert [(a.child.slot, a.why) for a in retires(actions)] == [(4, "scaled down")]


def test_scale_down_takes_empty_and_quarantined_slots_before_serving_ones() -> None:
    pool, fleet = started_pool(4)
    fleet.exit(pool.slots[1].child, 1)  # crashed: slot 1 waits in backoff
    pool.slots[2].child.quarantined = "fails fast"
    pool.scaled_to = 2
    actions = fleet.execute(pool.plan(0.0, lambda c: True))
    assert [a.child.slot for a in retires(actions)] == [2]
    assert [s.index for s in pool.slots] == [0, 3]


def test_scale_up_fills_the_lowest_free_slot_numbers() -> None:
    pool, fleet = started_pool(4)
    busy = {pool.slots[3].child.pid}
    pool.scaled_to = 2
    fleet.execute(pool.plan(0.0, lambda c: c.pid in busy))
    assert [s.index for s in pool.slots] == [0, 3]
    pool.scaled_to = 5
    actions = fleet.step()
    assert [a.slot.index for a in spawns(actions)] == [1, 2, 4]
    assert [s.index for s in pool.slots] == [0, 1, 2, 3, 4]
    assert len({c.slot for c in pool.children() if c not in pool.retired}) == 5


def test_scale_down_mid_roll_retires_successors_too() -> None:
    pool, fleet = started_pool(4, max_surge="100%")
    pool.roll()
    fleet.step()
    gone = [(pool.slots[i].successor, pool.slots[i].child) for i in (3, 2)]
    pool.scaled_to = 2
    actions = fleet.step()
    assert [a.child for a in retires(actions)] == [c for pair in gone for c in pair]
    assert spawns(actions) == []
    assert len(fleet.successors()) == 2
    run_roll(pool, fleet, surge=2, min_capacity=2)
    assert_rolled(pool, fleet, 2)


def test_roll_with_changed_processes_clears_scale() -> None:
    pool, fleet = started_pool(2)
    pool.scaled_to = 5
    fleet.step()
    assert pool.roll(pool_config(processes=3)) == []
    assert pool.scaled_to is None
    assert pool.desired == 3
    actions = fleet.step()
    assert len(pool.slots) == 3
    assert len([a for a in retires(actions) if a.why == "scaled down"]) == 2


def test_roll_with_unchanged_processes_keeps_scale() -> None:
    pool, fleet = started_pool(2)
    pool.scaled_to = 5
    fleet.step()
    pool.roll(pool_config(processes=2, initial=4.0))
    assert pool.scaled_to == 5
    assert pool.desired == 5
    assert all(s.backoff.initial == 4.0 for s in pool.slots)
    fleet.step()
    assert len(pool.slots) == 5


def test_roll_with_config_keeps_streaks_and_uses_new_backoff() -> None:
    pool = Pool(pool_config(processes=1, initial=1.0))
    slot = pool.slots[0]
    pool.child_exited(start(pool, slot, 0.0), EXIT_CRASH, 0.1, stopping=False)
    pool.roll(pool_config(processes=1, initial=3.0))
    assert slot.backoff.failures == 1
    d = pool.child_exited(start(pool, slot, 1.0), EXIT_CRASH, 1.1, stopping=False)
    assert d.restart_in == 6.0
    assert d.streak == 2


def test_remove_drains_every_child_and_starts_none() -> None:
    pool, fleet = started_pool(3, max_surge=1)
    pool.roll()
    fleet.step()
    everyone = pool.children()
    assert len(everyone) == 4  # three serving and one successor
    pool.remove()
    assert pool.removed
    assert pool.desired == 0
    actions = fleet.step()
    assert all(isinstance(a, Retire) and a.why == "removed" for a in actions)
    assert sorted(id(a.child) for a in actions) == sorted(id(c) for c in everyone)
    assert pool.slots == []
    assert pool.progress() == (False, None)
    assert fleet.step() == []
    fleet.now = 50.0
    for child in list(pool.retired):
        assert fleet.exit(child, EXIT_CRASH).kind is ExitKind.STOPPED
    assert pool.children() == []
    assert pool.progress() == (True, None)
    assert fleet.step() == []
    assert_no_child_retired_twice(fleet)


def test_remove_clears_a_halted_roll() -> None:
    pool, fleet = started_pool(2)
    pool.roll()
    fleet.step()
    fleet.exit(fleet.successors()[0], EXIT_CRASH)
    assert pool.progress()[1] is not None
    pool.remove()
    assert pool.halted is None
    fleet.step()
    assert pool.progress() == (False, None)
    fleet.reap_retired()
    assert pool.progress() == (True, None)


def test_progress_names_slots_whose_child_of_this_generation_never_came_up() -> None:
    pool = Pool(pool_config(3, initial=5.0))
    fleet = Fleet(pool)
    fleet.step()
    boot = pool.slots[0].child
    boot.boot_error = BOOT_ERROR
    fleet.exit(boot, EXIT_BOOT_ERROR)
    fleet.exit(pool.slots[1].child, EXIT_CRASH)
    fleet.ready(pool.slots[2].child)
    assert pool.progress() == (
        True, f"2 of 3 children not running (boot_error: {BOOT_ERROR}; crashed)")


def test_progress_is_ok_when_children_crash_after_the_roll_reached_their_slot() -> None:
    # A crash after a slot's child of this generation was ready is a crash (backoff, alerts),
    # not a failed roll: `gearvisor reload` must not exit 1 for it.
    pool, fleet = started_pool(3, initial=5.0)
    fleet.exit(pool.slots[0].child, EXIT_CRASH)
    fleet.exit(pool.slots[1].child, None)  # SIGKILLed
    assert pool.progress() == (True, None)


def test_progress_waits_for_a_slot_that_crashed_just_before_the_roll_ended() -> None:
    pool, fleet = started_pool(2, initial=5.0, max_surge=1)
    pool.roll()
    fleet.step()
    (successor,) = fleet.successors()
    fleet.ready(successor)
    fleet.reap_retired()
    # The other slot's old child crashes before its successor was started: the slot is
    # empty and backing off, and no child of generation 2 has been there yet.
    other = next(s for s in pool.slots if s.child is not None and s.child.generation == 1)
    fleet.exit(other.child, EXIT_CRASH)
    assert pool.progress() == (False, None)
    fleet.now += 5.0
    fleet.step()
    assert other.child is not None and other.child.generation == 2
    assert pool.progress() == (False, None)
    fleet.ready(other.child)
    assert pool.progress() == (True, None)


def test_progress_waits_when_a_restarting_child_is_retired_as_outdated() -> None:
    pool, fleet = started_pool(1, initial=1.0)
    fleet.exit(pool.slots[0].child, EXIT_CRASH)  # a crash streak begins
    fleet.now += 1.0
    fleet.step()
    assert pool.slots[0].child.state is ChildState.STARTING
    pool.roll()
    assert [a.why for a in retires(fleet.step())] == ["outdated before it was ready"]
    assert pool.slots[0].backoff.in_streak
    assert pool.progress() == (False, None)  # was (True, "1 of 1 children not running")
    fleet.step()
    fleet.ready(pool.slots[0].child)
    fleet.reap_retired()
    assert pool.progress() == (True, None)


def test_progress_unfinished_while_a_slot_child_is_starting() -> None:
    pool = Pool(pool_config(processes=2))
    fleet = Fleet(pool)
    fleet.step()
    assert pool.progress() == (False, None)
    fleet.ready(pool.slots[0].child)
    assert pool.progress() == (False, None)
    fleet.ready(pool.slots[1].child)
    assert pool.progress() == (True, None)


# ---------------------------------------------------------------------------------------------
# Child states


def new_child() -> Child:
    return Child(pool="images", slot=0, generation=1, started_at=0.0, pid=42)


@pytest.mark.parametrize("path", [
    [ChildState.READY, ChildState.DRAINING, ChildState.EXITED],
    [ChildState.DRAINING, ChildState.EXITED],
    [ChildState.READY, ChildState.EXITED],
    [ChildState.EXITED],
])
def test_legal_transitions(path: list[ChildState]) -> None:
    child = new_child()
    assert child.state is ChildState.STARTING
    for state in path:
        child.transition(state)
        assert child.state is state


@pytest.mark.parametrize(("before", "after"), [
    ([], ChildState.STARTING),
    ([ChildState.READY], ChildState.STARTING),
    ([ChildState.READY], ChildState.READY),
    ([ChildState.DRAINING], ChildState.READY),
    ([ChildState.DRAINING], ChildState.STARTING),
    ([ChildState.EXITED], ChildState.STARTING),
    ([ChildState.EXITED], ChildState.READY),
    ([ChildState.EXITED], ChildState.DRAINING),
    ([ChildState.EXITED], ChildState.EXITED),
])
def test_illegal_transitions_are_refused(before: list[ChildState], after: ChildState) -> None:
    child = new_child()
    for state in before:
        child.transition(state)
    was = child.state
    with pytest.raises(TransitionError, match=rf"images\[0\]: {was.value} -> {after.value}"):
        child.transition(after)
    assert child.state is was


def test_child_name_is_pool_and_slot() -> None:
    child = dataclasses.replace(new_child(), slot=7)
    assert child.name == "images[7]"


# ---------------------------------------------------------------------------------------------
# describe_status


@pytest.mark.parametrize("code", [0, 1, EXIT_BOOT_ERROR, 255])
def test_describe_exit_code(code: int) -> None:
    status = code << 8
    assert os.WIFEXITED(status)
    assert describe_status(status) == (code, None, f"exited with code {code}")


@pytest.mark.parametrize(("status", "sig", "name"), [
    (signal.SIGKILL, signal.SIGKILL, "SIGKILL"),
    (signal.SIGTERM, signal.SIGTERM, "SIGTERM"),
    (signal.SIGSEGV | 0x80, signal.SIGSEGV, "SIGSEGV"),  # with the core-dump bit
])
def test_describe_killed_by_signal(status: int, sig: int, name: str) -> None:
    assert describe_status(status) == (None, sig, f"killed by {name}")


def test_describe_unnamed_signal_number() -> None:
    status = 100  # not a signal Python knows by name
    assert os.WIFSIGNALED(status)
    assert describe_status(status) == (None, 100, "killed by 100")
