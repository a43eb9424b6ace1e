"""A fake OS and a fake clock for component tests of the whole master, with no processes.

`FakeSystem` replaces master/system.py's `System`: fork() never forks. It records the call
and hands the arbiter a made-up pid and the read end of a REAL pipe; the test keeps the
write end and plays the child through it (`child.say(Ready())`), and makes it die
(`child.exit(code)`, or a SIGKILL from the master), which queues its status for waitpid().
kill() and killpg() record what was sent to whom, in order. A graceful signal does nothing
by itself: the test decides when (or whether) the child finishes, so escalation can be
tested with a child that ignores it. `fail_forks` makes the next forks fail with EAGAIN.

`FakeMaster` builds a real Arbiter on a FakeSystem and a `FakeClock` and drives its loop
the way Arbiter.run() would, without real signal handlers, proctitle or subreaper, and
without ever waiting real seconds: it runs the loop's real select only while some fd is
ready (so it returns at once), simulates SIGCHLD by calling `arbiter.reap()` when an exit
is queued, and runs what the fake clock made due with `loop.run_due()`.
"""

from __future__ import annotations

import dataclasses
import errno
import itertools
import os
import signal
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from gearvisor import messages
from gearvisor.config import load
from gearvisor.master import bus as ev
from gearvisor.master.arbiter import Arbiter
from gearvisor.master.component import Component
from gearvisor.master.loop import Loop
from gearvisor.master.system import System

MAX_PASSES = 200  # one step() runs the loop at most this often: a spinning master fails fast


def exit_status(code: int) -> int:
    """The waitpid status of a child that exited with `code`."""
    return (code & 0xFF) << 8


def signal_status(sig: int) -> int:
    """The waitpid status of a child killed by `sig`."""
    return int(sig) & 0x7F


