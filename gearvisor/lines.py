"""Cutting a byte stream into lines without holding more than one line's worth of it.

The helpers read lines from the master on a pipe (notifications, journal records). A line
longer than the reader's limit is dropped whole, even when it spans many reads: the reader
keeps at most `limit` bytes of it, then skips the rest up to its newline, and says so once
per line. So a writer that never sends a newline costs the reader `limit` bytes, not all of
what it sends.
"""

from __future__ import annotations

from collections.abc import Callable

MAX_EVENT_LINE = 1024 * 1024  # an event line longer than this is dropped, not buffered


class LineSplitter:
    """feed() takes what a read returned and gives back the complete lines it ended (without
    their newline; blank lines left out). A line over `limit` bytes is not given: too_long
    is called once for it with the bytes seen of it so far."""

    __slots__ = ("limit", "too_long", "buf", "skipping", "dropped")

    def __init__(self, limit: int, too_long: Callable[[int], None] = lambda _size: None
                 ) -> None:
        self.limit = limit
        self.too_long = too_long
        self.buf = bytearray()
        self.skipping = False  # inside a line that was too long: drop up to its newline
        self.dropped = 0  # lines too long, so far

    def feed(self, chunk: bytes) -> list[bytes]:
        buf = self.buf
        buf += chunk
        lines = []
        while (end := buf.find(b"\n")) >= 0:
            if self.skipping:
                self.skipping = False
            elif end > self.limit:  # it came whole, in the same read as its newline
                self.dropped += 1
                self.too_long(end)
            elif end and buf[:end].strip():
                lines.append(bytes(buf[:end]))
            del buf[:end + 1]
        if len(buf) > self.limit:
            if not self.skipping:
                self.dropped += 1
                self.too_long(len(buf))
            self.skipping = True
            buf.clear()
        return lines


def event_lines() -> LineSplitter:
    """The reader of one event pipe (a child's, a helper's; master/pipes.read_lines)."""
    return LineSplitter(MAX_EVENT_LINE)
