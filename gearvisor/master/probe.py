"""The gearmand probe: non-blocking `workers` queries to the job servers, from the loop.

Whoever needs gearmand's view asks `request(servers)`; each answer (or its absence: a
server that does not answer within ADMIN_TIMEOUT, or cannot be reached) is published as a
`Snapshot` on the bus and kept as the last snapshot of that server. Nothing else in the
master talks to gearmand. (The observability issue grows this into a periodic probe of
`version`, `getpid`, `status` and `workers` with backoff.)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from gearvisor.gearman import admin
from gearvisor.master import bus as ev
from gearvisor.master.component import Component

if TYPE_CHECKING:
    from gearvisor.master.arbiter import Arbiter

ADMIN_TIMEOUT = 2.0  # a `workers` query that takes longer counts as not answered

Server = tuple[str, int]


class Probe(Component):
    """At most one query in flight per server; answers go out as Snapshot events."""

    def __init__(self) -> None:
        self.polls: dict[Server, admin.WorkersPoll] = {}
        self.seen: dict[Server, list[admin.WorkerInfo] | None] = {}

    def attach(self, master: Arbiter) -> None:
        self.master = master

    def request(self, servers: set[Server]) -> None:
        """Ask each of `servers` for its `workers` list (unless a query is in flight)."""
        now = self.master.clock()
        for server in servers - set(self.polls):
            try:
                poll = admin.WorkersPoll(server[0], server[1], now + ADMIN_TIMEOUT)
            except OSError:
                self._done(server, None)  # cannot even resolve or open a socket
                continue
            if poll.done:
                poll.sock.close()
                self._done(server, None)
                continue
            self.polls[server] = poll
            self.master.loop.add_writer(poll.sock, lambda s=server: self._event(s))
            self.master.loop.call_at(poll.deadline, lambda s=server, p=poll: self._late(s, p))

    def _event(self, server: Server) -> None:
        poll = self.polls.get(server)
        if poll is None:
            return
        sent = poll.sent
        poll.on_ready()
        if poll.done:
            self._finish(server, poll)
        elif poll.sent and not sent:
            self.master.loop.remove_writer(poll.sock)
            self.master.loop.add_reader(poll.sock, lambda: self._event(server))

    def _late(self, server: Server, poll: admin.WorkersPoll) -> None:
        if self.polls.get(server) is poll:
            poll.finish(ok=False)  # too slow: counts as not answering
            self._finish(server, poll)

    def _finish(self, server: Server, poll: admin.WorkersPoll) -> None:
        self.master.loop.remove_reader(poll.sock)
        self.master.loop.remove_writer(poll.sock)
        poll.sock.close()
        del self.polls[server]
        self._done(server, poll.result)

    def _done(self, server: Server, workers: list[admin.WorkerInfo] | None) -> None:
        self.seen[server] = workers
        self.master.bus.publish(ev.Snapshot(server, workers))

    def close(self) -> None:
        for poll in self.polls.values():
            poll.sock.close()
        self.polls.clear()
