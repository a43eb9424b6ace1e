"""The open-files limit against what the pools will open: a warning at start and after each
reload, before a child fails with EMFILE. The arithmetic is policy/backoff.fd_warnings."""

from __future__ import annotations

import resource
from typing import TYPE_CHECKING

from gearvisor.master import bus as ev
from gearvisor.master.component import Component
from gearvisor.policy.backoff import fd_warnings

if TYPE_CHECKING:
    from gearvisor.master.arbiter import Arbiter


class FdLimits(Component):
    """Checks RLIMIT_NOFILE when the master starts and when a reload is accepted."""

    def attach(self, master: Arbiter) -> None:
        self.master = master
        master.bus.subscribe(ev.Reloaded, lambda _: self.check())
        self.check()

    def check(self) -> None:
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        soft = soft if soft != resource.RLIM_INFINITY else 1 << 20
        pools = self.master.pools.values()
        for warning in fd_warnings([(p.name, p.desired, len(p.config.servers),
                                     p.config.rlimit_nofile) for p in pools], soft):
            self.master.log.warning("open-files limit is close", problem=warning)
