"""The one small interface every part of the master plugs in through.

A component owns its fds, timers and state. The arbiter attaches it once (it registers its
readers and timers on the loop and subscribes to the bus), hands it every accepted config
on reload, tells it when a stop begins and when the stop is overdue, asks whether it has
stopped, and merges what it adds to `gearvisor status`. Adding a component means writing
one and listing it in master/__init__.py's `components()`: no other component changes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gearvisor.config import Config
    from gearvisor.master.arbiter import Arbiter


class Component:
    """Defaults that do nothing, so each component writes only what it needs."""

    def attach(self, master: Arbiter) -> None:
        """Register fds and timers on master.loop and subscribe to master.bus."""

    def reload(self, config: Config) -> None:
        """A new config was accepted (the pools are rolling to it)."""

    def begin_stop(self, fast: bool) -> None:
        """The master is stopping: wind down what this component runs."""

    def stop_overdue(self) -> None:
        """The stop deadline passed: kill what is still running."""

    def stopped(self) -> bool:
        """Nothing of this component is left running (the master may exit)."""
        return True

    def status(self, now: float) -> dict[str, Any]:
        """Keys to add to `gearvisor status --json`."""
        return {}

    def close(self) -> None:
        """The master exits: release fds."""
