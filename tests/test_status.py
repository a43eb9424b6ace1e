"""status: pool_status()/fleet_status() as data, render() as the table, summary() for systemd.

A real Pool from a parsed config, with Child records holding real Scoreboards; the children's
pid is this test process (so RSS is real) except where a missing process is wanted.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest

from gearvisor.cli.render import _duration, _size, render
from gearvisor.config import PoolConfig, parse
from gearvisor.helpers.watcher import Debouncer, WatcherState, WatchSpec
from gearvisor.master.status import STATUS_VERSION, fleet_status, pool_status, summary
from gearvisor.messages import JobStarted
from gearvisor.policy.child import Child, ChildState, reported_job
from gearvisor.policy.pool import Pool, Spawn
from gearvisor.shm.scoreboard import Scoreboard

NOW = 10_000.0
GONE_PID = 2**31 - 1  # above any pid_max: psutil finds no such process

CONFIG = """\
pools:
  images:
    processes: 4
    functions:
      resize: "examples.images:resize"
    backoff:
      initial: 5s
      jitter: 0
  text:
    processes: 1
    functions:
      reverse: "examples.text:reverse"
"""


def configs(tmp_path: Path) -> dict[str, PoolConfig]:
    return parse(CONFIG, str(tmp_path / "pools.yaml"), euid=0).pools


@pytest.fixture
def boards() -> Iterator[list[Scoreboard]]:
    made: list[Scoreboard] = []
    try:
        yield made
    finally:
        for b in made:
            b.close()


def make_child(pool: Pool, slot: int, boards: list[Scoreboard], *, state: ChildState,
               started_at: float, generation: int | None = None, pid: int | None = None,
               board: bool = True) -> Child:
    child = Child(pool=pool.name, slot=slot,
                  generation=pool.generation if generation is None else generation,
                  started_at=started_at, pid=os.getpid() if pid is None else pid, state=state)
    if board:
        child.scoreboard = Scoreboard()
        boards.append(child.scoreboard)
    return child


class Fleet(SimpleNamespace):
    """The parts of an Arbiter that status reads."""


def fleet(*pools: Pool, started_at: float = NOW - 3700, stopping: bool = False) -> Fleet:
    watcher = WatcherState(WatchSpec(None, ()))
    return Fleet(pid=os.getpid(), config=SimpleNamespace(path="/etc/gearvisor/pools.yaml"),
                 started_at=started_at, stopping=stopping, reloads=2,
                 pools={p.name: p for p in pools}, lane_hints=None,
                 parts=lambda now: {"watcher": watcher.status(now, Debouncer(1.0))})


@pytest.fixture
def images(tmp_path: Path, boards: list[Scoreboard]) -> Pool:
    """A pool mid-roll to generation 2, with one child of each kind:

    slot 0: busy ready child of gen 1, its gen-2 successor starting beside it
    slot 1: idle ready child of gen 2 (already rolled)
    slot 2: a child of gen 2 still starting, no scoreboard yet
    slot 3: empty, backing off after a crash
    retired: a gen-1 child draining, whose process is gone
    """
    pool = Pool(configs(tmp_path)["images"])
    s0, s1, s2, s3 = pool.slots

    busy = make_child(pool, 0, boards, state=ChildState.READY, started_at=NOW - 125)
    for ok in (True, True, True, False, True, True):
        busy.scoreboard.job_started("resize", "H:x", "", NOW - 200)
        busy.scoreboard.job_finished(ok)
    busy.scoreboard.job_started("resize", "H:host:77", "img-77", NOW - 2.5)
    pool.placed(Spawn(s0), busy)

    crashed = make_child(pool, 3, boards, state=ChildState.READY, started_at=NOW - 1)
    pool.placed(Spawn(s3), crashed)
    crashed.transition(ChildState.EXITED)
    decision = pool.child_exited(crashed, 1, NOW - 0.5, stopping=False)
    assert decision.restart_in == 5.0

    old = make_child(pool, 1, boards, state=ChildState.READY, started_at=NOW - 4000)
    pool.placed(Spawn(s1), old)

    pool.roll()  # generation 2
    assert pool.generation == 2

    successor = make_child(pool, 0, boards, state=ChildState.STARTING, started_at=NOW - 0.25)
    pool.placed(Spawn(s0, successor=True), successor)

    # slot 1 already rolled: its old child retired, a ready gen-2 child serves
    pool.retiring(old)
    old.transition(ChildState.DRAINING)
    old.pid = GONE_PID
    idle = make_child(pool, 1, boards, state=ChildState.READY, started_at=NOW - 30)
    for _ in range(3):
        idle.scoreboard.job_started("resize", "H:y", "", NOW - 20)
        idle.scoreboard.job_finished(True)
    pool.placed(Spawn(s1), idle)

    starting = make_child(pool, 2, boards, state=ChildState.STARTING, started_at=NOW - 0.5,
                          board=False)
    pool.placed(Spawn(s2), starting)

    s3.restart_at = NOW + 4.5  # the roll reset it; a backoff delay still pending
    return pool


def rows_by_role(status: dict) -> dict[tuple[int, str], dict]:
    return {(r["slot"], r["role"]): r for r in status["children"]}


# -- pool_status ----------------------------------------------------------------------------------


def test_pool_fields(images: Pool) -> None:
    st = pool_status(images, NOW)
    assert {k: v for k, v in st.items() if k != "children"} == {
        "name": "images", "generation": 2, "desired": 4, "actual": 3, "ready": 2,
        "rolling": True, "halted": None, "removed": False, "scaled": False,
        "scaled_by": None, "circuit": "closed", "command": None}


def test_rows_in_order(images: Pool) -> None:
    rows = pool_status(images, NOW)["children"]
    assert [(r["slot"], r["role"], r["state"]) for r in rows] == [
        (0, "serving", "busy"),
        (0, "successor", "starting"),
        (1, "serving", "idle"),
        (2, "serving", "starting"),
        (3, "empty", "backoff"),
        (1, "retired", "draining"),
    ]


def test_busy_child_row(images: Pool) -> None:
    row = rows_by_role(pool_status(images, NOW))[(0, "serving")]
    rss = row.pop("rss")
    cpu = row.pop("cpu")
    assert row == {
        "slot": 0, "pid": os.getpid(), "state": "busy", "role": "serving", "generation": 1,
        "uptime": 125.0, "jobs_done": 5, "jobs_failed": 1, "function": "resize",
        "handle": "H:host:77", "unique": "img-77", "job_seconds": 2.5,
        "quarantined": None, "probation": False, "bell": None, "restarts": 0}
    own = psutil.Process().memory_info().rss
    assert isinstance(rss, int) and own / 2 < rss < own * 2
    # CPU seconds so far (a counter for `gearvisor top`'s CPU%): this process' own.
    times = psutil.Process().cpu_times()
    assert isinstance(cpu, float) and 0 < cpu <= times.user + times.system + 0.01


def test_idle_child_row(images: Pool) -> None:
    row = rows_by_role(pool_status(images, NOW))[(1, "serving")]
    assert row["state"] == "idle"
    assert row["generation"] == 2
    assert row["uptime"] == 30.0
    assert (row["jobs_done"], row["jobs_failed"]) == (3, 0)
    assert row["function"] is row["handle"] is row["unique"] is row["job_seconds"] is None
    assert isinstance(row["rss"], int) and row["rss"] > 0


def test_successor_row(images: Pool) -> None:
    row = rows_by_role(pool_status(images, NOW))[(0, "successor")]
    assert (row["state"], row["generation"], row["uptime"]) == ("starting", 2, 0.25)
    assert row["pid"] == os.getpid()
    assert (row["jobs_done"], row["function"], row["job_seconds"]) == (0, None, None)


def test_starting_child_without_a_scoreboard(images: Pool) -> None:
    row = rows_by_role(pool_status(images, NOW))[(2, "serving")]
    assert row["state"] == "starting"
    assert (row["jobs_done"], row["jobs_failed"], row["function"]) == (0, 0, None)


def test_starting_child_busy_scoreboard_still_reads_starting(images: Pool,
                                                             boards: list[Scoreboard]) -> None:
    """STARTING and DRAINING win over what the scoreboard says; the job is still shown."""
    child = images.slots[0].successor
    assert child is not None and child.scoreboard is not None
    child.scoreboard.job_started("resize", "H:early", "", NOW - 0.1)
    row = rows_by_role(pool_status(images, NOW))[(0, "successor")]
    assert row["state"] == "starting"
    assert row["function"] == "resize"
    assert row["job_seconds"] == 0.1



def test_a_command_childs_reported_job_makes_it_busy(tmp_path: Path) -> None:
    """A command child has no scoreboard: the job its reporting shim said it started (and
    has not ended) is its job in status; without one it is idle."""
    cfg = parse("pools:\n  php:\n    processes: 1\n    command: [php, w.php]\n"
                "    functions: {resize: {timeout: 30s}}\n", str(tmp_path / "p.yaml"),
                euid=0).pools["php"]
    pool = Pool(cfg)
    child = make_child(pool, 0, [], state=ChildState.READY, started_at=NOW - 60, board=False)
    pool.placed(Spawn(pool.slots[0]), child)
    row = rows_by_role(pool_status(pool, NOW))[(0, "serving")]
    assert (row["state"], row["function"], row["jobs_done"]) == ("idle", None, 0)
    child.job = reported_job(JobStarted("resize", "H:host:9", "img-9", "", 0), NOW - 4.0, 0)
    row = rows_by_role(pool_status(pool, NOW))[(0, "serving")]
    assert (row["state"], row["function"], row["handle"], row["unique"],
            row["job_seconds"]) == ("busy", "resize", "H:host:9", "img-9", 4.0)

def test_retired_row_of_a_gone_process(images: Pool) -> None:
    row = rows_by_role(pool_status(images, NOW))[(1, "retired")]
    assert (row["state"], row["role"], row["generation"]) == ("draining", "retired", 1)
    assert row["pid"] == GONE_PID
    assert row["rss"] is None
    assert row["uptime"] == 4000.0


def test_empty_backing_off_slot_row(images: Pool) -> None:
    row = rows_by_role(pool_status(images, NOW))[(3, "empty")]
    assert row == {"slot": 3, "pid": None, "state": "backoff", "role": "empty",
                   "generation": None, "retry_in": 4.5, "failures": 1, "reason": "crashed",
                   "restarts": 1}


def test_empty_slot_that_never_failed_is_pending_not_backoff(tmp_path: Path) -> None:
    pool = Pool(configs(tmp_path)["images"])  # nothing spawned yet
    rows = pool_status(pool, NOW)["children"]
    assert [(r["state"], r["failures"]) for r in rows] == [("pending", 0)] * len(pool.slots)
    table = render({"master": {"pid": 1, "state": "running", "uptime": 1.0, "rss": None,
                               "config": "x.yaml"},
                    "pools": [pool_status(pool, NOW)]})
    assert table.splitlines()[2].split()[:4] == ["images", "0", "-", "pending"]


def test_retry_in_never_negative(images: Pool) -> None:
    row = rows_by_role(pool_status(images, NOW + 60))[(3, "empty")]
    assert row["retry_in"] == 0.0


def test_job_seconds_never_negative(images: Pool) -> None:
    row = rows_by_role(pool_status(images, NOW - 10))[(0, "serving")]
    assert row["job_seconds"] == 0.0


def test_pool_flags(images: Pool) -> None:
    images.halted = "images[0] of generation 2 crashed before it was ready"
    images.scaled_to = 6
    st = pool_status(images, NOW)
    assert st["halted"] == "images[0] of generation 2 crashed before it was ready"
    assert st["scaled"] is True
    assert st["desired"] == 6
    images.removed = True
    st = pool_status(images, NOW)
    assert (st["removed"], st["desired"]) == (True, 0)


def test_settled_pool_is_not_rolling(tmp_path: Path, boards: list[Scoreboard]) -> None:
    pool = Pool(configs(tmp_path)["text"])
    child = make_child(pool, 0, boards, state=ChildState.READY, started_at=NOW - 5)
    pool.placed(Spawn(pool.slots[0]), child)
    st = pool_status(pool, NOW)
    assert (st["actual"], st["ready"], st["rolling"], st["generation"]) == (1, 1, False, 1)
    assert [r["role"] for r in st["children"]] == ["serving"]


# -- fleet_status -------------------------------------------------------------------------------


def test_fleet_status(images: Pool, tmp_path: Path) -> None:
    text = Pool(configs(tmp_path)["text"])
    st = fleet_status(fleet(images, text), NOW)
    assert st["version"] == STATUS_VERSION == 1
    master = st["master"]
    assert master["pid"] == os.getpid()
    assert master["config"] == "/etc/gearvisor/pools.yaml"
    assert (master["uptime"], master["state"], master["reloads"]) == (3700.0, "running", 2)
    assert isinstance(master["rss"], int) and master["rss"] > 0
    assert [p["name"] for p in st["pools"]] == ["images", "text"]
    assert fleet_status(fleet(images, stopping=True), NOW)["master"]["state"] == "stopping"


# -- render ---------------------------------------------------------------------------------------


HEADER = ["POOL", "SLOT", "PID", "STATE", "GEN", "UPTIME", "DONE", "FAILED", "JOB", "RSS"]


def rendered(images: Pool) -> list[str]:
    """The table and pool lines; the watcher line, always last, is checked and left off."""
    lines = render(fleet_status(fleet(images), NOW)).splitlines()
    assert lines[-1].startswith("watcher ")
    return lines[:-1]


def test_render_master_line(images: Pool) -> None:
    first = rendered(images)[0]
    assert first.startswith(f"master pid {os.getpid()}  running  up 1h01m  rss ")
    assert first.endswith("M  config /etc/gearvisor/pools.yaml")


def test_render_table(images: Pool) -> None:
    lines = rendered(images)
    header = lines[1]
    assert header.split() == HEADER
    rows = lines[2:8]
    assert len(rows) == 6  # one per child row, the empty slot included
    assert all(r.startswith("images") for r in rows)
    busy, successor, idle, starting, empty, retired = rows
    pid = str(os.getpid())
    assert busy.split()[:8] == ["images", "0", pid, "busy", "1", "2m05s", "5", "1"]
    assert "resize 2.5s" in busy
    assert busy.split()[-1].endswith("M")
    assert "starting (successor)" in successor
    assert successor.split()[5:8] == ["2", "0.2s", "0"]
    assert idle.split()[3:8] == ["idle", "2", "30s", "3", "0"]
    assert "draining (retired)" in retired
    assert retired.split()[-1] == "-"  # no RSS for a process that is gone
    assert empty.split()[:4] == ["images", "3", "-", "backoff"]
    assert "retry in 4.5s: crashed" in empty
    assert starting.split()[3] == "starting"
    # Columns line up: every cell starts where its header does.
    for name in ("SLOT", "PID", "STATE", "GEN", "UPTIME", "JOB"):
        col = header.index(name)
        for row in rows:
            assert row[col - 2:col] == "  " and row[col] != " ", (name, row)


def test_render_pool_line_rolling(images: Pool) -> None:
    last = rendered(images)[-1]
    assert last == "pool images: 2/4 ready, 3 running, generation 2  [rolling]"


def test_render_pool_line_halted(images: Pool) -> None:
    images.halted = "images[0] of generation 2 crashed before it was ready"
    last = rendered(images)[-1]
    assert last.startswith("pool images: 2/4 ready, 3 running, generation 2  [")
    assert "ROLL HALTED: images[0] of generation 2 crashed before it was ready" in last
    assert "rolling" not in last


def test_render_pool_line_removed_and_scaled(images: Pool) -> None:
    images.scaled_to = 6
    assert rendered(images)[-1].endswith("[rolling; scaled by hand]")
    images.removed = True
    assert "pool images: 2/0 ready" in rendered(images)[-1]
    assert rendered(images)[-1].endswith("[removed, draining; rolling; scaled by hand]")


def test_render_one_pool_line_each(images: Pool, tmp_path: Path,
                                   boards: list[Scoreboard]) -> None:
    text = Pool(configs(tmp_path)["text"])
    child = make_child(text, 0, boards, state=ChildState.READY, started_at=NOW - 90000)
    text.placed(Spawn(text.slots[0]), child)
    lines = render(fleet_status(fleet(images, text), NOW)).splitlines()
    assert lines[-3].startswith("pool images: ")
    assert lines[-2] == "pool text: 1/1 ready, 1 running, generation 1"
    text_rows = [line for line in lines if line.startswith("text ")]
    assert len(text_rows) == 1
    assert text_rows[0].split()[3:6] == ["idle", "1", "1d01h"]


def test_render_without_pools() -> None:
    out = render(fleet_status(fleet(), NOW)).splitlines()
    assert len(out) == 3
    assert out[2] == "watcher disabled (watch: false everywhere and watch_config: false)"
    assert out[1].split() == HEADER


@pytest.mark.parametrize(("seconds", "text"), [
    (None, "-"), (0, "0.0s"), (2.54, "2.5s"), (9.9, "9.9s"), (10, "10s"), (59.9, "59s"),
    (60, "1m00s"), (3599, "59m59s"), (3600, "1h00m"), (86399, "23h59m"), (86400, "1d00h"),
    (90061, "1d01h"),
])
def test_duration(seconds: float | None, text: str) -> None:
    assert _duration(seconds) == text


@pytest.mark.parametrize(("n", "text"), [(None, "-"), (0, "0.0M"), (1048576, "1.0M"),
                                         (157286400, "150.0M")])
def test_size(n: int | None, text: str) -> None:
    assert _size(n) == text


# -- summary --------------------------------------------------------------------------------------


def ready_pool(config: PoolConfig, boards: list[Scoreboard]) -> Pool:
    pool = Pool(config)
    for slot in pool.slots:
        pool.placed(Spawn(slot), make_child(pool, slot.index, boards, state=ChildState.READY,
                                            started_at=NOW - 60))
    return pool


def test_summary_all_ready(tmp_path: Path, boards: list[Scoreboard]) -> None:
    cfg = configs(tmp_path)
    arb = fleet(ready_pool(cfg["images"], boards), ready_pool(cfg["text"], boards))
    assert summary(arb.pools.values()) == "5/5 children ready in 2 pool(s)"


def test_summary_rolling_and_restarting(images: Pool, tmp_path: Path,
                                        boards: list[Scoreboard]) -> None:
    text = ready_pool(configs(tmp_path)["text"], boards)
    assert summary(fleet(images, text).pools.values()) == \
        "3/5 children ready in 2 pool(s); images: rolling"
    # Once the roll is over, the slot that is still backing off is what shows.
    images.generation = 1
    for slot in images.slots:
        slot.successor = None
        if slot.child is not None:
            slot.child.generation = 1
    assert summary(fleet(images, text).pools.values()) == \
        "3/5 children ready in 2 pool(s); images: 1 restarting"


def test_summary_halted_wins_over_rolling(images: Pool) -> None:
    images.halted = "images[0] of generation 2 failed to boot"
    assert summary(fleet(images).pools.values()) == \
        "2/4 children ready in 1 pool(s); images: roll halted"


def test_summary_no_pools() -> None:
    assert summary(fleet().pools.values()) == "0/0 children ready in 0 pool(s)"



# -- gearmand's side: servers, functions, findings -------------------------------------------------

def gearmand_views() -> dict:
    from gearvisor.gearman.admin import FunctionStatus, WorkerInfo
    from gearvisor.master.bus import ServerView

    up = ServerView(("127.0.0.1", 4730), answered=True, answered_at=NOW - 2.0, version="1.1.20",
                    pid=4242, functions={
                        "resize": FunctionStatus("resize", 7, 2, 5),
                        "legacy": FunctionStatus("legacy", 3, 0, 0),
                        "idle_foreign": FunctionStatus("idle_foreign", 0, 0, 4)},
                    workers=(WorkerInfo(1, "127.0.0.1", "host:images:0", ("resize",)),
                             WorkerInfo(2, "127.0.0.1", "host:images:1", ("resize",)),
                             # slot 1's second lane (hold_next): the same worker
                             WorkerInfo(4, "127.0.0.1", "host:images:1", ("resize",)),
                             WorkerInfo(3, "10.0.0.9", "-", ("resize", "idle_foreign"))))
    down = ServerView(("127.0.0.1", 4731), up=False, failures=4, error="connect: refused")
    return {up.server: up, down.server: down}


def test_functions_cover_our_pools_on_each_server_and_foreign_ones_with_jobs(
        tmp_path: Path) -> None:
    from dataclasses import replace

    from gearvisor.config.model import Server
    from gearvisor.master.status import functions_status

    pc = replace(configs(tmp_path)["images"], client_id_prefix="host",
                 servers=(Server("127.0.0.1", 4730), Server("127.0.0.1", 4731)))
    rows, omitted = functions_status(gearmand_views(), [Pool(pc)])
    assert omitted == 0
    assert rows == [
        {"function": "legacy", "server": "127.0.0.1:4730", "pools": [], "waiting": 3,
         "running": 0, "workers_ours": 0, "workers_all": 0},
        {"function": "resize", "server": "127.0.0.1:4730", "pools": ["images"], "waiting": 5,
         "running": 2, "workers_ours": 2, "workers_all": 5},
        {"function": "resize", "server": "127.0.0.1:4731", "pools": ["images"], "waiting": None,
         "running": None, "workers_ours": None, "workers_all": None},
    ]  # idle_foreign: 0 jobs and no pool of ours, so left out


def test_render_servers_functions_and_findings(images: Pool) -> None:
    from gearvisor.master.status import servers_status

    status = fleet_status(fleet(images), NOW)
    status["servers"] = servers_status(gearmand_views().values(), NOW)
    status["functions"] = [
        {"function": "resize", "server": "127.0.0.1:4730", "pools": ["images"], "waiting": 5,
         "running": 2, "workers_ours": 2, "workers_all": 5},
        {"function": "resize", "server": "127.0.0.1:4731", "pools": ["images"],
         "waiting": None, "running": None, "workers_ours": None, "workers_all": None}]
    status["functions_omitted"] = 3
    status["findings"] = [{"kind": "server_down", "server": "127.0.0.1:4731", "function": None,
                           "pool": None, "message": "job server 127.0.0.1:4731 is down",
                           "details": {}, "age": 75.0}]
    out = render(status).splitlines()
    start = out.index(next(line for line in out if line.startswith("SERVER")))
    assert out[start:] == [
        "SERVER          STATE  VERSION  PID   ANSWERED",
        "127.0.0.1:4730  up     1.1.20   4242  2.0s ago",
        "127.0.0.1:4731  DOWN   -        -     never  (connect: refused)",
        "FUNCTION  SERVER          WAITING  RUNNING  WORKERS  POOLS",
        "resize    127.0.0.1:4730  5        2        2/5      images",
        "resize    127.0.0.1:4731  -        -        -        images",
        "(3 more functions with jobs queued not shown; see --json)",
        "health: 1 finding(s)",
        "  SERVER_DOWN  job server 127.0.0.1:4731 is down  (for 1m15s)",
    ]
    status["findings"] = []
    assert render(status).splitlines()[-1] == "health: ok"


def test_render_journal_line(images: Pool) -> None:
    status = fleet_status(fleet(images), NOW)
    status["journal"] = {"store": "postgresql://gv@db/jobs", "up": False,
                         "error": "connection refused", "dead_letters": 3, "waiting": 12,
                         "dropped": 0}
    [line] = [x for x in render(status).splitlines() if x.startswith("journal:")]
    assert line == ("journal: store postgresql://gv@db/jobs DOWN (connection refused)  dead "
                    "letters 3 (gearvisor dead list)  12 lines waiting")


def test_render_autoscale_line_names_its_inputs_once() -> None:
    from gearvisor.cli.render import _autoscale_line

    line = _autoscale_line({"pool": "w", "desired": 1, "min": 1, "max": 6, "target": 10,
                             "state": "steady", "reason": "backlog 0 over 1 host(s)",
                             "backlog": 0, "hosts": 1, "pinned": None})
    assert line == ("autoscale w: 1 processes [1..6] target 10  steady: backlog 0 over 1 "
                    "host(s)")
    frozen = _autoscale_line({"pool": "w", "desired": 3, "min": 1, "max": 6, "target": 10,
                               "state": "frozen", "reason": "the circuit is open",
                               "backlog": 40, "hosts": 2, "pinned": None})
    assert frozen.endswith("frozen: the circuit is open  backlog 40 over 2 host(s)")


def test_render_never_prints_a_control_sequence_from_a_job_server(tmp_path: Path) -> None:
    """Any client names a function and any server its version: `gearvisor status` shows
    them escaped, so a hostile name cannot drive the operator's terminal."""
    pool = Pool(configs(tmp_path)["images"])
    evil = "\x1b]0;owned\x07\x1b[2J"
    status = {"master": {"pid": 1, "state": "running", "uptime": 1.0, "rss": None,
                         "config": "x.yaml"},
              "pools": [pool_status(pool, NOW)],
              "servers": [{"server": "127.0.0.1:4730", "up": True, "answered": True,
                           "version": f"1.1{evil}", "pid": 7, "last_answer_age": 1.0,
                           "error": None}],
              "functions": [{"function": f"mail{evil}", "server": "127.0.0.1:4730",
                             "waiting": 3, "running": 0, "workers_ours": 0,
                             "workers_all": 0, "pools": []}],
              "findings": [{"kind": "no_workers", "message": f"mail{evil} has no worker",
                            "age": 5.0}]}
    text = render(status)
    assert all(c == "\n" or c.isprintable() for c in text), repr(text)
    assert "mail\\x1b]0;owned\\x07\\x1b[2J" in text
    assert text.count("\n") == len(text.splitlines()) - 1  # no line broken by a name
