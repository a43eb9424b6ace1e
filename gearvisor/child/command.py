"""Command pools: external workers (PHP, Perl, any language) run with the same supervision.

The child side (exec_command) runs after fork: default signals, stdin from /dev/null,
stdout/stderr into pipes the master reads line by line, the pool's cwd, env, umask, rlimits
and user, then execvpe() with no shell. If exec fails, the reason goes to the master as a
boot error. The write ends of the output pipes are non-blocking and 1 MiB deep: a worker
never blocks on its output (lines it cannot write are dropped at the source), and the master
rate-limits what it logs (OutputSink), counting what it drops.
"""

from __future__ import annotations

import fcntl
import logging
import logging.handlers
import os
import signal
import time
from typing import Any, NoReturn

from gearvisor import messages as msg
from gearvisor.child.postfork import after_fork
from gearvisor.config import Config, PoolConfig
from gearvisor.policy.child import EXIT_BOOT_ERROR

F_SETPIPE_SZ = 1031  # Linux fcntl: grow a pipe's buffer
PIPE_SIZE = 1024 * 1024
MAX_LINE = 16 * 1024  # longer lines are cut (and say so)


def output_pipe() -> tuple[int, int]:
    """A pipe for a child's stdout or stderr: (read end for the master, write end)."""
    r, w = os.pipe()
    try:
        fcntl.fcntl(w, F_SETPIPE_SZ, PIPE_SIZE)
    except OSError:
        pass  # above /proc/sys/fs/pipe-max-size: keep the default 64 KiB
    os.set_blocking(r, False)
    return r, w


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


class OutputSink:
    """Where one pool's captured output goes: gearvisor's structured log, or a rotated file.
    At most `rate` lines a second (a token bucket); the rest are dropped and counted, and the
    count is reported at most every 5 seconds."""

    def __init__(self, pool: PoolConfig, log: Any, clock=time.monotonic) -> None:
        self.pool = pool.name
        self.log = log
        self.rate = pool.output_rate
        self.tokens = float(pool.output_rate)
        self.clock = clock
        self.last = clock()
        self.dropped = 0
        self.reported_at = self.last
        self.file: logging.Logger | None = None
        if pool.log_file:
            self.file = logging.getLogger(f"gearvisor.output.{pool.name}")
            self.file.propagate = False
            self.file.setLevel(logging.INFO)
            for h in list(self.file.handlers):
                self.file.removeHandler(h)
                h.close()
            handler = logging.handlers.RotatingFileHandler(
                pool.log_file, maxBytes=pool.log_file_max, backupCount=pool.log_file_backups,
                encoding="utf-8", delay=True)
            handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
            self.file.addHandler(handler)

    def line(self, slot: int, pid: int, stream: str, text: str) -> None:
        now = self.clock()
        self.tokens = min(float(self.rate), self.tokens + (now - self.last) * self.rate)
        self.last = now
        if self.tokens < 1.0:
            self.dropped += 1
            self.report(now)
            return
        self.tokens -= 1.0
        if self.file is not None:
            self.file.info("%s[%d] pid %d %s: %s", self.pool, slot, pid, stream, text)
        else:
            self.log.info(text, source=stream, slot=slot, child_pid=pid)
        self.report(now)

    def due(self) -> float | None:
        """When dropped lines are next reported (the loop wakes for it), or None."""
        return self.reported_at + 5.0 if self.dropped else None

    def report(self, now: float | None = None) -> None:
        now = self.clock() if now is None else now
        if self.dropped and now - self.reported_at >= 5.0:
            self.log.warning("output dropped: the pool writes more lines than output_rate",
                             dropped=self.dropped, output_rate=self.rate)
            self.dropped = 0
            self.reported_at = now

    def close(self) -> None:
        if self.file is not None:
            for h in list(self.file.handlers):
                self.file.removeHandler(h)
                h.close()


def split_lines(buf: bytearray, data: bytes, final: bool = False) -> list[str]:
    """Append `data` to `buf`; return the complete lines (decoded, cut at MAX_LINE). With
    `final`, a last line without a newline is returned too."""
    buf += data
    lines = []
    while True:
        i = buf.find(b"\n")
        if i < 0:
            if len(buf) > MAX_LINE or (final and buf):
                lines.append(_text(bytes(buf[:MAX_LINE]), len(buf) > MAX_LINE))
                del buf[:]
            break
        raw = bytes(buf[:i])
        del buf[:i + 1]
        lines.append(_text(raw[:MAX_LINE], len(raw) > MAX_LINE))
    return lines


def _text(raw: bytes, cut: bool) -> str:
    text = raw.rstrip(b"\r").decode(errors="replace")
    return text + " [line cut at 16 KiB]" if cut else text
