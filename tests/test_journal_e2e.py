"""The job journal end to end through a real master: real gearmand, real forked children
running user functions written to tmp_path, the real store helper writing to a real store
(SQLite under state_dir, or a real PostgreSQL), a real SMTP server (aiosmtpd) and real
signals. Every assertion is on what a real part says: the store's rows (open_store),
gearmand's own status (gearadmin), the mails the SMTP server received, `gearvisor status`.
"""

from __future__ import annotations

import email
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from conftest import HOST, REPO, free_port, wait_equal, wait_for, wait_value, write_module
from test_notifier import Mailbox

from gearvisor.gearman.client import Client
from gearvisor.journal.store import Store, StoreError, open_store

pytestmark = pytest.mark.integration

JOBS = """\
import os
import smtplib
import time
from email.message import EmailMessage
from pathlib import Path


def send_mail(job):
    key = job.text()
    mail = EmailMessage()
    mail["From"] = "gv@example.com"
    mail["To"] = "ops@example.com"
    mail["Subject"] = key
    mail["Message-ID"] = f"<{key}@gv.test>"
    mail.set_content(f"body of {key}")
    with smtplib.SMTP("127.0.0.1", int(os.environ["GV_SMTP_PORT"]), timeout=5) as s:
        s.send_message(mail)
    return b"sent"


def always_fails(job):
    raise RuntimeError(f"refused at attempt {job.attempt}")


def nap(job):
    # The first run of a job sleeps (the test SIGKILLs it); its requeued run returns.
    mark = Path(os.environ["GV_MARKS"]) / job.unique
    if not mark.exists():
        mark.write_text(str(os.getpid()))
        time.sleep(30)
    return b"woke"


def maybe(job):
    if job.data.startswith(b"fail"):
        raise ValueError("failed on purpose: " + job.text())
    return b"ok"


def quick(job):
    return b"done"


def first_fails(job):
    if job.attempt == 1:
        raise RuntimeError("the first attempt fails")
    return b"ok"


def stubborn(job):
    # Its first run ignores the soft timeout (the master kills it); its requeued run returns.
    mark = Path(os.environ["GV_MARKS"]) / job.unique
    if not mark.exists():
        mark.write_text(str(os.getpid()))
        end = time.monotonic() + 30
        while time.monotonic() < end:
            try:
                time.sleep(30)
            except BaseException:
                pass
    return b"ok"


def slowish(job):
    time.sleep(0.01)
    return b"done"


def fixed_later(job):
    # Fails until the operator's fix (a flag file) is in place.
    if not Path(os.environ["GV_FIXED"]).exists():
        raise RuntimeError("the fix is not deployed yet")
    return b"ok"
"""



def config(gearmand: Any, functions: dict[str, Any], processes: int = 2,
           journal: dict[str, Any] | None = None) -> dict[str, Any]:
    """One pool of `functions`. `journal.successes` is on: the tests count a row per job
    that ran, successes too (a success that ends a failure is recorded either way)."""
    return {"servers": [gearmand.address], "watch_config": False,
            "journal": {"successes": True, **(journal or {})},
            "pools": {"jobs": {"processes": processes, "watch": False,
                               "backoff": {"initial": 0.05},
                               "quarantine": {"enabled": False},
                               "functions": functions}}}


@pytest.fixture
def stores() -> Iterator[Any]:
    """opened(url, state_dir) -> a Store opened as the CLI opens it; closed afterwards."""
    made: list[Store] = []

    def opened(url: str, state_dir: str) -> Store:
        s = open_store(url, state_dir)
        made.append(s)
        return s

    yield opened
    for s in made:
        s.close()


def sqlite_store(stores: Any, tmp_path: Path) -> Store:
    """The master's default store (state_dir/journal.sqlite3), once the helper made it."""
    path = tmp_path / "state" / "journal.sqlite3"
    wait_for(path.exists, timeout=20, message=f"{path} created by the store helper")
    return stores("sqlite", str(tmp_path / "state"))


