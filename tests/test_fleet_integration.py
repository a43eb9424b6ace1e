"""`gearvisor fleet` end to end: two real masters with different client_id_prefix (two
hosts) on one real gearmand, plus two raw workers that are not gearvisor's (one with a
client id, one without). Either master lists both hosts and both foreign workers from its
own probe; once one master stops, the other flags it as vanished."""

from __future__ import annotations

import json
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import HOST, REPO, Master, wait_value

from gearvisor.gearman.protocol import Packet, encode

pytestmark = pytest.mark.integration


def host_master(tmp: Path, prefix: str, server: str, processes: int) -> Master:
    """A master in its own directory (its own config and control socket): one host."""
    tmp.mkdir()
    base = {"log_format": "json", "pythonpath": [str(REPO)],
            "control_socket": str(tmp / "gearvisor.sock"), "state_dir": str(tmp / "state")}
    return Master(tmp, {"servers": [server], "watch_config": False, "probe_interval": "300ms",
                        "client_id_prefix": prefix,
                        "pools": {"text": {"processes": processes, "watch": False,
                                           "functions": {"reverse": "examples.text:reverse"}}}},
                  uuid.uuid4().hex, base)


@pytest.fixture
def hosts(gearmand, tmp_path: Path) -> Iterator[tuple[Master, Master]]:
    a = host_master(tmp_path / "a", "hosta", gearmand.address, 2)
    b = host_master(tmp_path / "b", "hostb", gearmand.address, 1)
    try:
        yield a.start(), b.start()
    finally:
        for m in (a, b):
            m.cleanup()


@pytest.fixture
def foreign(gearmand) -> Iterator[None]:
    """Two raw workers on the test's own sockets: `php-resize` (SET_CLIENT_ID) doing
    resize, and one with no client id doing legacy. Closed (unregistered) afterwards."""
    named = socket.create_connection((HOST, gearmand.port), timeout=5)
    anonymous = socket.create_connection((HOST, gearmand.port), timeout=5)
    try:
        named.sendall(encode(Packet.SET_CLIENT_ID, "php-resize") + encode(Packet.CAN_DO, "resize"))
        anonymous.sendall(encode(Packet.CAN_DO, "legacy"))
        yield
    finally:
        named.close()
        anonymous.close()


def fleet(m: Master) -> dict[str, Any] | None:
    """`gearvisor fleet --json` from this master, or None while it does not answer yet."""
    out = m.ctl("fleet", "--json", timeout=10)
    return json.loads(out.stdout) if out.returncode == 0 else None


def complete(view: dict[str, Any] | None) -> bool:
    """Both hosts with all their children, and both foreign workers."""
    if not view:
        return False
    children = {h["host"]: h["pools"][0]["servers"] for h in view["hosts"]}
    foreign = {f["worker"] for f in view["foreign"]}
    return (set(children) == {"hosta", "hostb"}
            and all(len(s) == 1 for s in children.values())
            and next(iter(children["hosta"].values()))["children"] == 2
            and next(iter(children["hostb"].values()))["children"] == 1
            and {"php-resize", HOST} <= foreign)


def test_fleet_lists_both_hosts_and_the_foreign_workers_then_flags_a_vanished_host(
        gearmand, hosts: tuple[Master, Master], foreign: None) -> None:
    a, b = hosts
    for m, local in ((a, "hosta"), (b, "hostb")):
        view = wait_value(lambda m=m: fleet(m), complete, timeout=30,
                          message=f"{local}'s master sees both hosts and the foreign workers")
        assert [h["host"] for h in view["hosts"]] == [local, ({"hosta", "hostb"} - {local}).pop()]
        assert [h["local"] for h in view["hosts"]] == [True, False]
        text = next(h for h in view["hosts"] if h["host"] == "hosta")["pools"][0]
        assert (text["pool"], text["functions"]) == ("text", ["reverse"])
        assert text["servers"][gearmand.address]["slots"] == "0-1"
        php = next(f for f in view["foreign"] if f["worker"] == "php-resize")
        assert (php["client_id"], php["functions"]) == ("php-resize", ["resize"])
        anonymous = next(f for f in view["foreign"] if f["client_id"] is None)
        assert (anonymous["addresses"], anonymous["functions"]) == ([HOST], ["legacy"])
        assert view["flags"] == []

    out = a.ctl("fleet")
    assert out.returncode == 0, out.stderr
    assert "host hosta (this master)" in out.stdout and "host hostb" in out.stdout
    assert "php-resize" in out.stdout and "(no client id)" in out.stdout

    assert b.ctl("stop").returncode == 0
    view = wait_value(lambda: fleet(a), lambda v: v and v["flags"], timeout=30,
                      message="hostb flagged as vanished")
    (flag,) = view["flags"]
    assert (flag["flag"], flag["host"], flag["last_pools"]) == ("vanished", "hostb", ["text"])
    assert flag["last_children"] == 1 and flag["last_servers"] == [gearmand.address]
    assert [h["host"] for h in view["hosts"]] == ["hosta"]
    assert "VANISHED  hostb" in a.ctl("fleet").stdout
