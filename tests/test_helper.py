"""master/helper.py's HelperProcess, the one supervisor of the master's helper processes,
on the fake OS and fake clock of tests/fakeos.py (a real Arbiter, loop and bus, real
pipes, no process), and once with a real forked helper.

The stand-in component here is what the coming job store needs: input lines that the
helper acknowledges, and a new helper that gets again what the dead one never
acknowledged (on_sent, on_start + resend).
"""

from __future__ import annotations

import io
import json
import os
import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NoReturn

import pytest
import yaml
from conftest import wait_for
from fakeos import FakeChild, FakeMaster, signal_status

from gearvisor import messages as msg
from gearvisor.child.postfork import start_helper
from gearvisor.config import load
from gearvisor.master import bus as ev
from gearvisor.master.alerts import Alerts
from gearvisor.master.arbiter import Arbiter
from gearvisor.master.component import Component
from gearvisor.master.helper import HelperBody, HelperProcess
from gearvisor.master.system import System
from gearvisor.policy.backoff import Backoff
from gearvisor.policy.helper import HelperRecord

TICK = 1 / 64  # a moment, exact in binary: "just before" a deadline
DIED = "job store died; restarting it with backoff (the fleet keeps running)"


class Store(Component):
    """A stand-in for the job store's supervision: line "N payload" is acknowledged by the
    helper's "ack N"; lines written but not acknowledged when a helper dies go to the next
    one first. Backoff without jitter: 1, 2, 4, 8 s."""

    def __init__(self, body: Callable[[], HelperBody | None] | None = None,
                 max_pending: int = 100, with_input: bool = True) -> None:
        self.unacked: dict[int, bytes] = {}  # written whole, not acknowledged yet
        self.acked: list[int] = []
        self.lost: list[bytes] = []
        self.starts: list[int] = []
        self.helper = HelperProcess(
            "job store", body or (lambda: _never_runs), with_input=with_input,
            max_pending=max_pending, on_drop=self.lost.append, on_line=self._line,
            on_start=self._started, on_sent=self._sent,
            record=HelperRecord(backoff=Backoff(1.0, 8.0, 2.0, 0.0, 10.0)))

    def attach(self, master: Arbiter) -> None:
        self.helper.attach(master)
        self.helper.start()

    def put(self, n: int, payload: bytes = b"x") -> None:
        self.helper.send(b"%d %s" % (n, payload))

    def _sent(self, line: bytes) -> None:
        self.unacked[int(line.split(b" ", 1)[0])] = line

    def _line(self, line: bytes) -> None:
        if line.startswith(b"ack "):
            n = int(line[4:])
            self.unacked.pop(n, None)
            self.acked.append(n)
            self.helper.succeeded()

    def _started(self, pid: int) -> None:
        self.starts.append(pid)
        again = list(self.unacked.values())
        self.unacked.clear()
        self.helper.resend(again)

    def begin_stop(self, fast: bool) -> None:
        self.helper.begin_stop(fast)

    def stop_overdue(self) -> None:
        self.helper.stop_overdue()

    def stopped(self) -> bool:
        return self.helper.stopped()

    def close(self) -> None:
        self.helper.close()


def _never_runs(out: int, inp: int, blocked: set[int]) -> NoReturn:
    raise AssertionError("the fake OS never runs a body")


def open_fds() -> set[int]:
    return {int(fd) for fd in os.listdir("/proc/self/fd")}


@pytest.fixture
def build(tmp_path: Path, log: io.StringIO) -> Iterator[Callable[..., FakeMaster]]:
    """build(*components) -> a FakeMaster (one pool, nothing watched); closed afterwards,
    and no fd left open."""
    made: list[FakeMaster] = []
    fds = open_fds()

    def make(*components: Component) -> FakeMaster:
        path = tmp_path / "gearvisor.yaml"
        path.write_text(yaml.safe_dump({"watch_config": False, "pools": {"web": {
            "processes": 1, "watch": False, "functions": {"f": "examples.text:echo"}}}}))
        m = FakeMaster(str(path), components)
        made.append(m)
        m.step()
        return m

    try:
        yield make
    finally:
        for m in made:
            for c in m.arbiter.components:
                c.close()
            m.close()
    assert open_fds() == fds


def helper_of(m: FakeMaster, store: Store) -> FakeChild:
    assert store.helper.pid is not None, "no helper running"
    return m.system.children[store.helper.pid]