def by_unique(store: Store, function: str) -> dict[str, list[dict[str, Any]]]:
    """Every outcomes row of `function`, grouped by unique, oldest first."""
    out: dict[str, list[dict[str, Any]]] = {}
    for row in reversed(store.recent(function=function, limit=10_000)):
        out.setdefault(row["unique"], []).append(row)
    return out


def count_rows(store: Store, function: str) -> int:
    try:
        return len(store.recent(function=function, limit=10_000))
    except StoreError:
        return -1  # the store is down for this reader too


def registered(gearmand: Any, n: int) -> None:
    wait_for(lambda: len(gearmand.workers("jobs")) >= n, timeout=30,
             message=f"{n} children registered on gearmand")


def queue_empty(gearmand: Any, function: str, timeout: float = 30) -> None:
    """gearadmin --status (the real tool) says `function` has nothing queued or running."""
    def empty() -> bool:
        for line in gearmand.gearadmin("--status").splitlines():
            parts = line.split("\t")
            if parts[0] == function:
                return parts[1:3] == ["0", "0"]
        return False
    wait_for(empty, timeout=timeout, message=f"gearadmin --status: {function} 0 queued")


def clean_log(m: Any) -> None:
    """The master's log has no unreadable child event and no traceback but those of the
    user's own exceptions (a `job raised` line tells the function's error, on purpose)."""
    bad = []
    for line in m.log_path.read_text(errors="replace").splitlines():
        if "unreadable event" in line:
            bad.append(line)
        elif "Traceback" in line:
            try:
                event = json.loads(line).get("event")
            except ValueError:
                event = None
            if event != "job raised":
                bad.append(line)
    assert not bad, bad


def test_mails_queued_while_smtp_is_down_are_delivered_once_when_it_is_back(
        gearmand, master, stores, tmp_path) -> None:
    pytest.importorskip("aiosmtpd")
    from aiosmtpd.controller import Controller

    write_module(tmp_path, "e2ejobs", JOBS)
    smtp_port = free_port()  # nobody listens there yet: the SMTP server is down
    retry = {"max_attempts": 10, "backoff": {"initial": "0.2s", "max": "1s"}}
    m = master(config(gearmand, {"send_mail": {"callable": "e2ejobs:send_mail",
                                               "retry": retry}}),
               env={"GV_SMTP_PORT": str(smtp_port)})
    registered(gearmand, 2)
    keys = [f"mail-{i}" for i in range(20)]
    with Client(HOST, gearmand.port, timeout=10) as c:
        for key in keys:
            c.submit_background("send_mail", key, unique=key)
    store = sqlite_store(stores, tmp_path)
    # Down for a while: every job failed once, and some are being retried already.
    wait_value(lambda: by_unique(store, "send_mail"),
               lambda got: set(got) == set(keys) and any(
                   r["attempt"] >= 2 for rows in got.values() for r in rows),
               timeout=30, message="every mail failed once, some retried")
    box = Mailbox()
    controller = Controller(box, hostname=HOST, port=smtp_port)
    controller.start()
    try:
        def finished() -> dict[str, list[dict[str, Any]]]:
            return by_unique(store, "send_mail")
        got = wait_value(finished, lambda g: set(g) == set(keys) and all(
            rows[-1]["outcome"] == "success" for rows in g.values()), timeout=30,
            message="every mail's last run succeeded")
        for key in keys:
            rows = got[key]
            attempts = [r["attempt"] for r in rows]
            assert attempts == list(range(1, len(rows) + 1)), (key, rows)
            assert len(rows) >= 2, (key, rows)  # the first attempt met a down server
            assert [r["outcome"] for r in rows] == ["error"] * (len(rows) - 1) + ["success"]
            ids = {r["failure_id"] for r in rows}
            assert len(ids) == 1 and None not in ids, (key, rows)
            row = store.dead_show(ids.pop())
            assert row is not None
            assert (row["unique"], row["state"], row["attempt"]) == (key, "done",
                                                                    len(rows) - 1)
            assert row["payload"] == key.encode()
        queue_empty(gearmand, "send_mail")
        # Nothing is due any more, so nothing more can arrive: each mail came exactly once.
        ids = Counter(email.message_from_bytes(e.content)["Message-ID"]
                      for e in box.envelopes)
        assert ids == Counter({f"<{key}@gv.test>": 1 for key in keys})
    finally:
        controller.stop()
    clean_log(m)


