"""Integration: command pools (external workers) against a real gearmand.

The PHP worker (php-gearman's GearmanWorker) and the Perl worker (Gearman::Worker) from
examples/ run for real: crash and restart, a rolling reload with no job lost, a stop with jobs
in flight. Plus the generic machinery with plain commands: failed starts, quarantine,
max_restarts, output capture and its rate limit, and gearmand itself as a command pool.
"""

from __future__ import annotations

import collections
import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import psutil
import pytest
from conftest import HOST, REPO, free_port, wait_equal, wait_for
from workload import CapacityWatch, Load

from gearvisor.gearman import admin
from gearvisor.gearman.client import Client
from gearvisor.journal import store

pytestmark = pytest.mark.integration

PHP = REPO / "examples" / "php" / "worker.php"
PERL = REPO / "examples" / "perl" / "worker.pl"


def have_php() -> bool:
    return shutil.which("php") is not None and subprocess.run(
        ["php", "-r", 'exit(class_exists("GearmanWorker") ? 0 : 1);'],
        capture_output=True).returncode == 0


def have_perl() -> bool:
    return subprocess.run(["perl", "-MGearman::Worker", "-e", "1"],
                          capture_output=True).returncode == 0


needs_php = pytest.mark.skipif(not have_php(), reason="php-cli + php-gearman not installed "
                               "(bash examples/setup.sh installs them)")
needs_perl = pytest.mark.skipif(not have_perl(), reason="libgearman-client-perl not installed "
                                "(bash examples/setup.sh installs it)")

LANGS = {
    "php": pytest.param(("php", PHP, "php_record", "php_slow", "php-v1"), marks=needs_php,
                        id="php"),
    "perl": pytest.param(("perl", PERL, "perl_record", "perl_slow", "perl-v1"),
                         marks=needs_perl, id="perl"),
}


def registered(gearmand, pool: str, function: str) -> list[admin.WorkerInfo]:
    return [w for w in gearmand.workers(pool) if function in w.functions]


def lang_pool(tmp_path: Path, lang: tuple, processes: int = 3, **extra) -> dict:
    """A pool running a copy of the example worker (so the test may edit it)."""
    exe, script, record, slow, _ = lang
    copy = tmp_path / script.name
    copy.write_text(script.read_text())
    shim = script.with_name("gearvisor" + script.suffix)  # the reporting shim it requires
    (tmp_path / shim.name).write_text(shim.read_text())
    functions = {"php": ["php_reverse", "php_slow", "php_record", "php_crash", "php_fail",
                         "php_flaky", "php_kill", "php_kill_once"],
                 "perl": ["perl_upper", "perl_slow", "perl_record", "perl_crash",
                          "perl_fail"]}[exe]
    return {"processes": processes, "command": [exe, str(copy)], "functions": functions,
            "ready": "registered", "startsecs": "100ms", "graceful_timeout": 20,
            "env": {"RESULTS": str(tmp_path / "results.txt")}, "watch": False, **extra}


def start(gearmand, master, pools: dict, **top):
    m = master({"servers": [gearmand.address], "watch_config": False, "pools": pools, **top})
    return m


def results(tmp_path: Path) -> collections.Counter:
    path = tmp_path / "results.txt"
    if not path.exists():
        return collections.Counter()
    return collections.Counter(line.split()[0] for line in path.read_text().splitlines())


@pytest.mark.parametrize("lang", [LANGS["php"], LANGS["perl"]])
def test_a_command_worker_registers_with_its_client_id_and_restarts_after_a_crash(
        gearmand, master, tmp_path, lang):
    exe, _, record, _, version = lang
    m = start(gearmand, master, {"w": lang_pool(tmp_path, lang, processes=2)})
    wait_for(lambda: len(registered(gearmand, "w", record)) == 2, timeout=20,
             message="both workers registered")
    children = wait_for(lambda: (p := m.status()["pools"][0])["ready"] == 2 and p["children"],
                        message="both ready in gearvisor")
    ids = {w.client_id for w in registered(gearmand, "w", record)}
    assert ids == {f"{_prefix(m)}:w:{c['slot']}:{c['pid']}" for c in children}
    assert all(c["state"] == "idle" for c in children)
    with Client(HOST, gearmand.port, timeout=20) as c:
        r = c.call(record, "x", "first")
    assert (r.ok, r.data) == (True, version.encode())
    # The environment: GEARVISOR_POOL/SLOT reached the worker (its start-up line says so),
    # and its stderr is in gearvisor's log with pool, slot and pid.
    lines = wait_for(lambda: [e for e in m.logs() if e.get("source") == "stderr"
                              and "serving" in e.get("event", "")], message="worker output")
    assert {(e["pool"], e["slot"], e["child_pid"]) for e in lines} >= {
        ("w", c["slot"], c["pid"]) for c in children}
    assert any(e["event"].endswith(f"serving w[{e['slot']}]") for e in lines)
    # A crash (SIGKILL) is restarted with backoff and registers again.
    victim = children[0]["pid"]
    psutil.Process(victim).kill()
    wait_for(lambda: len(registered(gearmand, "w", record)) == 2 and victim not in {
        c["pid"] for c in m.status()["pools"][0]["children"]}, timeout=20,
        message="the crashed worker replaced")
    crashed = m.events("child crashed; restarting with backoff")
    assert crashed and crashed[0]["child_pid"] == victim


