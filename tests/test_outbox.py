"""The master's acked outbox (master/outbox.py): nothing acked is kept, nothing unacked is
lost, and the bound holds."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from gearvisor.master.outbox import Outbox


def test_lines_are_numbered_and_kept_until_acked() -> None:
    box = Outbox(max_bytes=1 << 20)
    assert box.add(b'{"a":1}') == b'1 {"a":1}\n'
    assert box.add(b"x") == b"2 x\n"
    assert box.add(b"y") == b"3 y\n"
    assert box.ack(2) == 2
    assert box.pending() == [b"3 y\n"]
    assert box.ack(2) == 0 and box.ack(1) == 0  # an old or repeated ack changes nothing
    assert box.ack(99) == 1 and box.acked == 3  # never past what was numbered
    assert box.pending() == [] and box.bytes == 0
    assert box.add(b"z") == b"4 z\n"


def test_the_byte_bound_drops_the_oldest_and_counts_them() -> None:
    box = Outbox(max_bytes=20)
    for i in range(10):
        box.add(b"%d" % i)  # 4 to 5 bytes framed each
    assert box.bytes <= 20 and box.dropped == 10 - len(box)
    assert box.pending()[-1] == b"10 9\n"
    one = Outbox(max_bytes=1)
    one.add(b"a line longer than the bound")
    assert len(one) == 1  # the newest line is always kept


@given(st.lists(st.one_of(st.binary(max_size=30).map(lambda b: ("add", b)),
                          st.integers(0, 60).map(lambda n: ("ack", n))), max_size=80))
def test_pending_is_exactly_the_unacked_undropped_lines(ops) -> None:
    box = Outbox(max_bytes=200)
    added: list[tuple[int, bytes]] = []
    for op, value in ops:
        if op == "add":
            added.append((box.next_seq, box.add(value)))
        else:
            box.ack(value)
        pending = box.pending()
        expected = [f for s, f in added if s > box.acked]
        assert pending == expected[len(expected) - len(pending):]  # a suffix: oldest dropped
        assert box.bytes == sum(map(len, pending)) and (box.bytes <= 200 or len(pending) == 1)
