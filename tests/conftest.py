"""Fixtures for integration tests: a real gearmand on a free loopback port and a real master.

Rules: never sleep to synchronise, poll against a deadline; every fixture kills
what it started, by pid; only 127.0.0.1.
"""

from __future__ import annotations

import io
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import structlog
import yaml

from gearvisor import log as logmod
from gearvisor.gearman import admin

REPO = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"


def wait_for(cond: Callable[[], Any], timeout: float = 10.0, interval: float = 0.02,
             message: str = "condition") -> Any:
    """Poll `cond` until it returns something truthy; fail the test at the deadline."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        try:
            last = cond()
        except (admin.AdminError, OSError, psutil.Error) as e:
            last = e
        else:
            if last:
                return last
        if time.monotonic() >= deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {message}; last: {last!r}")
        time.sleep(interval)  # poll interval, not synchronisation


class _Seen:
    """One poll of wait_value(): truthy when the value is what we wait for, shown as the
    value itself, so a poll that times out reports what it last saw, not `False`."""

    def __init__(self, value: Any, ok: bool) -> None:
        self.value = value
        self.ok = ok

    def __bool__(self) -> bool:
        return self.ok

    def __repr__(self) -> str:
        return repr(self.value)


def wait_value(get: Callable[[], Any], ok: Callable[[Any], bool], timeout: float = 10.0,
               message: str = "value") -> Any:
    """Poll `get()` until `ok(value)`, then return that value; at the deadline fail the test
    with the last value seen. For asynchronous state (gearmand's lists, a master's status,
    a log) asserted with ==, <= and the like: `wait_for(lambda: get() == x)` would only say
    its last observation was False."""
    return wait_for(lambda: _Seen(v := get(), bool(ok(v))), timeout=timeout,
                    message=message).value


def wait_equal(get: Callable[[], Any], want: Any, timeout: float = 10.0,
               message: str = "value") -> Any:
    """Poll `get()` until it equals `want` (see wait_value)."""
    return wait_value(get, lambda v: v == want, timeout=timeout,
                      message=f"{message} == {want!r}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _kill_pid(proc: subprocess.Popen | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.kill()
    proc.wait(timeout=10)


class Gearmand:
    """One real gearmand on a loopback port; restartable on the same port."""

    def __init__(self, port: int | None = None, args: tuple[str, ...] = ()) -> None:
        self.port = port or free_port()
        self.args = args  # more gearmand options, e.g. ("--job-retries", "2")
        self.proc: subprocess.Popen | None = None

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"

    def start(self) -> Gearmand:
        exe = shutil.which("gearmand") or "/usr/sbin/gearmand"
        self.proc = subprocess.Popen(
            [exe, "-L", HOST, "-p", str(self.port), "-t", "1", "--log-file=none", *self.args],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(lambda: self.proc.poll() is None and admin.version(HOST, self.port, 0.5),
                 timeout=10, message=f"gearmand on port {self.port}")
        return self

    def stop(self) -> None:
        _kill_pid(self.proc)
        self.proc = None

    def workers(self, pool: str | None = None) -> list[admin.WorkerInfo]:
        """gearmand's own `workers` list, optionally only the connections of one pool."""
        found = admin.workers(HOST, self.port, 2.0)
        if pool is None:
            return found
        return [w for w in found if f":{pool}:" in w.client_id]

    def status(self) -> dict[str, admin.FunctionStatus]:
        return admin.status(HOST, self.port, 2.0)

    def gearadmin(self, *args: str) -> str:
        """Run the real gearadmin tool against this server."""
        out = subprocess.run(["gearadmin", "-h", HOST, "-p", str(self.port), *args],
                             capture_output=True, text=True, timeout=10)
        return out.stdout


def _require_gearmand() -> None:
    if not (shutil.which("gearmand") or os.path.exists("/usr/sbin/gearmand")):
        pytest.skip("gearmand not installed (apt-get install gearman-job-server gearman-tools)")


