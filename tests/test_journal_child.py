"""The journal from a real forked Python child on a real gearmand: one record per job that
ended, written to the child's event pipe (read here as the master would), job.attempt from
a retry's unique, and the payload copy a crash record reads from shared memory."""

from __future__ import annotations

import base64
import json
import os
import signal
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import HOST, wait_for, write_module

from gearvisor.child.python import run_child
from gearvisor.config import parse
from gearvisor.gearman.client import Client
from gearvisor.journal.record import JOURNAL_PREFIX, retry_unique
from gearvisor.shm.payload import PayloadArea
from gearvisor.shm.scoreboard import Scoreboard

pytestmark = pytest.mark.integration

MODULE = """
import time

def ok(job):
    return f"{job.attempt}:{job.unique}"

def fail(job):
    raise ValueError("smtp down: " + job.text())

def slow(job):
    time.sleep(5)

def hang(job):
    time.sleep(30)
"""

CONFIG = """\
state_dir: {dir}/state
journal: {{payload_cap: 8{journal}}}
pools:
  jp:
    servers: ["{address}"]
    watch: false
    quarantine: {{enabled: false}}
    functions:
      ok: jmod:ok
      fail:
        callable: jmod:fail
        retry: {{max_attempts: 3, backoff: {{initial: 10s, max: 1m}}}}
      hashed:
        callable: jmod:fail
        failed_payload: hash
      slow: {{callable: jmod:slow, timeout: 0.2s}}
      hang: jmod:hang
"""


class Child:
    """One forked child running run_child, its event pipe read here."""

    def __init__(self, pid: int, fd: int, board: Scoreboard) -> None:
        self.pid, self.fd, self.board = pid, fd, board
        self.buf = bytearray()
        self.lines: list[bytes] = []

    def read(self) -> list[dict]:
        """Every journal record the child wrote so far."""
        while True:
            try:
                data = os.read(self.fd, 1 << 20)
            except BlockingIOError:
                break
            if not data:
                break
            self.buf += data
        while (end := self.buf.find(b"\n")) >= 0:
            self.lines.append(bytes(self.buf[:end]))
            del self.buf[:end + 1]
        records = []
        for line in self.lines:
            if line.startswith(JOURNAL_PREFIX):
                records += json.loads(line)["records"]
        return records


