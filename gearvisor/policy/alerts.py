"""The alert engine: rules -> alerts -> groups -> notifications, with Alertmanager's
semantics, plus the two things it lacks (escalation over time, resolved notices for
silenced alerts). Pure: no I/O, no clock of its own; every call takes `now`.

`now` is wall-clock seconds (time.time()), not monotonic: an alert's startsAt, a silence's
end and the time a group was last notified must mean the same after a master restart (the
state is kept in SQLite) and are shown as RFC 3339 times. A clock step only moves these
deadlines; nothing here loops on time, so it can never spin.

  engine = AlertEngine(config.alerts, host="web1")
  notes = engine.observe(ChildExit("images", 3, "crashed"), now)   # a fact in, notices out
  notes += engine.tick(now)                                         # at engine.next_due()

The lifecycle of one alert (identified by its fingerprint, a hash of its labels):
  inactive -> pending      its rule's condition holds (RuleBook.conditions)
  pending  -> firing       it held for the rule's `for:` (0: at once)
  pending  -> inactive     it stopped holding first (never notified)
  firing   -> resolved     it stopped holding `keep_firing_for` ago
A firing alert joins one group per route it matches (`alerts.routes`, first match, more
after `continue`); a group is the route plus the values of its `group_by` labels. A group
is notified `group_wait` after it was created, then checked every `group_interval`: it
sends when an alert joined or resolved, else repeats every `repeat_interval` while any
fires. A storm (50 slots crash at once) is one group, so one notification per channel.

Muted (silenced, inhibited, or its pool rolling) alerts are left out of firing notices;
but an alert that was notified is owed a resolved notice on every channel that got it,
and gets it, muted or not. Escalation: a route's `escalate` steps notify more channels
once an alert has fired unacknowledged for `after`; ack(fingerprint) stops that.

Each notification is one group for one channel, in Alertmanager's webhook format
(webhook_payload), wrapped as {"channel": name, "payload": {...}}.

The modules: alert_rules (the facts and the built-in rules), alert_model (fingerprints,
matchers, silences, the webhook payload), this one (the engine).
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from gearvisor.config.model import AlertRoute, AlertsConfig
from gearvisor.policy.alert_model import (
    ZERO_TIME,
    Alert,
    Matcher,
    Silence,
    fingerprint,
    parse_matcher,
    rfc3339,
    webhook_payload,
)
from gearvisor.policy.alert_rules import Condition, Fact, Labels, RuleBook

__all__ = ["MAX_ALERTS", "ZERO_TIME", "Alert", "AlertEngine", "Group", "Matcher",
           "Notification", "Silence", "fingerprint", "parse_matcher", "rfc3339",
           "webhook_payload"]

MAX_ALERTS = 10_000  # alerts held (pending, firing, resolved-but-owed); more are dropped
MAX_SILENCES = 1_000
MAX_PAYLOAD_ALERTS = 1_000  # alerts listed in one notification; the rest are counted
SILENCE_RETENTION = 5 * 86400.0  # expired silences are listed this long, as Alertmanager
RECHECK = 5.0  # while anything may change with time alone, tick at least this often
# ServerDown on a server makes these alerts about the same server noise
INHIBITS = {"ServerDown": ("NoWorkers", "WorkersMissing", "Backlog")}
# alerts of a pool that its own roll causes on purpose: muted while the roll runs
ROLL_MUTED = frozenset({"CrashLoop", "BootFailure", "Quarantined", "CircuitOpen", "JobHung",
                        "WorkersMissing"})

Notification = dict[str, Any]  # {"channel": name, "payload": webhook payload}


@dataclass
class ChannelState:
    """What one channel (of one escalation step) of a group was last sent."""

    last_firing: frozenset[str] = frozenset()
    owed: set[str] = field(default_factory=set)  # notified firing, no resolved notice yet
    sent_at: float | None = None


Step = tuple[int, float, tuple[str, ...]]  # (0: the route's own | n: escalation n, after, channels)


@dataclass
class Group:
    """Alerts of one route with the same values of its group_by labels.

    A group keeps the channels of its route as they were when it was made, so a reload that
    changes the route still sends the resolved notices owed on the old channels: the group
    is then retired (it sends nothing firing, only those notices) and its firing alerts join
    the groups of the new routes."""

    key: str
    route: int
    labels: Labels
    created: float
    next_flush: float
    steps: list[Step] = field(default_factory=list)
    alerts: list[str] = field(default_factory=list)  # fingerprints, in order of joining
    channels: dict[str, ChannelState] = field(default_factory=dict)  # "step:channel"
    retired: bool = False

def _route_matches(route: AlertRoute, labels: Mapping[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in route.match.items())


class AlertEngine:
    """Rules, alerts, groups, silences and acks; facts in, notifications out."""

    def __init__(self, config: AlertsConfig, host: str) -> None:
        self.config = config
        self.host = host
        self.rules = RuleBook(config.rules, host)
        self.alerts: dict[str, Alert] = {}
        self.groups: dict[str, Group] = {}
        self.silences: dict[str, Silence] = {}
        self.dropped = 0  # alerts not held because MAX_ALERTS were
        self._silence_seq = 0
        self._retired_seq = 0
        self._last_tick: float | None = None
        self.hold_until = 0.0  # no firing alert resolves before this (hold())

    # -- inputs ---------------------------------------------------------------------------

    def reconfigure(self, config: AlertsConfig) -> None:
        """A reload: new rules, grouping and routes. Alerts, silences and acks are kept. A
        group whose route or grouping changed is retired: it still sends the resolved
        notices it owes, and its firing alerts join the new routes' groups at the next
        tick (a new group, so they are notified there after its group_wait)."""
        self.config = config
        self.rules.reconfigure(config.rules)
        self._retire_changed()

    def _retire_changed(self) -> None:
        for g in list(self.groups.values()):
            if g.retired:
                continue
            same = False
            if g.route < len(self.config.routes):
                route = self.config.routes[g.route]
                member = next((self.alerts[fp] for fp in g.alerts if fp in self.alerts), None)
                same = member is not None and \
                    self._group_key(g.route, route, member.labels)[0] == g.key and \
                    self._route_steps(route) == g.steps
            if not same:
                g.retired = True
                # it keeps its groupKey in what it sends, but gives its place to the
                # group of the new route that may have the same key
                self._retired_seq += 1
                old = g.key
                del self.groups[old]
                g.key = f"{old}~retired{self._retired_seq}"
                self.groups[g.key] = g
                for fp in g.alerts:
                    if fp in self.alerts and old in self.alerts[fp].groups:
                        self.alerts[fp].groups.remove(old)

    def forget(self, pools: set[str], now: float) -> list[Notification]:
        """Pools a reload removed: their facts are dropped, so their alerts resolve (and
        the notified ones get their resolved notices in due course)."""
        self.rules.forget(pools)
        return self.tick(now)

    def observe(self, fact: Fact, now: float) -> list[Notification]:
        """Take one fact (gearvisor.policy.alert_rules) and return what is due now."""
        self.rules.observe(fact, now)
        return self.tick(now)

    def observe_all(self, facts: Iterable[Fact], now: float) -> list[Notification]:
        """Take many facts of one moment (the events of one loop iteration) and evaluate
        once: a storm of exits costs one tick, not one per exit."""
        for fact in facts:
            self.rules.observe(fact, now)
        return self.tick(now)

    def ack(self, alert_id: str, now: float) -> bool:
        """Acknowledge an alert (its fingerprint, or a unique prefix of it): its escalation
        stops; it still repeats and resolves on the channels it was sent to. False if no
        such alert fires."""
        del now  # acks last as long as the alert; kept for a uniform API
        hits = [a for fp, a in self.alerts.items() if fp.startswith(alert_id)
                and a.state != "resolved"] if alert_id else []
        if len(hits) != 1:
            return False
        hits[0].acked = True
        return True

    def add_silence(self, matchers: Iterable[Matcher], starts_at: float, ends_at: float,
                    comment: str = "", created_by: str = "") -> Silence:
        """A new silence; ValueError if it matches nothing certain, ends before it starts,
        or MAX_SILENCES are held."""
        ms = tuple(matchers)
        for m in ms:
            if m.op not in ("=", "!=", "=~", "!~"):
                raise ValueError(f"unknown matcher operator {m.op!r} in {m}")
            if m.op in ("=~", "!~"):
                try:
                    re.compile(m.value)  # a bad one would raise in every tick
                except re.error as e:
                    raise ValueError(f"bad regular expression {m.value!r}: {e}") from None
        if not ms or not any(m.op == "=" and m.value for m in ms):
            raise ValueError("a silence needs at least one LABEL=VALUE matcher")
        if ends_at <= starts_at:
            raise ValueError("a silence must end after it starts")
        if len(self.silences) >= MAX_SILENCES:
            raise ValueError(f"{MAX_SILENCES} silences are held; expire some first")
        self._silence_seq += 1
        digest = hashlib.sha256(f"{self._silence_seq}|{starts_at}|{ends_at}|{comment}|"
                                f"{','.join(map(str, ms))}".encode()).hexdigest()[:16]
        s = Silence(digest, ms, starts_at, ends_at, comment[:1000], created_by[:200])
        self.silences[s.id] = s
        return s

    def expire_silence(self, silence_id: str, now: float) -> bool:
        """End a silence now; False if there is no such silence that is not over."""
        s = self.silences.get(silence_id)
        if s is None or s.ends_at <= now:
            return False
        s.ends_at = max(now, s.starts_at)
        if s.ends_at <= s.starts_at:  # never started: it is gone
            del self.silences[silence_id]
        return True

    def list_silences(self, now: float) -> list[dict[str, Any]]:
        """Every silence held, with its state, for `gearvisor silence list`."""
        return [{"id": s.id, "matchers": [str(m) for m in s.matchers],
                 "startsAt": rfc3339(s.starts_at), "endsAt": rfc3339(s.ends_at),
                 "comment": s.comment, "createdBy": s.created_by, "state": s.state(now)}
                for s in sorted(self.silences.values(), key=lambda s: s.starts_at)]

    def list_alerts(self, now: float) -> list[dict[str, Any]]:
        """Pending and firing alerts with their age, for `gearvisor alerts`."""
        return [{"fingerprint": a.fingerprint, "labels": dict(a.labels),
                 "annotations": dict(a.annotations), "state": a.state,
                 "age": round(now - a.active_at, 3), "startsAt": rfc3339(a.active_at),
                 "acked": a.acked, "mutedBy": list(a.muted_by)}
                for a in sorted(self.alerts.values(), key=lambda a: a.active_at)
                if a.state != "resolved"]

    # -- evaluation -----------------------------------------------------------------------

    def tick(self, now: float) -> list[Notification]:
        """Evaluate the rules at `now`, move alerts through their lifecycle, and return the
        notifications due now."""
        self._last_tick = now
        if not self.config.enabled:
            return self._resolve_all(now)
        self._evaluate(self.rules.conditions(now), now)
        self._mute(now)
        self._group(now)
        out: list[Notification] = []
        for group in list(self.groups.values()):
            scheduled = now >= group.next_flush
            if scheduled:
                # the next check on the group's own interval grid, after now: ticks that
                # came late (or a clock step) cause no burst of catch-up checks
                interval = self.config.group_interval
                missed = math.floor((now - group.next_flush) / interval) + 1
                group.next_flush += max(1, missed) * interval
            out += self._flush(group, now, scheduled)
        self._collect(now)
        return out

    def _resolve_all(self, now: float) -> list[Notification]:
        """Alerting turned off: what was notified gets its resolved notice."""
        for a in self.alerts.values():
            if a.state != "resolved":
                a.state, a.resolved_at = "resolved", now
        out: list[Notification] = []
        for group in list(self.groups.values()):
            out += self._flush(group, now, True)
        self._collect(now)
        return out

    def _evaluate(self, conditions: list[Condition], now: float) -> None:
        seen = set()
        for c in conditions:
            fp = fingerprint(c.labels)
            seen.add(fp)
            a = self.alerts.get(fp)
            if a is None or a.state == "resolved":
                if a is None and len(self.alerts) >= MAX_ALERTS:
                    self.dropped += 1
                    continue
                # inactive -> pending. A resolved alert still owed its resolved notice
                # comes back as a new episode that remembers the old one: should it go
                # before it fires, it is resolved again as it was, and the notice goes.
                old = (a.active_at, a.resolved_at or now) if a is not None else None
                a = Alert(fp, dict(c.labels), dict(c.annotations), "pending", now, now,
                          groups=a.groups if a is not None else [], previous=old)
                self.alerts[fp] = a
            a.last_seen, a.cleared_at = now, None
            a.annotations = dict(c.annotations)
            rule = self.rules.rules[c.labels["alertname"]]
            if a.state == "pending" and now - a.active_at >= rule.for_:
                a.state, a.fired_at, a.previous = "firing", now, None  # pending -> firing
        for fp, a in list(self.alerts.items()):
            if fp in seen or a.state == "resolved":
                continue
            if a.state == "pending":
                if a.previous is None:
                    del self.alerts[fp]  # pending -> inactive: never notified
                else:  # pending -> resolved: the episode before, as it ended
                    a.state = "resolved"
                    a.active_at, a.resolved_at = a.previous
                    a.previous = None
                continue
            keep = self.rules.rules[a.labels["alertname"]].keep_firing_for
            if a.cleared_at is None:
                a.cleared_at = now
            if now - a.cleared_at >= keep and now >= self.hold_until:
                a.state, a.resolved_at = "resolved", now  # firing -> resolved

    def _mute(self, now: float) -> None:
        down = {a.labels.get("server") for a in self.alerts.values()
                if a.state == "firing" and a.labels["alertname"] == "ServerDown"}
        inhibited = {name for names in INHIBITS.values() for name in names}
        rolling = self.rules.rolling()
        for sid in [sid for sid, s in self.silences.items()
                    if now - s.ends_at > SILENCE_RETENTION]:
            del self.silences[sid]
        live = [s for s in self.silences.values() if s.active(now)]
        for a in self.alerts.values():
            why = [s.id for s in live if s.matches(a.labels)]
            if a.labels["alertname"] in inhibited and a.labels.get("server") in down:
                why.append("inhibited")
            if a.labels["alertname"] in ROLL_MUTED and a.labels.get("pool") in rolling:
                why.append("roll")
            a.muted_by = tuple(why)

    def _group_key(self, index: int, route: AlertRoute, labels: Labels) -> tuple[str, Labels]:
        by = route.group_by if route.group_by is not None else self.config.group_by
        glabels = dict(labels) if by == ("...",) else {k: labels[k] for k in by if k in labels}
        match = ", ".join(f'{k}="{v}"' for k, v in sorted(route.match.items()))
        grouped = ", ".join(f'{k}="{v}"' for k, v in sorted(glabels.items()))
        return f"{{}}/{index}{{{match}}}:{{{grouped}}}", glabels

    def _group(self, now: float) -> None:
        """Every firing alert that is in no group yet joins the groups of its routes."""
        for a in self.alerts.values():
            if a.state != "firing" or a.groups:
                continue
            for i, route in enumerate(self.config.routes):
                if not _route_matches(route, a.labels):
                    continue
                key, glabels = self._group_key(i, route, a.labels)
                g = self.groups.get(key)
                if g is None:
                    g = self.groups[key] = Group(key, i, glabels, now,
                                                 now + self.config.group_wait,
                                                 self._route_steps(route))
                g.alerts.append(a.fingerprint)  # it was in no group, so not in this one
                a.groups.append(key)
                if not route.continue_:
                    break

    @staticmethod
    def _route_steps(route: AlertRoute) -> list[Step]:
        return [(0, 0.0, route.notify)] + [(i + 1, s.after, s.notify)
                                           for i, s in enumerate(route.escalate)]

    def _flush(self, group: Group, now: float, scheduled: bool) -> list[Notification]:
        """The notifications of one group: step 0 (the route's channels) at its scheduled
        checks; escalation steps also as soon as an alert becomes due for them."""
        out: list[Notification] = []
        members = [self.alerts[fp] for fp in group.alerts if fp in self.alerts]
        for step, after, names in group.steps:
            eligible = frozenset(
                a.fingerprint for a in members
                if a.state == "firing" and not a.muted_by and a.fired_at is not None
                and not group.retired
                and (step == 0 or (not a.acked and now - a.fired_at >= after)))
            for name in names:
                st = group.channels.setdefault(f"{step}:{name}", ChannelState())
                new = eligible - st.last_firing
                if not scheduled and (step == 0 or not new):
                    continue
                resolved = {fp for fp in st.owed
                            if fp not in self.alerts or self.alerts[fp].state == "resolved"}
                repeat = bool(eligible) and st.sent_at is not None and \
                    now - st.sent_at >= self.config.repeat_interval
                gone = {fp for fp in resolved if fp not in self.alerts}
                if gone:  # nothing left to say what it was (a restore that dropped it)
                    st.owed -= gone
                    resolved -= gone
                if not (new or resolved or repeat):
                    st.last_firing = eligible & st.last_firing  # muted/acked ones left
                    continue
                alerts = [self.alerts[fp] for fp in group.alerts if fp in eligible] + \
                    [self.alerts[fp] for fp in group.alerts if fp in resolved]
                status = "firing" if eligible else "resolved"
                # a storm of thousands stays one bounded message (Alertmanager's max_alerts)
                out.append({"channel": name, "payload": webhook_payload(
                    name, group.key.split("~retired")[0], group.labels,
                    alerts[:MAX_PAYLOAD_ALERTS], status,
                    truncated=max(0, len(alerts) - MAX_PAYLOAD_ALERTS))})
                st.owed = (st.owed | eligible) - resolved
                st.last_firing, st.sent_at = eligible, now
        return out

    def _collect(self, now: float) -> None:
        """Forget resolved alerts no channel owes a notice, and groups left empty."""
        del now
        owed = {fp for g in self.groups.values() for st in g.channels.values()
                for fp in st.owed}
        for g in list(self.groups.values()):
            g_owed = {fp for st in g.channels.values() for fp in st.owed}
            g.alerts = [fp for fp in g.alerts if fp in self.alerts and (
                fp in g_owed or (self.alerts[fp].state != "resolved" and not g.retired))]
            if not g.alerts:
                del self.groups[g.key]
        for fp, a in list(self.alerts.items()):
            if a.state == "resolved" and fp not in owed:
                del self.alerts[fp]

    def next_due(self) -> float | None:
        """When tick() should run next (wall-clock seconds), or None if nothing will
        change until a new fact comes."""
        times = [g.next_flush for g in self.groups.values()]
        for a in self.alerts.values():
            rule = self.rules.rules[a.labels["alertname"]]
            if a.state == "pending":
                times.append(a.active_at + rule.for_)
            if a.state == "firing" and a.cleared_at is not None:
                times.append(max(a.cleared_at + rule.keep_firing_for, self.hold_until))
            if a.state == "firing" and not a.acked and a.fired_at is not None:
                for g in a.groups:
                    group = self.groups.get(g)
                    for _, after, _ in group.steps[1:] if group else ():
                        if a.fired_at + after > (self._last_tick or 0):
                            times.append(a.fired_at + after)
        for s in self.silences.values():
            times += [t for t in (s.starts_at, s.ends_at) if t > (self._last_tick or 0)]
        if self._last_tick is not None and (self.alerts or self.rules.has_timers()):
            times.append(self._last_tick + RECHECK)
        return min(times) if times else None

    # -- state ----------------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """Everything that must survive a master restart, as plain data (JSON-able)."""
        return {
            "version": 1,
            "alerts": [{"fingerprint": a.fingerprint, "labels": a.labels,
                        "annotations": a.annotations, "state": a.state,
                        "active_at": a.active_at, "last_seen": a.last_seen,
                        "fired_at": a.fired_at, "resolved_at": a.resolved_at,
                        "cleared_at": a.cleared_at,
                        "previous": None if a.previous is None else list(a.previous),
                        "acked": a.acked, "groups": list(a.groups)}
                       for a in self.alerts.values()],
            "groups": [{"key": g.key, "route": g.route, "labels": g.labels,
                        "created": g.created, "next_flush": g.next_flush,
                        "steps": [[n, after, list(names)] for n, after, names in g.steps],
                        "retired": g.retired, "alerts": list(g.alerts),
                        "channels": {k: {"last_firing": sorted(st.last_firing),
                                         "owed": sorted(st.owed), "sent_at": st.sent_at}
                                     for k, st in g.channels.items()}}
                       for g in self.groups.values()],
            "silences": [{"id": s.id, "matchers": [[m.name, m.op, m.value]
                                                   for m in s.matchers],
                          "starts_at": s.starts_at, "ends_at": s.ends_at,
                          "comment": s.comment, "created_by": s.created_by}
                         for s in self.silences.values()],
            "silence_seq": self._silence_seq,
            "retired_seq": self._retired_seq,
            "rules": self.rules.snapshot(),
        }

    def hold(self, until: float) -> None:
        """Resolve no firing alert before `until` (wall clock): after a restart the facts
        that were not saved (the probe's findings, job counts) take a while to come back,
        and an alert that still holds must not be resolved and paged again meanwhile."""
        self.hold_until = until

    def restore(self, data: Mapping[str, Any]) -> None:
        """Take back a snapshot() (from SQLite after a restart): the same alerts, groups,
        acks and silences, so nothing is paged twice and no silence is forgotten.

        All or nothing: on data that is not a snapshot of this version (a corrupt or
        hand-edited row) it raises ValueError saying why and the engine is left as it was;
        the caller logs it and starts afresh."""
        try:
            self._restore(data)
        except ValueError:
            raise
        except Exception as e:  # any shape of bad data: a list for a mapping, a None ...
            raise ValueError(f"not an alert state snapshot: {type(e).__name__}: {e}") \
                from None

    def _restore(self, data: Mapping[str, Any]) -> None:
        if not isinstance(data, Mapping) or data.get("version") != 1:
            raise ValueError("unknown alert state version "
                             f"{data.get('version') if isinstance(data, Mapping) else data!r}")
        alerts = {}
        for d in list(data["alerts"])[:MAX_ALERTS]:
            labels = {str(k): str(v) for k, v in d["labels"].items()}
            if labels.get("alertname") not in self.rules.rules:
                continue  # a rule this version does not have
            alerts[d["fingerprint"]] = Alert(
                str(d["fingerprint"]), labels, {str(k): str(v) for k, v in
                                                d["annotations"].items()},
                str(d["state"]), float(d["active_at"]), float(d["last_seen"]),
                None if d["fired_at"] is None else float(d["fired_at"]),
                None if d["resolved_at"] is None else float(d["resolved_at"]),
                None if d.get("cleared_at") is None else float(d["cleared_at"]),
                bool(d["acked"]), (), [str(g) for g in d["groups"]],
                None if d.get("previous") is None else (float(d["previous"][0]),
                                                        float(d["previous"][1])))
        groups = {}
        for d in list(data["groups"])[:MAX_ALERTS]:
            g = Group(str(d["key"]), int(d["route"]), {str(k): str(v) for k, v in
                                                      d["labels"].items()},
                      float(d["created"]), float(d["next_flush"]),
                      [(int(n), float(after), tuple(map(str, names)))
                       for n, after, names in d["steps"]],
                      [str(fp) for fp in d["alerts"]], retired=bool(d["retired"]))
            for k, st in d["channels"].items():
                g.channels[str(k)] = ChannelState(
                    frozenset(map(str, st["last_firing"])), set(map(str, st["owed"])),
                    None if st["sent_at"] is None else float(st["sent_at"]))
            groups[g.key] = g
        silences = {}
        for d in list(data["silences"])[:MAX_SILENCES]:
            for _, op, value in d["matchers"]:
                if op not in ("=", "!=", "=~", "!~"):
                    raise ValueError(f"unknown matcher operator {op!r}")
                if op in ("=~", "!~"):
                    try:
                        re.compile(str(value))  # a bad one would raise in every tick
                    except re.error as e:
                        raise ValueError(f"silence {d.get('id')!r}: bad regular expression "
                                         f"{value!r}: {e}") from None
            s = Silence(str(d["id"]), tuple(Matcher(str(n), str(v), str(op))
                                            for n, op, v in d["matchers"]),
                        float(d["starts_at"]), float(d["ends_at"]), str(d["comment"]),
                        str(d["created_by"]))
            silences[s.id] = s
        rules = RuleBook(self.config.rules, self.host)
        rules.restore(data.get("rules", {}))
        self.rules, self.alerts, self.groups, self.silences = rules, alerts, groups, silences
        self._silence_seq = int(data.get("silence_seq", 0))
        self._retired_seq = int(data.get("retired_seq", 0))
        for a in self.alerts.values():
            a.groups = [k for k in a.groups if k in self.groups]
        # the config may have changed while the master was down
        self._retire_changed()
