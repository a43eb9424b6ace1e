"""Command pools: external workers (PHP, Perl, any language) run with the same supervision.

exec_command runs after fork: the one post-fork setup (default signals, stdin from
/dev/null, stdout/stderr into the pipes master/output.py makes, the pool's cwd, env, umask,
rlimits and user), then execvp() with no shell. If exec fails, the reason goes to the
master as a boot error.
"""

from __future__ import annotations

import os
import signal
from typing import NoReturn

from gearvisor import messages as msg
from gearvisor.child.postfork import after_fork
from gearvisor.config import Config, PoolConfig
from gearvisor.policy.child import EXIT_BOOT_ERROR


def command_env(pool: PoolConfig, slot: int, client_id: str) -> dict[str, str]:
    """What a command child finds in its environment besides the pool's env."""
    return {"GEARVISOR_POOL": pool.name, "GEARVISOR_SLOT": str(slot),
            "GEARVISOR_SERVERS": ",".join(str(s) for s in pool.servers),
            "GEARVISOR_CLIENT_ID": client_id}


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
        after_fork(signals_to_unblock, signal.Signals[pool.stop_signal], {event_fd}, pool,
                   env=command_env(pool, slot, client_id(pool, slot, os.getpid())),
                   stdio=(out_w, err_w), for_exec=True)  # the event pipe is close-on-exec
        signal.pthread_sigmask(signal.SIG_UNBLOCK, signals_to_unblock)
        os.execvp(pool.command[0], list(pool.command))
    except BaseException as e:  # exec failed: tell the master why, as a boot error
        send_event(event_fd, msg.BootError(f"cannot run {pool.command[0]!r}: {e}"))
    os._exit(EXIT_BOOT_ERROR)
