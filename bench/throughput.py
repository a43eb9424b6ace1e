"""Throughput (issue 7, part 1): trivial echo jobs through gearmand on loopback, drained and
round-tripped by gearvisor children, pygearman workers and libgearman (PHP) workers.

    .venv/bin/python bench/throughput.py            # the full run (a few minutes on 2 cores)
    .venv/bin/python bench/throughput.py --tiny     # seconds: what the test suite runs

For each gearmand thread setting (`-t 1` and gearmand's default), each worker count (1, 2, 4)
and each competitor, on a fresh gearmand:

- drain: N_JOBS background echo jobs are queued first (pipelined, outside the timing), then the
  workers start; the clock runs from the first `status` that shows a worker registered (or the
  queue shrinking) until `status` shows the queue empty. Rate = jobs queued at that first
  sighting / elapsed.
- round trip: once every worker is registered, one client keeps k foreground jobs in flight
  (k = 1 and 8) for a fixed number of jobs. Rate = jobs / elapsed.

The full run repeats each measurement 3 times, interleaving the competitors, and reports the
median: a single 20,000-job drain lasts about a second and swings by tens of percent on a
busy machine.

Every worker here is a separate OS process; all of them, the client and gearmand share the
machine's cores, so the rates are only comparable within one run: quote the ratios.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from subprocess import Popen
from typing import IO

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    HOST,
    PYTHON,
    REPO,
    Gearmand,
    Row,
    Target,
    free_port,
    kill,
    spawn,
)

from gearvisor.gearman.client import Client  # noqa: E402

SECTION = "throughput"
FUNCTION = "echo"
PAYLOAD = b"x" * 8
SUBMIT_BATCH = 1000  # background submits written per send(); then their JOB_CREATEDs are read
POLL_START = 0.002  # status polling while waiting for the first worker (sets the clock start)
POLL_DRAIN = 0.005  # status polling while the queue drains (sets the clock's resolution)

ECHO_MODULE = '''\
def echo(job):
    return job.data
'''

PYGEARMAN_WORKER = '''\
import sys

import gearman


def echo(worker, job):
    return job.data


worker = gearman.GearmanWorker([sys.argv[1]])
worker.register_task(b"echo", echo)  # pygearman matches task names as bytes
worker.work()
'''

PHP_WORKER = '''\
<?php
$worker = new GearmanWorker();
$worker->addServer($argv[1], (int)$argv[2]);
$worker->addFunction("echo", function (GearmanJob $job) { return $job->workload(); });
while ($worker->work()) {
}
fwrite(STDERR, "gearman error: " . $worker->error() . "\\n");
exit(1);
'''

GEARVISOR_CONFIG = '''\
{top}servers: ["{address}"]
pythonpath: ["{dir}"]
control_socket: "{dir}/gearvisor.sock"
state_dir: "{dir}/state"
watch_config: false
watch: false
log_level: warning
pools:
  bench:
    processes: {n}
    functions:
      echo: "benchecho:echo"
{extra}'''


@dataclass(frozen=True)
class Plan:
    """How much to measure: the full run, or the tiny one the test suite runs."""

    jobs: int  # background jobs drained
    round_trips: int  # foreground jobs per round-trip measurement
    workers: tuple[int, ...]
    threads: tuple[int | None, ...]
    deadline: float  # seconds any one measurement (or start-up) may take
    repeats: int  # runs of each measurement, interleaved across competitors; rows = medians


FULL = Plan(jobs=20_000, round_trips=3000, workers=(1, 2, 4), threads=(1, None), deadline=120.0,
            repeats=3)
TINY = Plan(jobs=500, round_trips=200, workers=(1,), threads=(1,), deadline=20.0, repeats=1)
IN_FLIGHT = (1, 8)


class StatusPoller:
    """`status` for one function over one persistent admin connection: a poll is one small
    round trip, not a connect, so polling every few ms costs gearmand and us little."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection((HOST, port), timeout=5.0)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def close(self) -> None:
        self.sock.close()

    def poll(self, function: str = FUNCTION) -> tuple[int, int]:
        """(jobs queued including running ones, capable workers) for `function`."""
        self.sock.sendall(b"status\r\n")
        buf = b""
        while not (buf == b".\n" or buf.endswith(b"\n.\n")):
            chunk = self.sock.recv(65536)
            if not chunk:
                raise OSError("gearmand closed the admin connection")
            buf += chunk
        for line in buf.decode().split("\n"):
            parts = line.split("\t")
            if len(parts) == 4 and parts[0] == function:
                return int(parts[1]), int(parts[3])
        return 0, 0


