"""The job journal in the master: children's journal lines and the master's own crash
records go to the store helper, and nothing is lost on the way.

- In: each journal line a child writes (the arbiter publishes it undecoded as
  JournalLines) and, for a child that died in the middle of a job, a record the master
  writes (crash_record) of the job it was running. A Python child's job is what it left in
  shared memory (its scoreboard: function, handle, unique, start; its payload area: the
  payload's first `payload_cap` bytes). A command child's is the last JobStarted its
  worker reported on fd 3 (child/command.py) not followed by JobEnded or a journal line;
  a worker that reports nothing has no job the master could record. A hard timeout or a
  stop's deadline is `killed`; any other death mid-job is a `crash`. Such a record is
  `requeued`: gearmand gives the job to another worker itself, and the store links that
  run's record to it. A command child's own journal lines (its shim's error records) are
  completed first (completed): the reported job's payload, a retry's attempt, and the
  function's retry decision, which a Python child computes itself. At a command child's
  JobEnded the master writes its success record (success_record) when that ends a
  failure, or with journal.successes on: the shims write none.
- Out: every line is numbered and kept in an Outbox until the store helper
  (helpers/store.py) acks its number, so a helper that dies, or a store that is down,
  loses nothing: a new helper is given every unacked line again. The Outbox is bounded in
  bytes (MAX_BYTES); past it the oldest lines are dropped and counted.
- The helper reports the store's state (up or down, dead letters per function, retries it
  submitted); it is published as JournalState for alerts and metrics, and shown in
  `gearvisor status`.
- Stop: the helper's input is closed only once every child is gone (their last records
  come on the way out), so a graceful stop writes everything.
"""

from __future__ import annotations

import base64
import collections
import dataclasses
import hashlib
import json
import random
import socket
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NoReturn

from gearvisor import messages as msg
from gearvisor.helpers.store import run_store
from gearvisor.journal.parse import MAX_RECORDS
from gearvisor.journal.record import FAILURES, MAX_LINE, journal_line, parse_unique
from gearvisor.journal.settings import Caps, StoreSettings
from gearvisor.master import bus as ev
from gearvisor.master.component import Component
from gearvisor.master.helper import HelperProcess
from gearvisor.master.outbox import Outbox
from gearvisor.policy.child import RunningJob, describe_status
from gearvisor.policy.retry import decide
from gearvisor.shm.poison import command_job_key

if TYPE_CHECKING:
    from gearvisor.config import Config
    from gearvisor.master.arbiter import Arbiter
    from gearvisor.master.helper import HelperBody
    from gearvisor.policy.child import Child
    from gearvisor.policy.pool import Pool

MAX_BYTES = 32 << 20  # journal lines kept for the store helper until it acks them
MAX_PENDING = 1_000_000  # lines the helper's input queue may hold (the Outbox bounds bytes)
MAX_REQUEUED = 4096  # command jobs remembered as recorded `requeued`, for their success


def crash_record(job: RunningJob, child: Child, pool: Pool, status: int, now: float,
                 wall: float, host: str) -> dict[str, Any]:
    """The journal record (journal/record.py) of `job`, which `child` died running: a
    `killed` one when the master killed it (hard timeout, stop deadline), else a `crash`.
    `now` is monotonic, `wall` epoch seconds, both at the exit."""
    outcome = "killed" if child.killed_for == "timeout" or child.master_killed else "crash"
    unique, attempt, retry_of = parse_unique(job.unique)
    words = describe_status(status)[2]
    why = ("killed by the master: " + ("its hard timeout passed" if child.killed_for
                                        == "timeout" else "a stop's deadline passed")
           if outcome == "killed" else f"the child {words} in the middle of the job")
    seconds = max(0.0, now - job.started)
    return {"outcome": outcome, "function": job.function, "unique": unique,
            "handle": job.handle, "server": None, "pool": pool.name, "slot": child.slot,
            "host": host, "generation": child.generation, "attempt": attempt,
            "retry_of": retry_of, "started": wall - seconds, "seconds": seconds,
            "error_class": "Killed" if outcome == "killed" else "Crash", "error": why,
            "traceback": None, **payload_fields(job, pool),
            # gearmand hands a job whose worker died to another worker: its next
            # record (same handle) decides whether it is retried or dead
            "decision": "requeued", "due": None}


