"""A command child's stdout and stderr, on the master's side: the pipes and where lines go.

The write ends are non-blocking and 1 MiB deep: a worker never blocks on its output (lines
it cannot write are dropped at the source). The master logs each line (OutputSink, to the
structured log or a rotated `log_file`), at most `output_rate` a second, and counts and
reports what it drops. Lines longer than MAX_LINE are cut and say so.
"""

from __future__ import annotations

import fcntl
import logging
import logging.handlers
import os
import time
from typing import Any

from gearvisor.config import PoolConfig

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


def line_text(raw: bytes, cut: bool) -> str:
    """One output line as logged: decoded (bad bytes replaced), a CR before the newline
    dropped, and a cut line marked."""
    text = raw.rstrip(b"\r").decode(errors="replace")
    return text + " [line cut at 16 KiB]" if cut else text


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
