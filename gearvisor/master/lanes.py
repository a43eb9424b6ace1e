"""Held lanes: a job a child holds behind a slow one goes to an idle child instead.

With `hold_next` (the default), a Python child keeps a second connection per job server
while the queue is busy, and it holds the next job there while it runs one (gearman/
worker.py, docs/prefetch.md). Gearman has no packet that gives a job back; gearmand
requeues what it assigned on a connection only when that connection closes. Job code holds
the child's only thread, and no signal may interrupt it, so the master does the closing:

- The master never polls. A child that falls asleep while a sibling holds a job, or that
  starts holding while a sibling is asleep, says so (Holding; shm/lanes.py's hints). A
  child holds only while no sibling is asleep, so a busy or an idle pool sends nothing.
- The master then looks at the pool's scoreboards: a job held behind one that has run
  STEAL_AFTER is given back, one per idle child; a younger one gets a timer for the moment
  it is old enough.
- Giving back: the master takes a copy of the held lane's socket (pidfd_getfd), checks its
  local port and shuts it down. gearmand requeues the held job and wakes the idle child,
  which runs it. The child that held it reopens the lane when its queue is busy again.
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

import errno
from typing import TYPE_CHECKING, Any

from gearvisor import messages as msg
from gearvisor.master import bus as ev
from gearvisor.master.component import Component
from gearvisor.policy.child import Child, ChildState
from gearvisor.shm.scoreboard import Take

if TYPE_CHECKING:
    from gearvisor.master.arbiter import Arbiter
    from gearvisor.master.loop import Timer
    from gearvisor.policy.pool import Pool

STEAL_AFTER = 0.002  # a job that has run this long is slow for the job held behind it
RETRY_BUSY = 0.0005  # a child had its lock (changing lanes): look again this much later
# What shutdown_socket fails with where the master may not take a child's socket (seccomp,
# another user without CAP_SYS_PTRACE, a kernel before 5.6): the pool's lanes go off.
REFUSALS = frozenset({errno.EPERM, errno.EACCES, errno.ENOSYS})


class HeldLanes(Component):
    """Gives held jobs back to gearmand when they would wait while a sibling idles."""

    def __init__(self) -> None:
        self.returned: dict[str, int] = {}  # pool name -> held jobs given back
        self.refused: dict[str, str] = {}  # pool name -> why its lanes cannot be closed
        self._timers: dict[str, Timer] = {}  # pool name -> its next look

    def attach(self, master: Arbiter) -> None:
        self.master = master
        master.bus.subscribe(ev.ChildSaid, self._said)
        master.bus.subscribe(ev.ChildSpawned, self._spawned)

    def _said(self, event: ev.ChildSaid) -> None:
        if isinstance(event.message, msg.Holding) and not self.master.stopping:
            self.look(event.pool)

    def _spawned(self, event: ev.ChildSpawned) -> None:
        board = event.child.scoreboard
        if board is not None and event.pool.name in self.refused:
            board.set_lanes_off()

    def look(self, pool: Pool) -> None:
        """Give back each held job whose job in front has run STEAL_AFTER, one per idle
        child of the pool; look again when a younger one is old enough."""
        pending = self._timers.pop(pool.name, None)
        if pending is not None:
            pending.cancel()
        if pool.name not in self.master.pools or self.master.stopping:
            return
        hints = self.master.lane_hints
        children = pool.children()
        idle = sum(1 for c in children if _takes_jobs(c) and hints.asleep(c.running_index))
        if not idle:
            return  # (a child that falls asleep says so)
        now = self.master.clock()
        due = float("inf")
        for child in children:
            since = child.scoreboard.held() if child.scoreboard is not None else None
            if since is None or child.pid <= 0:
                continue
            slow_at = since + STEAL_AFTER
            if slow_at > now:
                due = min(due, slow_at)
            elif idle:
                took = self._give_back(child, pool, now)
                if took is Take.CLOSED:
                    idle -= 1
                elif took is Take.BUSY:
                    due = min(due, now + RETRY_BUSY)
        if due != float("inf"):
            self._timers[pool.name] = self.master.loop.call_at(
                due, lambda: self.look(pool), quiet=True)

    def _give_back(self, child: Child, pool: Pool, now: float) -> Take:
        board = child.scoreboard
        assert board is not None
        error: list[OSError] = []

        def close(fd: int, port: int) -> bool | None:
            try:
                self.master.system.shutdown_socket(child.pid, fd, port)
                return True
            except OSError as e:
                if e.errno in REFUSALS:
                    error.append(e)
                    return False
                # The child is dying and not reaped yet (ESRCH, EBADF), or the fd is not
                # that connection any more (ESTALE, ENOTSOCK): nothing to turn off.
                self.master.log.debug("could not close a held lane this time",
                                      pool=pool.name, child_pid=child.pid, error=str(e))
                return None

        took = board.take_held(now, STEAL_AFTER, close)
        if took is Take.CLOSED:
            self.returned[pool.name] = self.returned.get(pool.name, 0) + 1
            self.master.bus.publish(ev.HeldJobReturned(pool.name))
            self.master.log.debug("gave a held job back to the job server: the job in front "
                                  "of it is slow and another child is idle", pool=pool.name,
                                  slot=child.slot, child_pid=child.pid)
        elif took is Take.REFUSED:
            board.set_lanes_off()
            if pool.name not in self.refused:
                self.refused[pool.name] = str(error[0]) if error else "unknown"
                self.master.log.warning(
                    "cannot close a child's held lane, so this pool's children hold no next "
                    "job: they take one job per round trip (hold_next: false silences this)",
                    pool=pool.name, child_pid=child.pid, error=self.refused[pool.name])
        return took

    def status(self, now: float) -> dict[str, Any]:
        return {"held_jobs_returned": dict(self.returned)} if self.returned else {}

    def begin_stop(self, fast: bool) -> None:
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()


def _takes_jobs(child: Child) -> bool:
    """Would this child run a job gearmand gave it now?"""
    return child.state is ChildState.READY and not child.paused and not child.quarantined