def poll_until(cond: Callable[[], object], deadline: float, interval: float,
               what: str) -> object:
    """Poll `cond` until it returns something truthy; raise TimeoutError at `deadline`
    (a time.monotonic() value)."""
    while True:
        got = cond()
        if got:
            return got
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(interval)  # polling interval, not synchronisation


def submit_background(port: int, n: int, deadline: float) -> float:
    """Queue `n` background echo jobs (each with its own unique id), pipelined in batches on
    one connection. Returns the seconds it took."""
    started = time.monotonic()
    token = uuid.uuid4().hex[:12]
    with Client(HOST, port, timeout=10.0) as client:
        client.submit_background_many(FUNCTION, [f"{token}-{i}" for i in range(n)], PAYLOAD,
                                      batch=SUBMIT_BATCH, deadline=deadline)
    return time.monotonic() - started


def round_trips(port: int, in_flight: int, jobs: int, deadline: float) -> float:
    """Keep `in_flight` foreground echo jobs outstanding on one Client until `jobs` have come
    back; returns jobs/s."""
    with Client(HOST, port, timeout=10.0) as client:
        window: list[str] = []
        sent = done = 0
        started = time.monotonic()
        while done < jobs:
            while sent < jobs and len(window) < in_flight:
                window.append(client.submit(FUNCTION, PAYLOAD))
                sent += 1
            client.wait([window[0]])  # the oldest; any others that came back too are counted
            still = []
            for handle in window:
                result = client.results[handle]
                if not result.done:
                    still.append(handle)
                    continue
                if not result.ok or result.data != PAYLOAD:
                    raise RuntimeError(f"echo job {handle} came back wrong: {result!r}")
                del client.results[handle]
                done += 1
            window = still
            if time.monotonic() >= deadline:
                raise TimeoutError(f"round trips, {in_flight} in flight: {done}/{jobs} done")
        return jobs / (time.monotonic() - started)


class Competitor:
    """Starts N workers of one kind against a gearmand; stop() kills all it started."""

    name = ""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.procs: list[Popen] = []
        self.logs: list[IO[bytes]] = []

    def start(self, gm: Gearmand, n: int) -> None:
        raise NotImplementedError

    def _spawn(self, args: list[str], **kw: object) -> None:
        log = open(self.workdir / f"{self.name}-{len(self.procs)}.log", "wb")  # noqa: SIM115
        self.logs.append(log)
        self.procs.append(spawn(args, stderr=log, **kw))

    def stop(self) -> None:
        for proc in self.procs:
            kill(proc)
        for log in self.logs:
            log.close()
        self.procs, self.logs = [], []

    def diagnose(self) -> str:
        """Exit codes and the tail of stderr of what we started, for an error message."""
        out = []
        for i, proc in enumerate(self.procs):
            path = self.workdir / f"{self.name}-{i}.log"
            tail = path.read_text(errors="replace")[-800:] if path.exists() else ""
            out.append(f"{self.name}[{i}] pid {proc.pid} exit {proc.poll()}: {tail.strip()}")
        return "\n".join(out)


