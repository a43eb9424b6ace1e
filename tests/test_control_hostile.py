"""Hostile input to the control socket: requests that are too deep, too large or of the wrong
shape, peers the master refuses, and socket directories someone else planted.

The master tests run a real `gearvisor -c FILE` against a real gearmand and talk to it over
its real socket; the refused peers are real forked processes that drop to another uid, and
the /tmp hijack tests run the master itself as an unused uid, so its default socket
directory is /tmp/gearvisor-<that uid> (unique to the test, no other engineer's run can meet
it). Uid switching needs root.
"""

from __future__ import annotations

import io
import json
import os
import random
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import structlog
import yaml
from conftest import REPO, wait_for
from test_control import NOBODY, Forked, drop_to, request_outcome

from gearvisor import log as logmod
from gearvisor.config import load
from gearvisor.control import (
    MAX_CLIENTS,
    MAX_DEPTH,
    MAX_REQUEST,
    ControlError,
    ControlServer,
    check_private_dir,
    ensure_socket_dir,
    own_socket_dirs,
    parse_request,
    request,
)
from gearvisor.master.arbiter import Arbiter
from gearvisor.master.control import Client, Control

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to switch uids")


# -- parse_request ------------------------------------------------------------------------------


@pytest.mark.parametrize(("line", "expected"), [
    (b"[" * 60_000, f"nested deeper than {MAX_DEPTH} levels"),
    (b'{"verb": ' + b"{" * 60_000, f"nested deeper than {MAX_DEPTH} levels"),
    (b"[" * (MAX_DEPTH + 1) + b"]" * (MAX_DEPTH + 1), "nested deeper"),
    (b'{"verb": "status", "pad": "' + b"x" * MAX_REQUEST + b'"}', "request too large"),
    (b"this is not json", "unreadable request (not JSON)"),
    (b'{"verb": "stat', "unreadable request (not JSON)"),
    (b"\xff\xfe{}", "unreadable request (not JSON)"),
    (b"", "unreadable request (not JSON)"),
    (b"[1, 2]", "must be a JSON object like"),
    (b'"status"', "must be a JSON object like"),
    (b'{"verb": ["status"]}', "field 'verb' must be a string, got list ['status']"),
    (b'{"verb": "scale", "pool": [1], "processes": 1e999}', "field 'pool' must be a string"),
    (b'{"verb": "restart", "pool": {"a": 1}}', "field 'pool' must be a string, got dict"),
], ids=["60k-brackets", "60k-braces", "one-too-deep", "oversized", "garbage", "cut-short",
        "not-utf8", "empty", "array", "string", "verb-list", "pool-list",
        "pool-dict"])
def test_parse_request_refuses_with_a_readable_error(line: bytes, expected: str) -> None:
    with pytest.raises(ControlError) as info:
        parse_request(line)
    assert expected in str(info.value)
    assert len(str(info.value)) < 400  # never the request echoed back whole


def test_parse_request_accepts_what_the_cli_sends() -> None:
    assert parse_request(b'{"verb": "scale", "pool": "images", "processes": 3}') == {
        "verb": "scale", "pool": "images", "processes": 3}
    assert parse_request(b"{}") == {}  # no verb: handle_request answers "unknown request"


def test_parse_request_depth_limit_is_exact_and_ignores_brackets_in_strings() -> None:
    ok = b"[" * MAX_DEPTH + b"]" * MAX_DEPTH
    assert parse_request(b'{"verb": "status", "x": ' + ok[1:-1] + b"}")["verb"] == "status"
    # Brackets inside strings (escaped quotes and backslashes too) are not nesting.
    inside = '[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[\\"{{{{{{{{{{{{{{{{{{{{{{{{{\\\\'
    line = json.dumps({"verb": "status", "pool": inside}).encode()
    assert parse_request(line)["pool"] == json.loads(line)["pool"]


# -- socket directories -------------------------------------------------------------------------


def test_own_socket_dirs_are_the_default_directories() -> None:
    assert own_socket_dirs(1000) == {"/run/gearvisor", "/tmp/gearvisor-1000"}


def test_a_missing_directory_is_made_0700(tmp_path: Path) -> None:
    directory = tmp_path / "run" / "gearvisor"
    old = os.umask(0)  # even with an open umask
    try:
        ensure_socket_dir(str(directory), own=True)
    finally:
        os.umask(old)
    for made in (directory, directory.parent):
        st = os.lstat(made)
        assert stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o700
        assert st.st_uid == os.geteuid()


