"""Host names of job servers, looked up by the resolver helper so a hanging resolver never
blocks the master's loop: the helper's own lookups (helpers/resolver.py, on real pipes),
then the probe driving it in a whole master on a fake OS and a fake clock
(tests/fakeos.py), where the test plays the helper. The real helper against a real gearmand
is in tests/test_probe.py."""

from __future__ import annotations

import io
import os
import select
import signal
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from fakeos import FakeChild, FakeMaster

from gearvisor import messages as msg
from gearvisor.gearman import addresses
from gearvisor.helpers import resolver
from gearvisor.master import bus as ev
from gearvisor.master import probe as probe_mod

NAMED = ("gearmand.example", 4730)
LITERAL = ("127.0.0.1", 4731)


# -- the helper ------------------------------------------------------------------------------

def test_a_request_is_answered_with_the_first_address_the_resolver_gives() -> None:
    answer = resolver.lookup(resolver.request("localhost", 4730))
    assert (answer.host, answer.port, answer.error) == ("localhost", 4730, "")
    assert answer.family in (socket.AF_INET, socket.AF_INET6)
    assert answer.address[0] in ("127.0.0.1", "::1") and answer.address[1] == 4730


def test_a_name_that_does_not_resolve_and_a_line_that_is_no_request_get_an_error() -> None:
    def refuse(host: str, port: int, **_: Any) -> list:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    answer = resolver.lookup(b"4730 nowhere.invalid", refuse)
    assert (answer.host, answer.port, answer.address) == ("nowhere.invalid", 4730, [])
    assert answer.error == "[Errno -2] Name or service not known"
    for line in (b"nowhere.invalid", b"99999 h", b"0 h", b"x h", b"4730 "):
        bad = resolver.lookup(line, refuse)
        assert bad.port == 0 and bad.error.startswith("not a request"), line


def test_serve_answers_each_line_in_order_and_exits_at_end_of_input() -> None:
    calls: list[tuple[str, int]] = []

    def fake(host: str, port: int, **_: Any) -> list:
        calls.append((host, port))
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (f"10.0.0.{len(calls)}", port))]

    in_r, in_w = os.pipe()
    out_r, out_w = os.pipe()
    os.write(in_w, b"4730 a.example\n" + b"x" * (resolver.MAX_LINE + 10) + b"\n4731 b.example\n")
    os.close(in_w)
    try:
        assert resolver.serve(in_r, out_w, fake) == 0
        os.close(out_w)
        out = b""
        while chunk := os.read(out_r, 65536):
            out += chunk
    finally:
        os.close(in_r)
        os.close(out_r)
    answers = [msg.decode(line) for line in out.splitlines()]
    assert calls == [("a.example", 4730), ("b.example", 4731)]
    assert all(isinstance(a, msg.Resolved) for a in answers)
    assert [(a.host, a.port, a.address) for a in answers if a.port] == [  # type: ignore
        ("a.example", 4730, ["10.0.0.1", 4730]), ("b.example", 4731, ["10.0.0.2", 4731])]
    (refused,) = [a for a in answers if not a.port]  # type: ignore[attr-defined]
    assert "longer than 1024" in refused.error  # type: ignore[attr-defined]


def test_a_name_that_hangs_does_not_hold_up_the_others() -> None:
    import threading

    released = threading.Event()

    def fake(host: str, port: int, **_: Any) -> list:
        if host == "slow.example":
            assert released.wait(10), "never released"
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("10.0.0.9", port))]

    in_r, in_w = os.pipe()
    out_r, out_w = os.pipe()
    served = threading.Thread(target=resolver.serve, args=(in_r, out_w, fake), daemon=True)
    served.start()
    try:
        os.write(in_w, b"4730 slow.example\n4731 fast.example\n")
        ready, _, _ = select.select([out_r], [], [], 5.0)
        assert ready, "no answer while the slow lookup hangs"
        first = os.read(out_r, 65536)
        assert msg.decode(first.splitlines()[0]).host == "fast.example"  # type: ignore
        released.set()
        os.close(in_w)
        in_w = -1
        served.join(10)
        assert not served.is_alive()
        os.close(out_w)
        out_w = -1
        rest = b""
        while chunk := os.read(out_r, 65536):
            rest += chunk
        assert [msg.decode(line).host for line in rest.splitlines()] == [  # type: ignore
            "slow.example"]
    finally:
        released.set()
        for fd in (in_w, out_w, in_r, out_r):
            if fd >= 0:
                os.close(fd)


