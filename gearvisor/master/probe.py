"""The gearmand probe: every `probe_interval`, one non-blocking connection to each job
server of every pool asks `version`, `getpid`, `status` and `workers` (pipelined), from
the master's loop.

The last word on each server is kept in `views` (a bus.ServerView per server) and
published as a `Snapshot` after every probe, answered or not. Everything else in the
master that needs gearmand's state (status, findings, metrics, command-pool readiness)
reads these views: nothing else queries gearmand.

- A probe has min(PROBE_TIMEOUT, probe_interval) to answer; its answer is parsed within
  fixed bounds (gearman/admin.ProbeParser), so no server can make the master block,
  spin, or allocate without bound.
- A server that fails is retried with backoff (a quarter of probe_interval, doubling up to
  twice it), and is marked down (`up=False`) after DOWN_AFTER failures in a row.
- A pid that changes between answers counts a restart.
- `request(servers)` asks for an early probe (a command child waiting to show up as
  registered), at most once per REQUEST_GAP per server, never while it is failing.
- A server named by host name is looked up by the resolver helper (helpers/resolver.py),
  which the probe runs while any server has one: the lookup blocks that process, never
  the master's loop (DNS that is down makes glibc wait seconds per name). Until a first
  address comes, a probe waits for the name as long as it would for an answer, then
  counts as failed ("not resolved") while the lookup goes on; a lookup that fails is
  asked again at the next probe. Once the name has an address, probes go there; after a
  failed probe the name is looked up again in the background (at most every
  RESOLVE_EVERY: it may point elsewhere now), and a lookup that fails keeps the address.
  A lookup unanswered for RESOLVE_STUCK restarts the helper. A literal address needs no
  lookup.
"""

from __future__ import annotations

import dataclasses
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NoReturn

from gearvisor import messages as msg
from gearvisor.gearman import addresses, admin
from gearvisor.helpers.resolver import request as resolve_request
from gearvisor.helpers.resolver import run_resolver
from gearvisor.master import bus as ev
from gearvisor.master.bus import ServerView
from gearvisor.master.component import Component
from gearvisor.master.helper import HelperBody, HelperProcess
from gearvisor.master.status import functions_status, servers_status
from gearvisor.policy.backoff import Backoff

if TYPE_CHECKING:
    from gearvisor.config import Config
    from gearvisor.master.arbiter import Arbiter
    from gearvisor.master.loop import Timer

PROBE_TIMEOUT = 2.0  # the longest a probe may take (less with a shorter probe_interval)
DOWN_AFTER = 3  # failed probes in a row that mark a server down
REQUEST_GAP = 0.2  # request(): at most one early probe per server this often
# A host name is looked up again after a failed probe only this long after the last lookup,
# so a server named by host that stays down costs one lookup per RESOLVE_EVERY, not one
# per probe (the lookup runs in the resolver helper: it never blocks the master).
RESOLVE_EVERY = 30.0
RESOLVE_STUCK = 60.0  # a lookup unanswered this long: the resolver is restarted (it hangs)

Server = tuple[str, int]


def next_view(view: ServerView, now: float, answer: admin.ProbeAnswer | None,
              error: str | None = None) -> ServerView:
    """The view after a probe that ended at `now` with `answer` (or failed with `error`).
    A failure keeps what the server said last (marked `answered=False`), so a reader may
    show its age; the server is down from the DOWN_AFTER-th failure in a row."""
    if answer is None:
        failures = view.failures + 1
        return dataclasses.replace(view, up=failures < DOWN_AFTER, answered=False,
                                   failures=failures, checked_at=now, error=error)
    restarted = view.pid is not None and answer.pid is not None and answer.pid != view.pid
    return dataclasses.replace(
        view, up=True, answered=True, failures=0, checked_at=now, answered_at=now,
        version=answer.version, pid=answer.pid if answer.pid is not None else view.pid,
        restarts=view.restarts + restarted, functions=answer.functions,
        workers=answer.workers, error=None)