def _prefix(m) -> str:
    import socket
    return socket.gethostname().split(".")[0] or "gearvisor"


@pytest.mark.parametrize("lang", [LANGS["php"], LANGS["perl"]])
def test_a_rolling_reload_of_command_workers_loses_no_job(gearmand, master, tmp_path, lang):
    exe, _, record, _, _ = lang
    m = start(gearmand, master, {"w": lang_pool(tmp_path, lang, processes=3)})
    wait_for(lambda: len(registered(gearmand, "w", record)) == 3, timeout=20,
             message="registered")
    # Ready in gearvisor too (it polls gearmand): a child still starting when the reload
    # comes is replaced outright, which is no dip gearvisor promised.
    wait_for(lambda: m.status()["pools"][0]["ready"] == 3, message="ready in gearvisor")
    capacity = CapacityWatch(gearmand, count=lambda: len(registered(gearmand, "w", record)))
    load = Load(gearmand, background=True, tag="job", function=record, payload="x")
    capacity.start()
    load.start()
    try:
        wait_for(lambda: len(load.submitted) >= 30, message="load running")
        out = m.ctl("reload")
        assert out.returncode == 0 and "w: ok (generation 2)" in out.stdout, out.stderr
        wait_for(lambda: len(load.submitted) >= 80, message="more load after the roll")
    finally:
        load.stop()
        capacity.stop()
    assert load.error is None, load.error
    done = wait_for(lambda: (r := results(tmp_path)) and len(r) >= len(load.submitted) and r,
                    timeout=30, message="every job done")
    # Perl's Gearman::Worker writes the handle (it has no unique accessor): count lines.
    assert sum(done.values()) == len(load.submitted)
    assert all(v == 1 for v in done.values())
    assert capacity.samples > 0
    assert capacity.low >= 3, f"registered workers fell to {capacity.low} during the roll"
    # A retired worker is listed until it has exited and been reaped: poll.
    wait_equal(lambda: {c["generation"] for c in m.status()["pools"][0]["children"]}, {2},
               message="generations in status")


@pytest.mark.parametrize("lang", [LANGS["php"], LANGS["perl"]])
def test_stop_lets_command_workers_finish_jobs_in_flight(gearmand, master, tmp_path, lang):
    exe, _, _, slow, _ = lang
    m = start(gearmand, master, {"w": lang_pool(tmp_path, lang, processes=2)})
    wait_for(lambda: len(registered(gearmand, "w", slow)) == 2, timeout=20,
             message="registered")
    outcomes: list = []

    def call() -> None:
        with Client(HOST, gearmand.port, timeout=30) as c:
            outcomes.append(c.call(slow, "1.0"))

    callers = [threading.Thread(target=call, daemon=True) for _ in range(2)]
    for t in callers:
        t.start()
    wait_for(lambda: (st := gearmand.status().get(slow)) and st.running == 2,
             message="two jobs running")
    m.signal(15)
    assert m.wait_exit(timeout=30) == 0
    for t in callers:
        t.join(30)
    assert [(r.ok, r.data) for r in outcomes] == [(True, b"slept")] * 2
    assert not m.events("child did not stop in time; killing")


def test_a_command_that_exits_at_once_fails_to_start_then_quarantines_then_gives_up(
        gearmand, master, tmp_path):
    m = start(gearmand, master, {
        "bad": {"processes": 1, "command": [sys.executable, "-c", "import sys; sys.exit(2)"],
                # startsecs well above the time Python takes to start and exit on a loaded
                # machine: the command must fail before it, every time.
                "startsecs": "3s", "backoff": {"initial": 0, "max": "50ms"},
                "quarantine": {"cooldown": "100ms"}, "max_restarts": 7, "watch": False}})
    wait_for(lambda: m.events("master started"), message="master up")
    row = wait_for(lambda: (c := m.status()["pools"][0]["children"][0])["state"] == "fatal"
                   and c, timeout=20, message="the slot given up")
    assert "max_restarts: 7" in row["reason"] and "code 2" in row["reason"]
    failed = m.events("child failed to boot; retrying with backoff")
    assert len(failed) == 1  # logged once per streak, not once per attempt
    assert "before startsecs" in failed[0]["reason"]
    assert m.events("giving up on this slot: no more restarts until `gearvisor restart` or a "
                    "reload")
    assert "no restart" in m.ctl("status").stdout
    # `gearvisor restart` tries again (and the slot fails again, fast).
    out = m.ctl("restart", "bad")
    assert out.returncode == 1  # the roll reports the failure
    assert "failed" in out.stdout + out.stderr


