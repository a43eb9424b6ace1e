"""The job store (gearvisor/journal): checking a child's journal line, and the same store
tests against SQLite and a real PostgreSQL server (tests/conftest.py starts one)."""

from __future__ import annotations

import base64
import json
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gearvisor.journal import parse, record, schema, store
from gearvisor.journal.backend import StoreError, redact
from gearvisor.journal.settings import Caps

NOW = 1_800_000_000.0


def rec(outcome: str = "success", function: str = "send_mail", **kw: Any) -> dict[str, Any]:
    """A journal record as a child writes it."""
    base: dict[str, Any] = {"outcome": outcome, "function": function, "unique": "u1",
                            "handle": "H:x:1", "server": "127.0.0.1:4730", "pool": "mail",
                            "slot": 0, "host": "h1", "generation": 1, "attempt": 1,
                            "retry_of": None, "started": NOW, "seconds": 0.25}
    if outcome != "success":
        base.update(error_class="SMTPError", error="connect to 10.0.0.7:25 refused",
                    traceback="Traceback...\nSMTPError", decision="dead",
                    payload=base64.b64encode(b"mail body").decode(), payload_size=9,
                    payload_cut=False)
    base.update(kw)
    return base


def records(*items: dict[str, Any], cap: int = 65536) -> list[parse.Record]:
    """The checked records of a journal line holding `items` (none refused)."""
    out, errors = parse.parse_line(record.journal_line(list(items)), cap)
    assert errors == []
    return out


# -- parse_line: a child's bytes are untrusted ----------------------------------------------------


def test_parse_line_reads_every_field() -> None:
    line = record.journal_line([rec("error", decision="retry", due=NOW + 10, retry_of=7,
                                    attempt=2, payload_sha256="a" * 64)])
    [r], errors = parse.parse_line(line, 65536)
    assert errors == []
    assert (r.outcome, r.function, r.unique, r.pool, r.slot, r.attempt, r.retry_of) == (
        "error", "send_mail", "u1", "mail", 0, 2, 7)
    assert (r.decision, r.due, r.payload, r.payload_size, r.payload_cut) == (
        "retry", NOW + 10, b"mail body", 9, False)
    assert r.failed and r.payload_sha256 == "a" * 64


@pytest.mark.parametrize(("line", "why"), [
    (b"not json", "not JSON"),
    (b"[1, 2]", "not a"),
    (b'{"event": "journal"}', "no records list"),
    (b'{"event": "journal", "records": [' + b"[" * 100_000, "not JSON"),  # deep nesting
    (b"\xff\xfe", "not JSON"),
    (b" " * (record.MAX_LINE + 1), "longer than"),
])
def test_parse_line_refuses_a_bad_line_without_raising(line: bytes, why: str) -> None:
    out, errors = parse.parse_line(line, 65536)
    assert out == [] and len(errors) == 1 and why in errors[0]


def test_parse_line_refuses_bad_records_and_nulls_bad_fields() -> None:
    line = record.journal_line([
        rec("exploded"),  # unknown outcome: refused
        rec("error", decision="maybe"),  # unknown decision: refused
        rec("error", decision="retry"),  # a retry with no due: refused
        rec(function=""),  # no function: refused
        "not an object",
        rec(slot=True, generation=-1, attempt=0, started=float("inf"), seconds="1",
            payload_sha256="XYZ"),  # bad fields: kept as null (attempt: 1)
        rec("error", payload="%%%not base64", decision=None),  # no decision: dead
    ])
    out, errors = parse.parse_line(line.replace(b"Infinity", b"1e999"), 65536)
    assert [r.outcome for r in out] == ["success", "error"]
    kept, failed = out
    assert (kept.slot, kept.generation, kept.attempt, kept.started, kept.seconds,
            kept.payload_sha256) == (None, None, 1, None, None, None)
    assert (failed.payload, failed.decision) == (None, "dead")
    text = "\n".join(errors)
    for part in ("record 1: outcome 'exploded'", "record 2: decision 'maybe'",
                 "record 3: decision retry needs due", "record 4: no function",
                 "record 5: not a JSON object", "record 6: slot: expected an integer",
                 "record 6: seconds: expected a number", "record 7: payload: not valid base64"):
        assert part in text