@pytest.fixture
def gearmand() -> Iterator[Gearmand]:
    _require_gearmand()
    server = Gearmand().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def gearmand_factory() -> Iterator[Callable[[], Gearmand]]:
    _require_gearmand()
    started: list[Gearmand] = []

    def make() -> Gearmand:
        server = Gearmand().start()
        started.append(server)
        return server

    try:
        yield make
    finally:
        for server in started:
            server.stop()


class Master:
    """A real `python -m gearvisor -c FILE` process, its JSON log, and its children."""

    def __init__(self, tmp: Path, config: dict, marker: str, base: dict | None = None) -> None:
        self.tmp = tmp
        self.base = base or {}  # keys every write_config() keeps (log format, socket, paths)
        self.config_path = tmp / "pools.yaml"
        self.write_config(config)
        self.log_path = tmp / "master.log"
        self.marker = marker
        self.proc: subprocess.Popen | None = None

    def start(self, **extra_env: str) -> Master:
        env = dict(os.environ, GEARVISOR_TEST_MARKER=self.marker,
                   PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
                   **extra_env)
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gearvisor", "-c", str(self.config_path)],
            stdout=self._log, stderr=subprocess.STDOUT, env=env, cwd=self.tmp)
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def processes(self) -> list[psutil.Process]:
        """Every child process of the master: workers and the helpers."""
        try:
            return psutil.Process(self.pid).children()
        except psutil.NoSuchProcess:
            return []

    @staticmethod
    def _is_watcher(p: psutil.Process) -> bool:
        try:
            return p.cmdline()[:1] == ["gearvisor: watcher"]
        except psutil.Error:
            return False

    @staticmethod
    def _is_helper(p: psutil.Process) -> bool:
        try:
            return p.cmdline()[:1] in (["gearvisor: watcher"], ["gearvisor: notifier"],
                                       ["gearvisor: store"], ["gearvisor: resolver"])
        except psutil.Error:
            return False

    def children(self) -> list[psutil.Process]:
        """The worker children (the watcher, alert-notifier and job-store helpers left out).
        A process that still shows the master's own command line has just been forked and
        not said yet what it is (a helper sets its title a moment later): left out too."""
        try:
            forked = psutil.Process(self.pid).cmdline()
        except psutil.Error:
            return []
        return [p for p in self.processes() if not self._is_helper(p)
                and not self._shows(p, forked)]

    @staticmethod
    def _shows(p: psutil.Process, cmdline: list[str]) -> bool:
        try:
            return p.cmdline() == cmdline
        except psutil.Error:
            return True  # (gone: not a child to count)

    def watcher(self) -> psutil.Process | None:
        return next((p for p in self.processes() if self._is_watcher(p)), None)

    def titles(self) -> dict[int, str]:
        out = {}
        for p in self.children():
            try:
                out[p.pid] = " ".join(p.cmdline()).strip()
            except psutil.Error:
                pass
        return out

    def child_with_title(self, fragment: str) -> int | None:
        for pid, title in self.titles().items():
            if fragment in title:
                return pid
        return None

    def logs(self) -> list[dict]:
        out = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            if line.startswith("{"):
                try:
                    out.append(json.loads(line))
                except ValueError:
                    pass
        return out

    def events(self, name: str) -> list[dict]:
        return [e for e in self.logs() if e.get("event") == name]

    def ctl(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        """Run `gearvisor VERB ... -c FILE` (the real CLI) against this master."""
        verb, *rest = args
        return subprocess.run(
            [sys.executable, "-m", "gearvisor", verb, "-c", str(self.config_path), *rest],
            capture_output=True, text=True, timeout=timeout, cwd=self.tmp,
            env=dict(os.environ, PYTHONPATH=str(REPO)))

    def status(self) -> dict:
        out = self.ctl("status", "--json", timeout=10)
        if out.returncode == 3:  # no master listening (yet): wait_for() polls on
            raise ConnectionRefusedError(out.stderr.strip())
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)

    def write_config(self, config: dict | str) -> None:
        """Replace the config file: a dict (merged over the fixture's base keys) or raw text."""
        if isinstance(config, str):
            self.config_path.write_text(config)
        else:
            self.config_path.write_text(yaml.safe_dump({**self.base, **config}))

    def signal(self, sig: int) -> None:
        os.kill(self.pid, sig)

    def wait_exit(self, timeout: float = 30) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout=timeout)

    def ours(self) -> list[psutil.Process]:
        """Every live process that carries this master's marker: master, children, orphans."""
        found = []
        for p in psutil.process_iter(["pid"]):
            if p.pid == os.getpid():
                continue
            try:
                if p.environ().get("GEARVISOR_TEST_MARKER") == self.marker and (
                        p.status() != psutil.STATUS_ZOMBIE):
                    found.append(p)
            except psutil.Error:
                pass
        return found

    def cleanup(self) -> None:
        for p in self.ours():
            try:
                p.kill()
            except psutil.Error:
                pass
        _kill_pid(self.proc)
        if hasattr(self, "_log"):
            self._log.close()


