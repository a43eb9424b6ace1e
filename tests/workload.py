"""Shared by the integration tests that roll a pool under load (reload, file watching).

A module whose function `work` returns its code version and appends "<unique> <version>" to
$RESULTS (the side effect the tests count); load threads that submit background and
foreground jobs, bounded in count and time; a thread that samples gearmand's own `workers`
list to prove capacity never dips.
"""

from __future__ import annotations

import collections
import json
import threading
import time
from collections.abc import Callable
from pathlib import Path

from conftest import HOST

from gearvisor.gearman import admin
from gearvisor.gearman.client import Client

PROCESSES = 8
MAX_LOAD_SECONDS = 60  # every load loop is bounded in time...
MAX_JOBS = 3000  # ...and in count

MODULE = '''\
import os, time
{preamble}
VERSION = "{version}"


def work(job):
    spec = job.json()
    time.sleep(spec.get("sleep", 0))
    with open(os.environ["RESULTS"], "a") as f:  # O_APPEND: one whole line per job
        f.write(job.unique + " " + VERSION + "\\n")
    return VERSION
'''


def write_version(directory: Path, version: str, preamble: str = "") -> None:
    path = directory / "vermod.py"
    path.write_text(MODULE.format(version=version, preamble=preamble))
    # A new process must not pick a stale .pyc written in the same second for a file of
    # the same size: drop the cache (what a deploy tool's fresh checkout does anyway).
    for pyc in (directory / "__pycache__").glob("vermod.*"):
        pyc.unlink()


def registered_count(gearmand) -> int:
    """How many connections gearmand itself lists as able to run `work`."""
    return sum(1 for w in admin.workers(HOST, gearmand.port, 2.0) if "work" in w.functions)


class CapacityWatch(threading.Thread):
    """Polls gearmand's `workers` until stopped; keeps the lowest count seen. `count` says
    what to count (default: connections able to run `work`)."""

    def __init__(self, gearmand, count: Callable[[], int] | None = None) -> None:
        super().__init__(daemon=True)
        self.gearmand = gearmand
        self.count = count or (lambda: registered_count(gearmand))
        self.low = 10**9
        self.samples = 0
        self.errors: list[str] = []
        self.halt = threading.Event()

    def run(self) -> None:
        deadline = time.monotonic() + MAX_LOAD_SECONDS
        while not self.halt.is_set() and time.monotonic() < deadline:
            try:
                n = self.count()
            except admin.AdminError as e:
                self.errors.append(str(e))
                continue
            self.low = min(self.low, n)
            self.samples += 1
            self.halt.wait(0.005)  # sampling interval

    def stop(self) -> None:
        self.halt.set()
        self.join(10)


class Load(threading.Thread):
    """Background jobs (unique ids) or foreground jobs, one after another, until stopped."""

    def __init__(self, gearmand, background: bool, tag: str, function: str = "work",
                 payload: str = json.dumps({"sleep": 0.02})) -> None:
        super().__init__(daemon=True)
        self.gearmand = gearmand
        self.background = background
        self.tag = tag
        self.function = function
        self.payload = payload
        self.submitted: list[str] = []
        self.results: list[tuple[str, bool, bytes]] = []  # foreground: unique, ok, data
        self.error: BaseException | None = None
        self.halt = threading.Event()

    def run(self) -> None:
        deadline = time.monotonic() + MAX_LOAD_SECONDS
        try:
            with Client(HOST, self.gearmand.port, timeout=30) as c:
                for i in range(MAX_JOBS):
                    if self.halt.is_set() or time.monotonic() >= deadline:
                        break
                    unique = f"{self.tag}-{i}"
                    payload = self.payload
                    if self.background:
                        c.submit_background(self.function, payload, unique)
                        self.submitted.append(unique)
                        self.halt.wait(0.005)  # pacing, so the queue stays short
                    else:
                        self.submitted.append(unique)
                        r = c.call(self.function, payload, unique)
                        self.results.append((unique, r.ok, r.data))
        except BaseException as e:  # reported by the test
            self.error = e

    def stop(self) -> None:
        self.halt.set()
        self.join(60)


def results_by_unique(tmp_path: Path) -> collections.Counter:
    path = tmp_path / "results.txt"
    if not path.exists():
        return collections.Counter()
    return collections.Counter(line.split()[0] for line in path.read_text().splitlines())


def versions_seen(tmp_path: Path) -> set[str]:
    path = tmp_path / "results.txt"
    return {line.split()[1] for line in path.read_text().splitlines()} if path.exists() else set()

