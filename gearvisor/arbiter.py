"""The master: one process, one thread, one selectors loop.

Signal handlers only queue the signal number (gunicorn's arbiter); the loop dispatches
`handle_<name>`. SIGCHLD reaps with waitpid(-1, WNOHANG) until nothing is left. Each child
has a pipe of JSON-line events back to the master (ready, boot_error) and a shared-memory
scoreboard (its job counters and current job). The control socket is served from the same
loop. Every timer uses time.monotonic().

What to fork or retire is decided by pool.Pool.plan(); this module only does the I/O.
"""

from __future__ import annotations

import collections
import json
import os
import resource
import selectors
import signal
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NoReturn

from setproctitle import setproctitle

from . import log as logmod
from .child import run_child
from .command import OutputSink, exec_command, output_pipe, split_lines
from .config import Config, ConfigError, load
from .control import MAX_REQUEST, ControlError, ControlServer, default_socket_path, send_reply
from .gearman import admin
from .health import fd_warnings, jittered
from .notify import Notifier
from .poison import PoisonTable, RunningJobs, job_key
from .pool import ExitKind, Pool, Retire, Spawn
from .process import EXIT_BOOT_ERROR, Child, ChildState, describe_status
from .scoreboard import Scoreboard
from .status import fleet_status, summary
from .watcher import Debouncer, WatcherState, build_spec, run_watcher

HANDLED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGHUP,
                   signal.SIGCHLD)
ADMIN_TIMEOUT = 2.0  # a `workers` query (ready: registered) that takes longer is dropped
REGISTERED_POLL = 0.25  # how often gearmand's workers list is read while a child starts
HEALTH_INTERVAL = 0.25  # how often hung jobs and lifetimes are checked, when configured
QUIT_TIMEOUT = 2.0  # fast stop: how long children get to die from SIGQUIT before SIGKILL
RETIRE_SIGNAL = signal.SIGHUP  # "finish your current job, then exit 0"


@dataclass
class _Client:
    """One control-socket connection: its request buffer, then (for reload) its wait."""

    sock: socket.socket
    buf: bytearray = field(default_factory=bytearray)
    waits_for: tuple[str, ...] = ()  # pools whose roll must finish before the reply
    verb: str = ""


