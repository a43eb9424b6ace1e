"""The master's crash records (master/journal.py): one builder for the job a child died
running, whether a Python child's scoreboard or a command child's JobStarted said what it
was; and a Python child SIGKILLed mid-job, for real, is still recorded."""

from __future__ import annotations

import base64
import hashlib
import json
import signal
from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest
from conftest import HOST, wait_for

from gearvisor import messages as msg
from gearvisor.config.model import RetryConfig
from gearvisor.gearman.client import Client
from gearvisor.journal import store
from gearvisor.journal.parse import MAX_RECORDS
from gearvisor.journal.record import JOURNAL_PREFIX, MAX_LINE, journal_line
from gearvisor.master.journal import completed, crash_record
from gearvisor.policy.child import Child, RunningJob, reported_job


def pool(failed_payload: dict[str, str] | None = None) -> SimpleNamespace:
    return SimpleNamespace(name="php", config=SimpleNamespace(
        failed_payload=failed_payload or {}))


def child() -> Child:
    return Child(pool="php", slot=2, generation=5, started_at=0.0)


def test_a_reported_job_keeps_its_payload_cut_to_the_cap() -> None:
    job = reported_job(msg.JobStarted("f", "H:1", "u", base64.b64encode(b"x" * 100).decode(),
                                      100), started=7.0, cap=10)
    assert (job.payload, job.size, job.cut, job.started) == (b"x" * 10, 100, True, 7.0)
    whole = reported_job(msg.JobStarted("f", "H:1", "u", "aGk=", 2), 0.0, 64)
    assert (whole.payload, whole.size, whole.cut) == (b"hi", 2, False)
    # The worker sent a shorter payload than it said it had (its own cap): cut.
    short = reported_job(msg.JobStarted("f", "H:1", "u", "aGk=", 9), 0.0, 64)
    assert (short.payload, short.size, short.cut) == (b"hi", 9, True)


@pytest.mark.parametrize("b64, size", [("!!not base64", 3), ("", 5)])
def test_a_payload_that_does_not_decode_or_was_not_sent_is_not_kept(b64: str,
                                                                     size: int) -> None:
    job = reported_job(msg.JobStarted("f", "H", "u", b64, size), 0.0, 64)
    assert job.payload is None and job.cut and job.size == size
    record = crash_record(job, child(), pool(), 3 << 8, 1.0, 1000.0, "h")  # type: ignore[arg-type]
    assert (record["payload"], record["payload_sha256"], record["payload_cut"]) == (
        None, None, None)


def test_an_empty_payload_is_kept_empty() -> None:
    job = reported_job(msg.JobStarted("f", "H", "u", "", 0), 0.0, 64)
    assert (job.payload, job.cut) == (b"", False)


def test_the_crash_record_of_a_reported_retry() -> None:
    job = RunningJob("send", "H:x:9", "gv:41:3:mail-7", started=10.0, payload=b"hello",
                     size=5, cut=False)
    record = crash_record(job, child(), pool(), 3 << 8, now=12.5, wall=1000.0,  # type: ignore[arg-type]
                          host="web1")
    assert record == {
        "outcome": "crash", "function": "send", "unique": "mail-7", "handle": "H:x:9",
        "server": None, "pool": "php", "slot": 2, "host": "web1", "generation": 5,
        "attempt": 3, "retry_of": 41, "started": 997.5, "seconds": 2.5,
        "error_class": "Crash", "error": "the child exited with code 3 in the middle of the job",
        "traceback": None, "payload": base64.b64encode(b"hello").decode(),
        "payload_sha256": hashlib.sha256(b"hello").hexdigest(), "payload_size": 5,
        "payload_cut": False, "decision": "requeued", "due": None}


def test_failed_payload_hash_and_drop_and_a_kill() -> None:
    job = RunningJob("send", "H", "u", 0.0, b"secret", 6, False)
    hashed = crash_record(job, child(), pool({"send": "hash"}), 9, 1.0, 9.0, "h")  # type: ignore[arg-type]
    assert hashed["payload"] is None and hashed["payload_sha256"] == hashlib.sha256(
        b"secret").hexdigest()
    killed = child()
    killed.killed_for = "timeout"
    dropped = crash_record(job, killed, pool({"send": "drop"}), 9, 1.0, 9.0, "h")  # type: ignore[arg-type]
    assert (dropped["payload"], dropped["payload_sha256"]) == (None, None)
    assert (dropped["outcome"], dropped["error_class"]) == ("killed", "Killed")
    assert dropped["error"] == "killed by the master: its hard timeout passed"


