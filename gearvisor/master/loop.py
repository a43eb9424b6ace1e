"""The master's event loop: a selector, one timer heap and the signal wakeup fd.

It knows no feature. Components register readers and writers with a callback, set timers
with `call_at` (and cancel them), and subscribe to signals; the loop waits until the first
of those is due and runs the callbacks. Signal handlers only record the signal number (no
logging, no I/O: gunicorn #3198); the loop runs the subscribers afterwards. Callbacks added
with `every_pass` run once after each batch of events, before the loop waits again: that is
where the arbiter carries out its pools' plans. A `quiet` timer (a look every few ms that
changes nothing the plans read) runs without them, unless something else ran in its batch.

A callback that raises is logged and the loop carries on: one broken component must not
stop the master (and with it every child).
"""

from __future__ import annotations

import collections
import heapq
import itertools
import os
import selectors
import signal
import time
from collections.abc import Callable
from typing import Any

Callback = Callable[[], Any]
MAX_WAIT = 5.0  # the loop wakes at least this often, even with nothing due


class Timer:
    """A pending `call_at`; `cancel()` it to drop it (cheaply: it stays in the heap until due)."""

    __slots__ = ("when", "callback", "cancelled", "quiet")

    def __init__(self, when: float, callback: Callback, quiet: bool = False) -> None:
        self.when = when
        self.callback = callback
        self.cancelled = False
        self.quiet = quiet  # needs no pass after it

    def cancel(self) -> None:
        self.cancelled = True


