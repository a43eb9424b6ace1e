"""The job store helper: the process that writes journal records to the store and submits
due retries, so the master never blocks on a database or a job server.

The master numbers each journal line a child sent and writes it to this helper's input
pipe as `<seq> <journal line>`; it keeps every line until this helper answers
`messages.Stored(seq=N)`: all lines up to N are committed. Each read burst (at most
READ_MAX bytes) is checked (journal/parse.py: a child's bytes are untrusted) and written in
one transaction, together with the last sequence number under this host and master run, so
a line the master sends again (to a restarted helper) is skipped, not stored twice.

When the store is down, this helper stops acking, reports `StoreState(up=False)`, keeps at
most PENDING_MAX bytes of lines in memory (and reads no more until they are written: the
master holds the rest) and reconnects with backoff. Every RETRY_EVERY seconds (sooner when
a retry it wrote falls due) it claims due retries and submits each as a background job to
the first job server that takes it, under record.retry_unique; a retry no server took is
unclaimed and waits for the next round. Any host's helper may claim any due retry: the
hosts sharing a store share their job servers. After a change it reports `StoreState` (dead
letters per function, retries submitted), at most once a second. At end of input it
commits what it holds and exits 0.

Run by the master through `run_store` (forked, two pipes).
"""

from __future__ import annotations

import os
import select
import sys
import time
from collections import Counter
from collections.abc import Callable
from typing import NoReturn

from gearvisor import messages as msg
from gearvisor.child.postfork import message_writer
from gearvisor.config.model import Server
from gearvisor.gearman.client import Client, ClientError
from gearvisor.journal import record
from gearvisor.journal.parse import Record, parse_line
from gearvisor.journal.settings import StoreSettings
from gearvisor.journal.store import Due, Store, StoreError, open_store
from gearvisor.lines import LineSplitter
from gearvisor.policy.backoff import Backoff

READ_MAX = 1 << 20  # bytes read in one burst, written as one transaction
PENDING_MAX = 8 << 20  # bytes of lines held while the store is down; then reading stops
MAX_INPUT_LINE = record.MAX_LINE + 32  # a journal line and its sequence number
RETRY_EVERY = 1.0  # seconds between claims of due retries
REPORT_EVERY = 1.0  # seconds between two state reports at least
CLAIM_LIMIT = 200  # retries claimed per round
LOST_AFTER = 6 * 3600.0  # seconds a submitted retry may go unheard of before it is sent again
LOST_EVERY = 60.0  # seconds between two looks for such retries
SUBMIT_TIMEOUT = 2.0  # seconds a job server gets to connect and answer one submit
RECONNECT_INITIAL = 0.5  # seconds before reconnecting to a store that failed; doubled
RECONNECT_MAX = 30.0
LOG_EVERY = 1.0  # seconds; at most LOG_BURST malformed-record messages per LOG_EVERY
LOG_BURST = 20


def default_run() -> str:
    """The master run's name when the settings give none: the parent's pid and start time
    (a pid alone is reused after a reboot, and with it a stale sequence number)."""
    import psutil

    ppid = os.getppid()
    try:
        return f"{ppid}-{int(psutil.Process(ppid).create_time())}"
    except psutil.Error:
        return str(ppid)