def test_a_failed_start_is_logged_once_however_long_each_attempt_lived(gearmand, master,
                                                                      tmp_path):
    """The same failure is the same reason: how long each attempt lived (which varies on a
    busy machine) must not make every attempt a new reason, logged loudly again."""
    attempts = tmp_path / "attempts"
    script = ("import pathlib, sys, time\n"
              f"log = pathlib.Path({str(attempts)!r})\n"
              "n = len(log.read_text()) if log.exists() else 0\n"
              "with log.open('a') as f:\n"
              "    f.write('x')\n"
              "time.sleep(0.3 * (n % 3))  # 0, 0.3, 0.6 s: each attempt lives another time\n"
              "sys.exit(2)\n")
    (tmp_path / "dies.py").write_text(script)
    m = start(gearmand, master, {
        "bad": {"processes": 1, "command": [sys.executable, str(tmp_path / "dies.py")],
                "startsecs": "2s", "backoff": {"initial": 0, "max": "50ms"},
                "max_restarts": 3, "watch": False}}, log_level="debug")
    wait_for(lambda: m.status()["pools"][0]["children"][0]["state"] == "fatal", timeout=20,
             message="the slot given up")
    lived = [e["uptime"] for e in m.events("child failed to boot; retrying with backoff")
             + m.events("child still failing to boot")]
    assert len(lived) == 3 and max(lived) - min(lived) > 0.3, lived  # they did differ
    failed = m.events("child failed to boot; retrying with backoff")
    assert len(failed) == 1, [e["reason"] for e in failed]  # once per streak
    assert failed[0]["reason"].endswith("exited with code 2 before startsecs (2s)")


def test_output_lines_are_captured_and_a_flood_is_dropped_not_blocking(gearmand, master,
                                                                       tmp_path):
    done = tmp_path / "flood-done"
    script = ("import os, pathlib, signal, sys, time\n"
              "print('hello from the worker', flush=True)\n"
              "print('an error line', file=sys.stderr, flush=True)\n"
              f"go = pathlib.Path({str(tmp_path / 'go')!r})\n"
              "for _ in range(30000):  # wait (bounded) for the test to say go\n"
              "    if go.exists():\n"
              "        break\n"
              "    time.sleep(0.001)\n"
              "for i in range(200000):\n"
              "    try:\n"
              "        os.write(1, b'line %d\\n' % i)\n"
              "    except BlockingIOError:\n"
              "        pass  # a full pipe: this line is lost, the worker goes on\n"
              f"pathlib.Path({str(done)!r}).touch()\n"
              "signal.pause()  # the worker idles until gearvisor's SIGTERM ends it\n")
    (tmp_path / "chatty.py").write_text(script)
    m = start(gearmand, master, {
        "chatty": {"processes": 1, "command": [sys.executable, str(tmp_path / "chatty.py")],
                   "output_rate": 100, "startsecs": "100ms", "watch": False}})
    wait_for(lambda: any(e.get("event") == "an error line" for e in m.logs()),
             message="the first lines logged")
    (tmp_path / "go").touch()  # now the flood
    wait_for(done.exists, timeout=30, message="the worker got through its flood unblocked")
    # stdout and stderr are two pipes: the stderr line may be logged before the stdout one.
    hello = wait_for(lambda: next((e for e in m.logs()
                                   if e.get("event") == "hello from the worker"), None),
                     message="the stdout line logged")
    pid = m.status()["pools"][0]["children"][0]["pid"]
    assert (hello["pool"], hello["slot"], hello["child_pid"], hello["source"]) == (
        "chatty", 0, pid, "stdout")
    assert any(e.get("event") == "an error line" and e["source"] == "stderr" for e in m.logs())
    dropped = wait_for(lambda: m.events("output dropped: the pool writes more lines than "
                                        "output_rate"), timeout=20, message="drops counted")
    assert dropped[0]["dropped"] > 1000 and dropped[0]["output_rate"] == 100
    logged = sum(1 for e in m.logs() if str(e.get("event", "")).startswith("line "))
    assert logged < 2000  # the flood did not go to the log


