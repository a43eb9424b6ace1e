"""master/findings.HealthFindings in a whole master on a fake OS and a fake clock
(tests/fakeos.py): the probe's views arrive as Snapshot events; each finding is published
and logged once when it appears and once when it clears, and the pools' job counters
survive their children's exits."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from fakeos import FakeMaster

from gearvisor.gearman.admin import FunctionStatus, WorkerInfo
from gearvisor.master import bus as ev
from gearvisor.master.component import Component
from gearvisor.master.findings import HealthFindings
from gearvisor.messages import Ready
from gearvisor.policy.findings import FindingKind

SERVER = ("127.0.0.1", 4730)


class Views(Component):
    """Stands in for the probe: the test sets the views and publishes the Snapshot."""

    def __init__(self) -> None:
        self.views: dict[tuple[str, int], ev.ServerView] = {}

    def attach(self, master: Any) -> None:
        self.master = master

    def show(self, view: ev.ServerView) -> None:
        self.views[view.server] = view
        self.master.bus.publish(ev.Snapshot(view))


@pytest.fixture
def fleet(tmp_path: Path, log: io.StringIO) -> Iterator[tuple[FakeMaster, Views]]:
    path = tmp_path / "gearvisor.yaml"
    path.write_text(yaml.safe_dump({
        "watch_config": False, "client_id_prefix": "host",
        "findings": {"registration_grace": "10s"},
        "pools": {"web": {"processes": 2, "functions": {"f": "examples.text:echo"},
                          "watch": False}}}))
    views = Views()
    m = FakeMaster(str(path), (views, HealthFindings(views)))
    try:
        yield m, views
    finally:
        m.close()


def logged(log: io.StringIO, event: str) -> list[dict[str, Any]]:
    return [line for line in map(json.loads, log.getvalue().splitlines())
            if line["event"] == event]


def registered(m: FakeMaster, *slots: int) -> ev.ServerView:
    """The server's view at this moment, listing the given slots of pool web."""
    return ev.ServerView(SERVER, answered=True, answered_at=m.clock.now, pid=1,
                         functions={"f": FunctionStatus("f", 0, 0, len(slots))},
                         workers=tuple(WorkerInfo(i, "127.0.0.1", f"host:web:{i}", ("f",))
                                       for i in slots))


def test_a_finding_is_published_and_logged_once_when_raised_and_once_when_cleared(
        fleet: tuple[FakeMaster, Views], log: io.StringIO) -> None:
    m, views = fleet
    m.step()
    for child in m.system.forked:
        child.say(Ready())
    m.step()
    views.show(registered(m, 0))  # one of the two ready children is not registered
    m.advance(9.0)
    views.show(registered(m, 0))
    assert m.of(ev.FindingRaised) == []  # within registration_grace
    for _ in range(3):
        m.advance(1.0)
        views.show(registered(m, 0))
    (raised,) = m.of(ev.FindingRaised)
    assert (raised.finding.kind, raised.finding.pool) == (FindingKind.UNDER_REGISTERED, "web")
    (line,) = logged(log, "health finding raised")
    assert line["level"] == "warning" and line["internal_event"] == "finding_raised"
    assert (line["kind"], line["pool"], line["server"]) == ("under_registered", "web",
                                                            "127.0.0.1:4730")
    assert line["details"] == {"registered": 1, "children": 2}
    status = m.arbiter.status(m.clock.now)["findings"]
    assert [(f["kind"], f["pool"], f["age"]) for f in status] == [
        ("under_registered", "web", 12.0)]

    views.show(registered(m, 0, 1))
    (cleared,) = m.of(ev.FindingCleared)
    assert cleared.finding == raised.finding
    assert len(logged(log, "health finding cleared")) == 1
    assert m.arbiter.status(m.clock.now)["findings"] == []
    views.show(registered(m, 0, 1))
    assert len(m.of(ev.FindingRaised)) == 1 and len(m.of(ev.FindingCleared)) == 1


def test_a_pools_job_counter_survives_its_childrens_exits(
        fleet: tuple[FakeMaster, Views]) -> None:
    m, views = fleet
    m.step()
    component = next(c for c in m.arbiter.components if isinstance(c, HealthFindings))
    pool = m.arbiter.pools["web"]
    first = m.system.forked[0]
    board = m.arbiter.children[first.pid][0].scoreboard
    for ok in (True, True, False):
        board.job_started("f", "H:1", "", m.clock.now)
        board.job_finished(ok)
    views.show(registered(m))  # counts 3
    board.job_started("f", "H:2", "", m.clock.now)
    board.job_finished(True)  # a 4th, never seen by a probe before the child dies
    first.exit(1)
    m.step()
    assert component._facts(pool).completed == 4
    m.advance(10.0)  # the slot's backoff: a new child
    newcomer = m.system.forked[-1]
    assert newcomer is not first
    board = m.arbiter.children[newcomer.pid][0].scoreboard
    board.job_started("f", "H:3", "", m.clock.now)
    board.job_finished(True)
    assert component._facts(pool).completed == 5


# -- the probe's schedule ------------------------------------------------------------------------

class RefusedPoll:
    """A probe that fails at once, as a refused connection does."""

    def __init__(self, address: Any, deadline: float) -> None:
        self.sock = __import__("socket").socket()
        self.done, self.error, self.answer = True, "connect: Connection refused", None


def test_a_failing_server_is_retried_with_backoff_down_after_three_and_not_hammered(
        tmp_path: Path, log: io.StringIO) -> None:
    from gearvisor.master.probe import Probe

    path = tmp_path / "gearvisor.yaml"
    path.write_text(yaml.safe_dump({
        "watch_config": False, "probe_interval": "4s",
        "pools": {"web": {"processes": 0, "functions": {"f": "examples.text:echo"},
                          "watch": False}}}))
    calls: list[float] = []
    probe = Probe(lambda address, deadline: (calls.append(m.clock.now), RefusedPoll(
        address, deadline))[1])
    m = FakeMaster(str(path), (probe,))
    try:
        start = m.clock.now
        m.step()
        assert calls == [start]  # the first probe at once
        for _ in range(160):  # a server that stays down, for 40 s
            probe.request({SERVER})  # readiness asking: never while it fails
            m.advance(0.25)
        delays = [b - a for a, b in zip(calls, calls[1:], strict=False)]
        assert 0.9 <= delays[0] <= 1.25 and 1.8 <= delays[1] <= 2.25  # 1s, 2s (+/- jitter)
        assert len(delays) >= 5 and all(7.0 <= d <= 9.0 for d in delays[3:])  # <= 2 x 4s
        snapshots = m.of(ev.Snapshot)
        assert len(snapshots) == len(calls)
        assert [s.view.up for s in snapshots[:4]] == [True, True, False, False]
        assert probe.views[SERVER].failures == len(calls)
    finally:
        m.close()
