"""Lifecycle benchmarks (issue 7, parts 2-5): start-up, rolling reload under load, master
overhead and crash recovery, gearvisor against supervisord running pygearman workers.

    .venv/bin/python bench/lifecycle.py [--tiny]

Everything runs against a real gearmand (`-t 1`) on a free 127.0.0.1 port, and "registered"
always means what gearmand itself lists in its `workers` admin reply for the benchmark's
function. Every process started here is killed by pid / process group, every temp dir is
removed, every load loop is bounded in count and time, and every wait polls against a
deadline (bench.common.wait_for).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import yaml

if __package__:  # imported as bench.lifecycle
    from .common import PYTHON, Gearmand, Row, Target, kill, spawn, wait_for
else:  # run as a script (bench/ is sys.path[0]) or imported with bench/ on sys.path
    from common import PYTHON, Gearmand, Row, Target, kill, spawn, wait_for

from gearvisor.gearman import admin  # common.py put the repo on sys.path
from gearvisor.gearman.client import Client

FUNCTION = "bench_work"
BIN = Path(PYTHON).parent
GEARVISOR = [str(BIN / "gearvisor")] if (BIN / "gearvisor").exists() else [
    PYTHON, "-m", "gearvisor"]
SUPERVISORD = [str(BIN / "supervisord")] if (BIN / "supervisord").exists() else [
    PYTHON, "-m", "supervisor.supervisord"]
SUPERVISORCTL = [str(BIN / "supervisorctl")] if (BIN / "supervisorctl").exists() else [
    PYTHON, "-m", "supervisor.supervisorctl"]
MB = 1e6  # MB here is 10^6 bytes
WARMUP_JOBS = 50  # done under the steady load before a roll starts

# The job both competitors run: sleep BENCH_JOB_SECONDS (so a roll meets jobs in flight),
# then append the job's unique id to $BENCH_RESULTS (O_APPEND: one whole line per job).
GEARVISOR_MODULE = '''\
import os
import time

DELAY = float(os.environ.get("BENCH_JOB_SECONDS") or 0)


def work(job):
    if DELAY:
        time.sleep(DELAY)
    fd = os.open(os.environ["BENCH_RESULTS"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (job.unique + "\\n").encode())
    finally:
        os.close(fd)
    return None
'''

# A plain pygearman worker, the way one is written to run under supervisord.
PYGEARMAN_WORKER = '''\
import os
import time

import gearman

DELAY = float(os.environ.get("BENCH_JOB_SECONDS") or 0)


def work(worker, job):
    if DELAY:
        time.sleep(DELAY)
    unique = job.unique.decode() if isinstance(job.unique, bytes) else job.unique
    fd = os.open(os.environ["BENCH_RESULTS"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (unique + "\\n").encode())
    finally:
        os.close(fd)
    return ""


worker = gearman.GearmanWorker([os.environ["BENCH_SERVER"]])
worker.set_client_id("pygearman-%d" % os.getpid())
# bytes: pygearman 0.2.6 on Python 3 compares the server's (bytes) function name against
# the registered names, so a str name fails every job with an AssertionError.
worker.register_task(b"{function}", work)
worker.work()
'''.replace("{function}", FUNCTION)


def log(msg: str) -> None:
    print(f"[lifecycle] {msg}", file=sys.stderr, flush=True)


def registered(g: Gearmand) -> int:
    return g.registered(FUNCTION)


# ---------------------------------------------------------------- processes and fleets


def stop(proc: subprocess.Popen | None, marker: str) -> None:
    """Kill a supervisor we started and every process under it, by pid. SIGSTOP first, so
    it cannot fork (or restart) anything between the snapshot of its descendants and the
    kill; supervisord puts each program in its own process group, so killpg alone would
    leave them behind. `marker` (a path in the fleet's own temp dir) finds workers that
    were orphaned before (the supervisor died early)."""
    if proc is None:
        return
    descendants: list[psutil.Process] = []
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGSTOP)
        with contextlib.suppress(psutil.Error):
            descendants = psutil.Process(proc.pid).children(recursive=True)
    kill(proc)  # its process group, then the process itself; reaped
    for p in psutil.process_iter(["cmdline"]):
        if p.pid not in {d.pid for d in descendants} and marker in " ".join(
                p.info["cmdline"] or ()):
            descendants.append(p)
    for p in descendants:
        with contextlib.suppress(psutil.Error):
            p.kill()  # psutil checks the create time: never a recycled pid
    try:
        wait_for(lambda: all(map(_dead, descendants)), 10, message="its processes gone")
    except TimeoutError as e:
        log(f"clean-up: {e}: {[p.pid for p in descendants if not _dead(p)]}")


def _dead(p: psutil.Process) -> bool:
    """Gone, or a zombie (dead; init reaps the orphans, we do not wait for that)."""
    try:
        return p.status() == psutil.STATUS_ZOMBIE
    except psutil.Error:
        return True


@dataclass
class Fleet:
    """A running supervisor (gearvisor or supervisord) over `n` workers, in its temp dir."""

    kind: str
    proc: subprocess.Popen
    config: Path
    dir: Path
    n: int
    results: Path
    started: float  # monotonic time of the launch

    def alive(self) -> bool:
        return self.proc.poll() is None

    def workers(self) -> list[psutil.Process]:
        """The worker processes (not gearvisor's helpers: file watcher, notifier, store)."""
        try:
            kids = psutil.Process(self.proc.pid).children()
        except psutil.Error:
            return []
        out = []
        for p in kids:
            try:
                if p.status() == psutil.STATUS_ZOMBIE:
                    continue
                if p.cmdline()[:1] in (["gearvisor: watcher"], ["gearvisor: notifier"],
                                       ["gearvisor: store"], ["gearvisor: resolver"]):
                    continue
            except psutil.Error:
                continue
            out.append(p)
        return out

    def log_tail(self) -> str:
        parts = []
        for name in ("master.log", "x_00.log"):  # supervisord -n logs to stdout as well
            path = self.dir / name
            if path.exists():
                parts.append(f"--- {name}\n" + path.read_text(errors="replace")[-3000:])
        return "\n".join(parts)


def _write_sources(d: Path) -> None:
    (d / "benchwork.py").write_text(GEARVISOR_MODULE)
    (d / "pgworker.py").write_text(PYGEARMAN_WORKER)


def _env(g: Gearmand, results: Path, job_seconds: float) -> dict[str, str]:
    return {"BENCH_SERVER": g.address, "BENCH_RESULTS": str(results),
            "BENCH_JOB_SECONDS": repr(job_seconds)}


def gearvisor_config(d: Path, g: Gearmand, n: int, results: Path, job_seconds: float,
                     **pool: object) -> Path:
    cfg = {
        "servers": [g.address],
        "pythonpath": [str(d)],
        "watch_config": False,
        "log_level": "warning",
        "control_socket": str(d / "gearvisor.sock"),
        "state_dir": str(d / "state"),
        "pools": {"bench": {"processes": n, "functions": {FUNCTION: "benchwork:work"},
                            "watch": False, "env": _env(g, results, job_seconds), **pool}},
    }
    path = d / "pools.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def supervisord_config(d: Path, g: Gearmand, n: int, results: Path,
                       job_seconds: float) -> Path:
    env = ",".join(f'{k}="{v}"' for k, v in _env(g, results, job_seconds).items())
    text = f"""\
[supervisord]
nodaemon=true
logfile={d}/supervisord.log
pidfile={d}/supervisord.pid
childlogdir={d}
loglevel=warn

[unix_http_server]
file={d}/supervisor.sock

[rpcinterface:supervisor]
supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface

[supervisorctl]
serverurl=unix://{d}/supervisor.sock

[program:x]
command={PYTHON} {d}/pgworker.py
process_name=%(program_name)s_%(process_num)02d
numprocs={n}
directory={d}
environment={env}
autostart=true
autorestart=true
startsecs=1
startretries=3
stopsignal=TERM
stopwaitsecs=10
redirect_stderr=true
stdout_logfile={d}/%(program_name)s_%(process_num)02d.log
"""
    path = d / "supervisord.conf"
    path.write_text(text)
    return path


@contextlib.contextmanager
def fleet(kind: str, g: Gearmand, n: int, job_seconds: float = 0.0,
          **pool: object) -> Iterator[Fleet]:
    """Launch gearvisor or supervisord over n workers in a fresh temp dir; the caller times
    the registration (fleet.started is the launch time). Kills all and removes the dir."""
    d = Path(tempfile.mkdtemp(prefix=f"gvbench-{kind}-"))
    proc = None
    logf = None
    try:
        _write_sources(d)
        results = d / "results.txt"
        if kind == "gearvisor":
            config = gearvisor_config(d, g, n, results, job_seconds, **pool)
            args = [*GEARVISOR, "-c", str(config)]
        else:
            config = supervisord_config(d, g, n, results, job_seconds)
            args = [*SUPERVISORD, "-n", "-c", str(config)]
        logf = open(d / "master.log", "wb")
        started = time.monotonic()
        proc = spawn(args, stdout=logf, stderr=subprocess.STDOUT, cwd=str(d))
        f = Fleet(kind, proc, config, d, n, results, started)
        try:
            yield f
        except BaseException:
            log(f"{kind} fleet failed; its logs:\n{f.log_tail()}")
            raise
    finally:
        stop(proc, marker=str(d / "pgworker.py"))
        if logf is not None:
            logf.close()
        shutil.rmtree(d, ignore_errors=True)


def wait_registered(f: Fleet, g: Gearmand, n: int, timeout: float) -> float:
    """Poll gearmand until n connections can run the function; the time since launch."""
    def full() -> bool:
        if not f.alive():
            raise RuntimeError(f"{f.kind} exited with {f.proc.returncode}")
        return registered(g) >= n
    wait_for(full, timeout, interval=0.005, message=f"{n} {f.kind} workers registered")
    return time.monotonic() - f.started


# ------------------------------------------------------------------------- 2. start-up


def bench_startup(n: int, runs: int) -> dict[str, float]:
    """Median seconds from launch to n workers registered in gearmand, per competitor."""
    times: dict[str, list[float]] = {"gearvisor": [], "supervisord": []}
    for _ in range(runs):
        for kind in times:
            with Gearmand(threads=1) as g, fleet(kind, g, n) as f:
                times[kind].append(wait_registered(f, g, n, timeout=60 + n))
    log(f"startup N={n}: " + ", ".join(f"{k} {[round(t, 3) for t in v]}"
                                         for k, v in times.items()))
    return {k: statistics.median(v) for k, v in times.items()}


# ----------------------------------------------------------------- 3. rolling reload


class Sampler(threading.Thread):
    """Polls gearmand's `workers` until stopped (bounded in time); keeps (time, count)."""

    def __init__(self, g: Gearmand, max_seconds: float) -> None:
        super().__init__(daemon=True)
        self.g = g
        self.max_seconds = max_seconds
        self.samples: list[tuple[float, int]] = []
        self.errors = 0
        self.halt = threading.Event()

    def run(self) -> None:
        deadline = time.monotonic() + self.max_seconds
        while not self.halt.is_set() and time.monotonic() < deadline:
            try:
                n = registered(self.g)
            except (admin.AdminError, OSError):
                self.errors += 1
            else:
                self.samples.append((time.monotonic(), n))
            self.halt.wait(0.002)  # sampling interval

    def lowest(self, t0: float, t1: float) -> int:
        """The lowest count seen from t0 to t1, counting the samples just before and just
        after the window too (what gearmand listed when it opened and closed)."""
        before = [s for s in self.samples if s[0] < t0][-1:]
        after = [s for s in self.samples if s[0] > t1][:1]
        window = before + [s for s in self.samples if t0 <= s[0] <= t1] + after
        if not window:
            raise RuntimeError(f"no sample of gearmand's workers ({self.errors} errors)")
        return min(n for _, n in window)

    def stop(self) -> None:
        self.halt.set()
        self.join(10)


class Load(threading.Thread):
    """Background jobs with unique ids at a steady pace, until stopped or a bound is hit."""

    def __init__(self, g: Gearmand, tag: str, max_jobs: int, max_seconds: float,
                 pace: float) -> None:
        super().__init__(daemon=True)
        self.g = g
        self.tag = tag
        self.max_jobs = max_jobs
        self.max_seconds = max_seconds
        self.pace = pace
        self.submitted: list[str] = []
        self.error: BaseException | None = None
        self.halt = threading.Event()

    def run(self) -> None:
        deadline = time.monotonic() + self.max_seconds
        try:
            with Client("127.0.0.1", self.g.port, timeout=30) as c:
                for i in range(self.max_jobs):
                    if self.halt.is_set() or time.monotonic() >= deadline:
                        break
                    unique = f"{self.tag}-{i}"
                    c.submit_background(FUNCTION, b"x", unique)
                    self.submitted.append(unique)
                    self.halt.wait(self.pace)  # pacing of the steady load
        except BaseException as e:  # reported by the caller
            self.error = e

    def stop(self) -> None:
        self.halt.set()
        self.join(30)


def _results(path: Path) -> collections.Counter:
    if not path.exists():
        return collections.Counter()
    return collections.Counter(path.read_text().split())


def bench_reload(f: Fleet, g: Gearmand, max_jobs: int, max_seconds: float,
                 pace: float) -> dict[str, float]:
    """Roll all of f's workers (`gearvisor reload`, `supervisorctl restart x:*`) under a
    steady background load; wall time, lowest registered count, jobs lost or run twice."""
    kind, n = f.kind, f.n
    if kind == "gearvisor":
        command = [*GEARVISOR, "reload", "-c", str(f.config)]
    else:
        command = [*SUPERVISORCTL, "-c", str(f.config), "restart", "x:*"]
    sampler = Sampler(g, max_seconds + 60)
    load = Load(g, f"{kind}-{os.getpid()}", max_jobs, max_seconds, pace)
    sampler.start()
    load.start()
    try:
        # The load is steady: WARMUP_JOBS went all the way through the workers.
        wait_for(lambda: sum(_results(f.results).values()) >= WARMUP_JOBS, 30,
                 message="jobs flowing before the roll")
        t0 = time.monotonic()
        out = subprocess.run(command, capture_output=True, text=True, timeout=180,
                             cwd=str(f.dir))
        t1 = time.monotonic()
        if out.returncode != 0 or "ERROR" in out.stdout:
            raise RuntimeError(f"{' '.join(command[-3:])}: exit {out.returncode}: "
                               f"{out.stdout}{out.stderr}")
        wait_registered(f, g, n, timeout=60)  # back at full capacity (at once for a surge)
        t2 = time.monotonic()
        if not load.is_alive():
            log(f"reload {kind}: the load hit its bound before the roll ended")
    finally:
        load.stop()
        sampler.stop()
    if load.error is not None:
        raise RuntimeError(f"load client failed: {load.error!r}")
    # Drain: gearmand's queue (running jobs included) empties, every job has run.
    wait_for(lambda: g.queued(FUNCTION) == 0, 60, message="queue drained")
    seen = _results(f.results)
    submitted = set(load.submitted)
    missing = len(submitted - set(seen))
    twice = sum(1 for u, c in seen.items() if c > 1)
    low = sampler.lowest(t0, t2)
    log(f"reload {kind}: {len(submitted)} jobs submitted, {missing} missing, {twice} twice;"
        f" command {t1 - t0:.3f}s, full again {t2 - t0:.3f}s, lowest {low} "
        f"({len(sampler.samples)} samples, {sampler.errors} errors)")
    return {"wall": t1 - t0, "full": t2 - t0, "low": float(low),
            "lost": float(missing + twice), "missing": missing, "twice": twice,
            "jobs": len(submitted)}


# ---------------------------------------------------------------- 4. master overhead


def _cpu(p: psutil.Process) -> float:
    t = p.cpu_times()
    return t.user + t.system


def bench_overhead(n: int, window: float,
                   kinds: tuple[str, ...]) -> dict[str, dict[str, float]]:
    """The supervisors (gearvisor's master, supervisord) side by side over one idle window:
    their CPU% and RSS, their workers' median USS and total CPU%."""
    out: dict[str, dict[str, float]] = {}
    with contextlib.ExitStack() as stack:
        fleets = {}
        for kind in kinds:
            g = stack.enter_context(Gearmand(threads=1))
            fleets[kind] = (stack.enter_context(fleet(kind, g, n)), g)
        for f, g in fleets.values():
            wait_registered(f, g, n, timeout=60 + n)
        procs = {k: psutil.Process(f.proc.pid) for k, (f, _) in fleets.items()}
        workers = {k: f.workers() for k, (f, _) in fleets.items()}
        cpu0 = {k: _cpu(p) for k, p in procs.items()}
        wcpu0 = {k: sum(_cpu(w) for w in ws) for k, ws in workers.items()}
        t0 = time.monotonic()
        end = t0 + window
        while (now := time.monotonic()) < end:  # the measurement window itself
            for f, _ in fleets.values():
                if not f.alive():
                    raise RuntimeError(f"{f.kind} exited during the overhead window")
            time.sleep(min(0.5, end - now))
        wall = time.monotonic() - t0
        for kind, p in procs.items():
            ws = workers[kind]
            uss = [w.memory_full_info().uss for w in ws]
            out[kind] = {
                "cpu": (_cpu(p) - cpu0[kind]) / wall * 100,
                "rss": p.memory_info().rss / MB,
                "uss": statistics.median(uss) / MB,
                "workers_cpu": (sum(_cpu(w) for w in ws) - wcpu0[kind]) / wall * 100,
                "count": len(ws),
            }
            log(f"overhead {kind}: {out[kind]}")
    return out


# ----------------------------------------------------------------- 5. crash recovery


def _kill_one(f: Fleet, g: Gearmand, n: int) -> float | None:
    """SIGKILL the oldest worker; the seconds until gearmand lists n registered again, after
    it was seen to drop the dead one. A replacement registers under the same client id and
    often on the same fd, so the dip is what tells the new registration from the old. If the
    poller missed the dip (descheduled for the few ms it lasts), the sample is not taken:
    None, once the fleet is whole again."""
    def whole() -> dict[int, psutil.Process] | None:
        ws = f.workers()
        return {w.pid: w for w in ws} if len(ws) == n else None

    before = wait_for(whole, 10, message=f"{n} worker processes")
    victim = min(before.values(), key=lambda p: p.create_time())  # the oldest: every slot
    dipped = []  # in turn, and no supervisord start (startsecs) is cut short

    def replaced() -> bool:
        pids = {w.pid for w in f.workers()}
        return victim.pid not in pids and bool(pids - set(before))

    def back() -> str | None:
        c = registered(g)
        if c < n:
            dipped.append(c)
        if c >= n and dipped:
            return "back"
        if c >= n and time.monotonic() - t0 > 2.0 and replaced():
            return "dip missed"
        return None

    t0 = time.monotonic()
    victim.kill()
    got = wait_for(back, 30, interval=0.001, message="the replacement registered")
    took = time.monotonic() - t0
    wait_for(replaced, 10, message="a new worker pid")
    if got != "back":
        log(f"recovery {f.kind}: the dip after killing {victim.pid} was not seen; not counted")
        return None
    return took


def bench_recovery(f: Fleet, g: Gearmand, kills: int) -> list[float]:
    """`kills` samples of _kill_one (a few more attempts allowed for missed dips)."""
    times: list[float] = []
    for _ in range(kills + 5):
        if len(times) == kills:
            break
        took = _kill_one(f, g, f.n)
        if took is not None:
            times.append(took)
    if not times:
        raise RuntimeError(f"recovery {f.kind}: no kill could be timed")
    log(f"recovery {f.kind}: " + ", ".join(f"{t * 1000:.1f}" for t in times) + " ms")
    return times


def bench_roll_and_crash(kind: str, plan: Plan) -> tuple[dict[str, float], list[float]]:
    """One fleet per competitor for parts 3 and 5: the rolling reload, then the kills (on
    the rolled fleet; gearvisor with `backoff: {initial: 0}`, which a roll does not use)."""
    pool = {"backoff": {"initial": 0}} if kind == "gearvisor" else {}
    n = plan.reload_n
    with Gearmand(threads=1) as g, fleet(kind, g, n, plan.job_seconds, **pool) as f:
        wait_registered(f, g, n, timeout=60 + n)
        rolled = bench_reload(f, g, plan.reload_jobs, plan.reload_seconds, plan.reload_pace)
        kills = plan.kills if kind == "gearvisor" else plan.supervisord_kills
        return rolled, bench_recovery(f, g, kills) if kills else []


# ---------------------------------------------------------------------------- measure


@dataclass
class Plan:
    startup_ns: tuple[int, ...]
    startup_runs: int
    reload_n: int
    reload_jobs: int
    reload_seconds: float
    reload_pace: float
    job_seconds: float
    overhead_n: int
    overhead_window: float
    overhead_kinds: tuple[str, ...]  # supervisord beside gearvisor: for comparison only
    kills: int
    supervisord_kills: int


# Reload load: a job takes job_seconds (so a roll meets jobs in flight: about 10 of the 20
# workers are busy in the full run), one is submitted every reload_pace seconds.
FULL = Plan(startup_ns=(10, 100), startup_runs=3, reload_n=20, reload_jobs=6000,
            reload_seconds=60, reload_pace=0.005, job_seconds=0.05, overhead_n=100,
            overhead_window=60.0, overhead_kinds=("gearvisor", "supervisord"), kills=20,
            supervisord_kills=20)
TINY = Plan(startup_ns=(10,), startup_runs=1, reload_n=5, reload_jobs=600,
            reload_seconds=15, reload_pace=0.01, job_seconds=0.02, overhead_n=10,
            overhead_window=2.0, overhead_kinds=("gearvisor",), kills=3, supervisord_kills=1)


def measure(tiny: bool) -> tuple[list[Row], list[Target]]:
    plan = TINY if tiny else FULL
    rows: list[Row] = []
    targets: list[Target] = []
    t_start = time.monotonic()

    def step(what: str) -> None:
        log(f"{what} ({time.monotonic() - t_start:.1f}s)")

    # 2. Start-up
    for n in plan.startup_ns:
        step(f"startup N={n}")
        med = bench_startup(n, plan.startup_runs)
        case = f"{n} workers registered"
        for kind, t in med.items():
            rows.append(Row("startup", case, kind, round(t, 3), "s", "lower"))
        ratio = med["supervisord"] / med["gearvisor"]
        targets.append(Target(f"start-up, {n} workers: supervisord time / gearvisor time",
                              round(ratio, 2), "> 1.0x", ratio > 1.0))

    # 3. Rolling reload under load, then 5. crash recovery on the same fleet
    n = plan.reload_n
    res = {}
    crashes = {}
    for kind in ("gearvisor", "supervisord"):
        step(f"reload and recovery, {kind}, N={n}")
        r, crashes[kind] = bench_roll_and_crash(kind, plan)
        res[kind] = r
        rows += [
            Row("reload", f"{n} workers: command wall time", kind, round(r["wall"], 3), "s",
                "lower"),
            Row("reload", f"{n} workers: until {n} registered again", kind,
                round(r["full"], 3), "s", "lower"),
            Row("reload", f"{n} workers: lowest registered during the roll", kind, r["low"],
                "workers", "higher"),
            Row("reload", f"{n} workers: jobs lost or run twice", kind, r["lost"], "jobs",
                "lower"),
        ]
    gv = res["gearvisor"]
    targets.append(Target(f"reload {n} under load: gearvisor jobs lost or run twice",
                          gv["lost"], "== 0", gv["lost"] == 0))
    targets.append(Target(f"reload {n} under load: gearvisor lowest registered",
                          gv["low"], f">= {n}", gv["low"] >= n))

    # 4. Master overhead
    step(f"overhead N={plan.overhead_n} over {plan.overhead_window:g}s")
    ov = bench_overhead(plan.overhead_n, plan.overhead_window, plan.overhead_kinds)
    case = f"{plan.overhead_n} idle workers, {plan.overhead_window:g}s"
    for kind, o in ov.items():
        rows += [
            Row("overhead", f"{case}: supervisor CPU", kind, round(o["cpu"], 3), "%", "lower"),
            Row("overhead", f"{case}: supervisor RSS", kind, round(o["rss"], 1), "MB", "lower"),
            Row("overhead", f"{case}: median worker USS", kind, round(o["uss"], 2), "MB",
                "lower"),
            Row("overhead", f"{case}: all workers CPU", kind, round(o["workers_cpu"], 3), "%",
                "lower"),
        ]
    gv = ov["gearvisor"]
    targets.append(Target("master CPU with idle children (% of a core)", round(gv["cpu"], 3),
                          "< 1%", gv["cpu"] < 1.0))
    targets.append(Target("master RSS with idle children (MB)", round(gv["rss"], 1),
                          "< 60 MB", gv["rss"] < 60.0))

    # 5. Crash recovery (measured above)
    for kind, times in crashes.items():
        if times:
            rows.append(Row("recovery", f"SIGKILL 1 of {n} workers: median of {len(times)}, "
                            "until registered again", kind,
                            round(statistics.median(times) * 1000, 1), "ms", "lower"))
    step("done")
    return rows, targets


def render(rows: list[Row], targets: list[Target]) -> str:
    lines = ["| section | case | competitor | value | unit | better |",
             "| --- | --- | --- | ---: | --- | --- |"]
    lines += [f"| {r.section} | {r.case} | {r.competitor} | {r.value:g} | {r.unit} | "
              f"{r.better} |" for r in rows]
    lines += ["", "| target | value | goal | met |", "| --- | ---: | --- | --- |"]
    lines += [f"| {t.name} | {t.value:g} | {t.goal} | {'yes' if t.ok else 'NO'} |"
              for t in targets]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="seconds, not minutes (tests)")
    args = parser.parse_args(argv)
    rows, targets = measure(args.tiny)
    print(render(rows, targets))
    return 0


if __name__ == "__main__":
    sys.exit(main())
