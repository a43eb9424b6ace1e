"""The alert engine (gearvisor.policy.alerts) and its rules, with an injected clock: the
lifecycle, grouping and its intervals, routing, escalation, acks, silences, inhibition,
keep_firing_for, resolved notices for muted alerts, a storm, every rule once; and the
`alerts:` config block's errors."""

from __future__ import annotations

import atexit
import dataclasses
import json
import math
import os
import shutil
import tempfile

import hypothesis.configuration
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gearvisor.config import ConfigError, parse
from gearvisor.config.alerts import RULES
from gearvisor.config.model import AlertRoute, AlertsConfig, Escalation
from gearvisor.policy.alert_rules import (
    BacklogDrain,
    ChildExit,
    ChildReady,
    CircuitFact,
    DeadLetterCount,
    FdUsage,
    FindingDown,
    FindingUp,
    HardTimeout,
    JobTick,
    PoisonFact,
    QuarantineFact,
    RollFact,
    StoreFact,
)
from gearvisor.policy.alerts import AlertEngine, Matcher, fingerprint, parse_matcher

MAIL = "{type: email, to: [ops@example.com], from: gv@example.com, smtp: 127.0.0.1}"
T0 = 1_800_000_000.0  # wall-clock seconds, as the engine takes them

# Hypothesis would cache what it learns under .hypothesis in the repository: send it to a
# temp dir removed when the run ends (as tests/test_config_fuzz.py does), keep no example
# database, and draw the same examples on every run, so a failure reproduces.
if not os.environ.get("HYPOTHESIS_STORAGE_DIRECTORY"):
    _HOME = tempfile.mkdtemp(prefix="gearvisor-hypothesis-")
    atexit.register(shutil.rmtree, _HOME, ignore_errors=True)
    hypothesis.configuration.set_hypothesis_home_dir(_HOME)
PROPERTY = settings(max_examples=150, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow])


def config(**kw: object) -> AlertsConfig:
    """Every rule at its defaults with `for: 0`, one route to `mail`, group_wait 30s."""
    rules = {n: dataclasses.replace(s.defaults(), for_=0.0) for n, s in RULES.items()}
    base = {"rules": rules, "routes": (AlertRoute({}, ("mail",)),),
            "channels": {"mail": {"type": "webhook"}}}
    base.update(kw)
    return AlertsConfig(**base)  # type: ignore[arg-type]


def crash(engine: AlertEngine, now: float, pool: str = "images", slot: int = 0,
          times: int = 5) -> list[dict]:
    out: list[dict] = []
    for _ in range(times):
        out += engine.observe(ChildExit(pool, slot, "crashed"), now)
    return out


def names(notes: list[dict]) -> list[tuple[str, str, list[str]]]:
    """(channel, status, [alertname/status of each alert]) of each notification."""
    return [(n["channel"], n["payload"]["status"],
             [f'{a["labels"]["alertname"]}/{a["status"]}' for a in n["payload"]["alerts"]])
            for n in notes]


def test_fingerprint_of_a_label_with_a_lone_surrogate_does_not_raise() -> None:
    """A name from a worker's JSON may hold one ("\\ud800"): every later evaluation
    computed this and raised, so no alert of the fleet fired again."""
    assert fingerprint({"function": "x\ud800"}) != fingerprint({"function": "x"})
    assert fingerprint({"path": "a\udcff"}) == fingerprint({"path": "a\udcff"})


def test_fingerprint_is_alertmanagers_fnv64a() -> None:
    # Alertmanager: model.LabelSet{}.Fingerprint() of the empty set is the FNV-64a offset
    assert fingerprint({}) == "cbf29ce484222325"
    assert fingerprint({"a": "b", "c": "d"}) == fingerprint({"c": "d", "a": "b"})
    assert fingerprint({"a": "b"}) != fingerprint({"a": "c"})
    assert len(fingerprint({"alertname": "X"})) == 16


def test_group_wait_then_one_notification_then_resolved() -> None:
    e = AlertEngine(config(), host="h1")
    assert crash(e, T0) == []  # fires at once (for: 0) but the group waits
    assert e.list_alerts(T0)[0]["state"] == "firing"
    assert e.next_due() == pytest.approx(T0 + 30)
    assert e.tick(T0 + 29) == []
    notes = e.tick(T0 + 30)
    assert names(notes) == [("mail", "firing", ["CrashLoop/firing"])]
    payload = notes[0]["payload"]
    assert payload["version"] == "4" and payload["receiver"] == "mail"
    labels = payload["alerts"][0]["labels"]
    assert labels == {"alertname": "CrashLoop", "severity": "critical", "host": "h1",
                      "pool": "images", "slot": "0"}
    assert payload["groupLabels"] == {"alertname": "CrashLoop", "pool": "images"}
    assert payload["alerts"][0]["endsAt"] == "0001-01-01T00:00:00Z"
    json.dumps(notes)  # plain data, one JSON line each
    # nothing new: no repeat before group_interval nor before repeat_interval
    assert e.tick(T0 + 30 + 300) == []
    # the crash window (10m) passes: resolved at T0+600, notified at the next
    # group_interval check (T0+630)
    assert e.tick(T0 + 601) == []
    assert e.list_alerts(T0 + 601) == []
    notes = e.tick(T0 + 630)
    assert names(notes) == [("mail", "resolved", ["CrashLoop/resolved"])]
    assert notes[0]["payload"]["alerts"][0]["endsAt"] != "0001-01-01T00:00:00Z"
    assert e.alerts == {} and e.groups == {}


