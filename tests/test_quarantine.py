"""Self-quarantine, the pool circuit breaker, poison jobs, job timeouts and recycling: the pure
decisions (health.ErrorWindow, pool.Pool, poison, config) and the worker's pause/resume bytes.

No gearmand, no forked process, no sleep: children are process.Child records with fake pids,
time is a float driven by hand, and the worker talks to one end of a socketpair.
"""

from __future__ import annotations

import hashlib
import os
import random
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from fleet import Fleet
from wired import RecordingHooks, RecordingTimer, assign

from gearvisor.config import (
    CircuitConfig,
    ConfigError,
    Invalid,
    PoolConfig,
    QuarantineConfig,
    parse,
    size,
)
from gearvisor.gearman.protocol import Packet
from gearvisor.gearman.worker import ConnState, Worker
from gearvisor.job import Job, JobTimeout
from gearvisor.policy.backoff import CHILD_BASE_FDS, ErrorWindow, fd_warnings, jittered
from gearvisor.policy.child import EXIT_CRASH, Child, ChildState
from gearvisor.policy.pool import ExitDecision, ExitKind, Pool, Retire, Spawn
from gearvisor.shm.poison import PoisonList, PoisonTable, job_key, shim_key

# parse() only needs the file's directory (the default cwd) to exist: the file itself is not read.
CONFIG_PATH = str(Path(__file__).resolve().parent / "quarantine.yaml")
FAST = 0.001  # a job that failed in a millisecond: a broken worker
SLOW = 5.0  # a job that failed after real work: the job's problem


# ---------------------------------------------------------------------------------------------
# Helpers


def pool_config(processes: int = 5, *, max_surge: int | str = "100%",
                quarantine: dict | None = None, circuit: dict | None = None,
                **extra: Any) -> PoolConfig:
    """One pool "mail" parsed from YAML, with a jitter-free restart backoff (initial 1s)."""
    pool: dict[str, Any] = {
        "processes": processes,
        "functions": {"send": "examples.text:reverse"},
        "max_surge": max_surge,
        "backoff": {"initial": 1, "max": 30, "jitter": 0, "reset_after": 10},
        "quarantine": {"cooldown": 5, "cooldown_max": 300, **(quarantine or {})},
        "circuit": {"ratio": 0.6, "cooldown": 10, "cooldown_max": 300, **(circuit or {})},
        **extra,
    }
    return parse(yaml.safe_dump({"pools": {"mail": pool}}), CONFIG_PATH).pools["mail"]


def no_jitter(pool: Pool) -> None:
    """The quarantine and circuit backoffs jitter by +/-10% with random.random: pin the random
    draw at the middle, so cooldowns are exact (5, 10, 20... and 10, 20, 40...)."""
    for slot in pool.slots:
        slot.quarantines._rand = lambda: 0.5
    pool.circuit_backoff._rand = lambda: 0.5


class Master(Fleet):
    """The shared simulation, driven by time: step(now), and ready() returns the child a
    successor replaced (retired)."""

    def step(self, now: float | None = None) -> list:
        if now is not None:
            self.now = now
        return super().step()

    def ready(self, child: Child) -> Child | None:
        got = super().ready(child)
        return got[1] if got else None

    def exit(self, child: Child, code: int | None = EXIT_CRASH, *,
             stopping: bool = False) -> ExitDecision:
        return super().exit(child, code, stopping=stopping)


def started(processes: int = 5, **kw: Any) -> tuple[Pool, Master]:
    """A pool whose every slot has a ready child of generation 1, at time 0."""
    pool = Pool(pool_config(processes, **kw))
    no_jitter(pool)
    master = Master(pool)
    master.step()
    master.ready_all()
    assert pool.ready
    return pool, master


def spawns(actions: list) -> list[Spawn]:
    return [a for a in actions if isinstance(a, Spawn)]


def quarantine(pool: Pool, index: int, now: float) -> tuple[float, str | None]:
    return pool.child_quarantined(pool.slots[index].child, f"slot {index} fails fast", now)


def open_circuit(processes: int = 5, now: float = 100.0, **kw: Any) -> tuple[Pool, Master]:
    """A pool of `processes` whose circuit opened at `now` (ratio 0.6: the first 3 of 5)."""
    pool, master = started(processes, **kw)
    master.now = now
    needed = next(n for n in range(1, processes + 1) if n >= 0.6 * processes)
    results = [quarantine(pool, i, now)[1] for i in range(needed)]
    assert results[-1] == "opened" and pool.circuit == "open"
    return pool, master


def start_probe(pool: Pool, master: Master) -> Child:
    """Let the circuit's cooldown pass and start the one probe child."""
    actions = master.step(pool.circuit_until)
    (probe,) = spawns(actions)
    assert probe.probe and pool.probe is not None
    return pool.probe


# ---------------------------------------------------------------------------------------------
# ErrorWindow


def test_quarantines_after_exactly_min_jobs_fast_failures_at_ratio_one() -> None:
    w = ErrorWindow(window=20, min_jobs=5, ratio=1.0, fast=1.0)
    assert [w.record(False, FAST) for _ in range(4)] == [None] * 4
    reason = w.record(False, FAST)
    assert reason is not None
    assert "5 of its last 5 jobs failed in under 1000 ms" in reason
    assert w.failed == 5


@pytest.mark.parametrize("seconds", [1.0, 1.5, 60.0])
def test_slow_failures_never_count(seconds: float) -> None:
    # `fast` is exclusive: a failure that took exactly `fast` seconds is slow.
    w = ErrorWindow(window=10, min_jobs=1, ratio=0.1, fast=1.0)
    assert [w.record(False, seconds) for _ in range(50)] == [None] * 50
    assert w.failed == 50
    assert sum(w.outcomes) == 0


def test_successes_dilute_the_ratio() -> None:
    w = ErrorWindow(window=20, min_jobs=5, ratio=0.8, fast=1.0)
    assert w.record(True, 0.01) is None
    assert w.record(True, 0.01) is None
    # Fast failures alone would quarantine at the 5th... with 2 successes ahead, 8 fast of 10
    # are needed to reach 80% (7 of 9 is 78%).
    results = [w.record(False, FAST) for _ in range(8)]
    assert results[:7] == [None] * 7
    assert results[7] is not None and "8 of its last 10" in results[7]


def test_window_slides_old_outcomes_fall_out() -> None:
    w = ErrorWindow(window=4, min_jobs=4, ratio=1.0, fast=1.0)
    for _ in range(3):
        assert w.record(False, FAST) is None
    assert w.record(True, 0.01) is None  # [F F F S]: 75%
    # The success leaves the window only after 4 more jobs.
    results = [w.record(False, FAST) for _ in range(4)]
    assert results[:3] == [None] * 3
    assert results[3] is not None
    assert len(w.outcomes) == 4


