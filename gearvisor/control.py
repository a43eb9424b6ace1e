"""The control socket: the master serves JSON requests, `gearvisor reload/status/...` sends them.

One request and one reply per connection, each a single JSON line. The socket is created
with mode 0600 and every peer's uid is checked (SO_PEERCRED): only root and the master's
own user are served. A request is bounded in size (MAX_REQUEST) and nesting (MAX_DEPTH)
before it is parsed, so no request can exhaust the master's memory or recursion limit.
The socket's directory, where it is one the master made or names as its own, must be a
real directory that only the master's user can write to (a /tmp hijack is refused).
"""

from __future__ import annotations

import errno
import json
import os
import socket
import stat
import struct
from typing import Any

MAX_REQUEST = 64 * 1024  # bytes in one request line; a CLI request is under 200
MAX_DEPTH = 16  # nesting of arrays and objects in a request; the CLI's requests use 1
MAX_CLIENTS = 64  # connections still sending their request; more are answered "busy"
_UCRED = struct.Struct("3i")
_QUOTE, _BACKSLASH = ord('"'), ord("\\")
_OPENERS, _CLOSERS = frozenset(b"[{"), frozenset(b"]}")


class ControlError(Exception):
    """A control request could not be made; the text is meant for the operator."""


def _nested_deeper_than(line: bytes, limit: int) -> bool:
    """Whether `line` opens more than `limit` arrays/objects inside each other, counting
    brackets outside JSON strings. json.loads recurses once per level, so this runs first:
    a line of 60,000 `[` would otherwise raise RecursionError (or worse) in the master."""
    if line.count(b"[") + line.count(b"{") <= limit:
        return False  # it cannot nest deeper than it opens: the usual request skips the scan
    depth = 0
    in_string = escaped = False
    for byte in line:
        if in_string:
            if escaped:
                escaped = False
            elif byte == _BACKSLASH:
                escaped = True
            elif byte == _QUOTE:
                in_string = False
        elif byte == _QUOTE:
            in_string = True
        elif byte in _OPENERS:
            depth += 1
            if depth > limit:
                return True
        elif byte in _CLOSERS:
            depth -= 1
    return False