class GearvisorMaster(Competitor):
    """One real gearvisor master with one pool of N children, default settings."""

    name = "gearvisor"
    extra = ""  # more pool settings (YAML lines, indented 4)

    def top(self) -> str:
        """More top-level settings (YAML lines)."""
        return ""

    def start(self, gm: Gearmand, n: int) -> None:
        config = self.workdir / "pools.yaml"
        config.write_text(GEARVISOR_CONFIG.format(address=gm.address, dir=self.workdir, n=n,
                                                  extra=self.extra, top=self.top()))
        self._spawn([PYTHON, "-m", "gearvisor", "-c", str(config)], cwd=str(REPO))


class GearvisorPrefetch(GearvisorMaster):
    """The same with the opt-in `prefetch: 8` (README: Prefetch), for floods of short jobs."""

    name = "gearvisor prefetch 8"
    extra = "    prefetch: 8\n"


class GearvisorMetrics(GearvisorMaster):
    """The same with metrics on (README: Metrics): every job is counted in the child's
    shared memory, and the endpoint is served (not scraped during the run)."""

    name = "gearvisor metrics on"

    def top(self) -> str:
        return f'metrics: {{listen: "{HOST}:{free_port()}"}}\n'


class GearvisorJournalOff(GearvisorMaster):
    """The default master with the job journal off (`journal: {enabled: false}`): what the
    journal costs a successful job is the default (journal on, `successes: false`)
    against this."""

    name = "gearvisor journal off"

    def top(self) -> str:
        return "journal: {enabled: false}\n"


class PygearmanWorkers(Competitor):
    """N python processes, each one pygearman GearmanWorker."""

    name = "pygearman"

    def start(self, gm: Gearmand, n: int) -> None:
        for _ in range(n):
            self._spawn([PYTHON, str(self.workdir / "pygearman_worker.py"), gm.address])


class LibgearmanWorkers(Competitor):
    """N php processes, each one GearmanWorker (php-gearman, on libgearman)."""

    name = "libgearman"

    def start(self, gm: Gearmand, n: int) -> None:
        for _ in range(n):
            self._spawn(["php", str(self.workdir / "worker.php"), HOST, str(gm.port)])


COMPETITORS: tuple[type[Competitor], ...] = (GearvisorMaster, GearvisorPrefetch,
                                             GearvisorMetrics, PygearmanWorkers,
                                             LibgearmanWorkers)


def write_workers(workdir: Path) -> None:
    (workdir / "benchecho.py").write_text(ECHO_MODULE)
    (workdir / "pygearman_worker.py").write_text(PYGEARMAN_WORKER)
    (workdir / "worker.php").write_text(PHP_WORKER)


@dataclass
class Run:
    """What one competitor did with N workers on one gearmand."""

    drain: float  # jobs/s
    round_trips: dict[int, float]  # in flight -> jobs/s
    submit_seconds: float  # queueing the background jobs (not timed)
    all_registered_after: float  # seconds from the first worker seen to the N-th


def measure_one(competitor: Competitor, threads: int | None, n: int, plan: Plan) -> Run:
    """Fresh gearmand: queue, start the workers, time the drain, then the round trips."""
    with Gearmand(threads=threads) as gm:
        submit_seconds = submit_background(gm.port, plan.jobs, time.monotonic() + plan.deadline)
        poller = StatusPoller(gm.port)
        try:
            queued, _ = poller.poll()
            if queued != plan.jobs:
                raise RuntimeError(f"gearmand queued {queued} of {plan.jobs} jobs")
            competitor.start(gm, n)
            deadline = time.monotonic() + plan.deadline
            try:
                def first_worker() -> tuple[float, int, int] | None:
                    q, capable = poller.poll()
                    return (time.monotonic(), q, capable) if capable or q < plan.jobs else None

                t0, q0, capable = poll_until(first_worker, deadline, POLL_START,
                                             "the first worker to register")
                all_at = t0 if capable >= n else None
                deadline = time.monotonic() + plan.deadline

                def drained() -> float | None:
                    nonlocal all_at
                    q, capable = poller.poll()
                    now = time.monotonic()
                    if all_at is None and capable >= n:
                        all_at = now
                    return now if q == 0 else None

                t1 = poll_until(drained, deadline, POLL_DRAIN, "the queue to drain")
                poll_until(lambda: poller.poll()[1] >= n, time.monotonic() + plan.deadline,
                           0.01, f"{n} workers registered")
                if all_at is None:
                    all_at = time.monotonic()
                rates = {k: round_trips(gm.port, k, plan.round_trips,
                                        time.monotonic() + plan.deadline) for k in IN_FLIGHT}
            except (TimeoutError, OSError, RuntimeError) as e:
                raise RuntimeError(f"{competitor.name}, {n} workers, -t "
                                   f"{threads or 'default'}: {e}\n{competitor.diagnose()}") from e
            finally:
                competitor.stop()
        finally:
            poller.close()
        return Run(q0 / (t1 - t0), rates, submit_seconds, all_at - t0)