def success_record(job: RunningJob, child: Child, pool: Pool, now: float, wall: float,
                   host: str) -> dict[str, Any]:
    """The success record of `job`, which a command child's shim said ended (JobEnded) and
    which ends a failure: a retry's or replay's run (its `gv:` unique), or a job that
    crashed a worker before. The shims write no success records themselves."""
    unique, attempt, retry_of = parse_unique(job.unique)
    seconds = max(0.0, now - job.started)
    return {"outcome": "success", "function": job.function, "unique": unique,
            "handle": job.handle, "server": None, "pool": pool.name, "slot": child.slot,
            "host": host, "generation": child.generation, "attempt": attempt,
            "retry_of": retry_of, "started": wall - seconds, "seconds": seconds}


def payload_fields(job: RunningJob, pool: Pool) -> dict[str, Any]:
    """What a failure record of `job` keeps of its payload (the master's copy: a Python
    child's payload area, a command child's JobStarted), by the function's failed_payload:
    the digest only of a whole payload."""
    mode = pool.config.failed_payload.get(job.function, "store")
    kept = job.payload is not None
    data = job.payload or b""
    return {"payload": base64.b64encode(data).decode() if mode == "store" and kept else None,
            "payload_sha256": (hashlib.sha256(data).hexdigest()
                               if mode in ("store", "hash") and kept and not job.cut
                               else None),
            "payload_size": job.size, "payload_cut": job.cut if kept else None}


def completed(line: bytes, job: RunningJob | None, pool: Pool, wall: float,
              rand: Callable[[], float] = random.random) -> bytes:
    """A command child's journal line (its reporting shim's records) with what only the
    master knows filled in, as a Python child writes it itself: a retry's attempt and
    retry_of (from the `gv:` unique the shim passes through), the payload of the job its
    JobStarted reported (a record of that job that has none), and, for a function with
    `retry:`, the decision (policy/retry.py). A record whose unique is empty is not
    retried: its attempts could not be counted (Perl's Gearman::Worker never sees the
    unique). The payload goes into one record only (the job is one job, however many
    records name it), and is left out again if the line would pass the store's line cap.
    A line that is no JSON (or nested too deep to decode), or holds more records than the
    store takes, or a record that is no object, is passed on as it is for the store helper
    to refuse and log."""
    try:
        records = json.loads(line)["records"]
    except (ValueError, TypeError, KeyError, RecursionError):
        return line
    if not isinstance(records, list) or len(records) > MAX_RECORDS:
        return line
    with_payload: dict[str, Any] | None = None
    for rec in records:
        if not isinstance(rec, dict):
            continue
        outcome, function, unique = rec.get("outcome"), rec.get("function"), rec.get("unique")
        if (not isinstance(outcome, str) or outcome not in FAILURES
                or not isinstance(function, str) or not isinstance(unique, str)):
            continue
        if "attempt" not in rec:
            rec["unique"], rec["attempt"], rec["retry_of"] = parse_unique(unique)
        if (job is not None and with_payload is None and rec.get("payload_size") is None
                and (job.function, job.handle) == (function, rec.get("handle"))):
            rec.update(payload_fields(job, pool))
            with_payload = rec
        policy = pool.config.retry.get(function)
        attempt = rec["attempt"]
        if (policy is not None and unique and isinstance(attempt, int)
                and not isinstance(attempt, bool)):
            rec["decision"], rec["due"] = decide(policy, outcome, attempt, wall, rand)
    done = journal_line(records).rstrip(b"\n")
    if len(done) > MAX_LINE and with_payload is not None and with_payload["payload"]:
        with_payload["payload"] = None  # (its digest and size stay)
        done = journal_line(records).rstrip(b"\n")
    return done if len(done) <= MAX_LINE else line


def store_settings(config: Config, host: str) -> StoreSettings:
    """What the store helper needs from the config: the store, its caps, and every job
    server a pool uses (due retries are submitted there)."""
    j = config.journal
    servers = tuple(dict.fromkeys(s for p in config.pools.values() for s in p.servers))
    return StoreSettings(url=j.url, state_dir=j.state_dir,
                         caps=Caps(j.max_entries, j.max_bytes, j.ttl, j.payload_cap),
                         servers=servers, host=host)