def test_repeat_interval() -> None:
    e = AlertEngine(config(rules={**config().rules, "CircuitOpen": dataclasses.replace(
        RULES["CircuitOpen"].defaults(), for_=0.0)}), host="h")
    e.observe(CircuitFact("images", True), T0)
    assert len(e.tick(T0 + 30)) == 1
    t = T0 + 30
    sent = []
    while t < T0 + 30 + 4 * 3600 + 301:
        t += 300
        sent += [(t, n) for n in e.tick(t)]
    assert len(sent) == 1  # once after repeat_interval (4h), at a group_interval check
    assert sent[0][0] - (T0 + 30) >= 4 * 3600


def test_a_storm_observed_at_once_is_one_tick_and_the_same_notices() -> None:
    e = AlertEngine(config(), host="h")
    assert e.observe_all([ChildExit("images", slot, "crashed") for slot in range(50)
                          for _ in range(5)], T0) == []
    notes = e.tick(T0 + 30)
    assert len(notes) == 1 and len(notes[0]["payload"]["alerts"]) == 50


def test_storm_gives_one_notification_per_group() -> None:
    e = AlertEngine(config(), host="h")
    for slot in range(50):
        crash(e, T0, pool="images", slot=slot)
    for slot in range(3):
        crash(e, T0 + 1, pool="pdf", slot=slot)
    notes = e.tick(T0 + 31)
    assert sorted((n["payload"]["groupLabels"]["pool"], len(n["payload"]["alerts"]))
                  for n in notes) == [("images", 50), ("pdf", 3)]


def test_new_alert_in_a_notified_group_waits_for_group_interval() -> None:
    e = AlertEngine(config(), host="h")
    crash(e, T0, slot=0)
    assert len(e.tick(T0 + 30)) == 1
    crash(e, T0 + 40, slot=1)
    assert e.tick(T0 + 100) == []
    notes = e.tick(T0 + 330)
    assert names(notes) == [("mail", "firing", ["CrashLoop/firing", "CrashLoop/firing"])]


def test_pending_for_and_keep_firing_for() -> None:
    rules = dict(config().rules)
    rules["CircuitOpen"] = dataclasses.replace(rules["CircuitOpen"], for_=60.0,
                                               keep_firing_for=120.0)
    e = AlertEngine(config(rules=rules, group_wait=0.0), host="h")
    e.observe(CircuitFact("p", True), T0)
    assert e.list_alerts(T0)[0]["state"] == "pending"
    e.observe(CircuitFact("p", False), T0 + 10)  # pending -> inactive: never notified
    assert e.alerts == {}
    e.observe(CircuitFact("p", True), T0 + 20)
    assert e.tick(T0 + 79) == []
    assert names(e.tick(T0 + 80)) == [("mail", "firing", ["CircuitOpen/firing"])]
    e.observe(CircuitFact("p", False), T0 + 100)  # flaps off ...
    e.tick(T0 + 150)
    e.observe(CircuitFact("p", True), T0 + 160)  # ... and on within keep_firing_for
    e.observe(CircuitFact("p", False), T0 + 170)
    assert e.list_alerts(T0 + 280)[0]["state"] == "firing"
    e.tick(T0 + 289)
    assert e.list_alerts(T0 + 289) != []  # 119s since last seen
    e.tick(T0 + 290)
    assert e.list_alerts(T0 + 290) == []
    assert names(e.tick(T0 + 380)) == [("mail", "resolved", ["CircuitOpen/resolved"])]


def escalating() -> AlertsConfig:
    route = AlertRoute({"severity": "critical"}, ("mail",),
                       (Escalation(600.0, ("sms",)), Escalation(1800.0, ("phone",))))
    return config(routes=(route,), channels={c: {"type": "exec"} for c in
                                             ("mail", "sms", "phone")})


def test_escalation_over_time_and_resolved_on_every_channel() -> None:
    e = AlertEngine(escalating(), host="h")
    e.observe(CircuitFact("p", True), T0)
    assert [n["channel"] for n in e.tick(T0 + 30)] == ["mail"]
    assert e.next_due() is not None and e.next_due() <= T0 + 330
    assert e.tick(T0 + 599) == []
    assert [n["channel"] for n in e.tick(T0 + 600)] == ["sms"]
    assert [n["channel"] for n in e.tick(T0 + 1800)] == ["phone"]
    got = e.observe(CircuitFact("p", False), T0 + 1900)
    t = T0 + 1900
    while t < T0 + 2500:
        t += 60
        got += e.tick(t)
    assert sorted((n["channel"], n["payload"]["status"]) for n in got) == [
        ("mail", "resolved"), ("phone", "resolved"), ("sms", "resolved")]


