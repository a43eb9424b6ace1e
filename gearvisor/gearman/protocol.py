"""Gearman binary protocol codec: pure bytes in, packets out.

Spec: http://gearman.org/protocol/. Every packet is a 12-byte header (magic, type, size, all
big-endian) followed by `size` bytes of arguments separated by NUL; the last argument of a
packet type may itself contain NULs (it is the job payload).

Nothing here does I/O, so the codec is unit-tested byte for byte and fuzzed without sockets.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum

REQ = b"\0REQ"
RES = b"\0RES"
HEADER = struct.Struct(">4sII")
HEADER_SIZE = HEADER.size

# gearmand refuses nothing smaller; a job payload past this is almost surely a corrupt stream
# (or a hostile peer). Configurable per parser so a fleet with huge payloads can raise it.
DEFAULT_MAX_PACKET = 64 * 1024 * 1024


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


class ProtocolError(Exception):
    """The peer sent bytes that are not a valid Gearman packet; the connection must be closed."""


@dataclass(frozen=True, slots=True)
class Frame:
    """One decoded packet: its magic (REQ or RES), type and arguments."""

    magic: bytes
    type: int
    args: tuple[bytes, ...]


def encode(ptype: int, *args: bytes | str, magic: bytes = REQ) -> bytes:
    """Encode one packet. str arguments are UTF-8 encoded; bytes go out as they are."""
    parts = [a.encode() if isinstance(a, str) else a for a in args]
    body = b"\0".join(parts)
    return HEADER.pack(magic, ptype, len(body)) + body


def split_args(ptype: int, body: bytes) -> tuple[bytes, ...]:
    """Split a packet body into its arguments; the last one keeps any NULs it holds."""
    n = ARG_COUNT[ptype]
    if n == 0:
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

    Raises ProtocolError on bad magic, an unknown packet type or a packet over `max_packet`
    bytes; the caller closes that one connection and nothing else.
    """

    __slots__ = ("_buf", "max_packet")

    def __init__(self, max_packet: int = DEFAULT_MAX_PACKET) -> None:
        self._buf = bytearray()
        self.max_packet = max_packet

    def feed(self, data: bytes | memoryview) -> list[Frame]:
        """Add bytes from the stream; return every packet they complete, in order."""
        buf = self._buf
        buf += data
        frames: list[Frame] = []
        pos = 0
        end = len(buf)
        while end - pos >= HEADER_SIZE:
            magic, ptype, size = HEADER.unpack_from(buf, pos)
            if magic != RES and magic != REQ:
                raise ProtocolError(f"bad magic {bytes(buf[pos:pos + 4])!r} (not a Gearman peer?)")
            if ptype not in ARG_COUNT:
                raise ProtocolError(f"unknown packet type {ptype}")
            if size > self.max_packet:
                raise ProtocolError(f"packet of {size} bytes is over the {self.max_packet} limit")
            if end - pos - HEADER_SIZE < size:
                break
            start = pos + HEADER_SIZE
            body = bytes(buf[start:start + size])
            frames.append(Frame(magic, ptype, split_args(ptype, body)))
            pos = start + size
        if pos:
            del buf[:pos]
        return frames

    @property
    def pending(self) -> int:
        """Bytes held that do not yet make a whole packet."""
        return len(self._buf)
