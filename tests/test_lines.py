"""gearvisor/lines.py: lines out of a byte stream, over-long ones dropped whole, bounded."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from gearvisor.lines import LineSplitter


def splitter(limit: int = 8) -> tuple[LineSplitter, list[int]]:
    dropped: list[int] = []
    return LineSplitter(limit, dropped.append), dropped


def test_lines_come_out_whole_across_reads_and_blank_ones_are_left_out() -> None:
    s, dropped = splitter()
    assert s.feed(b"one\ntw") == [b"one"]
    assert s.feed(b"o\n\n  \nthree") == [b"two"]
    assert s.feed(b"\n") == [b"three"]
    assert dropped == []


def test_a_long_line_in_one_read_is_dropped_and_the_next_one_kept() -> None:
    s, dropped = splitter()
    assert s.feed(b"0123456789\nok\n") == [b"ok"]
    assert dropped == [10]


def test_a_long_line_over_many_reads_is_dropped_once_and_never_held() -> None:
    s, dropped = splitter()
    assert s.feed(b"012345") == []
    for _ in range(1000):
        assert s.feed(b"xxxxxxxxxx") == []
        assert len(s.buf) <= s.limit
    assert s.feed(b"tail\nnext\n") == [b"next"]  # the rest of the long line is skipped
    assert dropped == [16]


def test_a_line_of_exactly_the_limit_is_kept() -> None:
    s, dropped = splitter()
    assert s.feed(b"01234567") == []
    assert s.feed(b"\n") == [b"01234567"]
    assert dropped == []


@given(st.lists(st.binary(max_size=30), max_size=30), st.integers(1, 12))
def test_any_stream_gives_the_short_lines_in_order_however_it_is_read(chunks, limit) -> None:
    data = b"".join(chunks)
    s, dropped = splitter(limit)
    got = []
    for chunk in chunks:
        got += s.feed(chunk)
        assert len(s.buf) <= limit
    whole = data.split(b"\n")[:-1]  # the last piece has no newline yet
    assert got == [line for line in whole if len(line) <= limit and line.strip()]
    assert len(dropped) == sum(1 for line in whole if len(line) > limit) + (
        1 if len(data.split(b"\n")[-1]) > limit else 0)
