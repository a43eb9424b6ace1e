"""`gearvisor top`: a live terminal view of a running master, for an ssh session.

It is its own client process. It subscribes to the master's status stream (the control
socket's `subscribe` verb: one status line every `--interval`), so the master does no more
than build that line; nothing here polls gearmand. Two frames make the rates: jobs/s,
failure % and p95 per function from the metrics' per-function counters (`jobs` in the
status, present when `metrics` is on; otherwise a function served by pools that serve
nothing else gets their children's job rate, and p95 is "-"), and CPU% per child from its
CPU seconds.

The view logic is pure and has no curses in it: History keeps the frames, rates() compares
two, function_rows()/child_rows() turn a status into rows, sort_rows()/filter_rows() order
and select them, View.key() turns a key into a change of view or an Action, and screen()
lays everything out as lines of text for a terminal of a given size. Only draw() and
run_curses() touch the terminal: erase, draw, one refresh per frame (curses sends only what
changed: no flicker).

Keys: Tab switches the focused pane; s cycles its sort column; / filters both panes;
arrows select a row; + and - scale the selected row's pool by one (the `scale` verb); S
silences its alerts for 1h (`silence.add`, after a y); r reloads (after a y); q quits.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import getpass
import json
import os
import select
import socket
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from gearvisor.cli.render import _duration, _size
from gearvisor.shm.stats import p95

MIN_COLS, MIN_ROWS = 80, 24
RATE_WINDOW = 5.0  # seconds of frames the rates span (at least the previous frame)
MAX_FRAMES = 64  # frames kept for the rates, whatever the interval
MAX_LINE = 32 * 1024 * 1024  # one status line larger than this: reconnect (a broken master)
RECONNECT_FIRST, RECONNECT_MAX = 0.5, 10.0  # the backoff between connection attempts
CONNECT_TIMEOUT = 2.0
ACTION_TIMEOUT = 15.0  # scale, silence: answered at once
RELOAD_TIMEOUT = 600.0  # reload answers when the roll is done
SILENCE_FOR = 3600.0
FAILED = ("error", "timeout", "poison", "crash")  # the outcomes that are failures
HELP = "q quit  Tab pane  s sort  / filter  +/- scale  S silence 1h  r reload  j/k move"


# -- frames and rates ----------------------------------------------------------------------------


def _uptime(status: dict[str, Any]) -> float | None:
    """The master's clock at the frame (its uptime): the time base of the rates, immune to
    how late the line reached us."""
    value = (status.get("master") or {}).get("uptime")
    return float(value) if isinstance(value, (int, float)) else None


class History:
    """The last frames of one master, spanning about `window` seconds of its clock. A frame
    of another master (its pid changed: counters restarted) or one going back in time
    starts over."""

    def __init__(self, window: float = RATE_WINDOW, limit: int = MAX_FRAMES) -> None:
        self.window = window
        self.frames: deque[dict[str, Any]] = deque(maxlen=limit)

    def add(self, status: dict[str, Any]) -> None:
        """Keep `status` as the newest frame."""
        at = _uptime(status)
        if self.frames:
            last = self.frames[-1]
            last_at = _uptime(last)
            if (at is None or last_at is None or at <= last_at
                    or status["master"].get("pid") != last["master"].get("pid")):
                self.frames.clear()
        self.frames.append(status)
        if at is not None:
            # Keep one frame at or before the window's start, so the span covers it.
            while len(self.frames) > 2 and (_uptime(self.frames[1]) or 0.0) <= at - self.window:
                self.frames.popleft()

    @property
    def newest(self) -> dict[str, Any] | None:
        return self.frames[-1] if self.frames else None

    @property
    def base(self) -> dict[str, Any] | None:
        """The frame the rates are measured from; None before a second frame."""
        return self.frames[0] if len(self.frames) >= 2 else None


@dataclass
class FunctionRate:
    """One function over the span: jobs ended per second, failed %, p95 seconds."""

    jobs: float
    failed_pct: float | None  # None: no job ended
    p95: float | None


@dataclass
class Rates:
    """What two frames tell apart: per child pid its CPU %, per pool its jobs/s from the
    children's counters, per function (from the metrics' counters) its FunctionRate."""

    span: float
    cpu: dict[int, float] = field(default_factory=dict)
    pool_jobs: dict[str, tuple[float, float]] = field(default_factory=dict)  # (ended/s, failed/s)
    functions: dict[str, FunctionRate] = field(default_factory=dict)


def _children(status: dict[str, Any]) -> Iterable[tuple[str, dict[str, Any]]]:
    for pool in status.get("pools") or []:
        for row in pool.get("children") or []:
            if row.get("pid") is not None:
                yield pool.get("name", "?"), row


def _delta(new: float, old: float | None) -> float:
    """A counter's growth; a counter that went back was reset: all of it is new."""
    if old is None or new < old:
        return new
    return new - old


