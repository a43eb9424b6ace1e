"""pool.Pool / Slot exit decisions and process.Child states, without a single process."""

from __future__ import annotations

import os
import signal

import pytest

from gearvisor.config import BackoffConfig, KeepaliveConfig, PoolConfig, Server
from gearvisor.pool import ExitKind, Pool, Slot
from gearvisor.process import (
    EXIT_BOOT_ERROR,
    EXIT_CRASH,
    Child,
    ChildState,
    TransitionError,
    describe_status,
)


def pool_config(processes: int = 2, *, initial: float = 1.0, maximum: float = 30.0,
                reset_after: float = 10.0) -> PoolConfig:
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
    )


def start(pool: Pool, slot: Slot, now: float, pid: int = 1000) -> Child:
    child = Child(pool=pool.name, slot=slot.index, generation=pool.generation, started_at=now,
                  pid=pid)
    slot.child = child
    return child


# ---------------------------------------------------------------------------------------------
# Exit decisions


def test_requested_stop_is_never_a_failure() -> None:
    pool = Pool(pool_config())
    slot = pool.slots[0]
    # Killed by SIGKILL after the graceful timeout, or exited 1: requested either way.
    for code in (None, EXIT_CRASH, EXIT_BOOT_ERROR, 0):
        child = start(pool, slot, now=100.0)
        d = pool.child_exited(slot, child, code, now=100.5, stopping=False, requested=True)
        assert d.kind is ExitKind.STOPPED
        assert d.restart_in == 0.0
        assert d.log_reason is False
        assert d.streak == 0
        assert slot.backoff.failures == 0
        assert slot.child is None
        assert slot.restart_at == 100.5


def test_requested_stop_keeps_an_existing_streak_unchanged() -> None:
    pool = Pool(pool_config())
    slot = pool.slots[0]
    pool.child_exited(slot, start(pool, slot, 10.0), EXIT_CRASH, 10.1, False, False)
    pool.child_exited(slot, start(pool, slot, 20.0), EXIT_CRASH, 20.1, False, False)
    assert slot.backoff.failures == 2
    d = pool.child_exited(slot, start(pool, slot, 30.0), None, 30.1, False, True)
    assert d.kind is ExitKind.STOPPED
    assert d.streak == 2
    assert slot.backoff.failures == 2


def test_requested_stop_while_stopping_leaves_slot_empty() -> None:
    pool = Pool(pool_config())
    slot = pool.slots[1]
    d = pool.child_exited(slot, start(pool, slot, 5.0), 0, now=6.0, stopping=True,
                          requested=True)
    assert d.kind is ExitKind.STOPPED
    assert d.restart_in is None


def test_crash_schedules_restart_after_backoff() -> None:
    pool = Pool(pool_config(initial=1.0))
    slot = pool.slots[0]
    d = pool.child_exited(slot, start(pool, slot, 100.0), EXIT_CRASH, now=100.5,
                          stopping=False, requested=False)
    assert d.kind is ExitKind.CRASHED
    assert d.restart_in == 1.0
    assert d.streak == 1
    assert slot.restart_at == 101.5
    assert slot.child is None
    d = pool.child_exited(slot, start(pool, slot, 101.5), EXIT_CRASH, now=102.0,
                          stopping=False, requested=False)
    assert d.restart_in == 2.0
    assert d.streak == 2
    assert slot.restart_at == 104.0


def test_killed_by_signal_is_a_crash() -> None:
    pool = Pool(pool_config())
    slot = pool.slots[0]
    d = pool.child_exited(slot, start(pool, slot, 0.0), None, 0.1, False, False)
    assert d.kind is ExitKind.CRASHED


def test_boot_error_vs_crash() -> None:
    pool = Pool(pool_config())
    slot = pool.slots[0]
    child = start(pool, slot, 0.0)
    child.boot_error = "function resize: cannot import module 'examples.images'"
    d = pool.child_exited(slot, child, EXIT_BOOT_ERROR, 0.1, False, False)
    assert d.kind is ExitKind.BOOT_ERROR
    assert slot.last_reason == ("boot_error: function resize: cannot import module "
                                "'examples.images'")
    other = pool.slots[1]
    d = pool.child_exited(other, start(pool, other, 0.0), EXIT_CRASH, 0.1, False, False)
    assert d.kind is ExitKind.CRASHED
    assert other.last_reason == "crashed"


def test_crash_while_stopping_does_not_restart_but_counts() -> None:
    pool = Pool(pool_config())
    slot = pool.slots[0]
    d = pool.child_exited(slot, start(pool, slot, 0.0), EXIT_CRASH, 0.1, stopping=True,
                          requested=False)
    assert d.kind is ExitKind.CRASHED
    assert d.restart_in is None
    assert d.streak == 1


