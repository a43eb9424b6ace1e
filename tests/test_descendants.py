"""Integration: what a child leaves behind when it dies, against a real gearmand.

A job that forks, or a worker started as `sh -c "helper & exec worker"`, leaves processes
that inherited the child's pipes (its event pipe, stdout, stderr). The master must not wait
for them: it reads what the pipes hold, closes them, refills the slot on the normal backoff
and keeps answering. Each child runs in its own process group; what is left of the group
when the child dies gets SIGTERM, then SIGKILL after graceful_timeout (`kill_group`, on by
default), and the log names what was killed.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import psutil
import pytest
from conftest import HOST, wait_for, write_module

from gearvisor.gearman.client import Client

pytestmark = pytest.mark.integration

LEAVE = '''
import os, signal


def leave(job):
    """Fork a process that keeps every fd of this child and outlives it."""
    pid = os.fork()
    if pid == 0:
        signal.signal(signal.SIGTERM, signal.SIG_IGN if job.data == b"stubborn"
                      else signal.SIG_DFL)
        signal.signal(signal.SIGALRM, signal.SIG_DFL)
        signal.alarm(120)  # bounded: gone in two minutes whatever the test does
        while True:
            signal.pause()
    return f"{os.getpid()} {pid}"
'''


def python_pool(gearmand, tmp_path: Path, **extra) -> dict:
    write_module(tmp_path, "leavemod", LEAVE)
    pool = {"processes": 1, "functions": {"leave": "leavemod:leave"}, "graceful_timeout": 2,
            "watch": False, **extra}
    return {"servers": [gearmand.address], "watch_config": False, "pools": {"leave": pool}}


def registered(gearmand, pool: str) -> int:
    return len(gearmand.workers(pool))


def start_and_leave(gearmand, master, tmp_path, data: str = "plain", **extra):
    """A master whose only child ran one job that forked; returns (master, child, forked)."""
    m = master(python_pool(gearmand, tmp_path, **extra))
    wait_for(lambda: registered(gearmand, "leave") == 1, timeout=20, message="child registered")
    with Client(HOST, gearmand.port, timeout=20) as c:
        result = c.call("leave", data)
    assert result.ok, result
    child, forked = (int(x) for x in result.data.split())
    return m, child, forked


def serving_pid(m) -> int | None:
    rows = m.status()["pools"][0]["children"]
    return next((r["pid"] for r in rows if r["state"] in ("idle", "busy")), None)


def wait_refilled(m, gearmand, dead: int, connections: int = 1) -> int:
    """The slot has a new ready child, and gearmand lists `connections` for the pool."""
    new = wait_for(lambda: (p := serving_pid(m)) not in (None, dead) and p, timeout=15,
                   message="the slot refilled with a new ready child")
    wait_for(lambda: registered(gearmand, "leave") == connections, timeout=15,
             message=f"gearmand lists {connections} connection(s) of the pool")
    return new


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_a_killed_child_whose_fork_keeps_its_pipes_is_replaced_and_its_group_cleaned(
        gearmand, master, tmp_path):
    m, child, forked = start_and_leave(gearmand, master, tmp_path)
    assert os.getpgid(child) == child  # each child leads its own process group
    assert os.getpgid(forked) == child
    os.kill(child, signal.SIGKILL)
    # The master answers at once (it used to spin in reap until the fork exited) and
    # refills the slot on the normal backoff.
    wait_refilled(m, gearmand, child)
    # The fork was in the dead child's group: SIGTERMed, and the log names it.
    wait_for(lambda: not alive(forked), timeout=10, message="the fork stopped")
    (line,) = wait_for(lambda: m.events("child left processes behind; stopping them"),
                       message="the cleanup logged")
    assert line["child_pid"] == child and line["signal"] == "SIGTERM"
    assert any(p.startswith(f"{forked} ") for p in line["processes"]), line
    assert not m.events("leftover processes did not stop; killing them")


def test_leftovers_that_ignore_sigterm_are_sigkilled_after_graceful_timeout(
        gearmand, master, tmp_path):
    m, child, forked = start_and_leave(gearmand, master, tmp_path, data="stubborn")
    os.kill(child, signal.SIGKILL)
    wait_refilled(m, gearmand, child)
    # The master reaps it (it is the subreaper of its children's orphans): no zombie left.
    wait_for(lambda: not psutil.pid_exists(forked), timeout=15,
             message="the stubborn fork killed and reaped")
    (line,) = wait_for(lambda: m.events("leftover processes did not stop; killing them"),
                       message="the SIGKILL logged")
    assert line["signal"] == "SIGKILL" and any(p.startswith(f"{forked} ")
                                               for p in line["processes"]), line


def test_kill_group_false_leaves_descendants_alone_and_the_master_does_not_spin(
        gearmand, master, tmp_path):
    m, child, forked = start_and_leave(gearmand, master, tmp_path, kill_group=False)
    try:
        os.kill(child, signal.SIGKILL)
        # The new child, and the dead child's connection, which the fork still holds open.
        wait_refilled(m, gearmand, child, connections=2)
        # The fork still holds the dead child's event pipe; the master closed its end and
        # sleeps: well under half a core over a second (it spun at 100% before).
        assert alive(forked)
        assert psutil.Process(m.pid).cpu_percent(interval=1.0) < 50
        assert alive(forked)
        assert not m.events("child left processes behind; stopping them")
    finally:
        os.kill(forked, signal.SIGKILL)


def command_pool(gearmand, script: str, **extra) -> dict:
    pool = {"processes": 1, "command": ["sh", "-c", script], "functions": ["none"],
            "startsecs": "100ms", "graceful_timeout": 1, "watch": False, **extra}
    return {"servers": [gearmand.address], "watch_config": False, "pools": {"cmd": pool}}


def group_of(m, pgid: int) -> list[int]:
    return [p.pid for p in m.ours() if p.pid != m.pid and _pgid(p.pid) == pgid]


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None


def test_a_command_childs_helper_is_stopped_with_it(gearmand, master, tmp_path):
    # `helper & exec worker`: the helper keeps the child's stdout and stderr.
    m = master(command_pool(gearmand, "sleep 300 & echo helper started; exec sleep 300"))
    child = wait_for(lambda: serving_pid(m), timeout=15, message="command child ready")
    helper = wait_for(lambda: [p for p in group_of(m, child) if p != child],
                      message="the helper running in the child's group")[0]
    os.kill(child, signal.SIGKILL)
    new = wait_for(lambda: (p := serving_pid(m)) not in (None, child) and p, timeout=15,
                   message="the slot refilled")
    wait_for(lambda: not alive(helper), timeout=10, message="the helper stopped")
    assert wait_for(lambda: m.events("child left processes behind; stopping them"))
    # A graceful stop: SIGTERM to the new child, then its group; nothing is left.
    wait_for(lambda: len(group_of(m, new)) == 2, message="the new child's helper running")
    m.signal(signal.SIGTERM)
    assert m.wait_exit(timeout=20) == 0
    wait_for(lambda: not m.ours(), timeout=10, message="no process of the fleet left")


def test_a_stop_sigkills_the_whole_group_at_its_deadline(gearmand, master, tmp_path):
    # The worker and its helper both ignore SIGTERM: the stop deadline SIGKILLs the group.
    script = ("trap '' TERM; sh -c 'trap \"\" TERM; while :; do sleep 1; done' & "
              "while :; do sleep 1; done")
    m = master(command_pool(gearmand, script))
    child = wait_for(lambda: serving_pid(m), timeout=15, message="command child ready")
    wait_for(lambda: len(group_of(m, child)) >= 2, message="the helper running")
    m.signal(signal.SIGTERM)
    assert m.wait_exit(timeout=20) == 0
    assert m.events("child did not stop in time; killing")
    wait_for(lambda: not m.ours(), timeout=10, message="no process of the group left")


def test_python_children_lead_their_own_process_group(gearmand, master, tmp_path):
    m = master(python_pool(gearmand, tmp_path, processes=2))
    wait_for(lambda: registered(gearmand, "leave") == 2, timeout=20, message="2 registered")
    pids = [c.pid for c in m.children()]
    assert len(pids) == 2 and all(os.getpgid(p) == p != os.getpgid(m.pid) for p in pids)


def test_rlimits_and_umask_apply_to_python_children_too(gearmand, master, tmp_path):
    # One post-fork setup for every kind of child: a Python pool gets the pool's rlimits
    # and umask as a command pool does (rlimits used to reach command pools only).
    m = master(python_pool(gearmand, tmp_path, rlimits={"nofile": 512, "core": 0},
                           umask="027"))
    wait_for(lambda: registered(gearmand, "leave") == 1, timeout=20, message="child registered")
    (child,) = m.children()
    assert child.rlimit(psutil.RLIMIT_NOFILE)[0] == 512
    assert child.rlimit(psutil.RLIMIT_CORE)[0] == 0
    status = Path(f"/proc/{child.pid}/status").read_text()
    assert "Umask:\t0027" in status