def test_a_function_that_always_fails_ends_as_one_dead_letter_per_job_at_its_last_attempt(
        gearmand, master, stores, tmp_path) -> None:
    write_module(tmp_path, "e2ejobs", JOBS)
    retry = {"max_attempts": 3, "backoff": {"initial": "0.1s", "max": "0.3s"}}
    m = master(config(gearmand, {"always_fails": {"callable": "e2ejobs:always_fails",
                                                  "retry": retry}}))
    registered(gearmand, 2)
    keys = [f"bad-{i}" for i in range(6)]
    with Client(HOST, gearmand.port, timeout=10) as c:
        for key in keys:
            c.submit_background("always_fails", f"payload of {key}", unique=key)
    store = sqlite_store(stores, tmp_path)
    dead = wait_value(lambda: store.select_dead(function="always_fails", with_payload=True),
                      lambda rows: len(rows) == len(keys), timeout=30,
                      message="one dead letter per job")
    assert sorted(r["unique"] for r in dead) == sorted(keys)
    for row in dead:
        assert (row["state"], row["attempt"]) == ("dead", 3), row
        assert row["error"] == "refused at attempt 3"
        assert row["payload"] == f"payload of {row['unique']}".encode()
    got = by_unique(store, "always_fails")
    for key in keys:
        rows = got[key]
        assert [r["attempt"] for r in rows] == [1, 2, 3], rows
        # What the function saw as job.attempt is the attempt the store recorded.
        assert [r["error"] for r in rows] == [f"refused at attempt {r['attempt']}"
                                             for r in rows]
        assert len({r["failure_id"] for r in rows}) == 1, rows
    assert store.dead_counts() == {"always_fails": len(keys)}
    queue_empty(gearmand, "always_fails")
    wait_value(lambda: m.status().get("journal", {}).get("dead_letters"),
               lambda n: n == len(keys), timeout=20, message="status: the dead letters")
    clean_log(m)


def gv(m: Any, *args: str) -> subprocess.CompletedProcess:
    """The real CLI, as typed: `gearvisor dead replay -c FILE ...`."""
    return subprocess.run([sys.executable, "-m", "gearvisor", *args[:2], "-c",
                           str(m.config_path), *args[2:]], capture_output=True, text=True,
                          timeout=60, cwd=m.tmp, env=dict(os.environ, PYTHONPATH=str(REPO)))


def test_dead_letters_are_replayed_once_fixed_and_delete_wants_the_right_count(
        gearmand, master, stores, tmp_path) -> None:
    write_module(tmp_path, "e2ejobs", JOBS)
    fixed = tmp_path / "fixed"
    m = master(config(gearmand, {"fixed_later": "e2ejobs:fixed_later"}),
               env={"GV_FIXED": str(fixed)})
    registered(gearmand, 2)
    keys = [f"order-{i}" for i in range(4)]
    with Client(HOST, gearmand.port, timeout=10) as c:
        for key in keys:
            c.submit_background("fixed_later", key, unique=key)
    store = sqlite_store(stores, tmp_path)
    wait_value(lambda: store.dead_counts(), lambda d: d == {"fixed_later": 4}, timeout=30,
               message="no retry: one dead letter per job")
    refused = gv(m, "dead", "delete", "--function", "fixed_later", "--expect", "3")
    assert refused.returncode == 1 and "not 3" in refused.stderr, refused
    assert store.dead_counts() == {"fixed_later": 4}  # nothing deleted
    fixed.write_text("deployed")
    replayed = gv(m, "dead", "replay", "--function", "fixed_later", "--rate", "100/s")
    assert replayed.returncode == 0, replayed.stderr
    # Each runs once more, as attempt 2, and its success closes the same row.
    got = wait_value(lambda: by_unique(store, "fixed_later"),
                     lambda g: all([r["outcome"] for r in g.get(k, [])] == ["error", "success"]
                                   for k in keys), timeout=30, message="every replay ran")
    for key in keys:
        assert [r["attempt"] for r in got[key]] == [1, 2]
        [fid] = {r["failure_id"] for r in got[key]}
        assert store.dead_show(fid)["state"] == "done"
    assert store.dead_counts() == {}
    queue_empty(gearmand, "fixed_later")
    clean_log(m)