def _short(value: Any, limit: int = 60) -> str:
    """repr() cut to `limit` characters: an error reply never echoes a whole request back."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def parse_request(line: bytes) -> dict[str, Any]:
    """Decode one control request line into a dict, within the master's limits.

    Args:
        line: the bytes the client sent, without the newline.
    Returns:
        The request object; `verb` and `pool`, when present, are strings.
    Raises:
        ControlError: the line is too long, nested too deep, not JSON, not an object, or a
            field has the wrong type; the text says which, for the reply and the log.
    """
    if len(line) > MAX_REQUEST:
        raise ControlError(f"request too large: over {MAX_REQUEST} bytes (a control request "
                           "is one short JSON line)")
    if _nested_deeper_than(line, MAX_DEPTH):
        raise ControlError(f"request nested deeper than {MAX_DEPTH} levels of arrays or "
                           "objects; expected a flat JSON object like {\"verb\": \"status\"}")
    try:
        request = json.loads(line)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        raise ControlError(f"unreadable request (not JSON): {str(e)[:120]}; "
                           "expected a JSON object like {\"verb\": \"status\"}") from None
    if not isinstance(request, dict):
        raise ControlError(f"a request must be a JSON object like {{\"verb\": \"status\"}}, "
                           f"got {type(request).__name__} {_short(request)}")
    for key in ("verb", "pool"):
        if key in request and not isinstance(request[key], str):
            raise ControlError(f"request field {key!r} must be a string, got "
                               f"{type(request[key]).__name__} {_short(request[key])}")
    return request


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
    """Another master listens on the control socket."""


def own_socket_dirs(euid: int | None = None) -> frozenset[str]:
    """The directories gearvisor names as its own (the defaults that default_socket_path()
    puts the socket in): found existing, they are checked as if the master had made them,
    since whoever made them may not have been us."""
    euid = os.geteuid() if euid is None else euid
    return frozenset({"/run/gearvisor", f"/tmp/gearvisor-{euid}"})


def ensure_socket_dir(directory: str, own: bool = False) -> None:
    """Make the control socket's directory if it is missing (mode 0700), and refuse one that
    someone else could change.

    A directory that anyone but the master's user can write to lets them move the socket
    away and put their own in its place (a /tmp hijack: another user creates
    /tmp/gearvisor-$UID first, 0777 or as a symlink to a directory of theirs). So every
    directory this makes, and `directory` itself when `own` (it is one of
    own_socket_dirs()), must be a real directory, not a symlink, owned by our euid and
    not group- or world-writable. An existing directory the operator chose for
    control_socket (a project directory, /run, /var/run as a symlink) is theirs to
    choose and is used as it is.

    Raises:
        ControlError: a directory cannot be made, or fails those checks; the text names it,
            says what is wrong and what to do.
    """
    directory = os.path.abspath(directory)
    missing: list[str] = []
    path = directory
    while not os.path.lexists(path):
        missing.append(path)
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    for path in reversed(missing):
        try:
            os.mkdir(path, 0o700)  # never follows a symlink: one already there is EEXIST
        except FileExistsError:
            pass  # made meanwhile by someone else: the check below decides
        except OSError as e:
            raise ControlError(f"cannot create {path} for the control socket: {e}; "
                               "set control_socket in the config") from None
        check_private_dir(path)
    if own and not missing:
        check_private_dir(directory)


def check_private_dir(directory: str) -> None:
    """Refuse `directory` unless it is a real directory (not a symlink), owned by our euid
    and writable by nobody else. Opened with O_NOFOLLOW and checked with fstat, so what is
    checked is the directory itself, not whatever a symlink or a swap points at."""
    euid = os.geteuid()
    what = "remove it (no master of yours uses it) or set control_socket to another path"
    try:
        lst = os.lstat(directory)
    except OSError as e:
        raise ControlError(f"cannot check {directory} for the control socket: {e}") from None
    if stat.S_ISLNK(lst.st_mode):
        try:
            target = os.readlink(directory)
        except OSError:
            target = "?"
        raise ControlError(f"the control socket directory {directory} is a symlink (to "
                           f"{target}), which someone else may have planted; refusing to use "
                           f"it: {what}")
    if not stat.S_ISDIR(lst.st_mode):
        raise ControlError(f"the control socket directory {directory} is not a directory; "
                           f"{what}")
    try:
        fd = os.open(directory, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as e:  # ELOOP/ENOTDIR: swapped for a symlink or a file since the lstat
        raise ControlError(f"the control socket directory {directory} changed while it was "
                           f"checked ({e.strerror}); refusing to use it: {what}") from None
    try:
        st = os.fstat(fd)
    finally:
        os.close(fd)
    if (st.st_dev, st.st_ino) != (lst.st_dev, lst.st_ino):
        raise ControlError(f"the control socket directory {directory} changed while it was "
                           f"checked; refusing to use it: {what}")
    if st.st_uid != euid:
        raise ControlError(f"the control socket directory {directory} belongs to uid "
                           f"{st.st_uid}, not to this master's uid {euid}, so its owner could "
                           f"replace the socket; refusing to use it: {what}")
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise ControlError(f"the control socket directory {directory} is group- or "
                           f"world-writable (mode {stat.S_IMODE(st.st_mode):04o}), so others "
                           f"could replace the socket; refusing to use it: `chmod 700 "
                           f"{directory}`, or {what}")


class ControlServer:
    """The master's listening socket. Non-blocking; the loop drives it (master/control.py)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.sock: socket.socket | None = None
        self._ino: tuple[int, int] | None = None

    def open(self) -> socket.socket:
        """Bind and listen at `path` (0600), making its directory first if it is missing.

        Raises:
            ControlError: the directory cannot be made or is not safe (see
                ensure_socket_dir), another master listens there, or the bind fails.
        """
        directory = os.path.abspath(os.path.dirname(self.path) or ".")
        ensure_socket_dir(directory, own=directory in own_socket_dirs())
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
            try:
                os.unlink(self.path)  # stale: nobody listens there any more
            except FileNotFoundError:
                pass
            except OSError as e:
                raise ControlError(f"cannot remove the stale control socket {self.path}: "
                                   f"{e.strerror}; remove it by hand or set a different "
                                   "control_socket") from None
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
        except (BlockingIOError, InterruptedError, ConnectionAbortedError):
            return None  # nobody waits, or the client gave up before we got to it
        except OSError as e:  # EMFILE, ENFILE, ENOBUFS: the connection waits in the backlog
            raise ControlError(f"cannot accept a control connection: {e.strerror}") from None
        try:
            conn.setblocking(False)
            return conn, peer_uid(conn)
        except OSError as e:
            conn.close()
            raise ControlError(f"cannot read the peer of a control connection: {e.strerror}"
                               ) from None

    def allowed(self, uid: int) -> bool:
        """Only root and the master's own user may control it."""
        return uid == 0 or uid == os.geteuid()

    def refusal(self, uid: int) -> str:
        """The reply to a peer that allowed() refuses: who it is, and who may."""
        euid = os.geteuid()
        who = "root" if euid == 0 else f"root or uid {euid}"
        return f"refused: uid {uid} may not control this master; run the command as {who}"

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
        try:
            sock.sendall(json.dumps(payload).encode() + b"\n")
        except (BrokenPipeError, ConnectionResetError):
            # The master answered and closed before reading (a refusal, a request too
            # large): its reply is already in our receive buffer.
            pass
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
        raise ControlError("the master closed the connection without an answer; its log "
                           "may say why")
    try:
        return json.loads(buf)
    except ValueError:
        raise ControlError(f"unreadable answer from the master: {buf[:200]!r}") from None