class FakeClock:
    """A monotonic clock that moves only when the test says."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        """Move on by `seconds` (never back: the clock is monotonic)."""
        assert seconds >= 0, "a monotonic clock never goes back"
        self.now += seconds


class FakeChild:
    """One made-up child. The test writes its messages into the pipe and decides when it
    exits; `received` lists the signals that reached it while it lived."""

    def __init__(self, system: FakeSystem, pid: int, write_fd: int,
                 blocked: tuple[int, ...]) -> None:
        self.system = system
        self.pid = pid
        self.write_fd: int | None = write_fd
        self.blocked = blocked  # the signals the arbiter asked to keep blocked in the child
        self.received: list[int] = []
        # A helper's input: the read end of the pipe the master made for it (pipe()), as
        # the forked helper would hold it; closed when it dies.
        self.input_fd: int | None = None
        self.alive = True
        self.reaped = False
        self.status: int | None = None

    def say(self, message: messages.Message) -> None:
        """Write one message to the master, as the real child does."""
        assert self.alive and self.write_fd is not None, f"child {self.pid} is dead"
        os.write(self.write_fd, messages.encode(message))

    def read_input(self) -> bytes:
        """What the master wrote to this helper's input and it has not read yet (b"" at end
        of input, or when nothing is there)."""
        assert self.input_fd is not None, f"child {self.pid} has no input pipe"
        chunks = []
        while True:
            try:
                data = os.read(self.input_fd, 65536)
            except BlockingIOError:
                break
            if not data:
                break
            chunks.append(data)
        return b"".join(chunks)

    def exit(self, code: int = 0) -> None:
        """The child exits with `code` (its pipe closes with it)."""
        self.die(exit_status(code))

    def die(self, status: int) -> None:
        """The child is gone with waitpid status `status`; waitpid() returns it next."""
        assert self.alive, f"child {self.pid} died twice"
        self.alive = False
        self.status = status
        self.close_pipe()
        self.system.exits.append((self.pid, status))

    def close_pipe(self) -> None:
        """Close its ends (the child died, or the test is over)."""
        if self.write_fd is not None:
            os.close(self.write_fd)
            self.write_fd = None
        if self.input_fd is not None:
            os.close(self.input_fd)
            self.input_fd = None


class FakeSystem(System):
    """The OS facade for tests: forks nothing, records every request."""

    def __init__(self, first_pid: int = 40_000) -> None:
        self._pids = itertools.count(first_pid)
        self.forked: list[FakeChild] = []  # in fork order
        self.children: dict[int, FakeChild] = {}
        # Every signal sent, in order: ("kill" | "killpg", pid, signal). killpg(pgid, 0),
        # which only asks whether a group exists, is not a signal and is not listed.
        self.sent: list[tuple[str, int, int]] = []
        self.exits: deque[tuple[int, int]] = deque()  # (pid, status) for waitpid()
        self.fail_forks = 0  # the next this many fork() calls fail with EAGAIN
        self.fork_attempts = 0  # every fork() call, failed or not
        self._inputs: list[int] = []  # read ends of pipe()s for the next fork to take
        # Held lanes shut down (master/lanes.py): (pid, fd, port); with `refuse_shutdown`
        # set, shutdown_socket raises it instead (a seccomp profile, another user).
        self.shutdowns: list[tuple[int, int, int]] = []
        self.refuse_shutdown: OSError | None = None

    def fork(self, body: Callable[..., Any], blocked: Iterable[int]) -> tuple[int, int]:
        """Record the fork (`body`, the child's code, never runs) and return a made-up pid
        with the non-blocking read end of a real pipe whose write end the test holds."""
        self.fork_attempts += 1
        if self.fail_forks > 0:
            self.fail_forks -= 1
            raise BlockingIOError(errno.EAGAIN, "Resource temporarily unavailable")
        r, w = os.pipe()
        os.set_blocking(r, False)
        pid = next(self._pids)
        child = FakeChild(self, pid, w, tuple(blocked))
        if self._inputs:
            child.input_fd = self._inputs.pop()
        self.forked.append(child)
        self.children[pid] = child
        return pid, r

    def pipe(self) -> tuple[int, int]:
        """A real pipe; a non-blocking duplicate of its read end goes to the next forked
        child (`input_fd`), which holds it as a forked helper would after the master
        closed its own copy."""
        r, w = os.pipe()
        kept = os.dup(r)
        os.set_blocking(kept, False)
        for fd in self._inputs:
            os.close(fd)  # made for a fork that failed
        self._inputs = [kept]
        return r, w

    def _signal(self, how: str, pid: int, sig: int) -> bool:
        child = self.children.get(pid)
        if sig:
            self.sent.append((how, pid, int(sig)))
        if child is None or child.reaped:
            return False  # no such process (group): what ProcessLookupError means
        if sig and child.alive:
            child.received.append(int(sig))
            if sig == signal.SIGKILL:
                child.die(signal_status(signal.SIGKILL))
        return True  # alive, or a zombie not reaped yet: it still exists

    def shutdown_socket(self, pid: int, fd: int, port: int) -> None:
        if self.refuse_shutdown is not None:
            raise self.refuse_shutdown
        self.shutdowns.append((pid, fd, port))

    def kill(self, pid: int, sig: int) -> bool:
        """Record the signal; SIGKILL kills the fake child, any other signal only reaches
        it (the test decides what the child makes of it)."""
        return self._signal("kill", pid, sig)

    def killpg(self, pgid: int, sig: int) -> bool:
        """As kill(): a fake child's process group has no member but the child."""
        return self._signal("killpg", pgid, sig)

    def group_members(self, pgid: int) -> list[str]:
        return []

    def waitpid(self) -> tuple[int, int] | None:
        """The next queued exit, or None."""
        if not self.exits:
            return None
        pid, status = self.exits.popleft()
        if pid in self.children:
            self.children[pid].reaped = True
        return pid, status

    def become_subreaper(self) -> None:
        pass

    def getpid(self) -> int:
        return 1  # a made-up master pid: nothing signals it

    def signals(self, sig: int | None = None) -> list[tuple[str, int, int]]:
        """What was sent, in order (only `sig` if given)."""
        return [s for s in self.sent if sig is None or s[2] == sig]

    def close_pipes(self) -> None:
        """The test is over: close the write ends the fake children still hold."""
        for child in self.forked:
            child.close_pipe()
        for fd in self._inputs:
            os.close(fd)
        self._inputs = []


def event_types() -> list[type]:
    """Every event class the bus module defines."""
    return [v for v in vars(ev).values() if isinstance(v, type) and dataclasses.is_dataclass(v)
            and v.__module__ == ev.__name__]


class FakeMaster:
    """A real Arbiter on a FakeSystem and a FakeClock, with `components` attached, driven
    step by step. `events` records everything published on the bus, in order."""

    def __init__(self, config_path: str, components: Sequence[Component] = (),
                 clock: FakeClock | None = None) -> None:
        self.clock = clock or FakeClock()
        self.system = FakeSystem()
        self.arbiter = Arbiter(load(config_path), components, clock=self.clock,
                               system=self.system)
        self.events: list[object] = []
        # What Arbiter.run() does before its loop, minus signal handlers, proctitle and
        # the subreaper (the test process must not change): attach, then manage per pass.
        self.arbiter.attach_components()
        for kind in event_types():
            self.arbiter.bus.subscribe(kind, self.events.append)
        self.arbiter.loop.every_pass(self.arbiter.manage)

    @property
    def loop(self) -> Loop:
        return self.arbiter.loop

    def step(self) -> None:
        """Run everything that is ready now: readable pipes, a SIGCHLD for queued exits,
        timers the fake clock made due, and the arbiter's pass. Never waits: the loop's
        real select runs only while some fd is ready, so it returns at once."""
        loop = self.loop
        for _ in range(MAX_PASSES):
            if self.system.exits:
                self.arbiter.reap()  # what the SIGCHLD handler runs
            if loop.sel.select(0):
                loop.run_once()  # fds first, then run_due(), as the real loop does
                continue
            loop.run_due()
            if not self.system.exits and not loop.sel.select(0):
                return  # (a timer or the pass may have killed a child, or written)
        raise AssertionError(f"the master was still busy after {MAX_PASSES} passes")

    def start_ready(self) -> list[FakeChild]:
        """The first pass forks the pools; every child is ready (a Python child says so, a
        command child lives past its pool's startsecs); a pass."""
        self.step()
        children = list(self.system.forked)
        commands = [self.arbiter.children[c.pid][1] for c in children
                    if self.arbiter.children[c.pid][0].scoreboard is None]
        for child in children:
            if self.arbiter.children[child.pid][0].scoreboard is not None:
                child.say(messages.Ready())
        if commands:
            self.advance(max(pool.config.startsecs for pool in commands))
        self.step()
        return children

    def advance(self, seconds: float) -> None:
        """Move the fake clock on by `seconds`, then step."""
        self.clock.advance(seconds)
        self.step()

    def advance_to(self, when: float) -> None:
        """Move the fake clock to `when` (monotonic seconds; never back), then step."""
        self.clock.advance(max(0.0, when - self.clock.now))
        self.step()

    def of(self, kind: type) -> list[Any]:
        """The recorded events of type `kind`, in order."""
        return [e for e in self.events if isinstance(e, kind)]

    def close(self) -> None:
        """Release every fd and mapping the test made: the arbiter's ends of live children's
        pipes, their scoreboards, the fake children's write ends, the loop."""
        for child, _ in list(self.arbiter.children.values()):
            if child.event_fd >= 0:
                self.loop.remove_reader(child.event_fd)
                self.system.close(child.event_fd)
                child.event_fd = -1
            if child.scoreboard is not None:
                child.scoreboard.close()
        self.system.close_pipes()
        self.arbiter.close()
