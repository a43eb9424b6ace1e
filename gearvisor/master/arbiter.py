"""The arbiter: pools and their children. Spawn, retire, reap, reload, stop, and the
signals that ask for them.

What to fork or retire is decided by pool.Pool (pure). The arbiter carries the decisions
out through the OS facade (master/system.py) on the loop (master/loop.py), and publishes
what happened on the bus (master/bus.py). Everything else the master does (the control
socket, the file watcher, command pools' output and readiness, hard timeouts and the
circuit, leftover processes, systemd) is a component (master/component.py) that reacts to
those events and calls the verbs here.
"""

from __future__ import annotations

import collections
import signal
import time
from collections.abc import Callable, Sequence
from enum import Enum
from typing import Any, NoReturn

from setproctitle import setproctitle

from gearvisor import log as logmod
from gearvisor import messages as msg
from gearvisor.child.command import exec_command
from gearvisor.child.python import run_child
from gearvisor.config import Config, ConfigError, PoolConfig, load
from gearvisor.control import default_socket_path
from gearvisor.journal.record import JOURNAL_PREFIX
from gearvisor.lines import read_cost
from gearvisor.master import bus as ev
from gearvisor.master.component import Component
from gearvisor.master.loop import Loop, Timer
from gearvisor.master.output import output_pipe
from gearvisor.master.pipes import read_lines
from gearvisor.master.status import fleet_status, summary
from gearvisor.master.system import System
from gearvisor.policy.backoff import jittered
from gearvisor.policy.child import (
    EXIT_BOOT_ERROR,
    Child,
    ChildState,
    RunningJob,
    describe_status,
    reported_job,
)
from gearvisor.policy.pool import Circuit, Pool, Retire, Spawn
from gearvisor.shm.bell import Bell
from gearvisor.shm.lanes import FOLLOWING, HOLDING_BELL, LENT, MAX_TAG, LaneHints
from gearvisor.shm.payload import PayloadArea
from gearvisor.shm.poison import PoisonList, PoisonTable, RunningJobs
from gearvisor.shm.scoreboard import Scoreboard
from gearvisor.shm.stats import JobStats

HANDLED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGHUP,
                   signal.SIGCHLD)
QUIT_TIMEOUT = 2.0  # fast stop: how long children get to die from SIGQUIT before SIGKILL
RETIRE_SIGNAL = signal.SIGHUP  # "finish your current job, then exit 0"
FINAL_READS = 64  # a dead child's pipe: at most this many reads of what it holds, then close


class StopMode(Enum):
    GRACEFUL = "graceful"  # children finish their current job (up to graceful_timeout)
    FAST = "fast"  # SIGQUIT now, SIGKILL after QUIT_TIMEOUT


class StartError(Exception):
    """A component cannot start (e.g. the control socket is taken); the master logs
    `event` with the error and exits 1."""

    def __init__(self, event: str, error: str) -> None:
        super().__init__(f"{event}: {error}")
        self.event, self.error = event, error


BELL_CHECK = 5.0  # seconds between looks for a pool generation left without a sleeper
BELL_RECHECK = 0.5  # ... and the second look at one that was (a hand-over takes microseconds)


MAX_FORKS_PER_PASS = 64  # children forked before the loop runs again (manage_pools)

# What a command child's fd 3 may carry (besides journal lines): its shim's reports, and
# the boot error child/command.py writes when the exec fails.
_COMMAND_EVENTS = (msg.JobStarted, msg.JobEnded, msg.BootError)


def stop_signals(pool: PoolConfig) -> tuple[int, int]:
    """The signals that retire (a roll) and stop (a graceful stop) a child of `pool`: a
    Python child's own, a command's from its config (reload_signal, else stop_signal)."""
    if pool.command is None:
        return RETIRE_SIGNAL, signal.SIGTERM
    stop = signal.Signals[pool.stop_signal]
    return (signal.Signals[pool.reload_signal] if pool.reload_signal else stop), stop


