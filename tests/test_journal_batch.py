"""child/journal.py: a child's journal records, batched and written to its event pipe without
blocking (pure logic: a fake clock and a fake, size-limited write)."""

from __future__ import annotations

import base64
import hashlib
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gearvisor.child import journal as jmod
from gearvisor.child.journal import FLUSH_AFTER, FLUSH_RECORDS, ChildJournal
from gearvisor.config.model import JournalConfig, PoolConfig, RetryConfig
from gearvisor.job import Job
from gearvisor.journal.record import FIELDS, JOURNAL_PREFIX, MAX_LINE

WALL = 1_700_000_000.0


class Pipe:
    """A fake non-blocking pipe: takes at most `room` bytes per write (then EAGAIN)."""

    def __init__(self, room: int | None = None) -> None:
        self.data = bytearray()
        self.room = room  # None: takes everything

    def write(self, fd: int, data: bytes) -> int:
        if self.room is None:
            self.data += data
            return len(data)
        if self.room <= 0:
            raise BlockingIOError
        n = min(self.room, len(data))
        self.data += data[:n]
        self.room -= n
        return n

    def lines(self) -> list[bytes]:
        text = bytes(self.data)
        assert text == b"" or text.endswith(b"\n")
        return text.splitlines()

    def records(self) -> list[dict]:
        out = []
        for line in self.lines():
            assert line.startswith(JOURNAL_PREFIX)
            assert len(line) + 1 <= MAX_LINE
            out += json.loads(line)["records"]
        return out


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def pool(**kw) -> PoolConfig:
    base = dict(name="mail", processes=1, functions={"send": "m:send", "other": "m:other"},
                servers=(), graceful_timeout=1.0, connect_timeout=1.0,
                reconnect_max_delay=1.0, backoff=None, keepalive=None, env={}, cwd="/",
                user=None, group=None, rlimit_nofile=None, client_id_prefix="h",
                exception_packet="warning", log_level="info", log_format="json",
                failed_payload={"send": "store", "other": "store"})
    base.update(kw)
    return PoolConfig(**base)  # type: ignore[arg-type]


def make(pipe: Pipe, clock: Clock | None = None, journal: JournalConfig | None = None,
         **pool_kw) -> ChildJournal:
    return ChildJournal(journal or JournalConfig(payload_cap=8, successes=True),
                        pool(**pool_kw), 2, 5,
                        "web1", 9, clock=clock or Clock(), wall=lambda: WALL,
                        rand=lambda: 0.5, write=pipe.write)


def job(n: int = 0, function: str = "send", data: bytes = b"payload", unique: str = "",
        attempt: int = 1, retry_of: int | None = None) -> Job:
    return Job(function, f"H:gm:{n}", unique or f"u{n}", data, lambda *a: None,
               "127.0.0.1:4730", attempt, retry_of)


def test_a_full_batch_is_written_at_once() -> None:
    pipe = Pipe()
    j = make(pipe)
    for n in range(FLUSH_RECORDS - 1):
        j.success(job(n), 0.25)
    assert pipe.data == b""
    j.success(job(99), 0.25)
    records = pipe.records()
    assert len(pipe.lines()) == 1 and len(records) == FLUSH_RECORDS
    assert records[0] == {"outcome": "success", "function": "send", "unique": "u0",
                          "handle": "H:gm:0", "server": "127.0.0.1:4730", "pool": "mail",
                          "slot": 2, "host": "web1", "generation": 5, "attempt": 1,
                          "started": WALL - 0.25, "seconds": 0.25}
    assert set(records[0]) <= set(FIELDS)
    assert j.pending() == 0


def test_a_record_waits_at_most_flush_after_checked_at_job_end() -> None:
    pipe, clock = Pipe(), Clock()
    j = make(pipe, clock)
    j.success(job(1), 0.1)
    clock.now += FLUSH_AFTER - 0.01
    j.success(job(2), 0.1)
    assert pipe.data == b""
    clock.now += 0.02
    j.success(job(3), 0.1)
    assert [r["unique"] for r in pipe.records()] == ["u1", "u2", "u3"]


def test_flush_writes_whatever_waits() -> None:  # Hooks.waiting and exit call it
    pipe = Pipe()
    j = make(pipe)
    j.success(job(1, retry_of=7, attempt=3), 0.1)
    assert j.flush()
    assert pipe.records()[0]["retry_of"] == 7 and pipe.records()[0]["attempt"] == 3


