"""The job store: every job's outcome, failed jobs as retries and dead letters, in SQLite
(the default, a WAL file under state_dir) or a PostgreSQL a fleet shares.

`open_store(url, state_dir, caps)` opens (and creates) it. The store helper (helpers/store.py)
is its only writer of records: `parse_line` checks a child's journal line, `write` commits a
batch in one transaction and trims to the caps, and `claim_due` / `submitted` / `unclaim`
move due retries through their submission. The CLI (`gearvisor dead`, `gearvisor jobs`)
opens the store itself and reads it: `dead_groups`, `dead_show`, `select_dead`,
`count_dead`, `mark_replayed`, `delete`, `recent`.

A failure's states: retrying (due at `due`) -> submitting (claimed by one host) ->
submitted (a job server took it) -> its next attempt's record makes it retrying, dead or
done. A crash the master recorded is requeued (gearmand gives a job whose worker died to
another worker itself): the next record of the same function and handle decides it (a
success: done; a poison refusal or error: retrying or dead as that record says). A dead
letter becomes replayed when an operator replays it, and done when that
run succeeds. Caps: outcomes rows and failures rows at most max_entries each, their texts
and payloads at most max_bytes, nothing finished older than ttl; oldest first out, and
successes go before failures, finished failures before dead letters, dead letters
before retries still due. Trimming deletes at most TRIM_BATCH rows per call: a lowered cap
is reached over a few writes, never by one long transaction.

Every error is a StoreError whose text names the store (a path, or the URL without its
password) and what failed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from gearvisor.journal import schema
from gearvisor.journal.backend import Backend, StoreError, Tx, backend_for
from gearvisor.journal.parse import Record, parse_line
from gearvisor.journal.settings import Caps

__all__ = ["Store", "StoreError", "Due", "open_store", "fingerprint"]

TRIM_BATCH = 1000  # rows one call may delete to keep the caps
MAX_LIST = 10_000  # rows one read returns at most
ID_CHUNK = 500  # ids per IN (...) list
SEQ_RUNS_KEPT = 8  # sequence numbers kept per host: its last few master runs
ROW_OVERHEAD = 64  # bytes a row counts beyond its texts and payload
FINISHED = ("done", "replayed")  # failures nobody waits for any more
ACTIVE = ("requeued", "retrying", "submitted", "submitting")
REQUEUED_LATE = 300.0  # seconds a crash's record may come after its job's next run
# Which rows go first when a cap is over: successes, then failure outcomes; of the
# failures, finished ones, then dead letters, then retries (the newest work last).
FAILURE_TRIM_ORDER = (*FINISHED, "dead", *ACTIVE)

OUTCOME_COLUMNS = ("id", "outcome", "function", "unique", "handle", "server", "pool", "slot",
                   "host", "generation", "attempt", "started", "seconds", "error_class",
                   "error", "failure_id")
FAILURE_COLUMNS = ("id", "function", "unique", "fingerprint", "state", "attempt",
                   "first_failed", "last_failed", "due", "outcome", "error_class", "error",
                   "traceback", "payload", "payload_sha256", "payload_size", "payload_cut",
                   "pool", "slot", "host", "generation", "handle", "server", "claimed_by",
                   "claimed_at")
SUMMARY_COLUMNS = ("id", "function", "unique", "state", "attempt", "first_failed",
                   "last_failed", "outcome", "error_class", "error", "payload_size",
                   "payload_cut", "pool")

_VOLATILE = re.compile(r"0x[0-9a-fA-F]+|\b[0-9a-fA-F]{8,}\b|\d+")


def _cols(names: Iterable[str]) -> str:
    return ", ".join('"unique"' if n == "unique" else n for n in names)


def fingerprint(error_class: str | None, error: str | None) -> str:
    """What `dead list` groups by: the error class and its text with numbers and hex
    stripped ("timeout after 30s on 10.0.0.7" and "... 12s on 10.0.0.9" are one problem)."""
    text = _VOLATILE.sub("#", error or "")
    return hashlib.sha256(f"{error_class or ''}\n{text}".encode()).hexdigest()[:16]


def _escape(text: str) -> str:
    """`text` for a LIKE pattern with ESCAPE '\\': its own % _ and \\ taken literally."""
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def _like(text: str) -> str:
    """A LIKE pattern matching `text` anywhere in a lowered column."""
    return f"%{_escape(text.lower())}%"


def _size(*parts: str | bytes | None) -> int:
    return ROW_OVERHEAD + sum(len(p) for p in parts if p is not None)


def _chunks(ids: Sequence[int]) -> Iterable[list[int]]:
    clean = sorted({int(i) for i in ids})
    for first in range(0, len(clean), ID_CHUNK):
        yield clean[first:first + ID_CHUNK]


def _marks(n: int) -> str:
    return ", ".join("?" * n)


@dataclass(frozen=True)
class Due:
    """A claimed retry: submit `function` with `payload` under
    record.retry_unique(id, attempt, unique); `attempt` is the one it will run as."""

    id: int
    function: str
    unique: str
    attempt: int
    payload: bytes
    pool: str


class Store:
    """One open job store; see the module docstring. Not thread-safe: one per process."""

    def __init__(self, backend: Backend, caps: Caps) -> None:
        self.backend = backend
        self.caps = caps

    @property
    def name(self) -> str:
        """The store as errors name it: a path, or the URL without its password."""
        return self.backend.name

    def close(self) -> None:
        """Close the connection; the next call opens a new one."""
        self.backend.close()

    def _tx(self) -> Any:
        return self.backend.transaction()

    # -- records in --------------------------------------------------------------------------

    def parse_line(self, line: bytes) -> tuple[list[Record], list[str]]:
        """A child's journal line checked (parse.parse_line with this store's payload cap):
        the records and the error texts. Never raises."""
        return parse_line(line, self.caps.payload_cap)

    def write(self, records: Sequence[Record], now: float | None = None,
              seq: tuple[str, int] | None = None, careful: bool = False) -> list[str]:
        """Commit `records` in one transaction: an outcomes row each, a failures row per
        failure (or the update of the row its retry_of names), `seq` (key, number) as the
        last sequence number committed, and then the caps enforced (bounded work).

        careful: each record in a savepoint of its own, and one the database refuses as
        data (Backend.data_errors: a constraint, a value) is left out instead of failing
        the rest; the texts of those errors are returned. For a batch that failed whole
        while the store still answers, so one bad record cannot hold back every other."""
        now = time.time() if now is None else now
        refused: list[str] = []
        skip = self.backend.data_errors() if careful else ()
        with self._tx() as tx:
            totals = [0, 0, 0]  # outcomes rows, failures rows, bytes
            # Crashes gearmand re-runs (state requeued) wait for their job's next record;
            # looked up by function and handle only while there are any.
            requeued = bool(tx.one("SELECT COUNT(*) FROM failures WHERE state = 'requeued'")[0])
            for r in records:
                if not careful:
                    self._write_one(tx, r, requeued, now, totals)
                    continue
                tx.q("SAVEPOINT one_record")
                kept = list(totals)
                try:
                    self._write_one(tx, r, requeued, now, totals)
                except skip as e:
                    tx.q("ROLLBACK TO SAVEPOINT one_record")
                    totals[:] = kept
                    refused.append(f"record ({r.outcome} {r.function} {r.handle}) refused by "
                                   f"the store: {' '.join(str(e).split())[:300]}")
                tx.q("RELEASE SAVEPOINT one_record")
            self._count(tx, *totals)
            if seq is not None:
                self._set_seq(tx, seq[0], seq[1], now)
            self._trim(tx, now)
        return refused

    def _write_one(self, tx: Tx, r: Record, requeued: bool, now: float,
                   totals: list[int]) -> None:
        """One record's rows; `totals` (outcomes rows, failures rows, bytes) grows."""
        if requeued and r.retry_of is None and r.handle:
            row = tx.one("SELECT id FROM failures WHERE state = 'requeued' AND "
                         "function = ? AND handle = ? ORDER BY id DESC LIMIT 1",
                         (r.function, r.handle))
            if row is not None:
                r = dataclasses.replace(r, retry_of=int(row[0]))
        started = r.started if r.started is not None else now
        failure_id: int | None = None
        if r.failed:
            failure_id, new_row, grew = self._failure(tx, r, started, now)
            totals[1] += new_row
            totals[2] += grew
        elif r.retry_of is not None:
            # Its retry (or replay) succeeded: nobody waits for this failure now.
            tx.q("UPDATE failures SET state = 'done', due = NULL, claimed_by = NULL, "
                 "claimed_at = NULL WHERE id = ?", (r.retry_of,))
            failure_id = r.retry_of if tx.rowcount else None
        row_size = _size(r.function, r.unique, r.handle, r.server, r.pool, r.host,
                         r.error_class, r.error)
        tx.q(f"INSERT INTO outcomes ({_cols(OUTCOME_COLUMNS[1:])}, failed, size) "
             f"VALUES ({_marks(len(OUTCOME_COLUMNS) + 1)})",
             (r.outcome, r.function, r.unique, r.handle, r.server, r.pool, r.slot,
              r.host, r.generation, r.attempt, started, r.seconds, r.error_class,
              r.error, failure_id, int(r.failed), row_size))
        totals[0] += 1
        totals[2] += row_size

    def _failure(self, tx: Tx, r: Record, started: float,
                 now: float) -> tuple[int, int, int]:
        """The failures row of failed record `r`: (its id, 1 if it is new, bytes it grew)."""
        ended = started + (r.seconds or 0.0)
        state, due = (("retrying", r.due) if r.decision == "retry" else
                      ("requeued", None) if r.decision == "requeued" else ("dead", None))
        fp = fingerprint(r.error_class, r.error)
        if r.retry_of is not None:
            row = tx.one("SELECT attempt, state, size, payload IS NULL, payload_cut, "
                         "payload_size FROM failures WHERE id = ?" + self.backend.for_update,
                         (r.retry_of,))
            if row is not None:
                attempt, old_state, old_size, no_payload, cut, payload_size = row
                if old_state == "done" or (r.attempt <= attempt and old_state != "requeued"):
                    return r.retry_of, 0, 0  # a repeated or older attempt: the row knows more
                if state == "retrying" and (no_payload or cut):
                    state, due = "dead", None  # nothing whole to submit again
                new_size = _size(r.function, r.unique, r.error_class, r.error,
                                 r.traceback) + (0 if no_payload else (payload_size or 0))
                tx.q("UPDATE failures SET attempt = ?, last_failed = ?, state = ?, due = ?, "
                     "outcome = ?, fingerprint = ?, error_class = ?, error = ?, "
                     "traceback = ?, pool = ?, slot = ?, host = ?, generation = ?, "
                     "handle = ?, server = ?, claimed_by = NULL, claimed_at = NULL, "
                     "size = ? WHERE id = ?",
                     (r.attempt, ended, state, due, r.outcome, fp, r.error_class, r.error,
                      r.traceback, r.pool, r.slot, r.host, r.generation, r.handle, r.server,
                      new_size, r.retry_of))
                return r.retry_of, 0, new_size - int(old_size)
            # The row it retries is gone (trimmed, deleted): a new row keeps the failure.
        if state == "retrying" and (r.payload is None or r.payload_cut):
            state, due = "dead", None  # hash/drop or a cut payload: cannot be run again
        if state == "requeued" and r.handle and self._ran_again(tx, r, started, ended):
            state = "done"  # (its next record came first: nobody waits for this one)
        size = _size(r.function, r.unique, r.error_class, r.error, r.traceback, r.payload)
        payload_size = r.payload_size if r.payload_size is not None else (
            len(r.payload) if r.payload is not None else None)
        row = tx.one(f"INSERT INTO failures ({_cols(FAILURE_COLUMNS[1:])}, size) "
                     f"VALUES ({_marks(len(FAILURE_COLUMNS))}) RETURNING id",
                     (r.function, r.unique, fp, state, r.attempt, ended, ended, due,
                      r.outcome, r.error_class, r.error, r.traceback, r.payload,
                      r.payload_sha256, payload_size, int(r.payload_cut), r.pool, r.slot,
                      r.host, r.generation, r.handle, r.server, None, None, size))
        assert row is not None
        return int(row[0]), 1, size

    @staticmethod
    def _ran_again(tx: Tx, r: Record, started: float, ended: float) -> bool:
        """A crash gearmand re-runs may be recorded after its job's next run: the master
        writes it when it reaps the dead worker, and gearmand hands the job on as soon as
        the worker's socket closes. Was the same function and handle recorded as started
        since this run started (a second of slack for clocks of two hosts) and within
        REQUEUED_LATE of its end, under the same unique (handles repeat after a gearmand
        restart)?"""
        row = tx.one("SELECT COUNT(*) FROM outcomes WHERE started >= ? AND started <= ? "
                     "AND function = ? AND handle = ? AND COALESCE(\"unique\", '') = ?",
                     (started - 1.0, ended + REQUEUED_LATE, r.function, r.handle,
                      r.unique or ""))
        return bool(row and row[0])

    # -- bookkeeping: counts, sequence numbers, caps -----------------------------------------

    def _count(self, tx: Tx, rows_o: int, rows_f: int, size: int) -> None:
        for key, delta in zip(schema.COUNTERS, (rows_o, rows_f, size), strict=True):
            if delta:
                tx.q("UPDATE meta SET num = num + ? WHERE key = ?", (delta, key))

    def _counters(self, tx: Tx) -> dict[str, int]:
        rows = tx.q(f"SELECT key, num FROM meta WHERE key IN ({_marks(len(schema.COUNTERS))})",
                    schema.COUNTERS)
        return {k: int(n) for k, n in rows}

    def recount(self) -> dict[str, int]:
        """Count the rows and bytes again (once, when the helper starts): the running counts
        the caps use could have drifted if rows were deleted by hand."""
        with self._tx() as tx:
            # Lock the counters first: a writer that commits meanwhile adds its delta after.
            tx.q(f"SELECT num FROM meta WHERE key IN ({_marks(len(schema.COUNTERS))})"
                 + self.backend.for_update, schema.COUNTERS)
            o = tx.one("SELECT COUNT(*), COALESCE(SUM(size), 0) FROM outcomes")
            f = tx.one("SELECT COUNT(*), COALESCE(SUM(size), 0) FROM failures")
            assert o is not None and f is not None
            values = {"rows:outcomes": int(o[0]), "rows:failures": int(f[0]),
                      "bytes": int(o[1]) + int(f[1])}
            for key, num in values.items():
                tx.q("UPDATE meta SET num = ? WHERE key = ?", (num, key))
            return values

    def _set_seq(self, tx: Tx, key: str, seq: int, now: float) -> None:
        full = f"seq:{key}"
        known = tx.one("SELECT num FROM meta WHERE key = ?", (full,))
        tx.q("INSERT INTO meta (key, num, at) VALUES (?, ?, ?) ON CONFLICT (key) DO UPDATE "
             "SET num = CASE WHEN excluded.num > meta.num THEN excluded.num ELSE meta.num END, "
             "at = excluded.at", (full, seq, now))
        if known is None:  # a new run: forget the oldest runs of this host
            prefix = f"seq:{key.split('/', 1)[0]}/"
            old = tx.q("SELECT key FROM meta WHERE key LIKE ? ESCAPE '\\' ORDER BY at DESC",
                       (_escape(prefix) + "%",))
            # SQLite's LIKE ignores case: keep to this host's exact spelling.
            old = [row for row in old if row[0].startswith(prefix)]
            for (stale,) in old[SEQ_RUNS_KEPT:]:
                tx.q("DELETE FROM meta WHERE key = ?", (stale,))

    def last_seq(self, key: str) -> int:
        """The last sequence number committed under `key` ("host/run"), 0 if none."""
        with self._tx() as tx:
            row = tx.one("SELECT num FROM meta WHERE key = ?", (f"seq:{key}",))
        return int(row[0]) if row else 0

    def _delete(self, tx: Tx, table: str, where: str, params: Sequence[Any], order: str,
                limit: int) -> tuple[int, int]:
        """Delete up to `limit` rows of `table` matching `where`, first by `order`:
        (rows, bytes) deleted. RETURNING counts only what this call removed, even when
        another host trims the same rows at the same time."""
        if limit <= 0:
            return 0, 0
        sizes = tx.q(f"DELETE FROM {table} WHERE id IN (SELECT id FROM {table} WHERE {where} "
                     f"ORDER BY {order} LIMIT ?) RETURNING size", (*params, limit))
        return len(sizes), sum(int(s) for (s,) in sizes)

    def _trim(self, tx: Tx, now: float) -> None:
        """Enforce ttl, max_entries and max_bytes, deleting at most TRIM_BATCH rows."""
        caps = self.caps
        c = self._counters(tx)
        rows_o, rows_f, size = (c.get(k, 0) for k in schema.COUNTERS)
        budget = TRIM_BATCH
        gone_o = gone_f = gone_b = 0

        def drop(table: str, where: str, params: Sequence[Any], order: str,
                 limit: int) -> tuple[int, int]:
            nonlocal budget, gone_o, gone_f, gone_b
            n, b = self._delete(tx, table, where, params, order, min(limit, budget))
            budget -= n
            gone_b += b
            if table == "outcomes":
                gone_o += n
            else:
                gone_f += n
            return n, b

        cutoff = now - caps.ttl
        drop("outcomes", "started < ?", (cutoff,), "started", budget)
        for state in (*FINISHED, "dead"):
            drop("failures", "state = ? AND last_failed < ?", (state, cutoff),
                 "last_failed", budget)
        for failed in (0, 1):
            drop("outcomes", "failed = ?", (failed,), "id", rows_o - gone_o - caps.max_entries)
        for state in FAILURE_TRIM_ORDER:
            drop("failures", "state = ?", (state,), "id", rows_f - gone_f - caps.max_entries)
        steps = [("outcomes", "failed = ?", (0,)), ("outcomes", "failed = ?", (1,)),
                 *(("failures", "state = ?", (s,)) for s in FAILURE_TRIM_ORDER)]
        for table, where, params in steps:
            while size - gone_b > caps.max_bytes and budget > 0:
                if drop(table, where, params, "id", 100)[0] == 0:
                    break
        self._count(tx, -gone_o, -gone_f, -gone_b)

    # -- retries ------------------------------------------------------------------------------

    def claim_due(self, now: float, host: str, limit: int) -> list[Due]:
        """Claim up to `limit` retries due by `now` for `host` (retrying -> submitting):
        each row is claimed by one UPDATE that only a retrying row matches, so two hosts
        never both get it. Submit each, then `submitted` or `unclaim` it."""
        with self._tx() as tx:
            rows = tx.q("SELECT id FROM failures WHERE state = 'retrying' AND due <= ? "
                        "ORDER BY due LIMIT ?", (now, max(0, min(limit, MAX_LIST))))
            claimed = []
            for (fid,) in rows:
                tx.q("UPDATE failures SET state = 'submitting', claimed_by = ?, "
                     "claimed_at = ? WHERE id = ? AND state = 'retrying'", (host, now, fid))
                if tx.rowcount == 1:
                    claimed.append(int(fid))
            found = []
            for chunk in _chunks(claimed):
                found += tx.q('SELECT id, function, "unique", attempt, payload, pool FROM '
                              f"failures WHERE id IN ({_marks(len(chunk))})", chunk)
        return sorted((Due(int(i), f, u or "", int(a) + 1, bytes(p or b""), pool or "")
                       for i, f, u, a, p, pool in found), key=lambda d: claimed.index(d.id))

    def submitted(self, ids: Sequence[int]) -> None:
        """A job server took these claimed retries (submitting -> submitted)."""
        self._set_state(ids, "submitted", "state = 'submitting'")

    def unclaim(self, ids: Sequence[int]) -> None:
        """No job server took these claimed retries: they wait again (submitting ->
        retrying, due unchanged, so they go at the next try)."""
        self._set_state(ids, "retrying", "state = 'submitting'", clear_claim=True)

    def recover_claims(self, host: str) -> int:
        """Claims `host` left in submitting (its helper died between claim and answer) go
        back to retrying. Such a retry may have reached a job server: sending it again
        is the lesser harm, and gearmand coalesces the same unique while it is queued."""
        with self._tx() as tx:
            tx.q("UPDATE failures SET state = 'retrying', claimed_by = NULL, claimed_at = NULL "
                 "WHERE state = 'submitting' AND claimed_by = ?", (host,))
            return tx.rowcount

    def requeue_lost(self, now: float, older_than: float) -> int:
        """Retries a job server took more than `older_than` seconds ago whose run never
        reported back (a gearmand restarted without a persistent queue loses its jobs)
        are due again (submitted -> retrying, due now). Sent again with the same unique,
        one still queued on that server is coalesced by gearmand."""
        with self._tx() as tx:
            tx.q("UPDATE failures SET state = 'retrying', due = ?, claimed_by = NULL, "
                 "claimed_at = NULL WHERE state = 'submitted' AND claimed_at < ?",
                 (now, now - older_than))
            return tx.rowcount

    def next_due(self) -> float | None:
        """When the earliest waiting retry is due (epoch seconds), or None."""
        with self._tx() as tx:
            row = tx.one("SELECT MIN(due) FROM failures WHERE state = 'retrying'")
        return None if row is None or row[0] is None else float(row[0])

    def _set_state(self, ids: Sequence[int], state: str, guard: str,
                   clear_claim: bool = False) -> int:
        changed = 0
        extra = ", claimed_by = NULL, claimed_at = NULL" if clear_claim else ""
        with self._tx() as tx:
            for chunk in _chunks(ids):
                tx.q(f"UPDATE failures SET state = ?{extra} WHERE id IN "
                     f"({_marks(len(chunk))}) AND {guard}", (state, *chunk))
                changed += tx.rowcount
        return changed

    # -- reading, for the CLI and the helper's report ----------------------------------------

    @staticmethod
    def _filters(function: str | None, since: float | None,
                 error: str | None) -> tuple[str, list[Any]]:
        where, params = ["state = 'dead'"], []
        if function is not None:
            where.append("function = ?")
            params.append(function)
        if since is not None:
            where.append("last_failed >= ?")
            params.append(since)
        if error:
            where.append("LOWER(error) LIKE ? ESCAPE '\\'")
            params.append(_like(error))
        return " AND ".join(where), params

    def dead_counts(self) -> dict[str, int]:
        """Dead letters per function (for gearvisor_dead_letters{function})."""
        with self._tx() as tx:
            rows = tx.q("SELECT function, COUNT(*) FROM failures WHERE state = 'dead' "
                        "GROUP BY function ORDER BY function LIMIT ?", (MAX_LIST,))
        return {f: int(n) for f, n in rows}

    def dead_groups(self, function: str | None = None, since: float | None = None,
                    error: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        """Dead letters grouped by function and error fingerprint, the largest group first:
        function, fingerprint, count, first_failed, last_failed, and the newest one's id,
        error_class and error as the sample. `since`: last failed at or after (epoch s);
        `error`: text its error contains (case-insensitive)."""
        where, params = self._filters(function, since, error)
        with self._tx() as tx:
            groups = tx.q("SELECT function, fingerprint, COUNT(*), MIN(first_failed), "
                          f"MAX(last_failed), MAX(id) FROM failures WHERE {where} "
                          "GROUP BY function, fingerprint ORDER BY COUNT(*) DESC, MAX(id) DESC "
                          "LIMIT ?", (*params, max(0, min(limit, MAX_LIST))))
            samples: dict[int, tuple] = {}
            for chunk in _chunks([g[5] for g in groups]):
                for row in tx.q(f"SELECT id, error_class, error FROM failures WHERE id IN "
                                f"({_marks(len(chunk))})", chunk):
                    samples[int(row[0])] = row
        out = []
        for fn, fp, n, first, last, newest in groups:
            _, error_class, text = samples.get(int(newest), (None, None, None))
            out.append({"function": fn, "fingerprint": fp, "count": int(n),
                        "first_failed": first, "last_failed": last, "id": int(newest),
                        "error_class": error_class, "error": text})
        return out

    def dead_show(self, failure_id: int) -> dict[str, Any] | None:
        """One failures row (any state) with every column, or None."""
        with self._tx() as tx:
            row = tx.one(f"SELECT {_cols(FAILURE_COLUMNS)} FROM failures WHERE id = ?",
                         (int(failure_id),))
        if row is None:
            return None
        out = dict(zip(FAILURE_COLUMNS, row, strict=True))
        out["payload"] = None if out["payload"] is None else bytes(out["payload"])
        out["payload_cut"] = bool(out["payload_cut"])
        return out

    def select_dead(self, ids: Sequence[int] | None = None, function: str | None = None,
                    since: float | None = None, error: str | None = None,
                    limit: int = 1000, with_payload: bool = False) -> list[dict[str, Any]]:
        """Dead letters to replay or delete, oldest first: those of `ids`, or those the
        filters match (the same as dead_groups'), at most `limit`."""
        where, params = self._filters(function, since, error)
        cols = SUMMARY_COLUMNS + (("payload",) if with_payload else ())
        limit = max(0, min(limit, MAX_LIST))
        rows: list[tuple] = []
        with self._tx() as tx:
            if ids is None:
                rows = tx.q(f"SELECT {_cols(cols)} FROM failures WHERE {where} ORDER BY id "
                            "LIMIT ?", (*params, limit))
            else:
                for chunk in _chunks(ids):
                    rows += tx.q(f"SELECT {_cols(cols)} FROM failures WHERE {where} AND id IN "
                                 f"({_marks(len(chunk))})", (*params, *chunk))
                rows = rows[:limit]
        out = [dict(zip(cols, r, strict=True)) for r in rows]
        for d in out:
            d["payload_cut"] = bool(d["payload_cut"])
            if with_payload and d["payload"] is not None:
                d["payload"] = bytes(d["payload"])
        return out

    def count_dead(self, ids: Sequence[int] | None = None, function: str | None = None,
                   since: float | None = None, error: str | None = None) -> int:
        """How many dead letters select_dead would match without its limit (for
        `dead delete --expect N`)."""
        where, params = self._filters(function, since, error)
        with self._tx() as tx:
            if ids is None:
                row = tx.one(f"SELECT COUNT(*) FROM failures WHERE {where}", params)
                return int(row[0]) if row else 0
            total = 0
            for chunk in _chunks(ids):
                row = tx.one(f"SELECT COUNT(*) FROM failures WHERE {where} AND id IN "
                             f"({_marks(len(chunk))})", (*params, *chunk))
                total += int(row[0]) if row else 0
            return total

    def mark_replayed(self, ids: Sequence[int]) -> int:
        """These dead letters were submitted again by an operator (dead -> replayed);
        returns how many were dead."""
        return self._set_state(ids, "replayed", "state = 'dead'")

    def unmark_replayed(self, ids: Sequence[int]) -> int:
        """No job server took these replays after all (replayed -> dead): the CLI marks a
        dead letter before it submits it, so two operators never both submit one."""
        return self._set_state(ids, "dead", "state = 'replayed'")

    def delete(self, ids: Sequence[int]) -> int:
        """Delete these failures rows (any state); returns how many there were."""
        gone = size = 0
        with self._tx() as tx:
            for chunk in _chunks(ids):
                sizes = tx.q(f"DELETE FROM failures WHERE id IN ({_marks(len(chunk))}) "
                             "RETURNING size", chunk)
                gone += len(sizes)
                size += sum(int(s) for (s,) in sizes)
            self._count(tx, 0, -gone, -size)
        return gone

    def recent(self, function: str | None = None, unique: str | None = None,
               failed: bool = False, limit: int = 50) -> list[dict[str, Any]]:
        """Recent outcomes, newest first (`gearvisor jobs`): of one function, of one unique,
        failures only; at most `limit` (and MAX_LIST)."""
        where, params = [], []
        if function is not None:
            where.append("function = ?")
            params.append(function)
        if unique is not None:
            where.append('"unique" = ?')
            params.append(unique)
        if failed:
            where.append("failed = 1")
        sql = f"SELECT {_cols(OUTCOME_COLUMNS)} FROM outcomes"
        if where:
            sql += " WHERE " + " AND ".join(where)
        with self._tx() as tx:
            rows = tx.q(sql + " ORDER BY id DESC LIMIT ?",
                        (*params, max(0, min(limit, MAX_LIST))))
        return [dict(zip(OUTCOME_COLUMNS, r, strict=True)) for r in rows]


def open_store(url: str, state_dir: str, caps: Caps | None = None) -> Store:
    """Open the store `url` names ("sqlite": state_dir/journal.sqlite3; "sqlite:///path";
    "postgresql://..."), creating its tables if missing. StoreError if it cannot be opened
    or was made by a newer gearvisor."""
    backend = backend_for(url, state_dir)
    try:
        with backend.transaction() as tx:
            schema.ensure(backend, tx, time.time())
    except StoreError:
        backend.close()
        raise
    return Store(backend, caps or Caps())
