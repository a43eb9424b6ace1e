"""The fleet view: every gearvisor host and every other worker, as the job servers see them.

Pure: no I/O, no clock of its own (callers pass `now`), no imports of the master. The
master's fleet component (master/fleet.py) feeds it the probe's cached `workers` lists.

A gearvisor child sends the client id `<client_id_prefix>:<pool>:<slot>` (a command child
is told `<client_id_prefix>:<pool>:<slot>:<pid>`), and `client_id_prefix` defaults to the
short host name, so **a host is a client_id_prefix**: two masters on one machine with
different prefixes show as two hosts, two machines with one prefix as one. Pool names
have no colon (letters, digits, `_ . -`) and slot and pid are digits, so an id is read
from the right; the prefix is the shortest head that leaves `:<pool>:<slot>[:<pid>]`.
That is ambiguous only for a prefix that itself contains `:<pool-like>:<digits>`; the
local master's own prefixes and pools are matched exactly first (`own`).

- look(workers, own) groups the answered servers' `workers` lists into hosts (pools,
  children per server, functions, addresses) and foreign workers (any connection whose
  client id is not of that form: keyed by the client id, or by its address when it set
  none, "-").
- Memory remembers each host's last sighting (at most MAX_REMEMBERED hosts, each for
  FORGET_AFTER), so a host that was seen and is on no answered server any more is flagged
  `vanished` until it comes back or is forgotten.
- report(...) is the `gearvisor fleet --json` reply: bounded lists (MAX_HOSTS hosts,
  MAX_POOLS pools per host, MAX_FOREIGN foreign workers, MAX_FUNCTIONS functions per row,
  MAX_FLAGS flags), each with the count of what was left out.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

MAX_HOSTS = 100  # hosts shown (the local host first, then by name)
MAX_POOLS = 50  # pools shown per host
MAX_FOREIGN = 100  # foreign workers shown (most connections first)
MAX_FUNCTIONS = 20  # functions shown per pool or foreign worker
MAX_ADDRESSES = 10  # addresses shown per host or foreign worker
MAX_FLAGS = 100  # flags shown
MAX_TEXT = 200  # a client id, host or function longer than this is shown cut
MAX_ID = 1024  # a client id longer than this is nobody's prefix: a foreign worker
MAX_REMEMBERED = 1000  # hosts remembered between looks (the oldest sightings go first)
FORGET_AFTER = 3600.0  # seconds a host unseen is still remembered (and flagged vanished)
NO_CLIENT_ID = "-"  # what gearmand shows for a worker that sent no SET_CLIENT_ID

_POOL = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")  # config/settings.POOL_NAME
_NUMBER = re.compile(r"[0-9]{1,9}")

class WorkerLike(Protocol):
    """One connection of a server's `workers` list (gearman/admin.WorkerInfo)."""

    ip: str
    client_id: str
    functions: tuple[str, ...]


@dataclass(frozen=True)
class Member:
    """A connection that is a gearvisor child: which host, pool and slot it belongs to."""

    host: str
    pool: str
    slot: int
    pid: int | None = None


def parse_client_id(client_id: str, own: Mapping[str, frozenset[str]] | None = None
                    ) -> Member | None:
    """The host, pool and slot in a gearvisor client id, or None for any other id.
    `own` maps this master's prefixes to its pool names: those match exactly first, so a
    local prefix with colons in it is never misread."""
    if not client_id or len(client_id) > MAX_ID:
        return None
    for prefix, pools in (own or {}).items():
        if client_id.startswith(prefix + ":"):
            pool, _, tail = client_id[len(prefix) + 1:].partition(":")
            member = _member(prefix, [pool, *tail.split(":", 2)]) if pool in pools else None
            if member is not None:
                return member
    # From the right (linear, whatever the colons): with a pid first, as the shortest
    # prefix reads it, then without.
    for cuts in (3, 2):
        head, *tail = client_id.rsplit(":", cuts)
        # A prefix is a token (no spaces); unprintable text is nobody's prefix either.
        token = head.isprintable() and " " not in head
        member = _member(head, tail) if token and len(tail) == cuts else None
        if member is not None:
            return member
    return None


def _member(host: str, tail: list[str]) -> Member | None:
    """Member(host, pool, slot[, pid]) when `tail` is [pool, slot] or [pool, slot, pid]
    and `host` is not empty."""
    if len(tail) not in (2, 3) or not host:
        return None
    if not _POOL.fullmatch(tail[0]) or not all(_NUMBER.fullmatch(n) for n in tail[1:]):
        return None
    return Member(host, tail[0], int(tail[1]), int(tail[2]) if len(tail) == 3 else None)

