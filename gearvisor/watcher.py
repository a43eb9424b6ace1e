"""File watching: which files belong to which pool, the helper process that watches them, and
the debounce that turns a burst of changes into one roll.

The master never watches files itself: watchfiles runs Rust threads, and the master must stay
single-threaded so fork() stays safe (DESIGN.md). It forks a helper that runs watchfiles and
writes one JSON line per batch of changes down a pipe, already mapped to pool names. The
master debounces those batches (Debouncer, pure, injected clock) and rolls the pools.

Symlinked release directories (`/srv/app/current -> releases/42`): inotify follows a symlink
once, when the watch is added, so a swap of `current` changes no watched file. The helper
therefore re-resolves every watched root about once a second; a root whose target moved counts
as a change of everything under it, and the watch is rebuilt on the new targets.
"""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, NoReturn

from wcmatch import glob as wcglob

from .config import Config
from .health import Backoff
from .process import EXIT_CRASH, EXIT_ORPHANED, close_fds_except, set_pdeathsig

_GLOB_FLAGS = wcglob.GLOBSTAR
RESOLVE_INTERVAL_MS = 1000  # how often symlinked roots are re-resolved (and the master checked)


# -- what is watched (pure) -----------------------------------------------------------------------


def module_dir(module: str, search_path: list[str] | tuple[str, ...]) -> str | None:
    """The directory holding `module`'s source, found on the file system the way the import
    system would, without importing anything (the master never runs user code)."""
    parts = module.split(".")
    for root in search_path:
        base = os.path.join(root or ".", *parts[:-1])
        # A package wins over a module of the same name, as in Python's FileFinder.
        if os.path.isfile(os.path.join(base, parts[-1], "__init__.py")):
            return os.path.abspath(os.path.join(base, parts[-1]))
        if os.path.isfile(os.path.join(base, parts[-1] + ".py")):
            return os.path.abspath(base)
    return None


@dataclass(frozen=True)
class WatchSpec:
    """What the helper watches: the config file (or None) and each pool's absolute globs."""

    config: str | None
    pools: tuple[tuple[str, tuple[str, ...]], ...]
    notes: tuple[str, ...] = field(default=(), compare=False)  # why something is not watched

    @property
    def empty(self) -> bool:
        return self.config is None and not any(patterns for _, patterns in self.pools)

    def to_json(self) -> dict[str, Any]:
        return {"config": self.config, "pools": {n: list(p) for n, p in self.pools}}


def build_spec(cfg: Config, search_path: list[str] | tuple[str, ...]) -> WatchSpec:
    """Each pool's watch globs: its own `watch:` list (a directory means everything under it),
    or by default `*.py` in the directory of each function's module."""
    pools = []
    notes = []
    path = [*cfg.pythonpath, *search_path]
    for name, pc in cfg.pools.items():
        if pc.watch is not None:
            # A directory is taken literally (escaped: "app[1]" is not a character class).
            # A plain path that does not exist yet may become a file or a directory: both.
            patterns = []
            for w in pc.watch:
                if os.path.isdir(w):
                    patterns.append(os.path.join(_literal(w), "**"))
                elif not os.path.exists(w) and not wcglob.is_magic(w, flags=_GLOB_FLAGS):
                    patterns += [w, os.path.join(_literal(w), "**")]
                else:
                    patterns.append(w)
            pools.append((name, tuple(patterns)))
            continue
        patterns = []
        if pc.command is not None:
            # A command pool: the directory of each script argument that is a file, with its
            # extension ("php worker.php" watches *.php beside worker.php).
            for arg in pc.command[1:]:
                script = os.path.join(pc.cwd, arg)  # not `path`: later pools search that
                if os.path.isfile(script):
                    ext = os.path.splitext(script)[1]
                    glob = os.path.join(_literal(os.path.dirname(os.path.abspath(script))),
                                        f"*{ext}" if ext else "*")
                    if glob not in patterns:
                        patterns.append(glob)
            if not patterns:
                notes.append(f"pool {name}: no script file in its command to watch; set watch:"
                             " for this pool")
            pools.append((name, tuple(patterns)))
            continue
        for target in pc.functions.values():
            module = target.partition(":")[0]
            where = module_dir(module, path)
            if where is None:
                notes.append(f"pool {name}: module {module} not found on the python path, so "
                             "it is not watched; set watch: for this pool")
            elif os.path.join(_literal(where), "*.py") not in patterns:
                patterns.append(os.path.join(_literal(where), "*.py"))
        pools.append((name, tuple(patterns)))
    return WatchSpec(cfg.path if cfg.watch_config else None, tuple(pools), tuple(notes))


