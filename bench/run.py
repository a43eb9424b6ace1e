"""Run every benchmark side by side in one run and write the report.

    .venv/bin/python bench/run.py            # the full run (under 10 minutes on 2 cores)
    .venv/bin/python bench/run.py --tiny     # seconds: what the test suite runs
    .venv/bin/python bench/run.py --only throughput,startup

Writes bench/results/results.md (a markdown table of every measurement, the ratios against
the competitors measured in the same run, and each target), results.json and results.png (a
chart). Ratios are what to quote: this machine is shared and noisy, absolute rates are not
comparable across runs.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import REPO, Row, Target  # noqa: E402

SECTIONS = ("throughput", "lifecycle")


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        if names:
            cpu = names[0]
    except OSError:
        pass
    try:
        version = subprocess.run(["gearmand", "--version"], capture_output=True, text=True,
                                 timeout=5).stdout.strip().splitlines()[0]
    except (OSError, IndexError, subprocess.TimeoutExpired):
        version = "gearmand ?"
    return (f"{os.cpu_count()} cores ({cpu}), Linux {platform.release()}, Python "
            f"{platform.python_version()}, {version}")


def cpu_ticks() -> tuple[int, int]:
    """(all, stolen) CPU time of the whole machine so far, in clock ticks (/proc/stat's
    `cpu` line; (0, 0) where there is none). Steal is time the hypervisor gave this VM's
    CPUs to someone else: every rate in a run that lost much of it is low, and by how much
    depends on when it struck, so a run's steal says how far to trust it."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return 0, 0
    # user nice system idle iowait irq softirq steal [guest guest_nice: inside user/nice]
    return sum(fields[:8]), fields[7] if len(fields) > 7 else 0


def ratios(rows: list[Row]) -> list[str]:
    """gearvisor / competitor for every case where both were measured (better = >1)."""
    by_case: dict[tuple[str, str], dict[str, Row]] = defaultdict(dict)
    for r in rows:
        by_case[(r.section, r.case)][r.competitor] = r
    out = []
    for (section, case), got in by_case.items():
        for our_name, ours in got.items():
            if not our_name.startswith("gearvisor"):
                continue  # ours: "gearvisor" and its variants ("gearvisor prefetch 8")
            for name, other in got.items():
                if name.startswith("gearvisor") or not other.value or not ours.value:
                    continue
                ratio = (ours.value / other.value if ours.better == "higher"
                         else other.value / ours.value)
                out.append(f"| {section} | {case} | {our_name} | {name} | {ratio:.2f}x |")
    return out


def report(rows: list[Row], targets: list[Target], seconds: float, tiny: bool,
           steal: float) -> str:
    today = datetime.date.today().isoformat()
    lines = [f"# gearvisor benchmarks, {today}{' (tiny mode: not for quoting)' if tiny else ''}",
             "", f"Machine: {machine()}. Whole run: {seconds:.0f} s. CPU time stolen by the "
             f"hypervisor during the run: {steal:.1%}.", "",
             "## Targets", "", "| target | measured | goal | met |", "| --- | --- | --- | --- |"]
    for t in targets:
        lines.append(f"| {t.name} | {t.value:.2f} | {t.goal} | {'yes' if t.ok else 'NO'} |")
    lines += ["", "## Ratios (gearvisor vs. each competitor, same run; > 1 = gearvisor "
              "better)", "", "| section | case | gearvisor | vs. | ratio |",
              "| --- | --- | --- | --- | --- |"]
    lines += ratios(rows)
    lines += ["", "## Every measurement", "", "| section | case | competitor | value | unit |",
              "| --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r.section} | {r.case} | {r.competitor} | {r.value:.4g} | {r.unit} |")
    return "\n".join(lines) + "\n"


def chart(rows: list[Row], path: Path) -> None:
    """One bar group per throughput case (jobs/s), competitors side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tput = [r for r in rows if r.section == "throughput"]
    cases = list(dict.fromkeys(r.case for r in tput))
    names = list(dict.fromkeys(r.competitor for r in tput))
    fig, ax = plt.subplots(figsize=(max(8, len(cases) * 0.9), 5))
    width = 0.8 / max(1, len(names))
    for i, name in enumerate(names):
        values = [next((r.value for r in tput if r.case == c and r.competitor == name), 0)
                  for c in cases]
        ax.bar([x + i * width for x in range(len(cases))], values, width, label=name)
    ax.set_xticks([x + width * (len(names) - 1) / 2 for x in range(len(cases))])
    ax.set_xticklabels(cases, rotation=45, ha="right", fontsize=7)
    ax.set_ylabel("jobs/s")
    ax.set_title("Throughput against gearmand on loopback (same run)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="seconds, for the test suite")
    p.add_argument("--only", default=",".join(SECTIONS), help="comma-separated sections")
    p.add_argument("--out", default=str(REPO / "bench" / "results"), help="output directory")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows: list[Row] = []
    targets: list[Target] = []
    started = time.monotonic()
    ticks = cpu_ticks()
    for section in args.only.split(","):
        if section not in SECTIONS:
            p.error(f"unknown section {section!r}; known: {', '.join(SECTIONS)}")
        module = __import__(section)
        got_rows, got_targets = module.measure(args.tiny)
        rows += got_rows
        targets += got_targets
        print(f"{section}: {len(got_rows)} measurements", flush=True)
    seconds = time.monotonic() - started
    (total0, stolen0), (total1, stolen1) = ticks, cpu_ticks()
    total, stolen = total1 - total0, stolen1 - stolen0
    steal = stolen / total if total > 0 else 0.0
    text = report(rows, targets, seconds, args.tiny, steal)
    (out / "results.md").write_text(text)
    (out / "results.json").write_text(json.dumps(
        {"date": datetime.date.today().isoformat(), "machine": machine(), "tiny": args.tiny,
         "seconds": round(seconds, 1), "steal": round(steal, 4),
         "rows": [r.as_dict() for r in rows],
         "targets": [vars(t) for t in targets]}, indent=1))
    chart(rows, out / "results.png")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