def rates(old: dict[str, Any] | None, new: dict[str, Any]) -> Rates | None:
    """The rates between frames `old` and `new` of the same master; None without a span."""
    if old is None:
        return None
    t0, t1 = _uptime(old), _uptime(new)
    if t0 is None or t1 is None or t1 <= t0:
        return None
    span = t1 - t0
    out = Rates(span)
    before = {row["pid"]: row for _, row in _children(old)}
    for pool, row in _children(new):
        was = before.get(row["pid"])
        if isinstance(row.get("cpu"), (int, float)):
            was_cpu = was.get("cpu") if was else None
            out.cpu[row["pid"]] = 100.0 * _delta(row["cpu"], was_cpu) / span
        # A child missing from the old frame was born within the span: all of it counts.
        done = _delta(row.get("jobs_done") or 0, was.get("jobs_done") or 0 if was else None)
        failed = _delta(row.get("jobs_failed") or 0,
                        was.get("jobs_failed") or 0 if was else None)
        ended, bad = out.pool_jobs.get(pool, (0.0, 0.0))
        out.pool_jobs[pool] = (ended + (done + failed) / span, bad + failed / span)
    if "jobs" in new:
        out.functions = _function_rates(old.get("jobs") or [], new["jobs"], span)
    return out


def _function_rates(old: list[dict[str, Any]], new: list[dict[str, Any]],
                    span: float) -> dict[str, FunctionRate]:
    """Per function, summed over the pools that run it: the jobs that ended in the span."""
    before = {(r.get("pool"), r.get("function")): r for r in old}
    ended: dict[str, float] = {}
    failed: dict[str, float] = {}
    hist: dict[str, tuple[tuple[float, ...], list[float]]] = {}
    for row in new:
        fn = row.get("function")
        if not isinstance(fn, str):
            continue
        was = before.get((row.get("pool"), fn)) or {}
        outcomes, was_out = row.get("outcomes") or {}, was.get("outcomes") or {}
        for outcome, n in outcomes.items():
            d = _delta(n, was_out.get(outcome, 0 if was else None))
            ended[fn] = ended.get(fn, 0.0) + d
            if outcome in FAILED:
                failed[fn] = failed.get(fn, 0.0) + d
        bounds = tuple(row.get("bounds") or ())
        buckets = row.get("buckets") or []
        was_buckets = was.get("buckets") if tuple(was.get("bounds") or ()) == bounds else None
        delta = [_delta(n, was_buckets[i] if was_buckets and i < len(was_buckets) else
                        (0 if was_buckets is not None else None))
                 for i, n in enumerate(buckets)]
        have = hist.get(fn)
        if have is None:
            hist[fn] = (bounds, delta)
        elif have[0] == bounds:  # pools with other bounds cannot be summed: the first counts
            hist[fn] = (bounds, [a + b for a, b in zip(have[1], delta, strict=False)])
    out = {}
    for fn, n in ended.items():
        bounds, delta = hist.get(fn, ((), []))
        out[fn] = FunctionRate(n / span, 100.0 * failed.get(fn, 0.0) / n if n else None,
                               p95(bounds, [int(d) for d in delta]) if bounds and delta else None)
    return out


# -- rows ----------------------------------------------------------------------------------------


def _firing(status: dict[str, Any]) -> tuple[set[str], set[str]]:
    """The functions and the pools that firing alerts are about."""
    functions, pools = set(), set()
    for labels in (status.get("alerts") or {}).get("firing_labels") or []:
        if labels.get("function"):
            functions.add(labels["function"])
        elif labels.get("pool"):
            pools.add(labels["pool"])
    return functions, pools


