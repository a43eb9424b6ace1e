"""The metrics endpoint of a real master: real gearmand, real children, real jobs, real
sockets. What the counters say after jobs that succeed, raise, time out, crash their child
and come back as poison; that they survive a child crash and a reload; hostile HTTP
clients; the listener's start and reload; `promtool check metrics` on a real scrape."""

from __future__ import annotations

import http.client
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
from conftest import HOST, free_port, wait_for, write_module
from prometheus_client.parser import text_string_to_metric_families

from gearvisor.gearman.client import Client

pytestmark = pytest.mark.integration

JOBS = """
    import os
    import time

    def ok(job):
        return job.data

    def fail(job):
        raise ValueError("no")

    def slow(job):
        time.sleep(5)  # past its 0.3s soft timeout: JobTimeout
        return b"late"

    def crash(job):
        os._exit(9)  # the child dies mid-job
"""


def get(port: int, path: str = "/metrics", accept: str | None = None,
        method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection(HOST, port, timeout=10)
    try:
        conn.request(method, path, headers={"Accept": accept} if accept else {})
        r = conn.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        conn.close()


def scrape(port: int) -> dict[tuple[str, frozenset], float]:
    status, _, body = get(port)
    assert status == 200
    out = {}
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def jobs_by_outcome(port: int, function: str, pool: str = "w") -> dict[str, float]:
    return {dict(labels)["outcome"]: v for (name, labels), v in scrape(port).items()
            if name == "gearvisor_jobs_total" and dict(labels)["function"] == function
            and dict(labels)["pool"] == pool}


def fleet_config(gearmand: Any, port: int, **pool: Any) -> dict:
    return {"servers": [gearmand.address], "watch_config": False,
            "metrics": {"listen": f"{HOST}:{port}"},
            "pools": {"w": {"processes": 2, "poison_after": 1, "timeout_grace": 10,
                            "quarantine": {"enabled": False},
                            "functions": {"ok": "mjobs:ok", "fail": "mjobs:fail",
                                          "slow": {"callable": "mjobs:slow", "timeout": 0.3},
                                          "crash": "mjobs:crash"}, **pool}}}


@pytest.fixture
def fleet(gearmand, master, tmp_path: Path):
    """A master serving metrics on a free port, its pool of 2 registered on gearmand."""
    write_module(tmp_path, "mjobs", JOBS)
    port = free_port()
    m = master(fleet_config(gearmand, port))
    wait_for(lambda: len(gearmand.workers("w")) == 2, timeout=20, message="2 children")
    wait_for(lambda: get(port, "/healthz")[0] == 200, message="the metrics endpoint")
    m.metrics_port = port
    return m


def run_jobs(gearmand: Any, ok: int = 0, fail: int = 0, slow: int = 0,
             crash: int = 0) -> None:
    """Submit the jobs and wait for each to end (one at a time for the crash: poison)."""
    with Client(HOST, gearmand.port, timeout=30) as c:
        handles = ([c.submit("ok", b"x") for _ in range(ok)]
                   + [c.submit("fail", b"x") for _ in range(fail)]
                   + [c.submit("slow", b"x") for _ in range(slow)])
        c.wait(handles)
        for _ in range(crash):
            c.wait([c.submit("crash", b"x")])  # crashes one child; then refused as poison


def test_jobs_by_outcome_crash_poison_and_restart_reason(fleet, gearmand) -> None:
    port = fleet.metrics_port
    run_jobs(gearmand, ok=7, fail=3, slow=1, crash=1)
    wait_for(lambda: jobs_by_outcome(port, "crash") == {
        "success": 0, "error": 0, "timeout": 0, "crash": 1, "poison": 1},
        timeout=20, message="the crash and the poison refusal counted")
    assert jobs_by_outcome(port, "ok") == {"success": 7, "error": 0, "timeout": 0,
                                           "crash": 0, "poison": 0}
    assert jobs_by_outcome(port, "fail")["error"] == 3
    assert jobs_by_outcome(port, "slow")["timeout"] == 1
    got = scrape(port)
    assert got[("gearvisor_child_restarts_total",
                frozenset({("pool", "w"), ("reason", "crash")}))] == 1
    h = frozenset({("pool", "w"), ("function", "slow")})
    assert got[("gearvisor_job_duration_seconds_count", h)] == 1
    assert got[("gearvisor_job_duration_seconds_sum", h)] >= 0.3
    le = frozenset({("pool", "w"), ("function", "ok"), ("le", "0.005")})
    assert got[("gearvisor_job_duration_seconds_bucket", le)] == 7
    ready = ("gearvisor_children", frozenset({("pool", "w"), ("state", "ready")}))
    wait_for(lambda: scrape(port)[ready] == 2, message="the crashed child replaced")
    assert got[("gearvisor_pool_desired_children", frozenset({("pool", "w")}))] == 2
    assert ("process_resident_memory_bytes", frozenset()) in got


def test_counters_survive_child_crashes_and_a_reload(fleet, gearmand) -> None:
    port = fleet.metrics_port
    run_jobs(gearmand, ok=20, fail=4)
    wait_for(lambda: jobs_by_outcome(port, "ok")["success"] == 20, message="20 counted")
    # Every child dies: their counts move into the master's totals.
    for child in fleet.children():
        child.kill()
    wait_for(lambda: len(gearmand.workers("w")) == 2 and len(fleet.children()) == 2,
             timeout=20, message="replacements")
    assert jobs_by_outcome(port, "ok")["success"] == 20
    assert jobs_by_outcome(port, "fail")["error"] == 4
    first = {p.pid for p in fleet.children()}
    config = fleet.config_path.read_text().replace("processes: 2", "processes: 3")
    fleet.write_config(config)
    fleet.signal(signal.SIGHUP)  # a reload (`gearvisor reload` would wait for the roll)
    wait_for(lambda: len(gearmand.workers("w")) == 3 and not first & {
        p.pid for p in fleet.children()}, timeout=30, message="the roll to 3 children")
    run_jobs(gearmand, ok=5)
    wait_for(lambda: jobs_by_outcome(port, "ok")["success"] == 25, message="25 counted")
    assert jobs_by_outcome(port, "fail")["error"] == 4
    got = scrape(port)
    assert got[("gearvisor_child_restarts_total",
                frozenset({("pool", "w"), ("reason", "crash")}))] >= 2


def test_openmetrics_when_asked_healthz_readyz_404_405(fleet) -> None:
    port = fleet.metrics_port
    status, headers, body = get(port, accept="application/openmetrics-text; version=1.0.0")
    assert status == 200 and headers["content-type"].startswith("application/openmetrics-text")
    assert body.endswith(b"# EOF\n") and b"gearvisor_jobs_total" in body
    status, headers, body = get(port)
    assert status == 200 and headers["content-type"].startswith("text/plain")
    assert b"# TYPE gearvisor_jobs_total counter" in body
    assert get(port, "/healthz")[0] == 200
    wait_for(lambda: get(port, "/readyz")[0] == 200, message="ready")
    assert get(port, "/nope")[0] == 404
    status, headers, _ = get(port, "/metrics", method="POST")
    assert status == 405 and headers["allow"] == "GET, HEAD"
    status, _, body = get(port, "/metrics", method="HEAD")
    assert status == 200 and body == b""


def test_readyz_is_503_with_a_reason_while_a_pool_is_not_ready(gearmand, master,
                                                               tmp_path: Path) -> None:
    write_module(tmp_path, "mjobs", JOBS)
    port = free_port()
    cfg = fleet_config(gearmand, port)
    cfg["pools"]["broken"] = {"processes": 1, "functions": {"x": "no_such_module:x"}}
    master(cfg)
    wait_for(lambda: get(port, "/readyz")[0] == 503, message="the endpoint")
    body = get(port, "/readyz")[2].decode()
    assert "pool broken: 0/1 children ready" in body
    assert get(port, "/healthz")[0] == 200


def raw(port: int, data: bytes, timeout: float = 10) -> bytes:
    """Send bytes, read the reply until the server closes."""
    with socket.create_connection((HOST, port), timeout=timeout) as s:
        try:
            s.sendall(data)
        except OSError:
            pass
        out = b""
        try:
            while chunk := s.recv(65536):
                out += chunk
        except ConnectionResetError:
            pass
        return out


def test_hostile_clients_get_bounded_answers_and_never_stall_the_master(fleet) -> None:
    port = fleet.metrics_port
    assert raw(port, b"\x00\xff garbage\r\n\r\n").startswith(b"HTTP/1.1 400 ")
    assert raw(port, b"GET /metrics SPDY/3\r\n\r\n").startswith(b"HTTP/1.1 505 ")
    assert raw(port, b"GET /metrics HTTP/1.1\r\nno colon here\r\n\r\n").startswith(
        b"HTTP/1.1 400 ")
    big = b"GET /metrics HTTP/1.1\r\nX: " + b"a" * 100_000 + b"\r\n\r\n"
    reply = raw(port, big)
    assert reply == b"" or reply.startswith(b"HTTP/1.1 431 ")  # or reset mid-send
    # Many slow clients: each holds a connection without a whole request. Scrapes still
    # answer (the oldest slow one is evicted at the cap), and the master's fds stay bounded.
    fds = psutil.Process(fleet.pid).num_fds()
    slow = []
    try:
        for _ in range(200):
            s = socket.create_connection((HOST, port), timeout=5)
            s.sendall(b"GET /metr")
            slow.append(s)
        started = time.monotonic()
        assert get(port, "/healthz")[0] == 200
        assert time.monotonic() - started < 5
        assert wait_for(lambda: psutil.Process(fleet.pid).num_fds() <= fds + 40,
                        message="connections over the cap closed")
    finally:
        for s in slow:
            s.close()
    # A slow client alone is answered 408 at the request timeout.
    with socket.create_connection((HOST, port), timeout=15) as s:
        s.sendall(b"GET /metrics HTTP/1.1\r\n")
        assert s.recv(100).startswith(b"HTTP/1.1 408 ")
    assert get(port, "/metrics")[0] == 200


def test_a_taken_port_at_start_is_a_clear_error(gearmand, master, tmp_path: Path) -> None:
    write_module(tmp_path, "mjobs", JOBS)
    with socket.socket() as taken:
        taken.bind((HOST, 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        m = master(fleet_config(gearmand, port))
        assert m.wait_exit(30) == 1
    errors = m.events("cannot open the metrics listener")
    assert errors and f"metrics.listen {HOST}:{port}" in errors[0]["error"]
    assert "in use" in errors[0]["error"]


def test_a_reload_rebinds_a_changed_address_and_keeps_the_old_on_error(fleet, gearmand) -> None:
    old = fleet.metrics_port
    new = free_port()
    text = fleet.config_path.read_text()
    fleet.write_config(text.replace(f":{old}", f":{new}"))
    fleet.signal(signal.SIGHUP)
    wait_for(lambda: get(new, "/healthz")[0] == 200, message="the new address")
    def old_closed() -> bool:
        try:
            get(old, "/healthz")
        except OSError:
            return True
        return False

    wait_for(old_closed, message="the old address closed")
    with socket.socket() as taken:
        taken.bind((HOST, 0))
        taken.listen(1)
        busy = taken.getsockname()[1]
        fleet.write_config(text.replace(f":{old}", f":{busy}"))
        fleet.signal(signal.SIGHUP)
        wait_for(lambda: fleet.events("cannot open the new metrics listener; the old one "
                                      "keeps serving"), message="the error logged")
        assert get(new, "/healthz")[0] == 200


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool (Debian prometheus)")
def test_promtool_check_metrics_passes_on_a_real_scrape(fleet, gearmand) -> None:
    run_jobs(gearmand, ok=3, fail=1, slow=1)
    port = fleet.metrics_port
    wait_for(lambda: jobs_by_outcome(port, "slow")["timeout"] == 1, message="jobs counted")
    status, _, body = get(port)
    assert status == 200
    out = subprocess.run(["promtool", "check", "metrics"], input=body, capture_output=True,
                         timeout=30)
    assert out.returncode == 0, (out.stdout + out.stderr).decode()