def say(child: FakeChild, data: bytes) -> None:
    assert child.write_fd is not None
    os.write(child.write_fd, data)


def events(log: io.StringIO, event: str) -> list[dict[str, Any]]:
    lines = [json.loads(line) for line in log.getvalue().splitlines() if line.startswith("{")]
    return [e for e in lines if e.get("event") == event]


def drain(m: FakeMaster, child: FakeChild, size: int) -> bytes:
    """Read the helper's input until `size` bytes came (bounded in passes)."""
    data = b""
    for _ in range(200):
        data += child.read_input()
        if len(data) >= size:
            break
        m.step()
    return data


def test_lines_go_in_order_and_a_new_helper_gets_the_unacknowledged_first(build, log):
    store = Store()
    m = build(store)
    first = helper_of(m, store)
    for n in (1, 2, 3):
        store.put(n)
    m.step()
    assert first.read_input() == b"1 x\n2 x\n3 x\n"
    assert sorted(store.unacked) == [1, 2, 3] and store.helper.waiting == 0
    say(first, b"ack 1\n")
    m.step()
    assert store.acked == [1] and sorted(store.unacked) == [2, 3]
    first.exit(1)
    m.step()
    store.put(4)  # while none runs: it waits
    assert store.helper.pid is None and store.helper.status()["waiting"] == 1
    died = events(log, DIED)
    assert died and died[0]["status"] == "exited with code 1" and died[0]["retry_in"] == 1.0
    m.advance(1.0 - TICK)
    assert store.helper.pid is None  # backing off
    m.advance(TICK)
    second = helper_of(m, store)
    assert second is not first and store.starts == [first.pid, second.pid]
    m.step()
    assert second.read_input() == b"2 x\n3 x\n4 x\n"  # the unacknowledged first, in order
    assert store.helper.record.restarts == 1


def test_a_half_written_line_is_finished_and_the_bound_drops_the_oldest_not_begun(build):
    store = Store(max_pending=3)
    m = build(store)
    helper = helper_of(m, store)
    big = b"0 " + b"y" * 200_000  # more than a pipe holds: written in part, then waits
    store.helper.send(big)
    m.step()
    assert store.helper.partial, "the pipe took only a part of the big line"
    for n in (1, 2, 3, 4):
        store.put(n)
    assert store.helper.waiting == 3  # the half-written one and the two newest
    assert store.lost == [b"1 x", b"2 x"] and store.helper.dropped == 2
    assert store.helper.status() == {"pid": helper.pid, "waiting": 3, "dropped": 2}
    expected = big + b"\n3 x\n4 x\n"
    assert drain(m, helper, len(expected)) == expected  # whole lines, none glued


def test_a_framed_line_is_queued_as_it_is_and_replace_makes_the_queue_exactly_so(build):
    store = Store()
    m = build(store)
    helper = helper_of(m, store)
    framed = b"5 x\n"  # as the journal's Outbox keeps it: the queue holds it, not a copy
    store.helper.send(framed)
    assert store.helper.out[-1] is framed
    m.step()
    assert helper.read_input() == b"5 x\n"
    store.helper.send(b"6 x")
    store.helper.replace([b"1 a\n", b"2 b"])
    m.step()
    assert helper.read_input() == b"1 a\n2 b\n"


def test_a_line_a_dead_helper_half_read_is_sent_whole_to_the_next(build):
    store = Store()
    m = build(store)
    first = helper_of(m, store)
    big = b"7 " + b"z" * 200_000
    store.helper.send(big)
    store.put(8)
    m.step()
    assert first.read_input()  # it read a part, then died
    first.die(signal_status(signal.SIGKILL))
    m.step()
    m.advance(1.0)
    second = helper_of(m, store)
    expected = big + b"\n8 x\n"
    assert drain(m, second, len(expected)) == expected


def test_backoff_grows_and_an_acknowledgement_ends_the_streak(build, log):
    store = Store()
    m = build(store)
    for delay in (1.0, 2.0, 4.0):
        helper_of(m, store).exit(1)
        m.step()
        assert store.helper.pid is None
        m.advance(delay - TICK)
        assert store.helper.pid is None, f"restarted before its {delay} s backoff"
        m.advance(TICK)
    helper = helper_of(m, store)
    store.put(1)
    m.step()
    say(helper, b"ack 1\n")
    m.step()
    assert store.helper.record.backoff.failures == 0  # succeeded(): a new streak
    helper.exit(1)
    m.step()
    assert events(log, DIED)[-1]["retry_in"] == 1.0 and store.helper.record.restarts == 4


