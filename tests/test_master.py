"""The whole master, component by component, on a fake OS and a fake clock: no process.

A real Arbiter (with real pools, scoreboards, loop, bus and the components a test needs)
runs on tests/fakeos.py's FakeSystem: fork() hands out made-up pids and real pipes, and
the test plays each child by writing its messages into the pipe and deciding when it exits.
Time moves only when the test moves the FakeClock, so backoff, surge, escalation and
cooldowns are checked to the exact instant, deterministically and in milliseconds. The
tests assert on what the fake OS was asked (forks, signals, their targets and order), on
the arbiter's pools and children, and on the events published on the bus.
"""

from __future__ import annotations

import collections
import hashlib
import io
import json
import os
import signal
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from fakeos import FakeChild, FakeMaster, signal_status

from gearvisor.config import load
from gearvisor.master import bus as ev
from gearvisor.master.alerts import Alerts
from gearvisor.master.arbiter import HANDLED_SIGNALS, MAX_FORKS_PER_PASS, RETIRE_SIGNAL
from gearvisor.master.commands import Commands
from gearvisor.master.component import Component
from gearvisor.master.exitlog import ExitLog
from gearvisor.master.groups import Groups
from gearvisor.master.health import HEALTH_INTERVAL, Health
from gearvisor.master.probe import Probe
from gearvisor.messages import (
    BootError,
    JobEnded,
    JobStarted,
    ProbationPassed,
    Quarantined,
    Ready,
    Recycle,
)
from gearvisor.policy.child import EXIT_BOOT_ERROR, ChildState
from gearvisor.policy.pool import ExitKind, Pool, roll_results
from gearvisor.shm.poison import job_key, shim_key

TICK = 1 / 64  # a moment, exact in binary: "just before" a deadline
BOOT_REASON = "function f: cannot import module 'examples.nope'"

Build = Callable[..., FakeMaster]


def pool_settings(**overrides: Any) -> dict[str, Any]:
    """One pool `web` that imports nothing in the master; backoff without jitter, so its
    delays are exact."""
    settings: dict[str, Any] = {"processes": 1, "functions": {"f": "examples.text:echo"},
                                "watch": False}
    settings["backoff"] = {"jitter": 0, **overrides.pop("backoff", {})}
    settings.update(overrides)
    return settings


def write_config(path: Path, **overrides: Any) -> None:
    path.write_text(yaml.safe_dump({"watch_config": False,
                                    "pools": {"web": pool_settings(**overrides)}}))


@pytest.fixture
def build(tmp_path: Path, log: io.StringIO) -> Iterator[Build]:
    """build(components, **pool settings) -> a FakeMaster on a config file in tmp_path,
    closed (every fd and mapping released) after the test."""
    made: list[FakeMaster] = []
    fds = open_fds()

    def make(components: tuple[Component, ...] = (), **overrides: Any) -> FakeMaster:
        path = tmp_path / "gearvisor.yaml"
        write_config(path, **overrides)
        master = FakeMaster(str(path), components)
        made.append(master)
        return master

    try:
        yield make
    finally:
        for master in made:
            master.close()
    # Every pipe of a reaped child was closed by the arbiter (close() took the live ones).
    assert open_fds() == fds


def open_fds() -> set[int]:
    return {int(fd) for fd in os.listdir("/proc/self/fd")}


def lines(log: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in log.getvalue().splitlines()]


def web(m: FakeMaster) -> Pool:
    return m.arbiter.pools["web"]


def serving(pool: Pool) -> int:
    """Slots whose child is ready: the pool's capacity now."""
    return sum(1 for s in pool.slots if s.child is not None and s.child.state is ChildState.READY)


def start_ready(m: FakeMaster) -> list[FakeChild]:
    """The first pass forks the pool; every child is ready: a Python child says so, a
    command child lives past its pool's startsecs."""
    children = m.start_ready()
    assert serving(web(m)) == len(children)
    return children


def pids(children: list[FakeChild]) -> list[int]:
    return [c.pid for c in children]


# -- spawn ------------------------------------------------------------------------------------


def test_a_pool_of_three_forks_three_children_each_ready_once_it_says_so(build: Build) -> None:
    m = build(processes=3)
    m.step()
    forked = m.system.forked
    assert len(forked) == 3
    pool = web(m)
    assert [s.child.pid for s in pool.slots] == pids(forked)
    assert sorted(m.arbiter.children) == pids(forked)
    # The master's handlers must never run in a child: forked with them blocked.
    assert all(set(c.blocked) == set(HANDLED_SIGNALS) for c in forked)
    assert [e.child.pid for e in m.of(ev.ChildSpawned)] == pids(forked)
    assert all(s.child.state is ChildState.STARTING for s in pool.slots)

    forked[1].say(Ready())
    m.step()
    assert [s.child.state for s in pool.slots] == [
        ChildState.STARTING, ChildState.READY, ChildState.STARTING]
    assert [e.child.pid for e in m.of(ev.ChildReady)] == [forked[1].pid]
    assert m.of(ev.FleetReady) == []  # not before every slot is ready

    forked[0].say(Ready())
    forked[2].say(Ready())
    m.step()
    assert serving(pool) == 3
    assert [e.child.pid for e in m.of(ev.ChildReady)] == pids([forked[1], forked[0], forked[2]])
    assert len(m.of(ev.FleetReady)) == 1
    m.advance(60.0)
    assert len(forked) == 3 and m.system.sent == []  # a settled pool forks and kills nothing


# -- crash and backoff ------------------------------------------------------------------------


def test_a_crashed_child_is_replaced_only_after_its_backoff_delay(build: Build) -> None:
    m = build(processes=1, backoff={"initial": 2.0})
    (first,) = start_ready(m)
    m.advance(1.0)  # up for less than reset_after: the crash starts a streak
    crashed_at = m.clock.now
    first.exit(1)
    m.step()
    (exited,) = m.of(ev.ChildExited)
    assert exited.child.pid == first.pid and exited.status == 1 << 8
    assert exited.decision.kind is ExitKind.CRASHED and exited.decision.restart_in == 2.0
    assert web(m).slots[0].child is None and first.pid not in m.arbiter.children

    m.advance_to(crashed_at + 2.0 - TICK)
    assert len(m.system.forked) == 1
    m.advance_to(crashed_at + 2.0)
    assert len(m.system.forked) == 2
    second = m.system.forked[1]
    assert web(m).slots[0].child.pid == second.pid
    assert m.system.sent == []  # nothing was signalled: the child died by itself

    # Dying again before it is even ready doubles the delay.
    second.exit(1)
    m.step()
    assert m.of(ev.ChildExited)[-1].decision.restart_in == 4.0
    again = m.clock.now
    m.advance_to(again + 4.0 - TICK)
    assert len(m.system.forked) == 2
    m.advance_to(again + 4.0)
    assert len(m.system.forked) == 3