def test_gearmand_itself_as_a_command_pool(master, tmp_path):
    gearmand = shutil.which("gearmand") or "/usr/sbin/gearmand"
    if not Path(gearmand).exists():
        pytest.skip("gearmand not installed")
    port = free_port()
    m = master({"servers": [f"127.0.0.1:{port}"], "watch_config": False, "pools": {
        "gearmand": {"processes": 1, "command": [gearmand, "-L", "127.0.0.1", "-p", str(port),
                                                 "-t", "1", "--log-file=none"],
                     "startsecs": "300ms", "watch": False},
        "text": {"processes": 2, "functions": {"reverse": "examples.text:reverse"},
                 "watch": False}}})
    wait_for(lambda: sum(1 for w in admin.workers(HOST, port, 2.0) if w.functions) == 2,
             timeout=20, message="python workers registered on the supervised gearmand")
    with Client(HOST, port, timeout=10) as c:
        assert c.call("reverse", "stack").data == b"kcats"
    # The text children are ready in gearvisor once their ready event (sent after gearmand
    # answered them) has been read: poll the master's view as a whole.
    wait_equal(lambda: [(p["name"], p["ready"]) for p in m.status()["pools"]],
               [("gearmand", 1), ("text", 2)],
               message="gearmand ready once it lived startsecs, and both text children")
    st = m.status()["pools"]
    assert json.dumps(st[0]["command"]).startswith('["' + gearmand)


def test_output_to_a_rotated_log_file(gearmand, master, tmp_path):
    script = ("import os, signal\n"
              "for i in range(400):\n"
              "    os.write(1, b'x' * 100 + b' %d\\n' % i)\n"
              "signal.pause()  # the worker idles until gearvisor's SIGTERM ends it\n")
    (tmp_path / "writer.py").write_text(script)
    m = start(gearmand, master, {
        "writer": {"processes": 1, "command": [sys.executable, str(tmp_path / "writer.py")],
                   "log_file": "writer.log", "log_file_max": 8192, "log_file_backups": 2,
                   "startsecs": "100ms", "watch": False}})
    log = tmp_path / "writer.log"  # relative to the config file
    wait_for(lambda: (tmp_path / "writer.log.2").exists() and log.exists()
             and " 399" in log.read_text(), timeout=20, message="rotated log files")
    assert not (tmp_path / "writer.log.3").exists()  # backups kept: 2
    assert all(p.stat().st_size <= 8192 + 200 for p in tmp_path.glob("writer.log*"))
    pid = m.status()["pools"][0]["children"][0]["pid"]
    assert f"writer[0] pid {pid} stdout: " in log.read_text()
    assert not [e for e in m.logs() if str(e.get("event", "")).startswith("x" * 100)]


@needs_php
def test_editing_a_command_workers_script_rolls_its_pool(gearmand, master, tmp_path):
    pool = lang_pool(tmp_path, LANGS["php"].values[0], processes=2)
    del pool["watch"]  # the default: *.php beside the script
    m = start(gearmand, master, {"w": pool}, watch_debounce="200ms")
    wait_for(lambda: m.status()["pools"][0]["ready"] == 2, timeout=20, message="ready")
    script = tmp_path / "worker.php"
    script.write_text(script.read_text().replace('"php-v1"', '"php-v2-edited"'))
    wait_for(lambda: (p := m.status()["pools"][0])["generation"] == 2 and not p["rolling"]
             and p["ready"] == 2, timeout=20, message="rolled after the edit")
    with Client(HOST, gearmand.port, timeout=20) as c:
        assert c.call("php_record", "x", "after-edit").data == b"php-v2-edited"


def journal_rows(tmp_path: Path, function: str) -> list[dict]:
    """The master's job journal (the default SQLite store under state_dir): `function`'s
    recent outcomes, newest first; [] while the store helper has not created it yet."""
    if not (tmp_path / "state" / "journal.sqlite3").exists():
        return []
    s = store.open_store("sqlite", str(tmp_path / "state"))
    try:
        return s.recent(function=function)
    finally:
        s.close()


def journal_failure(tmp_path: Path, failure_id: int) -> dict | None:
    s = store.open_store("sqlite", str(tmp_path / "state"))
    try:
        return s.dead_show(failure_id)
    finally:
        s.close()


CRASH_LANGS = [pytest.param(("php", PHP, "php_crash", "php_fail", "php-v1"), marks=needs_php,
                            id="php"),
               pytest.param(("perl", PERL, "perl_crash", "perl_fail", "perl-v1"),
                            marks=needs_perl, id="perl")]


