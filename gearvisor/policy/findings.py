"""Health findings: what is wrong with the fleet, decided from the probe's views of the job
servers and the pools' own facts. Pure: no I/O, no clock of its own (callers pass `now`,
time.monotonic()), no imports of the master.

Findings.evaluate(views, pools, now) returns the set of active findings; the master's
component (master/findings.py) calls it after every probe, and publishes, logs and shows
what was raised and what cleared. Each finding clears on its own once its cause is gone:

- server_down       the probe failed 3 times in a row (the probe decides `up`).
- server_restarted  the server's pid changed: jobs it had not persisted may be lost. It
                    stays `findings.restart_hold`, then clears.
- no_workers        a function has jobs queued on a server that reports 0 capable workers
                    for it (any host, any language: gearmand's own count), in
                    `findings.no_workers_probes` probes in a row.
- under_registered  a pool has fewer children registered on a server than it has
                    children serving, for `findings.registration_grace` (a registration
                    failure: a command that never registers, a server that refuses it).
- backlog_growing   a function's waiting jobs on a server rose at every one of the last
                    `findings.backlog_probes` probes; with an estimated drain time.

Functions at 0 queued / 0 running / 0 workers that no pool of ours declares are ignored.
A function finding (no_workers, backlog_growing) is only drawn from a server that is up;
while it is down, server_down says it all. Per server at most MAX_TRACKED functions are
looked at (our pools' first, then the most waiting), so a server that reports 50,000
functions costs bounded memory and at most that many findings.
"""

from __future__ import annotations

import collections
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Protocol

from gearvisor.config.model import FindingsConfig

MAX_TRACKED = 200  # functions per server followed for no_workers and backlog_growing

Server = tuple[str, int]


class FindingKind(str, Enum):
    """What is wrong; the value is the stable name logs, status and metrics use."""

    SERVER_DOWN = "server_down"
    SERVER_RESTARTED = "server_restarted"
    NO_WORKERS = "no_workers"
    UNDER_REGISTERED = "under_registered"
    BACKLOG_GROWING = "backlog_growing"


@dataclass(frozen=True)
class Finding:
    """One active finding. Equal (and hashed) by what it is about, (kind, server,
    function, pool), so the same finding with fresher numbers is still the same finding."""

    kind: FindingKind
    server: str  # "host:port"
    function: str | None = None
    pool: str | None = None
    message: str = field(default="", compare=False)
    since: float = field(default=0.0, compare=False)  # monotonic: when its cause began
    details: Mapping[str, Any] = field(default_factory=dict, compare=False)


class FunctionCounts(Protocol):
    """A function's line of gearmand's `status` (gearman.admin.FunctionStatus)."""

    @property
    def queued(self) -> int: ...  # total jobs, running ones included
    @property
    def running(self) -> int: ...
    @property
    def workers(self) -> int: ...  # capable workers


class Connection(Protocol):
    """A line of gearmand's `workers` list (gearman.admin.WorkerInfo)."""

    @property
    def client_id(self) -> str: ...
    @property
    def functions(self) -> tuple[str, ...]: ...


class ServerFacts(Protocol):
    """What the probe last saw of one server (master.bus.ServerView)."""

    @property
    def server(self) -> Server: ...
    @property
    def name(self) -> str: ...
    @property
    def up(self) -> bool: ...
    @property
    def failures(self) -> int: ...
    @property
    def error(self) -> str | None: ...
    @property
    def answered_at(self) -> float | None: ...
    @property
    def pid(self) -> int | None: ...
    @property
    def restarts(self) -> int: ...
    @property
    def functions(self) -> Mapping[str, FunctionCounts]: ...
    @property
    def workers(self) -> Sequence[Connection] | None: ...


@dataclass(frozen=True)
class PoolFacts:
    """What the master knows of one pool, for the findings."""

    name: str
    client_prefix: str  # "<client_id_prefix>:<pool>:", how its connections are known
    functions: frozenset[str]
    servers: frozenset[Server]
    ready_at: tuple[float, ...] = ()  # when each child that should be registered got ready
    completed: int = 0  # jobs its children ended (done + failed), counted up since start


def _rate(first: tuple[float, int, int | None], last: tuple[float, int, int | None]
          ) -> float | None:
    if first[2] is None or last[2] is None or last[0] <= first[0]:
        return None
    return max(0, last[2] - first[2]) / (last[0] - first[0])


