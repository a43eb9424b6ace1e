"""Gearman binary protocol codec: pure bytes in, packets out.

Spec: http://gearman.org/protocol/. Every packet is a 12-byte header (magic, type, size, all
big-endian) followed by `size` bytes of arguments separated by NUL; the last argument of a
packet type may itself contain NULs (it is the job payload).

Nothing here does I/O, so the codec is unit-tested byte for byte and fuzzed without sockets.
"""

from __future__ import annotations

import functools
import io
import struct
from enum import IntEnum
from typing import NamedTuple

REQ = b"\0REQ"
RES = b"\0RES"
HEADER = struct.Struct(">4sII")
HEADER_SIZE = HEADER.size
_COMPLETE = HEADER.pack

# gearmand refuses nothing smaller; a job payload past this is almost surely a corrupt stream
# (or a hostile peer). Configurable per parser so a fleet with huge payloads can raise it.
DEFAULT_MAX_PACKET = 64 * 1024 * 1024
# A JOB_ASSIGN* body bigger than this is not gathered in the decoder's buffer: its payload is
# received straight into a buffer of its exact size, which becomes the job's bytes without a
# copy (so a job costs one copy of its payload, not three).
LARGE_PACKET = 64 * 1024
# The handle, function, unique id (and reducer) ahead of a big job's payload must fit in this.
# gearmand caps them at 64, 512 and 64 bytes; a peer that sends more is not a job server.
MAX_JOB_PREFIX = 64 * 1024


class Packet(IntEnum):
    """Packet type numbers from the protocol spec."""

    CAN_DO = 1
    CANT_DO = 2
    RESET_ABILITIES = 3
    PRE_SLEEP = 4
    NOOP = 6
    SUBMIT_JOB = 7
    JOB_CREATED = 8
    GRAB_JOB = 9
    NO_JOB = 10
    JOB_ASSIGN = 11
    WORK_STATUS = 12
    WORK_COMPLETE = 13
    WORK_FAIL = 14
    GET_STATUS = 15
    ECHO_REQ = 16
    ECHO_RES = 17
    SUBMIT_JOB_BG = 18
    ERROR = 19
    STATUS_RES = 20
    SUBMIT_JOB_HIGH = 21
    SET_CLIENT_ID = 22
    CAN_DO_TIMEOUT = 23
    ALL_YOURS = 24
    WORK_EXCEPTION = 25
    OPTION_REQ = 26
    OPTION_RES = 27
    WORK_DATA = 28
    WORK_WARNING = 29
    GRAB_JOB_UNIQ = 30
    JOB_ASSIGN_UNIQ = 31
    SUBMIT_JOB_HIGH_BG = 32
    SUBMIT_JOB_LOW = 33
    SUBMIT_JOB_LOW_BG = 34
    SUBMIT_JOB_SCHED = 35
    SUBMIT_JOB_EPOCH = 36
    SUBMIT_REDUCE_JOB = 37
    SUBMIT_REDUCE_JOB_BACKGROUND = 38
    GRAB_JOB_ALL = 39
    JOB_ASSIGN_ALL = 40
    GET_STATUS_UNIQUE = 41
    STATUS_RES_UNIQUE = 42


