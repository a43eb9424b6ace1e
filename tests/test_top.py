"""`gearvisor top`'s view logic with fake statuses: frames and rates, rows, sorting,
filtering, keys and the laid-out screen (no curses, no master); and its stream client
against a fake master socket (reconnection with backoff)."""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

import pytest

from gearvisor.cli import top


def status(up: float, *, pid: int = 10, done: int = 5, cpu: float = 1.0, ok: int = 10,
           error: int = 2, jobs: bool = True, firing: list | None = None) -> dict[str, Any]:
    """A status as the master streams it: one pool `images` (resize) with a busy child and
    a backing-off slot, a foreign function `legacy`, metrics' job counters."""
    out: dict[str, Any] = {
        "master": {"pid": pid, "state": "running", "uptime": up},
        "alerts": {"firing": len(firing or []), "pending": 0, "firing_labels": firing or []},
        "pools": [{"name": "images", "desired": 2, "ready": 1, "children": [
            {"slot": 0, "pid": 101, "state": "busy", "role": "serving", "function": "resize",
             "job_seconds": 1.5, "jobs_done": done, "jobs_failed": 1, "restarts": 0,
             "rss": 40 << 20, "cpu": cpu},
            {"slot": 1, "pid": None, "state": "backoff", "role": "empty", "retry_in": 2.0,
             "restarts": 3}]}],
        "functions": [
            {"function": "resize", "server": "a:1", "pools": ["images"], "waiting": 5,
             "running": 1, "workers_ours": 1, "workers_all": 2},
            {"function": "resize", "server": "b:1", "pools": ["images"], "waiting": 3,
             "running": 0, "workers_ours": 1, "workers_all": 1},
            {"function": "legacy", "server": "a:1", "pools": [], "waiting": 14, "running": 0,
             "workers_ours": 0, "workers_all": 0}]}
    if jobs:
        out["jobs"] = [{"pool": "images", "function": "resize",
                        "outcomes": {"success": ok, "error": error, "crash": 0},
                        "bounds": [0.1, 1.0], "buckets": [ok, error, 0]}]
    return out


# -- frames and rates ----------------------------------------------------------------------------


def test_rates_between_two_frames_use_the_masters_clock() -> None:
    r = top.rates(status(10.0, done=5, cpu=1.0, ok=10), status(12.0, done=25, cpu=1.5, ok=30,
                                                               error=7))
    assert r is not None and r.span == 2.0
    assert r.cpu == {101: 25.0}
    assert r.pool_jobs == {"images": (10.0, 0.0)}
    fr = r.functions["resize"]
    assert fr.jobs == 12.5  # 20 successes + 5 errors in 2 s
    assert fr.failed_pct == 20.0
    assert fr.p95 == 1.0  # 20 jobs <= 0.1s, 5 <= 1s: the 95th is in the 1 s bucket


def test_no_rates_without_a_span() -> None:
    assert top.rates(None, status(1.0)) is None
    assert top.rates(status(5.0), status(5.0)) is None


def test_a_counter_that_went_back_was_reset_and_a_new_child_counts_whole() -> None:
    old = status(10.0, ok=100)
    new = status(11.0, ok=4, error=0)  # the histogram restarted (a reload changed buckets)
    new["pools"][0]["children"][0]["pid"] = 202  # another child: born within the span
    r = top.rates(old, new)
    assert r is not None
    assert r.functions["resize"].jobs == 4.0
    assert r.cpu == {202: 100.0}  # all of its 1.0 CPU second in the 1 s span
    assert r.pool_jobs["images"] == (6.0, 1.0)  # 5 done + 1 failed since it was born


def test_history_spans_the_window_and_starts_over_for_another_master() -> None:
    h = top.History(window=5.0)
    for t in range(10):
        h.add(status(float(t)))
    assert h.newest["master"]["uptime"] == 9.0
    assert h.base["master"]["uptime"] == 4.0  # the newest frame at or before 9 - 5
    h.add(status(10.0, pid=11))  # the master restarted: its counters did too
    assert h.base is None
    h.add(status(11.0, pid=11))
    h.add(status(3.0, pid=11))  # back in time: start over
    assert h.base is None and len(h.frames) == 1


