"""What the master keeps across restarts (firing alerts, notification times, silences,
acks): small named JSON documents in one SQLite file under `state_dir`.

SQLite in WAL mode with synchronous=NORMAL: a commit appends to the log without an fsync
(the fsync happens at checkpoints), so a save costs the loop well under a millisecond on a
local disk, and a crash loses at most the last few saves, never the file. Callers save
when their state changed, at most about once a second. The file is opened by the master
only; a second master on the same state_dir is refused by the control socket first.
"""

from __future__ import annotations

import json
import os
import sqlite3
from typing import Any

MAX_DOCUMENT = 16 * 1024 * 1024  # a saved document larger than this is refused, not written


class StateError(Exception):
    """The state file cannot be opened, read or written; the message names it."""


class StateStore:
    """load(key) / save(key, value) of JSON-able values in `<directory>/state.sqlite3`."""

    def __init__(self, directory: str) -> None:
        self.path = os.path.join(directory, "state.sqlite3")
        try:
            os.makedirs(directory, mode=0o700, exist_ok=True)
            self.db = sqlite3.connect(self.path, isolation_level=None, timeout=1.0)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")
            self.db.execute("CREATE TABLE IF NOT EXISTS state (key TEXT PRIMARY KEY, "
                            "value TEXT NOT NULL)")
        except (OSError, sqlite3.Error) as e:
            raise StateError(f"cannot open the state file {self.path}: {e}; check "
                             "state_dir (it must be a directory the master can write), or "
                             "move a damaged file away") from None

    def load(self, key: str) -> Any | None:
        """The value saved under `key`, or None if there is none."""
        try:
            row = self.db.execute("SELECT value FROM state WHERE key = ?", (key,)).fetchone()
        except sqlite3.Error as e:
            raise StateError(f"cannot read {key!r} from {self.path}: {e}") from None
        if row is None:
            return None
        try:
            return json.loads(row[0])
        except ValueError as e:
            raise StateError(f"{self.path}: {key!r} is not valid JSON ({e}); it is "
                             "ignored") from None

    def save(self, key: str, value: Any) -> None:
        """Replace what is saved under `key` (one transaction)."""
        text = json.dumps(value, separators=(",", ":"), sort_keys=True)
        if len(text) > MAX_DOCUMENT:
            raise StateError(f"{key!r} is {len(text)} bytes, more than the {MAX_DOCUMENT} a "
                             f"state document may be; not saved to {self.path}")
        try:
            self.db.execute("INSERT OR REPLACE INTO state (key, value) VALUES (?, ?)",
                            (key, text))
        except sqlite3.Error as e:
            raise StateError(f"cannot write {key!r} to {self.path}: {e}") from None

    def close(self) -> None:
        self.db.close()
