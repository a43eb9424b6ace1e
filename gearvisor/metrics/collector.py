"""FleetCollector: every gearvisor_* series, built at scrape time from the master's state.

A prometheus-client custom collector: nothing is kept in prometheus-client's own metric
objects, each scrape reads the pools and their children (policy/pool.Pool records, each
child's scoreboard and shared-memory job counts), the job totals and health counters the
master keeps (metrics/jobs.py, metrics/health.py), and the probe's cached view of each job
server (master.bus.ServerView). Labels are pool, function, server ("host:port"), state,
reason, outcome and kind: never a pid, handle, unique id or host name, so the number of
series is bounded by the config and by what the job servers report (capped per server).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import CollectorRegistry
from prometheus_client.utils import floatToGoString

from gearvisor.metrics.health import RESTART_REASONS, HealthCounters
from gearvisor.metrics.jobs import ALL_OUTCOMES, JobTotals
from gearvisor.policy.child import ChildState
from gearvisor.policy.pool import Circuit

if TYPE_CHECKING:
    from gearvisor.master.bus import ServerView
    from gearvisor.policy.pool import Pool

CHILD_STATES = ("starting", "ready", "draining")
# The health findings' kinds (the probe's findings); each is shown, 0 while none is active.
FINDING_KINDS = ("server_down", "server_restarted", "no_workers", "under_registered",
                 "backlog_growing")
# Functions a job server reports that are not ours, per server: at most this many (those
# with jobs or workers; a function stuck at 0/0/0 that is not ours is left out).
MAX_FOREIGN_FUNCTIONS = 1000

Views = Mapping[tuple[str, int], "ServerView"]


class FleetCollector:
    """Reads the master's state through callables, so a test can hand it fakes:
    `pools()` the pools by name, `views()` the probe's cached ServerViews (None: no probe
    cache), `findings()` active findings by kind."""

    def __init__(self, pools: Callable[[], Mapping[str, Pool]], totals: JobTotals,
                 health: HealthCounters, views: Callable[[], Views | None],
                 findings: Callable[[], Mapping[str, int]]) -> None:
        self.pools = pools
        self.totals = totals
        self.health = health
        self.views = views
        self.findings = findings

    def collect(self) -> Iterator[Metric]:
        """Every series, built now (prometheus-client calls this on each scrape)."""
        pools = self.pools()
        yield from self._jobs(pools)
        yield from self._children(pools)
        yield from self._health(pools)
        yield from self._gearmand(pools, self.views())
        findings = GaugeMetricFamily("gearvisor_findings", "Active health findings by kind.",
                                     labels=["kind"])
        active = dict(self.findings())
        for kind in (*FINDING_KINDS, *sorted(set(active) - set(FINDING_KINDS))):
            findings.add_metric([kind], active.get(kind, 0))
        yield findings

    # -- jobs -----------------------------------------------------------------------------------

    def _jobs(self, pools: Mapping[str, Pool]) -> Iterator[Metric]:
        jobs = CounterMetricFamily(
            "gearvisor_jobs", "Jobs that ended, by outcome: success, error (raised, or "
            "refused as too big), timeout (its soft timeout fired, or the child was killed "
            "for the hard one), crash (its child died mid-job), poison (refused: it killed "
            "poison_after children).", labels=["pool", "function", "outcome"])
        durations = HistogramMetricFamily(
            "gearvisor_job_duration_seconds", "How long jobs that ran took (success, error, "
            "timeout).", labels=["pool", "function"])
        running = GaugeMetricFamily("gearvisor_jobs_in_progress",
                                    "Jobs running in a child now.", labels=["pool", "function"])
        for name, pool in pools.items():
            if pool.config.command is not None:
                continue  # a command's jobs are its own business (gearmand's view: below)
            children = pool.children()
            live = [c.scoreboard.stats.read() for c in children
                    if c.scoreboard is not None and c.scoreboard.stats is not None]
            for function, counts in sorted(self.totals.view(name, pool.config.buckets,
                                                            live).items()):
                for outcome, n in zip(ALL_OUTCOMES, counts.outcomes, strict=True):
                    jobs.add_metric([name, function, outcome], n)
                durations.add_metric([name, function], [
                    (floatToGoString(bound), n) for bound, n in counts.cumulative()],
                    counts.sum)
            busy = dict.fromkeys(pool.config.functions, 0)
            for child in children:
                snap = child.scoreboard.read() if child.scoreboard is not None else None
                if snap is not None and snap.busy and snap.function in busy:
                    busy[snap.function] += 1
            for function, n in sorted(busy.items()):
                running.add_metric([name, function], n)
        yield from (jobs, durations, running)

    # -- children and pools ---------------------------------------------------------------------

    def _children(self, pools: Mapping[str, Pool]) -> Iterator[Metric]:
        states = GaugeMetricFamily("gearvisor_children", "Live children by state.",
                                   labels=["pool", "state"])
        desired = GaugeMetricFamily("gearvisor_pool_desired_children",
                                    "Children the pool should run (processes, or scale).",
                                    labels=["pool"])
        for name, pool in pools.items():
            counts = dict.fromkeys(CHILD_STATES, 0)
            for child in pool.children():
                if child.state is not ChildState.EXITED:
                    counts[child.state.value] += 1
            for state, n in counts.items():
                states.add_metric([name, state], n)
            desired.add_metric([name], pool.desired)
        yield from (states, desired)

    def _health(self, pools: Mapping[str, Pool]) -> Iterator[Metric]:
        restarts = CounterMetricFamily(
            "gearvisor_child_restarts", "Children replaced because they ended: crash, "
            "boot_error, exit (exited 0 unasked), timeout (killed for a hung job), recycle "
            "(max_jobs, max_memory, max_lifetime).", labels=["pool", "reason"])
        quarantines = CounterMetricFamily("gearvisor_quarantines",
                                          "Children that quarantined themselves.",
                                          labels=["pool"])
        circuit = GaugeMetricFamily("gearvisor_circuit_open",
                                    "1 while the pool's circuit is open (or probing).",
                                    labels=["pool"])
        returned = CounterMetricFamily(
            "gearvisor_held_jobs_returned", "Jobs a child held behind a slow one that the "
            "master gave back to the job server for an idle child (hold_next).",
            labels=["pool"])
        for name, pool in pools.items():
            for reason in RESTART_REASONS:
                restarts.add_metric([name, reason], self.health.restarts[(name, reason)])
            quarantines.add_metric([name], self.health.quarantines[name])
            circuit.add_metric([name], 0 if pool.circuit is Circuit.CLOSED else 1)
            returned.add_metric([name], self.health.held_returned[name])
        notifications = CounterMetricFamily(
            "gearvisor_alert_notifications", "Alert notifications by channel and outcome: "
            "delivered, failed (after its retries) or dropped (a queue was full).",
            labels=["channel", "outcome"])
        for (channel, outcome), n in sorted(self.health.notifications.items()):
            notifications.add_metric([channel, outcome], n)
        yield from (restarts, quarantines, circuit, returned, notifications)
        yield from self._journal()

    def _journal(self) -> Iterator[Metric]:
        h = self.health
        retries = CounterMetricFamily("gearvisor_retries", "Failed jobs submitted again as a "
                                      "retry (the function's retry:), by the store helper.",
                                      labels=["pool", "function"])
        for (pool, function), n in sorted(h.retries.items()):
            retries.add_metric([pool, function], n)
        dead = GaugeMetricFamily("gearvisor_dead_letters", "Failed jobs no longer retried, "
                                 "kept for `gearvisor dead replay` (in the whole store: a "
                                 "shared PostgreSQL counts every host's).",
                                 labels=["function"])
        for function, n in sorted(h.dead_letters.items()):
            dead.add_metric([function], n)
        yield from (retries, dead)
        if h.store_up is not None or h.journal_waiting or h.journal_dropped:
            yield GaugeMetricFamily("gearvisor_journal_waiting_lines", "Journal lines the "
                                    "master holds until the store helper has committed them "
                                    "(they grow while the store is down).",
                                    value=h.journal_waiting)
            yield CounterMetricFamily("gearvisor_journal_dropped_lines", "Journal lines the "
                                      "master dropped because its buffer was full.",
                                      value=h.journal_dropped)
        if h.store_up is not None:
            yield GaugeMetricFamily("gearvisor_store_up", "1 while the job journal's store "
                                    "takes writes.", value=1 if h.store_up else 0)

    # -- the job servers (the probe's cached views) ---------------------------------------------

    def _gearmand(self, pools: Mapping[str, Pool], views: Views | None) -> Iterator[Metric]:
        up = GaugeMetricFamily("gearvisor_gearmand_up", "1 while the job server answers the "
                               "probe (0 once 3 probes in a row failed).", labels=["server"])
        restarts = CounterMetricFamily("gearvisor_gearmand_restarts", "Times the job "
                                       "server's pid changed while this master watched.",
                                       labels=["server"])
        waiting = GaugeMetricFamily("gearvisor_gearmand_jobs_waiting", "Jobs queued and not "
                                    "running, as the job server reports.",
                                    labels=["server", "function"])
        running = GaugeMetricFamily("gearvisor_gearmand_jobs_running", "Jobs running, as the "
                                    "job server reports.", labels=["server", "function"])
        workers = GaugeMetricFamily("gearvisor_gearmand_workers", "Workers able to run the "
                                    "function (any host or language).",
                                    labels=["server", "function"])
        registered = GaugeMetricFamily("gearvisor_registered_workers", "The pool's "
                                       "children in the job server's workers list (by "
                                       "client id: a child's second connection counts "
                                       "once).", labels=["pool", "server"])
        families = (up, restarts, waiting, running, workers, registered)
        if views is None:
            yield from families
            return
        for key, view in sorted(views.items(), key=lambda kv: kv[1].name):
            server = view.name
            up.add_metric([server], 1 if view.up else 0)
            restarts.add_metric([server], view.restarts)
            if view.answered_at is None or not view.up:
                continue  # never answered, or down: no numbers that are still true
            # Our functions on this server are shown even when it does not list them (no
            # worker registered and nothing queued: 0, which is what an alert wants to see).
            ours = {f for pool in pools.values() for f in pool.config.functions
                    if any((a.host, a.port) == key for a in pool.config.servers)}
            reported = view.functions
            foreign = sorted(f for f, st in reported.items() if f not in ours
                             and (st.queued or st.running or st.workers))
            for function in sorted(ours) + foreign[:MAX_FOREIGN_FUNCTIONS]:
                st = reported.get(function)
                queued, busy, capable = (st.queued, st.running, st.workers) if st else (0, 0, 0)
                waiting.add_metric([server, function], max(0, queued - busy))
                running.add_metric([server, function], busy)
                workers.add_metric([server, function], capable)
        for name, pool in pools.items():
            prefix = f"{pool.config.client_id_prefix}:{name}:"
            for address in pool.config.servers:
                view = views.get((address.host, address.port))
                if view is None or view.workers is None or not view.up:
                    continue
                registered.add_metric([name, view.name], len(
                    {w.client_id for w in view.workers if w.client_id.startswith(prefix)}))
        yield from families


def registry(collector: FleetCollector) -> CollectorRegistry:
    """Its own registry (never the global one): the fleet's series, plus the master's
    process_* series (prometheus-client's ProcessCollector, read from /proc at scrape)."""
    from prometheus_client import ProcessCollector

    reg = CollectorRegistry(auto_describe=False)
    reg.register(collector)
    ProcessCollector(registry=reg)
    return reg


def probe_views(probe: Any) -> Views | None:
    """The probe's cache of ServerViews (`probe.views`) if it keeps one, else None (a probe
    that only answers `workers` requests)."""
    got = getattr(probe, "views", None)
    return got if isinstance(got, Mapping) else None