# -- the probe driving it (fake OS) ------------------------------------------------------------

class Silent:
    """Stands in for a probe's socket that never becomes ready: a pipe's read end, with
    nothing written to it."""

    def __init__(self) -> None:
        self.r, self.w = os.pipe()

    def fileno(self) -> int:
        return self.r

    def close(self) -> None:
        for fd in (self.r, self.w):
            if fd >= 0:
                os.close(fd)
        self.r = self.w = -1


class Poll:
    """A probe poll that never connects: it records the address and waits for its deadline
    (or fails at once, as a refused connection does, with `refused`)."""

    def __init__(self, address: Any, deadline: float, refused: bool = False) -> None:
        self.address, self.deadline = address, deadline
        self.sock = Silent()
        self.done, self.sent, self.answer = refused, False, None
        self.error = "connect: Connection refused" if refused else None

    def on_ready(self) -> None:
        pass

    def finish(self, error: str) -> None:
        self.done, self.error = True, error


class Probed:
    def __init__(self, m: list[FakeMaster], refused: bool = False) -> None:
        self.m, self.refused = m, refused
        self.calls: list[tuple[float, Any]] = []

    def __call__(self, address: Any, deadline: float) -> Poll:
        self.calls.append((self.m[0].clock.now, address))
        return Poll(address, deadline, self.refused)

    def to(self, server: tuple[str, int]) -> list[float]:
        """When a probe connected to the address `server` (as the resolver or a literal
        gave it)."""
        return [t for t, (_, addr) in self.calls if addr[:2] == server]


def build(tmp_path: Path, servers: list[str], refused: bool = False
          ) -> tuple[FakeMaster, probe_mod.Probe, Probed]:
    path = tmp_path / "gearvisor.yaml"
    path.write_text(yaml.safe_dump({
        "watch_config": False, "probe_interval": "4s", "servers": servers,
        "pools": {"web": {"processes": 0, "functions": {"f": "examples.text:echo"},
                          "watch": False}}}))
    holder: list[FakeMaster] = []
    probed = Probed(holder, refused)
    probe = probe_mod.Probe(probed)
    holder.append(FakeMaster(str(path), (probe,)))
    return holder[0], probe, probed


@pytest.fixture
def named(tmp_path: Path, log: io.StringIO) -> Iterator[tuple[FakeMaster, probe_mod.Probe,
                                                               Probed]]:
    m, probe, probed = build(tmp_path, ["gearmand.example:4730", "127.0.0.1:4731"])
    try:
        yield m, probe, probed
    finally:
        m.close()


def the_resolver(m: FakeMaster) -> FakeChild:
    (helper,) = [c for c in m.system.forked if c.alive]
    return helper


def answer(helper: FakeChild, ip: str = "10.1.2.3") -> None:
    helper.say(msg.Resolved(host=NAMED[0], port=NAMED[1], family=socket.AF_INET,
                            address=[ip, NAMED[1]]))


def view(m: FakeMaster, server: tuple[str, int]) -> ev.ServerView:
    return [s.view for s in m.of(ev.Snapshot) if s.view.server == server][-1]


def test_a_named_server_is_probed_at_the_address_the_resolver_helper_gives(named) -> None:
    m, probe, probed = named
    m.step()
    helper = the_resolver(m)
    assert helper.read_input() == b"4730 gearmand.example\n"
    assert probed.to(LITERAL) == [m.clock.now]  # a literal address: probed at once
    assert probed.calls[0][1] == (socket.AF_INET, LITERAL)
    answer(helper)
    m.step()
    assert probed.to(("10.1.2.3", 4730)) == [m.clock.now]  # as soon as the answer came
    # children forked from now on start with it (gearman/addresses.py)
    assert addresses.known()[NAMED] == (socket.AF_INET, ("10.1.2.3", 4730))
    assert m.arbiter.parts(m.clock.now)["resolver"]["pid"] == helper.pid


