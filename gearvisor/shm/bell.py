"""The pool's bell: one idle child of a pool asleep on the job servers, the others waiting
for it to hand over (the pool setting `wake_one`; docs/prefetch.md, One sleeper per pool).

gearmand wakes every sleeping worker of a function for each job (unless it runs with
`--worker-wakeup`): with N idle children, a job costs N wake-ups, N GRABs and N-1 NO_JOBs.
The bell makes it one:

- The bell is an eventfd per pool generation (its children serve the same functions) and a
  timer (below), made by the master before the first fork, the eventfd with a count of 1.
  A count above 0 is the token, and the child that holds it is the pool's sleeper: only it
  sends PRE_SLEEP. (A pool of one child gets no bell: nobody to hand over to.)
- A child whose servers all said NO_JOB takes the token (a non-blocking read, which takes
  the whole count: a second token, from a ring that crossed a take, is folded into one) and
  sleeps on the servers. If it is gone, the child follows: it waits on the bell, which its
  epoll watches with EPOLLEXCLUSIVE, so that a ring wakes one follower, and it sends no
  PRE_SLEEP, so gearmand does not wake it.
- The sleeper rings (writes 1) when a job comes to it, before it runs the job, and a
  follower that wakes takes the token and sends PRE_SLEEP, which gearmand answers with a
  NOOP at once if a job waits. A job never waits behind the sleeper's for more than
  RING_LATER.
- Followers wait on a timer (a timerfd), not on the count: a ring writes the token, then
  arms the timer. The sleeper's ring before its job arms it RING_LATER ahead: a short job
  ends first, its sleeper takes its token back and answers alone, and no follower woke for
  it (re-armed by the next job, the timer does not fire while jobs come faster than that).
  Every other ring (a hand-over, a pass-on, the master's) arms it to fire at once. Nobody
  disarms it: a follower woken for a token that is gone reads the timer (so it is not
  readable any more) before it tries the count, and waits again. Without a timerfd the
  followers wait on the count itself and every ring wakes one at once.
- A child that stops, pauses or loses a server with the token rings on its way; one that
  stops while following passes on a ring it may have been woken for. The master rings when
  it reaps a child that held the token or followed while no live child of its generation
  holds it (the child's bell byte, shm/lanes.py), so a crash never leaves the pool deaf.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Callable

RING_LATER = 0.001  # seconds: how long a sleeper's job may run before a follower wakes
_RING_NOW = 1e-6  # (a timerfd's 0 disarms it: "at once" is a microsecond)
_CLOCK_MONOTONIC = 1
_TFD_FLAGS = 0o4000 | 0o2000000  # TFD_NONBLOCK | TFD_CLOEXEC


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class _Itimerspec(ctypes.Structure):
    _fields_ = [("it_interval", _Timespec), ("it_value", _Timespec)]


def _timer() -> tuple[int, Callable[[float], None]] | None:
    """A non-blocking one-shot timerfd and a function that arms it `seconds` ahead, or None
    where there is none (os has them from Python 3.13; before, libc's through ctypes)."""
    if hasattr(os, "timerfd_create"):  # pragma: no cover - Python 3.13+
        try:
            fd = os.timerfd_create(_CLOCK_MONOTONIC, flags=os.TFD_NONBLOCK | os.TFD_CLOEXEC)
        except OSError:
            return None  # (as below: followers wait on the count)
        return fd, lambda seconds: os.timerfd_settime(fd, initial=seconds)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        create, settime = libc.timerfd_create, libc.timerfd_settime
    except (OSError, AttributeError):
        return None
    fd = create(_CLOCK_MONOTONIC, _TFD_FLAGS)
    if fd < 0:
        return None
    specs: dict[float, _Itimerspec] = {}  # one prepared struct per delay (two are used)

    def arm(seconds: float) -> None:
        spec = specs.get(seconds)
        if spec is None:
            spec = specs[seconds] = _Itimerspec()
            whole = int(seconds)
            spec.it_value.tv_sec, spec.it_value.tv_nsec = whole, int((seconds - whole) * 1e9)
        settime(fd, 0, ctypes.byref(spec), None)

    return fd, arm


class Bell:
    """One pool generation's token (an eventfd) and its followers' timer (a timerfd), as the
    module docstring says. The master makes them; the children inherit them across fork.
    `fd` is what followers wait on: the timer, or the count where there is no timer."""

    def __init__(self) -> None:
        self.token = os.eventfd(1, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        timer = _timer()
        if timer is None:
            self.fd, self._arm = self.token, None
        else:
            self.fd, self._arm = timer

    @property
    def fds(self) -> set[int]:
        """The bell's file descriptors (a child keeps them open)."""
        return {self.token, self.fd}

    def take(self) -> bool:
        """The token, if it is there (non-blocking)."""
        try:
            os.eventfd_read(self.token)
            return True
        except BlockingIOError:
            return False

    def ring(self, later: bool = False) -> None:
        """Give the token back: a follower wakes and takes it, at once, or (`later`: the
        sleeper, before its job) RING_LATER from now unless it was taken back by then."""
        try:
            os.eventfd_write(self.token, 1)
        except BlockingIOError:  # (the count at its maximum: a token is there anyway)
            pass
        if self._arm is not None:
            self._arm(RING_LATER if later else _RING_NOW)

    def heard(self) -> None:
        """A follower woke: read the timer, so it is not readable any more, before trying
        the token (a ring after this read arms it again). No-op without a timer."""
        if self.fd != self.token:
            try:
                os.read(self.fd, 8)
            except BlockingIOError:
                pass

    def close(self) -> None:
        for fd in self.fds:
            if fd >= 0:
                os.close(fd)
        self.token = self.fd = -1
