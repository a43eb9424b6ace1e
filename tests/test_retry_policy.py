"""policy/retry.py: the retry decision for a failed attempt (pure, injected clock and random)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gearvisor.config.model import RETRY_OUTCOMES, RetryConfig
from gearvisor.policy.retry import DEAD, RETRY, ceiling, decide

NOW = 1_700_000_000.0
POLICY = RetryConfig(max_attempts=4, initial=10.0, max=60.0, multiplier=2.0,
                     outcomes=("error", "crash"))


def test_no_policy_makes_a_dead_letter_at_once() -> None:
    assert decide(None, "error", 1, NOW) == (DEAD, None)


def test_full_jitter_draws_up_to_the_growing_ceiling() -> None:
    assert decide(POLICY, "error", 1, NOW, rand=lambda: 0.5) == (RETRY, NOW + 5.0)
    assert decide(POLICY, "error", 2, NOW, rand=lambda: 0.5) == (RETRY, NOW + 10.0)
    assert decide(POLICY, "crash", 3, NOW, rand=lambda: 0.999) == (RETRY, NOW + 0.999 * 40.0)
    assert decide(POLICY, "error", 1, NOW, rand=lambda: 0.0) == (RETRY, NOW)


def test_the_ceiling_stops_at_max() -> None:
    assert [ceiling(POLICY, n) for n in (1, 2, 3, 4, 5)] == [10.0, 20.0, 40.0, 60.0, 60.0]
    assert ceiling(RetryConfig(initial=1.0, max=3600.0, multiplier=10.0), 10**6) == 3600.0


def test_the_last_attempt_is_dead() -> None:
    assert decide(POLICY, "error", 3, NOW, rand=lambda: 0.1)[0] == RETRY
    assert decide(POLICY, "error", 4, NOW, rand=lambda: 0.1) == (DEAD, None)
    assert decide(POLICY, "error", 9, NOW, rand=lambda: 0.1) == (DEAD, None)
    assert decide(RetryConfig(max_attempts=1), "error", 1, NOW) == (DEAD, None)


@pytest.mark.parametrize("outcome", ["timeout", "killed"])
def test_an_outcome_not_listed_is_dead(outcome: str) -> None:
    assert decide(POLICY, outcome, 1, NOW, rand=lambda: 0.1) == (DEAD, None)


def test_a_poison_refusal_is_retried_as_the_crash_it_ended() -> None:
    """gearmand re-runs a job whose worker died by itself; our retry comes when those runs
    end in a poison refusal, so `crash` (or `killed`) in outcomes covers it."""
    crash = RetryConfig(outcomes=("crash",))
    assert decide(crash, "poison", 1, NOW, rand=lambda: 0.0) == (RETRY, NOW)
    assert decide(RetryConfig(outcomes=("killed",)), "poison", 1, NOW)[0] == RETRY
    assert decide(RetryConfig(outcomes=("error",)), "poison", 1, NOW) == (DEAD, None)


def test_a_random_source_outside_0_1_is_clamped() -> None:
    assert decide(POLICY, "error", 1, NOW, rand=lambda: 7.0) == (RETRY, NOW + 10.0)
    assert decide(POLICY, "error", 1, NOW, rand=lambda: -1.0) == (RETRY, NOW)


@given(max_attempts=st.integers(1, 1000), initial=st.floats(0, 86400),
       maximum=st.floats(0, 7 * 86400), multiplier=st.floats(1, 10),
       outcomes=st.sets(st.sampled_from(RETRY_OUTCOMES), min_size=1),
       outcome=st.sampled_from(RETRY_OUTCOMES), attempt=st.integers(1, 10**6),
       now=st.floats(0, 4e9), r=st.floats(0, 1, exclude_max=True))
def test_due_is_within_now_and_now_plus_max_and_never_past_max_attempts(
        max_attempts: int, initial: float, maximum: float, multiplier: float,
        outcomes: set[str], outcome: str, attempt: int, now: float, r: float) -> None:
    maximum = max(maximum, initial)  # the config refuses max < initial
    policy = RetryConfig(max_attempts, initial, maximum, multiplier, tuple(sorted(outcomes)))
    decision, due = decide(policy, outcome, attempt, now, rand=lambda: r)
    covered = set(outcomes) | ({"poison"} if {"crash", "killed"} & outcomes else set())
    if attempt >= max_attempts or outcome not in covered:
        assert (decision, due) == (DEAD, None)
    else:
        assert decision == RETRY and due is not None
        assert now <= due <= now + maximum


def test_the_ceiling_is_computed_at_once_for_any_attempt() -> None:
    # a closed form, not a loop per attempt: a tiny initial with a multiplier near 1 would
    # otherwise take millions of steps
    policy = RetryConfig(initial=1e-10, max=600.0, multiplier=1.0000001)
    assert 0 < ceiling(policy, 10**6) < 600.0
    assert ceiling(RetryConfig(initial=0.0, max=60.0), 10**6) == 0.0
    assert ceiling(RetryConfig(initial=5.0, max=60.0, multiplier=1.0), 10**6) == 5.0


def test_a_subnormal_initial_does_not_overflow() -> None:
    """Found by the property test above: max / initial and initial * multiplier**309 are
    both beyond floats when initial is subnormal, though the ceiling itself is below max."""
    policy = RetryConfig(max_attempts=311, initial=2.225073858507e-311, max=1.0,
                         multiplier=10.0, outcomes=("error",))
    assert ceiling(policy, 310) == pytest.approx(0.0222507385850)
    assert ceiling(policy, 312) == 1.0
    assert decide(policy, "error", 310, 0.0, rand=lambda: 0.5)[0] == RETRY
