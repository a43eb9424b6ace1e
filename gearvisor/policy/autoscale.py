"""Autoscaling on queue depth: how many children a pool should run, decided on each probe.

Pure logic: no I/O and no clock of its own (`now` is passed in); master/autoscale.py feeds
it the probe's views and carries the decision out through the arbiter's `scale`.

The decision (AutoScaler.decide):
- The backlog is the sum, over every function of the pool and every job server of the
  pool, of gearmand's `total` (waiting + running). A sum, not a maximum: a child serves any
  of its pool's functions but one job at a time, and a job queued on one server is not the
  job queued on another. A function two pools serve counts fully in each of them.
- Several hosts read the same global counts, so each takes its share: the backlog divided
  by the number of hosts that run this pool (`hosts`, counted from the client ids in the
  job servers' `workers` lists, this host included). N hosts then converge on the total a
  single host would run instead of N times it (each rounds up: at most N - 1 more).
- recommended = ceil(backlog / hosts / target), clamped to [min, max].
- Up: only `up_cooldown` after the last change, and at most `max_step` children.
- Down: to the highest recommendation seen within `down_after`, at most `max_step`
  children. The size the autoscaler started from (start-up, the end of a pin) counts as
  one, so a pool does not shrink within `down_after` of it, nor below what a scale-up was
  recommended within `down_after` of that.
- Frozen (a reason is given): no change at all. The master freezes a pool while its circuit
  is open, while most of its children are quarantined or in crash backoff, and during a
  roll: more workers make a failing pool worse.
A size outside [min, max] (a reload narrowed the range) is taken as the nearest bound
before the step is limited, so every decision that is not frozen lands in [min, max].
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

from gearvisor.config.model import AutoscaleConfig

MAX_HISTORY = 10_000  # recommendations kept for down_after: a bound whatever the probe rate


@dataclass(frozen=True)
class Inputs:
    """What one decision is made from."""

    backlog: int  # waiting + running over the pool's functions and servers
    hosts: int  # hosts running this pool, as the job servers' `workers` lists show (>= 1)
    current: int  # the pool's size now
    frozen: str | None = None  # why no change may be made now, if so


@dataclass(frozen=True)
class Decision:
    """The outcome: `desired` (== inputs.current when nothing changes) and why."""

    desired: int
    recommended: int  # this host's share of the backlog, clamped to [min, max]
    held: int  # the highest recommendation within down_after (what a scale-down goes to)
    state: str  # "up" | "down" | "steady" | "cooldown" | "holding" | "frozen"
    reason: str  # words for the log and `gearvisor status`

    @property
    def changed(self) -> bool:
        return self.state in ("up", "down")


def share(backlog: int, hosts: int, target: int) -> int:
    """Children this host should run for `backlog` jobs shared by `hosts` hosts."""
    return math.ceil(max(0, backlog) / (max(1, hosts) * target))


class AutoScaler:
    """One pool's autoscaler: its recommendations within down_after and its last change."""

    def __init__(self, config: AutoscaleConfig) -> None:
        self.config = config
        self.history: deque[tuple[float, int]] = deque(maxlen=MAX_HISTORY)
        self.last_change: float | None = None
        self.last: Decision | None = None

    def reconfigure(self, config: AutoscaleConfig) -> None:
        """A reload changed the block: new bounds from the next decision; the window and
        the last change are kept (a reload alone is no reason to resize)."""
        self.config = config

    def restart(self, now: float, current: int) -> None:
        """Start over from `current` (the pool started, or a pin ended): it counts as a
        change at `now`, so the pool neither grows within up_cooldown nor shrinks within
        down_after of it."""
        self.history.clear()
        self.history.append((now, self._clamp(current)))
        self.last_change = now

    def _clamp(self, n: int) -> int:
        return max(self.config.min, min(self.config.max, n))

    def decide(self, inputs: Inputs, now: float) -> Decision:
        """The size the pool should have now (see the module docstring)."""
        c = self.config
        if self.last_change is None:
            self.restart(now, inputs.current)
        recommended = self._clamp(share(inputs.backlog, inputs.hosts, c.target))
        self.history.append((now, recommended))
        while self.history and self.history[0][0] < now - c.down_after:
            self.history.popleft()
        held = max(n for _, n in self.history)
        current = inputs.current
        base = self._clamp(current)
        if inputs.frozen is not None:
            decision = Decision(current, recommended, held, "frozen", inputs.frozen)
        elif recommended > base and self._cooling(now) > 0:
            wait = self._cooling(now)
            if base == current:
                decision = Decision(current, recommended, held, "cooldown",
                                    f"wants {recommended}; up_cooldown for {wait:.1f}s more")
            else:
                decision = self._to_bound(current, base, recommended, held)
        elif recommended > base:
            desired = min(recommended, base + c.max_step)
            decision = Decision(desired, recommended, held, "up",
                                f"backlog {inputs.backlog} over {inputs.hosts} host(s), "
                                f"target {c.target}: {recommended}")
        elif held < base:
            desired = max(held, base - c.max_step)
            decision = Decision(desired, recommended, held, "down",
                                f"highest recommendation within down_after: {held}")
        elif base != current:
            decision = self._to_bound(current, base, recommended, held)
        elif recommended < base:
            # Down is wanted, but not yet: the window still holds a higher recommendation.
            decision = Decision(current, recommended, held, "holding",
                                f"wants {recommended}; held at {held} within down_after")
        else:
            decision = Decision(current, recommended, held, "steady",
                                f"backlog {inputs.backlog} over {inputs.hosts} host(s)")
        if decision.changed:
            self.last_change = now
        self.last = decision
        return decision

    def _cooling(self, now: float) -> float:
        """Seconds of up_cooldown left (<= 0: the pool may grow)."""
        assert self.last_change is not None
        return self.last_change + self.config.up_cooldown - now

    def _to_bound(self, current: int, base: int, recommended: int, held: int) -> Decision:
        """A size outside [min, max] (a reload narrowed it) goes to its nearest bound."""
        return Decision(base, recommended, held, "up" if base > current else "down",
                        f"outside [{self.config.min}, {self.config.max}]")