def test_a_boot_error_streak_backs_off_growing_delays_and_is_logged_once(
        build: Build, log: io.StringIO) -> None:
    m = build((ExitLog(),), processes=1, backoff={"initial": 1.0, "max": 30.0})
    m.step()
    delays = []
    for attempt in range(5):
        child = m.system.forked[-1]
        child.say(BootError(BOOT_REASON))
        child.exit(EXIT_BOOT_ERROR)
        m.step()
        decision = m.of(ev.ChildExited)[-1].decision
        assert decision.kind is ExitKind.BOOT_ERROR and decision.streak == attempt + 1
        delays.append(decision.restart_in)
        failed_at = m.clock.now
        m.advance_to(failed_at + decision.restart_in - TICK)
        assert len(m.system.forked) == attempt + 1, "forked before the backoff delay"
        m.advance_to(failed_at + decision.restart_in)
        assert len(m.system.forked) == attempt + 2
    assert delays == [1.0, 2.0, 4.0, 8.0, 16.0]
    booting = [x for x in lines(log) if x["event"].startswith("child failed to boot")]
    assert len(booting) == 1, booting
    assert booting[0]["reason"] == BOOT_REASON and booting[0]["streak"] == 1
    assert booting[0]["level"] == "error" and booting[0]["retry_in"] == 1.0

    # A child that stays up past reset_after ends the streak: the next failure is a new
    # streak, logged again, with the first delay.
    survivor = m.system.forked[-1]
    survivor.say(Ready())
    m.advance(10.0)
    survivor.say(BootError(BOOT_REASON))
    survivor.exit(EXIT_BOOT_ERROR)
    m.step()
    decision = m.of(ev.ChildExited)[-1].decision
    assert (decision.streak, decision.restart_in) == (1, 1.0)
    booting = [x for x in lines(log) if x["event"].startswith("child failed to boot")]
    assert [x["streak"] for x in booting] == [1, 1]


# -- rolls ------------------------------------------------------------------------------------


def test_a_roll_with_surge_one_retires_each_old_child_after_its_successor_is_ready(
        build: Build, tmp_path: Path) -> None:
    m = build(processes=4, max_surge=1)
    old = start_ready(m)
    pool = web(m)

    def step() -> None:
        m.step()
        assert serving(pool) == 4, "capacity dipped"
        assert sum(1 for s in pool.slots if s.successor is not None) <= 1, "surge exceeded"

    write_config(tmp_path / "gearvisor.yaml", processes=4, max_surge=1,
                 env={"RELEASE": "2"})
    assert m.arbiter.reload("test") is None
    assert pool.generation == 2 and pool.config.env == {"RELEASE": "2"}
    step()
    for i, retiring in enumerate(old):
        assert len(m.system.forked) == 5 + i  # one successor at a time
        successor = m.system.forked[-1]
        assert pool.slots[i].successor is not None
        assert pool.slots[i].successor.pid == successor.pid
        assert m.system.sent == [("kill", o.pid, RETIRE_SIGNAL) for o in old[:i]]
        step()  # nothing happens while the successor starts
        assert retiring.received == []
        successor.say(Ready())
        step()
        assert m.system.sent[-1] == ("kill", retiring.pid, RETIRE_SIGNAL)
        assert m.arbiter.children[retiring.pid][0].state is ChildState.DRAINING
        retiring.exit(0)
        step()
        assert m.of(ev.ChildExited)[-1].decision.kind is ExitKind.STOPPED
    assert len(m.system.forked) == 8
    # Each old child was told once, in slot order, and no one else was signalled.
    assert m.system.sent == [("kill", o.pid, RETIRE_SIGNAL) for o in old]
    assert [(s.child.pid, s.child.generation) for s in pool.slots] == [
        (c.pid, 2) for c in m.system.forked[4:]]
    assert sorted(m.arbiter.children) == pids(m.system.forked[4:])
    assert roll_results(m.arbiter.pools, ["web"]) == {"web": {"generation": 2, "result": "ok"}}
    assert m.of(ev.FleetReady)[-1].after_reload


def test_a_successor_that_dies_before_ready_halts_the_roll(
        build: Build, tmp_path: Path, log: io.StringIO) -> None:
    m = build((ExitLog(),), processes=2, max_surge=1)
    old = start_ready(m)
    pool = web(m)
    write_config(tmp_path / "gearvisor.yaml", processes=2, max_surge=1, env={"RELEASE": "2"})
    assert m.arbiter.reload("test") is None
    m.step()
    successor = m.system.forked[2]
    successor.exit(1)
    m.step()
    assert m.of(ev.ChildExited)[-1].decision.kind is ExitKind.ROLL_FAILED
    assert pool.halted == "web[0] of generation 2 crashed before it was ready"
    for _ in range(4):  # long past any backoff: still nothing
        m.advance(30.0)
    assert len(m.system.forked) == 3, "a halted roll started another successor"
    assert m.system.sent == [], "an old child was retired though its successor failed"
    assert [(s.child.pid, s.child.state, s.child.generation) for s in pool.slots] == [
        (c.pid, ChildState.READY, 1) for c in old]
    assert all(s.successor is None for s in pool.slots)
    assert roll_results(m.arbiter.pools, ["web"]) == {"web": {
        "generation": 2, "result": pool.halted, "error": pool.halted}}
    halted = [x for x in lines(log) if x["event"].startswith("roll halted")]
    assert len(halted) == 1 and halted[0]["child_pid"] == successor.pid


