"""Gearman codec: exact bytes out, whole packets back from any chunking of the stream."""

from __future__ import annotations

import struct

import pytest

from gearvisor.gearman.protocol import (
    ARG_COUNT,
    HEADER_SIZE,
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
