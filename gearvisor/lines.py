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


class ReadMeter:
    """What reading a child's event pipe costs the master this second, against a budget:
    past it the reader stops reading until the second is over (spend returns when), so a
    writer that floods the pipe (a blocking one) blocks on its own writes instead of
    holding the master. Not for command workers' stdout and stderr: their end is
    non-blocking, and output they wrote meanwhile would be lost uncounted."""

    __slots__ = ("budget", "window_end", "spent", "throttled")

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.window_end = 0.0
        self.spent = 0
        self.throttled = 0  # seconds it was over budget

    def spend(self, now: float, cost: int) -> float | None:
        """Count `cost`; None while within the budget, else when to read again."""
        if now >= self.window_end:
            self.window_end, self.spent = now + 1.0, 0
        self.spent += cost
        if self.spent <= self.budget:
            return None
        self.throttled += 1
        return self.window_end


def read_cost(lines: list[bytes], dropped: int = 0) -> int:
    """A ReadMeter's cost of a read: a line each, and one per KiB."""
    return len(lines) + dropped + sum(map(len, lines)) // 1024
