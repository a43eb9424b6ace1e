"""The health monitor: hard job timeouts, max_lifetime, poison strikes, and the pool's
circuit (a child's quarantine, the probe's probation, pause and resume).

The decisions are pool.Pool's (pure); this component feeds them the children's messages
and exits, carries them out through the arbiter's verbs, and logs each health event once,
with its stable `internal_event` name, as it publishes it on the bus.
"""

from __future__ import annotations

import collections
import signal
from typing import TYPE_CHECKING, Any

from gearvisor import messages as msg
from gearvisor.master import bus as ev
from gearvisor.master.component import Component
from gearvisor.policy.child import Child, ChildState
from gearvisor.policy.pool import Circuit, CircuitChange, ExitKind, Pool, Retire
from gearvisor.shm.poison import LIST_CAPACITY, PoisonList, command_job_key, shim_key

if TYPE_CHECKING:
    from gearvisor.master.arbiter import Arbiter
    from gearvisor.master.loop import Timer

HEALTH_INTERVAL = 0.25  # how often hung jobs and lifetimes are checked, when configured


class Health(Component):
    """Watches running jobs and lifetimes; runs the circuit breaker."""

    def __init__(self) -> None:
        self._timer: Timer | None = None
        # Each pool's probe child while it probes: by the time it is reaped, the pool has
        # forgotten which child was its probe (and reopened the circuit if it died).
        self._probes: dict[str, Child] = {}
        # Deaths of command workers on each job, by the job's shim key (the newest last):
        # what a reload lists again when it changes a pool's poison_after; and the limit
        # each command pool's list was last built for (and which list).
        self._deaths: collections.OrderedDict[str, int] = collections.OrderedDict()
        self._built: dict[str, tuple[int, PoisonList]] = {}

    def attach(self, master: Arbiter) -> None:
        self.master = master
        master.bus.subscribe(ev.ChildSpawned, self._spawned)
        master.bus.subscribe(ev.ChildReady, self._ready)
        master.bus.subscribe(ev.ChildSaid, self._said)
        master.bus.subscribe(ev.ChildExited, self._exited)

    def _spawned(self, event: ev.ChildSpawned) -> None:
        if event.child is event.pool.probe:
            self._probes[event.pool.name] = event.child
        self._arm()

    # -- hard timeouts and lifetimes ------------------------------------------------------------

    def _watched(self) -> bool:
        return any(c.timeouts or c.recycle_at is not None
                   for c, _ in self.master.children.values())

    def _arm(self) -> None:
        if (self._timer is None or self._timer.cancelled) and self._watched():
            self._timer = self.master.loop.call_later(HEALTH_INTERVAL, self.check)

    def check(self) -> None:
        """Hard job timeouts (SIGKILL at timeout + timeout_grace) and max_lifetime."""
        self._timer = None
        if self.master.stopping:
            return
        now = self.master.clock()
        log = self.master.log
        for child, pool in list(self.master.children.values()):
            if (child.recycle_at is not None and now >= child.recycle_at
                    and child.state is ChildState.READY):
                child.recycle_at = None
                if pool.recycle(child, f"max_lifetime: up {now - child.started_at:.0f}s", now):
                    log.info("recycling child: a successor starts first", pool=pool.name,
                             slot=child.slot, child_pid=child.pid, reason="max_lifetime")
            if not child.timeouts or child.killed_for:
                continue
            if child.scoreboard is None and child.event_fd >= 0:
                # (a command child's job is what its shim said last: read what it said
                # since, or a job that just ended would be killed, and blamed, for the next)
                self.master.read_events(child, pool)
            job = child.running()
            limit = child.timeouts.get(job.function) if job is not None else None
            if limit is not None and now - job.started > limit + child.timeout_grace:
                child.killed_for = "timeout"
                log.error("job hung past its timeout; killing the child", pool=pool.name,
                          slot=child.slot, child_pid=child.pid, function=job.function,
                          handle=job.handle, unique=job.unique, timeout=limit,
                          grace=child.timeout_grace)
                self.master.signal_child(child, signal.SIGKILL, group=True)
        self._arm()

    # -- poison ---------------------------------------------------------------------------------

    def _exited(self, event: ev.ChildExited) -> None:
        child, pool, decision = event.child, event.pool, event.decision
        if self._probes.get(pool.name) is child:
            del self._probes[pool.name]
            if decision.kind is not ExitKind.STOPPED and pool.circuit == "open":
                # The probe died (one that quarantined itself was reported then): the pool
                # reopened the circuit with a longer cooldown. Say so as for any failed
                # probe, or the circuit stays open without a word on the bus or in the log.
                self._circuit_opened(pool, CircuitChange.REOPENED)
        sig = event.status & 0x7f
        died = sig != 0 and not child.master_killed  # a signal, not ours
        if died and child.scoreboard is None and decision.kind is ExitKind.STOPPED:
            # A command worker that dies of a signal it was told to stop with (a PHP
            # worker with no handler for it) died of our stop, not of its job.
            died = sig not in child.stop_signals
        if decision.kind is ExitKind.STOPPED and child.killed_for != "timeout" and not died:
            return  # (a crash mid-job, even of a child told to stop, or a hard-timeout kill)
        what = "hung past its timeout" if child.killed_for else "crashed"
        if child.scoreboard is None:
            self._command_strike(pool, child, what)
            return
        job = child.scoreboard.read()
        if job is not None and job.busy:
            self._strike(pool, job, what, child)

    def _command_strike(self, pool: Pool, child: Child, what: str) -> None:
        """A command worker died in the middle of the job its shim reported: a strike, as
        for a Python child. Strikes count fleet-wide, as a Python child counts them; a job
        whose strikes reach a command pool's poison_after goes on that pool's PoisonList,
        which its workers inherit: their shim refuses it from then on (one that does not
        use the shim runs it again: the log says what else can stop it)."""
        job, limit = child.job, pool.config.poison_after
        if job is None or not limit:
            return
        key = command_job_key(job.function, job.unique, job.handle, job.key)
        self.master.poison.add(key)
        strikes = self.master.poison.strikes(key)
        listing = shim_key(job.function, job.unique, job.handle, job.key)
        if listing is not None:
            # (the strike table is a ring the whole fleet shares: what a reload relists
            # from is counted here too)
            strikes = max(strikes, self._deaths.get(listing, 0) + 1)
            self._deaths[listing] = strikes
            self._deaths.move_to_end(listing)
            while len(self._deaths) > 2 * LIST_CAPACITY:
                self._deaths.popitem(last=False)
        for other in self._command_pools():
            if strikes < other.config.poison_after:
                continue
            why, added = "", False
            if listing is None:
                why = " (it is not listed: its shim sent no key and it has no unique)"
            else:
                added, error = self._list(other, [listing])
                why = f" (it could not be listed: {error})" if error else ""
            if not (added or (other is pool and strikes == limit)):
                continue
            where = "" if other is pool else f" in pool {pool.name}"
            self._publish(ev.PoisonJob(other.name, job.function, job.unique, job.handle,
                                       job.size, strikes, what),
                          f"poison job: it {what}{where}; {strikes} command workers died "
                          "on it, so from now on this pool's shim (gearvisor_run) fails it "
                          "without running; a worker that does not use the shim runs it "
                          "again: start gearmand with --job-retries=N to drop it there" + why)

    def _command_pools(self) -> list[Pool]:
        return [p for p in self.master.pools.values()
                if p.config.command is not None and p.config.poison_after]

    def _list(self, pool: Pool, listings: list[str], whole: bool = False) -> tuple[bool, str]:
        """Add `listings` to the pool's PoisonList (or with `whole`, make it exactly them):
        whether it changed, and the error if it could not be written."""
        listed = self.master.poison_list(pool)
        if listed is None:
            return False, "no list"
        self._built.setdefault(pool.name, (pool.config.poison_after, listed))
        try:
            if whole:
                return listed.replace(listings), ""
            return any([listed.add(k) for k in listings]), ""
        except OSError as e:  # (a memfd write: ENOMEM at worst) the strikes still count
            return False, str(e)

    def reload(self, config: Any) -> None:
        """A reload that changes a command pool's poison_after (or makes it one): its list
        becomes the jobs whose strikes reach the new limit, as a Python child compares
        with the live limit at every job. Jobs listed before whose deaths are forgotten
        (more than 2 x LIST_CAPACITY jobs died since) stay listed."""
        for pool in self._command_pools():
            limit, listed = pool.config.poison_after, self.master.poison_list(pool)
            if listed is None or self._built.get(pool.name) == (limit, listed):
                continue
            self._built[pool.name] = (limit, listed)
            deaths = self._deaths
            kept = [k for k in (line.decode().rstrip("\n") for line in listed.keys)
                    if deaths.get(k, limit) >= limit]
            wanted = kept + [k for k, n in deaths.items() if n >= limit]
            changed, error = self._list(pool, wanted, whole=True)
            if changed or error:
                self.master.log.info("the pool's list of poison jobs follows its "
                                     "poison_after", pool=pool.name, poison_after=limit,
                                     listed=len(set(wanted)), error=error or None)

    def _strike(self, pool: Pool, job: Any, what: str, child: Child) -> None:
        """The job `job` crashed or hung its child: one more strike; poison at
        poison_after."""
        limit = pool.config.poison_after
        if not limit or not job.key:
            return  # (children always write the key of the job they run)
        running = self.master.running
        # The death moves from the child's running slot to the strike table in one write
        # (PoisonTable.add's seqlock): a child counting deaths meanwhile reads again, so it
        # neither misses this death (one more crash) nor counts it twice.
        index, child.running_index = child.running_index, -1
        self.master.poison.add(job.key, also=lambda: running.release(index))
        strikes = self.master.poison.strikes(job.key)  # the count every child sees
        if strikes == limit:
            self._publish(ev.PoisonJob(pool.name, job.function, job.unique, job.handle,
                                       job.size, strikes, what),
                          f"poison job: it {what}; {strikes} children died on it, so from "
                          "now on it is failed without running")

    # -- quarantine and the circuit -------------------------------------------------------------

    def _publish(self, event: object, message: str) -> None:
        """Log a health event once, under its stable name, and publish it."""
        names = {ev.Quarantined: "quarantined", ev.CircuitOpened: "circuit_open",
                 ev.CircuitClosed: "circuit_closed", ev.PoisonJob: "poison_job"}
        name = names[type(event)]
        level = (self.master.log.error if name in ("circuit_open", "poison_job")
                 else self.master.log.warning)
        fields = dict(vars(event)) if not hasattr(event, "__dataclass_fields__") else {
            k: getattr(event, k) for k in event.__dataclass_fields__}
        fields.pop("reopened", None)
        level(message, internal_event=name, **fields)
        self.master.bus.publish(event)

    def _pause(self, child: Child, paused: bool) -> None:
        """Stop taking jobs (the circuit opened) or take them again: the wanted state goes
        into the child's scoreboard, then SIGUSR1 tells it to look."""
        if (child.state is not ChildState.READY or child.quarantined
                or child.paused == paused or child.scoreboard is None):
            return
        child.paused = paused
        child.scoreboard.set_paused(paused)
        self.master.signal_child(child, signal.SIGUSR1)

    def _ready(self, event: ev.ChildReady) -> None:
        # Match the circuit as it is now: paused while open (the probe aside), taking jobs
        # once closed (it may have closed while this child was starting).
        pool = event.pool
        self._pause(event.child,
                    pool.circuit is not Circuit.CLOSED and event.child is not pool.probe)

    def _said(self, event: ev.ChildSaid) -> None:
        child, pool, message = event.child, event.pool, event.message
        if isinstance(message, msg.Quarantined):
            self.on_quarantine(child, pool, message)
        elif isinstance(message, msg.ProbationPassed):
            if pool.probation_passed(child) is Circuit.CLOSED:
                self._probes.pop(pool.name, None)  # a probe no longer: its exit is no failure
                for other in pool.children():
                    if other.paused:
                        self._pause(other, False)
                self._publish(ev.CircuitClosed(pool.name, child.pid),
                              "circuit closed: the probe child succeeded; the pool consumes "
                              "again")
        elif isinstance(message, msg.Recycle):
            if pool.recycle(child, message.reason, self.master.clock()):
                self.master.log.info("recycling child: a successor starts first",
                                     pool=pool.name, slot=child.slot, child_pid=child.pid,
                                     reason=message.reason)

    def on_quarantine(self, child: Child, pool: Pool, message: msg.Quarantined) -> None:
        now = self.master.clock()
        cooldown, circuit = pool.child_quarantined(child, message.reason, now)
        if self._probes.get(pool.name) is child:
            del self._probes[pool.name]  # its failure is said below: not again at its exit
        if child.state is not ChildState.DRAINING and not any(
                s.child is child for s in pool.slots):
            # Quarantined before it took its slot (a successor): it will never serve.
            self.master.retire(pool, Retire(child, "quarantined before it was ready"), now)
        self._publish(ev.Quarantined(pool.name, child.slot, child.pid, message.reason,
                                     message.failed, message.done, round(cooldown, 3)),
                      "child quarantined itself: it fails fast, so it takes no more jobs")
        if circuit is not None:
            self._circuit_opened(pool, circuit)

    def _circuit_opened(self, pool: Pool, how: CircuitChange) -> None:
        """The circuit opened (OPENED), or stayed open because its probe failed
        (REOPENED): pause the children still taking jobs, and say so."""
        now = self.master.clock()
        for other in pool.children():
            self._pause(other, True)
        quarantined = sum(1 for s in pool.slots if s.child is not None and s.child.quarantined)
        self._publish(ev.CircuitOpened(pool.name, quarantined, pool.desired,
                                       round(pool.circuit_until - now, 3),
                                       reopened=how is not CircuitChange.OPENED),
                      "circuit open: most children of the pool fail fast, so the fault is "
                      "downstream or in the jobs; the pool stops consuming (jobs stay queued "
                      "in gearmand) and probes with one child after a cooldown"
                      if how is CircuitChange.OPENED else
                      "circuit stays open: the probe child failed too; next probe later")