@pytest.fixture
def child(tmp_path: Path, gearmand) -> Iterator[Callable[..., Child]]:
    started: list[Child] = []
    write_module(tmp_path, "jmod", MODULE)

    def start(journal: str = ", successes: true") -> Child:
        path = tmp_path / "pools.yaml"
        path.write_text(CONFIG.format(dir=tmp_path, address=gearmand.address,
                                      journal=journal))
        cfg = parse(path.read_text(), str(path), euid=1000)
        pool = cfg.pools["jp"]
        board = Scoreboard(None, PayloadArea(cfg.journal.payload_cap)
                           if cfg.journal.enabled else None)
        r, w = os.pipe()
        os.set_blocking(r, False)
        parent = os.getpid()
        pid = os.fork()
        if pid == 0:  # (run_child never returns: it ends in os._exit)
            os.close(r)
            # pytest's capture objects write to an fd the child closes (it keeps only
            # stdio and its event pipe): log to the real stdio, as a forked child does.
            sys.stdout, sys.stderr = sys.__stdout__, sys.__stderr__
            run_child(cfg, pool, 0, 3, w, parent, set(), board)
        os.close(w)
        c = Child(pid, r, board)
        started.append(c)
        wait_for(lambda: gearmand.workers("jp"), message="the child registered")
        return c

    try:
        yield start
    finally:
        for c in started:
            try:
                os.kill(c.pid, signal.SIGKILL)
                os.waitpid(c.pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass
            os.close(c.fd)
            c.board.close()


def by_unique(records: list[dict]) -> dict[str, dict]:
    return {r["unique"]: r for r in records}


def test_every_job_that_ended_is_recorded(child, gearmand) -> None:
    c = child()
    with Client(HOST, gearmand.port) as client:
        assert client.call("ok", b"x", unique="u-ok").data == b"1:u-ok"
        assert not client.call("fail", b"0123456789", unique="u-fail").ok
        assert not client.call("hashed", b"secret", unique="u-hash").ok
        assert not client.call("slow", b"", unique="u-slow").ok
    # Nothing queued: the worker waits for work, which writes what it recorded.
    got = wait_for(lambda: (lambda r: r if len(r) == 4 else None)(by_unique(c.read())),
                   message="4 records")
    ok = got["u-ok"]
    assert (ok["outcome"], ok["function"], ok["pool"], ok["slot"], ok["generation"],
            ok["attempt"], ok["server"]) == ("success", "ok", "jp", 0, 3, 1,
                                             f"{HOST}:{gearmand.port}")
    assert ok["handle"].startswith("H:") and ok["seconds"] >= 0 and ok.get("decision") is None
    err = got["u-fail"]
    assert (err["outcome"], err["error_class"], err["error"]) == (
        "error", "ValueError", "smtp down: 0123456789")
    assert "raise ValueError" in err["traceback"]
    assert base64.b64decode(err["payload"]) == b"01234567" and err["payload_cut"] is True
    assert err["payload_size"] == 10
    assert err["decision"] == "retry"  # fail has retry: (attempt 1 of 3)
    hashed = got["u-hash"]
    assert "payload" not in hashed and len(hashed["payload_sha256"]) == 64
    assert hashed["decision"] == "dead"  # no retry: for it
    timeout = got["u-slow"]
    assert (timeout["outcome"], timeout["error_class"]) == ("timeout", "JobTimeout")


def test_a_retry_unique_gives_the_attempt_and_the_original_unique(child, gearmand) -> None:
    c = child()
    with Client(HOST, gearmand.port) as client:
        assert client.call("ok", b"", unique=retry_unique(42, 3, "mail-7")).data == b"3:mail-7"
        assert not client.call("fail", b"", unique=retry_unique(43, 3, "mail-8")).ok
        assert client.call("ok", b"", unique="gv:not-ours").data == b"1:gv:not-ours"
    got = wait_for(lambda: (lambda r: r if len(r) == 3 else None)(by_unique(c.read())),
                   message="3 records")
    assert (got["mail-7"]["attempt"], got["mail-7"]["retry_of"]) == (3, 42)
    # the last of max_attempts 3: a dead letter now
    assert (got["mail-8"]["attempt"], got["mail-8"]["decision"]) == (3, "dead")
    assert got["gv:not-ours"]["attempt"] == 1 and "retry_of" not in got["gv:not-ours"]


def test_successes_off_and_journal_off(child, gearmand) -> None:
    c = child(", successes: false")
    with Client(HOST, gearmand.port) as client:
        assert client.call("ok", b"", unique="s1").ok
        assert not client.call("fail", b"", unique="f1").ok
    assert wait_for(lambda: [r["unique"] for r in c.read()] == ["f1"], message="f1 only")


def test_journal_off_writes_no_journal_line(child, gearmand) -> None:
    c = child(", enabled: false")
    with Client(HOST, gearmand.port) as client:
        assert not client.call("fail", b"", unique="f1").ok
        assert client.call("ok", b"", unique="s1").ok
    # The child's other events still arrive (the Ready line); no journal line among them.
    wait_for(lambda: c.read() == [] and c.lines, message="the child's events")
    assert c.board.payload is None
    assert not any(line.startswith(JOURNAL_PREFIX) for line in c.lines)


def test_a_child_killed_mid_job_leaves_its_payload_and_retry_unique(child, gearmand) -> None:
    c = child()
    with Client(HOST, gearmand.port) as client:
        client.submit_background("hang", b"the payload", unique=retry_unique(9, 2, "job-9"))
        snap = wait_for(lambda: (lambda s: s if s and s.busy else None)(c.board.read()),
                        message="the child busy")
        os.kill(c.pid, signal.SIGKILL)
        os.waitpid(c.pid, 0)
    assert snap.function == "hang" and snap.unique == "gv:9:2:job-9"
    assert c.board.payload.read() == (b"the payl", 11, True)  # payload_cap 8
