"""What `gearvisor status` shows, built in the master as plain data (cli/render.py draws it).

pool_status, fleet_status and summary (master.Arbiter.status puts the whole reply together)
read only the master's own records and each child's scoreboard, plus RSS from psutil; they
never block on a child. The same dict is the
`--json` output, so every field here is documented in README ("status --json").
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

import psutil

from gearvisor.policy.child import Child, ChildState
from gearvisor.policy.pool import Circuit
from gearvisor.shm.lanes import FOLLOWING, HOLDING_BELL, LENT, LaneHints

if TYPE_CHECKING:
    from gearvisor.master.arbiter import Arbiter
    from gearvisor.master.bus import ServerView
    from gearvisor.policy.pool import Pool

STATUS_VERSION = 1
MAX_FOREIGN_FUNCTIONS = 500  # functions of no pool of ours shown (most waiting first)


def _rss(pid: int) -> int | None:
    try:
        return psutil.Process(pid).memory_info().rss
    except psutil.Error:
        return None


def _cpu(pid: int) -> float | None:
    """User + system CPU seconds so far: a counter, so `gearvisor top` can show CPU% from
    two frames without the master keeping per-child history."""
    try:
        t = psutil.Process(pid).cpu_times()
    except psutil.Error:
        return None
    return round(t.user + t.system, 3)


def _child_row(child: Child, now: float, role: str,
               hints: LaneHints | None = None) -> dict[str, Any]:
    board = child.scoreboard.read() if child.scoreboard is not None else None
    job = child.running()  # a command child's as its reporting shim said
    if child.state is ChildState.STARTING:
        state = "starting"
    elif child.state is ChildState.DRAINING:
        state = "draining"
    elif child.quarantined:
        state = "quarantined"
    elif child.paused:
        state = "paused"
    else:
        state = "busy" if job is not None else "idle"
    return {
        "slot": child.slot,
        "pid": child.pid,
        "state": state,
        "role": role,
        "generation": child.generation,
        "uptime": round(now - child.started_at, 3),
        "jobs_done": board.done if board else 0,
        "jobs_failed": board.failed if board else 0,
        "function": job.function if job else None,
        "handle": job.handle if job else None,
        "unique": job.unique if job else None,
        "job_seconds": round(max(0.0, now - job.started), 3) if job else None,
        "rss": _rss(child.pid),
        "cpu": _cpu(child.pid),
        "quarantined": child.quarantined,
        "probation": child.probation,
        # wake_one: "holds" the pool's token (asleep on the servers for its siblings),
        # "follows" (waits on the bell), or None
        "bell": _BELL_STATE.get(hints.bell(child.running_index)) if hints else None,
    }


_BELL_STATE = {FOLLOWING: "follows", HOLDING_BELL: "holds", LENT: "holds"}


def pool_status(pool: Pool, now: float, hints: LaneHints | None = None) -> dict[str, Any]:
    rows: list[dict[str, Any]] = []
    for slot in pool.slots:
        if slot.child is not None:
            rows.append(_child_row(slot.child, now, "serving", hints))
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
            rows.append(_child_row(slot.successor, now, "successor", hints))
    rows += [_child_row(c, now, "retired", hints) for c in pool.retired]
    restarts = {slot.index: slot.restarts for slot in pool.slots}
    for row in rows:
        row["restarts"] = restarts.get(row["slot"], 0)
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
        "scaled": pool.scaled_to is not None and pool.scaled_by != "autoscale",
        "scaled_by": pool.scaled_by if pool.scaled_to is not None else None,
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
        "pools": [pool_status(p, now, arbiter.lane_hints) for p in arbiter.pools.values()],
    }


def servers_status(views: Iterable[ServerView], now: float) -> list[dict[str, Any]]:
    """One row per job server: what the probe last saw (`gearvisor status`'s servers)."""
    rows = []
    for v in sorted(views, key=lambda v: v.name):
        rows.append({
            "server": v.name,
            "up": v.up,
            "answered": v.answered,
            "version": v.version,
            "pid": v.pid,
            "restarts": v.restarts,
            "failures": v.failures,
            "last_answer_age": (None if v.answered_at is None
                                else round(max(0.0, now - v.answered_at), 3)),
            "error": v.error,
        })
    return rows


def _ours(view: ServerView, prefixes: tuple[str, ...]) -> dict[str, int]:
    """Per function: our workers in the server's `workers` list that can do it, by client id
    (it starts with "<client_id_prefix>:<pool>:"): a child's second lane (hold_next) is one
    more connection of the same worker, not one more worker."""
    ids: dict[str, set[str]] = {}
    for w in view.workers or ():
        if w.client_id.startswith(prefixes):
            for fn in w.functions:
                ids.setdefault(fn, set()).add(w.client_id)
    return {fn: len(found) for fn, found in ids.items()}


def functions_status(views: Mapping[tuple[str, int], ServerView],
                     pools: Iterable[Pool]) -> tuple[list[dict[str, Any]], int]:
    """The functions table: per function and server, jobs waiting and running and capable
    workers (ours / all), for every function of our pools on each of its pool's servers,
    and for any other function with jobs queued (at most MAX_FOREIGN_FUNCTIONS of those,
    most waiting first; the count of the rest is returned beside the rows). Values are
    null for a server whose last probe did not answer. gearmand's `total` counts running
    jobs too: waiting = total - running."""
    rows: dict[tuple[str, tuple[str, int]], list[str]] = {}
    prefixes = []
    for pool in pools:
        pc = pool.config
        prefixes.append(f"{pc.client_id_prefix}:{pc.name}:")
        for fn in pc.functions:
            for s in pc.servers:
                rows.setdefault((fn, (s.host, s.port)), []).append(pc.name)
    foreign = []
    for server, view in views.items():
        if view.answered:
            foreign += [(st.queued - st.running, fn, server)
                        for fn, st in view.functions.items()
                        if st.queued and (fn, server) not in rows]
    foreign.sort(key=lambda r: (-r[0], r[1], r[2]))
    for _, fn, server in foreign[:MAX_FOREIGN_FUNCTIONS]:
        rows[(fn, server)] = []
    ours = {server: _ours(view, tuple(prefixes)) for server, view in views.items()
            if view.answered}
    table = []
    for (fn, server), pool_names in sorted(rows.items(), key=lambda r: (r[0][0], r[0][1])):
        view = views.get(server)
        row: dict[str, Any] = {"function": fn,
                               "server": view.name if view else f"{server[0]}:{server[1]}",
                               "pools": sorted(set(pool_names)), "waiting": None,
                               "running": None, "workers_ours": None, "workers_all": None}
        if view is not None and view.answered:
            st = view.functions.get(fn)
            row.update(waiting=max(0, st.queued - st.running) if st else 0,
                       running=st.running if st else 0, workers_all=st.workers if st else 0,
                       workers_ours=ours[server].get(fn, 0))
        table.append(row)
    return table, max(0, len(foreign) - MAX_FOREIGN_FUNCTIONS)


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