@pytest.mark.parametrize("lang", CRASH_LANGS)
def test_a_command_workers_crash_mid_job_and_its_error_are_in_the_journal(
        gearmand, master, tmp_path, lang):
    # The example worker reports each job through its shim (gearvisor.php / gearvisor.pl)
    # on fd 3: the master records the job a worker died running, and stores the error
    # record the shim wrote for a job that failed.
    exe, _, crash, fail, _ = lang
    m = start(gearmand, master, {"w": lang_pool(tmp_path, lang, processes=1)})
    wait_for(lambda: m.status()["pools"][0]["ready"] == 1, timeout=20, message="ready")
    with Client(HOST, gearmand.port, timeout=20) as c:
        r = c.call(fail, "the impossible", "fail-1")
        assert not r.ok  # the client heard of the failure (WORK_FAIL)
        failed = wait_for(lambda: journal_rows(tmp_path, fail), timeout=20,
                          message="the error record stored")
        assert failed[0]["outcome"] == "error"
        assert failed[0]["error"].strip() == "cannot do the impossible"
        assert (failed[0]["pool"], failed[0]["slot"]) == ("w", 0)
        if exe == "php":  # Gearman::Worker (Perl) does not get the unique (GRAB_JOB)
            assert failed[0]["unique"] == "fail-1"
        pid = m.status()["pools"][0]["children"][0]["pid"]
        # The worker dies mid-job: the first death is recorded, with the job's function,
        # unique and payload. gearmand gives a Perl worker's job to the restarted worker
        # again (the master records the death it saw: requeued); PHP's exit() makes
        # libgearman send WORK_FAIL, so gearmand drops it: the shim's shutdown hook
        # records that crash as over (dead).
        c.submit_background(crash, "die", "crash-1")
        rows = wait_for(lambda: journal_rows(tmp_path, crash), timeout=20,
                        message="the crash recorded")
    first = rows[-1]
    assert (first["outcome"], first["function"], first["pool"], first["slot"]) == (
        "crash", crash, "w", 0)
    assert first["unique"] == ("crash-1" if exe == "php" else "")
    failure = journal_failure(tmp_path, first["failure_id"])
    assert failure is not None and (failure["payload"], failure["payload_size"]) == (b"die", 3)
    if exe == "php":
        assert first["error"] == ("exit() in the middle of the job (libgearman failed the "
                                  "job as the worker exited: gearmand dropped it)")
        assert (first["error_class"], failure["state"]) == ("Exit", "dead")
        wait_for(lambda: f"{crash}\t0\t0\t1" in gearmand.gearadmin("--status").splitlines(),
                 timeout=20, message="gearmand dropped the job (gearadmin --status)")
    else:
        assert first["error"] == "the child exited with code 3 in the middle of the job"
        assert failure["state"] == "requeued"
    wait_for(lambda: pid not in {c["pid"] for c in m.status()["pools"][0]["children"]},
             message="the dead worker reaped")
    # (the master's own crash records: PHP's came from its shim)
    written = m.status()["journal"]["crash_records"]
    assert written == 0 if exe == "php" else written >= 1


@pytest.mark.parametrize("lang", [
    pytest.param(("php", PHP, "php_kill"), marks=needs_php, id="php"),  # (php_crash's exit
    pytest.param(("perl", PERL, "perl_crash"), marks=needs_perl, id="perl")])  # sends FAIL)
def test_a_job_that_crashed_poison_after_command_workers_is_refused_by_their_shim(
        gearmand, master, tmp_path, lang):
    # gearmand hands a job whose worker died to the next worker, forever. With
    # poison_after: 2 the master lists the job after the second death; the third worker's
    # shim fails it without running it (WORK_FAIL: gearmand drops it) and records why.
    exe, script, crash = lang
    lang = LANGS[exe].values[0]
    pool = lang_pool(tmp_path, lang, processes=1, poison_after=2,
                     backoff={"initial": 0, "jitter": 0})
    m = start(gearmand, master, {"w": pool})
    wait_for(lambda: m.status()["pools"][0]["ready"] == 1, timeout=20, message="ready")
    with Client(HOST, gearmand.port, timeout=20) as c:
        c.submit_background(crash, "die", "poison-1")
    refused = wait_for(lambda: [r for r in journal_rows(tmp_path, crash)
                                if r["outcome"] == "poison"], timeout=30,
                       message="the shim's refusal recorded")
    assert refused[0]["error_class"] == "Poison" and "without running" in refused[0]["error"]
    assert (refused[0]["unique"] or "") == ("poison-1" if exe == "php" else "")
    crashes = [r for r in journal_rows(tmp_path, crash) if r["outcome"] == "crash"]
    assert len(crashes) == 2, crashes  # the two deaths, and no third
    said = m.events("poison job: it crashed; 2 command workers died on it, so from now on "
                    "this pool's shim (gearvisor_run) fails it without running; a worker "
                    "that does not use the shim runs it again: start gearmand with "
                    "--job-retries=N to drop it there")
    assert len(said) == 1 and said[0]["function"] == crash
    # gearmand's own view: the job is gone, and the third worker is still serving.
    wait_for(lambda: f"{crash}\t0\t0\t1" in gearmand.gearadmin("--status").splitlines(),
             timeout=20, message="gearmand dropped the job (gearadmin --status)")
    pid = m.status()["pools"][0]["children"][0]["pid"]
    with Client(HOST, gearmand.port, timeout=20) as c:
        assert c.call(pool["functions"][2], "after", "after-poison").ok  # *_record
    assert m.status()["pools"][0]["children"][0]["pid"] == pid


