"""One pool as the master sees it: slots, their children, backoff, rolls and exit decisions.

Pure logic: no fork, no signals, no clock of its own. The arbiter does the I/O and passes
`now`; the tests drive these classes by hand.

A roll (reload, `gearvisor restart`) bumps the pool's generation. For each slot whose child is
of an older generation, a *successor* of the new generation is started beside it (at most
`max_surge` at a time); once the successor is ready (registered on every reachable server)
the old child is retired (told to finish its job and exit) and the successor takes the slot.
Capacity never dips. A successor that dies before it is ready halts the roll: the old
children keep serving and the reason is kept for status and for `gearvisor reload`.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum

from gearvisor.config import PoolConfig
from gearvisor.policy.backoff import Backoff
from gearvisor.policy.child import EXIT_BOOT_ERROR, Child, ChildState


class Circuit(str, Enum):
    """A pool's circuit breaker. A str, so status JSON and comparisons read "open"."""

    CLOSED = "closed"  # normal
    OPEN = "open"  # most children fail fast: the pool takes no jobs until a probe passes
    PROBING = "probing"  # one child tries again after the cooldown

    def __str__(self) -> str:
        return self.value


class CircuitChange(str, Enum):
    """What a quarantine did to the circuit (Pool.child_quarantined)."""

    OPENED = "opened"
    REOPENED = "reopened"  # the probe failed: still open, longer cooldown


class ExitKind(Enum):
    STOPPED = "stopped"  # we asked it to stop: never a failure
    BOOT_ERROR = "boot_error"  # could not import/validate its functions
    CRASHED = "crashed"  # any other exit
    ROLL_FAILED = "roll_failed"  # a successor died before it was ready: the roll halts


@dataclass
class ExitDecision:
    """What the arbiter should do after a child exits, and what to log."""

    kind: ExitKind
    restart_in: float | None  # seconds until a replacement; None = none planned
    log_reason: bool  # first failure of a streak (or a new reason): log it loudly
    streak: int  # consecutive failures of this slot
    fatal: str | None = None  # the slot was given up (max_restarts): why


@dataclass(frozen=True)
class Spawn:
    """Start a child of the pool's current generation in `slot` (as its successor if set)."""

    slot: Slot
    successor: bool = False
    probation: bool = False  # replaces a quarantined child: starts on probation
    probe: bool = False  # the one child that tests an open circuit


@dataclass(frozen=True)
class Retire:
    """Tell `child` to finish its current job and exit."""

    child: Child
    why: str


Action = Spawn | Retire


class Slot:
    """A numbered place in a pool. It outlives the children that fill it."""

    def __init__(self, index: int, config: PoolConfig) -> None:
        self.index = index
        self.backoff = self._backoff(config)
        self.child: Child | None = None  # the child serving this slot (or starting to)
        self.successor: Child | None = None  # a newer-generation child starting beside it
        # Monotonic time before which no child may start here (an empty slot's restart, or
        # a roll successor after a failed fork).
        self.restart_at = 0.0
        self.last_reason: str | None = None  # last failure reason logged in this streak
        # Replacing a healthy-enough child through the surge path (recycle, quarantine):
        self.replace_at: float | None = None  # start a successor at this time
        self.replace_why: str | None = None
        self.probation_next = False  # the next child of this slot starts on probation
        self.fatal: str | None = None  # gave up (max_restarts): no more starts until a roll
        self.restarts = 0  # serving children of this slot that died unasked (status, top)
        # For a roll's progress: the generation of the last child that became ready here,
        # and of the last one that died here before it was ready (not on request).
        self.ready_generation = 0
        self.failed_generation = 0
        q = config.quarantine
        self.quarantines = Backoff(q.cooldown, q.cooldown_max, 2.0, 0.1, math.inf)

    @staticmethod
    def _backoff(config: PoolConfig) -> Backoff:
        b = config.backoff
        return Backoff(b.initial, b.max, b.multiplier, b.jitter, b.reset_after)

    def reconfigure(self, config: PoolConfig) -> None:
        """New delays from a reloaded config; the streaks so far are kept."""
        failures, quarantines = self.backoff.failures, self.quarantines.failures
        self.backoff = self._backoff(config)
        self.backoff.failures = failures
        q = config.quarantine
        self.quarantines = Backoff(q.cooldown, q.cooldown_max, 2.0, 0.1, math.inf)
        self.quarantines.failures = quarantines


QUARANTINE_AFTER = 5  # consecutive failed starts/crashes of a command slot before quarantine


