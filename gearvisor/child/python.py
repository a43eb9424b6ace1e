"""Everything a child does after fork(): reset process state, import user code, run jobs.

User code is imported here, after fork, never in the master: a restarted or rolled child
always loads the code that is on disk now.
"""

from __future__ import annotations

import importlib
import inspect
import math
import os
import resource
import signal
import socket
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any, NoReturn

from setproctitle import setproctitle

from gearvisor import log as logmod
from gearvisor import messages as msg
from gearvisor.child.journal import ChildJournal
from gearvisor.child.postfork import after_fork
from gearvisor.config import Config, PoolConfig
from gearvisor.gearman import addresses
from gearvisor.gearman.worker import Bell, Hooks, JobTimer, Keepalive, Lanes, Worker
from gearvisor.helpers.watcher import send_import_report
from gearvisor.job import Job, JobTimeout
from gearvisor.journal.record import retry_unique
from gearvisor.policy.backoff import ErrorWindow, jittered
from gearvisor.policy.child import (
    EXIT_BOOT_ERROR,
    EXIT_CRASH,
    EXIT_OK,
    EXIT_ORPHANED,
)
from gearvisor.shm.bell import Bell as PoolBell
from gearvisor.shm.lanes import LaneHints
from gearvisor.shm.poison import PoisonTable, RunningJobs, job_key, no_others
from gearvisor.shm.scoreboard import Scoreboard
from gearvisor.shm.stats import ERROR, POISON, SUCCESS, TIMEOUT

try:  # CPython: the handler as set, without signal.getsignal's enum lookup (checked per job)
    from _signal import getsignal as _getsignal
except ImportError:  # pragma: no cover - other interpreters
    _getsignal = signal.getsignal

GRACEFUL_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
JOURNAL_EXIT_WAIT = 1.0  # seconds an exiting child waits for room for its journal records
PARENT_CHECK = 1.0  # seconds between getppid() looks, only where PDEATHSIG is not available
# A child that waits for work says "idle" in its title only after this long: each title change
# is a system call (prctl), and jobs that come one at a time would pay two per job for a
# title that flips faster than anyone reads it.
IDLE_TITLE_DELAY = 0.1
_NEVER = float("inf")  # (a deadline that never comes)


class BootError(Exception):
    """The pool's functions cannot be loaded; the text is the reason shown to the operator."""


def load_functions(functions: dict[str, str]) -> dict[str, Callable[[Job], Any]]:
    """Import each "module:attr" and check it can be called with one argument (the job)."""
    loaded = {}
    for name, target in functions.items():
        module_name, _, attr = target.partition(":")
        try:
            obj: Any = importlib.import_module(module_name)
        except Exception as e:
            tb = traceback.format_exception_only(e)[-1].strip()
            raise BootError(f"function {name}: cannot import module {module_name!r}: {tb}") from e
        for part in attr.split("."):
            try:
                obj = getattr(obj, part)
            except AttributeError:
                raise BootError(f"function {name}: module {module_name!r} has no attribute "
                                f"{attr!r}") from None
        if not callable(obj):
            raise BootError(f"function {name}: {target} is a {type(obj).__name__}, not callable")
        try:
            inspect.signature(obj).bind(None)
        except TypeError:
            raise BootError(f"function {name}: {target} must accept exactly one argument "
                            f"(the job), e.g. def {attr.split('.')[-1]}(job): ...") from None
        except ValueError:
            pass  # builtins without a signature: let them try
        loaded[name] = obj
    return loaded


