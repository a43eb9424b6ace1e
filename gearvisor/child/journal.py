"""The child side of the job journal: one record per job that ended, batched, written as
journal lines (journal/record.py) to the child's event pipe, never blocking the job loop.

A batch is written when it holds FLUSH_RECORDS records, when the worker is about to wait for
work, when FLUSH_AFTER seconds passed since its first record (checked when a job ends, and
by the worker's loop at due_at: no timer, no signal), and before the child exits. The pipe
is non-blocking: a line the pipe has no room for waits for the next flush, and the part of
a line a pipe took only in part goes out before anything else (the master reads lines;
nothing may be written into the middle of one). What waits is bounded (MAX_PENDING
records, MAX_PENDING_BYTES): past that the oldest successes are dropped and counted, then
(only when there are no successes left to drop) the oldest failures.

A success costs the job loop one tuple appended; it is encoded at flush time, by hand,
because json.dumps per record would cost more than the rest of the journal together.
Failures are rare and are encoded with json.dumps when they happen.
"""

from __future__ import annotations

import base64
import collections
import hashlib
import json
import os
import random
import select
import time
import traceback
from collections.abc import Callable
from json.encoder import encode_basestring_ascii as _esc  # type: ignore[attr-defined]
from typing import Any

from gearvisor.config.model import JournalConfig, PoolConfig
from gearvisor.job import Job
from gearvisor.journal.record import JOURNAL_PREFIX, MAX_ERROR, MAX_LINE, MAX_TRACEBACK
from gearvisor.policy.retry import decide

FLUSH_RECORDS = 64  # a full batch is written at once
FLUSH_AFTER = 1.0  # seconds: the oldest unwritten record waits at most about this long
MAX_PENDING = 10_000  # records waiting for room in the pipe
RETRY_AFTER = 0.25  # seconds between tries of a write the pipe had no room for (rare)
MAX_PENDING_BYTES = 16 * 1024 * 1024  # bytes of encoded failures waiting (payloads)
MAX_NAME = 1024  # characters of a handle kept (a job server chooses it: it may be huge)
_SUFFIX = b"]}\n"
_SEP = b", "
# the part of a success record that is not its own (bytes estimate for splitting lines:
# every field escaped at worst as \uXXXX, six bytes a character)
_SUCCESS_OVERHEAD = 400


