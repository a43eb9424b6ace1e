"""Alert channels (`alerts.channels.NAME`): validators that turn one raw YAML mapping into a
frozen dataclass the delivery helper (gearvisor/helpers/notifier.py) sends through.

`channel(name, value)` parses one channel, `channels(value)` the whole mapping. Errors raise
Invalid with `at` pointing at the bad key inside the channel (`channels()` adds the channel's
name), so the alerts block parser prefixes `alerts.channels` and the operator reads
`alerts.channels.ops-mail.smtp: expected "host:port" ...`.

A `password_file` is only checked to be a path here and read when a mail is sent, not at
parse time: the config is parsed by the master and by `gearvisor check`, which often runs as
a user who may not read the secret; the password then never sits in the master's Config
(which status and logs show parts of); and a rotated password takes effect at the next mail
without a reload.
"""

from __future__ import annotations

import difflib
import importlib.util
import ipaddress
import re
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from gearvisor.config.errors import Invalid
from gearvisor.config.model import Server
from gearvisor.config.values import (
    boolean,
    command,
    duration_between,
    duration_upto,
    int_range,
    server,
    string_list,
    text,
)

MAX_CHANNELS = 64  # the delivery helper runs one worker thread per channel in use
DEFAULT_TIMEOUT = 10.0
DEFAULT_RETRIES = 3
SMTP_PORT = 25
_timeout = duration_between(0.01, 300.0)
_retries = int_range(0, 10)
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")
# An address as the SMTP envelope takes it: no spaces, no angle brackets, one @.
_ADDRESS = re.compile(r"[^\s<>@,;\"]+@[^\s<>@,;\"]+")
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]{1,100}")


@dataclass(frozen=True)
class _Common:
    name: str
    timeout: float  # seconds, per attempt
    retries: int  # attempts after the first one, with backoff between them


@dataclass(frozen=True)
class WebhookChannel(_Common):
    """POSTs Alertmanager's webhook payload (JSON) to `url`."""

    url: str
    headers: tuple[tuple[str, str], ...] = ()
    type: str = "webhook"


@dataclass(frozen=True)
class EmailChannel(_Common):
    """Sends a text mail over SMTP, with STARTTLS and AUTH when configured."""

    to: tuple[str, ...]
    sender: str  # the `from` key
    smtp: Server
    starttls: bool = True
    username: str | None = None
    password_file: str | None = None  # read at send time (see the module docstring)
    ca_file: str | None = None  # a private CA for the STARTTLS certificate
    type: str = "email"


@dataclass(frozen=True)
class ExecChannel(_Common):
    """Runs an argv (no shell) with the payload as JSON on stdin; killed at the timeout."""

    command: tuple[str, ...]
    type: str = "exec"


@dataclass(frozen=True)
class AlertmanagerChannel(_Common):
    """POSTs the alerts to an Alertmanager's `/api/v2/alerts`."""

    url: str  # the base URL; /api/v2/alerts is appended
    # Firing alerts are posted again this often (0: never) until resolved: Alertmanager
    # resolves an alert by itself once its resolve_timeout (5m) passes without one.
    resend: float = 60.0
    type: str = "alertmanager"


@dataclass(frozen=True)
class AppriseChannel(_Common):
    """Hands the notification to the apprise package (Slack, Telegram, PagerDuty, ...)."""

    urls: tuple[str, ...]
    type: str = "apprise"


ChannelConfig = (WebhookChannel | EmailChannel | ExecChannel | AlertmanagerChannel
                 | AppriseChannel)

_COMMON_KEYS = {"type", "timeout", "retries"}
_KEYS: dict[str, set[str]] = {
    "webhook": _COMMON_KEYS | {"url", "headers"},
    "email": _COMMON_KEYS | {"to", "from", "smtp", "starttls", "username", "password_file",
                             "ca_file"},
    "exec": _COMMON_KEYS | {"command"},
    "alertmanager": _COMMON_KEYS | {"url", "resend"},
    "apprise": _COMMON_KEYS | {"urls"},
}
_REQUIRED = {"webhook": ("url",), "email": ("to", "from", "smtp"), "exec": ("command",),
             "alertmanager": ("url",), "apprise": ("urls",)}


