"""Pure decisions about failures: restart backoff. No I/O, no clock of its own.

Callers pass `now` (time.monotonic()) so tests drive time by hand.
"""

from __future__ import annotations

import random
from collections.abc import Callable


class Backoff:
    """Exponential restart delay with jitter for one slot, reset by a long enough uptime.

    The first failure after a reset waits `initial`; each consecutive failure multiplies the
    delay by `multiplier`, up to `maximum`. A child that stayed up `reset_after` seconds before
    failing starts a new streak. Jitter spreads the delay by +/- `jitter` (a fraction) so a
    pool whose children all crashed together does not restart in lock-step.
    """

    def __init__(
        self,
        initial: float,
        maximum: float,
        multiplier: float = 2.0,
        jitter: float = 0.0,
        reset_after: float = 10.0,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self.initial = initial
        self.maximum = maximum
        self.multiplier = multiplier
        self.jitter = jitter
        self.reset_after = reset_after
        self._rand = rand
        self.failures = 0  # consecutive failures in the current streak

    def failure(self, started_at: float, now: float) -> float:
        """Record a failure of a child started at `started_at`; return the delay to wait."""
        if now - started_at >= self.reset_after:
            self.failures = 0
        self.failures += 1
        base = min(self.initial * self.multiplier ** (self.failures - 1), self.maximum)
        if self.jitter:
            base *= 1.0 + self.jitter * (2.0 * self._rand() - 1.0)
        return max(0.0, min(base, self.maximum))

    def reset(self) -> None:
        """Forget the streak (the slot was restarted on purpose, e.g. by an operator)."""
        self.failures = 0

    @property
    def in_streak(self) -> bool:
        return self.failures > 0
