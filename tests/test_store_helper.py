"""The job store helper (gearvisor/helpers/store.py) as the master runs it: forked, numbered
journal lines in on one pipe, acks and state reports out on the other; a real store
(SQLite, or a real PostgreSQL for the outage) and a real gearmand for the retries."""

from __future__ import annotations

import base64
import os
import select
import signal
import socket
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import HOST, Gearmand, wait_equal, wait_for, wait_value

from gearvisor import messages as msg
from gearvisor.config.model import Server
from gearvisor.gearman.protocol import Decoder, Packet, encode
from gearvisor.helpers import store as helper
from gearvisor.journal import record, store
from gearvisor.journal.settings import StoreSettings

pytestmark = pytest.mark.integration


def rec(outcome: str = "success", unique: str = "u1", **kw: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"outcome": outcome, "function": "send_mail", "unique": unique,
                            "pool": "mail", "slot": 0, "host": "h1", "attempt": 1,
                            "started": time.time(), "seconds": 0.1}
    if outcome != "success":
        base.update(error_class="SMTPError", error="refused", decision="dead",
                    payload=base64.b64encode(f"body of {unique}".encode()).decode())
    base.update(kw)
    return base


def line(seq: int, *records: dict[str, Any]) -> bytes:
    return str(seq).encode() + b" " + record.journal_line(list(records))