def test_an_own_directory_that_is_ours_and_private_is_used(tmp_path: Path) -> None:
    directory = tmp_path / "gv"
    directory.mkdir(mode=0o755)
    ensure_socket_dir(str(directory), own=True)
    check_private_dir(str(directory))
    assert stat.S_IMODE(directory.stat().st_mode) == 0o755  # left as it was


def hostile_world_writable(tmp_path: Path) -> Path:
    directory = tmp_path / "gv"
    directory.mkdir()
    directory.chmod(0o777)
    return directory


def hostile_group_writable(tmp_path: Path) -> Path:
    directory = tmp_path / "gv"
    directory.mkdir()
    directory.chmod(0o770)
    return directory


def hostile_symlink(tmp_path: Path) -> Path:
    target = tmp_path / "theirs"
    target.mkdir(mode=0o700)
    (tmp_path / "gv").symlink_to(target)
    return tmp_path / "gv"


def hostile_foreign_owner(tmp_path: Path) -> Path:
    directory = tmp_path / "gv"
    directory.mkdir(mode=0o700)
    os.chown(directory, NOBODY, NOBODY)
    return directory


def hostile_file(tmp_path: Path) -> Path:
    (tmp_path / "gv").write_text("")
    return tmp_path / "gv"


HOSTILE = {
    "world-writable": (hostile_world_writable, "is group- or world-writable (mode 0777)"),
    "group-writable": (hostile_group_writable, "is group- or world-writable (mode 0770)"),
    "symlink": (hostile_symlink, "is a symlink (to "),
    "foreign-owner": (hostile_foreign_owner, f"belongs to uid {NOBODY}, not to this master's"),
    "not-a-directory": (hostile_file, "is not a directory"),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_a_hostile_own_directory_is_refused(tmp_path: Path, case: str) -> None:
    if case == "foreign-owner" and os.geteuid() != 0:
        pytest.skip("needs root to chown")
    make, expected = HOSTILE[case]
    directory = make(tmp_path)
    with pytest.raises(ControlError) as info:
        ensure_socket_dir(str(directory), own=True)
    assert expected in str(info.value)
    assert str(directory) in str(info.value)
    assert "refusing" in str(info.value) or "not a directory" in str(info.value)


@pytest.mark.parametrize("case", ["world-writable", "symlink", "foreign-owner"])
def test_a_chosen_existing_directory_is_used_as_it_is(tmp_path: Path, case: str) -> None:
    """An existing directory the operator picked for control_socket (a project directory,
    /var/run as a symlink to /run) is theirs to choose; only directories we make, or name as
    ours, are checked."""
    if case == "foreign-owner" and os.geteuid() != 0:
        pytest.skip("needs root to chown")
    directory = HOSTILE[case][0](tmp_path)
    ensure_socket_dir(str(directory), own=False)  # no error
    server = ControlServer(str(directory / "gearvisor.sock"))
    try:
        server.open()
        assert stat.S_ISSOCK(os.stat(directory / "gearvisor.sock").st_mode)
    finally:
        server.close()


def test_a_directory_made_under_a_chosen_one_is_checked_and_private(tmp_path: Path) -> None:
    chosen = hostile_world_writable(tmp_path)
    server = ControlServer(str(chosen / "ctl" / "gearvisor.sock"))
    try:
        server.open()
    finally:
        server.close()
    assert stat.S_IMODE(os.lstat(chosen / "ctl").st_mode) == 0o700


# -- the arbiter's per-request guard ------------------------------------------------------------


@pytest.fixture
def control(tmp_path: Path) -> Iterator[tuple[Control, io.StringIO]]:
    """The control component of an Arbiter that is never run: its request handling is
    driven directly over a real socketpair, its JSON log captured."""
    path = tmp_path / "pools.yaml"
    path.write_text(yaml.safe_dump({
        "control_socket": str(tmp_path / "gearvisor.sock"), "watch_config": False,
        "pools": {"web": {"processes": 1, "functions": {"f": "examples.text:echo"},
                          "watch": False}}}))
    stream = io.StringIO()
    logmod.configure("info", "json", stream)
    config = load(str(path))
    arb = Arbiter(config)
    ctl = Control(config)
    ctl.master = arb  # what attach() does, without opening the socket
    try:
        yield ctl, stream
    finally:
        arb.close()
        structlog.reset_defaults()


def answer(ctl: Control, client: Client, ours: socket.socket) -> dict[str, Any]:
    """Run the loop until the buffered reply is written and the client closed; read it."""
    deadline = time.monotonic() + 5
    while client in ctl.clients and time.monotonic() < deadline:
        ctl.master.loop.run_once()
    ours.settimeout(5)
    return json.loads(ours.recv(65536))


def ask(ctl: Control, data: bytes) -> dict[str, Any]:
    """Send `data` on one end of a socketpair and let the control component answer it."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with ours:
        theirs.setblocking(False)
        client = Client(theirs)
        ctl.clients.add(client)
        ours.sendall(data)
        ctl.read(client)
        return answer(ctl, client, ours)


def test_a_request_whose_handling_raises_gets_an_error_and_one_log_line(
        control: tuple[Control, io.StringIO], monkeypatch: pytest.MonkeyPatch) -> None:
    ctl, log = control

    def broken(*_: Any, **__: Any) -> None:
        raise RuntimeError("a bug in scale")

    monkeypatch.setattr(ctl.master, "scale", broken)
    reply = ask(ctl, b'{"verb": "scale", "pool": "web", "processes": 2}\n')
    assert reply["ok"] is False
    assert "RuntimeError: a bug in scale" in reply["error"]
    lines = [json.loads(x) for x in log.getvalue().splitlines()]
    failed = [x for x in lines if x["event"].startswith("control request failed")]
    assert len(failed) == 1 and failed[0]["verb"] == "scale"
    assert "RuntimeError: a bug in scale" in failed[0]["exception"]
    # And the next request is served as usual.
    assert ask(ctl, b'{"verb": "scale", "pool": "nope", "processes": 1}\n') == {
        "ok": False, "error": "no pool named 'nope'; pools: web"}


def test_a_request_cut_short_by_eof_is_still_answered(
        control: tuple[Control, io.StringIO]) -> None:
    ctl, _ = control
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with ours:
        theirs.setblocking(False)
        client = Client(theirs)
        ctl.clients.add(client)
        ctl.master.loop.add_reader(theirs, lambda: ctl.read(client))
        ours.sendall(b'{"verb": "nope"}')
        ours.shutdown(socket.SHUT_WR)  # no newline: the client is done sending
        assert "unknown request 'nope'" in answer(ctl, client, ours)["error"]


def test_a_client_that_does_not_read_its_reply_never_stalls_the_master(
        control: tuple[Control, io.StringIO]) -> None:
    # The reply is far larger than the socket buffer and the client reads nothing: the
    # master writes what fits and moves on (the old reply blocked the loop up to 1 s).
    ctl, _ = control
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with ours:
        theirs.setblocking(False)
        client = Client(theirs)
        ctl.clients.add(client)
        started = time.monotonic()
        ctl.reply(client, {"ok": True, "blob": "x" * (16 * 1024 * 1024)})
        ctl.master.loop.run_once()
        assert time.monotonic() - started < 0.5
        assert client.out  # the rest waits for the socket to take it
        assert client in ctl.clients


# -- a real master ------------------------------------------------------------------------------


def _others_may_run(path: str) -> bool:
    """Whether a uid that is neither the owner nor in the group may execute `path`: every
    directory on the way searchable by others, the file executable by them."""
    real = Path(os.path.realpath(path))
    if not os.stat(real).st_mode & stat.S_IXOTH:
        return False
    return all(os.stat(d).st_mode & stat.S_IXOTH for d in real.parents)


def python_for_others() -> tuple[str, dict[str, str]]:
    """An interpreter another uid can start, and the environment in which it finds gearvisor
    and its dependencies. The tests' own interpreter may live under a private home (pyenv in
    /root): then the system's python of the same version runs, with this venv's packages."""
    env = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(REPO)}
    if _others_may_run(sys.executable):
        return sys.executable, env
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    system = shutil.which(version, path="/usr/local/bin:/usr/bin:/bin")
    if system is None or not _others_may_run(system):
        pytest.skip(f"no {version} that other users may run")
    packages = [p for p in sys.path if p.endswith("site-packages") and os.path.isdir(p)]
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *packages])
    return system, env


def fleet(gearmand: Any, master: Callable[..., Any], tmp_path: Path, processes: int = 2,
          **extra: Any) -> Any:
    """A real master with one small echo pool, registered in gearmand."""
    m = master({"servers": [gearmand.address], "watch_config": False,
                "pools": {"echo": {"processes": processes, "watch": False,
                                   "functions": {"echo": "examples.text:echo"}}}, **extra})
    wait_for(lambda: len(gearmand.workers("echo")) == processes, timeout=20,
             message=f"{processes} children registered in gearmand")
    wait_for(lambda: m.status()["pools"][0]["ready"] == processes, timeout=10,
             message=f"{processes} ready children")
    return m


def child_pids(m: Any) -> set[int]:
    return {c["pid"] for c in m.status()["pools"][0]["children"]}


def raw_request(path: str, data: bytes, timeout: float = 10.0) -> dict[str, Any]:
    """Send raw bytes on the control socket and read the one-line reply."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(path)
        s.sendall(data)
        buf = b""
        while not buf.endswith(b"\n"):
            chunk = s.recv(65536)
            assert chunk, f"the master closed without a reply; got {buf!r}"
            buf += chunk
        return json.loads(buf)


