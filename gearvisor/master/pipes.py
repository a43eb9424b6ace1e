"""Reading the pipes of children and helpers without ever blocking or buffering without
bound: what the master's readers share."""

from __future__ import annotations

import os

MAX_EVENT_LINE = 1024 * 1024  # an event line longer than this is dropped, not buffered


def read_ready(fd: int, reads: int = 1) -> tuple[bytes, bool]:
    """Up to `reads` reads of what `fd` holds now, never blocking: (data, at end of file).
    A read error counts as end of file."""
    chunks = []
    for _ in range(reads):
        try:
            data = os.read(fd, 65536)
        except BlockingIOError:
            return b"".join(chunks), False
        except OSError:
            return b"".join(chunks), True
        if not data:
            return b"".join(chunks), True
        chunks.append(data)
    return b"".join(chunks), False


def read_lines(fd: int, buf: bytearray, reads: int = 1) -> tuple[list[bytes], bool, int]:
    """Read what an event pipe holds into `buf` and take out the complete lines: (lines,
    at end of file, bytes dropped). A line longer than MAX_EVENT_LINE is dropped, whole or
    in part, so a child cannot make the master buffer without bound."""
    data, eof = read_ready(fd, reads)
    buf += data
    lines = []
    dropped = 0
    while (end := buf.find(b"\n")) >= 0:
        if end <= MAX_EVENT_LINE:
            lines.append(bytes(buf[:end]))
        else:
            dropped += end
        del buf[:end + 1]
    if len(buf) > MAX_EVENT_LINE:
        dropped += len(buf)
        del buf[:]
    return lines, eof, dropped
