"""The `alerts:` block: the built-in alert rules declared once, and the parsers of the
block's values (rules, group_by, routes, channels).

The built-in rules live here as data (RULES: name, default severity, default `for:`,
thresholds with their parsers and defaults), because the config validates overrides
against them (`alerts.rules.CrashLoop.count`) and the alert engine
(gearvisor.policy.alerts) evaluates them; the config layer is the one both can import.
Every parser raises Invalid with the key path inside the block, so an error reads
`alerts.rules.CrashLoop.count: expected a whole number from 1 to 1000, got 0`.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from gearvisor.config.channels import ChannelConfig
from gearvisor.config.channels import channels as parse_channels
from gearvisor.config.errors import Invalid, key_text
from gearvisor.config.model import AlertRoute, Escalation, RuleConfig
from gearvisor.config.values import (
    DAY,
    HOUR,
    boolean,
    choice,
    duration_between,
    duration_upto,
    float_range,
    int_range,
)

SEVERITIES = ("info", "warning", "critical")
MAX_ROUTES = 100
MAX_ESCALATIONS = 10
MAX_CHANNELS = 100
MAX_MATCHERS = 20
LABEL_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
CHANNEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def _threshold_map(value: Any) -> dict[str, float]:
    """function name -> a duration (SlowJobs' per-function p95 thresholds)."""
    if not isinstance(value, dict) or len(value) > 10_000:
        raise Invalid("expected a mapping of function name -> duration, such as {resize: 2s}")
    out = {}
    for k, v in value.items():
        if not isinstance(k, str) or not k:
            raise Invalid("expected a function name", at=(k,), value=k)
        try:
            out[k] = duration_upto(DAY)(v)
        except Invalid as e:
            raise Invalid(str(e), at=(k,), value=v) from None
    return out


@dataclass(frozen=True)
class Param:
    """One threshold of a rule: its parser, default and meaning."""

    parse: Callable[[Any], Any]
    default: Any
    doc: str


@dataclass(frozen=True)
class RuleSpec:
    """One built-in rule: what it watches, its default severity, `for:` and thresholds."""

    name: str
    severity: str
    doc: str
    for_: float = 0.0
    keep_firing_for: float = 0.0
    params: Mapping[str, Param] = field(default_factory=dict)

    def defaults(self) -> RuleConfig:
        """The rule's settings when the config does not override any."""
        return RuleConfig(self.name, True, self.severity, self.for_, self.keep_firing_for,
                          {k: p.default for k, p in self.params.items()})


# a window or hold of 0 would make its rule never fire
_WINDOW = duration_between(1.0, DAY)
RULES: dict[str, RuleSpec] = {r.name: r for r in (
    RuleSpec("CrashLoop", "critical", "a slot's child crashed `count` times within `window`",
             params={"count": Param(int_range(1, 1000), 5, "crashes"),
                     "window": Param(_WINDOW, 600.0, "over this long")}),
    RuleSpec("BootFailure", "critical", "a pool's child cannot boot (its code does not "
             "import); resolves when a child of the pool gets ready"),
    RuleSpec("Quarantined", "warning", "a child quarantined itself; resolves when its slot "
             "has a ready child again"),
    RuleSpec("CircuitOpen", "critical", "a pool's circuit is open: it takes no jobs"),
    RuleSpec("PoisonJob", "warning", "a job crashed or hung children and was failed",
             params={"hold": Param(_WINDOW, 3600.0, "firing this long after the last one")}),
    RuleSpec("JobHung", "warning", "a hard timeout killed a child",
             params={"hold": Param(_WINDOW, 600.0, "firing this long after the last one")}),
    RuleSpec("ServerDown", "critical", "a job server failed 3 probes in a row "
             "(`probe_interval`)"),
    RuleSpec("ServerRestarted", "info", "a job server's pid changed (`findings."
             "restart_hold`)"),
    RuleSpec("NoWorkers", "critical", "a function has jobs queued and no capable worker "
             "(`findings.no_workers_probes`)"),
    RuleSpec("WorkersMissing", "warning", "a pool has fewer registrations than children "
             "(`findings.registration_grace`)"),
    RuleSpec("FailureRate", "warning", "a function's failed share of jobs over `window`",
             for_=60.0,
             params={"ratio": Param(float_range(0.0, 1.0), 0.05, "above this share"),
                     "window": Param(_WINDOW, 300.0, "over this long"),
                     "min_jobs": Param(int_range(1, 10**9), 20, "with at least this many "
                                       "jobs in the window")}),
    RuleSpec("SlowJobs", "warning", "a function's p95 job time above `p95` (or its own "
             "threshold in `functions`)", for_=300.0,
             params={"p95": Param(duration_upto(DAY), 30.0, "default threshold"),
                     "functions": Param(_threshold_map, {}, "function -> its own "
                                        "threshold")}),
    RuleSpec("Backlog", "warning", "a function's waiting jobs keep growing (`findings."
             "backlog_probes`), or their drain time is above `drain` (when above 0)",
             params={"drain": Param(duration_upto(DAY), 0.0, "0: growth alone fires")}),
    RuleSpec("RollHalted", "warning", "a pool's roll halted: a new child could not get "
             "ready"),
    RuleSpec("FdLimit", "warning", "open files above `ratio` of the limit", for_=60.0,
             params={"ratio": Param(float_range(0.0, 1.0), 0.8, "share of RLIMIT_NOFILE")}),
    RuleSpec("DeadLetters", "warning", "a function's dead letters (failed jobs no longer "
             "retried: `gearvisor dead list`) grew by `count` within `window`",
             params={"count": Param(int_range(1, 10**9), 1, "new dead letters"),
                     "window": Param(_WINDOW, 3600.0, "over this long")}),
    RuleSpec("StoreDown", "critical", "the job journal's store cannot be written; records "
             "wait in the master's bounded buffer", for_=60.0),
)}
RULE_KEYS = {"enabled", "severity", "for", "keep_firing_for"}


def _did_you_mean(word: str, known: list[str]) -> str:
    hint = difflib.get_close_matches(word, known, n=1)
    return f'; did you mean "{hint[0]}"?' if hint else ""


def _mapping(value: Any, what: str) -> dict:
    if not isinstance(value, dict):
        raise Invalid(f"expected a mapping of {what}")
    return value


def _at(e: Invalid, value: Any, *path: Any) -> Invalid:
    """`e` raised inside `value`, found at `path`: the error names the innermost item."""
    return Invalid(str(e), at=path + e.at, value=value if e.value is ... else e.value)


def alert_rules(value: Any) -> dict[str, RuleConfig]:
    """`alerts.rules`: per built-in rule, overrides of its severity, `for`,
    `keep_firing_for`, `enabled` and thresholds. Returns every rule, defaults filled in."""
    raw = _mapping(value, "rule name -> settings, such as {CrashLoop: {count: 3}}")
    out = {name: spec.defaults() for name, spec in RULES.items()}
    for name, settings in raw.items():
        if name not in RULES:
            raise Invalid(f"unknown rule{_did_you_mean(key_text(name), list(RULES))} "
                          f"(rules: {', '.join(RULES)})", at=(name,), value=name)
        spec = RULES[name]
        if not isinstance(settings, dict):
            raise Invalid("expected a mapping such as {severity: warning, for: 1m}",
                          at=(name,), value=settings)
        rule = out[name]
        params = dict(rule.params)
        fields: dict[str, Any] = {}
        for key, v in settings.items():
            try:
                if key == "enabled":
                    fields["enabled"] = boolean(v)
                elif key == "severity":
                    fields["severity"] = choice(*SEVERITIES)(v)
                elif key == "for":
                    fields["for_"] = duration_upto(DAY)(v)
                elif key == "keep_firing_for":
                    fields["keep_firing_for"] = duration_upto(DAY)(v)
                elif key in spec.params:
                    params[key] = spec.params[key].parse(v)
                else:
                    known = sorted(RULE_KEYS | set(spec.params))
                    raise Invalid(f"unknown key{_did_you_mean(key_text(key), known)} "
                                  f"(known: {', '.join(known)})", value=key)
            except Invalid as e:
                raise _at(e, v, name, key) from None
        out[name] = RuleConfig(name, fields.get("enabled", rule.enabled),
                               fields.get("severity", rule.severity),
                               fields.get("for_", rule.for_),
                               fields.get("keep_firing_for", rule.keep_firing_for), params)
    return out


def _rule_text(spec: RuleSpec) -> str:
    """`CrashLoop` (critical; count 5, window 600s): a rule and its defaults, for the README."""
    shown = [spec.severity] + ([f"for {spec.for_:g}s"] if spec.for_ else [])
    for k, p in spec.params.items():
        if isinstance(p.default, dict):
            shown.append(f"{k} {{}}")
        else:
            unit = "s" if p.parse is _WINDOW or k in ("p95", "drain") else ""
            shown.append(f"{k} {p.default:g}{unit}")
    return f"`{spec.name}` ({', '.join(shown)})"


alert_rules.limit = ("Rules and their defaults: "  # type: ignore[attr-defined]
                     + "; ".join(_rule_text(r) for r in RULES.values()) + ".")


def label_names(value: Any) -> tuple[str, ...]:
    """`group_by`: a list of label names (`[alertname, pool]`), or `["..."]` for every
    label (each alert its own group), as in Alertmanager."""
    if not isinstance(value, list) or len(value) > MAX_MATCHERS:
        raise Invalid(f"expected a list of at most {MAX_MATCHERS} label names such as "
                      "[alertname, pool]")
    for i, name in enumerate(value):
        if name != "..." and not (isinstance(name, str) and LABEL_NAME.fullmatch(name)):
            raise Invalid("expected a label name (letters, digits, _)", at=(i,), value=name)
    if "..." in value and len(value) > 1:
        raise Invalid('"..." (group by every label) stands alone')
    return tuple(value)


def _match(value: Any) -> dict[str, str]:
    raw = _mapping(value, "label -> value, such as {severity: critical}")
    if len(raw) > MAX_MATCHERS:
        raise Invalid(f"expected at most {MAX_MATCHERS} labels")
    out = {}
    for k, v in raw.items():
        if not isinstance(k, str) or not LABEL_NAME.fullmatch(k):
            raise Invalid("expected a label name (letters, digits, _)", at=(k,), value=k)
        if isinstance(v, bool) or not isinstance(v, (str, int, float)):
            raise Invalid("expected a label value (a string)", at=(k,), value=v)
        out[k] = str(v)
    return out


def _channel_list(value: Any) -> tuple[str, ...]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not items or len(items) > MAX_CHANNELS:
        raise Invalid("expected a list of channel names such as [ops-mail]")
    for i, name in enumerate(items):
        if not isinstance(name, str) or not CHANNEL_NAME.fullmatch(name):
            raise Invalid("expected a channel name", at=(i,), value=name)
    return tuple(items)


def routes(value: Any) -> tuple[AlertRoute, ...]:
    """`alerts.routes`: a list of {match, notify, escalate, continue, group_by}; an alert
    takes the first route that matches (and the next ones too after `continue: true`)."""
    if not isinstance(value, list) or len(value) > MAX_ROUTES:
        raise Invalid(f"expected a list of at most {MAX_ROUTES} routes such as "
                      "[{match: {severity: critical}, notify: [ops-mail]}]")
    out = []
    for i, raw in enumerate(value):
        if not isinstance(raw, dict):
            raise Invalid("expected a mapping such as {match: {...}, notify: [...]}",
                          at=(i,), value=raw)
        known = ["continue", "escalate", "group_by", "match", "notify"]
        for key in raw:
            if key not in known:
                raise Invalid(f"unknown key{_did_you_mean(key_text(key), known)} "
                              f"(known: {', '.join(known)})", at=(i, key), value=key)
        if "notify" not in raw:
            raise Invalid('missing "notify": the channels this route sends to', at=(i,),
                          value=raw)
        try:
            match = _match(raw.get("match", {}))
        except Invalid as e:
            raise _at(e, raw.get("match"), i, "match") from None
        try:
            notify = _channel_list(raw["notify"])
        except Invalid as e:
            raise _at(e, raw["notify"], i, "notify") from None
        esc_raw = raw.get("escalate", [])
        if not isinstance(esc_raw, list) or len(esc_raw) > MAX_ESCALATIONS:
            raise Invalid(f"expected a list of at most {MAX_ESCALATIONS} steps such as "
                          "[{after: 10m, notify: [sms]}]", at=(i, "escalate"), value=esc_raw)
        steps: list[Escalation] = []
        for j, step in enumerate(esc_raw):
            if not isinstance(step, dict) or set(step) != {"after", "notify"}:
                raise Invalid("expected {after: DURATION, notify: [channels]}",
                              at=(i, "escalate", j), value=step)
            try:
                after = duration_upto(7 * DAY)(step["after"])
            except Invalid as e:
                raise _at(e, step["after"], i, "escalate", j, "after") from None
            if after <= 0 or (steps and after <= steps[-1].after):
                raise Invalid("expected a duration > 0, each step later than the one "
                              "before", at=(i, "escalate", j, "after"), value=step["after"])
            try:
                steps.append(Escalation(after, _channel_list(step["notify"])))
            except Invalid as e:
                raise _at(e, step["notify"], i, "escalate", j, "notify") from None
        cont = raw.get("continue", False)
        if not isinstance(cont, bool):
            raise Invalid("expected true or false", at=(i, "continue"), value=cont)
        group_by = None
        if "group_by" in raw:
            try:
                group_by = label_names(raw["group_by"])
            except Invalid as e:
                raise _at(e, raw["group_by"], i, "group_by") from None
        out.append(AlertRoute(match, notify, tuple(steps), cont, group_by))
    return tuple(out)


def channels(value: Any) -> dict[str, ChannelConfig]:
    """`alerts.channels`: channel name -> its validated settings (config/channels.py)."""
    return parse_channels(value)


ALERT_DURATION = duration_upto(DAY)
GROUP_WAIT_MAX = HOUR
