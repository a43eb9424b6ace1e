"""The metrics component on the whole master with a fake OS and a fake clock
(tests/fakeos.py): which exits count as restarts and why, and the job outcomes only the
master sees (a child that dies mid-job: crash; killed for its hard timeout: timeout)."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import HOST, free_port
from fakeos import FakeMaster, signal_status
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from gearvisor.master.health import HEALTH_INTERVAL, Health
from gearvisor.master.metrics import Metrics
from gearvisor.messages import Ready, Recycle

SIGKILL = 9


@pytest.fixture
def fleet(tmp_path: Path, log: io.StringIO) -> Iterator[Any]:
    """make(**pool settings) -> (FakeMaster, its Metrics component)."""
    made: list[FakeMaster] = []

    def make(**pool: Any) -> tuple[FakeMaster, Metrics]:
        settings = {"processes": 1, "watch": False, "backoff": {"jitter": 0},
                    "functions": {"f": {"callable": "examples.text:echo", "timeout": 2.0}},
                    "timeout_grace": 1.0, **pool}
        path = tmp_path / "gearvisor.yaml"
        path.write_text(yaml.safe_dump({"watch_config": False,
                                        "metrics": {"listen": f"{HOST}:{free_port()}"},
                                        "pools": {"web": settings}}))
        metrics = Metrics(probe=None)
        m = FakeMaster(str(path), (Health(), metrics))
        made.append(m)
        return m, metrics

    try:
        yield make
    finally:
        for m in made:
            m.close()


def scrape(metrics: Metrics) -> dict[tuple[str, frozenset], float]:
    out = {}
    for family in text_string_to_metric_families(generate_latest(metrics.registry).decode()):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def restarts(metrics: Metrics) -> dict[str, float]:
    return {dict(k)["reason"]: v for (n, k), v in scrape(metrics).items()
            if n == "gearvisor_child_restarts_total" and v}


def outcomes(metrics: Metrics) -> dict[str, float]:
    return {dict(k)["outcome"]: v for (n, k), v in scrape(metrics).items()
            if n == "gearvisor_jobs_total" and v}


def start(m: FakeMaster) -> Any:
    m.step()
    child = m.system.forked[-1]
    child.say(Ready())
    m.step()
    return child


def test_a_child_dying_mid_job_counts_a_crash_and_a_crash_restart(fleet) -> None:
    m, metrics = fleet()
    child = start(m)
    record = m.arbiter.children[child.pid][0]
    record.scoreboard.stats.job_done("f", 0, 0.001)  # one job done
    record.scoreboard.job_started("f", "H:1", "u1", m.clock.now)
    child.die(signal_status(SIGKILL))  # the OOM killer, mid-job
    m.step()
    assert outcomes(metrics) == {"success": 1, "crash": 1}
    assert restarts(metrics) == {"crash": 1}


def test_an_idle_child_that_exits_0_unasked_is_an_exit_restart_and_no_job(fleet) -> None:
    m, metrics = fleet()
    child = start(m)
    child.exit(0)
    m.step()
    assert outcomes(metrics) == {}
    assert restarts(metrics) == {"exit": 1}


def test_a_hard_timeout_kill_counts_timeout_for_the_job_and_the_restart(fleet) -> None:
    m, metrics = fleet()
    child = start(m)
    record = m.arbiter.children[child.pid][0]
    began = m.clock.now
    record.scoreboard.job_started("f", "H:1", "u1", began)
    m.advance_to(began + 3.0 + HEALTH_INTERVAL)  # past timeout + grace: SIGKILL
    assert record.killed_for == "timeout"
    assert outcomes(metrics) == {"timeout": 1}
    assert restarts(metrics) == {"timeout": 1}


def test_a_recycled_child_is_a_recycle_restart_and_a_stop_is_none(fleet) -> None:
    m, metrics = fleet(max_jobs=10)
    old = start(m)
    old.say(Recycle("max_jobs: ran 10 jobs (limit 10)"))
    m.step()
    successor = m.system.forked[-1]
    assert successor is not old
    successor.say(Ready())  # the successor takes over; the old one is retired
    m.step()
    old.exit(0)
    m.step()
    assert restarts(metrics) == {"recycle": 1}
    m.arbiter.stop(fast=False, why="SIGTERM")
    successor.exit(0)
    m.step()
    assert restarts(metrics) == {"recycle": 1}


def test_a_boot_error_is_a_boot_error_restart(fleet) -> None:
    m, metrics = fleet()
    m.step()
    m.system.forked[-1].exit(3)  # EXIT_BOOT_ERROR
    m.step()
    assert restarts(metrics) == {"boot_error": 1}


def test_findings_on_the_bus_are_counted_by_kind_until_they_clear(fleet) -> None:
    from gearvisor.master import bus as ev
    from gearvisor.policy.findings import Finding, FindingKind

    m, metrics = fleet()

    def findings() -> dict[str, float]:
        return {dict(k)["kind"]: v for (n, k), v in scrape(metrics).items()
                if n == "gearvisor_findings"}

    down = Finding(FindingKind.SERVER_DOWN, "127.0.0.1:4730", message="3 probes failed")
    idle = Finding(FindingKind.NO_WORKERS, "127.0.0.1:4730", function="resize")
    m.arbiter.bus.publish(ev.FindingRaised(down))
    m.arbiter.bus.publish(ev.FindingRaised(idle))
    # The same finding with fresher numbers is the same finding: counted once.
    m.arbiter.bus.publish(ev.FindingRaised(Finding(FindingKind.SERVER_DOWN, "127.0.0.1:4730",
                                                   message="4 probes failed")))
    assert findings()["server_down"] == 1 and findings()["no_workers"] == 1
    assert findings()["backlog_growing"] == 0
    m.arbiter.bus.publish(ev.FindingCleared(down))
    assert findings()["server_down"] == 0 and findings()["no_workers"] == 1


def test_status_has_each_functions_job_counters_across_restarts(fleet) -> None:
    """`jobs` in the status (gearvisor top's jobs/s, failure % and p95): outcomes and the
    histogram per pool and function, a dead child's jobs kept, a live child's added."""
    m, metrics = fleet()
    child = start(m)
    record = m.arbiter.children[child.pid][0]
    record.scoreboard.stats.job_done("f", 0, 0.001)
    record.scoreboard.job_started("f", "H:1", "u1", m.clock.now)
    child.die(signal_status(SIGKILL))  # mid-job: a crash the master counts
    m.step()
    m.clock.now += 60  # past the restart backoff
    second = start(m)
    board = m.arbiter.children[second.pid][0].scoreboard
    board.stats.job_done("f", 0, 0.001)
    board.stats.job_done("f", 1, 0.3)  # an error
    [row] = metrics.status(m.clock.now)["jobs"]
    bounds = row.pop("bounds")
    buckets = row.pop("buckets")
    assert row == {"pool": "web", "function": "f", "outcomes": {
        "success": 2, "error": 1, "timeout": 0, "poison": 0, "crash": 1}}
    assert sum(buckets) == 3 and len(buckets) == len(bounds) + 1
    assert buckets[0] == 2  # the two 1 ms jobs in the first bucket
    assert m.arbiter.status(m.clock.now)["jobs"] == [{**row, "bounds": bounds,
                                                      "buckets": buckets}]
