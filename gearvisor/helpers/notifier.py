"""Alert delivery: the helper process that sends notifications through the alert channels.

The master decides what to send and when (the alert engine) and never blocks on a mail
server or a webhook: it writes one JSON line per notification to this helper's input pipe,

    {"channel": "ops-mail", "payload": {<Alertmanager webhook payload, version "4">}}

and reads one result line per notification back from its event pipe, a `messages.Delivered`
({"event": "delivered", "channel", "groupKey", "ok", "error", "attempts", "dropped"}).

Here, not in the master, blocking is fine, and so are threads: each channel in use gets one
worker thread and its own bounded queue (QUEUE_MAX; when full the oldest waiting notification
is dropped, reported with ok false and attempts 0, and counted), so a webhook that hangs
delays only its own channel's notifications. Each attempt has the channel's timeout; a failed
one is retried `retries` times with exponential backoff (policy/backoff.py). A permanent
failure (HTTP 4xx, a program that cannot be run, a bad password file) is not retried.

Channels: webhook (POST the payload), email (smtplib, STARTTLS and AUTH), exec (an argv, no
shell, the payload as JSON on stdin, killed at the timeout), alertmanager (POST the alerts to
/api/v2/alerts) and apprise (when that package is installed). An alertmanager channel posts
its firing alerts again every `resend` seconds until they resolve, as Prometheus does:
Alertmanager resolves an alert by itself once its resolve_timeout passes without one, and
the engine's repeat_interval (4h) is far longer than that.

Run by the master through `run_notifier` (forked, two pipes), or standalone as
`python -m gearvisor.helpers.notifier --channels FILE` reading notifications from stdin and
writing results to stdout; `--test NAME` sends one test notification and exits 0 if it was
delivered (`send_test`, for `gearvisor alerts test CHANNEL`).
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import hashlib
import http.client
import json
import math
import os
import signal
import smtplib
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections import deque
from collections.abc import Callable, Mapping
from email.message import EmailMessage
from email.utils import formatdate, make_msgid
from typing import Any, NoReturn

from gearvisor import messages as msg
from gearvisor.child.postfork import message_writer
from gearvisor.config.channels import (
    AlertmanagerChannel,
    AppriseChannel,
    ChannelConfig,
    EmailChannel,
    ExecChannel,
    WebhookChannel,
)
from gearvisor.lines import LineSplitter
from gearvisor.policy.backoff import Backoff

QUEUE_MAX = 256  # notifications waiting per channel; beyond, the oldest is dropped
MAX_LINE = 1 << 20  # one notification line; a longer one is refused, not buffered
MAX_ERROR = 1000  # characters of an error in a result line (a line stays below PIPE_BUF)
RETRY_INITIAL = 1.0  # seconds before the first retry; doubled each time, up to RETRY_MAX
RETRY_MAX = 60.0
DRAIN_TIMEOUT = 30.0  # at end of input, how long queued notifications still get to go out
MAX_LISTED = 50  # alerts listed in a mail or apprise body; the rest are counted
ZERO_TIME = "0001-01-01T00:00:00Z"  # Alertmanager's "no end time"
MAX_ACTIVE = 10_000  # firing alerts an alertmanager channel posts again, per channel


class DeliveryError(Exception):
    """One attempt failed; `retry` says whether another attempt may succeed."""

    def __init__(self, message: str, retry: bool = True) -> None:
        super().__init__(message)
        self.retry = retry


# -- what a notification says ---------------------------------------------------------------------


def _alerts(payload: Mapping[str, Any]) -> list[dict[str, Any]]:
    alerts = payload.get("alerts")
    return [a for a in alerts if isinstance(a, dict)] if isinstance(alerts, list) else []


def _labels(value: Any) -> dict[str, str]:
    return {str(k): str(v) for k, v in value.items()} if isinstance(value, dict) else {}


def _one_line(text: str, limit: int = 200) -> str:
    """`text` without line breaks or control characters (a mail header), cut to `limit`."""
    text = "".join(c if c.isprintable() else " " for c in text)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def subject(payload: Mapping[str, Any]) -> str:
    """Alertmanager's default mail subject: "[FIRING:2] CrashLoop images (critical host1)":
    the status (with the firing count), the group labels' values, then the values of the
    labels all alerts share beyond those."""
    status = str(payload.get("status", "firing"))
    firing = sum(1 for a in _alerts(payload) if a.get("status") == "firing")
    head = f"[{status.upper()}:{firing}]" if status == "firing" else f"[{status.upper()}]"
    group = _labels(payload.get("groupLabels"))
    common = _labels(payload.get("commonLabels"))
    parts = [head, *(group[k] for k in sorted(group))]
    extra = [common[k] for k in sorted(common) if k not in group]
    if extra:
        parts.append("(" + " ".join(extra) + ")")
    return _one_line(" ".join(parts))


def text_body(payload: Mapping[str, Any]) -> str:
    """A plain-text listing of the notification's alerts, firing first, for a person."""
    alerts = _alerts(payload)
    firing = [a for a in alerts if a.get("status") == "firing"]
    resolved = [a for a in alerts if a.get("status") != "firing"]
    group = _labels(payload.get("groupLabels"))
    lines = [f"{len(firing)} firing, {len(resolved)} resolved"
             + (" (" + " ".join(f"{k}={v}" for k, v in sorted(group.items())) + ")"
                if group else "")]
    truncated = payload.get("truncatedAlerts")
    if isinstance(truncated, int) and truncated > 0:
        lines.append(f"{truncated} more alerts were left out of this notification")
    listed = 0
    for title, items in (("Firing", firing), ("Resolved", resolved)):
        if not items or listed == MAX_LISTED:
            continue
        lines += ["", f"{title}:"]
        for a in items:
            if listed == MAX_LISTED:
                break
            listed += 1
            labels = _labels(a.get("labels"))
            notes = _labels(a.get("annotations"))
            name = labels.pop("alertname", "alert")
            lines.append(f"- {name} " + " ".join(f"{k}={v}" for k, v in sorted(labels.items())))
            for key in ("summary", "description"):
                if notes.get(key):
                    lines.append(f"  {key}: {notes[key]}")
            ends = a.get("endsAt")
            lines.append(f"  since {a.get('startsAt', '?')}"
                         + (f", until {ends}" if ends not in (None, "", ZERO_TIME) else ""))
    if listed < len(alerts):
        lines += ["", f"... and {len(alerts) - listed} more"]
    return "\n".join(lines) + "\n"