def test_a_failed_fork_is_retried_with_backoff_and_leaks_no_pipe(build, log):
    store = Store()
    m = build(store)
    helper_of(m, store).exit(1)
    m.step()
    m.system.fail_forks = 1
    m.advance(1.0)
    assert store.helper.pid is None
    failed = events(log, "cannot start the job store; retrying with backoff")
    assert failed and failed[0]["retry_in"] == 2.0
    m.advance(2.0 - TICK)
    assert store.helper.pid is None
    m.advance(TICK)
    assert store.helper.pid is not None  # (the fixture checks no fd was left open)


def test_what_a_helper_wrote_before_dying_is_read_at_its_reaping(build):
    store = Store()
    m = build(store)
    helper = helper_of(m, store)
    for n in (1, 2):
        store.put(n)
    m.step()
    say(helper, b"ack 1\nack 2\n")
    helper.exit(0)  # queued: the reap comes before the next read of its pipe
    m.step()
    assert store.acked == [1, 2] and store.unacked == {}


def test_a_graceful_stop_closes_the_input_and_kills_only_when_overdue(build):
    store = Store()
    m = build(store)
    helper = helper_of(m, store)
    store.begin_stop(fast=False)
    assert helper.input_fd is not None and os.read(helper.input_fd, 1) == b""  # end of input
    assert m.system.signals(signal.SIGTERM) == [] and not store.stopped()
    store.stop_overdue()
    m.step()
    assert ("kill", helper.pid, signal.SIGKILL) in m.system.sent
    assert store.stopped()
    forks = m.system.fork_attempts
    m.advance(60.0)
    assert m.system.fork_attempts == forks  # never restarted once stopping


def test_a_graceful_stop_writes_what_is_queued_before_ending_the_input(build):
    """Lines queued just before a stop (the journal sends a child's last lines, read at
    its reaping, and then stops the store helper in the same step) are written first: end
    of input follows them. A line larger than the pipe is finished, not cut."""
    store = Store()
    m = build(store)
    helper = helper_of(m, store)
    big = b"1 " + b"y" * 200_000  # more than a pipe holds: written over several steps
    store.helper.send(big)
    store.put(2)
    store.begin_stop(fast=False)
    expected = big + b"\n2 x\n"
    assert drain(m, helper, len(expected)) == expected
    m.step()
    assert helper.input_fd is not None and os.read(helper.input_fd, 1) == b""  # then EOF
    assert sorted(store.unacked) == [1, 2] and m.system.signals(signal.SIGTERM) == []


def test_a_fast_stop_also_sends_sigterm(build):
    store = Store()
    m = build(store)
    helper = helper_of(m, store)
    store.begin_stop(fast=True)
    assert m.system.signals(signal.SIGTERM) == [("kill", helper.pid, signal.SIGTERM)]
    helper.die(signal_status(signal.SIGTERM))
    m.step()
    assert store.stopped()


def test_a_helper_without_input_is_stopped_with_sigterm(build):
    store = Store(with_input=False)
    m = build(store)
    helper = helper_of(m, store)
    assert helper.input_fd is None
    store.begin_stop(fast=False)
    assert m.system.signals(signal.SIGTERM) == [("kill", helper.pid, signal.SIGTERM)]


def test_restart_replaces_it_at_once_without_counting_a_failure(build, log):
    store = Store()
    m = build(store)
    old = helper_of(m, store)
    store.helper.restart()
    assert m.system.signals(signal.SIGTERM) == [("kill", old.pid, signal.SIGTERM)]
    old.die(signal_status(signal.SIGTERM))
    m.step()
    new = helper_of(m, store)
    assert new is not old and store.helper.record.restarts == 0
    assert store.helper.record.backoff.failures == 0 and events(log, DIED) == []


def test_messages_are_decoded_and_an_unreadable_line_is_logged(build, log):
    got: list[msg.Message] = []
    helper = HelperProcess("tester", lambda: _never_runs, on_message=got.append)

    class Holder(Component):
        def attach(self, master: Arbiter) -> None:
            helper.attach(master)
            helper.start()

        def close(self) -> None:
            helper.close()

    m = build(Holder())
    assert helper.pid is not None
    say(m.system.children[helper.pid], b"not json\n" + msg.encode(msg.WatcherError("x")))
    m.step()
    assert got == [msg.WatcherError("x")]
    assert events(log, "unreadable line from the tester")


