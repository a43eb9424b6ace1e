"""The benchmark script, in its tiny mode (seconds), so it cannot rot. Its numbers are not
checked here (speed is measured by bench/, never by timed tests): only that every section
ran, measured gearvisor against its competitors and wrote the report, JSON and chart."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

from gearvisor.child.postfork import set_pdeathsig

pytestmark = pytest.mark.integration


def _die_with_pytest() -> None:
    """The script gets SIGTERM if pytest is killed (it stops what it started in turn),
    instead of running on with its gearmands and masters."""
    set_pdeathsig(signal.SIGTERM)


def test_bench_tiny_mode_writes_the_report(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, str(REPO / "bench" / "run.py"), "--tiny", "--out",
                          str(tmp_path)], capture_output=True, text=True, timeout=180,
                         preexec_fn=_die_with_pytest)
    assert out.returncode == 0, out.stderr[-3000:]
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["tiny"] is True
    assert 0 <= data["steal"] < 1  # (/proc/stat's steal over the run: how far to trust it)
    sections = {r["section"] for r in data["rows"]}
    assert {"throughput", "startup", "reload", "overhead", "recovery"} <= sections
    competitors = {r["competitor"] for r in data["rows"]}
    assert {"gearvisor", "pygearman", "libgearman", "supervisord"} <= competitors
    assert all(r["value"] >= 0 for r in data["rows"])
    assert data["targets"] and all({"name", "value", "goal", "ok"} <= set(t)
                                   for t in data["targets"])
    md = (tmp_path / "results.md").read_text()
    assert "CPU time stolen by the hypervisor during the run: " in md
    assert "## Targets" in md and "## Ratios" in md and "| throughput |" in md
    one_core = {r["competitor"] for r in data["rows"] if r["case"].endswith("all on one core")}
    assert {"gearvisor", "libgearman"} <= one_core  # (the placement-free round trips)
    assert (tmp_path / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("script, args, expect", [
    ("hot_cold.py", ["--jobs", "200"], "32 MiB of other memory written between jobs"),
    ("profile.py", ["--jobs", "300"], "| per job | gearvisor | libgearman |"),
    # (the difference must outweigh what the child's timers add under valgrind's slowness)
    ("instructions.py", ["--small", "20", "--large", "220"], "| per job |"),
])
def test_the_profiling_scripts_run(script: str, args: list[str], expect: str) -> None:
    """bench/hot_cold.py, bench/profile.py (strace beside the C worker) and
    bench/instructions.py (callgrind), tiny."""
    out = subprocess.run([sys.executable, str(REPO / "bench" / script), *args],
                         capture_output=True, text=True, timeout=300,
                         preexec_fn=_die_with_pytest)
    assert out.returncode == 0, out.stderr[-3000:]
    assert expect in out.stdout, out.stdout