class ChildJournal:
    """One child's journal records and their writing to its event pipe.

    `clock` is monotonic (flush timing), `wall` is epoch seconds (what a record says),
    `rand` the retry jitter's random source; `write` is os.write (tests give a fake)."""

    def __init__(self, journal: JournalConfig, pool: PoolConfig, slot: int, generation: int,
                 host: str, fd: int, clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time,
                 rand: Callable[[], float] = random.random,
                 write: Callable[[int, bytes], int] = os.write) -> None:
        self.fd = fd
        self.successes_on = journal.successes
        self.payload_cap = journal.payload_cap
        self.failed_payload = pool.failed_payload
        self.retry = pool.retry
        self.pool, self.slot, self.generation, self.host = pool.name, slot, generation, host
        self.clock, self.wall, self.rand, self._write = clock, wall, rand, write
        # the same for every record of this child, encoded once
        self._ours = (f'"pool": {_esc(pool.name)}, "slot": {int(slot)}, "host": {_esc(host)}, '
                      f'"generation": {int(generation)}')
        # (function, server) -> its success record's %-template (_template)
        self._templates: dict[tuple[str, str], str] = {}
        # (function, unique, handle, server, attempt, retry_of, started, seconds)
        self.successes: collections.deque[tuple] = collections.deque()
        self.failures: collections.deque[bytes] = collections.deque()  # encoded records
        self.failure_bytes = 0
        self.first_at: float | None = None  # clock() of the oldest unwritten record
        self.tail = b""  # the rest of a line the pipe took only in part
        self.tail_started = False  # part of that line is in the pipe already
        self.retry_at = 0.0  # clock() before which a write the pipe refused is not retried
        self.dropped_successes = 0
        self.dropped_failures = 0
        self.written = 0  # records written

    # -- recording -------------------------------------------------------------------------

    def success(self, job: Job, seconds: float) -> None:
        """A job succeeded (the per-job fast path: a tuple appended, flushed when due)."""
        if not self.successes_on and job.retry_of is None and not job.strikes:
            return  # (a retry's or a crashed job's success ends a failure: always kept)
        successes = self.successes
        successes.append((job.function, job.unique, job.handle, job.server, job.attempt,
                          job.retry_of, self.wall() - seconds, seconds))
        # job_ended(), inlined: this runs once per job
        n = len(successes) + len(self.failures)
        if self.first_at is None:
            self.first_at = self.clock()
            if n < FLUSH_RECORDS and not self.tail:
                return
        if n > MAX_PENDING:
            self._drop_oldest()
        self.job_ended()

    def failure(self, job: Job, outcome: str, seconds: float,
                error: BaseException | None = None, text: str | None = None) -> None:
        """A job failed: `outcome` is error, timeout or poison (killed and crash are the
        master's); `error` the exception it raised, or `text` says why it did not run."""
        now = self.wall()
        decision, due = decide(self.retry.get(job.function), outcome, job.attempt, now,
                               self.rand)
        record: dict[str, Any] = {
            "outcome": outcome, "function": job.function, "unique": job.unique,
            "handle": job.handle[:MAX_NAME], "server": job.server, "pool": self.pool,
            "slot": self.slot, "host": self.host, "generation": self.generation,
            "attempt": job.attempt, "retry_of": job.retry_of, "started": now - seconds,
            "seconds": seconds}
        if error is not None:
            record["error_class"] = type(error).__name__
            record["error"] = _error_text(error)[:MAX_ERROR]
            record["traceback"] = _traceback_tail(error)
        elif text is not None:
            record["error_class"] = outcome.capitalize()  # e.g. "Poison": not run at all
            record["error"] = text[:MAX_ERROR]
        record.update(self.payload_fields(job.function, job.data))
        record["decision"], record["due"] = decision, due
        encoded = json.dumps(record).encode()
        if self.first_at is None:
            self.first_at = self.clock()
        self.failures.append(encoded)
        self.failure_bytes += len(encoded)
        while (self.failure_bytes > MAX_PENDING_BYTES
               or len(self.successes) + len(self.failures) > MAX_PENDING):
            if not self._drop_oldest():
                break
        self.job_ended()

    def payload_fields(self, function: str, data: bytes) -> dict[str, Any]:
        """What a failure record keeps of the payload, by the function's failed_payload."""
        mode = self.failed_payload.get(function, "store")
        fields: dict[str, Any] = {"payload_size": len(data)}
        if mode == "drop":
            return fields
        fields["payload_sha256"] = hashlib.sha256(data).hexdigest()
        if mode == "store":
            fields["payload"] = base64.b64encode(data[:self.payload_cap]).decode()
            fields["payload_cut"] = len(data) > self.payload_cap
        return fields

    def _drop_oldest(self) -> bool:
        """Make room: the oldest success, else the oldest failure. False: nothing left."""
        if self.successes:
            self.successes.popleft()
            self.dropped_successes += 1
            return True
        if len(self.failures) > 1:  # the newest is kept: it is the one being added
            self.failure_bytes -= len(self.failures.popleft())
            self.dropped_failures += 1
            return True
        return False

    def job_ended(self) -> None:
        """At the end of every job: write a full batch, or one whose first record waited
        FLUSH_AFTER; else the rest of a line the pipe took in part (it holds back the
        child's other events)."""
        if (len(self.successes) + len(self.failures) >= FLUSH_RECORDS
                or (self.first_at is not None
                    and self.clock() - self.first_at >= FLUSH_AFTER)):
            self.flush()
        elif self.tail:
            self.finish_tail()

    def due_at(self) -> float:
        """When the worker's loop must give the journal a pass (tick) of its own, in clock()
        seconds (inf: never): a batch whose first record waited FLUSH_AFTER, or a write the
        pipe had no room for, tried again every RETRY_AFTER. So records never wait for a
        next job that may not come (an idle or quarantined child), and a child with nothing
        to write has no wake-up for it."""
        if self.tail:
            return self.retry_at
        if self.first_at is None:
            return float("inf")
        return max(self.first_at + FLUSH_AFTER, self.retry_at)

    def tick(self) -> None:
        """A pass of the worker's loop: write what is due (due_at)."""
        if self.first_at is None and not self.tail:
            return  # (nothing waits: the common pass, without a clock read)
        now = self.clock()
        if now >= self.due_at() and not self.flush():
            self.retry_at = now + RETRY_AFTER  # the master reads soon; do not spin on it

    def _template(self, function: str, server: str) -> str:
        """A success record of `function` from `server`, with %-slots for the unique, the
        handle, the attempt, started and seconds."""
        fixed = (f'{{"outcome": "success", "function": {_esc(function)}, "unique": \0, '
                 f'"handle": \0, "server": {_esc(server)}, {self._ours}, "attempt": \1, '
                 '"started": \2, "seconds": \2}')
        return (fixed.replace("%", "%%").replace("\0", "%s").replace("\1", "%d")
                .replace("\2", "%.6f"))

    # -- writing ---------------------------------------------------------------------------

    def pending(self) -> int:
        """Records not written yet (not counting the rest of a line the pipe took in part)."""
        return len(self.successes) + len(self.failures)

    def blocks_others(self) -> bool:
        """Part of a journal line is in the pipe: no other line may be written before its
        rest (finish_tail first)."""
        return self.tail_started

    def flush(self) -> bool:
        """Write what waits, as far as the pipe takes it without blocking. True when all of
        it is out."""
        if not self.finish_tail():
            return False
        while self.successes or self.failures:
            line = self._next_line()
            if not self._send(line):
                return False
        self.first_at = None
        return True

    def flush_before_exit(self, wait: float) -> bool:
        """The child is exiting: write what waits, waiting for room up to `wait` seconds
        in all (the master reads the pipe until the child is reaped). True: all out."""
        deadline = self.clock() + wait
        room = select.poll()  # not select(): the fd may be past FD_SETSIZE
        room.register(self.fd, select.POLLOUT)
        while not self.flush():
            left = deadline - self.clock()
            if left <= 0:
                return False
            room.poll(min(left, 0.1) * 1000)
        return True

    def finish_tail(self) -> bool:
        """Write the rest of a line the pipe took only in part. True when none is left."""
        if not self.tail:
            return True
        return self._send(self.tail)

    def _send(self, data: bytes) -> bool:
        """Write `data`; keep what the pipe did not take as the tail. True: all written."""
        try:
            n = self._write(self.fd, data)
        except BlockingIOError:
            n = 0
        except OSError:  # the master is gone: nobody will read it
            n = 0
        self.tail = data[n:]
        self.tail_started = bool(self.tail) and (n > 0 or self.tail_started)
        return not self.tail

    def _next_line(self) -> bytes:
        """Take records (failures first) into one journal line of at most MAX_LINE bytes
        (one record always fits: a payload is capped, so is its text)."""
        parts: list[bytes] = []
        size = len(JOURNAL_PREFIX) + len(_SUFFIX)
        while self.failures:
            n = len(self.failures[0]) + len(_SEP)
            if parts and size + n > MAX_LINE:
                break
            encoded = self.failures.popleft()
            self.failure_bytes -= len(encoded)
            parts.append(encoded)
            size += n
        templates = self._templates
        while self.successes and size < MAX_LINE:
            fn, unique, handle, server, attempt, retry_of, started, seconds = \
                self.successes[0]
            n = _SUCCESS_OVERHEAD + 6 * (len(fn) + len(unique) + min(len(handle), MAX_NAME)
                                         + len(server))
            if parts and size + n > MAX_LINE:
                break
            self.successes.popleft()
            template = templates.get((fn, server))
            if template is None:
                template = self._template(fn, server)
                if len(templates) < 1024:  # (functions and servers come from the config)
                    templates[(fn, server)] = template
            if retry_of is not None:  # a retry that succeeded: rare, the slower way
                template = template.replace('"attempt": %d', '"attempt": %d, "retry_of": '
                                            + str(int(retry_of)))
            # one %-format: times to the microsecond (cheaper than a float's repr)
            parts.append((template % (_esc(unique), _esc(handle[:MAX_NAME]), attempt, started,
                                      seconds)).encode())
            size += n
        self.written += len(parts)
        return JOURNAL_PREFIX + _SEP.join(parts) + _SUFFIX


def _error_text(error: BaseException) -> str:
    try:
        return str(error)
    except Exception:  # a user exception whose __str__ raises
        return f"<{type(error).__name__}: str() failed>"


def _traceback_tail(error: BaseException) -> str:
    try:
        return "".join(traceback.format_exception(error))[-MAX_TRACEBACK:]
    except Exception:
        return ""