class StoreHelper:
    """The helper's state between reads; `serve` drives it. `clock` (monotonic) runs its
    timers, `wall` (epoch seconds) is what due times and records are compared with."""

    def __init__(self, settings: StoreSettings, report: Callable[[msg.Message], None],
                 clock: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time,
                 opener: Callable[..., Store] = open_store) -> None:
        self.settings = settings
        self.report = report
        self.clock = clock
        self.wall = wall
        self.opener = opener
        self.host = settings.host or os.uname().nodename
        self.key = f"{self.host}/{settings.run or default_run()}"
        self.store: Store | None = None
        self.up = False
        self.error = ""
        self.committed = 0  # the last sequence number the store holds under self.key
        self.pending: list[tuple[int, list[Record]]] = []
        self.pending_bytes = 0
        self.ack_owed = False  # lines were skipped as already committed: ack them
        self.refused = 0
        self.retries: Counter[tuple[str, str]] = Counter()
        self.to_mark: set[int] = set()  # submitted retries the store does not know yet
        self.to_unclaim: set[int] = set()
        self.backoff = Backoff(RECONNECT_INITIAL, RECONNECT_MAX, jitter=0.2,
                               reset_after=float("inf"))
        now = clock()
        self.next_connect = now
        self.next_claim = now
        self.next_lost = now  # the next look for submitted retries that were lost
        self.last_report = -float("inf")
        self.changed = True
        self._log_window = (now, 0)

    # -- the store's connection ------------------------------------------------------------------

    def connect(self) -> None:
        """Open the store (when due): take back this host's stale claims, recount the caps'
        counters, read the last committed sequence number. A failure schedules the next
        try (backoff)."""
        if self.store is not None or self.clock() < self.next_connect:
            return
        s = self.settings
        try:
            self.store = self.opener(s.url, s.state_dir, s.caps)
            # First what this helper itself knows about its claims (the store went down
            # between a claim and its answer), then the claims a dead helper left.
            self._settle()
            self.store.recover_claims(self.host)
            self.store.recount()
            self.committed = max(self.committed, self.store.last_seq(self.key))
        except StoreError as e:
            self.down(e)
            return
        store = self.store
        self.backoff.reset()
        if not self.up:
            self.up, self.error, self.changed = True, "", True
            self.log(f"job store {store.name} is up")

    def down(self, e: StoreError) -> None:
        """The store failed: drop the connection, retry after a backoff, report it."""
        if self.store is not None:
            self.store.close()
            self.store = None
        delay = self.backoff.failure(0.0, 0.0)
        self.next_connect = self.clock() + delay
        if self.up or self.error != str(e):
            self.log(f"{e}; trying again in {delay:.1f}s")
            self.changed = True
        self.up, self.error = False, str(e)

    # -- journal lines in ------------------------------------------------------------------------

    def take_line(self, line: bytes) -> None:
        """One `<seq> <journal line>` from the master: parsed and held for the next write,
        or skipped when that sequence number is committed already."""
        head, _, body = line.partition(b" ")
        if not head.isdigit() or len(head) > 18:
            self.refuse(f"input line without a sequence number ({line[:40]!r}); dropped")
            return
        seq = int(head)
        newest = self.pending[-1][0] if self.pending else self.committed
        if seq <= newest:
            self.ack_owed = True  # sent again after a restart: stored already
            return
        records, errors = parse_line(body, self.settings.caps.payload_cap)
        for text in errors:
            self.refuse(f"journal line {seq}: {text}")
        self.pending.append((seq, records))
        self.pending_bytes += len(line)
        if not self.up:
            self.changed = True  # `buffered` grew: reported (at most once a second)

    def flush(self) -> None:
        """Write what is held, in one transaction, and ack it; on failure keep it all."""
        if self.store is None:
            return
        # Lines held before the store said what it has (it was down when they came).
        if self.pending and self.pending[0][0] <= self.committed:
            self.pending = [(n, recs) for n, recs in self.pending if n > self.committed]
            self.pending_bytes = 0 if not self.pending else self.pending_bytes
            self.ack_owed = True
        if not self.pending:
            if self.ack_owed:
                self.ack_owed = False
                self.report(msg.Stored(seq=self.committed))
            return
        seq = self.pending[-1][0]
        records = [r for _, recs in self.pending for r in recs]
        try:
            self.store.write(records, now=self.wall(), seq=(self.key, seq))
        except StoreError as e:
            # The store may be down, or one record may be one it refuses (then every
            # retry of the batch would fail, and all that came after would wait behind
            # it). A store that still answers gets the batch again record by record,
            # without the ones it refuses.
            try:
                self.store.dead_counts()
                refused = self.store.write(records, now=self.wall(), seq=(self.key, seq),
                                           careful=True)
            except StoreError:
                self.down(e)
                return
            for text in refused:
                self.refuse(text)
        self.committed = seq
        self.pending, self.pending_bytes, self.ack_owed = [], 0, False
        self.report(msg.Stored(seq=seq))
        if any(r.failed for r in records):
            self.changed = True
        dues = [r.due for r in records if r.decision == "retry" and r.due is not None]
        if dues:  # claim at the first new due time, not only at the next round
            soon = self.clock() + max(0.0, min(dues) - self.wall())
            self.next_claim = min(self.next_claim, soon)

    @property
    def full(self) -> bool:
        return self.pending_bytes >= PENDING_MAX

    # -- retries out -----------------------------------------------------------------------------

    def claim_round(self) -> None:
        """Claim the due retries and submit each to the first job server that takes it;
        the rest go back to waiting. Then the next round in RETRY_EVERY."""
        if self.store is None or self.clock() < self.next_claim:
            return
        self.next_claim = self.clock() + RETRY_EVERY
        try:
            self._settle()
            if self.clock() >= self.next_lost:
                self.next_lost = self.clock() + LOST_EVERY
                if lost := self.store.requeue_lost(self.wall(), LOST_AFTER):
                    self.log(f"{lost} retries submitted over {LOST_AFTER / 3600:g}h ago never "
                             "reported back (a job server lost them?); they are due again")
            dues = self.store.claim_due(self.wall(), self.host, CLAIM_LIMIT)
        except StoreError as e:
            self.down(e)
            return
        if not dues:
            return
        clients: dict[Server, Client | None] = {}
        try:
            for due in dues:
                if self.submit(due, clients):
                    self.to_mark.add(due.id)
                    self.retries[(due.pool, due.function)] += 1
                    self.changed = True
                else:
                    self.to_unclaim.add(due.id)
        finally:
            for client in clients.values():
                if client is not None:
                    client.close()
        try:
            self._settle()
        except StoreError as e:
            self.down(e)

    def _settle(self) -> None:
        """Tell the store which claims went out and which wait again (kept until it hears:
        a store that failed meanwhile is told after it is back)."""
        assert self.store is not None
        if self.to_mark:
            self.store.submitted(sorted(self.to_mark))
            self.to_mark.clear()
        if self.to_unclaim:
            self.store.unclaim(sorted(self.to_unclaim))
            self.to_unclaim.clear()

    def submit(self, due: Due, clients: dict[Server, Client | None]) -> bool:
        """Submit one retry as a background job to the first job server that takes it.
        A server that failed once this round (None in `clients`) is not tried again."""
        unique = record.retry_unique(due.id, due.attempt, due.unique)
        for server in self.settings.servers:
            if server in clients and clients[server] is None:
                continue
            try:
                client = clients.get(server)
                if client is None:
                    client = Client(server.host, server.port, timeout=SUBMIT_TIMEOUT)
                    clients[server] = client
                client.submit_background(due.function, due.payload, unique)
                return True
            except (OSError, ClientError, ValueError) as e:
                old = clients.get(server)
                if old is not None:
                    old.close()
                clients[server] = None
                self.log_problem(f"retry {due.id} of {due.function}: job server {server}: "
                                 f"{type(e).__name__}: {e}; it waits")
        return False

    # -- reports ---------------------------------------------------------------------------------

    def maybe_report(self, force: bool = False) -> None:
        """Report the state after a change, at most once per REPORT_EVERY."""
        if not (self.changed or force) or self.clock() - self.last_report < REPORT_EVERY:
            return
        dead: dict[str, int] = {}
        if self.store is not None:
            try:
                dead = self.store.dead_counts()
            except StoreError as e:
                self.down(e)
        retries = [[pool, fn, n] for (pool, fn), n in sorted(self.retries.items())]
        self.report(msg.StoreState(up=self.up, error=self.error, dead=dead, retries=retries,
                                   buffered=len(self.pending), refused=self.refused))
        self.retries.clear()
        self.changed = False
        self.last_report = self.clock()

    def next_timer(self) -> float:
        """Seconds until something is due (a reconnect, a claim round, a report)."""
        now = self.clock()
        due = [self.next_connect if self.store is None else self.next_claim]
        if self.changed:
            due.append(self.last_report + REPORT_EVERY)
        return max(0.0, min(due) - now)

    def log(self, text: str) -> None:
        try:
            print(f"gearvisor store: {text}", file=sys.stderr, flush=True)
        except OSError:
            pass

    def refuse(self, text: str) -> None:
        """One input line or record refused: counted (reported, at most once a second) and
        logged (log_problem)."""
        self.refused += 1
        self.changed = True
        self.log_problem(text)

    def log_problem(self, text: str) -> None:
        """Log a malformed input at most LOG_BURST times per LOG_EVERY (a flood of bad
        records must not become a flood of log lines); the rest are only counted."""
        start, n = self._log_window
        now = self.clock()
        if now - start >= LOG_EVERY:
            start, n = now, 0
        if n < LOG_BURST:
            self.log(text)
        self._log_window = (start, n + 1)


