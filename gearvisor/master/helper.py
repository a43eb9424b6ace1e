"""One supervisor for every helper process of the master (the file watcher, the alert
notifier, the job store): a process the master needs but must not be, supervised like a
child.

A `HelperProcess` owns, for one helper:
- starting it: the body is forked through the OS facade (master/system.py), and the body
  begins with child/postfork.start_helper; `body()` is asked afresh at each start, so a
  restart runs on the config of the day;
- its input (optional): lines queued by `send`, written to a non-blocking pipe only while
  the pipe takes them (a partial write keeps the rest for later), never more than
  `max_pending` waiting (the oldest not yet begun is dropped and handed to `on_drop`). A
  line a dead helper had only half read is sent to the next one again, whole;
- its output: one line at a time, read without blocking and bounded (master/pipes.py),
  and a last bounded read when it is reaped; each decoded message goes to `on_message`
  (or each raw line to `on_line`);
- restarting it with backoff after an exit nobody asked for (policy/backoff.py; `succeeded`
  ends a streak), and at once, without counting a failure, after `restart`;
- the stop protocol: end of input means "finish what you hold and exit" (SIGTERM too when
  the stop is fast, or when there is no input to close), SIGKILL once the stop is overdue,
  and `stopped` once it is reaped;
- its status: pid and the lines waiting (the rest is in its HelperRecord).

What a helper's messages mean stays with the component that runs it. A helper that must
acknowledge what it was sent (the job store) gets `on_sent` for each line written whole and
`on_start` at each new process, where the component `resend`s what was never acknowledged.
"""

from __future__ import annotations

import collections
import os
import signal
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, NoReturn

from gearvisor import messages as msg
from gearvisor.lines import event_lines
from gearvisor.master import bus as ev
from gearvisor.master.arbiter import HANDLED_SIGNALS
from gearvisor.master.pipes import read_lines
from gearvisor.policy.child import describe_status
from gearvisor.policy.helper import HelperRecord

if TYPE_CHECKING:
    from gearvisor.master.arbiter import Arbiter
    from gearvisor.master.loop import Timer

# A helper's body: (output fd, input fd or -1, the master's signals, still blocked). It
# starts with child/postfork.start_helper and never returns.
HelperBody = Callable[[int, int, set[int]], NoReturn]

MAX_PENDING = 10_000  # input lines waiting for the helper by default; the oldest are dropped
MAX_PENDING_BYTES = 64 << 20  # and their bytes: lines may be up to a MiB each
FINAL_READS = 64  # reads at reaping: the helper is dead, what it wrote is all in the pipe
NOISY_FAILURES = 3  # a crash loop logs its first exits as errors, the rest at debug level



def _framed(line: bytes) -> bytes:
    """`line` with its newline (lines never hold one inside)."""
    return line if line.endswith(b"\n") else line + b"\n"

