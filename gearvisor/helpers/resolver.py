"""The resolver helper: looks up the host names of job servers for the master's gearmand
probe, so that a resolver that hangs (DNS down: glibc waits its timeout for each name
server, and again for each attempt) never blocks the master's loop.

The master writes one request per line, `<port> <host>`, at most one at a time per server
(master/probe.py); this process answers each with a `messages.Resolved` line as its
lookup ends: the first address getaddrinfo gives (as a child connecting to the same name
would use), or the resolver's error. Up to LOOKUPS_AT_ONCE lookups run at once (threads:
this process runs no user code and never forks), so one name that hangs does not hold
up the others. A line that is no request is answered with an error naming it. At end of
input it waits for the lookups under way and exits 0.

Run by the master through `run_resolver` (forked, two pipes), supervised like every helper
(master/helper.py): restarted with backoff when it dies, stopped with the master.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import NoReturn

from gearvisor import messages as msg
from gearvisor.child.postfork import message_writer, run_helper
from gearvisor.lines import LineSplitter

MAX_LINE = 1024  # bytes in a request line (a host name is at most 253)
READ_MAX = 65536
LOOKUPS_AT_ONCE = 4


def request(host: str, port: int) -> bytes:
    """The line the master writes for (host, port)."""
    return f"{port} {host}".encode()


def lookup(line: bytes,
           getaddrinfo: Callable[..., list] = socket.getaddrinfo) -> msg.Resolved:
    """The answer to one request line (blocking: this is what the helper is for)."""
    port_text, _, host = line.decode("utf-8", "replace").partition(" ")
    if not port_text.isdigit() or not host or not 0 < int(port_text) < 65536:
        return msg.Resolved(host=host[:255], error=f"not a request: {line[:80]!r}; expected "
                            "'<port> <host>'")
    port = int(port_text)
    try:
        family, _, _, _, address = getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except (OSError, UnicodeError, IndexError) as e:
        return msg.Resolved(host=host, port=port, error=str(e) or type(e).__name__)
    return msg.Resolved(host=host, port=port, family=int(family), address=list(address))


def serve(in_fd: int, event_fd: int,
          getaddrinfo: Callable[..., list] = socket.getaddrinfo,
          at_once: int = LOOKUPS_AT_ONCE) -> int:
    """Answer request lines from `in_fd` on `event_fd` until end of input; returns the exit
    code (0)."""
    report = message_writer(event_fd, threadsafe=True)
    lines = LineSplitter(MAX_LINE, lambda size: report(msg.Resolved(
        error=f"a request line of {size} bytes is longer than {MAX_LINE}; dropped")))
    with ThreadPoolExecutor(max_workers=at_once, thread_name_prefix="lookup") as pool:
        while chunk := os.read(in_fd, READ_MAX):
            for line in lines.feed(chunk):
                pool.submit(lambda line=line: report(lookup(line, getaddrinfo)))
    return 0


def run_resolver(in_fd: int, event_fd: int, signals_to_unblock: set[int]) -> NoReturn:
    """The body of the forked resolver helper. Never returns."""
    run_helper("gearvisor: resolver", signals_to_unblock, {in_fd, event_fd},
               lambda: serve(in_fd, event_fd))
