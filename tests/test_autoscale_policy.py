"""policy/autoscale.AutoScaler: the decision on each probe, with an injected clock (no
processes, no gearmand), and a hypothesis property over random probe sequences."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from gearvisor.config.model import AutoscaleConfig
from gearvisor.policy.autoscale import AutoScaler, Inputs, share

CFG = AutoscaleConfig(min=2, max=32, target=10, up_cooldown=15.0, down_after=120.0,
                      max_step=4)


def test_share_rounds_up_and_divides_by_hosts() -> None:
    assert share(0, 1, 10) == 0
    assert share(1, 1, 10) == 1
    assert share(100, 1, 10) == 10
    assert share(101, 1, 10) == 11
    assert share(100, 2, 10) == 5
    assert share(101, 2, 10) == 6  # each host rounds up
    assert share(100, 0, 10) == 10  # never divided by zero hosts


def test_scales_up_by_max_step_after_each_cooldown() -> None:
    a = AutoScaler(CFG)
    a.restart(0.0, 2)
    d = a.decide(Inputs(backlog=5000, hosts=1, current=2), 1.0)
    assert (d.state, d.desired) == ("cooldown", 2)  # started at 0: up_cooldown holds
    d = a.decide(Inputs(backlog=5000, hosts=1, current=2), 15.0)
    assert (d.state, d.desired, d.recommended) == ("up", 6, 32)
    d = a.decide(Inputs(backlog=5000, hosts=1, current=6), 20.0)
    assert (d.state, d.desired) == ("cooldown", 6)
    d = a.decide(Inputs(backlog=5000, hosts=1, current=6), 30.0)
    assert (d.state, d.desired) == ("up", 10)


def test_first_decision_without_restart_starts_the_clock() -> None:
    a = AutoScaler(CFG)
    d = a.decide(Inputs(backlog=5000, hosts=1, current=2), 100.0)
    assert d.state == "cooldown"


def test_scale_down_waits_for_the_whole_window_then_steps() -> None:
    a = AutoScaler(CFG)
    a.restart(0.0, 12)
    # A burst at t=10 recommends 12; the queue is empty from t=20 on.
    assert a.decide(Inputs(120, 1, 12), 10.0).state == "steady"
    for t in range(20, 130, 5):
        d = a.decide(Inputs(0, 1, 12), float(t))
        assert (d.state, d.desired, d.held) == ("holding", 12, 12), t
    d = a.decide(Inputs(0, 1, 12), 131.0)  # the burst left the window
    assert (d.state, d.desired, d.held) == ("down", 8, 2)
    d = a.decide(Inputs(0, 1, 8), 132.0)  # each later decision is one more step
    assert (d.state, d.desired) == ("down", 4)
    d = a.decide(Inputs(0, 1, 4), 133.0)
    assert (d.state, d.desired) == ("down", 2)
    assert a.decide(Inputs(0, 1, 2), 134.0).state == "steady"


def test_a_dip_does_not_flap() -> None:
    a = AutoScaler(CFG)
    a.restart(0.0, 10)
    for t in range(1, 200):
        backlog = 0 if t % 7 == 0 else 100  # an empty probe now and then
        assert a.decide(Inputs(backlog, 1, 10), float(t)).desired == 10


def test_frozen_changes_nothing() -> None:
    a = AutoScaler(CFG)
    a.restart(0.0, 2)
    d = a.decide(Inputs(5000, 1, 2, frozen="circuit open"), 100.0)
    assert (d.state, d.desired, d.reason) == ("frozen", 2, "circuit open")
    d = a.decide(Inputs(5000, 1, 2), 101.0)  # thawed: no cooldown owed for the freeze
    assert (d.state, d.desired) == ("up", 6)


def test_several_hosts_share_the_backlog() -> None:
    a = AutoScaler(CFG)
    a.restart(0.0, 2)
    d = a.decide(Inputs(200, 2, 2), 20.0)
    assert (d.recommended, d.desired) == (10, 6)


def test_out_of_range_size_goes_to_its_bound() -> None:
    narrow = AutoscaleConfig(min=2, max=4, target=10, up_cooldown=15.0, down_after=120.0,
                             max_step=1)
    a = AutoScaler(narrow)
    a.restart(0.0, 9)  # a reload narrowed the range to [2, 4]
    d = a.decide(Inputs(0, 1, 9), 1.0)
    assert (d.state, d.desired) == ("down", 4)
    d = a.decide(Inputs(1000, 1, 0), 2.0)  # below min, in cooldown: to min only
    assert (d.state, d.desired) == ("up", 2)


configs = st.builds(
    lambda lo, span, target, up, down, step: AutoscaleConfig(
        min=lo, max=lo + span, target=target, up_cooldown=up, down_after=down, max_step=step),
    st.integers(0, 20), st.integers(0, 40), st.integers(1, 50),
    st.floats(0, 60), st.floats(0, 300), st.integers(1, 10))
probes = st.lists(st.tuples(st.floats(0.0, 30.0), st.integers(0, 10_000), st.integers(1, 5),
                            st.one_of(st.none(), st.just("circuit open"))),
                  min_size=1, max_size=60)


@settings(max_examples=300, deadline=None)
@given(configs, st.integers(0, 60), probes)
def test_property_bounds_step_and_freeze(cfg: AutoscaleConfig, start: int, seq: list) -> None:
    """Whatever the probes: a decision that is not frozen lands in [min, max] and moves at
    most max_step from the size (taken into [min, max] first); a frozen one changes
    nothing. The pool follows every decision, as the master does."""
    a = AutoScaler(cfg)
    now, current = 0.0, start
    a.restart(now, current)
    for gap, backlog, hosts, frozen in seq:
        now += gap
        d = a.decide(Inputs(backlog, hosts, current, frozen), now)
        if frozen is not None:
            assert d.desired == current and d.state == "frozen"
        else:
            assert cfg.min <= d.desired <= cfg.max
            base = max(cfg.min, min(cfg.max, current))
            assert abs(d.desired - base) <= cfg.max_step
            assert d.changed == (d.desired != current)
        current = d.desired
