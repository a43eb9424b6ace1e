"""Everything a child does after fork(): reset process state, import user code, run jobs.

User code is imported here, after fork, never in the master: a restarted or rolled child
always loads the code that is on disk now.
"""

from __future__ import annotations

import importlib
import inspect
import json
import math
import os
import resource
import signal
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any, NoReturn

from setproctitle import setproctitle

from . import log as logmod
from .config import Config, PoolConfig
from .gearman.worker import Hooks, Keepalive, Worker
from .job import Job
from .process import (
    EXIT_BOOT_ERROR,
    EXIT_CRASH,
    EXIT_OK,
    EXIT_ORPHANED,
    close_fds_except,
    set_pdeathsig,
)
from .scoreboard import Scoreboard

GRACEFUL_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


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
    """Reports readiness to the master, keeps the process title and the scoreboard current."""

    def __init__(self, pool: str, slot: int, event_fd: int, board: Scoreboard) -> None:
        self.prefix = f"gearvisor: {pool}[{slot}]"
        self.event_fd = event_fd
        self.board = board
        self.done = 0
        self.failed = 0
        self.stopping = False

    def ready(self) -> None:
        send_event(self.event_fd, {"event": "ready"})
        self._idle()

    def _idle(self) -> None:
        setproctitle(f"{self.prefix} {'draining' if self.stopping else 'idle'}")

    def job_started(self, job: Job) -> None:
        self.board.job_started(job.function, job.handle, job.unique, time.monotonic())
        setproctitle(f"{self.prefix} busy {job.function} {job.handle}")

    def job_finished(self, job: Job, ok: bool, seconds: float) -> None:
        if ok:
            self.done += 1
        else:
            self.failed += 1
        self.board.job_finished(ok)
        self._idle()


def send_event(fd: int, event: dict) -> None:
    """One JSON line to the master. Never blocks: a full pipe drops the event."""
    try:
        os.write(fd, json.dumps(event).encode() + b"\n")
    except (BlockingIOError, BrokenPipeError, OSError):
        pass


def _switch_user(pool: PoolConfig) -> None:
    import grp
    import pwd

    if not pool.user and not pool.group:
        return
    pw = None
    if pool.user:
        pw = pwd.getpwuid(int(pool.user)) if pool.user.isdigit() else pwd.getpwnam(pool.user)
    if pool.group:
        gid = int(pool.group) if pool.group.isdigit() else grp.getgrnam(pool.group).gr_gid
    else:
        gid = pw.pw_gid if pw else os.getgid()
    os.setgroups([gid])
    os.setgid(gid)
    if pw:
        os.initgroups(pw.pw_name, gid)
        os.setuid(pw.pw_uid)
        os.environ.update(HOME=pw.pw_dir, USER=pw.pw_name, LOGNAME=pw.pw_name)


def _setup_process(pool: PoolConfig, slot: int, keep_fds: set[int]) -> None:
    close_fds_except(keep_fds)
    if pool.rlimit_nofile:
        _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if os.geteuid() == 0:
            hard = max(hard, pool.rlimit_nofile)
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(pool.rlimit_nofile, hard), hard))
    os.chdir(pool.cwd)
    os.environ.update(pool.env)
    os.environ["GEARVISOR_POOL"] = pool.name
    os.environ["GEARVISOR_SLOT"] = str(slot)
    _switch_user(pool)


def run_child(cfg: Config, pool: PoolConfig, slot: int, generation: int, event_fd: int,
              master_pid: int, signals_to_unblock: set[int], board: Scoreboard) -> NoReturn:
    """The body of a forked child. Never returns: always ends in os._exit()."""
    code = EXIT_CRASH
    logger: Any = None
    try:
        code, logger = _child_main(cfg, pool, slot, generation, event_fd, master_pid,
                                   signals_to_unblock, board)
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
                master_pid: int, signals_to_unblock: set[int],
                board: Scoreboard) -> tuple[int, Any]:
    # Default dispositions first, while signals are still blocked (they were blocked around
    # fork, so nothing the master set can run here).
    for sig in signals_to_unblock:
        signal.signal(sig, signal.SIG_DFL)
    signal.set_wakeup_fd(-1)
    set_pdeathsig(signal.SIGTERM)
    setproctitle(f"gearvisor: {pool.name}[{slot}] starting")
    logmod.configure(pool.log_level, pool.log_format)
    logger = logmod.get(pool=pool.name, slot=slot, generation=generation)

    worker: Worker | None = None
    hooks: _ChildHooks | None = None
    stop_requested = False

    def graceful(signum: int, _frame: Any) -> None:
        # Record only; the loop acts. alarm() is a backstop so a job that ignores the stop
        # still ends, even when the master is gone and cannot SIGKILL us.
        nonlocal stop_requested
        stop_requested = True
        if worker is not None:
            worker.stop()
        if hooks is not None and not hooks.stopping:
            hooks.stopping = True
            if not board.read().busy:
                hooks._idle()
        signal.alarm(max(1, math.ceil(pool.graceful_timeout)) + 1)

    def fast(signum: int, _frame: Any) -> None:
        os._exit(EXIT_OK)

    for sig in GRACEFUL_SIGNALS:
        signal.signal(sig, graceful)
    signal.signal(signal.SIGQUIT, fast)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, signals_to_unblock)
    if os.getppid() != master_pid:
        return EXIT_ORPHANED, logger

    _setup_process(pool, slot, {event_fd})
    for p in reversed(cfg.pythonpath):
        if p not in sys.path:
            sys.path.insert(0, p)
    try:
        functions = load_functions(pool.functions)
    except BootError as e:
        send_event(event_fd, {"event": "boot_error", "reason": str(e)})
        return EXIT_BOOT_ERROR, logger

    hooks = _ChildHooks(pool.name, slot, event_fd, board)
    ka = pool.keepalive
    worker = Worker(
        servers=[(s.host, s.port) for s in pool.servers],
        functions=functions,
        client_id=f"{pool.client_id_prefix}:{pool.name}:{slot}",
        log=logger,
        hooks=hooks,
        connect_timeout=pool.connect_timeout,
        reconnect_max_delay=pool.reconnect_max_delay,
        keepalive=Keepalive(ka.idle, ka.interval, ka.count),
        exception_packet=pool.exception_packet,
    )
    signal.set_wakeup_fd(worker.wakeup_fd, warn_on_full_buffer=False)
    if stop_requested:
        worker.stop()

    def check_parent() -> None:
        if os.getppid() != master_pid and not worker.stopping:
            logger.warning("master went away; finishing the current job and exiting")
            graceful(signal.SIGTERM, None)

    worker.every_tick(check_parent)
    logger.debug("child started", functions=sorted(functions))
    worker.run()
    logger.info("child exiting", jobs_done=hooks.done, jobs_failed=hooks.failed)
    return EXIT_OK, logger