def test_ack_stops_escalation_but_not_the_resolved_notice() -> None:
    e = AlertEngine(escalating(), host="h")
    e.observe(CircuitFact("p", True), T0)
    e.tick(T0 + 30)
    assert [n["channel"] for n in e.tick(T0 + 600)] == ["sms"]
    fp = e.list_alerts(T0)[0]["fingerprint"]
    assert e.ack("nope", T0) is False
    assert e.ack(fp[:6], T0 + 700) is True
    assert e.list_alerts(T0 + 700)[0]["acked"] is True
    assert all(n["channel"] != "phone" for t in range(700, 4000, 60) for n in e.tick(T0 + t))
    got = e.observe(CircuitFact("p", False), T0 + 4000)
    got += [n for t in range(4000, 4700, 60) for n in e.tick(T0 + t)]
    assert sorted(n["channel"] for n in got if n["payload"]["status"] == "resolved") == [
        "mail", "sms"]


def test_silence_mutes_and_a_notified_alert_still_gets_resolved() -> None:
    e = AlertEngine(config(), host="h")
    e.observe(CircuitFact("images", True), T0)
    e.observe(CircuitFact("pdf", True), T0)
    assert len(e.tick(T0 + 30)) == 2
    s = e.add_silence([parse_matcher("pool=images")], T0 + 40, T0 + 7200, "deploy", "ops")
    assert e.list_silences(T0 + 40)[0]["state"] == "active"
    e.observe(CircuitFact("images", False), T0 + 100)
    notes = e.tick(T0 + 330)
    assert names(notes) == [("mail", "resolved", ["CircuitOpen/resolved"])]
    assert notes[0]["payload"]["groupLabels"]["pool"] == "images"
    # a new alert under the silence is never sent, and nothing is owed for it
    e.observe(CircuitFact("images", True), T0 + 400)
    assert [a["mutedBy"] for a in e.list_alerts(T0 + 400)
            if a["labels"]["pool"] == "images"] == [[s.id]]
    got = [n for t in range(430, 1500, 60) for n in e.tick(T0 + t)]
    assert all(n["payload"]["groupLabels"]["pool"] != "images" for n in got)
    assert e.expire_silence(s.id, T0 + 1500) is True
    assert e.list_silences(T0 + 1500)[0]["state"] == "expired"
    got = [n for t in range(1500, 2200, 60) for n in e.tick(T0 + t)]
    assert names([n for n in got if n["payload"]["groupLabels"]["pool"] == "images"]) == [
        ("mail", "firing", ["CircuitOpen/firing"])]


def test_silence_needs_an_equality_matcher_and_bad_matchers_say_why() -> None:
    e = AlertEngine(config(), host="h")
    with pytest.raises(ValueError, match="LABEL=VALUE"):
        e.add_silence([Matcher("pool", ".*", "=~")], T0, T0 + 60)
    with pytest.raises(ValueError, match="end after"):
        e.add_silence([Matcher("pool", "x")], T0, T0)
    with pytest.raises(ValueError, match="regular expression"):
        parse_matcher("pool=~[")
    with pytest.raises(ValueError, match="regular expression"):
        e.add_silence([Matcher("pool", "x"), Matcher("slot", "[", "=~")], T0, T0 + 60)
    with pytest.raises(ValueError, match="operator"):
        e.add_silence([Matcher("pool", "x", "==")], T0, T0 + 60)
    assert e.silences == {}
    with pytest.raises(ValueError, match="LABEL=VALUE"):
        parse_matcher("pool")
    assert parse_matcher("alertname=~Crash.*").matches({"alertname": "CrashLoop"})


def test_server_down_inhibits_function_alerts_on_that_server() -> None:
    e = AlertEngine(config(group_by=("alertname", "server")), host="h")
    e.observe(FindingUp("no_workers", "a:4730", function="resize"), T0)
    e.observe(FindingUp("no_workers", "b:4730", function="resize"), T0)
    e.observe(FindingUp("server_down", "a:4730"), T0)
    notes = e.tick(T0 + 30)
    got = sorted((n["payload"]["groupLabels"]["alertname"],
                  n["payload"]["groupLabels"]["server"]) for n in notes)
    assert got == [("NoWorkers", "b:4730"), ("ServerDown", "a:4730")]


