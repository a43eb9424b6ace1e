"""The other eight built-in alert rules end to end, each against its real fault: a real
master with real children, a real gearmand (restarted, given a backlog), real command
workers that never register, real open files against a child's RLIMIT_NOFILE, and the
delivery helper posting to a real HTTP receiver. Each test makes the fault, waits for one
firing notification of its alertname, fixes the fault and waits for its resolved notice.

Plus what the master feeds the engine for them: Backlog's drain time after the growth
stops, each child's open files, and `gearvisor restart` muting its pool's child alerts.
"""

from __future__ import annotations

import datetime
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import test_alerting
from conftest import HOST, REPO, free_port, wait_for, write_module
from test_alerting import Receiver, fleet_config
from test_probe import WORKER as UNREGISTERED_WORKER

from gearvisor.gearman.client import Client

pytestmark = pytest.mark.integration
receiver = test_alerting.receiver  # the fixture: a real HTTP receiver of webhook payloads

SAMPLE = "300ms"  # alerts.sample_interval: job counts and open files, sampled this often


def once(receiver: Receiver, name: str) -> dict[str, Any]:
    """Wait for `name`'s firing notification; return the alert it carried."""
    firing = wait_for(lambda: receiver.alerts(name, "firing"), timeout=30,
                      message=f"{name} posted")
    return firing[0]


def resolved_once(receiver: Receiver, name: str, timeout: float = 30) -> None:
    """Wait for `name`'s resolved notice; it fired exactly once before it."""
    wait_for(lambda: receiver.alerts(name, "resolved"), timeout=timeout,
             message=f"{name} resolved")
    assert len(receiver.alerts(name, "firing")) == 1, receiver.payloads


def wall(rfc3339: str) -> float:
    """An Alertmanager time (`2026-01-02T03:04:05.678Z`) as seconds since the epoch."""
    return datetime.datetime.strptime(rfc3339, "%Y-%m-%dT%H:%M:%S.%fZ").replace(
        tzinfo=datetime.timezone.utc).timestamp()


def waiting(gearmand: Any, function: str) -> int:
    """gearmand's own count of `function`'s jobs that wait for a worker."""
    st = gearmand.status().get(function)
    return st.queued - st.running if st else 0


FAILS = """\
import os

def work(job):
    if job.data == b"fail" or os.path.exists({flag!r}):
        raise ConnectionError("downstream is down")
    return b"ok"
"""


def test_a_child_that_fails_fast_pages_quarantined_until_its_replacement_serves(
        gearmand, master, receiver, tmp_path) -> None:
    write_module(tmp_path, "failing", FAILS.format(flag=str(tmp_path / "never")))
    config = fleet_config(gearmand, receiver)
    config["pools"]["w"].update({
        "functions": {"work": "failing:work"},
        "quarantine": {"min_jobs": 3, "ratio": 1.0, "window": 5, "cooldown": "2s"}})
    m = master(config)
    wait_for(lambda: len(gearmand.workers("w")) == 1, timeout=20, message="registered")
    first = m.child_with_title("w[0]")
    with Client(HOST, gearmand.port, timeout=30) as c:
        c.wait([c.submit("work", b"fail") for _ in range(3)])  # 3 fast failures of 3
    alert = once(receiver, "Quarantined")
    assert (alert["labels"]["pool"], alert["labels"]["slot"]) == ("w", "0")
    # The fix: no more failing jobs; after its cooldown the slot's replacement serves, and
    # gearmand sees a new connection of the pool with the function registered.
    wait_for(lambda: m.child_with_title("w[0]") not in (None, first), timeout=20,
             message="the replacement")
    resolved_once(receiver, "Quarantined")
    wait_for(lambda: [w for w in gearmand.workers("w") if "work" in w.functions],
             timeout=20, message="the replacement registered")


def test_a_pool_whose_children_all_fail_pages_circuit_open_until_the_probe_succeeds(
        gearmand, master, receiver, tmp_path) -> None:
    flag = tmp_path / "broken"
    flag.touch()
    write_module(tmp_path, "failing", FAILS.format(flag=str(flag)))
    config = fleet_config(gearmand, receiver)
    config["pools"]["w"].update({
        "processes": 2, "functions": {"work": "failing:work"},
        "quarantine": {"min_jobs": 2, "ratio": 1.0, "window": 4, "cooldown": "60s",
                       "probation_jobs": 1},
        "circuit": {"ratio": 0.6, "cooldown": "1s"}})
    master(config)
    wait_for(lambda: sum(1 for w in gearmand.workers("w") if w.functions) == 2, timeout=20,
             message="registered")
    with Client(HOST, gearmand.port, timeout=30) as c:
        for i in range(30):
            c.submit_background("work", b"x", unique=f"circuit-{i}")
    alert = once(receiver, "CircuitOpen")
    assert (alert["labels"]["pool"], alert["labels"]["severity"]) == ("w", "critical")
    assert waiting(gearmand, "work") > 0  # gearmand holds the jobs the pool stopped taking
    flag.unlink()  # the downstream is back: the next probe child succeeds
    resolved_once(receiver, "CircuitOpen")
    wait_for(lambda: gearmand.status()["work"].queued == 0, timeout=30,
             message="gearmand's queue drained")