def test_probation_first_fast_failure_quarantines() -> None:
    w = ErrorWindow(window=20, min_jobs=5, ratio=0.8, fast=1.0, probation_jobs=3)
    assert w.on_probation
    assert w.record(False, SLOW) is None  # slow: the job's fault, not the worker's
    assert w.record(True, 0.01) is None
    assert w.record(True, 0.01) is None
    assert w.on_probation and w.probation_left == 1
    reason = w.record(False, FAST)
    assert reason is not None and "probation" in reason


def test_probation_ends_after_probation_jobs_successes() -> None:
    w = ErrorWindow(window=20, min_jobs=5, ratio=0.8, fast=1.0, probation_jobs=3)
    for _ in range(3):
        assert w.on_probation
        assert w.record(True, 0.01) is None
    assert not w.on_probation
    # Off probation, the normal rule applies again: one fast failure is not enough.
    assert w.record(False, FAST) is None


def test_no_probation_when_probation_jobs_is_zero() -> None:
    w = ErrorWindow(window=20, min_jobs=5, ratio=0.8, fast=1.0, probation_jobs=0)
    assert not w.on_probation
    assert w.record(False, FAST) is None


def test_failed_counts_every_failure_fast_or_slow() -> None:
    w = ErrorWindow(window=3, min_jobs=100, ratio=1.0, fast=1.0)
    for ok, seconds in [(False, FAST), (True, 0.1), (False, SLOW), (False, FAST), (True, 9.0),
                        (False, 2.0)]:
        assert w.record(ok, seconds) is None
    assert w.failed == 4
    assert len(w.outcomes) == 3  # the window is bounded; the count is not


def test_ratio_zero_never_quarantines_a_child_that_never_failed() -> None:
    pool = pool_config(quarantine={"ratio": 0})  # accepted by the config
    q = pool.quarantine
    w = ErrorWindow(q.window, q.min_jobs, q.ratio, q.fast)
    assert [w.record(True, 0.01) for _ in range(10)] == [None] * 10


# ---------------------------------------------------------------------------------------------
# jittered, fd_warnings


def test_jittered_bounds_with_a_fixed_rand() -> None:
    assert jittered(100.0, 0.1, lambda: 0.0) == pytest.approx(90.0)
    assert jittered(100.0, 0.1, lambda: 1.0) == pytest.approx(110.0)
    assert jittered(100.0, 0.1, lambda: 0.5) == pytest.approx(100.0)
    assert jittered(100.0, 0.0, lambda: 0.9) == pytest.approx(100.0)
    rng = random.Random(7)
    values = [jittered(1000.0, 0.2, rng.random) for _ in range(500)]
    assert all(800.0 <= v <= 1200.0 for v in values)
    assert max(values) - min(values) > 200.0  # it does spread


def test_fd_warnings_none_for_a_safe_config() -> None:
    assert fd_warnings([("mail", 4, 2, None), ("images", 8, 3, 4096)], 1024) == []


def test_fd_warning_for_a_child_close_to_its_own_limit() -> None:
    # 10 servers + 16 = 26 descriptors, the pool's own rlimit_nofile is 32: 26 >= 25.6.
    (warning,) = fd_warnings([("mail", 1, 10, 32)], 1024)
    assert warning.startswith("pool mail:")
    assert f"about {10 + CHILD_BASE_FDS} open files" in warning and "limit is 32" in warning
    # The pool's own limit wins over the master's: the same pool with rlimit 4096 is safe
    # even when the master's limit would be too low for it.
    assert fd_warnings([("mail", 1, 10, 4096)], 32) == []
    assert fd_warnings([("mail", 1, 10, None)], 32)[0].startswith("pool mail:")


def test_fd_warning_for_the_master() -> None:
    # The master needs 2 per child + 16: 31 children need 78 < 80% of 100, 32 need 80.
    assert fd_warnings([("mail", 31, 1, None)], 100) == []
    (warning,) = fd_warnings([("mail", 20, 1, None), ("images", 12, 1, None)], 100)
    assert warning.startswith("the master may need 80 open files for 32 children")


def test_fd_warning_for_the_job_servers() -> None:
    warnings = fd_warnings([("mail", 80, 1, None)], 100)
    assert len(warnings) == 2  # the master is short too
    assert any(w.startswith("80 children connect to each job server") and "(100)" in w
               for w in warnings)
    assert not any("connect to each job server" in w
                   for w in fd_warnings([("mail", 79, 1, None)], 1000))


# ---------------------------------------------------------------------------------------------
# Pool: recycling through the surge path


def test_recycle_starts_a_successor_then_the_old_child_is_retired() -> None:
    pool, master = started(2, max_surge=1)
    slot = pool.slots[0]
    old = slot.child
    assert pool.recycle(old, "max_jobs: ran 1000 jobs", 50.0) is True
    assert (slot.replace_at, slot.replace_why) == (50.0, "max_jobs: ran 1000 jobs")
    assert pool.recycle(old, "max_memory", 51.0) is False  # already under way
    assert slot.replace_why == "max_jobs: ran 1000 jobs"

    (spawn,) = spawns(master.step(50.0))
    assert spawn.slot is slot and spawn.successor and not spawn.probation and not spawn.probe
    new = slot.successor
    assert new is not None and new.generation == old.generation
    assert slot.child is old  # capacity holds while the successor boots
    assert pool.recycle(old, "max_lifetime", 52.0) is False  # a successor is starting
    assert spawns(master.step(52.0)) == []  # only one successor

    assert master.ready(new) is old
    assert slot.child is new and slot.successor is None
    assert slot.replace_at is None and slot.replace_why is None
    assert old in pool.retired and old.state is ChildState.DRAINING
    assert pool.recycle(old, "again", 53.0) is False  # retired: no slot any more
    master.exit(old, 0)
    assert pool.ready and spawns(master.step(60.0)) == []


def test_recycle_waits_for_its_time() -> None:
    pool, master = started(2)
    pool.recycle(pool.slots[1].child, "max_lifetime: up 3600s", 70.0)
    assert spawns(master.step(69.0)) == []
    assert [s.slot.index for s in spawns(master.step(70.0))] == [1]


