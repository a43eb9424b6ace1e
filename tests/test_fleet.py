"""policy/fleet: grouping the job servers' `workers` lists into gearvisor hosts and foreign
workers, the memory that flags vanished hosts, and the bounded report. Pure: WorkerInfo
rows as gearmand's `workers` answer parses, an injected clock."""

from __future__ import annotations

import json
import time

from gearvisor.cli.render import render_fleet
from gearvisor.gearman.admin import WorkerInfo, parse_worker_line
from gearvisor.policy import fleet
from gearvisor.policy.fleet import Member, Memory, look, parse_client_id, report

S1, S2 = "127.0.0.1:4730", "127.0.0.1:4731"


def w(client_id: str, *functions: str, ip: str = "10.0.0.1", fd: int = 30) -> WorkerInfo:
    return WorkerInfo(fd, ip, client_id, functions)


def test_client_ids_of_python_and_command_children_name_host_pool_and_slot() -> None:
    assert parse_client_id("web1:images:3") == Member("web1", "images", 3)
    assert parse_client_id("web1:php.resize:0:4242") == Member("web1", "php.resize", 0, 4242)


def test_a_prefix_with_colons_is_read_from_the_right() -> None:
    assert parse_client_id("dc1:web1:images:3") == Member("dc1:web1", "images", 3)
    assert parse_client_id("a:b:c:images:12:99") == Member("a:b:c", "images", 12, 99)


def test_the_masters_own_prefix_and_pools_match_exactly_first() -> None:
    # Without `own`, "web:1:2:3" is read as host web, pool 1, slot 2, pid 3: the local
    # master knows its prefix is "web:1" with a pool named "2".
    assert parse_client_id("web:1:2:3") == Member("web", "1", 2, 3)
    own = {"web:1": frozenset({"2"})}
    assert parse_client_id("web:1:2:3", own) == Member("web:1", "2", 3)
    assert parse_client_id("other:images:0", own) == Member("other", "images", 0)


def test_ids_that_are_no_gearvisor_childs_are_foreign() -> None:
    for client_id in ("", "-", "php-resize", "host:pool", "host:pool:", ":pool:1",
                      "host::1", "host:pool:x", "host:pool:1:2:3x", "host:po/ol:1",
                      "host pool:images:1", "host:images:1234567890",
                      "h:" + "p" * 65 + ":1", "x" * (fleet.MAX_ID + 1) + ":images:1"):
        assert parse_client_id(client_id) is None, client_id


def test_a_huge_id_made_of_colons_is_parsed_in_linear_time() -> None:
    started = time.monotonic()
    # 8k of them fill a probe's answer (admin.PROBE_MAX_BYTES); each look reads them all.
    for client_id in (":" * 1000, "a:" * 500, "a:1:" * 250 + "x", "a:1:2:" * 160 + "x"):
        for _ in range(8000):
            assert parse_client_id(client_id, {"a": frozenset({"1"})}) is None
    assert time.monotonic() - started < 2.0
    assert parse_client_id("x" * 60_000) is None  # over MAX_ID: not even looked at


def test_hosts_pools_children_per_server_and_foreign_workers() -> None:
    seen = look({
        S1: [w("web1:images:0", "resize", "thumb"), w("web1:images:1", "resize", "thumb"),
             w("web1:mail:0", "send"), w("web2:images:0", "resize", ip="10.0.0.2"),
             w("php-resize", "resize", ip="10.0.0.9"), w("-", "legacy", ip="10.0.0.8"),
             w("-", "legacy", ip="10.0.0.8", fd=31),
             # a client, gearadmin, a probe: connections with no function are no workers
             w("-", ip="127.0.0.1", fd=40), w("billing-client", ip="10.0.0.5", fd=41)],
        S2: [w("web1:images:0", "resize"), w("web1:images:1", "resize"),
             w("web1:mail:0", "send"), w("web2:images:0", "resize", ip="10.0.0.2")],
    })
    assert sorted(seen.hosts) == ["web1", "web2"]
    web1 = seen.hosts["web1"]
    assert web1.pools["images"].connections == {S1: 2, S2: 2}
    assert web1.pools["images"].functions == {"resize", "thumb"}
    assert web1.pools["mail"].children == 1
    assert web1.connections == 6 and web1.addresses == {"10.0.0.1"}
    assert set(seen.foreign) == {"id php-resize", "address 10.0.0.8"}
    legacy = seen.foreign["address 10.0.0.8"]
    assert legacy.client_id is None and legacy.connections == {S1: 2}

    out = report(seen, Memory(), 0.0, local=["web2"])
    json.dumps(out)
    assert [h["host"] for h in out["hosts"]] == ["web2", "web1"]  # the local host first
    assert out["hosts"][0]["local"] and not out["hosts"][1]["local"]
    images = out["hosts"][1]["pools"][0]
    assert images["servers"] == {S1: {"children": 2, "slots": "0-1"},
                                 S2: {"children": 2, "slots": "0-1"}}
    assert out["hosts"][1]["children"] == 3
    assert [f["worker"] for f in out["foreign"]] == ["10.0.0.8", "php-resize"]
    assert out["foreign"][0]["connections"] == 2
    assert out["flags"] == []
    text = render_fleet(out)
    assert "host web2 (this master)" in text and "php-resize" in text
    assert "(no client id)" in text and "flags: none" in text