def test_a_lookup_that_hangs_fails_the_probe_not_the_loop_and_is_asked_once(named) -> None:
    m, probe, probed = named
    m.step()
    helper = the_resolver(m)
    assert helper.read_input() == b"4730 gearmand.example\n"
    for _ in range(40):  # 20 s with no answer
        m.advance(0.5)
    down = view(m, NAMED)
    assert not down.up and down.failures >= 3
    assert down.error == ("host name not resolved within 2s (the lookup goes on: is DNS "
                          "answering?)")
    assert len(probed.to(LITERAL)) >= 4  # the other server was probed all along (1, 2, 4 s...)
    assert helper.read_input() == b""  # not asked again while the lookup goes on
    answer(helper)  # DNS is back: the next probe goes to the address
    for _ in range(40):
        m.advance(0.5)
    assert probed.to(("10.1.2.3", 4730))


def test_a_name_that_does_not_resolve_is_the_error_and_is_asked_again(named) -> None:
    m, probe, probed = named
    m.step()
    helper = the_resolver(m)
    helper.read_input()
    helper.say(msg.Resolved(host=NAMED[0], port=NAMED[1],
                            error="[Errno -2] Name or service not known"))
    m.step()
    assert view(m, NAMED).error == ("cannot resolve gearmand.example: [Errno -2] Name or "
                                    "service not known")
    wait_until(m, lambda: helper.read_input() == b"4730 gearmand.example\n", 10)


def wait_until(m: FakeMaster, cond: Any, seconds: float) -> None:
    """Advance the fake clock in steps of 0.1 s until cond() holds (at most `seconds`)."""
    for _ in range(int(seconds * 10)):
        if cond():
            return
        m.advance(0.1)
    assert cond(), f"not within {seconds} s of the fake clock"


@pytest.mark.parametrize("family, address", [
    (socket.AF_INET, ["not-an-ip", 4730]), (socket.AF_INET, ["10.0.0.1"]),
    (socket.AF_INET, ["10.0.0.1", 0]), (socket.AF_INET, ["10.0.0.1", True]),
    (socket.AF_INET6, ["10.0.0.1", 4730, 0, 0]), (socket.AF_UNIX, ["/tmp/x", 1]),
    (socket.AF_INET6, ["::1", 4730, 1 << 31, 0]),  # a flowinfo connect() refuses to take
    (socket.AF_INET, ["10.0.0.1", 70000]), (0, [])])
def test_an_unusable_answer_is_a_failed_probe_never_an_error_in_the_master(
        named, family: int, address: list) -> None:
    m, probe, probed = named
    m.step()
    helper = the_resolver(m)
    helper.say(msg.Resolved(host=NAMED[0], port=NAMED[1], family=family, address=address))
    m.step()
    assert view(m, NAMED).error.startswith("cannot resolve gearmand.example: unusable address")
    assert not [c for c in probed.calls if c[1][1][:1] != ("127.0.0.1",)]


def test_a_resolver_that_dies_mid_lookup_is_restarted_and_asked_again(named) -> None:
    m, probe, probed = named
    m.step()
    first = the_resolver(m)
    assert first.read_input() == b"4730 gearmand.example\n"
    first.die(signal.SIGKILL)
    wait_until(m, lambda: len(m.system.forked) == 2, 5)  # restarted with backoff
    second = the_resolver(m)
    assert second is not first
    m.step()
    assert second.read_input() == b"4730 gearmand.example\n"
    answer(second, "10.9.9.9")
    wait_until(m, lambda: probed.to(("10.9.9.9", 4730)), 20)


def test_a_named_server_that_stays_down_is_looked_up_once_per_resolve_every(
        tmp_path: Path, log: io.StringIO) -> None:
    """The name may point elsewhere now: asked again after a failed probe, but not on
    every probe."""
    m, probe, probed = build(tmp_path, ["gearmand.example:4730"], refused=True)
    try:
        m.step()
        helper = the_resolver(m)
        lookups: list[float] = []
        for _ in range(int(3.5 * probe_mod.RESOLVE_EVERY)):  # down for 105 s
            if helper.read_input():
                lookups.append(m.clock.now)
                answer(helper)
            m.advance(1.0)
        assert len(probed.calls) > 8  # probed all along (every 8 s once backed off)
        gaps = [b - a for a, b in zip(lookups, lookups[1:], strict=False)]
        # Not sooner than RESOLVE_EVERY, and at the first failed probe after it (the probes
        # come every 8 s here, once backed off)
        assert len(lookups) >= 3, lookups
        assert all(probe_mod.RESOLVE_EVERY <= g <= probe_mod.RESOLVE_EVERY + 18
                   for g in gaps), lookups
    finally:
        m.close()


