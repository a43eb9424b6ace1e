"""health.Backoff: exponential restart delays, driven by hand-set time and a fixed `rand`."""

from __future__ import annotations

import pytest

from gearvisor.policy.backoff import Backoff


def crash_at_once(b: Backoff, n: int, t: float = 100.0) -> list[float]:
    """n failures of children that died right after they started (no uptime)."""
    return [b.failure(started_at=t, now=t + 0.01) for _ in range(n)]


def test_exponential_sequence() -> None:
    b = Backoff(initial=0.1, maximum=100.0, multiplier=2.0)
    assert crash_at_once(b, 5) == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.6])
    assert b.failures == 5
    assert b.in_streak


def test_multiplier_three() -> None:
    b = Backoff(initial=1.0, maximum=1000.0, multiplier=3.0)
    assert crash_at_once(b, 4) == pytest.approx([1.0, 3.0, 9.0, 27.0])


def test_capped_at_max() -> None:
    b = Backoff(initial=1.0, maximum=5.0, multiplier=2.0)
    assert crash_at_once(b, 6) == pytest.approx([1.0, 2.0, 4.0, 5.0, 5.0, 5.0])
    assert b.failures == 6


def test_long_streak_stays_capped() -> None:
    b = Backoff(initial=0.1, maximum=30.0)
    delays = crash_at_once(b, 200)
    assert delays[-1] == 30.0
    assert max(delays) == 30.0


@pytest.mark.parametrize(("r", "factor"), [(0.0, 0.9), (0.5, 1.0), (1.0, 1.1), (0.25, 0.95)])
def test_jitter_bounds(r: float, factor: float) -> None:
    b = Backoff(initial=1.0, maximum=100.0, multiplier=2.0, jitter=0.1, rand=lambda: r)
    assert crash_at_once(b, 3) == pytest.approx([1.0 * factor, 2.0 * factor, 4.0 * factor])


def test_jitter_never_exceeds_max() -> None:
    b = Backoff(initial=10.0, maximum=10.0, jitter=0.5, rand=lambda: 1.0)
    assert crash_at_once(b, 2) == [10.0, 10.0]
    low = Backoff(initial=10.0, maximum=10.0, jitter=0.5, rand=lambda: 0.0)
    assert crash_at_once(low, 1) == pytest.approx([5.0])


def test_rand_is_not_called_without_jitter() -> None:
    def boom() -> float:
        raise AssertionError("rand called with jitter=0")

    b = Backoff(initial=1.0, maximum=10.0, jitter=0.0, rand=boom)
    assert crash_at_once(b, 2) == [1.0, 2.0]


def test_reset_after_enough_uptime() -> None:
    b = Backoff(initial=1.0, maximum=100.0, multiplier=2.0, reset_after=10.0)
    assert crash_at_once(b, 3) == [1.0, 2.0, 4.0]
    # Up for exactly reset_after seconds: a new streak starts at `initial`.
    assert b.failure(started_at=200.0, now=210.0) == 1.0
    assert b.failures == 1
    assert b.failure(started_at=300.0, now=300.5) == 2.0


def test_short_uptime_does_not_reset() -> None:
    b = Backoff(initial=1.0, maximum=100.0, multiplier=2.0, reset_after=10.0)
    crash_at_once(b, 2)
    assert b.failure(started_at=200.0, now=209.99) == 4.0
    assert b.failures == 3


def test_reset_forgets_the_streak() -> None:
    b = Backoff(initial=1.0, maximum=100.0)
    crash_at_once(b, 4)
    b.reset()
    assert b.failures == 0
    assert not b.in_streak
    assert crash_at_once(b, 1) == [1.0]


def test_initial_zero_gives_zero_delays() -> None:
    b = Backoff(initial=0.0, maximum=30.0, multiplier=2.0, jitter=0.5, rand=lambda: 1.0)
    assert crash_at_once(b, 10) == [0.0] * 10
    assert b.failures == 10


def test_new_backoff_is_not_in_streak() -> None:
    b = Backoff(initial=1.0, maximum=2.0)
    assert b.failures == 0
    assert not b.in_streak


def test_a_crash_loop_of_thousands_of_attempts_does_not_overflow() -> None:
    # 2.0 ** 1024 raises OverflowError: after ~1,025 crashes in a row it left the master's
    # loop. The delay stays at its maximum however long the streak.
    b = Backoff(0.1, 30.0, 2.0, 0.0, 10.0)
    delays = [b.failure(0.0, 0.0) for _ in range(5000)]
    assert delays[-1] == 30.0 and b.failures == 5000
    tiny = Backoff(0.0, 30.0, 10.0, 0.0, 10.0)  # initial 0: never reaches max by growth
    assert [tiny.failure(0.0, 0.0) for _ in range(2000)][-1] == 0.0
