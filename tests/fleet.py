"""A pool's decisions carried out the way the arbiter does, minus fork, pipes and signals:
shared by the pure-logic tests of rolls (test_pool) and of health (test_quarantine)."""

from __future__ import annotations

import itertools

from gearvisor.policy.child import Child, ChildState
from gearvisor.policy.pool import ExitDecision, Pool, Retire, Spawn

_pids = itertools.count(1000)


def next_pid() -> int:
    """A made-up pid, unique across the tests that share the simulation."""
    return next(_pids)


class Fleet:
    """Carries out a pool's decisions the way the arbiter does, minus fork and signals.

    Every child ever told to stop is recorded in `retired_log`, so tests can check that none
    is told twice and when each was told.
    """

    def __init__(self, pool: Pool, now: float = 0.0) -> None:
        self.pool = pool
        self.now = now
        self.retired_log: list[Child] = []

    def execute(self, actions: list) -> list:
        for action in actions:
            if isinstance(action, Spawn):
                child = Child(pool=self.pool.name, slot=action.slot.index,
                              generation=self.pool.generation, started_at=self.now,
                              pid=next_pid())
                self.pool.placed(action, child)
            else:
                assert isinstance(action, Retire)
                self.retire(action.child)
        return actions

    def step(self) -> list:
        """One pass of the master loop: plan and carry it out."""
        return self.execute(self.pool.plan(self.now))

    def retire(self, child: Child) -> None:
        self.retired_log.append(child)
        self.pool.retiring(child)
        if child.state in (ChildState.STARTING, ChildState.READY):
            child.transition(ChildState.DRAINING)
        if child.stop_requested_at is None:
            child.stop_requested_at = self.now

    def ready(self, child: Child) -> tuple[int, Child | None] | None:
        """The child reported ready. Like the arbiter, a child told to stop is not serving."""
        if child.state is not ChildState.STARTING:
            return None
        child.transition(ChildState.READY)
        child.ready_at = self.now
        failures, replaced = self.pool.child_ready(child)
        if replaced is not None:
            self.retire(replaced)
        return failures, replaced

    def exit(self, child: Child, code: int | None, *, stopping: bool = False) -> ExitDecision:
        child.transition(ChildState.EXITED)
        return self.pool.child_exited(child, code, self.now, stopping)

    def reap_retired(self) -> list[ExitDecision]:
        return [self.exit(c, 0) for c in list(self.pool.retired)]

    def ready_all(self) -> None:
        for child in self.pool.children():
            self.ready(child)

    def capacity(self) -> int:
        """Children serving in slots (retired ones are finishing a job, not taking new ones)."""
        return sum(1 for s in self.pool.slots
                   if s.child is not None and s.child.state is ChildState.READY)

    def successors(self) -> list[Child]:
        return [s.successor for s in self.pool.slots if s.successor is not None]
