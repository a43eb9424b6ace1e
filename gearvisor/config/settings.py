"""Every setting, declared once: key, parser (type and validator), default, doc, scope.

That one declaration drives validation, defaults, per-pool overrides (gearvisor.config.load)
and the reference table in README.md (gearvisor.config.reference, `python -m
gearvisor.config --markdown`), so the docs cannot drift from the code. A new pool setting is
one Setting(...) here and one field of PoolConfig (gearvisor.config.model), or of its block's
dataclass; a global one is also passed to Config in gearvisor.config.load.parse().

Scopes:
  global    only at the top level (servers list aside, these are fleet-wide)
  pool      only inside a pool
  both      a fleet-wide default at the top level, overridable in each pool
  function  inside one function's mapping (`functions: {NAME: {callable: ..., KEY: ...}}`);
            FUNCTION_KEYS hands their parsers to the `functions` parser
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from gearvisor.config.alerts import GROUP_WAIT_MAX, alert_rules, channels, label_names, routes
from gearvisor.config.values import (
    DAY,
    DEFAULT_BUCKETS,
    HOUR,
    MAX_PROCESSES,
    TIMEOUT_MAX,
    boolean,
    buckets,
    choice,
    command,
    duration_between,
    duration_days,
    duration_upto,
    env_map,
    float_range,
    functions,
    group,
    int_range,
    listen_address,
    optional,
    retry,
    rlimits,
    servers,
    signal_name,
    size,
    size_upto,
    store_url,
    string_list,
    surge,
    text,
    token,
    umask,
    user,
    watch_list,
)


@dataclass(frozen=True)
class Setting:
    """One config key: how its raw YAML value is parsed, its default, its README line."""

    key: str  # dotted for nested blocks: "backoff.initial"
    parse: Callable[[Any], Any]
    default: Any
    doc: str
    scope: str = "both"  # "global" | "pool" | "both" | "function"
    shown_default: str | None = None  # for docs, when the default is computed

    @property
    def block(self) -> str | None:
        """The nested block the key is in ("backoff" for "backoff.initial"), or None."""
        return self.key.split(".", 1)[0] if "." in self.key else None


# A journal record carries at most this much payload, so one record (base64 is 4/3 of it,
# plus its error text and traceback) always fits in one journal line (record.MAX_LINE).
PAYLOAD_CAP_MAX = 512 * 1024

# The keys of one function's mapping besides callable, timeout and buckets (those three are
# the `functions` parser's own): declared here for the reference table, parsed by it.
_FUNCTION_SETTINGS: tuple[Setting, ...] = (
    Setting("retry", optional(retry), None,
            "Retry this function's failed jobs (opt-in: a worker cannot tell a background "
            "job from a foreground one): `{max_attempts: 5, backoff: {initial: 10s, max: 30m, "
            "multiplier: 2}, outcomes: [error, timeout, killed, crash, poison]}` (those are "
            "the defaults of each key; max_attempts counts the first run, from 1 to 1000). "
            "A due retry is submitted as a background job with full jitter; after the last "
            "attempt the job is a dead letter. Without `retry:` every failure is a dead "
            "letter at once.", scope="function", shown_default="no retries"),
    Setting("failed_payload", choice("store", "hash", "drop"), "store",
            "What the journal keeps of a failed job's payload: `store` (its first "
            "`journal.payload_cap` bytes, replayable when whole), `hash` (its sha256 and "
            "size only: personal data), `drop` (its size only).", scope="function"),
)
FUNCTION_KEYS = {s.key: s.parse for s in _FUNCTION_SETTINGS}


def _functions(value: Any) -> Any:
    return functions(value, FUNCTION_KEYS)


SETTINGS: tuple[Setting, ...] = (
    Setting("servers", servers, ("127.0.0.1:4730",),
            'Job servers, "host:port" (IPv6 as "[::1]:4730"). Every child connects to all '
            "of them."),
    Setting("pythonpath", string_list, (),
            "Extra import paths, relative to the config file. The config's own directory is "
            "always on it.", scope="global"),
    Setting("control_socket", optional(text), None,
            "Unix socket of `gearvisor reload/status/stop/restart/scale` (mode 0600).",
            scope="global", shown_default="`/run/gearvisor/gearvisor.sock` as root, else "
            "`$XDG_RUNTIME_DIR/gearvisor.sock`, else `/tmp/gearvisor-$UID/gearvisor.sock`"),
    Setting("state_dir", optional(text), None,
            "Where the master keeps what must survive a restart (firing alerts, "
            "notification times, silences, acks), relative to the config file. systemd's "
            "`StateDirectory=gearvisor` fits the default.", scope="global",
            shown_default="`/var/lib/gearvisor` as root, else "
            "`$XDG_STATE_HOME/gearvisor` (`~/.local/state/gearvisor`)"),
    Setting("watch_config", boolean, True,
            "Reload when the config file changes (as `gearvisor reload` does).",
            scope="global"),
    Setting("watch_debounce", duration_upto(HOUR), 1.0,
            "Quiet period after the last file change before anything rolls, so a deploy "
            "that touches many files causes one roll.", scope="global"),
    Setting("metrics.listen", optional(listen_address), None,
            'Serve Prometheus metrics, /healthz and /readyz over HTTP on this "host:port" '
            '(e.g. "127.0.0.1:9464"), from the master\'s own loop. Off when absent; see '
            "Metrics.", scope="global", shown_default="off"),
    Setting("metrics.buckets", buckets, DEFAULT_BUCKETS,
            "Bounds (seconds) of the job duration histogram, for every function that does "
            "not set its own `buckets`.", scope="global",
            shown_default="5ms .. 1h (`[0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, "
                          "10, 30, 60, 120, 300, 600, 1800, 3600]`)"),
    Setting("processes", int_range(0, MAX_PROCESSES), 1, "How many children the pool runs.",
            scope="pool"),
    Setting("functions", _functions, None,
            'Gearman function name -> Python callable "module:attr", or a mapping '
            '`{callable: "module:attr", timeout: 60s, buckets: [0.1, 1, 10]}` (`buckets`: '
            "that function's own histogram bounds), which may also hold the function keys "
            "below (`retry`, `failed_payload`). Required. A `command:` pool lists the names "
            "its command registers, or maps them to `{timeout: 30s, failed_payload: hash}` "
            "(and `retry`) or to nothing.", scope="pool"),
    *_FUNCTION_SETTINGS,
    Setting("watch", watch_list, None,
            "Files whose change rolls the pool: paths or globs (`**` spans directories), "
            "relative to the config file; a directory means everything under it. A Python "
            "pool watches these besides the files its code imported; a command pool watches "
            "these instead of its script's directory. `false` turns watching off.",
            shown_default="the files the pool's code imported (outside the stdlib and "
                          "site-packages); a command pool: its script's directory"),
    Setting("command", command, None,
            "Run an external worker (PHP, Perl, any language) instead of Python functions: "
            "an argv list, no shell (a string is split with shlex).", scope="pool",
            shown_default="none (a Python pool)"),
    Setting("stop_signal", signal_name, "SIGTERM",
            "Command pools: the signal that stops a child; SIGKILL after graceful_timeout."),
    Setting("reload_signal", optional(signal_name), None,
            "Command pools: the signal that retires a child in a graceful roll. A child "
            "always gets the signals of the config it started with: a reload that changes "
            "them (or makes the pool run Python code) applies to the children it starts.",
            shown_default="stop_signal"),
    Setting("startsecs", duration_upto(HOUR), 1.0,
            "Command pools: a child that exits sooner failed to start; one that lives this "
            "long is ready (unless `ready: registered`)."),
    Setting("ready", choice("started", "registered"), "started",
            "Command pools: `registered` waits until gearmand's `workers` list shows the "
            "pool's `functions` from the child's client id ($GEARVISOR_CLIENT_ID)."),
    Setting("max_restarts", optional(int_range(0, 1_000_000)), None,
            "Give a slot up after this many consecutive failed starts or crashes (status "
            "shows `fatal`; `gearvisor restart` tries again).", shown_default="never"),
    Setting("umask", optional(umask), None, "The children's umask, octal.",
            shown_default="inherited"),
    Setting("rlimits", rlimits, {},
            "Soft resource limits for each child by name, e.g. `{nofile: 4096, core: 0}`."),
    Setting("log_file", optional(text), None,
            "Command pools: write the children's stdout/stderr lines to this file (rotated "
            "by size) instead of gearvisor's log; relative to the config file.",
            shown_default="gearvisor's log"),
    Setting("log_file_max", size, 10 * 1024 * 1024, "Rotate `log_file` at this size."),
    Setting("log_file_backups", int_range(0, 100), 3, "Rotated `log_file`s kept."),
    Setting("output_rate", int_range(1, 1_000_000), 1000,
            "Command pools: output lines per second a pool may log; more are dropped and "
            "counted, so a chatty worker never stalls the master or itself."),
    Setting("graceful_timeout", duration_upto(TIMEOUT_MAX), 30.0,
            "How long a child told to stop may finish its current job before SIGKILL."),
    Setting("kill_group", boolean, True,
            "Each child runs in its own process group. The stop signal goes to the child; "
            "SIGKILL goes to its whole group; what is left of the group when the child "
            "exits gets SIGTERM, then SIGKILL after graceful_timeout. `false` leaves "
            "descendants alone (workers that daemonize on purpose)."),
    Setting("timeout_grace", duration_upto(HOUR), 5.0,
            "A job past its function's `timeout` gets an exception (soft); this much later "
            "the master kills the child (hard), which counts toward `poison_after`. A "
            "command pool's job gets only the kill."),
    Setting("quarantine.enabled", boolean, True,
            "A child that fails fast, job after job, stops taking jobs (self-quarantine)."),
    Setting("quarantine.window", int_range(1, 10000), 20,
            "How many of a child's latest jobs its failure ratio is taken over."),
    Setting("quarantine.min_jobs", int_range(1, 10000), 5,
            "Jobs in the window before a child may quarantine itself."),
    Setting("quarantine.ratio", float_range(0.0, 1.0), 0.8,
            "Share of fast failures in the window that quarantines the child."),
    Setting("quarantine.fast", duration_upto(HOUR), 1.0,
            "A failure quicker than this counts as fast (a broken worker, not a hard job)."),
    Setting("quarantine.cooldown", duration_upto(DAY), 5.0,
            "How long a quarantined child waits before a fresh child replaces it; doubles "
            "on each repeat, up to `quarantine.cooldown_max`."),
    Setting("quarantine.cooldown_max", duration_upto(7 * DAY), 300.0,
            "Longest quarantine cooldown."),
    Setting("quarantine.probation_jobs", int_range(1, 10000), 3,
            "A replacement starts on probation: its first fast failure quarantines it "
            "again, and this many successes end the probation."),
    Setting("circuit.ratio", float_range(0.0, 1.0), 0.6,
            "When this share of a pool's children is quarantined, the pool stops consuming "
            "(jobs stay queued in gearmand) and probes with one child after a cooldown."),
    Setting("circuit.cooldown", duration_upto(DAY), 10.0,
            "Wait before the first probe of an open circuit; doubles on each failed probe."),
    Setting("circuit.cooldown_max", duration_upto(7 * DAY), 300.0, "Longest wait between probes."),
    Setting("poison_after", int_range(0, 1000), 2,
            "A job that crashed or hung this many children is failed without running when "
            "it comes back (0: never)."),
    Setting("prefetch", int_range(1, 64), 1,
            "Most jobs a child may hold per job server while it drains a queue of short jobs "
            "(it asks for more before it has finished the current one). Above 1 it grows only "
            "while jobs succeed in under 1 ms and drops to 1 on a slower or failed job; see "
            "Prefetch. 1: one job at a time."),
    Setting("hold_next", boolean, True,
            "With `prefetch: 1`: while a queue is busy, a child holds the next job on a "
            "second connection per job server, so it never waits for gearmand between jobs. "
            "If the job in front runs past a few ms while another child of the pool is idle, "
            "the master closes that connection and gearmand hands the held job to the idle "
            "child (see Holding the next job). false: one connection per server."),
    Setting("wake_one", boolean, True,
            "Of a pool's idle children only one sleeps on the job servers; the others wait "
            "for it to hand over when a job comes, so gearmand wakes one child per job, not "
            "every idle one (see One sleeper per pool). false: every idle child sleeps on "
            "the servers, and gearmand wakes them all for each job."),
    Setting("max_job_size", size, 64 * 1024 * 1024,
            "Largest job payload a child accepts (e.g. 16M). A bigger job is failed without "
            "being read (the client gets WORK_FAIL and a warning saying why; the log names "
            "it), so no job server can make a child allocate more. A job costs a child about "
            "its size once.", shown_default="`64M`"),
    Setting("max_jobs", optional(int_range(1, 10**12)), None,
            "Recycle a child after this many jobs (+/- `recycle_jitter`).",
            shown_default="no limit"),
    Setting("max_memory", optional(size), None,
            "Recycle a child whose RSS exceeds this, checked between jobs (e.g. 512M).",
            shown_default="no limit"),
    Setting("max_lifetime", optional(duration_upto(30 * DAY)), None,
            "Recycle a child after it has run this long (+/- `recycle_jitter`).",
            shown_default="no limit"),
    Setting("recycle_jitter", float_range(0.0, 0.5), 0.1,
            "Spread of `max_jobs` and `max_lifetime` per child, as a fraction."),
    Setting("max_surge", surge, "25%",
            "During a roll, how many new children may start beside the old ones at once: a "
            'number or a percentage of `processes` (at least 1).'),
    Setting("connect_timeout", duration_upto(HOUR), 5.0, "TCP connect timeout to a job server."),
    Setting("reconnect_max_delay", duration_upto(HOUR), 2.0,
            "Longest wait between reconnect attempts to a job server that went away."),
    Setting("autoscale.min", int_range(0, MAX_PROCESSES), 1,
            "Autoscaling on queue depth (on when the pool has an `autoscale:` block): the "
            "fewest children. `processes` is the start size, clamped to [min, max]; see "
            "Autoscaling.", scope="pool"),
    Setting("autoscale.max", int_range(0, MAX_PROCESSES), 8,
            "Autoscaling: the most children (>= `autoscale.min`).", scope="pool"),
    Setting("autoscale.target", int_range(1, 10**9), 10,
            "Autoscaling: jobs (waiting + running, over the pool's functions and servers) "
            "per child: desired = ceil(jobs / target), shared between the hosts that run "
            "the pool.", scope="pool"),
    Setting("autoscale.up_cooldown", duration_upto(DAY), 15.0,
            "Autoscaling: after a change, how long before the pool may grow again.",
            scope="pool"),
    Setting("autoscale.down_after", duration_upto(DAY), 120.0,
            "Autoscaling: the pool shrinks only to the highest size recommended within this "
            "window, so a dip does not flap it.", scope="pool"),
    Setting("autoscale.max_step", int_range(1, MAX_PROCESSES), 4,
            "Autoscaling: children added or retired per decision, at most.", scope="pool"),
    Setting("backoff.initial", duration_upto(HOUR), 0.1,
            "Delay before restarting a crashed child."),
    Setting("backoff.max", duration_upto(DAY), 30.0,
            "Longest delay between restarts of a crash loop."),
    Setting("backoff.multiplier", float_range(1.0, 10.0), 2.0,
            "Delay growth per consecutive crash."),
    Setting("backoff.jitter", float_range(0.0, 1.0), 0.1,
            "Random spread of each delay, as a fraction (0.1 = +/-10%)."),
    Setting("backoff.reset_after", duration_upto(DAY), 10.0,
            "A child that stays up this long resets its slot's backoff."),
    Setting("keepalive.idle", int_range(1, 32767), 30,
            "Seconds a connection is idle before TCP keepalive probes start."),
    Setting("keepalive.interval", int_range(1, 32767), 10,
            "Seconds between TCP keepalive probes."),
    Setting("keepalive.count", int_range(1, 127), 3,
            "Unanswered probes before the connection is declared dead."),
    Setting("env", env_map, {}, "Extra environment variables; a pool's env is merged over the "
            "top-level env."),
    Setting("cwd", optional(text), None,
            "Working directory of the children, relative to the config file.",
            shown_default="the config file's directory"),
    Setting("user", optional(user), None, "Run children as this user (gearvisor must be root)."),
    Setting("group", optional(group), None,
            "Run children as this group (gearvisor must be root).",
            shown_default="the user's primary group"),
    Setting("rlimit_nofile", optional(int_range(16, 2**31 - 1)), None,
            "Soft limit on open files for each child (RLIMIT_NOFILE).",
            shown_default="inherited"),
    Setting("client_id_prefix", token, None,
            "First part of each child's gearman client id `<prefix>:<pool>:<slot>`.",
            shown_default="the host name"),
    Setting("exception_packet", choice("warning", "exception"), "warning",
            "How a job that raised is reported: `warning` sends WORK_WARNING(text) + WORK_FAIL, "
            "which every client sees as a failure; `exception` sends WORK_EXCEPTION(text) + "
            "WORK_FAIL (libgearman clients such as the gearman CLI hang on it, gearmand #166)."),
    Setting("probe_interval", duration_between(0.05, HOUR), 5.0,
            "How often the master probes each job server (`version`, `getpid`, `status`, "
            "`workers` on one connection, answered within min(2s, probe_interval)); status "
            "and the health findings read the last answer. A server that fails is retried "
            "after a quarter of this, doubling up to twice it, and is down after 3 failures "
            "in a row.", scope="global"),
    Setting("findings.registration_grace", duration_upto(HOUR), 30.0,
            "`under_registered`: how long a pool may have fewer children registered on a "
            "job server than it has children serving before it is a finding.",
            scope="global"),
    Setting("findings.no_workers_probes", int_range(1, 100), 2,
            "`no_workers`: probes in a row that must show a function with jobs queued and "
            "no capable worker on a server.", scope="global"),
    Setting("findings.backlog_probes", int_range(2, 100), 5,
            "`backlog_growing`: probes in a row over which a function's waiting jobs on a "
            "server must rise each time.", scope="global"),
    Setting("findings.restart_hold", duration_upto(DAY), 600.0,
            "`server_restarted`: how long the finding stays after a job server's pid "
            "changed.", scope="global"),
    Setting("alerts.enabled", boolean, True,
            "Evaluate the built-in alert rules (listed under `alerts.rules`). `false`: no "
            "alerts at all.",
            scope="global"),
    Setting("alerts.rules", alert_rules, {},
            "Per rule overrides: `{CrashLoop: {count: 3, window: 5m, for: 0s, severity: "
            "warning, keep_firing_for: 1m, enabled: true}}`.", scope="global",
            shown_default="every rule on, with its defaults"),
    Setting("alerts.group_by", label_names, ("alertname", "pool"),
            "Labels that make alerts one group, notified together (Alertmanager's "
            '`group_by`; `["..."]`: every alert alone).', scope="global"),
    Setting("alerts.group_wait", duration_upto(GROUP_WAIT_MAX), 30.0,
            "How long a new group waits for more alerts before its first notification.",
            scope="global"),
    Setting("alerts.group_interval", duration_between(1.0, DAY), 300.0,
            "How long a group waits before notifying alerts added to it or resolved.",
            scope="global"),
    Setting("alerts.repeat_interval", duration_between(1.0, 7 * DAY), 4 * HOUR,
            "How long before a group that still fires is notified again (dedupe).",
            scope="global"),
    Setting("alerts.sample_interval", duration_between(0.1, HOUR), 10.0,
            "How often the master samples its children's job counters (`FailureRate`, "
            "`SlowJobs`) and open files (`FdLimit`, the master's and each child's).",
            scope="global"),
    Setting("alerts.routes", routes, (),
            "Ordered `[{match: {severity: critical}, notify: [ops-mail], escalate: [{after: "
            "10m, notify: [sms]}], continue: false, group_by: [...]}]`: an alert goes to the "
            "first route whose labels match (and on after `continue: true`); `escalate` "
            "notifies more channels while it fires unacknowledged.", scope="global",
            shown_default="none (alerts are listed, not sent)"),
    Setting("alerts.channels", channels, {},
            "Channel name -> `{type: email|webhook|exec|alertmanager|apprise, ...}`; routes "
            "name them.", scope="global"),
    Setting("journal.enabled", boolean, True,
            "Record every job that ended (outcome, times, a failure's error, traceback tail "
            "and payload) in the job journal: dead letters, retries, `gearvisor jobs`. "
            "`false`: no recording and no retries.", scope="global"),
    Setting("journal.store", store_url, "sqlite",
            "Where the journal is kept: `sqlite` (`journal.sqlite3` in state_dir), "
            "`sqlite:///absolute/path`, or `postgresql://user@host/db` (psycopg 3), which "
            "a fleet shares.", scope="global"),
    Setting("journal.max_entries", int_range(1, 10**10), 1_000_000,
            "Outcome rows kept; the oldest go first.", scope="global"),
    Setting("journal.max_bytes", size, 512 * 1024 * 1024,
            "Payload and error text bytes kept; the oldest rows go first.", scope="global",
            shown_default="`512M`"),
    Setting("journal.ttl", duration_days(365 * DAY), 14 * DAY,
            "Rows older than this are removed (e.g. 14d, 36h).", scope="global",
            shown_default="`14d`"),
    Setting("journal.payload_cap", size_upto(PAYLOAD_CAP_MAX), 64 * 1024,
            "Bytes of a failed job's payload kept (`failed_payload: store`); a longer one is "
            "kept cut, and cannot be replayed.", scope="global", shown_default="`64K`"),
    Setting("journal.successes", boolean, False,
            "Record every successful job too, so `gearvisor jobs` shows them. Off by "
            "default: it costs the store a row per job (see Performance). A success that "
            "ends a failure (a retry, a replay, a job that crashed a worker before) is "
            "always recorded (command pools: see Failed jobs for the two cases the master "
            "cannot see).", scope="global"),
    Setting("log_level", choice("debug", "info", "warning", "error"), "info", "Log level."),
    Setting("log_format", choice("auto", "console", "json"), "auto",
            "`console` is key=value, `json` is one JSON object per line, `auto` picks console "
            "on a terminal and json otherwise."),
)

# The shape of the file, derived from SETTINGS: what may be where.
BY_KEY = {s.key: s for s in SETTINGS}
BLOCKS = sorted({s.block for s in SETTINGS if s.block and s.scope != "function"})
TOP_KEYS = {s.key.split(".")[0] for s in SETTINGS if s.scope in ("global", "both")} | {"pools"}
POOL_KEYS = {s.key.split(".")[0] for s in SETTINGS if s.scope in ("pool", "both")}
POOL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