def safe_url(url: str) -> str:
    """A store URL without its password, for status and logs."""
    scheme, sep, rest = url.partition("://")
    creds, at, where = rest.rpartition("@")
    if not sep or not at:
        return url
    return f"{scheme}://{creds.partition(':')[0]}@{where}"


class Journal(Component):
    """The journal's driver; see the module docstring."""

    def __init__(self, config: Config, wall=time.time) -> None:
        self.config = config
        self.wall = wall
        self.host = socket.gethostname()
        self.outbox = Outbox(MAX_BYTES)
        self.helper: HelperProcess | None = None
        self._settings: StoreSettings | None = None  # what the running helper was given
        self.state: ev.JournalState | None = None
        self.retries: dict[tuple[str, str], int] = {}  # submitted, ever, per (pool, function)
        self.crashes = 0  # crash records this master wrote
        self.requeued: collections.OrderedDict[tuple[str, str, str], None] = (
            collections.OrderedDict())  # command jobs it recorded requeued (_requeued)
        self.stopping = False

    # -- component ------------------------------------------------------------------------------

    def attach(self, master: Arbiter) -> None:
        self.master = master
        master.bus.subscribe(ev.JournalLines, self._lines)
        master.bus.subscribe(ev.ChildExited, self._exited)
        master.bus.subscribe(ev.ChildSaid, self._said)
        if not self.config.journal.enabled:
            return
        self.helper = HelperProcess("job store", self._body, with_input=True,
                                    max_pending=MAX_PENDING, max_pending_bytes=MAX_BYTES,
                                    on_message=self._message,
                                    on_start=self._started)
        self.helper.attach(master)
        self.helper.start()

    def reload(self, config: Config) -> None:
        old, self.config = self.config.journal, config
        if self.helper is not None and (config.journal != old or store_settings(
                config, self.host) != self._settings):
            self.helper.restart()  # a new store or new caps: the next helper has them

    def begin_stop(self, fast: bool) -> None:
        self.stopping = True
        self._maybe_finish()

    def stop_overdue(self) -> None:
        if self.helper is not None:
            self.helper.stop_overdue()

    def stopped(self) -> bool:
        return self.helper is None or self.helper.stopped()

    def status(self, now: float) -> dict[str, Any]:
        if self.helper is None:
            return {}
        s = self.state
        return {"journal": {
            "store": safe_url(self.config.journal.url),
            "up": s.up if s is not None else None,
            "error": s.error if s is not None else "",
            "dead_letters": sum(s.dead.values()) if s is not None else None,
            "waiting": len(self.outbox), "dropped": self.outbox.dropped,
            "crash_records": self.crashes, "helper": self.helper.status()}}

    def close(self) -> None:
        if self.helper is not None:
            self.helper.close()

    # -- the helper -----------------------------------------------------------------------------

    def _body(self) -> HelperBody | None:
        settings = self._settings = store_settings(self.config, self.host)

        def body(out_fd: int, in_fd: int, blocked: set[int]) -> NoReturn:
            run_store(settings, in_fd, out_fd, blocked)
        return body

    def _started(self, pid: int) -> None:
        """A new helper: it gets every line not acked yet, in order (it skips the numbers
        it committed already). What the last one's queue held is among them."""
        assert self.helper is not None
        self.helper.replace(self.outbox.pending())

    def _message(self, message: msg.Message) -> None:
        if isinstance(message, msg.Stored):
            if self.outbox.ack(message.seq):
                self._buffered()
            if self.helper is not None:
                self.helper.succeeded()
        elif isinstance(message, msg.StoreState):
            retries = []
            for item in message.retries[:10_000]:
                if (isinstance(item, list) and len(item) == 3 and isinstance(item[0], str)
                        and isinstance(item[1], str) and isinstance(item[2], int)):
                    key = (item[0][:200], item[1][:200])
                    if key in self.retries or len(self.retries) < 10_000:
                        self.retries[key] = self.retries.get(key, 0) + max(0, item[2])
                    retries.append((key[0], key[1], max(0, item[2])))
            dead = {str(k)[:200]: v for k, v in list(message.dead.items())[:10_000]
                    if isinstance(v, int) and not isinstance(v, bool)}
            was_up = self.state.up if self.state is not None else None
            self.state = ev.JournalState(message.up, message.error, dead, tuple(retries))
            if message.up != was_up:
                log = self.master.log.info if message.up else self.master.log.error
                log("job store up" if message.up else
                    "job store down: records wait in the master (bounded) until it is back",
                    store=safe_url(self.config.journal.url), error=message.error or None,
                    waiting=len(self.outbox))
            self.master.bus.publish(self.state)

    def _send(self, line: bytes) -> None:
        framed = self.outbox.add(line)
        if self.helper is not None:
            self.helper.send(framed)
        self._buffered()

    def _buffered(self) -> None:
        self.master.bus.publish(ev.JournalBuffered(len(self.outbox), self.outbox.dropped))

    # -- records in -----------------------------------------------------------------------------

    def _lines(self, event: ev.JournalLines) -> None:
        if self.helper is None:
            return
        line, child = event.line, event.child
        if child.scoreboard is None:  # a command child's shim: complete its records
            line = completed(line, child.job, event.pool, self.wall())
        self._send(line)

    def _said(self, event: ev.ChildSaid) -> None:
        """A command child's JobEnded: the job succeeded. Recorded (as a Python child
        records it) when that ends a failure: a retry or replay, or a job that crashed a
        worker before (a strike, master/health.py; or a worker that holds it still, dead
        and not reaped yet), else only with journal.successes."""
        child, job = event.child, event.child.job
        if self.helper is None or job is None or not isinstance(event.message, msg.JobEnded):
            return
        # (another command child holds it too: its worker died and is not reaped yet,
        # gearmand handed the job on as its socket closed, and a short job ends before
        # the crash is recorded)
        crashed = job.ident in self.requeued or self.master.command_jobs[job.ident] > 1
        self.requeued.pop(job.ident, None)
        if (not self.config.journal.successes and not crashed
                and parse_unique(job.unique)[2] is None
                and not self.master.poison.strikes(command_job_key(
                    job.function, job.unique, job.handle, job.key))):
            return
        record = success_record(job, child, event.pool, self.master.clock(), self.wall(),
                                self.host)
        self._send(journal_line([record]).rstrip(b"\n"))

    def _exited(self, event: ev.ChildExited) -> None:
        job = event.child.job
        if self.helper is not None:
            if event.child.scoreboard is not None:
                job = self._scoreboard_job(event.child)
            if job is not None:
                self.crashes += 1
                record = crash_record(job, event.child, event.pool, event.status,
                                      self.master.clock(), self.wall(), self.host)
                self._send(journal_line([record]).rstrip(b"\n"))
                if event.child.scoreboard is None:
                    self._requeued(job)
        self._maybe_finish()

    def _requeued(self, job: RunningJob) -> None:
        """A command job this master recorded `requeued` (its worker died on it): when a
        command worker's shim says it ended, that success ends the failure, and is
        recorded whatever journal.successes says (a Python child does this itself). The
        newest MAX_REQUEUED are kept."""
        self.requeued[job.ident] = None  # (the key: handles repeat)
        self.requeued.move_to_end(job.ident)
        while len(self.requeued) > MAX_REQUEUED:
            self.requeued.popitem(last=False)

    def _maybe_finish(self) -> None:
        """Stopping and every child gone: the helper writes what it holds and exits."""
        if self.stopping and self.helper is not None and not self.master.children:
            self.helper.begin_stop(fast=False)

    @staticmethod
    def _scoreboard_job(child: Child) -> RunningJob | None:
        """The job a Python child's scoreboard says it was running (None when idle), with
        what its payload area kept of the payload."""
        job = child.running()
        board = child.scoreboard
        copy = board.payload.read() if job is not None and board and board.payload else None
        if job is None or copy is None:
            return job
        data, size, cut = copy
        return dataclasses.replace(job, payload=data, size=size, cut=bool(cut))