class _ChildHooks(Hooks):
    """Reports readiness to the master, keeps the process title and the scoreboard current,
    tracks the error rate (self-quarantine) and the recycling limits."""

    def __init__(self, pool: PoolConfig, slot: int, event_fd: int, board: Scoreboard,
                 probation: bool, log: Any, journal: ChildJournal | None = None) -> None:
        self.journal = journal  # None: journal.enabled is false
        # the current job's failure (job_failed, just before job_finished): (error, timed out)
        self.error: tuple[Exception, bool] | None = None
        # functions whose payload is copied to shared memory for a crash record
        self.copy_payload = ({f for f, mode in pool.failed_payload.items() if mode != "drop"}
                             if board.payload is not None else set())
        self.prefix = f"gearvisor: {pool.name}[{slot}]"
        self.title = ""
        self.busy_with = ""  # the function the title says the child is busy with
        self.idle_title_at = _NEVER  # when waiting() lets the title say idle
        self.timer: _AlarmTimer | None = None
        self.timer_warned = False
        self.set_running: Callable[[int], None] | None = None  # this child's running slot
        self.event_fd = event_fd
        self.report_imports = pool.watch != ()  # unless `watch: false`
        self.board = board
        self.log = log
        self.done = 0
        self.failed = 0
        self.stopping = False
        self.worker: Worker | None = None
        q = pool.quarantine
        self.window = ErrorWindow(q.window, q.min_jobs, q.ratio, q.fast,
                                  q.probation_jobs if probation else 0) if q.enabled else None
        self.quarantined: str | None = None
        self.probation = probation
        self.max_jobs = (max(1, round(jittered(pool.max_jobs, pool.recycle_jitter)))
                         if pool.max_jobs else None)
        self.max_memory = pool.max_memory
        self.recycling = False
        self.lanes: _BoardLanes | None = None
        self.asleep = False  # the lane hints' asleep byte, as last written

    def _send(self, message: msg.Message) -> None:
        """An event to the master, unless the rest of a journal line must go first and the
        pipe has no room for it (then the event is dropped, as with a full pipe)."""
        if self.journal is not None and self.journal.blocks_others() and \
                not self.journal.finish_tail():
            return
        send_event(self.event_fd, message)

    def ready(self) -> None:
        self._send(msg.Ready())
        self._idle()
        if self.report_imports and (self.journal is None
                                    or not self.journal.blocks_others()
                                    or self.journal.flush_before_exit(1.0)):
            # What this child imported, so the master watches the code it runs (the master
            # keeps the first report of each generation and ignores the others).
            send_import_report(self.event_fd)

    def _idle(self) -> None:
        state = ("draining" if self.stopping else "quarantined" if self.quarantined
                 else "paused" if self.worker is not None and self.worker._want_paused
                 else "idle")
        self._title(f"{self.prefix} {state}")

    def _title(self, text: str) -> None:
        if text != self.title:
            self.title = text
            self.busy_with = ""  # (job_started sets it after a busy title)
            setproctitle(text)

    def waiting(self) -> None:
        journal = self.journal
        if journal is not None and (journal.pending() or journal.tail):
            journal.flush()
        self.idle_title_at = time.monotonic() + IDLE_TITLE_DELAY
        if not self.asleep and self.lanes is not None:
            self.asleep = True
            self.lanes.sleeping(True)  # the master may hand this child a held job

    def idle_title(self) -> None:
        """The worker's check (every_tick): the title says idle once waiting lasted
        IDLE_TITLE_DELAY."""
        if time.monotonic() >= self.idle_title_at:
            self.idle_title_at = _NEVER
            if not self.board.busy():
                self._idle()

    def job_started(self, job: Job) -> None:
        self.idle_title_at = _NEVER
        if self.asleep:
            self.asleep = False
            self.lanes.sleeping(False)  # type: ignore[union-attr]
        timer = self.timer
        if timer is not None:
            timer.timed_out = False
        key = job.key or _key(job)  # (the poison check set it already: no call)
        if self.set_running is not None:
            self.set_running(key)  # before it runs: if it kills us
        board = self.board
        function = job.function
        if function in self.copy_payload:
            board.payload.job_started(job.data)  # type: ignore[union-attr]
        elif board.payload is not None:
            board.payload.clear()  # (failed_payload: drop)
        # A retry's unique as gearvisor submitted it, so a crash record has its attempt
        unique = (job.unique if job.retry_of is None
                  else retry_unique(job.retry_of, job.attempt, job.unique))
        board.job_started(function, job.handle, unique, time.monotonic(), len(job.data), key)
        if function != self.busy_with:  # (a queue drained back to back keeps one title)
            self._title(f"{self.prefix} busy {function}")
            self.busy_with = function

    def job_refused(self, job: Job) -> None:
        self._refused(job, ERROR)  # too big (or a function we do not serve: not counted)

    def job_poisoned(self, job: Job) -> None:
        self._refused(job, POISON)
        if self.journal is not None:
            self.journal.failure(job, "poison", 0.0, text="refused without running: it "
                                 "crashed or hung poison_after workers already")

    def job_failed(self, job: Job, error: Exception, timed_out: bool) -> None:
        self.error = (error, timed_out)

    def _refused(self, job: Job, outcome: int) -> None:
        self.failed += 1
        if self.board.payload is not None:
            self.board.payload.clear()  # (a crash now must not read the last job's payload)
        self.board.job_started(job.function, job.handle, job.unique, time.monotonic(),
                               len(job.data))
        self.board.job_finished(False)
        if self.board.stats is not None:
            self.board.stats.job_not_run(job.function, outcome)

    def job_finished(self, job: Job, ok: bool, seconds: float) -> None:
        """Before the result goes out: the job is no longer running (a crash from here on
        is not its fault), and the quarantine decision, which says whether a GRAB goes
        with the result."""
        if self.set_running is not None:
            self.set_running(0)
        if ok:
            self.done += 1
        else:
            self.failed += 1
        self.board.job_finished(ok)
        window = self.window
        if window is not None and not self.quarantined and not self.stopping:
            was_on_probation = window.probation_left > 0
            reason = window.record(ok, seconds)
            if reason:
                self.quarantine(reason)
            elif was_on_probation and not window.probation_left:
                self._send(msg.ProbationPassed())

    def job_answered(self, job: Job, ok: bool, seconds: float) -> None:
        """After the result went out: metrics, the journal's record, recycling limits, the
        timer check and the title."""
        error, self.error = self.error, None
        timer = self.timer
        board = self.board
        timed_out = not ok and (error[1] if error is not None
                                else timer is not None and timer.timed_out)
        if board.stats is not None:
            board.stats.job_done(job.function, SUCCESS if ok else TIMEOUT if timed_out
                                 else ERROR, seconds)
        if self.journal is not None:
            if ok:
                self.journal.success(job, seconds)
            else:
                self.journal.failure(job, "timeout" if timed_out else "error", seconds,
                                     error[0] if error is not None else None)
        if self.window is None and self.probation and ok:
            self.probation = False  # no error tracking (quarantine off): one good job will do
            self._send(msg.ProbationPassed())
        if self.max_jobs is not None or self.max_memory is not None:
            self._check_limits()
        if timer is not None and not self.timer_warned and not timer.installed():
            self.timer_warned = True
            self.log.warning("the job code replaced gearvisor's SIGALRM handler: soft job "
                             "timeouts and the graceful-stop backstop no longer work in this "
                             "child; use JobTimeout (function timeout:) instead of "
                             "signal.alarm", function=job.function)
        if self.stopping or self.quarantined:
            self._idle()  # (otherwise the title says idle once the worker waits for work)

    def quarantine(self, reason: str) -> None:
        """Stop taking jobs at once (RESET_ABILITIES everywhere) and tell the master."""
        self.quarantined = reason
        if self.worker is not None:
            self.worker.pause()
        self.log.warning("quarantined: failing fast; no more jobs taken", reason=reason,
                         jobs_failed=self.failed, jobs_done=self.done)
        self._send(msg.Quarantined(reason, self.failed, self.done))

    def _check_limits(self) -> None:
        if self.recycling or self.stopping:
            return
        why = None
        if self.max_jobs is not None and self.done + self.failed >= self.max_jobs:
            why = f"max_jobs: ran {self.done + self.failed} jobs (limit {self.max_jobs})"
        elif self.max_memory is not None:
            rss = _rss()
            if rss is not None and rss > self.max_memory:
                why = (f"max_memory: RSS {rss / 1048576:.0f} MiB over "
                       f"{self.max_memory / 1048576:.0f} MiB")
        if why:
            self.recycling = True
            self._send(msg.Recycle(why))


