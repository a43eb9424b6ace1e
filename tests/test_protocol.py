"""Gearman codec: exact bytes out, whole packets back from any chunking of the stream."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gearvisor.gearman.protocol import (
    ARG_COUNT,
    HEADER_SIZE,
    LARGE_PACKET,
    MAX_JOB_PREFIX,
    OVERSIZED_JOB,
    REQ,
    RES,
    Decoder,
    Frame,
    Packet,
    ProtocolError,
    encode,
    split_args,
)


def test_can_do_bytes_exactly() -> None:
    assert encode(Packet.CAN_DO, "reverse") == (
        b"\0REQ" + b"\x00\x00\x00\x01" + b"\x00\x00\x00\x07" + b"reverse"
    )


def test_header_is_big_endian_magic_type_size() -> None:
    packet = encode(Packet.WORK_COMPLETE, b"H:host:1", b"done", magic=RES)
    assert packet[:4] == b"\0RES"
    assert struct.unpack(">I", packet[4:8]) == (13,)
    assert struct.unpack(">I", packet[8:12]) == (len(b"H:host:1\0done"),)
    assert packet[HEADER_SIZE:] == b"H:host:1\0done"


def test_no_argument_packet_is_header_only() -> None:
    assert encode(Packet.GRAB_JOB_UNIQ) == b"\0REQ\x00\x00\x00\x1e\x00\x00\x00\x00"


def test_str_args_are_utf8() -> None:
    packet = encode(Packet.CAN_DO, "répète")
    assert packet[HEADER_SIZE:] == "répète".encode()
    assert struct.unpack(">I", packet[8:12]) == (len("répète".encode()),)


def test_round_trip_decodes_what_was_encoded() -> None:
    packet = encode(Packet.JOB_ASSIGN, b"H:x:1", b"reverse", b"hello", magic=RES)
    assert Decoder().feed(packet) == [Frame(RES, Packet.JOB_ASSIGN, (b"H:x:1", b"reverse",
                                                                      b"hello"))]


def test_one_byte_at_a_time() -> None:
    packets = [
        encode(Packet.NOOP, magic=RES),
        encode(Packet.JOB_ASSIGN_UNIQ, b"H:x:2", b"fn", b"uniq-1", b"pay\0load", magic=RES),
        encode(Packet.NO_JOB, magic=RES),
    ]
    stream = b"".join(packets)
    ends = {sum(map(len, packets[:n + 1])) for n in range(len(packets))}
    dec = Decoder()
    frames: list[Frame] = []
    for i in range(len(stream)):
        got = dec.feed(stream[i:i + 1])
        # A packet comes out exactly when its last byte arrives, and nothing is left held.
        assert len(got) == (1 if i + 1 in ends else 0)
        if got:
            assert dec.pending == 0
        frames += got
    assert frames == [
        Frame(RES, Packet.NOOP, ()),
        Frame(RES, Packet.JOB_ASSIGN_UNIQ, (b"H:x:2", b"fn", b"uniq-1", b"pay\0load")),
        Frame(RES, Packet.NO_JOB, ()),
    ]
    assert dec.pending == 0


@pytest.mark.parametrize("split", [1, 5, 11, 12, 13, 20, 31])
def test_arbitrary_split_points(split: int) -> None:
    stream = encode(Packet.WORK_DATA, b"H:x:3", b"abc") + encode(Packet.ECHO_REQ, b"ping")
    dec = Decoder()
    first = dec.feed(stream[:split])
    rest = dec.feed(stream[split:])
    assert first + rest == [
        Frame(REQ, Packet.WORK_DATA, (b"H:x:3", b"abc")),
        Frame(REQ, Packet.ECHO_REQ, (b"ping",)),
    ]
    assert dec.pending == 0


def test_partial_packet_is_held() -> None:
    packet = encode(Packet.ECHO_RES, b"hello", magic=RES)
    dec = Decoder()
    assert dec.feed(packet[:-1]) == []
    assert dec.pending == len(packet) - 1
    assert dec.feed(packet[-1:]) == [Frame(RES, Packet.ECHO_RES, (b"hello",))]
    assert dec.pending == 0


def test_several_packets_in_one_chunk_in_order() -> None:
    stream = b"".join(encode(Packet.CAN_DO, f"f{i}") for i in range(5))
    assert [f.args for f in Decoder().feed(stream)] == [(f"f{i}".encode(),) for i in range(5)]


def test_payload_with_nuls_stays_intact_as_last_arg() -> None:
    payload = b"\0a\0\0b\0"
    frames = Decoder().feed(encode(Packet.JOB_ASSIGN, b"H:x:4", b"fn", payload, magic=RES))
    assert frames[0].args == (b"H:x:4", b"fn", payload)


def test_work_complete_result_with_nuls() -> None:
    assert split_args(Packet.WORK_COMPLETE, b"H:1\0r\0e\0s") == (b"H:1", b"r\0e\0s")


def test_empty_payload_is_an_empty_last_arg() -> None:
    frames = Decoder().feed(encode(Packet.JOB_ASSIGN, b"H:x:5", b"fn", b"", magic=RES))
    assert frames[0].args == (b"H:x:5", b"fn", b"")


def test_job_assign_uniq_splits_four_args() -> None:
    body = b"H:x:6\0resize\0u-42\0\0bin\0ary"
    assert split_args(Packet.JOB_ASSIGN_UNIQ, body) == (b"H:x:6", b"resize", b"u-42",
                                                        b"\0bin\0ary")


def test_job_assign_all_splits_five_args() -> None:
    body = b"H:x:7\0resize\0u-43\0reducer\0data\0more"
    assert split_args(Packet.JOB_ASSIGN_ALL, body) == (b"H:x:7", b"resize", b"u-43",
                                                       b"reducer", b"data\0more")


def test_too_few_args_is_a_protocol_error() -> None:
    with pytest.raises(ProtocolError, match="JOB_ASSIGN_UNIQ: expected 4"):
        split_args(Packet.JOB_ASSIGN_UNIQ, b"H:x:8\0fn")


def test_a_packet_without_arguments_that_carries_bytes_is_a_protocol_error() -> None:
    with pytest.raises(ProtocolError, match="NO_JOB: expected no arguments, got 3 bytes"):
        Decoder().feed(b"\0RES" + struct.pack(">II", Packet.NO_JOB, 3) + b"abc")


def test_work_fail_trailing_nul_is_stripped() -> None:
    frames = Decoder().feed(b"\0RES" + struct.pack(">II", Packet.WORK_FAIL, 6) + b"H:x:9\0")
    assert frames == [Frame(RES, Packet.WORK_FAIL, (b"H:x:9",))]


def test_work_fail_without_trailing_nul_unchanged() -> None:
    assert split_args(Packet.WORK_FAIL, b"H:x:9") == (b"H:x:9",)


def test_trailing_nul_kept_on_payload_packets() -> None:
    # Only handle-only packets lose a trailing NUL; an ECHO payload is data.
    assert split_args(Packet.ECHO_RES, b"data\0") == (b"data\0",)


def test_bad_magic() -> None:
    with pytest.raises(ProtocolError, match="bad magic"):
        Decoder().feed(b"HTTP/1.1 200 OK\r\n")


def test_unknown_packet_type() -> None:
    with pytest.raises(ProtocolError, match="unknown packet type 5"):
        Decoder().feed(b"\0RES" + struct.pack(">II", 5, 0))


def test_unknown_packet_type_past_the_table() -> None:
    assert 43 not in ARG_COUNT
    with pytest.raises(ProtocolError, match="unknown packet type 43"):
        Decoder().feed(b"\0REQ" + struct.pack(">II", 43, 0))


def test_oversize_packet_rejected_from_the_header_alone() -> None:
    dec = Decoder(max_packet=10)
    # Only the header arrives: the size alone condemns the packet.
    with pytest.raises(ProtocolError, match="11 bytes is over the 10 limit"):
        dec.feed(b"\0RES" + struct.pack(">II", Packet.ECHO_RES, 11))


def test_packet_at_the_limit_is_accepted() -> None:
    dec = Decoder(max_packet=10)
    assert dec.feed(encode(Packet.ECHO_RES, b"x" * 10, magic=RES)) == [
        Frame(RES, Packet.ECHO_RES, (b"x" * 10,))
    ]


def test_bad_packet_after_good_one_raises() -> None:
    dec = Decoder()
    assert dec.feed(encode(Packet.NOOP, magic=RES)) == [Frame(RES, Packet.NOOP, ())]
    with pytest.raises(ProtocolError):
        dec.feed(b"XXXX" + struct.pack(">II", Packet.NOOP, 0))


def test_one_megabyte_payload_round_trip() -> None:
    payload = bytes(range(256)) * 4096  # 1 MiB, NULs included
    packet = encode(Packet.WORK_COMPLETE, b"H:x:10", payload)
    assert len(packet) == HEADER_SIZE + len(b"H:x:10\0") + 1024 * 1024
    dec = Decoder()
    frames: list[Frame] = []
    for i in range(0, len(packet), 65536 + 7):
        frames += dec.feed(packet[i:i + 65536 + 7])
    assert frames == [Frame(REQ, Packet.WORK_COMPLETE, (b"H:x:10", payload))]
    assert dec.pending == 0


# ---------------------------------------------------------------------------------------------
# Big jobs, oversized jobs and what a worker's decoder refuses


def assign_all(payload: bytes, handle: bytes = b"H:x:11", unique: bytes = b"u-11") -> bytes:
    return encode(Packet.JOB_ASSIGN_ALL, handle, b"resize", unique, b"", payload, magic=RES)


def feed_in_chunks(dec: Decoder, stream: bytes, chunk: int) -> list[Frame]:
    frames: list[Frame] = []
    for i in range(0, len(stream), chunk):
        frames += dec.feed(memoryview(stream)[i:i + chunk])
    return frames


BIG = bytes(range(256)) * 4096 * 3 + b"\0tail\0"  # 3 MiB and a bit, NULs included
BIG_STREAM = (encode(Packet.NOOP, magic=RES) + assign_all(BIG) + encode(Packet.NO_JOB, magic=RES))


def check_big(frames: list[Frame], dec: Decoder) -> None:
    assert [f.type for f in frames] == [Packet.NOOP, Packet.JOB_ASSIGN_ALL, Packet.NO_JOB]
    assert frames[1].args == (b"H:x:11", b"resize", b"u-11", b"", BIG)
    assert type(frames[1].args[-1]) is bytes
    assert dec.pending == 0


@pytest.mark.parametrize("chunk", [7, 4096, 65536 + 3, 262144, 10 * 1024 * 1024])
def test_big_job_any_chunking_then_the_next_packets(chunk: int) -> None:
    dec = Decoder(max_job=len(BIG))
    check_big(feed_in_chunks(dec, BIG_STREAM, chunk), dec)


def test_big_job_head_byte_by_byte() -> None:
    dec = Decoder(max_job=len(BIG))
    check_big(feed_in_chunks(dec, BIG_STREAM[:200], 1) + dec.feed(BIG_STREAM[200:]), dec)


def test_big_job_payload_is_its_receive_buffer_not_a_copy() -> None:
    """A job's payload costs it once: received into a buffer of its size that becomes the
    job's bytes (the old path held the stream buffer, a slice and the split: three)."""
    import tracemalloc

    payload = b"p" * (16 * 1024 * 1024)
    stream = assign_all(payload)
    dec = Decoder()
    tracemalloc.start()
    try:
        frames = feed_in_chunks(dec, stream, 262144)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert frames[0].args[-1] == payload
    assert peak < 1.2 * len(payload), f"peak {peak} for a {len(payload)}-byte payload"