def test_children_that_never_register_page_workers_missing_until_they_do(
        gearmand, master, receiver, tmp_path) -> None:
    script = tmp_path / "worker.py"
    script.write_text(UNREGISTERED_WORKER)
    flag = tmp_path / "registers"
    config = fleet_config(gearmand, receiver)
    config.update({"probe_interval": "300ms", "findings": {"registration_grace": "500ms"}})
    config["pools"] = {"cmd": {
        "processes": 1, "command": [sys.executable, str(script), str(flag), HOST,
                                    str(gearmand.port)],
        "functions": ["cmd_fn"], "ready": "started", "startsecs": "100ms",
        "graceful_timeout": 2, "env": {"PYTHONPATH": str(REPO)}, "watch": False}}
    m = master(config)
    alert = once(receiver, "WorkersMissing")
    assert (alert["labels"]["pool"], alert["labels"]["server"]) == ("cmd", gearmand.address)
    assert gearmand.workers("cmd") == []  # gearmand's own view: nothing registered
    flag.write_text("")  # the fixed worker registers
    assert m.ctl("restart", "cmd").returncode == 0
    wait_for(lambda: len(gearmand.workers("cmd")) == 1, timeout=20,
             message="the new child registered")
    resolved_once(receiver, "WorkersMissing")


def test_jobs_slower_than_their_threshold_page_slow_jobs_until_they_speed_up(
        gearmand, master, receiver) -> None:
    config = fleet_config(gearmand, receiver)
    config["metrics"] = {"listen": f"{HOST}:{free_port()}"}  # children count per function
    config["alerts"].update({"sample_interval": SAMPLE, "rules": {
        "SlowJobs": {"functions": {"nap": "100ms"}, "for": "0s"}}})
    config["pools"]["w"]["functions"] = {"nap": "examples.tasks:sleep"}
    master(config)
    wait_for(lambda: len(gearmand.workers("w")) == 1, timeout=20, message="registered")
    with Client(HOST, gearmand.port, timeout=30) as c:
        c.wait([c.submit("nap", b"0.3") for _ in range(3)])
    alert = once(receiver, "SlowJobs")
    assert (alert["labels"]["pool"], alert["labels"]["function"]) == ("w", "nap")
    with Client(HOST, gearmand.port, timeout=30) as c:  # the fix: fast jobs again
        c.wait([c.submit("nap", b"0.001") for _ in range(20)])
    resolved_once(receiver, "SlowJobs")


def grow_backlog(gearmand: Any, receiver: Receiver) -> dict[str, Any]:
    """25 jobs of nap(0.1 s) a second arrive at `gearmand` and one child does 10: the
    backlog grows (backlog_growing). They stop once Backlog fired and 40 wait (4 s of
    work), well before they drain. Returns the firing alert."""
    stop = threading.Event()

    def arrive() -> None:
        with Client(HOST, gearmand.port) as client:
            for i in range(300):  # bounded: 300 jobs, 12 s
                if stop.wait(0.04):  # the arrival rate, not synchronisation
                    return
                client.submit_background("nap", "0.1", unique=f"nap-{i}")

    arrivals = threading.Thread(target=arrive, daemon=True)
    arrivals.start()
    try:
        alert = once(receiver, "Backlog")
        wait_for(lambda: waiting(gearmand, "nap") >= 40, timeout=15, message="40 waiting")
    finally:
        stop.set()
        arrivals.join(15)
    assert (alert["labels"]["function"], alert["labels"]["server"]) == ("nap",
                                                                        gearmand.address)
    return alert


def backlog_config(servers: list[Any], receiver: Receiver) -> dict[str, Any]:
    config = fleet_config(servers[0], receiver)
    config.update({"servers": [g.address for g in servers], "probe_interval": "300ms",
                   "findings": {"backlog_probes": 2}})
    config["alerts"]["rules"] = {"Backlog": {"drain": "50ms"}}
    config["pools"]["w"]["functions"] = {"nap": "examples.tasks:sleep"}
    return config


