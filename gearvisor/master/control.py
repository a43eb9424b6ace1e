"""The control server: `gearvisor reload/status/stop/restart/scale` and the status stream.

Requests are JSON lines (gearvisor/control.py parses them and bounds their size and
nesting). Replies are buffered and written when the socket is writable, so a client that
does not read never stalls the loop; one whose reply is still not out after
REPLY_TIMEOUT is dropped. `reload` and `restart` answer once the roll has finished (or
halted). `subscribe` streams a status line every `interval` seconds until the client goes
away (`gearvisor top` reads it); a subscriber that reads too slowly skips lines rather
than making the master buffer them.
"""

from __future__ import annotations

import json
import resource
import socket
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import psutil

from gearvisor.config.values import MAX_PROCESSES
from gearvisor.control import (
    MAX_CLIENTS,
    MAX_REQUEST,
    ControlError,
    ControlServer,
    default_socket_path,
    parse_request,
)
from gearvisor.master import bus as ev
from gearvisor.master.arbiter import StartError
from gearvisor.master.component import Component
from gearvisor.policy.backoff import master_fds
from gearvisor.policy.pool import Pool, roll_results

if TYPE_CHECKING:
    from gearvisor.config import Config
    from gearvisor.master.arbiter import Arbiter
from gearvisor.master.loop import Timer

REPLY_TIMEOUT = 10.0  # a reply not read by then: the client is dropped
ACCEPT_PAUSE = 1.0  # after accept() fails (out of fds): listen again this much later
MAX_PIN = 30 * 86400.0  # `gearvisor scale --for`: the longest pin
MAX_OUT = 4 * 1024 * 1024  # a subscriber with this much unread is sent nothing more for now


@dataclass(eq=False)
class Client:
    """One control connection: its request, its reply buffer, what it waits for."""

    sock: socket.socket
    buf: bytearray = field(default_factory=bytearray)
    out: bytearray = field(default_factory=bytearray)
    waits_for: tuple[str, ...] = ()  # pools whose roll must finish before the reply
    close_after: bool = False  # close once `out` is written
    stream: Timer | None = None  # the next status line of a subscription
    deadline: Timer | None = None


