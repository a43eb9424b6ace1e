"""systemd integration as a component: READY=1 once the fleet is ready, RELOADING=1 and
STOPPING=1 as they happen, a STATUS= summary, and WATCHDOG=1 at half of WatchdogSec
(master/notify.py speaks the protocol). Silent when not run by systemd."""

from __future__ import annotations

from typing import TYPE_CHECKING

from gearvisor.master import bus as ev
from gearvisor.master.component import Component
from gearvisor.master.notify import Notifier

if TYPE_CHECKING:
    from gearvisor.config import Config
    from gearvisor.master.arbiter import Arbiter


class Systemd(Component):
    def __init__(self, notifier: Notifier | None = None) -> None:
        self.notifier = notifier or Notifier()

    def attach(self, master: Arbiter) -> None:
        self.master = master
        if not self.notifier.enabled:
            return
        master.bus.subscribe(ev.FleetReady, lambda e: self.notifier.ready(e.summary))
        master.bus.subscribe(ev.Stopping, lambda _e: self.notifier.stopping())
        master.loop.every_pass(lambda: self.notifier.status(master.summary()))
        if self.notifier.watchdog_interval:
            self._watchdog()

    def reload(self, config: Config) -> None:
        self.notifier.reloading()

    def _watchdog(self) -> None:
        self.notifier.watchdog()
        self.master.loop.call_later(self.notifier.watchdog_interval, self._watchdog)

    def close(self) -> None:
        self.notifier.close()
