"""Integration: self-quarantine, the pool circuit breaker, poison jobs, job timeouts and
recycling, against a real gearmand with real forked children.

Every load loop is bounded in count and time; every wait polls a condition to a deadline.
"""

from __future__ import annotations

import collections
import time
from pathlib import Path

import psutil
import pytest
from conftest import HOST, wait_equal, wait_for, wait_value, write_module

from gearvisor.gearman import admin
from gearvisor.gearman.client import Client

pytestmark = pytest.mark.integration

MAX_JOBS = 400
MAX_SECONDS = 30

WORKERS = '''
import os, signal
from gearvisor.job import JobTimeout

FLAG = {flag!r}
RESULTS = {results!r}
HOARD = []


def record(job, what="ok"):
    with open(RESULTS, "a") as f:  # O_APPEND: one whole line per job
        f.write(f"{{job.unique}} {{what}} {{os.getpid()}}\\n")


def slot0_broken(job):
    """Fails at once in slot 0 only (its database connection is gone)."""
    if os.environ["GEARVISOR_SLOT"] == "0":
        raise ConnectionError("database connection lost")
    record(job)
    return "ok"


def all_broken(job):
    """Fails at once in every child while the flag file exists (a downstream outage)."""
    if os.path.exists(FLAG):
        raise ConnectionError("downstream is down")
    record(job)
    return "ok"


def crash(job):
    if job.data == b"crash":
        os._exit(1)
    record(job)
    return "ok"


def hang(job):
    """Hangs (waits for signals, forever); with b"stubborn" it ignores the soft timeout and
    must be killed."""
    while True:  # the hung job under test: only a timeout ends it
        try:
            signal.pause()
        except JobTimeout:
            if job.data != b"stubborn":
                raise


def steal_alarm(job):
    signal.signal(signal.SIGALRM, lambda *args: None)  # job code that uses alarm() itself
    return "ok"


def work(job):
    if job.data == b"hoard":
        HOARD.append(bytearray(8 * 1024 * 1024))  # 8 MiB more per job: a leak
    record(job)
    return "ok"
'''


def results(tmp_path: Path) -> collections.Counter:
    path = tmp_path / "results.txt"
    if not path.exists():
        return collections.Counter()
    return collections.Counter(line.split()[0] for line in path.read_text().splitlines())


def fleet(gearmand, master, tmp_path: Path, functions: dict, processes: int = 3,
          **pool) -> object:
    write_module(tmp_path, "healthmod", WORKERS.format(flag=str(tmp_path / "broken"),
                                                       results=str(tmp_path / "results.txt")))
    m = master({"servers": [gearmand.address], "watch_config": False,
                "pools": {"p": {"processes": processes, "functions": functions, "watch": False,
                                **pool}}})
    wait_for(lambda: sum(1 for w in gearmand.workers("p") if w.functions) == processes,
             timeout=20, message=f"{processes} children registered")
    return m


def queued(gearmand, function: str, column: str = "queued") -> int:
    """gearmand's count of jobs of `function`: queued (all, running ones included) or
    running."""
    st = admin.status(HOST, gearmand.port, 2.0).get(function)
    return getattr(st, column) if st else 0


def children(m) -> list[dict]:
    return m.status()["pools"][0]["children"]