def _literal(path: str) -> str:
    """`path` as a glob that matches only itself ("app[1]" is not a character class)."""
    return wcglob.escape(path) if wcglob.is_magic(path, flags=_GLOB_FLAGS) else path


def root_of(pattern: str) -> str:
    """The directory to watch for a glob: its leading components without wildcards (for a
    plain file, its directory, so a file replaced by rename is still seen). Escaped
    characters count as plain."""
    parts = pattern.split(os.sep)
    plain = []
    for part in parts:
        if wcglob.is_magic(part, flags=_GLOB_FLAGS):
            unescaped = re.sub(r"\\(.)", r"\1", part)
            if _literal(unescaped) != part:
                return os.sep.join(plain) or os.sep
            part = unescaped
        plain.append(part)
    pattern = os.sep.join(plain)
    return pattern if os.path.isdir(pattern) else (os.path.dirname(pattern) or os.sep)


def all_roots(spec: WatchSpec) -> list[str]:
    """The directory of every glob and of the config file. Each one's symlink target is
    checked for moves, even when an outer root already covers it for watching."""
    roots = {root_of(p) for _, patterns in spec.pools for p in patterns}
    if spec.config:
        roots.add(os.path.dirname(spec.config))
    return sorted(roots)


def outermost(roots: list[str]) -> list[str]:
    """`roots` without those inside another one (watching is recursive)."""
    return [r for r in roots
            if not any(r != o and r.startswith(o.rstrip(os.sep) + os.sep) for o in roots)]


class Matcher:
    """Maps changed paths to the pools whose globs match them (and to the config file)."""

    def __init__(self, spec: WatchSpec) -> None:
        self.spec = spec

    def pools_for(self, path: str) -> list[str]:
        return [name for name, patterns in self.spec.pools
                if patterns and wcglob.globmatch(path, patterns, flags=_GLOB_FLAGS)]

    def match(self, paths: list[str]) -> tuple[set[str], bool]:
        pools: set[str] = set()
        config = False
        for p in paths:
            if p == self.spec.config:
                config = True
            pools.update(self.pools_for(p))
        return pools, config

    def under(self, roots: list[str]) -> tuple[set[str], bool]:
        """Pools (and the config) with a glob at or below one of `roots`: a symlink swap or an
        appearing directory changes everything under it."""
        def inside(path: str) -> bool:
            return any(path == r or path.startswith(r.rstrip(os.sep) + os.sep) for r in roots)

        pools = {name for name, patterns in self.spec.pools
                 if any(inside(root_of(p)) or inside(p) for p in patterns)}
        return pools, bool(self.spec.config and inside(self.spec.config))


# -- debounce (pure, master side) -----------------------------------------------------------------


@dataclass
class Batch:
    pools: set[str] = field(default_factory=set)
    config: bool = False
    files: int = 0
    sample: list[str] = field(default_factory=list)


class Debouncer:
    """Collects changes until `quiet` seconds pass with none, then hands them over at once.

    A tree that never goes quiet (something rewriting a watched file in a loop) still fires
    after `max_wait`, so the roll is late but never starved.
    """

    def __init__(self, quiet: float, max_wait: float | None = None) -> None:
        self.quiet = quiet
        self.max_wait = max(10 * quiet, 30.0) if max_wait is None else max_wait
        self.pending: Batch | None = None
        self.first = self.last = 0.0

    def retime(self, quiet: float) -> None:
        """A reload changed watch_debounce: keep what is pending and when it was seen."""
        self.quiet = quiet
        self.max_wait = max(10 * quiet, 30.0)

    def add(self, pools: set[str], config: bool, files: list[str], now: float,
            count: int = 0) -> None:
        """Record one batch of changes: the pools it touched, whether the config file was
        among them, a few of its paths and how many paths there were in all."""
        if not pools and not config:
            return
        if self.pending is None:
            self.pending = Batch()
            self.first = now
        self.last = now
        self.pending.pools |= pools
        self.pending.config |= config
        self.pending.files += max(count, len(files))
        self.pending.sample += files[:max(0, 5 - len(self.pending.sample))]

    def due(self) -> float | None:
        """When the pending batch fires, or None."""
        if self.pending is None:
            return None
        return min(self.last + self.quiet, self.first + self.max_wait)

    def pop(self, now: float) -> Batch | None:
        due = self.due()
        if due is None or now < due:
            return None
        batch, self.pending = self.pending, None
        return batch


# -- the helper's record in the master -------------------------------------------------------------


