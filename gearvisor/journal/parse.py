"""Checking a journal line from a child: its bytes are untrusted (record.py is the format).

`parse_line` turns one line into typed `Record`s and a list of error texts, one per field
or record it refused. It never raises: a bad field becomes None (and an error), a record
without a known outcome, a function or a known decision is refused whole (and an error).
Texts are cut to their caps and made storable (no NUL, which PostgreSQL refuses in text; no
lone surrogate, which no driver can encode); the payload is base64-decoded and capped.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
from dataclasses import dataclass
from typing import Any

from gearvisor.journal import record

MAX_RECORDS = 10_000  # records in one line; a 1 MiB line holds far fewer real ones
MAX_NAME = 256  # characters of a function, pool, host, handle, server or error class
MAX_UNIQUE = 256  # characters of a unique (gearmand's limit is 64 bytes; room to spare)
MAX_INT = 1 << 62  # integers beyond this are refused (both databases store 64-bit ints)
MAX_TIME = 1 << 34  # epoch seconds (year 2514): a later time is refused as a typo or attack
MAX_ERRORS = 50  # error texts kept per line; the rest are counted in the last one
DECISIONS = ("retry", "dead", "requeued")


@dataclass(frozen=True)
class Record:
    """One checked journal record (record.FIELDS), with the payload as bytes."""

    outcome: str
    function: str
    unique: str | None = None
    handle: str | None = None
    server: str | None = None
    pool: str | None = None
    slot: int | None = None
    host: str | None = None
    generation: int | None = None
    attempt: int = 1
    retry_of: int | None = None
    started: float | None = None
    seconds: float | None = None
    error_class: str | None = None
    error: str | None = None
    traceback: str | None = None
    payload: bytes | None = None
    payload_sha256: str | None = None
    payload_size: int | None = None
    payload_cut: bool = False
    decision: str | None = None
    due: float | None = None

    @property
    def failed(self) -> bool:
        return self.outcome != "success"


def clean_text(value: str, limit: int, tail: bool = False) -> str:
    """`value` storable in either database: lone surrogates and NUL replaced, cut to `limit`
    characters (its last ones when `tail`: a traceback's end is what matters)."""
    if len(value) > limit:
        value = value[-limit:] if tail else value[:limit]
    value = value.encode("utf-8", "replace").decode("utf-8")  # lone surrogates -> "?"
    return value.replace("\x00", "\ufffd")


class _Fields:
    """The checks of one record's fields; each refused field adds an error."""

    def __init__(self, raw: dict[str, Any], where: str, errors: list[str]) -> None:
        self.raw = raw
        self.where = where
        self.errors = errors

    def bad(self, key: str, want: str) -> None:
        got = type(self.raw[key]).__name__
        self.errors.append(f"{self.where}: {key}: expected {want}, got {got}; stored as null")

    def text(self, key: str, limit: int, tail: bool = False) -> str | None:
        value = self.raw.get(key)
        if value is None:
            return None
        if not isinstance(value, str):
            self.bad(key, "a string")
            return None
        return clean_text(value, limit, tail)

    def integer(self, key: str, low: int, high: int = MAX_INT) -> int | None:
        value = self.raw.get(key)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            self.bad(key, f"an integer from {low} to {high}")
            return None
        return value

    def number(self, key: str, high: float) -> float | None:
        value = self.raw.get(key)
        if value is None:
            return None
        if (isinstance(value, bool) or not isinstance(value, (int, float))
                or not math.isfinite(value) or not 0 <= value <= high):
            self.bad(key, f"a number from 0 to {high:g}")
            return None
        return float(value)

    def flag(self, key: str) -> bool:
        value = self.raw.get(key)
        if value is None:
            return False
        if not isinstance(value, bool):
            self.bad(key, "true or false")
            return False
        return value

    def sha256(self) -> str | None:
        value = self.text("payload_sha256", 64)
        if value is not None and (len(value) != 64
                                  or any(c not in "0123456789abcdef" for c in value)):
            self.errors.append(f"{self.where}: payload_sha256: expected 64 lowercase hex "
                               "digits; stored as null")
            return None
        return value

    def payload(self, cap: int) -> tuple[bytes | None, bool]:
        """The decoded payload cut to `cap` bytes, and whether it was cut here."""
        value = self.raw.get("payload")
        if value is None:
            return None, False
        if not isinstance(value, str):
            self.bad("payload", "a base64 string")
            return None, False
        # Decode only what the cap keeps: 4 characters hold 3 bytes.
        keep = value[:4 * (cap // 3 + 1)]
        try:
            data = base64.b64decode(keep, validate=True)
        except (binascii.Error, ValueError):
            self.errors.append(f"{self.where}: payload: not valid base64; stored as null")
            return None, False
        cut = len(keep) < len(value) or len(data) > cap
        return data[:cap], cut


class Errors(list):
    """Error texts, at most MAX_ERRORS kept: a hostile line must not make thousands."""

    more = 0

    def append(self, text: str) -> None:  # type: ignore[override]
        if len(self) < MAX_ERRORS:
            super().append(text)
        else:
            self.more += 1


def parse_record(raw: Any, where: str, payload_cap: int,
                 errors: list[str]) -> Record | None:
    """One record checked, or None (refused, with the reason in `errors`)."""
    if not isinstance(raw, dict):
        errors.append(f"{where}: not a JSON object; refused")
        return None
    outcome = raw.get("outcome")
    if outcome not in record.OUTCOMES:
        errors.append(f"{where}: outcome {clean_text(str(outcome), 40)!r} is not one of "
                      f"{', '.join(record.OUTCOMES)}; refused")
        return None
    f = _Fields(raw, where, errors)
    function = f.text("function", MAX_NAME)
    if not function:
        errors.append(f"{where}: no function (a non-empty string); refused")
        return None
    decision = raw.get("decision")
    due = None
    if outcome == "success":
        decision = None  # a success decides nothing
    elif decision is None:
        decision = "dead"  # a failure nobody decided on is kept as a dead letter
    elif decision not in DECISIONS:
        errors.append(f"{where}: decision {clean_text(str(decision), 40)!r} is not retry, "
                      "dead or requeued; refused")
        return None
    if decision == "retry":
        due = f.number("due", MAX_TIME)
        if due is None:
            errors.append(f"{where}: decision retry needs due (epoch seconds); refused")
            return None
    payload, cut_here = f.payload(payload_cap)
    return Record(
        outcome=outcome, function=function,
        unique=f.text("unique", MAX_UNIQUE), handle=f.text("handle", MAX_NAME),
        server=f.text("server", MAX_NAME), pool=f.text("pool", MAX_NAME),
        slot=f.integer("slot", 0, 1_000_000), host=f.text("host", MAX_NAME),
        generation=f.integer("generation", 0),
        attempt=f.integer("attempt", 1, 1_000_000) or 1,
        retry_of=f.integer("retry_of", 1),
        started=f.number("started", MAX_TIME), seconds=f.number("seconds", MAX_TIME),
        error_class=f.text("error_class", MAX_NAME),
        error=f.text("error", record.MAX_ERROR),
        traceback=f.text("traceback", record.MAX_TRACEBACK, tail=True),
        payload=payload, payload_sha256=f.sha256(),
        payload_size=f.integer("payload_size", 0),
        payload_cut=f.flag("payload_cut") or cut_here,
        decision=decision, due=due)


def parse_line(line: bytes, payload_cap: int) -> tuple[list[Record], list[str]]:
    """The checked records of one journal line and the errors found (record.py's format).
    Never raises; at most MAX_ERRORS error texts (and one saying how many more)."""
    errors = Errors()
    if len(line) > record.MAX_LINE:
        return [], [f"journal line of {len(line)} bytes is longer than {record.MAX_LINE}; "
                    "refused"]
    try:
        raw = json.loads(line)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        return [], [f"journal line is not JSON: {clean_text(str(e), 100)}; refused"]
    if not isinstance(raw, dict) or raw.get("event") != "journal":
        return [], ['journal line is not a {"event": "journal", ...} object; refused']
    items = raw.get("records")
    if not isinstance(items, list):
        return [], ["journal line has no records list; refused"]
    if len(items) > MAX_RECORDS:
        errors.append(f"journal line has {len(items)} records; the first {MAX_RECORDS} kept")
        items = items[:MAX_RECORDS]
    records = []
    for i, item in enumerate(items):
        rec = parse_record(item, f"record {i + 1}", payload_cap, errors)
        if rec is not None:
            records.append(rec)
    out = list(errors)
    if errors.more:
        out.append(f"... and {errors.more} more errors in this line")
    return records, out