def test_a_child_that_fails_fast_quarantines_itself_and_the_others_keep_serving(
        gearmand, master, tmp_path):
    m = fleet(gearmand, master, tmp_path, {"work": "healthmod:slot0_broken"},
              quarantine={"min_jobs": 3, "ratio": 1.0, "window": 5, "cooldown": "60s"})
    slot0 = next(c for c in children(m) if c["slot"] == 0)
    submitted = []
    deadline = time.monotonic() + MAX_SECONDS
    with Client(HOST, gearmand.port) as c:
        for i in range(MAX_JOBS):  # until slot 0 has quarantined itself
            if m.events("child quarantined itself: it fails fast, so it takes no more jobs") \
                    or time.monotonic() > deadline:
                break
            c.submit_background("work", "x", f"job-{i}")
            submitted.append(f"job-{i}")
        event = wait_for(lambda: m.events("child quarantined itself: it fails fast, so it "
                                          "takes no more jobs"), message="quarantine")[0]
        assert (event["slot"], event["child_pid"]) == (0, slot0["pid"])
        assert event["jobs_failed"] == 3  # within min_jobs: 3 fast failures in a row
        # From now on every job succeeds: the quarantined child takes none.
        more = [f"after-{i}" for i in range(30)]
        for u in more:
            c.submit_background("work", "x", u)
    wait_for(lambda: set(results(tmp_path)) >= set(more), message="later jobs all done")
    assert all(results(tmp_path)[u] == 1 for u in more)
    # Jobs submitted before the quarantine may still be running in the other children
    # (the later ones can overtake them): wait for them, then count exactly.
    wait_equal(lambda: sum(1 for u in submitted if results(tmp_path)[u]), len(submitted) - 3,
               message="jobs done of those submitted before the quarantine (all but the 3 "
                       "slot 0 failed)")
    row = next(c for c in children(m) if c["slot"] == 0 and c["role"] == "serving")
    assert (row["pid"], row["state"]) == (slot0["pid"], "quarantined")
    assert "failed in under" in row["quarantined"]
    # The child sets its title after it has told the master.
    wait_value(lambda: " ".join(psutil.Process(slot0["pid"]).cmdline()),
               lambda title: "quarantined" in title, message="the quarantined title")
    # gearmand agrees: the quarantined connection has no functions registered any more
    # (its RESET_ABILITIES goes out once its GRABs are answered, after the event).
    wait_value(lambda: [w for w in gearmand.workers("p") if w.client_id.endswith(":p:0")],
               lambda mine: mine and all(not w.functions for w in mine),
               message="slot 0 unregistered in gearmand")
    # (a busy child may have a second lane open: one client id, two connections)
    assert len({w.client_id for w in gearmand.workers("p") if w.functions}) == 2


def test_a_child_that_quarantines_mid_drain_runs_no_job_it_held(gearmand, master, tmp_path):
    """Draining a backlog, a child holds the next job on its second connection while it
    runs one (hold_next). When that one makes it quarantine itself, the held job goes back
    to gearmand for a healthy sibling instead of being run (and failed) by it."""
    m = fleet(gearmand, master, tmp_path, {"work": "healthmod:slot0_broken"}, processes=2,
              quarantine={"min_jobs": 3, "ratio": 1.0, "window": 5, "cooldown": "60s"})
    uniques = [f"job-{i}" for i in range(300)]
    with Client(HOST, gearmand.port) as c:
        c.submit_background_many("work", uniques, deadline=time.monotonic() + 30)
    wait_for(lambda: queued(gearmand, "work") == 0 and sum(
        c["jobs_done"] + c["jobs_failed"] for c in children(m)) == 300, timeout=30,
        message="the backlog drained")
    row = next(c for c in children(m) if c["slot"] == 0)
    assert row["state"] == "quarantined"
    assert row["jobs_failed"] == 3, row  # the three that made it quarantine, no more
    assert sum(1 for u in uniques if results(tmp_path)[u]) == 297


