"""Autoscaling against a real gearmand and real masters: a backlog scales a pool from min to
max and back, with no job lost or killed; two hosts (two masters with their own
client_id_prefix) split one backlog; an open circuit freezes the autoscaler."""

from __future__ import annotations

import collections
import math
import time
import uuid
from pathlib import Path

import pytest
from conftest import HOST, REPO, Master, wait_for, wait_value, write_module

from gearvisor.gearman.client import Client

pytestmark = pytest.mark.integration

MODULE = '''
import os, time


def work(job):
    time.sleep(float(job.data or 0))
    with open(os.environ["RESULTS"], "a") as f:  # O_APPEND: one whole line per job
        f.write(job.unique + "\\n")
    return "ok"


def broken(job):
    raise RuntimeError("always")
'''

SUBMIT_SECONDS = 30  # every submission loop is bounded in time (and by its list in count)


def pool_workers(gearmand, pool: str) -> int:
    """Children of `pool` in gearmand's `workers` list, by client id (a busy child has a
    second connection, hold_next)."""
    return len({w.client_id for w in gearmand.workers(pool)})


def queued(gearmand, function: str) -> int:
    st = gearmand.status().get(function)
    return st.queued if st else 0


def autoscale_row(m: Master, pool: str) -> dict:
    return next(a for a in m.status()["autoscale"] if a["pool"] == pool)


def config(results: Path, autoscale: dict, **pool: object) -> dict:
    return {"probe_interval": 0.1, "servers": [], "watch_config": False,
            "pools": {"auto": {"functions": {"work": "asmod:work"}, "watch": False,
                               "env": {"RESULTS": str(results)}, "processes": 1,
                               "autoscale": autoscale, **pool}}}


def test_a_backlog_scales_min_to_max_and_back_without_losing_or_killing_a_job(
        gearmand, master, tmp_path):
    write_module(tmp_path, "asmod", MODULE)
    results = tmp_path / "results.txt"
    cfg = config(results, {"min": 1, "max": 6, "target": 10, "up_cooldown": 0.2,
                           "down_after": 2, "max_step": 3})
    cfg["servers"] = [gearmand.address]
    m = master(cfg)
    wait_for(lambda: pool_workers(gearmand, "auto") == 1, timeout=30,
             message="one child registered")
    uniques = [f"bl-{i}" for i in range(5000)]
    with Client(HOST, gearmand.port, timeout=30) as c:
        c.submit_background_many("work", uniques, b"0.004",
                                 deadline=time.monotonic() + SUBMIT_SECONDS)
    # 5,000 jobs recommend max at once: min -> max in ceil((6 - 1) / 3) = 2 decisions.
    wait_for(lambda: pool_workers(gearmand, "auto") == 6, timeout=20,
             message="the pool at max in gearmand's workers list")
    ups = [e for e in m.events("scaling pool") if e.get("by") == "autoscale"]
    assert [(e["before"], e["after"]) for e in ups[:2]] == [(1, 4), (4, 6)], ups
    assert ups[0]["backlog"] > 0 and ups[0]["hosts"] == 1 and ups[0]["recommended"] == 6
    # The queue drains, and down_after (2s) later the pool is back at min.
    wait_for(lambda: queued(gearmand, "work") == 0, timeout=40, message="the queue drained")
    wait_for(lambda: pool_workers(gearmand, "auto") == 1, timeout=20,
             message="the pool back at min in gearmand's workers list")
    row = wait_value(lambda: autoscale_row(m, "auto"), lambda a: a["desired"] == 1,
                     message="autoscale status at min")
    assert row["state"] in ("down", "steady") and (row["min"], row["max"]) == (1, 6)
    downs = [e for e in m.events("scaling pool")
             if e.get("by") == "autoscale" and e["after"] < e["before"]]
    assert downs and downs[-1]["after"] == 1
    # No job lost (each one's side effect is there) and none killed mid-job (none ran
    # twice, which gearmand would do for a job whose worker died; no kill, no crash).
    done = wait_value(lambda: collections.Counter(results.read_text().split()),
                      lambda c: len(c) == len(uniques), message="every job's side effect")
    assert set(done) == set(uniques) and max(done.values()) == 1
    events = collections.Counter(e["event"] for e in m.logs())
    for bad in ("child did not finish in time; killing", "child crashed; restarting with "
                "backoff", "child exited without being asked to; restarting with backoff",
                "child stopped"):  # "child stopped" is a warning only for a non-zero exit
        assert events[bad] == 0, (bad, events)
    retired = [e for e in m.events("retiring child") if e["why"] == "scaled down"]
    assert len(retired) == 5
    status = gearmand.gearadmin("--status")
    line = next(ln for ln in status.splitlines() if ln.startswith("work\t"))
    assert line.split("\t")[1:3] == ["0", "0"], status  # nothing queued, nothing running