def surge_count(max_surge: int | str, processes: int) -> int:
    """`max_surge` as a number of children: an int, or a percentage of `processes`."""
    if isinstance(max_surge, str) and max_surge.endswith("%"):
        return max(1, math.ceil(processes * float(max_surge[:-1]) / 100))
    return max(1, int(max_surge))


class Pool:
    """Desired children for one pool and the bookkeeping that keeps them there."""

    def __init__(self, config: PoolConfig) -> None:
        self.config = config
        self.generation = 1
        self.slots = [Slot(i, config) for i in range(config.processes)]
        self.retired: list[Child] = []  # told to stop, not yet reaped
        self.halted: str | None = None  # why the current roll stopped, if it did
        self.removed = False  # gone from the config: drain, then forget
        self.scaled_to: int | None = None  # `gearvisor scale` (or autoscale) override
        self.scaled_by: str | None = None  # who set scaled_to (bus.Scaled.by)
        self.circuit = Circuit.CLOSED
        self.circuit_until = 0.0
        c = config.circuit
        self.circuit_backoff = Backoff(c.cooldown, c.cooldown_max, 2.0, 0.1, math.inf)
        self.probe: Child | None = None

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def desired(self) -> int:
        if self.removed:
            return 0
        return self.config.processes if self.scaled_to is None else self.scaled_to

    def children(self) -> list[Child]:
        """Every live child of this pool: serving, starting, successors and retired ones."""
        out = []
        for s in self.slots:
            out += [c for c in (s.child, s.successor) if c is not None]
        return out + self.retired

    @property
    def rolling(self) -> bool:
        """Some slot still has a child of an older generation (or a successor starting)."""
        return any(s.successor is not None or (s.child is not None and
                                               s.child.generation < self.generation)
                   for s in self.slots)

    @property
    def ready(self) -> bool:
        """Every wanted slot has a ready child of the current generation."""
        return len(self.slots) == self.desired and all(
            s.child is not None and s.child.state is ChildState.READY
            and s.child.generation == self.generation for s in self.slots)

    @property
    def backing_off(self) -> list[Slot]:
        return [s for s in self.slots if s.child is None and s.backoff.in_streak]

    # -- planning -------------------------------------------------------------------------------

    def next_due(self) -> float | None:
        """The earliest time the pool will want to act (for the loop's timeout)."""
        times = [s.restart_at for s in self.slots if s.child is None and s.fatal is None]
        in_flight = sum(1 for s in self.slots if s.successor is not None)
        if in_flight < surge_count(self.config.max_surge, self.desired):
            # (while surge holds replacements back, a successor's readiness frees them)
            times += [s.replace_at for s in self.slots if self._replaceable(s)]
            # A roll successor whose fork failed waits for its slot's backoff.
            if self.halted is None:
                times += [s.restart_at for s in self.slots if s.successor is None
                          and s.child is not None and s.child.generation < self.generation
                          and s.restart_at > 0.0]
        if self.circuit is Circuit.OPEN:
            times.append(self.circuit_until)
        return min(times) if times else None

    def _replaceable(self, slot: Slot) -> bool:
        """A slot whose child waits for a same-generation replacement plan() may start."""
        child = slot.child
        return (slot.replace_at is not None and slot.successor is None and child is not None
                and child.generation == self.generation
                and not (child.quarantined and self.circuit is not Circuit.CLOSED))

    def plan(self, now: float, busy: Callable[[Child], bool] | None = None) -> list[Action]:
        """What to do now: scale, fill empty slots past their backoff, push the roll forward.

        `busy(child)` says whether a child is running a job now (the arbiter reads its
        scoreboard; asked only when the pool shrinks): a scale-down takes the slots that
        cost least first (see _shrink_order), so a busy child goes only when nothing idle is
        left, and even then it is retired (finishes its job), never killed.
        """
        actions: list[Action] = []
        excess = len(self.slots) - self.desired
        if excess > 0:
            for slot in self._shrink_order(busy)[:excess]:
                self.slots.remove(slot)
                for c in (slot.successor, slot.child):
                    if c is not None:
                        actions.append(Retire(c, "scaled down" if not self.removed
                                              else "removed"))
        # Scale up: into the lowest free slot numbers, so they stay 0..desired-1 as far as
        # the scale-downs before allowed (a slot's number is in its child's client id and
        # title; a gap left by an idle child that went is filled first).
        if len(self.slots) < self.desired:
            used = {s.index for s in self.slots}
            free = (i for i in itertools.count() if i not in used)
            while len(self.slots) < self.desired:
                self.slots.append(Slot(next(free), self.config))
            self.slots.sort(key=lambda s: s.index)
        probe_due = (self.circuit is Circuit.OPEN and now >= self.circuit_until
                     and self.probe is None)
        for slot in self.slots:
            if slot.child is None and slot.restart_at <= now and slot.fatal is None:
                # While the circuit is open, the first fresh child is its probe.
                actions.append(Spawn(slot, probation=probe_due, probe=probe_due))
                probe_due = False
        surge = surge_count(self.config.max_surge, self.desired)
        in_flight = sum(1 for s in self.slots if s.successor is not None)
        for slot in self.slots:
            # Replacements of the same generation (recycling, quarantine cooldown over).
            if self._replaceable(slot) and slot.replace_at <= now and in_flight < surge:
                actions.append(Spawn(slot, successor=True, probation=slot.probation_next))
                in_flight += 1
        if probe_due:
            # Probe with a fresh child beside a quarantined one (else beside any child).
            slots = sorted((s for s in self.slots if s.child is not None and s.successor is None),
                           key=lambda s: not s.child.quarantined)
            if slots:
                actions.append(Spawn(slots[0], successor=True, probation=True, probe=True))
                in_flight += 1
            else:
                self.circuit_until = now + 1.0  # no place for a probe now: look again later
        if self.halted is None:
            for slot in self.slots:
                if in_flight >= surge:
                    break
                child = slot.child
                if slot.successor is None and child is not None and (
                        child.generation < self.generation) and slot.restart_at <= now:
                    if child.state is ChildState.STARTING:
                        # Not serving yet: nothing to protect, replace it outright.
                        actions.append(Retire(child, "outdated before it was ready"))
                        continue
                    actions.append(Spawn(slot, successor=True))
                    in_flight += 1
        return actions

    def _shrink_order(self, busy: Callable[[Child], bool] | None) -> list[Slot]:
        """The slots in the order a scale-down takes them: empty ones (backing off or not
        started), then children not serving yet, quarantined or paused ones (they take no
        jobs), then idle ones, then busy ones; the highest slot number first among equals."""
        def cost(slot: Slot) -> int:
            child = slot.child
            if child is None:
                return 0
            if child.state is ChildState.STARTING:
                return 1
            if child.quarantined or child.paused:
                return 2
            return 4 if busy is not None and busy(child) else 3

        return sorted(self.slots, key=lambda s: (cost(s), -s.index))

    def placed(self, action: Spawn, child: Child) -> None:
        """The arbiter forked `child` for `action`: record it in its slot."""
        child.probation = action.probation
        if action.probe:
            self.probe = child
            self.circuit = Circuit.PROBING
        if action.successor:
            action.slot.successor = child
        else:
            action.slot.child = child

    def retiring(self, child: Child) -> None:
        """`child` is being told to stop: it leaves its slot and is tracked until reaped."""
        for slot in self.slots:
            if slot.child is child:
                slot.child = None
                slot.restart_at = 0.0
            if slot.successor is child:
                slot.successor = None
        if child not in self.retired:
            self.retired.append(child)

    def child_ready(self, child: Child) -> tuple[int, Child | None]:
        """A child became ready. Returns (its slot's failure streak, the child it replaces).

        A ready successor takes over its slot; the old child it returns must be retired.
        Readiness does not reset the backoff by itself: a child that registers and then
        crashes at once is still a crash loop. The reset comes from uptime (Backoff).
        """
        for slot in self.slots:
            if slot.successor is child:
                old = slot.child
                slot.child, slot.successor = child, None
                slot.replace_at = slot.replace_why = None
                slot.ready_generation = child.generation
                return slot.backoff.failures, old
            if slot.child is child:
                failures = slot.backoff.failures
                slot.last_reason = None
                slot.ready_generation = child.generation
                return failures, None
        return 0, None

    # -- health ---------------------------------------------------------------------------------

    def _slot_of(self, child: Child) -> Slot | None:
        return next((s for s in self.slots if s.child is child), None)

    def recycle(self, child: Child, why: str, now: float) -> bool:
        """Replace `child` through the surge path (a successor first): a recycling limit.
        False when it is not serving a slot or a replacement is already under way."""
        slot = self._slot_of(child)
        if slot is None or slot.replace_at is not None:
            return False
        # With a successor already starting (a roll), this is kept: should the successor
        # not take over, the recycle still happens.
        slot.replace_at, slot.replace_why = now, why
        return True

    def child_quarantined(self, child: Child, reason: str,
                          now: float) -> tuple[float, CircuitChange | None]:
        """`child` stopped taking jobs. Returns (cooldown before its replacement starts, and
        OPENED when the pool's circuit opens, REOPENED when a probe failed, or None)."""
        child.quarantined = reason
        slot = self._slot_of(child)
        cooldown = 0.0
        for s in self.slots:
            if s.successor is child:  # quarantined before it was ready: it never serves
                s.successor = None
                cooldown = s.quarantines.failure(now, now)
                if s.child is not None and s.child.generation == child.generation:
                    s.replace_at, s.replace_why = now + cooldown, f"quarantined: {reason}"
                s.probation_next = True
        if slot is not None:
            cooldown = slot.quarantines.failure(now, now)
            slot.replace_at, slot.replace_why = now + cooldown, f"quarantined: {reason}"
            slot.probation_next = True
        if child is self.probe:
            self.probe = None
            return cooldown, self._open(now, CircuitChange.REOPENED)
        if self.circuit is Circuit.CLOSED:
            count = sum(1 for s in self.slots if s.child is not None and s.child.quarantined)
            if self.desired and count >= self.config.circuit.ratio * self.desired:
                return cooldown, self._open(now, CircuitChange.OPENED)
        return cooldown, None

    def _open(self, now: float, how: CircuitChange) -> CircuitChange:
        self.circuit = Circuit.OPEN
        self.circuit_until = now + self.circuit_backoff.failure(now, now)
        return how

    def probation_passed(self, child: Child) -> Circuit | None:
        """A replacement proved itself: forget its slot's quarantine streak. Returns
        Circuit.CLOSED when it was the probe of an open circuit."""
        child.probation = False
        slot = self._slot_of(child)
        if slot is not None:
            slot.quarantines.reset()
            slot.probation_next = False
        if child is self.probe:
            self.probe = None
            self.circuit = Circuit.CLOSED
            self.circuit_backoff.reset()
            for s in self.slots:  # the fault is gone: replace the quarantined ones now
                if s.child is not None and s.child.quarantined and s.replace_at is not None:
                    s.replace_at = 0.0
            return Circuit.CLOSED
        return None

    def settled(self) -> bool:
        """Start-up is over: every slot has a ready child or has failed at least once (a
        pool that cannot boot must not hold up systemd's READY=1 for the healthy ones)."""
        return all((s.child is not None and s.child.state is ChildState.READY)
                   or s.backoff.in_streak for s in self.slots)

    def progress(self) -> tuple[bool, str | None]:
        """Where the current roll stands: (finished, problem). Finished with no problem means
        every slot has a ready child of the current generation and nothing old is left in a
        slot; a halted roll is finished with the halt reason as its problem."""
        if self.halted is not None:
            return True, self.halted
        if self.removed:
            return not self.children(), None
        if self.rolling or any(s.child is not None and s.child.state is ChildState.STARTING
                               for s in self.slots):
            return False, None
        failed = []
        for slot in self.slots:
            if slot.child is not None or slot.ready_generation == self.generation:
                # Serving, or it served this generation and crashed since: the roll reached
                # it; the restart is backoff's business, not the roll's.
                continue
            if slot.fatal is not None:
                failed.append(slot.fatal)
            elif slot.failed_generation == self.generation:
                failed.append(slot.last_reason or "crashed before it was ready")
            else:
                # Empty for a moment (a crash just before its successor started, a starting
                # child retired as outdated): its child of this generation is yet to come.
                return False, None
        if failed:
            return True, (f"{len(failed)} of {len(self.slots)} children not running "
                          f"({'; '.join(sorted(set(failed)))})")
        return True, None

    # -- reload ---------------------------------------------------------------------------------

    def roll(self, config: PoolConfig | None = None) -> list[Action]:
        """Start a new generation (new code, maybe new config). Returns what to retire now:
        successors of the previous roll that are not ready yet, which are simply replaced."""
        if config is not None:
            if config.processes != self.config.processes:
                self.scaled_to = None  # the config changed the size: it wins over `scale`
                self.scaled_by = None
            self.config = config
            for slot in self.slots:
                slot.reconfigure(config)
            c, failures = config.circuit, self.circuit_backoff.failures
            self.circuit_backoff = Backoff(c.cooldown, c.cooldown_max, 2.0, 0.1, math.inf)
            self.circuit_backoff.failures = failures
        self.generation += 1
        self.halted = None
        if self.circuit is Circuit.OPEN:
            self.circuit_until = 0.0  # new code may have fixed it: probe at once
        actions: list[Action] = []
        for slot in self.slots:
            if slot.successor is not None:
                actions.append(Retire(slot.successor, "superseded by a newer reload"))
            if slot.child is None:
                slot.restart_at = 0.0  # an operator's reload retries a backing-off slot now
                slot.fatal = None
        return actions

    def remove(self) -> None:
        """The pool left the config: every child drains (via plan()) and none is replaced."""
        self.removed = True
        self.halted = None

    # -- exits ----------------------------------------------------------------------------------

    def child_exited(self, child: Child, code: int | None, now: float,
                     stopping: bool) -> ExitDecision:
        """Classify an exit, free its place and schedule the replacement.

        A child the master asked to stop (retired, or signalled by a fleet stop) is never a
        failure, whatever its status (circus #809).
        """
        if child is self.probe:
            self.probe = None
            if child in self.retired or child.stop_requested_at is not None:
                self.circuit, self.circuit_until = Circuit.OPEN, now  # retired on purpose: again
            else:
                self._open(now, CircuitChange.REOPENED)  # the probe died: the fault is still there
        if child in self.retired or child.stop_requested_at is not None:
            if child in self.retired:
                self.retired.remove(child)
            self.retiring(child)  # frees its slot if it still held one (a fleet stop)
            self.retired.remove(child)
            return ExitDecision(ExitKind.STOPPED, None, False, 0)
        kind = ExitKind.BOOT_ERROR if code == EXIT_BOOT_ERROR else ExitKind.CRASHED
        reason = f"{kind.value}: {child.boot_error}" if kind is ExitKind.BOOT_ERROR else kind.value
        for slot in self.slots:
            if slot.successor is child and slot.child is not None and (
                    slot.child.generation == child.generation):
                # A replacement (recycle, quarantine) died before it was ready: not a roll;
                # the old child keeps serving and the replacement is retried with backoff.
                slot.successor = None
                slot.replace_at = now + slot.backoff.failure(child.started_at, now)
                return ExitDecision(kind, None, True, slot.backoff.failures)
            if slot.successor is child:
                # A new-generation child died before it was ready: halt, keep the old one.
                slot.successor = None
                what = (f"failed to boot: {child.boot_error or 'boot error'}"
                        if kind is ExitKind.BOOT_ERROR else "crashed before it was ready")
                self.halted = f"{child.name} of generation {child.generation} {what}"
                return ExitDecision(ExitKind.ROLL_FAILED, None, True, 0)
            if slot.child is child:
                slot.child = None
                slot.restarts += 1
                slot.replace_at = slot.replace_why = None  # the restart replaces it
                if child.ready_at is None:
                    slot.failed_generation = child.generation
                delay = slot.backoff.failure(child.started_at, now)
                if slot.successor is not None:
                    # It crashed mid-roll: its successor, already starting, takes the slot.
                    slot.child, slot.successor = slot.successor, None
                    delay = None
                log_reason = slot.backoff.failures == 1 or reason != slot.last_reason
                slot.last_reason = reason
                limit = self.config.max_restarts
                if limit is not None and slot.backoff.failures > limit and delay is not None:
                    slot.fatal = (f"gave up after {slot.backoff.failures} failures in a row "
                                  f"(max_restarts: {limit}): {reason}")
                    return ExitDecision(kind, None, True, slot.backoff.failures, slot.fatal)
                if (self.config.command is not None and delay is not None
                        and slot.backoff.failures >= QUARANTINE_AFTER):
                    # A command that keeps failing: quarantine the slot, cooldown doubling.
                    delay = max(delay, slot.quarantines.failure(now, now))
                if delay is not None:
                    slot.restart_at = now + delay
                return ExitDecision(kind, None if stopping else delay, log_reason,
                                    slot.backoff.failures)
        return ExitDecision(kind, None, True, 0)  # a slot that was scaled away meanwhile


def roll_results(pools: Mapping[str, Pool], names: Sequence[str]) -> dict[str, dict] | None:
    """How the rolls of pools `names` ended (what `gearvisor reload` waits for and prints):
    None while one is still going."""
    results: dict[str, dict] = {}
    for name in names:
        pool = pools.get(name)
        if pool is None:
            results[name] = {"result": "removed"}
            continue
        finished, problem = pool.progress()
        if not finished:
            return None
        results[name] = {"generation": pool.generation,
                         "result": "removed" if pool.removed else (problem or "ok")}
        if problem:
            results[name]["error"] = problem
    return results