@pytest.fixture
def log() -> Iterator[io.StringIO]:
    """The in-process master's JSON log (structlog), captured; reset afterwards."""
    stream = io.StringIO()
    logmod.configure("info", "json", stream)
    try:
        yield stream
    finally:
        structlog.reset_defaults()
    # A subscriber that raised was caught by the bus (the master carries on), which would
    # hide a broken component behind a passing test.
    assert "event subscriber failed" not in stream.getvalue(), stream.getvalue()[-4000:]


@pytest.fixture
def master(tmp_path: Path) -> Iterator[Callable[..., Master]]:
    """master(config_dict) starts gearvisor; teardown kills the master and every process that
    carries its marker (children that outlived it included), by pid."""
    started: list[Master] = []

    def start(config: dict, start: bool = True, env: dict[str, str] | None = None) -> Master:
        base = {"log_format": "json", "pythonpath": [str(REPO), str(tmp_path)],
                "control_socket": str(tmp_path / "gearvisor.sock"),
                "state_dir": str(tmp_path / "state")}  # never the machine's /var/lib
        m = Master(tmp_path, config, uuid.uuid4().hex, base)
        started.append(m)
        return m.start(**(env or {})) if start else m

    try:
        yield start
    finally:
        for m in started:
            m.cleanup()


def write_module(directory: Path, name: str, source: str) -> Path:
    """Write a module atomically (temp file + rename), as a deploy would: a child starting
    at that moment must never import half a file."""
    path = directory / f"{name}.py"
    tmp = directory / f".{name}.py.tmp"
    tmp.write_text(textwrap.dedent(source))
    os.replace(tmp, path)
    return path


__all__ = ["wait_for", "wait_value", "wait_equal", "free_port", "Gearmand", "Master",
           "write_module", "HOST", "signal"]


@pytest.fixture
def wired() -> Iterator[Callable[..., Any]]:
    """make(**worker_kwargs) -> (Worker, Server): a Worker on a socketpair (tests/wired.py);
    everything made is closed afterwards."""
    from wired import make_wired

    made: list = []
    yield lambda **kw: make_wired(made, **kw)
    for worker, theirs in made:
        worker.close()
        theirs.close()


# -- PostgreSQL (the job store's shared backend) --------------------------------------------------


