"""What an alert is, as Alertmanager sees it: fingerprints, RFC 3339 times, label
matchers, silences, and the webhook payload (version 4) a notification carries.

Pure data and functions, no clock of its own; gearvisor.policy.alerts (the engine)
re-exports them, so callers import from there.
"""

from __future__ import annotations

import datetime
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from gearvisor.policy.alert_rules import Labels

ZERO_TIME = "0001-01-01T00:00:00Z"  # Alertmanager's endsAt of an alert still firing


def fingerprint(labels: Mapping[str, str]) -> str:
    """16 hex digits identifying a label set: FNV-1a 64 over the sorted names and values,
    each followed by 0xff, as Alertmanager's model.LabelSet.Fingerprint, so the same alert
    has the same id here and in Alertmanager."""
    h = 0xCBF29CE484222325
    for name in sorted(labels):
        for part in (name, labels[name]):
            for byte in _utf8(part) + b"\xff":
                h = ((h ^ byte) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return f"{h:016x}"


def _utf8(text: str) -> bytes:
    """UTF-8 of any str: raw bytes kept as they were decoded (surrogateescape), any other
    lone surrogate as its 3 bytes (surrogatepass) rather than a UnicodeEncodeError."""
    try:
        return text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogatepass")


def rfc3339(t: float | None) -> str:
    """Wall-clock seconds as Alertmanager writes times; None as its zero time."""
    if t is None:
        return ZERO_TIME
    dt = datetime.datetime.fromtimestamp(t, datetime.timezone.utc)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{dt.microsecond // 1000:03d}Z"


@dataclass(frozen=True)
class Matcher:
    """One label matcher of a silence: `name=value`, `!=`, `=~` (regex) or `!~`."""

    name: str
    value: str
    op: str = "="

    def matches(self, labels: Mapping[str, str]) -> bool:
        """Whether `labels` satisfy this matcher (a missing label is the empty string)."""
        have = labels.get(self.name, "")
        if self.op == "=":
            return have == self.value
        if self.op == "!=":
            return have != self.value
        hit = re.fullmatch(self.value, have) is not None
        return hit if self.op == "=~" else not hit

    def __str__(self) -> str:
        return f"{self.name}{self.op}{self.value}"


_MATCHER = re.compile(r"\s*([A-Za-z_][A-Za-z0-9_]*)\s*(=~|!~|!=|=)\s*(.*?)\s*")


def parse_matcher(text: str) -> Matcher:
    """`pool=images`, `severity!=info`, `alertname=~Crash.*`: a Matcher, or ValueError
    saying what is expected (the CLI's `silence add` arguments)."""
    m = _MATCHER.fullmatch(text)
    if not m:
        raise ValueError(f"expected LABEL=VALUE (or !=, =~, !~), got {text!r}")
    name, op, value = m.groups()
    value = value.strip('"')
    if op in ("=~", "!~"):
        try:
            re.compile(value)
        except re.error as e:
            raise ValueError(f"bad regular expression {value!r}: {e}") from None
    return Matcher(name, value, op)


@dataclass
class Silence:
    """Mutes the alerts its matchers all match from starts_at until ends_at."""

    id: str
    matchers: tuple[Matcher, ...]
    starts_at: float
    ends_at: float
    comment: str = ""
    created_by: str = ""

    def active(self, now: float) -> bool:
        """Whether it mutes alerts at `now`."""
        return self.starts_at <= now < self.ends_at

    def matches(self, labels: Mapping[str, str]) -> bool:
        """Whether every matcher matches `labels`."""
        return all(m.matches(labels) for m in self.matchers)

    def state(self, now: float) -> str:
        """"pending", "active" or "expired", as Alertmanager shows it."""
        return "pending" if now < self.starts_at else "active" if now < self.ends_at \
            else "expired"


@dataclass
class Alert:
    """One alert, from the first time its condition held until its resolved notices went."""

    fingerprint: str
    labels: Labels
    annotations: Labels
    state: str  # "pending" | "firing" | "resolved"
    active_at: float  # its startsAt: when the condition began to hold
    last_seen: float  # the last evaluation in which it held
    fired_at: float | None = None
    resolved_at: float | None = None
    cleared_at: float | None = None  # when its condition stopped holding (keep_firing_for)
    acked: bool = False
    muted_by: tuple[str, ...] = ()  # silence ids, "inhibited", "roll"
    groups: list[str] = field(default_factory=list)
    # a resolved alert that came back pending: (startsAt, endsAt) of the episode before,
    # which it returns to if it goes before it fires (its resolved notice is still owed)
    previous: tuple[float, float] | None = None


def webhook_payload(receiver: str, group_key: str, group_labels: Mapping[str, str],
                    alerts: Iterable[Alert], status: str, truncated: int = 0
                    ) -> dict[str, Any]:
    """Alertmanager's webhook payload (version 4) for one group and one receiver: what
    every existing receiver reads, and what the delivery helper sends or translates."""
    items = []
    for a in alerts:
        firing = a.state != "resolved"
        items.append({"status": "firing" if firing else "resolved",
                      "labels": dict(a.labels), "annotations": dict(a.annotations),
                      "startsAt": rfc3339(a.active_at),
                      "endsAt": ZERO_TIME if firing else rfc3339(a.resolved_at),
                      "generatorURL": "", "fingerprint": a.fingerprint})
    common = dict(items[0]["labels"]) if items else {}
    for item in items[1:]:
        common = {k: v for k, v in common.items() if item["labels"].get(k) == v}
    notes = dict(items[0]["annotations"]) if items else {}
    for item in items[1:]:
        notes = {k: v for k, v in notes.items() if item["annotations"].get(k) == v}
    return {"version": "4", "groupKey": group_key, "status": status, "receiver": receiver,
            "groupLabels": dict(group_labels), "commonLabels": common,
            "commonAnnotations": notes, "externalURL": "", "truncatedAlerts": truncated,
            "alerts": items}
