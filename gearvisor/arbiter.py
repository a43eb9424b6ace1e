"""The master: one process, one thread, one selectors loop.

Signal handlers only queue the signal number (gunicorn's arbiter); the loop dispatches
`handle_<name>`. SIGCHLD reaps with waitpid(-1, WNOHANG) until nothing is left. Each child
has a pipe of JSON-line events back to the master (ready, boot_error). Every timer uses
time.monotonic().
"""

from __future__ import annotations

import collections
import json
import os
import selectors
import signal
import sys
import time
from typing import Any

from setproctitle import setproctitle

from . import log as logmod
from .child import run_child
from .config import Config
from .pool import ExitKind, Pool, Slot
from .process import EXIT_BOOT_ERROR, Child, ChildState, describe_status

HANDLED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGHUP,
                   signal.SIGCHLD)
QUIT_TIMEOUT = 2.0  # fast stop: how long children get to die from SIGQUIT before SIGKILL


class Arbiter:
    """Forks and watches every pool's children; stops them all on SIGTERM/SIGINT/SIGQUIT."""

    def __init__(self, config: Config, clock=time.monotonic) -> None:
        self.config = config
        self.clock = clock
        self.pid = os.getpid()
        self.log = logmod.get()
        self.pools: dict[str, Pool] = {name: Pool(pc) for name, pc in config.pools.items()}
        self.children: dict[int, tuple[Child, Pool, Slot]] = {}
        self.by_event_fd: dict[int, int] = {}
        self.signal_queue: collections.deque[int] = collections.deque()
        self.sel = selectors.DefaultSelector()
        self.stopping: str | None = None  # None, "graceful" or "fast"
        self.stop_deadline = 0.0
        self.all_ready_logged = False

    # -- setup ----------------------------------------------------------------------------------

    def _signal_handler(self, signum: int, _frame: Any) -> None:
        """Signal handler - NO LOGGING, just queue the signal (gunicorn #3198)."""
        self.signal_queue.append(signum)

    def _install_signals(self) -> None:
        self._wake_r, self._wake_w = os.pipe()
        for fd in (self._wake_r, self._wake_w):
            os.set_blocking(fd, False)
            os.set_inheritable(fd, False)
        signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)
        self.sel.register(self._wake_r, selectors.EVENT_READ, None)
        for sig in HANDLED_SIGNALS:
            signal.signal(sig, self._signal_handler)

    # -- main loop ------------------------------------------------------------------------------

    def run(self) -> int:
        """Run until stopped; return the process exit code."""
        setproctitle(f"gearvisor: master -c {self.config.path}")
        self._install_signals()
        self.log.info("master started", config=self.config.path,
                      pools={n: p.config.processes for n, p in self.pools.items()})
        while True:
            now = self.clock()
            self.handle_signals()
            self.reap()
            if self.stopping:
                if not self.children:
                    break
                if now >= self.stop_deadline:
                    self.murder_children()
            else:
                self.manage_pools(now)
            for key, _ in self.sel.select(self._timeout(self.clock())):
                if key.data is None:
                    self._drain(self._wake_r)
                else:
                    self.read_events(key.data)
        self.log.info("master stopped")
        return 0

    def _timeout(self, now: float) -> float:
        if self.signal_queue:
            return 0.0
        timeout = 5.0
        if self.stopping:
            timeout = min(timeout, self.stop_deadline - now)
        else:
            for pool in self.pools.values():
                due = pool.next_due()
                if due is not None:
                    timeout = min(timeout, due - now)
        return max(0.0, timeout)

    @staticmethod
    def _drain(fd: int) -> None:
        try:
            while os.read(fd, 4096):
                pass
        except BlockingIOError:
            pass

    # -- signals --------------------------------------------------------------------------------

    def handle_signals(self) -> None:
        while self.signal_queue:
            sig = self.signal_queue.popleft()
            handler = getattr(self, f"handle_{signal.Signals(sig).name[3:].lower()}", None)
            if handler:
                handler()

    def handle_chld(self) -> None:
        pass  # reap() runs on every pass of the loop

    def handle_term(self) -> None:
        self.stop(fast=False, why="SIGTERM")

    def handle_int(self) -> None:
        # A second Ctrl-C means "now".
        self.stop(fast=self.stopping == "graceful", why="SIGINT")

    def handle_quit(self) -> None:
        self.stop(fast=True, why="SIGQUIT")

    def handle_hup(self) -> None:
        self.log.warning("SIGHUP received; graceful reload is not implemented yet, ignoring")

    # -- children -------------------------------------------------------------------------------

    def manage_pools(self, now: float) -> None:
        """Start a child in every slot that is empty and past its backoff."""
        for pool in self.pools.values():
            for slot in pool.due(now):
                self.spawn_child(pool, slot, now)
        if not self.all_ready_logged and self.children and all(
                c.state is ChildState.READY for c, _, _ in self.children.values()) and not any(
                p.due(now) or p.backing_off for p in self.pools.values()):
            self.all_ready_logged = True
            self.log.info("all pools ready", children=len(self.children))

    def spawn_child(self, pool: Pool, slot: Slot, now: float) -> None:
        """Fork one child into `slot`. The record is built before fork; the child's
        process-wide changes happen only after it."""
        child = Child(pool=pool.name, slot=slot.index, generation=pool.generation,
                      started_at=now)
        r, w = os.pipe()
        os.set_blocking(w, False)
        blocked = set(HANDLED_SIGNALS)
        signal.pthread_sigmask(signal.SIG_BLOCK, blocked)
        try:
            pid = os.fork()
        except OSError as e:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, blocked)
            os.close(r)
            os.close(w)
            slot.restart_at = now + slot.backoff.failure(now, now)
            self.log.error("fork failed", pool=pool.name, slot=slot.index, error=str(e))
            return
        if pid == 0:
            os.close(r)
            run_child(self.config, pool.config, slot.index, pool.generation, w, self.pid,
                      blocked)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, blocked)
        os.close(w)
        os.set_blocking(r, False)
        child.pid = pid
        child.event_fd = r
        slot.child = child
        self.children[pid] = (child, pool, slot)
        self.by_event_fd[r] = pid
        self.sel.register(r, selectors.EVENT_READ, pid)
        self.log.debug("child spawned", pool=pool.name, slot=slot.index, child_pid=pid,
                       generation=pool.generation)

    def read_events(self, pid: int) -> None:
        """Read JSON-line events from one child's pipe (the selector's callback)."""
        entry = self.children.get(pid)
        if entry is not None:
            self._read_pipe(*entry)

    def _read_pipe(self, child: Child, pool: Pool, slot: Slot) -> bool:
        """Handle what the pipe holds now; return False once it reached end of file."""
        try:
            data = os.read(child.event_fd, 65536)
        except BlockingIOError:
            return True
        except OSError:
            data = b""
        if not data:
            self._close_events(child)
            return False
        child.event_buf += data
        while b"\n" in child.event_buf:
            line, _, rest = bytes(child.event_buf).partition(b"\n")
            child.event_buf = bytearray(rest)
            try:
                event = json.loads(line)
            except ValueError:
                self.log.warning("unreadable event from child", pool=pool.name,
                                 child_pid=child.pid, line=line[:200].decode(errors="replace"))
                continue
            self.handle_event(child, pool, slot, event)
        return True

    def handle_event(self, child: Child, pool: Pool, slot: Slot, event: dict) -> None:
        kind = event.get("event")
        if kind == "ready":
            if child.state is ChildState.STARTING:
                child.transition(ChildState.READY)  # STARTING -> READY
                child.ready_at = self.clock()
                failures = pool.child_ready(slot)
                if failures:
                    self.log.info("child recovered", pool=pool.name, slot=slot.index,
                                  child_pid=child.pid, after_failures=failures)
                else:
                    self.log.debug("child ready", pool=pool.name, slot=slot.index,
                                   child_pid=child.pid)
        elif kind == "boot_error":
            child.boot_error = str(event.get("reason", "unknown"))

    def _close_events(self, child: Child) -> None:
        if child.event_fd < 0:
            return
        try:
            self.sel.unregister(child.event_fd)
        except (KeyError, ValueError):
            pass
        self.by_event_fd.pop(child.event_fd, None)
        os.close(child.event_fd)
        child.event_fd = -1

    def reap(self) -> None:
        """Collect every exited child (waitpid until nothing is left) and decide what next."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            entry = self.children.pop(pid, None)
            if entry is None:
                continue  # not ours (or already handled)
            child, pool, slot = entry
            # The child is dead, so its pipe holds all it will ever write (a boot_error is
            # written just before exit): read to end of file before deciding.
            while child.event_fd >= 0 and self._read_pipe(child, pool, slot):
                pass
            requested = child.stop_requested_at is not None
            child.transition(ChildState.EXITED)  # any -> EXITED
            self.on_child_exit(child, pool, slot, status, requested)

    def on_child_exit(self, child: Child, pool: Pool, slot: Slot, status: int,
                      requested: bool) -> None:
        now = self.clock()
        code, _sig, words = describe_status(status)
        decision = pool.child_exited(slot, child, code, now, stopping=bool(self.stopping),
                                     requested=requested)
        ctx = dict(pool=pool.name, slot=slot.index, child_pid=child.pid, status=words,
                   uptime=round(now - child.started_at, 3))
        if decision.kind is ExitKind.STOPPED:
            self.log.debug("child stopped", **ctx)
            return
        retry = {} if decision.restart_in is None else {"retry_in": round(decision.restart_in,
                                                                         3)}
        if decision.kind is ExitKind.BOOT_ERROR:
            if decision.log_reason:
                self.log.error("child failed to boot; retrying with backoff", reason=(
                    child.boot_error or f"exit code {EXIT_BOOT_ERROR}"), streak=decision.streak,
                    **retry, **ctx)
            else:
                self.log.debug("child still failing to boot", streak=decision.streak, **retry,
                               **ctx)
        else:
            level = self.log.error if decision.log_reason else self.log.warning
            level("child crashed; restarting with backoff", streak=decision.streak, **retry,
                  **ctx)

    # -- stopping -------------------------------------------------------------------------------

    def stop(self, fast: bool, why: str) -> None:
        """Graceful: children finish their current job (up to graceful_timeout), then SIGKILL.
        Fast: SIGQUIT now, SIGKILL after QUIT_TIMEOUT."""
        now = self.clock()
        if fast:
            if self.stopping == "fast":
                return
            self.stopping = "fast"
            self.stop_deadline = now + QUIT_TIMEOUT
            self.log.info("fast stop", signal=why, children=len(self.children))
            for pid in list(self.children):
                self.kill_child(pid, signal.SIGQUIT, now)
            return
        if self.stopping:
            return
        self.stopping = "graceful"
        timeout = max((p.config.graceful_timeout for p in self.pools.values()), default=0.0)
        self.stop_deadline = now + timeout
        self.log.info("graceful stop: children finish their current job", signal=why,
                      children=len(self.children), graceful_timeout=timeout)
        for pid in list(self.children):
            self.kill_child(pid, signal.SIGTERM, now)

    def kill_child(self, pid: int, sig: int, now: float) -> None:
        """Send `sig`; marks the child as draining so its exit is not counted as a crash."""
        entry = self.children.get(pid)
        if entry is None:
            return
        child = entry[0]
        if child.state in (ChildState.STARTING, ChildState.READY):
            child.transition(ChildState.DRAINING)  # STARTING/READY -> DRAINING
        if child.stop_requested_at is None:
            child.stop_requested_at = now
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass  # already dead; reap() will collect it

    def murder_children(self) -> None:
        """SIGKILL every child still alive past the stop deadline."""
        for pid, (child, _, _) in list(self.children.items()):
            self.log.warning("child did not stop in time; killing", pool=child.pool,
                             slot=child.slot, child_pid=pid)
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.stop_deadline = self.clock() + 5.0  # reap and log again if something is stuck

    def close(self) -> None:
        signal.set_wakeup_fd(-1)
        self.sel.close()


def run(config: Config) -> int:
    """Entry point of `gearvisor -c FILE`."""
    logmod.configure(config.log_level, config.log_format)
    arbiter = Arbiter(config)
    try:
        return arbiter.run()
    finally:
        arbiter.close()
        sys.stderr.flush()
