"""Rendering the master's replies for a terminal: the `gearvisor status` table.

The reply is plain data (master/status.py builds it, and it is also the `--json` output);
nothing here talks to the master.
"""

from __future__ import annotations

from typing import Any


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


def _autoscale_line(a: dict[str, Any]) -> str:
    """One pool's autoscaler: its size, bounds, state and why, and a pin."""
    pin = a.get("pinned")
    pinned = ""
    if pin is not None:
        pinned = (f"  pinned at {pin['processes']} "
                  + ("until the next reload" if pin["expires_in"] is None
                     else f"for {_duration(pin['expires_in'])} more"))
    if "min" not in a:  # a pool without autoscale, scaled --for
        return f"scale {a['pool']}: {a['desired']} processes{pinned}"
    inputs = ("" if "backlog" in a["reason"] else
              f"  backlog {a['backlog']} over {a['hosts']} host(s)")
    return (f"autoscale {a['pool']}: {a['desired']} processes [{a['min']}..{a['max']}] "
            f"target {a['target']}  {a['state']}: {a['reason']}{inputs}" + pinned)


def _table(rows: list[tuple[str, ...]]) -> list[str]:
    """Columns padded to their widest cell (the last one is not padded), every cell made
    harmless for a terminal first (_safe)."""
    rows = [tuple(_safe(c) for c in r) for r in rows]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    return ["  ".join([*(c.ljust(w) for c, w in zip(r[:-1], widths, strict=True)), r[-1]])
            for r in rows]


def _count(n: int | None) -> str:
    return "-" if n is None else str(n)


def _gearmand_lines(status: dict[str, Any]) -> list[str]:
    """The job servers as the probe last saw them, the functions per server, and the
    health findings."""
    lines: list[str] = []
    servers = status.get("servers") or []
    if servers:
        rows: list[tuple[str, ...]] = [("SERVER", "STATE", "VERSION", "PID", "ANSWERED")]
        for s in servers:
            state = ("up" if s["answered"] else "FAILING") if s["up"] else "DOWN"
            age = s["last_answer_age"]
            answered = "never" if age is None else f"{_duration(age)} ago"
            if s["error"]:
                answered += f"  ({s['error']})"
            rows.append((s["server"], state, s["version"] or "-", _count(s["pid"]), answered))
        lines += _table(rows)
    functions = status.get("functions") or []
    if functions:
        rows = [("FUNCTION", "SERVER", "WAITING", "RUNNING", "WORKERS", "POOLS")]
        for f in functions:
            workers = ("-" if f["workers_all"] is None
                       else f"{f['workers_ours']}/{f['workers_all']}")
            rows.append((f["function"], f["server"], _count(f["waiting"]),
                         _count(f["running"]), workers, ",".join(f["pools"]) or "-"))
        lines += _table(rows)
        if status.get("functions_omitted"):
            lines.append(f"({status['functions_omitted']} more functions with jobs queued "
                         "not shown; see --json)")
    findings = status.get("findings")
    if findings is not None:
        lines.append("health: ok" if not findings else f"health: {len(findings)} finding(s)")
        lines += [f"  {f['kind'].upper()}  {f['message']}  (for {_duration(f['age'])})"
                  for f in findings]
    journal = status.get("journal")
    if journal:
        state = {True: "up", False: "DOWN", None: "starting"}[journal.get("up")]
        line = f"journal: store {journal.get('store')} {state}"
        if journal.get("error"):
            line += f" ({journal['error']})"
        if journal.get("dead_letters"):
            line += f"  dead letters {journal['dead_letters']} (gearvisor dead list)"
        if journal.get("waiting"):
            line += f"  {journal['waiting']} lines waiting"
        if journal.get("dropped"):
            line += f"  {journal['dropped']} DROPPED"
        lines.append(line)
    return lines


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
    lines += _table(table)
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
    lines += [_autoscale_line(a) for a in status.get("autoscale") or ()]
    if "watcher" in status:
        lines.append(_watcher_line(status["watcher"]))
    lines += _gearmand_lines(status)
    # Names and texts from job servers (any client names a function, any server its
    # version), from job code (a boot error) or from the config: never a control sequence.
    return "\n".join(map(_safe, lines))