def refused_lines(m: Any) -> list[dict]:
    return m.events("control request refused")


@pytest.mark.integration
def test_deeply_nested_json_does_not_kill_the_master(gearmand, master, tmp_path) -> None:
    m = fleet(gearmand, master, tmp_path)
    before = child_pids(m)
    sock = str(tmp_path / "gearvisor.sock")
    reply = raw_request(sock, b"[" * 60_000 + b"\n")
    assert reply["ok"] is False
    assert f"nested deeper than {MAX_DEPTH} levels" in reply["error"]
    assert m.proc.poll() is None
    assert child_pids(m) == before  # status answers; the same children still serve
    assert all(psutil.pid_exists(pid) for pid in before)
    assert len(gearmand.workers("echo")) == 2
    wait_for(lambda: len(refused_lines(m)) == 1, timeout=5, message="one refusal logged")
    assert "nested deeper" in refused_lines(m)[0]["error"]


@pytest.mark.integration
def test_bad_field_types_get_an_error_and_the_master_carries_on(gearmand, master,
                                                                 tmp_path) -> None:
    m = fleet(gearmand, master, tmp_path)
    before = child_pids(m)
    sock = str(tmp_path / "gearvisor.sock")
    for data, expected in [
        (b'{"verb": "scale", "pool": [1], "processes": 1e999}\n', "'pool' must be a string"),
        (b'{"verb": "scale", "pool": "echo", "processes": 1e999}\n', "got inf"),
        (b'{"verb": "scale", "pool": "echo", "processes": NaN}\n', "got nan"),
        (b'{"verb": {"x": 1}}\n', "'verb' must be a string"),
        (b"\xff\n", "unreadable request"),
        (b"[]\n", "must be a JSON object"),
    ]:
        reply = raw_request(sock, data)
        assert reply["ok"] is False and expected in reply["error"], (data, reply)
    assert m.proc.poll() is None
    assert child_pids(m) == before
    wait_for(lambda: len(refused_lines(m)) == 4, timeout=5, message="four refusals logged")