def test_history_is_bounded() -> None:
    h = top.History(window=1e9, limit=8)
    for t in range(100):
        h.add(status(float(t)))
    assert len(h.frames) == 8


# -- rows ----------------------------------------------------------------------------------------


def test_function_rows_sum_servers_and_carry_rates_and_alerts() -> None:
    old, new = status(10.0), status(12.0, ok=30, firing=[
        {"alertname": "PoisonJob", "pool": "images", "function": "resize"}])
    rows = {r["function"]: r for r in top.function_rows(new, top.rates(old, new))}
    resize = rows["resize"]
    assert (resize["waiting"], resize["running"], resize["ours"], resize["all"]) == (8, 1, 1, 2)
    assert resize["rate"] == 10.0 and resize["fail"] == 0.0 and resize["alert"]
    legacy = rows["legacy"]
    assert legacy["rate"] is None and legacy["p95"] is None and not legacy["alert"]


def test_a_pool_alert_marks_its_functions() -> None:
    new = status(1.0, firing=[{"alertname": "CrashLoop", "pool": "images", "function": None}])
    rows = {r["function"]: r["alert"] for r in top.function_rows(new, None)}
    assert rows == {"resize": True, "legacy": False}


def test_without_metrics_a_single_function_pool_lends_its_childrens_rate() -> None:
    old, new = status(10.0, jobs=False), status(12.0, done=25, jobs=False)
    [resize] = [r for r in top.function_rows(new, top.rates(old, new))
                if r["function"] == "resize"]
    assert resize["rate"] == 10.0 and resize["fail"] == 0.0 and resize["p95"] is None
    new["functions"].append({"function": "thumb", "server": "a:1", "pools": ["images"],
                             "waiting": 0, "running": 0, "workers_ours": 1,
                             "workers_all": 1})
    rows = {r["function"]: r for r in top.function_rows(new, top.rates(old, new))}
    assert rows["resize"]["rate"] is None  # two functions: whose jobs were they?


def test_child_rows() -> None:
    old, new = status(10.0), status(12.0, cpu=1.5)
    busy, empty = top.child_rows(new, top.rates(old, new))
    assert busy == {"pool": "images", "slot": 0, "pid": 101, "state": "busy",
                    "function": "resize", "job_seconds": 1.5, "done": 5, "failed": 1,
                    "restarts": 0, "rss": 40 << 20, "retry_in": None, "cpu": 25.0}
    assert empty["pid"] is None and empty["state"] == "backoff" and empty["restarts"] == 3
    assert top.cell("children", "job_seconds", empty) == "retry in 2.0s"
    assert top.cell("children", "job_seconds", busy) == "resize 1.5s"


def rows_of(pids_done: list[tuple[int, int | None]]) -> list[dict[str, Any]]:
    return [{"pool": "p", "slot": i, "pid": pid, "done": done}
            for i, (pid, done) in enumerate(pids_done)]


def test_sort_numbers_largest_first_unknown_last_ties_in_slot_order() -> None:
    rows = rows_of([(1, 5), (2, None), (3, 9), (4, 5)])
    done = next(c for c in top.CHILD_COLUMNS if c.key == "done")
    assert [r["pid"] for r in top.sort_rows(rows, "children", done)] == [3, 1, 4, 2]
    pool = top.CHILD_COLUMNS[0]
    assert [r["pid"] for r in top.sort_rows(rows[::-1], "children", pool)] == [1, 2, 3, 4]


def test_filter_matches_any_named_field_case_insensitively() -> None:
    rows = top.function_rows(status(1.0), None)
    assert [r["function"] for r in top.filter_rows(rows, "functions", "IMAG")] == ["resize"]
    assert [r["function"] for r in top.filter_rows(rows, "functions", "leg")] == ["legacy"]
    assert top.filter_rows(rows, "functions", "") == rows
    kids = top.child_rows(status(1.0), None)
    assert [r["slot"] for r in top.filter_rows(kids, "children", "backoff")] == [1]