def test_no_resolver_runs_while_every_server_is_a_literal_address(
        tmp_path: Path, log: io.StringIO) -> None:
    m, probe, probed = build(tmp_path, ["127.0.0.1:4730", "[::1]:4731"])
    try:
        m.step()
        m.advance(5.0)
        assert m.system.forked == [] and len(probed.calls) >= 2
        assert "resolver" not in m.arbiter.parts(m.clock.now)
    finally:
        m.close()


def test_the_resolver_is_told_to_go_when_the_master_stops(named) -> None:
    m, probe, probed = named
    m.step()
    helper = the_resolver(m)
    m.arbiter.stop(fast=False, why="SIGTERM")
    m.step()
    assert signal.SIGTERM in helper.received


def test_a_lookup_after_a_failed_probe_runs_in_the_background_and_a_failure_keeps_the_address(
        tmp_path: Path, log: io.StringIO) -> None:
    m, probe, probed = build(tmp_path, ["gearmand.example:4730"], refused=True)
    try:
        m.step()
        helper = the_resolver(m)
        assert helper.read_input()
        answer(helper)
        wait_until(m, lambda: helper.read_input() == b"4730 gearmand.example\n",
                   probe_mod.RESOLVE_EVERY + 10)  # the probes fail: asked again
        before = len(probed.to(("10.1.2.3", 4730)))
        helper.say(msg.Resolved(host=NAMED[0], port=NAMED[1],
                                error="[Errno -3] Temporary failure in name resolution"))
        wait_until(m, lambda: len(probed.to(("10.1.2.3", 4730))) > before + 1, 20)
        assert view(m, NAMED).error == "connect: Connection refused"  # not "not resolved"
        assert not [e for e in m.of(ev.Snapshot) if "resolve" in (e.view.error or "")]
    finally:
        m.close()


def test_a_resolver_that_never_answers_is_restarted_and_asked_again(
        named, log: io.StringIO) -> None:
    m, probe, probed = named
    m.step()
    first = the_resolver(m)
    assert first.read_input() == b"4730 gearmand.example\n"
    wait_until(m, lambda: signal.SIGTERM in first.received, probe_mod.RESOLVE_STUCK + 20)
    assert "the resolver has not answered a lookup; restarting it" in log.getvalue()
    first.exit(0)  # it goes, as asked
    wait_until(m, lambda: len(m.system.forked) == 2, 5)
    second = the_resolver(m)
    m.step()
    assert second.read_input() == b"4730 gearmand.example\n"


def reload_without_names(m: FakeMaster, tmp_path: Path) -> None:
    """Reload to a config whose only server is a literal address."""
    (tmp_path / "gearvisor.yaml").write_text(yaml.safe_dump({
        "watch_config": False, "probe_interval": "4s", "servers": ["127.0.0.1:4731"],
        "pools": {"web": {"processes": 0, "functions": {"f": "examples.text:echo"},
                          "watch": False}}}))
    assert m.arbiter.reload("test") is None
    m.step()


def test_a_reload_that_leaves_no_host_name_stops_the_resolver(named, tmp_path: Path) -> None:
    m, probe, probed = named
    m.step()
    helper = the_resolver(m)
    reload_without_names(m, tmp_path)
    assert signal.SIGTERM in helper.received
    assert NAMED not in addresses.known()  # (it was never answered; see below)
    helper.exit(0)
    m.advance(5.0)
    assert [c for c in m.system.forked if c.alive] == []
    assert "resolver" not in m.arbiter.parts(m.clock.now)


def test_a_server_no_pool_uses_any_more_is_forgotten_by_the_children_to_come(
        named, tmp_path: Path) -> None:
    m, probe, probed = named
    m.step()
    answer(the_resolver(m))
    m.step()
    assert NAMED in addresses.known()
    reload_without_names(m, tmp_path)
    assert NAMED not in addresses.known()
