"""Integration: a real gearmand, a real master, real forked children and real signals.

What is asserted comes from gearmand itself (`workers`, `status`, the gearman/gearadmin CLI)
wherever it can, not only from gearvisor's own log.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
from conftest import HOST, wait_equal, wait_for, wait_value, write_module

from gearvisor.gearman.client import Client

pytestmark = pytest.mark.integration

FAST_BACKOFF = {"initial": 0.05, "max": 0.4, "multiplier": 2.0, "jitter": 0.0,
                "reset_after": 30}


def pool_cfg(servers, functions, processes=2, **extra):
    return {"servers": servers, "pools": {"work": {"processes": processes,
                                                   "functions": functions, **extra}}}


def registered(server, pool="work", n=2):
    return lambda: len(server.workers(pool)) >= n and server.workers(pool)


def test_results_text_binary_and_1mb(gearmand, master):
    m = master(pool_cfg([gearmand.address], {"reverse": "examples.text:reverse",
                                             "echo": "examples.text:echo"}))
    wait_for(registered(gearmand), message="2 children registered")
    # The real gearman CLI, as a user would.
    out = subprocess.run(["gearman", "-h", HOST, "-p", str(gearmand.port), "-f", "reverse",
                          "hello gearvisor"], capture_output=True, text=True, timeout=20)
    assert out.stdout == "rosivraeg olleh"
    # Binary with NULs and every byte value, and 1 MB, through our test client.
    binary = bytes(range(256)) * 4 + b"\0\0end\0"
    big = os.urandom(1024 * 1024)
    with Client(HOST, gearmand.port) as c:
        r = c.call("echo", binary)
        assert r.ok and r.data == binary
        r = c.call("echo", big)
        assert r.ok and r.data == big
    assert m.proc.poll() is None


def test_titles_and_client_ids(gearmand, master):
    m = master(pool_cfg([gearmand.address], {"reverse": "examples.text:reverse"},
                        client_id_prefix="testhost"))
    wait_for(registered(gearmand), message="2 children registered")
    ids = sorted(w.client_id for w in gearmand.workers("work"))
    assert ids == ["testhost:work:0", "testhost:work:1"]
    # Registered in gearmand comes before a child's idle title: wait for both titles.
    wait_equal(lambda: sorted(t for t in m.titles().values() if "idle" in t),
               ["gearvisor: work[0] idle", "gearvisor: work[1] idle"], message="idle titles")
    title = " ".join(psutil.Process(m.pid).cmdline()).strip()
    assert title == f"gearvisor: master -c {m.config_path}"


def test_job_exception_is_a_failure_with_text(gearmand, master):
    m = master(pool_cfg([gearmand.address], {"flaky": "examples.flaky:flaky"}, processes=1))
    wait_for(registered(gearmand, n=1), message="child registered")
    out = subprocess.run(["gearman", "-h", HOST, "-p", str(gearmand.port), "-f", "flaky",
                          "fail"], capture_output=True, text=True, timeout=20)
    assert out.returncode != 0
    assert "RuntimeError: flaky failure on 'fail'" in out.stderr
    raised = wait_for(lambda: m.events("job raised"))
    assert raised[0]["function"] == "flaky" and raised[0]["pool"] == "work"
    assert "Traceback" in raised[0]["traceback"] and raised[0]["handle"].startswith("H:")
    assert raised[0]["unique"]
    # The child survived its job's exception.
    assert len(gearmand.workers("work")) == 1


def test_kill9_busy_child_is_replaced_and_background_job_completes(gearmand, master, tmp_path):
    done = tmp_path / "done"
    done.mkdir()
    write_module(tmp_path, "slowjobs", f"""
        import os, time
        def slow(job):
            time.sleep(float(job.text()))
            with open(os.path.join({str(done)!r}, job.unique), "a") as f:
                f.write(str(os.getpid()) + "\\n")
            return "ok"
    """)
    m = master(pool_cfg([gearmand.address], {"slow": "slowjobs:slow"},
                        backoff=FAST_BACKOFF))
    wait_for(registered(gearmand), message="2 children registered")
    with Client(HOST, gearmand.port) as c:
        c.submit_background("slow", "1.5", unique="bg-job-1")
    busy = wait_for(lambda: m.child_with_title("busy slow"), message="a busy child")
    survivors = {pid for pid in m.titles() if pid != busy}
    os.kill(busy, signal.SIGKILL)
    # Its replacement registers: gearmand's own list (and the real gearadmin tool) say so.
    replacement = wait_for(lambda: [pid for pid, t in m.titles().items()
                                    if pid != busy and "work[" in t and "starting" not in t
                                    and pid not in survivors] or None,
                           message="replacement child ready")
    assert len(replacement) == 1
    wait_for(lambda: len(gearmand.workers("work")) == 2, message="replacement registered")
    assert gearmand.gearadmin("--workers").count(":work:") == 2
    assert busy not in m.titles()
    # gearmand requeued the job when the connection dropped; another child finished it.
    finished = wait_for(lambda: (done / "bg-job-1").exists() and (done / "bg-job-1").read_text(),
                        timeout=15, message="background job completed")
    assert str(busy) not in finished.split()
    crash = wait_for(lambda: m.events("child crashed; restarting with backoff"))
    assert crash[0]["status"] == "killed by SIGKILL" and crash[0]["child_pid"] == busy


def test_children_register_again_after_gearmand_restart(gearmand, master):
    master(pool_cfg([gearmand.address], {"reverse": "examples.text:reverse"}))
    wait_for(registered(gearmand), message="2 children registered")
    gearmand.stop()
    gearmand.start()  # same port
    t0 = time.monotonic()
    wait_for(registered(gearmand), timeout=5, message="re-registered within 5 s")
    assert time.monotonic() - t0 < 5
    with Client(HOST, gearmand.port) as c:
        assert c.call("reverse", "abc").data == b"cba"


def test_two_servers_one_down(gearmand_factory, master):
    a, b = gearmand_factory(), gearmand_factory()
    m = master(pool_cfg([a.address, b.address], {"reverse": "examples.text:reverse"},
                        reconnect_max_delay=0.5))
    wait_for(registered(a), message="registered on A")
    wait_for(registered(b), message="registered on B")
    b.stop()
    with Client(HOST, a.port) as c:
        for i in range(20):
            assert c.call("reverse", f"job{i}").data == f"job{i}"[::-1].encode()
    b.start()
    wait_for(registered(b), timeout=5, message="registered on B again")
    with Client(HOST, b.port) as c:
        assert c.call("reverse", "back").data == b"kcab"
    with Client(HOST, a.port) as c:
        assert c.call("reverse", "still").data == b"llits"
    assert m.events("job server unavailable; reconnecting with backoff")
    assert m.events("reconnected to job server")


def test_import_error_backs_off_and_logs_one_reason_per_streak(gearmand, master, tmp_path):
    write_module(tmp_path, "brokenmod", "import no_such_module_xyz\n")
    m = master({"log_level": "debug", **pool_cfg(
        [gearmand.address], {"job": "brokenmod:job"}, processes=1, backoff=FAST_BACKOFF)})
    retries = wait_for(lambda: len(m.events("child still failing to boot")) >= 4 and
                       m.events("child still failing to boot"), timeout=15,
                       message="several boot retries")
    reasons = m.events("child failed to boot; retrying with backoff")
    assert len(reasons) == 1
    assert "no_such_module_xyz" in reasons[0]["reason"] and reasons[0]["pool"] == "work"
    # Backoff: the gaps between attempts grow, and no process is spinning.
    delays = [reasons[0]["retry_in"]] + [r["retry_in"] for r in retries]
    assert delays[:4] == [0.05, 0.1, 0.2, 0.4]
    assert psutil.Process(m.pid).cpu_percent(interval=0.5) < 50
    assert gearmand.workers("work") == []
    # Fix the code: the next attempt boots and registers, without restarting the master.
    write_module(tmp_path, "brokenmod", "def job(j):\n    return 'fixed'\n")
    wait_for(registered(gearmand, n=1), timeout=10, message="child boots once fixed")
    # The child registers, then tells the master it is ready; the master logs that.
    wait_for(lambda: m.events("child recovered"), message="recovery logged")
    with Client(HOST, gearmand.port) as c:
        assert c.call("job", "x").data == b"fixed"
    assert len(m.events("child failed to boot; retrying with backoff")) == 1


def test_sigterm_during_job_finishes_it_and_exits_0(gearmand, master):
    m = master(pool_cfg([gearmand.address], {"sleep": "examples.tasks:sleep"}))
    wait_for(registered(gearmand), message="2 children registered")
    with Client(HOST, gearmand.port, timeout=30) as c:
        handle = c.submit("sleep", "2")
        wait_for(lambda: m.child_with_title("busy sleep"), message="job running")
        m.signal(signal.SIGTERM)
        result = c.wait([handle])[handle]
    assert result.ok and result.data == b"slept 2"
    assert m.wait_exit(timeout=30) == 0
    wait_for(lambda: m.ours() == [], timeout=5, message="no process left behind")
    # gearmand drops a connection once it has read its end of file: poll.
    wait_equal(lambda: gearmand.workers("work"), [], message="gearmand's workers")


def test_sigquit_is_a_fast_stop(gearmand, master):
    m = master(pool_cfg([gearmand.address], {"sleep": "examples.tasks:sleep"}))
    wait_for(registered(gearmand), message="2 children registered")
    with Client(HOST, gearmand.port, timeout=30) as c:
        c.submit_background("sleep", "30", unique="long")
        wait_for(lambda: m.child_with_title("busy sleep"), message="job running")
        t0 = time.monotonic()
        m.signal(signal.SIGQUIT)
        assert m.wait_exit(timeout=10) == 0
        assert time.monotonic() - t0 < 5
    wait_for(lambda: m.ours() == [], timeout=5, message="no process left behind")
    # The job was not lost: gearmand still holds it for the next worker.
    assert wait_for(lambda: gearmand.status()["sleep"].queued == 1)


def test_master_kill9_takes_children_down_within_2s(gearmand, master):
    m = master(pool_cfg([gearmand.address], {"reverse": "examples.text:reverse"},
                        processes=3))
    wait_for(registered(gearmand, n=3), message="3 children registered")
    # (children() tells the watcher helper by its title, which it sets just after fork.)
    kids = wait_value(lambda: [p.pid for p in m.children()], lambda k: len(k) == 3,
                      message="3 worker children")
    os.kill(m.pid, signal.SIGKILL)
    m.wait_exit(timeout=5)
    t0 = time.monotonic()
    wait_for(lambda: not any(psutil.pid_exists(p) and psutil.Process(p).status() !=
                             psutil.STATUS_ZOMBIE for p in kids), timeout=2,
             message="children gone within 2 s")
    assert time.monotonic() - t0 <= 2
    # When gearmand notices is up to it, not a promise of ours: the default deadline.
    wait_equal(lambda: gearmand.workers("work"), [], message="gearmand's workers")


def test_malformed_packet_closes_one_connection_only(gearmand, master):
    # A fake "job server" that answers the worker's first packets with garbage.
    bad = socket.socket()
    bad.bind((HOST, 0))
    bad.listen(8)
    conns = []

    def serve() -> None:
        bad.settimeout(20)
        try:
            while len(conns) < 3:
                conn, _ = bad.accept()
                conns.append(conn)
                conn.recv(4096)
                conn.sendall(b"\0BAD" + b"\0" * 8)
        except OSError:
            pass

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        m = master(pool_cfg([gearmand.address, f"{HOST}:{bad.getsockname()[1]}"],
                            {"reverse": "examples.text:reverse"}, processes=1))
        wait_for(lambda: m.events("malformed packet from job server; closing that connection"),
                 message="malformed packet logged")
        wait_for(registered(gearmand, n=1), message="still registered on the real server")
        # (children() tells the watcher helper by its title, which it sets just after fork.)
        pid = wait_value(lambda: [p.pid for p in m.children()], lambda k: len(k) == 1,
                         message="one worker child")[0]
        with Client(HOST, gearmand.port) as c:
            assert c.call("reverse", "ok").data == b"ko"
        assert [p.pid for p in m.children()] == [pid]  # the child never crashed
        assert m.events("child crashed; restarting with backoff") == []
    finally:
        bad.close()
        for conn in conns:
            conn.close()
        t.join(timeout=25)


def test_check_command(tmp_path):
    good = tmp_path / "good.yaml"
    good.write_text("pools:\n  p:\n    functions:\n      reverse: examples.text:reverse\n")
    bad = tmp_path / "bad.yaml"
    bad.write_text("pools:\n  p:\n    processes: four\n    functions:\n      r: nope:nope\n")
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent))
    ok = subprocess.run([sys.executable, "-m", "gearvisor", "check", "-c", str(good)],
                        capture_output=True, text=True, env=env)
    assert ok.returncode == 0, ok.stderr
    assert "OK, 1 pool(s), 1 process(es)" in ok.stdout
    missing = tmp_path / "missing.yaml"
    missing.write_text("pools:\n  p:\n    functions:\n      r: nosuchmod_q:fn\n")
    out = subprocess.run([sys.executable, "-m", "gearvisor", "check", "-c", str(missing)],
                         capture_output=True, text=True, env=env)
    assert out.returncode == 78 and "cannot import module 'nosuchmod_q'" in out.stderr
    out = subprocess.run([sys.executable, "-m", "gearvisor", "check", "--no-import", "-c",
                          str(missing)], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    out = subprocess.run([sys.executable, "-m", "gearvisor", "check", "-c", str(bad)],
                         capture_output=True, text=True, env=env)
    assert out.returncode == 78
    assert f"{bad}:3: pools.p.processes: expected a whole number >= 0, got 'four'" in out.stderr
    assert "Traceback" not in out.stderr
