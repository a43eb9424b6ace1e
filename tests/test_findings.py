"""policy/findings.py (pure, injected clock) and the probe's view updates (probe.next_view):
each finding is raised from the probe's views and the pools' facts, and clears once its
cause is gone."""

from __future__ import annotations

import pytest

from gearvisor.config.model import FindingsConfig
from gearvisor.gearman.admin import FunctionStatus, ProbeAnswer, WorkerInfo
from gearvisor.master.bus import ServerView
from gearvisor.master.probe import DOWN_AFTER, backoff_for, next_view
from gearvisor.policy.findings import MAX_TRACKED, Finding, FindingKind, Findings, PoolFacts

A = ("127.0.0.1", 4730)
B = ("127.0.0.1", 4731)
CONFIG = FindingsConfig(registration_grace=10.0, no_workers_probes=2, backlog_probes=3,
                        restart_hold=60.0)


def view(server=A, at: float | None = 100.0, functions=(), workers=(), **kw) -> ServerView:
    """A view that answered at `at`; functions as (name, total, running, workers)."""
    return ServerView(server, answered=at is not None, answered_at=at, checked_at=at,
                      functions={f[0]: FunctionStatus(*f) for f in functions},
                      workers=tuple(workers), **{"pid": 7, **kw})


def pool(name="web", functions=("resize",), servers=(A,), ready_at=(), completed=0):
    return PoolFacts(name, f"host:{name}:", frozenset(functions), frozenset(servers),
                     tuple(ready_at), completed)


def worker(pool_name: str, slot: int, *functions: str) -> WorkerInfo:
    return WorkerInfo(10 + slot, "127.0.0.1", f"host:{pool_name}:{slot}", functions)


def kinds(found: frozenset[Finding]) -> list[tuple[str, str | None, str | None]]:
    return sorted((f.kind.value, f.function, f.pool) for f in found)


@pytest.fixture
def findings() -> Findings:
    return Findings(CONFIG)


def test_a_server_down_is_a_finding_until_it_answers_again(findings: Findings) -> None:
    down = ServerView(A, up=False, failures=3, error="connect: Connection refused",
                      answered_at=50.0)
    (found,) = findings.evaluate([down], [pool()], 100.0)
    assert found.kind is FindingKind.SERVER_DOWN and found.server == "127.0.0.1:4730"
    assert "3 probes in a row failed (connect: Connection refused)" in found.message
    assert found.since == 100.0
    assert findings.evaluate([down], [pool()], 105.0) == {found}
    (again,) = findings.evaluate([down], [pool()], 105.0)
    assert again.since == 100.0  # still the same outage
    assert findings.evaluate([view(at=106.0)], [pool()], 106.0) == frozenset()


def test_a_restart_is_a_finding_for_restart_hold_naming_both_pids(findings: Findings) -> None:
    assert findings.evaluate([view(pid=7, at=100.0)], [], 100.0) == frozenset()
    (found,) = findings.evaluate([view(pid=9, restarts=1, at=101.0)], [], 101.0)
    assert found.kind is FindingKind.SERVER_RESTARTED
    assert "pid 7 -> 9" in found.message and "may be lost" in found.message
    assert found.details == {"old_pid": 7, "pid": 9, "restarts": 1}
    assert findings.evaluate([view(pid=9, restarts=1, at=160.9)], [], 160.9) == {found}
    assert findings.evaluate([view(pid=9, restarts=1, at=161.0)], [], 161.0) == frozenset()


def test_no_workers_needs_its_probes_in_a_row_and_clears_when_a_worker_comes(
        findings: Findings) -> None:
    jobs = [("resize", 4, 0, 0)]
    assert findings.evaluate([view(at=100.0, functions=jobs)], [pool()], 100.0) == frozenset()
    # The same answer seen again (another server's probe ran) is no second probe.
    assert findings.evaluate([view(at=100.0, functions=jobs)], [pool()], 100.5) == frozenset()
    (found,) = findings.evaluate([view(at=101.0, functions=jobs)], [pool()], 101.0)
    assert (found.kind, found.function) == (FindingKind.NO_WORKERS, "resize")
    assert "4 job(s) queued on 127.0.0.1:4730" in found.message
    served = [("resize", 4, 1, 1)]
    assert findings.evaluate([view(at=102.0, functions=served)], [pool()], 102.0) == frozenset()