def test_a_batch_is_due_flush_after_its_first_record_with_no_job_ending() -> None:
    # An idle or quarantined child ends no more jobs: the worker's loop sleeps until due_at
    # and tick() writes the batch then (no periodic wake-up for it).
    pipe, clock = Pipe(), Clock()
    j = make(pipe, clock)
    assert j.due_at() == float("inf")  # nothing recorded: nothing to wake up for
    j.failure(job(1), "error", 0.1, ValueError("x"))
    assert j.due_at() == clock.now + FLUSH_AFTER
    clock.now += FLUSH_AFTER - 0.01
    j.tick()
    assert pipe.data == b""
    clock.now += 0.02
    j.tick()
    assert [r["unique"] for r in pipe.records()] == ["u1"]
    assert j.due_at() == float("inf")


def test_a_write_the_pipe_refused_is_retried_every_retry_after_not_spun_on() -> None:
    pipe, clock = Pipe(room=0), Clock()
    j = make(pipe, clock)
    j.success(job(1), 0.1)
    clock.now += FLUSH_AFTER
    j.tick()  # the master is not reading: nothing written
    assert pipe.data == b"" and j.due_at() == clock.now + jmod.RETRY_AFTER
    j.tick()  # a pass before that (another wake-up) writes nothing and moves nothing
    assert j.due_at() == clock.now + jmod.RETRY_AFTER
    pipe.room = 60  # room for part of the line only: the rest is due at the next retry
    clock.now += jmod.RETRY_AFTER
    j.tick()
    assert j.blocks_others() and j.due_at() == clock.now + jmod.RETRY_AFTER
    pipe.room = None
    clock.now += jmod.RETRY_AFTER
    j.tick()
    assert [r["unique"] for r in pipe.records()] == ["u1"] and j.due_at() == float("inf")


def test_successes_off_records_only_failures() -> None:
    pipe = Pipe()
    j = make(pipe, journal=JournalConfig(successes=False))
    j.success(job(1), 0.1)
    j.failure(job(2), "error", 0.1, ValueError("x"))
    j.flush()
    assert [r["outcome"] for r in pipe.records()] == ["error"]


def test_successes_off_still_records_a_success_that_ends_a_failure() -> None:
    """A retry's success marks its failure done; so does the success of a job that crashed
    a worker before (the master's crash record waits for it)."""
    pipe = Pipe()
    j = make(pipe, journal=JournalConfig(successes=False))
    retried, crashed, plain = job(1, attempt=2, retry_of=7), job(2), job(3)
    crashed.strikes = 1
    for one in (retried, crashed, plain):
        j.success(one, 0.1)
    j.flush()
    assert [(r["handle"], r.get("retry_of")) for r in pipe.records()] == [
        (retried.handle, 7), (crashed.handle, None)]


def test_an_error_record_has_class_text_traceback_and_the_stored_payload() -> None:
    pipe = Pipe()
    j = make(pipe)
    try:
        raise KeyError("no such mailbox")
    except KeyError as e:
        j.failure(job(1, data=b"0123456789"), "error", 0.5, e)
    j.flush()
    (r,) = pipe.records()
    assert (r["outcome"], r["error_class"], r["error"]) == ("error", "KeyError",
                                                            "'no such mailbox'")
    assert "raise KeyError" in r["traceback"] and r["traceback"].endswith("mailbox'\n")
    assert base64.b64decode(r["payload"]) == b"01234567"  # payload_cap 8
    assert r["payload_cut"] is True and r["payload_size"] == 10
    assert r["payload_sha256"] == hashlib.sha256(b"0123456789").hexdigest()
    assert (r["decision"], r["due"]) == ("dead", None)  # no retry: configured
    assert r["started"] == WALL - 0.5


def test_hash_and_drop_keep_no_payload_bytes() -> None:
    pipe = Pipe()
    j = make(pipe, failed_payload={"send": "hash", "other": "drop"})
    j.failure(job(1, "send", b"secret"), "error", 0.1, ValueError())
    j.failure(job(2, "other", b"secret"), "error", 0.1, ValueError())
    j.flush()
    hashed, dropped = pipe.records()
    assert "payload" not in hashed and hashed["payload_size"] == 6
    assert hashed["payload_sha256"] == hashlib.sha256(b"secret").hexdigest()
    assert dropped["payload_size"] == 6
    assert "payload" not in dropped and "payload_sha256" not in dropped


def test_the_retry_decision_is_in_the_failure_record() -> None:
    pipe = Pipe()
    retry = RetryConfig(max_attempts=3, initial=10.0, max=60.0, outcomes=("error", "timeout"))
    j = make(pipe, retry={"send": retry})
    j.failure(job(1), "error", 0.1, ValueError())
    j.failure(job(2), "timeout", 0.1, ValueError())
    j.failure(job(3, attempt=3), "error", 0.1, ValueError())  # the last attempt
    j.failure(job(4), "poison", 0.0, text="refused")  # not in outcomes
    j.failure(job(5, "other"), "error", 0.1, ValueError())  # no retry: for this function
    j.flush()
    got = [(r["decision"], r["due"]) for r in pipe.records()]
    assert got == [("retry", WALL + 5.0), ("retry", WALL + 5.0), ("dead", None),
                   ("dead", None), ("dead", None)]
    poison = pipe.records()[3]
    assert (poison["error_class"], poison["error"]) == ("Poison", "refused")