@dataclass
class WatcherState:
    """The master's record of the watcher helper (one process, restarted with backoff)."""

    spec: WatchSpec
    pid: int | None = None
    event_fd: int = -1
    buf: bytearray = field(default_factory=bytearray)
    started_at: float = 0.0
    restart_at: float = 0.0
    backoff: Backoff = field(default_factory=lambda: Backoff(0.5, 30.0, 2.0, 0.1, 10.0))
    restarts: int = 0
    replacing: bool = False  # killed on purpose (new spec): respawn at once, not a failure
    paths: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    polling: bool = False
    error: str | None = None
    last_change: float | None = None

    def status(self, now: float, debouncer: Debouncer) -> dict[str, Any]:
        if self.spec.empty:
            state = "disabled"
        elif self.pid is None:
            state = "backoff" if self.backoff.failures else "starting"
        else:
            state = "watching" if self.paths or self.missing else "starting"
        pending = debouncer.pending
        return {
            "state": state,
            "pid": self.pid,
            "paths": list(self.paths),
            "missing": list(self.missing),
            "polling": self.polling,
            "restarts": self.restarts,
            "retry_in": (round(max(0.0, self.restart_at - now), 3)
                         if self.pid is None and self.backoff.failures else None),
            "error": self.error,
            "notes": list(self.spec.notes),
            "pending": sorted(pending.pools) + (["(config)"] if pending.config else [])
            if pending else [],
            "last_change": round(now - self.last_change, 3) if self.last_change else None,
        }


# -- the helper process ---------------------------------------------------------------------------


def _send(fd: int, event: dict[str, Any]) -> None:
    """Blocking write: the master reads its pipes all the time, and a watcher that cannot
    report has nothing else to do. A gone master (EPIPE) ends the helper."""
    os.write(fd, json.dumps(event).encode() + b"\n")


def run_watcher(spec: WatchSpec, event_fd: int, master_pid: int,
                signals_to_unblock: set[int]) -> NoReturn:
    """The body of the forked watcher helper. Never returns."""
    code = EXIT_CRASH
    try:
        for sig in signals_to_unblock:
            signal.signal(sig, signal.SIG_DFL)
        signal.set_wakeup_fd(-1)
        set_pdeathsig(signal.SIGTERM)
        close_fds_except({event_fd})
        os.set_blocking(event_fd, True)
        from setproctitle import setproctitle
        setproctitle("gearvisor: watcher")
        signal.pthread_sigmask(signal.SIG_UNBLOCK, signals_to_unblock)
        code = _watch(spec, event_fd, master_pid)
    except BrokenPipeError:
        code = EXIT_ORPHANED
    except BaseException as e:
        try:
            _send(event_fd, {"event": "error", "fatal": True, "message": "".join(
                traceback.format_exception_only(e)).strip()})
        except OSError:
            pass
    finally:
        os._exit(code)


def split_roots(spec: WatchSpec) -> tuple[list[str], list[str]]:
    """(recursive roots, flat roots). Only a glob that reaches below its root ("**", or a
    wildcard in a subdirectory) needs a recursive watch; "dir/*.py" and the config file's
    directory are watched flat, so a config in "/" or $HOME never means watching a tree."""
    deep, flat = set(), set()
    for _, patterns in spec.pools:
        for p in patterns:
            root = root_of(p)
            rest = p[len(root):].lstrip(os.sep)
            (deep if not rest or os.sep in rest or "**" in rest else flat).add(root)
    if spec.config:
        flat.add(os.path.dirname(spec.config))
        flat.add(os.path.dirname(os.path.realpath(spec.config)))  # a symlinked config file
    deep_roots = outermost(sorted(deep))
    flat_roots = sorted(r for r in flat if not any(
        r == d or r.startswith(d.rstrip(os.sep) + os.sep) for d in deep_roots))
    return deep_roots, flat_roots


class _Ignore:
    """watchfiles' default ignore list (.git, __pycache__, node_modules, *.pyc, editor swap
    files...), applied only to the part of a path below its watched root: code installed
    under /srv/app/.venv is still watched."""

    def __init__(self, roots: list[str]) -> None:
        from watchfiles import DefaultFilter

        self.dirs = set(DefaultFilter.ignore_dirs)
        self.names = [re.compile(p) for p in DefaultFilter.ignore_entity_patterns]
        self.roots = sorted(roots, key=len, reverse=True)

    def __call__(self, path: str) -> bool:
        root = next((r for r in self.roots if path.startswith(r.rstrip(os.sep) + os.sep)), None)
        below = path[len(root):].strip(os.sep).split(os.sep) if root else [
            os.path.basename(path)]
        return any(part in self.dirs for part in below[:-1]) or any(
            n.search(below[-1]) for n in self.names)


