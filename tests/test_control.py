"""control: the master's socket (ControlServer) and the CLI's client (request()), on real Unix
sockets in tmp_path. The uid checks use real forked children that drop to other uids, so those
tests need root.

pytest's temporary root is mode 0700, so a child that gives up root could not reach a socket
under tmp_path by its full path: it chdir()s into the socket's directory (made 0711) first and
uses a relative path from then on.
"""

from __future__ import annotations

import errno
import json
import os
import select
import socket
import stat
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import wait_for

from gearvisor.control import (
    AlreadyRunning,
    ControlError,
    ControlServer,
    default_socket_path,
    peer_uid,
    request,
    send_reply,
)
from gearvisor.control import (
    read_line as read_reply,
)

NOBODY = 65534
OTHER = 65533  # a third uid, neither root nor the socket's owner

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to switch uids")


# -- helpers ------------------------------------------------------------------------------------


class Forked:
    """A forked child running `fn`; its JSON-able result comes back through a pipe."""

    def __init__(self, fn: Callable[[], Any]) -> None:
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: never return into pytest
            code = 1
            try:
                os.close(r)
                out = json.dumps({"result": fn()})
                code = 0
            except BaseException as e:  # noqa: B036 - report anything to the parent
                out = json.dumps({"crash": repr(e)})
            try:
                os.write(w, out.encode())
            finally:
                os._exit(code)
        os.close(w)
        self.pid: int | None = pid
        self.fd = r

    def result(self, timeout: float = 15.0) -> Any:
        """Wait (with a deadline) for the child's answer and reap it."""
        deadline = time.monotonic() + timeout
        data = b""
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                self.kill()
                pytest.fail(f"forked child gave no answer within {timeout}s")
            ready, _, _ = select.select([self.fd], [], [], left)
            if not ready:
                continue
            chunk = os.read(self.fd, 65536)
            if not chunk:
                break
            data += chunk
        assert self.pid is not None
        _, status = os.waitpid(self.pid, 0)
        self.pid = None
        got = json.loads(data)
        assert "crash" not in got, f"forked child failed: {got['crash']}"
        assert os.waitstatus_to_exitcode(status) == 0
        return got["result"]

    def kill(self) -> None:
        if self.pid is not None:
            try:
                os.kill(self.pid, 9)
                os.waitpid(self.pid, 0)
            except ChildProcessError:
                pass
            self.pid = None

    def close(self) -> None:
        self.kill()
        try:
            os.close(self.fd)
        except OSError:
            pass


@pytest.fixture
def forked() -> Iterator[Callable[[Callable[[], Any]], Forked]]:
    started: list[Forked] = []

    def start(fn: Callable[[], Any]) -> Forked:
        child = Forked(fn)
        started.append(child)
        return child

    try:
        yield start
    finally:
        for child in started:
            child.close()


def drop_to(uid: int) -> None:
    """In a forked child: become `uid` for good (group first, while still allowed)."""
    os.setgroups([])
    os.setgid(uid)
    os.setuid(uid)


def request_outcome(path: str, payload: dict[str, Any], timeout: float = 10.0) -> dict[str, Any]:
    """request() as a JSON-able outcome, for a forked child to send back."""
    try:
        return {"reply": request(path, payload, timeout=timeout)}
    except ControlError as e:
        return {"error": str(e)}


@pytest.fixture
def umask() -> Iterator[None]:
    """Run with the usual 022 umask, restored afterwards."""
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


@pytest.fixture
def servers() -> Iterator[Callable[[str], ControlServer]]:
    """ControlServer factory; every one is closed at teardown."""
    made: list[ControlServer] = []

    def make(path: str) -> ControlServer:
        server = ControlServer(path)
        made.append(server)
        return server

    try:
        yield make
    finally:
        for server in made:
            server.close()


def read_line(conn: socket.socket, timeout: float = 5.0) -> bytes:
    conn.setblocking(True)
    conn.settimeout(timeout)
    return read_reply(conn)