def test_a_child_sigkilled_mid_job_is_a_crash_and_the_requeued_run_finishes_it(
        gearmand, master, stores, tmp_path) -> None:
    write_module(tmp_path, "e2ejobs", JOBS)
    marks = tmp_path / "marks"
    marks.mkdir()
    m = master(config(gearmand, {"nap": "e2ejobs:nap"}, processes=1),
               env={"GV_MARKS": str(marks)})
    registered(gearmand, 1)
    with Client(HOST, gearmand.port, timeout=10) as c:
        handle = c.submit_background("nap", b"the payload", unique="nap-1")
    mark = marks / "nap-1"
    pid = int(wait_for(lambda: mark.exists() and mark.read_text(), timeout=20,
                       message="the job running in a child"))
    assert pid in [p.pid for p in m.children()]
    os.kill(pid, signal.SIGKILL)
    store = sqlite_store(stores, tmp_path)
    rows = wait_value(lambda: by_unique(store, "nap").get("nap-1", []),
                      lambda r: [x["outcome"] for x in r] == ["crash", "success"], timeout=30,
                      message="the crash and the requeued run")
    crash, success = rows
    assert crash["handle"] == success["handle"] == handle
    assert crash["error_class"] == "Crash" and "killed" in crash["error"], crash
    assert success["failure_id"] == crash["failure_id"] is not None
    row = store.dead_show(crash["failure_id"])
    assert row is not None
    assert (row["unique"], row["outcome"], row["state"]) == ("nap-1", "crash", "done")
    assert row["payload"] == b"the payload"
    assert row["payload_size"] == len(b"the payload") and not row["payload_cut"]
    assert store.dead_counts() == {}
    assert m.status()["journal"]["crash_records"] == 1
    queue_empty(gearmand, "nap")
    clean_log(m)


def test_a_job_past_its_hard_timeout_is_killed_recorded_and_finished_by_its_requeued_run(
        gearmand, master, stores, tmp_path) -> None:
    write_module(tmp_path, "e2ejobs", JOBS)
    marks = tmp_path / "marks"
    marks.mkdir()
    cfg = config(gearmand, {"stubborn": {"callable": "e2ejobs:stubborn", "timeout": "0.3s"}},
                 processes=1)
    cfg["pools"]["jobs"]["timeout_grace"] = "0.5s"
    m = master(cfg, env={"GV_MARKS": str(marks)})
    registered(gearmand, 1)
    with Client(HOST, gearmand.port, timeout=10) as c:
        c.submit_background("stubborn", b"stubborn payload", unique="st-1")
    store = sqlite_store(stores, tmp_path)
    rows = wait_value(lambda: by_unique(store, "stubborn").get("st-1", []),
                      lambda r: [x["outcome"] for x in r] == ["killed", "success"],
                      timeout=30, message="the kill and the requeued run")
    killed, success = rows
    assert killed["error_class"] == "Killed" and "hard timeout" in killed["error"], killed
    assert success["failure_id"] == killed["failure_id"] is not None
    row = store.dead_show(killed["failure_id"])
    assert row is not None
    assert (row["outcome"], row["state"], row["payload"]) == ("killed", "done",
                                                             b"stubborn payload")
    queue_empty(gearmand, "stubborn")
    clean_log(m)


