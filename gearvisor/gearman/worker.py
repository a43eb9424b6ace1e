"""The Gearman worker runtime of one child: a connection to every job server, one thread.

The loop keeps one connection per server and drives each through a small state machine:

    DOWN -> CONNECTING -> GRABBING -> (job runs) -> GRABBING ...
                              \\-> EMPTY (NO_JOB) -> SLEEPING (PRE_SLEEP) -> NOOP -> GRABBING

Throughput comes from these choices (README): each result is written in the same send() as
the next GRAB, so a busy queue costs one round trip per job; while jobs come one at a time,
PRE_SLEEP goes in that send() too (Connection.dry), so a NO_JOB needs no write of ours, and
otherwise it is sent once every live server has answered NO_JOB (a NOOP's GRAB carries one
too: asleep means the queue was dry); a job that came in answer to such a GRAB is answered
with its result alone unless a NOOP waits behind it (Connection.nap: gearmand has us asleep
already), so a job that comes on its own costs two wake-ups, not three; and, with `prefetch`
above 1, while jobs are short and succeed, several GRABs stay in flight on a connection (see
Connection.depth). Several jobs then arrive in one read, and each result leaves before the
next job starts, with the GRAB that tops the connection up in the same write: no result
waits behind another job, and no timer or signal is needed to send it.

Lanes (`lanes`, the child's hold_next, with prefetch 1; docs/prefetch.md): while the queue is
busy each server gets a second connection (Connection.mate, .second) that asks for the next
job before the job in front runs, so it is here when that one ends. It holds at most one,
never sleeps, and is closed after LANE_LINGER asleep. Before a job runs, every other
connection with a GRAB out is handed to Lanes.holding; whoever implements it (the master,
through the child's scoreboard) may close them while the job runs, so that gearmand gives
their jobs to an idle child, and Lanes.released says which it closed: nothing read from
those runs (_mate_closed).

The pool's bell (`bell`, the child's wake_one; shm/bell.py): of a pool's idle children only
the one holding the bell's token sleeps on the servers (PRE_SLEEP); the others follow (wait
on the bell, EPOLLEXCLUSIVE), so gearmand wakes one child per job, not every idle one. The
sleeper rings when a job comes to it, before the job runs, and a follower takes over unless
the job ends within RING_LATER and the sleeper takes its token back (_lone).

A stop never runs more than the job running now: a job that arrives once the worker is
stopping (prefetched, or the answer to a GRAB in flight) is not started; the connection that
holds it is closed after the results already done are written (_hand_back), and gearmand
requeues what it had assigned on it for another worker. (gearmand counts that as a try: with
`gearmand -j N` a job handed back N times is failed.) A pause (quarantine, an open circuit)
still runs what was assigned, then unregisters. A server that goes away is reconnected with
backoff while jobs from the others keep flowing.

A broken or hostile server is that server's problem, never the child's: a malformed packet,
or one a job server must not send (an answer to a GRAB we never sent, a client's packet),
closes only that connection, which is retried after reconnect_max_delay; a job for a
function we never registered, or over max_job_size (its payload skipped as it arrives, never
held), is failed without running. None of it counts toward the child's quarantine, and what
is logged about one server is rate-limited (FaultLog).
"""

from __future__ import annotations

import errno
import fcntl
import functools
import os
import random
import socket
import struct
import termios
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Any, NamedTuple

from gearvisor.gearman.addresses import Address
from gearvisor.gearman.epoll import READ, WRITE, Poller
from gearvisor.gearman.protocol import (
    DEFAULT_MAX_PACKET,
    OVERSIZED_JOB,
    RES,
    Decoder,
    Packet,
    ProtocolError,
    encode,
    encode_result_packet,
)
from gearvisor.job import Job, JobTimeout, encode_result
from gearvisor.journal.record import RETRY_PREFIX, parse_unique

RECV_SIZE = 256 * 1024
SEND_TIMEOUT = 30.0  # a server that accepts no bytes for this long is treated as dead
RECV_TIMEOUT = 0.5  # a blocking read (the one-server fast path) gives the loop back this often
REPOLL_EMPTY = 0.5  # re-ask an EMPTY server this often while another keeps us busy
RECONNECT_INITIAL = 0.05
# A server's address is looked up again (getaddrinfo, which blocks this child: for seconds
# when DNS is down) at most this often; in between, and while a lookup fails, connections
# (both lanes) go to the last address it gave. A connect that fails after a lookup that
# worked has the next connect look it up again (the name may point elsewhere now).
RESOLVE_EVERY = 30.0
# A child asleep this long closes its second lanes, so an idle fleet shows one connection per
# child and server in gearmand's lists; the next busy queue opens them again.
LANE_LINGER = 0.5
FAST_PATH_CHECKS = 0.1  # every_tick checks while a queue drains: this often, not per job
# Prefetch grows only while jobs end successfully within this time: a job that is slower, or
# fails, drops the connection back to one GRAB in flight at once. So prefetched jobs wait
# behind short jobs, and a worker that starts failing (quarantine) holds few jobs.
PREFETCH_FAST = 0.001
# Handing jobs back on a stop: how long to wait for gearmand to close its end (it has read
# our results by then), and how many reads of what it still sends are discarded meanwhile.
HAND_BACK_WAIT = 1.0
HAND_BACK_READS = 64
# The largest job payload a server may send unless the pool sets max_job_size: the packet
# limit the codec has always had, so nothing that was accepted before is refused now.
DEFAULT_MAX_JOB = DEFAULT_MAX_PACKET
# Packets other than jobs (NO_JOB, NOOP, ERROR...) are a few bytes; a server that announces
# more than this is not a job server, and is not given the memory.
MAX_CONTROL_PACKET = 1024 * 1024
# What one server's misbehaviour may write to the log: the first FAULT_BURST lines, then one
# summary per FAULT_INTERVAL while it goes on.
FAULT_BURST = 5
FAULT_INTERVAL = 60.0

GRAB = encode(Packet.GRAB_JOB_ALL)
PRE_SLEEP = encode(Packet.PRE_SLEEP)
RESET = encode(Packet.RESET_ABILITIES)
_ASSIGN = (Packet.JOB_ASSIGN, Packet.JOB_ASSIGN_UNIQ, Packet.JOB_ASSIGN_ALL)
_TAKEN = (*_ASSIGN, OVERSIZED_JOB)  # what gearmand assigned us (a job to run or refuse)
_NONE_WAITING = bytes(4)  # FIONREAD's answer (an int's bytes) when nothing is waiting


class ConnState(Enum):
    DOWN = "down"  # not connected; retry at conn.retry_at
    CONNECTING = "connecting"  # non-blocking connect in flight
    GRABBING = "grabbing"  # GRAB(s) sent, answer pending (conn.outstanding > 0)
    IDLE = "idle"  # connected, nothing in flight (only while stopping)
    EMPTY = "empty"  # answered NO_JOB
    SLEEPING = "sleeping"  # PRE_SLEEP sent; a NOOP wakes it


# The states and the packet types the per-job path compares with, as module globals: an
# Enum's member is looked up through EnumType's __getattr__ hook on Python 3.11 (about 50 ns,
# unspecialized), several times per job; a global is read from the specialized cache.
_DOWN, _CONNECTING, _GRABBING = ConnState.DOWN, ConnState.CONNECTING, ConnState.GRABBING
_IDLE, _EMPTY, _SLEEPING = ConnState.IDLE, ConnState.EMPTY, ConnState.SLEEPING
_JOB_ASSIGN, _JOB_ASSIGN_UNIQ = Packet.JOB_ASSIGN, Packet.JOB_ASSIGN_UNIQ
_NO_JOB, _NOOP = Packet.NO_JOB, Packet.NOOP


