"""The master's record of one child: the single source of truth about it.

States and the transitions the master may make (supervisor's process.py guards each one):

    STARTING -> READY      the child reported it is registered on every reachable server
    STARTING -> DRAINING   told to stop before it became ready
    READY    -> DRAINING   told to finish its current job and exit (stop, roll, restart)
    any      -> EXITED     reaped

Backoff is a property of a slot, not of a child (there is no process while a slot backs off):
see pool.Slot.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
import signal
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING

from gearvisor.lines import LineSplitter, ReadMeter, event_lines

EVENT_BUDGET = 100_000  # what a child's event pipe may cost the master a second (ReadMeter)

if TYPE_CHECKING:
    from gearvisor import messages as msg
    from gearvisor.shm.scoreboard import Scoreboard

# Exit codes a child uses to tell the master why it ended.
EXIT_OK = 0
EXIT_CRASH = 1  # an unexpected error in the runtime itself
EXIT_BOOT_ERROR = 3  # cannot import or validate the pool's functions: do not retry blindly
EXIT_ORPHANED = 4  # the master went away


class ChildState(Enum):
    STARTING = "starting"
    READY = "ready"
    DRAINING = "draining"
    EXITED = "exited"


_ALLOWED = {
    ChildState.STARTING: {ChildState.READY, ChildState.DRAINING, ChildState.EXITED},
    ChildState.READY: {ChildState.DRAINING, ChildState.EXITED},
    ChildState.DRAINING: {ChildState.EXITED},
    ChildState.EXITED: set(),
}


class TransitionError(RuntimeError):
    """A state change the master must never make: a bug, surfaced loudly in tests."""


@dataclass(frozen=True)
class RunningJob:
    """The job a child runs (or ran when it died), wherever the master learnt it: a Python
    child's scoreboard (and payload area), a command child's JobStarted. A hard timeout is
    timed from `started`; a crash record is built from all of it."""

    function: str
    handle: str
    unique: str  # as assigned: a retry's "gv:" unique is parsed by crash_record
    started: float  # monotonic (the master's clock)
    payload: bytes | None  # the payload's first bytes kept, None when none was kept
    size: int  # the whole payload's length
    cut: bool  # `payload` holds only the first bytes
    key: str = ""  # a command child's: its shim's poison key (40 hex digits), or none

    @property
    def ident(self) -> tuple[str, str, str]:
        """The job across the workers it is handed to: function, handle and the shim's
        key (handles repeat after a gearmand restart)."""
        return self.function, self.handle, self.key


_HEX40 = re.compile(r"[0-9a-f]{40}")


def reported_job(message: msg.JobStarted, started: float, cap: int) -> RunningJob:
    """A command child's JobStarted as its current job: its payload decoded and cut to
    `cap` bytes (base64 that does not decode keeps no payload)."""
    text = message.payload_b64
    keep = text[:4 * (cap // 3 + 1)]  # decode only what the cap keeps: 4 characters, 3 bytes
    payload: bytes | None
    try:
        payload = base64.b64decode(keep, validate=True)
    except (binascii.Error, ValueError):
        payload = None
    if payload is not None and not text and message.size > 0:
        payload = None  # the worker did not send it
    size = max(message.size, len(payload or b""))
    cut = payload is None or len(keep) < len(text) or len(payload) > cap
    if payload is not None:
        payload = payload[:cap]
        cut = cut or len(payload) < size
    key = message.key if _HEX40.fullmatch(message.key) else ""
    return RunningJob(message.function, message.handle, message.unique, started, payload,
                      size, cut, key)


@dataclass
class Child:
    """One forked child, as the master sees it."""

    pool: str
    slot: int
    generation: int
    started_at: float  # monotonic
    pid: int = 0
    state: ChildState = ChildState.STARTING
    ready_at: float | None = None
    stop_requested_at: float | None = None
    kill_at: float | None = None  # SIGKILL deadline once draining
    event_fd: int = -1
    event_lines: LineSplitter = field(default_factory=event_lines, repr=False)
    event_overflows: int = 0  # reads that dropped an over-long event line (logged once)
    event_unreadable: int = 0  # event lines that were no message (logged at 1, 10, 100, ...)
    # What reading its event pipe cost the master this second (lines.ReadMeter,
    # Arbiter._meter_events)
    event_meter: ReadMeter = field(default_factory=lambda: ReadMeter(EVENT_BUDGET), repr=False)
    boot_error: str | None = None  # reason reported by a child that could not boot
    scoreboard: Scoreboard | None = field(default=None, repr=False)  # its job counters
    # Health (issue: self-quarantine, circuit, poison, timeouts, recycling)
    quarantined: str | None = None  # why it quarantined itself; it takes no jobs
    paused: bool = False  # told to stop taking jobs because its pool's circuit is open
    probation: bool = False  # started to replace a quarantined child
    killed_for: str | None = None  # "timeout": the master SIGKILLed it for a hung job
    recycle_at: float | None = None  # max_lifetime deadline (monotonic), jittered
    # The function timeouts (and grace) it was started with: a reload that changes them
    # must not hard-kill a job of an older child that never got the new soft timeout.
    timeouts: dict[str, float] = field(default_factory=dict, repr=False)
    timeout_grace: float = 0.0
    running_index: int = -1  # its slot in the fleet's RunningJobs table (-1: none)
    # A command child's current job as its reporting shim said: set at JobStarted, cleared
    # at JobEnded or a journal line (the arbiter). A Python child's is on its scoreboard.
    job: RunningJob | None = field(default=None, repr=False)
    master_killed: bool = False  # SIGKILLed by the master for a stop that ran out of time
    stop_signals: tuple[int, ...] = ()  # what the master asked it to stop with, in order
    # What its pool's config said when it started: the signal that retires it (a roll) and
    # the one that stops it (a graceful stop). Its code expects those, whatever a reload
    # says later (a command pool's new stop_signal, or a pool that runs Python code now).
    retire_signal: int = 0  # (set by Arbiter.spawn_child before the child is known)
    stop_signal: int = 0
    kill_group: bool = True  # the pool's kill_group when it started: SIGKILL hits its group
    # Command pools: its stdout/stderr pipes (read end fd -> stream name, partial line)
    output: dict[int, tuple[str, bytearray]] = field(default_factory=dict, repr=False)

    def running(self) -> RunningJob | None:
        """The job this child runs now, or None: a Python child's from its scoreboard (with
        no payload: the journal reads that from the payload area), a command child's as its
        reporting shim said (`job`; a command worker without the shim runs no job the
        master knows of)."""
        if self.scoreboard is None:
            return self.job
        job = self.scoreboard.read()
        if job is None or not job.busy:
            return None
        return RunningJob(job.function, job.handle, job.unique, job.job_started, None,
                          job.size, True)

    def transition(self, new: ChildState) -> None:
        """Move to `new`, refusing any change not listed in _ALLOWED."""
        if new not in _ALLOWED[self.state]:
            raise TransitionError(f"{self.name}: {self.state.value} -> {new.value} not allowed")
        self.state = new

    @property
    def name(self) -> str:
        return f"{self.pool}[{self.slot}]"


def describe_status(status: int) -> tuple[int | None, int | None, str]:
    """Split a waitpid status into (exit code, signal number, words for the log)."""
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = str(sig)
        return None, sig, f"killed by {name}"
    code = os.waitstatus_to_exitcode(status) if os.WIFEXITED(status) else None
    return code, None, f"exited with code {code}"
