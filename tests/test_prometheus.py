"""A real Prometheus (Debian's `prometheus`) scrapes a real master: what its HTTP API
answers for gearvisor_jobs_total equals the jobs that ran, split by outcome."""

from __future__ import annotations

import json
import shutil
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import HOST, free_port, wait_for, wait_value, write_module
from test_metrics_http import JOBS, fleet_config, get, run_jobs

pytestmark = pytest.mark.integration

PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"


class Prometheus:
    """One Prometheus on a free loopback port with its own config and storage in `tmp`,
    scraping `target` ("host:port") every second."""

    def __init__(self, tmp: Path, target: str) -> None:
        self.port = free_port()
        self.dir = tmp / "prometheus"
        self.dir.mkdir()
        config = self.dir / "prometheus.yml"
        config.write_text(
            "global: {scrape_interval: 1s, scrape_timeout: 1s, evaluation_interval: 1s}\n"
            "scrape_configs:\n"
            "  - job_name: gearvisor\n"
            f"    static_configs: [{{targets: ['{target}']}}]\n")
        self.log = open(self.dir / "prometheus.log", "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [PROMETHEUS, f"--config.file={config}",
             f"--storage.tsdb.path={self.dir / 'data'}",
             f"--web.listen-address={HOST}:{self.port}"],
            stdout=self.log, stderr=subprocess.STDOUT, cwd=self.dir)

    def ready(self) -> bool:
        if self.proc.poll() is not None:
            raise RuntimeError(f"prometheus exited {self.proc.returncode}: {self.diagnose()}")
        try:
            with urllib.request.urlopen(f"http://{HOST}:{self.port}/-/ready", timeout=2) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def query(self, promql: str) -> list[dict]:
        """An instant query through the HTTP API: its result vector."""
        url = (f"http://{HOST}:{self.port}/api/v1/query?"
               + urllib.parse.urlencode({"query": promql}))
        with urllib.request.urlopen(url, timeout=5) as r:
            got = json.load(r)
        assert got["status"] == "success", got
        return got["data"]["result"]

    def stop(self) -> None:
        """Kill it by pid."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self.log.close()

    def diagnose(self) -> str:
        return (self.dir / "prometheus.log").read_text(errors="replace")[-2000:]


@pytest.fixture
def prometheus(tmp_path: Path) -> Iterator[Callable[[str], Prometheus]]:
    """prometheus("host:port") starts a Prometheus scraping that target; teardown kills it."""
    if not Path(PROMETHEUS).exists():
        pytest.skip("prometheus is not installed (examples/setup.sh installs it)")
    started: list[Prometheus] = []

    def start(target: str) -> Prometheus:
        p = Prometheus(tmp_path, target)
        started.append(p)
        wait_for(p.ready, timeout=30, message="prometheus ready")
        return p

    try:
        yield start
    finally:
        for p in started:
            p.stop()


def by_outcome(prom: Prometheus, function: str) -> dict[str, float]:
    result = prom.query(f'gearvisor_jobs_total{{pool="w",function="{function}"}}')
    return {r["metric"]["outcome"]: float(r["value"][1]) for r in result}


def test_prometheus_sees_jobs_total_equal_to_the_jobs_that_ran(gearmand, master, prometheus,
                                                              tmp_path: Path) -> None:
    write_module(tmp_path, "mjobs", JOBS)
    port = free_port()
    master(fleet_config(gearmand, port))
    wait_for(lambda: len(gearmand.workers("w")) == 2, timeout=20, message="2 children")
    wait_for(lambda: get(port, "/healthz")[0] == 200, message="the metrics endpoint")
    prom = prometheus(f"{HOST}:{port}")
    wait_for(lambda: prom.query('up{job="gearvisor"} == 1'), timeout=30,
             message="prometheus scraping the master")
    run_jobs(gearmand, ok=11, fail=4, slow=1, crash=1)
    zero = {"success": 0.0, "error": 0.0, "timeout": 0.0, "crash": 0.0, "poison": 0.0}
    want = {"ok": {**zero, "success": 11.0}, "fail": {**zero, "error": 4.0},
            "slow": {**zero, "timeout": 1.0}, "crash": {**zero, "crash": 1.0, "poison": 1.0}}
    for function, counts in want.items():
        wait_value(lambda f=function: by_outcome(prom, f), lambda got, c=counts: got == c,
                   timeout=30,
                   message=f"prometheus's gearvisor_jobs_total for {function} == {counts}")
    got = prom.query('gearvisor_job_duration_seconds_count{pool="w",function="ok"}')
    assert [float(r["value"][1]) for r in got] == [11.0]
    assert prom.query('gearvisor_child_restarts_total{pool="w",reason="crash"} == 1')
    assert prom.query("process_resident_memory_bytes")