class Arbiter:
    """Forks and watches every pool's children, rolls them on reload, stops them on exit."""

    def __init__(self, config: Config, clock=time.monotonic,
                 notifier: Notifier | None = None) -> None:
        self.config = config
        self.clock = clock
        self.pid = os.getpid()
        self.started_at = clock()
        self.log = logmod.get()
        self.pools: dict[str, Pool] = {name: Pool(pc) for name, pc in config.pools.items()}
        self.children: dict[int, tuple[Child, Pool]] = {}
        self.signal_queue: collections.deque[int] = collections.deque()
        self.sel = selectors.DefaultSelector()
        self.stopping: str | None = None  # None, "graceful" or "fast"
        self.stop_deadline = 0.0
        self.notifier = notifier or Notifier()
        self.next_watchdog = 0.0
        self.announced_ready = False  # READY=1 sent for start-up or the last reload
        self.reloads = 0
        self.waiting: list[_Client] = []  # reload/restart requests waiting for their roll
        self.control = ControlServer(config.control_socket or default_socket_path())
        self.debouncer = Debouncer(config.watch_debounce)
        self.watcher = WatcherState(build_spec(config, sys.path))
        self.poison = PoisonTable()  # strikes, shared with every child (mapped before forks)
        self.running = RunningJobs()  # the job each child runs, shared likewise
        self.next_health = 0.0
        # Internal events ("circuit_open", "circuit_closed", "poison_job", "quarantined"):
        # alerting hooks in here later.
        self.listeners: list[Callable[[str, dict[str, Any]], None]] = []
        self.sinks: dict[str, OutputSink] = {}  # command pools' output, by pool
        self.next_registered_poll = 0.0
        # ready: registered: non-blocking `workers` queries in flight, and the last answer
        # of each job server (None: it could not be asked)
        self.admin_polls: dict[tuple[str, int], admin.WorkersPoll] = {}
        self.admin_seen: dict[tuple[str, int], list[admin.WorkerInfo] | None] = {}

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
        self.sel.register(self._wake_r, selectors.EVENT_READ, ("wake",))
        for sig in HANDLED_SIGNALS:
            signal.signal(sig, self._signal_handler)

    # -- main loop ------------------------------------------------------------------------------

    def run(self) -> int:
        """Run until stopped; return the process exit code."""
        try:
            listener = self.control.open()
        except ControlError as e:
            self.log.error("cannot open the control socket", error=str(e))
            return 1
        self.sel.register(listener, selectors.EVENT_READ, ("listen",))
        setproctitle(f"gearvisor: master -c {self.config.path}")
        self._install_signals()
        self.log.info("master started", config=self.config.path,
                      control_socket=self.control.path,
                      pools={n: p.config.processes for n, p in self.pools.items()})
        self._log_watch_notes()
        self.check_fd_limits()
        while True:
            now = self.clock()
            self.handle_signals()
            self.reap()
            if self.stopping:
                if not self.children and self.watcher.pid is None:
                    break
                if now >= self.stop_deadline:
                    self.murder_children()
            else:
                self.apply_file_changes(now)  # first: the pools it rolls act at once
                self.manage_pools(now)
                self.check_health(now)
                self.check_commands(now)
                self.manage_watcher(now)
                self.kill_overdue(now)
                self.report_progress()
            self.tick_systemd(now)
            for key, _ in self.sel.select(self._timeout(self.clock())):
                self.dispatch(key)
        self.notifier.close()
        self.log.info("master stopped")
        return 0

    def dispatch(self, key: selectors.SelectorKey) -> None:
        kind = key.data[0]
        if kind == "wake":
            self._drain(self._wake_r)
        elif kind == "child":
            entry = self.children.get(key.data[1])
            if entry is not None:
                self._read_pipe(*entry)
        elif kind == "watcher":
            self._read_watcher()
        elif kind == "admin":
            self._admin_event(key.data[1])
        elif kind == "output":
            entry = self.children.get(key.data[1])
            if entry is not None:
                self._read_output(entry[0], entry[1], key.data[2])
        elif kind == "listen":
            self.accept_control()
        elif kind == "client":
            self.read_control(key.data[1])

    def _timeout(self, now: float) -> float:
        if self.signal_queue:
            return 0.0
        deadlines = [now + 5.0]
        if self.stopping:
            deadlines.append(self.stop_deadline)
        else:
            for pool in self.pools.values():
                due = pool.next_due()
                if due is not None:
                    deadlines.append(due)
            deadlines += [c.kill_at for c, _ in self.children.values() if c.kill_at]
            if self.watcher.pid is None and not self.watcher.spec.empty:
                deadlines.append(self.watcher.restart_at)
            if self.debouncer.due() is not None:
                deadlines.append(self.debouncer.due())
            if self._health_watched():
                deadlines.append(self.next_health)
            due = self._command_due(now)
            if due is not None:
                deadlines.append(due)
            deadlines += [d for d in (sink.due() for sink in self.sinks.values()) if d]
            deadlines += [p.deadline for p in self.admin_polls.values()]
        if self.notifier.watchdog_interval:
            deadlines.append(self.next_watchdog)
        return max(0.0, min(deadlines) - now)

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
        if self.stopping:
            self.log.info("SIGHUP ignored: the master is stopping")
            return
        self.reload(why="SIGHUP")

    # -- children -------------------------------------------------------------------------------

    def manage_pools(self, now: float) -> None:
        """Carry out each pool's plan: fill empty slots, push rolls forward, scale."""
        for name, pool in list(self.pools.items()):
            for action in pool.plan(now):
                if isinstance(action, Spawn):
                    self.spawn_child(pool, action, now)
                else:
                    self.retire(pool, action, now)
            if pool.removed and not pool.children():
                del self.pools[name]
                self.log.info("pool removed", pool=name)

    def spawn_child(self, pool: Pool, action: Spawn, now: float) -> None:
        """Fork one child for `action`. The record is built before fork; the child's
        process-wide changes happen only after it."""
        slot = action.slot
        child = Child(pool=pool.name, slot=slot.index, generation=pool.generation,
                      started_at=now)
        command = pool.config.command is not None
        # An open circuit: a new child (a crash restart, a roll, a scale-up) serves nothing
        # until the probe has passed; only the probe itself takes jobs.
        start_paused = pool.circuit != "closed" and not action.probe and not command
        child.paused = start_paused
        pipes: list[tuple[int, int]] = []
        if command:
            try:
                pipes = [output_pipe(), output_pipe()]
            except OSError as e:
                for fd in (fd for p in pipes for fd in p):
                    os.close(fd)
                self.log.error("cannot create output pipes", pool=pool.name, error=str(e))
                slot.restart_at = now + slot.backoff.failure(now, now)
                return
        else:
            child.scoreboard = Scoreboard()
        board = child.scoreboard
        index = self.running.allocate() if board is not None else -1
        if board is not None:
            board.set_paused(start_paused)

        def body(w: int, blocked: set[int]) -> NoReturn:
            if command:
                exec_command(self.config, pool.config, slot.index, w, pipes[0][1],
                             pipes[1][1], blocked)
            os.set_blocking(w, False)
            run_child(self.config, pool.config, slot.index, pool.generation, w, self.pid,
                      blocked, board, self.poison, action.probation, start_paused,
                      self.running, index)

        try:
            pid, r = self._fork(body)
        except OSError as e:
            for fd in (fd for p in pipes for fd in p):
                os.close(fd)
            self.running.release(index)
            if child.scoreboard is not None:
                child.scoreboard.close()
            if not action.successor:
                slot.restart_at = now + slot.backoff.failure(now, now)
            elif slot.replace_at is not None:
                slot.replace_at = now + slot.backoff.failure(now, now)
            if action.probe:
                pool.circuit_until = now + 1.0  # try the probe again in a second
            self.log.error("fork failed", pool=pool.name, slot=slot.index, error=str(e))
            return
        child.pid = pid
        child.event_fd = r
        child.running_index = index
        child.timeouts, child.timeout_grace = pool.config.timeouts, pool.config.timeout_grace
        for (out_r, out_w), stream in zip(pipes, ("stdout", "stderr"), strict=False):
            os.close(out_w)
            child.output[out_r] = (stream, bytearray())
            self.sel.register(out_r, selectors.EVENT_READ, ("output", pid, out_r))
        if pool.config.max_lifetime:
            child.recycle_at = now + jittered(pool.config.max_lifetime,
                                              pool.config.recycle_jitter)
        pool.placed(action, child)
        self.children[pid] = (child, pool)
        self.sel.register(r, selectors.EVENT_READ, ("child", pid))
        self.log.debug("child spawned", pool=pool.name, slot=slot.index, child_pid=pid,
                       generation=pool.generation, successor=action.successor)

    def _fork(self, body: Callable[[int, set[int]], NoReturn]) -> tuple[int, int]:
        """Fork with a pipe back to the master; the child runs body(write_fd, blocked).
        Returns (pid, read_fd), the read end non-blocking. The master's signals stay blocked
        across fork, so no handler of the master ever runs in the child."""
        r, w = os.pipe()
        blocked = set(HANDLED_SIGNALS)
        signal.pthread_sigmask(signal.SIG_BLOCK, blocked)
        try:
            pid = os.fork()
        except OSError:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, blocked)
            os.close(r)
            os.close(w)
            raise
        if pid == 0:
            os.close(r)
            body(w, blocked)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, blocked)
        os.close(w)
        os.set_blocking(r, False)
        return pid, r

    def retire(self, pool: Pool, action: Retire, now: float) -> None:
        """Tell a child to finish its current job and exit; SIGKILL it after
        graceful_timeout."""
        child = action.child
        pool.retiring(child)
        self.log.info("retiring child", pool=pool.name, slot=child.slot, child_pid=child.pid,
                      generation=child.generation, why=action.why)
        cfg = pool.config
        sig = (RETIRE_SIGNAL if cfg.command is None else
               signal.Signals[cfg.reload_signal or cfg.stop_signal])
        self.kill_child(child.pid, sig, now, cfg.graceful_timeout)

    # -- command pools ----------------------------------------------------------------------

    def _sink(self, pool: Pool) -> OutputSink:
        sink = self.sinks.get(pool.name)
        if sink is None:
            sink = self.sinks[pool.name] = OutputSink(pool.config, self.log.bind(pool=pool.name))
        return sink

    def _read_output(self, child: Child, pool: Pool, fd: int, final: bool = False) -> bool:
        """Log what a command child wrote; False once the pipe reached end of file."""
        stream, buf = child.output[fd]
        try:
            data = os.read(fd, 65536)
        except BlockingIOError:
            return True
        except OSError:
            data = b""
        sink = self._sink(pool)
        for line in split_lines(buf, data, final=not data):
            sink.line(child.slot, child.pid, stream, line)
        if not data:
            try:
                self.sel.unregister(fd)
            except (KeyError, ValueError):
                pass
            os.close(fd)
            del child.output[fd]
            return False
        return True

    def check_commands(self, now: float) -> None:
        """Readiness of command children: alive `startsecs` (ready: started), or their
        functions registered under their client id in gearmand (ready: registered)."""
        for sink in self.sinks.values():
            sink.report(now)  # dropped-line counts, even when no more lines come
        for key, poll in list(self.admin_polls.items()):
            if now >= poll.deadline:
                poll.finish(ok=False)  # too slow: counts as not answering
                self._admin_done(key, poll)
        wanted: set[tuple[str, int]] = set()
        for pool in self.pools.values():
            cfg = pool.config
            if cfg.command is None:
                continue
            starting = [c for c in pool.children() if c.state is ChildState.STARTING]
            if starting and cfg.ready == "registered":
                wanted |= {(s.host, s.port) for s in cfg.servers}
            for child in starting:
                if now - child.started_at < cfg.startsecs:
                    continue
                if cfg.ready == "started" or self._registered(pool, child):
                    self.handle_event(child, pool, {"event": "ready"})
        if wanted and now >= self.next_registered_poll:
            self.next_registered_poll = now + REGISTERED_POLL
            for key in wanted - set(self.admin_polls):
                self._admin_start(key, now)

    def _admin_start(self, key: tuple[str, int], now: float) -> None:
        try:
            poll = admin.WorkersPoll(key[0], key[1], now + ADMIN_TIMEOUT)
        except OSError:
            self.admin_seen[key] = None  # cannot even resolve or open a socket
            return
        if poll.done:
            poll.sock.close()
            self.admin_seen[key] = None
            return
        self.admin_polls[key] = poll
        self.sel.register(poll.sock, selectors.EVENT_WRITE, ("admin", key))

    def _admin_event(self, key: tuple[str, int]) -> None:
        poll = self.admin_polls.get(key)
        if poll is None:
            return
        sent = poll.sent
        poll.on_ready()
        if poll.done:
            self._admin_done(key, poll)
        elif poll.sent and not sent:
            self.sel.modify(poll.sock, selectors.EVENT_READ, ("admin", key))

    def _admin_done(self, key: tuple[str, int], poll: admin.WorkersPoll) -> None:
        try:
            self.sel.unregister(poll.sock)
        except (KeyError, ValueError):
            pass
        poll.sock.close()
        del self.admin_polls[key]
        self.admin_seen[key] = poll.result

    def _registered(self, pool: Pool, child: Child) -> bool:
        """gearmand lists the child's client id with every function of the pool, on each
        server that answers (an unreachable one does not hold the pool back)."""
        from .command import client_id

        want = client_id(pool.config, child.slot, child.pid)
        needed = set(pool.config.functions)
        answered = False
        for server in pool.config.servers:
            workers = self.admin_seen.get((server.host, server.port))
            if workers is None:
                continue  # not asked yet, or not answering: does not hold the pool back
            answered = True
            if not any(w.client_id == want and needed <= set(w.functions) for w in workers):
                return False
        return answered

    def _command_due(self, now: float) -> float | None:
        times = []
        for pool in self.pools.values():
            if pool.config.command is None:
                continue
            for c in pool.children():
                if c.state is ChildState.STARTING:
                    due = c.started_at + pool.config.startsecs
                    times.append(max(due, self.next_registered_poll)
                                 if pool.config.ready == "registered" and due <= now else due)
        return min(times) if times else None

    def _read_pipe(self, child: Child, pool: Pool) -> bool:
        """Handle what the pipe holds now; return False once it reached end of file."""
        lines = _read_lines(child.event_fd, child.event_buf)
        if lines is None:
            self._close_events(child)
            return False
        for line in lines:
            try:
                event = json.loads(line)
            except ValueError:
                self.log.warning("unreadable event from child", pool=pool.name,
                                 child_pid=child.pid, line=line[:200].decode(errors="replace"))
                continue
            self.handle_event(child, pool, event)
        return True

    def handle_event(self, child: Child, pool: Pool, event: dict) -> None:
        kind = event.get("event")
        if kind == "ready":
            if child.state is not ChildState.STARTING:
                return  # told to stop before it got here: it is not serving
            child.transition(ChildState.READY)  # STARTING -> READY
            child.ready_at = self.clock()
            failures, replaced = pool.child_ready(child)
            ctx = dict(pool=pool.name, slot=child.slot, child_pid=child.pid,
                       generation=child.generation)
            if failures:
                self.log.info("child recovered", after_failures=failures, **ctx)
            else:
                self.log.debug("child ready", **ctx)
            if replaced is not None:
                why = (replaced.quarantined and "quarantined") or (
                    "recycled" if replaced.generation == child.generation else
                    f"replaced by generation {child.generation}")
                self.retire(pool, Retire(replaced, f"{why} (successor pid {child.pid})"),
                            self.clock())
            # Match the circuit as it is now: paused while open (the probe aside), taking
            # jobs once closed (it may have closed while this child was starting).
            self._pause(child, pool.circuit != "closed" and child is not pool.probe)
        elif kind == "boot_error":
            child.boot_error = str(event.get("reason", "unknown"))
        elif kind == "quarantined":
            self.on_quarantine(child, pool, str(event.get("reason")), event)
        elif kind == "probation_passed":
            if pool.probation_passed(child) == "closed":
                for other in pool.children():
                    if other.paused:
                        self._pause(other, False)
                self.emit("circuit_closed", pool=pool.name, probe_pid=child.pid,
                          message="circuit closed: the probe child succeeded; the pool "
                                  "consumes again")
        elif kind == "recycle":
            reason = str(event.get("reason"))
            if pool.recycle(child, reason, self.clock()):
                self.log.info("recycling child: a successor starts first", pool=pool.name,
                              slot=child.slot, child_pid=child.pid, reason=reason)

    def emit(self, name: str, message: str, **fields: Any) -> None:
        """An internal event: logged, and handed to every listener (alerting, later)."""
        level = self.log.error if name in ("circuit_open", "poison_job") else self.log.warning
        level(message, internal_event=name, **fields)
        for listener in self.listeners:
            try:
                listener(name, fields)
            except Exception:
                self.log.exception("event listener failed", internal_event=name)

    def _pause(self, child: Child, paused: bool) -> None:
        """Stop taking jobs (the circuit opened) or take them again: the wanted state goes
        into the child's scoreboard, then SIGUSR1 tells it to look."""
        if (child.state is not ChildState.READY or child.quarantined
                or child.paused == paused or child.scoreboard is None):
            return
        child.paused = paused
        child.scoreboard.set_paused(paused)
        try:
            os.kill(child.pid, signal.SIGUSR1)
        except ProcessLookupError:
            pass

    def on_quarantine(self, child: Child, pool: Pool, reason: str, event: dict) -> None:
        now = self.clock()
        cooldown, circuit = pool.child_quarantined(child, reason, now)
        if child.state is not ChildState.DRAINING and not any(
                s.child is child for s in pool.slots):
            # Quarantined before it took its slot (a successor): it will never serve.
            self.retire(pool, Retire(child, "quarantined before it was ready"), now)
        self.emit("quarantined", pool=pool.name, slot=child.slot, child_pid=child.pid,
                  reason=reason, jobs_failed=event.get("failed"), jobs_done=event.get("done"),
                  replaced_in=round(cooldown, 3),
                  message="child quarantined itself: it fails fast, so it takes no more jobs")
        if circuit is None:
            return
        for other in pool.children():
            self._pause(other, True)
        quarantined = sum(1 for s in pool.slots if s.child is not None and s.child.quarantined)
        self.emit("circuit_open", pool=pool.name, quarantined=quarantined,
                  desired=pool.desired, probe_in=round(pool.circuit_until - now, 3),
                  message=("circuit open: most children of the pool fail fast, so the fault "
                           "is downstream or in the jobs; the pool stops consuming (jobs stay "
                           "queued in gearmand) and probes with one child after a cooldown")
                  if circuit == "opened" else
                  "circuit stays open: the probe child failed too; next probe later")

    def _health_watched(self) -> bool:
        return any(c.timeouts or c.recycle_at is not None
                   for p in self.pools.values() for c in p.children())

    def check_health(self, now: float) -> None:
        """Hard job timeouts (SIGKILL at timeout + timeout_grace) and max_lifetime."""
        if now < self.next_health or not self._health_watched():
            return
        self.next_health = now + HEALTH_INTERVAL
        for pool in self.pools.values():
            for child in pool.children():
                if (child.recycle_at is not None and now >= child.recycle_at
                        and child.state is ChildState.READY):
                    child.recycle_at = None
                    if pool.recycle(child, f"max_lifetime: up {now - child.started_at:.0f}s",
                                    now):
                        self.log.info("recycling child: a successor starts first",
                                      pool=pool.name, slot=child.slot, child_pid=child.pid,
                                      reason="max_lifetime")
                if not child.timeouts or child.scoreboard is None or child.killed_for:
                    continue
                job = child.scoreboard.read()
                limit = child.timeouts.get(job.function) if job.busy else None
                if limit is not None and now - job.job_started > limit + child.timeout_grace:
                    child.killed_for = "timeout"
                    self.log.error("job hung past its timeout; killing the child",
                                   pool=pool.name, slot=child.slot, child_pid=child.pid,
                                   function=job.function, handle=job.handle, unique=job.unique,
                                   timeout=limit, grace=child.timeout_grace)
                    try:
                        os.kill(child.pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass

    def _close_events(self, child: Child) -> None:
        if child.event_fd < 0:
            return
        try:
            self.sel.unregister(child.event_fd)
        except (KeyError, ValueError):
            pass
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
                if pid == self.watcher.pid:
                    self.on_watcher_exit(status)
                continue  # not ours (or already handled)
            child, pool = entry
            # The child is dead, so its pipe holds all it will ever write (a boot_error is
            # written just before exit): read to end of file before deciding.
            while child.event_fd >= 0 and self._read_pipe(child, pool):
                pass
            for fd in list(child.output):
                while fd in child.output and self._read_output(child, pool, fd):
                    pass
            child.transition(ChildState.EXITED)  # any -> EXITED
            self.on_child_exit(child, pool, status)
            self.running.release(child.running_index)  # after its strike, if any
            if child.scoreboard is not None:
                child.scoreboard.close()

    def on_child_exit(self, child: Child, pool: Pool, status: int) -> None:
        now = self.clock()
        code, _sig, words = describe_status(status)
        if (pool.config.command is not None and child.ready_at is None
                and child.stop_requested_at is None and code != EXIT_BOOT_ERROR):
            # A command that exits before it is ready (startsecs) failed to start. How long
            # it lived stays out of the reason (it is the line's uptime): the same failure
            # must read the same each time, or every attempt is logged as a new reason.
            child.boot_error = (f"{pool.config.command[0]} {words} before startsecs "
                                f"({pool.config.startsecs:g}s)")
            code = EXIT_BOOT_ERROR
        decision = pool.child_exited(child, code, now, stopping=bool(self.stopping))
        ctx = dict(pool=pool.name, slot=child.slot, child_pid=child.pid, status=words,
                   generation=child.generation, uptime=round(now - child.started_at, 3))
        job = child.scoreboard.read() if child.scoreboard is not None else None
        died = _sig is not None and not child.master_killed  # a crash signal, not our kill
        if job is not None and job.busy and (decision.kind is not ExitKind.STOPPED
                                             or child.killed_for == "timeout" or died):
            # A crash mid-job (even of a child told to stop), or a hard-timeout kill.
            ctx.update(function=job.function, handle=job.handle, unique=job.unique)
            self._strike(pool, job, "hung past its timeout" if child.killed_for else "crashed",
                         child)
        if decision.kind is ExitKind.STOPPED:
            level = self.log.debug if code == 0 else self.log.warning
            level("child stopped", **ctx)
            return
        if decision.kind is ExitKind.ROLL_FAILED:
            self.log.error("roll halted: a new child failed before it was ready; the old "
                           "children keep serving", reason=pool.halted, **ctx)
            return
        if decision.fatal:
            self.log.error("giving up on this slot: no more restarts until `gearvisor "
                           "restart` or a reload", reason=decision.fatal, **ctx)
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
            what = "crashed" if code != 0 else "exited without being asked to"
            level(f"child {what}; restarting with backoff", streak=decision.streak, **retry,
                  **ctx)

    def _strike(self, pool: Pool, job: Any, what: str, child: Child) -> None:
        """The job `job` crashed or hung its child: one more strike; poison at
        poison_after."""
        limit = pool.config.poison_after
        if not limit:
            return
        key = job.key or job_key(job.function, job.unique, job.handle)
        # The death moves from the child's running slot to the strike table, back to back:
        # freed first, so a child checking in between undercounts by one (one more crash at
        # worst) rather than failing a job that crashed only once.
        self.running.release(child.running_index)
        child.running_index = -1
        self.poison.add(key)
        strikes = self.poison.strikes(key)  # the count every child sees
        if strikes == limit:
            self.emit("poison_job", pool=pool.name, function=job.function, unique=job.unique,
                      handle=job.handle, size=job.size, strikes=strikes, last=what,
                      message=f"poison job: it {what}; {strikes} children died on it, so "
                              "from now on it is failed without running")

    def kill_overdue(self, now: float) -> None:
        """SIGKILL retired children that outlived their graceful_timeout."""
        for pid, (child, pool) in list(self.children.items()):
            if child.kill_at is not None and now >= child.kill_at:
                self.log.warning("child did not finish in time; killing", pool=pool.name,
                                 slot=child.slot, child_pid=pid,
                                 graceful_timeout=pool.config.graceful_timeout)
                child.kill_at = now + 5.0  # if SIGKILL does not reap it, say so again later
                self._killing(child)
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass

    # -- reload ---------------------------------------------------------------------------------

    def reload(self, why: str, client: _Client | None = None) -> bool:
        """Re-read the config; refuse it whole if invalid (return False), else roll every
        pool to it."""
        try:
            new = load(self.config.path)
        except ConfigError as e:
            self.log.error("reload refused: invalid config; the fleet keeps its old config",
                           trigger=why, error=e.render())
            if client is not None:
                self.reply(client, {"ok": False, "error": f"invalid config, nothing changed\n"
                                                          f"{e.render()}"})
            return False
        if (new.control_socket or default_socket_path()) != self.control.path:
            self.log.warning("control_socket changed; it takes effect on the next start",
                             running=self.control.path)
        self.reloads += 1
        self.notifier.reloading()
        self.announced_ready = False
        if (new.log_level, new.log_format) != (self.config.log_level, self.config.log_format):
            logmod.configure(new.log_level, new.log_format)
            self.log = logmod.get()
        self.config = new
        now = self.clock()
        for name, pc in new.pools.items():
            pool = self.pools.get(name)
            if pool is None:
                self.pools[name] = Pool(pc)
                self.log.info("pool added", pool=name, processes=pc.processes)
                continue
            pool.removed = False
            for action in pool.roll(pc):
                self.retire(pool, action, now)
        for name, pool in self.pools.items():
            if name not in new.pools and not pool.removed:
                pool.remove()
                self.log.info("pool removed from the config; draining", pool=name)
        self.log.info("reloading: rolling every pool to new code and config", trigger=why,
                      pools={n: p.generation for n, p in self.pools.items() if not p.removed})
        if client is not None:
            client.waits_for = tuple(self.pools)
            self.waiting.append(client)
        self.debouncer.retime(new.watch_debounce)
        self.debouncer.pending = None  # this reload rolls every pool: nothing left to apply
        for sink in self.sinks.values():
            sink.close()  # reopened with the new log_file settings on the next line
        self.sinks.clear()
        self.update_watch_spec()
        self.check_fd_limits()
        return True

    def roll_pool(self, pool: Pool, why: str) -> None:
        """Roll one pool to a new generation with its current config (new code)."""
        now = self.clock()
        for action in pool.roll():
            self.retire(pool, action, now)
        self.log.info("rolling pool to a new generation", pool=pool.name, trigger=why,
                      generation=pool.generation)

    def restart_pool(self, pool: Pool, client: _Client) -> None:
        self.roll_pool(pool, why="gearvisor restart")
        client.waits_for = (pool.name,)
        self.waiting.append(client)

    # -- file watching --------------------------------------------------------------------------

    def check_fd_limits(self) -> None:
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        soft = soft if soft != resource.RLIM_INFINITY else 1 << 20
        for warning in fd_warnings([(p.name, p.desired, len(p.config.servers),
                                     p.config.rlimit_nofile) for p in self.pools.values()],
                                   soft):
            self.log.warning("open-files limit is close", problem=warning)

    def _log_watch_notes(self) -> None:
        for note in self.watcher.spec.notes:
            self.log.warning("not watched", note=note)

    def update_watch_spec(self) -> None:
        """After a reload: a changed watch list restarts the helper on the new one."""
        spec = build_spec(self.config, sys.path)
        w = self.watcher
        if spec == w.spec:
            return
        w.spec = spec
        self._log_watch_notes()
        w.restart_at = 0.0  # in backoff: start on the new list now
        if w.pid is not None:
            w.replacing = True
            self.log.info("watch list changed; restarting the file watcher", watcher_pid=w.pid)
            self._signal_watcher(signal.SIGTERM)

    def _signal_watcher(self, sig: int) -> None:
        if self.watcher.pid is not None:
            try:
                os.kill(self.watcher.pid, sig)
            except ProcessLookupError:
                pass  # reap() collects it

    def manage_watcher(self, now: float) -> None:
        w = self.watcher
        if w.pid is not None or w.spec.empty or now < w.restart_at:
            return
        spec = w.spec

        def body(fd: int, blocked: set[int]) -> NoReturn:
            run_watcher(spec, fd, self.pid, blocked)

        try:
            w.pid, w.event_fd = self._fork(body)
        except OSError as e:
            w.restart_at = now + w.backoff.failure(now, now)
            self.log.error("fork of the file watcher failed", error=str(e))
            return
        w.started_at = now
        w.paths, w.missing, w.buf = [], [], bytearray()
        self.sel.register(w.event_fd, selectors.EVENT_READ, ("watcher",))

    def _read_watcher(self) -> bool:
        """Handle what the watcher's pipe holds; False at end of file."""
        w = self.watcher
        lines = _read_lines(w.event_fd, w.buf)
        if lines is None:
            self.sel.unregister(w.event_fd)
            os.close(w.event_fd)
            w.event_fd = -1
            return False
        for line in lines:
            try:
                event = json.loads(line)
            except ValueError:
                continue
            self.handle_watch_event(event)
        return True

    def handle_watch_event(self, event: dict) -> None:
        w = self.watcher
        kind = event.get("event")
        if kind == "watching":
            seen = (w.paths, w.missing, w.polling)
            w.paths, w.missing = list(event["paths"]), list(event["missing"])
            w.polling = bool(event["polling"])
            if seen == (w.paths, w.missing, w.polling):
                return  # re-watching the same paths after a symlink swap
            self.log.info("watching files", watcher_pid=w.pid, paths=w.paths,
                          polling=w.polling)
            if w.missing:
                self.log.warning("watched path does not exist; it is checked again every "
                                 "second and watched once it appears", missing=w.missing)
        elif kind == "changed":
            now = self.clock()
            w.last_change = now
            pools = {p for p in event["pools"] if p in self.pools}
            self.debouncer.add(pools, bool(event["config"]), list(event["files"]), now,
                               count=int(event.get("count", 0)))
            self.log.info("files changed; rolling once they are quiet", pools=sorted(pools),
                          config=bool(event["config"]), files=event["count"],
                          sample=event["files"], why=event.get("why"),
                          quiet_period=self.debouncer.quiet)
        elif kind == "error":
            w.error = str(event.get("message"))
            self.log.error("file watcher problem; the fleet keeps running", error=w.error)

    def on_watcher_exit(self, status: int) -> None:
        w = self.watcher
        while w.event_fd >= 0 and self._read_watcher():
            pass
        now = self.clock()
        w.pid = None
        if self.stopping:
            return
        if w.replacing:
            w.replacing = False
            w.restart_at = now
            return
        delay = w.backoff.failure(w.started_at, now)
        w.restarts += 1
        w.restart_at = now + delay
        level = self.log.error if w.backoff.failures <= 3 else self.log.debug
        level("file watcher died; restarting it with backoff (the fleet keeps running)",
              status=describe_status(status)[2], retry_in=round(delay, 3), error=w.error,
              streak=w.backoff.failures)

    def apply_file_changes(self, now: float) -> None:
        """Roll what the debounced changes touched: the config file means a reload (the same
        path as `gearvisor reload`); code means only the pools whose globs matched."""
        batch = self.debouncer.pop(now)
        if batch is None:
            return
        if batch.config and self.reload(why="config file changed"):
            return  # a reload rolls every pool
        if batch.config and batch.pools:
            self.log.warning("rolling the pools whose code changed with their old config",
                             pools=sorted(batch.pools))
        for name in sorted(batch.pools):
            pool = self.pools.get(name)
            if pool is not None and not pool.removed:
                self.roll_pool(pool, why=f"{batch.files} watched file(s) changed, e.g. "
                                         f"{', '.join(batch.sample[:3])}")

    def report_progress(self) -> None:
        """Answer reload/restart requests whose rolls have finished (or halted), and tell
        systemd READY=1 once start-up or a reload has settled."""
        if not self.announced_ready and all(
                p.settled() and p.progress()[0] for p in self.pools.values() if not p.removed):
            self.announced_ready = True
            self.notifier.ready(summary(self))
            self.log.info("all pools ready" if not self.reloads else "reload finished",
                          children=len(self.children))
        for client in list(self.waiting):
            results = {}
            for name in client.waits_for:
                pool = self.pools.get(name)
                if pool is None:
                    results[name] = {"result": "removed"}
                    continue
                finished, problem = pool.progress()
                if not finished:
                    break
                results[name] = {"generation": pool.generation,
                                 "result": "removed" if pool.removed else (problem or "ok")}
                if problem:
                    results[name]["error"] = problem
            else:
                self.waiting.remove(client)
                ok = not any("error" in r for r in results.values())
                self.reply(client, {"ok": ok, "pools": results})

    # -- control socket -------------------------------------------------------------------------

    def accept_control(self) -> None:
        while True:
            accepted = self.control.accept()
            if accepted is None:
                return
            sock, uid = accepted
            if not self.control.allowed(uid):
                self.log.warning("control connection refused", peer_uid=uid)
                send_reply(sock, {"ok": False, "error": f"uid {uid} may not control this "
                                  "master; run as its user or root"})
                continue
            client = _Client(sock)
            self.sel.register(sock, selectors.EVENT_READ, ("client", client))

    def read_control(self, client: _Client) -> None:
        try:
            data = client.sock.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        client.buf += data
        if not data or len(client.buf) > MAX_REQUEST:
            self._drop_client(client)
            return
        if b"\n" not in client.buf:
            return
        self.sel.unregister(client.sock)
        try:
            request = json.loads(bytes(client.buf).partition(b"\n")[0])
            if not isinstance(request, dict):
                raise ValueError("not an object")
        except ValueError as e:
            self.reply(client, {"ok": False, "error": f"unreadable request: {e}"})
            return
        self.handle_request(client, request)

    def _drop_client(self, client: _Client) -> None:
        try:
            self.sel.unregister(client.sock)
        except (KeyError, ValueError):
            pass
        client.sock.close()

    def reply(self, client: _Client, body: dict) -> None:
        send_reply(client.sock, body)

    def handle_request(self, client: _Client, request: dict) -> None:
        verb = str(request.get("verb", ""))
        client.verb = verb
        if self.stopping and verb != "status":
            self.reply(client, {"ok": False, "error": "the master is stopping"})
            return
        if verb == "status":
            self.reply(client, {"ok": True, "status": fleet_status(self, self.clock())})
        elif verb == "reload":
            self.reload(why="gearvisor reload", client=client)
        elif verb == "stop":
            self.reply(client, {"ok": True, "pid": self.pid})
            self.stop(fast=False, why="gearvisor stop")
        elif verb in ("restart", "scale"):
            name = str(request.get("pool", ""))
            pool = self.pools.get(name)
            if pool is None or pool.removed:
                known = ", ".join(sorted(n for n, p in self.pools.items() if not p.removed))
                self.reply(client, {"ok": False, "error": f"no pool named {name!r}; pools: "
                                                          f"{known or '(none)'}"})
            elif verb == "restart":
                self.restart_pool(pool, client)
            else:
                self.scale(pool, request.get("processes"), client)
        else:
            self.reply(client, {"ok": False, "error": f"unknown request {verb!r}; expected "
                                "status, reload, stop, restart or scale"})

    def scale(self, pool: Pool, processes: Any, client: _Client) -> None:
        if not isinstance(processes, int) or isinstance(processes, bool) or processes < 0:
            self.reply(client, {"ok": False, "error": f"scale {pool.name}: expected a whole "
                                f"number >= 0, got {processes!r}"})
            return
        before = pool.desired
        pool.scaled_to = processes
        self.log.info("scaling pool", pool=pool.name, before=before, after=processes,
                      note="until the next reload that changes its processes")
        self.reply(client, {"ok": True, "pool": pool.name, "before": before,
                            "after": processes})

    # -- systemd --------------------------------------------------------------------------------

    def tick_systemd(self, now: float) -> None:
        if not self.notifier.enabled:
            return
        self.notifier.status(summary(self))
        if self.notifier.watchdog_interval and now >= self.next_watchdog:
            self.notifier.watchdog()
            self.next_watchdog = now + self.notifier.watchdog_interval

    # -- stopping -------------------------------------------------------------------------------

    def stop(self, fast: bool, why: str) -> None:
        """Graceful: children finish their current job (up to graceful_timeout), then SIGKILL.
        Fast: SIGQUIT now, SIGKILL after QUIT_TIMEOUT."""
        now = self.clock()
        if not self.stopping:
            self.notifier.stopping()
            for client in self.waiting:
                self.reply(client, {"ok": False, "error": f"the master is stopping ({why})"})
            self.waiting.clear()
        if fast:
            if self.stopping == "fast":
                return
            self.stopping = "fast"
            self.stop_deadline = now + QUIT_TIMEOUT
            self.log.info("fast stop", signal=why, children=len(self.children))
            self._signal_watcher(signal.SIGTERM)
            for pid in list(self.children):
                self.kill_child(pid, signal.SIGQUIT, now, force=True)
            return
        if self.stopping:
            return
        self.stopping = "graceful"
        timeout = max((p.config.graceful_timeout for p in self.pools.values()), default=0.0)
        self.stop_deadline = now + timeout
        self.log.info("graceful stop: children finish their current job", signal=why,
                      children=len(self.children), graceful_timeout=timeout)
        for pid, (_, pool) in list(self.children.items()):
            self.kill_child(pid, signal.Signals[pool.config.stop_signal]
                            if pool.config.command is not None else signal.SIGTERM, now)
        self._signal_watcher(signal.SIGTERM)

    def kill_child(self, pid: int, sig: int, now: float, graceful_timeout: float | None = None,
                   force: bool = False) -> None:
        """Ask a child to stop. A child already draining is not asked again (it is finishing
        a job; a second graceful signal would only restart its own alarm) unless `force`."""
        entry = self.children.get(pid)
        if entry is None:
            return
        child = entry[0]
        if child.state is ChildState.DRAINING and not force:
            return
        if child.state in (ChildState.STARTING, ChildState.READY):
            child.transition(ChildState.DRAINING)  # STARTING/READY -> DRAINING
        if child.stop_requested_at is None:
            child.stop_requested_at = now
        if graceful_timeout is not None:
            child.kill_at = now + graceful_timeout
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass  # already dead; reap() will collect it

    def _killing(self, child: Child) -> None:
        """We SIGKILL a child for running out of time on a stop: whatever job it runs is no
        strike against that job (the hard job timeout is the one that counts)."""
        if child.killed_for != "timeout":
            child.master_killed = True
            self.running.forget(child.running_index)

    def murder_children(self) -> None:
        """SIGKILL every child still alive past the stop deadline."""
        for pid, (child, _) in list(self.children.items()):
            self.log.warning("child did not stop in time; killing", pool=child.pool,
                             slot=child.slot, child_pid=pid)
            self._killing(child)
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self._signal_watcher(signal.SIGKILL)
        self.stop_deadline = self.clock() + 5.0  # reap and log again if something is stuck

    def close(self) -> None:
        signal.set_wakeup_fd(-1)
        for client in self.waiting:
            client.sock.close()
        self.control.close()
        self.sel.close()
        self.poison.close()
        self.running.close()


def _read_lines(fd: int, buf: bytearray) -> list[bytes] | None:
    """Read what a child's event pipe holds into `buf` and take out the complete lines;
    None once it reached end of file (or failed)."""
    try:
        data = os.read(fd, 65536)
    except BlockingIOError:
        return []
    except OSError:
        return None
    if not data:
        return None
    buf += data
    lines = []
    while (end := buf.find(b"\n")) >= 0:
        lines.append(bytes(buf[:end]))
        del buf[:end + 1]
    return lines


def run(config: Config) -> int:
    """Entry point of `gearvisor -c FILE`."""
    logmod.configure(config.log_level, config.log_format)
    arbiter = Arbiter(config)
    try:
        return arbiter.run()
    finally:
        arbiter.close()
        sys.stderr.flush()