def test_parse_line_cuts_texts_and_payload_and_makes_them_storable() -> None:
    big = base64.b64encode(b"x" * 5000).decode()
    line = json.dumps({"event": "journal", "records": [rec(
        "error", error="e" * 5000, traceback="t" * 5000 + "END", payload=big,
        error_class="Bad\x00Class", function="f\ud800n")]}).encode()
    [r], errors = parse.parse_line(line, 1000)
    assert errors == []
    assert len(r.error) == record.MAX_ERROR
    assert len(r.traceback) == record.MAX_TRACEBACK and r.traceback.endswith("END")
    assert (r.payload, r.payload_cut) == (b"x" * 1000, True)
    assert "\x00" not in r.error_class and r.function == "f?n"


def test_parse_line_bounds_its_error_list() -> None:
    line = record.journal_line([{"outcome": "nope"}] * 5000)
    out, errors = parse.parse_line(line, 65536)
    assert out == [] and len(errors) == parse.MAX_ERRORS + 1
    assert errors[-1] == f"... and {5000 - parse.MAX_ERRORS} more errors in this line"


_json = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
                     lambda inner: st.lists(inner, max_size=3)
                     | st.dictionaries(st.text(max_size=5), inner, max_size=3), max_leaves=10)
_field = st.sampled_from(record.FIELDS)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.function_scoped_fixture])
@given(st.lists(st.dictionaries(_field, _json | st.sampled_from(
    [*record.OUTCOMES, "retry", "dead", "", "gv:1:2:u"]), max_size=12), max_size=6))
def test_any_record_is_parsed_without_raising_and_stored(tmp_path: Path, items: list) -> None:
    # Whatever a child writes: parse_line never raises, and what it keeps can be written.
    line = json.dumps({"event": "journal", "records": items}).encode()
    out, errors = parse.parse_line(line, 100)
    assert len(out) + len(errors) >= 0 and all(isinstance(e, str) for e in errors)
    if out:
        s = store.open_store(f"sqlite:///{tmp_path}/fuzz.sqlite3", str(tmp_path))
        try:
            s.write(out, now=NOW)
            assert len(s.recent(limit=1000)) >= len(out)
        finally:
            s.close()


def test_fingerprint_ignores_numbers_and_hex() -> None:
    a = store.fingerprint("Timeout", "timed out after 30s on 10.0.0.7 (req 0xdeadbeef)")
    b = store.fingerprint("Timeout", "timed out after 12s on 10.0.0.9 (req 0x1f)")
    assert a == b
    assert a != store.fingerprint("OSError", "timed out after 12s on 10.0.0.9 (req 0x1f)")
    assert a != store.fingerprint("Timeout", "refused")


def test_redact_hides_the_password() -> None:
    assert redact("postgresql://gv:s3cret@db:5432/j") == "postgresql://gv:***@db:5432/j"
    assert "s3cret" not in redact("postgresql://gv@db/j?password=s3cret&sslmode=require")


# -- the store, on SQLite and on PostgreSQL -------------------------------------------------------


@pytest.fixture
def make_store(store_url: str, tmp_path: Path) -> Iterator[Callable[..., store.Store]]:
    opened: list[store.Store] = []

    def make(**caps: Any) -> store.Store:
        s = store.open_store(store_url, str(tmp_path), Caps(**caps))
        opened.append(s)
        return s

    yield make
    for s in opened:
        s.close()


