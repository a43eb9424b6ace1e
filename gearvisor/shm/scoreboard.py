"""A per-child shared-memory record: what the child is doing now, without a syscall per job.

The master maps one anonymous shared page per child before fork. The child writes its job
counters and current job there (a few hundred nanoseconds, no syscall, no wake-up of the
master); the master reads it when it needs to (status, a crash: which job was running).
Single writer, so a sequence counter is enough to read a consistent snapshot (a seqlock).

After the record come a few single bytes (no tearing) and, with lanes (docs/prefetch.md),
the lane the child holds a job on while it runs another. That one has two writers: the
child records and clears it, the master closes the lane and says so. A process-shared lock
(a POSIX semaphore, fresh for each child) orders the two, so a child never starts a job
from a lane the master closed, and the master never closes a lane whose job has started.
"""

from __future__ import annotations

import mmap
import multiprocessing
import struct
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gearvisor.shm.payload import PayloadArea
    from gearvisor.shm.stats import JobStats

# The record: seq (8 bytes) then the body: busy, done, failed, job_started (monotonic;
# CLOCK_MONOTONIC is system-wide on Linux), function, handle, unique, payload size, poison key.
_SEQ = struct.Struct("<Q")
_BODY = struct.Struct("<B7xQQd128s128s128sQQ")
_TEXT = 128
_END = _SEQ.size + _BODY.size  # where the body ends and the master's control byte is
_READ_ATTEMPTS = 1000  # spins: a write takes about a microsecond
_NAMES_KEPT = 256  # function names a child keeps encoded (a hostile server may send any)
# Single bytes after the control byte, both the master's.
_LANES_OFF = _END + 1  # it cannot close this child's lanes: hold nothing
_CLOSED = _END + 2  # (under the lock) which held lanes it closed: bit i for entry i
# Under the lock: when the job in front started and how many lanes may hold the next job
# (the same server's other lane, and other servers' lanes with a GRAB out), then each one's
# fd and local port (fd -1: closed by the master).
MAX_HELD = 8  # lanes recorded per job (bits of _CLOSED); beyond it (5+ servers) not closable
_HOLD_HEAD = struct.Struct("<dI4x")
_HOLD_ENTRY = struct.Struct("<ii")
_HOLD_AT = _END + 8
_ENTRIES_AT = _HOLD_AT + _HOLD_HEAD.size
_HOLD_ONE = struct.Struct("<dI4xii")  # the head and one entry, as they lie
_SIZE = _ENTRIES_AT + _HOLD_ENTRY.size * MAX_HELD
LOCK_WAIT = 1.0  # the child's longest wait for the lock (the master holds it for microseconds)
_FORK = multiprocessing.get_context("fork")


class Take(Enum):
    """What Scoreboard.take_held did."""

    NOTHING = "nothing"  # no lane held, or the job in front is not slow yet
    CLOSED = "closed"  # the held lane is closed: its job is gearmand's again
    REFUSED = "refused"  # the close failed (the lane is left as it was)
    BUSY = "busy"  # the child has the lock: it is changing lanes right now


@dataclass(frozen=True)
class Snapshot:
    busy: bool
    done: int
    failed: int
    job_started: float
    function: str
    handle: str
    unique: str
    size: int = 0  # payload bytes of the current job
    key: int = 0  # its poison.job_key (0: unknown)


def _cut(text: str) -> bytes:
    """At most 128 bytes of UTF-8, never ending in half a character."""
    return _fit(text.encode(errors="replace"))


def _fit(raw: bytes) -> bytes:
    """_cut for text already encoded."""
    if len(raw) <= _TEXT:
        return raw
    return raw[:_TEXT].decode(errors="ignore").encode()


