"""Integration: file watching rolls the pools whose files changed, against a real gearmand.

Real files, a real master and its real watcher helper (watchfiles). Every wait polls a
condition until a deadline; "only one roll" is proven by ordering, not by waiting: after the
burst has rolled, a change to another pool is made and waited for, so a second roll of the
first pool, had one been coming, would have come before it.
"""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

import psutil
import pytest
from conftest import HOST, REPO, wait_equal, wait_for, write_module
from workload import (
    CapacityWatch,
    Load,
    registered_count,
    results_by_unique,
    versions_seen,
    write_version,
)

from gearvisor.gearman.client import Client

pytestmark = pytest.mark.integration

QUIET = "200ms"  # watch_debounce: short, so the tests are quick; its logic is unit-tested
OTHER = '''\
def name(job):
    return {tag!r}
'''


def pool(m, name: str) -> dict:
    return next(p for p in m.status()["pools"] if p["name"] == name)


def settled_at(m, name: str, generation: int):
    """A condition: pool `name` is at `generation`, not rolling, every child ready."""
    def check():
        p = pool(m, name)
        return (p["generation"] == generation and not p["rolling"]
                and p["ready"] == p["desired"]) and p
    return check


def rolls(m, name: str) -> int:
    return sum(1 for e in m.events("rolling pool to a new generation") if e.get("pool") == name)


def write_other(directory: Path, tag: str) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "othermod.py").write_text(OTHER.format(tag=tag))
    for pyc in (directory / "__pycache__").glob("othermod.*"):
        pyc.unlink()  # a stale .pyc of the same size and second would win (see README)


def serving(gearmand, pool: str | None = None) -> int:
    """Connections gearmand lists with functions registered (of one pool, or all)."""
    return sum(1 for w in gearmand.workers(pool) if w.functions)


def call(gearmand, function: str, payload: str = "{}") -> bytes:
    with Client(HOST, gearmand.port, timeout=20) as c:
        r = c.call(function, payload)
    assert r.ok, r
    return r.data


def two_pools(gearmand, tmp_path: Path, processes: int = 4, **extra) -> dict:
    """Pool "ver" (tmp/a/vermod.py, `work`) and pool "other" (tmp/b/othermod.py, `name`),
    each module in its own directory, so each pool watches only its own files."""
    (tmp_path / "a").mkdir(exist_ok=True)
    write_version(tmp_path / "a", "v1")
    write_other(tmp_path / "b", "o1")
    return {
        "servers": [gearmand.address],
        "pythonpath": [str(REPO), str(tmp_path / "a"), str(tmp_path / "b")],
        "watch_debounce": QUIET,
        "pools": {
            "ver": {"processes": processes, "functions": {"work": "vermod:work"},
                    "env": {"RESULTS": str(tmp_path / "results.txt")}},
            "other": {"processes": 2, "functions": {"name": "othermod:name"}},
        },
        **extra,
    }


def version_pool(gearmand, master, pool: str, module: str, directory: Path,
                 processes: int = 1):
    """A master with one pool serving `version` from `module` found in `directory`, its
    children registered and its watcher up."""
    m = master({"servers": [gearmand.address], "watch_debounce": QUIET,
                "pythonpath": [str(REPO), str(directory)],
                "pools": {pool: {"processes": processes,
                                 "functions": {"version": f"{module}:version"}}}})
    wait_for(lambda: serving(gearmand, pool) == processes, timeout=20, message="registered")
    wait_for(lambda: m.status()["watcher"]["state"] == "watching", message="watcher up")
    return m


def start(gearmand, master, cfg: dict, total: int):
    m = master(cfg)
    wait_for(lambda: serving(gearmand) == total, timeout=20,
             message=f"{total} children registered in gearmand")
    wait_for(lambda: m.status()["watcher"]["state"] == "watching", message="watcher up")
    return m