def postable_alerts(payload: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The alerts in Alertmanager's API v2 postable format (labels, annotations, startsAt,
    endsAt, generatorURL). A firing alert has no endsAt: Alertmanager resolves it itself
    after its resolve_timeout unless it is sent again."""
    out = []
    for a in _alerts(payload):
        item: dict[str, Any] = {"labels": _labels(a.get("labels")),
                                "annotations": _labels(a.get("annotations"))}
        for key in ("startsAt", "endsAt", "generatorURL"):
            value = a.get(key)
            if isinstance(value, str) and value and value != ZERO_TIME:
                item[key] = value
        out.append(item)
    return out


def track_firing(active: dict[str, dict[str, Any]], payload: Mapping[str, Any]) -> None:
    """Update `active` (labels -> postable alert) with a notification's alerts: a firing
    one is kept, a resolved one forgotten. At most MAX_ACTIVE, the oldest dropped first."""
    for raw, item in zip(_alerts(payload), postable_alerts(payload), strict=True):
        key = json.dumps(item["labels"], sort_keys=True)
        active.pop(key, None)
        if raw.get("status") == "firing":
            active[key] = item
    while len(active) > MAX_ACTIVE:
        del active[next(iter(active))]


def _rfc3339(seconds: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


def payload_for_test(receiver: str, now: float | None = None) -> dict[str, Any]:
    """A one-alert firing notification for `gearvisor alerts test CHANNEL`: alertname
    GearvisorTest, severity info, so a receiver's routing can tell it from a real page."""
    now = time.time() if now is None else now  # wall time: a timestamp, not a timer
    host = os.uname().nodename
    labels = {"alertname": "GearvisorTest", "severity": "info", "host": host}
    notes = {"summary": f"Test notification from gearvisor on {host}",
             "description": f"Sent by `gearvisor alerts test {receiver}`; nothing is wrong."}
    fingerprint = hashlib.sha256(json.dumps(labels, sort_keys=True).encode()).hexdigest()[:16]
    return {"version": "4", "groupKey": '{}:{alertname="GearvisorTest"}', "status": "firing",
            "receiver": receiver, "groupLabels": {"alertname": "GearvisorTest"},
            "commonLabels": labels, "commonAnnotations": notes, "externalURL": "",
            "truncatedAlerts": 0,
            "alerts": [{"status": "firing", "labels": labels, "annotations": notes,
                        "startsAt": _rfc3339(now), "endsAt": ZERO_TIME, "generatorURL": "",
                        "fingerprint": fingerprint}]}