def test_outcomes_and_dead_letters_are_written(make_store: Callable[..., store.Store]) -> None:
    s = make_store()
    s.write(records(rec(unique="ok1"), rec("error", unique="bad1"),
                    rec("crash", function="resize", unique="bad2", started=NOW + 1)), now=NOW)
    assert s.dead_counts() == {"resize": 1, "send_mail": 1}
    jobs = s.recent()
    assert [j["unique"] for j in jobs] == ["bad2", "bad1", "ok1"]  # newest first
    assert [j["unique"] for j in s.recent(failed=True)] == ["bad2", "bad1"]
    assert [j["unique"] for j in s.recent(function="send_mail")] == ["bad1", "ok1"]
    [ok] = s.recent(unique="ok1")
    assert (ok["outcome"], ok["seconds"], ok["started"], ok["failure_id"]) == (
        "success", 0.25, NOW, None)
    [bad] = s.recent(unique="bad1")
    row = s.dead_show(bad["failure_id"])
    assert row is not None
    assert (row["state"], row["attempt"], row["payload"], row["payload_cut"], row["outcome"],
            row["error_class"], row["first_failed"], row["last_failed"]) == (
        "dead", 1, b"mail body", False, "error", "SMTPError", NOW + 0.25, NOW + 0.25)
    assert s.dead_show(10**9) is None


def test_a_retry_moves_through_its_states(make_store: Callable[..., store.Store]) -> None:
    s = make_store()
    s.write(records(rec("error", decision="retry", due=NOW + 10)), now=NOW)
    assert s.claim_due(NOW + 9, "h1", 10) == []  # not due yet
    assert s.next_due() == NOW + 10
    [due] = s.claim_due(NOW + 10, "h1", 10)
    assert (due.function, due.unique, due.attempt, due.payload, due.pool) == (
        "send_mail", "u1", 2, b"mail body", "mail")
    assert s.dead_show(due.id)["state"] == "submitting"
    assert s.claim_due(NOW + 10, "h1", 10) == []  # claimed once
    s.submitted([due.id])
    assert s.dead_show(due.id)["state"] == "submitted"
    # Attempt 2 fails again and is retried; a repeat of attempt 2 (a duplicate run) and
    # an older attempt change nothing.
    s.write(records(rec("timeout", retry_of=due.id, attempt=2, decision="retry",
                        due=NOW + 30, error="timed out", started=NOW + 20)), now=NOW + 21)
    s.write(records(rec("error", retry_of=due.id, attempt=2, decision="dead"),
                    rec("error", retry_of=due.id, attempt=1, decision="dead")), now=NOW + 22)
    row = s.dead_show(due.id)
    assert (row["state"], row["attempt"], row["due"], row["outcome"], row["error"],
            row["last_failed"], row["first_failed"], row["claimed_by"]) == (
        "retrying", 2, NOW + 30, "timeout", "timed out", NOW + 20.25, NOW + 0.25, None)
    assert row["payload"] == b"mail body"  # the original payload stays for the next try
    [due3] = s.claim_due(NOW + 30, "h1", 10)
    assert (due3.id, due3.attempt) == (due.id, 3)
    s.submitted([due3.id])
    s.write(records(rec(retry_of=due.id, attempt=3, unique="u1")), now=NOW + 31)
    assert s.dead_show(due.id)["state"] == "done"
    assert [j["failure_id"] for j in s.recent(unique="u1")][0] == due.id
    assert s.dead_counts() == {}


def test_last_attempt_makes_a_dead_letter(make_store: Callable[..., store.Store]) -> None:
    s = make_store()
    s.write(records(rec("error", decision="retry", due=NOW)), now=NOW)
    [due] = s.claim_due(NOW, "h1", 1)
    s.write(records(rec("error", retry_of=due.id, attempt=2, decision="dead")), now=NOW)
    assert (s.dead_show(due.id)["state"], s.dead_counts()) == ("dead", {"send_mail": 1})


def test_a_retry_without_its_whole_payload_is_dead(make_store: Callable[..., store.Store]
                                                   ) -> None:
    # failed_payload: hash (no payload) or a payload cut at the cap: nothing to run again.
    s = make_store()
    s.write(records(rec("error", decision="retry", due=NOW, payload=None, unique="hashed"),
                    rec("error", decision="retry", due=NOW, payload_cut=True, unique="cut"),
                    rec("error", decision="retry", due=NOW, unique="whole")), now=NOW)
    assert [d.unique for d in s.claim_due(NOW, "h1", 10)] == ["whole"]
    assert s.dead_counts() == {"send_mail": 2}


