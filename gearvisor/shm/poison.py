"""Poison jobs: a job that kills or hangs its worker again and again.

gearmand hands a job whose worker died to the next worker, at once and forever (`-j 0`). Each
child writes the key of the job it runs into its slot of a shared table (RunningJobs); when a
child crashes or is killed for a hard timeout mid-job, the master records a strike against
that key in another shared table (PoisonTable) and frees the slot in the same write (one
seqlock window). Before a child runs a job it counts the deaths on it (PoisonTable.deaths):
strikes, plus slots of children that died on it and are not reaped yet, read again if the
master moved a death from one to the other meanwhile, so each death counts exactly once. At
`poison_after` the job is answered WORK_FAIL without running. So the count holds even when
gearmand re-hands the job before the master has noticed the death.

A job is known by its unique id; without one, by its server, handle and a digest of its
payload (see job_key).

A command pool's worker is not our code, so its shim cannot read these tables: the master
strikes the job its shim reported (master/health.py), and lists a job that reached a pool's
poison_after in that pool's PoisonList, a memfd each of its children inherits, for the shim
to refuse.
"""

from __future__ import annotations

import collections
import functools
import hashlib
import mmap
import os
import struct
from collections.abc import Callable

_HEADER = struct.Struct("<QQ")  # seq (odd while the master writes), count
_KEY = struct.Struct("<Q")
CAPACITY = 4096  # keys kept; the oldest is overwritten when full (a ring)


def no_others(key: int, index: int) -> int:
    """PoisonTable.deaths' `others` without a RunningJobs table: none."""
    return 0


def job_key(function: str, unique: str, handle: str, data: bytes = b"",
            server: str = "") -> int:
    """The job's identity across retries: its unique id; without one, its handle on its
    server plus its payload (handles restart at 1 with gearmand, and two gearmands hand out
    the same ones). Python's hash, computed per job: its secret is the same in the master
    and in every child forked from it, and keys never leave that process tree."""
    if unique:
        h = hash((function, "u", unique))
    else:
        h = hash((function, "h", server, handle, data))
    return (h & 0xFFFFFFFFFFFFFFFF) or 1  # a 64-bit slot value; 0 means "no job"


def command_job_key(function: str, unique: str, handle: str, key: str = "") -> int:
    """The key of a job a command child's shim reported: its shim's own key (shim_key)
    when it sent one, else its unique, else its handle alone (it says no server, and the
    master keeps its payload only with the journal on): master/health.py strikes it,
    master/journal.py reads it."""
    if key:
        return (hash((function, "k", key)) & 0xFFFFFFFFFFFFFFFF) or 1
    return job_key(function, unique, handle)


class PoisonTable:
    """Strikes against jobs, shared by the master (writes) and every child (reads): a ring
    of job keys, one entry per child that died on that job. Created before any fork. A child
    rebuilds its counts when the sequence number moved (one 8-byte read per job otherwise).
    Old strikes fall off the ring: keys are forgotten after CAPACITY more strikes."""

    def __init__(self, capacity: int = CAPACITY) -> None:
        self.capacity = capacity
        self._mm = mmap.mmap(-1, _HEADER.size + _KEY.size * capacity)
        self._seq = 0
        self._count = 0
        self._seen_seq = -1  # child side: the seq its local counts were built at
        self._local: collections.Counter[int] = collections.Counter()

    def add(self, key: int, also: Callable[[], None] | None = None) -> None:
        """Master side: one more strike against `key`. `also` runs inside the same write:
        the dead child's running slot freed, so a child counting deaths (deaths()) sees
        the strike and the freed slot together, or neither."""
        slot = self._count % self.capacity
        self._seq += 1
        self._mm[0:8] = _KEY.pack(self._seq)
        _KEY.pack_into(self._mm, _HEADER.size + slot * _KEY.size, key)
        self._count += 1
        self._mm[8:16] = _KEY.pack(self._count)
        if also is not None:
            also()
        self._seq += 1
        self._mm[0:8] = _KEY.pack(self._seq)

    def deaths(self, key: int, others: Callable[[int, int], int], index: int = -1) -> int:
        """Child side: strikes against `key` plus `others(key, index)` (deaths still in
        running slots: RunningJobs.others), from one consistent moment: read again while
        the master is moving a death from a slot to this table (the seq is odd, or moved),
        so none counts twice or not at all. A write takes microseconds; after 1000 reads
        the last count stands. (Runs before every job: a bound method and two arguments,
        not a closure made per job.)"""
        mm = self._mm
        n = 0
        for _ in range(1000):
            seq = _KEY.unpack_from(mm, 0)[0]
            if seq & 1:
                continue
            if seq == self._seen_seq and not self._local:
                n = others(key, index)  # (counts current, no strike at all: the usual case)
            else:
                n = self.strikes(key) + others(key, index)
            if _KEY.unpack_from(mm, 0)[0] == seq:
                return n
        return n

    def strikes(self, key: int) -> int:
        """Child side (and tests): strikes recorded against `key`."""
        seq = _KEY.unpack_from(self._mm, 0)[0]
        if seq != self._seen_seq:
            self._refresh()
        return self._local.get(key, 0)  # (not [key]: a Counter's __missing__ is Python)

    def __contains__(self, key: int) -> bool:
        return self.strikes(key) > 0

    def _refresh(self) -> None:
        for _ in range(1000):
            seq, count = _HEADER.unpack_from(self._mm, 0)
            if seq & 1:
                continue
            n = min(count, self.capacity)
            keys = collections.Counter(struct.unpack_from(f"<{n}Q", self._mm, _HEADER.size)
                                       if n else ())
            if _KEY.unpack_from(self._mm, 0)[0] == seq:
                self._local, self._seen_seq = keys, seq
                return

    def close(self) -> None:
        self._mm.close()