# -- the channels ---------------------------------------------------------------------------------


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """A redirect is an error: urllib would turn the POST into a GET and lose the alert."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


# No proxies from the environment: alert receivers are configured by URL, and a proxy
# variable meant for something else must not swallow pages.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}), _NoRedirect)


def _post_json(url: str, body: Any, headers: tuple[tuple[str, str], ...],
               timeout: float) -> None:
    """POST `body` as JSON; DeliveryError unless the answer is 2xx. `timeout` bounds each
    socket operation (connect, each read)."""
    data = json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method="POST", headers={
        "Content-Type": "application/json", "User-Agent": "gearvisor", **dict(headers)})
    try:
        # The status is the answer; the body is not read: a receiver that trickles one
        # byte per `timeout` could otherwise hold the channel for hours.
        with _OPENER.open(request, timeout=timeout):
            pass
    except urllib.error.HTTPError as e:
        try:
            detail = e.read(300).decode("utf-8", "replace").strip()
        except (OSError, http.client.HTTPException):
            detail = ""
        # Alertmanager's own rule: a server error or a rate limit may pass, a 4xx will not.
        retry = e.code >= 500 or e.code in (408, 429)
        raise DeliveryError(f"POST {url}: HTTP {e.code} {e.reason}"
                            + (f": {_one_line(detail)}" if detail else ""), retry) from None
    except urllib.error.URLError as e:
        raise DeliveryError(f"POST {url}: {e.reason}") from None
    except (OSError, http.client.HTTPException) as e:  # a timeout is an OSError
        raise DeliveryError(f"POST {url}: {type(e).__name__}: {e}") from None


def send_webhook(channel: WebhookChannel, payload: dict[str, Any]) -> None:
    """POST the payload as it is: Alertmanager's webhook format, which receivers know."""
    _post_json(channel.url, payload, channel.headers, channel.timeout)


def send_alertmanager(channel: AlertmanagerChannel, payload: dict[str, Any]) -> None:
    """POST the alerts to Alertmanager's API; it dedupes, groups and routes them itself."""
    _post_json(channel.url + "/api/v2/alerts", postable_alerts(payload), (), channel.timeout)


def _password(path: str) -> str:
    """The SMTP password, read now (see config/channels.py for why not at parse time)."""
    try:
        with open(path, encoding="utf-8") as f:
            return f.read(4096).rstrip("\r\n")
    except (OSError, UnicodeDecodeError) as e:
        raise DeliveryError(f"cannot read password_file {path}: {e}; fix the file or its "
                            "permissions (the helper runs as the master's user)",
                            retry=False) from None


def mail(channel: EmailChannel, payload: dict[str, Any]) -> EmailMessage:
    """The mail for one notification: Alertmanager's subject, a text listing of the alerts."""
    message = EmailMessage()
    message["Subject"] = subject(payload)
    message["From"] = channel.sender
    message["To"] = ", ".join(channel.to)
    message["Date"] = formatdate(localtime=True)
    message["Message-ID"] = make_msgid(domain=channel.sender.rpartition("@")[2] or None)
    message.set_content(text_body(payload))
    return message