@pytest.mark.parametrize("lang", [LANGS["php"], LANGS["perl"]])
def test_a_command_workers_job_past_its_hard_timeout_is_killed_recorded_and_replaced(
        gearmand, master, tmp_path, lang):
    # A command pool maps its functions to their keys: the slow one gets a timeout. The
    # shim's JobStarted times it; at timeout + timeout_grace the worker's group is
    # SIGKILLed, the kill is in the journal, and a new worker registers with gearmand.
    exe, _, record, slow, _ = lang
    pool = lang_pool(tmp_path, lang, processes=1, timeout_grace="300ms",
                     graceful_timeout="3s", backoff={"initial": 0, "jitter": 0})
    pool["functions"] = {name: None for name in pool["functions"]}
    pool["functions"][slow] = {"timeout": "500ms"}
    m = start(gearmand, master, {"w": pool})
    wait_for(lambda: len(registered(gearmand, "w", record)) == 1, timeout=20,
             message="the worker registered")
    pid = wait_for(lambda: [c["pid"] for c in m.status()["pools"][0]["children"]
                            if c["state"] == "idle"], message="ready in gearvisor")[0]
    with Client(HOST, gearmand.port, timeout=20) as c:
        assert c.call(slow, "0.1").ok  # in time: the worker lives on
        assert c.call(record, "x", "after-in-time").ok
        assert any(w.client_id.endswith(f":{pid}") for w in registered(gearmand, "w", record))
        c.submit_background(slow, "600", "hung-1")
        killed = wait_for(lambda: m.events("job hung past its timeout; killing the child"),
                          timeout=20, message="the hard timeout")[0]
    assert (killed["child_pid"], killed["function"], killed["timeout"]) == (pid, slow, 0.5)
    rows = wait_for(lambda: [r for r in journal_rows(tmp_path, slow)
                             if r["outcome"] == "killed"], timeout=20,
                    message="the kill recorded")
    assert (rows[-1]["pool"], rows[-1]["error_class"]) == ("w", "Killed")
    assert "hard timeout" in rows[-1]["error"], rows[-1]
    if exe == "php":  # Gearman::Worker (Perl) does not get the unique (GRAB_JOB)
        assert rows[-1]["unique"] == "hung-1"
    # gearmand's own view: a worker that is not the killed one registers.
    wait_for(lambda: [w for w in registered(gearmand, "w", record)
                      if not w.client_id.endswith(f":{pid}")], timeout=20,
             message="a new worker registered")
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


def retrying_php(gearmand, master, tmp_path: Path, function: str, attempts: int):
    """A ready master with one PHP worker whose `function` retries up to `attempts`."""
    pool = lang_pool(tmp_path, LANGS["php"].values[0], processes=1)
    pool["functions"] = {name: None for name in pool["functions"]}
    pool["functions"][function] = {"retry": {
        "max_attempts": attempts, "backoff": {"initial": "200ms", "max": "200ms"}}}
    m = start(gearmand, master, {"w": pool})
    wait_for(lambda: m.status()["pools"][0]["ready"] == 1, timeout=20, message="ready")
    return m