class _BoardLanes(Lanes):
    """Lanes through the scoreboard and the fleet's lane hints (shm/lanes.py). The held lane
    is recorded in the scoreboard, under its lock, for the master to close (master/lanes.py).
    A second lane takes no job while a sibling is asleep (it would take it at once). A child
    that falls asleep while a sibling holds a job, or that starts holding while a sibling is
    asleep, tells the master (Holding): it never looks otherwise."""

    def __init__(self, board: Scoreboard, hints: LaneHints, index: int, tag: int,
                 hooks: _ChildHooks) -> None:
        self.board = board
        self.hints = hints
        self.index = index
        self.tag = tag
        self.hooks = hooks
        self._set_holding = hints.holding_setter(index)  # (per job: one C call)
        self._others_asleep = hints.others_asleep_check(tag, index)  # (per job: one call)
        self._set_asleep = hints.asleep_setter(index)  # (per round trip: one C call)
        self._others_holding = hints.others_holding_check(tag, index)

    def allowed(self) -> bool:
        return not self.board.lanes_off() and not self._others_asleep()

    def holding(self, lanes: list[tuple[int, int]], now: float) -> None:
        self._set_holding(self.tag)
        self.board.hold(lanes, now)  # (its lock: the barrier between write and read)
        if self._others_asleep():
            self.hooks._send(msg.Holding())

    def released(self) -> int:
        closed = self.board.release()
        self._set_holding(0)
        return closed

    def sleeping(self, asleep: bool) -> None:
        """The child waits for work on every server (True), or takes a job."""
        self._set_asleep(self.tag if asleep else 0)
        if asleep:
            self.board.fence()
            if self._others_holding():
                self.hooks._send(msg.Holding())