class HelperProcess:
    """One supervised helper process; see the module docstring.

    Args:
        name: what the operator calls it in logs ("file watcher", "alert notifier").
        body: returns what the next process runs, or None when there is nothing to run
            (then `start` does nothing).
        with_input: give the helper an input pipe (its second fd) that `send` writes to.
        max_pending: input lines that may wait, and max_pending_bytes their bytes;
            `on_drop(line)` hears of each one dropped.
        on_message: each decoded message the helper writes (unreadable lines are logged).
        on_line: each raw line instead (no decoding), for a helper with its own protocol.
        on_start: called with the pid of each new process, before any input is written.
        on_sent: called with each input line once written whole to the pipe.
        describe: extra fields for the log line that says the helper died.
        record: the record to keep pid, backoff and restarts in (a fresh one by default).
    """

    def __init__(self, name: str, body: Callable[[], HelperBody | None], *,
                 with_input: bool = False, max_pending: int = MAX_PENDING,
                 max_pending_bytes: int = MAX_PENDING_BYTES,
                 on_drop: Callable[[bytes], None] | None = None,
                 on_message: Callable[[msg.Message], None] | None = None,
                 on_line: Callable[[bytes], None] | None = None,
                 on_start: Callable[[int], None] | None = None,
                 on_sent: Callable[[bytes], None] | None = None,
                 describe: Callable[[], dict[str, Any]] | None = None,
                 record: HelperRecord | None = None) -> None:
        self.name = name
        self.body = body
        self.with_input = with_input
        self.max_pending = max(1, max_pending)
        self.max_pending_bytes = max_pending_bytes
        self.on_drop = on_drop
        self.on_message = on_message
        self.on_line = on_line
        self.on_start = on_start
        self.on_sent = on_sent
        self.describe = describe
        self.record = record if record is not None else HelperRecord()
        self.events = -1  # the read end of its output pipe
        self.lines = event_lines()
        self.input = -1  # the master's (non-blocking) write end of its input pipe
        self.out: collections.deque[bytes] = collections.deque()  # lines, with newline
        self.out_bytes = 0  # what they hold
        self.partial = b""  # the unwritten rest of the line at the head of `out`
        self.closing = False  # a graceful stop: end of input once `out` is written
        self.dropped = 0  # input lines dropped because `max_pending` waited
        self.stopping = False
        self._timer: Timer | None = None

    def attach(self, master: Arbiter) -> None:
        """Hear of its exits (the arbiter reaps every child and publishes the ones that are
        not its own)."""
        self.master = master
        master.bus.subscribe(ev.OtherReaped, self._reaped)

    @property
    def pid(self) -> int | None:
        return self.record.pid

    @property
    def waiting(self) -> int:
        """Input lines not yet written whole."""
        return len(self.out)

    def status(self) -> dict[str, Any]:
        """For `gearvisor status`: its pid and its input queue."""
        return {"pid": self.record.pid, "waiting": len(self.out), "dropped": self.dropped}

    # -- starting -------------------------------------------------------------------------------

    def start_at(self, when: float) -> None:
        """Start it at `when` (monotonic seconds), instead of any start already planned."""
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self.master.loop.call_at(when, self.start)

    def start(self) -> None:
        """Start it now, unless it runs, the master is stopping or there is nothing to run.
        A failed fork (or pipe) is retried with backoff."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        r = self.record
        if r.pid is not None or self.stopping:
            return
        body = self.body()
        if body is None:
            return
        in_r = in_w = -1
        try:
            if self.with_input:
                in_r, in_w = self.master.system.pipe()

            def run(w: int, blocked: set[int]) -> NoReturn:
                if in_w >= 0:
                    os.close(in_w)
                body(w, in_r, blocked)

            pid, events = self.master.system.fork(run, HANDLED_SIGNALS)
        except OSError as e:
            for fd in (in_r, in_w):
                if fd >= 0:
                    self.master.system.close(fd)
            self._retry(str(e))
            return
        if in_r >= 0:
            self.master.system.close(in_r)
            os.set_blocking(in_w, False)
        r.pid, r.started_at = pid, self.master.clock()
        self.events, self.lines, self.input = events, event_lines(), in_w
        self.partial = b""  # a line the dead helper half read is sent again whole
        self.master.loop.add_reader(events, self._read)
        if self.on_start is not None:
            self.on_start(pid)
        self._want_write()

    def _retry(self, error: str) -> None:
        now = self.master.clock()
        delay = self.record.backoff.failure(now, now)
        self.record.restart_at = now + delay
        self.master.log.error(f"cannot start the {self.name}; retrying with backoff",
                              error=error, retry_in=round(delay, 3))
        self.start_at(self.record.restart_at)

    def restart(self) -> None:
        """Start it anew (what it runs changed): the running one is asked to exit (SIGTERM)
        and replaced at once; none running (even in backoff): it starts now."""
        r = self.record
        r.restart_at = 0.0
        if r.pid is not None:
            r.replacing = True
            self.signal(signal.SIGTERM)
        else:
            self.start_at(0.0)

    def succeeded(self) -> None:
        """It did its work: the next exit starts a new backoff streak."""
        self.record.backoff.reset()

    def signal(self, sig: int) -> None:
        """Signal it, if it runs (gone already: its reaping collects it)."""
        if self.record.pid is not None:
            self.master.system.kill(self.record.pid, sig)

    # -- input ----------------------------------------------------------------------------------

    def send(self, line: bytes) -> None:
        """Queue one line for the helper's input; its newline is added unless it ends in one
        (a caller that keeps its lines, like the journal's Outbox, frames them once, and the
        queue then holds the same bytes, not a copy). When `max_pending` lines wait, the
        oldest one not begun is dropped (`on_drop`), and so while they hold more than
        `max_pending_bytes`."""
        framed = _framed(line)
        self.out.append(framed)
        self.out_bytes += len(framed)
        self._trim()
        self._want_write()

    def resend(self, lines: Iterable[bytes]) -> None:
        """Queue `lines` (framed as by send) ahead of what waits, in their order: for
        `on_start`, what a dead helper took but never acknowledged."""
        head = [_framed(line) for line in lines]
        self.out_bytes += sum(map(len, head))
        if self.partial and self.out:
            head.insert(0, self.out.popleft())  # a half-written line is finished first
        self.out.extendleft(reversed(head))
        self._trim()
        self._want_write()

    def replace(self, lines: Iterable[bytes]) -> None:
        """The input queue becomes `lines` (framed as by send), in their order: for an
        `on_start` whose caller keeps every line the helper has not acknowledged, so what
        the last process's queue held is among them."""
        self.out.clear()
        self.out_bytes = 0
        self.partial = b""
        self.resend(lines)

    def _trim(self) -> None:
        """Drop the oldest lines past `max_pending` (or `max_pending_bytes`). A half-written
        head is finished, never dropped: the helper would read its rest glued to the next
        line."""
        first = 1 if self.partial else 0
        while len(self.out) > first and (len(self.out) > self.max_pending
                                         or self.out_bytes > self.max_pending_bytes):
            lost = self.out[first]
            del self.out[first]
            self.out_bytes -= len(lost)
            self.dropped += 1
            if self.on_drop is not None:
                self.on_drop(lost[:-1])

    def _want_write(self) -> None:
        if self.out and self.input >= 0:
            self.master.loop.add_writer(self.input, self._write)

    def _write(self) -> None:
        """Write queued lines while the pipe takes them; never blocks."""
        while self.out and self.input >= 0:
            data = self.partial or self.out[0]
            try:
                n = os.write(self.input, data)
            except BlockingIOError:
                return
            except OSError:  # the helper is gone: its reaping restarts it
                self.close_input()
                return
            self.partial = data[n:]
            if not self.partial:
                line = self.out.popleft()
                self.out_bytes -= len(line)
                if self.on_sent is not None:
                    self.on_sent(line[:-1])
        if self.input >= 0:
            self.master.loop.remove_writer(self.input)
            if self.closing:
                self.close_input()  # everything queued before the stop is written

    def close_input(self) -> None:
        """End of its input: a helper that reads it finishes what it holds and exits."""
        if self.input >= 0:
            self.master.loop.remove_writer(self.input)
            self.master.system.close(self.input)
            self.input = -1

    # -- output and exit ------------------------------------------------------------------------

    def _read(self, final: bool = False) -> None:
        """What its pipe holds; closed at end of file, or with `final` (it is dead, so one
        bounded read takes all it wrote)."""
        lines, eof, _ = read_lines(self.events, self.lines, FINAL_READS if final else 1)
        if eof or final:
            self.master.loop.remove_reader(self.events)
            self.master.system.close(self.events)
            self.events = -1
        for line in lines:
            if self.on_line is not None:
                self.on_line(line)
                continue
            try:
                message = msg.decode(line)
            except msg.MessageError as e:
                self.master.log.warning(f"unreadable line from the {self.name}", error=str(e))
                continue
            if self.on_message is not None:
                self.on_message(message)

    def _reaped(self, event: ev.OtherReaped) -> None:
        r = self.record
        if event.pid != r.pid or r.pid is None:
            return
        if self.events >= 0:
            self._read(final=True)
        self.close_input()
        now = self.master.clock()
        r.pid = None
        if self.stopping:
            return
        if r.replacing:  # RUNNING -> STARTING: asked to go, not a failure
            r.replacing = False
            r.restart_at = now
        else:  # RUNNING -> BACKOFF
            delay = r.backoff.failure(r.started_at, now)
            r.restarts += 1
            r.restart_at = now + delay
            log = self.master.log
            level = log.error if r.backoff.failures <= NOISY_FAILURES else log.debug
            level(f"{self.name} died; restarting it with backoff (the fleet keeps running)",
                  status=describe_status(event.status)[2], retry_in=round(delay, 3),
                  streak=r.backoff.failures, **(self.describe() if self.describe else {}))
        self.start_at(r.restart_at)

    # -- stopping -------------------------------------------------------------------------------

    def begin_stop(self, fast: bool) -> None:
        """The master stops: no more starts; close its input once the lines queued for it
        are written (it finishes what it holds and exits; a fast stop closes it at once),
        SIGTERM when `fast` or when it has no input to close."""
        self.stopping = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.record.pid is None:
            return
        if self.out and self.input >= 0 and not fast:
            # Lines queued just before the stop (a child's last journal lines, read when
            # it was reaped) go first; end of input follows them (see _write). A helper
            # that does not read them is SIGKILLed when the stop is overdue.
            self.closing = True
            self._want_write()
        else:
            self.close_input()
        if fast or not self.with_input:
            self.signal(signal.SIGTERM)

    def stop_overdue(self) -> None:
        """The stop deadline passed: SIGKILL."""
        self.signal(signal.SIGKILL)

    def stopped(self) -> bool:
        """No process of it is left (reaped)."""
        return self.record.pid is None

    def close(self) -> None:
        """The master exits: release its fds and timer."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.close_input()
        if self.events >= 0:
            self.master.loop.remove_reader(self.events)
            self.master.system.close(self.events)
            self.events = -1
