"""What `gearvisor status` shows: built in the master as plain data, rendered by the CLI.

The master side (pool_status, summary; master.Arbiter.status puts the whole reply
together) reads only its own records and each child's
scoreboard, plus RSS from psutil; it never blocks on a child. The same dict is the
`--json` output, so every field here is documented in README ("status --json").
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import psutil

from gearvisor.pool import Circuit
from gearvisor.process import Child, ChildState

if TYPE_CHECKING:
    from gearvisor.master.arbiter import Arbiter
    from gearvisor.pool import Pool

STATUS_VERSION = 1


def _rss(pid: int) -> int | None:
    try:
        return psutil.Process(pid).memory_info().rss
    except psutil.Error:
        return None


def _child_row(child: Child, now: float, role: str) -> dict[str, Any]:
    board = child.scoreboard.read() if child.scoreboard is not None else None
    busy = bool(board and board.busy)
    if child.state is ChildState.STARTING:
        state = "starting"
    elif child.state is ChildState.DRAINING:
        state = "draining"
    elif child.quarantined:
        state = "quarantined"
    elif child.paused:
        state = "paused"
    else:
        state = "busy" if busy else "idle"
    return {
        "slot": child.slot,
        "pid": child.pid,
        "state": state,
        "role": role,
        "generation": child.generation,
        "uptime": round(now - child.started_at, 3),
        "jobs_done": board.done if board else 0,
        "jobs_failed": board.failed if board else 0,
        "function": board.function if busy else None,
        "handle": board.handle if busy else None,
        "unique": board.unique if busy else None,
        "job_seconds": round(max(0.0, now - board.job_started), 3) if busy else None,
        "rss": _rss(child.pid),
        "quarantined": child.quarantined,
        "probation": child.probation,
    }


def pool_status(pool: Pool, now: float) -> dict[str, Any]:
    rows: list[dict[str, Any]] = []
    for slot in pool.slots:
        if slot.child is not None:
            rows.append(_child_row(slot.child, now, "serving"))
        else:
            rows.append({"slot": slot.index, "pid": None, "role": "empty",
                         # backoff: waiting to restart after a failure; pending: not started yet
                         "state": ("fatal" if slot.fatal else "backoff"
                                   if slot.backoff.failures else "pending"),
                         "generation": None,
                         "retry_in": round(max(0.0, slot.restart_at - now), 3),
                         "failures": slot.backoff.failures,
                         "reason": slot.fatal or slot.last_reason})
        if slot.successor is not None:
            rows.append(_child_row(slot.successor, now, "successor"))
    rows += [_child_row(c, now, "retired") for c in pool.retired]
    serving = [s.child for s in pool.slots if s.child is not None]
    return {
        "name": pool.name,
        "generation": pool.generation,
        "desired": pool.desired,
        "actual": len(serving),
        "ready": sum(1 for c in serving if c.state is ChildState.READY),
        "rolling": pool.rolling,
        "halted": pool.halted,
        "removed": pool.removed,
        "scaled": pool.scaled_to is not None,
        "circuit": pool.circuit,
        "command": list(pool.config.command) if pool.config.command else None,
        "children": rows,
    }


def fleet_status(arbiter: Arbiter, now: float) -> dict[str, Any]:
    """The whole `status --json` reply: the master, each component's part, every pool."""
    return {
        "version": STATUS_VERSION,
        "master": {
            "pid": arbiter.pid,
            "config": arbiter.config.path,
            "uptime": round(now - arbiter.started_at, 3),
            "state": "stopping" if arbiter.stopping else "running",
            "reloads": arbiter.reloads,
            "rss": _rss(arbiter.pid),
        },
        **arbiter.parts(now),
        "pools": [pool_status(p, now) for p in arbiter.pools.values()],
    }