def _postgres_bin() -> Path | None:
    """The newest installed PostgreSQL's bin directory (Debian: /usr/lib/postgresql/N/bin)."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"),
                   key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit()
                   else 0)
    return found[-1].parent if found else None


class Postgres:
    """A real PostgreSQL server: initdb in a temporary directory, listening on a free
    127.0.0.1 port (its unix socket in that directory too), run as an unprivileged user
    (`postgres`, which Debian's package creates, when the tests run as root), stopped by
    pid. Restartable on the same port and data, for outages."""

    SUPERUSER = "gv"

    def __init__(self) -> None:
        bindir = _postgres_bin()
        if bindir is None:
            pytest.skip("PostgreSQL not installed (apt-get install postgresql)")
        self.bin = bindir
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="gv-pg-"))
        self.user: str | None = None
        if os.geteuid() == 0:
            # initdb and postgres refuse to run as root.
            try:
                pw = pwd.getpwnam("postgres")
            except KeyError:
                pw = pwd.getpwnam("nobody")
            self.user = pw.pw_name
            os.chown(self.dir, pw.pw_uid, pw.pw_gid)
        self.data = self.dir / "data"
        self.proc: subprocess.Popen | None = None
        self._run([str(self.bin / "initdb"), "-D", str(self.data), "-U", self.SUPERUSER,
                   "-A", "trust", "-E", "UTF8", "--no-locale", "--no-sync"])

    def _run(self, argv: list[str]) -> None:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=120,
                             user=self.user, cwd=self.dir)
        assert out.returncode == 0, f"{argv[0]} failed: {out.stdout}\n{out.stderr}"

    def start(self) -> Postgres:
        """Start the server and wait until pg_isready says it accepts connections."""
        self._log = open(self.dir / "server.log", "ab")  # noqa: SIM115 - closed by stop()
        self.proc = subprocess.Popen(
            [str(self.bin / "postgres"), "-D", str(self.data), "-h", HOST, "-p", str(self.port),
             "-k", str(self.dir), "-c", "fsync=off", "-c", "max_connections=30",
             "-c", "shared_buffers=16MB"],
            stdout=subprocess.DEVNULL, stderr=self._log, user=self.user, cwd=self.dir)
        isready = str(self.bin / "pg_isready")
        wait_for(lambda: self.proc is not None and self.proc.poll() is None and subprocess.run(
            [isready, "-q", "-h", HOST, "-p", str(self.port)], timeout=10).returncode == 0,
            timeout=30, interval=0.1, message=f"postgres on port {self.port}")
        return self

    def stop(self) -> None:
        """Fast shutdown (SIGINT) by pid, SIGKILL if it is not gone in 15 s."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        self._log.close()
        if proc.poll() is not None:
            return
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)

    def url(self, database: str = "postgres", password: str | None = None) -> str:
        auth = self.SUPERUSER + (f":{password}" if password is not None else "")
        return f"postgresql://{auth}@{HOST}:{self.port}/{database}"

    def create_database(self) -> str:
        """A new empty database; its URL."""
        import psycopg

        name = "gv_" + uuid.uuid4().hex[:12]
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return self.url(name)

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[Postgres]:
    """One PostgreSQL for the session (a fresh database per test: pg_url)."""
    pytest.importorskip("psycopg")
    server = Postgres()
    try:
        yield server.start()
    finally:
        server.remove()


@pytest.fixture
def pg_url(postgres_server: Postgres) -> str:
    """The URL of a new empty database on the session's PostgreSQL."""
    if postgres_server.proc is None or postgres_server.proc.poll() is not None:
        postgres_server.start()  # a test stopped it
    return postgres_server.create_database()


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A job store's URL, once for each backend: a SQLite file under tmp_path/state, and a
    new database on the session's real PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/state/journal.sqlite3"
    return request.getfixturevalue("pg_url")


@pytest.fixture
def postgres_factory() -> Iterator[Callable[[], Postgres]]:
    """make() -> a PostgreSQL of the test's own (to stop and start); removed afterwards."""
    pytest.importorskip("psycopg")
    made: list[Postgres] = []

    def make() -> Postgres:
        server = Postgres()
        made.append(server)
        return server.start()

    try:
        yield make
    finally:
        for server in made:
            server.remove()
