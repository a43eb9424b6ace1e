"""Command pools (PHP, Perl, any language): their output, and when a child counts as ready.

A command child's stdout and stderr are pipes the master reads line by line into the log
(or a rotated `log_file`), rate-limited per pool (master/output.py). It is ready once it
lived `startsecs` (`ready: started`), or once gearmand's `workers` list shows every
function of the pool under the child's client id on every server that answers (`ready:
registered`, through the probe).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from gearvisor.child.command import client_id
from gearvisor.master import bus as ev
from gearvisor.master.component import Component
from gearvisor.master.output import MAX_LINE, OutputSink, line_text
from gearvisor.master.pipes import read_ready, take_lines
from gearvisor.policy.child import Child, ChildState

if TYPE_CHECKING:
    from gearvisor.config import Config
    from gearvisor.master.arbiter import Arbiter
    from gearvisor.master.loop import Timer
    from gearvisor.master.probe import Probe
    from gearvisor.policy.pool import Pool

REGISTERED_POLL = 0.25  # how often readiness is checked (and an early probe asked) while a
# child starts; the probe bounds how often it really asks (probe.REQUEST_GAP)
FINAL_READS = 64  # a dead child's pipe: at most this many reads, then it is closed


class Commands(Component):
    """Output capture and readiness of command children."""

    def __init__(self, probe: Probe) -> None:
        self.probe = probe
        self.sinks: dict[str, OutputSink] = {}
        self.report_timers: dict[str, Timer] = {}

    def attach(self, master: Arbiter) -> None:
        self.master = master
        master.bus.subscribe(ev.ChildSpawned, self._spawned)
        master.bus.subscribe(ev.ChildExited, self._exited)
        master.bus.subscribe(ev.Snapshot, lambda _e: self._check_registered())

    def reload(self, config: Config) -> None:
        for sink in self.sinks.values():
            sink.close()  # reopened with the new log_file settings on the next line
        self.sinks.clear()

    def close(self) -> None:
        self.reload(self.master.config)

    # -- output ---------------------------------------------------------------------------------

    def _spawned(self, event: ev.ChildSpawned) -> None:
        child, pool = event.child, event.pool
        if pool.config.command is None:
            return
        for fd in child.output:
            self.master.loop.add_reader(fd, lambda f=fd: self._read(child, pool, f))
        self.master.loop.call_at(child.started_at + pool.config.startsecs,
                                 lambda: self._check(child, pool))

    def _exited(self, event: ev.ChildExited) -> None:
        for fd in list(event.child.output):
            self._read(event.child, event.pool, fd, final=True)

    def _sink(self, pool: Pool) -> OutputSink:
        sink = self.sinks.get(pool.name)
        if sink is None:
            sink = self.sinks[pool.name] = OutputSink(pool.config,
                                                      self.master.log.bind(pool=pool.name))
        return sink

    def _read(self, child: Child, pool: Pool, fd: int, final: bool = False) -> None:
        """Log what a command child wrote; the pipe is closed at end of file, or with
        `final` (the child is dead) after what it holds now was read. A descendant that
        keeps the pipe open must not keep the master reading (or spinning)."""
        if fd not in child.output:
            return
        stream, buf = child.output[fd]
        data, eof = read_ready(fd, FINAL_READS if final else 1)
        sink = self._sink(pool)
        buf += data
        for line, cut in take_lines(buf, MAX_LINE, final=eof or final):
            sink.line(child.slot, child.pid, stream, line_text(line, cut))
        if eof or final:
            self.master.loop.remove_reader(fd)
            self.master.system.close(fd)
            del child.output[fd]
        due = sink.due()
        if due is not None and pool.name not in self.report_timers:
            # Dropped lines are reported even when no more lines come.
            def report(name: str = pool.name, s: OutputSink = sink) -> None:
                del self.report_timers[name]
                s.report()
            self.report_timers[pool.name] = self.master.loop.call_at(due, report)

    # -- readiness ------------------------------------------------------------------------------

    def _check(self, child: Child, pool: Pool) -> None:
        if child.state is not ChildState.STARTING or child.pid not in self.master.children:
            return
        if pool.config.ready == "started":
            self.master.child_ready(child, pool)
        elif self._registered(pool, child):
            self.master.child_ready(child, pool)
        else:
            self.probe.request({(s.host, s.port) for s in pool.config.servers})
            self.master.loop.call_later(REGISTERED_POLL, lambda: self._check(child, pool))

    def _check_registered(self) -> None:
        now = self.master.clock()
        for child, pool in list(self.master.children.values()):
            if (pool.config.command is not None and pool.config.ready == "registered"
                    and child.state is ChildState.STARTING
                    and now - child.started_at >= pool.config.startsecs
                    and self._registered(pool, child)):
                self.master.child_ready(child, pool)

    def _registered(self, pool: Pool, child: Child) -> bool:
        """gearmand lists the child's client id with every function of the pool, on each
        server that answers (an unreachable one does not hold the pool back)."""
        want = client_id(pool.config, child.slot, child.pid)
        needed = set(pool.config.functions)
        answered = False
        for server in pool.config.servers:
            view = self.probe.views.get((server.host, server.port))
            if view is None or not view.answered or view.workers is None:
                continue  # not asked yet, or not answering: does not hold the pool back
            answered = True
            if not any(w.client_id == want and needed <= set(w.functions)
                       for w in view.workers):
                return False
        return answered
