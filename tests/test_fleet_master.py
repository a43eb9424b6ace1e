"""master/fleet.Fleet in a whole master on a fake OS and a fake clock (tests/fakeos.py):
the probe's views arrive as Snapshot events; the `fleet` verb reads the answered ones,
knows this master's own prefix and pools exactly, and remembers hosts between looks."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from fakeos import FakeMaster

from gearvisor.gearman.admin import WorkerInfo
from gearvisor.master import bus as ev
from gearvisor.master.component import Component
from gearvisor.master.fleet import Fleet

S1, S2 = ("127.0.0.1", 4730), ("127.0.0.1", 4731)


class Views(Component):
    """Stands in for the probe: the test sets the views and publishes the Snapshot."""

    def __init__(self) -> None:
        self.views: dict[tuple[str, int], ev.ServerView] = {}

    def attach(self, master: Any) -> None:
        self.master = master

    def show(self, server: tuple[str, int], *client_ids: str, answered: bool = True) -> None:
        old = self.views.get(server)
        workers = tuple(WorkerInfo(30 + i, "10.0.0.1", c, ("f",))
                        for i, c in enumerate(client_ids))
        view = ev.ServerView(server, answered=answered,
                             answered_at=self.master.clock() if answered else None,
                             workers=workers if answered else (old.workers if old else None))
        self.views[server] = view
        self.master.bus.publish(ev.Snapshot(view))


@pytest.fixture
def fleet(tmp_path: Path, log: io.StringIO) -> Iterator[tuple[FakeMaster, Views]]:
    path = tmp_path / "gearvisor.yaml"
    # A prefix with a colon and a pool named with digits: only the exact match reads it.
    path.write_text(yaml.safe_dump({
        "watch_config": False, "client_id_prefix": "dc1:7", "servers": ["127.0.0.1:4730"],
        "pools": {"42": {"processes": 1, "functions": {"f": "examples.text:echo"},
                         "watch": False}}}))
    views = Views()
    m = FakeMaster(str(path), (views, Fleet(views)))
    try:
        yield m, views
    finally:
        m.close()


def ask(m: FakeMaster) -> dict[str, Any]:
    reply = m.arbiter.verbs["fleet"]({"verb": "fleet"})
    json.dumps(reply)
    assert reply["ok"]
    return reply["fleet"]


def test_the_masters_own_ids_are_its_host_and_other_prefixes_other_hosts(
        fleet: tuple[FakeMaster, Views]) -> None:
    m, views = fleet
    views.show(S1, "dc1:7:42:0", "web2:42:0", "php")
    out = ask(m)
    assert [(h["host"], h["local"], [p["pool"] for p in h["pools"]]) for h in out["hosts"]] \
        == [("dc1:7", True, ["42"]), ("web2", False, ["42"])]
    assert [f["worker"] for f in out["foreign"]] == ["php"]
    assert out["servers"][0]["server"] == "127.0.0.1:4730" and out["servers"][0]["answered"]


def test_a_host_gone_from_an_answered_server_is_flagged_and_one_behind_a_failing_one_not(
        fleet: tuple[FakeMaster, Views]) -> None:
    m, views = fleet
    views.show(S1, "dc1:7:42:0", "web2:42:0")
    views.show(S2, "web3:42:0")
    m.advance(5.0)
    views.show(S2, answered=False)  # web3's only server stops answering: not vanished
    assert ask(m)["flags"] == []
    assert "web3" not in [h["host"] for h in ask(m)["hosts"]]  # its old list is not read
    m.advance(5.0)
    views.show(S1, "dc1:7:42:0")  # web2 gone from a server that answered
    (flag,) = ask(m)["flags"]
    assert (flag["flag"], flag["host"], flag["last_seen_age"]) == ("vanished", "web2", 10.0)
    views.show(S1, "dc1:7:42:0", "web2:42:0")  # back
    assert ask(m)["flags"] == []