def test_a_pools_roll_mutes_its_child_alerts() -> None:
    e = AlertEngine(config(), host="h")
    e.observe(RollFact("images", "running"), T0)
    crash(e, T0)
    crash(e, T0, pool="pdf")
    assert [n["payload"]["groupLabels"]["pool"] for n in e.tick(T0 + 30)] == ["pdf"]
    e.observe(RollFact("images", "done"), T0 + 40)
    got = [n for t in range(60, 400, 60) for n in e.tick(T0 + t)]
    assert [n["payload"]["groupLabels"]["pool"] for n in got] == ["images"]


def test_snapshot_restore_neither_repages_nor_forgets() -> None:
    e = AlertEngine(escalating(), host="h")
    e.observe(CircuitFact("p", True), T0)
    e.tick(T0 + 30)
    s = e.add_silence([Matcher("pool", "q")], T0, T0 + 3600, "x")
    data = json.loads(json.dumps(e.snapshot()))
    e2 = AlertEngine(escalating(), host="h")
    e2.restore(data)
    assert e2.tick(T0 + 31) == []  # no re-page
    assert [x["id"] for x in e2.list_silences(T0 + 31)] == [s.id]
    assert [n["channel"] for n in e2.tick(T0 + 600)] == ["sms"]
    with pytest.raises(ValueError):
        e2.restore({"version": 99})
    bad = json.loads(json.dumps(data))
    bad["silences"][0]["matchers"] = [["pool", "=~", "["]]
    with pytest.raises(ValueError, match="bad regular expression"):
        e2.restore(bad)
    assert e2.tick(T0 + 601) == []  # the failed restore left the engine as it was


def test_after_a_restore_a_finding_that_is_not_back_yet_does_not_resolve_its_alert() -> None:
    """Findings are not saved: the restarted master's probe raises ServerDown again only
    after a few probes. Held, the restored alert neither resolves nor pages again; once
    the hold is over, an alert whose fact did not come back resolves."""
    e = AlertEngine(config(group_wait=0.0, group_interval=1.0), host="h")
    assert names(e.observe(FindingUp("server_down", "a:1"), T0)) == [
        ("mail", "firing", ["ServerDown/firing"])]
    data = json.loads(json.dumps(e.snapshot()))
    again = AlertEngine(config(group_wait=0.0, group_interval=1.0), host="h")
    again.restore(data)
    again.hold(T0 + 30)
    got = [n for t in range(1, 20) for n in again.tick(T0 + t)]
    got += again.observe(FindingUp("server_down", "a:1"), T0 + 20)  # the probe, 3 fails on
    got += [n for t in range(21, 29) for n in again.tick(T0 + t)]
    assert got == []  # neither resolved nor paged again
    gone = AlertEngine(config(group_wait=0.0, group_interval=1.0), host="h")
    gone.restore(data)
    gone.hold(T0 + 30)
    assert [n for t in range(1, 30) for n in gone.tick(T0 + t)] == []
    assert gone.next_due() is not None and gone.next_due() <= T0 + 30
    assert names([n for t in range(30, 40) for n in gone.tick(T0 + t)]) == [
        ("mail", "resolved", ["ServerDown/resolved"])]


@settings(PROPERTY, max_examples=200)
@given(st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
                    lambda inner: st.lists(inner, max_size=4)
                    | st.dictionaries(st.text(max_size=12), inner, max_size=4), max_leaves=20),
       st.sampled_from(["alerts", "groups", "silences", "rules", None]))
def test_restore_of_any_bad_data_is_a_value_error_and_changes_nothing(junk: object,
                                                                      where: str | None) -> None:
    e = AlertEngine(escalating(), host="h")
    e.observe(CircuitFact("p", True), T0)
    e.tick(T0 + 30)
    data = json.loads(json.dumps(e.snapshot()))
    before = json.dumps(e.snapshot(), sort_keys=True)
    if where is None:
        data = junk
    elif where == "rules":
        data["rules"] = {"crashes": junk, "rolls": junk}
    else:
        data[where] = [junk] if where != "alerts" else [dict(data["alerts"][0], labels=junk)]
    try:
        e.restore(data)  # type: ignore[arg-type]
    except ValueError:
        assert json.dumps(e.snapshot(), sort_keys=True) == before
    e.tick(T0 + 31)  # whatever was restored, a tick does not raise


def test_routes_first_match_and_continue() -> None:
    routes = (AlertRoute({"severity": "info"}, ("log",)),
              AlertRoute({"pool": "images"}, ("mail",), continue_=True),
              AlertRoute({}, ("hook",)))
    e = AlertEngine(config(routes=routes, group_wait=0.0), host="h")
    notes = e.observe(CircuitFact("images", True), T0)
    notes += e.observe(FindingUp("server_restarted", "a:4730"), T0)
    got = sorted((n["channel"], n["payload"]["alerts"][0]["labels"]["alertname"])
                 for n in notes)
    assert got == [("hook", "CircuitOpen"), ("log", "ServerRestarted"),
                   ("mail", "CircuitOpen")]


# -- every rule fires once and resolves ------------------------------------------------------

