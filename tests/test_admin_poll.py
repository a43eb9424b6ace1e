"""admin.WorkersPoll: the master's non-blocking `workers` query (ready: registered), driven
by hand with selectors against local sockets that play gearmand: one that answers, one that
refuses, one that accepts and never answers."""

from __future__ import annotations

import selectors
import socket
import time

from gearvisor.gearman import admin

REPLY = (b"31 127.0.0.1 web1:php:0:4242 : php_reverse php_slow\n"
         b"32 127.0.0.1 - :\n"
         b".\n")


def drive(poll: admin.WorkersPoll, server: socket.socket | None, reply: bytes | None,
          budget: float = 5.0) -> None:
    """Run the poll's events (and the fake server's side) until it is done or time is up."""
    sel = selectors.DefaultSelector()
    sel.register(poll.sock, selectors.EVENT_WRITE)
    conn = None
    deadline = time.monotonic() + budget
    try:
        while not poll.done and time.monotonic() < deadline:
            if server is not None and conn is None:
                server.setblocking(False)
                try:
                    conn, _ = server.accept()
                except BlockingIOError:
                    pass
            for _key, _ in sel.select(0.05):
                sent = poll.sent
                poll.on_ready()
                if poll.done:
                    break
                if poll.sent and not sent:
                    sel.modify(poll.sock, selectors.EVENT_READ)
            if conn is not None and reply is not None and poll.sent:
                conn.setblocking(True)
                assert conn.recv(100) == b"workers\r\n"
                conn.sendall(reply)
                reply = None
    finally:
        sel.close()
        if conn is not None:
            conn.close()


def listener() -> socket.socket:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(8)
    return s


def test_a_poll_reads_and_parses_the_workers_list() -> None:
    server = listener()
    try:
        poll = admin.WorkersPoll("127.0.0.1", server.getsockname()[1], time.monotonic() + 5)
        drive(poll, server, REPLY)
        assert poll.done
        assert poll.result == [
            admin.WorkerInfo(31, "127.0.0.1", "web1:php:0:4242", ("php_reverse", "php_slow")),
            admin.WorkerInfo(32, "127.0.0.1", "-", ())]
        assert poll.sock.fileno() != -1  # the owner unregisters it first, then closes it
        poll.sock.close()
    finally:
        server.close()


def test_a_refused_connection_ends_with_no_result() -> None:
    server = listener()
    port = server.getsockname()[1]
    server.close()  # nobody listens there now
    poll = admin.WorkersPoll("127.0.0.1", port, time.monotonic() + 5)
    drive(poll, None, None)
    assert poll.done and poll.result is None
    poll.sock.close()


def test_a_server_that_never_answers_leaves_the_poll_open_until_its_deadline() -> None:
    """The master's loop is never blocked by it: it drops the poll at its deadline."""
    server = listener()  # the kernel accepts; nobody ever answers
    try:
        poll = admin.WorkersPoll("127.0.0.1", server.getsockname()[1], time.monotonic() + 5)
        drive(poll, None, None, budget=0.3)
        assert poll.sent and not poll.done
        poll.finish(ok=False)  # what the arbiter does at poll.deadline
        assert poll.done and poll.result is None
        poll.sock.close()
    finally:
        server.close()


def test_a_partial_reply_cut_by_the_server_gives_no_result() -> None:
    server = listener()
    try:
        poll = admin.WorkersPoll("127.0.0.1", server.getsockname()[1], time.monotonic() + 5)
        drive(poll, server, b"31 127.0.0.1 web1:php:0:1 : php_rev", budget=0.5)
        assert not poll.done  # waiting for the rest
        poll.finish(ok=admin.complete(poll.buf))
        assert poll.result is None
        poll.sock.close()
    finally:
        server.close()