def test_a_host_registered_on_one_server_but_not_another_is_flagged() -> None:
    seen = look({S1: [w("web1:images:0", "f"), w("web2:images:0", "f")],
                 S2: [w("web1:images:0", "f")]})
    out = report(seen, Memory(), 0.0)
    assert out["flags"] == [{"flag": "partial", "host": "web2", "pool": "images",
                             "registered_on": [S1], "missing_from": [S2]}]
    assert "PARTIAL   web2: pool images registered on 127.0.0.1:4730, not on " \
        "127.0.0.1:4731" in render_fleet(out)


def test_a_pool_seen_on_one_server_only_is_not_partial() -> None:
    seen = look({S1: [w("web1:images:0", "f"), w("web2:images:0", "f")],
                 S2: [w("web1:mail:0", "g")]})
    assert report(seen, Memory(), 0.0)["flags"] == []


def test_a_host_whose_workers_vanished_is_flagged_until_it_returns_or_is_forgotten() -> None:
    memory = Memory(forget_after=100.0)
    both = {S1: [w("web1:images:0", "f"), w("web2:images:0", "f"), w("web2:images:1", "f")]}
    memory.observe(look(both), 10.0)
    gone = look({S1: [w("web1:images:0", "f")]})
    memory.observe(gone, 15.0)
    flags = report(gone, memory, 20.0)["flags"]
    assert flags == [{"flag": "vanished", "host": "web2", "last_seen_age": 10.0,
                      "last_servers": [S1], "last_children": 2, "last_pools": ["images"]}]
    memory.observe(gone, 105.0)
    assert report(gone, memory, 105.0)["flags"]  # still remembered
    memory.observe(gone, 111.0)
    assert report(gone, memory, 111.0)["flags"] == []  # forgotten after forget_after
    memory.observe(look(both), 112.0)
    memory.observe(look(both), 113.0)
    assert report(look(both), memory, 113.0)["flags"] == []  # back: not vanished


def test_a_host_last_seen_only_on_a_server_that_does_not_answer_is_not_vanished() -> None:
    memory = Memory()
    memory.observe(look({S1: [w("web1:a:0", "f")], S2: [w("web2:a:0", "f")]}), 0.0)
    only_s1 = look({S1: [w("web1:a:0", "f")]})  # S2 did not answer: left out of the look
    assert report(only_s1, memory, 1.0)["flags"] == []


def test_memory_is_bounded_and_counts_what_it_dropped() -> None:
    memory = Memory(cap=50)
    for round_ in range(3):
        memory.observe(look({S1: [w(f"h{round_}-{i}:p:0", "f") for i in range(200)]}),
                       float(round_))
    assert len(memory.hosts) == 50 and memory.dropped == 550


def test_reports_are_bounded_with_counts_of_the_rest() -> None:
    many = [w(f"host{i}:pool{j}:0", *(f"fn{k}" for k in range(30)))
            for i in range(fleet.MAX_HOSTS + 7) for j in range(3)]
    many += [w(f"php-{i}", "f") for i in range(fleet.MAX_FOREIGN + 3)]
    many += [w(f"big:pool{j}:0", "f") for j in range(fleet.MAX_POOLS + 2)]
    out = report(look({S1: many}), Memory(), 0.0)
    assert len(out["hosts"]) == fleet.MAX_HOSTS and out["hosts_omitted"] == 8
    assert len(out["foreign"]) == fleet.MAX_FOREIGN and out["foreign_omitted"] == 3
    pools = out["hosts"][0]
    assert pools["host"] == "big" and pools["pools_omitted"] == 2
    assert len(pools["pools"][0]["functions"]) <= fleet.MAX_FUNCTIONS
    host1 = next(h for h in out["hosts"] if h["host"] == "host1")
    assert host1["pools"][0]["functions_omitted"] == 30 - fleet.MAX_FUNCTIONS
    text = render_fleet(out)
    assert "(8 more hosts not shown)" in text and "(3 more not shown)" in text


def test_hostile_names_are_cut_and_made_harmless_for_a_terminal() -> None:
    huge = "y" * 5000
    nasty = "evil\x1b[2J\x07"
    line = f"31 10.0.0.1 {nasty} : {huge} ok"
    parsed = parse_worker_line(line)
    assert parsed is not None
    seen = look({S1: [parsed, w(f"{nasty}:pool:0", "f"), w("z" * 900 + ":p:0", "f")]})
    out = report(seen, Memory(), 0.0)
    json.dumps(out)
    assert all(len(h["host"]) <= fleet.MAX_TEXT + 3 for h in out["hosts"])
    assert all(len(f) <= fleet.MAX_TEXT + 3 for x in out["foreign"] for f in x["functions"])
    text = render_fleet(out)
    assert "\x1b" not in text and "\x07" not in text and "\\x1b[2J" in text


def test_slot_ranges_are_compact_and_bounded() -> None:
    assert fleet.slot_ranges([3, 0, 1, 2, 5, 7, 8]) == "0-3,5,7-8"
    assert fleet.slot_ranges(range(0, 100, 2), cap=3) == "0,2,4,..."
    assert fleet.slot_ranges([]) == ""