class Control(Component):
    """Serves the control socket from the master's loop."""

    def __init__(self, config: Config) -> None:
        self.server = ControlServer(config.control_socket or default_socket_path())
        self.clients: set[Client] = set()
        self.waiting: list[Client] = []
        self.listener: Any = None
        self.accept_failing = False  # accept() failed and has not succeeded since

    def attach(self, master: Arbiter) -> None:
        self.master = master
        self.log = master.log
        try:
            self.listener = self.server.open()
        except ControlError as e:
            raise StartError("cannot open the control socket", str(e)) from None
        master.loop.add_reader(self.listener, self.accept)
        master.loop.every_pass(self.answer_finished_rolls)
        master.bus.subscribe(ev.Stopping, self._stopping)

    def reload(self, config: Config) -> None:
        if (config.control_socket or default_socket_path()) != self.server.path:
            self.master.log.warning("control_socket changed; it takes effect on the next "
                                    "start", running=self.server.path)

    def close(self) -> None:
        for client in list(self.clients):
            self._close(client)
        self.server.close()
        self.listener = None

    # -- connections ----------------------------------------------------------------------------

    def accept(self) -> None:
        while True:
            try:
                accepted = self.server.accept()
            except ControlError as e:
                # Out of fds (EMFILE, ENFILE) or buffers: the connection stays in the
                # backlog and the listener readable, so trying again at once would spin
                # the loop. Stop listening for ACCEPT_PAUSE; say so once per streak.
                if not self.accept_failing:
                    self.master.log.warning("control connection not accepted; pausing "
                                            "accepts", error=str(e), retry_in=ACCEPT_PAUSE)
                self.accept_failing = True
                self.master.loop.remove_reader(self.listener)
                self.master.loop.call_later(ACCEPT_PAUSE, self._resume_accepting)
                return
            if accepted is None:
                return
            if self.accept_failing:
                self.accept_failing = False
                self.master.log.info("control connections accepted again")
            sock, uid = accepted
            client = Client(sock)
            self.clients.add(client)
            if not self.server.allowed(uid):
                self.master.log.warning("control connection refused", peer_uid=uid)
                self.reply(client, {"ok": False, "error": self.server.refusal(uid)})
                continue
            # Each client still sending holds an fd and up to MAX_REQUEST bytes: bounded.
            if sum(1 for c in self.clients if not c.close_after) > MAX_CLIENTS:
                self.master.log.warning("control connection refused: too many open",
                                        limit=MAX_CLIENTS)
                self.reply(client, {"ok": False, "error": f"busy: {MAX_CLIENTS} control "
                                    "connections are still sending their request; try again"})
                continue
            self.master.loop.add_reader(sock, lambda c=client: self.read(c))

    def _resume_accepting(self) -> None:
        if self.listener is not None:  # not closed meanwhile
            self.master.loop.add_reader(self.listener, self.accept)

    def read(self, client: Client) -> None:
        """Read a client's request line; once it is complete (or too long, or the client
        is done sending), answer it. Whatever the bytes, the client gets one reply and the
        master one log line: nothing raises out of here into the loop."""
        try:
            data = client.sock.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if client.stream is not None:
            if not data:
                self._close(client)  # the subscriber went away
            return  # a subscriber has nothing more to say
        client.buf += data
        end = client.buf.find(b"\n")
        if end < 0 and data and len(client.buf) <= MAX_REQUEST:
            return  # the rest of the line is on its way
        self.master.loop.remove_reader(client.sock)
        if not client.buf:
            self._close(client)  # connected and left, e.g. another master's liveness probe
            return
        line = bytes(client.buf if end < 0 else client.buf[:end])
        client.buf.clear()
        verb = ""
        try:
            request = parse_request(line)
            verb = request.get("verb", "")
            self.handle(client, request)
        except ControlError as e:
            self.master.log.warning("control request refused", error=str(e))
            self.reply(client, {"ok": False, "error": str(e)})
        except Exception as e:  # a bug in handling one request must not stop the master
            self.master.log.exception("control request failed; the master carries on",
                                      verb=verb)
            if client in self.waiting:
                self.waiting.remove(client)
            self.reply(client, {"ok": False, "error": f"the master failed to handle this "
                                f"request ({e.__class__.__name__}: {str(e)[:200]}); see its "
                                "log"})

    # -- replies --------------------------------------------------------------------------------

    def reply(self, client: Client, body: dict[str, Any], close: bool = True) -> None:
        """Queue one JSON line; it is written as the socket takes it (then closed)."""
        client.out += json.dumps(body).encode() + b"\n"
        client.close_after = close
        if client.deadline is None:
            client.deadline = self.master.loop.call_later(REPLY_TIMEOUT,
                                                          lambda: self._too_slow(client))
        self.master.loop.add_writer(client.sock, lambda: self._write(client))

    def _write(self, client: Client) -> None:
        try:
            sent = client.sock.send(client.out)
        except BlockingIOError:
            return
        except OSError:
            self._close(client)  # the client went away
            return
        del client.out[:sent]
        if client.out:
            return
        self.master.loop.remove_writer(client.sock)
        if client.deadline is not None:
            client.deadline.cancel()
            client.deadline = None
        if client.close_after:
            self._close(client)

    def _too_slow(self, client: Client) -> None:
        client.deadline = None
        if client.out:
            self.master.log.warning("control client does not read its reply; dropped",
                                    unread=len(client.out))
            self._close(client)

    def _close(self, client: Client) -> None:
        if client not in self.clients:
            return
        self.clients.discard(client)
        for timer in (client.stream, client.deadline):
            if timer is not None:
                timer.cancel()
        self.master.loop.remove_reader(client.sock)
        self.master.loop.remove_writer(client.sock)
        client.sock.close()

    # -- verbs ----------------------------------------------------------------------------------

    def handle(self, client: Client, request: dict[str, Any]) -> None:
        master = self.master
        verb = request.get("verb", "")
        if master.stopping and verb not in ("status", "subscribe"):
            self.reply(client, {"ok": False, "error": "the master is stopping"})
        elif verb == "status":
            self.reply(client, {"ok": True, "status": master.status(master.clock())})
        elif verb == "subscribe":
            self.subscribe(client, request.get("interval", 1.0))
        elif verb == "reload":
            error = master.reload(why="gearvisor reload")
            if error is not None:
                self.reply(client, {"ok": False, "error": error})
            else:
                self._wait(client, tuple(master.pools))
        elif verb == "stop":
            self.reply(client, {"ok": True, "pid": master.pid})
            master.stop(fast=False, why="gearvisor stop")
        elif verb in ("restart", "scale"):
            name = request.get("pool", "")
            pool = master.pools.get(name)
            if pool is None or pool.removed:
                known = ", ".join(sorted(n for n, p in master.pools.items() if not p.removed))
                self.reply(client, {"ok": False, "error": f"no pool named {name!r}; pools: "
                                    f"{known or '(none)'}"})
            elif verb == "restart":
                master.roll_pool(pool, why="gearvisor restart")
                self._wait(client, (pool.name,))
            else:
                processes = request.get("processes")
                if (not isinstance(processes, int) or isinstance(processes, bool)
                        or processes < 0):
                    self.reply(client, {"ok": False, "error": f"scale {pool.name}: expected a "
                                        f"whole number >= 0, got {processes!r}"})
                    return
                refusal = scale_refusal(master, pool, processes)
                if refusal is not None:
                    self.reply(client, {"ok": False, "error": f"scale {pool.name}: {refusal}"})
                    return
                pin_for = request.get("for")
                if pin_for is not None and (
                        not isinstance(pin_for, (int, float)) or isinstance(pin_for, bool)
                        or not 1 <= pin_for <= MAX_PIN):
                    self.reply(client, {"ok": False, "error": f"scale {pool.name}: --for "
                                        f"expected a duration from 1s to 30d, got {pin_for!r}"})
                    return
                pin = None if pin_for is None else float(pin_for)
                before = master.scale(pool, processes, pin_for=pin)
                self.reply(client, {"ok": True, "pool": pool.name, "before": before,
                                    "after": processes, "for": pin})
        elif isinstance(verb, str) and verb in master.verbs:
            try:
                reply = master.verbs[verb](request)
            except Exception as e:  # a component's bug must not leave the client hanging
                master.log.exception("control verb failed", verb=verb)
                reply = {"ok": False, "error": f"{verb} failed in the master: {e}"}
            self.reply(client, reply)
        else:
            known = ", ".join(["status", "subscribe", "reload", "stop", "restart", "scale",
                               *sorted(master.verbs)])
            self.reply(client, {"ok": False, "error": f"unknown request {verb!r}; expected "
                                f"one of {known}"})

    def subscribe(self, client: Client, interval: Any) -> None:
        """Stream status lines until the client disconnects (it may send nothing more)."""
        if (not isinstance(interval, (int, float)) or isinstance(interval, bool)
                or not 0.1 <= interval <= 3600):
            self.reply(client, {"ok": False, "error": "subscribe: interval must be a number "
                                f"of seconds from 0.1 to 3600, got {interval!r}"})
            return
        self.master.loop.add_reader(client.sock, lambda: self.read(client))

        def tick() -> None:
            if client not in self.clients:
                return
            if len(client.out) < MAX_OUT:  # a slow reader skips lines, nothing piles up
                client.out += json.dumps({"ok": True, "status": self.master.status(
                    self.master.clock())}).encode() + b"\n"
                self.master.loop.add_writer(client.sock, lambda: self._write(client))
            client.stream = self.master.loop.call_later(float(interval), tick)

        client.stream = self.master.loop.call_later(0.0, tick)

    def _wait(self, client: Client, pools: tuple[str, ...]) -> None:
        client.waits_for = pools
        self.waiting.append(client)

    def answer_finished_rolls(self) -> None:
        """Answer reload/restart requests whose rolls have finished (or halted)."""
        for client in list(self.waiting):
            results = roll_results(self.master.pools, client.waits_for)
            if results is not None:
                self.waiting.remove(client)
                self.reply(client, {"ok": not any("error" in r for r in results.values()),
                                    "pools": results})

    def _stopping(self, event: ev.Stopping) -> None:
        for client in self.waiting:
            self.reply(client, {"ok": False, "error": f"the master is stopping ({event.why})"})
        self.waiting.clear()