@pytest.mark.integration
def test_an_oversized_request_gets_an_error_reply(gearmand, master, tmp_path) -> None:
    """The master stops reading past MAX_REQUEST, answers and closes; the client, still
    sending, gets EPIPE and must read that answer rather than report a broken pipe."""
    m = fleet(gearmand, master, tmp_path, processes=1)
    sock = str(tmp_path / "gearvisor.sock")
    reply = request(sock, {"verb": "status", "pad": "x" * (4 << 20)}, timeout=10)
    assert reply == {"ok": False, "error": f"request too large: over {MAX_REQUEST} bytes "
                     "(a control request is one short JSON line)"}
    # A line that ends within the limit but is followed by more is fine: one request each.
    assert raw_request(sock, b'{"verb": "status"}\n' + b" " * 1000)["ok"] is True
    assert m.status()["pools"][0]["name"] == "echo"
    wait_for(lambda: len(refused_lines(m)) == 1, timeout=5, message="one refusal logged")


def connect(path: str) -> socket.socket:
    """A connection to `path`; EAGAIN (OSError, retried by wait_for) while its listen
    backlog is full."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.setblocking(False)
    try:
        s.connect(path)
    except OSError:
        s.close()
        raise
    s.settimeout(10)
    return s


@pytest.mark.integration
def test_too_many_unfinished_requests_are_answered_busy(gearmand, master, tmp_path) -> None:
    m = fleet(gearmand, master, tmp_path, processes=1)
    sock = str(tmp_path / "gearvisor.sock")
    idle: list[socket.socket] = []
    try:
        for _ in range(MAX_CLIENTS):  # each sends half a request and then nothing
            idle.append(wait_for(lambda: connect(sock), timeout=10,
                                 message="room in the master's listen backlog"))
            idle[-1].sendall(b'{"verb": ')
        reply = request(sock, {"verb": "status"}, timeout=10)
        assert reply["ok"] is False and reply["error"].startswith(f"busy: {MAX_CLIENTS} ")
        idle.pop().close()  # one slot frees up once the master sees that client leave
        wait_for(lambda: request(sock, {"verb": "status"}, timeout=10)["ok"], timeout=10,
                 message="status answered again")
    finally:
        for s in idle:
            s.close()
    assert m.status()["pools"][0]["name"] == "echo"


def open_to_nobody(m: Any, directory: Path) -> None:
    """Let uid 65534 reach the master's socket (test only: the master makes it 0600 in a
    0700 directory): then only the master's own peer check stands in the way."""
    wait_for(lambda: (directory / "gearvisor.sock").exists(), timeout=10,
             message="the control socket")
    os.chmod(directory, 0o711)
    os.chmod(directory / "gearvisor.sock", 0o666)