@pytest.mark.parametrize("chunk", [1, 5, 64, 65536, 10 * 1024 * 1024])
def test_oversized_job_is_reported_by_handle_and_skipped(chunk: int) -> None:
    payload = b"z" * (2 * 1024 * 1024 + 1)
    stream = assign_all(payload, b"H:x:12", b"u-12") + encode(Packet.NO_JOB, magic=RES)
    dec = Decoder(max_job=2 * 1024 * 1024)
    head, rest = stream[:64], stream[64:]  # the head byte by byte when chunk is 1
    frames = feed_in_chunks(dec, head, chunk) + feed_in_chunks(dec, rest, max(chunk, 65536))
    assert frames == [
        Frame(RES, OVERSIZED_JOB, (b"H:x:12", b"resize", b"u-12", b"%d" % len(payload))),
        Frame(RES, Packet.NO_JOB, ()),
    ]
    assert dec.pending == 0


def test_oversized_job_frame_comes_with_the_handle_before_the_payload() -> None:
    # Only the header and handle have arrived: the job can be failed already, and nothing
    # of it is held while its bytes go by.
    dec = Decoder(max_job=1000)
    stream = encode(Packet.JOB_ASSIGN, b"H:x:13", b"fn", b"q" * 5000, magic=RES)
    frames = dec.feed(stream[:HEADER_SIZE + 12])
    assert frames == [Frame(RES, OVERSIZED_JOB, (b"H:x:13", b"fn", b"", b"5000"))]
    assert dec.feed(stream[HEADER_SIZE + 12:]) == []
    assert dec.pending == 0