@dataclass
class PoolSeen:
    """One pool of one host: per server, its connections (one per child: a child being
    replaced in a roll shares its slot, and so its client id, with its successor) and the
    slots they name; the functions they registered."""

    connections: dict[str, int] = field(default_factory=dict)
    slots: dict[str, set[int]] = field(default_factory=dict)
    functions: set[str] = field(default_factory=set)

    @property
    def children(self) -> int:
        """Children registered on the server that lists the most of them."""
        return max(self.connections.values(), default=0)


@dataclass
class HostSeen:
    """One gearvisor host in a look."""

    pools: dict[str, PoolSeen] = field(default_factory=dict)
    addresses: set[str] = field(default_factory=set)
    servers: set[str] = field(default_factory=set)
    connections: int = 0


@dataclass
class ForeignSeen:
    """Connections that are no gearvisor child's, under one client id (or one address)."""

    client_id: str | None  # None: the worker set no client id; it is known by `address`
    addresses: set[str] = field(default_factory=set)
    connections: dict[str, int] = field(default_factory=dict)  # per server
    functions: set[str] = field(default_factory=set)


@dataclass
class Look:
    """The fleet as the answered servers' last `workers` lists show it."""

    servers: tuple[str, ...]
    hosts: dict[str, HostSeen]
    foreign: dict[str, ForeignSeen]


def look(workers: Mapping[str, Iterable[WorkerLike]],
         own: Mapping[str, frozenset[str]] | None = None) -> Look:
    """Group each answered server's `workers` list (server name -> connections) into
    gearvisor hosts and foreign workers. Linear in the connections, which the probe
    already bounds (admin.PROBE_MAX_LINES per server)."""
    hosts: dict[str, HostSeen] = {}
    foreign: dict[str, ForeignSeen] = {}
    for server, conns in workers.items():
        for w in conns:
            member = parse_client_id(w.client_id, own)
            if member is None and not w.functions:
                continue  # a client, gearadmin or a probe (ours too): no worker at all
            if member is None:
                named = bool(w.client_id) and w.client_id != NO_CLIENT_ID
                key = f"id {w.client_id}" if named else f"address {w.ip}"
                f = foreign.get(key)
                if f is None:
                    f = foreign[key] = ForeignSeen(w.client_id if named else None)
                f.addresses.add(w.ip)
                f.connections[server] = f.connections.get(server, 0) + 1
                f.functions.update(w.functions)
                continue
            host = hosts.get(member.host)
            if host is None:
                host = hosts[member.host] = HostSeen()
            host.addresses.add(w.ip)
            host.servers.add(server)
            host.connections += 1
            pool = host.pools.get(member.pool)
            if pool is None:
                pool = host.pools[member.pool] = PoolSeen()
            pool.connections[server] = pool.connections.get(server, 0) + 1
            pool.slots.setdefault(server, set()).add(member.slot)
            pool.functions.update(w.functions)
    return Look(tuple(sorted(workers)), hosts, foreign)


@dataclass(frozen=True)
class Sighting:
    """A host's last sighting: when, on which servers, how many children of which pools."""

    at: float
    servers: frozenset[str]
    children: int
    pools: tuple[str, ...]


class Memory:
    """The hosts seen in earlier looks, bounded: at most `cap` (the oldest sightings are
    dropped first, counted in `dropped`), none unseen for longer than `forget_after`."""

    def __init__(self, cap: int = MAX_REMEMBERED, forget_after: float = FORGET_AFTER) -> None:
        self.cap = cap
        self.forget_after = forget_after
        self.hosts: dict[str, Sighting] = {}  # oldest sighting first
        self.dropped = 0

    def observe(self, seen: Look, now: float) -> None:
        """Record the hosts of a look; forget what is too old or over the cap."""
        for name, host in seen.hosts.items():
            self.hosts.pop(name, None)
            self.hosts[name] = Sighting(now, frozenset(host.servers), _children(host),
                                        tuple(sorted(host.pools)))
        for name in list(self.hosts):
            if now - self.hosts[name].at <= self.forget_after:
                break
            del self.hosts[name]
        while len(self.hosts) > self.cap:
            del self.hosts[next(iter(self.hosts))]
            self.dropped += 1

    def vanished(self, seen: Look) -> list[tuple[str, Sighting]]:
        """Hosts remembered but in no `workers` list now, although at least one server they
        were last seen on answered: they are gone, not merely out of sight."""
        answered = set(seen.servers)
        return [(name, s) for name, s in self.hosts.items()
                if name not in seen.hosts and s.servers & answered]


def _children(host: HostSeen) -> int:
    """A host's children: each child registers on every server of its pool, so a pool's
    count is that of the server listing the most of them."""
    return sum(p.children for p in host.pools.values())