def test_surge_limits_how_many_replacements_start_at_once() -> None:
    pool, master = started(4, max_surge=1)
    for i in range(3):
        assert pool.recycle(pool.slots[i].child, "max_jobs", 10.0)
    done = []
    for t in (10.0, 11.0, 12.0):
        actions = spawns(master.step(t))
        assert len(actions) == 1  # one at a time
        assert sum(1 for s in pool.slots if s.successor is not None) == 1
        assert spawns(master.step(t + 0.5)) == []  # still one in flight
        successor = actions[0].slot.successor
        done.append(actions[0].slot.index)
        master.ready(successor)
        master.reap_retired()
    assert sorted(done) == [0, 1, 2]
    assert spawns(master.step(20.0)) == []
    assert all(s.replace_at is None for s in pool.slots)


def test_a_replacement_that_dies_before_ready_does_not_halt_and_is_retried() -> None:
    pool, master = started(2)
    slot = pool.slots[0]
    old = slot.child
    pool.recycle(old, "max_memory: RSS 900 MiB", 30.0)
    master.step(30.0)
    successor = slot.successor
    master.now = 30.5
    decision = master.exit(successor, EXIT_CRASH)
    assert decision.kind is ExitKind.CRASHED and decision.kind is not ExitKind.ROLL_FAILED
    assert pool.halted is None
    assert pool.progress() == (True, None)
    assert slot.child is old and slot.successor is None  # the old child keeps serving
    assert slot.replace_at == pytest.approx(31.5)  # backoff.initial: 1s
    assert spawns(master.step(31.0)) == []
    (retry,) = spawns(master.step(31.5))
    assert retry.slot is slot and retry.successor
    assert master.ready(slot.successor) is old


# ---------------------------------------------------------------------------------------------
# Pool: quarantine


def test_quarantine_cooldown_then_a_successor_on_probation() -> None:
    pool, master = started(5)
    slot = pool.slots[0]
    old = slot.child
    cooldown, circuit = pool.child_quarantined(old, "5 of its last 5 jobs failed", 100.0)
    assert (cooldown, circuit) == (5.0, None)
    assert old.quarantined == "5 of its last 5 jobs failed"
    assert slot.replace_at == 105.0
    assert slot.replace_why == "quarantined: 5 of its last 5 jobs failed"
    assert slot.probation_next
    assert spawns(master.step(104.9)) == []
    (spawn,) = spawns(master.step(105.0))
    assert spawn.slot is slot and spawn.successor and spawn.probation and not spawn.probe
    new = slot.successor
    assert new.probation is True
    assert master.ready(new) is old and old in pool.retired
    assert slot.replace_at is None


def test_quarantine_cooldown_grows_on_repeats_in_the_same_slot() -> None:
    pool, master = started(5)
    slot = pool.slots[2]
    cooldowns = []
    now = 100.0
    for _ in range(4):
        cooldown, _ = quarantine(pool, 2, now)
        cooldowns.append(cooldown)
        master.step(slot.replace_at)
        master.ready(slot.successor)
        master.reap_retired()
        now = master.now + 1.0
    assert cooldowns == [5.0, 10.0, 20.0, 40.0]
    # Another slot has its own streak.
    assert quarantine(pool, 3, now)[0] == 5.0


def test_quarantine_cooldown_is_capped_and_jittered() -> None:
    pool, _ = started(5, quarantine={"cooldown": 5, "cooldown_max": 12})
    slot = pool.slots[0]
    slot.quarantines._rand = lambda: 1.0  # +10%
    assert [slot.quarantines.failure(0, 0) for _ in range(3)] == [
        pytest.approx(5.5), pytest.approx(11.0), pytest.approx(12.0)]


def test_probation_passed_resets_the_slot_streak() -> None:
    pool, master = started(5)
    slot = pool.slots[0]
    quarantine(pool, 0, 100.0)
    master.step(105.0)
    new = slot.successor
    master.ready(new)
    assert pool.probation_passed(new) is None  # not a probe: the circuit is closed
    assert new.probation is False and not slot.probation_next
    assert slot.quarantines.failures == 0
    assert quarantine(pool, 0, 200.0)[0] == 5.0  # back to the first cooldown
    # A recycle of a healthy child does not start on probation.
    pool2, master2 = started(2)
    pool2.recycle(pool2.slots[0].child, "max_jobs", 1.0)
    assert not spawns(master2.step(1.0))[0].probation


# ---------------------------------------------------------------------------------------------
# Pool: the circuit breaker


def test_circuit_opens_at_its_ratio_and_not_before() -> None:
    pool, _ = started(5)  # ratio 0.6: 3 of 5
    assert quarantine(pool, 0, 100.0)[1] is None
    assert quarantine(pool, 1, 101.0)[1] is None
    assert pool.circuit == "closed"
    cooldown, circuit = quarantine(pool, 2, 102.0)
    assert circuit == "opened"
    assert cooldown == 5.0  # the slot's own replacement cooldown is still reported
    assert pool.circuit == "open"
    assert pool.circuit_until == 112.0
    # Further quarantines while open do not reopen it.
    assert quarantine(pool, 3, 103.0)[1] is None
    assert pool.circuit_until == 112.0


def test_circuit_ratio_is_a_share_of_the_desired_children() -> None:
    pool, _ = started(4, circuit={"ratio": 0.5})
    assert quarantine(pool, 0, 1.0)[1] is None
    assert quarantine(pool, 1, 1.0)[1] == "opened"  # 2 of 4
    single, _ = started(1)
    assert quarantine(single, 0, 1.0)[1] == "opened"  # 1 of 1


def test_no_replacement_spawns_while_the_circuit_is_open() -> None:
    pool, master = open_circuit()
    # Every quarantined slot's cooldown (5s) is over, the circuit's (10s) is not.
    assert all(s.replace_at <= 105.0 for s in pool.slots[:3])
    for t in (105.0, 107.0, 109.9):
        assert spawns(master.step(t)) == []
    assert all(s.successor is None for s in pool.slots)


def test_one_probe_after_the_circuit_cooldown() -> None:
    pool, master = open_circuit()
    actions = spawns(master.step(112.0))
    assert len(actions) == 1
    (spawn,) = actions
    assert spawn.probe and spawn.probation and spawn.successor
    assert spawn.slot.child.quarantined  # it replaces a quarantined child
    assert pool.circuit == "probing"
    assert pool.probe is spawn.slot.successor
    assert pool.probe.probation is True
    for t in (113.0, 200.0, 1000.0):
        assert spawns(master.step(t)) == []  # one probe, nothing else