DEFAULT_CHILD_BYTES = 10 << 20  # a child's own memory, when none of the pool can be measured


def scale_refusal(master: Arbiter, pool: Pool, processes: int) -> str | None:
    """Why `gearvisor scale` may not run `processes` children in `pool`, or None: more
    than a pool may have, more open files than the master may hold (master_fds, what
    the start-up warning counts), or more memory than the machine has available for the children
    added (each as big as one of the pool's now: its unique set size, what a fork adds).
    A typo must not fork the fleet into the OOM killer."""
    if processes > MAX_PROCESSES:
        return (f"at most {MAX_PROCESSES} children a pool (what processes may be), got "
                f"{processes}")
    adding = processes - pool.desired
    if adding <= 0:
        return None
    total = len(master.children) + adding
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    need = master_fds(total)
    if soft != resource.RLIM_INFINITY and need > soft:
        return (f"the master would need about {need} open files for {total} children, and "
                f"its limit is {soft}: raise LimitNOFILE (systemd) or `ulimit -n` first")
    each, measured = DEFAULT_CHILD_BYTES, "an estimate"
    for child in pool.children():
        try:
            each = psutil.Process(child.pid).memory_full_info().uss
            measured = f"as child {child.pid} is now"
            break
        except (psutil.Error, OSError):
            continue
    available = psutil.virtual_memory().available
    if adding * each > available:
        return (f"{adding} more children need about {adding * each >> 20} MiB "
                f"({each / (1 << 20):.1f} MiB each, {measured}), and the machine has "
                f"{available >> 20} MiB available: scale in smaller steps or free memory")
    return None