def test_a_reload_during_a_roll_retires_unready_successors_and_rolls_to_the_newest(
        build: Build, tmp_path: Path) -> None:
    m = build(processes=4, max_surge=2)
    old = start_ready(m)
    pool = web(m)
    config = tmp_path / "gearvisor.yaml"

    def step() -> None:
        m.step()
        assert serving(pool) == 4, "capacity dipped"
        assert sum(1 for s in pool.slots if s.successor is not None) <= 2, "surge exceeded"

    write_config(config, processes=4, max_surge=2, env={"RELEASE": "2"})
    assert m.arbiter.reload("first") is None
    step()
    s0, s1 = m.system.forked[4:6]
    s0.say(Ready())
    step()  # s0 takes slot 0, old[0] is retired, slot 2 gets a successor
    s2 = m.system.forked[6]
    assert m.system.sent == [("kill", old[0].pid, RETIRE_SIGNAL)]
    assert pool.slots[2].successor.pid == s2.pid

    write_config(config, processes=4, max_surge=2, env={"RELEASE": "3"})
    assert m.arbiter.reload("second") is None
    assert pool.generation == 3
    # The successors still starting serve nothing yet: retired at once, not waited for.
    assert m.system.sent[1:] == [("kill", s1.pid, RETIRE_SIGNAL), ("kill", s2.pid, RETIRE_SIGNAL)]
    step()
    # s1 ignores the signal and registers anyway: it was told to stop, it takes no slot.
    s1.say(Ready())
    step()
    assert all(e.child.pid != s1.pid for e in m.of(ev.ChildReady))
    assert all(s.child.pid != s1.pid for s in pool.slots)

    said_ready = {c.pid for c in (*old, s0, s1)}
    for _ in range(40):  # every child behaves from now on; bounded
        for child in m.system.forked:
            if child.alive and child.received:
                child.exit(0)
            elif child.alive and child.pid not in said_ready:
                said_ready.add(child.pid)
                child.say(Ready())
        step()
        if roll_results(m.arbiter.pools, ["web"]) is not None and len(m.arbiter.children) == 4:
            break
    assert roll_results(m.arbiter.pools, ["web"]) == {"web": {"generation": 3, "result": "ok"}}
    assert all(s.child.generation == 3 and s.child.state is ChildState.READY
               for s in pool.slots)
    told = collections.Counter(pid for _, pid, _ in m.system.sent)
    assert max(told.values()) == 1, f"a child was signalled twice: {m.system.sent}"
    assert {sig for _, _, sig in m.system.sent} == {RETIRE_SIGNAL}
    assert set(told) == {c.pid for c in (*old, s0, s1, s2)}
    assert len(m.system.forked) == 4 + 3 + 4  # gen 1, three of gen 2, gen 3


def test_a_retired_child_that_ignores_its_signal_is_sigkilled_at_graceful_timeout(
        build: Build, tmp_path: Path) -> None:
    m = build(processes=1, graceful_timeout=10.0)
    (old,) = start_ready(m)
    write_config(tmp_path / "gearvisor.yaml", processes=1, graceful_timeout=10.0,
                 env={"RELEASE": "2"})
    assert m.arbiter.reload("test") is None
    m.step()
    successor = m.system.forked[1]
    successor.say(Ready())
    m.step()
    retired_at = m.clock.now
    assert m.system.sent == [("kill", old.pid, RETIRE_SIGNAL)]
    m.advance_to(retired_at + 10.0 - TICK)  # it ignores the signal (a job that never ends)
    assert len(m.system.sent) == 1 and old.alive
    m.advance_to(retired_at + 10.0)
    assert m.system.sent[1:] == [("killpg", old.pid, signal.SIGKILL)]
    assert old.pid not in m.arbiter.children
    assert m.of(ev.ChildExited)[-1].decision.kind is ExitKind.STOPPED  # asked to: no crash
    m.advance(30.0)
    assert len(m.system.sent) == 2 and len(m.system.forked) == 2  # no replacement, no resend


# -- fork failures ----------------------------------------------------------------------------


def fork_failures(log: io.StringIO) -> int:
    return sum(1 for x in lines(log) if x["event"] == "fork failed")


def test_a_failed_fork_of_a_new_child_is_retried_after_the_backoff_delay(
        build: Build, log: io.StringIO) -> None:
    m = build(processes=1, backoff={"initial": 2.0})
    m.system.fail_forks = 1
    m.step()
    failed_at = m.clock.now
    assert m.system.fork_attempts == 1 and m.system.forked == []
    for _ in range(5):  # passes of the loop at the same instant: no retry yet
        m.step()
    m.advance_to(failed_at + 2.0 - TICK)
    assert m.system.fork_attempts == 1 and fork_failures(log) == 1
    m.advance_to(failed_at + 2.0)
    assert m.system.fork_attempts == 2 and len(m.system.forked) == 1
    assert web(m).slots[0].child.pid == m.system.forked[0].pid


def test_a_failed_fork_of_a_roll_successor_is_not_retried_on_every_pass(
        build: Build, tmp_path: Path, log: io.StringIO) -> None:
    m = build(processes=1)
    start_ready(m)
    write_config(tmp_path / "gearvisor.yaml", processes=1, env={"RELEASE": "2"})
    assert m.arbiter.reload("test") is None
    m.system.fail_forks = 100
    m.step()
    assert m.system.fork_attempts == 2  # the first child, then the successor's failure
    for _ in range(5):  # five more passes at the same instant (events, other timers)
        m.step()
    assert m.system.fork_attempts == 2, f"{fork_failures(log)} 'fork failed' lines at once"
    # Once the slot's backoff has passed, the successor is tried again, and the roll goes on.
    m.system.fail_forks = 0
    (slot,) = next(iter(m.arbiter.pools.values())).slots
    m.advance_to(slot.restart_at)
    assert m.system.fork_attempts == 3 and slot.successor is not None


# -- stopping ---------------------------------------------------------------------------------


def test_a_graceful_stop_sigterms_then_sigkills_the_groups_that_outlive_graceful_timeout(
        build: Build) -> None:
    m = build((Health(), Groups()), processes=2, graceful_timeout=10.0)
    polite, stubborn = start_ready(m)
    started = m.clock.now
    m.arbiter.stop(fast=False, why="test")
    assert m.of(ev.Stopping) == [ev.Stopping(fast=False, why="test")]
    assert m.system.sent == [("kill", polite.pid, signal.SIGTERM),
                             ("kill", stubborn.pid, signal.SIGTERM)]
    polite.exit(0)
    m.step()
    assert list(m.arbiter.children) == [stubborn.pid]
    assert not m.loop.stopped

    m.advance_to(started + 10.0 - TICK)
    assert len(m.system.sent) == 2 and stubborn.alive and not m.loop.stopped
    m.advance_to(started + 10.0)
    assert m.system.sent[2:] == [("killpg", stubborn.pid, signal.SIGKILL)]
    assert stubborn.status == signal_status(signal.SIGKILL)
    assert m.arbiter.children == {}
    assert m.loop.stopped
    assert [e.decision.kind for e in m.of(ev.ChildExited)] == [ExitKind.STOPPED] * 2
    assert len(m.system.forked) == 2  # nothing replaced during a stop


