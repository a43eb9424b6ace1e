"""The gearmand probe and the health findings, end to end: a real gearmand, a real master
with forked children, and `gearvisor status --json`. Each fault (gearmand stopped,
restarted, jobs no one serves, a growing backlog, children that never register) shows up
as its finding within 3 x probe_interval (timed from the master's own log line), and
clears once the fault is fixed. A hostile job server (endless answers, or none) costs the
master a failed probe, never its memory or its loop."""

from __future__ import annotations

import datetime
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
from conftest import HOST, REPO, wait_for, wait_value

from gearvisor.gearman.admin import PROBE_MAX_LINES
from gearvisor.gearman.client import Client

pytestmark = pytest.mark.integration

INTERVAL = 0.3
WITHIN = 3 * INTERVAL  # what the issue asks: a fault's finding within 3 probe intervals
FINDINGS = {"no_workers_probes": 2, "backlog_probes": 3, "restart_hold": "2s",
            "registration_grace": "500ms"}
TEXT = {"processes": 1, "functions": {"reverse": "examples.text:reverse"}, "watch": False,
        "reconnect_max_delay": "200ms"}


def start(master, servers: list[str], pools: dict, probe_interval: str = "300ms"):
    return master({"servers": servers, "watch_config": False,
                   "probe_interval": probe_interval, "findings": FINDINGS, "pools": pools})


def findings(m, kind: str) -> list[dict]:
    return [f for f in m.status()["findings"] if f["kind"] == kind]


def logged_at(m, event: str, kind: str, **match: str) -> float:
    """Wall-clock time of the last `event` log line about a finding of `kind`."""
    lines = [e for e in m.events(event) if e.get("kind") == kind
             and all(e.get(k) == v for k, v in match.items())]
    assert lines, f"no {event!r} line for {kind}"
    stamp = lines[-1]["timestamp"].replace("Z", "+00:00")
    return datetime.datetime.fromisoformat(stamp).timestamp()


def server_row(m, address: str) -> dict | None:
    return next((s for s in m.status()["servers"] if s["server"] == address), None)


def wait_answered(m, address: str) -> dict:
    return wait_value(lambda: server_row(m, address), lambda s: s and s["answered"],
                      timeout=20, message=f"{address} answered the probe")


def test_a_stopped_gearmand_is_down_and_a_restarted_one_restarted(gearmand, master) -> None:
    m = start(master, [gearmand.address], {"text": TEXT})
    first = wait_answered(m, gearmand.address)
    assert first["pid"] == gearmand.proc.pid and first["version"]
    old_pid = gearmand.proc.pid

    fault = time.time()
    gearmand.stop()
    (down,) = wait_value(lambda: findings(m, "server_down"), bool, timeout=10,
                         message="server_down")
    assert logged_at(m, "health finding raised", "server_down") - fault <= WITHIN
    assert down["server"] == gearmand.address and down["details"]["failures"] >= 3
    row = server_row(m, gearmand.address)
    assert not row["up"] and "refused" in row["error"].lower()

    gearmand.start()  # the same port, a new process
    back = time.time()
    (restarted,) = wait_value(lambda: findings(m, "server_restarted"), bool, timeout=10,
                              message="server_restarted")
    assert logged_at(m, "health finding raised", "server_restarted") - back <= WITHIN
    assert logged_at(m, "health finding cleared", "server_down") - back <= WITHIN
    assert restarted["details"] == {"old_pid": old_pid, "pid": gearmand.proc.pid,
                                    "restarts": 1}
    assert "may be lost" in restarted["message"]
    assert not findings(m, "server_down")
    assert server_row(m, gearmand.address)["restarts"] == 1
    # It is a fact, not a state: it clears after restart_hold (2s here).
    wait_for(lambda: not findings(m, "server_restarted"), timeout=10,
             message="server_restarted cleared after restart_hold")
    assert len(m.events("health finding raised")) == len(
        [e for e in m.events("health finding raised")
         if e["kind"] in ("server_down", "server_restarted", "under_registered")])


def test_a_server_named_by_host_name_is_looked_up_by_the_resolver_helper(
        gearmand_factory, master) -> None:
    """The master never asks the resolver itself (it may hang when DNS is down): its
    resolver helper does, and the probe reaches gearmand at the address it gave, as the
    children do. A resolver that does not answer (stopped here) costs a new server's probe
    its answer, not the master its loop."""
    gearmand = gearmand_factory()
    first = socket.getaddrinfo("localhost", gearmand.port, type=socket.SOCK_STREAM)[0][4][0]
    if first != HOST:
        pytest.skip(f"localhost resolves to {first} first here; gearmand listens on {HOST}")
    named = f"localhost:{gearmand.port}"
    m = start(master, [named], {"text": TEXT})
    row = wait_answered(m, named)
    assert row["pid"] == gearmand.proc.pid and row["up"]
    pid = m.status()["resolver"]["pid"]
    helper = psutil.Process(pid)
    assert helper.ppid() == m.pid and helper.cmdline()[:1] == ["gearvisor: resolver"]
    wait_for(lambda: "reverse" in gearmand.status()
             and gearmand.status()["reverse"].workers == 1, timeout=20,
             message="gearmand shows the child registered under the name")

    other = gearmand_factory()
    second = f"localhost:{other.port}"
    os.kill(pid, signal.SIGSTOP)  # the resolver hangs
    try:
        m.write_config({"servers": [named, second], "watch_config": False,
                        "probe_interval": "300ms", "findings": FINDINGS,
                        "pools": {"text": TEXT}})
        assert m.ctl("reload").returncode == 0
        stuck = wait_value(lambda: server_row(m, second),
                           lambda s: s and s["error"] and "not resolved" in s["error"],
                           timeout=20, message=f"{second} waiting for its name")
        assert stuck["failures"] >= 1 and not stuck["answered"]
        assert server_row(m, named)["answered"]  # the known one is probed all along
    finally:
        os.kill(pid, signal.SIGCONT)
    assert wait_answered(m, second)["pid"] == other.proc.pid


