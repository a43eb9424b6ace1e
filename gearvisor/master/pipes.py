"""Reading the pipes of children and helpers without ever blocking or buffering without
bound: what the master's readers share."""

from __future__ import annotations

import os

from gearvisor.lines import LineSplitter


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


def take_lines(buf: bytearray, limit: int, final: bool = False) -> list[tuple[bytes, bool]]:
    """Take the complete lines out of `buf`, without their newline, each as (bytes, cut).

    A line longer than `limit` keeps only its first `limit` bytes and says cut; so does a
    partial line that has grown past `limit` (the rest of `buf` is dropped), so `buf` never
    holds more than `limit` bytes after a call. With `final` (the writer is gone), a last
    line without a newline is taken too."""
    lines = []
    while (end := buf.find(b"\n")) >= 0:
        lines.append((bytes(buf[:min(end, limit)]), end > limit))
        del buf[:end + 1]
    if len(buf) > limit or (final and buf):
        lines.append((bytes(buf[:limit]), len(buf) > limit))
        del buf[:]
    return lines


def read_lines(fd: int, lines: LineSplitter, reads: int = 1) -> tuple[list[bytes], bool, int]:
    """Read what an event pipe holds and take out the complete lines: (lines, at end of
    file, lines dropped). A line longer than its LineSplitter's limit (lines.event_lines:
    MAX_EVENT_LINE) is dropped whole, its rest up to its newline included, so a child
    can neither make the master buffer without bound nor have the tail of a dropped line
    read as a message."""
    data, eof = read_ready(fd, reads)
    before = lines.dropped
    return lines.feed(data), eof, lines.dropped - before