def test_small_max_job_limits_small_jobs_too() -> None:
    dec = Decoder(max_job=4)
    stream = (encode(Packet.JOB_ASSIGN_UNIQ, b"H:1", b"fn", b"u", b"1234", magic=RES)
              + encode(Packet.JOB_ASSIGN_UNIQ, b"H:2", b"fn", b"u", b"12345", magic=RES))
    frames = dec.feed(stream)
    assert frames == [Frame(RES, Packet.JOB_ASSIGN_UNIQ, (b"H:1", b"fn", b"u", b"1234")),
                      Frame(RES, OVERSIZED_JOB, (b"H:2", b"fn", b"u", b"5"))]


def test_big_job_head_without_nuls_is_a_protocol_error() -> None:
    dec = Decoder()
    header = b"\0RES" + struct.pack(">II", Packet.JOB_ASSIGN, 10 * 1024 * 1024)
    assert dec.feed(header + b"H" * 1000) == []  # could still be a long handle
    with pytest.raises(ProtocolError, match="over 65536 bytes"):
        dec.feed(b"H" * (MAX_JOB_PREFIX + 1))


def test_whole_big_packet_with_too_few_args_is_a_protocol_error() -> None:
    body = b"H:x:14\0" + b"n" * (LARGE_PACKET + 10)  # JOB_ASSIGN_UNIQ needs 3 NULs
    with pytest.raises(ProtocolError, match="JOB_ASSIGN_UNIQ: expected 4"):
        Decoder().feed(b"\0RES" + struct.pack(">II", Packet.JOB_ASSIGN_UNIQ, len(body)) + body)