class RunningJobs:
    """Which job each child is running, fleet-wide, in shared memory: one slot per child (the
    master hands it out before fork; only that child writes it): its pid, then the key of
    the job it runs (0 when idle). A child that died mid-job leaves the key in its slot until
    the master has reaped it and recorded the strike, so the next child offered the job
    (gearmand re-hands it at once) still counts that death. A slot whose child is alive
    does not count (gearmand re-queues the job of a live worker that lost its connection)."""

    SLOT = 16
    # The table starts with the number of slots ever handed out (the master writes it), so
    # a child scans only those: slots are handed out lowest first, and a freed slot is the
    # next one handed out, so the used part stays about as big as the fleet.
    _TOP = 8

    def __init__(self, capacity: int = CAPACITY) -> None:
        self.capacity = capacity
        self._mm = mmap.mmap(-1, self._TOP + self.SLOT * capacity)
        self._free = list(range(capacity - 1, -1, -1))  # master side
        self._high = 0

    def _at(self, index: int) -> int:
        return self._TOP + index * self.SLOT

    def allocate(self) -> int:
        """Master side: a free slot for a new child (-1 when all are taken)."""
        if not self._free:
            return -1
        index = self._free.pop()
        if index >= self._high:
            self._high = index + 1
            _KEY.pack_into(self._mm, 0, self._high)
        return index

    def release(self, index: int) -> None:
        """Master side, after the strike (if any) was recorded: the slot is free again."""
        if index >= 0:
            self._mm[self._at(index):self._at(index + 1)] = bytes(self.SLOT)
            self._free.append(index)

    def forget(self, index: int) -> None:
        """Master side, before it kills a child on purpose (a stop that ran out of time):
        whatever it runs then is no strike against the job."""
        if index >= 0:
            _KEY.pack_into(self._mm, self._at(index), 0)

    def claim(self, index: int, pid: int) -> None:
        """Child side, at start: who owns the slot."""
        if index >= 0:
            _KEY.pack_into(self._mm, self._at(index) + 8, pid)

    def set(self, index: int, key: int) -> None:
        """Child side: the job it starts (key) or 0 when it ends."""
        if index >= 0:
            _KEY.pack_into(self._mm, self._at(index), key)

    def setter(self, index: int) -> Callable[[int], None] | None:
        """Child side: set(index, key) as one C call, for the per-job writes (None for no
        slot)."""
        if index < 0:
            return None
        return functools.partial(_KEY.pack_into, self._mm, self._at(index))

    def others(self, key: int, index: int) -> int:
        """Child side: other slots holding `key` whose child is dead (not reaped yet)."""
        needle = _KEY.pack(key)
        mm = self._mm
        top = self._TOP
        end = top + _KEY.unpack_from(mm, 0)[0] * self.SLOT
        n = 0
        at = mm.find(needle, top, end)
        while at >= 0:  # (almost always -1 at once: no other child runs this job)
            slot, offset = divmod(at - top, self.SLOT)
            if offset == 0 and slot != index:
                pid = _KEY.unpack_from(mm, at + 8)[0]
                if not _alive(pid):
                    n += 1
            at = mm.find(needle, at + 1, end)
        return n

    def close(self) -> None:
        self._mm.close()


PF_EXITING = 0x4  # linux/sched.h: set at the start of do_exit()


