"""The master's bus: typed events published by the arbiter and the components, delivered
synchronously to every subscriber of that type, in the order they subscribed.

Events are facts ("this child exited", "the circuit opened"), never commands. A component
reacts to the facts it cares about and acts through the arbiter's verbs or its own state;
nothing reaches into another component's fields. Alerting, metrics and the job journal
subscribe here later without touching what publishes.

A subscriber that raises is logged and the others still run.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from gearvisor.messages import Message

if TYPE_CHECKING:
    from gearvisor.gearman.admin import FunctionStatus, WorkerInfo
    from gearvisor.policy.child import Child
    from gearvisor.policy.findings import Finding
    from gearvisor.policy.pool import ExitDecision, Pool

E = TypeVar("E")


class Bus:
    """subscribe(EventType, callback); publish(event) calls each callback(event)."""

    def __init__(self, log: Any = None) -> None:
        self.log = log
        self._subscribers: dict[type, list[Callable[[Any], Any]]] = {}

    def subscribe(self, kind: type[E], callback: Callable[[E], Any]) -> None:
        self._subscribers.setdefault(kind, []).append(callback)

    def publish(self, event: object) -> None:
        for callback in list(self._subscribers.get(type(event), ())):
            try:
                callback(event)
            except Exception:  # one broken subscriber must not stop the master
                if self.log is not None:
                    self.log.exception("event subscriber failed; the master carries on",
                                       internal_event=type(event).__name__)


# -- children -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class ChildSpawned:
    child: Child
    pool: Pool


@dataclass(frozen=True)
class ChildReady:
    child: Child
    pool: Pool


@dataclass(frozen=True)
class ChildSaid:
    """A message from a child's event pipe that the arbiter does not handle itself."""

    child: Child
    pool: Pool
    message: Message


@dataclass(frozen=True)
class ChildExited:
    """Reaped; `decision` is what the pool made of it. Published before the child's shared
    tables are released, so a subscriber may still read its scoreboard."""

    child: Child
    pool: Pool
    status: int
    decision: ExitDecision


@dataclass(frozen=True)
class OtherReaped:
    """waitpid returned a pid that is no child of a pool: a helper, or an orphan of a child
    (the master is their subreaper)."""

    pid: int
    status: int


# -- health (each is logged with its stable `internal_event` name) ------------------------------

@dataclass(frozen=True)
class Quarantined:
    pool: str
    slot: int
    child_pid: int
    reason: str
    jobs_failed: int
    jobs_done: int
    replaced_in: float


@dataclass(frozen=True)
class CircuitOpened:
    pool: str
    quarantined: int
    desired: int
    probe_in: float
    reopened: bool  # a probe failed: it was open already


@dataclass(frozen=True)
class CircuitClosed:
    pool: str
    probe_pid: int


@dataclass(frozen=True)
class HeldJobReturned:
    """The master gave a job a child held behind a slow one back to the job server
    (master/lanes.py)."""

    pool: str


@dataclass(frozen=True)
class PoisonJob:
    pool: str
    function: str
    unique: str
    handle: str
    size: int
    strikes: int
    last: str  # what the last child did on it: "crashed" or "hung past its timeout"


# -- the fleet ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Reloaded:
    """A new config was accepted; every pool rolls to it."""

    config: Any
    why: str


@dataclass(frozen=True)
class RollStarted:
    """One pool rolls to a new generation without a reload (`gearvisor restart`, watched
    files changed): what a Reloaded is for every pool, for this one."""

    pool: str
    why: str


@dataclass(frozen=True)
class Scaled:
    """A pool's size was set through Arbiter.scale: by `gearvisor scale` (a pin, for
    `pin_for` seconds or until the next reload), by the autoscaler, or back to the config's
    `processes` (`after` is the new desired size)."""

    pool: str
    before: int
    after: int
    by: str  # "gearvisor scale" | "autoscale" | "pin expired"
    pin_for: float | None = None  # `gearvisor scale --for`: seconds the pin lasts


@dataclass(frozen=True)
class Stopping:
    fast: bool
    why: str


@dataclass(frozen=True)
class FleetReady:
    """Start-up or the last reload has settled (systemd's READY=1)."""

    summary: str
    after_reload: bool = False


@dataclass(frozen=True)
class ServerView:
    """The probe's last word on one job server. Every reader of gearmand's state (status,
    metrics, health findings, command-pool readiness, the autoscaler) reads these cached
    views (master.probe.views, or Snapshot events); nothing else queries gearmand."""

    server: tuple[str, int]
    up: bool = True  # False once DOWN_AFTER probes in a row failed
    answered: bool = False  # the last probe got a whole answer
    failures: int = 0  # failed probes in a row
    checked_at: float | None = None  # monotonic time the last probe ended
    answered_at: float | None = None  # ... and the last one that answered
    version: str | None = None  # `version`
    pid: int | None = None  # `getpid`
    restarts: int = 0  # times its pid changed while this master watched
    functions: Mapping[str, FunctionStatus] = field(default_factory=dict)  # `status`
    workers: tuple[WorkerInfo, ...] | None = None  # `workers`; None: never answered
    error: str | None = None  # why the last probe failed

    @property
    def name(self) -> str:
        """host:port, as logs and metric labels show it ([v6]:port for IPv6)."""
        host, port = self.server
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@dataclass(frozen=True)
class Snapshot:
    """The probe has just ended a probe of `view.server` (answered or not): its new view."""

    view: ServerView


@dataclass(frozen=True)
class FindingRaised:
    """A health finding became active (policy/findings.py decides; master/findings.py
    publishes and logs it as `health finding raised`)."""

    finding: Finding


@dataclass(frozen=True)
class FindingCleared:
    """An active health finding no longer holds (logged as `health finding cleared`)."""

    finding: Finding


@dataclass(frozen=True)
class AlertNotified:
    """One alert notification's outcome on a channel: delivered, failed (after its
    retries) or dropped (a queue was full). Counted by metrics."""

    channel: str
    outcome: str  # "delivered" | "failed" | "dropped"


# -- the job journal ------------------------------------------------------------------------------


@dataclass(frozen=True)
class JournalLines:
    """A child wrote a journal line (journal/record.py): records of the jobs it ended. The
    arbiter hands it on undecoded; the journal component forwards it to the store."""

    child: Child
    pool: Pool
    line: bytes


@dataclass(frozen=True)
class JournalBuffered:
    """Journal lines the master holds for the store helper (not acked yet), and how many
    it dropped for its bound, ever. Published when either changes."""

    waiting: int
    dropped: int


@dataclass(frozen=True)
class JournalState:
    """The job store's state as its helper last reported it: `up` (or `error`), dead
    letters per function, and retries the helper submitted since its last report as
    (pool, function, n). Alerts (StoreDown, DeadLetters) and metrics read it."""

    up: bool
    error: str
    dead: Mapping[str, int]
    retries: tuple[tuple[str, str, int], ...]