class Helper:
    """One forked store helper and its two pipes; its stderr goes to a file."""

    def __init__(self, settings: StoreSettings, log: Path) -> None:
        in_r, self.in_w = os.pipe()
        self.ev_r, ev_w = os.pipe()
        self.log = log
        self.pid = os.fork()
        if self.pid == 0:
            try:
                os.close(self.in_w)
                os.close(self.ev_r)
                fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
                os.dup2(fd, 2)
                # pytest's capture replaced sys.stderr; the helper prints to fd 2 here.
                sys.stderr = open(2, "w", closefd=False)  # noqa: SIM115
                helper.run_store(settings, in_r, ev_w, set())
            finally:
                os._exit(1)
        os.close(in_r)
        os.close(ev_w)
        os.set_blocking(self.ev_r, False)
        self.buf = b""
        self.seen: list[msg.Message] = []

    def send(self, data: bytes) -> None:
        while data:
            data = data[os.write(self.in_w, data):]

    def messages(self) -> list[msg.Message]:
        """Every message read so far (reads what is waiting, does not block)."""
        while select.select([self.ev_r], [], [], 0)[0]:
            chunk = os.read(self.ev_r, 65536)
            if not chunk:
                break
            self.buf += chunk
        *lines, self.buf = self.buf.split(b"\n")
        self.seen += [msg.decode(x) for x in lines if x]
        return self.seen

    def acked(self) -> int:
        return max((m.seq for m in self.messages() if isinstance(m, msg.Stored)), default=0)

    def states(self) -> list[msg.StoreState]:
        return [m for m in self.messages() if isinstance(m, msg.StoreState)]

    def stderr(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def close_input(self) -> int:
        """End of input; the exit code."""
        if self.in_w >= 0:
            os.close(self.in_w)
            self.in_w = -1
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.pid = 0
                return os.waitstatus_to_exitcode(status)
            select.select([self.ev_r], [], [], 0.05)  # poll interval, not synchronisation
        pytest.fail("the store helper did not exit at end of input")

    def kill(self) -> None:
        if self.pid:
            os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
            self.pid = 0

    def cleanup(self) -> None:
        self.kill()
        for fd in (self.in_w, self.ev_r):
            if fd >= 0:
                os.close(fd)
        self.in_w = self.ev_r = -1


@pytest.fixture
def helpers(tmp_path: Path) -> Iterator[Callable[[StoreSettings], Helper]]:
    made: list[Helper] = []

    def make(settings: StoreSettings) -> Helper:
        h = Helper(settings, tmp_path / f"helper{len(made)}.log")
        made.append(h)
        return h

    yield make
    for h in made:
        h.cleanup()


def sqlite_settings(tmp_path: Path, servers: tuple[Server, ...] = ()) -> StoreSettings:
    return StoreSettings(url=f"sqlite:///{tmp_path}/journal.sqlite3", state_dir=str(tmp_path),
                         servers=servers, host="h1", run="run1")


def opened(settings: StoreSettings) -> store.Store:
    return store.open_store(settings.url, settings.state_dir, settings.caps)


def test_an_input_line_over_the_limit_is_dropped_whole_and_the_next_one_stored(
        tmp_path: Path, helpers: Callable[[StoreSettings], Helper]) -> None:
    h = helpers(sqlite_settings(tmp_path))
    h.send(b"7 " + b"x" * (helper.MAX_INPUT_LINE // 2))  # no newline yet: held, not stored
    h.send(b"x" * helper.MAX_INPUT_LINE)  # now over the limit: dropped, the rest skipped
    h.send(b"x" * 1000 + b"\n" + line(1, rec(unique="a")))
    wait_value(h.acked, lambda n: n == 1, message="ack of line 1")
    wait_value(lambda: h.states()[-1:], lambda s: s and s[0].refused == 1,
               message="a report counting the dropped line")
    assert "longer than" in h.stderr()
    assert h.close_input() == 0


def test_lines_in_rows_stored_acks_out_and_a_resend_is_not_stored_twice(
        tmp_path: Path, helpers: Callable[[StoreSettings], Helper]) -> None:
    settings = sqlite_settings(tmp_path)
    first = helpers(settings)
    first.send(line(1, rec(unique="a")) + line(2, rec("error", unique="b"))
               + line(3, rec(unique="c"), {"outcome": "bogus"}) + b"garbage\n")
    wait_value(first.acked, lambda n: n == 3, message="ack of line 3")
    state = wait_value(lambda: first.states()[-1:], lambda s: s and s[0].refused == 2,
                       message="a report counting the bogus record and line")[0]
    assert state.up and state.dead == {"send_mail": 1} and state.error == ""
    assert "outcome 'bogus'" in first.stderr()
    # The helper dies before the master heard its ack of line 4; the master sends lines
    # 3 and 4 again to the next helper, which stores only what is new.
    first.send(line(4, rec(unique="d")))
    wait_value(first.acked, lambda n: n == 4, message="ack of line 4")
    first.kill()
    second = helpers(settings)
    second.send(line(3, rec(unique="c")) + line(4, rec(unique="d")) + line(5, rec(unique="e")))
    wait_value(second.acked, lambda n: n == 5, message="ack of line 5")
    assert second.close_input() == 0
    s = opened(settings)
    try:
        assert sorted(j["unique"] for j in s.recent()) == ["a", "b", "c", "d", "e"]
        assert s.last_seq("h1/run1") == 5
    finally:
        s.close()


def test_end_of_input_commits_what_is_held(tmp_path: Path,
                                           helpers: Callable[[StoreSettings], Helper]) -> None:
    settings = sqlite_settings(tmp_path)
    h = helpers(settings)
    h.send(b"".join(line(n, rec(unique=f"u{n}")) for n in range(1, 201)))
    assert h.close_input() == 0
    s = opened(settings)
    try:
        assert len(s.recent(limit=1000)) == 200
    finally:
        s.close()
    assert h.acked() == 200


def grab(port: int, function: str, timeout: float) -> tuple[str, bytes] | None:
    """Be a worker of `function` for up to `timeout` seconds: the (unique, payload) of the
    job it is given (completed at once), or None if none came."""
    with socket.create_connection((HOST, port), timeout=timeout) as sock:
        sock.sendall(encode(Packet.CAN_DO, function) + encode(Packet.GRAB_JOB_UNIQ))
        decoder = Decoder()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                data = sock.recv(65536)
            except TimeoutError:
                return None
            if not data:
                return None
            for f in decoder.feed(data):
                if f.type == Packet.JOB_ASSIGN_UNIQ:
                    sock.sendall(encode(Packet.WORK_COMPLETE, f.args[0], b""))
                    return f.args[2].decode(), f.args[3]
                if f.type == Packet.NO_JOB:
                    sock.sendall(encode(Packet.PRE_SLEEP))
                elif f.type == Packet.NOOP:
                    sock.sendall(encode(Packet.GRAB_JOB_UNIQ))
    return None


def queued(server: Gearmand, function: str) -> int:
    st = server.status().get(function)
    return st.queued if st else 0


def test_a_due_retry_is_submitted_with_its_retry_unique(
        tmp_path: Path, gearmand: Gearmand, helpers: Callable[[StoreSettings], Helper]) -> None:
    down = Server(HOST, gearmand.port + 1 if gearmand.port < 65535 else 1)  # nothing there
    settings = sqlite_settings(tmp_path, (down, Server(HOST, gearmand.port)))
    h = helpers(settings)
    h.send(line(1, rec("error", unique="mail-7", decision="retry", due=time.time())))
    wait_value(lambda: gearmand.gearadmin("--status"), lambda out: "send_mail\t1\t0\t0" in out,
               message="the retry queued on gearmand (gearadmin --status)")
    s = opened(settings)
    try:
        [job] = s.recent(unique="mail-7")
        fid = job["failure_id"]
        assert s.dead_show(fid)["state"] == "submitted" and s.select_dead() == []
    finally:
        s.close()
    got = grab(gearmand.port, "send_mail", 10)
    assert got == (f"gv:{fid}:2:mail-7", b"body of mail-7")
    assert record.parse_unique(got[0]) == ("mail-7", 2, fid)
    state = wait_value(lambda: [x for x in h.states() if x.retries], bool,
                       message="a report of the submitted retry")[0]
    assert state.retries == [["mail", "send_mail", 1]]


def test_with_gearmand_down_a_retry_waits_then_goes_exactly_once(
        tmp_path: Path, gearmand: Gearmand, helpers: Callable[[StoreSettings], Helper]) -> None:
    settings = sqlite_settings(tmp_path, (Server(HOST, gearmand.port),))
    gearmand.stop()
    h = helpers(settings)
    h.send(line(1, rec("error", unique="late", decision="retry", due=time.time())))
    wait_for(lambda: "it waits" in h.stderr(), timeout=15, message="a failed submit logged")
    s = opened(settings)
    try:
        [job] = s.recent(unique="late")
        fid = job["failure_id"]
        assert s.dead_show(fid)["state"] == "retrying"  # unclaimed, not lost
        gearmand.start()  # the same port
        wait_equal(lambda: s.dead_show(fid)["state"], "submitted", timeout=15,
                   message="the retry's state once gearmand is back")
    finally:
        s.close()
    assert grab(gearmand.port, "send_mail", 10) == (f"gv:{fid}:2:late", b"body of late")
    # Exactly once: no second copy comes in the next 3 seconds (three claim rounds).
    assert grab(gearmand.port, "send_mail", 3) is None
    assert queued(gearmand, "send_mail") == 0


def test_store_outage_stops_acks_buffers_and_flushes_when_back(
        tmp_path: Path, postgres_factory: Callable,
        helpers: Callable[[StoreSettings], Helper]) -> None:
    import psycopg

    server = postgres_factory()
    with psycopg.connect(server.url(), autocommit=True) as conn:
        conn.execute("CREATE DATABASE journal")
    settings = StoreSettings(url=server.url("journal", password="s3cret"),
                             state_dir=str(tmp_path), host="h1", run="run1")
    h = helpers(settings)
    h.send(line(1, rec(unique="before")))
    wait_value(h.acked, lambda n: n == 1, message="ack of line 1")
    server.stop()
    h.send(b"".join(line(n, rec(unique=f"during{n}")) for n in range(2, 12)))
    down = wait_value(lambda: [x for x in h.states() if not x.up], bool, timeout=20,
                      message="a report of the store down")[0]
    assert "job store postgresql://gv:***@" in down.error and "s3cret" not in down.error
    assert h.acked() == 1  # nothing acked while the store is down
    server.start()
    wait_value(h.acked, lambda n: n == 11, timeout=40, message="ack of every line")
    assert h.states()[-1].up or wait_value(lambda: h.states()[-1].up, bool)
    assert h.close_input() == 0
    s = opened(settings)
    try:
        uniques = [j["unique"] for j in s.recent(limit=100)]
        assert sorted(uniques) == sorted(["before", *(f"during{n}" for n in range(2, 12))])
    finally:
        s.close()


# -- the helper's state, in this process (an injected clock) --------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_claim_answered_while_the_store_was_down_is_not_sent_again(tmp_path: Path) -> None:
    # A retry went out, then the store failed before it heard so. On reconnect the helper
    # tells it first; taking back "stale" claims first would queue the retry a second time.
    clock, sent = Clock(), []
    settings = sqlite_settings(tmp_path)
    h = helper.StoreHelper(settings, sent.append, clock=clock)
    h.connect()
    assert h.store is not None
    h.store.write(store_records(rec("error", decision="retry", due=0.0)))
    [due] = h.store.claim_due(time.time(), h.host, 10)
    h.to_mark.add(due.id)  # a job server took it ...
    h.down(store.StoreError("job store x: disk I/O error"))  # ... and the store failed
    assert (h.up, h.store) == (False, None)
    clock.now += helper.RECONNECT_MAX + 1
    h.connect()
    assert h.up and h.to_mark == set()
    assert h.store.dead_show(due.id)["state"] == "submitted"
    assert h.store.claim_due(time.time(), h.host, 10) == []
    h.store.close()


def test_lines_held_while_the_store_was_down_are_checked_against_it(tmp_path: Path) -> None:
    # The helper started with the store down, so it did not know what was committed: a
    # line sent again is dropped once the store says it has it.
    settings = sqlite_settings(tmp_path)
    s = opened(settings)
    s.write(store_records(rec(unique="old")), seq=("h1/run1", 2))
    s.close()
    clock, sent = Clock(), []
    h = helper.StoreHelper(settings, sent.append, clock=clock)
    h.take_line(line(2, rec(unique="old")).rstrip(b"\n"))
    h.take_line(line(3, rec(unique="new")).rstrip(b"\n"))
    h.connect()
    h.flush()
    assert sent[-1] == msg.Stored(seq=3)
    assert h.store is not None
    assert sorted(j["unique"] for j in h.store.recent()) == ["new", "old"]
    h.store.close()


def store_records(*items: dict[str, Any]) -> list:
    out, errors = store.parse_line(record.journal_line(list(items)), 65536)
    assert errors == []
    return out


def test_a_record_the_store_refuses_does_not_hold_back_the_others(
        tmp_path: Path, helpers: Callable[[StoreSettings], Helper]) -> None:
    """One record the database refuses (here a real trigger) would fail its batch on every
    retry, and all that came after would wait behind it. The helper writes that batch
    again without it: the others are stored and acked, the refusal counted."""
    settings = sqlite_settings(tmp_path)
    s = opened(settings)  # creates the tables
    try:
        with s._tx() as tx:
            tx.q("CREATE TRIGGER gv_refuse BEFORE INSERT ON outcomes "
                 "WHEN NEW.function = 'unstorable' BEGIN SELECT RAISE(ABORT, 'no'); END")
    finally:
        s.close()
    h = helpers(settings)
    h.send(line(1, rec(unique="a")) + line(2, rec("error", function="unstorable", unique="b"))
           + line(3, rec(unique="c")))
    wait_value(h.acked, lambda n: n == 3, message="ack of line 3")
    wait_value(lambda: h.states()[-1:], lambda st: st and st[0].refused == 1,
               message="a report counting the refused record")
    assert "refused by the store" in h.stderr()
    h.send(line(4, rec(unique="d")))
    wait_value(h.acked, lambda n: n == 4, message="the next line flows")
    assert h.close_input() == 0
    s = opened(settings)
    try:
        assert sorted(j["unique"] for j in s.recent()) == ["a", "c", "d"]
    finally:
        s.close()