# Number of NUL-separated arguments per packet type. The last argument takes the rest of the
# body verbatim, NULs included, so payloads are never split.
ARG_COUNT: dict[int, int] = {
    Packet.CAN_DO: 1,
    Packet.CANT_DO: 1,
    Packet.RESET_ABILITIES: 0,
    Packet.PRE_SLEEP: 0,
    Packet.NOOP: 0,
    Packet.SUBMIT_JOB: 3,
    Packet.JOB_CREATED: 1,
    Packet.GRAB_JOB: 0,
    Packet.NO_JOB: 0,
    Packet.JOB_ASSIGN: 3,
    Packet.WORK_STATUS: 3,
    Packet.WORK_COMPLETE: 2,
    Packet.WORK_FAIL: 1,
    Packet.GET_STATUS: 1,
    Packet.ECHO_REQ: 1,
    Packet.ECHO_RES: 1,
    Packet.SUBMIT_JOB_BG: 3,
    Packet.ERROR: 2,
    Packet.STATUS_RES: 5,
    Packet.SUBMIT_JOB_HIGH: 3,
    Packet.SET_CLIENT_ID: 1,
    Packet.CAN_DO_TIMEOUT: 2,
    Packet.ALL_YOURS: 0,
    Packet.WORK_EXCEPTION: 2,
    Packet.OPTION_REQ: 1,
    Packet.OPTION_RES: 1,
    Packet.WORK_DATA: 2,
    Packet.WORK_WARNING: 2,
    Packet.GRAB_JOB_UNIQ: 0,
    Packet.JOB_ASSIGN_UNIQ: 4,
    Packet.SUBMIT_JOB_HIGH_BG: 3,
    Packet.SUBMIT_JOB_LOW: 3,
    Packet.SUBMIT_JOB_LOW_BG: 3,
    Packet.SUBMIT_JOB_SCHED: 8,
    Packet.SUBMIT_JOB_EPOCH: 4,
    Packet.SUBMIT_REDUCE_JOB: 4,
    Packet.SUBMIT_REDUCE_JOB_BACKGROUND: 4,
    Packet.GRAB_JOB_ALL: 0,
    Packet.JOB_ASSIGN_ALL: 5,
    Packet.GET_STATUS_UNIQUE: 1,
    Packet.STATUS_RES_UNIQUE: 6,
}


_HANDLE_ONLY = frozenset({Packet.WORK_FAIL, Packet.JOB_CREATED, Packet.GET_STATUS})
_JOB_ASSIGN = frozenset({Packet.JOB_ASSIGN, Packet.JOB_ASSIGN_UNIQ, Packet.JOB_ASSIGN_ALL})

# Not a packet type on the wire: the Decoder's report of a JOB_ASSIGN* whose payload is over
# its max_job. Args: (handle, function, unique, payload size in decimal ASCII). The payload
# itself is skipped as it arrives, never held, so the receiver can fail the job by its handle.
OVERSIZED_JOB = -1


class ProtocolError(Exception):
    """The peer sent bytes that are not a valid Gearman packet; the connection must be closed."""


class Frame(NamedTuple):
    """One decoded packet: its magic (REQ or RES), type and arguments. (A NamedTuple: one
    is made per packet, and a frozen dataclass costs three object.__setattr__ calls.)"""

    magic: bytes
    type: int
    args: tuple[bytes, ...]


# Frame(magic, type, args) without the NamedTuple's own __new__ (a Python function): the
# decoder makes one per packet.
_frame = functools.partial(tuple.__new__, Frame)


def _frame_of(magic: bytes, ptype: int, body: bytes | bytearray | memoryview) -> Frame:
    """One decoded packet from its body (a slice of the stream, copied only when the packet
    has arguments: a NOOP or a NO_JOB has none, and none are expected)."""
    if len(body) or ARG_COUNT[ptype]:
        return _frame((magic, ptype, split_args(ptype, bytes(body))))
    return _frame((magic, ptype, ()))


_WORK_COMPLETE = int(Packet.WORK_COMPLETE)  # (a global: an Enum member costs a hooked lookup)


def encode_result_packet(handle: bytes, data: bytes) -> bytes:
    """WORK_COMPLETE for `handle` with `data` (bytes): encode() without its per-argument
    checks, for the one packet every job sends."""
    return _COMPLETE(REQ, _WORK_COMPLETE, len(handle) + 1 + len(data)) + handle + b"\0" + data


def encode(ptype: int, *args: bytes | str, magic: bytes = REQ) -> bytes:
    """Encode one packet. str arguments are UTF-8 encoded; bytes go out as they are."""
    parts = [a.encode() if isinstance(a, str) else a for a in args]
    body = b"\0".join(parts)
    return HEADER.pack(magic, ptype, len(body)) + body


