"""The job journal's config: the top-level `journal:` block and the per-function `retry:`
and `failed_payload:` keys, their defaults, and errors that name the key path."""

from __future__ import annotations

from pathlib import Path

import pytest

from gearvisor.config import ConfigError, parse
from gearvisor.config.model import RETRY_OUTCOMES, JournalConfig, RetryConfig
from gearvisor.config.reference import markdown_reference
from gearvisor.journal.record import FAILURES

POOL = """\
pools:
  mail:
    functions:
      send_mail:
        callable: app.mail:send
{extra}      other: app.mail:other
"""


def cfg(tmp_path: Path, top: str = "", extra: str = "", euid: int = 1000):
    text = top + POOL.format(extra=extra)
    return parse(text, str(tmp_path / "pools.yaml"), euid=euid)


def error(tmp_path: Path, top: str = "", extra: str = "") -> str:
    with pytest.raises(ConfigError) as info:
        cfg(tmp_path, top, extra)
    return str(info.value)


def test_defaults_journal_on_sqlite_in_state_dir_no_retries_store_payloads(
        tmp_path: Path) -> None:
    c = cfg(tmp_path, top=f"state_dir: {tmp_path}/state\n")
    assert c.journal == JournalConfig(
        enabled=True, url=f"sqlite://{tmp_path}/state/journal.sqlite3",
        state_dir=f"{tmp_path}/state", max_entries=1_000_000, max_bytes=512 * 1024 * 1024,
        ttl=14 * 86400.0, payload_cap=64 * 1024, successes=False)
    assert c.journal.sqlite_path == f"{tmp_path}/state/journal.sqlite3"
    pool = c.pools["mail"]
    assert pool.retry == {}
    assert pool.failed_payload == {"send_mail": "store", "other": "store"}


def test_the_issue_example_parses(tmp_path: Path) -> None:
    c = cfg(tmp_path, top="journal: {enabled: true, store: 'postgresql://gv@db/gv', "
            "max_entries: 10, max_bytes: 1M, ttl: 2d, payload_cap: 4K, successes: false}\n",
            extra="        retry: {max_attempts: 8, backoff: {initial: 10s, max: 30m, "
            "multiplier: 3}, outcomes: [error, timeout, crash]}\n"
            "        failed_payload: hash\n")
    j = c.journal
    assert (j.url, j.max_entries, j.max_bytes, j.ttl, j.payload_cap, j.successes) == (
        "postgresql://gv@db/gv", 10, 1024 * 1024, 2 * 86400.0, 4096, False)
    assert j.sqlite_path is None
    assert c.pools["mail"].retry == {"send_mail": RetryConfig(8, 10.0, 1800.0, 3.0,
                                                              ("error", "timeout", "crash"))}
    assert c.pools["mail"].failed_payload == {"send_mail": "hash", "other": "store"}


def test_an_empty_retry_takes_every_default(tmp_path: Path) -> None:
    c = cfg(tmp_path, extra="        retry: {}\n")
    assert c.pools["mail"].retry == {"send_mail": RetryConfig()}
    assert RetryConfig().outcomes == RETRY_OUTCOMES
    assert set(RETRY_OUTCOMES) == FAILURES  # config/model.py's copy of record.FAILURES


def test_an_initial_over_the_default_max_raises_the_max_with_it(tmp_path: Path) -> None:
    c = cfg(tmp_path, extra="        retry: {backoff: {initial: 2h}}\n")
    assert c.pools["mail"].retry["send_mail"].max == 7200.0


def test_sqlite_with_an_absolute_path(tmp_path: Path) -> None:
    c = cfg(tmp_path, top="journal: {store: 'sqlite:///srv/gv/j.db'}\n")
    assert c.journal.sqlite_path == "/srv/gv/j.db"


@pytest.mark.parametrize(("top", "wanted"), [
    ("journal: {store: 'mysql://x/y'}\n",
     "journal.store: expected sqlite, sqlite:///absolute/path or postgresql://"),
    ("journal: {store: 'sqlite://relative.db'}\n",
     "journal.store: expected sqlite:/// and an absolute path"),
    ("journal: {store: ''}\n", "journal.store: expected sqlite"),
    ("journal: {ttl: 2y}\n", "journal.ttl: expected a duration such as 14d"),
    ("journal: {ttl: 400d}\n", "journal.ttl: expected a duration of at most"),
    ("journal: {payload_cap: 2M}\n", "journal.payload_cap: expected a size of at most 512K"),
    ("journal: {enabled: yes please}\n", "journal.enabled: expected true or false"),
    ("journal: {max_entries: 0}\n", "journal.max_entries: expected a whole number"),
    ("journal: {bogus: 1}\n", "journal.bogus: unknown key"),
    ("journal: sqlite\n", "journal: expected a mapping"),
])
def test_bad_journal_values_name_the_key(tmp_path: Path, top: str, wanted: str) -> None:
    assert wanted in error(tmp_path, top=top)


@pytest.mark.parametrize(("extra", "wanted"), [
    ("        retry: {max_attempts: 0}\n",
     "pools.mail.functions.send_mail.retry.max_attempts: expected a whole number from 1 to "
     "1000, got 0"),
    ("        retry: {backoff: {initial: 10x}}\n",
     "pools.mail.functions.send_mail.retry.backoff.initial: expected a duration"),
    ("        retry: {backoff: {initial: 1h, max: 1m}}\n",
     "pools.mail.functions.send_mail.retry.backoff.max: must be >= backoff.initial (3600s)"),
    ("        retry: {backoff: {multiplier: 0.5}}\n",
     "pools.mail.functions.send_mail.retry.backoff.multiplier: expected a number from 1"),
    ("        retry: {backoff: {jitter: 0.1}}\n",
     "pools.mail.functions.send_mail.retry.backoff.jitter: unknown key"),
    ("        retry: {backoff: 10s}\n",
     "pools.mail.functions.send_mail.retry.backoff: expected a mapping"),
    ("        retry: {outcomes: [error, success]}\n",
     "pools.mail.functions.send_mail.retry.outcomes.1: expected one of error, timeout"),
    ("        retry: {outcomes: []}\n",
     "pools.mail.functions.send_mail.retry.outcomes: expected a non-empty list"),
    ("        retry: {max_attempt: 3}\n",
     "pools.mail.functions.send_mail.retry.max_attempt: unknown key; retry takes"),
    ("        retry: 3\n", "pools.mail.functions.send_mail.retry: expected a mapping"),
    ("        failed_payload: keep\n",
     "pools.mail.functions.send_mail.failed_payload: expected one of store, hash, drop"),
])
def test_bad_function_keys_name_the_key_path(tmp_path: Path, extra: str, wanted: str) -> None:
    assert wanted in error(tmp_path, extra=extra)


def test_function_keys_are_not_pool_or_top_level_keys(tmp_path: Path) -> None:
    assert "retry: unknown key" in error(tmp_path, top="retry: {}\n")
    text = POOL.format(extra="") + "    failed_payload: hash\n"
    with pytest.raises(ConfigError, match="pools.mail.failed_payload: unknown key"):
        parse(text, str(tmp_path / "pools.yaml"), euid=1000)


def test_the_reference_documents_the_new_keys() -> None:
    table = markdown_reference()
    for key in ("journal.enabled", "journal.store", "journal.max_entries", "journal.max_bytes",
                "journal.ttl", "journal.payload_cap", "journal.successes"):
        assert f"| `{key}` | top level |" in table
    assert "| `retry` | function | no retries |" in table
    assert "| `failed_payload` | function | `store` |" in table