def test_when_every_child_fails_the_circuit_opens_and_the_queue_waits(gearmand, master,
                                                                       tmp_path):
    (tmp_path / "broken").touch()
    m = fleet(gearmand, master, tmp_path, {"work": "healthmod:all_broken"},
              quarantine={"min_jobs": 2, "ratio": 1.0, "window": 4, "cooldown": "60s",
                          "probation_jobs": 1},
              circuit={"ratio": 0.6, "cooldown": "1s"})
    uniques = [f"job-{i}" for i in range(60)]
    with Client(HOST, gearmand.port) as c:
        for u in uniques:
            c.submit_background("work", "x", u)
    opened = wait_for(lambda: m.events("circuit open: most children of the pool fail fast, "
                                       "so the fault is downstream or in the jobs; the pool "
                                       "stops consuming (jobs stay queued in gearmand) and "
                                       "probes with one child after a cooldown"),
                      timeout=20, message="circuit open")[0]
    assert opened["internal_event"] == "circuit_open"
    # The circuit opens while the last children may still be finishing a job or about to
    # see the pause: measure the queue once the pool has stopped consuming (no job running,
    # no connection registered), so it then stays put until a probe.
    wait_equal(lambda: (queued(gearmand, "work", "running"),
                        [w.client_id for w in gearmand.workers("p") if w.functions]),
               (0, []), message="(jobs running, connections registered)")
    depth = queued(gearmand, "work")
    assert depth >= 60 - 3 * 2  # at most min_jobs failures per child before it stopped
    # Each probe takes at most one job; the rest stay queued in gearmand.
    wait_for(lambda: m.events("circuit stays open: the probe child failed too; next probe "
                              "later"), timeout=20, message="a failed probe")
    assert queued(gearmand, "work") >= depth - 2
    status = m.status()["pools"][0]
    assert status["circuit"] in ("open", "probing")
    # Nobody consumes: the failed probe unregisters (RESET_ABILITIES) after it told the master.
    wait_value(lambda: [w for w in gearmand.workers("p") if w.functions], lambda got: not got,
               message="no connection of the pool registered")
    # The fault is cleared: the next probe succeeds, the circuit closes, the queue drains.
    (tmp_path / "broken").unlink()
    wait_for(lambda: m.events("circuit closed: the probe child succeeded; the pool consumes "
                              "again"), timeout=30, message="circuit closed")
    wait_for(lambda: queued(gearmand, "work") == 0, timeout=30, message="queue drained")
    done = results(tmp_path)
    failed = [u for u in uniques if not done[u]]
    assert len(failed) <= 3 * 2 + 3  # the fast failures before the circuit opened + probes
    assert all(done[u] <= 1 for u in uniques)


def test_a_job_that_kills_its_worker_is_poison_after_two_crashes(gearmand, master, tmp_path):
    m = fleet(gearmand, master, tmp_path, {"work": "healthmod:crash"}, processes=2,
              backoff={"initial": 0})
    with Client(HOST, gearmand.port) as c:
        c.submit_background("work", "crash", "the-poison")
        others = [f"ok-{i}" for i in range(20)]
        for u in others:
            c.submit_background("work", "fine", u)
    poison = wait_for(lambda: m.events("poison job: it crashed; 2 children died on it, so "
                                       "from now on it is failed without running"),
                      timeout=20, message="poison recognised")[0]
    assert (poison["function"], poison["unique"], poison["size"]) == ("work", "the-poison", 5)
    refused = wait_for(lambda: m.events("poison job failed without running"), timeout=20,
                       message="a child refused it")[0]
    assert (refused["unique"], refused["size"]) == ("the-poison", 5)

    def crashes() -> list[dict]:
        return [e for e in m.events("child crashed; restarting with backoff")
                if e.get("unique") == "the-poison"]

    wait_for(lambda: queued(gearmand, "work") == 0, message="queue empty: the poison is gone")
    wait_for(lambda: set(results(tmp_path)) >= set(others), message="other jobs done")
    # The master logs the second crash just after the poison event, and a child may refuse
    # the job before that: wait for the line, then check no third child died on the job.
    wait_value(crashes, lambda got: len(got) >= 2, message="the two crashes logged")
    # Exactly 2, though gearmand re-hands the job the moment its worker dies, before the
    # master has reaped it: the next child still sees the dead one's running slot.
    assert len(crashes()) == 2, crashes()
    # The second crashed child's replacement registers after it boots.
    wait_equal(lambda: sum(1 for w in gearmand.workers("p") if w.functions), 2,
               message="children registered again")


