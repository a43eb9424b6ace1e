"""Alerting in the master: bus events become the alert engine's facts, its notifications go
to the delivery helper, its state goes to the state file, and its verbs to the control
socket (`gearvisor alerts`, `alerts ack`, `silence add|list|expire`).

The engine (policy/alerts.py) is pure and decides what to send and when; this component
only feeds it and carries its decisions out:
- facts: ChildExited, ChildReady, FindingRaised/Cleared, Quarantined, CircuitOpened/Closed,
  PoisonJob, Reloaded and RollStarted (rolls), FleetReady and each rolled pool's progress
  (rolls done) are mapped to the engine's facts; a backlog_growing finding's drain estimate
  is kept and refreshed from each probe's Snapshot (BacklogDrain) until the queue is empty;
  every `alerts.sample_interval` the children's job counters (JobTick) and the open files
  of the master and of each pool's fullest child (FdUsage) are sampled;
- time: one loop timer at the engine's next_due() (wall clock: alert times mean the same
  after a restart);
- delivery: notifications are JSON lines written, without ever blocking, to the input pipe
  of a helper process (helpers/notifier.py) the master forks and restarts with backoff.
  The buffer is bounded (MAX_PENDING lines; the oldest are dropped and counted);
- state: after a change, the engine's snapshot is saved (at most every SAVE_EVERY seconds)
  to `state_dir`/state.sqlite3 and restored at start, so a restart neither re-pages nor
  forgets a silence or an ack.
"""

from __future__ import annotations

import json
import math
import os
import resource
import socket
import time
from typing import TYPE_CHECKING, Any, NoReturn

from gearvisor import messages as msg
from gearvisor.helpers.notifier import run_notifier
from gearvisor.master import bus as ev
from gearvisor.master.component import Component
from gearvisor.master.helper import HelperBody, HelperProcess
from gearvisor.master.probe import DOWN_AFTER, PROBE_TIMEOUT
from gearvisor.master.state import StateError, StateStore
from gearvisor.policy import alert_rules as facts
from gearvisor.policy.alert_model import parse_matcher
from gearvisor.policy.alerts import AlertEngine
from gearvisor.policy.backoff import Backoff
from gearvisor.policy.helper import HelperRecord
from gearvisor.policy.pool import ExitKind
from gearvisor.shm.stats import SUCCESS, p95

if TYPE_CHECKING:
    from gearvisor.config import Config
    from gearvisor.master.arbiter import Arbiter
    from gearvisor.master.loop import Timer

STATE_KEY = "alerts"
SAVE_EVERY = 1.0  # seconds: state saves are batched at most this often
MAX_PENDING = 10_000  # notification lines waiting for the helper; older ones are dropped
MAX_SILENCE = 366 * 86400.0  # the longest `silence add --for`
MAX_SEEN = 100_000  # (child, function) job counters remembered between samples
MAX_FD_CHILDREN = 1_000  # children whose open files one sample counts
MAX_FD_COUNT = 100_000  # open files counted per child, at most (a huge limit, a leak)
MAX_DRAINS = 1_000  # (function, server) backlogs whose drain time is followed
MAX_FIRING_LABELS = 200  # firing alerts whose pool/function the status lists (`top`'s marker)


def fd_usage(pid: int) -> tuple[int, int] | None:
    """A process' open files and its soft RLIMIT_NOFILE, from /proc/PID/fd and
    /proc/PID/limits (FdLimit for a child): None when it is gone, unreadable or unlimited.
    At most min(limit, MAX_FD_COUNT) files are counted, so one sample's work is bounded."""
    try:
        with open(f"/proc/{pid}/limits", "rb") as f:
            text = f.read(16384)
        soft = next((line.split()[3] for line in text.splitlines()
                     if line.startswith(b"Max open files")), b"")
        if not soft.isdigit() or int(soft) <= 0:
            return None
        used, most = 0, min(int(soft), MAX_FD_COUNT)
        with os.scandir(f"/proc/{pid}/fd") as entries:
            for _ in entries:
                used += 1
                if used >= most:
                    break
    except (OSError, IndexError, ValueError):
        return None  # it exited meanwhile, or runs as a user we cannot look at
    return used, int(soft)