def test_a_backlog_pages_while_it_grows_and_while_its_drain_time_is_above_drain(
        gearmand, master, receiver) -> None:
    """With `drain: 50ms` the alert holds while any job waits (one takes 100 ms), so its
    resolved notice comes once gearmand's queue has drained, not when the growth
    stopped."""
    master(backlog_config([gearmand], receiver))
    wait_for(lambda: len(gearmand.workers("w")) == 1, timeout=20, message="registered")
    grow_backlog(gearmand, receiver)
    resolved_once(receiver, "Backlog")
    # Nothing arrives any more, so what waited when it resolved still waits no more.
    assert waiting(gearmand, "nap") == 0


def test_a_backlog_on_a_server_a_reload_removed_resolves(gearmand_factory, master,
                                                         receiver) -> None:
    """The backlog is on the second server; a reload drops that server from the config,
    so nothing probes it any more: its Backlog resolves (its jobs still wait there)."""
    kept, dropped = gearmand_factory(), gearmand_factory()
    config = backlog_config([kept, dropped], receiver)
    m = master(config)
    wait_for(lambda: len(dropped.workers("w")) == 1, timeout=20, message="registered")
    grow_backlog(dropped, receiver)
    m.write_config({**config, "servers": [kept.address]})
    m.signal(signal.SIGHUP)
    resolved_once(receiver, "Backlog")
    assert waiting(dropped, "nap") > 0  # gearmand still holds them: no one was to drain them


def test_a_reload_whose_new_code_cannot_boot_pages_roll_halted_until_a_fixed_reload(
        gearmand, master, receiver, tmp_path) -> None:
    write_module(tmp_path, "rolled", "def f(job):\n    return b'v1'\n")
    config = fleet_config(gearmand, receiver)
    config["pools"]["w"]["functions"] = {"f": "rolled:f"}
    m = master(config)
    wait_for(lambda: len(gearmand.workers("w")) == 1, timeout=20, message="registered")
    old = m.child_with_title("w[0]")
    write_module(tmp_path, "rolled", "raise ImportError('a broken deploy')\n")
    m.signal(signal.SIGHUP)  # the new generation cannot import its code: the roll halts
    alert = once(receiver, "RollHalted")
    assert alert["labels"]["pool"] == "w"
    assert m.child_with_title("w[0]") == old  # the old child keeps serving
    assert len(gearmand.workers("w")) == 1
    write_module(tmp_path, "rolled", "def f(job):\n    return b'v2 fixed'\n")
    m.signal(signal.SIGHUP)
    resolved_once(receiver, "RollHalted")
    with Client(HOST, gearmand.port, timeout=30) as c:
        assert c.call("f", b"x").data == b"v2 fixed"  # the fixed code serves


HOLDS_FILES = """\
import os, resource

HELD = []

def files(job):
    if job.data == b"open":  # up to 90% of this child's own limit, held open
        limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        while len(os.listdir("/proc/self/fd")) < 0.9 * limit:
            HELD.append(open(os.devnull))
    else:
        while HELD:
            HELD.pop().close()
    return str(len(os.listdir("/proc/self/fd"))).encode()
"""


def test_a_child_near_its_open_files_limit_pages_fd_limit_until_it_closes_them(
        gearmand, master, receiver, tmp_path) -> None:
    write_module(tmp_path, "holder", HOLDS_FILES)
    config = fleet_config(gearmand, receiver)
    config["alerts"].update({"sample_interval": SAMPLE, "rules": {"FdLimit": {"for": "0s"}}})
    config["pools"]["w"].update({"functions": {"files": "holder:files"},
                                 "rlimit_nofile": 64})
    m = master(config)
    wait_for(lambda: len(gearmand.workers("w")) == 1, timeout=20, message="registered")
    with Client(HOST, gearmand.port, timeout=30) as c:
        opened = c.call("files", b"open")
    assert opened.ok and int(opened.data) >= 0.9 * 64
    pid = m.child_with_title("w[0]")
    assert len(os.listdir(f"/proc/{pid}/fd")) >= 0.8 * 64  # the kernel's own count
    alert = once(receiver, "FdLimit")
    assert alert["labels"]["pool"] == "w" and "of 64 files open" in \
        alert["annotations"]["summary"]
    with Client(HOST, gearmand.port, timeout=30) as c:
        assert c.call("files", b"close").ok
    resolved_once(receiver, "FdLimit")


