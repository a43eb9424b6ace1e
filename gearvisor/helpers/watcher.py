"""File watching: which files belong to which pool, the helper process that watches them, and
the debounce that turns a burst of changes into one roll.

What a Python pool watches by default is the code its children run: a child, once ready,
reports the source file of every module it imported from outside the stdlib, site-packages
and gearvisor itself (`send_import_report`, a few event lines down its pipe), and the master
keeps the first report of each generation (`WatcherState.add_report`). Until that report
arrives, the function modules' own files are watched.

The master never watches files itself: watchfiles runs Rust threads, and the master must stay
single-threaded so fork() stays safe (docs/architecture.md). It forks a helper that runs
watchfiles and writes one JSON line per batch of changes down a pipe, already mapped to pool
names. The master debounces those batches (Debouncer, pure, injected clock) and rolls the
pools.

Symlinked release directories (`/srv/app/current -> releases/42`): inotify follows a symlink
once, when the watch is added, so a swap of `current` changes no watched file. The helper
therefore re-resolves every watched root about once a second; a root whose target moved counts
as a change of everything under it, and the watch is rebuilt on the new targets.
"""

from __future__ import annotations

import errno
import importlib.util
import json
import os
import re
import select
import stat
import sys
import time
import traceback
from collections.abc import Container, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NoReturn

from wcmatch import glob as wcglob

from gearvisor import messages as msg
from gearvisor.child.postfork import run_helper
from gearvisor.config import Config
from gearvisor.policy.child import EXIT_ORPHANED
from gearvisor.policy.helper import HelperRecord

_GLOB_FLAGS = wcglob.GLOBSTAR
RESOLVE_INTERVAL_MS = 1000  # how often symlinked roots are re-resolved (and the master checked)
# A child's import report: at most this many files and characters of paths (the rest are
# counted as dropped), in event lines of at most REPORT_LINE bytes. A line no longer than
# PIPE_BUF (4096) is written atomically to the non-blocking pipe, whole or not at all, so
# lines never interleave or arrive cut; the master reads 64 KiB at a time.
MAX_REPORT_FILES = 2000
MAX_REPORT_CHARS = 256 * 1024
REPORT_LINE = 4000
REPORT_WAIT = 2.0  # how long a child waits for room in a full pipe before it gives up


# -- what is watched (pure) -----------------------------------------------------------------------


def _find_module(module: str, search_path: Sequence[str]) -> tuple[str, str] | None:
    """(search path entry, source file) of `module`, found the way the import system would,
    without importing anything (the master never runs user code)."""
    parts = module.split(".")
    for root in search_path:
        base = os.path.join(root or ".", *parts[:-1])
        # A package wins over a module of the same name, as in Python's FileFinder.
        for source in (os.path.join(base, parts[-1], "__init__.py"),
                       os.path.join(base, parts[-1] + ".py")):
            if os.path.isfile(source):
                return root or ".", source
    return None


def module_dir(module: str, search_path: Sequence[str]) -> str | None:
    """The directory holding `module`'s source (a package: the package directory)."""
    found = _find_module(module, search_path)
    return os.path.dirname(os.path.abspath(found[1])) if found else None


def module_files(module: str, search_path: Sequence[str]) -> list[str] | None:
    """The files importing `module` runs, as far as the master can tell without importing:
    the `__init__.py` of each enclosing regular package, then the module's own source.
    What a pool watches until its first child reports what it really imported."""
    found = _find_module(module, search_path)
    if found is None:
        return None
    root, source = found
    parts = module.split(".")
    inits = [os.path.join(root, *parts[:i], "__init__.py") for i in range(1, len(parts))]
    return [os.path.abspath(f) for f in [*inits, source] if os.path.isfile(f)]


@dataclass(frozen=True)
class WatchSpec:
    """What the helper watches: the config file (or None) and each pool's absolute globs (a
    plain file is a glob that matches only itself), minus `ignore`: files gearvisor itself
    writes (its own log, command pools' log_file), whose changes are never anyone's code."""

    config: str | None
    pools: tuple[tuple[str, tuple[str, ...]], ...]
    notes: tuple[str, ...] = field(default=(), compare=False)  # why something is not watched
    ignore: tuple[str, ...] = ()

    @property
    def empty(self) -> bool:
        return self.config is None and not any(patterns for _, patterns in self.pools)

    def to_json(self) -> dict[str, Any]:
        return {"config": self.config, "pools": {n: list(p) for n, p in self.pools}}


