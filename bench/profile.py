"""Why a throughput target is missed: system calls and CPU per job, side by side with the C
worker (PHP's GearmanWorker on libgearman), over the same jobs on a fresh gearmand each.

For each worker kind (a gearvisor master with one child on the default settings, one PHP
libgearman worker), on the same kind of load:
- `strace -c -p` on the worker process over N jobs: system calls per job by name;
- the process's own CPU (user and system) and context switches per job, read from /proc
  in a second, untraced pass (strace slows whatever it traces);
- with --py-spy, a py-spy profile of the gearvisor child over the untraced pass, summed
  by function (self samples), so where Python's time goes is in the same report.

    .venv/bin/python bench/profile.py                      # round trips, 1 in flight
    .venv/bin/python bench/profile.py --load drain --py-spy

Needs strace (Debian's package) and, for --py-spy, py-spy (the bench extra). Loads are
bounded in count (--jobs) and time (DEADLINE); everything talks to 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import collections
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))

import throughput as T  # noqa: E402
from common import Gearmand  # noqa: E402

PY_SPY = str(Path(sys.executable).parent / "py-spy")  # the bench extra puts it in the venv
SPY_RATE = 1000  # py-spy samples per second
DEADLINE = 120.0  # seconds any one load may take
WARM_UP = 300  # jobs before anything is measured (imports, first connections)
STRACE_LINE = re.compile(r"^\s*[\d.]+\s+[\d.]+\s+\d+\s+(\d+)\s+(?:\d+\s+)?(\w+)$")
KINDS = {"gearvisor": T.GearvisorMaster, "libgearman": T.LibgearmanWorkers}


def worker_pid(competitor: T.Competitor) -> int | None:
    """The process that runs the jobs: the master's child, or the PHP process itself."""
    pid = competitor.procs[0].pid
    if not isinstance(competitor, T.GearvisorMaster):
        return pid
    for child in psutil.Process(pid).children():
        if "bench[0]" in " ".join(child.cmdline()):
            return child.pid
    return None


def counters(pid: int) -> tuple[float, float, int, int]:
    """(user s, system s, voluntary switches, involuntary switches) of `pid` so far."""
    times = psutil.Process(pid).cpu_times()
    switches = psutil.Process(pid).num_ctx_switches()
    return times.user, times.system, switches.voluntary, switches.involuntary


def load(kind: str, port: int, jobs: int, poller: T.StatusPoller) -> float:
    """Run `jobs` jobs of the chosen kind; jobs/s."""
    deadline = time.monotonic() + DEADLINE
    if kind == "round-trip":
        return T.round_trips(port, 1, jobs, deadline)
    T.submit_background(port, jobs, deadline)
    started = time.monotonic()
    T.poll_until(lambda: poller.poll()[0] == 0, deadline, T.POLL_DRAIN, "the drain")
    return jobs / (time.monotonic() - started)


def strace_counts(path: Path) -> dict[str, int]:
    calls = {}
    for line in path.read_text().splitlines():
        m = STRACE_LINE.match(line)
        if m and m.group(2) != "total":
            calls[m.group(2)] = int(m.group(1))
    return calls


def spy_summary(path: Path, top: int = 12) -> tuple[int, list[tuple[str, float]]]:
    """py-spy's raw output summed by the innermost function (its lines together): (samples,
    [(function, share of samples)])."""
    own: collections.Counter[str] = collections.Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not n.isdigit():
            continue
        total += int(n)
        own[re.sub(r":\d+\)$", ")", stack.split(";")[-1])] += int(n)  # by function
    return total, [(frame, n / total) for frame, n in own.most_common(top)]