def test_jobs_for_a_function_no_one_serves_until_a_pool_serves_it(gearmand, master) -> None:
    m = start(master, [gearmand.address], {"text": TEXT})
    wait_answered(m, gearmand.address)
    with Client(HOST, gearmand.port) as client:
        for i in range(5):
            client.submit_background("nobody_serves", "x", unique=f"job-{i}")
    fault = time.time()
    (found,) = wait_value(lambda: findings(m, "no_workers"), bool, timeout=10,
                          message="no_workers")
    assert logged_at(m, "health finding raised", "no_workers",
                     function="nobody_serves") - fault <= WITHIN
    assert (found["function"], found["details"]["queued"]) == ("nobody_serves", 5)
    row = next(r for r in m.status()["functions"] if r["function"] == "nobody_serves")
    assert row == {"function": "nobody_serves", "server": gearmand.address, "pools": [],
                   "waiting": 5, "running": 0, "workers_ours": 0, "workers_all": 0}
    reverse = next(r for r in m.status()["functions"] if r["function"] == "reverse")
    assert (reverse["pools"], reverse["workers_ours"], reverse["workers_all"]) == (
        ["text"], 1, 1)

    # The fix: a pool that serves it.
    fixer = {"processes": 1, "functions": {"nobody_serves": "examples.text:echo"},
             "watch": False}
    m.write_config({"servers": [gearmand.address], "watch_config": False,
                    "probe_interval": "300ms", "findings": FINDINGS,
                    "pools": {"text": TEXT, "fixer": fixer}})
    assert m.ctl("reload").returncode == 0
    wait_for(lambda: not findings(m, "no_workers"), timeout=20, message="no_workers cleared")
    wait_for(lambda: gearmand.status()["nobody_serves"].queued == 0, timeout=20,
             message="the jobs ran")
    assert len(m.events("health finding cleared")) >= 1


def test_a_growing_backlog_with_its_drain_time_clears_once_it_drains(gearmand, master) -> None:
    slow = {"processes": 1, "functions": {"nap": "examples.tasks:sleep"}, "watch": False}
    m = start(master, [gearmand.address], {"slow": slow})
    wait_value(lambda: [r for r in m.status()["functions"] if r["function"] == "nap"],
               lambda rows: rows and rows[0]["workers_ours"] == 1, timeout=20,
               message="the slow pool registered")
    # 25 jobs a second arrive, 10 a second are done: the backlog grows ~4 jobs a probe.
    # They keep arriving (in a thread, bounded: 300 jobs, 12 s) until status has shown the
    # finding: a loaded machine probes late, and a backlog that stops growing clears.
    stop = threading.Event()

    def arrive() -> None:
        with Client(HOST, gearmand.port) as client:
            for i in range(300):
                if stop.wait(0.04):  # the arrival rate, not synchronisation
                    return
                client.submit_background("nap", "0.1", unique=f"nap-{i}")

    fault = time.time()
    arrivals = threading.Thread(target=arrive, daemon=True)
    arrivals.start()
    try:
        (found,) = wait_value(lambda: findings(m, "backlog_growing"), bool, timeout=15,
                              message="backlog_growing")
    finally:
        stop.set()
        arrivals.join(10)
    # The fault is a backlog that grew at each of backlog_probes probes: it exists from the
    # first arrival plus those probes (and one more interval for the probe's phase).
    assert logged_at(m, "health finding raised", "backlog_growing",
                     function="nap") - fault <= WITHIN + FINDINGS["backlog_probes"] * INTERVAL
    assert found["function"] == "nap" and found["details"]["grew_by"] > 0
    raised = [e for e in m.events("health finding raised") if e["kind"] == "backlog_growing"]
    details = raised[-1]["details"]
    assert 3 <= details["completion_rate"] <= 15  # about 10 a second
    # Both are rounded (to 0.1 s and to 0.01 jobs/s): a short drain is off by up to 0.05 s.
    assert details["drain_seconds"] == pytest.approx(
        details["waiting"] / details["completion_rate"], rel=0.05, abs=0.1)
    # Arrivals stopped: it drains, so it is growing no more.
    wait_for(lambda: not findings(m, "backlog_growing"), timeout=20,
             message="backlog_growing cleared")
    wait_for(lambda: gearmand.status()["nap"].queued == 0, timeout=30, message="drained")


