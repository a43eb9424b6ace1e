"""The control socket: the master serves JSON requests, `gearvisor reload/status/...` sends them.

One request and one reply per connection, each a single JSON line. The socket is created
with mode 0600 and every peer's uid is checked (SO_PEERCRED): only root and the master's
own user are served.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import stat
import struct
from typing import Any

MAX_REQUEST = 64 * 1024
_UCRED = struct.Struct("3i")


class ControlError(Exception):
    """A control request could not be made; the text is meant for the operator."""


def default_socket_path(euid: int | None = None, environ: dict[str, str] | None = None) -> str:
    """/run/gearvisor/gearvisor.sock for root, else $XDG_RUNTIME_DIR/gearvisor.sock, else
    /tmp/gearvisor-$UID/gearvisor.sock."""
    euid = os.geteuid() if euid is None else euid
    env = os.environ if environ is None else environ
    if euid == 0:
        return "/run/gearvisor/gearvisor.sock"
    runtime = env.get("XDG_RUNTIME_DIR")
    if runtime:
        return os.path.join(runtime, "gearvisor.sock")
    return f"/tmp/gearvisor-{euid}/gearvisor.sock"


def peer_uid(sock: socket.socket) -> int:
    data = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    return _UCRED.unpack(data)[1]


class AlreadyRunning(ControlError):
    pass


class ControlServer:
    """The master's listening socket. Non-blocking; the arbiter's selector drives it."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.sock: socket.socket | None = None
        self._ino: tuple[int, int] | None = None

    def open(self) -> socket.socket:
        directory = os.path.dirname(self.path) or "."
        if not os.path.isdir(directory):
            try:
                os.makedirs(directory, mode=0o700, exist_ok=True)
            except OSError as e:
                raise ControlError(f"cannot create {directory} for the control socket: {e}; "
                                   "set control_socket in the config") from None
        self._clear_stale()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        old = os.umask(0o177)  # created 0600: no window in which others could connect
        try:
            sock.bind(self.path)
        except OSError as e:
            sock.close()
            raise ControlError(f"cannot bind the control socket {self.path}: {e}") from None
        finally:
            os.umask(old)
        os.chmod(self.path, 0o600)
        sock.listen(16)
        sock.setblocking(False)
        st = os.stat(self.path)
        self._ino = (st.st_dev, st.st_ino)
        self.sock = sock
        return sock

    def _clear_stale(self) -> None:
        """Remove a socket left by a dead master; refuse anything else at the path.

        Only a socket that refuses connections (ECONNREFUSED: nobody listens) is stale. A
        connect that succeeds, times out or finds the backlog full (EAGAIN) means a live master,
        and a regular file or directory there is not ours to delete.
        """
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(st.st_mode):
            raise ControlError(f"{self.path} exists and is not a socket; move it away or set "
                               "a different control_socket in the config")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.settimeout(1.0)
            probe.connect(self.path)
        except ConnectionRefusedError:
            os.unlink(self.path)  # stale: nobody listens there any more
            return
        except FileNotFoundError:
            return  # removed meanwhile
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.ETIMEDOUT) and not isinstance(e, TimeoutError):
                raise ControlError(f"cannot check the existing control socket {self.path}: "
                                   f"{e}; remove it if no master runs") from None
        finally:
            probe.close()
        raise AlreadyRunning(
            f"another gearvisor master is already listening on {self.path}; stop it "
            "first or set a different control_socket")

    def accept(self) -> tuple[socket.socket, int] | None:
        """Accept one client; returns (connection, peer uid) or None if none is waiting."""
        assert self.sock is not None
        try:
            conn, _ = self.sock.accept()
        except (BlockingIOError, InterruptedError):
            return None
        conn.setblocking(False)
        return conn, peer_uid(conn)

    def allowed(self, uid: int) -> bool:
        return uid == 0 or uid == os.geteuid()

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        try:
            # Only remove the socket if it is still ours (a new master may have replaced it).
            st = os.stat(self.path)
            if self._ino is not None and (st.st_dev, st.st_ino) == self._ino:
                os.unlink(self.path)
        except OSError:
            pass


def send_reply(conn: socket.socket, reply: dict[str, Any]) -> None:
    """Write one JSON line and close. Bounded: a client that does not read is dropped."""
    try:
        conn.setblocking(True)
        conn.settimeout(1.0)
        conn.sendall(json.dumps(reply).encode() + b"\n")
    except OSError:
        pass
    finally:
        conn.close()


def read_line(sock: socket.socket) -> bytes:
    """Read up to and including a newline, or until EOF (blocking, with the socket's timeout)."""
    buf = b""
    while not buf.endswith(b"\n"):
        chunk = sock.recv(65536)
        if not chunk:
            break
        buf += chunk
    return buf


def request(path: str, payload: dict[str, Any], timeout: float = 30.0) -> dict[str, Any]:
    """Send one request to the master at `path` and return its reply."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise ControlError(f"no gearvisor master is running: no control socket at {path} "
                           "(start one with `gearvisor -c FILE`, or pass the -c FILE the "
                           "master runs with)") from None
    except PermissionError:
        raise ControlError(f"cannot reach {path}: permission denied; run as the master's user "
                           "or root") from None
    if not stat.S_ISSOCK(st.st_mode):
        raise ControlError(f"{path} is not a socket; check control_socket in the config")
    if st.st_uid not in (0, os.geteuid()) and os.geteuid() != 0:
        raise ControlError(f"the control socket {path} belongs to uid {st.st_uid}, not to you "
                           f"(uid {os.geteuid()}); run as that user or root")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        try:
            sock.connect(path)
        except ConnectionRefusedError:
            raise ControlError(f"stale control socket {path}: no master is listening (it "
                               "died without cleaning up); start gearvisor again") from None
        except PermissionError:
            raise ControlError(f"permission denied on {path}; run as the master's user or "
                               "root") from None
        sock.sendall(json.dumps(payload).encode() + b"\n")
        buf = read_line(sock)
    except TimeoutError:
        raise ControlError(f"the master did not answer within {timeout:g}s") from None
    except OSError as e:
        if e.errno == errno.ECONNRESET:
            raise ControlError("the master closed the connection without an answer") from None
        raise ControlError(f"control socket {path}: {e}") from None
    finally:
        sock.close()
    if not buf:
        raise ControlError("the master closed the connection without an answer (refused: "
                           "only root and the master's own user may use it)")
    try:
        return json.loads(buf)
    except ValueError:
        raise ControlError(f"unreadable answer from the master: {buf[:200]!r}") from None
