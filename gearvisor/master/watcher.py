"""The file-watcher helper, supervised like a child: forked, read over its pipe, restarted
with backoff when it dies, stopped with the master.

The helper (helpers/watcher.py's run_watcher) runs watchfiles' notifier, which needs a
thread, so it never runs in the master. It reports changes; this component debounces them
and rolls the pools they touch through the arbiter's verbs (the config file: a reload).
What each Python pool's children report importing feeds the watch list.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any, NoReturn

from gearvisor import messages as msg
from gearvisor.helpers.watcher import Debouncer, WatcherState, run_watcher
from gearvisor.master import bus as ev
from gearvisor.master.component import Component
from gearvisor.master.helper import HelperBody, HelperProcess

if TYPE_CHECKING:
    from gearvisor.config import Config
    from gearvisor.master.arbiter import Arbiter
    from gearvisor.master.loop import Timer


class Watcher(Component):
    """Runs the watcher helper and turns what it reports into rolls."""

    def __init__(self, config: Config) -> None:
        self.debouncer = Debouncer(config.watch_debounce)
        self.state = WatcherState.for_config(config, sys.path)
        self.helper = HelperProcess("file watcher", self._body, on_start=self._started,
                                    on_message=self.handle, record=self.state,
                                    describe=lambda: {"error": self.state.error})
        self._roll_timer: Timer | None = None

    def attach(self, master: Arbiter) -> None:
        self.master = master
        self.helper.attach(master)
        master.bus.subscribe(ev.ChildSaid, self._child_said)
        self._log_notes()
        self.helper.start_at(0.0)

    def reload(self, config: Config) -> None:
        self.debouncer.retime(config.watch_debounce)
        self.debouncer.pending = None  # this reload rolls every pool: nothing left to apply
        self.update_spec()

    def begin_stop(self, fast: bool) -> None:
        self.helper.begin_stop(fast)  # no input: SIGTERM

    def stop_overdue(self) -> None:
        self.helper.stop_overdue()

    def stopped(self) -> bool:
        return self.helper.stopped()

    def status(self, now: float) -> dict[str, Any]:
        return {"watcher": self.state.status(now, self.debouncer)}

    def close(self) -> None:
        self.helper.close()

    # -- the helper process ---------------------------------------------------------------------

    def _body(self) -> HelperBody | None:
        """What the next watcher runs: the spec of now (none while it is empty)."""
        spec, master_pid = self.state.spec, self.master.pid
        if spec.empty:
            return None

        def body(fd: int, _input: int, blocked: set[int]) -> NoReturn:
            run_watcher(spec, fd, master_pid, blocked)

        return body

    def _started(self, pid: int) -> None:
        self.state.paths, self.state.missing = [], []  # until the new one says

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
        if w.pid is not None:
            self.master.log.info("watch list changed; restarting the file watcher",
                                 watcher_pid=w.pid)
        self.helper.restart()  # in backoff too: start on the new list now

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