def test_no_workers_looks_at_foreign_functions_with_jobs_and_ignores_idle_ones(
        findings: Findings) -> None:
    functions = [("legacy", 2, 0, 0), ("idle_foreign", 0, 0, 0)]
    for t in (100.0, 101.0):
        found = findings.evaluate([view(at=t, functions=functions)], [pool()], t)
    assert kinds(found) == [("no_workers", "legacy", None)]


def test_function_findings_are_not_drawn_from_a_server_that_is_down(findings: Findings) -> None:
    jobs = [("resize", 4, 0, 0)]
    for t in (100.0, 101.0):
        findings.evaluate([view(at=t, functions=jobs)], [pool()], t)
    stale = view(at=101.0, functions=jobs, up=False, failures=DOWN_AFTER, error="refused")
    assert kinds(findings.evaluate([stale], [pool()], 103.0)) == [("server_down", None, None)]
    # One failed probe (not down yet) keeps what the last answer said: no flicker.
    failing = view(at=101.0, functions=jobs, failures=1)
    assert kinds(findings.evaluate([failing], [pool()], 104.0)) == [
        ("no_workers", "resize", None)]


def test_under_registered_after_its_grace_counting_only_children_ready_before_the_answer(
        findings: Findings) -> None:
    web = pool(ready_at=(50.0, 50.0, 99.0))  # two were serving when the server answered
    registered = [worker("web", 0, "resize"), worker("web", 1, "resize"),
                  worker("other", 0, "resize"), worker("web", 2)]  # no function: not counted
    assert findings.evaluate([view(at=98.0, workers=registered)], [web], 100.0) == frozenset()
    one = registered[:1] + registered[2:]
    assert findings.evaluate([view(at=100.0, workers=one)], [web], 100.0) == frozenset()
    assert findings.evaluate([view(at=109.0, workers=one)], [web], 109.9) == frozenset()
    (found,) = findings.evaluate([view(at=110.0, workers=one)], [web], 110.0)
    assert (found.kind, found.pool, found.details) == (
        FindingKind.UNDER_REGISTERED, "web", {"registered": 1, "children": 3})
    assert found.since == 100.0
    assert findings.evaluate([view(at=111.0, workers=registered + [worker("web", 3, "resize")])],
                             [web], 111.0) == frozenset()
    # A new shortfall starts a new grace.
    assert findings.evaluate([view(at=112.0, workers=one)], [web], 112.0) == frozenset()


def test_a_child_with_two_lanes_is_one_registered_child(findings: Findings) -> None:
    web = pool(ready_at=(50.0, 50.0))
    lanes = [worker("web", 0, "resize"), worker("web", 0, "resize")]  # hold_next: 2 conns
    for t in (100.0, 111.0):
        found = findings.evaluate([view(at=t, workers=lanes)], [web], t)
    (shortfall,) = found
    assert shortfall.details == {"registered": 1, "children": 2}


