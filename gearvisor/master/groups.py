"""What a dead child leaves behind: the rest of its process group.

Every child leads its own process group, and the master is the subreaper of its children's
orphans. When a child dies and its group still has members (a job's background process, a
worker's `helper &`), they get SIGTERM at once and SIGKILL after the pool's
graceful_timeout, as systemd does with what a stopped service leaves in its cgroup; the log
names each process. A graceful stop of the master waits for them too, so nothing outlives
it. `kill_group: false` leaves them alone.
"""

from __future__ import annotations

import signal
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from gearvisor.master import bus as ev
from gearvisor.master.component import Component

if TYPE_CHECKING:
    from gearvisor.master.arbiter import Arbiter
    from gearvisor.master.loop import Timer


@dataclass
class Leftover:
    """A dead child's process group that still has members."""

    pool: str
    slot: int
    pgid: int  # the dead child's pid: it led the group
    timer: Timer | None = None  # the SIGKILL
    killed: bool = False


class Groups(Component):
    """Stops and forgets the process groups of dead children."""

    def __init__(self) -> None:
        self.leftovers: dict[int, Leftover] = {}

    def attach(self, master: Arbiter) -> None:
        self.master = master
        master.bus.subscribe(ev.ChildExited, self._exited)
        # A member died: the master reaped it (subreaper), so an empty group shows now.
        master.bus.subscribe(ev.OtherReaped, lambda _e: self.forget_empty())

    def _exited(self, event: ev.ChildExited) -> None:
        child, pool = event.child, event.pool
        system = self.master.system
        if not child.kill_group or not system.killpg(child.pid, 0):
            return  # nothing left: the usual case, one syscall
        members = system.group_members(child.pid)
        system.killpg(child.pid, signal.SIGTERM)
        timeout = pool.config.graceful_timeout
        group = self.leftovers[child.pid] = Leftover(child.pool, child.slot, child.pid)
        group.timer = self.master.loop.call_later(timeout, lambda: self.kill(group))
        self.master.log.warning("child left processes behind; stopping them", pool=child.pool,
                                slot=child.slot, child_pid=child.pid, processes=members,
                                signal="SIGTERM", kill_in=timeout)

    def forget_empty(self) -> None:
        """Forget the groups that emptied. A group id is never reused while a member, even a
        zombie, still holds it, and the master reaps those zombies itself."""
        for pgid, group in list(self.leftovers.items()):
            if not self.master.system.killpg(pgid, 0):
                del self.leftovers[pgid]
                if group.timer is not None:
                    group.timer.cancel()
                self.master.log.debug("leftover processes gone", pool=group.pool,
                                      child_pid=pgid)

    def kill(self, group: Leftover, why: str = "did not stop") -> None:
        self.forget_empty()
        if group.pgid not in self.leftovers or group.killed:
            return
        group.killed = True
        self.master.log.warning(f"leftover processes {why}; killing them", pool=group.pool,
                                slot=group.slot, child_pid=group.pgid, signal="SIGKILL",
                                processes=self.master.system.group_members(group.pgid))
        self.master.system.killpg(group.pgid, signal.SIGKILL)

    def stop_overdue(self) -> None:
        for group in list(self.leftovers.values()):
            self.kill(group, why="did not stop in time")

    def stopped(self) -> bool:
        self.forget_empty()
        return not self.leftovers

    def status(self, now: float) -> dict[str, Any]:
        return {"leftovers": [{"pool": g.pool, "slot": g.slot, "pgid": g.pgid,
                               "killed": g.killed} for g in self.leftovers.values()]}
