"""A per-child shared-memory copy of the current job's payload, for the journal's crash
record: a child that dies mid-job cannot say what it was running, so it copies the payload
here when the job starts (only for functions whose `failed_payload` is store or hash), and
the master reads it after the child is gone.

Mapped by the master before fork, only when the journal is on, sized by journal.payload_cap.
One writer (the child), a sequence counter around each write (odd while writing): a child
killed mid-copy leaves it odd, and the read says "unknown" instead of returning half a
payload.
"""

from __future__ import annotations

import mmap
import struct

# seq, the whole payload's size, the bytes kept (<= cap); then the bytes
_HEADER = struct.Struct("<QQQ")
_SEQ = struct.Struct("<Q")
_AT = _HEADER.size  # where the bytes start
_NONE = 2**64 - 1  # the size field when no job's payload is held


class PayloadArea:
    """The current job's payload, its first `cap` bytes. Create in the master before fork;
    the child writes (job_started, clear), the master reads (read)."""

    __slots__ = ("cap", "_mm", "_seq", "_empty")

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self._mm = mmap.mmap(-1, _HEADER.size + cap)  # anonymous + MAP_SHARED: survives fork
        self._seq = 0
        _HEADER.pack_into(self._mm, 0, 0, _NONE, 0)
        self._empty = True

    def job_started(self, data: bytes) -> None:
        """Child side: copy the payload of the job about to run (at most cap bytes). It
        stays until the next job starts: the master reads it only while the scoreboard
        says a job runs."""
        size = len(data)
        seq = self._seq + 1  # odd: being written
        mm = self._mm
        if size <= self.cap:
            _HEADER.pack_into(mm, 0, seq, size, size)
            mm[_AT:_AT + size] = data
        else:
            kept = self.cap
            _HEADER.pack_into(mm, 0, seq, size, kept)
            # a memoryview slice: the first cap bytes of a big payload, without copying it
            mm[_AT:_AT + kept] = memoryview(data)[:kept]
        self._seq = seq + 1
        _SEQ.pack_into(mm, 0, seq + 1)
        self._empty = False

    def clear(self) -> None:
        """Child side: a job whose payload is not copied (failed_payload: drop) starts; the
        last job's copy must not be read as its payload."""
        if not self._empty:
            self._seq += 2
            _HEADER.pack_into(self._mm, 0, self._seq, _NONE, 0)
            self._empty = True

    def read(self) -> tuple[bytes, int, bool] | None:
        """Master side, after the child died: (the bytes kept, the whole payload's size,
        cut: the bytes are only its first cap). None when the child died mid-copy or
        holds no job's payload (no job ran yet, or its function's failed_payload is drop)."""
        seq, size, kept = _HEADER.unpack_from(self._mm, 0)
        if seq & 1 or size == _NONE or kept > self.cap or kept > size:
            return None
        data = self._mm[_HEADER.size:_HEADER.size + kept]
        if _HEADER.unpack_from(self._mm, 0)[0] != seq:  # written meanwhile: not dead yet
            return None
        return data, size, size > kept

    def close(self) -> None:
        """Unmap (the master, once the child is reaped and its crash recorded)."""
        self._mm.close()
