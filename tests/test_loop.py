"""master.loop.Loop: readers and writers with callbacks, one timer heap, signals through the
wakeup fd, and a broken callback that does not stop the loop. Timers run on an injected
clock; fds are real socketpairs; signals are real (sent to this process)."""

from __future__ import annotations

import os
import signal
import socket

import pytest

from gearvisor.master.loop import MAX_WAIT, Loop


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def loop():
    clock = Clock()
    lp = Loop(clock=clock)
    lp.test_clock = clock
    yield lp
    lp.close()


def test_timers_run_in_order_when_due_and_cancelled_ones_never(loop) -> None:
    ran: list[str] = []
    loop.call_at(103.0, lambda: ran.append("c"))
    loop.call_at(101.0, lambda: ran.append("a"))
    dropped = loop.call_at(102.0, lambda: ran.append("dropped"))
    loop.call_later(2.0, lambda: ran.append("b"))  # 102.0, after `dropped` in the heap
    dropped.cancel()
    assert loop.next_timeout(100.0) == 1.0
    loop.run_due()
    assert ran == []
    loop.test_clock.now = 102.5
    loop.run_due()
    assert ran == ["a", "b"]
    assert loop.next_timeout(102.5) == 0.5
    loop.test_clock.now = 200.0
    loop.run_due()
    assert ran == ["a", "b", "c"]
    assert loop.next_timeout(200.0) == MAX_WAIT  # nothing left: wake up now and then


def test_a_quiet_timer_runs_without_the_passes_unless_something_else_ran(loop) -> None:
    ran: list[str] = []
    loop.every_pass(lambda: ran.append("pass"))
    loop.call_at(101.0, lambda: ran.append("quiet"), quiet=True)
    loop.test_clock.now = 101.0
    loop.run_once()  # no fd ready: the timer is all that ran
    assert ran == ["quiet"]
    loop.call_at(102.0, lambda: ran.append("quiet"), quiet=True)
    loop.call_at(102.0, lambda: ran.append("loud"))
    loop.test_clock.now = 102.0
    loop.run_once()
    assert ran == ["quiet", "quiet", "loud", "pass"]
    loop.run_due(passes=False)  # a wake-up with nothing due (MAX_WAIT): the passes run
    assert ran == ["quiet", "quiet", "loud", "pass", "pass"]


def test_reader_and_writer_callbacks_on_one_fd(loop) -> None:
    a, b = socket.socketpair()
    try:
        a.setblocking(False)
        events: list[str] = []
        loop.test_clock.now = 0.0
        loop.add_reader(a, lambda: events.append(("read", a.recv(100))))
        loop.add_writer(a, lambda: (events.append("write"), loop.remove_writer(a)))
        loop.run_once()
        assert events == ["write"]  # writable at once; nothing to read yet
        b.sendall(b"hi")
        loop.run_once()
        assert events == ["write", ("read", b"hi")]  # the writer was removed
        loop.remove_reader(a)
        loop.remove_reader(a)  # twice is no error
        b.sendall(b"more")
        loop.call_at(0.0, lambda: events.append("timer"))
        loop.run_once()
        assert events[-1] == "timer" and ("read", b"more") not in events
    finally:
        a.close()
        b.close()


def test_a_signal_is_recorded_by_the_handler_and_dispatched_by_the_loop(loop) -> None:
    got: list[int] = []
    old = signal.getsignal(signal.SIGUSR2)
    try:
        loop.add_signal_handler(signal.SIGUSR2, got.append)
        os.kill(os.getpid(), signal.SIGUSR2)
        assert got == []  # the handler only queued it
        loop.test_clock.now = 0.0
        loop.run_once()  # the wakeup fd ends the wait at once
        assert got == [signal.SIGUSR2]
    finally:
        signal.signal(signal.SIGUSR2, old)


def test_a_callback_that_raises_is_logged_and_the_loop_goes_on(loop) -> None:
    logged: list[str] = []

    class Log:
        def exception(self, message: str, **fields) -> None:
            logged.append(message)

    loop.log = Log()
    ran: list[str] = []
    loop.call_at(0.0, lambda: 1 / 0)
    loop.call_at(0.0, lambda: ran.append("next timer"))
    loop.every_pass(lambda: ran.append("pass"))
    loop.run_due()
    assert ran == ["next timer", "pass"]
    assert logged == ["loop callback failed; the master carries on"]


def test_stop_ends_run(loop) -> None:
    loop.test_clock.now = 0.0
    count = []

    def each_pass() -> None:
        count.append(1)
        loop.call_at(0.0, lambda: None)  # due at once: the next wait is zero
        if len(count) == 3:
            loop.stop()

    loop.every_pass(each_pass)
    loop.run()
    assert len(count) == 3
