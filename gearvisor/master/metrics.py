"""The metrics component: Prometheus's /metrics, /healthz and /readyz, served from the loop.

It keeps what must outlive a child (metrics/jobs.JobTotals: a reaped child's final job
counts, and the crash and hard-timeout outcomes only the master sees;
metrics/health.HealthCounters: restarts by reason, quarantines) from the bus, and builds
every series at scrape time (metrics/collector.FleetCollector) from the pools, the
children's shared-memory counts and the probe's cached job-server views. The HTTP side is
master/http.HttpServer: no thread, bounded buffers and connections.

`metrics: {listen: "host:port"}` turns it on. A bind error at start is a StartError; a
reload that changes the address binds the new one first, and keeps the old one (logged)
if that fails.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from prometheus_client.exposition import choose_encoder

from gearvisor.master import bus as ev
from gearvisor.master.arbiter import StartError
from gearvisor.master.component import Component
from gearvisor.master.http import HttpServer, Request, Response
from gearvisor.metrics.collector import FleetCollector, probe_views, registry
from gearvisor.metrics.health import HealthCounters, restart_reason
from gearvisor.metrics.jobs import ALL_OUTCOMES, JobTotals
from gearvisor.policy.child import ChildState, describe_status
from gearvisor.policy.pool import ExitKind

if TYPE_CHECKING:
    from gearvisor.config import Config, Server
    from gearvisor.master.arbiter import Arbiter

MAX_FINDINGS = 10_000  # active findings tracked for gearvisor_findings (a bound, not a goal)


class Metrics(Component):
    """Counts from the bus; the exposition over HTTP when `metrics.listen` is set."""

    def __init__(self, probe: Any) -> None:
        self.probe = probe
        self.totals = JobTotals()
        self.health = HealthCounters()
        self.findings: dict[Any, str] = {}  # an active finding's identity -> its kind
        self._recycled: set[int] = set()  # pids retired because a recycling limit hit
        self.server: HttpServer | None = None
        self.listen: Server | None = None
        self.collector = FleetCollector(lambda: self.master.pools, self.totals, self.health,
                                        lambda: probe_views(self.probe), self._findings)
        self.registry = registry(self.collector)

    def attach(self, master: Arbiter) -> None:
        self.master = master
        master.bus.subscribe(ev.ChildExited, self._exited)
        master.bus.subscribe(ev.ChildReady, self._ready)
        master.bus.subscribe(ev.Quarantined, lambda e: self.health.quarantined(e.pool))
        master.bus.subscribe(ev.HeldJobReturned,
                             lambda e: self.health.held_returned.update((e.pool,)))
        master.bus.subscribe(ev.FindingRaised, self._finding_raised)
        master.bus.subscribe(ev.AlertNotified,
                             lambda e: self.health.notified(e.channel, e.outcome))
        master.bus.subscribe(ev.FindingCleared, self._finding_cleared)
        master.bus.subscribe(ev.JournalBuffered,
                             lambda e: self.health.journal_buffered(e.waiting, e.dropped))
        master.bus.subscribe(ev.JournalState,
                             lambda e: self.health.journal(e.up, dict(e.dead), e.retries))
        if master.config.metrics is not None:
            listen = master.config.metrics.listen
            try:
                self.server = self._open(listen)
            except OSError as e:
                raise StartError("cannot open the metrics listener",
                                 f"metrics.listen {listen}: {e.strerror or e}") from None
            self.listen = listen
            master.log.info("serving metrics", listen=str(listen),
                            endpoints="/metrics /healthz /readyz")

    def _open(self, listen: Server) -> HttpServer:
        server = HttpServer(self.master.loop, self.master.log, self.handle)
        server.open(listen.host, listen.port)
        return server

    def reload(self, config: Config) -> None:
        new = config.metrics.listen if config.metrics is not None else None
        if new == self.listen:
            return
        if new is None:
            if self.server is not None:
                self.server.close()
            self.server, self.listen = None, None
            self.master.log.info("metrics endpoint closed (no metrics block in the config)")
            return
        try:
            # The new address first: should it fail, the old listener keeps serving.
            server = self._open(new)
        except OSError as e:
            self.master.log.error("cannot open the new metrics listener; the old one keeps "
                                  "serving", listen=str(new), error=e.strerror or str(e),
                                  serving=str(self.listen) if self.listen else None)
            return
        if self.server is not None:
            self.server.close()
        self.server, self.listen = server, new
        self.master.log.info("serving metrics", listen=str(new),
                             endpoints="/metrics /healthz /readyz")

    def status(self, now: float) -> dict[str, Any]:
        """Per pool and function, the job counters the metrics keep (outcomes and the
        duration histogram), so `gearvisor top` can show jobs/s, failure % and p95 from two
        frames. Only with metrics on: children count per function only then."""
        if self.master.config.metrics is None:
            return {}
        rows = []
        for name, pool in self.master.pools.items():
            if pool.config.command is not None:
                continue  # a command child counts nothing per function
            live = [c.scoreboard.stats.read() for c in pool.children()
                    if c.scoreboard is not None and c.scoreboard.stats is not None]
            for function, counts in sorted(self.totals.view(name, pool.config.buckets,
                                                            live).items()):
                rows.append({"pool": name, "function": function,
                             "outcomes": dict(zip(ALL_OUTCOMES, counts.outcomes, strict=True)),
                             "bounds": list(counts.bounds), "buckets": list(counts.buckets)})
        return {"jobs": rows}

    def close(self) -> None:
        if self.server is not None:
            self.server.close()
            self.server = None

    # -- counting from the bus ------------------------------------------------------------------

    def _exited(self, event: ev.ChildExited) -> None:
        child, pool, decision = event.child, event.pool, event.decision
        code, sig, _ = describe_status(event.status)
        board = child.scoreboard
        if board is not None and board.stats is not None:
            self.totals.fold(pool.name, board.stats.read(), pool.config.buckets)
            job = board.read()
            died = sig is not None and not child.master_killed  # a signal that was not ours
            if job is not None and job.busy and job.function in board.stats.functions and (
                    decision.kind is not ExitKind.STOPPED or child.killed_for == "timeout"
                    or died):
                # It died mid-job (the same rule as a poison strike): only the master can
                # count that job.
                self.totals.count(pool.name, job.function,
                                  "timeout" if child.killed_for == "timeout" else "crash",
                                  pool.config.buckets.get(job.function,
                                                          board.stats.functions[job.function]))
        recycled = child.pid in self._recycled
        self._recycled.discard(child.pid)
        reason = restart_reason(child, decision, code, recycled, bool(self.master.stopping))
        if reason is not None:
            self.health.restarted(pool.name, reason)

    def _ready(self, event: ev.ChildReady) -> None:
        # A same-generation successor took over a slot whose child was not quarantined: the
        # old child was retired by a recycling limit (the arbiter's rule for "recycled").
        child, pool = event.child, event.pool
        for old in pool.retired:
            if (old is not child and old.slot == child.slot and old.quarantined is None
                    and old.generation == child.generation
                    and old.state is ChildState.DRAINING):
                self._recycled.add(old.pid)

    def _finding_raised(self, event: Any) -> None:
        kind, identity = _finding(event)
        if identity in self.findings or len(self.findings) < MAX_FINDINGS:
            self.findings[identity] = kind

    def _finding_cleared(self, event: Any) -> None:
        self.findings.pop(_finding(event)[1], None)

    def _findings(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for kind in self.findings.values():
            counts[kind] = counts.get(kind, 0) + 1
        return counts

    # -- HTTP -----------------------------------------------------------------------------------

    def handle(self, request: Request) -> Response:
        """Route one request: /metrics, /healthz, /readyz; 405 for other methods, 404 else."""
        if request.method not in ("GET", "HEAD"):
            return Response(405, b"only GET and HEAD\n", headers=(("Allow", "GET, HEAD"),))
        if request.path == "/metrics":
            keep = set(self.master.pools)
            self.totals.forget(keep)  # pools gone from the config and drained
            self.health.forget(keep)
            encoder, content_type = choose_encoder(request.headers.get("accept", ""))
            return Response(200, encoder(self.registry), content_type)
        if request.path == "/healthz":
            return Response(200, b"ok\n")  # answered from the loop: the loop is alive
        if request.path == "/readyz":
            problems = self.readiness()
            if problems:
                return Response(503, ("not ready: " + "; ".join(problems) + "\n").encode())
            return Response(200, b"ready\n")
        return Response(404, b"not found: try /metrics, /healthz or /readyz\n")

    def readiness(self) -> list[str]:
        """Why the fleet is not ready (empty: ready): every pool has its desired children
        ready, and at least one of each pool's job servers is up (as the probe saw it)."""
        master = self.master
        problems = ["the master is stopping"] if master.stopping else []
        views = probe_views(self.probe)
        for name, pool in master.pools.items():
            if pool.removed:
                continue
            ready = sum(1 for s in pool.slots
                        if s.child is not None and s.child.state is ChildState.READY)
            if ready < pool.desired:
                problems.append(f"pool {name}: {ready}/{pool.desired} children ready")
            if views is not None and pool.config.servers:
                up = [a for a in pool.config.servers
                      if (v := views.get((a.host, a.port))) is not None and v.up
                      and v.answered_at is not None]
                if not up:
                    problems.append(f"pool {name}: no job server up ("
                                    + ", ".join(str(a) for a in pool.config.servers) + ")")
        return problems


def _finding(event: ev.FindingRaised | ev.FindingCleared) -> tuple[str, Any]:
    """(kind, identity) of a finding event: a Finding is equal by what it is about."""
    return event.finding.kind.value, event.finding