# -- health -----------------------------------------------------------------------------------


def test_a_quarantined_child_is_replaced_after_its_cooldown_then_retired(build: Build) -> None:
    m = build((Health(),), processes=4, quarantine={"cooldown": 5.0})
    children = start_ready(m)
    pool = web(m)
    sick = children[0]
    said_at = m.clock.now
    sick.say(Quarantined(reason="5 of its last 5 jobs failed fast", failed=5, done=0))
    m.step()
    (event,) = m.of(ev.Quarantined)
    assert (event.pool, event.slot, event.child_pid) == ("web", 0, sick.pid)
    assert (event.jobs_failed, event.jobs_done) == (5, 0)
    assert 4.5 <= event.replaced_in <= 5.5  # the cooldown, with its jitter
    assert m.of(ev.CircuitOpened) == []
    replace_at = pool.slots[0].replace_at
    assert replace_at - said_at == pytest.approx(event.replaced_in, abs=1e-3)

    m.advance_to(replace_at - TICK)
    assert len(m.system.forked) == 4
    m.advance_to(replace_at)
    assert len(m.system.forked) == 5
    fresh = m.system.forked[4]
    assert pool.slots[0].successor.pid == fresh.pid and pool.slots[0].successor.probation
    assert m.system.sent == []  # the quarantined child keeps its slot until then
    fresh.say(Ready())
    m.step()
    assert m.system.sent == [("kill", sick.pid, RETIRE_SIGNAL)]
    assert pool.slots[0].child.pid == fresh.pid
    sick.exit(0)
    m.step()
    assert serving(pool) == 4 and len(m.system.forked) == 5


def test_the_circuit_opens_when_most_children_quarantine_and_a_probe_closes_it(
        build: Build) -> None:
    m = build((Health(),), processes=4, quarantine={"cooldown": 5.0},
              circuit={"ratio": 0.6, "cooldown": 10.0})
    children = start_ready(m)
    pool = web(m)
    healthy = children[3]
    for i, child in enumerate(children[:3]):
        child.say(Quarantined(reason="fails fast", failed=5, done=0))
        m.step()
        assert len(m.of(ev.CircuitOpened)) == (1 if i == 2 else 0)  # 3 of 4 >= 60%
    opened_at = m.clock.now
    (opened,) = m.of(ev.CircuitOpened)
    assert (opened.pool, opened.quarantined, opened.desired, opened.reopened) == (
        "web", 3, 4, False)
    assert 9.0 <= opened.probe_in <= 11.0
    # The one child still taking jobs is paused: the byte in its scoreboard, then SIGUSR1
    # to tell it to look. The quarantined ones take no jobs anyway.
    assert m.system.sent == [("kill", healthy.pid, signal.SIGUSR1)]
    boards = [m.arbiter.children[c.pid][0].scoreboard for c in children]
    assert [b.paused_wanted() for b in boards] == [False, False, False, True]

    # No replacement while the circuit is open, even past the quarantine cooldowns.
    probe_at = pool.circuit_until
    assert probe_at - opened_at == pytest.approx(opened.probe_in, abs=1e-3)
    m.advance_to(probe_at - TICK)
    assert len(m.system.forked) == 4
    m.advance_to(probe_at)
    assert len(m.system.forked) == 5
    probe = m.system.forked[4]
    assert pool.probe is not None and pool.probe.pid == probe.pid
    assert pool.slots[0].successor.pid == probe.pid  # beside a quarantined child
    assert not m.arbiter.children[probe.pid][0].scoreboard.paused_wanted()  # it takes jobs

    probe.say(Ready())
    m.step()
    assert m.system.sent[1:] == [("kill", children[0].pid, RETIRE_SIGNAL)]
    probe.say(ProbationPassed())
    m.step()
    assert m.of(ev.CircuitClosed) == [ev.CircuitClosed("web", probe.pid)]
    assert pool.circuit == "closed"
    assert m.system.sent[2:] == [("kill", healthy.pid, signal.SIGUSR1)]  # resumed
    assert not boards[3].paused_wanted()
    health = [type(e) for e in m.events
              if isinstance(e, (ev.Quarantined, ev.CircuitOpened, ev.CircuitClosed))]
    assert health == [ev.Quarantined] * 3 + [ev.CircuitOpened, ev.CircuitClosed]
    # The fault is gone: the other quarantined children are replaced now, one at a time.
    assert len(m.system.forked) == 6
    assert pool.slots[1].successor.pid == m.system.forked[5].pid


def open_circuit(m: FakeMaster) -> list[FakeChild]:
    """Four ready children, three of which quarantine themselves: the circuit opens."""
    children = start_ready(m)
    for child in children[:3]:
        child.say(Quarantined(reason="fails fast", failed=5, done=0))
    m.step()
    assert web(m).circuit == "open"
    return children


def test_a_probe_that_crashes_keeps_the_circuit_open_says_so_and_probes_again_later(
        build: Build, log: io.StringIO) -> None:
    m = build((Health(),), processes=4, circuit={"ratio": 0.6, "cooldown": 10.0})
    children = open_circuit(m)
    pool = web(m)
    m.advance_to(pool.circuit_until)
    probe = m.system.forked[4]
    assert pool.probe is not None and pool.probe.pid == probe.pid
    probe.exit(1)
    m.step()
    assert pool.circuit == "open" and pool.probe is None
    first, again = m.of(ev.CircuitOpened)
    assert not first.reopened and again.reopened
    assert (again.pool, again.quarantined, again.desired) == ("web", 3, 4)
    assert 18.0 <= again.probe_in <= 22.0  # the cooldown doubled
    stays = [x for x in lines(log) if x.get("internal_event") == "circuit_open"]
    assert [x["event"].startswith("circuit stays open") for x in stays] == [False, True]
    # The healthy child was paused once, when the circuit opened: not again.
    assert m.system.signals(signal.SIGUSR1) == [("kill", children[3].pid, signal.SIGUSR1)]
    m.advance_to(pool.circuit_until - TICK)
    assert len(m.system.forked) == 5
    m.advance_to(pool.circuit_until)
    assert len(m.system.forked) == 6 and pool.probe.pid == m.system.forked[5].pid
    # A probe retired on purpose (here: the fleet stops) is no failed probe.
    m.arbiter.stop(fast=False, why="test")
    m.system.forked[5].exit(0)
    m.step()
    assert len(m.of(ev.CircuitOpened)) == 2


