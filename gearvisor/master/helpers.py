"""The file-watcher helper, supervised like a child: forked, read over its pipe, restarted
with backoff when it dies, stopped with the master.

The helper (helpers/watcher.py's run_watcher) runs watchfiles' notifier, which needs a
thread, so it never runs in the master. It reports changes; this component debounces them
and rolls the pools they touch through the arbiter's verbs (the config file: a reload).
What each Python pool's children report importing feeds the watch list.
"""

from __future__ import annotations

import signal
import sys
from typing import TYPE_CHECKING, Any, NoReturn

from gearvisor import messages as msg
from gearvisor.helpers.watcher import Debouncer, WatcherState, run_watcher
from gearvisor.master import bus as ev
from gearvisor.master.arbiter import HANDLED_SIGNALS
from gearvisor.master.component import Component
from gearvisor.master.pipes import read_lines
from gearvisor.policy.child import describe_status

if TYPE_CHECKING:
    from gearvisor.config import Config
    from gearvisor.master.arbiter import Arbiter
    from gearvisor.master.loop import Timer


class Watcher(Component):
    """Runs the watcher helper and turns what it reports into rolls."""

    def __init__(self, config: Config) -> None:
        self.debouncer = Debouncer(config.watch_debounce)
        self.state = WatcherState.for_config(config, sys.path)
        self._start_timer: Timer | None = None
        self._roll_timer: Timer | None = None
        self.stopping = False

    def attach(self, master: Arbiter) -> None:
        self.master = master
        master.bus.subscribe(ev.OtherReaped, self._reaped)
        master.bus.subscribe(ev.ChildSaid, self._child_said)
        self._log_notes()
        self._start_at(0.0)

    def reload(self, config: Config) -> None:
        self.debouncer.retime(config.watch_debounce)
        self.debouncer.pending = None  # this reload rolls every pool: nothing left to apply
        self.update_spec()

    def begin_stop(self, fast: bool) -> None:
        self.stopping = True
        self._signal(signal.SIGTERM)

    def stop_overdue(self) -> None:
        self._signal(signal.SIGKILL)

    def stopped(self) -> bool:
        return self.state.pid is None

    def status(self, now: float) -> dict[str, Any]:
        return {"watcher": self.state.status(now, self.debouncer)}

    # -- the helper process ---------------------------------------------------------------------

    def _start_at(self, when: float) -> None:
        if self._start_timer is not None:
            self._start_timer.cancel()
        self._start_timer = self.master.loop.call_at(when, self.start)

    def start(self) -> None:
        w = self.state
        if w.pid is not None or w.spec.empty or self.stopping:
            return
        spec, master_pid, now = w.spec, self.master.pid, self.master.clock()

        def body(fd: int, blocked: set[int]) -> NoReturn:
            run_watcher(spec, fd, master_pid, blocked)

        try:
            w.pid, w.event_fd = self.master.system.fork(body, HANDLED_SIGNALS)
        except OSError as e:
            w.restart_at = now + w.backoff.failure(now, now)
            self.master.log.error("fork of the file watcher failed", error=str(e))
            self._start_at(w.restart_at)
            return
        w.started_at = now
        w.paths, w.missing, w.buf = [], [], bytearray()
        self.master.loop.add_reader(w.event_fd, self._read)

    def _signal(self, sig: int) -> None:
        if self.state.pid is not None:
            self.master.system.kill(self.state.pid, sig)  # gone: reap() collects it

    def _read(self, final: bool = False) -> None:
        """What the helper's pipe holds; closed at end of file, or with `final` (it is
        dead, so one bounded read takes all it wrote)."""
        w = self.state
        lines, eof, _ = read_lines(w.event_fd, w.buf, 64 if final else 1)
        if eof or final:
            self.master.loop.remove_reader(w.event_fd)
            self.master.system.close(w.event_fd)
            w.event_fd = -1
        for line in lines:
            try:
                message = msg.decode(line)
            except msg.MessageError as e:
                self.master.log.warning("unreadable line from the file watcher", error=str(e))
                continue
            self.handle(message)

    def handle(self, message: msg.Message) -> None:
        w, log = self.state, self.master.log
        if isinstance(message, msg.Watching):
            seen = (w.paths, w.missing, w.polling)
            w.paths, w.missing, w.polling = list(message.paths), list(message.missing), \
                message.polling
            if seen == (w.paths, w.missing, w.polling):
                return  # re-watching the same paths after a symlink swap
            log.info("watching files", watcher_pid=w.pid, paths=w.paths, polling=w.polling)
            if w.missing:
                log.warning("watched path does not exist; it is checked again every second "
                            "and watched once it appears", missing=w.missing)
        elif isinstance(message, msg.Changed):
            now = self.master.clock()
            w.last_change = now
            pools = {p for p in message.pools if p in self.master.pools}
            self.debouncer.add(pools, message.config, list(message.files), now,
                               count=message.count)
            log.info("files changed; rolling once they are quiet", pools=sorted(pools),
                     config=message.config, files=message.count, sample=message.files,
                     why=message.why or None, quiet_period=self.debouncer.quiet)
            self._schedule_roll()
        elif isinstance(message, msg.WatcherError):
            w.error = message.message
            log.error("file watcher problem; the fleet keeps running", error=w.error)

    def _reaped(self, event: ev.OtherReaped) -> None:
        w = self.state
        if event.pid != w.pid:
            return
        if w.event_fd >= 0:
            self._read(final=True)
        now = self.master.clock()
        w.pid = None
        if self.stopping:
            return
        if w.replacing:
            w.replacing = False
            w.restart_at = now
        else:
            delay = w.backoff.failure(w.started_at, now)
            w.restarts += 1
            w.restart_at = now + delay
            level = self.master.log.error if w.backoff.failures <= 3 else self.master.log.debug
            level("file watcher died; restarting it with backoff (the fleet keeps running)",
                  status=describe_status(event.status)[2], retry_in=round(delay, 3),
                  error=w.error, streak=w.backoff.failures)
        self._start_at(w.restart_at)

    # -- what to watch --------------------------------------------------------------------------

    def _log_notes(self, known: tuple[str, ...] = ()) -> None:
        for note in self.state.spec.notes:
            if note not in known:
                self.master.log.warning("not watched", note=note)

    def update_spec(self) -> None:
        """After a reload or a new import report: a changed watch list restarts the helper
        on the new one."""
        w = self.state
        notes = w.spec.notes
        if not w.rebuild(self.master.config, sys.path):
            return
        self._log_notes(known=notes)
        w.restart_at = 0.0  # in backoff: start on the new list now
        if w.pid is not None:
            w.replacing = True
            self.master.log.info("watch list changed; restarting the file watcher",
                                 watcher_pid=w.pid)
            self._signal(signal.SIGTERM)
        else:
            self._start_at(0.0)

    def _child_said(self, event: ev.ChildSaid) -> None:
        """A child's import report ("modules" lines): once the first report of a new
        generation is complete, the pool watches the files it lists (if they changed)."""
        message, child, pool = event.message, event.child, event.pool
        if not isinstance(message, msg.Modules):
            return
        if pool.config.command is not None or pool.config.watch == ():
            return  # a Python pool follows its imports unless watching is off
        report = self.state.add_report(pool.name, child.pid, child.generation,
                                       {"files": message.files, "more": message.more,
                                        "dropped": message.dropped}, self.master.children)
        if report is None:
            return
        self.master.log.info("watching the files the pool's code imported", pool=pool.name,
                             generation=report.generation, files=len(report.files),
                             child_pid=child.pid)
        if report.dropped:
            self.master.log.warning("import report cut short: some imported files are not "
                                    "watched; set watch: for this pool to choose its files",
                                    pool=pool.name, dropped=report.dropped)
        self.update_spec()

    # -- rolling --------------------------------------------------------------------------------

    def _schedule_roll(self) -> None:
        due = self.debouncer.due()
        if due is None:
            return
        if self._roll_timer is not None:
            self._roll_timer.cancel()
        self._roll_timer = self.master.loop.call_at(due, self.apply_changes)

    def apply_changes(self) -> None:
        """Roll what the debounced changes touched: the config file means a reload (the same
        path as `gearvisor reload`); code means only the pools whose globs matched."""
        if self.master.stopping:
            return
        batch = self.debouncer.pop(self.master.clock())
        if batch is None:
            self._schedule_roll()  # not quiet yet
            return
        if batch.config and self.master.reload(why="config file changed") is None:
            return  # a reload rolls every pool
        if batch.config and batch.pools:
            self.master.log.warning("rolling the pools whose code changed with their old "
                                    "config", pools=sorted(batch.pools))
        for name in sorted(batch.pools):
            pool = self.master.pools.get(name)
            if pool is not None and not pool.removed:
                self.master.roll_pool(pool, why=f"{batch.files} watched file(s) changed, e.g. "
                                                f"{', '.join(batch.sample[:3])}")

