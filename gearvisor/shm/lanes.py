"""Who sleeps and who holds a job, fleet-wide: the hints that let lanes cost no polling.

One byte per child and kind, at the child's RunningJobs index (unique among live children):
the tag of the child's pool (1-255) while it is asleep waiting for work, and while it holds
a job on a second lane (0: neither). Only that child writes its bytes; the master clears
them when it reaps the child.

They are hints, not the truth (that is each child's scoreboard, under its lock):
- a child holds the next job only while no sibling is asleep (one would take it at once);
- a child that falls asleep while a sibling holds, or that starts holding while a sibling
  is asleep, tells the master (messages.Holding), which then looks at the scoreboards.
Each side writes its byte, then passes a full memory barrier (a lock's atomic operation),
then reads the other side's bytes, so of two that change at the same moment at least one
sees the other and the master hears of it. A tag shared by two pools (more than 255) costs
a look that finds nothing, never a wrong close.

A third byte per child says where it stands with its pool's bell (shm/bell.py): FOLLOWING
(waits on the bell), HOLDING_BELL (holds the token: the one child asleep on the servers),
LENT (held it, and runs a job with it rung for RING_LATER: it takes it back when the job
ends, unless a follower woke and took it), or 0. The master reads it when it reaps a
child, to ring for one that took the token with it.
"""

from __future__ import annotations

import functools
import mmap
from collections.abc import Callable

from gearvisor.shm.poison import CAPACITY

MAX_TAG = 255
FOLLOWING = 1  # bell byte: waits on the pool's bell
HOLDING_BELL = 2  # bell byte: holds the pool's token (sleeps on the servers)
LENT = 3  # bell byte: the sleeper runs a job, its token rung for later (shm/bell.py)


_NEEDLES = [bytes((tag,)) for tag in range(MAX_TAG + 1)]  # (made once, not per look)


def _nothing(value: int) -> None:
    """A setter's answer for an index out of range (LaneHints._setter)."""


class LaneHints:
    """The fleet's asleep and holding bytes (see the module docstring)."""

    def __init__(self, capacity: int = CAPACITY) -> None:
        self.capacity = capacity
        self._mm = mmap.mmap(-1, 3 * capacity)  # asleep, holding, then bell bytes

    def set_asleep(self, index: int, tag: int) -> None:
        """Child side: asleep for work (the pool's tag), or not (0)."""
        if 0 <= index < self.capacity:
            self._mm[index] = tag

    def set_holding(self, index: int, tag: int) -> None:
        """Child side: holding a job on a second lane (the pool's tag), or not (0)."""
        if 0 <= index < self.capacity:
            self._mm[self.capacity + index] = tag

    def holding_setter(self, index: int) -> Callable[[int], None]:
        """Child side: set_holding(index, tag) as one C call, for the per-job writes (a
        no-op for an index out of range)."""
        return self._setter(self.capacity, index)

    def asleep_setter(self, index: int) -> Callable[[int], None]:
        """Child side: set_asleep(index, tag) as one C call (per round trip)."""
        return self._setter(0, index)

    def bell_setter(self, index: int) -> Callable[[int], None]:
        """Child side: set_bell(index, state) as one C call (twice per round trip)."""
        return self._setter(2 * self.capacity, index)

    def _setter(self, base: int, index: int) -> Callable[[int], None]:
        if 0 <= index < self.capacity:
            return functools.partial(self._mm.__setitem__, base + index)
        return _nothing

    def set_bell(self, index: int, state: int) -> None:
        """Child side: FOLLOWING, HOLDING_BELL, LENT or 0 (shm/bell.py)."""
        if 0 <= index < self.capacity:
            self._mm[2 * self.capacity + index] = state

    def bell(self, index: int) -> int:
        return self._mm[2 * self.capacity + index] if 0 <= index < self.capacity else 0

    def asleep(self, index: int) -> bool:
        return 0 <= index < self.capacity and self._mm[index] != 0

    def others_asleep(self, tag: int, index: int) -> bool:
        """Is another child of the pool tagged `tag` asleep?"""
        return self._find(0, tag, index)

    def others_asleep_check(self, tag: int, index: int) -> Callable[[], bool]:
        """others_asleep(tag, index) bound once, for the per-job look (one call, not two)."""
        return functools.partial(self._find, 0, tag, index)

    def others_holding(self, tag: int, index: int) -> bool:
        """Does another child of the pool tagged `tag` hold a job?"""
        return self._find(self.capacity, tag, index)

    def others_holding_check(self, tag: int, index: int) -> Callable[[], bool]:
        """others_holding(tag, index) bound once (per round trip: one call, not two)."""
        return functools.partial(self._find, self.capacity, tag, index)

    def _find(self, base: int, tag: int, index: int) -> bool:
        if not tag:
            return False
        needle = _NEEDLES[tag]
        end = base + self.capacity
        at = self._mm.find(needle, base, end)
        while at != -1:
            if at - base != index:
                return True
            at = self._mm.find(needle, at + 1, end)
        return False

    def clear(self, index: int) -> None:
        """Master side: the child in `index` is gone."""
        self.set_asleep(index, 0)
        self.set_holding(index, 0)
        self.set_bell(index, 0)

    def close(self) -> None:
        self._mm.close()