def test_a_probe_that_quarantines_reopens_with_a_longer_cooldown() -> None:
    pool, master = open_circuit()
    probe = start_probe(pool, master)
    master.now = 113.0
    assert master.ready(probe) is not None  # the quarantined child it replaces
    master.reap_retired()
    assert pool.circuit == "probing"
    cooldown, circuit = pool.child_quarantined(probe, "failed on probation", 114.0)
    assert circuit == "reopened"
    assert cooldown == 10.0  # second quarantine of that slot
    assert pool.circuit == "open" and pool.probe is None
    assert pool.circuit_until == 114.0 + 20.0  # 10s, then 20s
    assert spawns(master.step(133.9)) == []
    (again,) = spawns(master.step(134.0))
    assert again.probe and pool.circuit == "probing"


def test_a_probe_that_dies_before_ready_reopens_with_a_longer_cooldown() -> None:
    pool, master = open_circuit()
    probe = start_probe(pool, master)
    slot = next(s for s in pool.slots if s.successor is probe)
    master.now = 112.5
    decision = master.exit(probe, EXIT_CRASH)
    assert decision.kind is ExitKind.CRASHED
    assert pool.halted is None
    assert pool.circuit == "open" and pool.probe is None
    assert pool.circuit_until == 112.5 + 20.0
    assert slot.child.quarantined and slot.successor is None
    assert spawns(master.step(130.0)) == []
    assert [a.probe for a in spawns(master.step(132.5))] == [True]


def test_a_probe_that_passes_closes_the_circuit_and_replaces_the_rest_at_once() -> None:
    pool, master = open_circuit()
    probe = start_probe(pool, master)
    master.now = 113.0
    master.ready(probe)
    master.reap_retired()
    probe_slot = pool.slots[probe.slot]
    assert pool.probation_passed(probe) == "closed"
    assert pool.circuit == "closed" and pool.probe is None
    assert probe_slot.quarantines.failures == 0
    assert pool.circuit_backoff.failures == 0
    others = [s for s in pool.slots if s.child is not None and s.child.quarantined]
    assert len(others) == 2
    assert all(s.replace_at == 0.0 for s in others)
    actions = spawns(master.step(113.5))
    assert sorted(a.slot.index for a in actions) == sorted(s.index for s in others)
    assert all(a.successor and a.probation and not a.probe for a in actions)
    # The next opening starts again from the first circuit cooldown.
    assert pool.circuit_backoff.failure(0, 0) == 10.0


def test_roll_while_open_makes_the_probe_due_at_once() -> None:
    pool, master = open_circuit()
    assert pool.roll() == []
    assert pool.circuit == "open" and pool.circuit_until == 0.0
    actions = spawns(master.step(101.0))
    probes = [a for a in actions if a.probe]
    assert len(probes) == 1
    assert pool.circuit == "probing"
    assert pool.probe.generation == 2


def test_next_due_includes_replace_at() -> None:
    pool, master = started(3)
    assert pool.next_due() is None
    pool.recycle(pool.slots[1].child, "max_jobs", 42.0)
    assert pool.next_due() == 42.0
    master.step(42.0)
    assert pool.next_due() is None  # the successor is starting: nothing to wake up for
    quarantine(pool, 2, 50.0)
    assert pool.next_due() == 55.0


def test_next_due_includes_circuit_until() -> None:
    # Quarantine cooldown longer than the circuit's, so circuit_until is the earliest.
    pool, master = open_circuit(quarantine={"cooldown": 60})
    assert pool.next_due() == pool.circuit_until == 110.0
    assert spawns(master.step(109.9)) == []
    assert [a.probe for a in spawns(master.step(110.0))] == [True]


def test_next_due_is_not_in_the_past_while_open_and_nothing_is_due() -> None:
    pool, master = open_circuit()
    now = 106.0
    assert spawns(master.step(now)) == []  # nothing to do until 110
    assert pool.next_due() > now


def test_next_due_is_not_in_the_past_while_surge_holds_a_replacement_back() -> None:
    pool, master = started(4, max_surge=1)
    pool.recycle(pool.slots[0].child, "max_jobs", 10.0)
    pool.recycle(pool.slots[1].child, "max_jobs", 10.0)
    assert len(spawns(master.step(10.0))) == 1
    now = 11.0
    assert spawns(master.step(now)) == []
    assert pool.next_due() is None or pool.next_due() > now


def test_a_reload_while_probing_does_not_wedge_the_circuit() -> None:
    pool, master = open_circuit()
    probe = start_probe(pool, master)
    master.now = 112.5
    retired = [a.child for a in pool.roll() if isinstance(a, Retire)]
    assert retired == [probe]
    master.retire(probe)
    assert master.exit(probe, 0).kind is ExitKind.STOPPED
    probes = []
    for t in (113.0, 200.0, 1000.0):
        probes += [a for a in spawns(master.step(t)) if a.probe]
    assert pool.probe is not probe
    assert probes, "no probe after the reload"


def test_a_probe_that_dies_after_ready_is_followed_by_another_probe() -> None:
    pool, master = open_circuit(1)
    probe = start_probe(pool, master)
    master.now = 111.0
    master.ready(probe)
    master.reap_retired()
    master.now = 112.0
    master.exit(probe, EXIT_CRASH)  # e.g. a job that calls os._exit(1)
    assert pool.circuit == "open" and pool.probe is None
    refill = spawns(master.step(113.0))
    assert len(refill) == 1
    master.ready(pool.slots[0].child)
    later = spawns(master.step(pool.circuit_until + 1.0))
    assert refill[0].probe or any(a.probe for a in later)


def test_a_probe_whose_fork_failed_is_tried_again() -> None:
    pool, master = open_circuit()
    actions = pool.plan(110.0)  # the arbiter's fork fails: nothing is placed
    assert [a.probe for a in spawns(actions)] == [True]
    later = []
    for t in (120.0, 200.0, 1000.0):
        later += [a for a in spawns(master.step(t)) if a.probe]
    assert later, "the probe is never retried"


# ---------------------------------------------------------------------------------------------
# Poison jobs


def test_job_key_uses_unique_else_handle_and_the_function() -> None:
    by_unique = job_key("resize", "order-17", "H:host:1")
    assert job_key("resize", "order-17", "H:host:2") == by_unique  # a retry has a new handle
    assert job_key("resize", "order-18", "H:host:1") != by_unique
    assert job_key("thumb", "order-17", "H:host:1") != by_unique  # differs per function
    by_handle = job_key("resize", "", "H:host:1")
    assert job_key("resize", "", "H:host:1") == by_handle
    assert job_key("resize", "", "H:host:2") != by_handle
    assert by_handle != by_unique
    assert 0 <= by_unique < 2 ** 64