def killed_past_timeout_and_grace(m: FakeMaster, child: FakeChild, limit: float,
                                  log: io.StringIO) -> list[dict]:
    """The child's job runs until `limit` (its start + timeout + grace) unharmed, and its
    group is SIGKILLed at the next health check: a crash to restart. The log's words."""
    record = m.arbiter.children[child.pid][0]
    m.advance_to(limit)  # busy for exactly timeout + grace: not past it
    assert m.system.sent == []
    m.advance_to(limit + HEALTH_INTERVAL)
    assert m.system.sent == [("killpg", child.pid, signal.SIGKILL)]
    assert not child.alive and child.pid not in m.arbiter.children
    assert record.killed_for == "timeout"
    exited = m.of(ev.ChildExited)[-1]
    assert exited.decision.kind is ExitKind.CRASHED and exited.decision.restart_in is not None
    return [x for x in lines(log) if x["event"].startswith("job hung past its timeout")]


def test_a_job_busy_past_timeout_and_grace_gets_its_group_sigkilled_and_a_strike(
        build: Build, log: io.StringIO) -> None:
    m = build((Health(),), processes=1,
              functions={"f": {"callable": "examples.text:echo", "timeout": 2.0}},
              timeout_grace=1.0)
    (child,) = start_ready(m)
    record = m.arbiter.children[child.pid][0]
    key = job_key("f", "job-1", "H:host:1")
    began = m.clock.now
    # The child writes its job into its scoreboard (and running slot), as it would.
    record.scoreboard.job_started("f", "H:host:1", "job-1", began, size=8, key=key)
    m.arbiter.running.set(record.running_index, key)

    hung = killed_past_timeout_and_grace(m, child, began + 3.0, log)
    assert m.arbiter.poison.strikes(key) == 1
    assert len(hung) == 1
    assert (hung[0]["function"], hung[0]["unique"], hung[0]["timeout"]) == ("f", "job-1", 2.0)


def test_a_command_childs_reported_job_past_timeout_and_grace_gets_its_group_sigkilled(
        build: Build, log: io.StringIO, tmp_path: Path) -> None:
    """A command worker has no scoreboard: its job is the one its reporting shim said it
    started (JobStarted on fd 3) and has not ended. Only that is timed."""
    settings = {"processes": 1, "command": ["/bin/true"], "timeout_grace": 1.0,
                "functions": {"f": {"timeout": 2.0}, "g": None}}
    (tmp_path / "alerts.yaml").write_text(yaml.safe_dump({
        "state_dir": str(tmp_path / "state"), "pools": {"web": pool_settings(**settings)}}))
    alerts = Alerts(load(str(tmp_path / "alerts.yaml")), wall=lambda: 1e9)
    m = build((Health(), Commands(Probe()), alerts), **settings)
    (child,) = start_ready(m)
    record = m.arbiter.children[child.pid][0]
    assert record.scoreboard is None and record.timeouts == {"f": 2.0}
    began = m.clock.now
    child.say(JobStarted("f", "H:host:1", "job-1", "", 0))
    m.step()  # the master reads it now
    m.advance_to(began + 2.5)
    child.say(JobEnded())  # ended in time: nothing is timed any more
    m.step()
    m.advance_to(began + 10.0)
    child.say(JobStarted("g", "H:host:2", "job-2", "", 0))  # g has no timeout
    m.step()
    m.advance_to(began + 20.0)
    assert m.system.sent == []

    began = m.clock.now
    child.say(JobStarted("f", "H:host:3", "job-3", "", 0))
    m.step()
    hung = killed_past_timeout_and_grace(m, child, began + 3.0, log)
    assert [(x["function"], x["unique"], x["timeout"]) for x in hung] == [("f", "job-3", 2.0)]
    assert {"alertname": "JobHung", "pool": "web", "function": "f"} in alerts.status(
        m.clock.now)["alerts"]["firing_labels"]


def test_a_command_job_that_ended_just_in_time_is_not_killed_for_the_next_one(
        build: Build) -> None:
    """The health check reads what a command child said before it times its job: a job
    that ended at its limit, followed by one with no timeout, is no kill (before, the check
    saw the old job still running, killed the child and blamed the new one)."""
    m = build((Health(), Commands(Probe())), processes=1, command=["/bin/true"],
              timeout_grace=1.0, functions={"f": {"timeout": 2.0}, "g": None})
    (child,) = start_ready(m)
    record = m.arbiter.children[child.pid][0]
    began = m.clock.now
    child.say(JobStarted("f", "H:host:1", "job-1", "", 0))
    m.step()
    m.advance_to(began + 3.0)  # busy for exactly timeout + grace: not past it
    # The lines arrive just after the loop's select and before its timers run:
    child.say(JobEnded())
    child.say(JobStarted("g", "H:host:2", "job-2", "", 0))
    m.clock.advance(2 * HEALTH_INTERVAL)
    m.loop.run_due()  # (the health check)
    m.step()
    assert m.system.sent == [] and child.alive
    assert record.job is not None and (record.job.function, record.job.unique) == ("g", "job-2")
    assert m.arbiter.poison.strikes(job_key("g", "job-2", "H:host:2")) == 0


