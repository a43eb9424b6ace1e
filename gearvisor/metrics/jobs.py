"""JobTotals: what the master remembers of every child's job counts.

Each Python child counts its own jobs in shared memory (gearvisor/shm/stats.py). A count
that lived only there would vanish when the child exits, so when the master reaps a child it
folds the child's final numbers in here, per (pool, function); a scrape is these totals plus
what the live children hold now. Outcomes only a master can see (a child that died mid-job,
or was killed for its hard timeout) are counted here directly.

A histogram is kept for the function's current bounds (the pool's config): a reload that
changes a function's `buckets` starts its histogram again from zero (Prometheus sees a
counter reset), and a child still running with the old bounds adds only its outcome counts.
Pure logic: no I/O, no clock.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from gearvisor.shm.stats import OUTCOMES, FunctionStats

# Every outcome a series has: the child's, then the master's.
ALL_OUTCOMES = (*OUTCOMES, "crash")
_CHILD = len(OUTCOMES)


@dataclass
class JobCounts:
    """One (pool, function): counts by ALL_OUTCOMES, and its histogram (bucket counts per
    bound then +Inf, not cumulative; the sum of durations)."""

    bounds: tuple[float, ...]
    outcomes: list[int] = field(default_factory=lambda: [0] * len(ALL_OUTCOMES))
    buckets: list[int] = field(default_factory=list)
    sum: float = 0.0

    def __post_init__(self) -> None:
        if not self.buckets:
            self.buckets = [0] * (len(self.bounds) + 1)

    def add(self, stats: FunctionStats) -> None:
        """Add one child's numbers (its histogram only if it has these bounds)."""
        for i in range(_CHILD):
            self.outcomes[i] += stats.outcomes[i]
        if stats.bounds == self.bounds:
            for i, n in enumerate(stats.buckets):
                self.buckets[i] += n
            self.sum += stats.sum

    def copy(self) -> JobCounts:
        return JobCounts(self.bounds, list(self.outcomes), list(self.buckets), self.sum)

    @property
    def count(self) -> int:
        """Jobs in the histogram (those that ran: success, error, timeout)."""
        return sum(self.buckets)

    def cumulative(self) -> list[tuple[float, int]]:
        """(upper bound, jobs <= it) per bucket, ending with (inf, count): Prometheus's le."""
        out, running = [], 0
        for bound, n in zip((*self.bounds, float("inf")), self.buckets, strict=True):
            running += n
            out.append((bound, running))
        return out


class JobTotals:
    """Per-(pool, function) totals of children that are gone, plus master-seen outcomes."""

    def __init__(self) -> None:
        self._totals: dict[tuple[str, str], JobCounts] = {}

    def _entry(self, pool: str, function: str, bounds: tuple[float, ...]) -> JobCounts:
        """The totals of (pool, function), its histogram reset if its bounds changed."""
        entry = self._totals.get((pool, function))
        if entry is None:
            entry = self._totals[(pool, function)] = JobCounts(bounds)
        elif entry.bounds != bounds:
            entry.bounds, entry.buckets, entry.sum = bounds, [0] * (len(bounds) + 1), 0.0
        return entry

    def fold(self, pool: str, stats: Mapping[str, FunctionStats],
             bounds: Mapping[str, tuple[float, ...]]) -> None:
        """A reaped child's final numbers. `bounds` is the pool's current config (a
        function no longer in it keeps the child's own bounds)."""
        for function, got in stats.items():
            self._entry(pool, function, bounds.get(function, got.bounds)).add(got)

    def count(self, pool: str, function: str, outcome: str,
              bounds: tuple[float, ...]) -> None:
        """An outcome the master saw (crash, or timeout: killed for the hard timeout)."""
        self._entry(pool, function, bounds).outcomes[ALL_OUTCOMES.index(outcome)] += 1

    def view(self, pool: str, bounds: Mapping[str, tuple[float, ...]],
             live: Iterable[Mapping[str, FunctionStats]]) -> dict[str, JobCounts]:
        """The pool's numbers now: totals plus the live children's `live` stats, for every
        function of `bounds` (the pool's config) and any other it has counted."""
        out: dict[str, JobCounts] = {}
        for (p, function), entry in self._totals.items():
            if p == pool:
                target = bounds.get(function, entry.bounds)
                out[function] = (entry.copy() if entry.bounds == target else
                                 JobCounts(target, list(entry.outcomes)))
        for function, b in bounds.items():
            out.setdefault(function, JobCounts(b))
        for stats in live:
            for function, got in stats.items():
                if function not in out:
                    out[function] = JobCounts(got.bounds)
                out[function].add(got)
        return out

    def forget(self, keep: set[str]) -> None:
        """Drop the totals of pools not in `keep` (gone from the config and drained)."""
        for key in [k for k in self._totals if k[0] not in keep]:
            del self._totals[key]

    def pools(self) -> set[str]:
        return {p for p, _ in self._totals}