def partial(seen: Look) -> list[tuple[str, str, list[str], list[str]]]:
    """(host, pool, registered on, missing from) for each host whose pool is registered on
    some servers but not on another where that pool is registered from another host: its
    children failed to register there, or it was not configured with that server."""
    where: dict[str, set[str]] = {}
    for host in seen.hosts.values():
        for name, pool in host.pools.items():
            where.setdefault(name, set()).update(pool.connections)
    found = []
    for host_name in sorted(seen.hosts):
        host = seen.hosts[host_name]
        for name in sorted(host.pools):
            missing = where[name] - set(host.pools[name].connections)
            if missing:
                found.append((host_name, name, sorted(host.pools[name].connections),
                              sorted(missing)))
    return found


def _cut(text: str) -> str:
    return text if len(text) <= MAX_TEXT else text[:MAX_TEXT] + "..."


def _names(items: Iterable[str], cap: int) -> tuple[list[str], int]:
    ordered = sorted(items)
    return [_cut(s) for s in ordered[:cap]], max(0, len(ordered) - cap)


def slot_ranges(slots: Iterable[int], cap: int = 20) -> str:
    """Slots as compact ranges, "0-3,5" (at most `cap` ranges, then "...")."""
    ordered = sorted(set(slots))
    ranges: list[str] = []
    i = 0
    while i < len(ordered) and len(ranges) < cap:
        j = i
        while j + 1 < len(ordered) and ordered[j + 1] == ordered[j] + 1:
            j += 1
        ranges.append(str(ordered[i]) if i == j else f"{ordered[i]}-{ordered[j]}")
        i = j + 1
    return ",".join(ranges) + (",..." if i < len(ordered) else "")


def _host_row(name: str, host: HostSeen, local: bool) -> dict[str, Any]:
    pools = []
    for pool_name in sorted(host.pools)[:MAX_POOLS]:
        pool = host.pools[pool_name]
        functions, more = _names(pool.functions, MAX_FUNCTIONS)
        pools.append({
            "pool": pool_name,
            "servers": {s: {"children": n, "slots": slot_ranges(pool.slots[s])}
                        for s, n in sorted(pool.connections.items())},
            "functions": functions, "functions_omitted": more})
    addresses, more_addresses = _names(host.addresses, MAX_ADDRESSES)
    return {"host": _cut(name), "local": local, "addresses": addresses,
            "addresses_omitted": more_addresses, "servers": sorted(host.servers),
            "connections": host.connections, "children": _children(host), "pools": pools,
            "pools_omitted": max(0, len(host.pools) - MAX_POOLS)}


def report(seen: Look, memory: Memory, now: float, local: Iterable[str] = (),
           servers: Iterable[dict[str, Any]] = ()) -> dict[str, Any]:
    """The `gearvisor fleet --json` reply: hosts (the local ones first), foreign workers
    (most connections first), then flags (vanished hosts, partial registrations); every
    list bounded, with the count of what was left out. `servers` are the job servers'
    rows (name, answered, age) as the caller knows them."""
    mine = set(local)
    order = sorted(seen.hosts, key=lambda h: (h not in mine, h))
    hosts = [_host_row(h, seen.hosts[h], h in mine) for h in order[:MAX_HOSTS]]
    ranked = sorted(seen.foreign.items(),
                    key=lambda kv: (-sum(kv[1].connections.values()), kv[0]))
    foreign = []
    for _, f in ranked[:MAX_FOREIGN]:
        functions, more = _names(f.functions, MAX_FUNCTIONS)
        addresses, more_addresses = _names(f.addresses, MAX_ADDRESSES)
        foreign.append({"worker": _cut(f.client_id) if f.client_id is not None
                        else addresses[0] if addresses else "?",
                        "client_id": None if f.client_id is None else _cut(f.client_id),
                        "addresses": addresses, "addresses_omitted": more_addresses,
                        "servers": dict(sorted(f.connections.items())),
                        "connections": sum(f.connections.values()),
                        "functions": functions, "functions_omitted": more})
    flags: list[dict[str, Any]] = []
    for name, s in sorted(memory.vanished(seen), key=lambda v: v[0]):
        flags.append({"flag": "vanished", "host": _cut(name),
                      "last_seen_age": round(max(0.0, now - s.at), 3),
                      "last_servers": sorted(s.servers), "last_children": s.children,
                      "last_pools": [_cut(p) for p in s.pools[:MAX_POOLS]]})
    for host, pool, on, missing in partial(seen):
        flags.append({"flag": "partial", "host": _cut(host), "pool": pool,
                      "registered_on": on, "missing_from": missing})
    return {
        "servers": list(servers),
        "hosts": hosts, "hosts_omitted": max(0, len(order) - MAX_HOSTS),
        "foreign": foreign, "foreign_omitted": max(0, len(ranked) - MAX_FOREIGN),
        "flags": flags[:MAX_FLAGS], "flags_omitted": max(0, len(flags) - MAX_FLAGS),
        "remembered": len(memory.hosts), "forgotten_over_cap": memory.dropped,
    }