@dataclass(frozen=True)
class Keepalive:
    idle: int = 30
    interval: int = 10
    count: int = 3


class Hooks:
    """What the runtime tells its host (the child): override what you need."""

    def ready(self) -> None:
        """Registered on every reachable server."""

    def job_started(self, job: Job) -> None:
        """A job is about to run."""

    def job_finished(self, job: Job, ok: bool, seconds: float) -> None:
        """A job ended; ok is False when it failed or raised. Called before its result is
        sent: what decides whether more jobs are taken (quarantine) goes here, and what a
        crash right after must find (the job no longer running)."""

    def job_answered(self, job: Job, ok: bool, seconds: float) -> None:
        """The job's result went out (or its connection dropped): the bookkeeping that
        nothing sent depends on (counts, records, the process title), done after the send
        so the result does not wait for it."""

    def job_failed(self, job: Job, error: Exception, timed_out: bool) -> None:
        """A job raised `error` (called just before job_finished); `timed_out`: it ran past
        its soft timeout (JobTimeout was raised in it), so the failure is a timeout even if
        the job code turned the JobTimeout into another exception."""

    def job_refused(self, job: Job) -> None:
        """A job was answered WORK_FAIL without running: poison, over max_job_size, or for a
        function we do not serve. Not the child's failure: it never counts toward quarantine."""

    def job_poisoned(self, job: Job) -> None:
        """A job was refused as poison (it killed `poison_after` workers already); by
        default the same as any refusal."""
        self.job_refused(job)

    def waiting(self) -> None:
        """No server has a job for us: the worker sleeps until one does."""


class JobTimer:
    """Arms the soft timeout of one job (the child implements it with SIGALRM)."""

    timed_out = False  # JobTimeout was raised in the current job (reset when one starts)

    def start(self, seconds: float) -> None:
        """The job may run `seconds`; then it receives JobTimeout."""

    def stop(self) -> None:
        """The job ended."""

    def hold(self) -> None:
        """The runtime writes to a server: a timeout now must wait (see release)."""

    def release(self) -> None:
        """The write is done: a timeout that fired meanwhile is raised now."""


class Lanes:
    """What lets a child hold the next job on a second connection per server (docs/
    prefetch.md): whoever can close that connection while job code runs (the master) must
    know which one it is, and the child must know if it did. The child implements this with
    its scoreboard; the defaults here say "never closed"."""

    def allowed(self) -> bool:
        """Second lanes may take jobs now (False: the closer cannot close them here)."""
        return True

    def holding(self, lanes: list[tuple[int, int]], now: float) -> None:
        """A job starts while these other connections (socket fd, local port) have a GRAB
        in flight: the job each brings, if one comes, waits unless its lane is closed."""

    def released(self) -> int:
        """That job ended: the lanes are ours again. Returns which were closed meanwhile
        (bit i for the i-th given to holding): gearmand has requeued what they held, and
        nothing read from them may run."""
        return 0


class Bell:
    """The pool's bell, as the worker sees it (`wake_one`; shm/bell.py): of a pool's idle
    children only the one that holds its token sleeps on the servers; the others follow (wait
    for `fd` to be readable, and send no PRE_SLEEP, so gearmand does not wake them)."""

    fd = -1  # readable when rung: watched with EPOLLEXCLUSIVE, so a ring wakes one follower

    def take(self) -> bool:
        """The token, if it is there (non-blocking)."""
        return True

    def ring(self, later: bool = False) -> None:
        """Give the token back: one follower wakes and takes it, at once or (`later`) only
        if it was not taken back within shm/bell.py's RING_LATER."""

    def heard(self) -> None:
        """A follower woke (`fd` was readable): make `fd` unreadable again before trying to
        take the token."""

    def standing(self, state: int) -> None:
        """Where this child stands now: FOLLOWING, HOLDING_BELL, LENT or 0 (shm/lanes.py)."""


FOLLOWING, HOLDING_BELL, LENT = 1, 2, 3  # (Bell.standing; the values of shm/lanes.py)
_BELL = object()  # the poller's data for the bell (gearman/epoll.py)


class FaultLog:
    """Rate limit for what one job server's misbehaviour writes to the log (pure; the caller
    passes the monotonic time). The first `burst` problems are logged one by one; past that
    they are counted, and due() hands out the count once per `interval` for a summary line.
    An interval that passes with nothing suppressed ends the episode: the next problem is
    logged in full again. So a flood costs at most `burst` + 1 lines per interval."""

    __slots__ = ("burst", "interval", "logged", "suppressed", "since")

    def __init__(self, burst: int = FAULT_BURST, interval: float = FAULT_INTERVAL) -> None:
        self.burst = burst
        self.interval = interval
        self.logged = 0  # lines logged one by one in this episode
        self.suppressed = 0  # problems not logged since the last summary
        self.since = -interval  # start of the current interval

    def allow(self, now: float) -> bool:
        """One more problem: True to log it, False when it is only counted."""
        if not self.suppressed and now - self.since >= self.interval:
            self.since = now  # quiet for a whole interval: a new episode
            self.logged = 0
        if self.logged < self.burst:
            self.logged += 1
            return True
        self.suppressed += 1
        return False

    @property
    def due_at(self) -> float:
        """When the summary of the suppressed problems is due (inf: nothing suppressed)."""
        return self.since + self.interval if self.suppressed else float("inf")

    def due(self, now: float) -> int:
        """How many problems to summarise now (0: none, or not due yet); the next interval
        starts."""
        if not self.suppressed or now < self.since + self.interval:
            return 0
        n, self.suppressed, self.since = self.suppressed, 0, now
        return n


class _LookedUp(NamedTuple):
    """A server's address as a lookup gave it, and when to look again (Worker._address)."""

    family: int
    sockaddr: Any
    due: float  # the next connect after this looks the name up again
    ok: bool  # the last lookup worked (else this is the one before it)


class Connection:
    """One job server: its socket, decoder and state."""

    __slots__ = ("host", "port", "label", "sock", "decoder", "state", "retry_at", "delay",
                 "deadline", "empty_since", "answered", "attempts", "down_logged", "ever_up",
                 "can_do", "outstanding", "depth", "job_send", "faults", "faulted", "dry",
                 "presleep", "woke", "nap", "mate", "second", "sent", "local_port", "lane",
                 "others")

    def __init__(self, host: str, port: int, second: bool = False) -> None:
        self.host = host
        self.port = port
        self.label = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self.can_do = False  # the server believes we serve our functions (CAN_DO sent)
        self.sock: socket.socket | None = None
        self.decoder = Decoder()
        self.state = _DOWN
        self.retry_at = 0.0
        self.delay = RECONNECT_INITIAL
        self.deadline = 0.0  # connect deadline
        self.empty_since = 0.0
        self.answered = False  # the server answered since CAN_DO: registration is in effect
        self.attempts = 0  # failed attempts in the current outage
        self.down_logged = False
        self.ever_up = False
        self.outstanding = 0  # GRABs sent and not answered yet (JOB_ASSIGN* or NO_JOB)
        # GRABs to keep in flight: 1, doubled after each short successful job up to the
        # worker's prefetch; back to 1 after a slow or failed job, or NO_JOB.
        self.depth = 1
        # The last GRAB was answered NO_JOB: the queue was dry, so the next result's write
        # also carries PRE_SLEEP (presleep: sent, its GRAB not answered yet). A NO_JOB then
        # puts the connection to sleep without another write: one send per job fewer when
        # jobs come one at a time. A job in answer to a GRAB that went with a result ends
        # it, so a busy queue (a drain) never gets a PRE_SLEEP, which gearmand would answer
        # with a NOOP while jobs wait; one in answer to the GRAB a NOOP woke (woke) does
        # not: jobs that come one at a time each arrive that way.
        self.dry = False
        self.presleep = False
        self.woke = False
        # The job running now came in answer to a GRAB with a PRE_SLEEP after it: gearmand
        # has this connection asleep already (or has queued a NOOP: a job is waiting). If no
        # NOOP is here when the job ends, its result goes alone, and the connection sleeps
        # with no GRAB, NO_JOB or wake-up of ours: two wake-ups per job that comes on its
        # own (a foreground round trip), where a GRAB would cost three.
        self.nap = False
        self.job_send: Callable[[int, bytes, bytes], None] | None = None  # set by Worker
        self.faults = FaultLog()  # kept across reconnects: a server that keeps misbehaving
        self.faulted = False  # last closed for misbehaving (its reconnect is not news)
        # Lanes (Worker's `lanes`): the other connection to the same server, and whether
        # this is the second one, which holds the next job while the queue is busy and never
        # sleeps. `sent` orders the GRABs of both: the older one is answered first.
        self.mate: Connection | None = None
        self.second = second
        self.sent = 0
        self.local_port = 0  # this end's port, so the closer can tell the socket is the same
        self.lane = (-1, 0)  # (socket fd, local_port) as Lanes.holding is given it
        self.others: tuple[Connection, ...] = ()  # the worker's other connections (lanes)