def interleaved(kinds: tuple[type[Competitor], ...], repeats: int) -> Iterator[type[Competitor]]:
    """Each kind `repeats` times, interleaved and rotated (kinds[1:] + kinds[:1] the second
    time round...), so a noisy moment does not hit one competitor."""
    for rep in range(repeats):
        for i in range(len(kinds)):
            yield kinds[(rep + i) % len(kinds)]


def child_cpu_per_job(competitor: GearvisorMaster, plan: Plan) -> float:
    """CPU microseconds one gearvisor child spends per echo job (user + system, from the
    kernel's accounting of that process): registered first, then `plan.jobs` jobs queued
    and drained. CPU time, unlike a drain rate, hardly moves when the machine is busy with
    other work, so it shows what counting a job costs the child."""
    import psutil

    with Gearmand(threads=1) as gm:
        poller = StatusPoller(gm.port)
        try:
            competitor.start(gm, 1)
            deadline = time.monotonic() + plan.deadline
            poll_until(lambda: poller.poll()[1] >= 1, deadline, 0.01, "the child registered")
            master = psutil.Process(competitor.procs[0].pid)
            child = next(p for p in master.children() if "bench[0]" in " ".join(p.cmdline()))
            before = sum(child.cpu_times()[:2])
            # CPU time is counted in clock ticks (10 ms): enough jobs for a few hundred
            jobs = max(plan.jobs, 5000)
            submit_background(gm.port, jobs, deadline)
            poll_until(lambda: poller.poll()[0] == 0, deadline, POLL_DRAIN, "the drain")
            return (sum(child.cpu_times()[:2]) - before) / jobs * 1e6
        except (TimeoutError, OSError, RuntimeError, StopIteration, psutil.Error) as e:
            raise RuntimeError(f"{competitor.name}, CPU per job: {e}\n"
                               f"{competitor.diagnose()}") from e
        finally:
            competitor.stop()
            poller.close()


def metrics_cost(plan: Plan, workdir: Path) -> tuple[list[Row], list[Target]]:
    """Child CPU per job with metrics off and on, interleaved (medians), and the target:
    metrics cost the child at most 5% more per job."""
    kinds = (GearvisorMaster, GearvisorMetrics)
    got: dict[str, list[float]] = {k.name: [] for k in kinds}
    for kind in interleaved(kinds, plan.repeats * 2 - 1):  # the full run: 5 of each
        cpu = child_cpu_per_job(kind(workdir), plan)
        got[kind.name].append(cpu)
        print(f"  {kind.name}, CPU per job: {cpu:.1f} us", file=sys.stderr, flush=True)
    rows = [Row(SECTION, f"child CPU per job, drain {max(plan.jobs, 5000)}, 1 worker, -t 1",
                name,
                statistics.median(values), "us/job", better="lower")
            for name, values in got.items()]
    off, on = (max(1e-3, statistics.median(got[k.name])) for k in kinds)  # (never 0)
    # The counting itself, timed alone (best of 5): what metrics add to each job for sure,
    # as a share of a job's whole cost in the child. The drains above are too noisy on a
    # shared machine to resolve a few percent; this is not.
    counting = count_cost_us(100_000 if plan is TINY else 1_000_000)
    rows.append(Row(SECTION, "counting one job (shm.stats.JobStats.job_done)",
                    "gearvisor metrics on", counting * 1000, "ns/job", better="lower"))
    return rows, [Target("child CPU per job, 1 worker: metrics off / on", off / on,
                         ">= 0.95x", off / on >= 0.95),
                  Target("counting a job, as a share of the child's CPU per job (metrics "
                         "off)", counting / off, "<= 0.05", counting / off <= 0.05)]