def test_a_job_that_crashes_poison_after_command_workers_is_listed_as_poison(
        build: Build, log: io.StringIO) -> None:
    """gearmand hands a job that kills its command worker out again and again: the master
    strikes the job each worker died running, and at poison_after says so (PoisonJob) and
    lists it for the workers' shims to refuse (the PoisonList their fd 4 is). Idle deaths,
    stops and jobs that ended strike nothing."""
    m = build((Health(), Commands(Probe())), processes=1, command=["/bin/true"],
              functions=["f"], poison_after=2, startsecs=0.5,
              backoff={"initial": 0.5, "max": 1.0})

    def next_child(dead: FakeChild | None) -> FakeChild:
        for _ in range(100):  # the restart, after the crash's backoff
            if m.system.forked and m.system.forked[-1] is not dead:
                break
            m.advance(0.25)
        child = m.system.forked[-1]
        assert child is not dead
        m.advance(1.0)  # past startsecs: ready
        return child

    m.step()
    child = next_child(None)
    child.say(JobStarted("f", "H:host:1", "u-1", "", 4))
    m.step()
    child.say(JobEnded())
    m.step()
    child.exit(1)  # between jobs: no strike
    m.step()
    key = job_key("f", "u-1", "H:host:1")
    assert m.arbiter.poison.strikes(key) == 0
    for death in range(2):
        child = next_child(child)
        child.say(JobStarted("f", "H:host:1", "u-1", "", 4))
        m.step()
        assert shim_key("f", "u-1", "H:host:1") not in m.arbiter.poison_lists["web"]
        child.die(signal_status(signal.SIGSEGV))
        m.step()
        assert m.arbiter.poison.strikes(key) == death + 1
    (poison,) = m.of(ev.PoisonJob)
    assert (poison.pool, poison.function, poison.unique, poison.strikes) == ("web", "f", "u-1", 2)
    # A job without a unique is known by the key its shim sent (handle and payload digest:
    # another server's job of the same handle is another job), and only so.
    for key, expect in (("a" * 40, ["a" * 40]), ("", ["a" * 40])):
        for _ in range(2):
            child = next_child(child)
            child.say(JobStarted("f", "H:host:7", "", "", 4, key=key))
            m.step()
            child.die(signal_status(signal.SIGSEGV))
            m.step()
        assert [k for k in ("a" * 40, "b" * 40) if k in m.arbiter.poison_lists["web"]] == expect
    said3 = [x for x in lines(log) if x.get("internal_event") == "poison_job"]
    assert len(said3) == 3 and "its shim sent no key and it has no unique" in said3[2]["event"]
    # A worker told to stop that dies of the stop signal mid-job died of the stop: no strike.
    child = next_child(child)
    child.say(JobStarted("f", "H:host:9", "u-9", "", 4))
    m.step()
    m.arbiter.handle_term()
    m.step()
    assert ("kill", child.pid, signal.SIGTERM) in m.system.sent
    child.die(signal_status(signal.SIGTERM))
    m.step()
    assert m.arbiter.poison.strikes(job_key("f", "u-9", "H:host:9")) == 0
    said = [x for x in lines(log) if x.get("internal_event") == "poison_job"]
    assert len(said) == 3 and "--job-retries" in said[0]["event"]
    listed = os.pread(m.arbiter.poison_lists["web"].fd, 4096, 0)
    assert listed == hashlib.sha1(b"f\0u\0u-1").hexdigest().encode() + b"\n" + b"a" * 40 + b"\n"


def test_a_command_jobs_success_read_before_its_crashed_worker_is_reaped_is_recorded(
        tmp_path: Path) -> None:
    """gearmand hands a job on as soon as its worker's socket closes, so a short job's next
    run may end before the master reaps the worker that died on it: that success is
    recorded too (the crash record after it; the store ends the crash by it)."""
    from gearvisor.master.journal import Journal
    path = tmp_path / "gearvisor.yaml"
    path.write_text(yaml.safe_dump({
        "watch_config": False, "journal": {"enabled": False},  # (no helper: one stands in)
        "pools": {"web": pool_settings(processes=2, command=["/bin/true"], functions=["f"],
                                       poison_after=0)}}))
    journal = Journal(load(str(path)))
    m = FakeMaster(str(path), (Commands(Probe()), journal))
    frames: list[bytes] = []
    journal.helper = types.SimpleNamespace(send=frames.append,  # type: ignore[assignment]
                                           close=lambda: None)
    try:
        dying, other = m.start_ready()
        dying.say(JobStarted("f", "H:host:1", "u-1", "", 4, key="a" * 40))
        m.step()
        dying.die(signal_status(signal.SIGKILL))  # (queued: not reaped before the read)
        other.say(JobStarted("f", "H:host:1", "u-1", "", 4, key="a" * 40))
        other.say(JobEnded())
        m.loop.run_once()
        m.step()
        sent = [json.loads(f[f.index(b"{"):])["records"][0] for f in frames]
        assert [(r["outcome"], r["handle"], r["unique"]) for r in sent] == [
            ("success", "H:host:1", "u-1"), ("crash", "H:host:1", "u-1")]
        assert not m.arbiter.command_jobs  # (the ended job and the reaped child's: none held)
    finally:
        m.close()


def test_a_command_worker_cannot_say_what_only_the_python_runtime_says(
        build: Build, log: io.StringIO) -> None:
    """fd 3 is the worker's to write: "recycle" from a command worker replaced it again
    and again, "ready" skipped startsecs. Such lines are refused as unreadable events."""
    m = build((Commands(Probe()),), processes=1, command=["/bin/true"], functions=["f"],
              startsecs=5.0)
    m.step()
    (child,) = m.system.forked
    child.say(Ready())
    child.say(Recycle("max_jobs"))
    m.step()
    record = m.arbiter.children[child.pid][0]
    assert record.state is ChildState.STARTING and len(m.system.forked) == 1
    refused = [x for x in lines(log) if x["event"] == "unreadable event from child"]
    assert refused and "not an event a command worker sends" in refused[0]["error"]
    m.advance(5.0)
    assert record.state is ChildState.READY and len(m.system.forked) == 1


def test_a_pool_of_hundreds_forks_over_several_passes_and_others_get_their_turn(
        tmp_path: Path) -> None:
    """`gearvisor scale web 300`: the master forks at most MAX_FORKS_PER_PASS children a
    pass (the control socket, reaping and every pipe are served between), and the next
    pass begins with the pool after the one that used them up."""
    path = tmp_path / "gearvisor.yaml"
    path.write_text(yaml.safe_dump({"watch_config": False, "pools": {
        "big": pool_settings(processes=300), "small": pool_settings(processes=2)}}))
    m = FakeMaster(str(path))
    try:
        def forked(name: str) -> int:
            return sum(1 for c in m.system.forked if m.arbiter.children[c.pid][1].name == name)

        m.arbiter.manage()
        assert (forked("big"), forked("small")) == (MAX_FORKS_PER_PASS, 0)
        m.arbiter.manage()
        assert forked("small") == 2
        for _ in range(10):  # (each step runs the timer the last pass left, then a pass)
            m.step()
        assert (forked("big"), forked("small")) == (300, 2)
    finally:
        m.close()