def test_a_packet_other_than_a_job_over_max_packet_is_refused_from_its_header() -> None:
    dec = Decoder(max_packet=1024, max_job=1 << 30)
    with pytest.raises(ProtocolError, match="ERROR of 1025 bytes is over the 1024 limit"):
        dec.feed(b"\0RES" + struct.pack(">II", Packet.ERROR, 1025))


def test_decoder_for_one_magic_refuses_the_other() -> None:
    assert Decoder(magic=RES).feed(encode(Packet.NOOP, magic=RES)) == [Frame(RES, Packet.NOOP,
                                                                             ())]
    with pytest.raises(ProtocolError, match="bad magic"):
        Decoder(magic=RES).feed(encode(Packet.GRAB_JOB_ALL))


@given(st.binary(max_size=64).filter(lambda b: b"\0" not in b), st.binary(max_size=256))
def test_the_result_packet_is_what_encode_writes(handle: bytes, data: bytes) -> None:
    from gearvisor.gearman.protocol import encode_result_packet

    assert encode_result_packet(handle, data) == encode(Packet.WORK_COMPLETE, handle, data)


def test_one_whole_packet_read_alone_decodes_as_any_other_chunking() -> None:
    """The decoder's shortcut for a read that is exactly one packet (what a worker gets
    per wake-up) gives what the general path gives, from a memoryview too, and refuses
    what it refuses."""
    job = encode(Packet.JOB_ASSIGN_UNIQ, b"H:1", b"f", b"u", b"pay\0load", magic=RES)
    whole = Decoder(magic=RES).feed(memoryview(bytearray(job)))
    split = Decoder(magic=RES)
    assert split.feed(job[:5]) == []
    assert whole == split.feed(job[5:]) == [
        Frame(RES, Packet.JOB_ASSIGN_UNIQ, (b"H:1", b"f", b"u", b"pay\0load"))]
    assert Decoder().feed(encode(Packet.NOOP, magic=RES)) == [Frame(RES, Packet.NOOP, ())]
    with pytest.raises(ProtocolError, match="expected no arguments"):
        Decoder().feed(b"\0RES" + struct.pack(">II", Packet.NOOP, 2) + b"xx")
    with pytest.raises(ProtocolError, match="expected 4 NUL-separated arguments"):
        Decoder().feed(b"\0RES" + struct.pack(">II", Packet.JOB_ASSIGN_UNIQ, 3) + b"H:1")
