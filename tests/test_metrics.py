"""metrics/: the collector, the job totals and the restart reasons, with the master's real
pure records (policy Pool and Child, shared-memory scoreboards) and hand-made ServerViews:
no processes, no sockets."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from gearvisor.config import parse
from gearvisor.gearman.admin import FunctionStatus, WorkerInfo
from gearvisor.master.bus import ServerView
from gearvisor.metrics.collector import FINDING_KINDS, MAX_FOREIGN_FUNCTIONS, FleetCollector
from gearvisor.metrics.collector import registry as make_registry
from gearvisor.metrics.health import HealthCounters, restart_reason
from gearvisor.metrics.jobs import JobTotals
from gearvisor.policy.child import EXIT_BOOT_ERROR, Child, ChildState
from gearvisor.policy.pool import Circuit, ExitDecision, ExitKind, Pool, Spawn
from gearvisor.shm.scoreboard import Scoreboard
from gearvisor.shm.stats import ERROR, POISON, SUCCESS, TIMEOUT, JobStats

CONFIG = """\
servers: ["127.0.0.1:4730", "127.0.0.1:4731"]
client_id_prefix: web1
metrics: {listen: "127.0.0.1:9464", buckets: [0.1, 1, 10]}
pools:
  text:
    processes: 2
    functions:
      reverse: "examples.text:reverse"
      upper: {callable: "examples.text:upper", buckets: [0.5]}
  php:
    processes: 1
    command: ["php", "worker.php"]
    functions: [resize]