class Findings:
    """Remembers what evaluate() needs across probes: streaks, backlog samples, restarts."""

    def __init__(self, config: FindingsConfig) -> None:
        self.config = config
        self._answer: dict[Server, float | None] = {}  # answered_at of the last sample
        self._since: dict[tuple, float] = {}  # when each condition began
        self._no_workers: dict[tuple[str, Server], int] = {}  # probes in a row
        # (answered_at, waiting, jobs completed by the pools serving it or None)
        self._backlog: dict[tuple[str, Server],
                            collections.deque[tuple[float, int, int | None]]] = {}
        # restarts seen, when the last one was seen, the pids before and after it
        self._restart: dict[Server, tuple[int, float | None, int | None, int | None]] = {}
        self._pid: dict[Server, int] = {}  # the last pid each server gave
        self._holding: set[tuple] = set()  # conditions that hold in this evaluation

    def reconfigure(self, config: FindingsConfig) -> None:
        """A reload: new thresholds; what was sampled so far is kept."""
        self.config = config
        for key, samples in self._backlog.items():
            self._backlog[key] = collections.deque(samples, maxlen=config.backlog_probes)

    def evaluate(self, views: Iterable[ServerFacts], pools: Sequence[PoolFacts],
                 now: float) -> frozenset[Finding]:
        """The findings active now, given the probe's last view of every server and the
        pools' facts. A view whose last answer is new since the previous call counts as a
        new probe (for the streaks and the backlog samples)."""
        views = list(views)
        self._holding = set()
        found: list[Finding] = []
        present = {v.server for v in views}
        for gone in set(self._answer) - present:
            self._forget(gone)
        for view in views:
            fresh = view.answered_at is not None and view.answered_at != self._answer.get(
                view.server)
            self._answer[view.server] = view.answered_at
            found += self._server(view, now)
            tracked = self._tracked(view, pools)
            if fresh:
                self._sample(view, tracked, pools)
            if view.up and view.answered_at is not None:
                found += self._functions(view, tracked, now)
                found += self._registration(view, pools, now)
        for key in [k for k in self._since if k not in self._holding]:
            del self._since[key]  # its cause is gone: a new one starts a new grace
        return frozenset(found)

    # -- servers --------------------------------------------------------------------------------

    def _began(self, key: tuple, now: float) -> float:
        """When the condition `key` began to hold (`now` if it just did)."""
        self._holding.add(key)
        return self._since.setdefault(key, now)

    def _server(self, view: ServerFacts, now: float) -> list[Finding]:
        out = []
        if not view.up:
            key = (FindingKind.SERVER_DOWN, view.name, None, None)
            out.append(Finding(*key, message=f"job server {view.name} is down: "
                               f"{view.failures} probes in a row failed ({view.error})",
                               since=self._began(key, now),
                               details={"failures": view.failures, "error": view.error}))
        record = self._restart.get(view.server)
        if record is None or view.restarts < record[0]:
            record = (view.restarts, None, None, None)  # a new watch of the server
        elif view.restarts > record[0]:  # the probe saw the pid change
            record = (view.restarts, now, self._pid.get(view.server), view.pid)
        self._restart[view.server] = record
        if view.pid is not None:
            self._pid[view.server] = view.pid
        count, seen_at, old, new = record
        if seen_at is not None and view.up and now - seen_at < self.config.restart_hold:
            key = (FindingKind.SERVER_RESTARTED, view.name, None, None)
            out.append(Finding(*key, message=f"job server {view.name} restarted (pid {old} "
                               f"-> {new}): jobs it had not persisted may be lost",
                               since=seen_at, details={"old_pid": old, "pid": new,
                                                       "restarts": count}))
        return out

    # -- functions ------------------------------------------------------------------------------

    def _tracked(self, view: ServerFacts, pools: Sequence[PoolFacts]) -> list[str]:
        """The functions followed on this server: those of our pools that use it, then the
        ones with the most waiting, MAX_TRACKED in all; 0/0/0 functions of no pool never."""
        ours = sorted({fn for p in pools if view.server in p.servers for fn in p.functions})
        ours_set = set(ours)
        others = sorted((fn for fn, st in view.functions.items()
                         if fn not in ours_set and (st.queued or st.running)),
                        key=lambda fn: (-(view.functions[fn].queued
                                          - view.functions[fn].running), fn))
        return (ours + others)[:MAX_TRACKED]

    def _completed(self, fn: str, server: Server, pools: Sequence[PoolFacts]) -> int | None:
        serving = [p for p in pools if fn in p.functions and server in p.servers]
        return sum(p.completed for p in serving) if serving else None

    def _sample(self, view: ServerFacts, tracked: list[str], pools: Sequence[PoolFacts]
                ) -> None:
        """A new answer from this server: extend the streaks and the backlog samples."""
        assert view.answered_at is not None
        keep = set()
        for fn in tracked:
            key = (fn, view.server)
            keep.add(key)
            st = view.functions.get(fn)
            queued, running, workers = (st.queued, st.running, st.workers) if st else (0, 0, 0)
            if queued and not workers:
                self._no_workers[key] = self._no_workers.get(key, 0) + 1
            else:
                self._no_workers.pop(key, None)
            samples = self._backlog.get(key)
            if samples is None:
                samples = self._backlog[key] = collections.deque(
                    maxlen=self.config.backlog_probes)
            samples.append((view.answered_at, max(0, queued - running),
                            self._completed(fn, view.server, pools)))
        for store in (self._no_workers, self._backlog):
            for key in [k for k in store if k[1] == view.server and k not in keep]:
                del store[key]  # type: ignore[attr-defined]

    def _functions(self, view: ServerFacts, tracked: list[str], now: float) -> list[Finding]:
        out = []
        for fn in tracked:
            key = (fn, view.server)
            st = view.functions.get(fn)
            streak = self._no_workers.get(key, 0)
            if st is not None and streak >= self.config.no_workers_probes:
                fkey = (FindingKind.NO_WORKERS, view.name, fn, None)
                out.append(Finding(*fkey, message=f"function {fn} has {st.queued} job(s) "
                                   f"queued on {view.name} and no worker that can do it",
                                   since=self._began(fkey, now),
                                   details={"queued": st.queued, "probes": streak}))
            samples = self._backlog.get(key)
            if samples is None or len(samples) < self.config.backlog_probes:
                continue
            waiting = [s[1] for s in samples]
            if all(a < b for a, b in zip(waiting, waiting[1:], strict=False)):
                out.append(self._backlog_finding(view, fn, samples, now))
        return out

    def _backlog_finding(self, view: ServerFacts, fn: str,
                         samples: collections.deque[tuple[float, int, int | None]],
                         now: float) -> Finding:
        """The drain time comes from the rate at which our pools that serve the function
        ended jobs over the same probes (their children's scoreboard counters, done +
        failed). gearmand's `status` cannot give it: a change in its total is arrivals
        minus completions, and the two cannot be told apart. The pools' rate covers every
        function and server they serve, so it is an upper bound of this function's rate
        and the drain time a lower bound; workers that are not ours (other hosts, command
        pools without a scoreboard) are not counted. None when no pool of ours serves it
        or nothing completed: at that rate it never drains."""
        first, last = samples[0], samples[-1]
        rate = _rate(first, last)
        drain = last[1] / rate if rate else None
        if rate is None:
            how = "no completion rate known (no pool of ours serves it)"
        elif not rate:
            how = "nothing completed meanwhile, so at this rate it never drains"
        else:
            how = f"about {drain:.0f}s to drain at the recent completion rate ({rate:.3g}/s)"
        key = (FindingKind.BACKLOG_GROWING, view.name, fn, None)
        return Finding(*key, message=f"function {fn}: waiting jobs on {view.name} grew from "
                       f"{first[1]} to {last[1]} over {len(samples)} probes; {how}",
                       since=self._began(key, now),
                       details={"waiting": last[1], "grew_by": last[1] - first[1],
                                "seconds": round(last[0] - first[0], 3),
                                "completion_rate": None if rate is None else round(rate, 3),
                                "drain_seconds": None if drain is None else round(drain, 1)})

    # -- registration ---------------------------------------------------------------------------

    def _registration(self, view: ServerFacts, pools: Sequence[PoolFacts], now: float
                      ) -> list[Finding]:
        """Connections of each pool on this server against its children that were serving
        when the server answered (a child that got ready after the answer may not show
        yet)."""
        out = []
        answered_at = view.answered_at or 0.0
        for pool in pools:
            if view.server not in pool.servers:
                continue
            expected = sum(1 for t in pool.ready_at if t <= answered_at)
            # Children, by client id: a child's second lane (hold_next) is the same child.
            registered = len({w.client_id for w in view.workers or ()
                              if w.client_id.startswith(pool.client_prefix)
                              and (not pool.functions or pool.functions & set(w.functions))})
            key = (FindingKind.UNDER_REGISTERED, view.name, None, pool.name)
            if registered >= expected:
                continue
            since = self._began(key, now)
            if now - since >= self.config.registration_grace:
                out.append(Finding(*key, message=f"pool {pool.name} has {registered} "
                                   f"child(ren) registered on {view.name} but {expected} "
                                   "children serving: some failed to register",
                                   since=since, details={"registered": registered,
                                                         "children": expected}))
        return out

    def _forget(self, server: Server) -> None:
        """No pool uses the server any more."""
        self._answer.pop(server, None)
        self._restart.pop(server, None)
        self._pid.pop(server, None)
        for store in (self._no_workers, self._backlog):
            for key in [k for k in store if k[1] == server]:
                del store[key]  # type: ignore[attr-defined]
