"""Lines the master owes a helper until the helper says they are safe: a bounded,
sequence-numbered buffer with acknowledgements.

The journal's lines go to the store helper through one. Each line gets the next sequence
number; the helper acks "everything up to N is committed". Until then the master keeps the
line, so a helper that dies (or a store that is down) loses nothing: the restarted helper
gets every unacked line again, in order, with the same numbers (it skips numbers it has
committed already). The buffer is bounded in bytes: past the bound the oldest lines are
dropped and counted, never buffered without end.
"""

from __future__ import annotations

import collections


class Outbox:
    """Sequence-numbered lines waiting for an ack; see the module docstring."""

    def __init__(self, max_bytes: int, first_seq: int = 1) -> None:
        self.max_bytes = max_bytes
        self.lines: collections.deque[tuple[int, bytes]] = collections.deque()
        self.bytes = 0
        self.next_seq = first_seq
        self.acked = first_seq - 1  # the highest seq the helper has committed
        self.dropped = 0  # lines dropped for the bound, ever

    def add(self, line: bytes) -> bytes:
        """Keep `line` (without its newline) and return its framing for the helper,
        b"<seq> <line>\n": the very bytes kept, so a sender that queues them holds no second
        copy. The oldest lines go when the bound is passed."""
        seq = self.next_seq
        self.next_seq += 1
        framed = b"%d %s\n" % (seq, line)
        self.lines.append((seq, framed))
        self.bytes += len(framed)
        while self.bytes > self.max_bytes and len(self.lines) > 1:
            _, old = self.lines.popleft()
            self.bytes -= len(old)
            self.dropped += 1
        return framed

    def ack(self, seq: int) -> int:
        """The helper committed every line up to `seq`: forget them. Returns how many."""
        if seq <= self.acked:
            return 0
        self.acked = min(seq, self.next_seq - 1)
        n = 0
        while self.lines and self.lines[0][0] <= self.acked:
            _, old = self.lines.popleft()
            self.bytes -= len(old)
            n += 1
        return n

    def pending(self) -> list[bytes]:
        """Every unacked line, framed, oldest first: what a new helper is given."""
        return [framed for _, framed in self.lines]

    def __len__(self) -> int:
        return len(self.lines)