def split_args(ptype: int, body: bytes) -> tuple[bytes, ...]:
    """Split a packet body into its arguments; the last one keeps any NULs it holds."""
    n = ARG_COUNT[ptype]
    if n == 0:
        if body:
            raise ProtocolError(f"{Packet(ptype).name}: expected no arguments, got "
                                f"{len(body)} bytes")
        return ()
    if n == 1:
        if ptype in _HANDLE_ONLY and body.endswith(b"\0"):
            # gearmand 1.1 sends WORK_FAIL to clients as "handle\0": a handle never holds NUL.
            body = body[:-1]
        return (body,)
    args = body.split(b"\0", n - 1)
    if len(args) != n:
        raise ProtocolError(
            f"{Packet(ptype).name}: expected {n} NUL-separated arguments, got {len(args)}"
        )
    return tuple(args)


class Decoder:
    """Incremental decoder: feed() any chunking of a byte stream, get whole packets back.

    Raises ProtocolError on bad magic (or a magic other than `magic`, when given), an unknown
    packet type, a wrong argument count, or a packet other than JOB_ASSIGN* over `max_packet`
    bytes; the caller closes that one connection and nothing else. A JOB_ASSIGN* payload over
    `max_job` bytes (default: max_packet) is not an error: it comes out as one OVERSIZED_JOB
    frame, as soon as its handle has arrived, and its bytes are skipped.
    """

    __slots__ = ("_buf", "max_packet", "max_job", "_checks", "_rest", "_sink", "_view",
                 "_filled", "_head")

    def __init__(self, max_packet: int = DEFAULT_MAX_PACKET, max_job: int | None = None,
                 magic: bytes | None = None) -> None:
        self._buf = bytearray()
        self.max_packet = max_packet
        self.max_job = max_packet if max_job is None else max_job
        # What each header is checked against, in one attribute (read once per feed): the
        # magics accepted, and the size over which a packet leaves the plain path for
        # _large_packet (a big job, anything over a limit): one comparison per header.
        magics = (magic, magic) if magic is not None else (RES, REQ)
        self._checks = (*magics, min(LARGE_PACKET, max_packet, self.max_job))
        self._rest = 0  # bytes still to come of a big job's payload (or of one to skip)
        self._sink: io.BytesIO | None = None  # a big payload being received, exactly sized
        self._view: memoryview | None = None  # ... and the writable view onto its bytes
        self._filled = 0
        self._head: tuple[bytes, int, tuple[bytes, ...]] = (RES, 0, ())  # its magic, type, args

    def feed(self, data: bytes | memoryview) -> list[Frame]:
        """Add bytes from the stream; return every packet they complete, in order."""
        buf = self._buf
        if not buf and not self._rest and len(data) >= HEADER_SIZE:
            # The common read: exactly one whole packet and nothing buffered. It is taken
            # as it is, without the buffer (a worker reads one such per wake-up); anything
            # else, an error included, goes the general way below.
            magic, ptype, size = HEADER.unpack_from(data, 0)
            magic1, magic2, large = self._checks
            if len(data) - HEADER_SIZE == size and size <= large and (
                    magic == magic1 or magic == magic2) and ptype in ARG_COUNT:
                return [_frame_of(magic, ptype, data[HEADER_SIZE:])]
        frames: list[Frame] = []
        if self._rest:  # a big job's payload (or an oversized job's) is still arriving
            data = self._take_rest(memoryview(data), frames)
        buf += data
        pos = 0
        end = len(buf)
        magic1, magic2, large = self._checks
        while end - pos >= HEADER_SIZE:
            magic, ptype, size = HEADER.unpack_from(buf, pos)
            if magic != magic1 and magic != magic2:
                raise ProtocolError(f"bad magic {bytes(buf[pos:pos + 4])!r} (not a Gearman peer?)")
            if ptype not in ARG_COUNT:
                raise ProtocolError(f"unknown packet type {ptype}")
            if size > large:
                taken = self._large_packet(buf, pos, end, magic, ptype, size, frames)
                if taken < 0:
                    break  # waiting for the rest of its handle, function and unique id
                if taken:
                    pos = taken
                    continue
                # 0: after all a packet for the plain path below
            if end - pos - HEADER_SIZE < size:
                break
            start = pos + HEADER_SIZE
            frames.append(_frame_of(magic, ptype, buf[start:start + size]))
            pos = start + size
        if pos:
            del buf[:pos]
        return frames

    def _large_packet(self, buf: bytearray, pos: int, end: int, magic: bytes, ptype: int,
                      size: int, frames: list[Frame]) -> int:
        """A packet over the plain path's size: return where the stream goes on after what
        was taken (a job, or the start of a big or oversized payload), -1 to wait for more
        bytes, or 0 to decode it on the plain path. Raises ProtocolError."""
        if ptype not in _JOB_ASSIGN:
            if size > self.max_packet:
                raise ProtocolError(f"{Packet(ptype).name} of {size} bytes is over the "
                                    f"{self.max_packet} limit")
            return 0
        start = pos + HEADER_SIZE
        body_end = min(end, start + size)
        limit = min(body_end, start + MAX_JOB_PREFIX)
        nargs = ARG_COUNT[ptype]
        head: list[bytes] = []
        i = start
        for _ in range(nargs - 1):  # the arguments ahead of the payload: short, no NULs
            j = buf.find(b"\0", i, limit)
            if j < 0:
                if body_end == start + size:
                    raise ProtocolError(f"{Packet(ptype).name}: expected {nargs} NUL-separated "
                                        f"arguments, got {len(head) + 1}")
                if limit == start + MAX_JOB_PREFIX:
                    raise ProtocolError(f"{Packet(ptype).name}: handle, function and unique id "
                                        f"take over {MAX_JOB_PREFIX} bytes")
                return -1
            head.append(bytes(buf[i:j]))
            i = j + 1
        payload = start + size - i  # its size
        have = min(end, start + size) - i  # of it, already here
        if payload > self.max_job:
            unique = head[2] if len(head) > 2 else b""
            frames.append(Frame(magic, OVERSIZED_JOB, (head[0], head[1], unique,
                                                       b"%d" % payload)))
            self._rest = payload - have  # skipped as it comes (_take_rest), never held
            return i + have
        if size <= LARGE_PACKET:
            return 0  # over a small max_job's share, yet small: the plain path does it
        if have == payload:  # all here already (a caller that feeds big chunks)
            with memoryview(buf) as view:
                frames.append(Frame(magic, ptype, (*head, bytes(view[i:i + payload]))))
            return i + payload
        # Receive the payload into a buffer of exactly its size. BytesIO's buffer is a bytes
        # object that getvalue() hands out without copying once nothing views it any more.
        sink = io.BytesIO()
        sink.seek(payload - 1)
        sink.write(b"\0")
        self._sink, self._view = sink, sink.getbuffer()
        with memoryview(buf) as view:
            self._view[:have] = view[i:end]
        self._filled = have
        self._rest = payload - have
        self._head = (magic, ptype, tuple(head))
        return end

    def _take_rest(self, data: memoryview, frames: list[Frame]) -> memoryview:
        """Take the next bytes of a big (or skipped) payload from `data`; return the bytes
        after it, which the plain path decodes."""
        n = min(len(data), self._rest)
        view = self._view
        if view is not None:
            view[self._filled:self._filled + n] = data[:n]
            self._filled += n
        self._rest -= n
        if not self._rest and view is not None:
            view.release()
            assert self._sink is not None
            payload = self._sink.getvalue()  # the buffer itself: no copy
            self._sink = self._view = None
            self._filled = 0
            magic, ptype, head = self._head
            frames.append(Frame(magic, ptype, (*head, payload)))
        return data[n:]

    @property
    def pending(self) -> int:
        """Bytes held that do not yet make a whole packet."""
        return len(self._buf) + self._filled