class Arbiter:
    """Forks and watches every pool's children, rolls them on reload, stops them on exit."""

    def __init__(self, config: Config, components: Sequence[Component] = (),
                 clock=time.monotonic, system: System | None = None) -> None:
        self.config = config
        self.clock = clock
        self.system = system or System()
        self.log = logmod.get()
        self.loop = Loop(clock, self.log)
        self.bus = ev.Bus(self.log)
        self.pid = self.system.getpid()
        self.started_at = clock()
        self.pools: dict[str, Pool] = {name: Pool(pc) for name, pc in config.pools.items()}
        self.children: dict[int, tuple[Child, Pool]] = {}
        # The jobs command children hold now, by RunningJob.ident: how many children each
        # (a dead child's counts until it is reaped; gearmand has handed its job on).
        self.command_jobs: collections.Counter[tuple[str, str, str]] = collections.Counter()
        self.components = list(components)
        self._attached: list[Component] = []  # (attach_components)
        self._fork_from = 0  # the pool (by order) the next pass's forks begin with
        # Control requests a component answers (e.g. "alerts"): verb -> handler(request)
        # returning the reply. The control component serves them beside its own verbs.
        self.verbs: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {}
        self.stopping: StopMode | None = None
        self.reloads = 0
        self.announced_ready = False  # FleetReady sent for start-up or the last reload
        # Shared with every child (mapped before any fork): poison strikes, and the job
        # each child runs.
        self.poison = PoisonTable()
        # Each command pool's poison jobs, for its workers' shims (poison_list).
        self.poison_lists: dict[str, PoisonList] = {}
        self._poison_list_error = ""  # the last error making one (logged when it changes)
        self.running = RunningJobs()
        # Who sleeps and who holds a job, by RunningJobs index (shm/lanes.py), and each
        # pool's tag in it.
        self.lane_hints = LaneHints(self.running.capacity)
        self.pool_tags: dict[str, int] = {}
        # Each pool generation's bell (wake_one, shm/bell.py), while it has children.
        self.bells: dict[tuple[str, int], Bell] = {}
        self._bell_timer: Timer | None = None
        self._deaf: set[tuple[str, int]] = set()  # followers and no holder at the last look
        self._next_pass: Timer | None = None
        self._stop_timer: Timer | None = None

    # -- running --------------------------------------------------------------------------------

    def run(self) -> int:
        """Run until stopped; return the process exit code."""
        try:
            self.attach_components()
        except StartError as e:
            self.log.error(e.event, error=e.error)
            return 1
        setproctitle(f"gearvisor: master -c {self.config.path}")
        self.system.become_subreaper()
        handlers = {signal.SIGTERM: self.handle_term, signal.SIGINT: self.handle_int,
                    signal.SIGQUIT: self.handle_quit, signal.SIGHUP: self.handle_hup,
                    signal.SIGCHLD: self.handle_chld}
        for sig, handler in handlers.items():
            self.loop.add_signal_handler(sig, lambda _sig, h=handler: h())
        self.loop.every_pass(self.manage)
        self.log.info("master started", config=self.config.path,
                      control_socket=self.config.control_socket or default_socket_path(),
                      pools={n: p.config.processes for n, p in self.pools.items()})
        self.reap()  # a SIGCHLD before the handler was set
        self.loop.run()
        self.log.info("master stopped")
        return 0

    def attach_components(self) -> None:
        """Attach each component in order; one that refuses to start (StartError) stops
        the rest, and close() then closes only those attached before it."""
        for component in self.components:
            component.attach(self)
            self._attached.append(component)

    def manage(self) -> None:
        """Each pass of the loop: carry out the pools' plans, announce readiness, and end
        the loop once a stop has nothing left to wait for."""
        now = self.clock()
        if self.stopping:
            if not self.children and all(c.stopped() for c in self.components):
                self.loop.stop()
            return
        self.manage_pools(now)
        self._announce_ready()
        due = min((d for d in (p.next_due() for p in self.pools.values()) if d is not None),
                  default=None)
        if due is not None and (self._next_pass is None or self._next_pass.cancelled
                                or self._next_pass.when != due):
            if self._next_pass is not None:
                self._next_pass.cancel()
            self._next_pass = self.loop.call_at(due, lambda: None)  # a pass runs after it

    def close(self) -> None:
        for component in self._attached:
            component.close()
        self.loop.close()
        self.poison.close()
        for listed in self.poison_lists.values():
            listed.close()
        self.running.close()
        self.lane_hints.close()
        for bell in self.bells.values():
            bell.close()

    # -- signals: each handler only queued the signal; these run from the loop ---------------

    def handle_chld(self) -> None:
        self.reap()

    def handle_term(self) -> None:
        self.stop(fast=False, why="SIGTERM")

    def handle_int(self) -> None:
        # A second Ctrl-C means "now".
        self.stop(fast=self.stopping is StopMode.GRACEFUL, why="SIGINT")

    def handle_quit(self) -> None:
        self.stop(fast=True, why="SIGQUIT")

    def handle_hup(self) -> None:
        if self.stopping:
            self.log.info("SIGHUP ignored: the master is stopping")
            return
        self.reload(why="SIGHUP")

    # -- children -------------------------------------------------------------------------------

    def manage_pools(self, now: float) -> None:
        """Carry out each pool's plan: fill empty slots, push rolls forward, scale. At most
        MAX_FORKS_PER_PASS forks a pass: a pool scaled to thousands fills over several
        passes, while the loop reaps, reads and answers the control socket between them
        (the next pass is due at once, and begins with the pool after the one that used
        them up, so one big pool does not hold back the others' restarts)."""
        forks = 0
        items = list(self.pools.items())
        first = self._fork_from % len(items) if items else 0
        for at, (name, pool) in enumerate(items[first:] + items[:first]):
            for action in pool.plan(now, self.child_busy):
                if isinstance(action, Spawn):
                    if forks >= MAX_FORKS_PER_PASS:
                        self._fork_from = first + at + 1
                        self.loop.call_later(0.0, lambda: None)  # (a pass runs after it)
                        return
                    forks += 1
                    self.spawn_child(pool, action, now)
                else:
                    self.retire(pool, action, now)
            if pool.removed and not pool.children():
                del self.pools[name]
                if name in self.poison_lists:
                    self.poison_lists.pop(name).close()
                self.log.info("pool removed", pool=name)
            elif name in self.poison_lists and pool.config.command is None and not any(
                    c.scoreboard is None for c in pool.children()):
                self.poison_lists.pop(name).close()  # (a command pool no more)

    def poison_list(self, pool: Pool) -> PoisonList | None:
        """The command pool's list of poison jobs (shm/poison.PoisonList), made the first
        time it is asked for; None if no memfd can be made (the log says so: the pool's
        workers run without it, as with no poison_after)."""
        listed = self.poison_lists.get(pool.name)
        if listed is None:
            try:
                listed = self.poison_lists[pool.name] = PoisonList()
            except OSError as e:
                if str(e) != self._poison_list_error:  # (asked at every spawn and strike)
                    self.log.error("cannot make the pool's list of poison jobs; its "
                                   "workers will run poison jobs again", pool=pool.name,
                                   error=str(e))
                self._poison_list_error = str(e)
        return listed

    def pool_tag(self, name: str) -> int:
        """The pool's tag in the lane hints (1-255; pools past 255 share tags)."""
        tag = self.pool_tags.get(name)
        if tag is None:
            tag = self.pool_tags[name] = len(self.pool_tags) % MAX_TAG + 1
        return tag

    def child_busy(self, child: Child) -> bool:
        """Is `child` running a job now (its scoreboard says so)? A child without one (a
        command pool's) counts as busy: we cannot tell, so it is not preferred."""
        board = child.scoreboard.read() if child.scoreboard is not None else None
        return board is None or board.busy

    def spawn_child(self, pool: Pool, action: Spawn, now: float) -> None:
        """Fork one child for `action`. The record is built before fork; the child's
        process-wide changes happen only after it."""
        slot = action.slot
        child = Child(pool=pool.name, slot=slot.index, generation=pool.generation,
                      started_at=now)
        command = pool.config.command is not None
        # An open circuit: a new child (a crash restart, a roll, a scale-up) serves nothing
        # until the probe has passed; only the probe itself takes jobs.
        start_paused = pool.circuit is not Circuit.CLOSED and not action.probe and not command
        child.paused = start_paused
        pipes: list[tuple[int, int]] = []
        try:
            if command:
                pipes = [output_pipe(), output_pipe()]
            else:
                # Per-function job counts for metrics (off: no counting in the child at all)
                child.scoreboard = Scoreboard(JobStats(pool.config.buckets)
                                              if self.config.metrics is not None else None,
                                              _payload_area(self.config, pool.config),
                                              lanes=_lanes(pool.config))
        except OSError as e:
            for fd in (fd for p in pipes for fd in p):
                self.system.close(fd)
            self.log.error("cannot create a child's pipes or scoreboard", pool=pool.name,
                           error=str(e))
            slot.restart_at = now + slot.backoff.failure(now, now)
            return
        board = child.scoreboard
        index = self.running.allocate() if board is not None else -1
        if board is not None:
            board.set_paused(start_paused)
        # (a pool of one child has nobody to hand over to: no bell, two syscalls per job less;
        # one that grows later gives its new children one)
        bell = self._bell(pool) if board is not None and index >= 0 and pool.config.wake_one \
            and pool.desired > 1 else None

        listed = self.poison_list(pool) if command and pool.config.poison_after else None

        def body(w: int, blocked: set[int]) -> NoReturn:
            if command:
                exec_command(self.config, pool.config, slot.index, w, pipes[0][1],
                             pipes[1][1], blocked, -1 if listed is None else listed.fd)
            run_child(self.config, pool.config, slot.index, pool.generation, w, self.pid,
                      blocked, board, self.poison, action.probation, start_paused,
                      self.running, index, self.lane_hints, self.pool_tag(pool.name), bell)

        try:
            pid, r = self.system.fork(body, HANDLED_SIGNALS)
        except OSError as e:
            for fd in (fd for p in pipes for fd in p):
                self.system.close(fd)
            self.running.release(index)
            if board is not None:
                board.close()
            if slot.replace_at is not None and action.successor:
                slot.replace_at = now + slot.backoff.failure(now, now)  # a replacement
            else:  # a fresh child, or a roll's successor: not again before the backoff
                slot.restart_at = now + slot.backoff.failure(now, now)
            if action.probe:
                pool.circuit_until = now + 1.0  # try the probe again in a second
            self.log.error("fork failed", pool=pool.name, slot=slot.index, error=str(e))
            return
        child.pid, child.event_fd, child.running_index = pid, r, index
        child.timeouts, child.timeout_grace = pool.config.timeouts, pool.config.timeout_grace
        child.kill_group = pool.config.kill_group
        child.retire_signal, child.stop_signal = stop_signals(pool.config)
        for (out_r, out_w), stream in zip(pipes, ("stdout", "stderr"), strict=False):
            self.system.close(out_w)
            child.output[out_r] = (stream, bytearray())
        if pool.config.max_lifetime:
            child.recycle_at = now + jittered(pool.config.max_lifetime,
                                              pool.config.recycle_jitter)
        pool.placed(action, child)
        self.children[pid] = (child, pool)
        self.loop.add_reader(r, lambda: self.read_events(child, pool))
        self.bus.publish(ev.ChildSpawned(child, pool))
        self.log.debug("child spawned", pool=pool.name, slot=slot.index, child_pid=pid,
                       generation=pool.generation, successor=action.successor)

    def retire(self, pool: Pool, action: Retire, now: float) -> None:
        """Tell a child to finish its current job and exit; SIGKILL it after
        graceful_timeout."""
        child = action.child
        pool.retiring(child)
        self.log.info("retiring child", pool=pool.name, slot=child.slot, child_pid=child.pid,
                      generation=child.generation, why=action.why)
        self.kill_child(child, child.retire_signal, now, pool.config.graceful_timeout)

    def child_ready(self, child: Child, pool: Pool) -> None:
        """`child` serves (it said so, or a command pool's readiness check passed)."""
        if child.state is not ChildState.STARTING:
            return  # told to stop before it got here: it is not serving
        child.transition(ChildState.READY)  # STARTING -> READY
        child.ready_at = self.clock()
        failures, replaced = pool.child_ready(child)
        ctx = dict(pool=pool.name, slot=child.slot, child_pid=child.pid,
                   generation=child.generation)
        if failures:
            self.log.info("child recovered", after_failures=failures, **ctx)
        else:
            self.log.debug("child ready", **ctx)
        if replaced is not None:
            why = (replaced.quarantined and "quarantined") or (
                "recycled" if replaced.generation == child.generation else
                f"replaced by generation {child.generation}")
            self.retire(pool, Retire(replaced, f"{why} (successor pid {child.pid})"),
                        self.clock())
        self.bus.publish(ev.ChildReady(child, pool))

    def read_events(self, child: Child, pool: Pool, final: bool = False) -> None:
        """What the child's event pipe holds now; closed at end of file, or with `final`
        (the child is dead, so all it wrote is there) after one bounded read. Once the
        master killed a command child for its job's hard timeout, that job stays its job:
        a job_ended or job_started it wrote before the kill landed changes nothing (the
        crash record, the strike and the alert are of the job it was killed for)."""
        lines, eof, dropped = read_lines(child.event_fd, child.event_lines,
                                         FINAL_READS if final else 1)
        if eof or final:
            self.loop.remove_reader(child.event_fd)
            self.system.close(child.event_fd)
            child.event_fd = -1
        elif lines or dropped:
            self._meter_events(child, pool, read_cost(lines, dropped))
        if dropped and not child.event_overflows:
            self.log.warning("event line from child too long; dropped (said once per child)",
                             pool=pool.name, child_pid=child.pid)
        child.event_overflows += bool(dropped)
        for line in lines:
            if line.startswith(JOURNAL_PREFIX):  # not decoded here: the store helper checks
                self.bus.publish(ev.JournalLines(child, pool, line))  # (reads child.job)
                if not child.killed_for:
                    self._set_job(child, None)  # a command worker's record: it is over
                continue
            try:
                message = msg.decode(line)
                if child.scoreboard is None and not isinstance(message, _COMMAND_EVENTS):
                    # (ready, recycle, quarantined... are the Python runtime's to say: a
                    # command worker that sent "recycle" would be replaced again and again)
                    raise msg.MessageError(f"{type(message).__name__} is not an event a "
                                           "command worker sends (job_started, job_ended, "
                                           "journal)")
            except msg.MessageError as e:
                # A command's fd 3 is its own to write: garbage is counted, and logged at
                # the 1st, 10th, 100th, ... line, so a flood cannot flood the log.
                child.event_unreadable += 1
                if _is_power_of_ten(child.event_unreadable):
                    self.log.warning("unreadable event from child", pool=pool.name,
                                     child_pid=child.pid, error=str(e),
                                     line=line[:200].decode(errors="replace"),
                                     unreadable=child.event_unreadable)
                continue
            if isinstance(message, msg.Ready):
                self.child_ready(child, pool)
            elif isinstance(message, msg.BootError):
                child.boot_error = message.reason
            elif child.scoreboard is None and child.killed_for and isinstance(
                    message, (msg.JobStarted, msg.JobEnded)):
                continue
            elif isinstance(message, msg.JobStarted) and child.scoreboard is None:
                # A command child's shim: its current job, for its hard timeout (health.py)
                # and a crash record (journal.py). A Python child's is on its scoreboard.
                journal = self.config.journal
                self._set_job(child, reported_job(message, self.clock(),
                                                  journal.payload_cap if journal.enabled
                                                  else 0))
            else:
                # (at a command child's JobEnded, subscribers still see the job in child.job)
                self.bus.publish(ev.ChildSaid(child, pool, message))
                if isinstance(message, msg.JobEnded):
                    self._set_job(child, None)

    def _set_job(self, child: Child, job: RunningJob | None) -> None:
        """A command child's current job (its shim said), counted in command_jobs."""
        if child.job is not None:
            self._count_job(child.job, -1)
        child.job = job
        if job is not None:
            self._count_job(job, 1)

    def _count_job(self, job: RunningJob, delta: int) -> None:
        n = self.command_jobs[job.ident] + delta
        if n > 0:
            self.command_jobs[job.ident] = n
        else:
            del self.command_jobs[job.ident]

    def _meter_events(self, child: Child, pool: Pool, cost: int) -> None:
        """A child's event pipe costs the master at most EVENT_BUDGET a second (ReadMeter):
        past it the pipe is not read until the second is over, so a worker that floods
        fd 3 blocks on its own writes instead of holding a core of the master (and every
        other pool's events and timers). A shim's two lines a job stay far below it."""
        resume_at = child.event_meter.spend(self.clock(), cost)
        if resume_at is None:
            return
        fd = child.event_fd
        self.loop.remove_reader(fd)
        if child.event_meter.throttled == 1:
            self.log.warning("child floods its event pipe; reading it at a bounded rate "
                             "(said once per child)", pool=pool.name, child_pid=child.pid,
                             budget_per_second=child.event_meter.budget)

        def resume() -> None:
            if child.event_fd == fd and self.children.get(child.pid, (None,))[0] is child:
                self.loop.add_reader(fd, lambda: self.read_events(child, pool))
        self.loop.call_at(resume_at, resume, quiet=True)

    def reap(self) -> None:
        """Collect every exited child (waitpid until nothing is left) and decide what next."""
        while (exited := self.system.waitpid()) is not None:
            pid, status = exited
            entry = self.children.pop(pid, None)
            if entry is None:
                # A helper, or an orphan of a child (the master is their subreaper).
                self.bus.publish(ev.OtherReaped(pid, status))
                continue
            child, pool = entry
            # The child is dead, so its pipe holds all it will ever write (a boot_error is
            # written just before exit): read what is there, then close it. Not to end of
            # file: a descendant that inherited it may keep it open for a long time.
            if child.event_fd >= 0:
                self.read_events(child, pool, final=True)
            child.transition(ChildState.EXITED)  # any -> EXITED
            self._bell_after_exit(child, pool)
            self.lane_hints.clear(child.running_index)
            self.on_child_exit(child, pool, status)
            if child.job is not None:
                self._count_job(child.job, -1)  # (child.job stays: the record of its death)
            self.running.release(child.running_index)  # after its strike, if any
            if child.scoreboard is not None:
                child.scoreboard.close()

    def _bell(self, pool: Pool) -> Bell | None:
        """The bell of the pool's current generation (made at its first fork)."""
        key = (pool.name, pool.generation)
        bell = self.bells.get(key)
        if bell is None:
            try:
                bell = self.bells[key] = Bell()
                if self._bell_timer is None:
                    self._bell_timer = self.loop.call_later(BELL_CHECK, self._check_bells,
                                                            quiet=True)
            except OSError as e:
                self.log.warning("cannot make the pool's bell (an eventfd); every idle child "
                                 "of this generation sleeps on the job servers",
                                 pool=pool.name, error=str(e))
        return bell

    def _check_bells(self) -> None:
        """Every BELL_CHECK while there are bells, on a quiet timer: the safety net under
        them (no child or bug may leave a pool deaf). A generation whose children wait on
        their bell while none holds the token is looked at again BELL_RECHECK later, and
        rung for if it still is. (A hand-over takes microseconds; a crash is rung for at
        once, _bell_after_exit.) The bell of a generation that has no children left and
        gets no more is closed."""
        hints = self.lane_hints
        deaf = set()
        for key in list(self.bells):
            pool = self.pools.get(key[0])
            live = self._generation(pool, key[1]) if pool is not None else []
            if self._close_bell_if_done(key, pool, live):
                continue
            states = [hints.bell(c.running_index) for c in live]
            # (a sleeper running a job with its token lent is no deafness: a follower wakes
            # if the job outlasts RING_LATER)
            if FOLLOWING in states and HOLDING_BELL not in states and LENT not in states:
                deaf.add(key)
        for key in deaf & self._deaf:
            self.log.warning("rang the pool's bell: its idle children waited on it and none "
                             "held the token", pool=key[0], generation=key[1])
            self.bells[key].ring()
        self._deaf = deaf - self._deaf
        self._bell_timer = (self.loop.call_later(BELL_RECHECK if self._deaf else BELL_CHECK,
                                                 self._check_bells, quiet=True)
                            if self.bells else None)

    def _bell_after_exit(self, child: Child, pool: Pool) -> None:
        """A child that held its generation's token, lent it, or followed (a ring may have
        woken it before it died), is gone: ring, unless a live sibling holds the token. (A second
        token, if the ring crossed a hand-over, folds into the first at the next take.)
        The bell of a generation that has no children left, and gets no more, is closed."""
        key = (pool.name, child.generation)
        bell = self.bells.get(key)
        if bell is None:
            return
        hints = self.lane_hints
        siblings = [c for c in self._generation(pool, child.generation) if c is not child]
        if hints.bell(child.running_index) and not any(
                hints.bell(c.running_index) == HOLDING_BELL for c in siblings):
            bell.ring()
        self._close_bell_if_done(key, pool, siblings)

    def _generation(self, pool: Pool, generation: int) -> list[Child]:
        """The live children of one generation of `pool`."""
        return [c for c in pool.children()
                if c.generation == generation and c.pid in self.children]

    def _close_bell_if_done(self, key: tuple[str, int], pool: Pool | None,
                            live: list[Child]) -> bool:
        """Close the bell of generation `key` if it has no `live` children and gets no
        more (its pool is gone, removed, or on a later generation)."""
        if live or (pool is not None and not pool.removed and pool.generation == key[1]):
            return False
        self.bells.pop(key).close()
        return True

    def on_child_exit(self, child: Child, pool: Pool, status: int) -> None:
        """Let the pool decide what a reaped child's exit means, and publish it."""
        now = self.clock()
        code, _, words = describe_status(status)
        if pool.config.command is not None and code == EXIT_BOOT_ERROR and not child.boot_error:
            # The worker's own exit 3, not ours: a failed exec says why (BootError) first.
            code = 1
        if (pool.config.command is not None and child.ready_at is None
                and child.stop_requested_at is None and code != EXIT_BOOT_ERROR):
            # A command that exits before it is ready (startsecs) failed to start. No uptime
            # in the reason (the log line has it): the same failure must read the same, or
            # a crash loop is logged once per attempt instead of once per streak.
            child.boot_error = (f"{pool.config.command[0]} {words} before startsecs "
                                f"({pool.config.startsecs:g}s)")
            code = EXIT_BOOT_ERROR
        decision = pool.child_exited(child, code, now, stopping=bool(self.stopping))
        self.bus.publish(ev.ChildExited(child, pool, status, decision))  # ExitLog words it

    def kill_child(self, child: Child, sig: int, now: float,
                   graceful_timeout: float | None = None, force: bool = False) -> None:
        """Ask a child to stop. A child already draining is not asked again (it is finishing
        a job; a second graceful signal would only restart its own alarm) unless `force`.
        The signal goes to the child alone: its current job may run processes of its own,
        and may finish. Its group gets SIGKILL at the deadline."""
        if child.state is ChildState.DRAINING and not force:
            return
        if child.state in (ChildState.STARTING, ChildState.READY):
            child.transition(ChildState.DRAINING)  # STARTING/READY -> DRAINING
        if child.stop_requested_at is None:
            child.stop_requested_at = now
        if graceful_timeout is not None:
            child.kill_at = now + graceful_timeout
            self.loop.call_at(child.kill_at, lambda: self._overdue(child))
        child.stop_signals += (int(sig),)
        self.signal_child(child, sig)

    def _overdue(self, child: Child) -> None:
        """A retired child outlived its graceful_timeout: SIGKILL its group."""
        entry = self.children.get(child.pid)
        if entry is None or entry[0] is not child or child.kill_at is None or self.stopping:
            return  # reaped meanwhile, or a stop's own deadline takes over
        self.log.warning("child did not finish in time; killing", pool=child.pool,
                         slot=child.slot, child_pid=child.pid,
                         graceful_timeout=entry[1].config.graceful_timeout)
        child.kill_at = self.clock() + 5.0  # if SIGKILL does not reap it, say so again later
        self.loop.call_at(child.kill_at, lambda: self._overdue(child))
        self.kill_now(child)

    def kill_now(self, child: Child) -> None:
        """SIGKILL a child (its whole group, with kill_group) for running out of time. Its
        job is no strike against that job (the hard job timeout is the one that counts)."""
        if child.killed_for != "timeout":
            child.master_killed = True
            self.running.forget(child.running_index)
        self.signal_child(child, signal.SIGKILL, group=True)

    def signal_child(self, child: Child, sig: int, group: bool = False) -> None:
        """Send `sig` to a child, or with `group` (and the pool's kill_group) to its whole
        process group. A child already gone is no error: reap() collects it."""
        if not (group and child.kill_group and self.system.killpg(child.pid, sig)):
            self.system.kill(child.pid, sig)

    # -- reload ---------------------------------------------------------------------------------

    def reload(self, why: str) -> str | None:
        """Re-read the config; refuse it whole if invalid (return the error, the fleet keeps
        its old config), else roll every pool to it (return None)."""
        try:
            new = load(self.config.path)
        except ConfigError as e:
            self.log.error("reload refused: invalid config; the fleet keeps its old config",
                           trigger=why, error=e.render())
            return f"invalid config, nothing changed\n{e.render()}"
        self.reloads += 1
        self.announced_ready = False
        if (new.log_level, new.log_format) != (self.config.log_level, self.config.log_format):
            logmod.configure(new.log_level, new.log_format)
            self.log = logmod.get()
        self.config = new
        now = self.clock()
        for name, pc in new.pools.items():
            pool = self.pools.get(name)
            if pool is None:
                self.pools[name] = Pool(pc)
                self.log.info("pool added", pool=name, processes=pc.processes)
                continue
            pool.removed = False
            for action in pool.roll(pc):
                self.retire(pool, action, now)
        for name, pool in self.pools.items():
            if name not in new.pools and not pool.removed:
                pool.remove()
                self.log.info("pool removed from the config; draining", pool=name)
        self.log.info("reloading: rolling every pool to new code and config", trigger=why,
                      generations={n: p.generation for n, p in self.pools.items()
                                   if not p.removed})
        for component in self.components:
            component.reload(new)
        self.bus.publish(ev.Reloaded(new, why))
        return None

    def roll_pool(self, pool: Pool, why: str) -> None:
        """Roll one pool to a new generation with its current config (new code)."""
        now = self.clock()
        for action in pool.roll():
            self.retire(pool, action, now)
        self.log.info("rolling pool to a new generation", pool=pool.name, trigger=why,
                      generation=pool.generation)
        self.bus.publish(ev.RollStarted(pool.name, why))

    def scale(self, pool: Pool, processes: int | None, by: str = "gearvisor scale",
              pin_for: float | None = None, **inputs: Any) -> int:
        """Run `processes` children in `pool` (None: the config's `processes` again) until
        a reload changes its size; the old size. `by` says who asked (`gearvisor scale`,
        the autoscaler, a pin that expired); `inputs` (what the autoscaler decided from)
        go into the one log line of the change. Published as a bus.Scaled."""
        before = pool.desired
        pool.scaled_to, pool.scaled_by = processes, by if processes is not None else None
        after = pool.desired
        if by == "gearvisor scale":
            inputs["note"] = (f"for {pin_for:g}s" if pin_for is not None else
                              "until the next reload" if pool.config.autoscale is not None
                              else "until the next reload that changes its processes")
        self.log.info("scaling pool", pool=pool.name, before=before, after=after, by=by,
                      **inputs)
        self.bus.publish(ev.Scaled(pool.name, before, after, by, pin_for))
        return before

    def _announce_ready(self) -> None:
        """Once start-up or a reload has settled: FleetReady (systemd's READY=1)."""
        if self.announced_ready or not all(p.settled() and p.progress()[0]
                                           for p in self.pools.values() if not p.removed):
            return
        self.announced_ready = True
        self.log.info("all pools ready" if not self.reloads else "reload finished",
                      children=len(self.children))
        self.bus.publish(ev.FleetReady(self.summary(), after_reload=bool(self.reloads)))

    # -- status ---------------------------------------------------------------------------------

    def status(self, now: float) -> dict[str, Any]:
        """`gearvisor status --json`."""
        return fleet_status(self, now)

    def parts(self, now: float) -> dict[str, Any]:
        """What each component adds to the status."""
        out: dict[str, Any] = {}
        for component in self.components:
            out.update(component.status(now))
        return out

    def summary(self) -> str:
        """One line for systemd's STATUS=."""
        return summary(self.pools.values(), self.parts(self.clock()).get("watcher"))

    # -- stopping -------------------------------------------------------------------------------

    def stop(self, fast: bool, why: str) -> None:
        """Graceful: children finish their current job (up to graceful_timeout), then SIGKILL.
        Fast: SIGQUIT now, SIGKILL after QUIT_TIMEOUT."""
        now = self.clock()
        if fast:
            if self.stopping is StopMode.FAST:
                return
            first = self.stopping is None
            self.stopping = StopMode.FAST
            self._stop_deadline(now + QUIT_TIMEOUT)
            self.log.info("fast stop", signal=why, children=len(self.children))
            if first:
                self.bus.publish(ev.Stopping(fast=True, why=why))
            for component in self.components:
                component.begin_stop(fast=True)
            for child, _ in list(self.children.values()):
                self.kill_child(child, signal.SIGQUIT, now, force=True)
            return
        if self.stopping:
            return
        self.stopping = StopMode.GRACEFUL
        timeout = max((p.config.graceful_timeout for p in self.pools.values()), default=0.0)
        self._stop_deadline(now + timeout)
        self.log.info("graceful stop: children finish their current job", signal=why,
                      children=len(self.children), graceful_timeout=timeout)
        self.bus.publish(ev.Stopping(fast=False, why=why))
        for child, _ in list(self.children.values()):
            self.kill_child(child, child.stop_signal, now)
        for component in self.components:
            component.begin_stop(fast=False)

    def _stop_deadline(self, when: float) -> None:
        if self._stop_timer is not None:
            self._stop_timer.cancel()
        self._stop_timer = self.loop.call_at(when, self.murder_children)

    def murder_children(self) -> None:
        """The stop deadline passed: SIGKILL every child still alive, and whatever the
        components still run; look again in 5 s if something is stuck."""
        for child, _ in list(self.children.values()):
            self.log.warning("child did not stop in time; killing", pool=child.pool,
                             slot=child.slot, child_pid=child.pid)
            self.kill_now(child)
        for component in self.components:
            component.stop_overdue()
        self._stop_deadline(self.clock() + 5.0)


def _is_power_of_ten(n: int) -> bool:
    """1, 10, 100, ...: when a count that grows one by one is worth a log line."""
    while n >= 10 and n % 10 == 0:
        n //= 10
    return n == 1


def _lanes(pool: PoolConfig) -> bool:
    """Does a child of `pool` hold the next job on second lanes (hold_next, prefetch 1)?"""
    return pool.hold_next and pool.prefetch == 1


def _payload_area(cfg: Config, pool: PoolConfig) -> PayloadArea | None:
    """The child's shared copy of its current job's payload (a crash record's payload):
    only with the journal on, and only for a pool with a function that keeps payloads."""
    if not cfg.journal.enabled or not any(
            mode != "drop" for mode in pool.failed_payload.values()):
        return None
    return PayloadArea(cfg.journal.payload_cap)