def summary(pools: Iterable[Pool], watcher: dict[str, Any] | None = None) -> str:
    """One line for systemd's STATUS=: ready/desired children, and what is wrong."""
    ready = desired = count = 0
    notes = []
    for pool in pools:
        count += 1
        desired += pool.desired
        ready += sum(1 for s in pool.slots if s.child is not None
                     and s.child.state is ChildState.READY)
        if pool.halted:
            notes.append(f"{pool.name}: roll halted")
        elif pool.rolling:
            notes.append(f"{pool.name}: rolling")
        elif pool.backing_off:
            notes.append(f"{pool.name}: {len(pool.backing_off)} restarting")
        if pool.circuit is not Circuit.CLOSED:
            notes.append(f"{pool.name}: circuit {pool.circuit}")
    if watcher is not None and watcher.get("state") == "backoff":
        notes.append("file watcher restarting")
    text = f"{ready}/{desired} children ready in {count} pool(s)"
    return text + (f"; {', '.join(notes)}" if notes else "")


# -- rendering (CLI side) ------------------------------------------------------------------------

def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(seconds)
    if s < 60:
        return f"{seconds:.1f}s" if seconds < 10 else f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def _size(n: int | None) -> str:
    if n is None:
        return "-"
    return f"{n / 1048576:.1f}M"


def _watcher_line(w: dict[str, Any]) -> str:
    if w["state"] == "disabled":
        return "watcher disabled (watch: false everywhere and watch_config: false)"
    if w["state"] == "backoff":
        text = f"watcher DOWN, restart #{w['restarts']} in {_duration(w['retry_in'])}"
    else:
        text = (f"watcher pid {w['pid']}  {w['state']}  {len(w['paths'])} path(s)"
                + ("  POLLING" if w["polling"] else ""))
    if w["missing"]:
        text += f"  missing: {', '.join(w['missing'])}"
    if w["pending"]:
        text += f"  pending roll: {', '.join(w['pending'])}"
    if w["error"]:
        text += f"  last error: {w['error']}"
    return text


def render(status: dict[str, Any]) -> str:
    """The human table, like `supervisorctl status`."""
    m = status["master"]
    lines = [f"master pid {m['pid']}  {m['state']}  up {_duration(m['uptime'])}  "
             f"rss {_size(m['rss'])}  config {m['config']}"]
    header = ("POOL", "SLOT", "PID", "STATE", "GEN", "UPTIME", "DONE", "FAILED", "JOB", "RSS")
    table: list[tuple[str, ...]] = [header]
    for pool in status["pools"]:
        for row in pool["children"]:
            if row["pid"] is None:
                job = ("no restart (gearvisor restart POOL)" if row["state"] == "fatal"
                       else f"retry in {_duration(row['retry_in'])}")
                if row.get("reason"):
                    job += f": {row['reason']}"
                table.append((pool["name"], str(row["slot"]), "-", row["state"], "-", "-", "-", "-",
                              job, "-"))
                continue
            job = (f"{row['function']} {_duration(row['job_seconds'])}" if row["function"]
                   else "-")
            state = row["state"] + ("" if row["role"] == "serving" else f" ({row['role']})")
            table.append((pool["name"], str(row["slot"]), str(row["pid"]), state,
                          str(row["generation"]), _duration(row["uptime"]),
                          str(row["jobs_done"]), str(row["jobs_failed"]), job,
                          _size(row["rss"])))
    widths = [max(len(r[i]) for r in table) for i in range(len(header) - 1)]
    for r in table:
        cells = [c.ljust(w) for c, w in zip(r[:-1], widths, strict=True)]
        lines.append("  ".join([*cells, r[-1]]))
    for pool in status["pools"]:
        flags = []
        if pool["removed"]:
            flags.append("removed, draining")
        if pool["halted"]:
            flags.append(f"ROLL HALTED: {pool['halted']}")
        elif pool["rolling"]:
            flags.append("rolling")
        if pool["scaled"]:
            flags.append("scaled by hand")
        if pool.get("circuit", "closed") != "closed":
            flags.append(f"CIRCUIT {pool['circuit'].upper()}: not consuming")
        lines.append(f"pool {pool['name']}: {pool['ready']}/{pool['desired']} ready, "
                     f"{pool['actual']} running, generation {pool['generation']}"
                     + (f"  [{'; '.join(flags)}]" if flags else ""))
    if "watcher" in status:
        lines.append(_watcher_line(status["watcher"]))
    return "\n".join(lines)