# -- keys ----------------------------------------------------------------------------------------


def shown_for(view: top.View, st: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    return top.screen(view, st, None, 100, 30).rows


def test_keys_switch_panes_sort_and_quit() -> None:
    view, st = top.View(), status(1.0)
    view.key("TAB", shown_for(view, st), st)
    assert view.pane == "children"
    for _ in range(len(top.CHILD_COLUMNS)):
        view.key("s", shown_for(view, st), st)
    assert view.sort["children"] == 0  # the cycle comes round
    view.key("s", shown_for(view, st), st)
    assert "PID*" in "\n".join(t for t, _ in top.screen(view, st, None, 100, 30).lines)
    view.key("q", {}, st)
    assert view.quit


def test_filter_prompt_applies_on_enter_and_esc_cancels() -> None:
    view, st = top.View(), status(1.0)
    view.key("/", {}, st)
    for ch in "leg":
        view.key(ch, {}, st)
    view.key("BACKSPACE", {}, st)
    view.key("g", {}, st)
    assert view.filter == ""  # not yet
    view.key("ENTER", {}, st)
    assert view.filter == "leg" and view.prompt == ""
    assert [r["function"] for r in shown_for(view, st)["functions"]] == ["legacy"]
    view.key("/", {}, st)
    view.key("x", {}, st)
    view.key("ESC", {}, st)
    assert view.filter == "leg"


def test_plus_and_minus_scale_the_selected_rows_pool() -> None:
    view, st = top.View(pane="children"), status(1.0)
    assert view.key("+", shown_for(view, st), st) == top.Action("scale", "images", 3)
    assert view.key("-", shown_for(view, st), st) == top.Action("scale", "images", 1)
    view = top.View()  # functions pane: the selected function's pool
    view.key("DOWN", shown_for(view, st), st)  # legacy -> resize
    assert view.key("+", shown_for(view, st), st) == top.Action("scale", "images", 3)
    view.key("UP", shown_for(view, st), st)  # legacy: no pool of ours
    assert view.key("+", shown_for(view, st), st) is None
    assert "no pool selected" in view.message


def test_reload_and_silence_ask_first() -> None:
    view, st = top.View(pane="children"), status(1.0)
    assert view.key("r", shown_for(view, st), st) is None
    assert "reload the config" in top.screen(view, st, None, 80, 24).lines[-2][0]
    assert view.key("y", {}, st) == top.Action("reload")
    assert view.key("S", shown_for(view, st), st) is None
    assert view.key("n", {}, st) is None and view.message == "cancelled"
    view.key("S", shown_for(view, st), st)
    action = view.key("Y", {}, st)
    assert action == top.Action("silence", "images")
    assert top.payload(action)["matchers"] == ["pool=images"]
    assert top.payload(action)["for"] == 3600.0


def test_outcome_messages() -> None:
    scale = top.Action("scale", "images", 3)
    assert top.outcome(scale, {"ok": True, "pool": "images", "before": 2, "after": 3}) == (
        "images: 2 -> 3 processes")
    assert top.outcome(scale, {"ok": False, "error": "no pool named 'x'"}) == (
        "scale images to 3: no pool named 'x'")
    assert top.outcome(top.Action("reload"), {"ok": True, "pools": {
        "images": {"result": "rolled"}}}) == "reload: images rolled"


# -- the screen ----------------------------------------------------------------------------------


@pytest.mark.parametrize("cols,rows", [(80, 24), (100, 30), (200, 60)])
def test_screen_fills_the_terminal_and_no_line_is_wider(cols: int, rows: int) -> None:
    st = status(12.0, firing=[{"alertname": "x", "pool": None, "function": "resize"}])
    lines = top.screen(top.View(), st, top.rates(status(10.0), st), cols, rows).lines
    assert len(lines) == rows
    assert all(len(text) <= cols for text, _ in lines)
    text = "\n".join(t for t, _ in lines)
    assert "! resize" in text and "images/0" in text and "101" in text
    assert lines[-1][0] == top.HELP
    assert "alerts 1 firing" in lines[0][0]


def test_a_small_terminal_gets_one_line() -> None:
    for cols, rows in ((79, 24), (80, 23), (10, 5)):
        lines = top.screen(top.View(), status(1.0), None, cols, rows).lines
        assert len(lines) == 1 and lines[0][0].startswith("terminal too small"[:cols - 1])
        assert len(lines[0][0]) < cols


def test_the_selection_stays_in_sight_when_rows_outnumber_the_pane() -> None:
    st = status(1.0)
    st["pools"][0]["children"] = [
        {"slot": i, "pid": 1000 + i, "state": "idle", "role": "serving", "jobs_done": 0,
         "jobs_failed": 0, "restarts": 0, "rss": 1, "cpu": 0.0} for i in range(40)]
    view = top.View(pane="children")
    for _ in range(39):
        view.key("DOWN", shown_for(view, st), st)
    text = "\n".join(t for t, _ in top.screen(view, st, None, 80, 24).lines)
    assert "images/39" in text and "images/0 " not in text


# -- the stream ----------------------------------------------------------------------------------


def test_stream_reads_the_newest_frame_and_reconnects_with_backoff(tmp_path: Path) -> None:
    path = str(tmp_path / "s.sock")
    now = [100.0]
    stream = top.Stream(path, 0.5, clock=lambda: now[0])
    stream.connect()  # nobody listens yet
    assert stream.sock is None and stream.retry_at == 100.0 + top.RECONNECT_FIRST
    assert "master gone, reconnecting" in stream.state(now[0])
    stream.connect()
    assert stream.retry_at == 100.0 + 2 * top.RECONNECT_FIRST  # doubled
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(1)
    try:
        stream.connect()
        conn, _ = server.accept()
        conn.settimeout(5)
        assert json.loads(conn.recv(1000)) == {"verb": "subscribe", "interval": 0.5}
        lines = b"".join(json.dumps({"ok": True, "status": status(t)}).encode() + b"\n"
                         for t in (1.0, 2.0))
        conn.sendall(lines + b'{"ok": true, "sta')  # two frames and half of a third
        got = None
        for _ in range(100):
            got = got or stream.read()
            if got is not None:
                break
        assert got is not None and got["master"]["uptime"] == 2.0  # the newest whole one
        assert stream.attempts == 0 and stream.state(now[0]) == ""
        conn.close()  # the master went away
        for _ in range(100):
            stream.read()
            if stream.sock is None:
                break
        assert stream.sock is None and stream.error == "the master closed the connection"
        assert stream.retry_at == now[0] + top.RECONNECT_FIRST  # a frame reset the backoff
    finally:
        server.close()
        stream.close()


def test_stream_refusal_is_shown_and_retried(tmp_path: Path) -> None:
    path = str(tmp_path / "s.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(1)
    stream = top.Stream(path, 1.0)
    try:
        stream.connect()
        conn, _ = server.accept()
        conn.sendall(b'{"ok": false, "error": "refused: uid 5 may not control this master"}\n')
        for _ in range(100):
            stream.read()
            if stream.sock is None:
                break
        assert stream.sock is None and "refused: uid 5" in stream.error
        conn.close()
    finally:
        server.close()
        stream.close()


def test_interval_argument() -> None:
    assert top.parse_interval("200ms") == 0.2
    assert top.parse_interval("1s") == 1.0
    for bad in ("50ms", "2h", "soon"):
        with pytest.raises(Exception, match=repr(bad)):
            top.parse_interval(bad)


def test_top_without_a_master_says_so_and_exits_3(tmp_path: Path) -> None:
    """As `gearvisor status` does; before, it showed "master gone, reconnecting" forever."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "gearvisor", "top", "--socket",
                          str(tmp_path / "none.sock")], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 3 and "no gearvisor master is running" in out.stderr, out.stderr