class _ChildBell(Bell):
    """The pool generation's bell (shm/bell.py), and this child's bell byte in the fleet's
    hints, which the master reads when it reaps the child."""

    def __init__(self, bell: PoolBell, hints: LaneHints, index: int) -> None:
        self.fd = bell.fd
        self.fds = bell.fds
        self.take = bell.take  # type: ignore[method-assign]
        self.ring = bell.ring  # type: ignore[method-assign]
        self.heard = bell.heard  # type: ignore[method-assign]
        # hints.set_bell(index, state), bound once (twice per round trip: one C call)
        self.standing = hints.bell_setter(index)  # type: ignore[method-assign]


def _key(job: Job) -> int:
    if not job.key:
        job.key = job_key(job.function, job.unique, job.handle, job.data, job.server)
    return job.key


def _poison_check(poison: PoisonTable, running: RunningJobs | None, index: int,
                  after: int) -> Callable[[Job], bool]:
    """The worker's is_poison: have `after` children died on this job already (strikes the
    master recorded, plus children that died on it and are not reaped yet: their running
    slot still holds it)? Sets job.key and job.strikes. (Before every job: the tables'
    methods bound once, no closure made per job.)"""
    deaths = poison.deaths
    others = running.others if running is not None else no_others

    def is_poison(job: Job) -> bool:
        job.strikes = n = deaths(_key(job), others, index)
        return n >= after

    return is_poison


