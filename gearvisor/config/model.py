"""The typed result of a config: frozen dataclasses (Config, PoolConfig, Server, ...).

This is what the rest of gearvisor reads; it never sees YAML. A PoolConfig has every
top-level default already applied, so a pool is complete on its own. Frozen, so a config
that was checked stays as checked: a reload builds a new Config, it never edits the old one.
Pure data, importing nothing else of the package.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Server:
    """One job server address."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class BackoffConfig:
    """Crash backoff of a pool's slots (the `backoff:` block)."""

    initial: float
    max: float
    multiplier: float
    jitter: float
    reset_after: float


@dataclass(frozen=True)
class KeepaliveConfig:
    """TCP keepalive of a child's job server connections (the `keepalive:` block)."""

    idle: int
    interval: int
    count: int


@dataclass(frozen=True)
class QuarantineConfig:
    """When a child that fails fast stops taking jobs (the `quarantine:` block)."""

    enabled: bool = True
    window: int = 20
    min_jobs: int = 5
    ratio: float = 0.8
    fast: float = 1.0
    cooldown: float = 5.0
    cooldown_max: float = 300.0
    probation_jobs: int = 3


@dataclass(frozen=True)
class CircuitConfig:
    """When a pool stops consuming and probes (the `circuit:` block)."""

    ratio: float = 0.6
    cooldown: float = 10.0
    cooldown_max: float = 300.0


@dataclass(frozen=True)
class AutoscaleConfig:
    """Sizing a pool on its queue depth (the pool's `autoscale:` block; off without it).
    policy/autoscale.py decides from it."""

    min: int = 1
    max: int = 8
    target: int = 10  # jobs (waiting + running) per child
    up_cooldown: float = 15.0  # seconds after any change before the pool grows again
    down_after: float = 120.0  # seconds: shrink to the highest recommendation in this window
    max_step: int = 4  # children added or retired per decision, at most


@dataclass(frozen=True)
class FindingsConfig:
    """Grace periods and thresholds of the health findings (the top-level `findings:`
    block)."""

    registration_grace: float = 30.0
    no_workers_probes: int = 2
    backlog_probes: int = 5
    restart_hold: float = 600.0


@dataclass(frozen=True)
class MetricsConfig:
    """The Prometheus endpoint (the `metrics:` block; metrics are off without it)."""

    listen: Server
    buckets: tuple[float, ...]  # the default histogram bounds, seconds


@dataclass(frozen=True)
class RuleConfig:
    """One built-in alert rule with the config's overrides applied (`alerts.rules.NAME`)."""

    name: str  # the alertname
    enabled: bool
    severity: str  # info | warning | critical
    for_: float  # seconds the condition must hold before the alert fires
    keep_firing_for: float  # seconds it keeps firing after the condition ends
    params: dict  # the rule's thresholds by name ("count", "window", ...)


@dataclass(frozen=True)
class Escalation:
    """One step of a route's escalation: after this long firing unacked, notify these."""

    after: float
    notify: tuple[str, ...]


@dataclass(frozen=True)
class AlertRoute:
    """One `alerts.routes` entry: alerts whose labels match are notified on `notify`."""

    match: dict[str, str]
    notify: tuple[str, ...]
    escalate: tuple[Escalation, ...] = ()
    continue_: bool = False  # also try the routes after this one
    group_by: tuple[str, ...] | None = None  # None: alerts.group_by


@dataclass(frozen=True)
class AlertsConfig:
    """The `alerts:` block: rules, grouping, routes and channels."""

    enabled: bool = True
    rules: dict[str, RuleConfig] = field(default_factory=dict)  # every built-in rule
    group_by: tuple[str, ...] = ("alertname", "pool")
    group_wait: float = 30.0
    group_interval: float = 300.0
    repeat_interval: float = 4 * 3600.0
    sample_interval: float = 10.0  # seconds between job-count and fd samples
    routes: tuple[AlertRoute, ...] = ()
    channels: dict[str, object] = field(default_factory=dict)  # name -> channels.ChannelConfig


# The failures a retry may be for (journal/record.py FAILURES, in a fixed order; a test
# keeps the two equal: this module imports nothing of the package).
RETRY_OUTCOMES = ("error", "timeout", "killed", "crash", "poison")


@dataclass(frozen=True)
class RetryConfig:
    """A function's `retry:`: how often and when a failed job is submitted again
    (policy/retry.py decides from it)."""

    max_attempts: int = 5  # attempts in all, the first run included
    initial: float = 10.0  # seconds: the first retry's delay, at most (full jitter)
    max: float = 1800.0  # seconds: no delay is longer
    multiplier: float = 2.0  # delay growth per attempt
    outcomes: tuple[str, ...] = RETRY_OUTCOMES  # which failures are retried