@needs_php
def test_a_php_workers_failed_job_is_retried_then_a_dead_letter_with_its_payload(
        gearmand, master, tmp_path):
    # The shim writes its error record as a dead letter with no payload; the master fills
    # in the payload of the job it reported, the attempt, and the function's retry
    # decision. The store helper submits the retry to gearmand; the worker fails it again;
    # at max_attempts the failure is dead, with its payload (replayable).
    retrying_php(gearmand, master, tmp_path, "php_fail", 2)
    with Client(HOST, gearmand.port, timeout=20) as c:
        c.submit_background("php_fail", "the impossible", "fail-r")
    rows = wait_for(lambda: len(r := journal_rows(tmp_path, "php_fail")) == 2 and r,
                    timeout=30, message="the first run and its retry recorded")
    first, retry = sorted(rows, key=lambda r: r["attempt"])
    assert [(r["attempt"], r["unique"], r["outcome"]) for r in (first, retry)] == [
        (1, "fail-r", "error"), (2, "fail-r", "error")]
    assert first["failure_id"] == retry["failure_id"] is not None
    failure = journal_failure(tmp_path, first["failure_id"])
    assert failure is not None
    assert (failure["state"], failure["attempt"], failure["payload"]) == (
        "dead", 2, b"the impossible")
    assert failure["error"].strip() == "cannot do the impossible"
    # gearmand ran it twice and holds nothing more of it.
    wait_for(lambda: gearmand.status()["php_fail"].queued == 0, timeout=20,
             message="php_fail's queue empty")


@needs_php
def test_a_php_workers_retry_that_succeeds_ends_its_failure(gearmand, master, tmp_path):
    # The shim writes no success records: the master records the success of a retry's
    # run (its gv: unique) when the shim says the job ended, so the failure is done, not
    # left `submitted` (which the store would submit again hours later).
    retrying_php(gearmand, master, tmp_path, "php_flaky", 3)
    with Client(HOST, gearmand.port, timeout=20) as c:
        c.submit_background("php_flaky", "twice", "flaky-1")
        assert c.call("php_reverse", "abc").data == b"cba"  # no record: successes are off
    rows = wait_for(lambda: len(r := journal_rows(tmp_path, "php_flaky")) == 2 and r,
                    timeout=30, message="the failed run and its retry's success")
    first, retry = sorted(rows, key=lambda r: r["attempt"])
    assert [(r["attempt"], r["unique"], r["outcome"]) for r in (first, retry)] == [
        (1, "flaky-1", "error"), (2, "flaky-1", "success")]
    assert (retry["pool"], retry["failure_id"]) == ("w", first["failure_id"])
    # inside the worker, gearvisor_attempt() saw the client's unique and each attempt
    ran = (tmp_path / "results.txt").read_text().splitlines()
    assert ran == ["flaky-1 attempt 1", "flaky-1 attempt 2"]
    failure = journal_failure(tmp_path, first["failure_id"])
    assert failure is not None and failure["state"] == "done", failure
    assert journal_rows(tmp_path, "php_reverse") == []


@needs_php
def test_a_php_job_that_crashed_its_worker_then_succeeded_ends_its_failure(
        gearmand, master, tmp_path):
    # The crash is recorded `requeued` (gearmand hands the job out again); the run that
    # succeeds ends it, as the master saw the shim's job_ended, with poison_after: 0 too.
    pool = lang_pool(tmp_path, LANGS["php"].values[0], processes=1, poison_after=0,
                     backoff={"initial": 0, "jitter": 0})
    m = start(gearmand, master, {"w": pool})
    wait_for(lambda: m.status()["pools"][0]["ready"] == 1, timeout=20, message="ready")
    with Client(HOST, gearmand.port, timeout=20) as c:
        c.submit_background("php_kill_once", "x", "once-1")
    rows = wait_for(lambda: len(r := journal_rows(tmp_path, "php_kill_once")) == 2 and r,
                    timeout=30, message="the crash and the success recorded")
    assert sorted(r["outcome"] for r in rows) == ["crash", "success"]
    failure = wait_for(lambda: (f := journal_failure(tmp_path, rows[0]["failure_id"]
                                                     or rows[1]["failure_id"]))
                       and f["state"] == "done" and f, timeout=20, message="the failure done")
    assert failure["function"] == "php_kill_once"
    wait_for(lambda: "php_kill_once\t0\t0\t1" in gearmand.gearadmin("--status").splitlines(),
             timeout=20, message="gearmand holds nothing of it (gearadmin --status)")


@needs_php
def test_journal_successes_records_every_php_job_that_ended(gearmand, master, tmp_path):
    pool = lang_pool(tmp_path, LANGS["php"].values[0], processes=1)
    m = start(gearmand, master, {"w": pool}, journal={"successes": True})
    wait_for(lambda: m.status()["pools"][0]["ready"] == 1, timeout=20, message="ready")
    with Client(HOST, gearmand.port, timeout=20) as c:
        for i in range(3):
            assert c.call("php_reverse", f"job {i}", f"rev-{i}").ok
    rows = wait_for(lambda: len(r := journal_rows(tmp_path, "php_reverse")) == 3 and r,
                    timeout=20, message="three successes recorded")
    assert sorted((r["outcome"], r["unique"], r["attempt"]) for r in rows) == [
        ("success", f"rev-{i}", 1) for i in range(3)]
    assert {(r["pool"], r["slot"]) for r in rows} == {("w", 0)}


