"""The built-in alert rules evaluated from plain facts: what is wrong now, as label sets.

Pure: no I/O, no clock of its own (every call takes `now`). The master turns bus events
into the facts below and feeds them to RuleBook.observe(); RuleBook.conditions(now) says
which alert conditions hold at `now`, each a label set plus annotations. The alert
lifecycle (pending, firing, resolved), grouping and routing are gearvisor.policy.alerts'.

The facts, one dataclass each (the bus event they come from in brackets):
  ChildExit(pool, slot, kind)      [ChildExited, kind = ExitDecision.kind.value]
  ChildReady(pool, slot)           [ChildReady]
  FindingUp / FindingDown          [FindingRaised / FindingCleared]
  QuarantineFact(pool, slot, ...)  [Quarantined]
  CircuitFact(pool, open)          [CircuitOpened / CircuitClosed]
  PoisonFact(pool, function, ...)  [PoisonJob]
  HardTimeout(pool, slot, function) [the master's hard-timeout kill]
  RollFact(pool, state)            [a roll started / halted / ended]
  FdUsage(used, limit, pool)       [a periodic count of open files]
  BacklogDrain(function, server, waiting, seconds) [a drain time estimate, per probe]
  JobTick(pool, function, done, failed, p95) [per function, each metrics tick]

Every table here is keyed by pool/slot/function/server, which the config bounds, and is
capped at MAX_KEYS entries besides, so no stream of facts grows memory without bound.
"""

from __future__ import annotations

import collections
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from gearvisor.config.alerts import RULES
from gearvisor.config.model import RuleConfig

MAX_KEYS = 10_000  # entries per table (slots, functions, servers); more are dropped
MAX_JOB_KEYS = 1_000  # (pool, function) pairs whose job counts are kept
SAMPLES = 500  # job count samples per function over FailureRate's window: ticks closer
# than window/SAMPLES are added into one, so memory is bounded whatever the tick rate

Labels = dict[str, str]


@dataclass(frozen=True)
class ChildExit:
    """A child exited; kind is "crashed", "boot_error", "roll_failed" or "stopped"."""

    pool: str
    slot: int
    kind: str


@dataclass(frozen=True)
class ChildReady:
    """A child of `pool` in `slot` got ready (registered): the pool boots, the slot serves."""

    pool: str
    slot: int


@dataclass(frozen=True)
class FindingUp:
    """A health finding was raised (policy.findings.Finding's fields, kind by its value)."""

    kind: str  # "server_down", "server_restarted", "no_workers", "under_registered", ...
    server: str
    function: str | None = None
    pool: str | None = None
    message: str = ""
    details: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class FindingDown:
    """A health finding cleared."""

    kind: str
    server: str
    function: str | None = None
    pool: str | None = None


@dataclass(frozen=True)
class QuarantineFact:
    """A child quarantined itself; it resolves when its slot has a ready child again."""

    pool: str
    slot: int
    reason: str = ""


@dataclass(frozen=True)
class CircuitFact:
    """A pool's circuit opened (open=True) or closed."""

    pool: str
    open: bool


@dataclass(frozen=True)
class PoisonFact:
    """A job crashed or hung `strikes` children and was failed without running."""

    pool: str
    function: str
    strikes: int = 0
    last: str = ""


@dataclass(frozen=True)
class HardTimeout:
    """A job ran past its timeout plus grace and the master killed its child."""

    pool: str
    slot: int
    function: str


@dataclass(frozen=True)
class RollFact:
    """A pool's roll: state is "running", "halted" (a new child could not get ready) or
    "done" (ended or abandoned by a new reload)."""

    pool: str
    state: str
    reason: str = ""


@dataclass(frozen=True)
class FdUsage:
    """Open file descriptors against the soft limit (the master's own, or a pool's)."""

    used: int
    limit: int
    pool: str | None = None


@dataclass(frozen=True)
class BacklogDrain:
    """A function's waiting jobs on a server and the estimated time to drain them (None:
    at the current rate they never drain); Backlog fires when it is above `drain`."""

    function: str
    server: str
    waiting: int
    seconds: float | None


@dataclass(frozen=True)
class JobTick:
    """One function's jobs ended since the last tick, and its p95 job time (None when no
    job ended in the window the caller keeps)."""

    pool: str
    function: str
    done: int
    failed: int
    p95: float | None = None


@dataclass(frozen=True)
class StoreFact:
    """The job journal's store: up (written to) or down, and why."""

    up: bool
    error: str = ""


@dataclass(frozen=True)
class DeadLetterCount:
    """How many dead letters a function has in the store now."""

    function: str
    total: int