def function_rows(status: dict[str, Any], r: Rates | None) -> list[dict[str, Any]]:
    """One row per function: the functions table summed over job servers (waiting and
    running add up; capable workers are the most any one server counts, since each of our
    children registers on every server), with its rates and alert marker."""
    by_fn: dict[str, dict[str, Any]] = {}
    for f in status.get("functions") or []:
        name = f.get("function")
        if not isinstance(name, str):
            continue
        row = by_fn.setdefault(name, {"function": name, "pools": set(), "waiting": None,
                                      "running": None, "ours": None, "all": None})
        row["pools"].update(f.get("pools") or ())
        for key, src in (("waiting", "waiting"), ("running", "running")):
            if f.get(src) is not None:
                row[key] = (row[key] or 0) + f[src]
        for key, src in (("ours", "workers_ours"), ("all", "workers_all")):
            if f.get(src) is not None:
                row[key] = max(row[key] or 0, f[src])
    # Which functions each pool serves, to lend a pool's rate to its only function.
    served: dict[str, set[str]] = {}
    for row in by_fn.values():
        for pool in row["pools"]:
            served.setdefault(pool, set()).add(row["function"])
    alert_fns, alert_pools = _firing(status)
    out = []
    for name, row in by_fn.items():
        rate = fail = q95 = None
        if r is not None:
            if name in r.functions:
                fr = r.functions[name]
                rate, fail, q95 = fr.jobs, fr.failed_pct, fr.p95
            elif "jobs" not in status and row["pools"] and all(
                    served.get(p) == {name} and p in r.pool_jobs for p in row["pools"]):
                rate = sum(r.pool_jobs[p][0] for p in row["pools"])
                bad = sum(r.pool_jobs[p][1] for p in row["pools"])
                fail = 100.0 * bad / rate if rate else None
            elif "jobs" in status and row["pools"]:
                rate = 0.0  # counted, and nothing ended in the span
        row.update(pools=sorted(row["pools"]), rate=rate, fail=fail, p95=q95,
                   alert=name in alert_fns or bool(alert_pools & set(row["pools"])))
        out.append(row)
    return out


def child_rows(status: dict[str, Any], r: Rates | None) -> list[dict[str, Any]]:
    """One row per child and per empty slot, with its CPU % over the span."""
    out = []
    for pool in status.get("pools") or []:
        name = pool.get("name", "?")
        for c in pool.get("children") or []:
            pid = c.get("pid")
            state = c.get("state", "?")
            if c.get("role") == "successor":
                state += "+"  # a new generation starting beside the slot's child
            out.append({"pool": name, "slot": c.get("slot"), "pid": pid, "state": state,
                        "function": c.get("function"), "job_seconds": c.get("job_seconds"),
                        "done": c.get("jobs_done") if pid is not None else None,
                        "failed": c.get("jobs_failed") if pid is not None else None,
                        "restarts": c.get("restarts"), "rss": c.get("rss"),
                        "retry_in": c.get("retry_in"),
                        "cpu": r.cpu.get(pid) if r is not None and pid is not None else None})
    return out


@dataclass(frozen=True)
class Column:
    """A pane's column: its row key, header, width (0: takes what is left) and sort."""

    key: str
    title: str
    width: int
    numeric: bool = True  # numbers sort largest first, text A to Z
    left: bool = False  # aligned left though it sorts as a number


FUNCTION_COLUMNS = (
    Column("function", "FUNCTION", 0, numeric=False),
    Column("waiting", "WAITING", 8), Column("running", "RUNNING", 8),
    Column("all", "CAPABLE", 11), Column("rate", "JOBS/S", 8), Column("p95", "P95", 7),
    Column("fail", "FAIL%", 6))
CHILD_COLUMNS = (
    Column("pool", "POOL/SLOT", -1, numeric=False), Column("pid", "PID", 7),
    Column("state", "STATE", 11, numeric=False), Column("job_seconds", "JOB", 0, left=True),
    Column("done", "DONE", 7), Column("failed", "FAILED", 6), Column("restarts", "RST", 3),
    Column("rss", "RSS", 7), Column("cpu", "CPU%", 5))
PANES = ("functions", "children")
COLUMNS = {"functions": FUNCTION_COLUMNS, "children": CHILD_COLUMNS}
FILTERED = {"functions": ("function", "pools"), "children": ("pool", "state", "function")}


def _default_order(pane: str, row: dict[str, Any]) -> tuple:
    if pane == "functions":
        return (row["function"],)
    return (row["pool"], row["slot"] if row["slot"] is not None else -1,
            row["pid"] if row["pid"] is not None else -1)


def sort_rows(rows: list[dict[str, Any]], pane: str, column: Column) -> list[dict[str, Any]]:
    """Rows ordered by `column`: numbers largest first, text A to Z, unknown values last;
    ties in the pane's own order (function name; pool and slot)."""
    known = [r for r in rows if r.get(column.key) is not None]
    unknown = [r for r in rows if r.get(column.key) is None]

    def tie(r: dict[str, Any]) -> tuple:
        return _default_order(pane, r)

    if column.numeric:
        known.sort(key=tie)
        known.sort(key=lambda r: r[column.key], reverse=True)  # stable: ties keep `tie`
    else:
        known.sort(key=lambda r: (str(r[column.key]), tie(r)))
    return known + sorted(unknown, key=tie)