def build_spec(cfg: Config, search_path: Sequence[str],
               reported: Mapping[str, Sequence[str]] | None = None,
               ignore: Sequence[str] = ()) -> WatchSpec:
    """Each pool's watch globs. A Python pool watches the files its children reported
    importing (`reported`, by pool name) plus its function modules' own files (all it has
    before the first report, and what a reload's new functions need at once), plus its own
    `watch:` list (a directory means everything under it). A command pool watches its
    script's directory, by extension, or its `watch:` list instead. `watch: false` (an
    empty tuple) watches nothing. `ignore` (the master's own log file) and every
    command pool's log_file are never a change."""
    reported = reported or {}
    pools = []
    notes = []
    path = [*cfg.pythonpath, *search_path]
    skip = list(ignore)
    for pc in cfg.pools.values():
        if pc.command is not None and pc.log_file:
            # Its rotations too: RotatingFileHandler renames log_file to log_file.1 and so on.
            skip += [pc.log_file, *(f"{pc.log_file}.{i}"
                                    for i in range(1, pc.log_file_backups + 1))]
    for name, pc in cfg.pools.items():
        # A directory is taken literally (escaped: "app[1]" is not a character class).
        # A plain path that does not exist yet may become a file or a directory: both.
        own = []
        for w in pc.watch or ():
            if os.path.isdir(w):
                own.append(os.path.join(_literal(w), "**"))
            elif not os.path.exists(w) and not wcglob.is_magic(w, flags=_GLOB_FLAGS):
                own += [w, os.path.join(_literal(w), "**")]
            else:
                own.append(w)
        if pc.watch == () or (pc.watch is not None and pc.command is not None):
            # Off, or a command pool's own list, which replaces the script-directory guess.
            pools.append((name, tuple(own)))
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
        files: dict[str, None] = {}  # ordered, deduplicated
        for target in pc.functions.values():
            module = target.partition(":")[0]
            found = module_files(module, path)
            if found is not None:
                files.update(dict.fromkeys(found))
            elif name not in reported:  # a report shows where the children found it
                notes.append(f"pool {name}: module {module} not found on the python path, so "
                             "it is not watched until a child reports its imports; set watch:"
                             " for this pool")
        files.update(dict.fromkeys(reported.get(name, ())))
        # A Python pool's watch: list adds to what its code imports.
        pools.append((name, tuple(_literal(f) for f in files) + tuple(own)))
    return WatchSpec(cfg.path if cfg.watch_config else None, tuple(pools), tuple(notes),
                     tuple(dict.fromkeys(skip)))


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


def literal_path(pattern: str) -> str | None:
    """The one path `pattern` matches when it has no wildcard (escaped characters count as
    plain), else None."""
    unescaped = re.sub(r"\\(.)", r"\1", pattern)
    return unescaped if _literal(unescaped) == pattern else None


class Matcher:
    """Maps changed paths to the pools whose globs match them (and to the config file).

    Plain files (a Python pool's imported modules: thousands of them) are looked up in a set;
    only real globs go through wcmatch. A path in `spec.ignore` matches nothing."""

    def __init__(self, spec: WatchSpec) -> None:
        self.spec = spec
        self.ignore = frozenset(spec.ignore)
        self._pools: list[tuple[str, frozenset[str], tuple[str, ...]]] = []
        for name, patterns in spec.pools:
            plain = [literal_path(p) for p in patterns]
            globs = tuple(p for p, f in zip(patterns, plain, strict=True) if f is None)
            self._pools.append((name, frozenset(f for f in plain if f is not None), globs))
        self.files = frozenset().union(*(files for _, files, _ in self._pools))

    def pools_for(self, path: str) -> list[str]:
        if path in self.ignore:
            return []
        return [name for name, files, globs in self._pools
                if path in files or (globs and wcglob.globmatch(path, globs, flags=_GLOB_FLAGS))]

    def match(self, paths: list[str]) -> tuple[set[str], bool]:
        pools: set[str] = set()
        config = False
        for p in paths:
            if p == self.spec.config and p not in self.ignore:
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


# -- what a child imported (runs in the child, right after it is ready) --------------------------