def test_editing_a_module_rolls_only_its_pool_and_loses_nothing(gearmand, master, tmp_path):
    m = start(gearmand, master, two_pools(gearmand, tmp_path), total=6)
    other_pids = {c["pid"] for c in pool(m, "other")["children"]}
    capacity = CapacityWatch(gearmand)
    bg = Load(gearmand, background=True, tag="bg")
    fg = Load(gearmand, background=False, tag="fg")
    for t in (capacity, bg, fg):
        t.start()
    try:
        wait_for(lambda: len(fg.results) >= 5 and len(bg.submitted) >= 20, timeout=20,
                 message="load running on v1")
        write_version(tmp_path / "a", "v2")  # the edit; no `gearvisor reload`
        wait_for(lambda: any(d == b"v2" for _, _, d in fg.results[-3:]), timeout=20,
                 message="foreground results from v2")
        wait_for(settled_at(m, "ver", 2), timeout=20, message="pool ver rolled to gen 2")
    finally:
        bg.stop()
        fg.stop()
        capacity.stop()
    assert bg.error is None and fg.error is None, (bg.error, fg.error)
    wait_for(lambda: set(results_by_unique(tmp_path)) >= set(bg.submitted), timeout=30,
             message="every background job done")
    counts = results_by_unique(tmp_path)
    assert [u for u in bg.submitted + fg.submitted if counts[u] != 1] == []
    assert all(ok for _, ok, _ in fg.results), "a foreground job failed"
    assert versions_seen(tmp_path) == {"v1", "v2"}
    assert capacity.samples > 10 and capacity.low >= 4, f"capacity fell to {capacity.low}"
    # Only the edited pool rolled: the other kept its generation and its processes.
    other = pool(m, "other")
    assert other["generation"] == 1
    assert {c["pid"] for c in other["children"]} == other_pids
    assert rolls(m, "ver") == 1 and rolls(m, "other") == 0
    changed = m.events("files changed; rolling once they are quiet")
    assert changed and all(e["pools"] == ["ver"] for e in changed)
    assert call(gearmand, "name") == b"o1"


def test_two_hundred_files_changed_at_once_roll_once(gearmand, master, tmp_path):
    pkg = tmp_path / "pkg"
    for i in range(20):
        (pkg / f"sub{i}").mkdir(parents=True)
    cfg = two_pools(gearmand, tmp_path, processes=2, watch_debounce="1s")
    cfg["pools"]["ver"]["watch"] = ["pkg/**/*.py"]  # relative to the config file
    m = start(gearmand, master, cfg, total=4)
    # A deploy: 200 files in 20 directories, written in 10 bursts 0.1 s apart (pacing, like
    # rsync over a slow link), so the helper reports several batches and only the 1 s quiet
    # period makes them one roll.
    pause = threading.Event()
    for i in range(200):
        (pkg / f"sub{i % 20}" / f"m{i}.py").write_text(f"X = {i}\n")
        if i % 20 == 19:
            pause.wait(0.1)
    wait_for(settled_at(m, "ver", 2), timeout=20, message="pool ver rolled once")
    # Ordering, not waiting: a later change to the other pool rolls it; any second roll of
    # "ver" from the burst would have been applied by then.
    write_other(tmp_path / "b", "o2-changed")
    wait_for(settled_at(m, "other", 2), timeout=20, message="pool other rolled")
    assert pool(m, "ver")["generation"] == 2
    assert rolls(m, "ver") == 1
    batches = [e for e in m.events("files changed; rolling once they are quiet")
               if e["pools"] == ["ver"]]
    assert len(batches) > 1  # the helper did report the burst in pieces...
    assert sum(e["files"] for e in batches) >= 200  # ...and saw every file; still one roll
    assert call(gearmand, "name") == b"o2-changed"


def test_symlink_swap_of_a_release_directory_loads_the_new_code(gearmand, master, tmp_path):
    for release in ("1", "2"):
        (tmp_path / "releases" / release).mkdir(parents=True)
        write_module(tmp_path / "releases" / release, "relmod",
                     f"def version(job):\n    return 'release-{release}'\n")
    current = tmp_path / "current"
    current.symlink_to(tmp_path / "releases" / "1")
    m = version_pool(gearmand, master, "rel", "relmod", current, processes=2)
    assert call(gearmand, "version") == b"release-1"
    # The atomic deploy: a new link renamed over the old one.
    (tmp_path / "current.new").symlink_to(tmp_path / "releases" / "2")
    os.rename(tmp_path / "current.new", current)
    wait_for(settled_at(m, "rel", 2), timeout=20, message="pool rel rolled after the swap")
    assert call(gearmand, "version") == b"release-2"
    assert [e["why"] for e in m.events("files changed; rolling once they are quiet")] == [
        "moved"]


