"""The fleet view (`gearvisor fleet`): every gearvisor host and every other worker on the
job servers, from the probe's cached `workers` lists (no connection of its own, no agent:
the job servers are the shared view). policy/fleet.py groups and decides; this component
keeps the memory between looks and answers the `fleet` control verb.

A component rather than a verb reading the probe's views on demand: flagging a host whose
workers vanished needs the earlier looks, taken as the probes arrive (a Snapshot each),
whether or not anyone asks; that memory (bounded: policy/fleet.Memory) is this
component's own state.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from gearvisor.master import bus as ev
from gearvisor.master.component import Component
from gearvisor.policy import fleet

if TYPE_CHECKING:
    from gearvisor.master.arbiter import Arbiter
    from gearvisor.master.probe import Probe


class Fleet(Component):
    """Remembers the hosts each probe shows; serves `{"verb": "fleet"}`."""

    def __init__(self, probe: Probe) -> None:
        self.probe = probe
        self.memory = fleet.Memory()

    def attach(self, master: Arbiter) -> None:
        self.master = master
        master.bus.subscribe(ev.Snapshot, self._snapshot)
        master.verbs["fleet"] = self.answer

    def _own(self) -> dict[str, frozenset[str]]:
        """This master's client id prefixes and, per prefix, its pools' names."""
        own: dict[str, set[str]] = {}
        for pool in self.master.pools.values():
            own.setdefault(pool.config.client_id_prefix, set()).add(pool.name)
        return {prefix: frozenset(pools) for prefix, pools in own.items()}

    def _look(self) -> fleet.Look:
        """The answered servers' last `workers` lists, grouped. A server whose last probe
        failed is left out: its list is old, and a host must not vanish (or stay) by it."""
        workers = {v.name: v.workers for v in self.probe.views.values()
                   if v.answered and v.workers is not None}
        return fleet.look(workers, self._own())

    def _snapshot(self, event: ev.Snapshot) -> None:
        if event.view.answered:
            self.memory.observe(self._look(), self.master.clock())

    def answer(self, request: dict[str, Any]) -> dict[str, Any]:
        """The `fleet` verb: the fleet as the job servers show it now (policy/fleet.report)."""
        now = self.master.clock()
        servers = [{"server": v.name, "answered": v.answered,
                    "connections": len(v.workers) if v.answered and v.workers else 0,
                    "last_answer_age": (None if v.answered_at is None
                                        else round(max(0.0, now - v.answered_at), 3)),
                    "error": v.error}
                   for v in sorted(self.probe.views.values(), key=lambda v: v.name)]
        return {"ok": True, "fleet": fleet.report(self._look(), self.memory, now,
                                                  local=self._own(), servers=servers)}