def test_retries_due_while_gearmand_is_down_wait_and_run_once_it_is_back(
        gearmand, master, stores, tmp_path) -> None:
    write_module(tmp_path, "e2ejobs", JOBS)
    retry = {"max_attempts": 5, "backoff": {"initial": "1.5s", "max": "1.5s"}}
    m = master(config(gearmand, {"first_fails": {"callable": "e2ejobs:first_fails",
                                                 "retry": retry}}))
    registered(gearmand, 2)
    keys = [f"ff-{i}" for i in range(8)]
    with Client(HOST, gearmand.port, timeout=10) as c:
        for key in keys:
            c.submit_background("first_fails", key, unique=key)
    store = sqlite_store(stores, tmp_path)
    wait_value(lambda: by_unique(store, "first_fails"), lambda g: len(g) == len(keys),
               timeout=20, message="every first attempt recorded")
    gearmand.stop()
    # The store helper tried to submit a due retry, found no job server, and keeps it.
    wait_for(lambda: "it waits" in m.log_path.read_text(errors="replace"), timeout=20,
             message="a due retry waiting for a job server")
    gearmand.start()  # the same port, an empty queue
    got = wait_value(lambda: by_unique(store, "first_fails"), lambda g: all(
        rows[-1]["outcome"] == "success" for rows in g.values()), timeout=30,
        message="every retry run once gearmand is back")
    for key in keys:
        assert [(r["attempt"], r["outcome"]) for r in got[key]] == [(1, "error"),
                                                                    (2, "success")]
        assert store.dead_show(got[key][0]["failure_id"])["state"] == "done"
    clean_log(m)


def journal_status(m: Any) -> dict[str, Any]:
    return m.status().get("journal", {})


def test_a_postgresql_outage_buffers_in_the_master_and_every_record_arrives_once(
        gearmand, master, stores, postgres_factory, tmp_path) -> None:
    write_module(tmp_path, "e2ejobs", JOBS)
    pg = postgres_factory()
    url = pg.create_database()
    retry = {"max_attempts": 3, "backoff": {"initial": "0.2s", "max": "0.5s"}}
    m = master(config(gearmand, {"maybe": "e2ejobs:maybe",
                                 "first_fails": {"callable": "e2ejobs:first_fails",
                                                 "retry": retry}},
                      journal={"store": url}))
    registered(gearmand, 2)
    wait_value(lambda: journal_status(m).get("up"), lambda up: up is True, timeout=30,
               message="status: journal up")
    store = stores(url, str(m.tmp / "state"))
    with Client(HOST, gearmand.port, timeout=10) as c:
        c.wait([c.submit("maybe", "ok", unique="before")])
    wait_equal(lambda: count_rows(store, "maybe"), 1, timeout=20, message="the first row")
    store.close()
    pg.stop()
    keys = [f"{'fail' if i % 3 == 0 else 'ok'}-{i}" for i in range(12)]
    with Client(HOST, gearmand.port, timeout=10) as c:
        for key in keys:
            c.submit_background("maybe", key, unique=key)
        for i in range(4):  # retried: their retries are due while the store is down
            c.submit_background("first_fails", f"r-{i}", unique=f"r-{i}")
    queue_empty(gearmand, "maybe")
    queue_empty(gearmand, "first_fails")
    down = wait_value(lambda: journal_status(m), lambda j: j.get("up") is False,
                      timeout=30, message="status: journal down")
    assert down["error"], down
    wait_value(lambda: journal_status(m), lambda j: j.get("waiting", 0) >= 1, timeout=20,
               message="records waiting in the master")
    pg.start()  # the same port and data
    store = stores(url, str(m.tmp / "state"))
    wait_equal(lambda: count_rows(store, "maybe"), len(keys) + 1, timeout=40,
               message="every record written after the outage")
    wait_value(lambda: journal_status(m), lambda j: j.get("up") is True
               and j.get("waiting") == 0, timeout=30, message="status: journal up, flushed")
    got = by_unique(store, "maybe")
    assert {k: len(v) for k, v in got.items()} == {k: 1 for k in [*keys, "before"]}
    for key in keys:
        assert got[key][0]["outcome"] == ("error" if key.startswith("fail") else "success")
    failing = sorted(k for k in keys if k.startswith("fail"))
    assert sorted(r["unique"] for r in store.select_dead(function="maybe")) == failing
    # The retries written after the outage are submitted then, and run once each.
    retried = wait_value(lambda: by_unique(store, "first_fails"), lambda g: len(g) == 4 and all(
        rows[-1]["outcome"] == "success" for rows in g.values()), timeout=30,
        message="the retries run after the outage")
    for rows in retried.values():
        assert [(r["attempt"], r["outcome"]) for r in rows] == [(1, "error"), (2, "success")]
        assert store.dead_show(rows[0]["failure_id"])["state"] == "done"
    clean_log(m)


