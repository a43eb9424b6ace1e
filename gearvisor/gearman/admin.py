"""gearmand's text admin protocol: `status`, `workers`, `version`, for the master, CLI and tests."""

from __future__ import annotations

import socket
from dataclasses import dataclass


class AdminError(Exception):
    """The job server could not be reached or answered something unexpected."""


@dataclass(frozen=True)
class FunctionStatus:
    function: str
    queued: int  # total jobs, including running ones
    running: int
    workers: int  # capable workers


@dataclass(frozen=True)
class WorkerInfo:
    fd: int
    ip: str
    client_id: str  # "-" when the worker sent no SET_CLIENT_ID
    functions: tuple[str, ...]


def command(host: str, port: int, cmd: str, timeout: float = 5.0) -> list[str]:
    """Send one admin command; return the reply lines (without the final "." line)."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            # CRLF: gearmand cuts 2 bytes off some commands otherwise (DESIGN.md).
            sock.sendall(cmd.encode() + b"\r\n")
            buf = b""
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                buf += chunk
                if buf.endswith(b"\n.\n") or buf == b".\n" or (
                        cmd in ("version", "getpid") and buf.endswith(b"\n")):
                    break
    except OSError as e:
        raise AdminError(f"job server {host}:{port}: {e}") from e
    text = buf.decode(errors="replace")
    if text.startswith("ERR "):
        raise AdminError(f"job server {host}:{port}: {text.strip()}")
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if lines and lines[-1] == ".":
        lines.pop()
    return lines


def status(host: str, port: int, timeout: float = 5.0) -> dict[str, FunctionStatus]:
    """`status`: per function, queued/running jobs and capable workers."""
    out = {}
    for line in command(host, port, "status", timeout):
        parts = line.split("\t")
        if len(parts) == 4:
            out[parts[0]] = FunctionStatus(parts[0], int(parts[1]), int(parts[2]),
                                           int(parts[3]))
    return out


def workers(host: str, port: int, timeout: float = 5.0) -> list[WorkerInfo]:
    """`workers`: one entry per connection, with its client id and registered functions."""
    out = []
    for line in command(host, port, "workers", timeout):
        head, sep, fns = line.partition(" : ")
        if not sep:
            head, fns = line.rstrip(" :"), ""
        parts = head.split(" ", 2)
        if len(parts) < 3:
            continue
        out.append(WorkerInfo(int(parts[0]), parts[1], parts[2].strip(), tuple(fns.split())))
    return out


def version(host: str, port: int, timeout: float = 5.0) -> str:
    lines = command(host, port, "version", timeout)
    return lines[0].strip() if lines else ""
