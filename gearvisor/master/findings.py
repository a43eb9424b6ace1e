"""Health findings in the master: after every probe (a Snapshot on the bus) the findings
are recomputed by policy/findings.Findings from the probe's views and the pools' facts;
each one that appears is published as FindingRaised and logged once (`health finding
raised`), each one that goes away as FindingCleared (`health finding cleared`), and the
active ones are in `gearvisor status`.

The pools' facts come from the master's own records: which children serve (ready, not
quarantined or paused) and since when, and how many jobs their children ended, summed
from the scoreboards into a counter that survives child exits (a child's last count is
read from its ChildExited, before its scoreboard is released).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from gearvisor.master import bus as ev
from gearvisor.master.component import Component
from gearvisor.policy.child import Child, ChildState
from gearvisor.policy.findings import Finding, FindingKind, Findings, PoolFacts

if TYPE_CHECKING:
    from gearvisor.config import Config
    from gearvisor.master.arbiter import Arbiter
    from gearvisor.master.probe import Probe
    from gearvisor.policy.pool import Pool

ERRORS = {FindingKind.SERVER_DOWN, FindingKind.NO_WORKERS}  # logged as errors, others warn


def finding_fields(finding: Finding) -> dict[str, Any]:
    """A finding as plain data, as `status --json` shows it."""
    return {"kind": finding.kind.value, "server": finding.server,
            "function": finding.function, "pool": finding.pool, "message": finding.message,
            "details": dict(finding.details)}


def _log_fields(finding: Finding) -> dict[str, Any]:
    """A finding as log fields: `pool` only when it is about one (every line has one)."""
    fields = finding_fields(finding)
    fields["what"] = fields.pop("message")
    return {k: v for k, v in fields.items() if v is not None}


class HealthFindings(Component):
    """Recomputes the findings after each probe; raises, clears, logs and shows them."""

    def __init__(self, probe: Probe) -> None:
        self.probe = probe
        self.active: dict[Finding, Finding] = {}  # the same finding -> its latest numbers
        self._ended: dict[int, int] = {}  # child pid -> jobs it had ended when last read
        self._completed: dict[str, int] = {}  # pool -> jobs its children ended, in all

    def attach(self, master: Arbiter) -> None:
        self.master = master
        self.policy = Findings(master.config.findings)
        master.bus.subscribe(ev.Snapshot, lambda _e: self.update())
        master.bus.subscribe(ev.ChildExited, self._exited)

    def reload(self, config: Config) -> None:
        self.policy.reconfigure(config.findings)

    def status(self, now: float) -> dict[str, Any]:
        return {"findings": [
            {**finding_fields(f), "age": round(max(0.0, now - f.since), 3)}
            for f in sorted(self.active.values(),
                            key=lambda f: (f.kind.value, f.server, f.function or "",
                                           f.pool or ""))]}

    # -- the pools' facts -----------------------------------------------------------------------

    def _count(self, child: Child, pool_name: str) -> None:
        """Add what `child` ended since it was last read to its pool's counter."""
        board = child.scoreboard.read() if child.scoreboard is not None else None
        if board is None:
            return
        ended = board.done + board.failed
        before = self._ended.get(child.pid, 0)
        self._completed[pool_name] = self._completed.get(pool_name, 0) + max(0, ended - before)
        self._ended[child.pid] = ended

    def _exited(self, event: ev.ChildExited) -> None:
        self._count(event.child, event.pool.name)
        self._ended.pop(event.child.pid, None)

    def _facts(self, pool: Pool) -> PoolFacts:
        pc = pool.config
        ready_at = []
        for child in pool.children():
            self._count(child, pool.name)
            if (child.state is ChildState.READY and child.ready_at is not None
                    and not child.quarantined and not child.paused):
                ready_at.append(child.ready_at)
        return PoolFacts(pool.name, f"{pc.client_id_prefix}:{pc.name}:",
                         frozenset(pc.functions),
                         frozenset((s.host, s.port) for s in pc.servers), tuple(ready_at),
                         self._completed.get(pool.name, 0))

    # -- raising and clearing -------------------------------------------------------------------

    def update(self) -> None:
        """Recompute the findings; publish and log what was raised and what cleared."""
        now = self.master.clock()
        facts = [self._facts(pool) for pool in self.master.pools.values()]
        found = self.policy.evaluate(self.probe.views.values(), facts, now)
        log = self.master.log
        for finding in [f for f in self.active if f not in found]:
            latest = self.active.pop(finding)
            log.info("health finding cleared", internal_event="finding_cleared",
                     **_log_fields(latest))
            self.master.bus.publish(ev.FindingCleared(latest))
        for finding in found:
            if finding not in self.active:
                level = log.error if finding.kind in ERRORS else log.warning
                level("health finding raised", internal_event="finding_raised",
                      **_log_fields(finding))
                self.active[finding] = finding
                self.master.bus.publish(ev.FindingRaised(finding))
            else:
                self.active[finding] = finding  # fresher numbers, the same finding