class Loop:
    """One thread, one selector, one timer heap. `clock` is injected for tests."""

    def __init__(self, clock: Callable[[], float] = time.monotonic,
                 log: Any = None) -> None:
        self.clock = clock
        self.log = log
        self.sel = selectors.DefaultSelector()
        self._timers: list[tuple[float, int, Timer]] = []
        self._seq = itertools.count()
        self._passes: list[Callback] = []
        self._signal_handlers: dict[int, list[Callable[[int], Any]]] = {}
        self._signals: collections.deque[int] = collections.deque()
        self._wake_r = self._wake_w = -1
        self.stopped = False

    # -- fds ------------------------------------------------------------------------------------

    def _set(self, fd: Any, events: int, slot: int, callback: Callback | None) -> None:
        try:
            key = self.sel.get_key(fd)
        except KeyError:
            key = None
        callbacks = list(key.data) if key else [None, None]
        callbacks[slot] = callback
        mask = (selectors.EVENT_READ if callbacks[0] else 0) | (
            selectors.EVENT_WRITE if callbacks[1] else 0)
        if key is None:
            if mask:
                self.sel.register(fd, mask, tuple(callbacks))
        elif mask:
            self.sel.modify(fd, mask, tuple(callbacks))
        else:
            self.sel.unregister(fd)

    def add_reader(self, fd: Any, callback: Callback) -> None:
        """Call `callback()` whenever `fd` (an int or an object with fileno()) is readable."""
        self._set(fd, selectors.EVENT_READ, 0, callback)

    def remove_reader(self, fd: Any) -> None:
        """Stop watching `fd` for reading; no error if it was not watched."""
        self._forget(fd, 0)

    def add_writer(self, fd: Any, callback: Callback) -> None:
        """Call `callback()` whenever `fd` is writable (remove it once the buffer is out)."""
        self._set(fd, selectors.EVENT_WRITE, 1, callback)

    def remove_writer(self, fd: Any) -> None:
        self._forget(fd, 1)

    def _forget(self, fd: Any, slot: int) -> None:
        try:
            self.sel.get_key(fd)
        except (KeyError, ValueError):
            return  # not registered, or already closed
        self._set(fd, 0, slot, None)

    # -- timers ---------------------------------------------------------------------------------

    def call_at(self, when: float, callback: Callback, quiet: bool = False) -> Timer:
        """Run `callback()` once the clock reaches `when` (monotonic seconds). `quiet`: the
        callback changes nothing the every_pass callbacks look at, so they need not run."""
        timer = Timer(when, callback, quiet)
        heapq.heappush(self._timers, (when, next(self._seq), timer))
        return timer

    def call_later(self, delay: float, callback: Callback, quiet: bool = False) -> Timer:
        return self.call_at(self.clock() + delay, callback, quiet)

    def every_pass(self, callback: Callback) -> None:
        """Run `callback()` after each batch of events and timers, before waiting again."""
        self._passes.append(callback)

    # -- signals --------------------------------------------------------------------------------

    def add_signal_handler(self, sig: int, callback: Callable[[int], Any]) -> None:
        """Run `callback(sig)` from the loop (never from the handler) when `sig` arrives."""
        if self._wake_r < 0:
            self._wake_r, self._wake_w = os.pipe()
            for fd in (self._wake_r, self._wake_w):
                os.set_blocking(fd, False)
                os.set_inheritable(fd, False)
            signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)
            self.add_reader(self._wake_r, self._drain_wakeups)
        if sig not in self._signal_handlers:
            signal.signal(sig, self._record_signal)
        self._signal_handlers.setdefault(sig, []).append(callback)

    def _record_signal(self, signum: int, _frame: Any) -> None:
        """Signal handler - NO LOGGING, just queue the signal (gunicorn #3198)."""
        self._signals.append(signum)

    def _drain_wakeups(self) -> None:
        try:
            while os.read(self._wake_r, 4096):
                pass
        except BlockingIOError:
            pass

    # -- running --------------------------------------------------------------------------------

    def _run(self, callback: Callable[..., Any], *args: Any) -> None:
        try:
            callback(*args)
        except Exception:  # one broken callback must not stop the master
            if self.log is not None:
                self.log.exception("loop callback failed; the master carries on",
                                   callback=getattr(callback, "__qualname__", repr(callback)))

    def next_timeout(self, now: float) -> float:
        """Seconds until the first timer is due (0 with a signal queued), at most MAX_WAIT."""
        if self._signals:
            return 0.0
        while self._timers and self._timers[0][2].cancelled:
            heapq.heappop(self._timers)
        if not self._timers:
            return MAX_WAIT
        return min(MAX_WAIT, max(0.0, self._timers[0][0] - now))

    def run_once(self) -> None:
        """Wait for the first fd or timer, then run what is ready, signals and passes."""
        ready = self.sel.select(self.next_timeout(self.clock()))
        for key, events in ready:
            read_cb, write_cb = key.data
            if events & selectors.EVENT_READ and read_cb is not None:
                self._run(read_cb)
            if events & selectors.EVENT_WRITE and write_cb is not None:
                # The read callback may have removed the writer (or closed the fd).
                try:
                    current = self.sel.get_key(key.fileobj).data[1]
                except (KeyError, ValueError):
                    current = None
                if current is not None:
                    self._run(current)
        self.run_due(passes=bool(ready))

    def run_due(self, passes: bool = True) -> None:
        """Run queued signals' subscribers, timers that are due, then the passes (unless
        `passes` is false and the timers that ran were all quiet: a wake-up with nothing
        due, at MAX_WAIT, still runs them)."""
        passes = passes or bool(self._signals)
        quiet = False  # a quiet timer ran
        while self._signals:
            sig = self._signals.popleft()
            for callback in list(self._signal_handlers.get(sig, ())):
                self._run(callback, sig)
        now = self.clock()
        while self._timers and self._timers[0][0] <= now:
            _, _, timer = heapq.heappop(self._timers)
            if not timer.cancelled:
                timer.cancelled = True  # ran: a later cancel() is a no-op
                passes = passes or not timer.quiet
                quiet = quiet or timer.quiet
                self._run(timer.callback)
        if not passes and quiet:
            return
        for callback in list(self._passes):
            self._run(callback)

    def run(self) -> None:
        """Run until stop()."""
        self.stopped = False
        self.run_due()
        while not self.stopped:
            self.run_once()

    def stop(self) -> None:
        self.stopped = True

    def close(self) -> None:
        if self._wake_r >= 0:
            signal.set_wakeup_fd(-1)
            os.close(self._wake_r)
            os.close(self._wake_w)
            self._wake_r = self._wake_w = -1
        self.sel.close()