"""

ALLOWED_LABELS = {"pool", "function", "outcome", "state", "reason", "server", "kind", "le"}


class Fleet:
    """Pools of real records, children with real scoreboards, and the collector over them."""

    def __init__(self, tmp_path: Path, text: str = CONFIG) -> None:
        self.config = parse(text, str(tmp_path / "pools.yaml"))
        self.pools = {n: Pool(pc) for n, pc in self.config.pools.items()}
        self.totals = JobTotals()
        self.health = HealthCounters()
        self.views: dict[tuple[str, int], ServerView] | None = None
        self.active: dict[str, int] = {}
        self.boards: list[Scoreboard] = []
        self.collector = FleetCollector(lambda: self.pools, self.totals, self.health,
                                        lambda: self.views, lambda: self.active)
        self.registry = make_registry(self.collector)
        self.pid = 100

    def spawn(self, pool_name: str, ready: bool = True) -> Child:
        """Fill the next empty slot of the pool with a child (as the arbiter would)."""
        pool = self.pools[pool_name]
        action = next(a for a in pool.plan(0.0) if isinstance(a, Spawn))
        self.pid += 1
        child = Child(pool=pool_name, slot=action.slot.index, generation=pool.generation,
                      started_at=0.0, pid=self.pid)
        if pool.config.command is None:
            child.scoreboard = Scoreboard(JobStats(pool.config.buckets))
            self.boards.append(child.scoreboard)
        pool.placed(action, child)
        if ready:
            child.transition(ChildState.READY)
            pool.child_ready(child)
        return child

    def reap(self, child: Child, code: int = 1) -> None:
        """The child died: fold its numbers, as the metrics component does."""
        pool = self.pools[child.pool]
        child.transition(ChildState.EXITED)
        pool.child_exited(child, code, 1.0, stopping=False)
        assert child.scoreboard is not None and child.scoreboard.stats is not None
        self.totals.fold(child.pool, child.scoreboard.stats.read(), pool.config.buckets)

    def scrape(self) -> dict[tuple[str, frozenset], float]:
        text = generate_latest(self.registry).decode()
        out = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                out[(s.name, frozenset(s.labels.items()))] = s.value
        return out

    def close(self) -> None:
        for b in self.boards:
            b.close()


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    f = Fleet(tmp_path)
    try:
        yield f
    finally:
        f.close()


def value(got: Mapping[tuple[str, frozenset], float], name: str, **labels: Any) -> float:
    return got[(name, frozenset(labels.items()))]


def series(got: Mapping[tuple[str, frozenset], float], name: str) -> dict[frozenset, float]:
    return {labels: v for (n, labels), v in got.items() if n == name}


def jobs(got: Mapping, function: str, pool: str = "text") -> dict[str, float]:
    return {dict(labels)["outcome"]: v for labels, v in series(got, "gearvisor_jobs_total").items()
            if dict(labels)["function"] == function and dict(labels)["pool"] == pool}


# -- jobs ---------------------------------------------------------------------------------------

def test_every_outcome_of_every_function_is_shown_from_zero(fleet: Fleet) -> None:
    got = fleet.scrape()
    for function in ("reverse", "upper"):
        assert jobs(got, function) == {o: 0 for o in
                                       ("success", "error", "timeout", "poison", "crash")}
    assert not [k for k in series(got, "gearvisor_jobs_total") if dict(k)["pool"] == "php"]


def test_live_children_and_dead_ones_add_up_and_never_go_back(fleet: Fleet) -> None:
    a, b = fleet.spawn("text"), fleet.spawn("text")
    for _ in range(3):
        a.scoreboard.stats.job_done("reverse", SUCCESS, 0.05)
    a.scoreboard.stats.job_done("reverse", ERROR, 5.0)
    a.scoreboard.stats.job_done("reverse", TIMEOUT, 50.0)
    b.scoreboard.stats.job_done("reverse", SUCCESS, 0.5)
    b.scoreboard.stats.job_not_run("reverse", POISON)
    before = fleet.scrape()
    assert jobs(before, "reverse") == {"success": 4, "error": 1, "timeout": 1, "poison": 1,
                                       "crash": 0}
    fleet.reap(a)  # a's numbers move from its shared memory into the master's totals
    fleet.totals.count("text", "reverse", "crash", (0.1, 1.0, 10.0))
    after = fleet.scrape()
    assert jobs(after, "reverse") == {**jobs(before, "reverse"), "crash": 1}
    h = "gearvisor_job_duration_seconds"
    assert value(after, h + "_bucket", pool="text", function="reverse", le="0.1") == 3
    assert value(after, h + "_bucket", pool="text", function="reverse", le="1.0") == 4
    assert value(after, h + "_bucket", pool="text", function="reverse", le="10.0") == 5
    assert value(after, h + "_bucket", pool="text", function="reverse", le="+Inf") == 6
    assert value(after, h + "_count", pool="text", function="reverse") == 6
    assert value(after, h + "_sum", pool="text", function="reverse") == pytest.approx(55.65)
    # per-function buckets
    assert value(after, h + "_bucket", pool="text", function="upper", le="0.5") == 0


def test_a_reload_that_changes_buckets_restarts_that_histogram_only(tmp_path: Path) -> None:
    fleet = Fleet(tmp_path)
    try:
        child = fleet.spawn("text")
        child.scoreboard.stats.job_done("reverse", SUCCESS, 0.05)
        child.scoreboard.stats.job_done("upper", SUCCESS, 0.05)
        new = parse(CONFIG.replace("[0.1, 1, 10]", "[2, 20]"), str(tmp_path / "pools.yaml"))
        fleet.pools["text"].roll(new.pools["text"])
        got = fleet.scrape()  # the old child still runs with the old bounds
        assert jobs(got, "reverse")["success"] == 1
        h = "gearvisor_job_duration_seconds"
        assert value(got, h + "_count", pool="text", function="reverse") == 0
        assert value(got, h + "_bucket", pool="text", function="reverse", le="2.0") == 0
        assert value(got, h + "_count", pool="text", function="upper") == 1  # unchanged
        fleet.reap(child)
        got = fleet.scrape()
        assert jobs(got, "reverse")["success"] == 1
        assert value(got, h + "_count", pool="text", function="upper") == 1
    finally:
        fleet.close()


def test_jobs_in_progress_counts_busy_children_by_function(fleet: Fleet) -> None:
    a, b = fleet.spawn("text"), fleet.spawn("text")
    a.scoreboard.job_started("reverse", "H:1", "u1", 1.0)
    b.scoreboard.job_started("not-ours", "H:2", "u2", 1.0)  # a hostile server's job
    got = fleet.scrape()
    assert value(got, "gearvisor_jobs_in_progress", pool="text", function="reverse") == 1
    assert value(got, "gearvisor_jobs_in_progress", pool="text", function="upper") == 0
    assert not [k for k in series(got, "gearvisor_jobs_in_progress")
                if dict(k)["function"] == "not-ours"]


# -- children, pools, health --------------------------------------------------------------------

def test_children_by_state_desired_restarts_quarantines_circuit(fleet: Fleet) -> None:
    fleet.spawn("text")
    fleet.spawn("text", ready=False)
    fleet.spawn("php")
    fleet.pools["php"].retiring(fleet.pools["php"].slots[0].child)
    fleet.pools["php"].retired[0].transition(ChildState.DRAINING)
    fleet.health.restarted("text", "crash")
    fleet.health.restarted("text", "crash")
    fleet.health.restarted("php", "boot_error")
    fleet.health.quarantined("text")
    fleet.health.held_returned.update(("text", "text"))
    fleet.pools["text"].circuit = Circuit.PROBING
    got = fleet.scrape()
    assert {dict(k)["state"]: v for k, v in series(got, "gearvisor_children").items()
            if dict(k)["pool"] == "text"} == {"starting": 1, "ready": 1, "draining": 0}
    assert value(got, "gearvisor_children", pool="php", state="draining") == 1
    assert value(got, "gearvisor_pool_desired_children", pool="text") == 2
    assert value(got, "gearvisor_child_restarts_total", pool="text", reason="crash") == 2
    assert value(got, "gearvisor_child_restarts_total", pool="text", reason="recycle") == 0
    assert value(got, "gearvisor_child_restarts_total", pool="php", reason="boot_error") == 1
    assert value(got, "gearvisor_quarantines_total", pool="text") == 1
    assert value(got, "gearvisor_quarantines_total", pool="php") == 0
    assert value(got, "gearvisor_held_jobs_returned_total", pool="text") == 2
    assert value(got, "gearvisor_held_jobs_returned_total", pool="php") == 0
    assert value(got, "gearvisor_circuit_open", pool="text") == 1
    assert value(got, "gearvisor_circuit_open", pool="php") == 0


def decision(kind: ExitKind) -> ExitDecision:
    return ExitDecision(kind, 0.1, True, 1)


@pytest.mark.parametrize(("kind", "code", "killed_for", "recycled", "stopping", "boot", "want"), [
    (ExitKind.CRASHED, 1, None, False, False, None, "crash"),
    (ExitKind.CRASHED, None, None, False, False, None, "crash"),  # a signal
    (ExitKind.CRASHED, 0, None, False, False, None, "exit"),
    (ExitKind.BOOT_ERROR, EXIT_BOOT_ERROR, None, False, False, "no module", "boot_error"),
    (ExitKind.ROLL_FAILED, EXIT_BOOT_ERROR, None, False, False, "no module", "boot_error"),
    (ExitKind.ROLL_FAILED, 1, None, False, False, None, "crash"),
    (ExitKind.CRASHED, None, "timeout", False, False, None, "timeout"),
    (ExitKind.STOPPED, 0, None, True, False, None, "recycle"),
    (ExitKind.STOPPED, 0, None, False, False, None, None),  # a roll, a scale-down
    (ExitKind.CRASHED, 1, None, False, True, None, None),  # the master is stopping
])
def test_restart_reason(kind: ExitKind, code: int | None, killed_for: str | None,
                        recycled: bool, stopping: bool, boot: str | None,
                        want: str | None) -> None:
    child = Child(pool="p", slot=0, generation=1, started_at=0.0, pid=7,
                  killed_for=killed_for, boot_error=boot)
    assert restart_reason(child, decision(kind), code, recycled, stopping) == want


# -- the job servers ----------------------------------------------------------------------------

def view(port: int, **kw: Any) -> ServerView:
    return ServerView(("127.0.0.1", port), answered=True, checked_at=5.0, answered_at=5.0,
                      **kw)


def test_gearmand_series_from_the_probe_views(fleet: Fleet) -> None:
    fleet.views = {
        ("127.0.0.1", 4730): view(4730, pid=11, restarts=2, functions={
            "reverse": FunctionStatus("reverse", 7, 2, 3),
            "idle-foreign": FunctionStatus("idle-foreign", 0, 0, 0),  # 0/0/0, not ours
            "busy-foreign": FunctionStatus("busy-foreign", 4, 0, 0)},
            workers=(WorkerInfo(30, "127.0.0.1", "web1:text:0", ("reverse", "upper")),
                     WorkerInfo(31, "127.0.0.1", "web1:text:1", ("reverse",)),
                     # slot 1's second connection (hold_next): the same child
                     WorkerInfo(35, "127.0.0.1", "web1:text:1", ("reverse",)),
                     WorkerInfo(32, "127.0.0.1", "web1:textual:0", ("reverse",)),
                     WorkerInfo(33, "10.0.0.9", "other-host:text:0", ("reverse",)),
                     WorkerInfo(34, "127.0.0.1", "-", ()))),
        ("127.0.0.1", 4731): ServerView(("127.0.0.1", 4731), up=False, failures=3,
                                        answered_at=1.0, functions={
                                            "reverse": FunctionStatus("reverse", 1, 0, 1)},
                                        workers=()),
    }
    got = fleet.scrape()
    a, b = "127.0.0.1:4730", "127.0.0.1:4731"
    assert value(got, "gearvisor_gearmand_up", server=a) == 1
    assert value(got, "gearvisor_gearmand_up", server=b) == 0
    assert value(got, "gearvisor_gearmand_restarts_total", server=a) == 2
    assert value(got, "gearvisor_gearmand_jobs_waiting", server=a, function="reverse") == 5
    assert value(got, "gearvisor_gearmand_jobs_running", server=a, function="reverse") == 2
    assert value(got, "gearvisor_gearmand_workers", server=a, function="reverse") == 3
    # ours, not listed by the server: 0 (what a no-workers alert looks for)
    assert value(got, "gearvisor_gearmand_workers", server=a, function="resize") == 0
    assert value(got, "gearvisor_gearmand_jobs_waiting", server=a, function="busy-foreign") == 4
    waiting = series(got, "gearvisor_gearmand_jobs_waiting")
    assert not [k for k in waiting if dict(k)["function"] == "idle-foreign"]
    assert not [k for k in waiting if dict(k)["server"] == b]  # down: nothing still true
    assert value(got, "gearvisor_registered_workers", pool="text", server=a) == 2
    assert value(got, "gearvisor_registered_workers", pool="php", server=a) == 0
    assert not [k for k in series(got, "gearvisor_registered_workers")
                if dict(k)["server"] == b]


def test_no_probe_cache_means_no_gearmand_series_yet(fleet: Fleet) -> None:
    fleet.views = None
    got = fleet.scrape()
    assert not series(got, "gearvisor_gearmand_up")
    assert not [n for n, _ in got if n.startswith("gearvisor_gearmand")]


def test_foreign_functions_are_capped_per_server(fleet: Fleet) -> None:
    many = {f"f{i:05}": FunctionStatus(f"f{i:05}", 1, 0, 0)
            for i in range(MAX_FOREIGN_FUNCTIONS + 50)}
    fleet.views = {("127.0.0.1", 4730): view(4730, functions=many, workers=())}
    got = fleet.scrape()
    # the cap, plus our own functions on that server (reverse, upper, resize)
    assert len(series(got, "gearvisor_gearmand_jobs_waiting")) == MAX_FOREIGN_FUNCTIONS + 3


def test_findings_by_kind_every_kind_shown(fleet: Fleet) -> None:
    fleet.active = {"server_down": 2, "something_new": 1}
    got = fleet.scrape()
    assert value(got, "gearvisor_findings", kind="server_down") == 2
    assert value(got, "gearvisor_findings", kind="something_new") == 1
    assert all(("gearvisor_findings", frozenset({("kind", k)})) in got for k in FINDING_KINDS)


def test_labels_are_bounded_and_process_series_are_there(fleet: Fleet) -> None:
    fleet.spawn("text")
    fleet.views = {("127.0.0.1", 4730): view(4730, functions={}, workers=())}
    got = fleet.scrape()
    for name, labels in got:
        assert {k for k, _ in labels} <= ALLOWED_LABELS, (name, labels)
        assert not any(str(fleet.pid) == v for _, v in labels)
    assert ("process_resident_memory_bytes", frozenset()) in got


def test_the_collector_exports_exactly_the_series_the_rules_and_dashboard_use(
        fleet: Fleet) -> None:
    """conf/prometheus/rules.yml and the dashboard are checked against the interface written
    down in tests/test_prometheus_rules.py; this holds that list to what is really exported,
    so a series renamed here fails one of the two tests."""
    from test_prometheus_rules import COUNTERS_AND_GAUGES, HISTOGRAMS

    fleet.spawn("text")
    fleet.health.notified("hook", "delivered")
    fleet.views = {("127.0.0.1", 4730): view(4730, pid=11, functions={
        "reverse": FunctionStatus("reverse", 1, 0, 1)}, workers=())}
    exported: dict[str, set[str]] = {}
    for (name, labels), _ in fleet.scrape().items():
        if not name.startswith("gearvisor_"):
            continue
        base = name
        for suffix in ("_bucket", "_sum", "_count", "_created"):
            if name.endswith(suffix) and name[: -len(suffix)] in HISTOGRAMS:
                base = name[: -len(suffix)]
        exported.setdefault(base, set()).update(k for k, _ in labels if k != "le")
    assert exported == {**COUNTERS_AND_GAUGES, **HISTOGRAMS}


def test_journal_series_from_the_store_helpers_reports(fleet: Fleet) -> None:
    assert ("gearvisor_store_up", frozenset()) not in fleet.scrape()  # no report yet
    fleet.health.journal(False, {"send_mail": 3}, (("mail", "send_mail", 2),))
    fleet.health.journal(True, {"send_mail": 4, "resize": 1}, (("mail", "send_mail", 5),))
    got = fleet.scrape()
    assert value(got, "gearvisor_store_up") == 1
    assert value(got, "gearvisor_dead_letters", function="send_mail") == 4
    assert value(got, "gearvisor_dead_letters", function="resize") == 1
    assert value(got, "gearvisor_retries_total", pool="mail", function="send_mail") == 7
    fleet.health.journal_buffered(12, 3)
    got = fleet.scrape()
    assert value(got, "gearvisor_journal_waiting_lines") == 12
    assert value(got, "gearvisor_journal_dropped_lines_total") == 3
    fleet.health.journal(False, {}, ())
    got = fleet.scrape()
    assert value(got, "gearvisor_store_up") == 0
    assert ("gearvisor_dead_letters", frozenset({("function", "resize")})) not in got
