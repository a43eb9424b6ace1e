"""The retry decision for a failed attempt of a job: retry it (and when) or make it a dead
letter. Pure: the caller passes the wall-clock time and the random draw.

Full jitter (the AWS Architecture Blog's "Exponential Backoff And Jitter"): the delay before
attempt n+1 is uniform(0, min(max, initial * multiplier**(n-1))), so retries of many jobs
that failed together (an SMTP server down) spread out instead of arriving in waves.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable

from gearvisor.config.model import RetryConfig

RETRY = "retry"
DEAD = "dead"


def ceiling(policy: RetryConfig, attempt: int) -> float:
    """The longest delay after failed attempt `attempt` (1-based): initial *
    multiplier**(attempt-1), capped at max (computed without overflow for any attempt)."""
    initial, multiplier, top = policy.initial, policy.multiplier, policy.max
    if initial <= 0.0 or multiplier <= 1.0 or attempt <= 1:
        return min(initial, top)
    # compared as logarithms: multiplier**(attempt-1) overflows a float for big attempts,
    # and top / initial for a subnormal initial
    growth = (attempt - 1) * math.log(multiplier)
    if top <= initial or growth >= math.log(top) - math.log(initial):
        return top
    try:
        return min(initial * multiplier ** (attempt - 1), top)
    except OverflowError:  # (a tiny initial times a power beyond floats: below top, though)
        return min(math.exp(math.log(initial) + growth), top)


def decide(policy: RetryConfig | None, outcome: str, attempt: int, now: float,
           rand: Callable[[], float] = random.random) -> tuple[str, float | None]:
    """("retry", due) when `policy` retries this `outcome` and `attempt` (1-based, the one
    that failed) is below max_attempts; otherwise ("dead", None). `due` is in [now, now +
    policy.max]; `rand` returns a float in [0, 1)."""
    listed = policy.outcomes if policy is not None else ()
    if outcome == "poison" and ("crash" in listed or "killed" in listed):
        # Refused as poison: it crashed (or hung) the workers it ran on. gearmand itself
        # re-runs a job whose worker died, so this refusal is where our retry comes in.
        outcome = "crash" if "crash" in listed else "killed"
    if policy is None or outcome not in policy.outcomes or attempt >= policy.max_attempts:
        return DEAD, None
    jitter = min(max(rand(), 0.0), 1.0)  # a caller's odd random source cannot leave [0, 1]
    return RETRY, now + jitter * ceiling(policy, attempt)