@needs_root
@pytest.mark.integration
def test_a_refused_peer_is_told_why_by_the_cli(gearmand, master, tmp_path) -> None:
    ctl = tmp_path / "ctl"
    m = fleet(gearmand, master, tmp_path, processes=1,
              control_socket=str(ctl / "gearvisor.sock"))
    open_to_nobody(m, ctl)
    python, env = python_for_others()
    out = subprocess.run(
        [python, "-m", "gearvisor", "status", "--socket", "gearvisor.sock"], cwd=ctl,
        user=NOBODY, group=NOBODY, extra_groups=[], capture_output=True, text=True,
        timeout=60, env=env)
    assert out.returncode == 1, out
    assert (f"gearvisor status: refused: uid {NOBODY} may not control this master; run the "
            "command as root") in out.stderr
    wait_for(lambda: m.events("control connection refused"), timeout=5,
             message="the refusal logged")
    assert m.events("control connection refused")[0]["peer_uid"] == NOBODY
    assert m.proc.poll() is None


@needs_root
@pytest.mark.integration
def test_a_refused_peer_reads_the_reason_even_after_a_broken_pipe(gearmand, master,
                                                                  tmp_path) -> None:
    """The master answers a refused peer at once and closes without reading: a client still
    sending (here a request far bigger than the socket buffer, so it always is) gets EPIPE
    and must still read the reason that is waiting in its receive buffer."""
    ctl = tmp_path / "ctl"
    m = fleet(gearmand, master, tmp_path, processes=1,
              control_socket=str(ctl / "gearvisor.sock"))
    open_to_nobody(m, ctl)

    def child() -> dict[str, Any]:
        os.chdir(ctl)
        drop_to(NOBODY)
        return request_outcome("gearvisor.sock", {"verb": "status", "pad": "x" * (4 << 20)})

    proc = Forked(child)
    try:
        got = proc.result(timeout=30)
    finally:
        proc.close()
    assert "reply" in got, got
    assert got["reply"]["ok"] is False
    assert got["reply"]["error"].startswith(f"refused: uid {NOBODY} may not control")
    assert m.proc.poll() is None


# -- a hijacked /tmp directory, with a real master ----------------------------------------------