def test_an_invalid_config_edit_is_refused_and_the_fleet_is_unchanged(gearmand, master,
                                                                       tmp_path):
    cfg = two_pools(gearmand, tmp_path, processes=2)
    m = start(gearmand, master, cfg, total=4)
    before = {(c["pid"], c["generation"]) for p in m.status()["pools"] for c in p["children"]}
    m.write_config({**cfg, "pools": {**cfg["pools"], "ver": {**cfg["pools"]["ver"],
                                                             "processes": "eight"}}})
    refused = wait_for(lambda: m.events("reload refused: invalid config; the fleet keeps its "
                                        "old config"), timeout=20, message="refusal logged")
    assert refused[0]["trigger"] == "config file changed"
    assert "pools.ver.processes" in refused[0]["error"]
    after = {(c["pid"], c["generation"]) for p in m.status()["pools"] for c in p["children"]}
    assert after == before
    assert serving(gearmand) == 4
    assert m.status()["master"]["reloads"] == 0
    assert call(gearmand, "name") == b"o1"


def test_a_config_edit_that_adds_a_pool_starts_it(gearmand, master, tmp_path):
    cfg = two_pools(gearmand, tmp_path, processes=2)
    m = start(gearmand, master, cfg, total=4)
    cfg["pools"]["text"] = {"processes": 3, "functions": {"reverse": "examples.text:reverse"}}
    m.write_config(cfg)
    wait_for(lambda: serving(gearmand, "text") == 3, timeout=20,
             message="the added pool registered in gearmand")
    assert {p["name"] for p in m.status()["pools"]} == {"ver", "other", "text"}
    assert m.events("pool added")
    assert call(gearmand, "reverse", "abc") == b"cba"


def test_a_killed_watcher_is_restarted_and_still_watches(gearmand, master, tmp_path):
    m = start(gearmand, master, two_pools(gearmand, tmp_path, processes=2), total=4)
    old = m.watcher()
    assert old is not None and old.ppid() == m.pid
    assert m.status()["watcher"]["pid"] == old.pid
    old.kill()
    status = wait_for(lambda: (w := m.status()["watcher"])["state"] == "watching"
                      and w["pid"] not in (None, old.pid) and w, timeout=20,
                      message="a new watcher")
    assert status["restarts"] == 1
    died = m.events("file watcher died; restarting it with backoff (the fleet keeps running)")
    assert died and died[0]["status"] == "killed by SIGKILL"
    assert psutil.Process(status["pid"]).cmdline()[0] == "gearvisor: watcher"
    write_other(tmp_path / "b", "o3-after-restart")
    wait_for(settled_at(m, "other", 2), timeout=20, message="the new watcher saw the edit")
    assert call(gearmand, "name") == b"o3-after-restart"


def test_a_missing_watch_path_is_reported_and_watched_once_it_appears(gearmand, master,
                                                                      tmp_path):
    cfg = two_pools(gearmand, tmp_path, processes=2)
    cfg["pools"]["other"]["watch"] = ["later/*.py"]
    m = start(gearmand, master, cfg, total=4)
    watcher = m.status()["watcher"]
    assert watcher["missing"] == [str(tmp_path / "later")]
    warned = m.events("watched path does not exist; it is checked again every second and "
                      "watched once it appears")
    assert warned and warned[0]["missing"] == [str(tmp_path / "later")]
    assert serving(gearmand) == 4  # the fleet runs regardless
    (tmp_path / "later").mkdir()
    (tmp_path / "later" / "x.py").write_text("X = 1\n")
    wait_for(settled_at(m, "other", 2), timeout=20, message="the appearing path rolled it")
    # The helper reports the change first, then rebuilds its watches and says what it
    # watches now: poll that report.
    wait_equal(lambda: m.status()["watcher"]["missing"], [], message="missing paths")


def test_stop_takes_the_watcher_down_too(gearmand, master, tmp_path):
    m = start(gearmand, master, two_pools(gearmand, tmp_path, processes=2), total=4)
    watcher = m.watcher()
    assert watcher is not None
    m.signal(signal.SIGTERM)
    assert m.wait_exit() == 0
    wait_for(lambda: not watcher.is_running() or watcher.status() == psutil.STATUS_ZOMBIE,
             message="watcher gone")
    # gearmand drops a connection once it has read its end of file: poll.
    wait_equal(lambda: registered_count(gearmand), 0, message="registered in gearmand")


