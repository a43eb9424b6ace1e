"""shm/payload.py: the current job's payload in shared memory, written by a real forked
child and read by the parent after the child is gone (the journal's crash record)."""

from __future__ import annotations

import os
import signal
import time

from gearvisor.shm.payload import PayloadArea


def in_child(body) -> None:
    """Run `body` in a forked child that then waits to be killed, and SIGKILL it mid-job."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            body()
            os.write(w, b"x")
            time.sleep(30)  # "mid-job" until the parent kills it
        finally:
            os._exit(0)
    try:
        os.close(w)
        assert os.read(r, 1) == b"x"
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(r)


def test_a_killed_childs_payload_is_read_whole() -> None:
    area = PayloadArea(64)
    try:
        in_child(lambda: area.job_started(b"hello world"))
        assert area.read() == (b"hello world", 11, False)
    finally:
        area.close()


def test_a_payload_over_the_cap_is_read_cut() -> None:
    area = PayloadArea(4)
    try:
        in_child(lambda: area.job_started(b"0123456789"))
        assert area.read() == (b"0123", 10, True)
    finally:
        area.close()


def test_no_job_or_a_cleared_copy_reads_none() -> None:
    area = PayloadArea(16)
    try:
        assert area.read() is None
        in_child(lambda: (area.job_started(b"abc"), area.clear()))
        assert area.read() is None
        in_child(lambda: area.job_started(b""))
        assert area.read() == (b"", 0, False)  # an empty payload is still a payload
    finally:
        area.close()


def test_a_child_killed_mid_copy_reads_none() -> None:
    area = PayloadArea(16)
    try:
        # what a kill between the two sequence writes leaves: the sequence odd
        in_child(lambda: area._mm.__setitem__(slice(0, 8), (1).to_bytes(8, "little")))
        assert area.read() is None
    finally:
        area.close()


def test_a_later_job_replaces_the_copy() -> None:
    area = PayloadArea(8)
    try:
        in_child(lambda: (area.job_started(b"first-payload"), area.job_started(b"2nd")))
        assert area.read() == (b"2nd", 3, False)
    finally:
        area.close()
