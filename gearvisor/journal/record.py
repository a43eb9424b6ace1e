"""The job journal's wire format: what a child (or the master, for a crash) writes about each
job that ended, and how a retry carries its attempt count through gearmand.

One journal line is one JSON object on a child's event pipe:

    {"event": "journal", "records": [RECORD, ...]}

The line starts with exactly JOURNAL_PREFIX (json.dumps keeps key order), so the master can
forward it to the store helper without decoding it. The store helper is where a line is
checked (store.py `parse_line`): a child's bytes are not trusted, and a bad record is
counted and logged there, never raised.

A RECORD is a JSON object with these keys (FIELDS); absent optional keys mean None:

    outcome     one of OUTCOMES
    function    the gearman function
    unique      the client's unique, with a retry's "gv:" prefix taken off (see below)
    handle      the job server's handle
    server      "host:port" of the job server that assigned it
    pool, slot, host, generation   which child ran it (generation: the pool's code generation)
    attempt     1 for a first run, n for the n-th (from the unique's prefix)
    retry_of    the failure record's id this run retries or replays, else None
    started     wall-clock time the job started (epoch seconds, float)
    seconds     how long it ran (float; 0 for a job refused without running)
    error_class, error, traceback   for a failure: the exception's class name, its text
                (cut to MAX_ERROR) and the traceback's last MAX_TRACEBACK characters
    payload     the payload, base64, at most the journal's payload cap; None unless the
                function's `failed_payload` is `store` and the outcome is a failure
    payload_sha256   hex digest of the whole payload (failures, `store` or `hash`)
    payload_size     the whole payload's length in bytes
    payload_cut      true when `payload` holds only the first cap bytes (not replayable)
    decision    for a failure: "retry" (then `due`, wall clock, says when) or "dead";
                None for a success. Computed where the failure is seen, by
                policy/retry.py, from the function's `retry:` setting. "requeued" for a
                crash or kill the master records: gearmand gives a job whose worker died to
                another worker itself, so the job is not ours to retry; the store links the
                next record of the same job (function and handle) to it.
    due         epoch seconds the retry is due, when decision is "retry"

Retries and replays are submitted with the unique `gv:<retry_of>:<attempt>:<unique>`
(retry_unique). gearmand keeps a unique to GEARMAN_MAX_UNIQUE bytes, so an original unique
that does not fit is left off (`gv:<id>:<attempt>:`): the function then sees an empty
unique, and the store still has the original. parse_unique undoes it on the worker side.
"""

from __future__ import annotations

import json
from typing import Any

JOURNAL_PREFIX = b'{"event": "journal", "records": ['
OUTCOMES = ("success", "error", "timeout", "killed", "crash", "poison")
FAILURES = frozenset(OUTCOMES) - {"success"}
FIELDS = ("outcome", "function", "unique", "handle", "server", "pool", "slot", "host",
          "generation", "attempt", "retry_of", "started", "seconds", "error_class", "error",
          "traceback", "payload", "payload_sha256", "payload_size", "payload_cut",
          "decision", "due")
MAX_ERROR = 1024  # characters of an error's text kept
MAX_TRACEBACK = 4096  # characters of a traceback's tail kept
MAX_LINE = 1 << 20  # a journal line is at most this long (the event pipe's line cap)
GEARMAN_MAX_UNIQUE = 64  # bytes: gearmand's limit on a unique (libgearman-1.0/limits.h)
RETRY_PREFIX = "gv:"


def journal_line(records: list[dict[str, Any]]) -> bytes:
    """One journal line holding `records` (dicts with FIELDS keys), newline-terminated."""
    return json.dumps({"event": "journal", "records": records}).encode() + b"\n"


def retry_unique(retry_of: int, attempt: int, unique: str) -> str:
    """The unique a retry or replay of failure record `retry_of` is submitted with."""
    head = f"{RETRY_PREFIX}{retry_of}:{attempt}:"
    if len((head + unique).encode()) <= GEARMAN_MAX_UNIQUE:
        return head + unique
    return head


def parse_unique(unique: str) -> tuple[str, int, int | None]:
    """(the original unique, the attempt, the failure record id) of an assigned job's
    unique: (unique, 1, None) unless it is one retry_unique made."""
    if not unique.startswith(RETRY_PREFIX):
        return unique, 1, None
    parts = unique[len(RETRY_PREFIX):].split(":", 2)
    if len(parts) != 3 or not parts[0].isdigit() or not parts[1].isdigit():
        return unique, 1, None  # a client's own "gv:..." unique: not ours
    attempt = int(parts[1])
    if not 1 <= attempt <= 1_000_000:
        return unique, 1, None
    return parts[2], attempt, int(parts[0])
