"""The master's one door to the OS for processes: fork, kill, waitpid, process groups and
pipes. Components never call os.fork/os.kill/os.waitpid themselves; they go through a
`System`, which the component tests replace with a fake (tests/fakeos.py) that records
what was asked and plays the children's part, without a single process.

(Sockets, the selector and shared memory stay real in those tests too: they need no
process.)
"""

from __future__ import annotations

import ctypes
import errno
import os
import signal
import socket
from collections.abc import Callable, Iterable
from typing import NoReturn

from gearvisor.child.postfork import prctl
from gearvisor.policy.child import EXIT_CRASH

PR_SET_CHILD_SUBREAPER = 36
SYS_PIDFD_GETFD = 438  # the same number on every Linux architecture (5.6 and later)


def pidfd_getfd(pidfd: int, fd: int) -> int:
    """A copy, in this process, of the file `fd` of the process behind `pidfd`
    (pidfd_getfd(2): the caller must be allowed to ptrace it, as a parent is its own
    children of the same user, unless a seccomp profile forbids the call)."""
    libc = ctypes.CDLL(None, use_errno=True)
    got = libc.syscall(SYS_PIDFD_GETFD, pidfd, fd, 0)
    if got < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return got


def shutdown_socket(pid: int, fd: int, port: int) -> None:
    """Shut down the TCP socket `fd` of process `pid`, whose local port must be `port`
    (so a file the process put in that fd since is left alone). Its peer sees the end of
    the connection, as if the process had closed it; the process keeps its fd."""
    pidfd = os.pidfd_open(pid)
    try:
        mine = pidfd_getfd(pidfd, fd)
    finally:
        os.close(pidfd)
    try:
        sock = socket.socket(fileno=mine)
    except OSError:
        os.close(mine)
        raise
    with sock:
        if sock.type != socket.SOCK_STREAM or sock.getsockname()[1] != port:
            raise OSError(errno.ESTALE, f"fd {fd} is not that connection any more")
        sock.shutdown(socket.SHUT_RDWR)


def set_child_subreaper() -> bool:
    """Make the master the reaper of its children's orphans (Linux >= 3.4): a process a
    child left behind is reparented to the master, not to init, so its exit wakes the
    master (SIGCHLD) and the master reaps it (no zombies, and it knows when a dead child's
    process group is empty)."""
    return prctl(PR_SET_CHILD_SUBREAPER, 1)


def group_members(pgid: int, limit: int = 20) -> list[str]:
    """Live processes of process group `pgid`, as "PID NAME" (at most `limit`), read from
    /proc: for the log line that says what a dead child left behind and what was killed."""
    found: list[str] = []
    try:
        pids = [name for name in os.listdir("/proc") if name.isdigit()]
    except OSError:
        return found
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                stat = f.read(4096)
        except OSError:
            continue  # gone meanwhile
        end = stat.rfind(b")")  # the name may hold spaces and parentheses
        fields = stat[end + 2:].split()
        if len(fields) > 2 and fields[0] != b"Z" and fields[2] == str(pgid).encode():
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    name = f.read(200).replace(b"\0", b" ").strip()
            except OSError:
                name = b""
            name = name or stat[stat.find(b"(") + 1:end]  # comm: a kernel thread, a zombie
            found.append(f"{pid} {name.decode(errors='replace')}")
            if len(found) >= limit:
                break
    return found


class System:
    """The real OS."""

    def fork(self, body: Callable[[int, set[int]], NoReturn],
             blocked: Iterable[int]) -> tuple[int, int]:
        """Fork with a pipe back to the master; the child leads its own process group and
        runs body(write_fd, blocked), with `blocked` signals still blocked (no handler of the
        master ever runs in it). Returns (pid, read end, non-blocking)."""
        r, w = os.pipe()
        blocked = set(blocked)
        signal.pthread_sigmask(signal.SIG_BLOCK, blocked)
        try:
            pid = os.fork()
        except OSError:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, blocked)
            os.close(r)
            os.close(w)
            raise
        if pid == 0:
            # The child never comes back into the master's code, whatever body() does: an
            # exception escaping here would run a second master loop in the child, which
            # forks children of its own (a fork bomb).
            try:
                os.setpgid(0, 0)  # its own process group, so stopping it can reach descendants
                os.close(r)
                body(w, blocked)
            finally:
                os._exit(EXIT_CRASH)
        try:
            os.setpgid(pid, pid)  # the same from this side: set before anyone signals it
        except OSError:
            pass  # it did so itself already, and exec'd (EACCES) or died (ESRCH)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, blocked)
        os.close(w)
        os.set_blocking(r, False)
        return pid, r

    def kill(self, pid: int, sig: int) -> bool:
        """Signal one process; False if it is gone (reap() collects it)."""
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return False
        return True

    def killpg(self, pgid: int, sig: int) -> bool:
        """Signal a process group; False when it has no member left (sig 0 only asks)."""
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass  # a member switched to another user: it exists, though we may not signal it
        return True

    def group_members(self, pgid: int) -> list[str]:
        return group_members(pgid)

    def waitpid(self) -> tuple[int, int] | None:
        """One exited child (pid, status), or None when none is waiting (or none exists)."""
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return None
        return None if pid == 0 else (pid, status)

    def pipe(self) -> tuple[int, int]:
        """A pipe for a helper's input: (read end, write end), both blocking."""
        return os.pipe()

    def read(self, fd: int, size: int = 65536) -> bytes:
        return os.read(fd, size)

    def close(self, fd: int) -> None:
        try:
            os.close(fd)
        except OSError:
            pass

    def shutdown_socket(self, pid: int, fd: int, port: int) -> None:
        """Shut down a child's connection (a held lane: master/lanes.py); OSError if not."""
        shutdown_socket(pid, fd, port)

    def become_subreaper(self) -> None:
        set_child_subreaper()

    def getpid(self) -> int:
        return os.getpid()
