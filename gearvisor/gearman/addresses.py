"""Job servers' addresses as the master last looked them up, kept in the master's memory,
so that a child forked from it starts with them: a child born while DNS hangs connects to
its servers at once, instead of waiting out the resolver's timeout for each named one.

The master's probe (master/probe.py) remembers each answer of its resolver helper and
forgets a server no pool uses any more; a Python child hands `known()` to its Worker
(gearman/worker.py), which uses each for RESOLVE_EVERY before it looks the name up itself.
At most one entry per job server of the config. Command pools exec another program, which
resolves names its own way.
"""

from __future__ import annotations

from gearvisor.gearman.admin import Address

_known: dict[tuple[str, int], Address] = {}


def remember(host: str, port: int, address: Address) -> None:
    _known[(host, port)] = address


def forget(host: str, port: int) -> None:
    _known.pop((host, port), None)


def known() -> dict[tuple[str, int], Address]:
    """A copy: (host, port) -> (family, sockaddr)."""
    return dict(_known)
