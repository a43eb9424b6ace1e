"""admin.ProbePoll and admin.ProbeParser: the master's non-blocking, bounded probe of a job
server (`version`, `getpid`, `status`, `workers` pipelined), driven by hand with selectors
against local sockets that play gearmand: one that answers, one that refuses, one that
never answers, and hostile ones (endless lines, endless data, nonsense numbers)."""

from __future__ import annotations

import selectors
import socket
import threading
import time

import pytest

from gearvisor.gearman import admin

REPLY = (b"OK 1.1.20+ds\n"
         b"OK 4242\n"
         b"php_reverse\t5\t1\t2\n"
         b"idle\t0\t0\t0\n"
         b".\n"
         b"31 127.0.0.1 web1:php:0:4242 : php_reverse php_slow\n"
         b"32 127.0.0.1 - :\n"
         b".\n")


def drive(poll: admin.ProbePoll, budget: float = 5.0) -> None:
    """Run the poll's events until it is done or `budget` seconds have passed."""
    sel = selectors.DefaultSelector()
    sel.register(poll.sock, selectors.EVENT_WRITE)
    deadline = time.monotonic() + budget
    try:
        while not poll.done and time.monotonic() < deadline:
            for _key, _ in sel.select(0.05):
                sent = poll.sent
                poll.on_ready()
                if poll.sent and not sent and not poll.done:
                    sel.modify(poll.sock, selectors.EVENT_READ)
    finally:
        sel.close()


class Server:
    """A one-connection TCP server on 127.0.0.1 that reads the probe's request and then
    runs `answer(conn)`; bounded: its thread ends within `lifetime` seconds."""

    def __init__(self, answer, lifetime: float = 10.0) -> None:
        self.answer = answer
        self.request = b""
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(4)
        self.listener.settimeout(lifetime)
        self.port = self.listener.getsockname()[1]
        self.deadline = time.monotonic() + lifetime
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        try:
            conn, _ = self.listener.accept()
        except OSError:
            return
        with conn:
            conn.settimeout(1.0)
            try:
                while not self.request.endswith(b"workers\r\n"):
                    data = conn.recv(100)
                    if not data:
                        return
                    self.request += data
                self.answer(conn, self)
            except OSError:
                pass  # the probe hung up: what it does with nonsense

    def poll(self, timeout: float = 5.0) -> admin.ProbePoll:
        return admin.ProbePoll(admin.resolve("127.0.0.1", self.port),
                               time.monotonic() + timeout)

    def close(self) -> None:
        self.listener.close()
        self.thread.join(timeout=15)


@pytest.fixture
def serve():
    made: list[Server] = []

    def make(answer, **kw) -> Server:
        server = Server(answer, **kw)
        made.append(server)
        return server

    yield make
    for server in made:
        server.close()


def test_a_probe_pipelines_the_four_commands_and_parses_every_answer(serve) -> None:
    server = serve(lambda conn, _s: conn.sendall(REPLY))
    poll = server.poll()
    drive(poll)
    poll.sock.close()
    assert server.request == admin.PROBE_REQUEST  # CRLF after each command, one write
    assert poll.error is None
    assert poll.answer == admin.ProbeAnswer(
        version="1.1.20+ds", pid=4242,
        functions={"php_reverse": admin.FunctionStatus("php_reverse", 5, 1, 2),
                   "idle": admin.FunctionStatus("idle", 0, 0, 0)},
        workers=(admin.WorkerInfo(31, "127.0.0.1", "web1:php:0:4242",
                                  ("php_reverse", "php_slow")),
                 admin.WorkerInfo(32, "127.0.0.1", "-", ())))


def test_an_answer_that_comes_a_byte_at_a_time_is_read_whole(serve) -> None:
    def trickle(conn: socket.socket, _s: Server) -> None:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for i in range(len(REPLY)):
            conn.sendall(REPLY[i:i + 1])

    poll = serve(trickle).poll()
    drive(poll)
    poll.sock.close()
    assert poll.answer is not None and poll.answer.pid == 4242
    assert len(poll.answer.workers) == 2


def test_a_server_without_getpid_still_answers_the_rest() -> None:
    parser = admin.ProbeParser()
    parser.feed(b"OK 1.0\nERR UNKNOWN_COMMAND Unknown+server+command\n.\n.\n")
    assert parser.done
    answer = parser.answer()
    assert (answer.version, answer.pid, answer.functions, answer.workers) == ("1.0", None,
                                                                              {}, ())


def test_a_refused_connection_ends_with_an_error() -> None:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nobody listens there now
    poll = admin.ProbePoll(admin.resolve("127.0.0.1", port), time.monotonic() + 5)
    drive(poll)
    poll.sock.close()
    assert poll.done and poll.answer is None
    assert "refused" in (poll.error or "").lower()


