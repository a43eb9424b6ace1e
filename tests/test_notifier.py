"""The alert delivery helper (gearvisor/helpers/notifier.py) against real receivers: an
HTTP server in a thread of this process (one that answers, one that hangs), aiosmtpd with
STARTTLS and AUTH, a real Alertmanager, and an exec'd program. The helper runs as a real
process, driven through its pipes."""

from __future__ import annotations

import datetime
import http.server
import json
import os
import re
import select
import shutil
import signal
import ssl
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import yaml
from conftest import HOST, REPO, free_port, wait_for, wait_value
from hypothesis import given, settings
from hypothesis import strategies as st

from gearvisor import messages as msg
from gearvisor.config.channels import channels as parse_channels
from gearvisor.helpers import notifier as nt

ALERTMANAGER = "/usr/bin/prometheus-alertmanager"
AM_RESOLVE_TIMEOUT = 2


def alert(name: str, status: str = "firing", **labels: str) -> dict[str, Any]:
    return {"status": status, "labels": {"alertname": name, **labels},
            "annotations": {"summary": f"{name} on {labels.get('pool', '?')}",
                            "description": "slot 3 crashed 5 times in 10m"},
            "startsAt": "2026-12-01T10:00:00Z",
            "endsAt": "2026-12-01T10:05:00Z" if status == "resolved" else nt.ZERO_TIME,
            "generatorURL": "", "fingerprint": "0123456789abcdef"}


def payload(key: str = "g1", status: str = "firing", alerts: list | None = None,
            receiver: str = "hook") -> dict[str, Any]:
    alerts = alerts if alerts is not None else [
        alert("CrashLoop", status, pool="images", severity="critical", slot="1"),
        alert("CrashLoop", status, pool="images", severity="critical", slot="2")]
    return {"version": "4", "groupKey": key, "status": status, "receiver": receiver,
            "groupLabels": {"alertname": "CrashLoop", "pool": "images"},
            "commonLabels": {"alertname": "CrashLoop", "pool": "images",
                             "severity": "critical"},
            "commonAnnotations": {}, "externalURL": "", "truncatedAlerts": 0, "alerts": alerts}


# -- what a notification says (pure) --------------------------------------------------------------


def test_subject_follows_alertmanager_default() -> None:
    assert nt.subject(payload()) == "[FIRING:2] CrashLoop images (critical)"
    assert nt.subject(payload(status="resolved")) == "[RESOLVED] CrashLoop images (critical)"
    evil = payload()
    evil["groupLabels"]["pool"] = "a\r\nBcc: x@example.com"
    assert "\n" not in nt.subject(evil) and "\r" not in nt.subject(evil)


def test_text_body_lists_alerts_and_counts_the_rest() -> None:
    body = nt.text_body(payload())
    assert body.startswith("2 firing, 0 resolved (alertname=CrashLoop pool=images)")
    assert "- CrashLoop pool=images severity=critical slot=2" in body
    assert "summary: CrashLoop on images" in body
    many = payload(alerts=[alert("CrashLoop", slot=str(i)) for i in range(nt.MAX_LISTED + 7)])
    body = nt.text_body(many)
    assert body.count("- CrashLoop") == nt.MAX_LISTED and "... and 7 more" in body


def test_postable_alerts_leave_out_the_zero_end_time() -> None:
    firing, resolved = nt.postable_alerts(payload(alerts=[
        alert("CrashLoop", pool="images"), alert("CrashLoop", "resolved", pool="web")]))
    assert firing == {"labels": {"alertname": "CrashLoop", "pool": "images"},
                      "annotations": {"summary": "CrashLoop on images",
                                      "description": "slot 3 crashed 5 times in 10m"},
                      "startsAt": "2026-12-01T10:00:00Z"}
    assert resolved["endsAt"] == "2026-12-01T10:05:00Z"


def test_track_firing_keeps_firing_forgets_resolved_and_is_bounded(
        monkeypatch: pytest.MonkeyPatch) -> None:
    active: dict[str, dict[str, Any]] = {}
    nt.track_firing(active, payload())
    assert sorted(a["labels"]["slot"] for a in active.values()) == ["1", "2"]
    nt.track_firing(active, payload(status="resolved", alerts=[
        alert("CrashLoop", "resolved", pool="images", severity="critical", slot="1")]))
    assert [a["labels"]["slot"] for a in active.values()] == ["2"]
    monkeypatch.setattr(nt, "MAX_ACTIVE", 3)
    nt.track_firing(active, payload(alerts=[alert("X", slot=str(i)) for i in range(5)]))
    assert [a["labels"].get("slot") for a in active.values()] == ["2", "3", "4"]