def serve(settings: StoreSettings, in_fd: int, out_fd: int,
          helper: StoreHelper | None = None) -> int:
    """Read `<seq> <journal line>` lines from `in_fd` until end of input, store them, ack
    them and submit due retries, reporting on `out_fd`; returns the exit code (0)."""
    helper = helper or StoreHelper(settings, message_writer(out_fd))

    lines = LineSplitter(MAX_INPUT_LINE, lambda size: helper.refuse(
        f"input line longer than {MAX_INPUT_LINE} bytes ({size} seen); dropped"))
    closed = False
    while not closed:
        helper.connect()
        wait = helper.next_timer()
        ready = False
        if not helper.full:
            ready = bool(select.select([in_fd], [], [], wait)[0])
        elif wait > 0:
            time.sleep(min(wait, RETRY_EVERY))  # nothing to read until the store is back
        burst = 0
        while ready and burst < READ_MAX and not helper.full:
            chunk = os.read(in_fd, 65536)
            if not chunk:
                closed = True
                break
            burst += len(chunk)
            for line in lines.feed(chunk):
                helper.take_line(line)
            ready = bool(select.select([in_fd], [], [], 0)[0])
        helper.flush()
        helper.claim_round()
        helper.maybe_report()
    # End of input: one last try to commit what is held (the master has it if this fails).
    helper.next_connect = min(helper.next_connect, helper.clock())
    helper.connect()
    helper.flush()
    if helper.store is not None:
        try:
            helper._settle()
        except StoreError as e:
            helper.down(e)
        if helper.store is not None:
            helper.store.close()
    return 0


def run_store(settings: StoreSettings, in_fd: int, out_fd: int,
              blocked_signals: set[int]) -> NoReturn:
    """The body of the forked store helper (`in_fd`: the pipe the master writes numbered
    journal lines to; `out_fd`: its event pipe). Never returns."""
    from gearvisor.child.postfork import run_helper

    run_helper("gearvisor: store", blocked_signals, {in_fd, out_fd},
               lambda: serve(settings, in_fd, out_fd))