def _safe(text: Any) -> str:
    """A name from a job server (any worker sets its client id, any client names a
    function), made harmless for a terminal: control and other unprintable characters as
    \\xNN. Idempotent: what it writes is printable."""
    return "".join(c if c.isprintable() else f"\\x{ord(c):02x}" if ord(c) < 256
                   else f"\\u{ord(c):04x}" for c in str(text))


def _functions(row: dict[str, Any]) -> str:
    names = ", ".join(_safe(f) for f in row["functions"]) or "-"
    return names + (f" (+{row['functions_omitted']} more)" if row["functions_omitted"] else "")


def _flag_line(f: dict[str, Any]) -> str:
    host = _safe(f["host"])
    if f["flag"] == "vanished":
        return (f"  VANISHED  {host}: no worker on any job server; last seen "
                f"{_duration(f['last_seen_age'])} ago on {', '.join(f['last_servers'])} "
                f"with {f['last_children']} child(ren) of {', '.join(map(_safe, f['last_pools']))}")
    return (f"  PARTIAL   {host}: pool {_safe(f['pool'])} registered on "
            f"{', '.join(f['registered_on'])}, not on {', '.join(f['missing_from'])}")


def render_fleet(fleet: dict[str, Any]) -> str:
    """`gearvisor fleet`: the job servers, a table per gearvisor host (pool, server,
    children, slots, functions), then the workers that are not gearvisor's, then flags."""
    lines: list[str] = []
    for s in fleet["servers"]:
        age = s["last_answer_age"]
        state = (f"{s['connections']} connection(s), answered {_duration(age)} ago"
                 if s["answered"] else
                 f"NOT ANSWERING ({s['error'] or 'no answer yet'}); left out")
        lines.append(f"job server {s['server']}: {state}")
    if not fleet["hosts"]:
        lines.append("no gearvisor host on the answered job servers")
    for h in fleet["hosts"]:
        addresses = ", ".join(h["addresses"]) + (
            f" (+{h['addresses_omitted']} more)" if h["addresses_omitted"] else "")
        lines.append("")
        lines.append(f"host {_safe(h['host'])}{' (this master)' if h['local'] else ''}  "
                     f"{h['children']} child(ren), {h['connections']} connection(s)  "
                     f"from {addresses}")
        rows: list[tuple[str, ...]] = [("  POOL", "SERVER", "CHILDREN", "SLOTS", "FUNCTIONS")]
        for p in h["pools"]:
            for server, on in p["servers"].items():
                rows.append((f"  {_safe(p['pool'])}", server, str(on["children"]),
                             on["slots"] or "-", _functions(p)))
        lines += _table(rows)
        if h["pools_omitted"]:
            lines.append(f"  ({h['pools_omitted']} more pools not shown; see --json)")
    if fleet["hosts_omitted"]:
        lines.append(f"({fleet['hosts_omitted']} more hosts not shown)")
    lines.append("")
    if fleet["foreign"]:
        lines.append("other workers (not gearvisor's)")
        rows = [("  WORKER", "ADDRESS", "SERVERS", "CONNECTIONS", "FUNCTIONS")]
        for f in fleet["foreign"]:
            worker = _safe(f["worker"]) if f["client_id"] is not None else "(no client id)"
            rows.append((f"  {worker}", ", ".join(f["addresses"]) or "-",
                         ", ".join(f["servers"]), str(f["connections"]), _functions(f)))
        lines += _table(rows)
        if fleet["foreign_omitted"]:
            lines.append(f"  ({fleet['foreign_omitted']} more not shown)")
    else:
        lines.append("other workers: none")
    if fleet["flags"]:
        lines.append(f"flags: {len(fleet['flags']) + fleet['flags_omitted']}")
        lines += [_flag_line(f) for f in fleet["flags"]]
        if fleet["flags_omitted"]:
            lines.append(f"  ({fleet['flags_omitted']} more not shown)")
    else:
        lines.append("flags: none")
    return "\n".join(lines)