class ServeOne(threading.Thread):
    """Accept one connection on an open ControlServer, read its request line, then let
    `respond(conn, uid, request_bytes)` answer (send_reply by default)."""

    def __init__(self, server: ControlServer,
                 respond: Callable[[socket.socket, int, bytes], None] | None = None) -> None:
        super().__init__(daemon=True)
        self.server = server
        self.respond = respond or self.echo
        self.stop = threading.Event()
        self.uid: int | None = None
        self.request: bytes | None = None
        self.error: BaseException | None = None

    @staticmethod
    def echo(conn: socket.socket, uid: int, data: bytes) -> None:
        send_reply(conn, {"ok": True, "echo": json.loads(data), "uid": uid})

    def run(self) -> None:
        try:
            assert self.server.sock is not None
            deadline = time.monotonic() + 15
            accepted = None
            while accepted is None:
                if self.stop.is_set() or time.monotonic() > deadline:
                    return
                select.select([self.server.sock], [], [], 0.1)
                accepted = self.server.accept()
            conn, self.uid = accepted
            self.request = read_line(conn)
            self.respond(conn, self.uid, self.request)
        except BaseException as e:  # noqa: B036 - surfaced by the test
            self.error = e


@pytest.fixture
def serve_one() -> Iterator[Callable[..., ServeOne]]:
    threads: list[ServeOne] = []

    def start(server: ControlServer, respond: Callable[..., None] | None = None) -> ServeOne:
        t = ServeOne(server, respond)
        threads.append(t)
        t.start()
        return t

    try:
        yield start
    finally:
        for t in threads:
            t.stop.set()
            t.join(timeout=20)
            assert not t.is_alive()
            assert t.error is None, t.error


def connectable(path: str) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        try:
            s.connect(path)
        except OSError:
            return False
        return True


# -- default_socket_path ------------------------------------------------------------------------


def test_default_socket_path_root() -> None:
    assert default_socket_path(0, {"XDG_RUNTIME_DIR": "/run/user/0"}) == \
        "/run/gearvisor/gearvisor.sock"


def test_default_socket_path_xdg_runtime_dir() -> None:
    assert default_socket_path(1000, {"XDG_RUNTIME_DIR": "/run/user/1000"}) == \
        "/run/user/1000/gearvisor.sock"


@pytest.mark.parametrize("environ", [{}, {"XDG_RUNTIME_DIR": ""}], ids=["unset", "empty"])
def test_default_socket_path_fallback(environ: dict[str, str]) -> None:
    assert default_socket_path(1000, environ) == "/tmp/gearvisor-1000/gearvisor.sock"