class Worker:
    """Runs jobs for a set of functions against every configured job server.

    Args:
        servers: (host, port) pairs.
        functions: gearman function name -> callable(job).
        client_id: sent with SET_CLIENT_ID; gearmand's `workers` admin command shows it.
        log: a structlog logger bound with the pool and slot.
        hooks: readiness and job notifications for the host process.
        exception_packet: "warning" (WORK_WARNING + WORK_FAIL) or "exception"
            (WORK_EXCEPTION + WORK_FAIL): how a job that raised is reported.
        prefetch: the most GRABs kept in flight per server while jobs are short (1: one job
            per round trip, never more than one job assigned to this worker per server).
        lanes: with prefetch 1, hold the next job on a second connection per server while
            the queue is busy (Lanes says who may close it); None: one connection each.
        max_job_size: the largest job payload a server may make this worker hold, in bytes;
            a bigger job is failed (WORK_FAIL, with a warning saying why) without reading it.
        bell: the pool's bell (wake_one): this worker sleeps on the servers only while it
            holds the token, and otherwise waits on the bell; None: it always sleeps on them.
        addresses: (host, port) -> (family, sockaddr) known already (the master's, at
            fork): used without a lookup for RESOLVE_EVERY.
    """

    def __init__(
        self,
        servers: list[tuple[str, int]],
        functions: dict[str, Callable[[Job], Any]],
        client_id: str,
        log: Any,
        hooks: Hooks | None = None,
        connect_timeout: float = 5.0,
        reconnect_max_delay: float = 2.0,
        keepalive: Keepalive = Keepalive(),
        exception_packet: str = "warning",
        clock: Callable[[], float] = time.monotonic,
        timeouts: dict[str, float] | None = None,
        timer: JobTimer | None = None,
        is_poison: Callable[[Job], bool] | None = None,
        prefetch: int = 1,
        max_job_size: int = DEFAULT_MAX_JOB,
        lanes: Lanes | None = None,
        bell: Bell | None = None,
        addresses: dict[tuple[str, int], Address] | None = None,
    ) -> None:
        self.max_job_size = max_job_size
        # Each server's last looked-up address (_address). Those the master had when it
        # forked this child (`addresses`, gearman/addresses.py) count as just looked up.
        fresh = clock() + RESOLVE_EVERY
        ours = set(servers)
        self._addresses: dict[tuple[str, int], _LookedUp] = {
            key: _LookedUp(family, addr, fresh, True)
            for key, (family, addr) in (addresses or {}).items() if key in ours}
        self.conns = [Connection(h, p) for h, p in servers]  # one per server: readiness, sleep
        # With lanes (and prefetch 1), a second connection per server holds the next job
        # while one runs; `all` is every connection, both lanes.
        self.lanes = lanes if max(1, prefetch) == 1 else None
        self._seconds: list[Connection] = []
        if self.lanes is not None:
            for conn in self.conns:
                conn.mate = Connection(conn.host, conn.port, second=True)
                conn.mate.mate = conn
                conn.mate.faults = conn.faults  # one rate limit per server, both lanes
                self._seconds.append(conn.mate)
        # Every connection: each server's first lane, then the second lanes (with lanes).
        self.all = self.conns + self._seconds
        for conn in self.all:
            # (what may hold a job while one runs on conn: _run_job)
            conn.others = tuple(c for c in self.all if c is not conn)
            conn.job_send = functools.partial(self._job_send, conn)
            conn.decoder = self._decoder()
        self.functions = functions
        self._names = {name.encode(): name for name in functions}  # a job's function, decoded
        self.client_id = client_id
        self.log = log
        self.hooks = hooks or Hooks()
        self.connect_timeout = connect_timeout
        self.reconnect_max_delay = reconnect_max_delay
        self.keepalive = keepalive
        self.exception_packet = exception_packet
        self.clock = clock
        self.timeouts = timeouts or {}
        self.timer = timer or JobTimer()
        self.is_poison = is_poison
        self.prefetch = max(1, prefetch)
        self.stopping = False
        self.is_ready = False
        self.paused = False  # registered without functions: takes no jobs (quarantine, circuit)
        self._want_paused = False
        self.sel = Poller()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self.sel.register(self._wake_r, READ, None)
        self._can_do = b"".join(encode(Packet.CAN_DO, f) for f in functions)
        self._client_id = encode(Packet.SET_CLIENT_ID, client_id)
        self._extra_checks: list[Callable[[], None]] = []
        self._dues: list[Callable[[], float]] = []  # when a check needs a pass (every_tick)
        # One receive buffer for every connection: recv() of a fresh 256 KiB bytes object
        # costs an mmap, mremap and munmap per call.
        self._rbuf = memoryview(bytearray(RECV_SIZE))
        self._summary_due = float("inf")  # when a FaultLog summary is due (_log_suppressed)
        self._more = False  # frames follow the one being handled, in this read (_read)
        self._sent = 0  # GRABs written so far (Connection.sent: which lane to read first)
        self._close_lanes_at = float("inf")  # asleep since then + LANE_LINGER (_waiting)
        self.bell = bell
        self.holds = False  # the bell's token: the one child of the pool asleep on the servers
        self.following = False  # waiting on the bell (not asleep on the servers)
        self.lent = False  # we rang for later (a job came) and took no token since (_give)

    # -- public ------------------------------------------------------------------------------

    @property
    def wakeup_fd(self) -> int:
        """Write end of the self-pipe: pass it to signal.set_wakeup_fd()."""
        return self._wake_w

    def stop(self) -> None:
        """Ask the loop to finish its current job and return. Safe in a signal handler."""
        self.stopping = True

    def pause(self) -> None:
        """Stop taking jobs (after the current one): RESET_ABILITIES on every server, so
        gearmand keeps the jobs queued for others. Safe in a signal handler."""
        self._want_paused = True

    def resume(self) -> None:
        """Take jobs again (CAN_DO each function, GRAB). Safe in a signal handler."""
        self._want_paused = False

    def _apply_pause(self) -> None:
        """Make every connection match the wanted mode. RESET_ABILITIES is never sent while
        a GRAB is unanswered: gearmand would requeue a job it is assigning to us right then,
        and we would run it anyway (run twice). The answer comes first (_settle)."""
        self.paused = paused = self._want_paused
        if paused and (self.holds or self.following):
            self._leave_bell()  # (a paused child is nobody's sleeper)
        for conn in self.all:
            state = conn.state
            if conn.sock is None or state is _CONNECTING:
                continue  # registers in the right mode when the connect finishes
            # (taking jobs, _settle has work only for an IDLE connection: it GRABs)
            if state is not _GRABBING and (paused or state is _IDLE):
                self._settle(conn)

    def _settle(self, conn: Connection) -> None:
        """A connection with nothing in flight: unregister it (paused), or register and grab
        (not paused); stopping leaves it idle."""
        if self.paused or self._want_paused:
            if conn.can_do and not self._send(conn, RESET):
                return  # the connection dropped: it reconnects (unregistered) from DOWN
            conn.can_do = False
            conn.state = _IDLE
        elif not self.stopping and conn.state is _IDLE and not conn.second:
            # (an idle second lane is at rest: it GRABs when the queue is busy, _fill_mate)
            if self._grab(conn, b"" if conn.can_do else self._can_do):
                conn.can_do = True

    def every_tick(self, check: Callable[[], None],
                   due: Callable[[], float] | None = None) -> None:
        """Run `check` on every loop pass (every FAST_PATH_CHECKS while a queue drains).

        An idle worker has no pass of its own: it sleeps until a server, a signal or a due
        timer wakes it. `due` returns when `check` next needs a pass (monotonic seconds, as
        the worker's clock; inf: only when something else wakes the loop), so a host that
        waits for something (a journal batch the pipe had no room for) is not left asleep.
        """
        self._extra_checks.append(check)
        if due is not None:
            self._dues.append(due)

    def run(self) -> None:
        """Serve jobs until stop() is called and no answer to a GRAB is outstanding."""
        now = self.clock()
        for conn in self.conns:
            self._connect(conn, now)
        only = self.conns[0] if len(self.conns) == 1 else None
        checked = 0.0
        while True:
            if only is not None and not self.stopping and self._want_paused == self.paused:
                # One server, a GRAB just sent: gearmand answers it at once (a job or NO_JOB),
                # so read without epoll and without the loop's bookkeeping: the fast path of
                # a queue being drained. The socket's receive timeout bounds the wait, and
                # the checks run every FAST_PATH_CHECKS seconds, not per job. With lanes,
                # the lane whose GRAB went first is read first: its answer came first.
                conn: Connection | None = only
                mate = only.mate
                if only.sock is None or only.state is _CONNECTING:
                    conn = None  # (the loop below reconnects it, or finishes its connect)
                elif mate is not None and mate.state is not _DOWN:
                    if mate.state is _GRABBING:
                        if only.state is not _GRABBING or mate.sent < only.sent:
                            conn = mate
                    elif mate.state is _CONNECTING:
                        conn = None  # (its connect finishes in the loop below)
                if conn is not None and conn.state is _GRABBING:
                    self._read(conn)
                    now = self.clock()
                    if now - checked >= FAST_PATH_CHECKS:
                        checked = now
                        for check in self._extra_checks:
                            check()
                        if now >= self._summary_due:
                            self._log_suppressed(now)
                    continue
            now = self.clock()
            if self.stopping:
                self._leave_bell()  # first: the hand-backs below may take a while
                # No job runs here: what the GRABs in flight bring is not ours to start.
                for conn in self.all:
                    if conn.state is _GRABBING:
                        self._hand_back(conn, 0)
                break
            # Asleep on the only server, its second lane at rest, the mode as wanted
            # (_settled): _apply_pause has nothing to do, and _tick and _timeout look at
            # their timers only (every round trip's pass).
            settled = (only is not None and only.state is _SLEEPING
                       and self._settled(only.mate))
            if not settled:
                self._apply_pause()
            self._tick(now, settled)
            timeout = self._timeout(now, settled)
            for fileobj, conn in self.sel.select(timeout):
                if conn is None:
                    self._drain_wakeups()
                elif conn is _BELL:
                    self._rung()
                elif conn.sock is not fileobj:
                    continue  # closed (or reopened) while this batch ran: not this socket
                elif conn.state is _CONNECTING:
                    self._finish_connect(conn)
                else:
                    self._read(conn)
            for check in self._extra_checks:
                check()
        self.close()

    def close(self) -> None:
        """Close every connection; gearmand then unregisters this worker."""
        for conn in self.all:
            if conn.sock is not None:
                self._close_socket(conn)
        self.sel.close()
        for fd in (self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass

    # -- loop pieces ---------------------------------------------------------------------------

    def _drain_wakeups(self) -> None:
        try:
            while os.read(self._wake_r, 512):
                pass
        except BlockingIOError:
            pass

    def _tick(self, now: float, settled: bool = False) -> None:
        """The loop's timers, then each connection's due work; `settled` (_settled): no
        connection has any, only the timers are looked at."""
        if now >= self._summary_due:
            self._log_suppressed(now)
        if settled:
            if now >= self._close_lanes_at:
                self._close_idle_lanes()
            return
        live = []
        for conn in self.all:
            state = conn.state
            if state is _DOWN:
                # (a second lane connects when the queue is busy: _fill_mate)
                if now >= conn.retry_at and not self.stopping and not conn.second:
                    self._connect(conn, now)
            elif state is _CONNECTING:
                if now >= conn.deadline:
                    self._drop(conn, f"connect timed out after {self.connect_timeout:g}s")
            elif not conn.second:
                live.append(conn)
        if now >= self._close_lanes_at:
            self._close_idle_lanes()
        if self.stopping or self.paused or not live:
            return
        empty = asleep = 0
        for c in live:
            if c.state is _EMPTY:
                empty += 1
            elif c.state is _SLEEPING:
                asleep += 1
        if empty and empty + asleep == len(live):
            if self.following:
                return  # (the bell wakes us)
            if self.bell is not None and len(live) == len(self.conns) and not self._take():
                # Another child of the pool sleeps on the servers for all of us: wait for
                # it to hand over. (A child with a server down sleeps on the others itself,
                # and takes no token: the pool's sleeper must be asleep on every server.)
                self._follow(now)
                return
            # Every server said NO_JOB: sleep on all of them; a NOOP from any wakes us.
            # (One that got its PRE_SLEEP with a result is asleep already.)
            self._pre_sleep(live)
            self._waiting(now)
            return
        for conn in live:
            # Another server keeps us busy; do not starve this one.
            if conn.state is _EMPTY and now - conn.empty_since >= REPOLL_EMPTY:
                self._grab(conn)

    def _timeout(self, now: float, settled: bool = False) -> float | None:
        """How long select() may sleep: until the next thing that is due (a reconnect, a
        connect deadline, a re-poll of an EMPTY server, a FaultLog summary, a host check's
        `due`), or None (no limit) when nothing is. A worker asleep on every server (PRE_SLEEP
        sent) then costs no wake-up at all: a NOOP, a signal (the wakeup fd) or a dropped
        connection wakes it. A dead server is found by TCP keepalive, a dead master by
        PR_SET_PDEATHSIG (a signal), so neither needs a periodic look. `settled`: no
        connection is due for anything (_settled), only the timers are looked at."""
        due = min(self._summary_due, self._close_lanes_at)
        for conn in () if settled else self.all:
            if conn.state is _DOWN:
                if not self.stopping and not conn.second:  # (stopping reconnects nothing)
                    due = min(due, conn.retry_at)
            elif conn.state is _CONNECTING:
                due = min(due, conn.deadline)
            elif conn.state is _EMPTY and self._taking() and not self.following:
                # (_tick re-polls then)
                due = min(due, conn.empty_since + REPOLL_EMPTY)
        for when in self._dues:
            due = min(due, when())
        if due == float("inf"):
            return None
        return max(0.0, due - now)

    def _settled(self, mate: Connection | None) -> bool:
        """With the only server's first lane asleep: is there nothing for _apply_pause and
        _tick to do? True when the mode is as wanted (taking jobs) and the second lane, if
        any, is at rest (IDLE) or closed (DOWN: a second lane reconnects only when the
        queue is busy, _fill_mate), so no connection is due for anything. (With one server
        a follower's lane is EMPTY, never SLEEPING.) A new duty of _tick or _apply_pause in
        that state must make this False, or be one of the timers _tick still looks at."""
        return (not self.paused and not self._want_paused
                and (mate is None or mate.state is _IDLE or mate.state is _DOWN))

    def _pre_sleep(self, conns: list[Connection]) -> None:
        """PRE_SLEEP on each of `conns` that said NO_JOB: a NOOP from any wakes us."""
        for conn in conns:
            if conn.state is _EMPTY and self._send(conn, PRE_SLEEP):
                conn.state = _SLEEPING

    def _may_sleep(self) -> bool:
        """May this worker be asleep on the servers (send PRE_SLEEP)? Without a bell always;
        with one, only while it holds the token."""
        return self.bell is None or self.holds

    def _asleep(self, conn: Connection) -> None:
        """gearmand has `conn` asleep (its PRE_SLEEP is in): a NOOP wakes it. Asleep on every
        server, the worker is waiting."""
        conn.state = _SLEEPING
        for c in self.conns:
            if c.sock is not None and c.state is not _SLEEPING \
                    and c.state is not _CONNECTING:
                return
        self._waiting(self.clock())

    def _waiting(self, now: float) -> None:
        """Asleep on every server: tell the host, and close the second lanes if it lasts."""
        self.hooks.waiting()
        for c in self._seconds:
            if c.sock is not None:
                self._close_lanes_at = now + LANE_LINGER
                break

    # -- the pool's bell (wake_one) -----------------------------------------------------------

    def _take(self) -> bool:
        """Hold the bell's token (if it is free): this child is the pool's sleeper."""
        if self.holds:
            return True
        if not self.bell.take():  # type: ignore[union-attr]
            return False
        self.holds = True
        self.lent = False
        # (the byte goes from FOLLOWING or LENT to HOLDING_BELL, never through 0: the
        # master rings for a dead child that was any of them)
        self.bell.standing(HOLDING_BELL)  # type: ignore[union-attr]
        if self.following:
            self.following = False
            self.sel.unregister(self.bell.fd)  # type: ignore[union-attr]
        return True

    def _give(self, later: bool = False) -> None:
        """Ring: a follower takes over as the pool's sleeper, at once, or (`later`: a job
        came to us) if we have not taken the token back within RING_LATER. (Rung before
        the byte is cleared: a child that dies in between is rung for again by the master,
        and the second token folds into the first when one is taken.)"""
        self.holds = False
        self.lent = later
        self.bell.ring(later)  # type: ignore[union-attr]
        # (LENT, not 0, until we take a token or follow: the token is in the bell, and a
        # follower wakes for it within RING_LATER, so the master's look every 5 s must not
        # take the moment for a pool without a sleeper; a crash rings for either)
        self.bell.standing(LENT if later else 0)  # type: ignore[union-attr]

    def _follow(self, now: float) -> None:
        """Wait on the bell; gearmand does not have us asleep, so it does not wake us."""
        bell = self.bell
        assert bell is not None
        try:
            self.sel.register(bell.fd, READ, _BELL, exclusive=True)
        except (OSError, AttributeError, ValueError, KeyError) as e:
            self.log.warning("cannot wait on the pool's bell; this child sleeps on the job "
                             "servers itself", error=f"{type(e).__name__}: {e}")
            self.bell = None
            return
        self.following = True
        self.lent = False
        bell.standing(FOLLOWING)
        self._waiting(now)

    def _unfollow(self) -> None:
        """No longer waiting on the bell (a NOOP from a server we were still asleep on, a
        lost server, a stop or a pause). A ring that may have woken us, unread, goes on to
        another follower."""
        if self.following:
            bell = self.bell
            assert bell is not None
            self.following = False
            self.sel.unregister(bell.fd)
            if bell.take():
                bell.ring()
            bell.standing(0)

    def _rung(self) -> None:
        """The bell rang while we follow: take the token and sleep on every server. The
        PRE_SLEEP goes alone: gearmand answers it with a NOOP at once if a job waits, and
        with nothing if none does."""
        if not self.following:
            return
        self.bell.heard()  # type: ignore[union-attr]  # (first: a ring after it wakes us)
        if not self._take():
            return  # (another follower was quicker, or its sleeper took it back)
        self._pre_sleep(self.conns)

    def _leave_bell(self) -> None:
        """Stopping or pausing: no longer the pool's sleeper nor a follower. A ring that
        woke us, unread, is passed on to another follower."""
        if self.bell is None:
            return
        self._unfollow()
        if self.holds:
            self._give()
        elif self.lent:
            self.lent = False
            self.bell.standing(0)

    def _close_idle_lanes(self) -> None:
        """Asleep for LANE_LINGER: close each second lane that holds nothing (a job that
        came meanwhile ended that sleep; its lanes close after the next one)."""
        self._close_lanes_at = float("inf")
        if not self.following and not all(c.state is _SLEEPING for c in self.conns
                                          if c.sock is not None):
            return  # (a follower waits on the bell: idle too)
        for conn in self.all:
            if conn.second and conn.sock is not None and conn.state is _IDLE:
                self._disconnect(conn)

    def _check_ready(self) -> None:
        if self.is_ready:
            return
        # Ready = registered on every server we could reach; an unreachable server does not
        # hold the pool back (it is retried in the background).
        if all(c.answered or (c.attempts > 0 and not c.ever_up) for c in self.conns):
            if any(c.answered for c in self.conns):
                self.is_ready = True
                self.hooks.ready()

    # -- connections ---------------------------------------------------------------------------

    def _address(self, conn: Connection, now: float) -> Address:
        """(family, sockaddr) of conn's server: the last lookup's until its next lookup is
        due (RESOLVE_EVERY, or sooner: _connect_failed), and while a new one fails (raises
        OSError when there is none)."""
        key = (conn.host, conn.port)
        known = self._addresses.get(key)
        if known is not None and now < known.due:
            return known.family, known.sockaddr
        try:
            family, _, _, _, addr = socket.getaddrinfo(conn.host, conn.port,
                                                       type=socket.SOCK_STREAM)[0]
        except OSError as e:
            if known is None:
                raise
            # asked again in RESOLVE_EVERY, whatever the connects do (each lookup blocks)
            self._addresses[key] = known._replace(due=now + RESOLVE_EVERY, ok=False)
            self.log.warning("cannot look up the job server's address; using the last one "
                             "it had", server=conn.label, address=str(known.sockaddr[0]),
                             error=str(e))
            return known.family, known.sockaddr
        self._addresses[key] = _LookedUp(family, addr, now + RESOLVE_EVERY, True)
        return family, addr

    def _connect_failed(self, conn: Connection) -> None:
        """A connect to the server's address failed: after a lookup that worked, the next
        connect looks the name up again (at once: when DNS answers, a lookup is cheap)."""
        key = (conn.host, conn.port)
        known = self._addresses.get(key)
        if known is not None and known.ok:
            self._addresses[key] = known._replace(due=0.0)

    def _connect(self, conn: Connection, now: float) -> None:
        try:
            family, addr = self._address(conn, now)
            sock = socket.socket(family, socket.SOCK_STREAM)
        except OSError as e:
            self._drop(conn, f"cannot resolve or open a socket: {e}")
            return
        sock.setblocking(False)
        err = sock.connect_ex(addr)
        if err not in (0, errno.EINPROGRESS):
            sock.close()
            self._connect_failed(conn)
            self._drop(conn, os.strerror(err))
            return
        conn.sock = sock
        conn.decoder = self._decoder()
        conn.outstanding = 0
        conn.depth = 1
        conn.dry = conn.presleep = conn.woke = conn.nap = False
        conn.answered = False
        conn.state = _CONNECTING
        conn.deadline = now + self.connect_timeout
        self.sel.register(sock, WRITE, conn)

    def _finish_connect(self, conn: Connection) -> None:
        sock = conn.sock
        assert sock is not None
        err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            self._drop(conn, os.strerror(err))
            return
        self._tune(sock)
        self.sel.modify(sock, READ, conn)
        try:
            conn.local_port = sock.getsockname()[1]
        except (OSError, IndexError):
            conn.local_port = 0
        conn.lane = (sock.fileno(), conn.local_port)
        # The outage (its backoff and its log line) ends when the server first answers
        # (_mark_answered), not here: one that accepts and closes at once is still down,
        # and does not hold the child's readiness back.
        # Register and ask for work in one write (paused: only say who we are).
        conn.can_do = False
        if self._want_paused or self.stopping or (
                conn.second and not self.lanes.allowed()):  # type: ignore[union-attr]
            # (a second lane opened while the queue was busy may find a sibling asleep by
            # now: it registers who it is and rests)
            if self._send(conn, self._client_id):
                conn.state = _IDLE
                self._mark_answered(conn)
        elif self._grab(conn, self._can_do + self._client_id):
            conn.can_do = True

    def _tune(self, sock: socket.socket) -> None:
        sock.setblocking(True)
        # SO_SNDTIMEO, not settimeout(): a Python timeout adds a poll() before every send.
        tv = struct.pack("ll", int(SEND_TIMEOUT), 0)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tv)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO,
                        struct.pack("ll", 0, int(RECV_TIMEOUT * 1e6)))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        ka = self.keepalive
        if hasattr(socket, "TCP_KEEPIDLE"):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, ka.idle)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, ka.interval)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, ka.count)

    def _close_socket(self, conn: Connection) -> None:
        sock = conn.sock
        conn.sock = None
        if sock is None:
            return
        try:
            self.sel.unregister(sock)
        except (KeyError, ValueError):
            pass
        sock.close()

    def _disconnect(self, conn: Connection) -> None:
        """Close the connection and forget what was in flight on it (gearmand requeues
        whatever it had assigned there); it is DOWN until reconnected."""
        self._close_socket(conn)
        conn.state = _DOWN
        conn.outstanding = 0
        conn.nap = False
        conn.answered = conn.can_do = False

    def _drop(self, conn: Connection, reason: str, fault: bool = False) -> None:
        """Close a connection and schedule a reconnect with backoff; other servers go on.
        fault: the server misbehaved (logged by the caller): reconnect only after the
        longest delay, so a server that does it on every connection costs little."""
        if conn.state is _CONNECTING:  # refused, or the connect deadline passed
            self._connect_failed(conn)
        self._disconnect(conn)
        if not conn.second:
            # The pool's sleeper must be asleep on every server: a follower with all of them
            # takes over, and this child sleeps on the ones it has (_tick).
            self._leave_bell()
        conn.faulted = fault
        if fault:
            conn.delay = self.reconnect_max_delay
        now = self.clock()
        jitter = 1.0 + 0.2 * (random.random() - 0.5)
        conn.retry_at = now + conn.delay * jitter
        conn.delay = min(conn.delay * 2, self.reconnect_max_delay)
        if conn.second:
            # A second lane is opened again when the queue is busy, not before retry_at.
            # What is wrong with its server is its first lane's to say (and to log).
            self.log.debug("second lane to a job server closed", server=conn.label,
                           reason=reason)
            return
        conn.attempts += 1
        if fault:
            self.log.debug("closed the connection to a misbehaving job server",
                           server=conn.label, reason=reason)
        elif not conn.down_logged:
            conn.down_logged = True
            self.log.warning("job server unavailable; reconnecting with backoff",
                             server=conn.label, reason=reason)
        else:
            self.log.debug("job server still unavailable", server=conn.label, reason=reason,
                           attempts=conn.attempts)
        self._check_ready()

    def _send(self, conn: Connection, data: bytes) -> bool:
        sock = conn.sock
        if sock is None:
            return False
        try:
            sock.sendall(data)
            return True
        except OSError as e:
            self._drop(conn, f"send failed: {e}")
            return False

    def _grab(self, conn: Connection, before: bytes = b"", n: int = 1,
              sleep: bool = False) -> bool:
        """Write `before` (a result, CAN_DOs) and `n` GRABs in one send; with `sleep`, a
        PRE_SLEEP after them (conn.presleep: a NO_JOB then puts the connection to sleep)."""
        if not self._send(conn, before + GRAB * n + (PRE_SLEEP if sleep else b"")):
            return False
        if self.following:
            self._unfollow()
        conn.presleep = conn.presleep or sleep
        self._sent += 1
        conn.sent = self._sent
        conn.outstanding += n
        if conn.outstanding:
            conn.state = _GRABBING
        return True

    # -- packets -------------------------------------------------------------------------------

    def _read(self, conn: Connection) -> None:
        sock = conn.sock
        assert sock is not None
        try:
            got = sock.recv_into(self._rbuf)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            self._drop(conn, f"recv failed: {e}")
            return
        if not got:
            self._drop(conn, "server closed the connection")
            return
        try:
            frames = conn.decoder.feed(self._rbuf[:got])
        except ProtocolError as e:
            self._server_fault(conn, "error", "malformed packet from job server; closing that "
                               "connection", error=str(e))
            self._drop(conn, f"protocol error: {e}", fault=True)
            return
        last = len(frames) - 1
        for i, frame in enumerate(frames):
            if conn.sock is None:
                return  # dropped while handling an earlier frame
            self._more = i < last  # (a NOOP after a job: Connection.nap)
            if frame.type in _TAKEN and (self.stopping or conn.second and self._want_paused):
                # Assigned to us, not started: it goes back to gearmand with the rest.
                # (Pausing, a job held on a second lane goes back too: a child that
                # quarantines itself runs no more of its fast failures.)
                self._hand_back(conn, sum(1 for f in frames[i:] if f.type in _TAKEN))
                return
            self._handle(conn, frame.type, frame.args)

    def _handle(self, conn: Connection, ptype: int, args: tuple[bytes, ...]) -> None:
        if ptype in _ASSIGN:
            if not conn.outstanding:
                self._unexpected(conn, ptype, "a job we did not ask for (no GRAB outstanding)")
                return
            conn.outstanding -= 1
            if self.holds:
                # Before the job runs: another child sleeps for the pool unless the job
                # ends within RING_LATER and we take the token back (_lone).
                self._give(later=True)
            conn.nap = conn.presleep and not conn.outstanding
            conn.presleep = False
            if conn.woke:
                conn.woke = False
            else:
                conn.dry = False
            if not conn.answered:
                self._mark_answered(conn)
            if conn.mate is not None and not conn.dry:
                self._fill_mate(conn)
            self._run_job(conn, ptype, args)
        elif ptype == _NO_JOB:
            if not conn.outstanding:
                # Harmless (our state does not change), so not worth a reconnect.
                self._server_fault(conn, "warning", "NO_JOB from job server without a GRAB "
                                   "outstanding; ignored")
                return
            self._mark_answered(conn)
            conn.depth = 1  # the queue ran dry: no prefetch until it is busy again
            conn.dry = True
            conn.woke = False
            conn.outstanding -= 1
            if conn.outstanding:
                return  # the answers to our other GRABs are on their way
            asleep, conn.presleep = conn.presleep, False
            if self.paused or self._want_paused:
                self._settle(conn)  # the GRAB is answered: now unregister
            elif self.stopping or conn.second:
                # (a second lane never sleeps: it GRABs again when the queue is busy)
                conn.state = _IDLE
            elif asleep:
                # Its PRE_SLEEP went with the GRAB: gearmand has us asleep (or, if a job
                # came in between, has queued a NOOP). Nothing more to write.
                self._asleep(conn)
            else:
                conn.state = _EMPTY
                conn.empty_since = self.clock()
        elif ptype == _NOOP:
            if conn.state is _SLEEPING and not self.stopping and not (
                    self.paused or self._want_paused):
                # Asleep means the queue was dry: the PRE_SLEEP goes with the GRAB, so a
                # NO_JOB (another worker was quicker) puts us back to sleep with no write.
                conn.woke = self._grab(conn, sleep=self._may_sleep())
        elif ptype == Packet.ERROR:
            code = args[0].decode(errors="replace")
            # In "exception" mode gearmand ends the job at WORK_EXCEPTION, so the WORK_FAIL
            # that follows for old clients is answered with JOB_NOT_FOUND: expected, not news.
            if not (code == "JOB_NOT_FOUND" and self.exception_packet == "exception"):
                self._server_fault(conn, "warning", "job server reported an error", code=code,
                                   message=args[1].decode(errors="replace"))
        elif ptype == OVERSIZED_JOB:
            if not conn.outstanding:
                self._unexpected(conn, ptype, "a job we did not ask for (no GRAB outstanding)")
                return
            conn.outstanding -= 1
            self._mark_answered(conn)
            self._refuse_oversized(conn, args)
        else:
            # A client's or a server's packet, or an answer to a request we never make: the
            # server's idea of this connection is not ours. Start again from a fresh one.
            self._unexpected(conn, ptype, "not a packet a job server sends a worker")

    def _unexpected(self, conn: Connection, ptype: int, why: str) -> None:
        """The server sent what it must not: log it (rate-limited) and close the connection;
        gearmand requeues anything it had assigned on it."""
        name = "JOB_ASSIGN (oversized)" if ptype == OVERSIZED_JOB else Packet(ptype).name
        self._server_fault(conn, "error", "unexpected packet from job server; closing that "
                           "connection", packet=name, why=why)
        self._drop(conn, f"unexpected {name}", fault=True)

    def _server_fault(self, conn: Connection, level: str, event: str, **kw: Any) -> None:
        """Log a server's misbehaviour, rate-limited per connection (FaultLog)."""
        now = self.clock()
        faults = conn.faults
        if now >= self._summary_due:
            self._log_suppressed(now)  # the last interval's count first
        if faults.allow(now):
            getattr(self.log, level)(event, server=conn.label, **kw)
        else:
            self._summary_due = min(self._summary_due, faults.due_at)

    def _log_suppressed(self, now: float) -> None:
        """One summary line per connection whose suppressed count is due."""
        due = float("inf")
        for conn in self.conns:
            n = conn.faults.due(now)
            if n:
                self.log.warning("more problems with this job server; not logged one by one",
                                 server=conn.label, suppressed=n,
                                 seconds=conn.faults.interval)
            due = min(due, conn.faults.due_at)
        self._summary_due = due

    def _mark_answered(self, conn: Connection) -> None:
        """The server answered since we connected (or, paused, need not): it is up."""
        if not conn.answered:
            conn.answered = True
            if conn.second:  # (readiness and outages are its first lane's)
                conn.delay = RECONNECT_INITIAL
                return
            if conn.faulted:  # closed for misbehaving: that was logged (rate-limited)
                self.log.debug("reconnected to job server", server=conn.label)
            elif conn.attempts or conn.down_logged:
                self.log.info("reconnected to job server", server=conn.label,
                              attempts=conn.attempts)
            conn.faulted = False
            conn.attempts = 0
            conn.down_logged = False
            conn.delay = RECONNECT_INITIAL
            conn.ever_up = True
            self._check_ready()

    def _run_job(self, conn: Connection, ptype: int, args: tuple[bytes, ...]) -> None:
        if ptype == _JOB_ASSIGN:
            handle, fname, data = args
            unique = b""
        elif ptype == _JOB_ASSIGN_UNIQ:
            handle, fname, unique, data = args
        else:  # JOB_ASSIGN_ALL: handle, function, unique, reducer, data
            handle, fname, unique, _reducer, data = args
        # (decode's arguments positional: keywords cost an argument parse per call)
        function = self._names.get(fname) or fname.decode("utf-8", "replace")
        text = unique.decode("utf-8", "replace")
        if text.startswith(RETRY_PREFIX):  # a retry gearvisor submitted (one test per job)
            text, attempt, retry_of = parse_unique(text)
            job = Job(function, handle.decode("utf-8", "replace"), text, data, conn.job_send,
                      conn.label, attempt, retry_of)
        else:
            job = Job(function, handle.decode("utf-8", "replace"), text, data, conn.job_send,
                      conn.label)
        fn = self.functions.get(function)
        if fn is None:
            # gearmand only assigns what we CAN_DO: this server is broken or hostile, and
            # the child did nothing wrong (no quarantine count). Failed, not handed back:
            # a server that keeps assigning it would hand it to us forever.
            self._server_fault(conn, "error", "job for a function this worker does not "
                               "serve; failed it", function=function, handle=job.handle)
            self._refuse(conn, job, handle, f"this worker does not serve function {function!r}")
            return
        hooks = self.hooks
        if self.is_poison is not None and self.is_poison(job):
            # It crashed or hung `poison_after` workers already: fail it, do not run it.
            self.log.error("poison job failed without running", function=function,
                           handle=job.handle, unique=job.unique, size=len(data))
            conn.depth = 1
            self._reply(conn, encode(Packet.WORK_FAIL, handle))
            hooks.job_poisoned(job)
            return
        hooks.job_started(job)
        started = self.clock()
        timeout = self.timeouts.get(function)
        lanes = self.lanes
        # Every other connection with a GRAB out may bring a job that waits for this one:
        # the same server's other lane, and (several servers) the others' lanes.
        held = ([c for c in conn.others if c.state is _GRABBING and c.sock is not None]
                if lanes is not None else None)
        if held:
            lanes.holding([c.lane for c in held], started)  # type: ignore[union-attr]
        try:
            if timeout is not None:
                self.timer.start(timeout)
            try:
                result = fn(job)
            finally:
                try:
                    if timeout is not None:
                        self.timer.stop()  # (a timeout that fires right now raises here)
                finally:
                    if held:
                        closed = lanes.released()  # type: ignore[union-attr]
                        if closed:  # (rarely: the master gave a held job to an idle child)
                            for i, other in enumerate(held):
                                if closed >> i & 1:
                                    self._mate_closed(other)
            reply = encode_result_packet(handle, result if type(result) is bytes
                                         else encode_result(result))
            ok = True
        except Exception as e:  # a user bug: report it, log it, keep serving
            reply = self._failure_reply(handle, e)
            ok = False
            self.log.error("job raised", function=function, handle=job.handle,
                           unique=job.unique, error=f"{type(e).__name__}: {e}",
                           traceback="".join(traceback.format_exception(e)).rstrip())
            hooks.job_failed(job, e, isinstance(e, JobTimeout) or self.timer.timed_out)
        # The host decides first (it may quarantine itself: then no GRAB goes out with the
        # result, so gearmand cannot hand us a job we would have to give back).
        seconds = self.clock() - started
        hooks.job_finished(job, ok, seconds)
        conn.depth = (min(conn.depth * 2, self.prefetch) if ok and seconds < PREFETCH_FAST
                      else 1)
        try:
            asleep = self._answer(conn, reply)
        finally:
            hooks.job_answered(job, ok, seconds)
        if asleep:
            self._asleep(conn)  # (after job_answered: waiting() flushes what it recorded)

    def _fill_mate(self, conn: Connection) -> None:
        """A job came while the queue is busy: the second lane asks for the next one now, so
        it is here when this one ends (and handed back if this one runs long). A lane that
        is not open yet is opened (it GRABs once connected)."""
        mate, lanes = conn.mate, self.lanes
        assert mate is not None and lanes is not None  # (only lanes have mates)
        if not mate.second or not self._taking():
            return  # (a first lane refills itself with its result)
        if mate.state is _IDLE:
            if lanes.allowed() and self._grab(mate, b"" if mate.can_do else self._can_do):
                mate.can_do = True
        elif mate.state is _DOWN:
            now = self.clock()
            if now >= mate.retry_at and lanes.allowed():
                self._connect(mate, now)

    def _mate_closed(self, mate: Connection) -> None:
        """A held lane was closed while a job ran (Lanes.released): gearmand has requeued
        what it held, so nothing it sent is read. A second lane is opened again when wanted,
        a first lane by the loop (_tick) at once."""
        self._disconnect(mate)
        mate.retry_at = 0.0
        self.log.debug("the held job went back to the job server: this job ran long and "
                       "another child was idle", server=mate.label)

    def _refuse(self, conn: Connection, job: Job, handle: bytes, why: str) -> None:
        """Fail a job without running it, telling the client why; the host hears of it as
        refused (job_refused), which never counts toward quarantine."""
        conn.depth = 1
        self._reply(conn, self._failure_text(handle, f"gearvisor: {why}\n".encode()))
        self.hooks.job_refused(job)

    def _refuse_oversized(self, conn: Connection, args: tuple[bytes, ...]) -> None:
        """A job whose payload is over max_job_size: the decoder skips its bytes; fail it by
        its handle. Not handed back (a dropped connection): gearmand would requeue it to the
        next worker, which refuses it too, forever."""
        handle, fname, unique, size = args
        job = Job(fname.decode(errors="replace"), handle.decode(errors="replace"),
                  unique.decode(errors="replace"), b"", conn.job_send, conn.label)
        self._server_fault(conn, "error", "job larger than max_job_size; failed it without "
                           "reading it", function=job.function, handle=job.handle,
                           unique=job.unique, size=int(size), max_job_size=self.max_job_size)
        self._refuse(conn, job, handle, f"the job's {int(size)} bytes are over this worker's "
                     f"max_job_size ({self.max_job_size} bytes)")

    def _decoder(self) -> Decoder:
        """A fresh decoder for a connection: only a server's packets, jobs up to max_job_size."""
        return Decoder(MAX_CONTROL_PACKET, self.max_job_size, RES)

    def _job_send(self, conn: Connection, ptype: int, handle: bytes, payload: bytes) -> None:
        """What a job's send_status/send_data/... write (Job._send). Job code runs under its
        soft timeout (SIGALRM), which must not cut a packet in half: it waits until the
        write is done (raised on release). The runtime's own writes need no hold: they go
        while no job's timer is armed."""
        timer = self.timer
        timer.hold()
        try:
            self._send(conn, encode(ptype, handle, payload))
        finally:
            timer.release()

    def _taking(self) -> bool:
        """New jobs are wanted: not stopping, paused or about to pause."""
        return not self.stopping and not self.paused and not self._want_paused

    def _reply(self, conn: Connection, reply: bytes) -> None:
        """Send a job's result now, before the next job starts (so it never waits behind
        one), with the GRABs that top the connection up in the same write: one send per
        job, and at most one round trip."""
        if self._answer(conn, reply):
            self._asleep(conn)

    def _answer(self, conn: Connection, reply: bytes) -> bool:
        """_reply, but a lone result's connection is left for the caller to mark asleep
        (True): gearmand has it asleep."""
        # A second lane asks for nothing more while a sibling is asleep (it takes the next
        # job) or lanes are off: it rests until the queue is busy again.
        if not self._taking() or (conn.second
                                  and not self.lanes.allowed()):  # type: ignore[union-attr]
            conn.nap = False
            self._send_winding_down(conn, reply)
        elif self._lone(conn):
            return self._send(conn, reply)
        else:
            self._top_up(conn, reply)
        return False

    def _lone(self, conn: Connection) -> bool:
        """The result of the job that ends now goes alone, with no GRAB (Connection.nap):
        gearmand has `conn` asleep and no NOOP says a job waits. (Asked by _answer only while
        we are taking jobs.)"""
        nap, conn.nap = conn.nap, False
        return (nap and not self._more and self._quiet(conn)
                and (self.bell is None or (self._all_up() and self._take())))

    def _all_up(self) -> bool:
        """Connected to every server (a child that is not may not be the pool's sleeper)."""
        return all(c.sock is not None and c.state is not _CONNECTING
                   for c in self.conns)

    @staticmethod
    def _quiet(conn: Connection) -> bool:
        """Nothing from the server is waiting to be read on `conn` (FIONREAD: one system
        call, and no exception for the common answer, as a peek's EAGAIN would be); False
        for a connection that dropped while the job ran. (A server that closed its end
        reads as quiet: the result goes alone, and the loop finds the close next.)"""
        sock = conn.sock
        if sock is None:
            return False
        try:
            return fcntl.ioctl(sock.fileno(), termios.FIONREAD, _NONE_WAITING) == _NONE_WAITING
        except OSError:
            return False  # (the next read or send finds out what is wrong)

    def _top_up(self, conn: Connection, before: bytes = b"") -> None:
        """Write `before` with the GRABs that bring conn.outstanding up to conn.depth, and
        PRE_SLEEP after a single GRAB while the queue is dry (Connection.dry)."""
        n = max(0, conn.depth - conn.outstanding)
        self._grab(conn, before, n, sleep=conn.dry and n == 1 and not conn.outstanding
                   and not conn.second and self._may_sleep())

    def _send_winding_down(self, conn: Connection, data: bytes) -> None:
        """Stopping or pausing (or a second lane at rest): no more GRABs. Pausing, jobs
        already assigned to us still run; once every GRAB is answered the connection goes
        idle, and a pause unregisters it. Stopping, the jobs still to come are handed back
        (_read, run)."""
        if (self._send(conn, data) and not conn.outstanding
                and conn.state is _GRABBING):
            conn.state = _IDLE
            if self.paused or self._want_paused:
                self._settle(conn)

    def _hand_back(self, conn: Connection, held: int) -> None:
        """Stopping (or pausing, on a second lane): give gearmand back every job it assigned
        on this connection that has not started (`held` of them are read already; the GRABs
        in flight may bring more), by closing the connection, which makes gearmand requeue
        them for another worker. The results already sent are in the stream before our FIN,
        so gearmand reads them first; we wait (bounded) for its side to close before closing
        ours, because a close with unread data would send a reset, which may discard those
        results on its side."""
        sock = conn.sock
        if sock is None:
            return
        self.log.info(f"{'stopping' if self.stopping else 'pausing'}: handed the jobs this "
                      "child took but did not start back to the job server",
                      server=conn.label, held=held, grabs_in_flight=conn.outstanding)
        try:
            sock.shutdown(socket.SHUT_WR)
            sock.settimeout(HAND_BACK_WAIT)
            for _ in range(HAND_BACK_READS):
                if not sock.recv_into(self._rbuf):
                    break  # gearmand closed its end: it has seen all we wrote
        except OSError:
            pass  # gone, reset or slow: the close below hands back what is left anyway
        self._disconnect(conn)

    def _failure_reply(self, handle: bytes, exc: Exception) -> bytes:
        return self._failure_text(handle, f"{type(exc).__name__}: {exc}\n".encode(
            errors="replace"))

    def _failure_text(self, handle: bytes, text: bytes) -> bytes:
        """WORK_WARNING (or WORK_EXCEPTION) with the text, then WORK_FAIL."""
        first = Packet.WORK_EXCEPTION if self.exception_packet == "exception" else (
            Packet.WORK_WARNING)
        return encode(first, handle, text) + encode(Packet.WORK_FAIL, handle)
