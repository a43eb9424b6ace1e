"""messages: what children and helpers tell the master round-trips, and no line a child can
write makes decode() raise anything but MessageError."""

from __future__ import annotations

import json

import pytest

from gearvisor import messages as msg


@pytest.mark.parametrize("message", [
    msg.Ready(), msg.BootError("cannot import x"), msg.Quarantined("fails fast", 9, 1),
    msg.ProbationPassed(), msg.Recycle("max_jobs"), msg.Modules(["/a.py"], more=True),
    msg.Watching(["/srv"], [], True), msg.Changed(["p"], False, ["/srv/a.py"], 1, "edit"),
    msg.WatcherError("boom", fatal=True),
    msg.JobStarted("send_mail", "H:host:7", "u-1", "aGk=", 2), msg.JobEnded(),
    msg.Delivered("ops-mail", "{}:{alertname=\"CrashLoop\"}", False, "timed out", 4, 1),
    msg.Stored(41), msg.StoreState(True, "", {"send_mail": 3}, [["mail", "send_mail", 2]], 0, 1),
    msg.StoreState(False, "job store x: down", {}, [], 12, 0),
    msg.Resolved("gearmand.example", 4730, 10, ["::1", 4730, 0, 0]),
    msg.Resolved("nowhere.invalid", 4730, error="[Errno -2] Name or service not known")])
def test_round_trip(message: msg.Message) -> None:
    line = msg.encode(message)
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert json.loads(line)["event"] == message.name
    assert msg.decode(line.rstrip(b"\n")) == message


def test_wire_names_are_stable() -> None:
    # Operators and tests grep for these; a rename is a breaking change.
    assert sorted(msg.KINDS) == ["boot_error", "changed", "delivered", "error", "holding",
                                 "job_ended", "job_started", "modules", "probation_passed",
                                 "quarantined", "ready", "recycle", "resolved", "store",
                                 "stored", "watching"]


@pytest.mark.parametrize("line, why", [
    (b"not json", "not JSON"),
    (b"[" * 100_000, "not JSON"),
    (b"[1, 2]", "not a JSON object"),
    (b'{"event": "launch_missiles"}', "unknown event"),
    (b'{"no": "event"}', "unknown event"),
    (b'{"event": "quarantined", "failed": "many"}', "failed: expected int"),
    (b'{"event": "modules", "files": "/a.py"}', "files: expected list"),
    (b'{"event": "changed", "config": 1}', "config: expected bool"),
    (b'{"event": "store", "dead": [1]}', "dead: expected dict"),
    (b'\xff\xfe', "not JSON"),
])
def test_bad_lines_are_a_message_error_naming_the_problem(line: bytes, why: str) -> None:
    with pytest.raises(msg.MessageError, match=why):
        msg.decode(line)


def test_fields_are_bounded_and_missing_ones_default() -> None:
    decoded = msg.decode(json.dumps({"event": "quarantined", "reason": "x" * 100_000,
                                     "failed": 10**40, "extra": 1}).encode())
    assert isinstance(decoded, msg.Quarantined)
    assert len(decoded.reason) == msg.MAX_TEXT and decoded.failed == 1 << 62
    assert decoded.done == 0
    assert msg.decode(b'{"event": "boot_error", "reason": null}') == msg.BootError("unknown")


def test_a_job_started_keeps_its_payload_past_max_text_but_cuts_its_names() -> None:
    # A command worker's JobStarted: the payload (base64) is bounded by the line cap, not
    # MAX_TEXT (the journal cuts it to payload_cap); function, handle, unique are texts.
    payload = "QUJD" * 10_000
    decoded = msg.decode(json.dumps({"event": "job_started", "function": "f" * 10_000,
                                     "handle": "H", "unique": None, "payload_b64": payload,
                                     "size": -5}).encode())
    assert isinstance(decoded, msg.JobStarted)
    assert decoded.payload_b64 == payload and len(decoded.function) == msg.MAX_TEXT
    assert (decoded.unique, decoded.size) == ("", 0)
    huge = msg.decode(json.dumps({"event": "job_started",
                                  "payload_b64": "A" * (msg.MAX_PAYLOAD_TEXT + 9)}).encode())
    assert len(huge.payload_b64) == msg.MAX_PAYLOAD_TEXT  # type: ignore[attr-defined]
    with pytest.raises(msg.MessageError, match="payload_b64: expected str"):
        msg.decode(b'{"event": "job_started", "payload_b64": 7}')


def test_a_lone_surrogate_in_a_reported_name_is_replaced() -> None:
    """Valid JSON, but no UTF-8 encodes "\\ud800": a command worker's function name that
    could not be encoded raised wherever it was written later (alert fingerprints, logs)."""
    line = b'{"event": "job_started", "function": "x\\ud800", "handle": "H:1", "unique": "u"}'
    m = msg.decode(line)
    assert isinstance(m, msg.JobStarted) and m.function == "x?"
    m.function.encode("utf-8")