def _scenarios() -> list[tuple[str, list, list]]:
    """(rule, facts that raise it, facts that clear it); None as a fact: let time pass."""
    return [
        ("CrashLoop", [ChildExit("p", 1, "crashed")] * 5, [None]),
        ("BootFailure", [ChildExit("p", 0, "boot_error")], [ChildReady("p", 0)]),
        ("Quarantined", [QuarantineFact("p", 2, "fast failures")], [ChildReady("p", 2)]),
        ("CircuitOpen", [CircuitFact("p", True)], [CircuitFact("p", False)]),
        ("PoisonJob", [PoisonFact("p", "f", 2, "crashed")], [None]),
        ("JobHung", [HardTimeout("p", 0, "f")], [None]),
        ("ServerDown", [FindingUp("server_down", "a:1")], [FindingDown("server_down", "a:1")]),
        ("ServerRestarted", [FindingUp("server_restarted", "a:1")],
         [FindingDown("server_restarted", "a:1")]),
        ("NoWorkers", [FindingUp("no_workers", "a:1", "f")],
         [FindingDown("no_workers", "a:1", "f")]),
        ("WorkersMissing", [FindingUp("under_registered", "a:1", pool="p")],
         [FindingDown("under_registered", "a:1", pool="p")]),
        ("FailureRate", [JobTick("p", "f", 90, 10)], [None]),
        ("SlowJobs", [JobTick("p", "f", 10, 0, p95=60.0)], [JobTick("p", "f", 10, 0, 1.0)]),
        ("Backlog", [FindingUp("backlog_growing", "a:1", "f",
                               details={"drain_seconds": None})],
         [FindingDown("backlog_growing", "a:1", "f")]),
        ("Backlog", [BacklogDrain("f", "a:1", 500, 900.0)], [BacklogDrain("f", "a:1", 0, None)]),
        ("RollHalted", [RollFact("p", "halted", "boot")], [RollFact("p", "done")]),
        ("FdLimit", [FdUsage(900, 1000)], [FdUsage(10, 1000)]),
        ("StoreDown", [StoreFact(False, "connection refused")], [StoreFact(True)]),
        ("DeadLetters", [DeadLetterCount("f", 4), DeadLetterCount("f", 6)], [None]),
    ]


def test_the_scenarios_cover_every_rule() -> None:
    assert sorted({s[0] for s in _scenarios()}) == sorted(RULES)


@pytest.mark.parametrize("rule,raise_,clear", _scenarios(), ids=lambda v: v
                         if isinstance(v, str) else "")
def test_each_rule_fires_once_and_resolves(rule: str, raise_: list, clear: list) -> None:
    cfg = config(group_wait=1.0, group_interval=10.0)
    # Backlog on the drain time alone: 10 minutes (growth alone fires whatever it is)
    cfg.rules["Backlog"] = dataclasses.replace(cfg.rules["Backlog"], params={"drain": 600.0})
    e = AlertEngine(cfg, host="h")
    got: list[dict] = []
    for fact in raise_:
        got += e.observe(fact, T0)
    for t in range(1, 60, 5):
        got += e.tick(T0 + t)
    t0 = T0 + 60
    for fact in clear:
        if fact is not None:
            got += e.observe(fact, t0)
    for t in range(0, 7300, 30):  # time enough for every window and hold to pass
        got += e.tick(t0 + t)
    assert names(got) == [("mail", "firing", [f"{rule}/firing"]),
                          ("mail", "resolved", [f"{rule}/resolved"])]
    assert e.alerts == {} and e.groups == {}


def test_dead_letters_fire_on_growth_not_on_a_count_that_stands_or_falls() -> None:
    e = AlertEngine(config(group_wait=0.0), host="h")
    assert e.observe(DeadLetterCount("f", 40), T0) == []  # the first count: no growth seen
    assert e.observe(DeadLetterCount("f", 40), T0 + 1) == []
    assert e.observe(DeadLetterCount("f", 12), T0 + 2) == []  # deleted or replayed
    assert names(e.observe(DeadLetterCount("f", 13), T0 + 3)) == [
        ("mail", "firing", ["DeadLetters/firing"])]


def test_backlog_drain_under_the_threshold_does_not_fire() -> None:
    cfg = config(group_wait=0.0)
    cfg.rules["Backlog"] = dataclasses.replace(cfg.rules["Backlog"], params={"drain": 600.0})
    e = AlertEngine(cfg, host="h")
    assert e.observe(BacklogDrain("f", "a:1", 50, 30.0), T0) == []
    assert e.observe(BacklogDrain("f", "a:1", 0, None), T0) == []  # nothing waiting
    assert len(e.observe(BacklogDrain("f", "a:1", 50, None), T0)) == 1  # never drains


