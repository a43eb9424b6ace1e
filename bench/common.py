"""What every benchmark shares: a gearmand on loopback, polling with deadlines, process
clean-up by pid, and the row format the report is built from.

Rules: only 127.0.0.1; every load loop bounded in count and time; poll a
condition until a deadline, never sleep to synchronise; kill what was started, by pid.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from gearvisor.child.postfork import set_pdeathsig  # noqa: E402
from gearvisor.gearman import admin  # noqa: E402

HOST = "127.0.0.1"
PYTHON = sys.executable  # the .venv's python: gearvisor, pygearman and supervisor live there


@dataclass
class Row:
    """One measurement: `section` (throughput, startup...), `case` (e.g. "drain 20000, 1
    worker"), `competitor` (gearvisor, pygearman, libgearman, supervisord), `value` in `unit`;
    `better` says which way is good."""

    section: str
    case: str
    competitor: str
    value: float
    unit: str
    better: str = "higher"  # or "lower"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Target:
    """A goal from the benchmark issue: `ratio` = ours / theirs (or an absolute value)."""

    name: str
    value: float
    goal: str  # e.g. ">= 2.0x", "< 1% of a core"
    ok: bool


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def wait_for(cond: Callable[[], Any], timeout: float = 30.0, interval: float = 0.01,
             message: str = "condition") -> Any:
    """Poll `cond` until truthy; raise TimeoutError at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            got = cond()
        except (admin.AdminError, OSError):
            got = None
        if got:
            return got
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {message}")
        time.sleep(interval)  # polling interval, not synchronisation


class Gearmand:
    """A real gearmand on a free loopback port. `threads`: None = gearmand's default."""

    def __init__(self, threads: int | None = 1) -> None:
        self.port = free_port()
        self.threads = threads
        self.proc: subprocess.Popen | None = None

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"

    def __enter__(self) -> Gearmand:
        exe = shutil.which("gearmand") or "/usr/sbin/gearmand"
        args = [exe, "-L", HOST, "-p", str(self.port), "--log-file=none"]
        if self.threads is not None:
            args += ["-t", str(self.threads)]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, preexec_fn=die_with_parent)
        wait_for(lambda: admin.version(HOST, self.port, 0.5), 10, message="gearmand")
        return self

    def __exit__(self, *exc: object) -> None:
        kill(self.proc)

    def registered(self, function: str) -> int:
        """Connections gearmand lists as able to run `function`."""
        return sum(1 for w in admin.workers(HOST, self.port, 2.0) if function in w.functions)

    def queued(self, function: str) -> int:
        st = admin.status(HOST, self.port, 2.0).get(function)
        return st.queued if st else 0


def kill(proc: subprocess.Popen | None, sig: int = signal.SIGKILL) -> None:
    """Kill a process we started and its whole process group (start them with
    start_new_session=True), by pid; reap it."""
    if proc is None:
        return
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.kill()
    except ProcessLookupError:
        pass
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass


def die_with_parent() -> None:
    """preexec_fn for what a benchmark starts: SIGTERM when the thread that started it
    exits (the benchmark killed, or the test that ran it), so nothing outlives it."""
    set_pdeathsig(signal.SIGTERM)


def spawn(args: list[str], **kw: Any) -> subprocess.Popen:
    """Start a process in its own session (so kill() takes its children too) that gets
    SIGTERM when this benchmark process dies: a run killed by a timeout (the suite runs
    bench/run.py --tiny) leaves no master or gearmand behind. Call it from the main thread:
    PDEATHSIG fires when the thread that forked ends."""
    kw.setdefault("stdout", subprocess.DEVNULL)
    kw.setdefault("stderr", subprocess.DEVNULL)
    return subprocess.Popen(args, start_new_session=True, preexec_fn=die_with_parent, **kw)
