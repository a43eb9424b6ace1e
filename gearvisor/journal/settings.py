"""What the store and its helper need from the config (the config part builds these)."""

from __future__ import annotations

from dataclasses import dataclass

from gearvisor.config.model import Server

MiB = 1 << 20


@dataclass(frozen=True)
class Caps:
    """How much the store keeps: rows of outcomes (and of failures) at most `max_entries`,
    payload and text bytes at most `max_bytes`, nothing older than `ttl` seconds, and at
    most `payload_cap` bytes of one failed job's payload."""

    max_entries: int = 1_000_000
    max_bytes: int = 512 * MiB
    ttl: float = 14 * 86400.0
    payload_cap: int = 64 * 1024


@dataclass(frozen=True)
class StoreSettings:
    """The store helper's settings: where the store is (`url`: "sqlite", "sqlite:///abs/path"
    or "postgresql://..."; `state_dir` holds the default SQLite file), its caps, the job
    servers due retries are submitted to, this host's name (whose stale retry claims it
    takes back at start), and `run`, the master run whose sequence numbers the helper's
    input carries (empty: the parent process's pid and start time)."""

    url: str = "sqlite"
    state_dir: str = "/var/lib/gearvisor"
    caps: Caps = Caps()
    servers: tuple[Server, ...] = ()
    host: str = ""
    run: str = ""
