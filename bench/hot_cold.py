"""The child's cost per job timed hot, and again with the CPU caches evicted between jobs.

In a drain the child sleeps in recv() after every result while gearmand (and the kernel)
run, so each job's Python starts with caches that other processes used meanwhile. This
times the worker runtime's handling of one job (decode, run an echo function, write the
result and the next GRAB) over a socketpair, in this process, with 0, 8 and 32 MiB of
other memory written between jobs (outside the timing). It also times the child's
bookkeeping hooks (scoreboard, payload copy, poison check, journal) hot.

    .venv/bin/python bench/hot_cold.py

Bounded: JOBS jobs per case; nothing leaves the process.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gearvisor.child import python as child  # noqa: E402
from gearvisor.child.journal import ChildJournal  # noqa: E402
from gearvisor.config import load  # noqa: E402
from gearvisor.gearman.protocol import RES, Packet, encode  # noqa: E402
from gearvisor.gearman.worker import ConnState, Hooks, Worker  # noqa: E402
from gearvisor.job import Job  # noqa: E402
from gearvisor.shm.payload import PayloadArea  # noqa: E402
from gearvisor.shm.poison import PoisonTable, RunningJobs  # noqa: E402
from gearvisor.shm.scoreboard import Scoreboard  # noqa: E402

JOBS = 20_000
EVICT_MIB = (0, 8, 32)


class _Quiet:
    def __getattr__(self, _name: str):
        return lambda *a, **kw: None


def runtime_us(evict_mib: int, jobs: int = JOBS) -> float:
    """Microseconds the worker runtime spends on one job, caches evicted by `evict_mib`."""
    worker = Worker([("127.0.0.1", 4730)], {"echo": lambda job: job.data}, "bench:p:0",
                    _Quiet(), hooks=Hooks())
    ours, theirs = socket.socketpair()
    conn = worker.conns[0]
    conn.sock, conn.state, conn.outstanding = ours, ConnState.GRABBING, 1
    conn.answered = conn.can_do = True
    theirs.setblocking(False)
    packet = encode(Packet.JOB_ASSIGN_ALL, "H:gm:123456", "echo", "unique-abcdef-123", "",
                    b"x" * 16, magic=RES)
    other = bytearray(evict_mib << 20)
    line = b"\1" * (len(other) // 64)
    spent = 0.0
    try:
        for _ in range(jobs):
            if other:
                other[::64] = line  # one write per cache line, outside the timing
            theirs.send(packet)
            started = time.perf_counter()
            worker._read(conn)
            spent += time.perf_counter() - started
            theirs.recv(65536)
    finally:
        worker.close()
        ours.close()
        theirs.close()
    return spent / jobs * 1e6


def hooks_us(jobs: int = JOBS) -> float:
    """Microseconds the child's hooks (start and end of a job, the poison check) take, hot."""
    with tempfile.TemporaryDirectory(prefix="gv-hot-") as d:
        path = Path(d) / "gearvisor.yaml"
        path.write_text(f"state_dir: {d}\nwatch_config: false\npools:\n  p:\n"
                        "    processes: 1\n    watch: false\n"
                        "    functions:\n      echo: examples.text:echo\n")
        cfg = load(str(path))
        pool = cfg.pools["p"]
        r, w = os.pipe()
        os.set_blocking(w, False)
        try:
            board = Scoreboard(payload=PayloadArea(cfg.journal.payload_cap))
            journal = ChildJournal(cfg.journal, pool, 0, 1, "bench", w)
            hooks = child._ChildHooks(pool, 0, w, board, False, _Quiet(), journal)
            running, poison = RunningJobs(), PoisonTable()
            index = running.allocate()
            running.claim(index, os.getpid())
            hooks.set_running = running.setter(index)
            is_poison = child._poison_check(poison, running, index, pool.poison_after or 1)
            started = time.process_time()
            for _ in range(jobs):
                job = Job("echo", "H:gm:123456", "unique-abcdef-123", b"x" * 16,
                          lambda *a: None, "127.0.0.1:4730")
                is_poison(job)
                hooks.job_started(job)
                hooks.job_finished(job, True, 0.00001)
                hooks.job_answered(job, True, 0.00001)
            return (time.process_time() - started) / jobs * 1e6
        finally:
            os.close(r)
            os.close(w)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--jobs", type=int, default=JOBS, help="jobs per case")
    jobs = p.parse_args(argv).jobs
    print(f"# One job's Python in the child, {jobs} jobs per case", flush=True)
    print()
    print("| what | us per job |")
    print("| --- | --- |")
    print(f"| the child's hooks (scoreboard, payload copy, poison check, journal), hot "
          f"| {hooks_us(jobs):.1f} |")
    for mib in EVICT_MIB:
        what = "hot" if not mib else f"{mib} MiB of other memory written between jobs"
        print(f"| the worker runtime (decode, run, result + GRAB; 3 system calls), {what} "
              f"| {runtime_us(mib, jobs):.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
