"""Pure decisions about failures: restart backoff. No I/O, no clock of its own.

Callers pass `now` (time.monotonic()) so tests drive time by hand.
"""

from __future__ import annotations

import collections
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
        # The exponent stops growing once the delay is at its maximum: a crash loop of
        # thousands of attempts must not overflow a float (2.0 ** 1024) in the master.
        growth = 1.0
        for _ in range(self.failures - 1):
            growth *= self.multiplier
            if self.initial * growth >= self.maximum or growth > 1e12:
                break
        base = min(self.initial * growth, self.maximum)
        if self.jitter:
            base *= 1.0 + self.jitter * (2.0 * self._rand() - 1.0)
        return max(0.0, min(base, self.maximum))

    def reset(self) -> None:
        """Forget the streak (the slot was restarted on purpose, e.g. by an operator)."""
        self.failures = 0

    @property
    def in_streak(self) -> bool:
        return self.failures > 0


class ErrorWindow:
    """One child's recent job outcomes, and whether it fails fast enough to quarantine itself.

    A failure counts as *fast* when the job ended (raised or failed) in under `fast` seconds:
    a worker whose database is gone fails every job in milliseconds, while a job that fails
    after real work is the job's problem, not the worker's. The child quarantines itself when,
    among its last `window` jobs (at least `min_jobs` of them), fast failures make up at least
    `ratio`. On probation (a replacement of a quarantined child) the first fast failure is
    enough, and `probation_jobs` successes end the probation.
    """

    def __init__(self, window: int, min_jobs: int, ratio: float, fast: float,
                 probation_jobs: int = 0) -> None:
        self.window = window
        self.min_jobs = min_jobs
        self.ratio = ratio
        self.fast = fast
        self.outcomes: collections.deque[bool] = collections.deque(maxlen=window)  # True: fast fail
        self.fast_fails = 0  # True entries in outcomes (kept as they come and go)
        self.probation_left = probation_jobs  # successes still needed; 0 = not on probation
        self.failed = 0  # failures seen in all (reported when it quarantines)

    @property
    def on_probation(self) -> bool:
        return self.probation_left > 0

    def record(self, ok: bool, seconds: float) -> str | None:
        """Record one job; return why the child must quarantine itself now, or None."""
        if ok and not self.fast_fails and not self.probation_left:
            # (the common case, per job: no fast failure in the window, so none falls out
            # of it, and a success cannot reach the ratio)
            self.outcomes.append(False)
            return None
        fast_fail = False
        if not ok:
            self.failed += 1
            fast_fail = seconds < self.fast
        outcomes = self.outcomes
        if len(outcomes) == self.window and outcomes[0]:
            self.fast_fails -= 1  # about to fall out of the window
        outcomes.append(fast_fail)
        if fast_fail:
            self.fast_fails += 1
        if self.probation_left > 0:  # (on_probation, without the property's call: per job)
            if fast_fail:
                return (f"failed a job in {seconds * 1000:.0f} ms while on probation after an "
                        "earlier quarantine")
            if ok:
                self.probation_left -= 1
            return None
        n = len(outcomes)
        fast = self.fast_fails
        if fast and n >= self.min_jobs and fast >= self.ratio * n:
            return (f"{fast} of its last {n} jobs failed in under {self.fast * 1000:.0f} ms "
                    f"(threshold {self.ratio:.0%} of at least {self.min_jobs})")
        return None


def jittered(value: float, jitter: float, rand: Callable[[], float] = random.random) -> float:
    """`value` spread by +/- `jitter` (a fraction), so a pool's children do not all recycle
    at the same moment."""
    return value * (1.0 + jitter * (2.0 * rand() - 1.0))


FD_MARGIN = 0.8  # warn when a count reaches this share of an open-files limit
CHILD_BASE_FDS = 16  # stdio, event pipe, epoll, wake-up pipe, imports and some slack


def master_fds(children: int) -> int:
    """Open files the master needs for `children` children: a pipe each (twice during a
    surge roll) plus its own."""
    return 2 * children + CHILD_BASE_FDS


def fd_warnings(pools: list[tuple[str, int, int, int | None]], soft_limit: int) -> list[str]:
    """Warnings about open-file limits, from (pool, processes, servers, rlimit_nofile) and
    the master's own soft RLIMIT_NOFILE (children inherit it unless rlimit_nofile is set).

    A child needs a descriptor per job server plus its own few; the master one per child
    (its event pipe); every job server one per child connected to it, and a job server on
    this machine usually runs under the same default limit (often 1024).
    """
    out = []
    children = 0
    for name, processes, servers, rlimit in pools:
        limit = rlimit or soft_limit
        need = servers + CHILD_BASE_FDS
        if need >= FD_MARGIN * limit:
            out.append(f"pool {name}: each child needs about {need} open files ({servers} "
                       f"job servers) but its limit is {limit}; raise rlimit_nofile")
        children += processes
    connections = children  # every child connects to every job server of its pool
    master_need = master_fds(children)
    if master_need >= FD_MARGIN * soft_limit:
        out.append(f"the master may need {master_need} open files for {children} children "
                   f"(surge rolls double them) but its limit is {soft_limit}; raise "
                   "LimitNOFILE in the systemd unit or `ulimit -n`")
    if connections >= FD_MARGIN * soft_limit:
        out.append(f"{connections} children connect to each job server; a job server with "
                   f"the same open-files limit ({soft_limit}) is close to refusing them: "
                   "raise gearmand's LimitNOFILE")
    return out
