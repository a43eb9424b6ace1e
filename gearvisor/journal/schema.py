"""The job store's tables: one schema, one text for both databases (backend.py fills in the
two column types they spell differently), and its version in the `meta` table.

- `outcomes`: one row per journal record: did job U run, when, how long, how it ended.
- `failures`: one row per failed job, updated by its retries: the dead letters and the
  retries waiting (state retrying -> submitting -> submitted -> retrying | dead | done;
  dead -> replayed).
- `meta`: the schema version, the running counts the caps are checked against (so a write
  never counts a million rows), and the last sequence number committed per master run.

`size` is what a row counts against max_bytes: its texts and payload.
"""

from __future__ import annotations

from gearvisor.journal.backend import Backend, StoreError, Tx

VERSION = 1

TABLES = """
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    num BIGINT NOT NULL DEFAULT 0,
    at DOUBLE PRECISION
);
CREATE TABLE IF NOT EXISTS outcomes (
    id {id},
    outcome TEXT NOT NULL,
    failed SMALLINT NOT NULL,
    function TEXT NOT NULL,
    "unique" TEXT,
    handle TEXT,
    server TEXT,
    pool TEXT,
    slot BIGINT,
    host TEXT,
    generation BIGINT,
    attempt BIGINT NOT NULL,
    started DOUBLE PRECISION NOT NULL,
    seconds DOUBLE PRECISION,
    error_class TEXT,
    error TEXT,
    failure_id BIGINT,
    size BIGINT NOT NULL
);
CREATE INDEX IF NOT EXISTS outcomes_function ON outcomes (function, id);
CREATE INDEX IF NOT EXISTS outcomes_unique ON outcomes ("unique", id);
CREATE INDEX IF NOT EXISTS outcomes_failed ON outcomes (failed, id);
CREATE INDEX IF NOT EXISTS outcomes_started ON outcomes (started);
CREATE TABLE IF NOT EXISTS failures (
    id {id},
    function TEXT NOT NULL,
    "unique" TEXT,
    fingerprint TEXT NOT NULL,
    state TEXT NOT NULL,
    attempt BIGINT NOT NULL,
    first_failed DOUBLE PRECISION NOT NULL,
    last_failed DOUBLE PRECISION NOT NULL,
    due DOUBLE PRECISION,
    outcome TEXT NOT NULL,
    error_class TEXT,
    error TEXT,
    traceback TEXT,
    payload {blob},
    payload_sha256 TEXT,
    payload_size BIGINT,
    payload_cut SMALLINT NOT NULL,
    pool TEXT,
    slot BIGINT,
    host TEXT,
    generation BIGINT,
    handle TEXT,
    server TEXT,
    claimed_by TEXT,
    claimed_at DOUBLE PRECISION,
    size BIGINT NOT NULL
);
CREATE INDEX IF NOT EXISTS failures_due ON failures (state, due);
CREATE INDEX IF NOT EXISTS failures_state ON failures (state, id);
CREATE INDEX IF NOT EXISTS failures_function ON failures (state, function);
CREATE INDEX IF NOT EXISTS failures_last ON failures (state, last_failed);
"""

COUNTERS = ("rows:outcomes", "rows:failures", "bytes")


def statements(backend: Backend) -> list[str]:
    """The schema's statements with the backend's column types filled in."""
    text = TABLES.replace("{id}", backend.id_type).replace("{blob}", backend.blob_type)
    return [s.strip() for s in text.split(";") if s.strip()]


def ensure(backend: Backend, tx: Tx, now: float) -> None:
    """Create the tables if missing and check the version: a store made by a newer
    gearvisor is refused (an older one would misread it), with what to do."""
    if backend.kind == "postgresql":
        # Several hosts may open a new shared store at once; CREATE ... IF NOT EXISTS
        # races in PostgreSQL, so they take turns. The key is an arbitrary constant.
        tx.q("SELECT pg_advisory_xact_lock(7746617)")
    for sql in statements(backend):
        tx.q(sql)
    row = tx.one("SELECT num FROM meta WHERE key = 'schema'")
    if row is None:
        tx.q("INSERT INTO meta (key, num, at) VALUES ('schema', ?, ?)", (VERSION, now))
        for key in COUNTERS:
            tx.q("INSERT INTO meta (key, num, at) VALUES (?, 0, ?) ON CONFLICT (key) DO NOTHING",
                 (key, now))
    elif int(row[0]) > VERSION:
        raise StoreError(f"job store {backend.name}: its schema is version {row[0]}, made by "
                         f"a newer gearvisor (this one knows version {VERSION}); upgrade "
                         "gearvisor on this host, or point journal.store elsewhere")