def filter_rows(rows: list[dict[str, Any]], pane: str, text: str) -> list[dict[str, Any]]:
    """Rows with `text` (case-insensitive) in one of the pane's named fields."""
    if not text:
        return rows
    needle = text.lower()

    def hit(row: dict[str, Any]) -> bool:
        for key in FILTERED[pane]:
            value = row.get(key)
            values = value if isinstance(value, list) else [value]
            if any(v is not None and needle in str(v).lower() for v in values):
                return True
        return False

    return [r for r in rows if hit(r)]


# -- formatting ----------------------------------------------------------------------------------


def _num(value: float | None, digits: int = 0) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}f}" if digits else str(int(value))


def _rate(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.1f}" if value < 1000 else f"{value / 1000:.1f}k"


def cell(pane: str, key: str, row: dict[str, Any]) -> str:
    """One cell's text."""
    v = row.get(key)
    if pane == "functions":
        if key == "function":
            return ("! " if row["alert"] else "  ") + row["function"]
        if key == "all":
            return "-" if v is None else f"{_num(row['ours'])}/{_num(v)}"
        if key == "rate":
            return _rate(v)
        if key == "p95":
            return "-" if v is None else _duration(v) if v >= 1 else f"{v * 1000:.0f}ms"
        if key == "fail":
            return _num(v, 1)
        return _num(v)
    if key == "pool":
        return f"{row['pool']}/{row['slot']}"
    if key == "job_seconds":
        if row["pid"] is None:
            return f"retry in {_duration(row['retry_in'])}" if row.get("retry_in") else "-"
        return f"{row['function']} {_duration(v)}" if row.get("function") else "-"
    if key == "rss":
        return _size(v)
    if key == "cpu":
        return _num(v, 1)
    return _num(v) if not isinstance(v, str) else v


