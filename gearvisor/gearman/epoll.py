"""The worker's epoll: what `selectors` does for it, with less per wake-up and with
EPOLLEXCLUSIVE.

A child wakes twice per round trip, and on a loaded host it wakes with cold caches: each
Python call then costs a fraction of a microsecond (README: Performance). `selectors` costs
a few of them per wake-up (a SelectorKey per event, a map lookup through a method), and it
cannot register EPOLLEXCLUSIVE, which the pool's bell needs (shm/bell.py). This keeps each
fd's (file object, data) in a dict and returns those pairs for the ready fds.
"""

from __future__ import annotations

import select
from typing import Any

READ = select.EPOLLIN
WRITE = select.EPOLLOUT
_MAX_EVENTS = 64  # per wake-up; more ready fds are returned by the next poll (level-triggered)


class Poller:
    """One epoll and each registered fd's (file object, data)."""

    __slots__ = ("_ep", "_map")

    def __init__(self) -> None:
        self._ep = select.epoll()
        self._map: dict[int, tuple[Any, Any]] = {}

    @staticmethod
    def _fd(obj: Any) -> int:
        return obj if isinstance(obj, int) else obj.fileno()

    def register(self, obj: Any, events: int, data: Any, exclusive: bool = False) -> None:
        """Watch `obj` (an fd or an object with fileno()). `exclusive`: EPOLLEXCLUSIVE, so
        that of the processes waiting on the same file one wakes, not all (Linux 4.5+;
        OSError where the kernel refuses it). Raises KeyError if it is watched already."""
        fd = self._fd(obj)
        if fd in self._map:
            raise KeyError(f"fd {fd} is registered already")
        self._ep.register(fd, events | (select.EPOLLEXCLUSIVE if exclusive else 0))
        self._map[fd] = (obj, data)

    def modify(self, obj: Any, events: int, data: Any) -> None:
        fd = self._fd(obj)
        self._ep.modify(fd, events)
        self._map[fd] = (obj, data)

    def unregister(self, obj: Any) -> None:
        """Stop watching `obj` (before it is closed). Raises KeyError if it is not watched."""
        fd = self._fd(obj)
        if fd < 0:  # closed already: find it by object (the kernel dropped it on close)
            fd = next((f for f, (o, _) in self._map.items() if o is obj), -1)
        del self._map[fd]
        try:
            self._ep.unregister(fd)
        except OSError:
            pass  # (closed, or never made it into the epoll)

    def data(self, obj: Any) -> Any:
        """The data `obj` was registered with (KeyError if it is not)."""
        return self._map[self._fd(obj)][1]

    def __contains__(self, obj: Any) -> bool:
        return self._fd(obj) in self._map

    def select(self, timeout: float | None) -> list[tuple[Any, Any]]:
        """Wait up to `timeout` seconds (None: no limit) for registered fds to be ready;
        return each ready one's (file object, data)."""
        ready = self._ep.poll(-1 if timeout is None else timeout, _MAX_EVENTS)
        m = self._map
        return [m[fd] for fd, _ in ready if fd in m]

    def close(self) -> None:
        self._ep.close()
        self._map.clear()