class Scoreboard:
    """One child's record. Create in the master before fork; the child writes, master reads."""

    __slots__ = ("_mm", "_seq", "_done", "_failed", "_busy", "_last", "stats", "payload",
                 "lock", "_names")

    def __init__(self, stats: JobStats | None = None,
                 payload: PayloadArea | None = None, lanes: bool = False) -> None:
        # anonymous + MAP_SHARED: survives fork. Layout: seq, body (the child writes), then
        # one control byte the master writes (1: stop taking jobs, the circuit is open),
        # then the bytes and the held lane above.
        self._mm = mmap.mmap(-1, _SIZE)
        # The held lane's lock (lanes only): a semaphore shared across fork, not a name.
        self.lock = _FORK.Lock() if lanes else None
        self._seq = 0
        self._done = 0
        self._failed = 0
        self._busy = False  # the writer's own copy
        self._names: dict[str, bytes] = {}  # the writer's: function names, cut (job_started)
        self._last: Snapshot | None = None  # the reader's last consistent snapshot
        # Per-function job counts and durations (shm/stats.py), when metrics are on; mapped
        # with the scoreboard, released with it.
        self.stats = stats
        # The current job's payload (shm/payload.py), when the journal is on: what a crash
        # record keeps. Mapped with the scoreboard, released with it.
        self.payload = payload

    def _write(self, busy: bool, started: float, function: bytes, handle: bytes,
               unique: bytes, size: int = 0, key: int = 0) -> None:
        # (The sequence goes out as one 8-byte copy of packed bytes: pack_into writes it a
        # byte at a time after zeroing it, which a reader can catch half-way. The body may
        # be written any way: the odd sequence covers it.)
        mm = self._mm
        self._busy = busy
        seq = self._seq + 1  # odd: a write is in progress
        mm[0:8] = _SEQ.pack(seq)
        _BODY.pack_into(mm, 8, busy, self._done, self._failed, started, function, handle,
                        unique, size, key)
        self._seq = seq = seq + 1
        mm[0:8] = _SEQ.pack(seq)

    def job_started(self, function: str, handle: str, unique: str, now: float,
                    size: int = 0, key: int = 0) -> None:
        """Child side: a job began. (Runs per job: the function's bytes are kept, and a
        handle or unique id that fits is not cut.)"""
        name = self._names.get(function)
        if name is None:
            name = _cut(function)
            if len(self._names) < _NAMES_KEPT:
                self._names[function] = name
        raw_handle = handle.encode("utf-8", "replace")  # (positional: no keyword parse)
        raw_unique = unique.encode("utf-8", "replace")
        self._write(True, now, name, raw_handle if len(raw_handle) <= _TEXT else _fit(raw_handle),
                    raw_unique if len(raw_unique) <= _TEXT else _fit(raw_unique), size, key)

    def job_finished(self, ok: bool) -> None:
        """Child side: the current job ended."""
        if ok:
            self._done += 1
        else:
            self._failed += 1
        self._write(False, 0.0, b"", b"", b"")

    def read(self) -> Snapshot | None:
        """Master side: a consistent snapshot, never blocking. While the child is mid-write
        the reader spins (a write takes about a microsecond); a writer preempted or killed
        mid-write leaves the sequence odd, and then the last consistent snapshot this
        reader saw is the answer (None if it never saw one). The master never sleeps here.
        """
        mm = self._mm
        for _ in range(_READ_ATTEMPTS):
            seq1 = mm[0:8]
            if seq1[0] & 1:
                continue
            body = mm[8:_END]
            if mm[0:8] == seq1:
                break
        else:
            return self._last
        fields = _BODY.unpack(body)
        busy, done, failed, started, fn, handle, unique, size, key = fields
        self._last = Snapshot(bool(busy), done, failed, started,
                              fn.rstrip(b"\0").decode(errors="replace"),
                              handle.rstrip(b"\0").decode(errors="replace"),
                              unique.rstrip(b"\0").decode(errors="replace"), size, key)
        return self._last

    def busy(self) -> bool:
        """Child side (the writer, so always consistent, even in a signal handler that
        interrupted a write): is a job running?"""
        return self._busy

    def set_paused(self, paused: bool) -> None:
        """Master side: the state the child must be in (a single byte: no tearing). The
        master then sends SIGUSR1, which only means "look"; the byte says what."""
        self._mm[_END] = 1 if paused else 0

    def paused_wanted(self) -> bool:
        """Child side."""
        return self._mm[_END] == 1

    # -- lanes -----------------------------------------------------------------------------------

    def fence(self) -> None:
        """A full memory barrier (the lock's atomic operations), for shm/lanes.py's hints:
        what this process wrote before is seen by others before what it reads after."""
        lock = self.lock
        if lock is not None and lock.acquire(True, LOCK_WAIT):  # (positional: per job)
            lock.release()

    def set_lanes_off(self) -> None:
        """Master side: it cannot close this child's lanes (the child then holds nothing)."""
        self._mm[_LANES_OFF] = 1

    def lanes_off(self) -> bool:
        return self._mm[_LANES_OFF] == 1

    def hold(self, lanes: list[tuple[int, int]], since: float) -> None:
        """Child side: a job starts (at `since`) while these lanes (socket fd, local port)
        may each bring the next job."""
        lock = self.lock
        if lock is None or not lock.acquire(True, LOCK_WAIT):
            return
        try:
            mm = self._mm
            if len(lanes) == 1:  # (the common case, per job: the same server's other lane)
                _HOLD_ONE.pack_into(mm, _HOLD_AT, since, 1, *lanes[0])
                return
            lanes = lanes[:MAX_HELD]
            for i, (fd, port) in enumerate(lanes):
                _HOLD_ENTRY.pack_into(mm, _ENTRIES_AT + i * _HOLD_ENTRY.size, fd, port)
            _HOLD_HEAD.pack_into(mm, _HOLD_AT, since, len(lanes))
        finally:
            lock.release()

    def release(self) -> int:
        """Child side: that job ended; the lanes are the child's again. Returns which of
        them the master closed meanwhile (bit i for the i-th lane given to hold(); nothing
        read from those may run). If the lock cannot be had, every bit: the child then
        closes them itself, which is always safe."""
        lock = self.lock
        if lock is None or not lock.acquire(True, LOCK_WAIT):
            return (1 << MAX_HELD) - 1
        try:
            _HOLD_HEAD.pack_into(self._mm, _HOLD_AT, 0.0, 0)
            closed = self._mm[_CLOSED]
            self._mm[_CLOSED] = 0
            return closed
        finally:
            lock.release()

    def held(self) -> float | None:
        """Master side, without the lock (a hint: take_held checks again under it): when
        the job in front of the held lanes started, or None when none is held."""
        since, count = _HOLD_HEAD.unpack_from(self._mm, _HOLD_AT)
        return since if count else None

    def take_held(self, now: float, after: float,
                  close: Callable[[int, int], bool | None]) -> Take:
        """Master side: if the job in front of the held lanes has run `after` seconds at
        `now`, close each lane with `close(fd, port)` and tell the child. `close` returns
        True when it closed it, False when it may not (REFUSED), None when it could not
        this time (the child is dying, the fd changed). Never waits for the lock: the child
        holds it for a moment while it changes lanes (BUSY: look again soon)."""
        lock = self.lock
        if lock is None:
            return Take.NOTHING
        if not lock.acquire(False):
            return Take.BUSY
        try:
            mm = self._mm
            since, count = _HOLD_HEAD.unpack_from(mm, _HOLD_AT)
            if not count or since + after > now:
                return Take.NOTHING
            closed = refused = left = 0
            for i in range(min(count, MAX_HELD)):
                at = _ENTRIES_AT + i * _HOLD_ENTRY.size
                fd, port = _HOLD_ENTRY.unpack_from(mm, at)
                if fd < 0:
                    continue  # closed at an earlier look
                done = close(fd, port)
                if done:
                    closed |= 1 << i
                    _HOLD_ENTRY.pack_into(mm, at, -1, 0)
                else:
                    left += 1
                    refused += done is False
            mm[_CLOSED] |= closed
            if not left:
                _HOLD_HEAD.pack_into(mm, _HOLD_AT, 0.0, 0)  # nothing held any more
            return Take.CLOSED if closed else Take.REFUSED if refused else Take.NOTHING
        finally:
            lock.release()

    def close(self) -> None:
        self._mm.close()
        if self.stats is not None:
            self.stats.close()
        if self.payload is not None:
            self.payload.close()
