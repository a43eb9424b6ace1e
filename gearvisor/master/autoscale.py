"""The autoscaler: sizes each pool that has an `autoscale:` block on its queue depth, from
the probe's snapshots (it never asks gearmand itself), and keeps `gearvisor scale --for`
pins.

- Once per probe round of a pool's servers (every server probed since the last decision,
  or two probe intervals passed), policy/autoscale.AutoScaler decides from the backlog
  (waiting + running of the pool's functions on its servers that answered), the number of
  hosts running the pool (the distinct client-id prefixes of its connections in the
  `workers` lists) and what would freeze it (circuit open, a roll, most children
  quarantined or backing off).
- A change goes through Arbiter.scale, the path `gearvisor scale` takes, which logs it once
  with its inputs ("scaling pool", by=autoscale); a change of state without a change of
  size (frozen, holding, cooldown, steady) is logged once when it begins, never per probe.
- A pin (`gearvisor scale POOL N`) stops the autoscaler for that pool: with `--for`, until it
  expires (a pool without autoscale then goes back to `processes`); without, until the next
  reload. The autoscaler then starts over from the pool's size.
Shrinking is the pool's plan: idle children go first, a busy one finishes its job.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from gearvisor.master import bus as ev
from gearvisor.master.component import Component
from gearvisor.policy.autoscale import AutoScaler, Decision, Inputs
from gearvisor.policy.pool import Circuit, Pool

if TYPE_CHECKING:
    from gearvisor.config import Config
    from gearvisor.master.arbiter import Arbiter
    from gearvisor.master.bus import ServerView
    from gearvisor.master.loop import Timer
    from gearvisor.master.probe import Probe

Server = tuple[str, int]
LATE_ROUNDS = 2.0  # a server not probed for this many intervals does not hold decisions up


@dataclass
class Pin:
    """`gearvisor scale POOL N [--for D]`: the size an operator set, and until when."""

    processes: int
    until: float | None  # monotonic; None: until the next reload
    timer: Timer | None = None


@dataclass
class PoolScaling:
    """One autoscaled pool: its decider and what was last decided and logged."""

    scaler: AutoScaler
    decided_at: float | None = None
    logged_state: str | None = None
    backlog: int = 0
    hosts: int = 1


def hosts_running(pool: str, views: list[ServerView], own_prefix: str) -> int:
    """How many hosts run pool `pool`: the distinct `<prefix>` of the client ids
    `<prefix>:<pool>:<slot>` (a command child's `...:<slot>:<pid>`) in the servers' `workers`
    lists, this host's own prefix always among them. A host is told apart by its
    client_id_prefix (the host name by default): two masters on one host need their own."""
    pattern = re.compile(rf"(.+):{re.escape(pool)}:\d+(?::\d+)?")
    prefixes = {own_prefix}
    for view in views:
        for w in view.workers or ():
            m = pattern.fullmatch(w.client_id)
            if m is not None:
                prefixes.add(m.group(1))
    return len(prefixes)


def frozen_reason(pool: Pool) -> str | None:
    """Why the pool must not be resized now, or None: more workers make a failing pool
    worse, and a roll's surge is sized on the pool as it is."""
    if pool.circuit is not Circuit.CLOSED:
        return f"circuit {pool.circuit}"
    if pool.halted is not None:
        return "roll halted"
    if pool.rolling:
        return "rolling"
    failing = sum(1 for s in pool.slots
                  if (s.child is not None and s.child.quarantined)
                  or (s.child is None and (s.fatal is not None or s.backoff.in_streak)))
    if pool.slots and 2 * failing > len(pool.slots):
        return (f"{failing} of {len(pool.slots)} children quarantined or in crash "
                "backoff")
    return None


class Autoscale(Component):
    """Decides on probe snapshots; scales through the arbiter; keeps pins."""

    def __init__(self, probe: Probe) -> None:
        self.probe = probe
        self.pools: dict[str, PoolScaling] = {}
        self.pins: dict[str, Pin] = {}

    # -- the component --------------------------------------------------------------------------

    def attach(self, master: Arbiter) -> None:
        self.master = master
        master.bus.subscribe(ev.Snapshot, self._snapshot)
        master.bus.subscribe(ev.Scaled, self._scaled)
        self._configure(master.config)

    def reload(self, config: Config) -> None:
        now = self.master.clock()
        for name, pin in list(self.pins.items()):
            if pin.until is None:  # a pin without --for lasts until the next reload
                self._unpin(name)
                self._restart(name, now)
        for name, pool in self.master.pools.items():
            pc = config.pools.get(name)
            if (pc is not None and pc.autoscale is None and name in self.pools
                    and pool.scaled_by == "autoscale"):
                # Autoscaling turned off: back to `processes`.
                self.master.scale(pool, None, by="autoscale off")
        self._configure(config)

    def close(self) -> None:
        for name in list(self.pins):
            self._unpin(name)

    def status(self, now: float) -> dict[str, Any]:
        rows = []
        for name, pool in self.master.pools.items():
            ps, pin = self.pools.get(name), self.pins.get(name)
            if ps is None and pin is None:
                continue
            row: dict[str, Any] = {"pool": name, "desired": pool.desired, "pinned": None}
            if pin is not None:
                row["pinned"] = {"processes": pin.processes, "expires_in": None
                                 if pin.until is None else round(max(0.0, pin.until - now), 3)}
            if ps is not None:
                c, last = ps.scaler.config, ps.scaler.last
                row.update(min=c.min, max=c.max, target=c.target, max_step=c.max_step,
                           state="pinned" if pin is not None else
                           (last.state if last else "waiting"),
                           reason=last.reason if last else "no probe yet",
                           recommended=last.recommended if last else None,
                           held=last.held if last else None,
                           backlog=ps.backlog, hosts=ps.hosts,
                           last_change_age=None if ps.scaler.last_change is None else
                           round(max(0.0, now - ps.scaler.last_change), 3))
            rows.append(row)
        return {"autoscale": rows} if rows else {}

    # -- configuration and pins -----------------------------------------------------------------

    def _configure(self, config: Config) -> None:
        for name in list(self.pools):
            pc = config.pools.get(name)
            if pc is None or pc.autoscale is None:
                del self.pools[name]
        for name, pc in config.pools.items():
            if pc.autoscale is None:
                continue
            if name in self.pools:
                self.pools[name].scaler.reconfigure(pc.autoscale)
            else:
                self.pools[name] = PoolScaling(AutoScaler(pc.autoscale))

    def _scaled(self, event: ev.Scaled) -> None:
        if event.by != "gearvisor scale":
            return
        self._unpin(event.pool)
        now = self.master.clock()
        pin = Pin(event.after, None if event.pin_for is None else now + event.pin_for)
        if pin.until is None and event.pool not in self.pools:
            return  # a pool without autoscale keeps its size as `scale` always did
        if pin.until is not None:
            pin.timer = self.master.loop.call_at(pin.until,
                                                 lambda name=event.pool: self._expire(name))
        self.pins[event.pool] = pin

    def _unpin(self, name: str) -> None:
        pin = self.pins.pop(name, None)
        if pin is not None and pin.timer is not None:
            pin.timer.cancel()

    def _expire(self, name: str) -> None:
        pin = self.pins.pop(name, None)
        pool = self.master.pools.get(name)
        if pin is None or pool is None or self.master.stopping:
            return
        self.master.log.info("scale pin expired", pool=name, processes=pin.processes,
                             autoscale=name in self.pools)
        if name in self.pools:
            self._restart(name, self.master.clock())
        elif pool.scaled_by == "gearvisor scale":
            self.master.scale(pool, None, by="pin expired")

    def _restart(self, name: str, now: float) -> None:
        ps, pool = self.pools.get(name), self.master.pools.get(name)
        if ps is not None and pool is not None:
            ps.scaler.restart(now, pool.desired)
            ps.logged_state = None

    # -- deciding -------------------------------------------------------------------------------

    def _snapshot(self, event: ev.Snapshot) -> None:
        if self.master.stopping or not self.pools:
            return
        now = self.master.clock()
        for name, ps in self.pools.items():
            pool = self.master.pools.get(name)
            if pool is None or pool.removed or name in self.pins:
                continue
            servers = {(s.host, s.port) for s in pool.config.servers}
            if event.view.server in servers and self._round_done(ps, servers, now):
                self._decide(pool, ps, servers, now)

    def _round_done(self, ps: PoolScaling, servers: set[Server], now: float) -> bool:
        """Each of the pool's servers probed since the last decision (one decision per
        round, however many servers), or a slow one waited for long enough."""
        if ps.decided_at is None or now - ps.decided_at >= LATE_ROUNDS * self.probe.interval:
            return True
        return all((v := self.probe.views.get(s)) is not None and v.checked_at is not None
                   and v.checked_at > ps.decided_at for s in servers)

    def _decide(self, pool: Pool, ps: PoolScaling, servers: set[Server], now: float) -> None:
        ps.decided_at = now
        views = [v for s in servers if (v := self.probe.views.get(s)) is not None
                 and v.answered]
        functions = set(pool.config.functions)
        ps.backlog = sum(st.queued for v in views for fn, st in v.functions.items()
                         if fn in functions)
        ps.hosts = hosts_running(pool.name, views, pool.config.client_id_prefix)
        frozen = frozen_reason(pool) if views else "no job server answered"
        d = ps.scaler.decide(Inputs(ps.backlog, ps.hosts, pool.desired, frozen), now)
        inputs = self._inputs(ps, d)
        # A new state is logged once; a frozen pool also when why changes (its reasons
        # have no numbers in them, unlike cooldown's and holding's).
        state = f"frozen: {d.reason}" if d.state == "frozen" else d.state
        if d.changed:
            ps.logged_state = state
            self.master.scale(pool, d.desired, by="autoscale", **inputs)
        elif state != ps.logged_state:
            ps.logged_state = state
            self.master.log.info("autoscale", pool=pool.name, processes=d.desired, **inputs)

    @staticmethod
    def _inputs(ps: PoolScaling, d: Decision) -> dict[str, Any]:
        c = ps.scaler.config
        return {"state": d.state, "reason": d.reason, "backlog": ps.backlog,
                "hosts": ps.hosts, "target": c.target, "recommended": d.recommended,
                "held": d.held, "min": c.min, "max": c.max}