def test_a_command_writing_garbage_and_huge_lines_to_fd_3_does_not_hurt_the_master(
        gearmand, master, tmp_path):
    # fd 3 is the worker's to write: non-JSON, unknown events, wrong types, a JobStarted
    # far over every cap and lines past the line cap are dropped and logged (a flood only
    # at 1, 10, 100, ... lines), and the master goes on serving and answering.
    done = tmp_path / "garbage-done"
    script = (
        "import os, pathlib, signal\n"
        "fd = int(os.environ['GEARVISOR_EVENT_FD'])\n"
        "def say(data):\n"
        "    os.write(fd, data)\n"
        "say(b'not json at all\\n')\n"
        "say(b'{\"event\": \"launch_missiles\"}\\n')\n"
        "say(b'{\"event\": \"job_started\", \"size\": \"big\"}\\n')\n"
        "say(b'\\xff\\xfe\\x00\\n' * 5000)\n"
        "say(b'x' * (3 << 20) + b'\\n')\n"  # a line over the 1 MiB cap
        "say(b'{\"event\": \"job_started\", \"function\": \"' + b'f' * 100000 +"
        " b'\", \"payload_b64\": \"' + b'QUJD' * 200000 + b'\", \"size\": 99}\\n')\n"
        "say(b'{\"event\": \"job_started\", \"function\": \"f\", \"payload_b64\": \"!!\"}\\n')\n"
        f"pathlib.Path({str(done)!r}).touch()\n"
        "signal.pause()\n")
    (tmp_path / "garbage.py").write_text(script)
    m = start(gearmand, master, {
        "junk": {"processes": 1, "command": [sys.executable, str(tmp_path / "garbage.py")],
                 "startsecs": "100ms", "watch": False},
        "text": {"processes": 1, "functions": {"reverse": "examples.text:reverse"},
                 "watch": False}})
    wait_for(done.exists, timeout=20, message="the worker wrote its garbage")
    unreadable = wait_for(lambda: [e for e in m.events("unreadable event from child")
                                   if e.get("unreadable") == 1000], timeout=20,
                          message="the flood of unreadable lines counted")
    logged = m.events("unreadable event from child")
    assert len(logged) <= 5 and logged[0]["pool"] == "junk", logged  # 1, 10, 100, 1000
    assert unreadable[0]["pool"] == "junk"
    assert m.events("event line from child too long; dropped (said once per child)")
    with Client(HOST, gearmand.port, timeout=10) as c:
        assert c.call("reverse", "stack").data == b"kcats"  # the master serves on
    pools = {p["name"]: p for p in m.status()["pools"]}
    pid = pools["junk"]["children"][0]["pid"]
    assert pools["junk"]["ready"] == 1 and psutil.Process(pid).is_running()
    # The garbage JobStarted was kept as the worker's job (cut to the caps): its death
    # now is a crash record with the payload that did not decode left out.
    psutil.Process(pid).kill()
    rows = wait_for(lambda: journal_rows(tmp_path, "f"), timeout=20,
                    message="the last JobStarted's crash recorded")
    assert rows[0]["outcome"] == "crash" and m.proc.poll() is None


@pytest.mark.parametrize("fds", [(3, 4), (4, 3), (7, 4), (3, 9), (6, 5)])
def test_keep_fds_at_moves_the_event_pipe_and_the_list_whatever_fds_they_had(fds):
    # In a forked child, as exec_command does: the event pipe and an own read-only open of
    # the poison list end at 3 and 4, inheritable, whatever fds they started at.
    from gearvisor.child.command import keep_fds_at, own_reader
    from gearvisor.shm.poison import PoisonList

    poison = PoisonList()
    poison.add("c" * 40)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report on the pipe's read end what it found, then exit
        code = 1
        try:
            event_at, list_at = fds
            os.dup2(w, event_at)
            own = own_reader(poison.fd)
            os.dup2(own, list_at)
            keep_fds_at({event_at: 3, list_at: 4})
            ok = (os.get_inheritable(3) and os.get_inheritable(4)
                  and os.pread(4, 100, 0) == b"c" * 40 + b"\n")
            try:
                os.write(4, b"x")
                ok = False  # (read-only: a worker cannot write to the list)
            except OSError:
                pass
            os.write(3, b"ok" if ok else b"no")
            code = 0
        finally:
            os._exit(code)
    os.close(w)
    try:
        assert os.read(r, 2) == b"ok"
        assert os.waitpid(pid, 0)[1] == 0
    finally:
        os.close(r)
        poison.close()