def test_default_socket_path_defaults_to_own_euid_and_environ(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_RUNTIME_DIR", "/run/user/4242")
    monkeypatch.setattr(os, "geteuid", lambda: 4242)
    assert default_socket_path() == "/run/user/4242/gearvisor.sock"
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    assert default_socket_path() == "/run/gearvisor/gearvisor.sock"


# -- ControlServer.open / close -----------------------------------------------------------------


def test_open_creates_socket_mode_0600(tmp_path: Path, servers, umask) -> None:
    path = str(tmp_path / "gearvisor.sock")
    sock = servers(path).open()
    st = os.stat(path)
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o600
    assert st.st_uid == os.geteuid()
    assert not sock.getblocking()
    assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1
    assert connectable(path)


def test_open_is_0600_even_with_an_open_umask_and_restores_it(tmp_path: Path, servers) -> None:
    path = str(tmp_path / "gearvisor.sock")
    old = os.umask(0)
    try:
        servers(path).open()
        assert os.umask(0) == 0  # the caller's umask is back
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


def test_open_creates_missing_parent_directory(tmp_path: Path, servers, umask) -> None:
    directory = tmp_path / "run" / "gearvisor"
    path = str(directory / "gearvisor.sock")
    servers(path).open()
    assert directory.is_dir()
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    assert stat.S_ISSOCK(os.stat(path).st_mode)


def test_open_reports_a_parent_that_cannot_be_created(tmp_path: Path, servers) -> None:
    (tmp_path / "plain").write_text("not a directory")
    path = str(tmp_path / "plain" / "sub" / "gearvisor.sock")
    with pytest.raises(ControlError, match="cannot create .* for the control socket"):
        servers(path).open()


def test_open_removes_a_stale_socket(tmp_path: Path, servers) -> None:
    path = str(tmp_path / "gearvisor.sock")
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(path)
    dead.listen(1)
    dead.close()  # a master that died without unlinking its socket
    assert not connectable(path)
    servers(path).open()
    st = os.stat(path)
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o600
    assert connectable(path)


def test_open_refuses_when_another_master_listens(tmp_path: Path, servers) -> None:
    path = str(tmp_path / "gearvisor.sock")
    first = servers(path)
    first.open()
    ino = os.stat(path).st_ino
    with pytest.raises(AlreadyRunning, match="already listening on") as info:
        servers(path).open()
    assert isinstance(info.value, ControlError)
    assert os.stat(path).st_ino == ino  # the running master's socket is untouched
    assert connectable(path)
    # The refusal's probe connection is simply pending on the first master; drain it.
    accepted = wait_for(first.accept, timeout=5, message="the probe connection")
    accepted[0].close()


def test_open_does_not_delete_a_regular_file(tmp_path: Path, servers) -> None:
    path = tmp_path / "gearvisor.sock"
    path.write_text("precious")
    with pytest.raises(ControlError, match="not a socket"):
        servers(str(path)).open()
    assert path.read_text() == "precious"


def test_open_refuses_when_a_busy_master_listens(tmp_path: Path, servers) -> None:
    path = str(tmp_path / "gearvisor.sock")
    first = servers(path)
    first.open()
    ino = os.stat(path).st_ino
    clients: list[socket.socket] = []
    try:
        while True:  # fill the live master's backlog, as a burst of CLI calls would
            c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            c.setblocking(False)
            try:
                c.connect(path)
            except BlockingIOError:
                c.close()
                break
            clients.append(c)
            assert len(clients) < 1000
        with pytest.raises(AlreadyRunning):
            servers(path).open()
        assert os.stat(path).st_ino == ino
    finally:
        for c in clients:
            c.close()


def test_close_unlinks_its_own_socket(tmp_path: Path, servers) -> None:
    path = str(tmp_path / "gearvisor.sock")
    server = servers(path)
    server.open()
    server.close()
    assert server.sock is None
    assert not os.path.lexists(path)
    server.close()  # twice is harmless


def test_close_leaves_a_replaced_file_alone(tmp_path: Path, servers) -> None:
    path = str(tmp_path / "gearvisor.sock")
    server = servers(path)
    server.open()
    # Create the replacement while the socket still exists, so it cannot reuse its inode.
    other = tmp_path / "other"
    other.write_text("someone else's")
    os.replace(other, path)
    server.close()
    assert Path(path).read_text() == "someone else's"


def test_close_leaves_a_newer_masters_socket_alone(tmp_path: Path, servers) -> None:
    path = str(tmp_path / "gearvisor.sock")
    old = servers(path)
    old.open()
    os.unlink(path)  # e.g. removed by hand; the old socket still holds its inode
    new = servers(path)
    new.open()
    ino = os.stat(path).st_ino
    old.close()
    assert os.path.lexists(path)
    assert os.stat(path).st_ino == ino
    assert connectable(path)
    accepted = wait_for(new.accept, timeout=5, message="the check connection")
    accepted[0].close()
    new.close()
    assert not os.path.lexists(path)


def test_close_without_open_is_harmless(tmp_path: Path) -> None:
    path = tmp_path / "gearvisor.sock"
    path.write_text("not ours")
    ControlServer(str(path)).close()
    assert path.read_text() == "not ours"


# -- accept / allowed / peer_uid / send_reply ---------------------------------------------------


def test_accept_returns_none_when_nobody_waits(tmp_path: Path, servers) -> None:
    server = servers(str(tmp_path / "gearvisor.sock"))
    server.open()
    assert server.accept() is None


def test_accept_returns_the_peer_uid(tmp_path: Path, servers) -> None:
    path = str(tmp_path / "gearvisor.sock")
    server = servers(path)
    server.open()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
        client.connect(path)
        conn, uid = wait_for(server.accept, timeout=5, message="the connection")
        try:
            assert uid == os.geteuid()
            assert not conn.getblocking()
            assert server.allowed(uid)
        finally:
            conn.close()


def test_peer_uid_of_a_socketpair() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with a, b:
        assert peer_uid(a) == os.geteuid()
        assert peer_uid(b) == os.geteuid()


def test_allowed_root_and_own_uid_only(tmp_path: Path) -> None:
    server = ControlServer(str(tmp_path / "gearvisor.sock"))
    assert server.allowed(0)
    assert server.allowed(os.geteuid())
    if os.geteuid() != NOBODY:
        assert not server.allowed(NOBODY)
    assert not server.allowed(OTHER) or os.geteuid() == OTHER


def test_allowed_for_an_unprivileged_master(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    server = ControlServer(str(tmp_path / "gearvisor.sock"))
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert server.allowed(1000)
    assert server.allowed(0)
    assert not server.allowed(1001)
    assert not server.allowed(NOBODY)


def test_send_reply_writes_one_json_line_and_closes() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with b:
        a.setblocking(False)
        send_reply(a, {"ok": True, "pools": {"images": "rolled"}})
        assert a.fileno() == -1  # closed
        b.settimeout(5)
        assert read_line(b) == b'{"ok": true, "pools": {"images": "rolled"}}\n'
        assert b.recv(10) == b""  # and then end of file


def test_send_reply_to_a_gone_client_does_not_raise() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    b.close()
    send_reply(a, {"ok": True})
    assert a.fileno() == -1


@needs_root
def test_socket_mode_keeps_other_users_out(tmp_path: Path, servers, forked) -> None:
    """A uid that is neither root nor the master's cannot even connect: 0600 does it."""
    path = tmp_path / "ctl" / "gearvisor.sock"
    server = servers(str(path))
    server.open()
    os.chmod(path.parent, 0o711)

    def child() -> dict[str, Any]:
        os.chdir(path.parent)
        drop_to(NOBODY)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            try:
                s.connect(path.name)
            except OSError as e:
                raw = e.errno
            else:
                raw = 0
        return {"errno": raw, **request_outcome(path.name, {"command": "status"})}

    got = forked(child).result()
    assert got["errno"] == errno.EACCES
    assert "permission denied on gearvisor.sock" in got["error"]
    assert server.accept() is None  # nothing ever reached the master


@needs_root
def test_foreign_peer_is_seen_by_uid_and_refused(tmp_path: Path, servers, forked) -> None:
    """With the file mode opened up, SO_PEERCRED is the last line: the master sees the real
    uid of the peer and refuses it (answering as the arbiter does)."""
    path = tmp_path / "ctl" / "gearvisor.sock"
    server = servers(str(path))
    server.open()
    os.chmod(path.parent, 0o711)
    os.chmod(path, 0o666)

    def child() -> dict[str, Any]:
        os.chdir(path.parent)
        drop_to(NOBODY)
        return request_outcome(path.name, {"command": "status"})

    proc = forked(child)
    conn, uid = wait_for(server.accept, timeout=10, message="the child's connection")
    assert uid == NOBODY
    assert not server.allowed(uid)
    send_reply(conn, {"ok": False, "error": f"uid {uid} may not control this master"})
    assert proc.result() == {"reply": {"ok": False,
                                       "error": "uid 65534 may not control this master"}}


# -- request() ----------------------------------------------------------------------------------


def test_request_without_a_socket(tmp_path: Path) -> None:
    path = str(tmp_path / "gearvisor.sock")
    with pytest.raises(ControlError, match="no gearvisor master is running") as info:
        request(path, {"command": "status"})
    assert path in str(info.value)


def test_request_to_a_stale_socket(tmp_path: Path) -> None:
    path = str(tmp_path / "gearvisor.sock")
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(path)
    dead.close()
    with pytest.raises(ControlError, match="stale control socket"):
        request(path, {"command": "status"}, timeout=5)


def test_request_to_a_regular_file(tmp_path: Path) -> None:
    path = tmp_path / "gearvisor.sock"
    path.write_text("")
    with pytest.raises(ControlError, match="is not a socket"):
        request(str(path), {"command": "status"})


def test_request_round_trip(tmp_path: Path, servers, serve_one) -> None:
    path = str(tmp_path / "gearvisor.sock")
    server = servers(path)
    server.open()
    thread = serve_one(server)
    payload = {"command": "scale", "pool": "images", "processes": 3}
    reply = request(path, payload, timeout=10)
    assert reply == {"ok": True, "echo": payload, "uid": os.geteuid()}
    thread.join(timeout=10)
    assert thread.request == json.dumps(payload).encode() + b"\n"
    assert thread.uid == os.geteuid()


def test_request_large_reply(tmp_path: Path, servers, serve_one) -> None:
    """A reply bigger than one recv() is read to its newline."""
    path = str(tmp_path / "gearvisor.sock")
    server = servers(path)
    server.open()
    big = {"ok": True, "status": ["x" * 100] * 5000}
    serve_one(server, lambda conn, uid, data: send_reply(conn, big))
    assert request(path, {"command": "status"}, timeout=10) == big


def test_request_closed_without_answer(tmp_path: Path, servers, serve_one) -> None:
    path = str(tmp_path / "gearvisor.sock")
    server = servers(path)
    server.open()
    serve_one(server, lambda conn, uid, data: conn.close())
    with pytest.raises(ControlError, match="closed the connection without an answer"):
        request(path, {"command": "status"}, timeout=10)


def test_request_unreadable_answer(tmp_path: Path, servers, serve_one) -> None:
    path = str(tmp_path / "gearvisor.sock")
    server = servers(path)
    server.open()

    def garbage(conn: socket.socket, uid: int, data: bytes) -> None:
        conn.sendall(b"this is not json\n")
        conn.close()

    serve_one(server, garbage)
    with pytest.raises(ControlError, match="unreadable answer from the master"):
        request(path, {"command": "status"}, timeout=10)


def test_request_times_out(tmp_path: Path) -> None:
    """A master that accepts nothing (stuck): the client gives up at its timeout."""
    path = str(tmp_path / "gearvisor.sock")
    stuck = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        stuck.bind(path)
        stuck.listen(1)
        start = time.monotonic()
        with pytest.raises(ControlError, match="did not answer within 0.3s"):
            request(path, {"command": "status"}, timeout=0.3)
        assert time.monotonic() - start < 5
    finally:
        stuck.close()


@needs_root
def test_request_to_a_socket_of_another_user(tmp_path: Path, servers, forked) -> None:
    path = tmp_path / "ctl" / "gearvisor.sock"
    server = servers(str(path))
    server.open()
    os.chmod(path.parent, 0o711)
    os.chown(path, NOBODY, NOBODY)

    def child() -> dict[str, Any]:
        os.chdir(path.parent)
        drop_to(OTHER)
        return request_outcome(path.name, {"command": "status"})

    got = forked(child).result()
    assert "belongs to uid 65534" in got["error"]
    assert f"(uid {OTHER})" in got["error"]
    assert server.accept() is None  # refused before connecting


@needs_root
def test_root_may_use_a_socket_of_another_user(tmp_path: Path, servers, serve_one) -> None:
    path = str(tmp_path / "gearvisor.sock")
    server = servers(path)
    server.open()
    os.chown(path, NOBODY, NOBODY)
    serve_one(server)
    assert request(path, {"command": "status"}, timeout=10)["ok"] is True


def test_a_master_that_cannot_open_its_control_socket_exits_1_with_one_clear_line(
        tmp_path: Path) -> None:
    """What it says is the reason (the path is no socket), not a traceback from closing
    the components it never attached."""
    import subprocess
    import sys

    import yaml
    from conftest import REPO

    taken = tmp_path / "gearvisor.sock"
    taken.write_text("precious")
    config = tmp_path / "pools.yaml"
    config.write_text(yaml.safe_dump({
        "servers": ["127.0.0.1:1"], "control_socket": str(taken), "watch_config": False,
        "state_dir": str(tmp_path / "state"), "pythonpath": [str(REPO)],
        "pools": {"web": {"functions": {"f": "examples.text:echo"}, "watch": False}}}))
    out = subprocess.run([sys.executable, "-m", "gearvisor", "-c", str(config)], cwd=REPO,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 1, out.stderr[-3000:]
    said = out.stdout + out.stderr
    assert "not a socket" in said and "Traceback" not in said, said[-3000:]
    assert taken.read_text() == "precious"


def test_scale_refuses_what_the_master_or_the_machine_cannot_hold(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """`gearvisor scale web 100000` forked until the OOM killer took the master and every
    worker with it. Refused before a fork: more than a pool may have, more open files than
    the master may hold, more memory than is available for the children added."""
    import resource
    import types

    import psutil
    import yaml

    from gearvisor.config import load
    from gearvisor.master.control import DEFAULT_CHILD_BYTES, scale_refusal
    from gearvisor.policy.pool import Pool

    path = tmp_path / "pools.yaml"
    path.write_text(yaml.safe_dump({"pools": {"web": {
        "processes": 2, "functions": {"f": "examples.text:echo"}, "watch": False}}}))
    pool = Pool(load(str(path)).pools["web"])
    master = types.SimpleNamespace(children={1: None, 2: None})
    monkeypatch.setattr(resource, "getrlimit", lambda _which: (1024, 4096))
    monkeypatch.setattr(psutil, "virtual_memory",
                        lambda: types.SimpleNamespace(available=100 * DEFAULT_CHILD_BYTES))
    assert "at most 10000 children a pool" in scale_refusal(master, pool, 10_001)
    assert scale_refusal(master, pool, 1) is None  # (fewer: always)
    assert scale_refusal(master, pool, 90) is None
    assert "MiB available" in scale_refusal(master, pool, 200)
    assert "open files" in scale_refusal(master, pool, 600)