def test_a_crash_gearmand_requeues_waits_for_its_jobs_next_record(
        make_store: Callable[..., store.Store]) -> None:
    """The master's crash record is `requeued`: gearmand re-runs the job (same handle) on
    another worker, and that run's record decides the row. Not a dead letter meanwhile."""
    s = make_store()
    s.write(records(rec("crash", decision="requeued", handle="H:x:7", unique="c1"),
                    rec("crash", decision="requeued", handle="H:x:8", unique="c2")), now=NOW)
    assert s.dead_counts() == {} and s.claim_due(NOW + 10**6, "h1", 10) == []
    # H:x:7 crashes again, then succeeds; H:x:8 is refused as poison and retried
    s.write(records(rec("crash", decision="requeued", handle="H:x:7", unique="c1"),
                    rec("success", handle="H:x:7", unique="c1"),
                    rec("poison", decision="retry", due=NOW + 5, handle="H:x:8",
                        unique="c2"),
                    rec("success", handle="H:x:9", unique="other")), now=NOW + 1)
    rows = {g["unique"]: g for g in s.recent(failed=True)}
    done = s.dead_show(rows["c1"]["failure_id"])
    poisoned = s.dead_show(rows["c2"]["failure_id"])
    assert (done["state"], done["outcome"]) == ("done", "crash")
    assert (poisoned["state"], poisoned["outcome"], poisoned["due"]) == (
        "retrying", "poison", NOW + 5)
    assert len({r["failure_id"] for r in s.recent(unique="c1")} - {None}) == 1  # one row
    [due] = s.claim_due(NOW + 5, "h1", 10)
    assert (due.id, due.attempt) == (poisoned["id"], 2)


def test_a_crash_recorded_after_its_jobs_next_run_is_done_at_once(
        make_store: Callable[..., store.Store]) -> None:
    """The master records a crash when it reaps the dead worker; gearmand has handed the
    job on before that, and a short job's next run may be recorded first. The crash then
    waits for nothing. Another job of the same handle (another unique: a gearmand that
    restarted) or a run long after does not count."""
    s = make_store()
    s.write(records(rec("success", handle="H:x:7", unique="c1", started=NOW + 0.01),
                    rec("success", handle="H:x:8", unique="other", started=NOW + 0.01),
                    rec("success", handle="H:x:9", unique="c3", started=NOW + 900)),
            now=NOW + 1)
    s.write(records(rec("crash", decision="requeued", handle="H:x:7", unique="c1"),
                    rec("crash", decision="requeued", handle="H:x:8", unique="c2"),
                    rec("crash", decision="requeued", handle="H:x:9", unique="c3")),
            now=NOW + 1)
    states = {r["unique"]: s.dead_show(r["failure_id"])["state"]
              for r in s.recent(failed=True)}
    assert states == {"c1": "done", "c2": "requeued", "c3": "requeued"}


def test_a_retry_whose_row_is_gone_makes_a_new_row(make_store: Callable[..., store.Store]
                                                   ) -> None:
    s = make_store()
    s.write(records(rec("error", retry_of=424242, attempt=3)), now=NOW)
    [group] = s.dead_groups()
    row = s.dead_show(group["id"])
    assert (row["attempt"], row["state"]) == (3, "dead")


def test_a_submitted_retry_never_heard_of_again_is_due_again(
        make_store: Callable[..., store.Store]) -> None:
    s = make_store()
    s.write(records(rec("error", decision="retry", due=NOW)), now=NOW)
    [due] = s.claim_due(NOW, "h1", 10)
    s.submitted([due.id])
    assert s.requeue_lost(NOW + 3599, older_than=3600) == 0  # not long enough
    assert s.claim_due(NOW + 3599, "h1", 10) == []
    assert s.requeue_lost(NOW + 3601, older_than=3600) == 1
    [again] = s.claim_due(NOW + 3601, "h1", 10)
    assert (again.id, again.attempt) == (due.id, 2)  # the same attempt, sent again