def test_killing_the_store_helper_while_jobs_run_loses_and_duplicates_nothing(
        gearmand, master, stores, tmp_path) -> None:
    write_module(tmp_path, "e2ejobs", JOBS)
    m = master(config(gearmand, {"quick": "e2ejobs:quick"}))
    registered(gearmand, 2)
    helper = wait_value(lambda: journal_status(m).get("helper", {}).get("pid"),
                        lambda pid: bool(pid), timeout=20, message="the store helper's pid")
    assert helper in [p.pid for p in m.processes()]
    store = sqlite_store(stores, tmp_path)
    keys = [f"q-{i}" for i in range(300)]
    deadline = time.monotonic() + 30
    with Client(HOST, gearmand.port, timeout=10) as c:
        for key in keys[:150]:
            c.submit_background("quick", key, unique=key)
        wait_value(lambda: count_rows(store, "quick"), lambda n: n >= 20, timeout=20,
                   message="some records stored")
        os.kill(helper, signal.SIGKILL)
        for key in keys[150:]:  # jobs run while the helper is dead and being restarted
            c.submit_background("quick", key, unique=key)
            assert time.monotonic() < deadline
    new = wait_value(lambda: journal_status(m).get("helper", {}).get("pid"),
                     lambda pid: pid not in (None, helper), timeout=30,
                     message="a new store helper")
    assert psutil.pid_exists(new)
    queue_empty(gearmand, "quick")
    wait_equal(lambda: count_rows(store, "quick"), len(keys), timeout=30,
               message="every record stored")
    got = by_unique(store, "quick")
    assert {k: len(v) for k, v in got.items()} == {k: 1 for k in keys}
    wait_value(lambda: journal_status(m), lambda j: j.get("waiting") == 0
               and j.get("dropped") == 0, timeout=20, message="nothing waiting or dropped")
    clean_log(m)


def test_a_graceful_stop_writes_the_record_of_every_job_that_ran(
        gearmand, master, stores, tmp_path) -> None:
    """SIGTERM while jobs run: the children finish their job and send their last journal
    lines on the way out; the store helper gets them before its end of input."""
    write_module(tmp_path, "e2ejobs", JOBS)
    m = master(config(gearmand, {"slowish": "e2ejobs:slowish"}))
    registered(gearmand, 2)
    store = sqlite_store(stores, tmp_path)
    keys = [f"s-{i}" for i in range(300)]
    with Client(HOST, gearmand.port, timeout=10) as c:
        for key in keys:
            c.submit_background("slowish", key, unique=key)
    wait_value(lambda: count_rows(store, "slowish"), lambda n: n >= 10, timeout=20,
               message="some records stored")
    m.signal(signal.SIGTERM)
    assert m.wait_exit() == 0
    left = gearmand.status()["slowish"]
    assert left.queued > 0 and left.running == 0, left  # stopped while jobs were queued
    done = sum(e["jobs_done"] for e in m.events("child exiting"))
    assert done == len(keys) - left.queued  # what the children ran, as gearmand says
    got = by_unique(store, "slowish")
    assert len(got) == done and all(len(rows) == 1 for rows in got.values())
    clean_log(m)