Fact = (ChildExit | ChildReady | FindingUp | FindingDown | QuarantineFact | CircuitFact
        | PoisonFact | HardTimeout | RollFact | FdUsage | BacklogDrain | JobTick | StoreFact
        | DeadLetterCount)

# finding kind -> the rule it feeds
FINDING_RULES = {"server_down": "ServerDown", "server_restarted": "ServerRestarted",
                 "no_workers": "NoWorkers", "under_registered": "WorkersMissing",
                 "backlog_growing": "Backlog"}


@dataclass(frozen=True)
class Condition:
    """One alert condition that holds now: its labels (severity and host included) and
    annotations (summary, description)."""

    labels: Labels
    annotations: Labels


def _put(table: dict, key: Any, value: Any) -> None:
    """table[key] = value, unless the table is full of other keys (then it is dropped)."""
    if key in table or len(table) < MAX_KEYS:
        table[key] = value


class RuleBook:
    """The facts the rules need, remembered across calls, and the conditions they make."""

    def __init__(self, rules: Mapping[str, RuleConfig], host: str) -> None:
        self.rules = {name: rules.get(name) or spec.defaults() for name, spec in RULES.items()}
        self.host = host
        self.crashes: dict[tuple[str, int], collections.deque[float]] = {}
        self.boot_failed: dict[str, float] = {}  # pool -> when
        self.quarantined: dict[tuple[str, int], str] = {}
        self.circuits: set[str] = set()
        self.poisoned: dict[tuple[str, str], tuple[float, int]] = {}  # -> (last, count)
        self.hung: dict[tuple[str, str], tuple[float, int]] = {}
        self.findings: dict[tuple[str, str, str | None, str | None], FindingUp] = {}
        self.rolls: dict[str, RollFact] = {}
        self.fds: dict[str | None, FdUsage] = {}
        self.drains: dict[tuple[str, str], BacklogDrain] = {}
        self.jobs: dict[tuple[str, str], collections.deque[tuple[float, int, int]]] = {}
        self.p95: dict[tuple[str, str], float | None] = {}
        self.store_down: str | None = None  # why the journal's store is down, or None
        # function -> (its dead letters at the last count, (time, how many new) per rise)
        self.dead: dict[str, tuple[int, collections.deque[tuple[float, int]]]] = {}

    def reconfigure(self, rules: Mapping[str, RuleConfig]) -> None:
        """A reload: new thresholds; the facts seen so far are kept."""
        self.rules = {name: rules.get(name) or spec.defaults() for name, spec in RULES.items()}

    def rolling(self) -> set[str]:
        """Pools whose roll is running now (their child alerts are muted meanwhile)."""
        return {p for p, r in self.rolls.items() if r.state == "running"}

    def observe(self, fact: Fact, now: float) -> None:
        """Remember one fact. Unknown kinds of finding or exit are ignored."""
        if isinstance(fact, ChildExit):
            if fact.kind == "crashed":
                key = (fact.pool, fact.slot)
                count = int(self.rules["CrashLoop"].params["count"])
                q = self.crashes.get(key)
                if q is None or q.maxlen != count:
                    q = collections.deque(q or (), maxlen=count)
                q.append(now)
                _put(self.crashes, key, q)
            elif fact.kind == "boot_error":
                _put(self.boot_failed, fact.pool, now)
        elif isinstance(fact, ChildReady):
            self.boot_failed.pop(fact.pool, None)
            self.quarantined.pop((fact.pool, fact.slot), None)
        elif isinstance(fact, FindingUp):
            _put(self.findings, (fact.kind, fact.server, fact.function, fact.pool), fact)
        elif isinstance(fact, FindingDown):
            self.findings.pop((fact.kind, fact.server, fact.function, fact.pool), None)
        elif isinstance(fact, QuarantineFact):
            _put(self.quarantined, (fact.pool, fact.slot), fact.reason)
        elif isinstance(fact, CircuitFact):
            if fact.open:
                if len(self.circuits) < MAX_KEYS:
                    self.circuits.add(fact.pool)
            else:
                self.circuits.discard(fact.pool)
        elif isinstance(fact, PoisonFact):
            last = self.poisoned.get((fact.pool, fact.function), (0.0, 0))
            _put(self.poisoned, (fact.pool, fact.function), (now, last[1] + 1))
        elif isinstance(fact, HardTimeout):
            last = self.hung.get((fact.pool, fact.function), (0.0, 0))
            _put(self.hung, (fact.pool, fact.function), (now, last[1] + 1))
        elif isinstance(fact, RollFact):
            if fact.state == "done":
                self.rolls.pop(fact.pool, None)
            else:
                _put(self.rolls, fact.pool, fact)
        elif isinstance(fact, FdUsage):
            _put(self.fds, fact.pool, fact)
        elif isinstance(fact, BacklogDrain):
            _put(self.drains, (fact.function, fact.server), fact)
        elif isinstance(fact, JobTick):
            key = (fact.pool, fact.function)
            if key not in self.jobs and len(self.jobs) >= MAX_JOB_KEYS:
                return
            q = self.jobs.setdefault(key, collections.deque())
            done, failed = max(0, fact.done), max(0, fact.failed)
            step = float(self.rules["FailureRate"].params["window"]) / SAMPLES
            if q and 0 <= now - q[0][0] and now - q[-1][0] < step:
                t, d, f = q[-1]
                q[-1] = (t, d + done, f + failed)
            else:
                q.append((now, done, failed))
            while len(q) > 2 * SAMPLES:  # a clock step back, or a smaller window now
                q.popleft()
            self.p95[key] = fact.p95
        elif isinstance(fact, StoreFact):
            self.store_down = None if fact.up else (fact.error or "unreachable")
        elif isinstance(fact, DeadLetterCount):
            last, rises = self.dead.get(fact.function, (None, collections.deque(maxlen=SAMPLES)))
            if last is not None and fact.total > last:
                rises.append((now, fact.total - last))
            _put(self.dead, fact.function, (max(0, fact.total), rises))

    def has_timers(self) -> bool:
        """Whether a condition may change with time alone (a window or a hold running)."""
        return bool(self.crashes or self.poisoned or self.hung or self.jobs or any(
            rises for _, rises in self.dead.values()))

    def forget(self, pools: set[str]) -> None:
        """Pools that are gone (a reload removed them): drop what is known of them."""
        for table in (self.crashes, self.quarantined, self.poisoned, self.hung, self.jobs,
                      self.p95):
            for key in [k for k in table if k[0] not in pools]:
                del table[key]
        for table2 in (self.boot_failed, self.rolls):
            for pool in [p for p in table2 if p not in pools]:
                del table2[pool]
        self.circuits &= pools

    # -- conditions -----------------------------------------------------------------------

    def _condition(self, name: str, summary: str, description: str = "",
                   **labels: str | None) -> Condition | None:
        rule = self.rules[name]
        if not rule.enabled:
            return None
        out = {"alertname": name, "severity": rule.severity, "host": self.host}
        out.update({k: v for k, v in labels.items() if v is not None})
        return Condition(out, {"summary": summary, "description": description or summary})

    def conditions(self, now: float) -> list[Condition]:
        """Every alert condition that holds at `now` (before `for:` and silences)."""
        found: list[Condition | None] = []
        p = {name: rule.params for name, rule in self.rules.items()}
        window = float(p["CrashLoop"]["window"])
        count = int(p["CrashLoop"]["count"])
        for (pool, slot), q in list(self.crashes.items()):
            while q and now - q[0] > window:
                q.popleft()
            if not q:
                del self.crashes[(pool, slot)]
            elif len(q) >= count:
                found.append(self._condition(
                    "CrashLoop", f"pool {pool} slot {slot} crashed {len(q)} times in "
                    f"{window:g}s", pool=pool, slot=str(slot)))
        for pool in self.boot_failed:
            found.append(self._condition("BootFailure", f"pool {pool} cannot boot: its "
                                         "children exit before they are ready", pool=pool))
        for (pool, slot), reason in self.quarantined.items():
            found.append(self._condition("Quarantined", f"pool {pool} slot {slot} is "
                                         f"quarantined: {reason}", pool=pool, slot=str(slot)))
        for pool in self.circuits:
            found.append(self._condition("CircuitOpen", f"pool {pool}'s circuit is open: it "
                                         "takes no jobs", pool=pool))
        for name, table, what in (("PoisonJob", self.poisoned, "poisoned job(s) failed"),
                                  ("JobHung", self.hung, "child(ren) killed by a hard "
                                   "timeout")):
            hold = float(p[name]["hold"])
            for key, (last, n) in list(table.items()):
                if now - last >= hold:
                    del table[key]
                else:
                    found.append(self._condition(name, f"pool {key[0]} function {key[1]}: "
                                                 f"{n} {what}", pool=key[0], function=key[1]))
        for (kind, server, function, pool), f in self.findings.items():
            name = FINDING_RULES.get(kind)
            if name is None:
                continue
            found.append(self._condition(name, f.message or f"{kind} on {server}",
                                         server=server, function=function, pool=pool))
        limit = float(p["Backlog"]["drain"])
        for (fn, server), d in self.drains.items():
            if limit and d.waiting > 0 and (d.seconds is None or d.seconds > limit):
                how = "never, at the current rate" if d.seconds is None else \
                    f"in about {d.seconds:.0f}s"
                found.append(self._condition(
                    "Backlog", f"function {fn} on {server}: {d.waiting} waiting jobs drain "
                    f"{how} (above {limit:g}s)", server=server, function=fn))
        found += self._jobs(now, p)
        for pool, r in self.rolls.items():
            if r.state == "halted":
                found.append(self._condition("RollHalted", f"pool {pool}'s roll halted: "
                                             f"{r.reason}", pool=pool))
        ratio = float(p["FdLimit"]["ratio"])
        for pool, fd in self.fds.items():
            if fd.limit > 0 and fd.used / fd.limit > ratio:
                who = f"pool {pool}" if pool else "the master"
                found.append(self._condition("FdLimit", f"{who} has {fd.used} of "
                                             f"{fd.limit} files open", pool=pool))
        if self.store_down is not None:
            found.append(self._condition("StoreDown", "the job journal's store cannot be "
                                         f"written: {self.store_down}"))
        window = float(p["DeadLetters"]["window"])
        for fn, (_, rises) in self.dead.items():
            while rises and now - rises[0][0] > window:
                rises.popleft()
            new = sum(n for _, n in rises)
            if new >= int(p["DeadLetters"]["count"]):
                found.append(self._condition(
                    "DeadLetters", f"function {fn}: {new} new dead letter(s) in {window:g}s "
                    f"(`gearvisor dead list --function {fn}`)", function=fn))
        return [c for c in found if c is not None]

    def _jobs(self, now: float, p: Mapping[str, Mapping[str, Any]]) -> list[Condition | None]:
        out: list[Condition | None] = []
        window = float(p["FailureRate"]["window"])
        for (pool, fn), q in list(self.jobs.items()):
            while q and now - q[0][0] > window:
                q.popleft()
            done = sum(s[1] for s in q)
            failed = sum(s[2] for s in q)
            total = done + failed
            if total >= int(p["FailureRate"]["min_jobs"]) and \
                    failed / total > float(p["FailureRate"]["ratio"]):
                out.append(self._condition(
                    "FailureRate", f"pool {pool} function {fn}: {failed} of {total} jobs "
                    f"failed in {window:g}s ({failed / total:.1%})", pool=pool, function=fn))
        for (pool, fn), p95 in self.p95.items():
            limit = float(p["SlowJobs"]["functions"].get(fn, p["SlowJobs"]["p95"]))
            if p95 is not None and p95 > limit:
                out.append(self._condition("SlowJobs", f"pool {pool} function {fn}: p95 "
                                           f"{p95:.3g}s above {limit:g}s", pool=pool,
                                           function=fn))
        return out

    # -- state ----------------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """What the rules remember, as plain data (for SQLite across master restarts)."""
        return {
            "crashes": [[k[0], k[1], list(q)] for k, q in self.crashes.items()],
            "boot_failed": dict(self.boot_failed),
            "quarantined": [[k[0], k[1], r] for k, r in self.quarantined.items()],
            "circuits": sorted(self.circuits),
            "poisoned": [[k[0], k[1], v[0], v[1]] for k, v in self.poisoned.items()],
            "hung": [[k[0], k[1], v[0], v[1]] for k, v in self.hung.items()],
            "rolls": [[r.pool, r.state, r.reason] for r in self.rolls.values()],
        }

    def restore(self, data: Mapping[str, Any]) -> None:
        """Take back a snapshot(). Findings, fds and job ticks are not restored: the probe
        and the metrics tick give them afresh after a restart."""
        count = int(self.rules["CrashLoop"].params["count"])
        for pool, slot, times in data.get("crashes", ())[:MAX_KEYS]:
            self.crashes[(str(pool), int(slot))] = collections.deque(
                (float(t) for t in times), maxlen=count)
        self.boot_failed = {str(k): float(v) for k, v in
                            list(data.get("boot_failed", {}).items())[:MAX_KEYS]}
        self.quarantined = {(str(p), int(s)): str(r) for p, s, r in
                            data.get("quarantined", ())[:MAX_KEYS]}
        self.circuits = {str(p) for p in data.get("circuits", ())[:MAX_KEYS]}
        self.poisoned = {(str(p), str(f)): (float(t), int(n)) for p, f, t, n in
                         data.get("poisoned", ())[:MAX_KEYS]}
        self.hung = {(str(p), str(f)): (float(t), int(n)) for p, f, t, n in
                     data.get("hung", ())[:MAX_KEYS]}
        self.rolls = {str(p): RollFact(str(p), str(s), str(r)) for p, s, r in
                      data.get("rolls", ())[:MAX_KEYS]}