def test_a_restarted_gearmand_pages_server_restarted_until_its_hold_ends(
        gearmand, master, receiver) -> None:
    config = fleet_config(gearmand, receiver)
    config.update({"probe_interval": "300ms", "findings": {"restart_hold": "2s"}})
    master(config)
    wait_for(lambda: len(gearmand.workers("w")) == 1, timeout=20, message="registered")
    before = gearmand.gearadmin("--getpid").strip()
    gearmand.stop()
    gearmand.start()  # the same port, a new process: jobs it held in memory are gone
    assert gearmand.gearadmin("--getpid").strip() not in ("", before)
    alert = once(receiver, "ServerRestarted")
    assert (alert["labels"]["server"], alert["labels"]["severity"]) == (gearmand.address,
                                                                        "info")
    resolved_once(receiver, "ServerRestarted")  # restart_hold passed
    wait_for(lambda: len(gearmand.workers("w")) == 1, timeout=20, message="registered again")


SLOW_BOOT = """\
import os, time

if os.path.exists({flag!r}):
    time.sleep(4)  # a slow import: the roll's successor takes this long to get ready

def f(job):
    return b"ok"
"""


def test_a_restart_roll_mutes_crash_loop_for_the_child_it_replaces(
        gearmand, master, receiver, tmp_path) -> None:
    """`gearvisor restart w` rolls the pool (no reload). Its old child crashes while the
    successor boots: muted by the roll, whose end comes after CrashLoop's window, so no
    page. A crash after the roll pages: exactly one CrashLoop in all."""
    flag = tmp_path / "slow"
    write_module(tmp_path, "slowboot", SLOW_BOOT.format(flag=str(flag)))
    config = fleet_config(gearmand, receiver)
    config["alerts"]["rules"] = {"CrashLoop": {"count": 1, "window": "1s"}}
    config["pools"]["w"]["functions"] = {"f": "slowboot:f"}
    m = master(config)
    wait_for(lambda: len(gearmand.workers("w")) == 1, timeout=20, message="registered")
    old = m.child_with_title("w[0]")
    flag.touch()
    restarted: list[Any] = []
    roll = threading.Thread(target=lambda: restarted.append(m.ctl("restart", "w",
                                                                  timeout=60)))
    roll.start()
    try:
        wait_for(lambda: len(m.children()) == 2, timeout=20, message="the successor booting")
        os.kill(old, signal.SIGKILL)  # the child the roll replaces crashes mid-roll
    finally:
        roll.join(60)
    assert restarted and restarted[0].returncode == 0, restarted
    new = wait_for(lambda: m.child_with_title("w[0]"), timeout=20, message="the successor")
    assert new != old
    wait_for(lambda: len(gearmand.workers("w")) == 1, timeout=20, message="it registered")
    # After the roll, the same fault pages: wait for that episode's firing and resolved
    # notices (the same fingerprint: told apart by startsAt), by then a page for the crash
    # during the roll would have come long before.
    flag.unlink()
    killed_at = time.time()
    os.kill(new, signal.SIGKILL)

    def after_the_roll(status: str) -> list[dict[str, Any]]:
        return [a for a in receiver.alerts("CrashLoop", status)
                if wall(a["startsAt"]) >= killed_at - 0.01]

    wait_for(lambda: after_the_roll("firing"), timeout=30, message="CrashLoop posted")
    wait_for(lambda: after_the_roll("resolved"), timeout=30, message="CrashLoop resolved")
    assert len(receiver.alerts("CrashLoop", "firing")) == 1, receiver.payloads


@pytest.mark.parametrize("value", ["0s", "2h"])
def test_alerts_sample_interval_is_checked(value: str, tmp_path: Path) -> None:
    from gearvisor.config import ConfigError, load

    path = tmp_path / "gearvisor.yaml"
    pools = "pools: {w: {functions: {echo: examples.text:echo}}}\n"
    path.write_text(f"alerts: {{sample_interval: {value}}}\n" + pools)
    with pytest.raises(ConfigError, match="alerts.sample_interval"):
        load(str(path))
    path.write_text("alerts: {sample_interval: 500ms}\n" + pools)
    assert load(str(path)).alerts.sample_interval == 0.5


def test_fd_usage_counts_a_process_files_against_its_soft_limit() -> None:
    import resource
    import subprocess

    from gearvisor.master.alerts import fd_usage

    used, limit = fd_usage(os.getpid()) or (0, 0)
    assert abs(used - len(os.listdir("/proc/self/fd"))) <= 1  # listdir's own fd aside
    assert limit == resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    gone = subprocess.Popen(["true"])
    gone.wait()
    assert fd_usage(gone.pid) is None  # exited and reaped: no error, nothing counted
