"""The pool's bell: one idle child of a pool asleep on the job servers, the others waiting
for it to hand over (the pool setting `wake_one`; docs/prefetch.md, One sleeper per pool).

gearmand wakes every sleeping worker of a function for each job (unless it runs with
`--worker-wakeup`): with N idle children, a job costs N wake-ups, N GRABs and N-1 NO_JOBs.
The bell makes it one:

- The bell is an eventfd per pool generation (its children serve the same functions), made
  by the master before the first fork with a count of 1. A count above 0 is the token, and
  the child that holds it is the pool's sleeper: only it sends PRE_SLEEP.
- A child whose servers all said NO_JOB takes the token (a non-blocking read, which takes
  the whole count: a second token, from a ring that crossed a take, is folded into one) and
  sleeps on the servers. If it is gone, the child follows: it waits on the bell, which its
  epoll watches with EPOLLEXCLUSIVE, so that a ring wakes one follower, and it sends no
  PRE_SLEEP, so gearmand does not wake it.
- The sleeper rings (writes 1) when a job comes to it, before it runs the job: one follower
  wakes, takes the token and sends PRE_SLEEP, which gearmand answers with a NOOP at once if
  a job waits. A job never waits behind the sleeper's.
- A child that stops, pauses or loses a server with the token rings on its way; one that
  stops while following passes on a ring it may have been woken for. The master rings when
  it reaps a child that held the token or followed while no live child of its generation
  holds it (the child's bell byte, shm/lanes.py), so a crash never leaves the pool deaf.
"""

from __future__ import annotations

import os


class Bell:
    """One pool generation's eventfd (see the module docstring). The master makes it; the
    children inherit it across fork."""

    def __init__(self) -> None:
        self.fd = os.eventfd(1, os.EFD_NONBLOCK | os.EFD_CLOEXEC)

    def take(self) -> bool:
        """The token, if it is there (non-blocking)."""
        try:
            os.eventfd_read(self.fd)
            return True
        except BlockingIOError:
            return False

    def ring(self) -> None:
        """Give the token back: one follower wakes."""
        try:
            os.eventfd_write(self.fd, 1)
        except BlockingIOError:  # (the count at its maximum: a token is there anyway)
            pass

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
