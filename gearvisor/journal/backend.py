"""The two databases the job store runs on, behind one small interface.

The store's SQL is written once, with `?` parameters; what differs between SQLite and
PostgreSQL lives here and nowhere else: how to connect, the parameter style (PostgreSQL's
driver wants `%s`), the two column types that have no common spelling (an auto-numbered
key, a byte string), row locks, and how a driver's error becomes a `StoreError` that names
the store (never its password). A broken connection is dropped, and the next call connects
again: a database that was down is used again as soon as it is back.
"""

from __future__ import annotations

import os
import sqlite3
import urllib.parse
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

BUSY_TIMEOUT = 5.0  # seconds SQLite waits for another writer (the CLI) before it fails
CONNECT_TIMEOUT = 5  # seconds PostgreSQL gets to answer a connection
DEFAULT_FILE = "journal.sqlite3"


class StoreError(Exception):
    """The store cannot be opened, read or written; the text names the store and why."""


class Tx:
    """One open transaction: `q` runs a statement and returns its rows."""

    def __init__(self, cursor: Any, convert: bool) -> None:
        self._cursor = cursor
        self._convert = convert
        self.rowcount = 0

    def q(self, sql: str, params: Sequence[Any] = ()) -> list[tuple]:
        """Run `sql` (`?` parameters) with `params`; its rows (empty for none)."""
        if self._convert:
            # The store's SQL has no other `%` and no `?` inside a literal (checked by a test).
            sql = sql.replace("?", "%s")
        self._cursor.execute(sql, tuple(params))
        self.rowcount = self._cursor.rowcount
        if self._cursor.description is None:
            return []
        return [tuple(r) for r in self._cursor.fetchall()]

    def one(self, sql: str, params: Sequence[Any] = ()) -> tuple | None:
        """The first row of `sql`, or None."""
        rows = self.q(sql, params)
        return rows[0] if rows else None


class Backend:
    """A database connection made on demand; subclasses say how."""

    kind = ""
    id_type = ""  # an auto-numbered primary key whose numbers are never reused
    blob_type = ""
    for_update = ""  # row lock suffix for a SELECT that is followed by an UPDATE

    def __init__(self, name: str) -> None:
        self.name = name  # how errors name the store: a path, or the URL without password
        self._conn: Any = None

    def close(self) -> None:
        """Close the connection (the next transaction opens a new one)."""
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.close()
            except Exception:  # noqa: BLE001 - closing a broken connection may fail; it is gone
                pass

    def data_errors(self) -> tuple[type[BaseException], ...]:
        """The driver's errors that mean "this row cannot be stored" (a constraint, a
        value), not "the store is unwell": what Store.write(careful=True) skips a record
        for."""
        return ()

    def error(self, e: BaseException) -> StoreError:
        """`e` as a StoreError naming the store: one line, bounded."""
        text = " ".join(str(e).split())[:500] or type(e).__name__
        return StoreError(f"job store {self.name}: {text}")

    @contextmanager
    def transaction(self) -> Iterator[Tx]:
        """One transaction: committed when the block ends, rolled back if it raises."""
        raise NotImplementedError
        yield  # pragma: no cover


class SQLiteBackend(Backend):
    """A SQLite file in WAL mode: the helper writes while the CLI reads, and a second writer
    (the CLI deleting dead letters) waits BUSY_TIMEOUT instead of failing at once."""

    kind = "sqlite"
    id_type = "INTEGER PRIMARY KEY AUTOINCREMENT"
    blob_type = "BLOB"

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.path = path

    def data_errors(self) -> tuple[type[BaseException], ...]:
        return (sqlite3.IntegrityError, sqlite3.DataError)

    def _connect(self) -> sqlite3.Connection:
        try:
            os.makedirs(os.path.dirname(self.path) or ".", mode=0o700, exist_ok=True)
            # Payloads can hold personal data: the file (and SQLite's -wal and -shm files,
            # which copy its mode) is the owner's alone.
            os.close(os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600))
            conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT, isolation_level=None)
        except OSError as e:
            raise StoreError(f"job store {self.path}: cannot open it: {e.strerror or e}; "
                             "check the directory exists and is writable (state_dir, or "
                             "the path in journal.store)") from None
        except sqlite3.Error as e:
            raise self.error(e) from None
        try:
            mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            conn.execute(f"PRAGMA busy_timeout={int(BUSY_TIMEOUT * 1000)}")
        except sqlite3.Error as e:
            conn.close()
            raise self.error(e) from None
        if str(mode).lower() != "wal":
            conn.close()
            raise StoreError(f"job store {self.path}: cannot switch it to WAL mode (got "
                             f"{mode}); put it on a local file system")
        return conn

    @contextmanager
    def transaction(self) -> Iterator[Tx]:
        if self._conn is None:
            self._conn = self._connect()
        conn = self._conn
        try:
            # IMMEDIATE: take the write lock now, so two writers wait for each other at the
            # start instead of one failing at its first write.
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as e:
            self.close()
            raise self.error(e) from None
        try:
            yield Tx(conn.cursor(), convert=False)
            conn.execute("COMMIT")
        except sqlite3.Error as e:
            self._rollback(conn)
            raise self.error(e) from None
        except BaseException:
            self._rollback(conn)
            raise

    def _rollback(self, conn: sqlite3.Connection) -> None:
        try:
            conn.execute("ROLLBACK")
        except sqlite3.Error:
            self.close()  # not in a usable state: start afresh next time


