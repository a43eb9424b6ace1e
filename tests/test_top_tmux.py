"""`gearvisor top` in a real terminal: a real master and gearmand, top in a detached tmux
session of 100x30 (its own tmux server, -L), keys typed with send-keys and the screen read
with capture-pane. Every screen state is polled to a deadline."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import REPO, wait_for, wait_value

pytestmark = pytest.mark.integration


class Tmux:
    """A tmux server of our own (socket name unique per test); killed at teardown."""

    def __init__(self) -> None:
        self.name = f"gvtop-{uuid.uuid4().hex[:12]}"

    def run(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["tmux", "-L", self.name, *args], capture_output=True,
                              text=True, timeout=10)

    def start(self, command: list[str], cwd: Path, env: dict[str, str]) -> None:
        # remain-on-exit: after `q` the pane stays, so its exit status can be read.
        out = self.run("-f", "/dev/null", "new-session", "-d", "-s", "top", "-x", "100",
                       "-y", "30", "-c", str(cwd), "-e", f"PYTHONPATH={env['PYTHONPATH']}",
                       "-e", "TERM=xterm-256color", " ".join(command))
        assert out.returncode == 0, out.stderr
        self.run("set-option", "-t", "top", "remain-on-exit", "on")

    def screen(self) -> str:
        return self.run("capture-pane", "-p", "-t", "top").stdout

    def keys(self, *keys: str) -> None:
        out = self.run("send-keys", "-t", "top", *keys)
        assert out.returncode == 0, out.stderr

    def pane(self, fmt: str) -> str:
        return self.run("display-message", "-p", "-t", "top", fmt).stdout.strip()

    def kill(self) -> None:
        pid = self.run("display-message", "-p", "#{pid}").stdout.strip()
        self.run("kill-server")
        if pid.isdigit():  # the server itself, by pid, should kill-server not have ended it
            try:
                os.kill(int(pid), 9)
            except ProcessLookupError:
                pass


@pytest.fixture
def tmux() -> Iterator[Callable[[], Tmux]]:
    if shutil.which("tmux") is None:
        pytest.skip("tmux not installed")
    made: list[Tmux] = []

    def make() -> Tmux:
        t = Tmux()
        made.append(t)
        return t

    try:
        yield make
    finally:
        for t in made:
            t.kill()


def child_table(screen: str) -> list[list[str]]:
    """The children pane's rows: [pool/slot, pid, state, ...] per line after its header."""
    lines = screen.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("POOL/SLOT"))
    rows = []
    for line in lines[start + 1:]:
        if not re.match(r"^\S+/\d+\s", line):
            break
        rows.append(line.split())
    return rows


def test_top_shows_the_pools_children_and_functions_and_sorts_and_scales(
        gearmand, master, tmux) -> None:
    m = master({"servers": [gearmand.address], "probe_interval": "500ms",
                "pools": {"work": {"processes": 2, "functions": {
                    "reverse": "examples.text:reverse", "upper": "examples.text:upper"}}}})
    wait_for(lambda: len(gearmand.workers("work")) == 2, timeout=20, message="2 workers")
    pids = wait_value(lambda: sorted(c["pid"] for p in m.status()["pools"]
                                     for c in p["children"] if c["state"] == "idle"),
                      lambda v: len(v) == 2, timeout=20, message="2 idle children")
    t = tmux()
    # The exit status goes to a file: tmux may mark the pane dead before it has reaped the
    # process, and then never show a status.
    exit_file = m.tmp / "top.exit"
    t.start(["sh", "-c", shlex.quote(
        f"{shlex.quote(sys.executable)} -m gearvisor top -c {shlex.quote(str(m.config_path))} "
        f"--interval 200ms; echo $? > {shlex.quote(str(exit_file))}")],
        m.tmp, {"PYTHONPATH": str(REPO)})

    def shown_pids(screen: str) -> list[int]:
        return [int(r[1]) for r in child_table(screen) if r[1].isdigit()]

    # Both panes: the pool's children with the master's pids, and the pool's functions
    # with our 2 capable workers out of 2 on the job server.
    screen = wait_value(t.screen, lambda s: "POOL/SLOT" in s and sorted(shown_pids(s)) == pids
                        and re.search(r"reverse .* 2/2", s) and re.search(r"upper .* 2/2", s),
                        timeout=20, message="top showing the children and functions")
    assert "master gone" not in screen and "work/0" in screen and "work/1" in screen
    assert [r[0] for r in child_table(screen)] == ["work/0", "work/1"]  # pool/slot order

    # Tab to the children pane, s: sorted by PID, largest first (the header marks it).
    t.keys("Tab")
    wait_for(lambda: "> CHILDREN" in t.screen(), timeout=10, message="children focused")
    t.keys("s")
    screen = wait_value(t.screen, lambda s: "PID*" in s and len(shown_pids(s)) == 2,
                        timeout=10, message="sorted by pid")
    assert shown_pids(screen) == sorted(pids, reverse=True)

    # +: the selected row's pool gets one more child, in the master and on gearmand.
    t.keys("+")
    wait_for(lambda: m.status()["pools"][0]["desired"] == 3, timeout=10,
             message="the master scaled to 3")
    wait_for(lambda: len(gearmand.workers("work")) == 3, timeout=20,
             message="3 workers on gearmand")
    children = wait_value(lambda: sorted(c["pid"] for c in m.status()["pools"][0]["children"]
                                         if c["pid"] is not None),
                          lambda v: len(v) == 3, timeout=20, message="3 children")
    screen = wait_value(t.screen, lambda s: sorted(shown_pids(s)) == children, timeout=10,
                        message="top showing 3 children")
    assert "work: 2 -> 3 processes" in screen
    assert shown_pids(screen) == sorted(children, reverse=True)  # still sorted by pid

    # q: top exits 0 and leaves the terminal.
    t.keys("q")
    status = wait_value(lambda: exit_file.read_text().strip() if exit_file.exists() else "",
                        bool, timeout=10, message="top exited")
    assert status == "0", t.screen()