WORKER = """\
import os, signal, socket, sys
flag, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
if os.path.exists(flag):  # the fixed worker registers; the broken one never does
    from gearvisor.gearman.protocol import Packet, encode
    s = socket.create_connection((host, port))
    s.sendall(encode(Packet.SET_CLIENT_ID, os.environ["GEARVISOR_CLIENT_ID"])
              + encode(Packet.CAN_DO, "cmd_fn"))
while True:  # serve nothing until stopped (SIGTERM, or SIGKILL by the fixture)
    signal.pause()
"""


def test_a_pool_whose_children_never_register_is_under_registered(
        gearmand, master, tmp_path: Path) -> None:
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    flag = tmp_path / "registers"
    cmd = {"processes": 2, "command": [sys.executable, str(script), str(flag), HOST,
                                       str(gearmand.port)],
           "functions": ["cmd_fn"], "ready": "started", "startsecs": "100ms",
           "graceful_timeout": 2, "env": {"PYTHONPATH": str(REPO)}, "watch": False}
    m = start(master, [gearmand.address], {"cmd": cmd})
    (found,) = wait_value(lambda: findings(m, "under_registered"), bool, timeout=20,
                          message="under_registered")
    assert (found["pool"], found["details"]) == ("cmd", {"registered": 0, "children": 2})
    ready = wait_value(lambda: m.status()["pools"][0], lambda p: p["ready"] == 2)
    assert ready["ready"] == 2  # gearvisor thinks they serve; gearmand knows better

    flag.write_text("")
    assert m.ctl("restart", "cmd").returncode == 0
    wait_for(lambda: len(gearmand.workers("cmd")) == 2, timeout=20,
             message="the new children registered")
    wait_for(lambda: not findings(m, "under_registered"), timeout=20,
             message="under_registered cleared")


# -- hostile job servers ------------------------------------------------------------------------

class AdminServer:
    """Plays a broken gearmand for admin connections (the probe's: they start with
    `version`) and hangs up on worker connections. `mode`: "flood" answers endless
    status lines, "silent" never answers. Bounded: 40 connections, `lifetime` seconds."""

    def __init__(self, mode: str, lifetime: float = 60.0) -> None:
        self.mode = mode
        self.probes = 0
        self.deadline = time.monotonic() + lifetime
        self.listener = socket.socket()
        self.listener.bind((HOST, 0))
        self.listener.listen(16)
        self.listener.settimeout(0.1)
        self.port = self.listener.getsockname()[1]
        self._stop = threading.Event()
        self.threads = [threading.Thread(target=self._accept, daemon=True)]
        self.threads[0].start()

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"

    def _running(self) -> bool:
        return not self._stop.is_set() and time.monotonic() < self.deadline

    def _accept(self) -> None:
        accepted = 0
        while self._running() and accepted < 40:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                continue
            accepted += 1
            t = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            self.threads.append(t)
            t.start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(0.5)
            try:
                if not conn.recv(100).startswith(b"version"):
                    return  # a worker: hang up
                self.probes += 1
                if self.mode == "flood":
                    # Past the probe's line cap in one send: a thread of a busy test
                    # process must not be what decides whether the cap is reached in time.
                    conn.sendall(b"OK 1.0\nOK 99\n" + b"fn\t1\t0\t0\n" * (PROBE_MAX_LINES + 1))
                # Then (silent: only) hold the connection open, saying nothing, until the
                # test stops the server or its deadline passes.
                self._stop.wait(max(0.0, self.deadline - time.monotonic()))
            except OSError:
                pass  # the probe gave up on it and closed: what it should do

    def stop(self) -> None:
        self._stop.set()
        for t in self.threads:
            t.join(timeout=5)
        self.listener.close()


@pytest.mark.parametrize("mode, error", [("flood", "more than"), ("silent", "no whole answer")])
def test_a_hostile_job_server_fails_its_probes_and_costs_the_master_nothing(
        gearmand, master, mode: str, error: str) -> None:
    hostile = AdminServer(mode)
    try:
        # 1s probes: time for the flood's 450 KB to be read on a loaded machine
        m = start(master, [gearmand.address, hostile.address], {"text": TEXT},
                  probe_interval="1s")
        wait_answered(m, gearmand.address)
        row = wait_value(lambda: server_row(m, hostile.address),
                         lambda s: s and not s["up"], timeout=20,
                         message="the hostile server marked down")
        assert error in row["error"] and not row["answered"] and row["version"] is None
        assert hostile.probes >= 3
        (down,) = findings(m, "server_down")
        assert down["server"] == hostile.address
        # The master stays itself: it answers, the good server is served, memory bounded.
        with Client(HOST, gearmand.port) as client:
            assert client.call("reverse", "abc").data == b"cba"
        assert psutil.Process(m.pid).memory_info().rss < 150 * 1024 * 1024
        good = server_row(m, gearmand.address)
        assert good["up"] and good["answered"] and good["last_answer_age"] < 5
    finally:
        hostile.stop()