def test_log_reason_only_on_first_failure_of_a_streak() -> None:
    pool = Pool(pool_config(initial=1.0, reset_after=10.0))
    slot = pool.slots[0]
    logged = []
    t = 0.0
    for _ in range(4):
        d = pool.child_exited(slot, start(pool, slot, t), EXIT_CRASH, t + 0.1, False, False)
        logged.append(d.log_reason)
        t = slot.restart_at
    assert logged == [True, False, False, False]
    # A child that stayed up past reset_after starts a new streak: logged again.
    d = pool.child_exited(slot, start(pool, slot, t), EXIT_CRASH, t + 60.0, False, False)
    assert d.streak == 1
    assert d.log_reason is True


def test_log_reason_again_when_the_reason_changes() -> None:
    pool = Pool(pool_config())
    slot = pool.slots[0]
    first = pool.child_exited(slot, start(pool, slot, 0.0), EXIT_CRASH, 0.1, False, False)
    same = pool.child_exited(slot, start(pool, slot, 2.0), EXIT_CRASH, 2.1, False, False)
    booting = start(pool, slot, 5.0)
    booting.boot_error = "function resize: no attribute 'resize'"
    changed = pool.child_exited(slot, booting, EXIT_BOOT_ERROR, 5.1, False, False)
    again = start(pool, slot, 10.0)
    again.boot_error = "function resize: no attribute 'resize'"
    same_boot = pool.child_exited(slot, again, EXIT_BOOT_ERROR, 10.1, False, False)
    assert [first.log_reason, same.log_reason, changed.log_reason, same_boot.log_reason] == [
        True, False, True, False]
    assert same_boot.streak == 4


def test_child_ready_reports_streak_but_does_not_reset_backoff() -> None:
    pool = Pool(pool_config())
    slot = pool.slots[0]
    pool.child_exited(slot, start(pool, slot, 0.0), EXIT_CRASH, 0.1, False, False)
    start(pool, slot, 2.0)
    assert pool.child_ready(slot) == 1
    assert slot.last_reason is None
    assert slot.backoff.failures == 1
    # The reason is logged again after a ready child: last_reason was cleared.
    d = pool.child_exited(slot, slot.child, EXIT_CRASH, 2.5, False, False)
    assert d.streak == 2
    assert d.log_reason is True


# ---------------------------------------------------------------------------------------------
# Scheduling


def test_new_pool_slots_are_all_due() -> None:
    pool = Pool(pool_config(processes=3))
    assert [s.index for s in pool.slots] == [0, 1, 2]
    assert [s.index for s in pool.due(0.0)] == [0, 1, 2]
    assert pool.next_due() == 0.0
    assert pool.children() == []
    assert pool.backing_off == []


def test_due_and_next_due_follow_backoff() -> None:
    pool = Pool(pool_config(processes=3, initial=1.0))
    s0, s1, s2 = pool.slots
    c1 = start(pool, s1, 10.0, pid=11)
    start(pool, s2, 10.0, pid=12)
    pool.child_exited(s0, start(pool, s0, 10.0, pid=10), EXIT_CRASH, 10.2, False, False)
    assert s0.restart_at == pytest.approx(11.2)
    assert pool.due(11.1) == []
    assert pool.due(11.2) == [s0]
    assert pool.next_due() == pytest.approx(11.2)
    assert pool.backing_off == [s0]
    assert [c.pid for c in pool.children()] == [11, 12]

    pool.child_exited(s1, c1, EXIT_CRASH, 10.5, False, False)
    assert s1.restart_at == pytest.approx(11.5)
    assert pool.next_due() == pytest.approx(11.2)
    assert pool.due(11.3) == [s0]
    assert pool.due(12.0) == [s0, s1]


def test_next_due_none_when_every_slot_is_filled() -> None:
    pool = Pool(pool_config(processes=2))
    for slot in pool.slots:
        start(pool, slot, 0.0)
    assert pool.next_due() is None
    assert pool.due(1e9) == []


def test_reconfigure_keeps_the_streak() -> None:
    pool = Pool(pool_config(initial=1.0))
    slot = pool.slots[0]
    pool.child_exited(slot, start(pool, slot, 0.0), EXIT_CRASH, 0.1, False, False)
    slot.reconfigure(pool_config(initial=5.0))
    assert slot.backoff.failures == 1
    assert slot.backoff.initial == 5.0
    d = pool.child_exited(slot, start(pool, slot, 1.0), EXIT_CRASH, 1.1, False, False)
    assert d.restart_in == 10.0


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