def test_poison_table_add_and_contains() -> None:
    table = PoisonTable(capacity=8)
    try:
        a, b = job_key("f", "a", ""), job_key("f", "b", "")
        assert a not in table  # an empty table
        table.add(a)
        assert a in table and b not in table
        # The lookup above cached the table; a later add moves seq and is seen.
        table.add(b)
        assert b in table and a in table
    finally:
        table.close()


def test_poison_table_ring_overwrites_the_oldest_at_capacity() -> None:
    table = PoisonTable(capacity=3)
    try:
        keys = [job_key("f", str(i), "") for i in range(5)]
        for k in keys[:3]:
            table.add(k)
        assert all(k in table for k in keys[:3])
        table.add(keys[3])
        assert keys[0] not in table
        assert all(k in table for k in keys[1:4])
        table.add(keys[4])
        assert keys[1] not in table
        assert all(k in table for k in keys[2:5])
    finally:
        table.close()


def _listed(poison: PoisonList) -> list[bytes]:
    """The lines a shim reads (an open of its own, as each command child gets)."""
    with open(f"/proc/self/fd/{poison.fd}", "rb") as f:
        return f.read().splitlines(keepends=True)


def test_poison_list_holds_each_job_once_by_its_shim_key() -> None:
    """The list holds what a shim looks up: the key it sent, else the hex sha1 of function,
    "u" and the unique; a job with neither is not listable (its handle alone could name
    another server's job); one listed twice is one line."""
    poison = PoisonList()
    try:
        assert _listed(poison) == []
        by_unique = shim_key("resize", "img-7", "H:a:1")
        assert by_unique == hashlib.sha1(b"resize\0u\0img-7").hexdigest()
        assert poison.add(by_unique)
        assert not poison.add(shim_key("resize", "img-7", "H:a:2"))  # the same unique
        sent = hashlib.sha1(b"resize\0h\0H:a:3\0" + hashlib.sha1(b"data").hexdigest()
                            .encode()).hexdigest()
        assert shim_key("resize", "", "H:a:3", sent) == sent
        assert poison.add(sent)
        assert shim_key("resize", "", "H:a:3") is None
        assert shim_key("f\ud800", "u\udfff", "H") is not None  # (no UnicodeEncodeError)
        assert _listed(poison) == [by_unique.encode() + b"\n", sent.encode() + b"\n"]
        assert sent in poison and shim_key("resize", "img-8", "H:a:3") not in poison
        assert os.fstat(poison.fd).st_mode & 0o777 == 0o400  # no worker reopens it to write
    finally:
        poison.close()


def test_poison_list_keeps_the_newest_half_when_full() -> None:
    poison = PoisonList(capacity=4)
    keys = [hashlib.sha1(str(i).encode()).hexdigest() for i in range(5)]
    try:
        for key in keys:
            poison.add(key)
        assert _listed(poison) == [k.encode() + b"\n" for k in keys[2:]]
        assert keys[0] not in poison and keys[4] in poison
        assert poison.add(keys[0])  # forgotten: listed again
        assert len(_listed(poison)) == 4
    finally:
        poison.close()


def test_a_replaced_poison_list_only_grows_until_it_would_pass_its_capacity() -> None:
    """A reload rewrites a pool's list (replace): the shims notice a change by its size, so
    fewer keys are padded with empty lines to one byte more than before, which the shims'
    split skips; more keys simply grow it. Only a list that would pass its capacity's bytes
    is written smaller."""
    poison = PoisonList(capacity=4)
    keys = [hashlib.sha1(str(i).encode()).hexdigest() for i in range(5)]
    try:
        for key in keys[:3]:
            poison.add(key)
        assert not poison.replace(keys[:3])  # (unchanged: not rewritten)
        sizes = [os.fstat(poison.fd).st_size]
        for wanted in ([keys[1]], [], [keys[0]], keys[:4]):
            assert poison.replace(wanted)
            sizes.append(os.fstat(poison.fd).st_size)
            assert [line for line in _listed(poison) if line != b"\n"] == [
                k.encode() + b"\n" for k in wanted]
            assert all(k in poison for k in wanted) and keys[4] not in poison
        assert sizes == sorted(set(sizes)), sizes
        assert poison.replace(keys[:3])  # 4 lines' bytes would be passed: smaller
        assert _listed(poison) == [k.encode() + b"\n" for k in keys[:3]]
        poison.add(keys[4])
        assert _listed(poison)[-1] == keys[4].encode() + b"\n"
        assert not poison.replace([keys[4], keys[2], keys[1], keys[0]])  # (the same set)
        # The newest 4 of these, as full as it is now: it cannot grow, so the newest half.
        assert poison.replace(keys + keys)
        assert _listed(poison) == [k.encode() + b"\n" for k in keys[3:]]
    finally:
        poison.close()


def test_a_poison_list_full_of_padding_drops_the_padding_not_keys() -> None:
    poison = PoisonList(capacity=4)
    keys = [hashlib.sha1(str(i).encode()).hexdigest() for i in range(4)]
    try:
        for key in keys[:3]:
            poison.add(key)
        for _ in range(10):  # reloads that un-list a job and list it again: padding
            poison.replace(keys[:2])
            poison.replace(keys[:3])
        assert os.fstat(poison.fd).st_size == 3 * 41 + 20
        poison.add(keys[3])  # (over 4 lines' bytes: rewritten, 3 keys are not a full list)
        assert _listed(poison) == [k.encode() + b"\n" for k in keys]
    finally:
        poison.close()


# ---------------------------------------------------------------------------------------------
# Config


FUNCTIONS_POOL = """\
pools:
  mail:
    functions:
      send: "examples.text:reverse"
      slow:
        callable: "examples.text:upper"
        timeout: 30s
      quick: {callable: "examples.text:reverse", timeout: 500ms}
      plain: {callable: "examples.text:reverse"}
"""