def _login(smtp: smtplib.SMTP, user: str, password: str, where: str) -> None:
    """AUTH with one mechanism the server offers (PLAIN, else LOGIN, else CRAM-MD5), as
    Alertmanager does. Not smtplib's login(), which tries each in turn: one wrong password
    would count as several failed logins, and some servers stall on the second try."""
    offered = (smtp.esmtp_features.get("auth") or "").upper().split()
    for mechanism in ("PLAIN", "LOGIN", "CRAM-MD5"):
        if mechanism in offered:
            break
    else:
        raise DeliveryError(f"{where} offers no AUTH mechanism gearvisor speaks (PLAIN, LOGIN, "
                            f"CRAM-MD5); it offers {' '.join(offered) or 'none'}", retry=False)
    smtp.user, smtp.password = user, password
    smtp.auth(mechanism, getattr(smtp, "auth_" + mechanism.lower().replace("-", "_")))


def send_email(channel: EmailChannel, payload: dict[str, Any]) -> None:
    """Send the mail over SMTP: STARTTLS when set (the server must offer it), then AUTH."""
    host, port = channel.smtp.host, channel.smtp.port
    where = f"SMTP {host}:{port}"
    try:
        with smtplib.SMTP(host, port, timeout=channel.timeout) as smtp:
            smtp.ehlo()
            if channel.starttls:
                if not smtp.has_extn("starttls"):
                    raise DeliveryError(f"{where} does not offer STARTTLS; set starttls: false "
                                        "only for a server on this host", retry=False)
                smtp.starttls(context=ssl.create_default_context(cafile=channel.ca_file))
                smtp.ehlo()
            if channel.username is not None and channel.password_file is not None:
                _login(smtp, channel.username, _password(channel.password_file), where)
            smtp.send_message(mail(channel, payload), channel.sender, list(channel.to))
    except smtplib.SMTPAuthenticationError as e:
        raise DeliveryError(f"{where}: login as {channel.username} refused: {e.smtp_code} "
                            f"{_decode(e.smtp_error)}", retry=False) from None
    except smtplib.SMTPResponseException as e:
        # 4xx is a temporary failure by SMTP's own rules, 5xx a permanent one.
        raise DeliveryError(f"{where}: {e.smtp_code} {_decode(e.smtp_error)}",
                            retry=e.smtp_code < 500) from None
    except smtplib.SMTPRecipientsRefused as e:
        raise DeliveryError(f"{where}: every recipient refused: {sorted(e.recipients)}",
                            retry=False) from None
    except ssl.SSLError as e:
        raise DeliveryError(f"{where}: TLS failed: {e}; set ca_file for a private CA") \
            from None
    except (smtplib.SMTPException, OSError) as e:
        raise DeliveryError(f"{where}: {type(e).__name__}: {e}") from None


def _decode(value: Any) -> str:
    return _one_line(value.decode("utf-8", "replace") if isinstance(value, bytes)
                     else str(value))


def send_exec(channel: ExecChannel, payload: dict[str, Any]) -> None:
    """Run the channel's argv (no shell) with the payload as JSON on stdin; its whole
    process group is killed at the timeout. A non-zero exit is a failure."""
    argv0 = channel.command[0]
    # Output to a file, not a pipe: a program that writes a lot cannot make this process
    # buffer it, and only its tail is shown.
    with tempfile.TemporaryFile() as out:
        try:
            proc = subprocess.Popen(channel.command, stdin=subprocess.PIPE, stdout=out,
                                    stderr=out, start_new_session=True, close_fds=True)
        except OSError as e:
            raise DeliveryError(f"cannot run {argv0}: {e.strerror or e}", retry=False) \
                from None
        try:
            proc.communicate(json.dumps(payload).encode() + b"\n", timeout=channel.timeout)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # its own group: what it started dies too
            except ProcessLookupError:
                pass
            proc.wait()
            raise DeliveryError(f"{argv0} still ran after {channel.timeout:g}s; killed") \
                from None
        if proc.returncode != 0:
            out.seek(max(0, out.seek(0, os.SEEK_END) - 500))
            tail = _one_line(out.read().decode("utf-8", "replace").strip(), 500)
            how = (f"was killed by signal {-proc.returncode}" if proc.returncode < 0
                   else f"exited with status {proc.returncode}")
            raise DeliveryError(f"{argv0} {how}" + (f": {tail}" if tail else ""))


