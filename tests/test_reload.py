"""Integration: graceful rolling reload under load, against a real gearmand.

The acceptance test of the reload issue: a pool of 8 whose function returns its code
version; a client keeps submitting background jobs (each with a unique id and a side effect
we count) and foreground jobs; the code changes and `gearvisor reload` runs. gearmand's own
`workers` list is polled all along to prove capacity never dips.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import time
from pathlib import Path

import psutil
import pytest
from conftest import HOST, wait_equal, wait_for, wait_value
from workload import (
    PROCESSES,
    CapacityWatch,
    Load,
    registered_count,
    results_by_unique,
    versions_seen,
    write_version,
)

from gearvisor.gearman.client import Client

pytestmark = pytest.mark.integration


def config(gearmand, tmp_path: Path, **extra) -> dict:
    pool = {"processes": PROCESSES, "functions": {"work": "vermod:work"},
            "env": {"RESULTS": str(tmp_path / "results.txt")}, "graceful_timeout": 20,
            "watch": False, **extra}
    # File watching off: these tests prove the explicit `gearvisor reload` path.
    return {"servers": [gearmand.address], "watch_config": False, "pools": {"ver": pool}}


def start_fleet(gearmand, master, tmp_path, **extra):
    write_version(tmp_path, "v1")
    m = master(config(gearmand, tmp_path, **extra))
    n = extra.get("processes", PROCESSES)
    wait_for(lambda: registered_count(gearmand) == n, timeout=20,
             message=f"{n} children registered in gearmand")
    return m


def generations(m) -> set[int]:
    """The generations of the children status lists. A retired child stays listed until it
    has finished, exited and been reaped, which may be after a roll's reply: poll this."""
    return {c["generation"] for c in m.status()["pools"][0]["children"]}


def call(gearmand, data: dict | None = None):
    with Client(HOST, gearmand.port, timeout=20) as c:
        return c.call("work", json.dumps(data or {}))


def test_rolling_reload_under_load_loses_nothing_and_never_dips(gearmand, master, tmp_path):
    m = start_fleet(gearmand, master, tmp_path)
    watch = CapacityWatch(gearmand)
    bg = Load(gearmand, background=True, tag="bg")
    fg = Load(gearmand, background=False, tag="fg")
    for t in (watch, bg, fg):
        t.start()
    try:
        wait_for(lambda: len(fg.results) >= 5 and len(bg.submitted) >= 20, timeout=20,
                 message="load running on v1")
        write_version(tmp_path, "v2")
        out = m.ctl("reload")
        assert out.returncode == 0, out.stderr
        assert "ver: ok (generation 2)" in out.stdout
        # New foreground results come from the new code.
        wait_for(lambda: any(data == b"v2" for _, _, data in fg.results[-3:]), timeout=20,
                 message="foreground results from v2")
    finally:
        bg.stop()
        fg.stop()
        watch.stop()
    assert bg.error is None and fg.error is None, (bg.error, fg.error)
    # Every background job ran exactly once (gearmand re-runs a job whose worker died, so
    # a killed job would show up twice; a lost one not at all).
    wait_for(lambda: set(results_by_unique(tmp_path)) >= set(bg.submitted), timeout=30,
             message="every background job done")
    counts = results_by_unique(tmp_path)
    assert all(counts[u] == 1 for u in bg.submitted + fg.submitted), [
        u for u in bg.submitted + fg.submitted if counts[u] != 1]
    assert len(bg.submitted) >= 20 and len(fg.results) >= 10
    assert all(ok for _, ok, _ in fg.results), "a foreground job failed"
    assert {d for _, _, d in fg.results} == {b"v1", b"v2"}
    assert versions_seen(tmp_path) == {"v1", "v2"}
    # Capacity, as gearmand saw it, never dropped below the pool size.
    assert watch.samples > 10 and not watch.errors
    assert watch.low >= PROCESSES, f"registered workers dropped to {watch.low}"
    # The fleet is all generation 2 now (retired children are listed until they have
    # exited and been reaped), and gearmand agrees on the count.
    wait_equal(lambda: generations(m), {2}, message="generations in status")
    status = m.status()["pools"][0]
    assert status["ready"] == PROCESSES and not status["rolling"]
    wait_for(lambda: registered_count(gearmand) == PROCESSES, message="old children gone")
    # Old children exited 0 on their own (SIGHUP), none needed a SIGKILL.
    assert not m.events("child did not finish in time; killing")