def test_a_directory_replaced_by_rename_rolls_and_stays_watched(gearmand, master, tmp_path):
    """A deploy that swaps directories, not symlinks: mv app app.old && mv app.new app."""
    app = tmp_path / "app"
    app.mkdir()
    write_module(app, "relmod", "def version(job):\n    return 'v1'\n")
    m = version_pool(gearmand, master, "rel", "relmod", app, processes=1)
    new = tmp_path / "app.new"
    new.mkdir()
    write_module(new, "relmod", "def version(job):\n    return 'v2-longer'\n")
    os.rename(app, tmp_path / "app.old")
    os.rename(new, app)
    wait_for(settled_at(m, "rel", 2), timeout=20, message="rolled after the swap")
    assert call(gearmand, "version") == b"v2-longer"
    # The new directory is watched: a later edit in it rolls again.
    write_module(app, "relmod", "def version(job):\n    return 'v3-even-longer'\n")
    wait_for(settled_at(m, "rel", 3), timeout=20, message="rolled after an edit")
    assert call(gearmand, "version") == b"v3-even-longer"


def test_a_symlinked_config_file_is_reloaded_when_its_target_changes(gearmand, master,
                                                                    tmp_path):
    """-c /etc/...yaml -> /srv/app/current/conf/...yaml, or a Kubernetes ConfigMap."""
    cfg = two_pools(gearmand, tmp_path, processes=2)
    m = master(cfg, start=False)
    real = tmp_path / "release" / "pools.yaml"
    real.parent.mkdir()
    real.write_text(m.config_path.read_text())
    m.config_path.unlink()
    m.config_path.symlink_to(real)
    m.start()
    wait_for(lambda: serving(gearmand) == 4, timeout=20, message="registered")
    wait_for(lambda: m.status()["watcher"]["state"] == "watching", message="watcher up")
    cfg["pools"]["text"] = {"processes": 1, "functions": {"reverse": "examples.text:reverse"}}
    m.write_config(cfg)  # writes through the link into the target
    wait_for(lambda: serving(gearmand, "text") == 1, timeout=20, message="pool added")
    assert any(e["trigger"] == "config file changed" for e in m.events(
        "reloading: rolling every pool to new code and config"))


def test_code_under_a_virtualenv_directory_is_watched(gearmand, master, tmp_path):
    """watchfiles ignores .venv; that must apply below the watched root, not above it."""
    lib = tmp_path / ".venv" / "lib" / "site-packages"
    lib.mkdir(parents=True)
    write_module(lib, "venvmod", "def version(job):\n    return 'v1'\n")
    m = version_pool(gearmand, master, "v", "venvmod", lib, processes=1)
    write_module(lib, "venvmod", "def version(job):\n    return 'v2-longer'\n")
    wait_for(settled_at(m, "v", 2), timeout=20, message="rolled")
    assert call(gearmand, "version") == b"v2-longer"


def follows_imports(m, pool_name: str, *directories: Path):
    """A condition: the pool's children reported their imports and the (restarted) watcher
    watches every one of `directories`."""
    def check():
        w = m.status()["watcher"]
        return (w["state"] == "watching" and w.get("modules", {}).get(pool_name)
                and {str(d) for d in directories} <= set(w["paths"]) and w)
    return check