def redact(url: str) -> str:
    """A PostgreSQL URL fit for a message: its password (in the netloc or the query)
    replaced by ***."""
    try:
        parts = urllib.parse.urlsplit(url)
        netloc = parts.netloc
        if "@" in netloc:
            user, _, where = netloc.rpartition("@")
            if ":" in user:
                user = user.split(":", 1)[0] + ":***"
            netloc = f"{user}@{where}"
        query = urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
        query = [(k, "***" if k.lower() == "password" else v) for k, v in query]
        return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path,
                                        urllib.parse.urlencode(query, safe="*"), ""))
    except ValueError:
        return "postgresql://(unparsable URL)"


class PostgresBackend(Backend):
    """A PostgreSQL server through psycopg 3, in autocommit mode outside transactions."""

    kind = "postgresql"
    id_type = "BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY"
    blob_type = "BYTEA"
    for_update = " FOR UPDATE"

    def __init__(self, url: str) -> None:
        super().__init__(redact(url))
        self.url = url
        self._password = urllib.parse.urlsplit(url).password or ""

    def data_errors(self) -> tuple[type[BaseException], ...]:
        import psycopg

        return (psycopg.IntegrityError, psycopg.DataError)

    def error(self, e: BaseException) -> StoreError:
        err = super().error(e)
        if self._password and self._password in str(err):  # never show it, whatever the text
            return StoreError(str(err).replace(self._password, "***"))
        return err

    def _connect(self) -> Any:
        try:
            import psycopg
        except ImportError:
            raise StoreError(f"job store {self.name}: psycopg (3) is not installed; "
                             "pip install 'psycopg[binary]'") from None
        extra = {} if "connect_timeout" in self.url else {"connect_timeout": CONNECT_TIMEOUT}
        try:
            return psycopg.connect(self.url, autocommit=True, **extra)
        except (psycopg.Error, ValueError) as e:
            raise self.error(e) from None

    @contextmanager
    def transaction(self) -> Iterator[Tx]:
        import psycopg

        if self._conn is None or self._conn.closed or self._conn.broken:
            self.close()
            self._conn = self._connect()
        conn = self._conn
        try:
            with conn.transaction(), conn.cursor() as cursor:
                yield Tx(cursor, convert=True)
        except psycopg.Error as e:
            if conn.closed or conn.broken or isinstance(e, psycopg.OperationalError):
                self.close()  # reconnect on the next call
            raise self.error(e) from None


def backend_for(url: str, state_dir: str) -> Backend:
    """The backend a `journal.store` value names; StoreError for one it cannot be."""
    if url == "sqlite":
        return SQLiteBackend(os.path.join(state_dir, DEFAULT_FILE))
    if url.startswith("sqlite:///"):
        path = url[len("sqlite://"):]
        if path == "/" or path.endswith("/"):
            raise StoreError(f"journal.store {url!r}: names a directory; give a file, e.g. "
                             "sqlite:///var/lib/gearvisor/journal.sqlite3")
        return SQLiteBackend(path)
    if url.startswith(("postgresql://", "postgres://")):
        return PostgresBackend(url)
    shown = redact(url) if "@" in url else url[:100]
    raise StoreError(f"journal.store {shown!r}: not a store; use sqlite (a file in "
                     "state_dir), sqlite:///absolute/path or postgresql://user@host/db")