def http_url(value: Any) -> str:
    """An http:// or https:// URL with a host, the only kinds urllib posts to."""
    value = text(value).strip()
    parts = urllib.parse.urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise Invalid('expected an http:// or https:// URL such as "http://127.0.0.1:9000/hook"')
    try:
        parts.port  # noqa: B018 - raises on a port out of range
    except ValueError:
        raise Invalid("expected a port from 1 to 65535 in the URL") from None
    if re.search(r"[\s\x00-\x1f\x7f]", value):
        raise Invalid("expected a URL without spaces or control characters")
    return value


def smtp_server(value: Any) -> Server:
    """The SMTP server, "host" or "host:port" ("[v6]:port"); the port defaults to 25."""
    if not isinstance(value, str):
        raise Invalid('expected "host:port" such as "127.0.0.1:25"')
    try:
        parsed = server(value)
    except Invalid:
        raise Invalid('expected "host:port" such as "127.0.0.1:25"') from None
    if not re.search(r":[0-9]+\s*$", value):
        parsed = Server(parsed.host, SMTP_PORT)  # values.server's default is gearmand's
    return parsed


def address(value: Any) -> str:
    """A mail address (user@host), as the SMTP envelope takes it."""
    if not isinstance(value, str) or not _ADDRESS.fullmatch(value.strip()):
        raise Invalid('expected a mail address such as "ops@example.com"')
    return value.strip()


def _addresses(value: Any) -> tuple[str, ...]:
    items = string_list(value)
    if not items:
        raise Invalid("expected at least one mail address")
    for i, item in enumerate(items):
        try:
            address(item)
        except Invalid as e:
            raise Invalid(str(e), at=(i,) if isinstance(value, list) else (), value=item) \
                from None
    return tuple(a.strip() for a in items)


def _headers(value: Any) -> tuple[tuple[str, str], ...]:
    if not isinstance(value, dict):
        raise Invalid('expected a mapping such as {Authorization: "Bearer ..."}')
    out = []
    for k, v in value.items():
        if not isinstance(k, str) or not _HEADER_NAME.fullmatch(k):
            raise Invalid("expected an HTTP header name", at=(k,), value=k)
        if not isinstance(v, str) or re.search(r"[\r\n\x00]", v):
            raise Invalid("expected a string on one line", at=(k,), value=v)
        out.append((k, v))
    return tuple(out)


def _path(value: Any) -> str:
    value = text(value)
    if not value.startswith("/"):
        raise Invalid("expected an absolute path (the helper may run in another directory)")
    return value


def _resend(value: Any) -> float:
    """0 (off) or a period from 1s to 1h: a shorter one would have the helper post in a
    loop, a longer one outlives any resolve_timeout worth having."""
    seconds = duration_upto(3600.0)(value)
    if 0 < seconds < 1:
        raise Invalid("expected 0 (off) or a duration of at least 1s")
    return seconds


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _apprise_urls(value: Any) -> tuple[str, ...]:
    urls = string_list(value)
    if not urls:
        raise Invalid("expected at least one apprise URL")
    if importlib.util.find_spec("apprise") is None:  # found, never imported in the master
        raise Invalid("type apprise needs the apprise package, which is not installed: "
                      "pip install apprise, or use a webhook or exec channel")
    return urls


def _field(raw: dict, key: str, parse: Callable[[Any], Any], default: Any = None) -> Any:
    """raw[key] parsed, or `default` when absent; an error names the key (and the item)."""
    if key not in raw:
        return default
    try:
        return parse(raw[key])
    except Invalid as e:
        raise Invalid(str(e), at=(key, *e.at), value=raw[key] if e.value is ... else e.value) \
            from None