def journal_cost(plan: Plan, workdir: Path) -> tuple[list[Row], list[Target]]:
    """Child CPU per job with the journal off and on (the default), interleaved (medians),
    and the issue's target: the journal costs a successful job at most 5%. Also what
    recording a success costs alone (the child's batch, its encoding and the pipe write,
    amortized), and the shared-memory payload copy a crash record reads."""
    kinds = (GearvisorJournalOff, GearvisorMaster)
    got: dict[str, list[float]] = {k.name: [] for k in kinds}
    for kind in interleaved(kinds, plan.repeats * 2 - 1):
        cpu = child_cpu_per_job(kind(workdir), plan)
        got[kind.name].append(cpu)
        print(f"  {kind.name}, CPU per job: {cpu:.1f} us", file=sys.stderr, flush=True)
    case = f"child CPU per job, drain {max(plan.jobs, 5000)}, 1 worker, -t 1 (journal)"
    rows = [Row(SECTION, case, "gearvisor journal on" if name == "gearvisor" else name,
                statistics.median(values), "us/job", better="lower")
            for name, values in got.items()]
    off, on = (max(1e-3, statistics.median(got[k.name])) for k in kinds)
    n = 20_000 if plan is TINY else 200_000
    recording = journal_record_cost_us(n)
    copying = payload_copy_cost_us(n)
    rows.append(Row(SECTION, "recording one success (child.journal, batched, written)",
                    "gearvisor journal on", recording * 1000, "ns/job", better="lower"))
    rows.append(Row(SECTION, "payload copy for a crash record (shm.payload, 100 B)",
                    "gearvisor journal on", copying * 1000, "ns/job", better="lower"))
    return rows, [Target("child CPU per job, 1 worker: journal off / on", off / on,
                         ">= 0.95x", off / on >= 0.95),
                  Target("recording a success + payload copy, as a share of the child's "
                         "CPU per job (journal off)", (recording + copying) / off, "<= 0.05",
                         (recording + copying) / off <= 0.05)]


class GearvisorWakeAll(GearvisorMaster):
    """The default master with `wake_one: false`: every idle child sleeps on gearmand, which
    wakes them all for each job (what gearmand does to any fleet of workers)."""

    name = "gearvisor wake_one off"
    extra = "    wake_one: false\n"


@contextlib.contextmanager
def registered(competitor: Competitor, n: int, plan: Plan, what: str,
               *errors: type[Exception]) -> Iterator[tuple[Competitor, Gearmand, float]]:
    """A fresh gearmand (-t 1) with `n` workers of `competitor` registered: yields them and
    the measurement's deadline, then stops both. A failure (`errors` too) is raised as a
    RuntimeError that names the competitor and says what its workers logged."""
    with Gearmand(threads=1) as gm:
        poller = StatusPoller(gm.port)
        try:
            competitor.start(gm, n)
            deadline = time.monotonic() + plan.deadline
            poll_until(lambda: poller.poll()[1] >= n, deadline, 0.01,
                       f"{n} workers registered")
            yield competitor, gm, deadline
        except (TimeoutError, OSError, RuntimeError, *errors) as e:
            raise RuntimeError(f"{competitor.name}, {what}: {e}\n"
                               f"{competitor.diagnose()}") from e
        finally:
            competitor.stop()
            poller.close()