# -- a command worker's own records, completed by the master ------------------------------------

RETRY = RetryConfig(max_attempts=3, initial=10.0, multiplier=2.0, max=60.0,
                    outcomes=("error",))


def shim_line(*records: dict) -> bytes:
    """A journal line as the PHP shim writes it (decision "dead", no attempt, no payload)."""
    return journal_line([{"outcome": "error", "function": "send", "handle": "H:x:9",
                          "pool": "php", "slot": 2, "error": "boom", "decision": "dead",
                          **r} for r in records]).rstrip(b"\n")


def records_of(line: bytes) -> list:
    assert line.startswith(JOURNAL_PREFIX)
    return json.loads(line)["records"]


def retrying(failed_payload: dict[str, str] | None = None) -> SimpleNamespace:
    p = pool(failed_payload)
    p.config.retry = {"send": RETRY}
    return p


def test_a_command_workers_error_gets_its_attempt_payload_and_retry_decision() -> None:
    job = RunningJob("send", "H:x:9", "gv:41:2:mail-7", 10.0, b"hello", 5, False)
    line = shim_line({"unique": "gv:41:2:mail-7"})
    (rec,) = records_of(completed(line, job, retrying(), wall=1000.0, rand=lambda: 0.5))  # type: ignore[arg-type]
    assert (rec["unique"], rec["attempt"], rec["retry_of"]) == ("mail-7", 2, 41)
    assert (rec["payload"], rec["payload_size"], rec["payload_cut"]) == (
        base64.b64encode(b"hello").decode(), 5, False)
    assert rec["payload_sha256"] == hashlib.sha256(b"hello").hexdigest()
    # attempt 2 of 3 failed: retried within the ceiling after it (10 * 2), jittered by 0.5
    assert (rec["decision"], rec["due"]) == ("retry", 1010.0)
    assert (rec["error"], rec["slot"]) == ("boom", 2)  # the shim's own fields stay


def test_a_command_workers_last_attempt_or_an_unretried_function_stays_dead() -> None:
    job = RunningJob("send", "H:x:9", "gv:41:3:mail-7", 10.0, b"hello", 5, False)
    last = shim_line({"unique": "gv:41:3:mail-7"})
    (rec,) = records_of(completed(last, job, retrying(), wall=1000.0))  # type: ignore[arg-type]
    assert (rec["attempt"], rec["decision"], rec.get("due")) == (3, "dead", None)
    first = shim_line({"unique": "mail-8"})
    no_retry = pool({"send": "hash"})
    no_retry.config.retry = {}
    (rec,) = records_of(completed(first, None, no_retry, wall=1000.0))  # type: ignore[arg-type]
    assert (rec["attempt"], rec["retry_of"], rec["decision"]) == (1, None, "dead")
    assert "payload_size" not in rec  # no JobStarted to take it from


def test_a_command_workers_record_without_a_unique_is_not_retried() -> None:
    """Perl's Gearman::Worker never sees the unique: a retry of its job would look like a
    first attempt every time, so its failures are dead letters (replayable by hand)."""
    job = RunningJob("send", "H:x:9", "", 10.0, b"hello", 5, False)
    (rec,) = records_of(completed(shim_line({"unique": ""}), job, retrying(), wall=1000.0))  # type: ignore[arg-type]
    assert (rec["decision"], rec["payload_size"]) == ("dead", 5)


def test_a_record_of_another_job_keeps_no_payload_and_garbage_passes_on_as_it_is() -> None:
    job = RunningJob("send", "H:other", "u", 10.0, b"hello", 5, False)
    (rec,) = records_of(completed(shim_line({"unique": "u"}), job, retrying(), wall=1.0))  # type: ignore[arg-type]
    assert "payload" not in rec
    for garbage in (JOURNAL_PREFIX + b"not json", JOURNAL_PREFIX + b'7]}',
                    b'{"event": "journal", "records": 5}'):
        assert completed(garbage, job, retrying(), wall=1.0) == garbage  # type: ignore[arg-type]
    odd = journal_line([7, None, {"outcome": "error", "function": 3}]).rstrip(b"\n")
    assert records_of(completed(odd, job, retrying(), wall=1.0)) == records_of(odd)  # type: ignore[arg-type]