def send_apprise(channel: AppriseChannel, payload: dict[str, Any]) -> None:
    """Notify every apprise URL with the mail's subject and text."""
    try:
        import apprise  # optional: only this channel needs it
    except ImportError:
        raise DeliveryError("type apprise needs the apprise package: pip install apprise",
                            retry=False) from None
    hub = apprise.Apprise()
    for url in channel.urls:
        if not hub.add(url):
            raise DeliveryError(f"apprise does not understand the URL {url!r}", retry=False)
    if not hub.notify(title=subject(payload), body=text_body(payload)):
        raise DeliveryError("apprise could not notify one or more of its URLs")


SENDERS: dict[str, Callable[[Any, dict[str, Any]], None]] = {
    "webhook": send_webhook, "email": send_email, "exec": send_exec,
    "alertmanager": send_alertmanager, "apprise": send_apprise}


def deliver(channel: ChannelConfig, payload: dict[str, Any],
            stop: threading.Event | None = None, backoff: Backoff | None = None) -> msg.Delivered:
    """Send one notification, retrying a failure up to `channel.retries` times with
    backoff; `stop` set ends the waiting between attempts. Never raises."""
    group_key = str(payload.get("groupKey", ""))[:MAX_ERROR]
    stop = stop or threading.Event()
    backoff = backoff or Backoff(RETRY_INITIAL, RETRY_MAX, jitter=0.2, reset_after=math.inf)
    attempts = 0
    while True:
        attempts += 1
        try:
            SENDERS[channel.type](channel, payload)
            return msg.Delivered(channel.name, group_key, True, "", attempts)
        except DeliveryError as e:
            error, retry = str(e), e.retry
        except Exception as e:  # a library's surprise must not end the channel's worker
            error, retry = f"{type(e).__name__}: {e}", True
        if not retry or attempts > channel.retries:
            break
        if stop.wait(backoff.failure(0.0, 0.0)):
            error += "; not retried: the helper is stopping"
            return msg.Delivered(channel.name, group_key, False, error[:MAX_ERROR], attempts,
                                 pending=True)
    return msg.Delivered(channel.name, group_key, False, error[:MAX_ERROR], attempts)


def send_test(channel: ChannelConfig) -> msg.Delivered:
    """Send a test notification (`gearvisor alerts test CHANNEL`), with retries."""
    return deliver(channel, payload_for_test(channel.name))


# -- the queues -----------------------------------------------------------------------------------


