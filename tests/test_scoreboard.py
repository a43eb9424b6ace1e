"""scoreboard.Scoreboard: the per-child shared record, in one process and across a real fork."""

from __future__ import annotations

import os
import select
import signal
import time
from collections.abc import Iterator

import pytest

from gearvisor.shm import scoreboard as scoreboard_module
from gearvisor.shm.scoreboard import Scoreboard, Snapshot


@pytest.fixture
def board() -> Iterator[Scoreboard]:
    b = Scoreboard()
    try:
        yield b
    finally:
        b.close()


def run_in_child(fn) -> int:
    """Fork, run `fn` in the child, and return its exit code once reaped."""
    pid = os.fork()
    if pid == 0:  # the child: never return into pytest
        code = 70
        try:
            fn()
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def test_fresh_board_is_idle_and_empty(board: Scoreboard) -> None:
    assert board.read() == Snapshot(busy=False, done=0, failed=0, job_started=0.0,
                                    function="", handle="", unique="")


def test_job_started_then_finished(board: Scoreboard) -> None:
    board.job_started("resize", "H:host:42", "img-7", 1234.5)
    assert board.read() == Snapshot(True, 0, 0, 1234.5, "resize", "H:host:42", "img-7")
    board.job_finished(True)
    assert board.read() == Snapshot(False, 1, 0, 0.0, "", "", "")


def test_counters(board: Scoreboard) -> None:
    outcomes = [True, True, False, True, False, True]
    for i, ok in enumerate(outcomes):
        board.job_started("f", f"H:{i}", "", float(i))
        snap = board.read()
        assert snap.busy and snap.handle == f"H:{i}"
        board.job_finished(ok)
    snap = board.read()
    assert (snap.done, snap.failed) == (4, 2)
    assert not snap.busy


def test_failed_job_counts_as_failed(board: Scoreboard) -> None:
    board.job_started("resize", "H:1", "", 1.0)
    board.job_finished(False)
    snap = board.read()
    assert (snap.done, snap.failed, snap.busy, snap.function) == (0, 1, False, "")


def test_a_new_job_replaces_the_previous_fields(board: Scoreboard) -> None:
    board.job_started("a-rather-long-function-name", "H:host:1", "unique-one", 1.0)
    board.job_finished(True)
    board.job_started("f", "H:2", "u", 2.0)
    assert board.read() == Snapshot(True, 1, 0, 2.0, "f", "H:2", "u")


def test_long_text_is_truncated_to_128_bytes(board: Scoreboard) -> None:
    board.job_started("f" * 300, "h" * 128, "u" * 129, 1.0)
    snap = board.read()
    assert snap.function == "f" * 128
    assert snap.handle == "h" * 128
    assert snap.unique == "u" * 128


def test_multibyte_utf8_round_trip(board: Scoreboard) -> None:
    board.job_started("größe_ändern", "H:hôte:1", "图像-7 🖼", 1.0)
    snap = board.read()
    assert (snap.function, snap.handle, snap.unique) == ("größe_ändern", "H:hôte:1", "图像-7 🖼")


def test_multibyte_truncation_on_a_character_boundary(board: Scoreboard) -> None:
    board.job_started("é" * 100, "", "", 1.0)  # 200 bytes; 128 is a boundary for 2-byte chars
    assert board.read().function == "é" * 64
    # the handle and the unique id are cut the same way (job_started encodes them once)
    board.job_started("f", "H:" + "é" * 100, "图" * 50, 1.0)
    snap = board.read()
    assert snap.handle == "H:" + "é" * 63 and snap.unique == "图" * 42


def test_multibyte_truncation_never_splits_a_character(board: Scoreboard) -> None:
    name = "图" * 50  # 3 bytes each: 150 bytes, 128 falls inside the 43rd character
    board.job_started(name, "", "", 1.0)
    got = board.read().function
    assert "\ufffd" not in got
    assert name.startswith(got)
    assert len(got) == 42


def test_unencodable_text_does_not_raise(board: Scoreboard) -> None:
    board.job_started("bad\udcffname", "H:1", "", 1.0)  # a lone surrogate from a raw name
    snap = board.read()
    assert snap.busy and snap.function == "bad?name"