def test_unclaim_and_recover_put_claims_back(make_store: Callable[..., store.Store]) -> None:
    s = make_store()
    s.write(records(*(rec("error", decision="retry", due=NOW, unique=f"u{i}")
                      for i in range(3))), now=NOW)
    a, b, c = s.claim_due(NOW, "h1", 1) + s.claim_due(NOW, "h1", 1) + s.claim_due(NOW, "h2", 1)
    s.unclaim([a.id])
    assert s.dead_show(a.id)["state"] == "retrying"
    # h1's helper died between claiming b and hearing from a job server; h2's c is not h1's.
    assert s.recover_claims("h1") == 1
    assert (s.dead_show(b.id)["state"], s.dead_show(c.id)["state"]) == ("retrying",
                                                                        "submitting")
    assert sorted(d.id for d in s.claim_due(NOW, "h1", 10)) == sorted([a.id, b.id])


def test_concurrent_claims_never_hand_out_a_retry_twice(store_url: str, tmp_path: Path) -> None:
    # Four connections (four hosts' helpers) claim the same due retries at once.
    first = store.open_store(store_url, str(tmp_path))
    first.write(records(*(rec("error", decision="retry", due=NOW, unique=f"u{i}")
                          for i in range(120))), now=NOW)
    first.close()
    got: list[list[int]] = [[] for _ in range(4)]
    failures: list[BaseException] = []

    def claim(n: int) -> None:
        s = store.open_store(store_url, str(tmp_path))
        try:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                batch = s.claim_due(NOW, f"h{n}", 7)
                if not batch:  # none left (or the others took these: they go on)
                    break
                got[n] += [d.id for d in batch]
        except BaseException as e:  # noqa: BLE001 - reported by the test below
            failures.append(e)
        finally:
            s.close()

    threads = [threading.Thread(target=claim, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert failures == []
    claimed = [i for ids in got for i in ids]
    assert len(claimed) == len(set(claimed)) == 120


def test_dead_letters_group_filter_replay_and_delete(make_store: Callable[..., store.Store]
                                                     ) -> None:
    s = make_store()
    s.write(records(
        *(rec("error", unique=f"a{i}", error=f"connect to 10.0.0.{i}:25 refused",
              started=NOW + i) for i in range(3)),
        rec("error", unique="b", error="mailbox 100%_full", error_class="QuotaError",
            started=NOW + 10),
        rec("error", function="resize", unique="c", started=NOW + 20)), now=NOW + 30)
    groups = s.dead_groups()
    assert [(g["function"], g["count"], g["error_class"]) for g in groups] == [
        ("send_mail", 3, "SMTPError"), ("resize", 1, "SMTPError"),
        ("send_mail", 1, "QuotaError")]
    assert groups[0]["error"] == "connect to 10.0.0.2:25 refused"  # the newest as sample
    assert groups[0]["first_failed"] == NOW + 0.25
    assert [g["count"] for g in s.dead_groups(function="send_mail")] == [3, 1]
    assert [g["function"] for g in s.dead_groups(since=NOW + 15)] == ["resize"]
    # The error filter is a case-insensitive substring; % and _ are literal.
    assert [g["error_class"] for g in s.dead_groups(error="100%_FULL")] == ["QuotaError"]
    assert s.dead_groups(error="100%%") == [] and s.dead_groups(error="x_full") == []
    picked = s.select_dead(function="send_mail", error="refused", with_payload=True)
    assert [p["unique"] for p in picked] == ["a0", "a1", "a2"]
    assert picked[0]["payload"] == b"mail body"
    assert s.count_dead(function="send_mail") == 4 and s.count_dead(since=NOW + 15) == 1
    ids = [p["id"] for p in picked]
    assert s.count_dead(ids=ids + [10**9]) == 3
    assert s.mark_replayed(ids[:2]) == 2
    assert s.mark_replayed(ids[:2]) == 0  # no longer dead
    assert s.dead_show(ids[0])["state"] == "replayed"
    assert s.select_dead(ids=ids) == [p for p in s.select_dead(ids=ids[2:])]
    assert s.dead_counts() == {"resize": 1, "send_mail": 2}
    assert s.delete([ids[2], 10**9]) == 1
    assert s.dead_show(ids[2]) is None
    assert s.recount()["rows:failures"] == 4


def test_max_entries_drops_successes_before_dead_letters(
        make_store: Callable[..., store.Store]) -> None:
    s = make_store(max_entries=5)
    s.write(records(*(rec("error", unique=f"dead{i}") for i in range(3))), now=NOW)
    s.write(records(*(rec(unique=f"ok{i}") for i in range(6))), now=NOW)
    kept = {j["unique"] for j in s.recent(limit=100)}
    assert kept == {"dead0", "dead1", "dead2", "ok4", "ok5"}  # oldest successes went first
    assert s.dead_counts() == {"send_mail": 3}
    # More dead letters than max_entries: the oldest go, failures rows stay within the cap.
    s.write(records(*(rec("error", unique=f"more{i}") for i in range(6))), now=NOW)
    assert s.recount()["rows:failures"] == 5
    assert s.dead_counts() == {"send_mail": 5}
    assert {g["id"] for g in s.dead_groups()} <= {r["id"] for r in s.select_dead()}


def test_max_bytes_and_ttl(make_store: Callable[..., store.Store]) -> None:
    s = make_store(max_bytes=20_000, ttl=3600)
    big = base64.b64encode(b"p" * 4000).decode()
    s.write(records(*(rec("error", unique=f"big{i}", payload=big) for i in range(3)),
                    *(rec(unique=f"ok{i}") for i in range(50))), now=NOW)
    counts = s.recount()
    assert counts["bytes"] <= 20_000
    assert s.dead_counts() == {"send_mail": 3}  # the successes went, the dead letters stayed
    s.write(records(rec(unique="late", started=NOW + 7200)), now=NOW + 7200)
    assert [j["unique"] for j in s.recent()] == ["late"]  # the rest was older than the ttl
    assert s.dead_counts() == {}
    assert s.recount() == {"rows:outcomes": 1, "rows:failures": 0,
                           "bytes": s.recount()["bytes"]}


def test_trimming_is_bounded_per_write(make_store: Callable[..., store.Store]) -> None:
    s = make_store()
    for first in range(0, 2500, 500):
        s.write(records(*(rec(unique=f"u{first + i}") for i in range(500))), now=NOW)
    s.caps = Caps(max_entries=10)  # a lowered cap is reached over several writes
    s.write([], now=NOW)
    assert s.recount()["rows:outcomes"] == 2500 - store.TRIM_BATCH
    for _ in range(3):
        s.write([], now=NOW)
    assert s.recount()["rows:outcomes"] == 10


def test_sequence_numbers_per_run(make_store: Callable[..., store.Store]) -> None:
    s = make_store()
    assert s.last_seq("h1/run1") == 0
    s.write(records(rec()), now=NOW, seq=("h1/run1", 40))
    s.write([], now=NOW + 1, seq=("h1/run1", 12))  # never backwards
    assert s.last_seq("h1/run1") == 40
    for n in range(12):
        s.write([], now=NOW + 2 + n, seq=(f"h1/r{n}", n + 1))
    s.write([], now=NOW + 20, seq=("h2/x", 5))
    assert s.last_seq("h1/run1") == 0  # an old run of h1 was forgotten
    assert [s.last_seq(f"h1/r{n}") for n in (3, 4, 11)] == [0, 5, 12]
    assert s.last_seq("h2/x") == 5


def test_a_newer_schema_is_refused(store_url: str, tmp_path: Path) -> None:
    s = store.open_store(store_url, str(tmp_path))
    with s.backend.transaction() as tx:
        tx.q("UPDATE meta SET num = ? WHERE key = 'schema'", (schema.VERSION + 1,))
    s.close()
    with pytest.raises(StoreError, match=r"schema is version 2, made by a newer gearvisor "
                                         r"\(this one knows version 1\); upgrade gearvisor"):
        store.open_store(store_url, str(tmp_path))


def test_reopening_keeps_the_rows(store_url: str, tmp_path: Path) -> None:
    s = store.open_store(store_url, str(tmp_path))
    s.write(records(rec("error")), now=NOW)
    s.close()
    again = store.open_store(store_url, str(tmp_path))
    assert again.dead_counts() == {"send_mail": 1}
    again.close()


# -- SQLite specifics -----------------------------------------------------------------------------


def test_default_sqlite_file_is_private_and_in_wal_mode(tmp_path: Path) -> None:
    s = store.open_store("sqlite", str(tmp_path / "state"))
    s.write(records(rec()), now=NOW)
    path = tmp_path / "state" / "journal.sqlite3"
    assert path.stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "state").stat().st_mode & 0o777 == 0o700
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    s.close()


@pytest.mark.parametrize(("url", "message"), [
    ("mysql://x", "not a store; use sqlite"),
    ("sqlite:///", "names a directory"),
    ("postgres-ish", "not a store"),
])
def test_a_bad_store_url_is_refused(url: str, message: str, tmp_path: Path) -> None:
    with pytest.raises(StoreError, match=message):
        store.open_store(url, str(tmp_path))


def test_an_unwritable_sqlite_path_is_a_store_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(StoreError, match=rf"job store {blocker}/j.sqlite3: cannot open it"):
        store.open_store(f"sqlite://{blocker}/j.sqlite3", str(tmp_path))


# -- PostgreSQL outage ----------------------------------------------------------------------------


def test_postgres_outage_raises_store_error_and_reconnects(postgres_factory: Callable) -> None:
    server = postgres_factory()
    import psycopg

    with psycopg.connect(server.url(), autocommit=True) as conn:
        conn.execute("CREATE DATABASE journal")
    url = server.url("journal", password="s3cret")  # trust auth: the password is not needed
    s = store.open_store(url, "/nonexistent")
    try:
        s.write(records(rec("error")), now=NOW)
        server.stop()
        for _ in range(2):  # the broken connection, then a refused one
            with pytest.raises(StoreError) as caught:
                s.write(records(rec("error", unique="during")), now=NOW)
            text = str(caught.value)
            assert text.startswith(f"job store postgresql://gv:***@127.0.0.1:{server.port}/")
            assert "s3cret" not in text
        server.start()
        s.write(records(rec("error", unique="after")), now=NOW)  # reconnected
        assert s.count_dead() == 2
        assert {r["unique"] for r in s.select_dead()} == {"u1", "after"}
    finally:
        s.close()
    with pytest.raises(StoreError, match="job store postgresql://gv:\\*\\*\\*@"):
        server.stop()
        store.open_store(url, "/nonexistent")


def refuse_function(s: store.Store, store_url: str, function: str) -> None:
    """A trigger in the real database that refuses any outcome row of `function` as a
    constraint violation: a record the store cannot take, whatever gearvisor checked."""
    with s._tx() as tx:
        if store_url.startswith("postgresql"):
            tx.q("CREATE OR REPLACE FUNCTION gv_refuse() RETURNS trigger AS $$ BEGIN "
                 f"IF NEW.function = '{function}' THEN RAISE EXCEPTION 'refused' "
                 "USING ERRCODE = 'check_violation'; END IF; RETURN NEW; END $$ "
                 "LANGUAGE plpgsql")
            tx.q("CREATE TRIGGER gv_refuse BEFORE INSERT ON outcomes FOR EACH ROW "
                 "EXECUTE FUNCTION gv_refuse()")
        else:
            tx.q("CREATE TRIGGER gv_refuse BEFORE INSERT ON outcomes "
                 f"WHEN NEW.function = '{function}' BEGIN SELECT RAISE(ABORT, 'no'); END")


def test_a_record_the_store_refuses_is_left_out_of_a_careful_write_and_the_rest_kept(
        make_store: Callable[..., store.Store], store_url: str) -> None:
    s = make_store()
    refuse_function(s, store_url, "unstorable")
    batch = records(rec(unique="before"), rec("error", function="unstorable", unique="bad"),
                    rec("error", unique="after"))
    with pytest.raises(StoreError):
        s.write(batch, now=NOW, seq=("run1", 7))  # the whole batch, as it was
    assert s.recent() == [] and s.last_seq("run1") == 0
    refused = s.write(batch, now=NOW, seq=("run1", 7), careful=True)
    assert len(refused) == 1 and "unstorable" in refused[0]
    assert sorted(j["unique"] for j in s.recent()) == ["after", "before"]
    assert s.dead_counts() == {"send_mail": 1} and s.last_seq("run1") == 7