def test_a_child_flooding_its_event_pipe_is_read_at_a_bounded_rate(
        build: Build, log: io.StringIO, monkeypatch: pytest.MonkeyPatch) -> None:
    """Past EVENT_BUDGET in a second the master stops reading a child's pipe until the
    second is over (the worker then blocks on its own writes), says so once, and reads on
    after it: nothing is lost, the master is not held busy."""
    import gearvisor.policy.child as child_module

    monkeypatch.setattr(child_module, "EVENT_BUDGET", 10)
    m = build((Commands(Probe()),), processes=1, command=["/bin/true"], functions=["f"])
    (child,) = start_ready(m)
    record = m.arbiter.children[child.pid][0]
    for i in range(12):
        child.say(JobStarted("f", f"H:host:{i}", f"u-{i}", "", 4))
    m.step()
    assert record.job is not None and record.job.unique == "u-11"
    child.say(JobStarted("f", "H:host:late", "late", "", 4))
    m.step()
    assert record.job.unique == "u-11"  # (not read: the second is not over)
    said = [x for x in lines(log) if x["event"].startswith("child floods its event pipe")]
    assert len(said) == 1 and said[0]["child_pid"] == child.pid
    m.advance(1.0)
    assert record.job.unique == "late"


def test_a_reload_retires_a_child_with_the_signal_its_own_config_named(
        build: Build, tmp_path: Path) -> None:
    """A child's code expects the signals of the config it started with: a PHP worker
    whose pool now runs Python code gets its stop_signal, not the Python children's SIGHUP
    (which would kill it mid-job), and one whose pool's stop_signal changed gets the old."""
    command = {"command": ["/bin/true"], "functions": ["f"], "stop_signal": "QUIT",
               "graceful_timeout": 30.0}
    m = build((Commands(Probe()),), processes=1, **command)
    (worker,) = start_ready(m)
    write_config(tmp_path / "gearvisor.yaml", processes=1, **{**command, "stop_signal": "INT"})
    assert m.arbiter.reload("test") is None
    write_config(tmp_path / "gearvisor.yaml", processes=1)  # (Python: examples.text:echo)
    assert m.arbiter.reload("test") is None
    for _ in range(100):  # the successors start (a command's after startsecs), then it goes
        if m.system.signals(signal.SIGQUIT) or m.system.signals(signal.SIGHUP):
            break
        for c in m.system.forked[1:]:
            if c.alive and m.arbiter.children[c.pid][0].state is ChildState.STARTING:
                c.say(Ready())
        m.advance(0.25)
    assert [s[1:] for s in m.system.sent] == [(worker.pid, signal.SIGQUIT)]


def test_a_command_worker_dying_of_the_signal_it_was_stopped_with_is_no_strike_after_a_reload(
        build: Build, tmp_path: Path, log: io.StringIO) -> None:
    """The signal that stopped a worker is the one the master sent, not the one its pool
    says now: a reload that changes stop_signal while a worker drains does not make its
    death of the old signal a crash of its job. One that dies of another signal while it
    drains crashed on its job. (Before, the check raised inside the bus for a pool without
    reload_signal, so neither counted.)"""
    settings = {"processes": 1, "command": ["/bin/true"], "functions": ["f"],
                "poison_after": 1, "graceful_timeout": 30.0}
    m = build((Health(), Commands(Probe())), **settings)
    (child,) = start_ready(m)
    child.say(JobStarted("f", "H:host:1", "u-1", "", 4))
    m.step()
    m.arbiter.roll_pool(web(m), "test")  # (`gearvisor restart`)
    for _ in range(100):  # its successor starts, then it is told to go
        if ("kill", child.pid, signal.SIGTERM) in m.system.sent:
            break
        m.advance(0.25)
    assert ("kill", child.pid, signal.SIGTERM) in m.system.sent
    write_config(tmp_path / "gearvisor.yaml", stop_signal="INT", **settings)
    assert m.arbiter.reload("test") is None
    m.step()
    child.die(signal_status(signal.SIGTERM))
    m.step()
    assert m.arbiter.poison.strikes(job_key("f", "u-1", "H:host:1")) == 0
    assert m.of(ev.PoisonJob) == []
    successor = m.system.forked[-1]
    successor.say(JobStarted("f", "H:host:2", "u-2", "", 4))
    m.step()
    m.arbiter.handle_term()
    m.step()
    assert ("kill", successor.pid, signal.SIGINT) in m.system.sent
    successor.die(signal_status(signal.SIGSEGV))
    m.step()
    assert m.arbiter.poison.strikes(job_key("f", "u-2", "H:host:2")) == 1
    assert [e.unique for e in m.of(ev.PoisonJob)] == ["u-2"]
    assert "event subscriber failed" not in log.getvalue()


def test_each_command_pool_lists_the_jobs_past_its_own_poison_after_and_a_reload_relists(
        tmp_path: Path, log: io.StringIO) -> None:
    """Strikes count fleet-wide (as a Python child counts them), but a job goes on a
    command pool's list only when they reach that pool's poison_after: one death lists it
    for a pool with poison_after 1, not yet for one with 3. A reload that raises a pool's
    poison_after takes the job off its list and one that lowers it lists it, as a Python
    pool compares strikes with the live limit; the list's size only grows (its shims notice
    a change by size), the emptied list shows no key."""
    path = tmp_path / "gearvisor.yaml"

    def write(a: int, b: int) -> None:
        pools = {name: {"processes": 1, "command": ["/bin/true"], "functions": ["f"],
                        "poison_after": limit, "startsecs": 0.5, "watch": False,
                        "backoff": {"initial": 0.5, "max": 1.0, "jitter": 0}}
                 for name, limit in (("a", a), ("b", b))}
        path.write_text(yaml.safe_dump({"watch_config": False, "pools": pools}))

    def listed(name: str) -> list[bytes]:
        fd = m.arbiter.poison_lists[name].fd
        return [line for line in os.pread(fd, 1 << 20, 0).split(b"\n") if line]

    def crash_in(name: str) -> None:
        for _ in range(100):  # a ready child of the pool (a restart waits out its backoff)
            child = next((c for c in m.system.forked if c.alive and
                          m.arbiter.children[c.pid][1].name == name and
                          m.arbiter.children[c.pid][0].state is ChildState.READY), None)
            if child is not None:
                break
            m.advance(0.25)
        assert child is not None
        child.say(JobStarted("f", "H:host:1", "u-1", "", 4))
        m.step()
        child.die(signal_status(signal.SIGSEGV))
        m.step()

    write(1, 3)
    m = FakeMaster(str(path), (Health(), Commands(Probe())))
    try:
        m.step()
        m.advance(1.0)  # both pools' children ready
        key = hashlib.sha1(b"f\0u\0u-1").hexdigest().encode()
        crash_in("b")  # (its 1 of 3; a's limit)
        assert (listed("a"), listed("b")) == ([key], [])
        crash_in("b")
        assert listed("b") == []  # 2 strikes of b's 3
        crash_in("b")
        assert listed("b") == [key]
        assert [(e.pool, e.strikes) for e in m.of(ev.PoisonJob)] == [("a", 1), ("b", 3)]
        said = [x["event"] for x in lines(log) if x.get("internal_event") == "poison_job"]
        assert "in pool b" in said[0] and "in pool" not in said[1]
        # A reload that leaves poison_after alone changes no list, however many other
        # strikes the fleet's ring has taken since.
        for other in range(1, 4097):
            m.arbiter.poison.add(other)
        assert m.arbiter.reload("test") is None
        assert (listed("a"), listed("b")) == ([key], [key])
        size = os.fstat(m.arbiter.poison_lists["a"].fd).st_size
        write(5, 3)
        assert m.arbiter.reload("test") is None
        assert (listed("a"), listed("b")) == ([], [key])
        assert os.fstat(m.arbiter.poison_lists["a"].fd).st_size > size
        write(3, 4)
        assert m.arbiter.reload("test") is None
        assert (listed("a"), listed("b")) == ([key], [])
        # A pool that runs Python code now has no list once its command workers are gone.
        pools = yaml.safe_load(path.read_text())
        pools["pools"]["a"] = {"processes": 1, "functions": {"f": "examples.text:echo"},
                               "watch": False}
        path.write_text(yaml.safe_dump(pools))
        assert m.arbiter.reload("test") is None
        for _ in range(100):
            if "a" not in m.arbiter.poison_lists:
                break
            for c in m.system.forked:
                record = m.arbiter.children.get(c.pid, (None,))[0]
                if c.alive and signal.SIGTERM in c.received:
                    c.exit(0)  # (the retired command worker exits when told)
                elif record is not None and record.state is ChildState.STARTING and \
                        record.scoreboard is not None:
                    c.say(Ready())  # (its Python successor)
            m.advance(0.25)
        assert "a" not in m.arbiter.poison_lists and listed("b") == []
    finally:
        m.close()


