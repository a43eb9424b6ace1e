"""Job: payload helpers and the packets its send_* methods emit through the injected send."""

from __future__ import annotations

import pytest

from gearvisor.gearman.protocol import Packet
from gearvisor.job import Job, encode_result


@pytest.mark.parametrize(("value", "wire"), [
    (b"\x00raw\xff", b"\x00raw\xff"),
    (b"", b""),
    ("héllo", "héllo".encode()),
    (None, b""),
    ({"a": 1, "b": [1, 2]}, b'{"a":1,"b":[1,2]}'),
    ([1, "x", None, True], b'[1,"x",null,true]'),
    (42, b"42"),
    (bytearray(b"ba"), b"ba"),
    (memoryview(b"mv"), b"mv"),
])
def test_encode_result(value: object, wire: bytes) -> None:
    out = encode_result(value)
    assert type(out) is bytes
    assert out == wire


def test_encode_result_falls_back_to_str_for_unknown_types() -> None:
    class Thing:
        def __str__(self) -> str:
            return "thing!"

    assert encode_result({"t": Thing()}) == b'{"t":"thing!"}'


class Recorder:
    """Stands in for the worker's send: records (packet type, handle, payload)."""

    def __init__(self) -> None:
        self.sent: list[tuple[int, bytes, bytes]] = []

    def __call__(self, ptype: int, handle: bytes, payload: bytes) -> None:
        self.sent.append((ptype, handle, payload))


def make_job(data: bytes = b"") -> tuple[Job, Recorder]:
    rec = Recorder()
    return Job("resize", "H:gm1:17", "u-1", data, rec), rec


def test_attributes() -> None:
    job, _ = make_job(b"payload")
    assert (job.function, job.handle, job.unique, job.data) == ("resize", "H:gm1:17", "u-1",
                                                                b"payload")
    assert repr(job) == "Job(function='resize', handle='H:gm1:17', unique='u-1', size=7)"


def test_text() -> None:
    job, _ = make_job("naïve".encode())
    assert job.text() == "naïve"
    assert make_job("naïve".encode("latin-1"))[0].text("latin-1") == "naïve"


def test_text_bad_utf8_raises() -> None:
    with pytest.raises(UnicodeDecodeError):
        make_job(b"\xff\xfe")[0].text()


def test_json() -> None:
    job, _ = make_job(b'{"w": 640, "h": [1, 2]}')
    assert job.json() == {"w": 640, "h": [1, 2]}


def test_json_bad_payload_raises_value_error() -> None:
    with pytest.raises(ValueError):
        make_job(b"{not json")[0].json()


def test_send_status() -> None:
    job, rec = make_job()
    job.send_status(3, 10)
    job.send_status(7.9, 10.0)  # type: ignore[arg-type]  # floats are truncated to ints
    assert rec.sent == [
        (Packet.WORK_STATUS, b"H:gm1:17", b"3\x0010"),
        (Packet.WORK_STATUS, b"H:gm1:17", b"7\x0010"),
    ]
    assert rec.sent[0][0] == 12


def test_send_data() -> None:
    job, rec = make_job()
    job.send_data(b"chunk\x001")
    job.send_data("chunk 2")
    assert rec.sent == [
        (Packet.WORK_DATA, b"H:gm1:17", b"chunk\x001"),
        (Packet.WORK_DATA, b"H:gm1:17", b"chunk 2"),
    ]
    assert rec.sent[0][0] == 28


def test_send_warning() -> None:
    job, rec = make_job()
    job.send_warning("disk almost full")
    assert rec.sent == [(Packet.WORK_WARNING, b"H:gm1:17", b"disk almost full")]
    assert rec.sent[0][0] == 29