def test_editing_a_module_the_code_imports_rolls_the_pool(gearmand, master, tmp_path):
    """app/tasks.py imports app/lib/images.py (lib: a namespace package) and helpers.py from
    another pythonpath directory: the children report what they imported, so an edit to
    either rolls the pool, though neither is in the function module's directory."""
    app, lib, shared = tmp_path / "app", tmp_path / "app" / "lib", tmp_path / "shared"
    lib.mkdir(parents=True)
    shared.mkdir()
    (app / "__init__.py").write_text("")
    write_module(lib, "images", "VERSION = 'images-1'\n")
    write_module(shared, "helpers", "TAG = 'helpers-1'\n")
    write_module(app, "tasks", """\
        import helpers
        from app.lib import images

        def version(job):
            return f"{images.VERSION} {helpers.TAG}"
        """)
    m = master({"servers": [gearmand.address], "watch_debounce": QUIET,
                "pythonpath": [str(REPO), str(tmp_path), str(shared)],
                "pools": {"img": {"processes": 2,
                                  "functions": {"version": "app.tasks:version"}}}})
    wait_for(lambda: serving(gearmand, "img") == 2, timeout=20, message="registered")
    w = wait_for(follows_imports(m, "img", lib, shared), timeout=20,
                 message="the watcher following the imported modules")
    assert w["modules"]["img"] == 4  # app/__init__, app/tasks, app/lib/images, helpers
    assert str(tmp_path) in w["paths"]  # the config file's directory, watched flat
    reported = m.events("watching the files the pool's code imported")
    assert reported and reported[0]["pool"] == "img" and reported[0]["files"] == 4
    assert call(gearmand, "version") == b"images-1 helpers-1"

    write_module(lib, "images", "VERSION = 'images-2-longer'\n")
    wait_for(settled_at(m, "img", 2), timeout=20, message="pool img rolled to gen 2")
    wait_for(lambda: serving(gearmand, "img") == 2, timeout=20,
             message="generation 2 registered in gearmand")
    assert call(gearmand, "version") == b"images-2-longer helpers-1"

    write_module(shared, "helpers", "TAG = 'helpers-2-longer'\n")
    wait_for(settled_at(m, "img", 3), timeout=20, message="pool img rolled to gen 3")
    wait_for(lambda: serving(gearmand, "img") == 2, timeout=20,
             message="generation 3 registered in gearmand")
    assert call(gearmand, "version") == b"images-2-longer helpers-2-longer"
    changed = m.events("files changed; rolling once they are quiet")
    assert [(e["pools"], e["sample"]) for e in changed] == [
        (["img"], [str(lib / "images.py")]), (["img"], [str(shared / "helpers.py")])]


def test_log_files_beside_the_code_roll_nothing(gearmand, master, tmp_path):
    """A log appended line by line next to a Python pool's module, and a command pool's
    log_file next to its script (watched as "*": the script has no extension), are nobody's
    code: no "files changed", no roll. Proven by ordering: a later edit of the module rolls
    its pool once, so anything the log lines had triggered would have come before it."""
    app, cmd = tmp_path / "app", tmp_path / "cmd"
    app.mkdir()
    cmd.mkdir()
    write_module(app, "logmod", "def version(job):\n    return 'log-1'\n")
    # 30 lines, 20 ms apart, then it idles until told to stop (SIGTERM ends sleep).
    (cmd / "run").write_text('i=0\nwhile [ "$i" -lt 30 ]; do echo "line $i"; i=$((i+1)); '
                             "sleep 0.02; done\nexec sleep 600\n")
    m = master({"servers": [gearmand.address], "watch_debounce": QUIET,
                "pythonpath": [str(REPO), str(app)],
                "pools": {
                    "py": {"processes": 1, "functions": {"version": "logmod:version"}},
                    "cmd": {"processes": 1, "command": ["sh", "run"], "cwd": str(cmd),
                            "functions": ["nothing"], "ready": "started",
                            "startsecs": "100ms", "log_file": str(cmd / "run.log")},
                }})
    wait_for(lambda: serving(gearmand, "py") == 1, timeout=20, message="registered")
    wait_for(follows_imports(m, "py", app), timeout=20, message="watcher up")
    log = app / "worker.log"
    pause = threading.Event()
    with log.open("a") as f:
        for i in range(40):  # bounded: 40 lines, paced like a busy worker's log
            f.write(f"line {i}\n")
            f.flush()
            pause.wait(0.02)
    wait_for(lambda: (cmd / "run.log").exists() and
             (cmd / "run.log").read_text().count("line ") >= 30, timeout=20,
             message="the command pool wrote its log_file")
    write_module(app, "logmod", "def version(job):\n    return 'log-2-longer'\n")
    wait_for(settled_at(m, "py", 2), timeout=20, message="pool py rolled by the edit")
    assert call(gearmand, "version") == b"log-2-longer"
    changed = m.events("files changed; rolling once they are quiet")
    assert [(e["pools"], e["sample"]) for e in changed] == [(["py"], [str(app / "logmod.py")])]
    assert rolls(m, "py") == 1 and rolls(m, "cmd") == 0
    assert pool(m, "cmd")["generation"] == 1