def _rss() -> int | None:
    """This process's resident set size, from /proc (no psutil call per job)."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * resource.getpagesize()
    except (OSError, ValueError, IndexError):
        return None


class _AlarmTimer(JobTimer):
    """SIGALRM serves two deadlines: a job's soft timeout (raise JobTimeout inside the job)
    and, once a stop was asked, the hard exit backstop for a job that ignores the stop even
    when the master is gone and cannot SIGKILL us."""

    def __init__(self) -> None:
        self.job_deadline: float | None = None
        self.exit_deadline: float | None = None
        self.held = False  # the runtime is writing to a server: do not raise now
        self.pending = False  # the timeout fired while held: raise on release
        self.timed_out = False  # JobTimeout was raised in the current job (its metrics)
        signal.signal(signal.SIGALRM, self._fire)

    def installed(self) -> bool:
        """Still the SIGALRM handler (job code may have installed its own)."""
        # _signal's getsignal: signal.getsignal wraps the answer in an enum (slow, per job).
        return _getsignal(signal.SIGALRM) == self._fire

    def hold(self) -> None:
        self.held = True

    def release(self) -> None:
        self.held = False
        if self.pending:
            self.pending = False
            if self.job_deadline is not None:
                self.job_deadline = None
                self._arm()
                self.timed_out = True
                raise JobTimeout("the job ran past its timeout")

    def start(self, seconds: float) -> None:
        self.job_deadline = time.monotonic() + seconds
        self._arm()

    def stop(self) -> None:
        self.job_deadline = None
        self.pending = False
        self._arm()

    def exit_in(self, seconds: float) -> None:
        self.exit_deadline = time.monotonic() + seconds
        self._arm()

    def _arm(self) -> None:
        deadlines = [d for d in (self.job_deadline, self.exit_deadline)
                     if d is not None]
        delay = max(0.001, min(deadlines) - time.monotonic()) if deadlines else 0.0
        signal.setitimer(signal.ITIMER_REAL, delay)

    def _fire(self, signum: int, _frame: Any) -> None:
        now = time.monotonic()
        if self.exit_deadline is not None and now >= self.exit_deadline:
            os._exit(EXIT_CRASH)
        if self.job_deadline is not None and now >= self.job_deadline:
            if self.held:
                self.pending = True  # mid-write: raise once the packet is out
                return
            self.job_deadline = None
            self._arm()
            self.timed_out = True
            raise JobTimeout("the job ran past its timeout")
        self._arm()


def send_event(fd: int, message: msg.Message) -> None:
    """One JSON line to the master. Never blocks: a full pipe drops the event."""
    try:
        os.write(fd, msg.encode(message))
    except (BlockingIOError, BrokenPipeError, OSError):
        pass


def run_child(cfg: Config, pool: PoolConfig, slot: int, generation: int, event_fd: int,
              master_pid: int, signals_to_unblock: set[int], board: Scoreboard,
              poison: PoisonTable | None = None, probation: bool = False,
              start_paused: bool = False, running: RunningJobs | None = None,
              running_index: int = -1, hints: LaneHints | None = None,
              tag: int = 0, bell: PoolBell | None = None) -> NoReturn:
    """The body of a forked child. Never returns: always ends in os._exit()."""
    code = EXIT_CRASH
    logger: Any = None
    try:
        code, logger = _child_main(cfg, pool, slot, generation, event_fd, master_pid,
                                   signals_to_unblock, board, poison, probation,
                                   start_paused, running, running_index, hints, tag, bell)
    except SystemExit as e:  # user code called sys.exit() at import time
        code = e.code if isinstance(e.code, int) else EXIT_CRASH
    except BaseException:
        try:
            (logger or logmod.get(pool=pool.name, slot=slot)).critical(
                "child runtime failed", exc_info=True)
        except Exception:
            traceback.print_exc()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def _child_main(cfg: Config, pool: PoolConfig, slot: int, generation: int, event_fd: int,
                master_pid: int, signals_to_unblock: set[int], board: Scoreboard,
                poison: PoisonTable | None, probation: bool,
                start_paused: bool = False, running: RunningJobs | None = None,
                running_index: int = -1, hints: LaneHints | None = None,
                tag: int = 0, bell: PoolBell | None = None) -> tuple[int, Any]:
    # Default dispositions first, while signals are still blocked (they were blocked around
    # fork, so nothing the master set can run here); then the pool's cwd, limits, env, user.
    # The pool's bell (wake_one), and this child's standing with it in the fleet's hints
    child_bell = (_ChildBell(bell, hints, running_index)
                  if bell is not None and hints is not None else None)
    keep = {event_fd} if child_bell is None else {event_fd, *child_bell.fds}
    watched = after_fork(signals_to_unblock, signal.SIGTERM, keep, pool,
                         env={"GEARVISOR_POOL": pool.name, "GEARVISOR_SLOT": str(slot)})
    setproctitle(f"gearvisor: {pool.name}[{slot}] starting")
    logmod.configure(pool.log_level, pool.log_format)
    logger = logmod.get(pool=pool.name, slot=slot, generation=generation)

    worker: Worker | None = None
    hooks: _ChildHooks | None = None
    stop_requested = False
    timer = _AlarmTimer()

    def graceful(signum: int, _frame: Any) -> None:
        # Record only; the loop acts. alarm() is a backstop so a job that ignores the stop
        # still ends, even when the master is gone and cannot SIGKILL us.
        nonlocal stop_requested
        stop_requested = True
        if worker is not None:
            worker.stop()
        if hooks is not None and not hooks.stopping:
            hooks.stopping = True
            if not board.busy():
                hooks._idle()
        timer.exit_in(max(1, math.ceil(pool.graceful_timeout)) + 1)

    def fast(signum: int, _frame: Any) -> None:
        os._exit(EXIT_OK)

    def pause(signum: int, _frame: Any) -> None:
        # SIGUSR1 (or SIGUSR2): the master changed the wanted state in the scoreboard's
        # control byte (circuit open: take no jobs). Signals may arrive out of order; the
        # byte is the truth.
        if worker is not None and (hooks is None or not hooks.quarantined):
            worker.pause() if board.paused_wanted() else worker.resume()
            if hooks is not None and not board.busy():
                hooks._idle()

    for sig in GRACEFUL_SIGNALS:
        signal.signal(sig, graceful)
    signal.signal(signal.SIGQUIT, fast)
    signal.signal(signal.SIGUSR1, pause)
    signal.signal(signal.SIGUSR2, pause)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, signals_to_unblock)
    # PR_SET_PDEATHSIG (after_fork) sends SIGTERM once the master dies; this one look
    # catches a master that died before it was set (after the last credential change).
    if os.getppid() != master_pid:
        return EXIT_ORPHANED, logger

    for p in reversed(cfg.pythonpath):
        if p not in sys.path:
            sys.path.insert(0, p)
    try:
        functions = load_functions(pool.functions)
    except BootError as e:
        send_event(event_fd, msg.BootError(str(e)))
        return EXIT_BOOT_ERROR, logger

    journal = (ChildJournal(cfg.journal, pool, slot, generation, socket.gethostname(),
                            event_fd) if cfg.journal.enabled else None)
    hooks = _ChildHooks(pool, slot, event_fd, board, probation, logger, journal)
    hooks.set_running = running.setter(running_index) if running is not None else None
    if board.lock is not None and hints is not None and running_index >= 0:
        hooks.lanes = _BoardLanes(board, hints, running_index, tag, hooks)
    if running is not None:
        running.claim(running_index, os.getpid())
    ka = pool.keepalive
    worker = Worker(
        servers=[(s.host, s.port) for s in pool.servers],
        addresses=addresses.known(),  # the master's lookups: no wait while DNS hangs
        functions=functions,
        client_id=f"{pool.client_id_prefix}:{pool.name}:{slot}",
        log=logger,
        hooks=hooks,
        connect_timeout=pool.connect_timeout,
        reconnect_max_delay=pool.reconnect_max_delay,
        keepalive=Keepalive(ka.idle, ka.interval, ka.count),
        exception_packet=pool.exception_packet,
        timeouts=pool.timeouts,
        timer=timer,
        prefetch=pool.prefetch,
        max_job_size=pool.max_job_size,
        lanes=hooks.lanes,
        bell=child_bell,
        is_poison=(None if poison is None or not pool.poison_after else
                   _poison_check(poison, running, running_index, pool.poison_after)),
    )
    hooks.worker = worker
    hooks.timer = timer
    if start_paused or board.paused_wanted():
        worker.pause()  # the pool's circuit is open: register, take nothing until told
    signal.set_wakeup_fd(worker.wakeup_fd, warn_on_full_buffer=False)
    if stop_requested:
        worker.stop()

    if not watched:
        # No PR_SET_PDEATHSIG (not Linux): nothing would wake an idle child whose master
        # died, so it looks once every PARENT_CHECK. With it, the signal is the check.
        next_check = time.monotonic() + PARENT_CHECK

        def check_parent() -> None:
            nonlocal next_check
            now = time.monotonic()
            if now < next_check:
                return
            next_check = now + PARENT_CHECK
            if os.getppid() != master_pid and not worker.stopping:
                logger.warning("master went away; finishing the current job and exiting")
                graceful(signal.SIGTERM, None)

        worker.every_tick(check_parent, due=lambda: next_check)
    worker.every_tick(hooks.idle_title, due=lambda: hooks.idle_title_at)
    if journal is not None:
        worker.every_tick(journal.tick, due=journal.due_at)
    logger.debug("child started", functions=sorted(functions))
    worker.run()
    if journal is not None:
        journal.flush_before_exit(JOURNAL_EXIT_WAIT)
        if journal.dropped_successes or journal.dropped_failures or journal.pending():
            logger.warning("journal records lost: the event pipe had no room for them",
                           successes=journal.dropped_successes,
                           failures=journal.dropped_failures, unwritten=journal.pending())
    logger.info("child exiting", jobs_done=hooks.done, jobs_failed=hooks.failed)
    return EXIT_OK, logger