def test_a_reload_that_changes_routes_still_sends_the_owed_resolved_notices() -> None:
    e = AlertEngine(escalating(), host="h")
    e.observe(CircuitFact("p", True), T0)
    e.tick(T0 + 30)
    assert [n["channel"] for n in e.tick(T0 + 600)] == ["sms"]
    old_key = next(iter(e.groups))
    # the reload drops the escalation and sends critical alerts to a new channel
    new = dataclasses.replace(e.config, routes=(AlertRoute({"severity": "critical"},
                                                           ("mail", "hook")),),
                              channels={"mail": {}, "hook": {}})
    e.reconfigure(new)
    got = [(n["channel"], n["payload"]["status"]) for t in range(601, 700, 10)
           for n in e.tick(T0 + t)]
    assert sorted(got) == [("hook", "firing"), ("mail", "firing")]  # the new group
    got = e.observe(CircuitFact("p", False), T0 + 700)
    notes = got + [n for t in range(700, 1400, 30) for n in e.tick(T0 + t)]
    got = sorted((n["channel"], n["payload"]["status"], n["payload"]["groupKey"] == old_key)
                 for n in notes)
    # the old group's channels (mail, sms) and the new group's (mail, hook) all resolve
    assert got == [("hook", "resolved", True), ("mail", "resolved", True),
                   ("mail", "resolved", True), ("sms", "resolved", True)]
    assert e.alerts == {} and e.groups == {}


def test_a_reload_with_the_same_routes_keeps_the_groups() -> None:
    e = AlertEngine(escalating(), host="h")
    e.observe(CircuitFact("p", True), T0)
    e.tick(T0 + 30)
    e.reconfigure(dataclasses.replace(e.config))
    assert [n for t in range(31, 590, 10) for n in e.tick(T0 + t)] == []  # no re-page
    assert [n["channel"] for n in e.tick(T0 + 600)] == ["sms"]


def test_a_pool_removed_by_a_reload_resolves_its_alerts() -> None:
    e = AlertEngine(config(group_wait=0.0), host="h")
    e.observe_all([CircuitFact("gone", True), QuarantineFact("gone", 1),
                   CircuitFact("kept", True)], T0)
    notes = e.forget({"kept"}, T0 + 400)
    assert sorted(names(notes)) == [("mail", "resolved", ["CircuitOpen/resolved"]),
                                    ("mail", "resolved", ["Quarantined/resolved"])]
    assert [a["labels"]["pool"] for a in e.list_alerts(T0 + 400)] == ["kept"]


def test_disabled_rule_and_alerting_off() -> None:
    rules = dict(config().rules)
    rules["CircuitOpen"] = dataclasses.replace(rules["CircuitOpen"], enabled=False)
    e = AlertEngine(config(rules=rules, group_wait=0.0), host="h")
    assert e.observe(CircuitFact("p", True), T0) == []
    e = AlertEngine(config(group_wait=0.0), host="h")
    assert len(e.observe(CircuitFact("p", True), T0)) == 1
    e.reconfigure(dataclasses.replace(e.config, enabled=False))
    assert names(e.tick(T0 + 1)) == [("mail", "resolved", ["CircuitOpen/resolved"])]


def test_tables_are_bounded() -> None:
    e = AlertEngine(config(), host="h")
    for slot in range(12_000):
        e.rules.observe(QuarantineFact("p", slot), T0)
    e.tick(T0)
    assert len(e.alerts) == 10_000
    notes = e.tick(T0 + 30)
    assert len(notes) == 1
    assert len(notes[0]["payload"]["alerts"]) == 1000
    assert notes[0]["payload"]["truncatedAlerts"] == 9000


# -- the property: nothing notified is left without its resolved notice ---------------------

FACTS = st.sampled_from([
    CircuitFact("a", True), CircuitFact("a", False), CircuitFact("b", True),
    CircuitFact("b", False), ChildExit("a", 0, "crashed"), ChildExit("b", 1, "crashed"),
    FindingUp("server_down", "s:1"), FindingDown("server_down", "s:1"),
    FindingUp("no_workers", "s:1", "f"), FindingDown("no_workers", "s:1", "f"),
    RollFact("a", "running"), RollFact("a", "done"), "silence", "ack", "reload",
    "restart",
])


def flappy(c: AlertsConfig) -> AlertsConfig:
    """`c` with CircuitOpen pending 2 minutes and kept firing 1 minute: both lifecycle
    detours in play."""
    rules = dict(c.rules)
    rules["CircuitOpen"] = dataclasses.replace(rules["CircuitOpen"], for_=120.0,
                                               keep_firing_for=60.0)
    return dataclasses.replace(c, rules=rules)


def other_routes() -> AlertsConfig:
    """escalating() with its route changed: a reload to it retires the groups."""
    return config(routes=(AlertRoute({"severity": "critical"}, ("phone",)),
                          AlertRoute({}, ("mail",), (Escalation(300.0, ("sms",)),))),
                  channels={c: {"type": "exec"} for c in ("mail", "sms", "phone")})