def test_nothing_to_run_starts_nothing(build):
    helper = HelperProcess("idle", lambda: None)

    class Holder(Component):
        def attach(self, master: Arbiter) -> None:
            helper.attach(master)
            helper.start()

    m = build(Holder())
    assert helper.pid is None and m.system.fork_attempts == 1  # only the pool's child


# -- the alert notifier on it -------------------------------------------------------------------


def test_every_delivery_result_in_one_read_is_counted(tmp_path: Path, log):
    """Regression: a delivery ended the backoff streak through a method Backoff lacks, so
    the first result of a read raised and the others in that read were lost."""
    path = tmp_path / "gearvisor.yaml"
    path.write_text(yaml.safe_dump({
        "watch_config": False, "state_dir": str(tmp_path / "state"),
        "alerts": {"routes": [{"match": {}, "notify": ["hook"]}],
                   "channels": {"hook": {"type": "webhook", "url": "http://127.0.0.1:9/"}}},
        "pools": {"web": {"processes": 1, "watch": False,
                          "functions": {"f": "examples.text:echo"}}}}))
    alerts = Alerts(load(str(path)))
    m = FakeMaster(str(path), [alerts])
    try:
        m.step()
        pid = alerts.status(0.0)["alerts"]["notifier"]["pid"]
        assert pid is not None
        say(m.system.children[pid], b"".join(
            msg.encode(msg.Delivered(channel="hook", groupKey=str(i), ok=True, attempts=1))
            for i in range(3)))
        m.step()
        assert [e.outcome for e in m.of(ev.AlertNotified)] == ["delivered"] * 3
        assert alerts.status(0.0)["alerts"]["notifier"]["delivered"] == 3
    finally:
        alerts.close()
        m.close()


# -- a real helper process ----------------------------------------------------------------------


def echo_acks(out: int, inp: int, blocked: set[int]) -> NoReturn:
    """A tiny real helper: acknowledges each "N ..." line it reads, until end of input."""
    start_helper("gearvisor: test helper", blocked, {out, inp})
    with os.fdopen(inp, "rb") as lines:
        for line in lines:
            os.write(out, b"ack " + line.split(b" ", 1)[0] + b"\n")
    os._exit(0)


def test_a_real_helper_acknowledges_and_finishes_at_end_of_input(tmp_path: Path, log):
    path = tmp_path / "gearvisor.yaml"
    path.write_text(yaml.safe_dump({"watch_config": False, "pools": {"web": {
        "processes": 1, "watch": False, "functions": {"f": "examples.text:echo"}}}}))
    store = Store(body=lambda: echo_acks)  # the pool is never managed: no child forks
    arbiter = Arbiter(load(str(path)), [store], system=System())
    try:
        store.attach(arbiter)
        pid = store.helper.pid
        assert pid is not None
        for n in range(1, 51):
            store.put(n)

        def pass_() -> bool:
            arbiter.loop.call_later(0.02, lambda: None)  # bounds the loop's wait
            arbiter.loop.run_once()
            arbiter.reap()  # what SIGCHLD would run
            return True

        wait_for(lambda: pass_() and store.acked == list(range(1, 51)), timeout=10,
                 message="every line acknowledged")
        store.begin_stop(fast=False)  # end of input: it exits by itself
        wait_for(lambda: pass_() and store.stopped(), timeout=10, message="helper exited")
        assert events(log, DIED) == []
    finally:
        if store.helper.pid is not None:
            os.kill(store.helper.pid, signal.SIGKILL)
            os.waitpid(store.helper.pid, 0)
        store.close()
        arbiter.close()


def test_the_input_queue_is_bounded_in_bytes_too() -> None:
    """Lines may be a MiB each (a command worker's journal lines): a count alone let a
    flood of them grow the master by hundreds of MB while the helper fell behind."""
    dropped: list[bytes] = []
    helper = HelperProcess("job store", lambda: None, with_input=True, max_pending=1000,
                           max_pending_bytes=8 << 20, on_drop=dropped.append)
    big = b"x" * (1 << 20)
    for i in range(100):
        helper.send(b"%d " % i + big)
    assert helper.out_bytes <= 8 << 20 and len(helper.out) == 7
    assert sum(map(len, helper.out)) == helper.out_bytes
    assert len(dropped) == 93 and dropped[0].startswith(b"0 ")
    assert helper.out[-1].startswith(b"99 ")