_json = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=20)),
                     lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(
                         st.text(max_size=12), inner, max_size=4)), max_leaves=15)
_payload_keys = st.sampled_from(["status", "alerts", "groupLabels", "commonLabels",
                                 "truncatedAlerts", "labels", "annotations", "startsAt",
                                 "endsAt", "generatorURL", "groupKey"])


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(_payload_keys, st.one_of(_json, st.lists(st.dictionaries(
    _payload_keys, _json, max_size=5), max_size=3)), max_size=6))
def test_rendering_takes_any_payload(raw: dict) -> None:
    """The engine builds payloads, but a helper that crashes on an odd one loses every
    notification queued behind it."""
    assert isinstance(nt.subject(raw), str) and "\n" not in nt.subject(raw)
    assert isinstance(nt.text_body(raw), str)
    assert isinstance(nt.postable_alerts(raw), list)
    nt.track_firing({}, raw)


# -- real receivers -------------------------------------------------------------------------------


class Receiver:
    """An HTTP server in a thread: /ok answers 200, /hang answers only at teardown,
    /status/N answers N. Records every request."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, dict[str, str], Any]] = []
        self.release = threading.Event()
        received, release = self.requests, self.release

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                received.append((self.path, dict(self.headers), json.loads(body)))
                if self.path == "/hang":
                    release.wait(30)  # bounded: teardown releases it
                code = int(self.path.rsplit("/", 1)[1]) if self.path.startswith("/status/") \
                    else 200
                try:
                    self.send_response(code)
                    self.end_headers()
                except OSError:
                    pass  # the client gave up (its timeout): that is the point

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer((HOST, 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://{HOST}:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def paths(self) -> list[str]:
        return [p for p, _, _ in self.requests]

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


class Helper:
    """`python -m gearvisor.helpers.notifier` with its stdin and stdout as the pipes."""

    def __init__(self, tmp_path: Path, channels: dict[str, Any], *args: str) -> None:
        self.file = tmp_path / "channels.yaml"
        self.file.write_text(yaml.safe_dump({"alerts": {"channels": channels}}))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gearvisor.helpers.notifier", "--channels", str(self.file),
             "--retry-delay", "0.05", "--drain", "5", *args],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=REPO)
        assert self.proc.stdout is not None
        os.set_blocking(self.proc.stdout.fileno(), False)
        self.buf = b""
        self.seen: list[msg.Delivered] = []

    def send(self, channel: str, body: dict[str, Any] | bytes) -> None:
        assert self.proc.stdin is not None
        line = body if isinstance(body, bytes) else json.dumps(
            {"channel": channel, "payload": body}).encode() + b"\n"
        self.proc.stdin.write(line)
        self.proc.stdin.flush()

    def results(self) -> list[msg.Delivered]:
        assert self.proc.stdout is not None
        while select.select([self.proc.stdout], [], [], 0)[0]:
            chunk = os.read(self.proc.stdout.fileno(), 65536)
            if not chunk:
                break
            self.buf += chunk
        *lines, self.buf = self.buf.split(b"\n")
        for line in lines:
            result = msg.decode(line)
            assert isinstance(result, msg.Delivered)
            self.seen.append(result)
        return self.seen

    def wait_results(self, n: int, timeout: float = 15.0) -> list[msg.Delivered]:
        return wait_value(self.results, lambda r: len(r) >= n, timeout=timeout,
                          message=f"{n} result lines")

    def close(self) -> int:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        return self.proc.wait(timeout=15)

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
        for f in (self.proc.stdin, self.proc.stdout):
            if f is not None and not f.closed:
                try:
                    f.close()
                except OSError:
                    pass


@pytest.fixture
def helper(tmp_path: Path) -> Iterator[Any]:
    started: list[Helper] = []

    def start(channels: dict[str, Any], *args: str) -> Helper:
        h = Helper(tmp_path, channels, *args)
        started.append(h)
        return h

    yield start
    for h in started:
        h.kill()


def test_webhook_receives_the_payload(receiver: Receiver, helper: Any) -> None:
    h = helper({"hook": {"type": "webhook", "url": receiver.url + "/ok",
                         "headers": {"X-Token": "t0k"}}})
    sent = payload()
    h.send("hook", sent)
    [result] = h.wait_results(1)
    assert result == msg.Delivered("hook", "g1", True, "", 1, 0)
    [(path, headers, body)] = receiver.requests
    assert path == "/ok" and body == sent
    assert headers["Content-Type"] == "application/json" and headers["X-Token"] == "t0k"
    assert h.close() == 0


def test_hanging_webhook_times_out_retries_and_holds_up_no_other(receiver: Receiver,
                                                                 helper: Any) -> None:
    h = helper({"slow": {"type": "webhook", "url": receiver.url + "/hang", "timeout": "300ms",
                         "retries": 2},
                "fast": {"type": "webhook", "url": receiver.url + "/ok"}})
    h.send("slow", payload("s1"))
    wait_for(lambda: receiver.paths() == ["/hang"], message="the first hanging request")
    h.send("fast", payload("f1"))
    first = h.wait_results(1)[0]
    assert first == msg.Delivered("fast", "f1", True, "", 1, 0)  # not behind the hang
    slow = h.wait_results(2)[1]
    assert (slow.channel, slow.groupKey, slow.ok, slow.attempts) == ("slow", "s1", False, 3)
    assert "timed out" in slow.error
    assert receiver.paths().count("/hang") == 3  # the first try and two retries


def test_server_errors_are_retried_client_errors_are_not(receiver: Receiver,
                                                         helper: Any) -> None:
    h = helper({"five": {"type": "webhook", "url": receiver.url + "/status/503", "retries": 2},
                "four": {"type": "webhook", "url": receiver.url + "/status/400", "retries": 2}})
    h.send("five", payload("a"))
    h.send("four", payload("b"))
    results = {r.channel: r for r in h.wait_results(2)}
    assert (results["five"].ok, results["five"].attempts) == (False, 3)
    assert "HTTP 503" in results["five"].error
    assert (results["four"].ok, results["four"].attempts) == (False, 1)
    assert "HTTP 400" in results["four"].error


def test_a_full_queue_drops_the_oldest_and_counts(receiver: Receiver, helper: Any) -> None:
    h = helper({"slow": {"type": "webhook", "url": receiver.url + "/hang", "timeout": "10s",
                         "retries": 0}}, "--queue-max", "2")
    h.send("slow", payload("n1"))
    wait_for(lambda: receiver.paths() == ["/hang"], message="n1 in flight")
    for key in ("n2", "n3", "n4", "n5"):
        h.send("slow", payload(key))
    dropped = h.wait_results(2)
    assert [(r.groupKey, r.ok, r.attempts, r.dropped) for r in dropped] == [
        ("n2", False, 0, 1), ("n3", False, 0, 2)]
    assert "dropped unsent" in dropped[0].error
    receiver.release.set()  # the receiver answers: n1, n4 and n5 go through
    rest = h.wait_results(5)[2:]
    assert [(r.groupKey, r.ok, r.dropped) for r in rest] == [
        ("n1", True, 2), ("n4", True, 2), ("n5", True, 2)]


def test_bad_lines_get_an_error_result_and_the_helper_goes_on(receiver: Receiver,
                                                              helper: Any) -> None:
    h = helper({"hook": {"type": "webhook", "url": receiver.url + "/ok"}})
    h.send("", b"not json\n")
    h.send("", b'{"channel": "hook"}\n')
    h.send("hok", payload("x"))
    h.send("", b"x" * (nt.MAX_LINE + 10) + b"\n")
    h.send("hook", payload("y"))
    results = h.wait_results(5)
    assert [r.ok for r in results] == [False, False, False, False, True]
    assert "not a JSON notification" in results[0].error
    assert "expected" in results[1].error
    assert 'did you mean "hook"' in results[2].error
    assert "longer than" in results[3].error
    assert results[4].groupKey == "y"


def test_bad_channels_file_names_the_key(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text(yaml.safe_dump({"alerts": {"channels": {"hook": {"type": "webhook",
                                                                  "url": "gopher://x"}}}}))
    out = subprocess.run([sys.executable, "-m", "gearvisor.helpers.notifier", "--channels",
                          str(f)], capture_output=True, text=True, cwd=REPO, timeout=30,
                         stdin=subprocess.DEVNULL)
    assert out.returncode == 2
    assert f"{f}: alerts.channels.hook.url: expected an http://" in out.stderr


def test_send_test_reaches_the_webhook(receiver: Receiver, tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text(yaml.safe_dump({"hook": {"type": "webhook", "url": receiver.url + "/ok"}}))
    out = subprocess.run([sys.executable, "-m", "gearvisor.helpers.notifier", "--channels",
                          str(f), "--test", "hook"], capture_output=True, cwd=REPO, timeout=30,
                         stdin=subprocess.DEVNULL)
    assert out.returncode == 0, out.stderr
    assert msg.decode(out.stdout.strip()) == msg.Delivered("hook", '{}:{alertname="GearvisorTest"}',
                                                           True, "", 1, 0)
    [(_, _, body)] = receiver.requests
    assert body["alerts"][0]["labels"]["alertname"] == "GearvisorTest"
    assert body["version"] == "4" and body["status"] == "firing"


# -- exec -----------------------------------------------------------------------------------------


def test_exec_gets_the_payload_on_stdin(tmp_path: Path, helper: Any) -> None:
    out = tmp_path / "stdin.json"
    script = f"import sys; open({str(out)!r}, 'w').write(sys.stdin.read())"
    h = helper({"page": {"type": "exec", "command": [sys.executable, "-c", script]}})
    sent = payload("e1")
    h.send("page", sent)
    assert h.wait_results(1)[0] == msg.Delivered("page", "e1", True, "", 1, 0)
    assert json.loads(out.read_text()) == sent


def test_exec_is_killed_at_its_timeout(tmp_path: Path, helper: Any) -> None:
    pids = tmp_path / "pid"
    script = (f"import os, time; open({str(pids)!r}, 'w').write(str(os.getpid())); "
              "time.sleep(60)")
    fail = "import sys; print('no such pager'); sys.exit(3)"
    h = helper({"stuck": {"type": "exec", "command": [sys.executable, "-c", script],
                          "timeout": "500ms", "retries": 0},
                "fails": {"type": "exec", "command": [sys.executable, "-c", fail],
                          "retries": 1},
                "missing": {"type": "exec", "command": [str(tmp_path / "nothing-here")]}})
    h.send("stuck", payload("k"))
    h.send("fails", payload("f"))
    h.send("missing", payload("m"))
    results = {r.channel: r for r in h.wait_results(3)}
    assert results["stuck"].ok is False and "killed" in results["stuck"].error
    pid = int(pids.read_text())
    wait_for(lambda: not psutil.pid_exists(pid) or
             psutil.Process(pid).status() == psutil.STATUS_ZOMBIE, message="the program gone")
    assert (results["fails"].attempts, results["fails"].ok) == (2, False)
    assert "exited with status 3: no such pager" in results["fails"].error
    assert (results["missing"].attempts, results["missing"].ok) == (1, False)
    assert "cannot run" in results["missing"].error


def test_forked_run_notifier_through_its_two_pipes(tmp_path: Path) -> None:
    # The way the master runs it: forked, notifications in on one pipe, results out on the
    # other.
    out = tmp_path / "stdin.json"
    script = f"import sys; open({str(out)!r}, 'w').write(sys.stdin.read())"
    chans = parse_channels({"page": {"type": "exec", "command": [sys.executable, "-c", script]}})
    in_r, in_w = os.pipe()
    ev_r, ev_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(in_w)
            os.close(ev_r)
            nt.run_notifier(chans, in_r, ev_w, set())
        finally:
            os._exit(1)
    try:
        os.close(in_r)
        os.close(ev_w)
        os.write(in_w, json.dumps({"channel": "page", "payload": payload("p1")}).encode()
                 + b"\n")
        os.close(in_w)  # end of input: the helper drains and exits
        data = b""
        deadline = time.monotonic() + 15
        while not data.endswith(b"\n") and time.monotonic() < deadline:
            if select.select([ev_r], [], [], 0.5)[0]:
                chunk = os.read(ev_r, 65536)
                if not chunk:
                    break
                data += chunk
        assert msg.decode(data.strip()) == msg.Delivered("page", "p1", True, "", 1, 0)
        assert json.loads(out.read_text())["groupKey"] == "p1"
        _, status = os.waitpid(pid, 0)
        pid = 0
        assert os.waitstatus_to_exitcode(status) == 0
    finally:
        os.close(ev_r)
        if pid:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)


# -- email (aiosmtpd) -----------------------------------------------------------------------------


class Mailbox:
    def __init__(self) -> None:
        self.envelopes: list[Any] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:  # noqa: N802
        self.envelopes.append(envelope)
        return "250 OK"


@pytest.fixture
def smtp(tmp_path: Path) -> Iterator[tuple[Any, Mailbox, Path]]:
    """aiosmtpd on a free loopback port, requiring STARTTLS and then AUTH (user gv,
    password s3cret), with a self-signed certificate for 127.0.0.1."""
    pytest.importorskip("aiosmtpd")
    from aiosmtpd.controller import Controller
    from aiosmtpd.smtp import AuthResult

    if shutil.which("openssl") is None:
        pytest.skip("needs openssl to make a test certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-keyout", str(key), "-out", str(cert), "-subj", f"/CN={HOST}",
                    "-addext", f"subjectAltName=IP:{HOST}"], check=True, capture_output=True,
                   timeout=60)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)

    def authenticate(server: Any, session: Any, envelope: Any, mechanism: str,
                     auth_data: Any) -> AuthResult:
        def text(value: Any) -> str:
            return value.decode() if isinstance(value, bytes) else str(value)

        ok = (text(auth_data.login), text(auth_data.password)) == ("gv", "s3cret")
        return AuthResult(success=ok, handled=ok)  # not handled: aiosmtpd answers 535

    box = Mailbox()
    controller = Controller(box, hostname=HOST, port=free_port(), tls_context=context,
                            require_starttls=True, auth_require_tls=True,
                            authenticator=authenticate)
    controller.start()
    try:
        yield controller, box, cert
    finally:
        controller.stop()


def test_email_goes_out_with_starttls_and_auth(smtp: Any, tmp_path: Path, helper: Any) -> None:
    controller, box, cert = smtp
    password = tmp_path / "smtp.pass"
    password.write_text("wrong\n")
    h = helper({"ops-mail": {"type": "email", "to": ["ops@example.com", "oncall@example.com"],
                             "from": "gv@example.com", "smtp": f"{HOST}:{controller.port}",
                             "username": "gv", "password_file": str(password),
                             "ca_file": str(cert), "retries": 2}})
    h.send("ops-mail", payload("m1"))
    refused = h.wait_results(1)[0]
    assert (refused.ok, refused.attempts) == (False, 1)  # a refused login is not retried
    assert "login as gv refused" in refused.error
    password.write_text("s3cret\n")  # read at send time: no restart, no reload
    h.send("ops-mail", payload("m2"))
    assert h.wait_results(2)[1] == msg.Delivered("ops-mail", "m2", True, "", 1, 0)
    [envelope] = box.envelopes
    assert envelope.mail_from == "gv@example.com"
    assert envelope.rcpt_tos == ["ops@example.com", "oncall@example.com"]
    text = envelope.content.decode()
    assert "Subject: [FIRING:2] CrashLoop images (critical)" in text
    assert "- CrashLoop pool=images severity=critical slot=1" in text


def test_email_to_a_dead_smtp_server_fails_after_retries(helper: Any) -> None:
    port = free_port()  # nothing listens there
    h = helper({"mail": {"type": "email", "to": "ops@example.com", "from": "gv@example.com",
                         "smtp": f"{HOST}:{port}", "starttls": False, "retries": 1}})
    h.send("mail", payload("d"))
    result = h.wait_results(1)[0]
    assert (result.ok, result.attempts) == (False, 2)
    assert f"SMTP {HOST}:{port}" in result.error and "refused" in result.error.lower()


# -- Alertmanager ---------------------------------------------------------------------------------


@pytest.fixture
def alertmanager(tmp_path: Path) -> Iterator[str]:
    """A real Alertmanager on a free loopback port (clustering off), killed by pid."""
    if not os.access(ALERTMANAGER, os.X_OK):
        pytest.skip("needs prometheus-alertmanager (examples/setup.sh installs it)")
    config = tmp_path / "alertmanager.yml"
    # A short resolve_timeout, so the test of re-posting sees what happens without it.
    config.write_text(f"global: {{resolve_timeout: {AM_RESOLVE_TIMEOUT}s}}\n"
                      "route: {receiver: blackhole}\nreceivers: [{name: blackhole}]\n")
    port = free_port()
    proc = subprocess.Popen([ALERTMANAGER, f"--config.file={config}",
                             f"--storage.path={tmp_path / 'am-data'}",
                             f"--web.listen-address={HOST}:{port}",
                             "--cluster.listen-address="],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://{HOST}:{port}"
    try:
        def ready() -> bool:
            if proc.poll() is not None:
                pytest.fail(f"alertmanager exited with {proc.returncode}")
            with urllib.request.urlopen(url + "/-/ready", timeout=2) as r:
                return r.status == 200
        wait_for(ready, timeout=30, message="alertmanager ready")
        yield url
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


def _am_alerts(url: str) -> list[dict[str, Any]]:
    with urllib.request.urlopen(url + "/api/v2/alerts", timeout=5) as r:
        return json.loads(r.read())


def test_alertmanager_lists_the_alerts_and_resolves_them(alertmanager: str,
                                                         helper: Any) -> None:
    h = helper({"am": {"type": "alertmanager", "url": alertmanager, "resend": "1s"}})
    h.send("am", payload("a1"))
    assert h.wait_results(1)[0] == msg.Delivered("am", "a1", True, "", 1, 0)
    listed = wait_value(lambda: _am_alerts(alertmanager), lambda a: len(a) == 2,
                        message="two alerts in alertmanager")
    assert sorted(a["labels"]["slot"] for a in listed) == ["1", "2"]
    assert {a["labels"]["alertname"] for a in listed} == {"CrashLoop"}
    assert listed[0]["annotations"]["summary"] == "CrashLoop on images"
    assert {a["status"]["state"] for a in listed} == {"active"}
    h.send("am", payload("a1", status="resolved"))
    assert h.wait_results(2)[1].ok
    wait_value(lambda: _am_alerts(alertmanager), lambda a: a == [],
               message="the resolved alerts gone from alertmanager's active list")


def _seconds(rfc3339: str) -> float:
    """Alertmanager's timestamps (Go's, up to 9 fraction digits) as Unix seconds."""
    text = re.sub(r"(\.\d{6})\d+", r"\1", rfc3339).replace("Z", "+00:00")
    return datetime.datetime.fromisoformat(text).timestamp()


def test_alertmanager_alerts_stay_firing_past_its_resolve_timeout(alertmanager: str,
                                                                 helper: Any) -> None:
    # Alertmanager resolves an alert nobody posts again within resolve_timeout; the
    # channel re-posts its firing alerts every `resend`, so they stay active as long as
    # they fire.
    h = helper({"am": {"type": "alertmanager", "url": alertmanager, "resend": "1s"}})
    h.send("am", payload("r1", alerts=[alert("CrashLoop", pool="images")]))
    assert h.wait_results(1)[0].ok
    [first] = wait_value(lambda: _am_alerts(alertmanager), lambda a: len(a) == 1,
                         message="the alert in alertmanager")
    past = _seconds(first["endsAt"]) + AM_RESOLVE_TIMEOUT  # well past its first end

    def still_active_past_its_first_end() -> bool:
        listed = _am_alerts(alertmanager)
        assert [a["status"]["state"] for a in listed] == ["active"], listed
        return time.time() > past  # wall time: Alertmanager's timestamps are wall time

    wait_for(still_active_past_its_first_end, timeout=20, message="time to pass")
    h.send("am", payload("r1", status="resolved",
                         alerts=[alert("CrashLoop", "resolved", pool="images")]))
    assert h.wait_results(2)[1].ok
    wait_value(lambda: _am_alerts(alertmanager), lambda a: a == [],
               message="the resolved alert gone")


def test_each_outcome_carries_its_notifications_id(receiver: Receiver, helper: Any) -> None:
    """The master numbers notifications and holds each until its outcome (by id) is in."""
    h = helper({"hook": {"type": "webhook", "url": receiver.url + "/ok"}})
    for nid, channel in ((7, "hook"), (8, "nope")):
        h.send(channel, json.dumps({"channel": channel, "payload": payload(f"g{nid}"),
                                    "id": nid}).encode() + b"\n")
    h.send("", b'{"id": 9}\n')
    results = {r.id: r for r in h.wait_results(3)}
    assert results[7].ok and not results[8].ok and not results[9].ok
    assert not any(r.pending for r in results.values())
    assert h.close() == 0


def test_a_retry_cut_short_by_a_stop_is_pending_not_an_outcome(receiver: Receiver) -> None:
    [channel] = parse_channels({"hook": {"type": "webhook", "url": receiver.url + "/status/503",
                                         "retries": 5}}).values()
    stop = threading.Event()
    stop.set()  # the helper is stopping: no retry is waited for
    result = nt.deliver(channel, payload("p"), stop)
    assert result.pending and not result.ok and result.attempts == 1