@pytest.mark.parametrize("breakage", ["config", "import"])
def test_broken_reload_keeps_old_code_serving(gearmand, master, tmp_path, breakage):
    m = start_fleet(gearmand, master, tmp_path)
    pids = {c["pid"] for c in m.status()["pools"][0]["children"]}
    watch = CapacityWatch(gearmand)
    watch.start()
    try:
        if breakage == "config":
            write_version(tmp_path, "v2")
            m.write_config(config(gearmand, tmp_path, processes="eight"))
            out = m.ctl("reload")
            assert out.returncode != 0
            assert "pools.ver.processes" in out.stderr and "eight" in out.stderr, out.stderr
        else:
            write_version(tmp_path, "v2", preamble="import no_such_module_here")
            out = m.ctl("reload")
            assert out.returncode != 0
            assert "no_such_module_here" in out.stderr, out.stderr
        # The old fleet serves the old code, untouched.
        for _ in range(5):
            r = call(gearmand)
            assert r.ok and r.data == b"v1"
    finally:
        watch.stop()
    assert watch.low >= PROCESSES
    status = m.status()["pools"][0]
    serving = {c["pid"] for c in status["children"] if c["role"] == "serving"}
    assert serving == pids
    if breakage == "import":
        assert "no_such_module_here" in status["halted"]
        assert m.events("roll halted: a new child failed before it was ready; the old "
                        "children keep serving")
        # Fixing the code and reloading again finishes the roll.
        write_version(tmp_path, "v3")
        out = m.ctl("reload")
        assert out.returncode == 0, out.stderr
        assert call(gearmand).data == b"v3"
    else:
        assert m.events("reload refused: invalid config; the fleet keeps its old config")
        assert status["generation"] == 1
    assert m.proc.poll() is None


def test_second_reload_during_a_roll_ends_on_the_newest_generation(gearmand, master,
                                                                   tmp_path):
    # Children take a while to boot, so the first roll is still going when the second
    # reload arrives.
    m = start_fleet(gearmand, master, tmp_path, max_surge=2)
    watch = CapacityWatch(gearmand)
    watch.start()
    try:
        write_version(tmp_path, "v2", preamble="time.sleep(0.4)")
        m.signal(signal.SIGHUP)  # SIGHUP to the master is a reload
        wait_for(lambda: m.events("retiring child"), message="first roll under way")
        write_version(tmp_path, "v3", preamble="time.sleep(0.2)")
        out = m.ctl("reload")
        assert out.returncode == 0, out.stderr
        assert "generation 3" in out.stdout
    finally:
        watch.stop()
    assert watch.low >= PROCESSES
    wait_value(lambda: generations(m), lambda gens: gens <= {3},
               message="only generation 3 in status")
    status = m.status()["pools"][0]
    assert len([c for c in status["children"] if c["role"] == "serving"]) == PROCESSES
    for _ in range(4):
        assert call(gearmand).data == b"v3"
    # No child was told to go twice.
    retired = [e["child_pid"] for e in m.events("retiring child")]
    assert len(retired) == len(set(retired))
    wait_for(lambda: len(m.children()) == PROCESSES, message="only the newest children left")
    assert not m.events("child did not finish in time; killing")


def test_reload_adds_and_removes_pools(gearmand, master, tmp_path):
    write_version(tmp_path, "v1")
    cfg = config(gearmand, tmp_path, processes=2)
    cfg["pools"]["old"] = {"processes": 2, "functions": {"reverse": "examples.text:reverse"},
                           "watch": False}
    m = master(cfg)
    wait_for(lambda: len(gearmand.workers("old")) == 2 and len(gearmand.workers("ver")) == 2,
             message="both pools registered")
    del cfg["pools"]["old"]
    cfg["pools"]["new"] = {"processes": 3, "functions": {"upper": "examples.text:upper"}}
    m.write_config(cfg)
    out = m.ctl("reload")
    assert out.returncode == 0, out.stderr
    wait_for(lambda: len(gearmand.workers("new")) == 3 and not gearmand.workers("old"),
             message="new pool registered, removed pool gone")
    # (gearmand forgets a worker when its socket closes, before the master has reaped it)
    wait_for(lambda: m.events("pool removed"), timeout=20, message="the pool removed")
    names = [p["name"] for p in m.status()["pools"]]
    assert names == ["ver", "new"]


def test_restart_and_scale_verbs(gearmand, master, tmp_path):
    m = start_fleet(gearmand, master, tmp_path, processes=PROCESSES)
    out = m.ctl("scale", "ver", "10")
    assert out.returncode == 0 and "8 -> 10" in out.stdout, out.stderr
    wait_for(lambda: registered_count(gearmand) == 10, message="scaled up to 10 in gearmand")
    out = m.ctl("scale", "ver", "3")
    assert out.returncode == 0
    wait_for(lambda: registered_count(gearmand) == 3, message="scaled down to 3 in gearmand")
    before = {c["pid"] for c in m.status()["pools"][0]["children"]}
    out = m.ctl("restart", "ver")
    assert out.returncode == 0 and "generation 2" in out.stdout, out.stderr
    wait_equal(lambda: generations(m), {2}, message="generations in status")
    after = m.status()["pools"][0]["children"]
    assert {c["generation"] for c in after} == {2} and not before & {c["pid"] for c in after}
    out = m.ctl("restart", "nope")
    assert out.returncode == 1 and "no pool named 'nope'" in out.stderr
    out = m.ctl("scale", "ver", "-1")
    assert out.returncode == 1 and "expected a whole number" in out.stderr


