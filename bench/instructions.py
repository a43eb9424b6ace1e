"""Instructions per drained job in the gearvisor child, counted by valgrind (callgrind).

Rates and CPU times on a shared machine move by 25% from run to run; an instruction count
does not (the same build, jobs and interpreter give the same count, whatever else runs).
So this is the measure to compare two versions of the per-job path with: run it on each
checkout (`--repo`), with the same interpreter.

How: a gearvisor master (one pool of one child, the benchmark's default config) runs under
`valgrind --tool=callgrind --trace-children=yes`, so its forked child is counted too, and
drains `--small` queued echo jobs on a fresh gearmand, while a second such master drains
`--large` on another. The child's count differs between the two by what the extra jobs
cost (start-up and imports are the same):

    instructions per job = (child's count, large - child's count, small) / (large - small)

User-space instructions only (the kernel's share of each system call is not counted).
Needs valgrind (Debian's package). Slow: valgrind runs Python some 50 times slower, so a
run takes a few minutes; every wait is bounded (DEADLINE).

    .venv/bin/python bench/instructions.py                  # this checkout
    .venv/bin/python bench/instructions.py --repo /tmp/old  # another one, same interpreter
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import throughput as T  # noqa: E402
from common import PYTHON, REPO, Gearmand, die_with_parent  # noqa: E402

DEADLINE = 900.0  # seconds a drain under valgrind may take
STOP_WAIT = 300.0  # seconds the master (under valgrind) may take to stop
_STARTING = threading.Lock()  # one drain picks a free port and starts gearmand at a time
TOTALS = re.compile(r"^(?:totals|summary): (\d+)", re.M)


def child_count(out_dir: Path) -> int:
    """The instructions of the last process started (the pool's child: the master starts
    first, and helpers before the pool), from its callgrind output file."""
    files = sorted(out_dir.glob("cg.*"), key=lambda f: int(f.name.split(".")[1]))
    if not files:
        raise RuntimeError(f"no callgrind output in {out_dir}")
    m = TOTALS.search(files[-1].read_text(errors="replace"))
    if m is None:
        raise RuntimeError(f"no totals line in {files[-1]}")
    return int(m.group(1))


def drain_under_callgrind(repo: Path, jobs: int) -> int:
    """The child's instruction count for a master that drained `jobs` queued echo jobs."""
    with tempfile.TemporaryDirectory(prefix="gv-instr-") as tmp:
        workdir = Path(tmp)
        T.write_workers(workdir)
        out_dir = workdir / "callgrind"
        out_dir.mkdir()
        with contextlib.ExitStack() as stack:
            with _STARTING:  # (the other drain's gearmand has bound the port it picked)
                gm = stack.enter_context(Gearmand(threads=1))
            deadline = time.monotonic() + DEADLINE
            T.submit_background(gm.port, jobs, deadline)
            config = workdir / "pools.yaml"
            config.write_text(T.GEARVISOR_CONFIG.format(address=gm.address, dir=workdir, n=1,
                                                        extra="", top=""))
            master = subprocess.Popen(
                ["valgrind", "--tool=callgrind", "--trace-children=yes",
                 f"--callgrind-out-file={out_dir}/cg.%p", PYTHON, "-m", "gearvisor",
                 "-c", str(config)],
                cwd=str(repo), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                preexec_fn=die_with_parent,
                # str hashes seeded alike in both drains: dicts and sets built the same way
                # cost the same, so the difference between the drains is the jobs
                env={**os.environ, "PYTHONHASHSEED": "0"})
            poller = T.StatusPoller(gm.port)
            try:
                T.poll_until(lambda: poller.poll()[0] == 0 or None, deadline, 0.5,
                             f"the drain of {jobs} jobs under valgrind")
            finally:
                poller.close()
                master.send_signal(signal.SIGTERM)
                try:
                    master.wait(STOP_WAIT)
                except subprocess.TimeoutExpired:
                    master.kill()
                    master.wait()
        return child_count(out_dir)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repo", type=Path, default=REPO, help="the checkout to measure")
    p.add_argument("--small", type=int, default=300, help="jobs in the first drain")
    p.add_argument("--large", type=int, default=1300, help="jobs in the second drain")
    args = p.parse_args(argv)
    if shutil.which("valgrind") is None:
        print("bench/instructions.py needs valgrind (apt-get install valgrind)",
              file=sys.stderr)
        return 2
    if args.large <= args.small:
        p.error("--large must be more than --small")
    # Both drains at once (each its own gearmand and master): an instruction count does not
    # depend on what else runs, and valgrind's start-up is most of a small run's time.
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        small, large = pool.map(lambda jobs: drain_under_callgrind(args.repo, jobs),
                                (args.small, args.large))
    if large <= small:
        print(f"the child's count did not grow with the jobs ({small:,} then {large:,}): "
              "the last process started was not the pool's child", file=sys.stderr)
        return 1
    per_job = (large - small) / (args.large - args.small)
    print(f"# Instructions per drained job in the gearvisor child ({args.repo}, {PYTHON})")
    print()
    print("| jobs | the child's instructions |")
    print("| --- | --- |")
    print(f"| {args.small} | {small:,} |")
    print(f"| {args.large} | {large:,} |")
    print(f"| per job | {per_job:,.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
