"""Held lanes: a job a child holds behind a slow one goes to an idle child instead.

With `hold_next` (the default), a Python child keeps a second connection per job server
while the queue is busy, and it holds the next job there while it runs one (gearman/
worker.py, docs/prefetch.md). Gearman has no packet that gives a job back; gearmand
requeues what it assigned on a connection only when that connection closes. Job code holds
the child's only thread, and no signal may interrupt it, so the master does the closing:

- A child that starts holding while the master does not watch its pool says so (Holding).
  The master then looks every WATCH_EVERY until no child of the pool has held a job for
  WATCH_LINGER. An idle pool, or one whose jobs come one at a time, holds nothing, so it
  costs the master no look at all.
- When a child's job has run STEAL_AFTER while another child of the pool is asleep waiting
  for work, the master takes a copy of the held lane's socket (pidfd_getfd) and shuts it
  down. gearmand requeues the held job and wakes the idle child, which runs it. The child
  that held it reopens the lane when its queue is busy again.
- The scoreboard's lock orders that against the child starting the held job: the master
  closes only a lane that is still recorded, and the child runs nothing it read from a lane
  that was closed. Each job runs once.
- Where the master may not do this (a seccomp profile that refuses pidfd_getfd, a child of
  another user without CAP_SYS_PTRACE), it says so once per pool, and that pool's children
  stop holding jobs: they run one job per round trip, as with `hold_next: false`.

gearmand counts a job given back as a try under `--job-retries` (as any connection that
closes with a job assigned): a job given back that many times is failed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from gearvisor import messages as msg
from gearvisor.master import bus as ev
from gearvisor.master.component import Component
from gearvisor.policy.child import Child, ChildState

if TYPE_CHECKING:
    from gearvisor.master.arbiter import Arbiter
    from gearvisor.master.loop import Timer
    from gearvisor.policy.pool import Pool

STEAL_AFTER = 0.002  # a job that has run this long is slow for the job held behind it
WATCH_EVERY = 0.002  # how often the master looks while a pool holds jobs
WATCH_LINGER = 1.0  # it stops looking once no child of the pool held a job this long


class HeldLanes(Component):
    """Gives held jobs back to gearmand when they would wait while a sibling idles."""

    def __init__(self) -> None:
        self.watched: dict[str, float] = {}  # pool name -> look until (monotonic)
        self.returned: dict[str, int] = {}  # pool name -> held jobs given back
        self.refused: dict[str, str] = {}  # pool name -> why its lanes cannot be closed
        self._timer: Timer | None = None

    def attach(self, master: Arbiter) -> None:
        self.master = master
        master.bus.subscribe(ev.ChildSaid, self._said)
        master.bus.subscribe(ev.ChildSpawned, self._spawned)

    def _said(self, event: ev.ChildSaid) -> None:
        if isinstance(event.message, msg.Holding):
            self._watch(event.pool)

    def _spawned(self, event: ev.ChildSpawned) -> None:
        board = event.child.scoreboard
        if board is None or board.lock is None:
            return
        if event.pool.name in self.refused:
            board.set_lanes_off()
        elif event.pool.name in self.watched:
            board.set_watched(True)

    def _watch(self, pool: Pool) -> None:
        if pool.name not in self.watched:
            for child in pool.children():
                if child.scoreboard is not None:
                    child.scoreboard.set_watched(True)
        self.watched[pool.name] = self.master.clock() + WATCH_LINGER
        if self._timer is None:
            self._timer = self.master.loop.call_later(WATCH_EVERY, self._look)

    def _look(self) -> None:
        self._timer = None
        now = self.master.clock()
        for name, until in list(self.watched.items()):
            pool = self.master.pools.get(name)
            if pool is not None and self._pass(pool, now):
                self.watched[name] = now + WATCH_LINGER
            elif pool is None or now >= until:
                del self.watched[name]
                for child in pool.children() if pool is not None else ():
                    if child.scoreboard is not None:
                        child.scoreboard.set_watched(False)
        if self.watched and not self.master.stopping:
            self._timer = self.master.loop.call_later(WATCH_EVERY, self._look)

    def _pass(self, pool: Pool, now: float) -> bool:
        """One look at a pool: give back each held job whose job in front is slow, if a
        child of the pool is idle. True while any child holds a job."""
        holders = []
        idle = False
        for child in pool.children():
            board = child.scoreboard
            if board is None or child.pid <= 0:
                continue
            if board.held() is not None:
                holders.append(child)
            elif not idle and _takes_jobs(child) and board.asleep():
                idle = True
        if idle:
            for child in holders:
                self._give_back(child, pool, now)
        return bool(holders)

    def _give_back(self, child: Child, pool: Pool, now: float) -> None:
        board = child.scoreboard
        assert board is not None
        error: list[OSError] = []

        def close(fd: int, port: int) -> bool:
            try:
                self.master.system.shutdown_socket(child.pid, fd, port)
                return True
            except OSError as e:
                error.append(e)
                return False

        done = board.take_held(now - STEAL_AFTER, close)
        if done:
            self.returned[pool.name] = self.returned.get(pool.name, 0) + 1
            self.master.log.debug("gave a held job back to the job server: the job in front "
                                  "of it is slow and another child is idle", pool=pool.name,
                                  slot=child.slot, child_pid=child.pid)
        elif done is False:
            board.set_lanes_off()
            if pool.name not in self.refused:
                self.refused[pool.name] = str(error[0]) if error else "unknown"
                self.master.log.warning(
                    "cannot close a child's held lane, so this pool's children hold no next "
                    "job: they take one job per round trip (hold_next: false silences this)",
                    pool=pool.name, child_pid=child.pid, error=self.refused[pool.name])

    def status(self, now: float) -> dict[str, Any]:
        return {"held_jobs_returned": dict(self.returned)} if self.returned else {}

    def begin_stop(self, fast: bool) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.watched.clear()


def _takes_jobs(child: Child) -> bool:
    """Would this child run a job gearmand gave it now?"""
    return child.state is ChildState.READY and not child.paused and not child.quarantined