class Alerts(Component):
    """The alert engine's driver; see the module docstring."""

    def __init__(self, config: Config, wall=time.time) -> None:
        self.config = config
        self.wall = wall
        self.engine: AlertEngine | None = None
        self.store: StateStore | None = None
        self.timer: Timer | None = None
        self.save_timer: Timer | None = None
        # The delivery helper. Its backoff ends only with a delivery, not with uptime: a
        # notifier that runs but cannot deliver is not well.
        self.notifier = HelperProcess(
            "alert notifier", self._notifier_body, with_input=True, max_pending=MAX_PENDING,
            on_drop=self._dropped, on_message=self._result, on_start=self._notifier_started,
            record=HelperRecord(backoff=Backoff(1.0, 60.0, multiplier=2.0, jitter=0.1,
                                                reset_after=math.inf)))
        self.delivered = 0
        self.failed = 0
        # Notifications sent to the helper whose outcome it has not reported: id -> line, in
        # id order. A notifier that dies (or restarts) with them is given them again, so a
        # crash costs at most a duplicate, never a page. Bounded by MAX_PENDING.
        self.unacked: dict[int, bytes] = {}
        self.next_note = 1
        self.stopping = False
        # Each child's per-function job counters at the last sample: (pid, function) ->
        # (ok, failed, bucket counts), so a sample feeds the engine what ended since.
        self.seen: dict[tuple[int, str], tuple[int, int, tuple[int, ...]]] = {}
        self.sampler: Timer | None = None
        self.fd_pools: set[str] = set()  # pools whose children's fds the last sample fed
        # Backlogs whose drain time is followed after their backlog_growing finding:
        # (function, server) -> our pools' completion rate then (jobs/s; None: unknown)
        self.drains: dict[tuple[str, str], float | None] = {}
        self.rolling: set[str] = set()  # pools rolled by RollStarted, until their roll ends

    # -- component ------------------------------------------------------------------------------

    def attach(self, master: Arbiter) -> None:
        self.master = master
        for verb, handler in (("alerts", self._verb_alerts), ("alerts.ack", self._verb_ack),
                              ("silence.add", self._verb_silence_add),
                              ("silence.list", self._verb_silence_list),
                              ("silence.expire", self._verb_silence_expire)):
            master.verbs[verb] = handler
        alerts = self.config.alerts
        if alerts is None or not alerts.enabled:
            return
        self.engine = AlertEngine(alerts, host=socket.gethostname())
        self._open_state()
        bus = master.bus
        bus.subscribe(ev.ChildExited, self._exited)
        bus.subscribe(ev.ChildReady, self._ready)
        bus.subscribe(ev.FindingRaised, self._finding_raised)
        bus.subscribe(ev.FindingCleared, self._finding_cleared)
        bus.subscribe(ev.Quarantined, lambda e: self._fact(
            facts.QuarantineFact(e.pool, e.slot, e.reason)))
        bus.subscribe(ev.CircuitOpened, lambda e: self._fact(facts.CircuitFact(e.pool, True)))
        bus.subscribe(ev.CircuitClosed, lambda e: self._fact(facts.CircuitFact(e.pool, False)))
        bus.subscribe(ev.PoisonJob, lambda e: self._fact(
            facts.PoisonFact(e.pool, e.function, e.strikes, e.last)))
        bus.subscribe(ev.Reloaded, self._reloaded)
        bus.subscribe(ev.RollStarted, self._roll_started)
        bus.subscribe(ev.Snapshot, self._snapshot)
        bus.subscribe(ev.FleetReady, self._rolls_done)
        bus.subscribe(ev.JournalState, self._journal)
        self.notifier.attach(master)
        if alerts.channels:
            self.notifier.start()
        self.sampler = master.loop.call_later(alerts.sample_interval, self._sample)
        self._deliver(self.engine.tick(self.wall()))

    def reload(self, config: Config) -> None:
        self.config = config
        if self.engine is not None and config.alerts is not None:
            self.engine.reconfigure(config.alerts)
            self._changed()
            # A backlog on a server no pool uses any more is probed no more: it resolves.
            used = {f"[{s.host}]:{s.port}" if ":" in s.host else f"{s.host}:{s.port}"
                    for pc in config.pools.values() for s in pc.servers}
            gone = [key for key in self.drains if key[1] not in used]
            for key in gone:
                del self.drains[key]
            if gone:
                self._deliver(self.engine.observe_all(
                    [facts.BacklogDrain(fn, server, 0, None) for fn, server in gone],
                    self.wall()))

    def begin_stop(self, fast: bool) -> None:
        self.stopping = True
        self._save()
        # End of input: the helper delivers what it holds (up to its own 30 s), exits.
        self.notifier.begin_stop(fast)

    def stop_overdue(self) -> None:
        self.notifier.stop_overdue()

    def stopped(self) -> bool:
        return self.notifier.stopped()

    def status(self, now: float) -> dict[str, Any]:
        if self.engine is None:
            return {}
        listed = self.engine.list_alerts(self.wall())
        firing = [a["labels"] for a in listed if a["state"] == "firing"]
        return {"alerts": {
            "firing": len(firing),
            # What each firing alert is about, so `gearvisor top` can mark its function
            # or pool without a second request; bounded (the count above is the whole).
            "firing_labels": [{k: labels.get(k) for k in ("alertname", "pool", "function")}
                              for labels in firing[:MAX_FIRING_LABELS]],
            "pending": sum(1 for a in listed if a["state"] == "pending"),
            "silences": sum(1 for s in self.engine.list_silences(self.wall())
                            if s["state"] == "active"),
            "notifier": {"pid": self.notifier.pid, "waiting": self.notifier.waiting,
                         "delivered": self.delivered, "failed": self.failed,
                         "dropped": self.notifier.dropped}}}

    def close(self) -> None:
        if self.sampler is not None:
            self.sampler.cancel()
        self.notifier.close()
        if self.store is not None:
            self._save()
            self.store.close()
            self.store = None

    # -- facts in -------------------------------------------------------------------------------

    def _fact(self, fact: facts.Fact) -> None:
        if self.engine is not None:
            self._deliver(self.engine.observe(fact, self.wall()))

    def _sample(self) -> None:
        """Every `alerts.sample_interval`: the jobs that ended since the last sample per pool
        and function (JobTick: FailureRate, SlowJobs) and the open fds of the master and of
        each pool's children (FdUsage)."""
        self.sampler = self.master.loop.call_later(self.config.alerts.sample_interval,
                                                   self._sample)
        ticks = []
        for child, pool in list(self.master.children.values()):
            ticks += self._job_ticks(child, pool.name)
        ticks += self._child_fds()
        try:
            used = len(os.listdir("/proc/self/fd"))
            limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        except OSError:
            used, limit = 0, 0
        if limit > 0 and limit != resource.RLIM_INFINITY:
            ticks.append(facts.FdUsage(used, limit))
        if ticks and self.engine is not None:
            self._deliver(self.engine.observe_all(ticks, self.wall()))

    def _child_fds(self) -> list[facts.Fact]:
        """Per pool, the open files of its child nearest its limit: the engine keeps one
        FdUsage per pool, and the fullest child is the one about to fail. A pool with no
        child counted now is fed zero, so its alert resolves."""
        fullest: dict[str, tuple[int, int]] = {}
        for child, pool in list(self.master.children.values())[:MAX_FD_CHILDREN]:
            usage = fd_usage(child.pid) if child.pid is not None else None
            if usage is None:
                continue
            had = fullest.get(pool.name)
            if had is None or usage[0] * had[1] > had[0] * usage[1]:
                fullest[pool.name] = usage
        out: list[facts.Fact] = [facts.FdUsage(used, limit, name)
                                 for name, (used, limit) in fullest.items()]
        out += [facts.FdUsage(0, 0, name) for name in self.fd_pools - fullest.keys()]
        self.fd_pools = set(fullest)
        return out

    def _job_ticks(self, child: Any, pool: str, final: bool = False) -> list[facts.Fact]:
        """What `child` finished since its last sample, per function. Counted per function
        only when metrics are on (children keep per-function counts only then)."""
        board = child.scoreboard
        if board is None or board.stats is None or child.pid is None:
            return []
        out: list[facts.Fact] = []
        for function, stats in board.stats.read().items():
            key = (child.pid, function)
            ok = stats.outcomes[SUCCESS]
            bad = sum(stats.outcomes) - ok
            last_ok, last_bad, last_buckets = self.seen.get(key, (0, 0, ()))
            buckets = tuple(stats.buckets)
            if final:
                self.seen.pop(key, None)
            elif key in self.seen or len(self.seen) < MAX_SEEN:
                self.seen[key] = (ok, bad, buckets)
            if ok == last_ok and bad == last_bad:
                continue
            delta = [b - a for a, b in zip(last_buckets or (0,) * len(buckets), buckets,
                                           strict=False)]
            out.append(facts.JobTick(pool, function, ok - last_ok, bad - last_bad,
                                     p95(stats.bounds, delta)))
        return out

    def _exited(self, event: ev.ChildExited) -> None:
        child, pool = event.child, event.pool
        ticks = self._job_ticks(child, pool.name, final=True)  # its last jobs
        job = child.scoreboard.read() if child.scoreboard is not None else None
        if job is not None and job.busy and event.decision.kind is not ExitKind.STOPPED:
            ticks.append(facts.JobTick(pool.name, job.function, 0, 1))  # died on it
        if ticks and self.engine is not None:
            self._deliver(self.engine.observe_all(ticks, self.wall()))
        # The engine's exit kinds are the pool's (crashed, boot_error, roll_failed, stopped).
        self._fact(facts.ChildExit(pool.name, child.slot, event.decision.kind.value))
        if child.killed_for == "timeout":
            running = child.running()
            function = running.function if running is not None else ""
            self._fact(facts.HardTimeout(pool.name, child.slot, function))
        if event.decision.kind is ExitKind.ROLL_FAILED:
            self._fact(facts.RollFact(pool.name, "halted", pool.halted or ""))
        self._roll_progress(pool)

    def _ready(self, event: ev.ChildReady) -> None:
        self._fact(facts.ChildReady(event.pool.name, event.child.slot))
        self._roll_progress(event.pool)

    def _finding_raised(self, event: ev.FindingRaised) -> None:
        f = event.finding
        self._fact(facts.FindingUp(f.kind.value, f.server, f.function, f.pool, f.message,
                                   dict(f.details)))
        if f.kind.value == "backlog_growing" and f.function is not None:
            # Backlog's `drain` threshold: the finding's estimate, then followed per probe
            # (_snapshot) after the growth stops, while jobs still wait.
            key = (f.function, f.server)
            rate, drain = f.details.get("completion_rate"), f.details.get("drain_seconds")
            if key in self.drains or len(self.drains) < MAX_DRAINS:
                self.drains[key] = float(rate) if isinstance(rate, (int, float)) else None
            self._fact(facts.BacklogDrain(f.function, f.server, int(f.details.get(
                "waiting", 0)), float(drain) if isinstance(drain, (int, float)) else None))

    def _snapshot(self, event: ev.Snapshot) -> None:
        """A probe's answer: the waiting jobs of each followed backlog on that server, and
        their drain time at the rate its finding measured; followed until none wait."""
        view = event.view
        if not self.drains or not view.answered:
            return  # a server that did not answer: ServerDown says it all
        ticks: list[facts.Fact] = []
        for (function, server), rate in list(self.drains.items()):
            if server != view.name:
                continue
            st = view.functions.get(function)
            waiting = max(0, st.queued - st.running) if st is not None else 0
            if not waiting:
                del self.drains[(function, server)]
            ticks.append(facts.BacklogDrain(function, server, waiting,
                                            waiting / rate if rate else None))
        if ticks and self.engine is not None:
            self._deliver(self.engine.observe_all(ticks, self.wall()))

    def _finding_cleared(self, event: ev.FindingCleared) -> None:
        f = event.finding
        self._fact(facts.FindingDown(f.kind.value, f.server, f.function, f.pool))

    def _journal(self, event: ev.JournalState) -> None:
        """The store helper's report: StoreDown, and DeadLetters per function."""
        if self.engine is not None:
            found: list[facts.Fact] = [facts.StoreFact(event.up, event.error)]
            found += [facts.DeadLetterCount(f, n) for f, n in event.dead.items()]
            self._deliver(self.engine.observe_all(found, self.wall()))

    def _reloaded(self, event: ev.Reloaded) -> None:
        for name, pool in self.master.pools.items():
            if not pool.removed:
                self._fact(facts.RollFact(name, "running"))

    def _roll_started(self, event: ev.RollStarted) -> None:
        """One pool rolls without a reload (`gearvisor restart`, watched files): its child
        alerts are muted until its roll ends (no FleetReady follows such a roll)."""
        if event.pool in self.master.pools:
            self.rolling.add(event.pool)
            self._fact(facts.RollFact(event.pool, "running"))

    def _roll_progress(self, pool: Any) -> None:
        """After a child of a rolling pool got ready or exited: has the roll ended? A roll
        that halted stays halted (RollHalted) until the next one."""
        if pool.name not in self.rolling:
            return
        finished, _ = pool.progress()
        if finished:
            self.rolling.discard(pool.name)
            if pool.halted is None:
                self._fact(facts.RollFact(pool.name, "done"))

    def _rolls_done(self, event: ev.FleetReady) -> None:
        """Start-up or a reload settled: every roll ended, but one that halted is still
        halted (FleetReady follows a halt too: the old children serve) until the next."""
        self.rolling.clear()
        for name, pool in self.master.pools.items():
            if pool.halted is None:
                self._fact(facts.RollFact(name, "done"))

    # -- time and state -------------------------------------------------------------------------

    def _deliver(self, notes: list[dict[str, Any]]) -> None:
        """Queue `notes` for the helper, then re-arm the timer and mark the state dirty."""
        if not self.config.alerts.channels:
            notes = []  # no channel configured: alerts are listed, not sent
        for note in notes:
            nid, self.next_note = self.next_note, self.next_note + 1
            line = json.dumps({**note, "id": nid}, separators=(",", ":")).encode()
            self.unacked[nid] = line
            while len(self.unacked) > MAX_PENDING:  # the oldest is no longer held for a resend
                del self.unacked[next(iter(self.unacked))]
            self.notifier.send(line)
        self._changed()

    def _changed(self) -> None:
        engine = self.engine
        if engine is None:
            return
        if self.timer is not None:
            self.timer.cancel()
        due = engine.next_due()
        if due is not None:
            delay = max(0.0, min(due - self.wall(), 3600.0))
            self.timer = self.master.loop.call_later(delay, self._tick)
        if self.store is not None and self.save_timer is None:
            self.save_timer = self.master.loop.call_later(SAVE_EVERY, self._save)

    def _tick(self) -> None:
        self.timer = None
        if self.engine is not None:
            self._deliver(self.engine.tick(self.wall()))

    def _open_state(self) -> None:
        try:
            self.store = StateStore(self.config.state_dir)
            saved = self.store.load(STATE_KEY)
        except StateError as e:
            self.master.log.error("alert state not kept: alerts work, but a restart forgets "
                                  "them", error=str(e))
            self.store = None
            return
        if saved is not None and self.engine is not None:
            try:
                self.engine.restore(saved)
                self.engine.hold(self.wall() + self.restore_grace())
            except ValueError as e:
                self.master.log.error("saved alert state unreadable; starting afresh",
                                      path=self.store.path, error=str(e))

    def restore_grace(self) -> float:
        """How long, after a restart, the facts that are not saved take to come back: the
        probe's findings (a server is down after DOWN_AFTER probes, no workers and backlogs
        after their own counts of probes, a registration shortfall after its grace) and
        the job-count samples. No restored alert resolves before it has passed."""
        c = self.config
        probes = max(DOWN_AFTER, c.findings.no_workers_probes, c.findings.backlog_probes) + 2
        return max(c.probe_interval * probes + PROBE_TIMEOUT, c.findings.registration_grace,
                   2 * c.alerts.sample_interval)

    def _save(self) -> None:
        self.save_timer = None
        if self.store is None or self.engine is None:
            return
        try:
            self.store.save(STATE_KEY, self.engine.snapshot())
        except StateError as e:
            self.master.log.error("alert state not saved", error=str(e))

    # -- the delivery helper --------------------------------------------------------------------

    def _notifier_body(self) -> HelperBody | None:
        """What the next notifier runs: the channels of now."""
        if self.config.alerts is None:
            return None
        channels = dict(self.config.alerts.channels)

        def body(w: int, r: int, blocked: set[int]) -> NoReturn:
            run_notifier(channels, r, w, blocked)

        return body

    def _notifier_started(self, pid: int) -> None:
        assert self.config.alerts is not None  # _notifier_body ran nothing without it
        self.master.log.info("alert notifier started", notifier_pid=pid,
                             channels=sorted(self.config.alerts.channels),
                             resent=len(self.unacked) or None)
        # What the last one took and never reported on goes again, in order (what was
        # queued for it is among these).
        self.notifier.replace(list(self.unacked.values()))

    def _dropped(self, line: bytes) -> None:
        """A notification the helper never got (MAX_PENDING waited): counted as dropped."""
        lost = json.loads(line)
        self.unacked.pop(lost.get("id"), None)
        self.master.bus.publish(ev.AlertNotified(str(lost.get("channel")), "dropped"))

    def _result(self, result: msg.Message) -> None:
        """One line the notifier wrote: a delivery's outcome."""
        if not isinstance(result, msg.Delivered) or result.pending:
            return  # (pending: the helper stopped first; the next one is given it again)
        self.unacked.pop(result.id, None)
        outcome = ("delivered" if result.ok else
                   "dropped" if result.attempts == 0 else "failed")
        self.master.bus.publish(ev.AlertNotified(result.channel, outcome))
        if result.ok:
            self.delivered += 1
            self.notifier.succeeded()
        else:
            self.failed += 1
            self.master.log.warning("alert notification not delivered",
                                    channel=result.channel, error=result.error,
                                    attempts=result.attempts)

    # -- control verbs --------------------------------------------------------------------------

    def _off(self) -> dict[str, Any] | None:
        if self.engine is None:
            return {"ok": False, "error": "alerting is off (alerts.enabled: false)"}
        return None

    def _verb_alerts(self, request: dict[str, Any]) -> dict[str, Any]:
        if (off := self._off()) is not None:
            return off
        assert self.engine is not None
        return {"ok": True, "alerts": self.engine.list_alerts(self.wall())}

    def _verb_ack(self, request: dict[str, Any]) -> dict[str, Any]:
        if (off := self._off()) is not None:
            return off
        assert self.engine is not None
        alert_id = request.get("id")
        if not isinstance(alert_id, str) or not alert_id:
            return {"ok": False, "error": "alerts ack: expected an alert id (see `gearvisor "
                    "alerts`)"}
        if not self.engine.ack(alert_id, self.wall()):
            return {"ok": False, "error": f"no firing or pending alert has the id "
                    f"{alert_id!r} (or more than one starts with it)"}
        self._changed()
        return {"ok": True, "acked": alert_id}

    def _verb_silence_add(self, request: dict[str, Any]) -> dict[str, Any]:
        if (off := self._off()) is not None:
            return off
        assert self.engine is not None
        raw = request.get("matchers")
        duration = request.get("for")
        if not isinstance(raw, list) or not all(isinstance(m, str) for m in raw):
            return {"ok": False, "error": "silence add: expected matchers such as pool=images"}
        if (not isinstance(duration, (int, float)) or isinstance(duration, bool)
                or not 0 < duration <= MAX_SILENCE):
            return {"ok": False, "error": "silence add: expected --for between 1s and 366d"}
        comment = request.get("comment") if isinstance(request.get("comment"), str) else ""
        by = request.get("by") if isinstance(request.get("by"), str) else ""
        now = self.wall()
        try:
            matchers = [parse_matcher(m) for m in raw[:32]]
            silence = self.engine.add_silence(matchers, now, now + duration, comment, by)
        except ValueError as e:
            return {"ok": False, "error": f"silence add: {e}"}
        self._deliver(self.engine.tick(now))
        return {"ok": True, "id": silence.id}

    def _verb_silence_list(self, request: dict[str, Any]) -> dict[str, Any]:
        if (off := self._off()) is not None:
            return off
        assert self.engine is not None
        return {"ok": True, "silences": self.engine.list_silences(self.wall())}

    def _verb_silence_expire(self, request: dict[str, Any]) -> dict[str, Any]:
        if (off := self._off()) is not None:
            return off
        assert self.engine is not None
        silence_id = request.get("id")
        if not isinstance(silence_id, str) or not self.engine.expire_silence(
                silence_id, self.wall()):
            return {"ok": False, "error": f"no active or pending silence has the id "
                    f"{silence_id!r} (see `gearvisor silence list`)"}
        self._deliver(self.engine.tick(self.wall()))
        return {"ok": True, "expired": silence_id}