def test_a_hung_job_is_killed_after_its_timeout_and_the_child_replaced(gearmand, master,
                                                                       tmp_path):
    m = fleet(gearmand, master, tmp_path,
              {"hang": {"callable": "healthmod:hang", "timeout": "300ms"}}, processes=1,
              timeout_grace="300ms", backoff={"initial": 0}, poison_after=0)
    pid = children(m)[0]["pid"]
    # Soft: a job that lets JobTimeout escape ends in WORK_FAIL; the child lives on.
    with Client(HOST, gearmand.port, timeout=20) as c:
        r = c.call("hang", "polite")
    assert not r.ok
    assert children(m)[0]["pid"] == pid
    # Hard: a job that swallows JobTimeout is killed at timeout + grace, and replaced.
    with Client(HOST, gearmand.port, timeout=20) as c:
        c.submit_background("hang", "stubborn", "stubborn-1")
    killed = wait_for(lambda: m.events("job hung past its timeout; killing the child"),
                      timeout=20, message="hard timeout")[0]
    assert (killed["child_pid"], killed["unique"], killed["timeout"]) == (pid, "stubborn-1",
                                                                          0.3)
    wait_for(lambda: (c := children(m)) and c[0]["pid"] != pid and c[0]["state"] == "busy"
             or (c[0]["pid"] != pid and c[0]["state"] == "idle"),
             timeout=20, message="a replacement child")
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


@pytest.mark.parametrize("limit", ["max_jobs", "max_memory"])
def test_recycling_replaces_children_without_losing_a_job(gearmand, master, tmp_path, limit):
    pool = ({"max_jobs": 10, "recycle_jitter": 0} if limit == "max_jobs"
            else {"max_memory": "120M"})
    payload = "x" if limit == "max_jobs" else "hoard"
    m = fleet(gearmand, master, tmp_path, {"work": "healthmod:work"}, processes=2, **pool)
    first = {c["pid"] for c in children(m)}
    uniques: list[str] = []
    low = 2
    # Rounds of 20 jobs until every original child has asked to be recycled: which child
    # runs a job is gearmand's and the pool's bell's choice, so one original may see few
    # of the first 60 (bounded: 600 jobs, 60 s).
    deadline = time.monotonic() + 60
    with Client(HOST, gearmand.port) as c:
        while len(uniques) < 600 and time.monotonic() < deadline:
            for _ in range(20):
                u = f"job-{len(uniques)}"
                c.submit_background("work", payload, u)
                uniques.append(u)
                low = min(low, sum(1 for w in gearmand.workers("p") if w.functions))
            wait_for(lambda: set(results(tmp_path)) >= set(uniques), timeout=30,
                     message="every job done")
            if first <= {e["child_pid"] for e in
                         m.events("recycling child: a successor starts first")}:
                break
    counts = results(tmp_path)
    assert [u for u in uniques if counts[u] != 1] == []  # none lost, none run twice
    wait_for(lambda: not first & {c["pid"] for c in children(m)}, timeout=20,
             message="every original child recycled")
    # Each original asked to be recycled (the master logs it) before its successor started.
    recycled = m.events("recycling child: a successor starts first")
    assert recycled and all(e["reason"].startswith(limit) for e in recycled)
    assert low >= 2  # capacity held while submitting
    assert not m.events("child crashed; restarting with backoff")


def test_job_code_that_takes_over_sigalrm_is_reported(gearmand, master, tmp_path):
    m = fleet(gearmand, master, tmp_path, {"steal": "healthmod:steal_alarm"}, processes=1)
    with Client(HOST, gearmand.port, timeout=20) as c:
        assert c.call("steal", "x").ok
        assert c.call("steal", "x").ok
    warned = wait_for(lambda: m.events(
        "the job code replaced gearvisor's SIGALRM handler: soft job timeouts and the "
        "graceful-stop backstop no longer work in this child; use JobTimeout (function "
        "timeout:) instead of signal.alarm"), message="the warning")
    assert len(warned) == 1 and warned[0]["function"] == "steal"  # once per child
