"""The master's record of one helper process (the file watcher, the alert notifier): what
its supervisor (master/helper.py) decides restarts from and what `gearvisor status` shows.

Plain data, no I/O: a helper's own record (helpers/watcher.py's WatcherState) extends it
with what only that helper knows.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from gearvisor.policy.backoff import Backoff


@dataclass(kw_only=True)
class HelperRecord:
    """One helper: its process (None while there is none) and its restart streak.

    Keyword-only, so a record that extends it keeps its own positional fields first."""

    pid: int | None = None
    started_at: float = 0.0
    restart_at: float = 0.0  # when the next start is due (while there is no process)
    backoff: Backoff = field(default_factory=lambda: Backoff(0.5, 30.0, 2.0, 0.1, 10.0))
    restarts: int = 0  # unexpected exits that were followed by a restart
    replacing: bool = False  # stopped on purpose to start anew: respawn at once, no failure