def test_status_table_and_json(gearmand, master, tmp_path):
    m = start_fleet(gearmand, master, tmp_path, processes=2)
    with Client(HOST, gearmand.port) as c:
        # Long enough to be still running through the three status calls below, however
        # slow the machine (the fixture kills the child at teardown).
        c.submit_background("work", json.dumps({"sleep": 60}), "slow-one")
        wait_for(lambda: any(ch["state"] == "busy" for ch in m.status()["pools"][0]["children"]),
                 message="a busy child in status")
    status = m.status()
    pool = status["pools"][0]
    assert status["master"]["pid"] == m.pid
    assert (pool["name"], pool["desired"], pool["actual"], pool["rolling"]) == ("ver", 2, 2,
                                                                                False)
    busy = next(ch for ch in pool["children"] if ch["state"] == "busy")
    assert busy["function"] == "work" and busy["unique"] == "slow-one"
    assert busy["job_seconds"] >= 0 and busy["rss"] > 1_000_000
    assert psutil.Process(busy["pid"]).ppid() == m.pid
    table = m.ctl("status")
    assert table.returncode == 0
    lines = table.stdout.splitlines()
    assert next(line for line in lines if line.startswith("watcher")).startswith(
        "watcher disabled")
    # then gearmand's side (servers, functions, findings), then the journal's store
    assert lines[-2] == "health: ok" and lines[-1].startswith("journal: store sqlite://")
    assert lines[1].split() == ["POOL", "SLOT", "PID", "STATE", "GEN", "UPTIME", "DONE",
                                "FAILED", "JOB", "RSS"]
    assert any(str(busy["pid"]) in line and "busy" in line and "work" in line
               for line in lines)
    assert "pool ver: 2/2 ready, 2 running, generation 1" in table.stdout


def test_control_errors_when_no_master(tmp_path, master):
    m = master({"pools": {"x": {"functions": {"f": "examples.text:echo"}}}}, start=False)
    out = m.ctl("status")
    assert out.returncode == 3 and "no gearvisor master is running" in out.stderr
    # A stale socket: a file left behind by a master that died.
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(tmp_path / "gearvisor.sock"))
    sock.close()
    out = m.ctl("reload")
    assert out.returncode == 3 and "stale control socket" in out.stderr


def test_control_socket_mode_and_idle_child_sighup(gearmand, master, tmp_path):
    m = start_fleet(gearmand, master, tmp_path, processes=2)
    assert os.stat(tmp_path / "gearvisor.sock").st_mode & 0o777 == 0o600
    child = m.status()["pools"][0]["children"][0]["pid"]
    os.kill(child, signal.SIGHUP)
    wait_for(lambda: not psutil.pid_exists(child) or
             psutil.Process(child).status() == psutil.STATUS_ZOMBIE,
             message="idle child gone after SIGHUP")
    exits = [e for e in m.logs() if e.get("event") == "child exiting" and e["pid"] == child]
    assert exits and exits[0]["jobs_done"] == 0


def test_systemd_notify(gearmand, master, tmp_path):
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(20)
    try:
        write_version(tmp_path, "v1")
        m = master(config(gearmand, tmp_path, processes=2), env={
            "NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "400000",
            "WATCHDOG_PID": ""})
        got: list[str] = []

        def until(line: str) -> list[str]:
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                msg = sock.recv(4096).decode().splitlines()
                got.extend(msg)
                if line in msg:
                    return msg
            pytest.fail(f"no {line} from the master; got {got}")

        ready = until("READY=1")
        assert registered_count(gearmand) == 2  # READY only once the pool is registered
        assert any(x.startswith("STATUS=2/2 children ready") for x in ready)
        until("WATCHDOG=1")
        out = m.ctl("reload")
        assert out.returncode == 0
        reloading = until("RELOADING=1")
        assert any(x.startswith("MONOTONIC_USEC=") for x in reloading)
        until("READY=1")
        m.signal(signal.SIGTERM)
        until("STOPPING=1")
        assert m.wait_exit() == 0
    finally:
        sock.close()


def test_reload_exits_0_when_a_restarting_child_is_retired_as_outdated(gearmand, master,
                                                                       tmp_path):
    # A slot that is empty for a moment during a roll is no failed roll: here the child of
    # generation 1 was SIGKILLed and its restart is still importing (slow boot) when the
    # reload comes, so the roll retires it as outdated and starts generation 2 instead.
    write_version(tmp_path, "v1", preamble="time.sleep(1.5)")
    m = master(config(gearmand, tmp_path, processes=1))
    wait_for(lambda: registered_count(gearmand) == 1, timeout=20, message="1 child registered")
    (first,) = [c["pid"] for c in m.status()["pools"][0]["children"]]
    os.kill(first, signal.SIGKILL)
    wait_for(lambda: [c for c in m.status()["pools"][0]["children"]
                      if c["pid"] not in (None, first) and c["state"] == "starting"],
             timeout=20, message="the crashed slot's restart starting")
    write_version(tmp_path, "v2", preamble="time.sleep(1.5)")
    out = m.ctl("reload")
    assert out.returncode == 0, (out.stdout, out.stderr)
    assert "ver: ok (generation 2)" in out.stdout
    # gearmand itself lists the new child, and it runs the new code.
    wait_for(lambda: registered_count(gearmand) == 1, timeout=20, message="1 child registered")
    assert call(gearmand).data == b"v2"