@PROPERTY
@given(steps=st.lists(st.tuples(FACTS, st.floats(0, 900)), max_size=40))
def test_every_notified_alert_gets_a_resolved_notice(steps: list) -> None:
    e = AlertEngine(flappy(escalating()), host="h")
    now, reloads = T0, 0
    sent: dict[tuple[str, str], str] = {}  # (channel, fingerprint) -> last status sent

    def record(notes: list[dict]) -> None:
        for n in notes:
            for a in n["payload"]["alerts"]:
                sent[(n["channel"], a["fingerprint"])] = a["status"]

    for fact, dt in steps:
        now += dt
        if fact == "silence":
            e.add_silence([Matcher("pool", "a")], now, now + 600)
        elif fact == "ack":
            for a in e.list_alerts(now):
                e.ack(a["fingerprint"], now)
        elif fact == "reload":
            reloads += 1
            e.reconfigure(flappy(other_routes() if reloads % 2 else escalating()))
        elif fact == "restart":  # the state goes through JSON into a new engine
            data = json.loads(json.dumps(e.snapshot()))
            e = AlertEngine(e.config, host="h")
            e.restore(data)
        else:
            record(e.observe(fact, now))
        record(e.tick(now))
    # every cause ends; time passes
    for fact in (CircuitFact("a", False), CircuitFact("b", False),
                 FindingDown("server_down", "s:1"), FindingDown("no_workers", "s:1", "f"),
                 RollFact("a", "done")):
        record(e.observe(fact, now))
    for t in range(0, 2 * 3600, 60):
        record(e.tick(now + t))
    assert all(status == "resolved" for status in sent.values()), sent
    assert e.alerts == {} and e.groups == {}


# -- config -----------------------------------------------------------------------------------

POOL = 'pools: {p: {functions: {f: "m:f"}}}\n'


def problems(text: str) -> str:
    with pytest.raises(ConfigError) as e:
        parse(POOL + text, "/tmp/gv-alerts-test.yaml")
    return str(e.value)


def test_config_defaults_and_overrides() -> None:
    c = parse(POOL, "/tmp/x.yaml").alerts
    assert c.enabled and c.group_by == ("alertname", "pool") and c.group_wait == 30.0
    assert c.group_interval == 300.0 and c.repeat_interval == 4 * 3600.0
    assert set(c.rules) == set(RULES) and c.rules["CrashLoop"].params["count"] == 5
    c = parse(POOL + "alerts:\n  rules: {CrashLoop: {count: 3, window: 5m, for: 10s, "
              "severity: warning}}\n  routes: [{match: {severity: critical}, notify: [m], "
              "escalate: [{after: 10m, notify: [s]}]}]\n  channels: {m: " + MAIL + ", "
              "s: {type: exec, command: [/bin/true]}}\n", "/tmp/x.yaml").alerts
    rule = c.rules["CrashLoop"]
    assert (rule.params["count"], rule.params["window"], rule.for_, rule.severity) == (
        3, 300.0, 10.0, "warning")
    assert c.routes[0].escalate == (Escalation(600.0, ("s",)),)


def test_config_errors_name_the_key_path_with_did_you_mean() -> None:
    assert 'alerts.rules.CrashLop: unknown rule; did you mean "CrashLoop"?' in problems(
        "alerts: {rules: {CrashLop: {count: 3}}}\n")
    assert "alerts.rules.CrashLoop.count: expected a whole number from 1 to 1000, got 0" in \
        problems("alerts: {rules: {CrashLoop: {count: 0}}}\n")
    assert 'alerts.rules.FailureRate.ratoi: unknown key; did you mean "ratio"?' in problems(
        "alerts: {rules: {FailureRate: {ratoi: 0.1}}}\n")
    text = problems("alerts:\n  routes: [{notify: [ops-mial]}]\n  channels: "
                    "{ops-mail: " + MAIL + "}\n")
    assert 'alerts.routes.0.notify.0: no channel named \'ops-mial\' in alerts.channels; ' \
        'did you mean "ops-mail"?' in text
    assert "alerts.routes.0.escalate.1.after: expected a duration > 0, each step later" in \
        problems("alerts:\n  routes: [{notify: [m], escalate: [{after: 10m, notify: [m]}, "
                 "{after: 5m, notify: [m]}]}]\n  channels: {m: " + MAIL + "}\n")
    assert "alerts.rules.PoisonJob.hold: expected a duration of at least 1000ms, got 0" in \
        problems("alerts: {rules: {PoisonJob: {hold: 0}}}\n")
    assert "alerts.repeat_interval: must be >= alerts.group_interval" in problems(
        "alerts: {group_interval: 10m, repeat_interval: 5m}\n")
    assert 'alerts.grup_by: unknown key; did you mean "group_by"?' in problems(
        "alerts: {grup_by: [pool]}\n")


