"""Poison jobs: a job that kills or hangs its worker again and again.

gearmand hands a job whose worker died to the next worker, forever (`-j 0`). The master knows
which job each child was running (its scoreboard), so when a child crashes or is killed for a
hard timeout mid-job, the job gets a strike. At `poison_after` strikes the job is poison: its
key goes into a table in shared memory that every child checks before it runs a job, and a
poisoned job is answered WORK_FAIL without running.

A job is known by its unique id, or by its handle when the client gave none (gearmand keeps the
handle across retries). The key is a 64-bit BLAKE2b digest of "function\\0id".
"""

from __future__ import annotations

import collections
import hashlib
import mmap
import struct

_HEADER = struct.Struct("<QQ")  # seq (odd while the master writes), count
_KEY = struct.Struct("<Q")
CAPACITY = 4096  # keys kept; the oldest is overwritten when full (a ring)


def job_key(function: str, unique: str, handle: str, data: bytes = b"",
            server: str = "") -> int:
    """The job's identity across retries: its unique id; without one, its handle on its
    server plus a digest of its payload (handles restart at 1 with gearmand, and two
    gearmands hand out the same ones)."""
    h = hashlib.blake2b(digest_size=8)
    h.update(function.encode(errors="replace") + b"\0")
    if unique:
        h.update(b"u\0" + unique.encode(errors="replace"))
    else:
        h.update(b"h\0" + f"{server}\0{handle}\0".encode(errors="replace"))
        h.update(hashlib.blake2b(data, digest_size=16).digest())
    return _KEY.unpack(h.digest())[0]


class PoisonTable:
    """The shared list of poisoned job keys. Created in the master before any fork; the
    master adds, children look up (a child refreshes its local set when `seq` moved)."""

    def __init__(self, capacity: int = CAPACITY) -> None:
        self.capacity = capacity
        self._mm = mmap.mmap(-1, _HEADER.size + _KEY.size * capacity)
        self._seq = 0
        self._count = 0
        self._seen_seq = -1  # child side: the seq its local set was built at
        self._local: set[int] = set()

    def add(self, key: int) -> None:
        """Master side."""
        slot = self._count % self.capacity
        self._seq += 1
        self._mm[0:8] = _KEY.pack(self._seq)
        _KEY.pack_into(self._mm, _HEADER.size + slot * _KEY.size, key)
        self._count += 1
        self._mm[8:16] = _KEY.pack(self._count)
        self._seq += 1
        self._mm[0:8] = _KEY.pack(self._seq)

    def __contains__(self, key: int) -> bool:
        """Child side: one 8-byte read per job while nothing changed."""
        seq = _KEY.unpack_from(self._mm, 0)[0]
        if seq != self._seen_seq:
            self._refresh()
        return key in self._local

    def _refresh(self) -> None:
        for _ in range(1000):
            seq, count = _HEADER.unpack_from(self._mm, 0)
            if seq & 1:
                continue
            n = min(count, self.capacity)
            keys = set(struct.unpack_from(f"<{n}Q", self._mm, _HEADER.size)) if n else set()
            if _KEY.unpack_from(self._mm, 0)[0] == seq:
                self._local, self._seen_seq = keys, seq
                return

    def close(self) -> None:
        self._mm.close()


class StrikeCounter:
    """Master side: strikes per job key, bounded (the oldest keys are forgotten)."""

    def __init__(self, limit: int = 10000) -> None:
        self.limit = limit
        self.strikes: collections.OrderedDict[int, int] = collections.OrderedDict()

    def strike(self, key: int) -> int:
        """One more strike for `key`; returns its count."""
        count = self.strikes.pop(key, 0) + 1
        self.strikes[key] = count
        while len(self.strikes) > self.limit:
            self.strikes.popitem(last=False)
        return count
