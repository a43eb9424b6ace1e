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
master reads it all the time.
"""

from __future__ import annotations

import os
import signal
from typing import NoReturn

from gearvisor import messages as msg
from gearvisor.child.postfork import after_fork
from gearvisor.config import Config, PoolConfig
from gearvisor.policy.child import EXIT_BOOT_ERROR

EVENT_FD = 3  # where an exec'd worker finds its event pipe (the first fd after stdio)
# A JobStarted line must fit the master's line cap (1 MiB) with its payload in base64.
MAX_REPORTED_PAYLOAD = 512 * 1024


def command_env(pool: PoolConfig, slot: int, client_id: str,
                payload_cap: int = 0) -> dict[str, str]:
    """What a command child finds in its environment besides the pool's env: who it is,
    where its job servers are, and where (and how much payload) to report on."""
    return {"GEARVISOR_POOL": pool.name, "GEARVISOR_SLOT": str(slot),
            "GEARVISOR_SERVERS": ",".join(str(s) for s in pool.servers),
            "GEARVISOR_CLIENT_ID": client_id, "GEARVISOR_EVENT_FD": str(EVENT_FD),
            "GEARVISOR_PAYLOAD_CAP": str(min(payload_cap, MAX_REPORTED_PAYLOAD))}


def keep_event_fd(event_fd: int) -> int:
    """Move the event pipe to EVENT_FD, inheritable and blocking, for the exec'd worker
    (after after_fork: only stdio and the pipe are open then). Returns EVENT_FD."""
    if event_fd != EVENT_FD:
        os.dup2(event_fd, EVENT_FD)  # inheritable by default
        os.close(event_fd)
    else:
        os.set_inheritable(EVENT_FD, True)  # dup2 onto itself would keep close-on-exec
    os.set_blocking(EVENT_FD, True)
    return EVENT_FD


def client_id(pool: PoolConfig, slot: int, pid: int) -> str:
    """The id a command worker should send (SET_CLIENT_ID): `ready: registered` looks for it
    in gearmand's `workers` list."""
    return f"{pool.client_id_prefix}:{pool.name}:{slot}:{pid}"


def exec_command(cfg: Config, pool: PoolConfig, slot: int, event_fd: int, out_w: int,
                 err_w: int, signals_to_unblock: set[int]) -> NoReturn:
    """The body of a forked command child. Never returns."""
    from gearvisor.child.python import send_event  # the Python child runtime's helper

    try:
        # The stop signal, not SIGTERM, when the master dies: it survives exec.
        cap = cfg.journal.payload_cap if cfg.journal.enabled else 0
        after_fork(signals_to_unblock, signal.Signals[pool.stop_signal], {event_fd}, pool,
                   env=command_env(pool, slot, client_id(pool, slot, os.getpid()), cap),
                   stdio=(out_w, err_w), for_exec=True)
        event_fd = keep_event_fd(event_fd)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, signals_to_unblock)
        os.execvp(pool.command[0], list(pool.command))
    except BaseException as e:  # exec failed: tell the master why, as a boot error
        send_event(event_fd, msg.BootError(f"cannot run {pool.command[0]!r}: {e}"))
    os._exit(EXIT_BOOT_ERROR)
