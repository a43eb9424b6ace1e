"""The master: one process, one thread, one loop of small components.

    loop       master/loop.py      selector + timer heap + signal wakeup fd; knows no feature
    arbiter    master/arbiter.py   pools and children: spawn, retire, reap, reload, stop
    bus        master/bus.py       typed events the arbiter and components publish
    system     master/system.py    the OS facade (fork, kill, waitpid), faked in tests
    components (master/component.py is the interface)
        control.py   the control socket: requests, buffered replies, the status stream
        watcher.py   the file-watcher helper process, and the rolls its changes ask for
        probe.py     the periodic, non-blocking probe of every job server (its views)
        findings.py  health findings from the probe's views: raised, cleared, logged
        commands.py  command pools' output capture and readiness
        health.py    hard timeouts, lifetimes, poison strikes, the circuit breaker
        groups.py    what a dead child leaves in its process group
        systemd.py   sd_notify: READY, RELOADING, STOPPING, STATUS, WATCHDOG
        exitlog.py   one log line per reaped child, worded from the pool's decision
        metrics.py   Prometheus /metrics, /healthz, /readyz over http.py (no thread)
        limits.py    the open-files limit against what the pools will open
        alerts.py    the alert engine's driver: facts in, notifier helper out, state file
        journal.py   the job journal: children's records and crash records to the store
                     helper, kept until it acks them
        fleet.py     `gearvisor fleet`: every host and foreign worker in the probe's
                     `workers` lists, and the hosts that vanished since an earlier look
        autoscale.py sizes pools on queue depth from the probe's snapshots; scale pins
        lanes.py     gives a held job back to gearmand when the job in front of it is slow
                     and another child of the pool is idle (pidfd_getfd + shutdown)

The master never imports user code and never starts a thread; whatever needs either runs
in a child or a helper process.
"""

from __future__ import annotations

import sys

from gearvisor import log as logmod
from gearvisor.config import Config
from gearvisor.master.alerts import Alerts
from gearvisor.master.arbiter import Arbiter
from gearvisor.master.autoscale import Autoscale
from gearvisor.master.commands import Commands
from gearvisor.master.component import Component
from gearvisor.master.control import Control
from gearvisor.master.exitlog import ExitLog
from gearvisor.master.findings import HealthFindings
from gearvisor.master.fleet import Fleet
from gearvisor.master.groups import Groups
from gearvisor.master.health import Health
from gearvisor.master.journal import Journal
from gearvisor.master.lanes import HeldLanes
from gearvisor.master.limits import FdLimits
from gearvisor.master.metrics import Metrics
from gearvisor.master.probe import Probe
from gearvisor.master.systemd import Systemd
from gearvisor.master.watcher import Watcher


def components(config: Config) -> list[Component]:
    """Every component of a running master, in the order they attach."""
    probe = Probe()
    return [Control(config), Watcher(config), probe, Commands(probe), Health(), Groups(),
            Systemd(), FdLimits(), Metrics(probe), ExitLog(), HealthFindings(probe),
            Alerts(config), Journal(config), Fleet(probe), Autoscale(probe), HeldLanes()]


def run(config: Config) -> int:
    """Entry point of `gearvisor -c FILE`."""
    logmod.configure(config.log_level, config.log_format)
    arbiter = Arbiter(config, components(config))
    try:
        return arbiter.run()
    finally:
        arbiter.close()
        sys.stderr.flush()