def channel(name: str, value: Any) -> ChannelConfig:
    """One channel's mapping -> its frozen config; Invalid names the key inside it."""
    if not isinstance(value, dict):
        raise Invalid("expected a mapping with a type: webhook, email, exec, alertmanager or "
                      "apprise", value=value)
    kind = value.get("type")
    if not isinstance(kind, str) or kind not in _KEYS:  # a list is not hashable
        hint = difflib.get_close_matches(str(kind), sorted(_KEYS), n=1) if kind else []
        mean = f' (did you mean "{hint[0]}"?)' if hint else ""
        raise Invalid(f"expected a type: webhook, email, exec, alertmanager or apprise{mean}",
                      at=("type",), value=kind)
    allowed = _KEYS[kind]
    for key in value:
        if key not in allowed:
            hint = difflib.get_close_matches(str(key), sorted(allowed), n=1)
            mean = f'; did you mean "{hint[0]}"?' if hint else ""
            raise Invalid(f"unknown key for a {kind} channel{mean} (known: "
                          f"{', '.join(sorted(allowed))})", at=(key,), value=key)
    for key in _REQUIRED[kind]:
        if key not in value:
            article = "an" if kind[0] in "aeiou" else "a"
            raise Invalid(f"{article} {kind} channel needs {key}", at=(key,), value=None)
    common = {"name": name,
              "timeout": _field(value, "timeout", _timeout, DEFAULT_TIMEOUT),
              "retries": _field(value, "retries", _retries, DEFAULT_RETRIES)}
    if kind == "webhook":
        return WebhookChannel(**common, url=_field(value, "url", http_url),
                              headers=_field(value, "headers", _headers, ()))
    if kind == "alertmanager":
        return AlertmanagerChannel(**common, url=_field(value, "url", http_url).rstrip("/"),
                                   resend=_field(value, "resend", _resend, 60.0))
    if kind == "exec":
        return ExecChannel(**common, command=_field(value, "command", command))
    if kind == "apprise":
        return AppriseChannel(**common, urls=_field(value, "urls", _apprise_urls))
    smtp = _field(value, "smtp", smtp_server)
    starttls = _field(value, "starttls", boolean, True)
    username = _field(value, "username", text)
    password_file = _field(value, "password_file", _path)
    if (username is None) != (password_file is None):
        missing = "password_file" if password_file is None else "username"
        raise Invalid(f"SMTP auth needs both username and password_file; add {missing}",
                      at=(missing,), value=None)
    if username is not None and not starttls and not _loopback(smtp.host):
        # The same rule as Go's smtp.PlainAuth (Alertmanager): no password in clear text
        # over the network.
        raise Invalid("would send the SMTP password unencrypted to a remote server; set "
                      "starttls: true", at=("starttls",), value=starttls)
    return EmailChannel(**common, to=_field(value, "to", _addresses),
                        sender=_field(value, "from", address), smtp=smtp, starttls=starttls,
                        username=username, password_file=password_file,
                        ca_file=_field(value, "ca_file", _path))


def channels(value: Any) -> dict[str, ChannelConfig]:
    """The whole `alerts.channels` mapping: name -> channel. Invalid's `at` starts with the
    channel's name."""
    if not isinstance(value, dict):
        raise Invalid("expected a mapping of channel name -> {type: ..., ...}")
    if len(value) > MAX_CHANNELS:
        raise Invalid(f"expected at most {MAX_CHANNELS} channels")
    out: dict[str, ChannelConfig] = {}
    for name, raw in value.items():
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise Invalid("expected a channel name of letters, digits, '_', '.' and '-' (up "
                          "to 63)", at=(name,), value=name)
        try:
            out[name] = channel(name, raw)
        except Invalid as e:
            raise Invalid(str(e), at=(name, *e.at), value=e.value) from None
    return out


def unknown_channel(name: str, known: Any) -> str:
    """The error text for a route naming a channel that is not defined, with a did-you-mean
    (for the alerts block parser: `alerts.routes.0.notify.0`)."""
    hint = difflib.get_close_matches(name, sorted(known), n=1)
    mean = f'; did you mean "{hint[0]}"?' if hint else ""
    return f"no channel named {name!r} in alerts.channels{mean}"