def test_a_server_that_never_answers_leaves_the_poll_open_until_its_deadline(serve) -> None:
    """The master's loop is never blocked by it: the probe ends it at its deadline."""
    done = threading.Event()
    server = serve(lambda conn, _s: done.wait(5))
    poll = server.poll()
    drive(poll, budget=0.3)
    assert poll.sent and not poll.done
    poll.finish("no whole answer within 2s")  # what master/probe.py does at the deadline
    assert poll.done and poll.answer is None and poll.error == "no whole answer within 2s"
    poll.sock.close()
    done.set()


def test_an_answer_cut_by_the_server_gives_no_answer(serve) -> None:
    poll = serve(lambda conn, _s: conn.sendall(REPLY[:40])).poll()
    drive(poll)
    poll.sock.close()
    assert poll.answer is None and "closed the connection" in poll.error


def test_endless_data_from_a_server_is_refused_at_the_byte_cap(serve) -> None:
    """A server that never stops sending: the probe stops reading at PROBE_MAX_BYTES, and
    holds at most one line of it at a time."""
    line = b"f\t1\t0\t0\n" * 8192

    def flood(conn: socket.socket, s: Server) -> None:
        conn.sendall(b"OK 1\nOK 2\n")
        while time.monotonic() < s.deadline:
            conn.sendall(line)

    poll = serve(flood).poll(timeout=20)
    drive(poll, budget=20)
    poll.sock.close()
    assert poll.answer is None and poll.error is not None
    assert "bytes" in poll.error or "lines" in poll.error
    assert poll.parser.received <= admin.PROBE_MAX_BYTES + 65536
    assert len(poll.parser.partial) <= admin.PROBE_MAX_LINE


@pytest.mark.parametrize("data, error", [
    (b"OK 1\nOK 2\n" + b"x" * (admin.PROBE_MAX_LINE + 1), "line longer"),
    (b"OK 1\nOK 2\n" + b"\n" * (admin.PROBE_MAX_LINES + 1), "more than"),
    (b"OK 1\nOK 2\n" + b"f\t1\t1\t1\n" * (admin.PROBE_MAX_LINES + 1), "more than"),
])
def test_a_line_or_line_count_over_its_cap_is_refused(data: bytes, error: str) -> None:
    parser = admin.ProbeParser()
    with pytest.raises(admin.ProbeError, match=error):
        for i in range(0, len(data), 65536):
            parser.feed(data[i:i + 65536])


def test_nonsense_lines_are_skipped_one_by_one_and_counted() -> None:
    parser = admin.ProbeParser()
    parser.feed(b"OK \xff\xfe\n"  # a version that is not UTF-8: shown replaced
                b"OK -5\n"  # a pid that is no pid
                b"good\t3\t1\t1\n"
                b"neg\t-1\t0\t0\n"
                b"huge\t" + b"9" * 400 + b"\t0\t0\n"
                b"short\t1\t2\n"
                b"\t1\t0\t0\n"  # no name
                b"\xd9\xa3\t1\t0\t0\n"  # a name with a non-ASCII digit is still a name...
                b"arabic\t\xd9\xa3\t0\t0\n"  # ...but a count in non-ASCII digits is none
                b".\n"
                b"x 127.0.0.1 id : f\n"  # fd not a number
                b"7 127.0.0.1\n"  # too few fields
                b"8 ::1 - : f g\n"
                b".\n")
    assert parser.done
    answer = parser.answer()
    assert answer.pid is None and answer.version == "\ufffd\ufffd"
    assert answer.functions == {"good": admin.FunctionStatus("good", 3, 1, 1),
                                "\u0663": admin.FunctionStatus("\u0663", 1, 0, 0)}
    assert answer.workers == (admin.WorkerInfo(8, "::1", "-", ("f", "g")),)
    assert answer.skipped == 7


def test_bytes_after_the_last_answer_are_ignored() -> None:
    parser = admin.ProbeParser()
    parser.feed(REPLY + b"junk that never ends" * 10)
    assert parser.done and parser.partial == b""
    parser.feed(b"more" * 100_000)
    assert parser.answer().pid == 4242 and parser.received == len(REPLY) + 200


def test_the_blocking_helpers_skip_malformed_lines_instead_of_raising() -> None:
    assert admin.parse_workers(["x 127.0.0.1 - : f", "3 127.0.0.1 id : f"]) == [
        admin.WorkerInfo(3, "127.0.0.1", "id", ("f",))]


def test_a_blocking_command_stops_reading_an_answer_that_never_ends(serve) -> None:
    """admin.command (the CLI's and the tests' `status`/`workers`): a server that streams
    lines without the final "." is given MAX_ANSWER bytes, then an error, not all memory."""
    chunk = b"f\t1\t0\t1\n" * (1 << 17)  # 1 MiB of plausible status lines

    def endless(conn, _server) -> None:
        for _ in range(admin.MAX_ANSWER // len(chunk) + 4):  # bounded: a little past it
            conn.sendall(chunk)

    server = serve(endless)
    with pytest.raises(admin.AdminError, match="longer than"):
        admin.workers("127.0.0.1", server.port, timeout=10.0)