def profile(name: str, kind: str, jobs: int, workdir: Path, spy: bool) -> dict:
    with Gearmand(threads=1) as gm:
        competitor = KINDS[name](workdir)
        poller = T.StatusPoller(gm.port)
        try:
            competitor.start(gm, 1)
            T.poll_until(lambda: poller.poll()[1] >= 1, time.monotonic() + 30, 0.01,
                         "the worker to register")
            pid = T.poll_until(lambda: worker_pid(competitor), time.monotonic() + 30, 0.05,
                               "the worker's pid")
            load(kind, gm.port, WARM_UP, poller)
            # Untraced: the rate, CPU and switches per job.
            before = counters(pid)
            rate = load(kind, gm.port, jobs, poller)
            after = counters(pid)
            spy_got: tuple[int, list[tuple[str, float]]] = (0, [])
            spy_seconds = 0.0
            if spy and name == "gearvisor":
                # Sampled only while it holds the GIL (--gil): where its Python time goes,
                # and (samples / rate / seconds) how much of the wall time that is.
                spy_out = workdir / f"spy-{name}.txt"
                sampler = subprocess.Popen([PY_SPY, "record", "--gil", "-r", str(SPY_RATE),
                                            "-f", "raw", "-o", str(spy_out), "-p", str(pid)],
                                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                time.sleep(1.0)  # py-spy attaches (no state of its own to poll for)
                started = time.monotonic()
                load(kind, gm.port, jobs, poller)
                spy_seconds = time.monotonic() - started
                sampler.send_signal(signal.SIGINT)
                sampler.wait(timeout=30)
                spy_got = spy_summary(spy_out)
            # Traced: the system calls.
            trace_out = workdir / f"strace-{name}.txt"
            tracer = subprocess.Popen(["strace", "-c", "-o", str(trace_out), "-p", str(pid)],
                                      stderr=subprocess.DEVNULL)
            T.poll_until(lambda: "TracerPid:\t0" not in Path(f"/proc/{pid}/status")
                         .read_text(), time.monotonic() + 10, 0.01, "strace to attach")
            load(kind, gm.port, jobs, poller)
            tracer.send_signal(signal.SIGINT)
            tracer.wait(timeout=30)
        finally:
            competitor.stop()
            poller.close()
    d = [b - a for a, b in zip(before, after, strict=True)]
    return {"rate": rate, "user_us": d[0] / jobs * 1e6, "sys_us": d[1] / jobs * 1e6,
            "voluntary": d[2] / jobs, "involuntary": d[3] / jobs,
            "calls": {k: v / jobs for k, v in strace_counts(trace_out).items()},
            "spy": spy_got[1],
            "gil_share": spy_got[0] / SPY_RATE / spy_seconds if spy_seconds else 0.0}


def report(kind: str, jobs: int, got: dict[str, dict]) -> str:
    names = list(got)
    out = [f"# Profile: {kind}, {jobs} echo jobs, 1 worker, gearmand -t 1", "",
           "| per job | " + " | ".join(names) + " |", "| --- |" + " --- |" * len(names)]

    def row(label: str, fmt: str, key: str) -> None:
        out.append(f"| {label} | " + " | ".join(fmt.format(got[n][key]) for n in names) + " |")

    row("jobs/s (untraced)", "{:.0f}", "rate")
    row("CPU, user (us)", "{:.1f}", "user_us")
    row("CPU, system (us)", "{:.1f}", "sys_us")
    row("voluntary context switches", "{:.2f}", "voluntary")
    row("involuntary context switches", "{:.2f}", "involuntary")
    calls = sorted({c for n in names for c in got[n]["calls"]})
    for call in calls:
        out.append(f"| `{call}` | " + " | ".join(f"{got[n]['calls'].get(call, 0):.2f}"
                                                 for n in names) + " |")
    out.append("| all system calls | " + " | ".join(f"{sum(got[n]['calls'].values()):.2f}"
                                                  for n in names) + " |")
    spy = got.get("gearvisor", {}).get("spy")
    if spy:
        out += ["", f"py-spy --gil, the gearvisor child: it ran Python code "
                f"{got['gearvisor']['gil_share']:.0%} of the wall time of a pass; of those "
                "samples, by innermost frame:", ""]
        out += [f"- {share:5.1%} {frame}" for frame, share in spy]
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--load", choices=("round-trip", "drain"), default="round-trip")
    p.add_argument("--jobs", type=int, default=10_000)
    p.add_argument("--py-spy", action="store_true", help="also profile the gearvisor child")
    p.add_argument("--out", type=Path, help="write the report here too (markdown)")
    args = p.parse_args(argv)
    for tool in ("strace", "php") + ((PY_SPY,) if args.py_spy else ()):
        if shutil.which(tool) is None:
            p.error(f"{tool} is not installed (examples/setup.sh installs it)")
    with tempfile.TemporaryDirectory(prefix="gv-profile-") as d:
        workdir = Path(d)
        T.write_workers(workdir)
        got = {name: profile(name, args.load, args.jobs, workdir, args.py_spy)
               for name in KINDS}
    text = report(args.load, args.jobs, got)
    print(text, end="")
    if args.out:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