def aliases(path: str, roots: list[str]) -> list[str]:
    """`path` and the same file under every root whose real path holds it: inotify keeps
    one watch per directory inode, so a file reached through a symlink may be reported
    under another name than the glob uses."""
    out = [path]
    real = os.path.realpath(path)
    for root in roots:
        rr = os.path.realpath(root)
        if real == rr or real.startswith(rr.rstrip(os.sep) + os.sep):
            alias = root.rstrip(os.sep) + real[len(rr.rstrip(os.sep)):]
            if alias not in out:
                out.append(alias)
    return out


def _signature(path: str) -> tuple | None:
    """What identifies `path` now: its target and inode (a symlink swap or a directory
    replaced by rename changes it), None while it does not exist."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return os.path.realpath(path), st.st_dev, st.st_ino


def _config_signature(path: str | None) -> tuple | None:
    if path is None:
        return None
    try:
        st = os.stat(path)
    except OSError:
        return None
    return os.path.realpath(path), st.st_ino, st.st_mtime_ns, st.st_size


def _is_limit(e: BaseException) -> bool:
    text = str(e).lower()
    return getattr(e, "errno", None) in (errno.ENOSPC, errno.EMFILE) or "limit" in text


def _watch(spec: WatchSpec, fd: int, master_pid: int) -> int:
    from watchfiles._rust_notify import RustNotify  # only here: the master never loads it

    matcher = Matcher(spec)
    roots = all_roots(spec)
    checked = sorted(set(roots) | ({os.path.dirname(spec.config)} if spec.config else set()))
    polling = False
    last_error = None
    config_sig = _config_signature(spec.config)
    while True:
        if os.getppid() != master_pid:
            return EXIT_ORPHANED
        deep, flat = split_roots(spec)
        deep = [r for r in deep if os.path.isdir(r)]
        flat = [r for r in flat if os.path.isdir(r)]
        sigs = {r: _signature(r) for r in checked}
        watchers = []
        try:
            for paths, recursive in ((deep, True), (flat, False)):
                if paths:
                    watchers.append(RustNotify(paths, False, polling, 500, recursive, True))
        except (OSError, RuntimeError) as e:
            message = str(e)
            switched = _is_limit(e) and not polling
            if switched:
                message = (f"file system notifications failed ({e}); falling back to polling "
                           "every 0.5s, which costs more CPU. Raise fs.inotify.max_user_watches "
                           "or narrow the watch: globs")
                polling = True
            if message != last_error:
                _send(fd, {"event": "error", "fatal": False, "message": message})
                last_error = message
            if not switched:
                time.sleep(RESOLVE_INTERVAL_MS / 1000)  # retry once a second, quietly
            continue
        _send(fd, {"event": "watching", "paths": deep + flat,
                   "missing": [r for r in roots if not os.path.exists(r)], "polling": polling})
        ignore = _Ignore(deep + flat + roots)
        timeout = max(50, RESOLVE_INTERVAL_MS // max(1, len(watchers)))
        while True:
            if os.getppid() != master_pid:
                return EXIT_ORPHANED
            changed: set[str] = set()
            if watchers:
                for w in watchers:
                    raw = w.watch(1600, 50, timeout, None)
                    if isinstance(raw, set):
                        changed.update(p for _, p in raw if not ignore(p))
            else:
                time.sleep(RESOLVE_INTERVAL_MS / 1000)  # nothing exists yet: just re-check
            now_sig = _config_signature(spec.config)
            if now_sig != config_sig:  # also catches a symlinked config's target changing
                config_sig = now_sig
                if spec.config:
                    changed.add(spec.config)
            if changed:
                paths = sorted(changed)
                pools, config = matcher.match([a for p in paths for a in aliases(p, roots)])
                _report(fd, pools, config, paths, "edited")
            moved = [r for r in checked if _signature(r) != sigs[r]]
            if moved:
                _report(fd, *matcher.under(moved), moved, "moved")
                for w in watchers:
                    w.close()
                break  # rebuild the watches on the new targets


def _report(fd: int, pools: set[str], config: bool, paths: list[str], why: str) -> None:
    """Tell the master which pools (and whether the config) `paths` changed, if any."""
    if pools or config:
        _send(fd, {"event": "changed", "pools": sorted(pools), "config": config,
                   "files": paths[:5], "count": len(paths), "why": why})