def widths(columns: Sequence[Column], cols: int) -> list[int]:
    """Each column's width for a line of `cols` characters: the fixed ones as declared; of
    what is left, a -1 column takes 2/5 (8 to 16), the 0 column the rest (at least 8)."""
    rest = cols - sum(c.width for c in columns if c.width > 0) - (len(columns) - 1)
    share = min(16, max(8, rest * 2 // 5)) if any(c.width < 0 for c in columns) else 0
    return [c.width if c.width > 0 else share if c.width < 0 else max(8, rest - share)
            for c in columns]


def _fit(text: str, width: int, right: bool) -> str:
    if len(text) > width:
        text = text[:max(0, width - 1)] + "~"
    return text.rjust(width) if right else text.ljust(width)


def format_line(cells: Sequence[str], columns: Sequence[Column], ws: Sequence[int]) -> str:
    """Cells padded to their columns: numbers to the right, text to the left."""
    return " ".join(_fit(c, w, col.numeric and not col.left)
                    for c, col, w in zip(cells, columns, ws, strict=True))


# -- the view ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Action:
    """Something to ask the master: scale (pool, processes), silence (pool) or reload."""

    verb: str
    pool: str = ""
    processes: int = 0


@dataclass
class Screen:
    """One frame laid out: its lines (text, style) and the rows each pane shows, in order."""

    lines: list[tuple[str, str]]
    rows: dict[str, list[dict[str, Any]]]


@dataclass
class View:
    """What the operator chose: the focused pane, sort columns, filter, selections, the
    prompt being typed and the message line."""

    pane: str = "functions"
    sort: dict[str, int] = field(default_factory=lambda: {"functions": 0, "children": 0})
    filter: str = ""
    selected: dict[str, int] = field(default_factory=lambda: {"functions": 0, "children": 0})
    offset: dict[str, int] = field(default_factory=lambda: {"functions": 0, "children": 0})
    prompt: str = ""  # "filter" while typing one; "confirm" while asking y/n
    typed: str = ""
    confirm: Action | None = None
    message: str = ""
    quit: bool = False

    def selected_pool(self, shown: dict[str, list[dict[str, Any]]],
                      status: dict[str, Any] | None) -> tuple[str, int] | None:
        """The pool of the focused pane's selected row and its desired children."""
        rows = shown.get(self.pane) or []
        if not rows or status is None:
            return None
        row = rows[min(self.selected[self.pane], len(rows) - 1)]
        name = row["pool"] if self.pane == "children" else (row["pools"] or [None])[0]
        for pool in status.get("pools") or []:
            if pool.get("name") == name:
                return name, int(pool.get("desired") or 0)
        return None

    def key(self, key: str, shown: dict[str, list[dict[str, Any]]],
            status: dict[str, Any] | None) -> Action | None:
        """Apply one key (a character, or a name: UP DOWN PGUP PGDN HOME END TAB ENTER ESC
        BACKSPACE); returns what to ask the master, if anything."""
        if self.prompt == "filter":
            if key in ("ENTER", "\n", "\r"):
                self.filter, self.prompt = self.typed, ""
                self.selected = {p: 0 for p in PANES}
            elif key == "ESC":
                self.prompt = ""
            elif key == "BACKSPACE":
                self.typed = self.typed[:-1]
            elif len(key) == 1 and key.isprintable() and len(self.typed) < 64:
                self.typed += key
            return None
        if self.prompt == "confirm":
            action, self.prompt, self.confirm = self.confirm, "", None
            if key in ("y", "Y"):
                return action
            self.message = "cancelled"
            return None
        rows = shown.get(self.pane) or []
        if key == "q":
            self.quit = True
        elif key == "TAB":
            self.pane = PANES[(PANES.index(self.pane) + 1) % len(PANES)]
        elif key == "s":
            self.sort[self.pane] = (self.sort[self.pane] + 1) % len(COLUMNS[self.pane])
        elif key == "/":
            self.prompt, self.typed = "filter", self.filter
        elif key in ("UP", "k", "DOWN", "j", "PGUP", "PGDN", "HOME", "END"):
            step = {"UP": -1, "k": -1, "DOWN": 1, "j": 1, "PGUP": -10, "PGDN": 10,
                    "HOME": -10**9, "END": 10**9}[key]
            self.selected[self.pane] = max(0, min(len(rows) - 1,
                                                  self.selected[self.pane] + step))
        elif key in ("+", "-", "S"):
            found = self.selected_pool(shown, status)
            if found is None:
                self.message = "no pool selected (select a row of a pool of ours)"
                return None
            name, desired = found
            if key == "S":
                self.prompt, self.confirm = "confirm", Action("silence", name)
                return None
            want = desired + (1 if key == "+" else -1)
            if want < 0:
                self.message = f"{name} has no children to scale down"
                return None
            return Action("scale", name, want)
        elif key == "r":
            self.prompt, self.confirm = "confirm", Action("reload")
        return None


def _header(status: dict[str, Any] | None, link: str) -> str:
    if status is None:
        return f"gearvisor top  {link}"
    m = status.get("master") or {}
    pools = status.get("pools") or []
    ready = sum(p.get("ready") or 0 for p in pools)
    desired = sum(p.get("desired") or 0 for p in pools)
    text = (f"gearvisor top  master {m.get('pid')} {m.get('state')}  up "
            f"{_duration(m.get('uptime'))}  pools {len(pools)}  ready {ready}/{desired}")
    alerts = status.get("alerts")
    if alerts and (alerts.get("firing") or alerts.get("pending")):
        text += f"  alerts {alerts.get('firing', 0)} firing"
        if alerts.get("pending"):
            text += f" {alerts['pending']} pending"
    findings = status.get("findings")
    if findings:
        text += f"  findings {len(findings)}"
    return text + (f"  {link}" if link else "")


def _pane_lines(view: View, pane: str, rows: list[dict[str, Any]], height: int,
                cols: int) -> list[tuple[str, str]]:
    columns = COLUMNS[pane]
    ws = widths(columns, cols)
    sort = columns[view.sort[pane]]
    focused = view.pane == pane
    title = (f"{'>' if focused else ' '} {pane.upper()}  {len(rows)} shown  sort "
             f"{sort.title}" + (f"  filter '{view.filter}'" if view.filter else ""))
    titles = [c.title + ("*" if c is sort else "") for c in columns]
    lines = [(title, "title" if focused else "normal"),
             (format_line(titles, columns, ws), "header")]
    sel = min(view.selected[pane], max(0, len(rows) - 1))
    view.selected[pane] = sel
    off = view.offset[pane]
    off = min(max(off, sel - height + 1), sel)  # the selection stays in sight
    view.offset[pane] = max(0, off)
    for i, row in enumerate(rows[view.offset[pane]:view.offset[pane] + height]):
        style = "selected" if focused and view.offset[pane] + i == sel else (
            "alert" if row.get("alert") else "normal")
        lines.append((format_line([cell(pane, c.key, row) for c in columns], columns, ws),
                      style))
    lines += [("", "normal")] * (height - (len(lines) - 2))
    return lines


def screen(view: View, status: dict[str, Any] | None, r: Rates | None, cols: int,
           rows: int, link: str = "") -> Screen:
    """The whole terminal as lines: the header, the functions pane, the children pane, the
    message or prompt line and the help line; or one line when the terminal is too small.
    `link` says how the connection is (empty while frames arrive)."""
    if cols < MIN_COLS or rows < MIN_ROWS:
        return Screen([(f"terminal too small: {cols}x{rows}, gearvisor top needs "
                        f"{MIN_COLS}x{MIN_ROWS}"[:max(0, cols - 1)], "normal")],
                      {"functions": [], "children": []})
    shown: dict[str, list[dict[str, Any]]] = {}
    for pane, build in (("functions", function_rows), ("children", child_rows)):
        got = build(status, r) if status is not None else []
        got = filter_rows(got, pane, view.filter)
        shown[pane] = sort_rows(got, pane, COLUMNS[pane][view.sort[pane]])
    avail = rows - 7  # header, two title and two header lines, message, help
    fn_height = min(max(1, len(shown["functions"])), max(3, avail * 2 // 5))
    lines = [(_header(status, link), "dim" if link else "title")]
    lines += _pane_lines(view, "functions", shown["functions"], fn_height, cols)
    lines += _pane_lines(view, "children", shown["children"], avail - fn_height, cols)
    if view.prompt == "filter":
        bottom = f"filter (Enter applies, Esc cancels, empty clears): {view.typed}_"
    elif view.prompt == "confirm" and view.confirm is not None:
        bottom = f"{describe(view.confirm)}? y/N"
    else:
        bottom = view.message
    lines.append((bottom, "title" if view.prompt else "normal"))
    lines.append((HELP, "dim"))
    return Screen([(text[:cols], style) for text, style in lines], shown)


def describe(action: Action) -> str:
    """The action in words, for the confirmation and the message line."""
    if action.verb == "scale":
        return f"scale {action.pool} to {action.processes}"
    if action.verb == "silence":
        return f"silence pool={action.pool} for 1h"
    return "reload the config and roll every pool"


def payload(action: Action) -> dict[str, Any]:
    """The control request an action sends (the same verbs as `gearvisor scale`,
    `silence add` and `reload`)."""
    if action.verb == "scale":
        return {"verb": "scale", "pool": action.pool, "processes": action.processes}
    if action.verb == "silence":
        try:
            by = getpass.getuser()
        except (KeyError, OSError):
            by = ""
        return {"verb": "silence.add", "matchers": [f"pool={action.pool}"],
                "for": SILENCE_FOR, "comment": "gearvisor top", "by": by}
    return {"verb": "reload"}


def outcome(action: Action, reply: dict[str, Any]) -> str:
    """The message line for the master's reply to `action`."""
    if not reply.get("ok"):
        return f"{describe(action)}: {reply.get('error') or 'failed'}"
    if action.verb == "scale":
        return f"{reply.get('pool')}: {reply.get('before')} -> {reply.get('after')} processes"
    if action.verb == "silence":
        return f"silenced pool={action.pool} for 1h (id {reply.get('id')})"
    results = reply.get("pools") or {}
    return "reload: " + (", ".join(f"{n} {r.get('result')}" for n, r in results.items())
                         or "done")


# -- the connection ------------------------------------------------------------------------------


def _connect(path: str, timeout: float) -> socket.socket:
    """A connected control socket; OSError with a readable text otherwise."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    sock.settimeout(timeout)
    try:
        sock.connect(path)
    except FileNotFoundError:
        sock.close()
        raise OSError(errno.ENOENT, f"no control socket at {path}") from None
    except ConnectionRefusedError:
        sock.close()
        raise OSError(errno.ECONNREFUSED, f"nobody listens on {path}") from None
    except OSError:
        sock.close()
        raise
    return sock


class Stream:
    """The status subscription: connects, reads lines without blocking, keeps the newest
    frame, and after a loss reconnects with backoff (RECONNECT_FIRST doubling to
    RECONNECT_MAX)."""

    def __init__(self, path: str, interval: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.path = path
        self.interval = interval
        self.clock = clock
        self.sock: socket.socket | None = None
        self.buf = bytearray()
        self.attempts = 0
        self.retry_at = 0.0
        self.error = ""
        self.got_frame = False

    def fileno(self) -> int:
        return self.sock.fileno() if self.sock is not None else -1

    def state(self, now: float) -> str:
        """For the header: empty while frames arrive, else what is going on."""
        if self.sock is not None:
            return "" if self.got_frame else "connecting"
        wait = max(0.0, self.retry_at - now)
        return f"master gone, reconnecting in {wait:.1f}s ({self.error})"

    def due(self, now: float) -> float:
        """Seconds until the next connection attempt (0: now); inf while connected."""
        return float("inf") if self.sock is not None else max(0.0, self.retry_at - now)

    def connect(self) -> None:
        """One attempt: connect and subscribe; a failure schedules the next."""
        try:
            sock = _connect(self.path, CONNECT_TIMEOUT)
            sock.sendall(json.dumps({"verb": "subscribe",
                                     "interval": self.interval}).encode() + b"\n")
            sock.setblocking(False)
        except OSError as e:
            self._lost(e.strerror or str(e))
            return
        self.sock, self.got_frame = sock, False
        self.buf.clear()

    def _lost(self, why: str) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        self.buf.clear()
        self.error = why[:200]
        self.attempts += 1
        self.retry_at = self.clock() + min(RECONNECT_MAX,
                                           RECONNECT_FIRST * 2 ** min(self.attempts - 1, 16))

    def read(self) -> dict[str, Any] | None:
        """What the socket has: the newest whole status line's status, or None. Older lines
        read at once are skipped (only the newest is parsed)."""
        assert self.sock is not None
        try:
            data = self.sock.recv(1 << 20)
        except (BlockingIOError, InterruptedError):
            return None
        except OSError as e:
            self._lost(e.strerror or str(e))
            return None
        if not data:
            self._lost("the master closed the connection")
            return None
        self.buf += data
        end = self.buf.rfind(b"\n")
        if end < 0:
            if len(self.buf) > MAX_LINE:
                self._lost(f"a status line over {MAX_LINE} bytes")
            return None
        start = self.buf.rfind(b"\n", 0, end) + 1
        line = bytes(self.buf[start:end])
        del self.buf[:end + 1]
        try:
            reply = json.loads(line)
        except ValueError:
            self._lost("unreadable status line from the master")
            return None
        if not isinstance(reply, dict) or not reply.get("ok") or not isinstance(
                reply.get("status"), dict) or not isinstance(reply["status"].get("master"),
                                                             dict):
            error = reply.get("error") if isinstance(reply, dict) else None
            self._lost(str(error or "the master refused the subscription"))
            return None
        self.attempts, self.got_frame = 0, True
        return reply["status"]

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


class Pending:
    """One action's request, sent at once and answered while the view keeps running (a
    reload answers only when its roll is done)."""

    def __init__(self, path: str, action: Action, now: float) -> None:
        self.action = action
        self.deadline = now + (RELOAD_TIMEOUT if action.verb == "reload" else ACTION_TIMEOUT)
        self.buf = bytearray()
        self.result: str | None = None
        self.sock: socket.socket | None = None
        try:
            self.sock = _connect(path, CONNECT_TIMEOUT)
            self.sock.sendall(json.dumps(payload(action)).encode() + b"\n")
            self.sock.setblocking(False)
        except OSError as e:
            self._done(f"{describe(action)}: {e.strerror or e}")

    def fileno(self) -> int:
        return self.sock.fileno() if self.sock is not None else -1

    def _done(self, text: str) -> None:
        self.result = text
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def read(self) -> None:
        assert self.sock is not None
        try:
            data = self.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            self._done(f"{describe(self.action)}: {e.strerror or e}")
            return
        self.buf += data
        if data and b"\n" not in self.buf and len(self.buf) < MAX_LINE:
            return
        try:
            reply = json.loads(bytes(self.buf).split(b"\n", 1)[0])
        except ValueError:
            reply = None
        if not isinstance(reply, dict):
            self._done(f"{describe(self.action)}: no answer from the master")
        else:
            self._done(outcome(self.action, reply))

    def expire(self, now: float) -> None:
        if self.result is None and now >= self.deadline:
            self._done(f"{describe(self.action)}: no answer yet; see `gearvisor status`")


# -- the terminal --------------------------------------------------------------------------------


_KEYS = {"KEY_UP": "UP", "KEY_DOWN": "DOWN", "KEY_PPAGE": "PGUP", "KEY_NPAGE": "PGDN",
         "KEY_HOME": "HOME", "KEY_END": "END", "KEY_BACKSPACE": "BACKSPACE",
         "KEY_ENTER": "ENTER", "KEY_RESIZE": "RESIZE"}


def _key_name(key: str | int) -> str:
    """curses' get_wch() result as View.key() names it."""
    import curses

    if isinstance(key, int):
        return _KEYS.get(curses.keyname(key).decode(errors="replace"), "")
    return {"\t": "TAB", "\x1b": "ESC", "\x7f": "BACKSPACE", "\x08": "BACKSPACE",
            "\n": "ENTER", "\r": "ENTER"}.get(key, key)


def draw(scr: Any, shown: Screen, styles: dict[str, int]) -> None:
    """Erase, draw every line, one refresh: curses sends the terminal only what changed."""
    import curses

    scr.erase()
    height, width = scr.getmaxyx()
    for y, (text, style) in enumerate(shown.lines[:height]):
        attr = styles.get(style, 0)
        try:
            # The bottom-right cell cannot be written without an error from curses.
            scr.addnstr(y, 0, text.ljust(width) if style == "selected" else text,
                        width - (1 if y == height - 1 else 0), attr)
        except curses.error:
            pass
    scr.refresh()


def run_curses(scr: Any, path: str, interval: float) -> int:
    """The loop: wait for a status line, a key, an answer or a reconnection, then redraw."""
    import curses

    with contextlib.suppress(curses.error):
        curses.curs_set(0)
    styles = {"title": curses.A_BOLD, "header": curses.A_UNDERLINE, "dim": curses.A_DIM,
              "selected": curses.A_REVERSE, "alert": curses.A_BOLD}
    scr.nodelay(True)
    scr.keypad(True)
    stream = Stream(path, interval)
    history = History(window=max(RATE_WINDOW, interval * 1.5))
    view = View()
    pending: list[Pending] = []
    shown: Screen | None = None
    dirty = True
    try:
        while not view.quit:
            now = time.monotonic()
            if stream.due(now) == 0.0:
                stream.connect()
                dirty = True
            if dirty:
                status = history.newest
                rows, cols = scr.getmaxyx()
                shown = screen(view, status, rates(history.base, status) if status else None,
                               cols, rows, stream.state(now))
                draw(scr, shown, styles)
                dirty = False
            # At most 0.25 s asleep: a resize and the reconnect countdown show promptly.
            fds = [sys.stdin.fileno(), *(o.fileno() for o in (stream, *pending)
                                         if o.fileno() >= 0)]
            try:
                ready, _, _ = select.select(fds, [], [], min(0.25, stream.due(now)))
            except InterruptedError:
                ready = []
            if stream.sock is not None and stream.fileno() in ready:
                got = stream.read()
                if got is not None:
                    history.add(got)
                dirty = True
            for p in list(pending):
                if p.sock is not None and p.fileno() in ready:
                    p.read()
                p.expire(time.monotonic())
                if p.result is not None:
                    view.message = p.result
                    pending.remove(p)
                    dirty = True
            if stream.sock is None:
                dirty = True  # the countdown moves
            while True:
                try:
                    key = scr.get_wch()
                except curses.error:
                    break  # no more input
                dirty = True
                name = _key_name(key)
                if name in ("", "RESIZE"):
                    continue
                action = view.key(name, shown.rows if shown else {}, history.newest)
                if action is not None:
                    view.message = f"{describe(action)}..."
                    pending.append(Pending(path, action, time.monotonic()))
    finally:
        stream.close()
        for p in pending:
            if p.sock is not None:
                p.sock.close()
    return 0


def parse_interval(text: str) -> float:
    """--interval: a duration from 0.1s to 1h (what `subscribe` takes)."""
    from gearvisor.config.errors import Invalid
    from gearvisor.config.values import duration

    try:
        seconds = duration(text)
    except Invalid as e:
        raise argparse.ArgumentTypeError(f"{text!r}: {e}") from None
    if not 0.1 <= seconds <= 3600:
        raise argparse.ArgumentTypeError(f"{text!r}: expected 100ms to 1h")
    return float(seconds)


def add_parser(control: Callable[[str, str], argparse.ArgumentParser]) -> None:
    """`gearvisor top`, built with cli.main's `control` (adds -c and --socket)."""
    top = control("top", "a live view of the functions and children (keys at the bottom)")
    top.add_argument("--interval", type=parse_interval, default=1.0, metavar="DURATION",
                     help="how often the master sends a frame (default 1s; 100ms to 1h)")


def run(path: str, interval: float) -> int:
    """Carry out `gearvisor top` on the master at control socket `path`."""
    if not (sys.stdin.isatty() and sys.stdout.isatty()):
        print("gearvisor top: needs a terminal (stdin and stdout); for scripts use "
              "`gearvisor status --json`", file=sys.stderr)
        return 2
    import curses

    os.environ.setdefault("ESCDELAY", "25")  # Esc cancels a prompt at once
    try:
        return curses.wrapper(run_curses, path, interval)
    except KeyboardInterrupt:
        return 0
    except curses.error as e:
        print(f"gearvisor top: cannot use this terminal ({e}); check $TERM", file=sys.stderr)
        return 2