def config_error(text: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse(text, CONFIG_PATH)
    return info.value


def test_function_mappings_fill_timeouts() -> None:
    pool = parse(FUNCTIONS_POOL, CONFIG_PATH).pools["mail"]
    assert pool.functions == {"send": "examples.text:reverse", "slow": "examples.text:upper",
                              "quick": "examples.text:reverse", "plain": "examples.text:reverse"}
    assert pool.timeouts == {"slow": 30.0, "quick": 0.5}


@pytest.mark.parametrize(("function", "path", "message"), [
    ('{callable: "a.b:c", timeout: 0}', "pools.mail.functions.f.timeout", "timeout > 0"),
    ('{callable: "a.b:c", timeout: "0s"}', "pools.mail.functions.f.timeout", "timeout > 0"),
    ('{callable: "a.b:c", timeout: abc}', "pools.mail.functions.f.timeout", "duration"),
    ('{callable: "a.b:c", timeout: -1}', "pools.mail.functions.f.timeout", "duration"),
    ('{callable: "a.b:c", retries: 3}', "pools.mail.functions.f.retries", "unknown key"),
    ('{timeout: 5}', "pools.mail.functions.f", "module:callable"),
    ('{callable: "nocolon", timeout: 5}', "pools.mail.functions.f", "module:callable"),
])
def test_bad_function_mappings(function: str, path: str, message: str) -> None:
    err = config_error(f"pools:\n  mail:\n    functions:\n      f: {function}\n")
    (problem,) = err.problems
    assert problem.path == path
    assert message in problem.message
    assert problem.line == 4


@pytest.mark.parametrize(("raw", "expected"), [
    ("512M", 512 * 2 ** 20), ("2G", 2 * 2 ** 30), ("300MiB", 300 * 2 ** 20),
    (1048576, 1048576), ("64k", 64 * 1024), ("1.5G", int(1.5 * 2 ** 30)), ("4096", 4096),
    ("100B", 100),
])
def test_size_accepts(raw: object, expected: int) -> None:
    assert size(raw) == expected


@pytest.mark.parametrize("raw", ["lots", 0, "0M", -1, "-5M", True, 1.5, "", "5X"])
def test_size_refuses(raw: object) -> None:
    with pytest.raises(Invalid, match="size"):
        size(raw)


def test_size_never_returns_zero() -> None:
    with pytest.raises(Invalid):
        size("0.5")


def test_max_memory_in_a_pool() -> None:
    assert pool_config(max_memory="512M").max_memory == 512 * 2 ** 20
    assert pool_config(max_memory=1048576).max_memory == 1048576
    err = config_error(yaml.safe_dump({"pools": {"mail": {
        "functions": {"send": "a.b:c"}, "max_memory": "lots"}}}))
    assert [p.path for p in err.problems] == ["pools.mail.max_memory"]
    assert "512M" in err.problems[0].message


@pytest.mark.parametrize("ratio", [1.5, -0.1, "most"])
def test_quarantine_ratio_out_of_range_is_refused(ratio: object) -> None:
    text = yaml.safe_dump({"pools": {"mail": {"functions": {"send": "a.b:c"},
                                              "quarantine": {"ratio": ratio}}}})
    (problem,) = config_error(text).problems
    assert problem.path == "pools.mail.quarantine.ratio"


def test_other_new_settings_are_validated() -> None:
    text = yaml.safe_dump({"pools": {"mail": {
        "functions": {"send": "a.b:c"}, "recycle_jitter": 0.6, "max_jobs": 0,
        "poison_after": -1, "circuit": {"ratio": 2}, "quarantine": {"window": 0, "colour": 1},
        "timeout_grace": "soon"}}})
    paths = sorted(p.path for p in config_error(text).problems)
    assert paths == sorted([
        "pools.mail.recycle_jitter", "pools.mail.max_jobs", "pools.mail.poison_after",
        "pools.mail.circuit.ratio", "pools.mail.quarantine.window",
        "pools.mail.quarantine.colour", "pools.mail.timeout_grace"])


def test_defaults_of_the_new_settings() -> None:
    pool = parse("pools:\n  mail:\n    functions:\n      send: \"a.b:c\"\n",
                 CONFIG_PATH).pools["mail"]
    assert pool.timeout_grace == 5.0
    assert pool.timeouts == {}
    assert pool.quarantine == QuarantineConfig(enabled=True, window=20, min_jobs=5, ratio=0.8,
                                               fast=1.0, cooldown=5.0, cooldown_max=300.0,
                                               probation_jobs=3)
    assert pool.circuit == CircuitConfig(ratio=0.6, cooldown=10.0, cooldown_max=300.0)
    assert pool.poison_after == 2
    assert (pool.max_jobs, pool.max_memory, pool.max_lifetime) == (None, None, None)
    assert pool.recycle_jitter == 0.1


def test_quarantine_and_circuit_blocks_merge_key_by_key() -> None:
    text = """\
quarantine: {ratio: 0.5, fast: 200ms}
circuit: {cooldown: 1m}
max_lifetime: 1h
pools:
  mail:
    functions: {send: "a.b:c"}
    quarantine: {window: 10, enabled: false}
    max_jobs: 500
  other:
    functions: {send: "a.b:c"}
"""
    cfg = parse(text, CONFIG_PATH)
    mail, other = cfg.pools["mail"], cfg.pools["other"]
    assert mail.quarantine == QuarantineConfig(enabled=False, window=10, ratio=0.5, fast=0.2)
    assert other.quarantine == QuarantineConfig(ratio=0.5, fast=0.2)
    assert mail.circuit == other.circuit == CircuitConfig(cooldown=60.0)
    assert mail.max_lifetime == other.max_lifetime == 3600.0
    assert (mail.max_jobs, other.max_jobs) == (500, None)


def test_min_jobs_above_window_is_refused() -> None:
    text = yaml.safe_dump({"pools": {"mail": {"functions": {"send": "a.b:c"},
                                              "quarantine": {"window": 5, "min_jobs": 10}}}})
    config_error(text)


# ---------------------------------------------------------------------------------------------
# Worker: pause/resume, poison refusal, soft timeouts


def test_pause_resets_abilities_and_no_grab_follows_a_reply(wired) -> None:
    worker, server = wired()
    conn = worker.conns[0]
    worker.pause()
    assert not worker.paused  # a signal handler only records the wish
    worker._apply_pause()
    assert worker.paused
    # No RESET while a GRAB is unanswered: gearmand would requeue a job it is assigning to
    # us at that moment, and the job would run twice.
    assert server.received() == []
    assert conn.state is ConnState.GRABBING
    # The GRAB is answered with a job: it runs, its result goes out, then the RESET; no GRAB.
    assign(worker, b"echo")
    assert server.received() == [(Packet.WORK_COMPLETE, (b"H:gm:1", b"hello")),
                                 (Packet.RESET_ABILITIES, ())]
    assert conn.state is ConnState.IDLE
    worker._tick(worker.clock())
    worker._apply_pause()
    assert server.received() == []
    # A NO_JOB or NOOP while paused does not grab either.
    worker._handle(conn, Packet.NOOP, ())
    worker._handle(conn, Packet.NO_JOB, ())
    assert conn.state is ConnState.IDLE
    assert server.received() == []


def test_resume_sends_can_do_for_each_function_then_grab(wired) -> None:
    worker, server = wired()
    conn = worker.conns[0]
    worker.pause()
    worker._apply_pause()
    worker._handle(conn, Packet.NO_JOB, ())
    assert server.received() == [(Packet.RESET_ABILITIES, ())]
    worker.resume()
    worker._apply_pause()
    assert not worker.paused
    assert server.received() == [(Packet.CAN_DO, (b"echo",)), (Packet.CAN_DO, (b"upper",)),
                                 (Packet.GRAB_JOB_ALL, ())]
    assert conn.state is ConnState.GRABBING
    assign(worker, b"upper")
    assert server.received() == [(Packet.WORK_COMPLETE, (b"H:gm:1", b"HELLO")),
                                 (Packet.GRAB_JOB_ALL, ())]


def test_pause_asked_during_a_job_holds_back_its_grab(wired) -> None:
    def quarantine_me(worker: Worker, server: Any, job: Job) -> bytes:
        worker.pause()  # what SIGUSR1 (or the child's quarantine) does mid-job
        return b"done"

    worker, server = wired(on_job=quarantine_me, function="echo")
    assign(worker, b"echo")
    assert server.received() == [(Packet.WORK_COMPLETE, (b"H:gm:1", b"done")),
                                 (Packet.RESET_ABILITIES, ())]
    assert worker.conns[0].state is ConnState.IDLE
    worker._apply_pause()
    assert server.received() == []


def test_pause_taken_back_before_it_applied_picks_up_the_grab(wired) -> None:
    def flap(worker: Worker, server: Any, job: Job) -> bytes:
        worker.pause()
        return b"ok"

    worker, server = wired(on_job=flap, function="echo")
    assign(worker, b"echo")
    assert server.received() == [(Packet.WORK_COMPLETE, (b"H:gm:1", b"ok")),
                                 (Packet.RESET_ABILITIES, ())]
    worker.resume()
    worker._apply_pause()
    assert server.received() == [(Packet.CAN_DO, (b"echo",)), (Packet.GRAB_JOB_ALL, ())]
    assert worker.conns[0].state is ConnState.GRABBING and not worker.paused


def test_a_sleeping_connection_is_idled_by_pause_and_ignores_noop(wired) -> None:
    worker, server = wired()
    conn = worker.conns[0]
    conn.state = ConnState.SLEEPING
    worker.pause()
    worker._apply_pause()
    assert server.received() == [(Packet.RESET_ABILITIES, ())]
    assert conn.state is ConnState.IDLE
    worker._handle(conn, Packet.NOOP, ())
    assert server.received() == []


def test_poison_job_is_failed_without_running(wired) -> None:
    ran: list[bytes] = []
    hooks = RecordingHooks()
    poisoned = {job_key("echo", "bad-1", "")}

    def echo(job: Job) -> bytes:
        ran.append(job.data)
        return job.data

    worker, server = wired(functions={"echo": echo}, hooks=hooks,
                           is_poison=lambda job: job_key(job.function, job.unique,
                                                         job.handle) in poisoned)
    assign(worker, b"echo", b"H:gm:7", b"bad-1", b"boom")
    assert ran == []
    assert server.received() == [(Packet.WORK_FAIL, (b"H:gm:7",)), (Packet.GRAB_JOB_ALL, ())]
    assert hooks.refused == ["H:gm:7"] and hooks.started == [] and hooks.finished == []
    assert any(level == "error" and kw.get("unique") == "bad-1" and kw.get("size") == 4
               for level, _, kw in worker.log.records)
    assign(worker, b"echo", b"H:gm:8", b"good-1", b"fine")
    assert ran == [b"fine"]
    assert server.received() == [(Packet.WORK_COMPLETE, (b"H:gm:8", b"fine")),
                                 (Packet.GRAB_JOB_ALL, ())]


def test_soft_timeout_arms_the_timer_and_an_escaped_jobtimeout_fails_the_job(wired) -> None:
    timer = RecordingTimer()
    hooks = RecordingHooks()

    def slow(job: Job) -> bytes:
        assert timer.calls == [("start", 2.5)]  # armed before the job runs
        raise JobTimeout("ran past 2.5s")

    worker, server = wired(functions={"slow": slow, "echo": lambda job: job.data},
                           timeouts={"slow": 2.5}, timer=timer, hooks=hooks)
    assign(worker, b"slow", b"H:gm:3")
    assert timer.calls == [("start", 2.5), ("stop", None)]
    packets = server.received()
    assert [p[0] for p in packets] == [Packet.WORK_WARNING, Packet.WORK_FAIL,
                                       Packet.GRAB_JOB_ALL]
    assert packets[0][1][1].startswith(b"JobTimeout: ran past 2.5s")
    assert hooks.finished == [("H:gm:3", False)]
    assign(worker, b"echo", b"H:gm:4")  # no timeout: the timer is not touched
    assert timer.calls == [("start", 2.5), ("stop", None)]
    assert hooks.finished[-1] == ("H:gm:4", True)


def test_job_key_without_unique_includes_server_and_payload() -> None:
    """Handles restart at 1 with gearmand and repeat across servers: without a unique id the
    key also takes the server and a digest of the payload."""
    from gearvisor.shm.poison import job_key as key

    base = key("resize", "", "H:gm:1", b"img-1", "127.0.0.1:4730")
    assert base == key("resize", "", "H:gm:1", b"img-1", "127.0.0.1:4730")
    assert base != key("resize", "", "H:gm:1", b"img-2", "127.0.0.1:4730")
    assert base != key("resize", "", "H:gm:1", b"img-1", "127.0.0.1:4731")
    # With a unique id, only the function and the unique count.
    assert key("resize", "u1", "H:gm:1", b"a", "s1") == key("resize", "u1", "H:gm:9", b"b", "s2")


def test_a_soft_timeout_never_interrupts_a_write_in_progress() -> None:
    """SIGALRM during the runtime's own send: JobTimeout waits until the write is done."""
    import signal as _signal

    from gearvisor.child.python import _AlarmTimer
    from gearvisor.job import JobTimeout

    old = _signal.getsignal(_signal.SIGALRM)
    try:
        timer = _AlarmTimer()
        timer.start(0.005)
        timer.hold()  # the worker is in sendall()
        deadline = time.monotonic() + 5.0
        while not timer.pending and time.monotonic() < deadline:
            time.sleep(0.001)  # a bounded poll: the signal handler runs between bytecodes
        assert timer.pending, "the alarm did not fire"
        with pytest.raises(JobTimeout):
            timer.release()  # raised here, after the packet went out
        assert timer.job_deadline is None and not timer.pending
        timer.release()  # nothing left to raise
    finally:
        _signal.setitimer(_signal.ITIMER_REAL, 0)
        _signal.signal(_signal.SIGALRM, old)


def test_running_jobs_count_deaths_not_yet_reaped() -> None:
    """A child that died mid-job leaves the job's key in its slot; the next child offered
    that job counts it (its own slot aside, a live child's slot aside: gearmand re-queues the
    job of a live worker that lost its connection), whatever the byte alignment."""
    import os as _os

    from gearvisor.shm.poison import PoisonTable, RunningJobs

    dead = _os.fork()
    if dead == 0:
        _os._exit(0)
    _os.waitpid(dead, 0)  # a pid that is gone
    running = RunningJobs(capacity=8)
    a, b, c = running.allocate(), running.allocate(), running.allocate()
    assert (a, b, c) == (0, 1, 2)
    key = 0x0102030405060708
    running.claim(a, dead)
    running.set(a, key)  # a ran it, then died
    assert running.others(key, c) == 1
    assert running.others(key, a) == 0  # its own slot does not count
    running.claim(b, _os.getpid())  # a live child holding the key (lost its connection)
    running.set(b, key)
    assert running.others(key, c) == 1
    running.set(b, 0)
    running.forget(a)  # the master killed it on purpose: no death on the job
    assert running.others(key, c) == 0
    running.set(a, key)
    running.release(a)  # reaped, strike recorded: the slot is free and empty
    assert running.others(key, c) == 0
    assert running.allocate() == a  # freed slots are reused
    strikes = PoisonTable(capacity=4)
    strikes.add(key)
    strikes.add(key)
    strikes.add(7)
    assert strikes.strikes(key) == 2 and strikes.strikes(7) == 1 and strikes.strikes(8) == 0
    for _ in range(4):
        strikes.add(9)  # the ring forgets the oldest strikes
    assert strikes.strikes(key) == 0 and strikes.strikes(9) == 4


def test_a_reload_retunes_cooldowns_and_keeps_the_streaks() -> None:
    pool, _ = started(5)
    assert quarantine(pool, 2, 100.0)[0] == 5.0  # streak 1 at the old cooldown
    pool.circuit_backoff.failure(0, 0)  # the circuit opened once
    pool.roll(pool_config(5, quarantine={"cooldown": 1}, circuit={"cooldown": 3}))
    no_jitter(pool)
    assert pool.slots[2].quarantines.failures == 1
    assert pool.slots[2].quarantines.failure(0, 0) == 2.0  # new cooldown, streak kept: 1 x 2
    assert pool.circuit_backoff.failures == 1
    assert pool.circuit_backoff.failure(0, 0) == 6.0


def test_a_pause_whose_reset_cannot_be_sent_leaves_the_connection_down_to_reconnect(
        wired) -> None:
    """gearmand went away as the worker paused: the connection must end DOWN (reconnected
    later), never IDLE with no socket, which nothing would ever reconnect."""
    worker, server = wired()
    conn = worker.conns[0]
    conn.state = ConnState.EMPTY
    server.sock.close()  # the job server is gone
    worker.pause()
    worker._apply_pause()
    assert conn.sock is None
    assert conn.state is ConnState.DOWN
    assert conn.attempts == 1  # a reconnect is scheduled


@pytest.mark.parametrize("moment", ["before strikes", "between", "after others",
                                    "warm, before others", "warm, after others"])
def test_a_death_moved_from_its_slot_to_the_strikes_meanwhile_counts_exactly_once(
        moment: str) -> None:
    """The master moves a death from the dead child's running slot to the strike table
    while another child counts the deaths on that job (a job gearmand re-handed at once):
    whenever it lands, the count is 1, never 0 (one more crash) or 2 (poison too early)."""
    import os as _os

    from gearvisor.shm.poison import RunningJobs

    dead = _os.fork()
    if dead == 0:
        _os._exit(0)
    _os.waitpid(dead, 0)
    running, table = RunningJobs(capacity=4), PoisonTable(capacity=4)
    try:
        a, me = running.allocate(), running.allocate()
        key = job_key("crash", "", "H:x:1")
        running.claim(a, dead)
        running.set(a, key)  # it died running the job; not reaped yet
        moved = []

        def move() -> None:  # the master, reaping it (health._strike)
            if not moved:
                moved.append(True)
                table.add(key, also=lambda: running.release(a))

        real_strikes = table.strikes

        def strikes(k: int) -> int:
            if moment == "before strikes":
                move()
            got = real_strikes(k)
            if moment == "between":
                move()
            return got

        def others(k: int, index: int) -> int:
            if moment == "warm, before others":
                move()
            got = running.others(k, index)
            if moment.endswith("after others"):
                move()
            return got

        if moment.startswith("warm"):
            # The child's counts are current and hold no strike: deaths() asks only the
            # slots (no strikes() call), and must still see a move that crosses that.
            assert real_strikes(key) == 0
        table.strikes = strikes  # type: ignore[method-assign]
        assert table.deaths(key, others, me) == 1
        assert moved and table.deaths(key, others, me) == 1  # and after the move, settled
    finally:
        running.close()
        table.close()


def _window_by_hand(window: int, min_jobs: int, ratio: float, fast: float, probation: int,
                    jobs: list[tuple[bool, float]]) -> list[bool]:
    """ErrorWindow's decisions recomputed from the whole history (no running counts)."""
    decided = []
    history: list[bool] = []  # fast failures, oldest first
    left = probation
    for ok, seconds in jobs:
        fast_fail = not ok and seconds < fast
        history.append(fast_fail)
        recent = history[-window:]
        if left > 0:
            decided.append(fast_fail)
            if ok:
                left -= 1
            continue
        n, f = len(recent), sum(recent)
        decided.append(bool(f and n >= min_jobs and f >= ratio * n))
    return decided


@pytest.mark.parametrize("seed", range(40))
def test_the_error_window_decides_as_its_whole_history_says(seed: int) -> None:
    # The window keeps running counts, with a shortcut for a success while no fast failure
    # is in it: both must give what recomputing from the history gives, job by job.
    rng = random.Random(seed)
    window, min_jobs = rng.randint(1, 12), rng.randint(1, 12)
    ratio, fast, probation = rng.choice((0.2, 0.5, 0.9, 1.0)), 0.01, rng.choice((0, 0, 3))
    w = ErrorWindow(window, min_jobs, ratio, fast, probation)
    jobs = [(rng.random() < rng.choice((0.3, 0.7, 0.95)), rng.choice((0.001, 0.5)))
            for _ in range(rng.randint(1, 60))]
    got = [w.record(ok, seconds) is not None for ok, seconds in jobs]
    assert got == _window_by_hand(window, min_jobs, ratio, fast, probation, jobs)