def test_record_is_shared_across_fork(board: Scoreboard) -> None:
    def child() -> None:
        for i in range(3):
            board.job_started("resize", f"H:{i}", f"u{i}", float(i))
            board.job_finished(i != 1)
        board.job_started("thumbnail", "H:host:99", "img-99", 4321.25)

    assert run_in_child(child) == 0
    assert board.read() == Snapshot(True, 2, 1, 4321.25, "thumbnail", "H:host:99", "img-99")


def test_parent_writes_are_seen_by_a_forked_child(board: Scoreboard) -> None:
    """Shared both ways: the child waits for the parent's go (EOF on a pipe), then reads."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never return into pytest
        code = 70
        try:
            os.close(w)
            ready, _, _ = select.select([r], [], [], 10)
            snap = board.read()
            code = 0 if ready and (snap.busy, snap.function, snap.done) == (True, "resize", 0) \
                else 1
        finally:
            os._exit(code)
    os.close(r)
    try:
        board.job_started("resize", "H:1", "", 1.0)
    finally:
        os.close(w)  # the go signal
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def _consistent(snap: Snapshot) -> bool:
    """A record the writer below could have left: the fields of one job, or idle and empty."""
    if not snap.busy:
        return (snap.function, snap.handle, snap.unique, snap.job_started) == ("", "", "", 0.0)
    i = int(snap.job_started)
    return (snap.function, snap.handle, snap.unique, snap.done) == (f"fn{i}", f"H:{i}", f"u{i}", i)


def test_snapshots_stay_consistent_while_a_child_writes(board: Scoreboard) -> None:
    """The seqlock: every read while another process writes is one whole record. The child
    writes jobs back to back; the parent reads for a fixed budget, stopping at the first bad
    read (a correct seqlock never gives one)."""
    pid = os.fork()
    if pid == 0:  # the writer: never return into pytest; killed by the parent
        try:
            for i in range(50_000_000):
                board.job_started(f"fn{i}", f"H:{i}", f"u{i}", float(i))
                board.job_finished(True)
        finally:
            os._exit(0)
    reads = done = 0
    bad: Snapshot | BaseException | None = None
    deadline = time.monotonic() + 2.0  # a stress budget, not synchronisation
    try:
        while bad is None and time.monotonic() < deadline:
            try:
                snap = board.read()
            except Exception as e:  # reported below
                bad = e
            else:
                if snap is None:
                    continue  # the writer was preempted before this reader saw a record
                reads += 1
                done = max(done, snap.done)
                if not _consistent(snap):
                    bad = snap
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    assert bad is None, f"after {reads} good reads: {bad!r}"
    assert reads > 100
    assert done > 0  # the child really was writing (the record is not read after the kill:
    # the writer may have died mid-write)


def test_read_after_a_child_died_mid_write(board: Scoreboard) -> None:
    board.job_started("resize", "H:1", "img-1", 5.0)

    real = scoreboard_module._SEQ

    class DiesMidWrite:
        """Packs the odd sequence number, then dies before the even one goes out."""
        calls = 0

        def pack(self, *args: int) -> bytes:
            DiesMidWrite.calls += 1
            if DiesMidWrite.calls > 1:
                os._exit(0)
            return real.pack(*args)

    def child() -> None:
        scoreboard_module._SEQ = DiesMidWrite()  # only in this forked child
        board.job_finished(True)

    fresh = Scoreboard.__new__(Scoreboard)  # a reader that never saw a consistent record
    fresh._mm, fresh._last = board._mm, None
    seen = board.read()  # this reader saw the job start
    assert run_in_child(child) == 0
    # The sequence is odd for good: the reader does not wait (the master never sleeps
    # here); it answers with the last consistent snapshot it saw, or None.
    assert board.read() == seen and seen.busy and seen.function == "resize"
    assert fresh.read() is None


def test_the_masters_control_byte_is_seen_by_the_child_and_left_alone_by_its_writes(
        board: Scoreboard) -> None:
    """The circuit breaker's wanted state: written by the master, read by the child; the
    child's own record writes never touch it, and it never shows up in the record."""
    assert not board.paused_wanted()
    board.set_paused(True)

    def child() -> None:
        board.job_started("resize", "H:1", "u1", 1.0)
        board.job_finished(True)
        os._exit(0 if board.paused_wanted() else 1)

    assert run_in_child(child) == 0
    assert board.paused_wanted()
    assert board.read().done == 1
    board.set_paused(False)
    assert not board.paused_wanted()
