"""One pool as the master sees it: slots, their children, backoff and the exit decisions.

Pure logic: no fork, no signals, no clock of its own. The arbiter does the I/O and passes
`now`; the tests drive these classes by hand.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from .config import PoolConfig
from .health import Backoff
from .process import EXIT_BOOT_ERROR, Child


class ExitKind(Enum):
    STOPPED = "stopped"  # we asked it to stop: never a failure
    BOOT_ERROR = "boot_error"  # could not import/validate its functions
    CRASHED = "crashed"  # any other exit


@dataclass
class ExitDecision:
    """What the arbiter should do after a child exits, and what to log."""

    kind: ExitKind
    restart_in: float | None  # seconds until a replacement; None = leave the slot empty
    log_reason: bool  # first failure of a streak (or a new reason): log it at warning/error
    streak: int  # consecutive failures of this slot


class Slot:
    """A numbered place in a pool. It outlives the children that fill it."""

    def __init__(self, index: int, config: PoolConfig) -> None:
        b = config.backoff
        self.index = index
        self.backoff = Backoff(b.initial, b.max, b.multiplier, b.jitter, b.reset_after)
        self.child: Child | None = None
        self.restart_at = 0.0  # monotonic time before which no child may start
        self.last_reason: str | None = None  # last failure reason logged in this streak

    def reconfigure(self, config: PoolConfig) -> None:
        b = config.backoff
        failures = self.backoff.failures
        self.backoff = Backoff(b.initial, b.max, b.multiplier, b.jitter, b.reset_after)
        self.backoff.failures = failures


class Pool:
    """Desired children for one pool and the bookkeeping that keeps them there."""

    def __init__(self, config: PoolConfig) -> None:
        self.config = config
        self.generation = 1
        self.slots = [Slot(i, config) for i in range(config.processes)]

    @property
    def name(self) -> str:
        return self.config.name

    def children(self) -> list[Child]:
        return [s.child for s in self.slots if s.child is not None]

    def due(self, now: float) -> list[Slot]:
        """Slots that have no child and whose backoff has run out."""
        return [s for s in self.slots if s.child is None and s.restart_at <= now]

    def next_due(self) -> float | None:
        """The earliest time a slot will want a child (for the loop's select timeout)."""
        times = [s.restart_at for s in self.slots if s.child is None]
        return min(times) if times else None

    @property
    def backing_off(self) -> list[Slot]:
        return [s for s in self.slots if s.child is None and s.backoff.in_streak]

    def child_exited(self, slot: Slot, child: Child, code: int | None, now: float,
                     stopping: bool, requested: bool) -> ExitDecision:
        """Classify an exit, free the slot and schedule the replacement.

        `requested` is True when the master asked the child to stop: such an exit is never
        a failure, whatever its status (circus #809).
        """
        slot.child = None
        if requested:
            slot.restart_at = now
            return ExitDecision(ExitKind.STOPPED, None if stopping else 0.0, False,
                                slot.backoff.failures)
        kind = ExitKind.BOOT_ERROR if code == EXIT_BOOT_ERROR else ExitKind.CRASHED
        delay = slot.backoff.failure(child.started_at, now)
        reason = f"{kind.value}: {child.boot_error}" if kind is ExitKind.BOOT_ERROR else kind.value
        new_streak = slot.backoff.failures == 1
        log_reason = new_streak or reason != slot.last_reason
        slot.last_reason = reason
        slot.restart_at = now + delay
        return ExitDecision(kind, None if stopping else delay, log_reason, slot.backoff.failures)

    def child_ready(self, slot: Slot) -> int:
        """A child became ready; returns how many failures its slot's streak had (for the log).

        Readiness does not reset the backoff by itself: a child that registers and then
        crashes at once is still a crash loop. The reset comes from uptime (Backoff).
        """
        failures = slot.backoff.failures
        slot.last_reason = None
        return failures
