"""Alert channel validators (gearvisor/config/channels.py): each type to its dataclass, and
errors that name the key inside the channel."""

from __future__ import annotations

import importlib.util
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import gearvisor.config.channels as ch
from gearvisor.config.errors import Invalid
from gearvisor.config.model import Server


def error(value: Any, name: str = "c") -> Invalid:
    with pytest.raises(Invalid) as e:
        ch.channels({name: value})
    return e.value


def test_webhook() -> None:
    c = ch.channel("hook", {"type": "webhook", "url": "http://127.0.0.1:9000/hook",
                            "timeout": "2s", "headers": {"Authorization": "Bearer x"}})
    assert c == ch.WebhookChannel(name="hook", timeout=2.0, retries=ch.DEFAULT_RETRIES,
                                  url="http://127.0.0.1:9000/hook",
                                  headers=(("Authorization", "Bearer x"),))


def test_email_defaults_and_port() -> None:
    c = ch.channel("mail", {"type": "email", "to": "ops@example.com", "from": "gv@example.com",
                            "smtp": "mail.example.com"})
    assert isinstance(c, ch.EmailChannel)
    assert c.to == ("ops@example.com",) and c.sender == "gv@example.com"
    assert c.smtp == Server("mail.example.com", 25)
    assert c.starttls is True and c.username is None and c.timeout == ch.DEFAULT_TIMEOUT
    c = ch.channel("mail", {"type": "email", "to": ["a@x.org", "b@x.org"], "from": "g@x.org",
                            "smtp": "[::1]:2525", "starttls": False, "username": "u",
                            "password_file": "/etc/gearvisor/smtp.pass", "retries": 0})
    assert c.smtp == Server("::1", 2525) and c.retries == 0
    assert c.password_file == "/etc/gearvisor/smtp.pass"


def test_password_file_is_not_read_at_parse_time(tmp_path: Any) -> None:
    # A file that does not exist (yet) is fine: it is read when a mail is sent.
    c = ch.channel("mail", {"type": "email", "to": "a@x.org", "from": "g@x.org",
                            "smtp": "127.0.0.1:25", "username": "u",
                            "password_file": str(tmp_path / "missing")})
    assert c.password_file == str(tmp_path / "missing")


def test_exec_and_alertmanager() -> None:
    c = ch.channel("page", {"type": "exec", "command": "/usr/local/bin/page --urgent",
                            "timeout": 5})
    assert c == ch.ExecChannel(name="page", timeout=5.0, retries=ch.DEFAULT_RETRIES,
                               command=("/usr/local/bin/page", "--urgent"))
    c = ch.channel("am", {"type": "alertmanager", "url": "http://127.0.0.1:9093/"})
    assert c == ch.AlertmanagerChannel(name="am", timeout=ch.DEFAULT_TIMEOUT,
                                       retries=ch.DEFAULT_RETRIES, url="http://127.0.0.1:9093",
                                       resend=60.0)
    c = ch.channel("am", {"type": "alertmanager", "url": "http://127.0.0.1:9093", "resend": 0})
    assert c.resend == 0


@pytest.mark.parametrize("value, at, words", [
    ("not a mapping", (), "expected a mapping with a type"),
    ({"url": "http://x"}, ("type",), "expected a type"),
    ({"type": "webhok", "url": "http://x"}, ("type",), 'did you mean "webhook"'),
    ({"type": "webhook"}, ("url",), "needs url"),
    ({"type": "webhook", "url": "ftp://x/"}, ("url",), "http:// or https://"),
    ({"type": "webhook", "url": "http://x:99999/"}, ("url",), "port"),
    ({"type": "webhook", "url": "http://x", "timout": 1}, ("timout",), 'did you mean "timeout"'),
    ({"type": "webhook", "url": "http://x", "timeout": "forever"}, ("timeout",), "duration"),
    ({"type": "webhook", "url": "http://x", "timeout": 0}, ("timeout",), "at least"),
    ({"type": "webhook", "url": "http://x", "retries": 99}, ("retries",), "from 0 to 10"),
    ({"type": "webhook", "url": "http://x", "headers": {"X-A": "a\nb"}}, ("headers", "X-A"),
     "one line"),
    ({"type": "email", "to": "a@x.org", "from": "g@x.org"}, ("smtp",), "needs smtp"),
    ({"type": "email", "to": ["a@x.org", "nobody"], "from": "g@x.org", "smtp": "h"},
     ("to", 1), "mail address"),
    ({"type": "email", "to": "a@x.org", "from": "g@x.org", "smtp": "h:0"}, ("smtp",),
     "host:port"),
    ({"type": "email", "to": "a@x.org", "from": "g@x.org", "smtp": "h", "username": "u"},
     ("password_file",), "needs both"),
    ({"type": "email", "to": "a@x.org", "from": "g@x.org", "smtp": "h", "username": "u",
      "password_file": "rel/path"}, ("password_file",), "absolute path"),
    ({"type": "email", "to": "a@x.org", "from": "g@x.org", "smtp": "mail.example.com",
      "starttls": False, "username": "u", "password_file": "/p"}, ("starttls",),
     "unencrypted"),
    ({"type": "exec", "command": []}, ("command",), "argv"),
    ({"type": "alertmanager", "url": "http://x", "resend": "10ms"}, ("resend",), "at least 1s"),
    ({"type": "alertmanager", "url": "http://x", "resend": "2h"}, ("resend",), "at most 1h"),
    ({"type": "exec", "command": ["a\0b"]}, ("command", 0), "NUL"),
])
def test_errors_name_the_key(value: Any, at: tuple, words: str) -> None:
    e = error(value)
    assert e.at == ("c", *at)
    assert words in str(e)


def test_channel_names_and_count() -> None:
    assert error({"type": "exec", "command": "x"}, name="bad name").at == ("bad name",)
    with pytest.raises(Invalid, match="at most"):
        ch.channels({f"c{i}": {"type": "exec", "command": "x"}
                     for i in range(ch.MAX_CHANNELS + 1)})
    with pytest.raises(Invalid, match="mapping"):
        ch.channels(["x"])


def test_unknown_channel_hint() -> None:
    assert 'did you mean "ops-mail"' in ch.unknown_channel("ops-mial", {"ops-mail", "hook"})
    assert "did you mean" not in ch.unknown_channel("zzz", {"ops-mail"})


@pytest.mark.skipif(importlib.util.find_spec("apprise") is not None,
                    reason="apprise is installed here")
def test_apprise_without_the_package_is_a_config_error() -> None:
    e = error({"type": "apprise", "urls": "json://127.0.0.1:9/"})
    assert e.at == ("c", "urls") and "pip install apprise" in str(e)


_leaf = st.one_of(st.none(), st.booleans(), st.integers(-10, 10**30), st.floats(),
                  st.text(max_size=30), st.sampled_from(
                      ["webhook", "email", "exec", "alertmanager", "apprise",
                       "http://127.0.0.1:9/h", "a@x.org", "127.0.0.1:25", "/p", "10s"]))
_value = st.recursive(_leaf, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=12)
_keys = st.sampled_from(["type", "url", "headers", "to", "from", "smtp", "starttls",
                         "username", "password_file", "ca_file", "command", "urls",
                         "timeout", "retries", "resend", "x"])


@settings(max_examples=400, deadline=None)
@given(st.dictionaries(_keys, _value, max_size=6))
def test_any_channel_value_is_parsed_or_invalid(raw: dict) -> None:
    """The alerts block parser calls channel() on whatever YAML held: a TypeError would
    escape the config loader."""
    try:
        ch.channels({"c": raw})
    except Invalid:
        pass
