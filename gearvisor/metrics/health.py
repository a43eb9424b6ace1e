"""HealthCounters: restarts by reason and quarantines, counted from the master's bus events,
and how a reaped child's exit is classified for them.

Pure: the metrics component (master/metrics.py) calls these from its bus subscribers.
"""

from __future__ import annotations

from collections import Counter

from gearvisor.policy.child import EXIT_BOOT_ERROR, Child
from gearvisor.policy.pool import ExitDecision, ExitKind

RESTART_REASONS = ("crash", "boot_error", "exit", "timeout", "recycle")
MAX_JOURNAL_SERIES = 1000  # (pool, function) pairs and functions the journal series keep


def restart_reason(child: Child, decision: ExitDecision, code: int | None,
                   recycled: bool, stopping: bool) -> str | None:
    """Why a reaped child's slot gets a new child, as gearvisor_child_restarts_total's
    `reason`; None when it is no restart (a stop, a roll, a scale-down, a quarantined child
    replaced: quarantines have their own counter).

    `code` is its exit code (None: killed by a signal); `recycled` that it was retired
    because a recycling limit replaced it (max_jobs, max_memory, max_lifetime); `stopping`
    that the whole master is stopping (nothing restarts then)."""
    if stopping:
        return None
    if child.killed_for == "timeout":
        return "timeout"  # the master SIGKILLed it for a job past its hard timeout
    if decision.kind is ExitKind.STOPPED:
        return "recycle" if recycled else None
    if decision.kind is ExitKind.BOOT_ERROR or code == EXIT_BOOT_ERROR or (
            decision.kind is ExitKind.ROLL_FAILED and child.boot_error):
        return "boot_error"
    return "exit" if code == 0 else "crash"


class HealthCounters:
    """Cumulative per-pool counts: restarts by reason, quarantines."""

    def __init__(self) -> None:
        self.restarts: Counter[tuple[str, str]] = Counter()
        self.quarantines: Counter[str] = Counter()
        self.held_returned: Counter[str] = Counter()  # held jobs given back (master/lanes)
        self.notifications: Counter[tuple[str, str]] = Counter()  # (channel, outcome)
        # The job journal, as its store helper reports: retries it submitted per (pool,
        # function), dead letters per function now, whether the store is up (None: no
        # report yet, or the journal is off)
        self.retries: Counter[tuple[str, str]] = Counter()
        self.dead_letters: dict[str, int] = {}
        self.store_up: bool | None = None
        self.journal_waiting = 0  # journal lines the master holds until the store has them
        self.journal_dropped = 0  # ... and those it dropped for its bound

    def restarted(self, pool: str, reason: str) -> None:
        self.restarts[(pool, reason)] += 1

    def quarantined(self, pool: str) -> None:
        self.quarantines[pool] += 1

    def notified(self, channel: str, outcome: str) -> None:
        """An alert notification's outcome; at most 64 channels (3 outcomes each) are kept
        (the config allows 64), so the label stays bounded whatever the events say."""
        if (channel, outcome) in self.notifications or len(self.notifications) < 3 * 64:
            self.notifications[(channel, outcome)] += 1

    def journal(self, up: bool, dead: dict[str, int],
                retries: tuple[tuple[str, str, int], ...]) -> None:
        """A store helper's report. Labels stay bounded: at most MAX_JOURNAL_SERIES
        (pool, function) pairs and functions are kept."""
        self.store_up = up
        self.dead_letters = dict(list(dead.items())[:MAX_JOURNAL_SERIES])
        for pool, function, n in retries:
            if (pool, function) in self.retries or len(self.retries) < MAX_JOURNAL_SERIES:
                self.retries[(pool, function)] += n

    def journal_buffered(self, waiting: int, dropped: int) -> None:
        """The master's buffer of journal lines for the store helper."""
        self.journal_waiting, self.journal_dropped = waiting, dropped

    def forget(self, keep: set[str]) -> None:
        """Drop the counts of pools not in `keep` (gone from the config and drained)."""
        for key in [k for k in self.restarts if k[0] not in keep]:
            del self.restarts[key]
        for pool in [p for p in self.quarantines if p not in keep]:
            del self.quarantines[pool]
        for pool in [p for p in self.held_returned if p not in keep]:
            del self.held_returned[pool]