def report_skip_dirs() -> list[str]:
    """Directories whose modules are not the pool's code: the stdlib, site-packages (of the
    venv, the system and the user) and gearvisor's own package; each as given and resolved."""
    import site
    import sysconfig

    dirs = [sysconfig.get_paths().get(k) for k in ("stdlib", "platstdlib", "purelib", "platlib")]
    try:
        dirs += site.getsitepackages()
    except AttributeError:  # pragma: no cover - old virtualenv's site.py
        pass
    if site.ENABLE_USER_SITE:
        dirs.append(site.getusersitepackages())
    import gearvisor

    dirs.append(os.path.dirname(os.path.abspath(gearvisor.__file__)))
    out: dict[str, None] = {}
    for d in dirs:
        if d:
            out.update(dict.fromkeys((os.path.abspath(d), os.path.realpath(d))))
    return list(out)


def _source_of(module: Any) -> str | None:
    """The file `module` was loaded from (its source when there is one), or None: built-in
    and frozen modules, namespace packages and objects that are not modules have none."""
    try:
        spec = getattr(module, "__spec__", None)
        if getattr(spec, "origin", None) in ("built-in", "frozen"):
            return None
        path = getattr(module, "__file__", None)
    except Exception:  # a lazy module or a proxy in sys.modules: not worth breaking a child
        return None
    if not isinstance(path, str) or not path or "\0" in path:
        return None
    path = os.path.abspath(path)
    if os.sep + "__pycache__" + os.sep in path:
        # Bytecode the import system writes itself (a new child may rewrite it): never
        # watched. Its source, if there is one, is the code.
        try:
            source = importlib.util.source_from_cache(path)
        except ValueError:
            return None
        return source if os.path.isfile(source) else None
    if os.path.isfile(path):
        return path  # a source, a .pyc deployed without source, an extension module
    # Inside an archive (zipimport: /srv/app.zip/pkg/mod.py): the archive is what changes.
    parent = os.path.dirname(path)
    while parent != os.path.dirname(parent) and not os.path.exists(parent):
        parent = os.path.dirname(parent)
    return parent if os.path.isfile(parent) else None


def imported_files(modules: Mapping[str, Any], skip: Sequence[str]) -> list[str]:
    """The files of `modules` (sys.modules) that are the pool's own code, sorted: everything
    outside `skip` (report_skip_dirs()), by the path imported and by its resolved path.
    `__main__` is gearvisor's entry point, never the pool's code."""
    prefixes = tuple(d.rstrip(os.sep) + os.sep for d in skip)
    files = set()
    for name, module in list(modules.items()):
        if name in ("__main__", "__mp_main__"):
            continue
        path = _source_of(module)
        if path is None or path in files or path.startswith(prefixes):
            continue
        if not os.path.realpath(path).startswith(prefixes):
            files.add(path)
    return sorted(files)


def report_lines(files: Sequence[str]) -> list[bytes]:
    """`files` as "modules" event lines of at most REPORT_LINE bytes each, the last one
    without `more` and with the count of files left out: past MAX_REPORT_FILES or
    MAX_REPORT_CHARS, or a single path too long for a line."""
    lines: list[bytes] = []
    chunk: list[str] = []
    size = kept = chars = dropped = 0
    budget = REPORT_LINE - 80  # room for the event's own keys and a large dropped count
    for f in files:
        item = len(json.dumps(f)) + 2  # its JSON string and the ", " after it
        if item > budget or kept >= MAX_REPORT_FILES or chars + len(f) > MAX_REPORT_CHARS:
            dropped += 1
            continue
        if size + item > budget:
            lines.append(msg.encode(msg.Modules(chunk, more=True)))
            chunk, size = [], 0
        chunk.append(f)
        size += item
        kept += 1
        chars += len(f)
    lines.append(msg.encode(msg.Modules(chunk, dropped=dropped)))
    return lines


def send_import_report(fd: int, modules: Mapping[str, Any] | None = None,
                       wait: float = REPORT_WAIT) -> None:
    """Tell the master which files this child's code came from (see report_lines). The pipe
    is non-blocking: a line that finds it full waits for room up to `wait` seconds in all,
    then the rest is given up (the master ignores an unfinished report). Never raises: a
    child serves jobs whatever happens to its report."""
    try:
        lines = report_lines(imported_files(sys.modules if modules is None else modules,
                                            report_skip_dirs()))
        deadline = time.monotonic() + wait
        room = select.poll()  # not select(): the fd may be past FD_SETSIZE
        room.register(fd, select.POLLOUT)
        for line in lines:
            while True:
                try:
                    os.write(fd, line)  # <= PIPE_BUF: all of it or EAGAIN
                    break
                except BlockingIOError:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        return
                    room.poll(left * 1000)
    except Exception:
        return