def test_an_alert_that_comes_back_pending_and_goes_still_gets_its_resolved_notice() -> None:
    e = AlertEngine(flappy(config(group_wait=0.0)), host="h")
    e.observe(CircuitFact("p", True), T0)
    assert names(e.tick(T0 + 120)) == [("mail", "firing", ["CircuitOpen/firing"])]
    e.observe(CircuitFact("p", False), T0 + 130)
    e.tick(T0 + 190)  # kept firing 60s: resolved now, its notice due at T0+420
    e.observe(CircuitFact("p", True), T0 + 200)  # back, pending (for: 2m) ...
    e.observe(CircuitFact("p", False), T0 + 210)  # ... and gone before it fired
    notes = [n for t in range(210, 1000, 30) for n in e.tick(T0 + t)]
    assert names(notes) == [("mail", "resolved", ["CircuitOpen/resolved"])]
    assert e.alerts == {} and e.groups == {}


def test_job_counts_are_bounded_whatever_the_tick_rate() -> None:
    e = AlertEngine(config(), host="h")
    for i in range(20_000):  # ten ticks a second for over half an hour
        e.rules.observe(JobTick("p", "f", 9, 1), T0 + i / 10)
    assert len(e.rules.jobs[("p", "f")]) <= 1000
    assert [c.labels["alertname"] for c in e.rules.conditions(T0 + 2000)] == ["FailureRate"]
    for n in range(2000):
        e.rules.observe(JobTick("p", f"f{n}", 1, 0), T0)
    assert len(e.rules.jobs) == 1000


@PROPERTY
@given(steps=st.lists(st.tuples(FACTS.filter(lambda f: f not in ("reload", "restart")),
                                st.floats(0, 900)), max_size=40))
def test_a_channel_hears_of_a_group_at_most_once_per_group_interval(steps: list) -> None:
    e = AlertEngine(flappy(escalating()), host="h")
    now = T0
    # groupKey -> the group_interval slot "mail" last heard of it in: a group is checked
    # at created + group_wait + k * group_interval (Alertmanager's ticker), and ticks here
    # come late, so each notice must be in a later slot than the one before
    last: dict[str, int] = {}
    created: dict[str, float] = {}

    def record(notes: list[dict]) -> None:
        for n in notes:
            if n["channel"] != "mail":
                continue  # an escalation step is sent as soon as an alert is due for it
            key = n["payload"]["groupKey"]
            assert now - created[key] >= 30 - 1e-6  # never before group_wait
            slot = math.floor((now - created[key] - 30 + 1e-6) / 300)
            assert slot > last.get(key, -1), (key, slot, last.get(key))
            last[key] = slot

    for fact, dt in steps:
        now += dt
        if fact == "silence":
            e.add_silence([Matcher("pool", "a")], now, now + 600)
        elif fact == "ack":
            for a in e.list_alerts(now):
                e.ack(a["fingerprint"], now)
        else:
            e.rules.observe(fact, now)
        notes = e.tick(now)
        for key, g in e.groups.items():
            created.setdefault(key, g.created)
        record(notes)
        for key in [k for k in last if k not in e.groups]:
            del last[key]  # the group ended: a new one starts afresh, after its group_wait
            created.pop(key, None)


def test_p95_of_bucket_counts_is_the_bound_of_the_bucket_it_falls_in() -> None:
    from gearvisor.shm.stats import p95

    bounds = (0.1, 1.0, 10.0)
    assert p95(bounds, [0, 0, 0, 0]) is None
    assert p95(bounds, [100, 0, 0, 0]) == 0.1
    assert p95(bounds, [94, 6, 0, 0]) == 1.0  # the 95th of 100 is in the second bucket
    assert p95(bounds, [0, 0, 1, 19]) == 10.0  # past the last bound: that bound


def test_the_components_status_names_what_firing_alerts_are_about(tmp_path) -> None:
    """`alerts.firing_labels` (gearvisor top's marker): alertname, pool and function of each
    firing alert, pending ones left out, at most MAX_FIRING_LABELS of them."""
    import yaml

    from gearvisor.config import load
    from gearvisor.master import alerts as component

    path = tmp_path / "gearvisor.yaml"
    path.write_text(yaml.safe_dump({"pools": {"images": {"functions": {
        "resize": "examples.text:echo"}}}}))
    alerts = component.Alerts(load(str(path)), wall=lambda: T0)
    alerts.engine = AlertEngine(config(), host="h1")
    crash(alerts.engine, T0)
    alerts.engine.observe(PoisonFact("images", "resize", 3, "boom"), T0)
    got = alerts.status(T0)["alerts"]
    assert got["firing"] == 2
    assert sorted(got["firing_labels"], key=str) == sorted([
        {"alertname": "CrashLoop", "pool": "images", "function": None},
        {"alertname": "PoisonJob", "pool": "images", "function": "resize"}], key=str)
    for slot in range(1, 10):
        crash(alerts.engine, T0, slot=slot)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(component, "MAX_FIRING_LABELS", 4)
        got = alerts.status(T0)["alerts"]
    assert got["firing"] == 11 and len(got["firing_labels"]) == 4
