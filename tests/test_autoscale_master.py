"""master/autoscale's pure helpers: hosts counted from the job servers' client ids, and
what freezes a pool. No processes: views and pools are built by hand."""

from __future__ import annotations

from fleet import Fleet
from test_pool import pool_config

from gearvisor.gearman.admin import WorkerInfo
from gearvisor.master.autoscale import frozen_reason, hosts_running
from gearvisor.master.bus import ServerView
from gearvisor.policy.pool import Circuit, Pool


def view(*client_ids: str) -> ServerView:
    return ServerView(("127.0.0.1", 4730), answered=True, workers=tuple(
        WorkerInfo(fd=i, ip="127.0.0.1", client_id=cid, functions=("resize",))
        for i, cid in enumerate(client_ids)))


def test_hosts_are_the_distinct_prefixes_of_the_pools_client_ids() -> None:
    views = [view("a:images:0", "a:images:1", "b:images:0", "c:other:0", "-", "php-1"),
             view("b:images:3", "d.example:images:2:4242", "x:imagesX:0")]
    assert hosts_running("images", views, "a") == 3  # a, b, d.example (a command child)
    assert hosts_running("images", [], "a") == 1  # this host always counts
    assert hosts_running("images", [view("h:1:images:0")], "a") == 2  # a ':' in a prefix
    assert hosts_running("other", views, "a") == 2


def test_frozen_on_open_circuit_roll_and_most_children_failing() -> None:
    pool = Pool(pool_config(4))
    fleet = Fleet(pool)
    fleet.step()
    fleet.ready_all()
    assert frozen_reason(pool) is None
    pool.circuit = Circuit.OPEN
    assert frozen_reason(pool) == "circuit open"
    pool.circuit = Circuit.CLOSED
    pool.roll()
    assert frozen_reason(pool) == "rolling"
    for _ in range(20):  # max_surge 25%: one slot at a time
        if not pool.rolling:
            break
        fleet.step()
        fleet.ready_all()
        fleet.reap_retired()
    assert frozen_reason(pool) is None
    pool.slots[0].child.quarantined = "fails fast"
    fleet.exit(pool.slots[1].child, 1)  # crashed: in backoff
    assert frozen_reason(pool) is None  # half is not most
    fleet.exit(pool.slots[2].child, 1)
    assert frozen_reason(pool) == "3 of 4 children quarantined or in crash backoff"
