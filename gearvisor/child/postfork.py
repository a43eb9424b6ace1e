"""The one post-fork setup, shared by Python children, command children and helpers.

Right after fork the new process still has the master's signal handlers (blocked), its
wakeup fd, its fds, its cwd, limits, user and environment. `after_fork` resets what every
forked process must reset, then applies what a pool asks for. Each piece is done here only,
so a Python pool gets the same `rlimits`, `umask`, `cwd`, `env` and user as a command pool.
"""

from __future__ import annotations

import ctypes
import os
import resource
import signal
from collections.abc import Callable, Iterable
from typing import Any, NoReturn

from gearvisor.config import PoolConfig

# What exec'd programs expect at their defaults (Python itself ignores SIGPIPE).
EXEC_DEFAULT_SIGNALS = (signal.SIGPIPE, signal.SIGUSR1, signal.SIGUSR2, signal.SIGALRM)

PR_SET_PDEATHSIG = 1


def prctl(option: int, value: int) -> bool:
    """prctl(2) with one argument; False where it failed or there is no prctl (not Linux)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(option, value, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False  # not Linux


def set_pdeathsig(sig: int) -> bool:
    """Ask Linux to send `sig` to this process when its parent (the master) dies. False
    where that is not possible (not Linux): the caller must then look at getppid() itself."""
    return prctl(PR_SET_PDEATHSIG, int(sig))


def close_fds_except(keep_fds: set[int]) -> None:
    """After fork: drop every fd inherited from the master (other children's pipes, the
    master's selector and sockets) but stdio and `keep_fds`."""
    top = max(keep_fds)
    os.closerange(3, min(keep_fds))
    for fd in range(min(keep_fds) + 1, top):
        if fd not in keep_fds:
            try:
                os.close(fd)
            except OSError:
                pass
    os.closerange(top + 1, 65536)


def after_fork(masters_signals: Iterable[int], pdeathsig: int, keep_fds: set[int],
               pool: PoolConfig | None = None, env: dict[str, str] | None = None,
               stdio: tuple[int, int] | None = None, for_exec: bool = False) -> bool:
    """Make a freshly forked process stand on its own. True when the kernel will signal it
    (`pdeathsig`) if the master dies; False where it cannot (the caller must check).

    Args:
        masters_signals: the signals the master handles (still blocked): back to SIG_DFL,
            so no handler of the master can run here. The caller unblocks them once its own
            handlers are set.
        pdeathsig: sent to this process when the master dies (survives exec).
        keep_fds: fds to keep besides stdio (the event pipe); every other one is closed.
        pool: the pool's cwd, umask, rlimits (and rlimit_nofile), env and user/group.
        env: more environment variables (GEARVISOR_POOL, ...), set after the pool's.
        stdio: (stdout, stderr) to dup2 onto 1 and 2, non-blocking; stdin becomes
            /dev/null (a command child).
        for_exec: also reset SIGPIPE, SIGUSR1, SIGUSR2 and SIGALRM, as an exec'd program
            expects.
    """
    for sig in masters_signals:
        signal.signal(sig, signal.SIG_DFL)
    if for_exec:
        for sig in EXEC_DEFAULT_SIGNALS:
            signal.signal(sig, signal.SIG_DFL)
    signal.set_wakeup_fd(-1)
    armed = set_pdeathsig(pdeathsig)
    if stdio is not None:
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(stdio[0], 1)
        os.dup2(stdio[1], 2)
        for fd in (1, 2):
            os.set_blocking(fd, False)  # never block the worker on its own output
    close_fds_except(keep_fds)
    if pool is None:
        return armed
    os.chdir(pool.cwd)
    if pool.umask is not None:
        os.umask(pool.umask)
    set_rlimits(pool)
    os.environ.update(pool.env)
    os.environ.update(env or {})
    if switch_user(pool):
        # A new user or group clears PR_SET_PDEATHSIG (prctl(2)): without this, the child
        # of a pool with `user:` would outlive its master. (A master that died between the
        # switch and here is caught by the caller's getppid() check.)
        armed = set_pdeathsig(pdeathsig)
    return armed


def set_rlimits(pool: PoolConfig) -> None:
    """The pool's soft limits (`rlimits`, and `rlimit_nofile` for nofile). As root the hard
    limit is raised to fit; otherwise a soft limit is capped at the hard one."""
    limits = dict(pool.rlimits)
    if pool.rlimit_nofile:
        limits.setdefault("nofile", pool.rlimit_nofile)
    for name, soft in limits.items():
        which = getattr(resource, f"RLIMIT_{name.upper()}")
        _, hard = resource.getrlimit(which)
        if os.geteuid() == 0 and hard != resource.RLIM_INFINITY and (
                soft == resource.RLIM_INFINITY or soft > hard):
            hard = soft
        elif hard != resource.RLIM_INFINITY and (soft == resource.RLIM_INFINITY or soft > hard):
            soft = hard
        resource.setrlimit(which, (soft, hard))


def switch_user(pool: PoolConfig) -> bool:
    """Become the pool's user and group (the master is root: config checked that), with the
    user's HOME, USER and LOGNAME. True when the credentials changed (which clears
    PR_SET_PDEATHSIG)."""
    import grp
    import pwd

    if not pool.user and not pool.group:
        return False
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
    return True


def start_helper(title: str, signals_to_unblock: set[int], fds: set[int]) -> None:
    """How every helper process (the file watcher, the alert notifier) starts: the one
    post-fork setup (SIGTERM when the master dies), its pipes `fds` blocking, its process
    title, then the master's signals unblocked."""
    after_fork(signals_to_unblock, signal.SIGTERM, fds)
    for fd in fds:
        os.set_blocking(fd, True)
    from setproctitle import setproctitle

    setproctitle(title)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, signals_to_unblock)


def run_helper(title: str, signals_to_unblock: set[int], fds: set[int],
               serve: Callable[[], int],
               on_error: Callable[[BaseException], None] | None = None) -> NoReturn:
    """The body of every helper process: start_helper, then `serve()`'s return value is the
    exit code. A gone master (EPIPE on a pipe) exits EXIT_ORPHANED; anything else that
    escapes is shown (`on_error`, or the traceback on stderr) and exits EXIT_CRASH, so the
    master restarts it with backoff. Never returns."""
    import traceback

    from gearvisor.policy.child import EXIT_CRASH, EXIT_ORPHANED

    code = EXIT_CRASH
    try:
        start_helper(title, signals_to_unblock, fds)
        code = serve()
    except BrokenPipeError:
        code = EXIT_ORPHANED
    except BaseException as e:
        try:
            if on_error is not None:
                on_error(e)
            else:
                traceback.print_exc()
        except OSError:
            pass
    finally:
        os._exit(code)


def message_writer(fd: int, threadsafe: bool = False) -> Callable[[Any], None]:
    """A helper's report(message): one whole line per message on `fd` (blocking: the master
    reads its pipes all the time), under a lock when threads share it. A gone master
    (EPIPE) ends the helper as orphaned."""
    import threading

    from gearvisor import messages as msg
    from gearvisor.policy.child import EXIT_ORPHANED

    lock = threading.Lock() if threadsafe else None

    def write(data: bytes) -> None:
        try:
            while data:
                data = data[os.write(fd, data):]
        except BrokenPipeError:
            os._exit(EXIT_ORPHANED)

    def report(message: Any) -> None:
        data = msg.encode(message)
        if lock is None:
            write(data)
        else:
            with lock:
                write(data)

    return report