def herd_cost(plan: Plan, workdir: Path) -> list[Row]:
    """Many idle workers, foreground jobs one at a time: jobs/s and the CPU all the workers
    spend per job (user + system, from the kernel's accounting of each process). gearmand
    wakes every sleeping worker of a function for each job; gearvisor's bell (`wake_one`)
    has it wake one. Interleaved, medians."""
    import psutil

    n = 4 if plan is TINY else 16
    jobs = plan.round_trips
    kinds = (GearvisorMaster, GearvisorWakeAll, LibgearmanWorkers)
    rates: dict[str, list[float]] = {k.name: [] for k in kinds}
    cpus: dict[str, list[float]] = {k.name: [] for k in kinds}
    for kind in interleaved(kinds, plan.repeats):
        with registered(kind(workdir), n, plan, f"{n} idle workers",
                        psutil.Error) as (competitor, gm, deadline):
            top = [psutil.Process(p.pid) for p in competitor.procs]
            workers = (top if kind is LibgearmanWorkers
                       else [c for c in top[0].children() if "bench[" in c.name()
                             or "bench[" in " ".join(c.cmdline())])
            round_trips(gm.port, 1, 100, deadline)  # (the pool settles)
            before = sum(sum(w.cpu_times()[:2]) for w in workers)
            rate = round_trips(gm.port, 1, jobs, deadline)
            cpu = (sum(sum(w.cpu_times()[:2]) for w in workers) - before) / jobs * 1e6
        rates[kind.name].append(rate)
        cpus[kind.name].append(cpu)
        print(f"  {kind.name}, {plural(n)}, round trips: {rate:.0f}/s, workers' CPU "
              f"{cpu:.0f} us/job", file=sys.stderr, flush=True)
    case = f"idle pool of {n}: round trip, 1 in flight, -t 1"
    return ([Row(SECTION, case, name, statistics.median(v), "jobs/s")
             for name, v in rates.items()]
            + [Row(SECTION, f"{case}: all workers' CPU per job", name, statistics.median(v),
                   "us/job", better="lower") for name, v in cpus.items()])


def one_core_round_trips(plan: Plan, workdir: Path) -> list[Row]:
    """Round trips with 1 in flight with the client, gearmand and every worker on one CPU
    (this process's affinity, which what it starts inherits). On two cores the chain's
    rate flips between modes by where the scheduler puts its three processes (a wake-up
    across cores costs tens of microseconds on this VM); on one core every hop is a
    context switch, so what is left is each side's CPU per job. Interleaved, medians; no
    target (the defaults' targets are the two-core rows)."""
    if not hasattr(os, "sched_setaffinity"):
        return []
    kinds = (GearvisorMaster, PygearmanWorkers, LibgearmanWorkers)
    old = os.sched_getaffinity(0)
    rows = []
    os.sched_setaffinity(0, {min(old)})
    try:
        for n in (1, 4) if plan is FULL else (1,):
            rates: dict[str, list[float]] = {k.name: [] for k in kinds}
            for kind in interleaved(kinds, plan.repeats):
                with registered(kind(workdir), n, plan,
                                f"{plural(n)}, one core") as (_, gm, deadline):
                    round_trips(gm.port, 1, 100, deadline)  # (the pool settles)
                    rate = round_trips(gm.port, 1, plan.round_trips, deadline)
                rates[kind.name].append(rate)
                print(f"  {kind.name}, {plural(n)}, one core: round trips {rate:.0f}/s",
                      file=sys.stderr, flush=True)
            case = f"round trip, 1 in flight, {plural(n)}, -t 1, all on one core"
            rows += [Row(SECTION, case, name, statistics.median(v), "jobs/s")
                     for name, v in rates.items()]
    finally:
        os.sched_setaffinity(0, old)
    return rows