def test_a_full_pipe_loses_nothing_and_blocks_nothing() -> None:
    pipe = Pipe(room=0)
    j = make(pipe)
    for n in range(FLUSH_RECORDS):
        j.success(job(n), 0.1)
    assert pipe.data == b""
    assert not j.blocks_others()  # nothing of the line is in the pipe: events may go
    pipe.room = None
    assert j.flush()
    assert [r["unique"] for r in pipe.records()] == [f"u{n}" for n in range(FLUSH_RECORDS)]


def test_a_line_taken_in_part_is_finished_before_anything_else() -> None:
    pipe = Pipe(room=100)
    j = make(pipe)
    for n in range(FLUSH_RECORDS):
        j.success(job(n), 0.1)
    assert len(pipe.data) == 100
    assert j.blocks_others()  # another event now would land inside the line
    pipe.room = 50
    assert not j.finish_tail() and j.blocks_others()
    pipe.room = None
    j.success(job(100), 0.1)  # a job ended: the tail, then nothing else is due yet
    assert not j.blocks_others()
    assert j.flush()
    assert len(pipe.records()) == FLUSH_RECORDS + 1


def test_the_batch_is_bounded_oldest_successes_dropped_failures_kept(monkeypatch) -> None:
    monkeypatch.setattr(jmod, "MAX_PENDING", 100)
    pipe = Pipe(room=0)
    j = make(pipe)
    j.failure(job(0), "error", 0.1, ValueError())
    for n in range(1, 300):
        j.success(job(n), 0.1)
    # one line of FLUSH_RECORDS left for the pipe (the tail); 100 records wait
    assert j.pending() == 100
    assert j.dropped_successes == 300 - FLUSH_RECORDS - 100 and j.dropped_failures == 0
    pipe.room = None
    j.flush()
    outcomes = [r["outcome"] for r in pipe.records()]
    assert outcomes.count("error") == 1  # the failure survived the drops
    assert [r["unique"] for r in pipe.records()][-1] == "u299"  # the newest kept


def test_failures_are_dropped_only_when_no_success_is_left(monkeypatch) -> None:
    monkeypatch.setattr(jmod, "MAX_PENDING_BYTES", 10_000)
    pipe = Pipe(room=0)
    j = make(pipe, journal=JournalConfig(payload_cap=4096, successes=True))
    for n in range(20):
        j.failure(job(n, data=b"x" * 4000), "error", 0.1, ValueError())
    assert j.failure_bytes <= 10_000 + 6000
    assert j.dropped_failures > 0


def test_big_failures_split_into_lines_under_max_line() -> None:
    pipe = Pipe()
    j = make(pipe, journal=JournalConfig(payload_cap=512 * 1024, successes=True))
    for n in range(5):
        j.failure(job(n, data=bytes(512 * 1024)), "error", 0.1, ValueError())
    j.flush()
    assert len(pipe.lines()) == 5  # each ~700 KB of base64: one per line
    assert len(pipe.records()) == 5


@given(unique=st.text(max_size=64), handle=st.text(max_size=200),
       function=st.text(min_size=1, max_size=50), seconds=st.floats(0, 1e6))
def test_the_hand_made_encoding_is_the_json_of_the_record(unique: str, handle: str,
                                                          function: str,
                                                          seconds: float) -> None:
    pipe = Pipe()
    j = make(pipe)
    j.success(Job(function, handle, unique, b"", lambda *a: None, "s:1"), seconds)
    j.flush()
    (r,) = pipe.records()
    assert (r["function"], r["unique"], r["handle"]) == (function, unique, handle)
    assert abs(r["seconds"] - seconds) <= 5e-7 * max(1.0, seconds)  # to the microsecond


def test_a_flush_with_nothing_writes_nothing() -> None:
    pipe = Pipe()
    assert make(pipe).flush() and pipe.data == b""


@pytest.mark.parametrize("bad", [OSError(32, "EPIPE"), BrokenPipeError()])
def test_a_gone_master_is_not_an_error(bad: OSError) -> None:
    def write(fd: int, data: bytes) -> int:
        raise bad
    j = ChildJournal(JournalConfig(successes=True), pool(), 0, 1, "h", 9, wall=lambda: WALL,
                     write=write)
    j.success(job(1), 0.1)
    assert not j.flush()  # kept (bounded), never raised