@dataclass(frozen=True)
class JournalConfig:
    """The top-level `journal:` block, resolved: what the child records and what the store
    helper is given (the store's URL with `sqlite` made a path in state_dir)."""

    enabled: bool = True
    url: str = "sqlite:///var/lib/gearvisor/journal.sqlite3"  # sqlite:///path | postgresql://
    state_dir: str = "/var/lib/gearvisor"
    max_entries: int = 1_000_000  # outcome rows kept, oldest out first
    max_bytes: int = 512 * 1024 * 1024  # payload + text bytes kept
    ttl: float = 14 * 86400.0  # seconds a row is kept
    payload_cap: int = 64 * 1024  # bytes of a failed job's payload kept
    successes: bool = False  # record every successful outcome (those ending a failure: always)

    @property
    def sqlite_path(self) -> str | None:
        """The SQLite database's path, or None for a PostgreSQL store."""
        return self.url[len("sqlite://"):] if self.url.startswith("sqlite://") else None


@dataclass(frozen=True)
class PoolConfig:
    """Everything one pool needs, with the top-level defaults already applied."""

    name: str
    processes: int
    functions: dict[str, str]
    servers: tuple[Server, ...]
    graceful_timeout: float
    connect_timeout: float
    reconnect_max_delay: float
    backoff: BackoffConfig
    keepalive: KeepaliveConfig
    env: dict[str, str]
    cwd: str
    user: str | None
    group: str | None
    rlimit_nofile: int | None
    client_id_prefix: str
    exception_packet: str
    log_level: str
    log_format: str
    max_surge: int | str = "25%"
    timeouts: dict[str, float] = field(default_factory=dict)  # function -> seconds
    timeout_grace: float = 5.0
    # function -> its job duration histogram's bounds (seconds): its own `buckets`, or
    # metrics.buckets
    buckets: dict[str, tuple[float, ...]] = field(default_factory=dict)
    quarantine: QuarantineConfig = field(default_factory=lambda: QuarantineConfig())
    circuit: CircuitConfig = field(default_factory=lambda: CircuitConfig())
    poison_after: int = 2
    prefetch: int = 1
    hold_next: bool = True  # lanes: a second connection per server holds the next job
    wake_one: bool = True  # one idle child sleeps on the servers, the rest on the bell
    max_job_size: int = 64 * 1024 * 1024
    max_jobs: int | None = None
    max_memory: int | None = None
    max_lifetime: float | None = None
    recycle_jitter: float = 0.1
    command: tuple[str, ...] | None = None  # an external worker's argv (a command pool)
    stop_signal: str = "SIGTERM"
    reload_signal: str | None = None
    startsecs: float = 1.0
    ready: str = "started"
    max_restarts: int | None = None
    umask: int | None = None
    rlimits: dict[str, int] = field(default_factory=dict)
    log_file: str | None = None
    log_file_max: int = 10 * 1024 * 1024
    log_file_backups: int = 3
    output_rate: int = 1000
    kill_group: bool = True  # signal and clean up the child's whole process group
    # None: the files the children report importing (a command pool: its script's dir);
    # (): not watched
    watch: tuple[str, ...] | None = None
    retry: dict[str, RetryConfig] = field(default_factory=dict)  # function -> its `retry:`
    # function -> store | hash | drop (every function of a Python pool is listed)
    failed_payload: dict[str, str] = field(default_factory=dict)
    autoscale: AutoscaleConfig | None = None  # None: `processes` children, unless scaled


@dataclass(frozen=True)
class Config:
    """A whole validated config file."""

    path: str
    pythonpath: tuple[str, ...]
    pools: dict[str, PoolConfig]
    log_level: str
    log_format: str
    graceful_timeout: float
    control_socket: str | None = None
    state_dir: str = "/var/lib/gearvisor"  # load.default_state_dir when the config names none
    watch_config: bool = True
    watch_debounce: float = 1.0
    probe_interval: float = 5.0  # seconds between probes of each job server
    findings: FindingsConfig = field(default_factory=lambda: FindingsConfig())
    metrics: MetricsConfig | None = None  # None: no metrics endpoint, no per-job counting
    alerts: AlertsConfig = field(default_factory=lambda: AlertsConfig())
    journal: JournalConfig = field(default_factory=lambda: JournalConfig())

    @property
    def directory(self) -> str:
        """The config file's directory, which relative paths in it are relative to."""
        return os.path.dirname(self.path)