def journal_record_cost_us(n: int) -> float:
    """Microseconds ChildJournal.success adds to one job, its flushes included (every 64
    records, to /dev/null: a real write), best of 5 runs of `n` jobs."""
    from gearvisor.child.journal import ChildJournal
    from gearvisor.config.model import JournalConfig, PoolConfig
    from gearvisor.job import Job

    pool = PoolConfig(name="bench", processes=1, functions={FUNCTION: "benchecho:echo"},
                      servers=(), graceful_timeout=1.0, connect_timeout=1.0,
                      reconnect_max_delay=1.0, backoff=None, keepalive=None,  # type: ignore
                      env={}, cwd="/", user=None, group=None, rlimit_nofile=None,
                      client_id_prefix="b", exception_packet="warning", log_level="info",
                      log_format="json", failed_payload={FUNCTION: "store"})
    job = Job(FUNCTION, "H:bench:123456", "0123456789abcdef", b"x" * 100, lambda *a: None,
              "127.0.0.1:4730")
    fd = os.open(os.devnull, os.O_WRONLY)
    try:
        journal = ChildJournal(JournalConfig(), pool, 0, 1, "benchhost", fd)
        runs = []
        for _ in range(5):
            started = time.perf_counter()
            for _ in range(n):
                journal.success(job, 0.00005)
            runs.append(time.perf_counter() - started)
        return min(runs) / n * 1e6
    finally:
        os.close(fd)


def payload_copy_cost_us(n: int) -> float:
    """Microseconds the shared-memory payload copy (at job start) adds to one job of 100
    bytes, best of 5 runs of `n`."""
    from gearvisor.shm.payload import PayloadArea

    area = PayloadArea(64 * 1024)
    data = b"x" * 100
    try:
        runs = []
        for _ in range(5):
            started = time.perf_counter()
            for _ in range(n):
                area.job_started(data)
            runs.append(time.perf_counter() - started)
        return min(runs) / n * 1e6
    finally:
        area.close()


def count_cost_us(n: int) -> float:
    """Microseconds JobStats.job_done adds to one job (default buckets), beyond the bare
    call of an empty method, best of 5 runs of `n` calls."""
    from gearvisor.config.values import DEFAULT_BUCKETS
    from gearvisor.shm.stats import SUCCESS, JobStats

    stats = JobStats({FUNCTION: DEFAULT_BUCKETS})

    class Empty:
        def job_done(self, function: str, outcome: int, seconds: float) -> None:
            pass

    def best(target: object) -> float:
        runs = []
        for _ in range(5):
            started = time.perf_counter()
            for _ in range(n):
                target.job_done(FUNCTION, SUCCESS, 0.00005)  # type: ignore[attr-defined]
            runs.append(time.perf_counter() - started)
        return min(runs) / n * 1e6

    try:
        return max(0.0, best(stats) - best(Empty()))
    finally:
        stats.close()


def plural(n: int) -> str:
    return f"{n} worker" if n == 1 else f"{n} workers"


