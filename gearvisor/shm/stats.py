"""Per-function job counts and duration histograms of one child, in shared memory.

The master maps one anonymous shared region per Python child before fork (beside its
scoreboard), laid out from the pool's functions and their histogram bounds. The child adds
to it after every job: three integer increments and one float addition through memoryview
casts, no lock, no syscall, nothing the master has to be woken for. The master reads it
when Prometheus scrapes, and once more when it reaps the child, to fold the dead child's
final numbers into the totals it keeps (so counters survive restarts and reloads).

Single writer, and every value only grows, so the reader needs no seqlock: each aligned
8-byte word is read whole, and a scrape that lands mid-update sees one job's numbers
partly counted, never a count going back.

Layout, per function in the order given: the outcome counters (OUTCOMES), then one count per
histogram bucket (each bound, then +Inf; not cumulative), all unsigned 64-bit; after all
functions, one double per function: the sum of its durations.
"""

from __future__ import annotations

import mmap
from bisect import bisect_left
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

# What a child itself can tell about a job's end. `crash` (died mid-job) and a hard-timeout
# kill are the master's to count: the child is dead by then.
OUTCOMES = ("success", "error", "timeout", "poison")
SUCCESS, ERROR, TIMEOUT, POISON = range(len(OUTCOMES))
_N = len(OUTCOMES)


@dataclass(frozen=True)
class FunctionStats:
    """One function's numbers at one moment: counts by OUTCOMES, bucket counts (one per
    bound, then +Inf; not cumulative) and the sum of durations in seconds."""

    bounds: tuple[float, ...]
    outcomes: tuple[int, ...]
    buckets: tuple[int, ...]
    sum: float


class JobStats:
    """One child's region. Create in the master before fork; the child writes, the master
    reads. `buckets` maps each function to its histogram bounds (increasing, seconds)."""

    __slots__ = ("_mm", "_q", "_d", "_index", "functions")

    def __init__(self, buckets: Mapping[str, Sequence[float]]) -> None:
        self.functions: dict[str, tuple[float, ...]] = {f: tuple(b) for f, b in buckets.items()}
        words = sum(_N + len(b) + 1 for b in self.functions.values())
        size = max(8, 8 * (words + len(self.functions)))
        self._mm = mmap.mmap(-1, size)  # anonymous + MAP_SHARED: survives fork, zeroed
        view = memoryview(self._mm)
        self._q = view[:8 * words].cast("Q")
        self._d = view[8 * words:8 * (words + len(self.functions))].cast("d")
        # function -> (first word, bounds, index of its sum): one dict lookup per job
        self._index: dict[str, tuple[int, tuple[float, ...], int]] = {}
        base = 0
        for i, (function, bounds) in enumerate(self.functions.items()):
            self._index[function] = (base, bounds, i)
            base += _N + len(bounds) + 1

    def job_done(self, function: str, outcome: int, seconds: float) -> None:
        """Child side: a job of `function` ran `seconds` and ended in `outcome` (SUCCESS,
        ERROR or TIMEOUT). A function not in the layout is not counted (labels stay the
        pool's functions)."""
        slot = self._index.get(function)
        if slot is None:
            return
        base, bounds, i = slot
        q = self._q
        q[base + outcome] += 1
        q[base + _N + bisect_left(bounds, seconds)] += 1  # Prometheus: value <= bound
        self._d[i] += seconds

    def job_not_run(self, function: str, outcome: int) -> None:
        """Child side: a job failed without running (POISON, or ERROR: refused as too big)."""
        slot = self._index.get(function)
        if slot is not None:
            self._q[slot[0] + outcome] += 1

    def read(self) -> dict[str, FunctionStats]:
        """Master side: every function's numbers now. Never blocks."""
        q = self._q.tolist()
        d = self._d.tolist()
        out = {}
        for function, (base, bounds, i) in self._index.items():
            out[function] = FunctionStats(bounds, tuple(q[base:base + _N]),
                                          tuple(q[base + _N:base + _N + len(bounds) + 1]), d[i])
        return out

    def close(self) -> None:
        """Release the mapping (the master, once the child is reaped and folded in)."""
        self._q.release()
        self._d.release()
        self._mm.close()


def p95(bounds: tuple[float, ...], counts: list[int]) -> float | None:
    """The 95th percentile of jobs counted in histogram buckets (one count per bound, then
    +Inf): the bound of the bucket it falls in (Prometheus' histogram_quantile without the
    interpolation); None without jobs. Past the last bound: that bound."""
    total = sum(counts)
    if total <= 0:
        return None
    rank, seen = 0.95 * total, 0
    for bound, n in zip((*bounds, bounds[-1] if bounds else 0.0), counts, strict=False):
        seen += n
        if seen >= rank:
            return bound
    return bounds[-1] if bounds else None