def test_hostile_journal_lines_cannot_blow_up_or_raise_in_the_master() -> None:
    """Many records naming the running job get its payload once, not once each (2,000 of
    them would have made a 175 MB line); a payload that would push the line past the
    store's cap is left out; lines nested too deep to decode, with an unhashable outcome,
    or with more records than the store takes pass on unchanged."""
    big = b"x" * 60_000
    job = RunningJob("send", "H:x:9", "u", 10.0, big, len(big), False)
    many = shim_line(*[{"unique": "u"}] * 2000)
    recs = records_of(completed(many, job, retrying(), wall=1.0))  # type: ignore[arg-type]
    assert [r.get("payload_size") for r in recs] == [len(big)] + [None] * 1999
    near_cap = shim_line({"unique": "u", "error": "e" * (MAX_LINE - 60_000)})
    (rec,) = records_of(completed(near_cap, job, retrying(), wall=1.0))  # type: ignore[arg-type]
    assert rec["payload"] is None and rec["payload_size"] == len(big)
    assert rec["payload_sha256"] == hashlib.sha256(big).hexdigest()
    deep = JOURNAL_PREFIX + b"[" * 100_000 + b"]" * 100_000 + b"]}"
    unhashable = shim_line({"unique": "u", "outcome": []})
    too_many = journal_line([{}] * (MAX_RECORDS + 1)).rstrip(b"\n")
    for line in (deep, unhashable, too_many):
        out = completed(line, job, retrying(), wall=1.0)  # type: ignore[arg-type]
        assert out == line or records_of(out) == records_of(line)


@pytest.mark.integration
def test_a_python_child_killed_mid_job_is_a_crash_with_its_unique_and_payload(
        gearmand, master, tmp_path: Path) -> None:
    m = master({"servers": [gearmand.address], "watch_config": False, "pools": {
        "slow": {"processes": 1, "functions": {"nap": "examples.tasks:sleep"},
                 "watch": False}}})
    wait_for(lambda: m.status()["pools"][0]["ready"] == 1, timeout=20, message="ready")
    with Client(HOST, gearmand.port, timeout=10) as c:
        c.submit_background("nap", "30", "nap-1")
    busy = wait_for(lambda: next((ch["pid"] for ch in m.status()["pools"][0]["children"]
                                  if ch["state"] == "busy"), None), message="the job runs")
    psutil.Process(busy).send_signal(signal.SIGKILL)

    def crashes() -> list[dict]:
        if not (tmp_path / "state" / "journal.sqlite3").exists():
            return []
        s = store.open_store("sqlite", str(tmp_path / "state"))
        try:
            return s.recent(function="nap")
        finally:
            s.close()
    rows = wait_for(crashes, timeout=20, message="the crash recorded")
    assert (rows[-1]["outcome"], rows[-1]["unique"], rows[-1]["pool"]) == (
        "crash", "nap-1", "slow")
    assert rows[-1]["error"] == "the child killed by SIGKILL in the middle of the job"


def test_a_job_refused_without_running_leaves_no_payload_of_the_job_before_it(
        tmp_path: Path) -> None:
    """A refused job (too big, or poison) is marked busy for a moment on the scoreboard: a
    crash in that moment must not read the last job's payload as its own."""
    import os

    import structlog

    from gearvisor.child.python import _ChildHooks
    from gearvisor.config.load import parse
    from gearvisor.job import Job
    from gearvisor.shm.payload import PayloadArea
    from gearvisor.shm.scoreboard import Scoreboard

    config = parse("pools: {mail: {functions: {send: 'm:send'}}}",
                   str(tmp_path / "pools.yaml"), euid=1000).pools["mail"]
    board = Scoreboard(None, PayloadArea(1024))
    r, w = os.pipe()
    try:
        hooks = _ChildHooks(config, 0, w, board, False, structlog.get_logger())
        hooks.job_started(Job("send", "H:1", "u-1", b"the first job's secret", print))
        hooks.job_finished(Job("send", "H:1", "u-1", b"", print), True, 0.001)
        assert board.payload.read() == (b"the first job's secret", 22, False)
        hooks.job_refused(Job("send", "H:2", "u-2", b"x" * 5000, print))
        assert board.payload.read() is None
        hooks.job_poisoned(Job("send", "H:3", "u-3", b"poison", print))
        assert board.payload.read() is None
    finally:
        os.close(r)
        os.close(w)
        board.close()