class _Target:
    """One server's probe state: the poll in flight, the next probe's timer, the backoff."""

    def __init__(self, server: Server, interval: float) -> None:
        self.server = server
        self.poll: admin.ProbePoll | None = None
        self.timer: Timer | None = None
        self.deadline: Timer | None = None
        self.address: admin.Address | None = None
        self.resolved_at = float("-inf")  # when the host name was last asked of the resolver
        self.resolving = False  # a lookup was asked of the resolver and not answered yet
        self.awaiting = False  # a probe waits for that answer (`deadline` ends the wait)
        self.started_at: float | None = None
        self.backoff = backoff_for(interval)


def backoff_for(interval: float) -> Backoff:
    """Retry delays of a failing server: interval/4, doubling, up to 2 x interval. The
    first retries come quickly, so a dead server is down within about one interval; a
    server that stays down is asked twice as rarely as a live one."""
    return Backoff(interval / 4, 2 * interval, multiplier=2.0, jitter=0.1,
                   reset_after=float("inf"))


class Probe(Component):
    """At most one probe in flight per server; each result is a Snapshot on the bus."""

    def __init__(self, poll: Callable[[admin.Address, float], admin.ProbePoll]
                 = admin.ProbePoll) -> None:
        self._make_poll = poll
        self.views: dict[Server, ServerView] = {}
        self._targets: dict[Server, _Target] = {}
        self.interval = 5.0
        self.resolver = HelperProcess("resolver", self._resolver_body, with_input=True,
                                      on_message=self._resolved,
                                      on_start=self._resolver_started)

    # -- the component --------------------------------------------------------------------------

    def attach(self, master: Arbiter) -> None:
        self.master = master
        self.resolver.attach(master)
        self._configure(master.config)

    def reload(self, config: Config) -> None:
        self._configure(config)

    def begin_stop(self, fast: bool) -> None:
        self.resolver.begin_stop(fast=True)  # it holds nothing: SIGTERM, even mid-lookup

    def stop_overdue(self) -> None:
        self.resolver.stop_overdue()

    def stopped(self) -> bool:
        return self.resolver.stopped()

    def status(self, now: float) -> dict[str, Any]:
        rows, omitted = functions_status(self.views, self.master.pools.values())
        out = {"servers": servers_status(self.views.values(), now), "functions": rows,
               "functions_omitted": omitted}
        if self._names():
            out["resolver"] = self.resolver.status()
        return out

    def close(self) -> None:
        for target in list(self._targets.values()):
            self._drop(target)
        self._targets.clear()
        self.resolver.close()

    # -- what to probe ------------------------------------------------------------------------

    def _used(self) -> set[Server]:
        """Every server of a pool in the config, or of a pool still draining."""
        pools = [p.config for p in self.master.pools.values()]
        pools += list(self.master.config.pools.values())
        return {(s.host, s.port) for pc in pools for s in pc.servers}

    def _configure(self, config: Config) -> None:
        interval = config.probe_interval
        retimed = interval != self.interval
        self.interval = interval
        used = self._used()
        for server in set(self._targets) - used:
            self._drop(self._targets.pop(server))
            self.views.pop(server, None)
        now = self.master.clock()
        r = self.resolver
        if self._names(used):
            if r.pid is None and r.record.restart_at <= now:
                r.start_at(now)  # (one in backoff starts when its backoff says)
        elif r.pid is not None:
            r.restart()  # no name to look up any more: it goes, and none starts
        for server in used:
            target = self._targets.get(server)
            if target is None:
                self._targets[server] = target = _Target(server, interval)
                self.views[server] = ServerView(server)
                self._schedule(target, now)  # the first probe at once
            elif retimed:
                target.backoff = backoff_for(interval)
                if target.poll is None:
                    self._schedule(target, now + interval)

    def request(self, servers: set[Server]) -> None:
        """Probe each of `servers` soon (a command child waits to be seen registered):
        not while a probe of it is in flight or it is failing, and at most once per
        REQUEST_GAP, so callers may ask as often as they like."""
        now = self.master.clock()
        for server in servers:
            target = self._targets.get(server)
            if (target is None or target.poll is not None or target.awaiting
                    or target.backoff.failures or (target.started_at is not None
                        and now - target.started_at < REQUEST_GAP)):
                continue
            self._schedule(target, now)

    # -- probing --------------------------------------------------------------------------------

    def _schedule(self, target: _Target, when: float) -> None:
        if target.timer is not None:
            target.timer.cancel()
        target.timer = self.master.loop.call_at(when, lambda: self._start(target))

    def _start(self, target: _Target) -> None:
        target.timer = None
        if (self._targets.get(target.server) is not target or target.poll is not None
                or target.awaiting):
            return
        now = self.master.clock()
        target.started_at = now
        if target.address is None and not _numeric(target.server[0]):
            self._await_name(target, now)
            return
        self._poll(target, now)

    @property
    def timeout(self) -> float:
        """How long a probe (or the wait for its server's name) may take."""
        return min(PROBE_TIMEOUT, self.interval)

    def _poll(self, target: _Target, now: float) -> None:
        """Connect and ask (the address known, or a literal one)."""
        try:
            if target.address is None:
                target.address = admin.resolve(*target.server)  # a literal: no lookup
            poll = self._make_poll(target.address, now + self.timeout)
        except (OSError, UnicodeError, OverflowError, ValueError, TypeError) as e:
            self._finished(target, None, f"cannot connect: {e}")
            return
        if poll.done:
            poll.sock.close()
            self._finished(target, None, poll.error)
            return
        target.poll = poll
        self.master.loop.add_writer(poll.sock, lambda: self._event(target))
        target.deadline = self.master.loop.call_at(poll.deadline, lambda: self._late(target))

    def _event(self, target: _Target) -> None:
        poll = target.poll
        if poll is None:
            return
        sent = poll.sent
        poll.on_ready()
        if poll.done:
            self._end_poll(target)
        elif poll.sent and not sent:
            self.master.loop.remove_writer(poll.sock)
            self.master.loop.add_reader(poll.sock, lambda: self._event(target))

    def _late(self, target: _Target) -> None:
        poll = target.poll
        if poll is not None:
            poll.finish(f"no whole answer within {self.timeout:g}s")
            self._end_poll(target)

    def _end_poll(self, target: _Target) -> None:
        poll = target.poll
        assert poll is not None
        self._close_poll(target)
        self._finished(target, poll.answer, poll.error)

    def _close_poll(self, target: _Target) -> None:
        poll, target.poll = target.poll, None
        if target.deadline is not None:
            target.deadline.cancel()
            target.deadline = None
        if poll is not None:
            self.master.loop.remove_reader(poll.sock)
            self.master.loop.remove_writer(poll.sock)
            poll.sock.close()

    def _finished(self, target: _Target, answer: admin.ProbeAnswer | None,
                  error: str | None) -> None:
        """Record the result, publish it, and set the next probe."""
        if self._targets.get(target.server) is not target:
            return  # no pool uses the server any more
        now = self.master.clock()
        view = next_view(self.views[target.server], now, answer, error)
        self.views[target.server] = view
        if answer is not None:
            target.backoff.reset()
            delay = self.interval
        else:
            if not _numeric(target.server[0]):
                self._look_up_again(target, now)
            delay = target.backoff.failure(now, now)
            if view.failures == DOWN_AFTER:
                self.master.log.debug("job server not answering", server=view.name,
                                      error=error)
        self._schedule(target, now + delay)
        self.master.bus.publish(ev.Snapshot(view))

    # -- host names ---------------------------------------------------------------------------

    def _names(self, servers: set[Server] | None = None) -> bool:
        """Whether any server (of `servers`, or probed now) is named by host name."""
        return any(not _numeric(host) for host, _ in
                   (self._targets if servers is None else servers))

    def _resolver_body(self) -> HelperBody | None:
        if not self._names():
            return None  # (no name to look up any more: none runs)

        def body(fd: int, in_fd: int, blocked: set[int]) -> NoReturn:
            run_resolver(in_fd, fd, blocked)

        return body

    def _resolver_started(self, pid: int) -> None:
        """A new resolver: the lookups the last one was asked and never answered are asked
        again (replacing any still queued, so none is asked twice)."""
        self.resolver.replace(resolve_request(*t.server) for t in self._targets.values()
                              if t.resolving)

    def _ask(self, target: _Target, now: float) -> None:
        target.resolving, target.resolved_at = True, now
        self.resolver.send(resolve_request(*target.server))

    def _look_up_again(self, target: _Target, now: float) -> None:
        """After a failed probe: the name may point elsewhere now (asked at most every
        RESOLVE_EVERY; the address stays until a good answer replaces it). A lookup that
        has gone unanswered for RESOLVE_STUCK restarts the resolver, which asks again."""
        if not target.resolving:
            if now - target.resolved_at >= RESOLVE_EVERY:
                self._ask(target, now)
        elif now - target.resolved_at >= RESOLVE_STUCK:
            self.master.log.warning("the resolver has not answered a lookup; restarting it",
                                    server=f"{target.server[0]}:{target.server[1]}",
                                    waited=round(now - target.resolved_at, 1))
            for t in self._targets.values():
                if t.resolving:
                    t.resolved_at = now  # (each restart gives every lookup RESOLVE_STUCK)
            self.resolver.restart()

    def _await_name(self, target: _Target, now: float) -> None:
        """Ask the resolver for the name (unless it is asked already) and wait for it as
        long as for a probe's answer."""
        timeout = self.timeout
        target.awaiting = True
        if not target.resolving:
            self._ask(target, now)
        target.deadline = self.master.loop.call_at(now + timeout,
                                                   lambda: self._unresolved(target, timeout))

    def _unresolved(self, target: _Target, timeout: float) -> None:
        target.deadline, target.awaiting = None, False
        self._finished(target, None, f"host name not resolved within {timeout:g}s (the "
                                     "lookup goes on: is DNS answering?)")

    def _resolved(self, message: msg.Message) -> None:
        """The resolver's answer: the address for the next probe, and for one waiting."""
        if not isinstance(message, msg.Resolved):
            return
        target = self._targets.get((message.host, message.port))
        if target is None or not target.resolving:
            if not message.port:
                self.master.log.warning("the resolver refused a request", error=message.error)
            return  # (a server no pool uses any more)
        target.resolving = False
        address = _address(message.family, message.address)
        error = (None if address is not None else f"cannot resolve {message.host}: "
                 + (message.error or f"unusable address {str(message.address)[:80]}"))
        if address is not None:
            target.address = address  # (a failed lookup keeps the last good one)
            addresses.remember(*target.server, address)  # (children forked from now on)
        if not target.awaiting:
            return
        if target.deadline is not None:
            target.deadline.cancel()
            target.deadline = None
        target.awaiting = False
        if error is not None:
            self._finished(target, None, error)
        else:
            self._poll(target, self.master.clock())

    def _drop(self, target: _Target) -> None:
        self._close_poll(target)
        target.awaiting = False
        addresses.forget(*target.server)
        if target.timer is not None:
            target.timer.cancel()
            target.timer = None


def _address(family: int, address: list) -> admin.Address | None:
    """The resolver's answer as an address to connect to, or None if it is not one (the
    helper is ours, but nothing read from a pipe is trusted)."""
    size = {int(socket.AF_INET): 2, int(socket.AF_INET6): 4}.get(family)
    if (size is None or len(address) != size or not isinstance(address[0], str)
            or not all(isinstance(n, int) and not isinstance(n, bool) and 0 <= n < limit
                       for n, limit in zip(address[1:], (65536, 1 << 20, 1 << 32),
                                           strict=False))
            or not address[1]):
        return None  # (port, IPv6 flowinfo and scope id in range: connect takes them)
    try:
        socket.inet_pton(family, address[0])
    except (OSError, ValueError):
        return None
    return family, tuple(address)


def _numeric(host: str) -> bool:
    """A literal IP address: its resolution cannot change."""
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            socket.inet_pton(family, host)
            return True
        except (OSError, ValueError):
            pass
    return False
