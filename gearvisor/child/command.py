"""Command pools: external workers (PHP, Perl, any language) run with the same supervision.

exec_command runs after fork: the one post-fork setup (default signals, stdin from
/dev/null, stdout/stderr into the pipes master/output.py makes, the pool's cwd, env, umask,
rlimits and user), then execvp() with no shell. If exec fails, the reason goes to the
master as a boot error.

The child's event pipe stays open across exec as fd EVENT_FD (GEARVISOR_EVENT_FD says so):
a worker may report on it, one line each, what a Python child reports (messages.py's
JobStarted and JobEnded, journal lines per journal/record.py), so the master can record a
crash in the middle of a job. The master reads those lines exactly like a Python child's
(bounded, checked, never trusted). It is a blocking pipe, so a line is written whole; the
master reads it all the time. In a pool with poison_after, fd POISON_FD
(GEARVISOR_POISON_FD) is the master's list of poison jobs (shm/poison.PoisonList), for the
shim to refuse them.
"""

from __future__ import annotations

import fcntl
import os
import signal
from typing import NoReturn

from gearvisor import messages as msg
from gearvisor.child.postfork import after_fork
from gearvisor.config import Config, PoolConfig
from gearvisor.policy.child import EXIT_BOOT_ERROR

EVENT_FD = 3  # where an exec'd worker finds its event pipe (the first fd after stdio)
POISON_FD = 4  # and the master's list of poison jobs (shm/poison.PoisonList), read-only use
# A JobStarted line must fit the master's line cap (1 MiB) with its payload in base64.
MAX_REPORTED_PAYLOAD = 512 * 1024


def command_env(pool: PoolConfig, slot: int, client_id: str,
                payload_cap: int = 0, poison: bool = False) -> dict[str, str]:
    """What a command child finds in its environment besides the pool's env: who it is,
    where its job servers are, where (and how much payload) to report on, and, in a pool
    with poison_after, where the poison jobs to refuse are listed."""
    env = {"GEARVISOR_POOL": pool.name, "GEARVISOR_SLOT": str(slot),
           "GEARVISOR_SERVERS": ",".join(str(s) for s in pool.servers),
           "GEARVISOR_CLIENT_ID": client_id, "GEARVISOR_EVENT_FD": str(EVENT_FD),
           "GEARVISOR_PAYLOAD_CAP": str(min(payload_cap, MAX_REPORTED_PAYLOAD))}
    if poison:
        env["GEARVISOR_POISON_FD"] = str(POISON_FD)
    return env


def own_reader(fd: int) -> int:
    """A read-only open of the master's PoisonList of this process's own: an open file
    description, so its offset is no other worker's (a shim seeks and reads it). -1 for
    none (`fd` is -1, or /proc is not there: the shim then refuses nothing)."""
    if fd < 0:
        return -1
    try:
        own = os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC)
        if own <= POISON_FD:  # (a master started with stdio closed: keep off 0-4)
            low, own = own, fcntl.fcntl(own, fcntl.F_DUPFD_CLOEXEC, POISON_FD + 1)
            os.close(low)
        return own
    except OSError:
        return -1


def keep_fds_at(fds: dict[int, int]) -> None:
    """Move each fd (key) to its place (value), inheritable, for the exec'd worker (after
    after_fork: only stdio and these are open then). Each goes through a copy above every
    place first, so none lands on another before that one has moved."""
    top = max(fds.values()) + 1
    copies = {fcntl.fcntl(fd, fcntl.F_DUPFD, top): place for fd, place in fds.items()}
    for fd in fds:
        os.close(fd)
    for copy, place in copies.items():
        os.dup2(copy, place)  # inheritable by default
        os.close(copy)


def client_id(pool: PoolConfig, slot: int, pid: int) -> str:
    """The id a command worker should send (SET_CLIENT_ID): `ready: registered` looks for it
    in gearmand's `workers` list."""
    return f"{pool.client_id_prefix}:{pool.name}:{slot}:{pid}"


def exec_command(cfg: Config, pool: PoolConfig, slot: int, event_fd: int, out_w: int,
                 err_w: int, signals_to_unblock: set[int], poison_fd: int = -1) -> NoReturn:
    """The body of a forked command child. Never returns. `poison_fd`: the master's
    PoisonList, passed on at POISON_FD (-1: none, the pool has no poison_after)."""
    from gearvisor.child.python import send_event  # the Python child runtime's helper

    try:
        # The stop signal, not SIGTERM, when the master dies: it survives exec.
        cap = cfg.journal.payload_cap if cfg.journal.enabled else 0
        own = own_reader(poison_fd)
        keep = {event_fd: EVENT_FD} if own < 0 else {event_fd: EVENT_FD, own: POISON_FD}
        after_fork(signals_to_unblock, signal.Signals[pool.stop_signal], set(keep), pool,
                   env=command_env(pool, slot, client_id(pool, slot, os.getpid()), cap,
                                   poison=own >= 0),
                   stdio=(out_w, err_w), for_exec=True)
        keep_fds_at(keep)
        event_fd = EVENT_FD
        os.set_blocking(EVENT_FD, True)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, signals_to_unblock)
        os.execvp(pool.command[0], list(pool.command))
    except BaseException as e:  # exec failed: tell the master why, as a boot error
        send_event(event_fd, msg.BootError(f"cannot run {pool.command[0]!r}: {e}"))
    os._exit(EXIT_BOOT_ERROR)
