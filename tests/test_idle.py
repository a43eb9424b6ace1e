"""An idle child costs nothing: a real child on a real gearmand, registered and asleep
(PRE_SLEEP sent), is woken only by the job server, its master or a signal.

Wake-ups are counted from /proc (voluntary context switches: each return from a blocking
wait is one), over a measurement window; the same child must still take a job at once, see
its master die (PDEATHSIG), stop on a graceful signal, and reconnect to a server that went
away and came back.
"""

from __future__ import annotations

import os
import signal
import time

import psutil
import pytest
from conftest import HOST, Gearmand, wait_for, wait_value

from gearvisor.gearman.client import Client

pytestmark = pytest.mark.integration

IDLE_WINDOW = 6.0  # seconds the child is watched while idle
# The most wake-ups an idle child may have in IDLE_WINDOW. The runtime that woke every 1.0 s
# had about one per second (6 and more); an idle child now has none of its own, and the
# margin is for what the kernel or the master may do to it once in a while.
MAX_IDLE_SWITCHES = 2
TAKE_LATENCY = 1.0  # seconds a job submitted to an idle child may take end to end (margin)


def one_child(servers: list[str], **extra: object) -> dict:
    """A pool of one Python child serving `reverse`, with fast reconnects."""
    return {"servers": servers,
            "pools": {"work": {"processes": 1, "functions": {"reverse": "examples.text:reverse"},
                               "reconnect_max_delay": 0.2, **extra}}}


def voluntary_switches(pid: int) -> int:
    """The process's voluntary context switches so far (every wait it returned from)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("voluntary_ctxt_switches:"):
                return int(line.split()[1])
    raise AssertionError(f"no voluntary_ctxt_switches in /proc/{pid}/status")


def idle_child(m, gearmand: Gearmand) -> int:
    """The pool's one child, once it is registered on gearmand and says it is idle."""
    wait_for(lambda: len(gearmand.workers("work")) == 1, message="child registered")
    return wait_value(lambda: m.child_with_title("work[0] idle"), lambda pid: pid is not None,
                      message="child idle")


def switches_while_idle(pid: int, window: float = IDLE_WINDOW) -> int:
    """Voluntary context switches of `pid` over `window` seconds in which nobody talks to it.
    The window is the measurement itself (there is no state to poll for)."""
    before = voluntary_switches(pid)
    end = time.monotonic() + window
    while (left := end - time.monotonic()) > 0:
        time.sleep(min(0.5, left))
    return voluntary_switches(pid) - before


def settled(pid: int) -> None:
    """Wait until registration and the child's first reports are over: a second with no
    more than the one wake-up the old runtime had per second."""
    wait_for(lambda: switches_while_idle(pid, 1.0) <= 1, timeout=10,
             message="idle child quiet for a second")


def test_an_idle_child_does_not_wake_up(gearmand, master):
    m = master(one_child([gearmand.address]))
    pid = idle_child(m, gearmand)
    settled(pid)
    n = switches_while_idle(pid)
    assert n <= MAX_IDLE_SWITCHES, f"idle child woke {n} times in {IDLE_WINDOW:g}s"


def test_an_idle_child_on_two_servers_does_not_wake_up(gearmand_factory, master):
    a, b = gearmand_factory(), gearmand_factory()
    m = master(one_child([a.address, b.address]))
    wait_for(lambda: len(a.workers("work")) == 1 and len(b.workers("work")) == 1,
             message="child registered on both servers")
    pid = wait_value(lambda: m.child_with_title("work[0] idle"), lambda p: p is not None,
                     message="child idle")
    settled(pid)
    n = switches_while_idle(pid)
    assert n <= MAX_IDLE_SWITCHES, f"idle child woke {n} times in {IDLE_WINDOW:g}s"


def test_an_idle_child_takes_a_job_at_once(gearmand, master):
    m = master(one_child([gearmand.address]))
    pid = idle_child(m, gearmand)
    settled(pid)
    with Client(HOST, gearmand.port) as c:
        t0 = time.monotonic()
        r = c.call("reverse", b"abc")
        took = time.monotonic() - t0
    assert r.ok and r.data == b"cba"
    assert took < TAKE_LATENCY, f"an idle child took {took:.3f}s to answer"


def test_an_idle_child_stops_on_a_graceful_signal(gearmand, master):
    m = master(one_child([gearmand.address]))
    pid = idle_child(m, gearmand)
    settled(pid)
    child = psutil.Process(pid)
    t0 = time.monotonic()
    os.kill(pid, signal.SIGTERM)
    wait_for(lambda: not child.is_running() or child.status() == psutil.STATUS_ZOMBIE,
             timeout=5, message="child exited on SIGTERM")
    assert time.monotonic() - t0 < 5
    assert m.events("child exiting"), "the child logged its graceful exit"


def test_an_idle_child_sees_its_master_die(gearmand, master):
    m = master(one_child([gearmand.address]))
    pid = idle_child(m, gearmand)
    settled(pid)
    child = psutil.Process(pid)
    os.kill(m.pid, signal.SIGKILL)
    m.wait_exit(timeout=5)
    wait_for(lambda: not child.is_running() or child.status() == psutil.STATUS_ZOMBIE,
             timeout=3, message="orphaned idle child gone")
    wait_for(lambda: gearmand.workers("work") == [], message="gearmand dropped the worker")


def test_an_idle_child_of_a_pool_with_a_user_sees_its_master_die(gearmand, master):
    # A credential change (setuid/setgid after fork) clears PR_SET_PDEATHSIG: it must be
    # set after the switch, or the child of a pool with `user:` outlives its master.
    if os.geteuid() != 0:
        pytest.skip("switching to another user needs root")
    m = master(one_child([gearmand.address], user="nobody"))
    pid = idle_child(m, gearmand)
    settled(pid)
    assert psutil.Process(pid).uids().real != 0
    child = psutil.Process(pid)
    os.kill(m.pid, signal.SIGKILL)
    m.wait_exit(timeout=5)
    wait_for(lambda: not child.is_running() or child.status() == psutil.STATUS_ZOMBIE,
             timeout=3, message="orphaned idle child (user nobody) gone")


def test_an_idle_child_reconnects_to_a_server_that_came_back(gearmand, master):
    m = master(one_child([gearmand.address]))
    pid = idle_child(m, gearmand)
    settled(pid)
    gearmand.stop()
    gearmand.start()  # the same port
    wait_for(lambda: len(gearmand.workers("work")) == 1, timeout=10,
             message="child registered again on the restarted server")
    with Client(HOST, gearmand.port) as c:
        r = c.call("reverse", b"back")
    assert r.ok and r.data == b"kcab"
    # Once back, asleep again: no retry timer left running.
    settled(pid)
    n = switches_while_idle(pid, 3.0)
    assert n <= MAX_IDLE_SWITCHES, f"reconnected idle child woke {n} times in 3s"