def _host(tmp_path: Path, name: str, cfg: dict) -> Master:
    """A master of its own (its own directory, socket, log and client_id_prefix): one host."""
    d = tmp_path / name
    d.mkdir()
    base = {"log_format": "json", "pythonpath": [str(REPO), str(tmp_path)],
            "control_socket": str(d / "gearvisor.sock"), "state_dir": str(d / "state"),
            "client_id_prefix": name}
    return Master(d, cfg, uuid.uuid4().hex, base)


def test_two_hosts_split_one_backlog(gearmand, tmp_path):
    write_module(tmp_path, "asmod", MODULE)
    auto = {"min": 1, "max": 12, "target": 100, "up_cooldown": 0.2, "down_after": 30,
            "max_step": 4}
    cfg = config(tmp_path / "results.txt", auto)
    cfg["servers"] = [gearmand.address]
    hosts = [_host(tmp_path, "hosta", cfg), _host(tmp_path, "hostb", cfg)]
    try:
        for m in hosts:
            m.start()
        wait_for(lambda: pool_workers(gearmand, "auto") == 2, timeout=30,
                 message="one child of each host registered")
        with Client(HOST, gearmand.port, timeout=30) as c:
            # Jobs of 5 s: the backlog barely moves while the hosts settle.
            c.submit_background_many("work", [f"split-{i}" for i in range(1000)], b"5",
                                     deadline=time.monotonic() + SUBMIT_SECONDS)

        def sizes() -> tuple[int, int, int]:
            a, b = (autoscale_row(m, "auto")["desired"] for m in hosts)
            return a, b, queued(gearmand, "work")

        # One host alone would run clamp(ceil(backlog / 100)) = 10 children; each of two
        # takes half the backlog, so together they run that, not twice it.
        a, b, backlog = wait_value(
            sizes, lambda s: s[0] + s[1] >= math.ceil(s[2] / 100) - auto["max_step"]
            and s[0] > 1 and s[1] > 1, timeout=30, message="both hosts scaled up")
        single = min(auto["max"], math.ceil(backlog / auto["target"]))
        assert abs(a + b - single) <= auto["max_step"], (a, b, backlog)
        for m in hosts:
            row = autoscale_row(m, "auto")
            assert row["hosts"] == 2, row
        # Settled: it stays so over more probes (sampled, bounded in time and count).
        deadline = time.monotonic() + 2.0
        for _ in range(50):
            if time.monotonic() >= deadline:
                break
            a, b, backlog = sizes()
            single = min(auto["max"], math.ceil(backlog / auto["target"]))
            assert abs(a + b - single) <= auto["max_step"], (a, b, backlog)
            assert a <= math.ceil(backlog / 200) + 1 and b <= math.ceil(backlog / 200) + 1
    finally:
        for m in hosts:
            m.cleanup()