# -- the helper's record in the master -------------------------------------------------------------


@dataclass(frozen=True)
class ImportReport:
    """The files a pool's children of `generation` imported, as its first reporter saw them."""

    generation: int
    files: tuple[str, ...]
    dropped: int = 0


@dataclass
class _PartialReport:
    pool: str
    generation: int
    files: list[str] = field(default_factory=list)
    chars: int = 0
    dropped: int = 0


def output_files(fds: Sequence[int] = (1, 2)) -> tuple[str, ...]:
    """The regular files `fds` (this process's stdout and stderr) write to: the master's own
    log, which must never count as a change of anyone's code."""
    out = []
    for fd in fds:
        try:
            if stat.S_ISREG(os.fstat(fd).st_mode):
                path = os.readlink(f"/proc/self/fd/{fd}")
                if path not in out and os.path.isabs(path):
                    out.append(path)
        except OSError:
            continue  # closed, or no /proc: nothing known to leave out
    return tuple(out)


@dataclass
class WatcherState(HelperRecord):
    """The master's record of the watcher helper (one process, restarted with backoff: the
    HelperRecord fields), and of what each Python pool's children reported importing (which
    feeds its spec)."""

    spec: WatchSpec
    paths: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    polling: bool = False
    error: str | None = None
    last_change: float | None = None
    reports: dict[str, ImportReport] = field(default_factory=dict)  # by pool
    partial: dict[int, _PartialReport] = field(default_factory=dict)  # by child pid
    own_output: tuple[str, ...] = ()  # the master's log file(s)

    @classmethod
    def for_config(cls, cfg: Config, search_path: Sequence[str]) -> WatcherState:
        """The state at start-up: the spec from the config alone, minus the master's log."""
        own = output_files()
        return cls(build_spec(cfg, search_path, ignore=own), own_output=own)

    def rebuild(self, cfg: Config, search_path: Sequence[str]) -> bool:
        """Rebuild the spec from `cfg` and the import reports; True when it changed (the
        helper must then be restarted on it). Reports of pools gone from `cfg` are dropped,
        so a pool added again under the same name starts afresh."""
        for name in [n for n in self.reports if n not in cfg.pools]:
            del self.reports[name]
        spec = build_spec(cfg, search_path, {n: r.files for n, r in self.reports.items()},
                          self.own_output)
        if spec == self.spec:
            return False
        self.spec = spec
        return True

    def add_report(self, pool: str, pid: int, generation: int, event: dict[str, Any],
                   live: Container[int]) -> ImportReport | None:
        """Take one "modules" event line from child `pid`. Returns the pool's new report when
        this line finished the first report of a generation newer than the one held and
        its files differ; None otherwise. Bounded whatever a child sends: MAX_REPORT_FILES
        paths and MAX_REPORT_CHARS characters per report, one report in progress per live
        child (those of children gone are dropped here)."""
        held = self.reports.get(pool)
        if held is not None and held.generation >= generation:
            self.partial.pop(pid, None)
            return None  # another child of this generation (or a newer one) reported first
        for gone in [p for p in self.partial if p != pid and p not in live]:
            del self.partial[gone]
        part = self.partial.get(pid)
        if part is None or (part.pool, part.generation) != (pool, generation):
            part = self.partial[pid] = _PartialReport(pool, generation)
        files = event.get("files")
        for f in files if isinstance(files, list) else ():
            if (isinstance(f, str) and os.path.isabs(f) and "\0" not in f
                    and len(part.files) < MAX_REPORT_FILES
                    and part.chars + len(f) <= MAX_REPORT_CHARS):
                part.files.append(f)
                part.chars += len(f)
            else:
                part.dropped += 1
        dropped = event.get("dropped")
        if isinstance(dropped, int) and not isinstance(dropped, bool) and dropped > 0:
            part.dropped += min(dropped, 1 << 30)
        if event.get("more") is True:
            return None
        del self.partial[pid]
        report = ImportReport(generation, tuple(sorted(set(part.files))), part.dropped)
        self.reports[pool] = report
        return report if held is None or held.files != report.files else None

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
            "modules": {name: len(r.files) for name, r in sorted(self.reports.items())},
            "pending": sorted(pending.pools) + (["(config)"] if pending.config else [])
            if pending else [],
            "last_change": round(now - self.last_change, 3) if self.last_change else None,
        }


