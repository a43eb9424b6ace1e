"""What the log says when a pool's child is reaped: one line per exit, at the level its
decision deserves, naming the job it was running when it died mid-job.

The decision itself (restart, back off, give up, halt a roll) is the pool's
(policy/pool.py); this only words it. A crash loop is logged once per streak with its
reason (`log_reason`), then at debug level, so it cannot flood the log.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from gearvisor.master import bus as ev
from gearvisor.master.component import Component
from gearvisor.policy.child import EXIT_BOOT_ERROR, describe_status
from gearvisor.policy.pool import ExitKind

if TYPE_CHECKING:
    from gearvisor.master.arbiter import Arbiter


class ExitLog(Component):
    """Subscribes to ChildExited; listed last, so its line follows what others log."""

    def attach(self, master: Arbiter) -> None:
        self.master = master
        master.bus.subscribe(ev.ChildExited, self._exited)

    def _exited(self, event: ev.ChildExited) -> None:
        child, pool, decision = event.child, event.pool, event.decision
        log = self.master.log
        now = self.master.clock()
        code, sig, words = describe_status(event.status)
        ctx = dict(pool=pool.name, slot=child.slot, child_pid=child.pid, status=words,
                   generation=child.generation, uptime=round(now - child.started_at, 3))
        job = child.scoreboard.read() if child.scoreboard is not None else None
        if job is not None and job.busy and (decision.kind is not ExitKind.STOPPED
                                             or child.killed_for or sig is not None):
            ctx.update(function=job.function, handle=job.handle, unique=job.unique)
        if decision.kind is ExitKind.STOPPED:
            (log.debug if code == 0 else log.warning)("child stopped", **ctx)
        elif decision.kind is ExitKind.ROLL_FAILED:
            log.error("roll halted: a new child failed before it was ready; the old "
                      "children keep serving", reason=pool.halted, **ctx)
        elif decision.fatal:
            log.error("giving up on this slot: no more restarts until `gearvisor "
                      "restart` or a reload", reason=decision.fatal, **ctx)
        else:
            retry = ({} if decision.restart_in is None
                     else {"retry_in": round(decision.restart_in, 3)})
            if decision.kind is ExitKind.BOOT_ERROR and decision.log_reason:
                log.error("child failed to boot; retrying with backoff", reason=(
                    child.boot_error or f"exit code {EXIT_BOOT_ERROR}"),
                    streak=decision.streak, **retry, **ctx)
            elif decision.kind is ExitKind.BOOT_ERROR:
                log.debug("child still failing to boot", streak=decision.streak,
                          **retry, **ctx)
            else:
                level = log.error if decision.log_reason else log.warning
                what = "crashed" if code != 0 else "exited without being asked to"
                level(f"child {what}; restarting with backoff", streak=decision.streak,
                      **retry, **ctx)