def test_the_autoscaler_is_frozen_while_the_circuit_is_open(gearmand, master, tmp_path):
    write_module(tmp_path, "asmod", MODULE)
    cfg = config(tmp_path / "results.txt",
                 {"min": 1, "max": 6, "target": 5, "up_cooldown": 5, "down_after": 1,
                  "max_step": 2},
                 functions={"flaky": "asmod:broken"},
                 quarantine={"window": 5, "min_jobs": 5, "ratio": 0.8, "fast": 1,
                             "cooldown": 60},
                 circuit={"ratio": 0.5, "cooldown": 60})
    cfg["servers"] = [gearmand.address]
    # The backlog is there before the master starts: its first child fails five jobs fast,
    # quarantines itself, and the circuit opens well within up_cooldown (5 s from the
    # first decision); the rest of the jobs stay queued, recommending 6 children.
    with Client(HOST, gearmand.port, timeout=30) as c:
        c.submit_background_many("flaky", [f"f-{i}" for i in range(200)], b"",
                                 deadline=time.monotonic() + SUBMIT_SECONDS)
    m = master(cfg)
    wait_for(lambda: m.status()["pools"][0]["circuit"] == "open", timeout=20,
             message="the circuit open")
    # Past up_cooldown, the autoscaler would grow the pool now if it were not frozen.
    row = wait_value(lambda: autoscale_row(m, "auto"),
                     lambda a: a["state"] == "frozen" and a["last_change_age"] > 5.5,
                     timeout=20, message="the autoscaler frozen past up_cooldown")
    assert row["reason"] == "circuit open" and row["backlog"] >= 150
    # It stays frozen at min over many probes (sampled, bounded in time and count).
    deadline = time.monotonic() + 2.0
    samples = 0
    while time.monotonic() < deadline and samples < 100:
        row = autoscale_row(m, "auto")
        assert (row["state"], row["desired"]) == ("frozen", 1), row
        samples += 1
    assert not [e for e in m.events("scaling pool") if e.get("by") == "autoscale"]
    logged = [(e.get("state"), e.get("reason")) for e in m.events("autoscale")]
    frozen = [e for e in m.events("autoscale") if e.get("reason") == "circuit open"]
    assert len(frozen) == 1, logged  # once, not per probe
    assert frozen[0]["backlog"] >= 150 and frozen[0]["recommended"] == 6


def test_scale_for_pins_a_count_that_expires(gearmand, master, tmp_path):
    write_module(tmp_path, "asmod", MODULE)
    cfg = config(tmp_path / "results.txt",
                 {"min": 1, "max": 4, "target": 10, "up_cooldown": 0.2, "down_after": 0.5,
                  "max_step": 4})
    cfg["servers"] = [gearmand.address]
    cfg["pools"]["fixed"] = {"functions": {"other": "asmod:work"}, "watch": False,
                             "processes": 1}
    m = master(cfg)
    wait_for(lambda: pool_workers(gearmand, "auto") == 1 and pool_workers(gearmand, "fixed")
             == 1, timeout=30, message="both pools registered")
    out = m.ctl("scale", "auto", "3", "--for", "4s")
    assert out.returncode == 0 and "1 -> 3 processes for 4s" in out.stdout, out.stderr
    row = autoscale_row(m, "auto")
    assert row["state"] == "pinned" and row["pinned"]["processes"] == 3
    assert 0 < row["pinned"]["expires_in"] <= 4
    table = m.ctl("status").stdout
    assert "autoscale auto: 3 processes [1..4] target 10  pinned" in table, table
    out = m.ctl("scale", "fixed", "2", "--for", "2s")
    assert out.returncode == 0, out.stderr
    # The pins expire: the idle autoscaled pool goes back to min (down_after after the pin
    # ended), the other pool to its processes.
    wait_for(lambda: pool_workers(gearmand, "auto") == 3 or pool_workers(gearmand, "fixed")
             == 2, timeout=20, message="a pinned size registered")
    wait_for(lambda: pool_workers(gearmand, "auto") == 1 and pool_workers(gearmand, "fixed")
             == 1, timeout=20, message="both pools back after their pins")
    assert len(m.events("scale pin expired")) == 2
    by = [(e["pool"], e["by"], e["after"]) for e in m.events("scaling pool")]
    assert ("fixed", "pin expired", 1) in by and ("auto", "autoscale", 1) in by, by
    for bad in ("0s", "31d", "soon"):
        out = m.ctl("scale", "auto", "2", "--for", bad)
        assert out.returncode != 0 and "--for" in out.stderr, (bad, out.stderr)
    # A typo's size is refused before a fork (tests/test_control.py: open files, memory).
    out = m.ctl("scale", "fixed", "100000")
    assert out.returncode != 0 and "at most 10000 children a pool" in out.stderr, out.stderr
    assert m.status()["pools"][1]["desired"] == 1