def measure(tiny: bool) -> tuple[list[Row], list[Target]]:
    """Every competitor at every worker count and gearmand thread setting; rows in jobs/s
    (medians of the repeats) and the issue's targets (ratios of the -t 1 drain rates)."""
    plan = TINY if tiny else FULL
    rows: list[Row] = []
    drains: dict[tuple[str, int, int | None], float] = {}
    trips: dict[tuple[str, int, int | None], float] = {}  # 1 in flight
    with tempfile.TemporaryDirectory(prefix="gearvisor-bench-") as tmp:
        workdir = Path(tmp)
        write_workers(workdir)
        for threads in plan.threads:
            t = "1" if threads == 1 else "default" if threads is None else str(threads)
            for n in plan.workers:
                runs: dict[str, list[Run]] = {kind.name: [] for kind in COMPETITORS}
                for kind in interleaved(COMPETITORS, plan.repeats):
                    run = measure_one(kind(workdir), threads, n, plan)
                    runs[kind.name].append(run)
                    print(f"  {kind.name}, {plural(n)}, -t {t}: drain {run.drain:.0f} jobs/s "
                          f"(queued in {run.submit_seconds:.2f} s; all {n} registered "
                          f"{run.all_registered_after * 1000:.0f} ms after the first), "
                          "round trips " + ", ".join(f"{k} in flight {r:.0f}/s"
                                                     for k, r in run.round_trips.items()),
                          file=sys.stderr, flush=True)
                for kind in COMPETITORS:
                    got = runs[kind.name]
                    drain = statistics.median(r.drain for r in got)
                    drains[(kind.name, n, threads)] = drain
                    rows.append(Row(SECTION, f"drain {plan.jobs}, {plural(n)}, -t {t}",
                                    kind.name, drain, "jobs/s"))
                    for k in IN_FLIGHT:
                        trip = statistics.median(r.round_trips[k] for r in got)
                        if k == 1:
                            trips[(kind.name, n, threads)] = trip
                        rows.append(Row(SECTION, f"round trip, {k} in flight, {plural(n)}, -t {t}",
                                        kind.name, trip, "jobs/s"))
        cost_rows, cost_targets = metrics_cost(plan, workdir)
        journal_rows, journal_targets = journal_cost(plan, workdir)
        rows += herd_cost(plan, workdir)
        rows += one_core_round_trips(plan, workdir)
    return (rows + cost_rows + journal_rows,
            targets(drains, trips) + cost_targets + journal_targets)


def targets(drains: dict[tuple[str, int, int | None], float],
            trips: dict[tuple[str, int, int | None], float] | None = None) -> list[Target]:
    """The issues' throughput targets, from the -t 1 drains and round trips (1 in flight)
    that were measured: drains at 2x pygearman and 1x libgearman, round trips at 0.9x
    libgearman (issue "fast by default"), each on the defaults and with prefetch 8."""
    out = []
    for what, rates, goals in (
            ("drain", drains, ((1, "pygearman", 2.0), (1, "libgearman", 1.0),
                               (4, "libgearman", 1.0))),
            ("round trip, 1 in flight", trips or {}, ((1, "libgearman", 0.9),
                                                      (4, "libgearman", 0.9)))):
        for n, other, goal in goals:
            for ours_name, how in (("gearvisor", ""), (GearvisorPrefetch.name, ", prefetch 8")):
                ours, theirs = rates.get((ours_name, n, 1)), rates.get((other, n, 1))
                if ours is None or theirs is None:
                    continue  # not measured in this plan (tiny mode has 1 worker only)
                ratio = ours / theirs
                children = "1 gearvisor child" if n == 1 else f"{n} gearvisor children"
                out.append(Target(f"{what}, -t 1: {children}{how} vs. {plural(n)} of {other}",
                                  ratio, f">= {goal}x", ratio >= goal))
    for n in sorted({n for _, n, _ in drains}):
        # Metrics cost: the drain with metrics on, against the same default run (issue 15).
        on, off = drains.get((GearvisorMetrics.name, n, 1)), drains.get(("gearvisor", n, 1))
        if on is not None and off is not None:
            out.append(Target(f"drain, -t 1, {plural(n)}: metrics on vs. off", on / off,
                              ">= 0.95x", on / off >= 0.95))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="seconds, for the test suite")
    args = p.parse_args(argv)
    started = time.monotonic()
    rows, goals = measure(args.tiny)
    width = max(len(r.case) for r in rows)
    for r in rows:
        print(f"{r.case:<{width}}  {r.competitor:<10}  {r.value:>8.0f} {r.unit}")
    for t in goals:
        print(f"target: {t.name}: {t.value:.2f}x (goal {t.goal}) {'met' if t.ok else 'MISSED'}")
    print(f"{time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