class Notifier:
    """Per-channel bounded queues and one worker thread per channel in use.

    `report` gets one Delivered per notification submitted (from any thread; it must be
    thread-safe). `close` waits for the queues to drain, up to a deadline."""

    def __init__(self, channels: Mapping[str, ChannelConfig],
                 report: Callable[[msg.Delivered], None], queue_max: int = QUEUE_MAX,
                 retry_initial: float = RETRY_INITIAL, retry_max: float = RETRY_MAX) -> None:
        self.channels = dict(channels)
        self.report = report
        self.queue_max = queue_max
        self.retry_initial = retry_initial
        self.retry_max = retry_max
        self.stop = threading.Event()  # set: give up retrying, exit the workers
        self.dropped: dict[str, int] = {}
        self._cond = threading.Condition()
        self._queues: dict[str, deque[tuple[int, dict[str, Any]]]] = {}  # (id, payload)
        self._threads: dict[str, threading.Thread] = {}
        self._closing = False

    def submit_line(self, line: bytes) -> None:
        """One line from the input pipe: a notification, or an error result for it."""
        try:
            note = json.loads(line)
        except (ValueError, RecursionError) as e:
            self.report(msg.Delivered("", "", False, f"not a JSON notification: {e}"[:200]))
            return
        self.submit(note)

    def submit(self, note: Any) -> None:
        """Queue one notification {"channel": NAME, "payload": {...}, "id": N} for its
        channel; its outcome is reported with the same id (0 when it had none)."""
        nid = note.get("id") if isinstance(note, dict) else None
        nid = nid if isinstance(nid, int) and not isinstance(nid, bool) and nid > 0 else 0
        if not isinstance(note, dict) or not isinstance(note.get("payload"), dict) \
                or not isinstance(note.get("channel"), str):
            self.report(msg.Delivered("", "", False, 'expected {"channel": NAME, "payload": '
                                      '{...}}', id=nid))
            return
        name, payload = note["channel"], note["payload"]
        if name not in self.channels:
            hint = difflib.get_close_matches(name, sorted(self.channels), n=1)
            mean = f'; did you mean "{hint[0]}"?' if hint else ""
            self.report(msg.Delivered(name[:200], str(payload.get("groupKey", ""))[:MAX_ERROR],
                                      False, f"no channel named {name[:200]!r}{mean}",
                                      id=nid))
            return
        dropped = None
        with self._cond:
            queue = self._queues.setdefault(name, deque())
            if len(queue) >= self.queue_max:
                old_id, old = queue.popleft()
                self.dropped[name] = self.dropped.get(name, 0) + 1
                dropped = msg.Delivered(
                    name, str(old.get("groupKey", ""))[:MAX_ERROR], False,
                    f"dropped unsent: {self.queue_max} notifications were waiting for this "
                    "channel", 0, self.dropped[name], id=old_id)
            queue.append((nid, payload))
            if name not in self._threads:
                worker = threading.Thread(target=self._work, args=(name,), daemon=True,
                                          name=f"notify-{name}")
                self._threads[name] = worker
                worker.start()
            self._cond.notify_all()
        if dropped is not None:
            self.report(dropped)

    def _work(self, name: str) -> None:
        channel, queue = self.channels[name], self._queues[name]
        backoff = Backoff(self.retry_initial, self.retry_max, jitter=0.2, reset_after=math.inf)
        resend = channel.resend if isinstance(channel, AlertmanagerChannel) else 0.0
        active: dict[str, dict[str, Any]] = {}  # firing alerts posted to an Alertmanager
        next_resend = math.inf
        while True:
            with self._cond:
                while not queue and not self._closing and not self.stop.is_set():
                    left = next_resend - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(None if left == math.inf else left)
                if self.stop.is_set() or (not queue and self._closing):
                    return
                nid, payload = queue.popleft() if queue else (0, None)
            if payload is None:  # time to post the firing alerts again
                self._resend(channel, list(active.values()))  # type: ignore[arg-type]
            else:
                backoff.reset()  # each notification starts its own streak
                result = deliver(channel, payload, self.stop, backoff)
                with self._cond:
                    result = dataclasses.replace(result, dropped=self.dropped.get(name, 0),
                                                 id=nid)
                self.report(result)
                if resend:
                    track_firing(active, payload)
            next_resend = time.monotonic() + resend if resend and active else math.inf

    def _resend(self, channel: AlertmanagerChannel, alerts: list[dict[str, Any]]) -> None:
        """Post the still-firing alerts again, once (the next round is `resend` away): a
        failure is logged, the notification it came with was reported already."""
        try:
            _post_json(channel.url + "/api/v2/alerts", alerts, (), channel.timeout)
        except DeliveryError as e:
            print(f"gearvisor notifier: posting {len(alerts)} firing alerts again to channel "
                  f"{channel.name} failed: {e}", file=sys.stderr, flush=True)

    def close(self, timeout: float) -> bool:
        """No more input: let the queues drain for up to `timeout` seconds, then stop
        retrying. True if everything queued was delivered or given up on in time."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
            workers = list(self._threads.values())
        deadline = time.monotonic() + timeout
        for w in workers:
            w.join(max(0.0, deadline - time.monotonic()))
        self.stop.set()
        with self._cond:
            self._cond.notify_all()
        return not any(w.is_alive() for w in workers)


# -- the process ----------------------------------------------------------------------------------


def serve(channels: Mapping[str, ChannelConfig], in_fd: int, event_fd: int,
          drain: float = DRAIN_TIMEOUT, queue_max: int = QUEUE_MAX,
          retry_initial: float = RETRY_INITIAL) -> int:
    """Read notification lines from `in_fd` until end of input, deliver them, write a
    result line for each to `event_fd`; then drain for up to `drain` seconds. Returns the
    exit code (0)."""
    report = message_writer(event_fd, threadsafe=True)
    notifier = Notifier(channels, report, queue_max=queue_max, retry_initial=retry_initial)
    too_long = msg.Delivered("", "", False, f"a notification line is longer than {MAX_LINE} "
                             "bytes; dropped")
    lines = LineSplitter(MAX_LINE, lambda _size: report(too_long))
    while True:
        chunk = os.read(in_fd, 65536)
        if not chunk:
            break
        for line in lines.feed(chunk):
            notifier.submit_line(line)
    notifier.close(drain)
    return 0


def run_notifier(channels: Mapping[str, ChannelConfig], in_fd: int, event_fd: int,
                 signals_to_unblock: set[int]) -> NoReturn:
    """The body of the forked delivery helper (System.fork's body, with `in_fd` the read
    end of a second pipe the master writes notifications to). Never returns."""
    from gearvisor.child.postfork import run_helper

    run_helper("gearvisor: notifier", signals_to_unblock, {in_fd, event_fd},
               lambda: serve(channels, in_fd, event_fd))


def load_channels(path: str) -> dict[str, ChannelConfig]:
    """Channels from a YAML file: the `alerts.channels` mapping itself, or a whole config
    holding one. Raises ConfigError naming the file and key."""
    import yaml

    from gearvisor.config.channels import channels as parse_channels
    from gearvisor.config.errors import ConfigError, Invalid, Problem, dotted, show

    try:
        with open(path, encoding="utf-8") as f:
            raw = yaml.safe_load(f)
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise ConfigError(path, [Problem("", f"cannot read channels: {e}")]) from None
    prefix: tuple = ()
    if isinstance(raw, dict) and isinstance(raw.get("alerts"), dict):
        raw, prefix = raw["alerts"].get("channels"), ("alerts", "channels")
    try:
        return parse_channels(raw)
    except Invalid as e:
        got = "" if e.value is ... else f", got {show(e.value)}"
        raise ConfigError(path, [Problem(dotted(prefix + e.at), f"{e}{got}")]) from None


def main(argv: list[str] | None = None) -> int:
    """`python -m gearvisor.helpers.notifier --channels FILE [--test NAME]`."""
    from gearvisor.config.errors import ConfigError

    parser = argparse.ArgumentParser(prog="python -m gearvisor.helpers.notifier",
                                     description="Deliver alert notifications (JSON lines "
                                     "on stdin) and write one result line each to stdout.")
    parser.add_argument("--channels", required=True, help="YAML file: the alerts.channels "
                        "mapping, or a config holding alerts.channels")
    parser.add_argument("--test", metavar="NAME", help="send one test notification to the "
                        "channel NAME and exit 0 if it was delivered")
    parser.add_argument("--drain", type=float, default=DRAIN_TIMEOUT,
                        help="seconds queued notifications still get at end of input")
    parser.add_argument("--retry-delay", type=float, default=RETRY_INITIAL,
                        help="seconds before the first retry (doubled each time)")
    parser.add_argument("--queue-max", type=int, default=QUEUE_MAX,
                        help="notifications waiting per channel before the oldest is dropped")
    args = parser.parse_args(argv)
    try:
        channels = load_channels(args.channels)
    except ConfigError as e:
        print(e, file=sys.stderr)
        return 2
    if args.test is not None:
        if args.test not in channels:
            hint = difflib.get_close_matches(args.test, sorted(channels), n=1)
            mean = f'; did you mean "{hint[0]}"?' if hint else ""
            print(f"{args.channels}: no channel named {args.test!r}{mean}", file=sys.stderr)
            return 2
        result = send_test(channels[args.test])
        sys.stdout.write(msg.encode(result).decode())
        return 0 if result.ok else 1
    return serve(channels, sys.stdin.fileno(), sys.stdout.fileno(), drain=args.drain,
                 queue_max=max(1, args.queue_max), retry_initial=args.retry_delay)


if __name__ == "__main__":
    sys.exit(main())
