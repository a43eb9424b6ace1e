"""shm.stats.JobStats: per-function job counts and duration histograms in shared memory, in
one process and across a real fork."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from gearvisor.shm.scoreboard import Scoreboard
from gearvisor.shm.stats import ERROR, OUTCOMES, POISON, SUCCESS, TIMEOUT, JobStats


@pytest.fixture
def stats() -> Iterator[JobStats]:
    s = JobStats({"resize": (0.01, 0.1, 1.0), "mail": (5.0,)})
    try:
        yield s
    finally:
        s.close()


def test_fresh_region_counts_nothing(stats: JobStats) -> None:
    got = stats.read()
    assert set(got) == {"resize", "mail"}
    assert got["resize"].outcomes == (0,) * len(OUTCOMES)
    assert got["resize"].buckets == (0, 0, 0, 0)
    assert got["resize"].bounds == (0.01, 0.1, 1.0)
    assert got["mail"].buckets == (0, 0) and got["mail"].sum == 0.0


def test_outcomes_and_buckets_use_prometheus_le(stats: JobStats) -> None:
    stats.job_done("resize", SUCCESS, 0.01)  # on a bound: counts in that bucket (le)
    stats.job_done("resize", SUCCESS, 0.0100001)
    stats.job_done("resize", ERROR, 0.5)
    stats.job_done("resize", TIMEOUT, 7.0)  # past the last bound: +Inf
    stats.job_not_run("resize", POISON)
    stats.job_not_run("mail", ERROR)
    got = stats.read()
    assert got["resize"].outcomes == (2, 1, 1, 1)
    assert got["resize"].buckets == (1, 1, 1, 1)
    assert got["resize"].sum == pytest.approx(7.5200001)
    assert got["mail"].outcomes == (0, 1, 0, 0) and got["mail"].buckets == (0, 0)


def test_a_function_outside_the_layout_is_not_counted(stats: JobStats) -> None:
    stats.job_done("not-ours", SUCCESS, 0.1)
    stats.job_not_run("not-ours", POISON)
    assert set(stats.read()) == {"resize", "mail"}
    assert all(sum(f.outcomes) == 0 for f in stats.read().values())


def test_no_functions_at_all() -> None:
    s = JobStats({})
    assert s.read() == {}
    s.job_done("x", SUCCESS, 1.0)
    s.close()


def test_a_forked_child_writes_what_the_master_reads() -> None:
    board = Scoreboard(JobStats({"f": (0.5,)}))
    try:
        pid = os.fork()
        if pid == 0:  # the child: never return into pytest
            code = 70
            try:
                assert board.stats is not None
                for i in range(1000):
                    board.stats.job_done("f", SUCCESS if i % 4 else ERROR, 1.0 if i % 2 else 0.1)
                code = 0
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        got = board.stats.read()["f"]
        assert got.outcomes == (750, 250, 0, 0)
        assert got.buckets == (500, 500)
        assert got.sum == pytest.approx(550.0)
    finally:
        board.close()
