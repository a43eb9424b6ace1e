"""The one line splitter the master's pipe readers share (event pipes and command output)."""

from __future__ import annotations

import os

from gearvisor.lines import event_lines
from gearvisor.master.output import line_text
from gearvisor.master.pipes import read_lines, take_lines


def test_complete_lines_are_taken_and_a_partial_one_waits() -> None:
    buf = bytearray(b"one\ntwo\r\nthr")
    assert take_lines(buf, 10) == [(b"one", False), (b"two\r", False)]
    assert buf == b"thr"
    buf += b"ee\n"
    assert take_lines(buf, 10) == [(b"three", False)]
    assert buf == b""


def test_a_long_line_is_cut_at_the_limit_and_says_so() -> None:
    buf = bytearray(b"x" * 25 + b"\nok\n")
    assert take_lines(buf, 10) == [(b"x" * 10, True), (b"ok", False)]
    assert line_text(b"abc\r", True) == "abc [line cut at 16 KiB]"


def test_a_partial_line_past_the_limit_is_not_buffered_without_bound() -> None:
    buf = bytearray()
    for _ in range(100):
        buf += b"y" * 7
        take_lines(buf, 10)
        assert len(buf) <= 10


def test_final_takes_the_last_line_without_a_newline() -> None:
    buf = bytearray(b"tail")
    assert take_lines(buf, 10) == []
    assert take_lines(buf, 10, final=True) == [(b"tail", False)]
    assert buf == b""


def pump(data: bytes) -> tuple[list[bytes], int]:
    """Write `data` through a real pipe while read_lines reads it (up to the line `end`):
    (the lines read, the lines dropped)."""
    r, w = os.pipe()
    try:
        os.set_blocking(r, False)
        os.set_blocking(w, False)
        left = memoryview(data)
        reader = event_lines()
        lines: list[bytes] = []
        dropped = 0
        for _ in range(1000):  # bounded: 1 MiB through a 64 KiB pipe takes about 17 rounds
            if left:
                try:
                    left = left[os.write(w, left):]
                except BlockingIOError:
                    pass
            got, _, d = read_lines(r, reader)
            lines += got
            dropped += d
            assert len(reader.buf) <= 1024 * 1024
            if lines[-1:] == [b"end"]:
                break
        return lines, dropped
    finally:
        os.close(r)
        os.close(w)


def test_event_lines_drop_what_is_too_long_and_count_it() -> None:
    lines, dropped = pump(b'{"event": "ready"}\n' + b"z" * (1024 * 1024 + 1) + b"\nend\n")
    assert lines == [b'{"event": "ready"}', b"end"] and dropped == 1


def test_the_rest_of_a_dropped_line_is_skipped_not_read_as_a_line() -> None:
    """A line past the cap before its newline came is dropped, and what follows of it up
    to its newline too: its tail, a message after a megabyte of padding, is no line."""
    lines, dropped = pump(b"x" * (1024 * 1024 + 70000) + b'{"event": "ready"}\nend\n')
    assert (lines, dropped) == ([b"end"], 1)