# -- the helper process ---------------------------------------------------------------------------


def _send(fd: int, message: msg.Message) -> None:
    """Blocking write: the master reads its pipes all the time, and a watcher that cannot
    report has nothing else to do. A gone master (EPIPE) ends the helper."""
    os.write(fd, msg.encode(message))


def run_watcher(spec: WatchSpec, event_fd: int, master_pid: int,
                signals_to_unblock: set[int]) -> NoReturn:
    """The body of the forked watcher helper. Never returns."""
    def report(e: BaseException) -> None:
        _send(event_fd, msg.WatcherError("".join(
            traceback.format_exception_only(e)).strip(), fatal=True))

    run_helper("gearvisor: watcher", signals_to_unblock, {event_fd},
               lambda: _watch(spec, event_fd, master_pid), report)


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
    return _Aliases(roots)(path)


class _Aliases:
    """aliases() against fixed roots, resolved once: the helper maps every changed path,
    and a log file appended in a watched directory changes one path per line."""

    def __init__(self, roots: list[str]) -> None:
        self.pairs = [(root.rstrip(os.sep), os.path.realpath(root).rstrip(os.sep))
                      for root in roots]

    def __call__(self, path: str) -> list[str]:
        out = [path]
        real = os.path.realpath(path)
        for root, rr in self.pairs:
            if real == rr or real.startswith(rr + os.sep):
                alias = root + real[len(rr):]
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
                _send(fd, msg.WatcherError(message))
                last_error = message
            if not switched:
                time.sleep(RESOLVE_INTERVAL_MS / 1000)  # retry once a second, quietly
            continue
        _send(fd, msg.Watching(deep + flat, [r for r in roots if not os.path.exists(r)],
                               polling))
        ignore = _Ignore(deep + flat + roots)
        alias = _Aliases(roots)
        timeout = max(50, RESOLVE_INTERVAL_MS // max(1, len(watchers)))
        next_resolve = time.monotonic() + RESOLVE_INTERVAL_MS / 1000
        while True:
            if os.getppid() != master_pid:
                return EXIT_ORPHANED
            changed: set[str] = set()
            if watchers:
                for w in watchers:
                    raw = w.watch(1600, 50, timeout, None)
                    if isinstance(raw, set):
                        # A file the children imported is wanted even where the default
                        # ignore list would drop it (a module deployed as .pyc only).
                        changed.update(p for _, p in raw if p not in matcher.ignore and (
                            p in matcher.files or not ignore(p)))
            else:
                time.sleep(RESOLVE_INTERVAL_MS / 1000)  # nothing exists yet: just re-check
            now_sig = _config_signature(spec.config)
            if now_sig != config_sig:  # also catches a symlinked config's target changing
                config_sig = now_sig
                if spec.config:
                    changed.add(spec.config)
            if changed:
                # Filtered here, not in the master: a file that belongs to no pool (a log
                # appended line by line beside a module) never becomes an event line.
                hits: list[str] = []
                pools: set[str] = set()
                config = False
                for p in sorted(changed):
                    matched, cfg_hit = matcher.match(alias(p))
                    if matched or cfg_hit:
                        hits.append(p)
                        pools |= matched
                        config |= cfg_hit
                _report(fd, pools, config, hits, "edited")
            if time.monotonic() < next_resolve:
                continue  # re-resolve the roots once a second, not once per batch of events
            next_resolve = time.monotonic() + RESOLVE_INTERVAL_MS / 1000
            moved = [r for r in checked if _signature(r) != sigs[r]]
            if moved:
                _report(fd, *matcher.under(moved), moved, "moved")
                for w in watchers:
                    w.close()
                break  # rebuild the watches on the new targets


def _report(fd: int, pools: set[str], config: bool, paths: list[str], why: str) -> None:
    """Tell the master which pools (and whether the config) `paths` changed, if any."""
    if pools or config:
        _send(fd, msg.Changed(sorted(pools), config, paths[:5], len(paths), why))