def _alive(pid: int) -> bool:
    """A running process: not exiting, not a zombie waiting to be reaped, not gone.

    Exiting counts as dead: a child that dies mid-job closes its sockets (exit_files)
    before it becomes a zombie, so gearmand may re-hand the job to another child while
    the dying one still shows state R. Its flags say PF_EXITING from the start of exit."""
    if pid <= 0:
        return False
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return False
    fields = stat[stat.rfind(b")") + 2:].split()
    if not fields or fields[0] in (b"Z", b"X", b"x"):
        return False
    try:
        flags = int(fields[6])  # field 9 of /proc/PID/stat; fields[0] is field 3
    except (IndexError, ValueError):
        return True
    return not flags & PF_EXITING


LIST_CAPACITY = 4096  # keys the command workers' list keeps: then the newest half


def shim_key(function: str, unique: str, handle: str, key: str = "") -> str | None:
    """A command job's line in the PoisonList (40 hex digits): the key its shim sent with
    job_started, computed from the raw bytes as the shims do, sha1("<function>\\0u\\0
    <unique>"), or for a job without a unique sha1("<function>\\0h\\0<handle>\\0<hex
    sha1 of the whole payload>") (gearmand reuses handles after a restart, and two on one
    host hand out the same ones: the payload tells their jobs apart). A shim that sent no
    key: its unique's (UTF-8, as the JSON line carried it), or None without one (not
    listed: a handle alone could name another job)."""
    if key:
        return key
    if not unique:
        return None
    data = function.encode(errors="surrogatepass") + b"\0u\0" + unique.encode(
        errors="surrogatepass")
    return hashlib.sha1(data).hexdigest()


class PoisonList:
    """The poison jobs of one command pool, for its workers' shims to refuse: a memfd the
    master appends a line to (shim_key) when a job's strikes reach the pool's poison_after;
    every command child of the pool gets a read-only open of it of its own at POISON_FD
    (child/command.own_reader: its offset is no other worker's). A shim checks its size
    (fstat) before each job and reads it again when the size or the mtime (whole seconds)
    moved. So the size only grows: lines are appended, and a rewrite (replace: a reload
    changed poison_after) is padded with empty lines, which shims skip, to one byte more
    than before. Only when that would pass LIST_CAPACITY lines' worth of bytes is it
    rewritten smaller: without its padding, or when it is full of keys, with the newest
    half of them. Lines are written with pwrite, whole, by one process: a reader sees a
    prefix of whole lines, or one line cut short, which it ignores (the next size change
    brings it whole)."""

    LINE = 41  # 40 hex digits and a newline

    def __init__(self, capacity: int = LIST_CAPACITY) -> None:
        self.capacity = capacity
        self.fd = os.memfd_create("gearvisor-poison", os.MFD_CLOEXEC)
        try:
            # (read-only for everyone else: a worker could reopen its fd 4 for writing
            # through /proc otherwise; the master writes through the fd it has)
            os.fchmod(self.fd, 0o400)
        except OSError:
            os.close(self.fd)
            raise
        self.keys: dict[bytes, None] = {}  # the lines listed, oldest first
        self.size = 0  # bytes written: the lines and any padding

    def add(self, shim_key: str) -> bool:
        """List the job of `shim_key` (once); False if it was listed already."""
        key = shim_key.encode() + b"\n"
        if key in self.keys:
            return False
        if self.size + len(key) > self.capacity * self.LINE:
            # Full of padding: the keys alone (smaller, so the shims read it again); full
            # of keys: the newest half of them.
            kept = list(self.keys)
            self._write(kept if len(kept) < self.capacity else
                        kept[len(kept) - self.capacity // 2:], padded=False)
        os.pwrite(self.fd, key, self.size)
        self.size += len(key)
        self.keys[key] = None
        return True

    def replace(self, shim_keys: list[str]) -> bool:
        """Make the list `shim_keys` (at most the newest `capacity`): a reload changed the
        pool's poison_after. False if it held just those already (in any order)."""
        keys = [k.encode() + b"\n" for k in dict.fromkeys(shim_keys)][-self.capacity:]
        if set(keys) == self.keys.keys():
            return False
        self._write(keys, padded=True)
        return True

    def _write(self, keys: list[bytes], padded: bool) -> None:
        text = b"".join(keys)
        if padded:
            if self.size + 1 <= self.capacity * self.LINE:
                text += b"\n" * max(0, self.size + 1 - len(text))
            elif len(text) == self.size:  # (it cannot grow, and must not stay this size)
                keys = keys[len(keys) - self.capacity // 2:]
                text = b"".join(keys)
        os.pwrite(self.fd, text, 0)  # (over the old lines, then cut: never an empty list)
        os.ftruncate(self.fd, len(text))
        self.keys, self.size = dict.fromkeys(keys), len(text)

    def __contains__(self, shim_key: str) -> bool:
        return shim_key.encode() + b"\n" in self.keys

    def close(self) -> None:
        os.close(self.fd)