def test_a_growing_backlog_gives_a_drain_time_from_the_pools_completion_rate(
        findings: Findings) -> None:
    def probe(t: float, waiting: int, completed: int) -> frozenset[Finding]:
        return findings.evaluate([view(at=t, functions=[("resize", waiting + 2, 2, 2)])],
                                 [pool(completed=completed)], t)

    assert probe(100.0, 10, 1000) == frozenset()
    assert probe(105.0, 20, 1010) == frozenset()
    (found,) = probe(110.0, 40, 1020)  # 20 jobs in 10 s: 2/s; 40 waiting: 20 s
    assert (found.kind, found.function) == (FindingKind.BACKLOG_GROWING, "resize")
    assert found.details == {"waiting": 40, "grew_by": 30, "seconds": 10.0,
                             "completion_rate": 2.0, "drain_seconds": 20.0}
    assert "grew from 10 to 40 over 3 probes; about 20s to drain" in found.message
    assert probe(115.0, 60, 1020) == {found}  # still growing (nothing completed now)
    assert "never drains" in next(iter(probe(120.0, 61, 1020))).message
    assert probe(125.0, 61, 1030) == frozenset()  # flat: not growing any more
    assert probe(130.0, 70, 1040) == frozenset()


def test_a_backlog_of_a_function_no_pool_of_ours_serves_has_no_drain_time(
        findings: Findings) -> None:
    for t, n in ((100.0, 1), (101.0, 2), (102.0, 3)):
        found = findings.evaluate([view(at=t, functions=[("legacy", n, 0, 1)])], [pool()], t)
    (backlog,) = found
    assert backlog.details["drain_seconds"] is None
    assert "no completion rate known" in backlog.message


def test_a_server_with_endless_functions_costs_bounded_findings(findings: Findings) -> None:
    functions = [(f"f{i}", i + 1, 0, 0) for i in range(10_000)]
    for t in (100.0, 101.0, 102.0):
        found = findings.evaluate([view(at=t, functions=functions)], [pool()], t)
    assert len(found) == MAX_TRACKED - 1  # our pool's "resize" (no jobs) is followed first
    assert {f.function for f in found} >= {"f9999", "f9998"}  # the most waiting first


def test_a_server_no_pool_uses_any_more_is_forgotten(findings: Findings) -> None:
    for t in (100.0, 101.0):
        findings.evaluate([view(at=t, functions=[("resize", 1, 0, 0)]), view(B, at=t)],
                          [pool(servers=(A, B))], t)
    assert findings.evaluate([view(B, at=102.0)], [pool(servers=(B,))], 102.0) == frozenset()
    assert not any(key[1] == A for key in findings._no_workers)


# -- the probe's view of one server --------------------------------------------------------------

ANSWER = ProbeAnswer("1.1.20", 7, {"f": FunctionStatus("f", 1, 0, 1)}, ())


def test_a_server_is_down_after_three_failed_probes_in_a_row_and_keeps_its_last_answer() -> None:
    v = next_view(ServerView(A), 10.0, ANSWER)
    assert (v.up, v.answered, v.answered_at, v.pid, v.restarts) == (True, True, 10.0, 7, 0)
    for n in range(1, DOWN_AFTER + 2):
        v = next_view(v, 10.0 + n, None, "connect: Connection refused")
        assert (v.failures, v.up, v.answered) == (n, n < DOWN_AFTER, False)
    assert v.functions == ANSWER.functions and v.answered_at == 10.0  # shown with its age
    assert v.error == "connect: Connection refused"
    v = next_view(v, 20.0, ANSWER)
    assert (v.up, v.failures, v.error, v.restarts) == (True, 0, None, 0)  # same pid


def test_a_pid_change_counts_a_restart_and_an_unknown_pid_does_not() -> None:
    v = next_view(ServerView(A), 10.0, ANSWER)
    v = next_view(v, 11.0, ProbeAnswer("1.1.20", 8, {}, ()))
    assert (v.pid, v.restarts) == (8, 1)
    v = next_view(v, 12.0, ProbeAnswer("1.1.20", None, {}, ()))  # getpid refused
    assert (v.pid, v.restarts) == (8, 1)


def test_a_failing_server_is_retried_sooner_then_at_most_twice_the_interval() -> None:
    backoff = backoff_for(4.0)
    backoff.jitter = 0.0
    assert [backoff.failure(0.0, 0.0) for _ in range(5)] == [1.0, 2.0, 4.0, 8.0, 8.0]