# -- the control socket out of fds --------------------------------------------------------------

def test_a_control_listener_out_of_fds_pauses_accepts_instead_of_spinning(
        tmp_path: Path, log: io.StringIO) -> None:
    """accept() failing with EMFILE leaves the connection in the backlog and the listener
    readable: the master must stop listening for a moment (not retry on every pass, which
    spins the loop and floods the log), then accept the waiting client once it can."""
    import resource
    import socket

    from gearvisor.config import load
    from gearvisor.master.control import ACCEPT_PAUSE, Control

    path = tmp_path / "gearvisor.yaml"
    sock_path = tmp_path / "ctl.sock"
    path.write_text(yaml.safe_dump({"watch_config": False, "control_socket": str(sock_path),
                                    "pools": {"web": pool_settings(processes=1)}}))
    m = FakeMaster(str(path), (Control(load(str(path))),))
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        client.connect(str(sock_path))
        client.sendall(b'{"verb": "status"}\n')
        # No fd left for accept() to return: the limit is the lowest free fd number.
        lowest_free = os.dup(0)
        os.close(lowest_free)
        resource.setrlimit(resource.RLIMIT_NOFILE, (lowest_free, hard))
        m.step()  # before the fix: "still busy after MAX_PASSES passes" (the spin)
        m.step()
        refused = [x for x in lines(log) if x["event"].startswith("control connection not")]
        assert len(refused) == 1 and refused[0]["retry_in"] == ACCEPT_PAUSE
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        m.advance(ACCEPT_PAUSE)
        client.settimeout(5.0)
        reply = json.loads(client.makefile("rb").readline())
        assert reply["ok"] is True and reply["status"]["pools"][0]["name"] == "web"
        assert any(x["event"] == "control connections accepted again" for x in lines(log))
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        client.close()
        m.close()


def test_a_component_answers_its_own_control_verb_and_its_bugs_get_a_reply(
        tmp_path: Path, log: io.StringIO) -> None:
    """master.verbs: a component adds a verb without touching the control component; a
    handler that raises still answers the client (and the loop goes on)."""
    import socket

    from gearvisor.config import load
    from gearvisor.master.control import Control

    class Echo(Component):
        def attach(self, master: Any) -> None:
            master.verbs["echo"] = lambda request: {"ok": True, "said": request.get("say")}
            master.verbs["broken"] = lambda request: 1 / 0

    path = tmp_path / "gearvisor.yaml"
    sock_path = tmp_path / "ctl.sock"
    path.write_text(yaml.safe_dump({"watch_config": False, "control_socket": str(sock_path),
                                    "pools": {"web": pool_settings(processes=1)}}))
    m = FakeMaster(str(path), (Control(load(str(path))), Echo()))

    def ask(request: dict[str, Any]) -> dict[str, Any]:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            client.connect(str(sock_path))
            client.sendall(json.dumps(request).encode() + b"\n")
            client.settimeout(5.0)
            reader = client.makefile("rb")
            m.step()
            return json.loads(reader.readline())

    try:
        assert ask({"verb": "echo", "say": "hi"}) == {"ok": True, "said": "hi"}
        broken = ask({"verb": "broken"})
        assert broken["ok"] is False and "broken failed in the master" in broken["error"]
        unknown = ask({"verb": "nope"})
        assert "broken, echo" in unknown["error"] and "status" in unknown["error"]
    finally:
        m.close()


def test_a_command_workers_own_exit_3_is_a_crash_not_a_boot_error(build: Build) -> None:
    """3 is gearvisor's boot-error code; a PHP script's exit(3) is its crash."""
    m = build((Commands(Probe()),), functions=["f"], command=["/bin/true"], startsecs=0.5)
    m.step()
    child = m.system.forked[-1]
    m.advance(1.0)  # past startsecs: ready
    assert m.of(ev.ChildReady)
    child.exit(EXIT_BOOT_ERROR)
    m.step()
    assert m.of(ev.ChildExited)[-1].decision.kind is ExitKind.CRASHED
    # Before it was ready, an exit (3 or not) is its failure to start, said in words.
    for _ in range(100):  # the replacement, after the crash's backoff
        if m.system.forked[-1] is not child:
            break
        m.advance(0.1)
    early = m.system.forked[-1]
    assert early is not child
    early.exit(EXIT_BOOT_ERROR)
    m.step()
    assert m.of(ev.ChildExited)[-1].decision.kind is ExitKind.BOOT_ERROR