class UnusedUid:
    """A uid no account has, whose /tmp/gearvisor-<uid> nobody else uses; what is made for
    it (its config directory, its /tmp directory, symlink targets) is removed afterwards."""

    def __init__(self) -> None:
        for _ in range(100):
            uid = random.randrange(3_000_000, 4_000_000)
            if not os.path.lexists(f"/tmp/gearvisor-{uid}"):
                break
        self.uid = uid
        self.sockdir = Path(f"/tmp/gearvisor-{uid}")
        self.home = Path(tempfile.mkdtemp(prefix="gv-hostile-"))
        self.paths: list[Path] = [self.home, self.sockdir]
        self.proc: subprocess.Popen | None = None

    def config(self) -> Path:
        path = self.home / "pools.yaml"
        path.write_text(yaml.safe_dump({
            "servers": ["127.0.0.1:1"], "watch_config": False, "log_format": "json",
            "state_dir": str(self.home / "state"),
            "pools": {"idle": {"processes": 0, "watch": False,
                               "functions": {"f": "examples.text:echo"}}}}))
        os.chown(self.home, self.uid, self.uid)
        return path

    def start_master(self) -> subprocess.Popen:
        """`gearvisor -c FILE` as this uid, with no XDG_RUNTIME_DIR: its default socket is
        /tmp/gearvisor-<uid>/gearvisor.sock."""
        python, env = python_for_others()
        self.proc = subprocess.Popen(
            [python, "-m", "gearvisor", "-c", str(self.config())], cwd=self.home,
            user=self.uid, group=self.uid, extra_groups=[], env=env,
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        return self.proc

    def cleanup(self) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait(timeout=10)
            if self.proc.stderr is not None:
                self.proc.stderr.close()
        for path in self.paths:
            if path.is_symlink() or path.is_file():
                path.unlink()
            elif path.exists():
                shutil.rmtree(path)


@pytest.fixture
def unused_uid() -> Iterator[UnusedUid]:
    made = UnusedUid()
    try:
        yield made
    finally:
        made.cleanup()


def plant(made: UnusedUid, case: str) -> None:
    """Prepare /tmp/gearvisor-<uid> as another user would, before the master starts."""
    if case == "world-writable":  # the user's own directory, but 0777
        made.sockdir.mkdir()
        os.chown(made.sockdir, made.uid, made.uid)
        made.sockdir.chmod(0o777)
    elif case == "symlink":  # to a directory another user owns and the master may write to
        theirs = Path(tempfile.mkdtemp(prefix="gv-theirs-"))
        made.paths.append(theirs)
        os.chown(theirs, NOBODY, NOBODY)
        theirs.chmod(0o777)
        made.sockdir.symlink_to(theirs)
    elif case == "foreign-owner":  # made first by uid 65534, open to all
        made.sockdir.mkdir()
        os.chown(made.sockdir, NOBODY, NOBODY)
        made.sockdir.chmod(0o777)


@needs_root
@pytest.mark.integration
@pytest.mark.parametrize(("case", "expected"), [
    ("world-writable", "is group- or world-writable (mode 0777)"),
    ("symlink", "is a symlink (to /tmp/gv-theirs-"),
    ("foreign-owner", f"belongs to uid {NOBODY}, not to this master's uid"),
])
def test_a_hijacked_tmp_directory_is_refused_and_the_master_exits(unused_uid, case,
                                                                  expected) -> None:
    plant(unused_uid, case)
    proc = unused_uid.start_master()
    try:
        code = proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the master is running on the {case} directory instead of refusing it")
    assert proc.stderr is not None
    lines = [json.loads(x) for x in proc.stderr.read().decode().splitlines()
             if x.startswith("{")]
    assert code == 1
    errors = [x for x in lines if x["event"] == "cannot open the control socket"]
    assert len(errors) == 1, lines
    assert f"/tmp/gearvisor-{unused_uid.uid} " in errors[0]["error"]
    assert expected in errors[0]["error"]
    assert "refusing to use it" in errors[0]["error"]
    target = unused_uid.sockdir.resolve()
    assert not (target / "gearvisor.sock").exists()  # nothing was bound there


@needs_root
@pytest.mark.integration
def test_a_fresh_tmp_directory_is_made_private_and_served(unused_uid) -> None:
    proc = unused_uid.start_master()
    path = unused_uid.sockdir / "gearvisor.sock"

    def answered() -> dict[str, Any] | None:
        assert proc.poll() is None, "the master exited"
        try:
            return request(str(path), {"verb": "status"}, timeout=10)  # as root: allowed
        except ControlError:
            return None  # not listening yet

    assert wait_for(answered, timeout=30, message="the master's answer")["ok"] is True
    st = os.lstat(unused_uid.sockdir)
    assert stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o700
    assert st.st_uid == unused_uid.uid
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0
