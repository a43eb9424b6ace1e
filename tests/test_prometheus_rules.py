"""The shipped Prometheus rules and Grafana dashboard: real promtool checks them, runs the
rules' unit tests and the example config, and every series they use is one gearvisor exports.

conf/prometheus/rules.yml, rules_test.yml and prometheus.yml, and conf/grafana/gearvisor.json
are files users load as they are; nothing in gearvisor reads them, so only these tests keep
them working as the metrics change.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry, ProcessCollector

REPO = Path(__file__).resolve().parent.parent
PROMETHEUS = REPO / "conf" / "prometheus"
RULES = PROMETHEUS / "rules.yml"
RULES_TEST = PROMETHEUS / "rules_test.yml"
CONFIG = PROMETHEUS / "prometheus.yml"
DASHBOARD = REPO / "conf" / "grafana" / "gearvisor.json"

PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None,
    reason="promtool is missing: install Debian's `prometheus` package (examples/setup.sh does)")

# The series gearvisor's master exports and their labels: the metrics interface, written
# down here so that a renamed series fails this test. Histograms add _bucket, _sum, _count.
COUNTERS_AND_GAUGES = {
    "gearvisor_jobs_total": {"pool", "function", "outcome"},
    "gearvisor_jobs_in_progress": {"pool", "function"},
    "gearvisor_children": {"pool", "state"},
    "gearvisor_pool_desired_children": {"pool"},
    "gearvisor_child_restarts_total": {"pool", "reason"},
    "gearvisor_quarantines_total": {"pool"},
    "gearvisor_circuit_open": {"pool"},
    "gearvisor_held_jobs_returned_total": {"pool"},
    "gearvisor_registered_workers": {"pool", "server"},
    "gearvisor_gearmand_up": {"server"},
    "gearvisor_gearmand_restarts_total": {"server"},
    "gearvisor_gearmand_jobs_waiting": {"server", "function"},
    "gearvisor_gearmand_jobs_running": {"server", "function"},
    "gearvisor_gearmand_workers": {"server", "function"},
    "gearvisor_findings": {"kind"},
    "gearvisor_alert_notifications_total": {"channel", "outcome"},
}
HISTOGRAMS = {"gearvisor_job_duration_seconds": {"pool", "function"}}
LABEL_VALUES = {
    "outcome": {"success", "error", "timeout", "crash", "poison"},
    "state": {"starting", "ready", "draining"},
    "reason": {"crash", "boot_error", "exit", "timeout", "recycle"},
    "kind": {"server_down", "server_restarted", "no_workers", "under_registered",
             "backlog_growing"},
}
# Labels Prometheus adds to every scraped series, and `quantile`, which rules.yml records.
SCRAPE_LABELS = {"job", "instance"}
RECORDED_LABELS = {"quantile"}


def process_series() -> set[str]:
    """The master's standard process_* series, as prometheus-client names them here."""
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    return {sample.name for family in registry.collect() for sample in family.samples}


def exported_series() -> set[str]:
    """Every series name a master's /metrics may carry."""
    names = set(COUNTERS_AND_GAUGES) | process_series()
    for name in HISTOGRAMS:
        names |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
    return names


def exported_labels() -> set[str]:
    """Every label name on the exported series, plus the scrape's and histograms' `le`."""
    labels = set().union(*COUNTERS_AND_GAUGES.values(), *HISTOGRAMS.values())
    return labels | SCRAPE_LABELS | {"le"}


# ---------------------------------------------------------------------------------------------
# A small PromQL scanner: the names of series and labels an expression uses. Prometheus has no
# command that lists them, and its parser is Go; the scanner's own test below keeps it honest.

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_MATCHERS = re.compile(r"\{([^}]*)\}")
_MATCHER = re.compile(r'([A-Za-z_][A-Za-z0-9_]*)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"')
_GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
_IDENT = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")
_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and",
             "or", "unless", "offset", "inf", "nan"}


def scan(expr: str) -> tuple[set[str], list[tuple[str, str, str]], set[str]]:
    """Return (series names, label matchers as (label, op, value), grouping labels) of a
    PromQL expression. Function names are identifiers followed by `(`."""
    matchers = [m for inner in _MATCHERS.findall(expr) for m in _MATCHER.findall(inner)]
    text = _STRING.sub('""', expr)
    text = _MATCHERS.sub("{}", text)
    text = re.sub(r"\[[^\]]*\]", "[]", text)  # ranges and subqueries: durations, $__macros
    grouping = {label.strip() for _, labels in _GROUPING.findall(text)
                for label in labels.split(",") if label.strip()}
    text = _GROUPING.sub(" ", text)  # so that `sum by (x) (` reads as the call `sum (`
    names = set()
    for m in _IDENT.finditer(text):
        before = text[m.start() - 1] if m.start() else " "
        if before.isdigit() or before == ".":  # 15m after offset, 1e3
            continue
        if m.group().lower() in _KEYWORDS or text[m.end():].lstrip().startswith("("):
            continue
        names.add(m.group())
    return names, matchers, grouping


def test_scan_finds_series_matchers_and_grouping_labels() -> None:
    expr = ('histogram_quantile(0.9, sum by (le, pool) (rate(a_bucket{pool=~"$pool", x="by(y)"}'
            '[$__rate_interval]))) / on (pool) group_left (state) b:c:rate5m offset 15m'
            ' > bool 1e3 and rate(d[5m:1m]) unless sum without(e) (f)')
    names, matchers, grouping = scan(expr)
    assert names == {"a_bucket", "b:c:rate5m", "d", "f"}
    assert matchers == [("pool", "=~", "$pool"), ("x", "=", "by(y)")]
    assert grouping == {"le", "pool", "state", "e"}


def load_rules() -> list[dict[str, Any]]:
    """Every rule of rules.yml, in file order."""
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def template_queries(text: str) -> list[str]:
    """The PromQL that an annotation's `printf "..." | query` runs, with %q filled in."""
    found = re.findall(r'printf\s+"((?:[^"\\]|\\.)*)"\s+[^|}]*\|\s*query', text)
    return [query.replace("%q", '"x"') for query in found]


def check_expr(where: str, expr: str, series: set[str], labels: set[str]) -> list[str]:
    """What is wrong with one expression's series, labels and label values, as messages."""
    names, matchers, grouping = scan(expr)
    problems = [f"{where}: no series in {expr!r}"] if not names else []
    problems += [f"{where}: unknown series {n}" for n in sorted(names - series)]
    used = {label for label, _, _ in matchers} | grouping
    problems += [f"{where}: unknown label {label}" for label in sorted(used - labels)]
    for label, op, value in matchers:
        if label in LABEL_VALUES and op in ("=", "=~") and re.fullmatch(r"[a-z_|]+", value):
            problems += [f"{where}: {label}={v!r} is not one of {sorted(LABEL_VALUES[label])}"
                         for v in value.split("|") if v not in LABEL_VALUES[label]]
    return problems


# ---------------------------------------------------------------------------------------------
# promtool


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    """Run the real promtool (bounded in time) and return its result."""
    assert PROMTOOL is not None
    return subprocess.run([PROMTOOL, *args], capture_output=True, text=True, timeout=120,
                          check=False)


@needs_promtool
def test_promtool_check_rules() -> None:
    result = promtool("check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(load_rules())} rules found" in result.stdout


@needs_promtool
def test_promtool_test_rules() -> None:
    result = promtool("test", "rules", str(RULES_TEST))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout + result.stderr


@needs_promtool
def test_promtool_check_config_loads_the_rules() -> None:
    result = promtool("check", "config", str(CONFIG))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 1 rule files found" in result.stdout
    assert f"SUCCESS: {len(load_rules())} rules found" in result.stdout
    config = yaml.safe_load(CONFIG.read_text())
    targets = [t for job in config["scrape_configs"] for sc in job["static_configs"]
               for t in sc["targets"]]
    assert targets == ["127.0.0.1:9464"]


@needs_promtool
def test_dashboard_queries_parse(tmp_path: Path) -> None:
    """promtool parses every dashboard query (Grafana's $__ macros become a duration), so a
    typo in a panel is caught here, not on a user's screen."""
    exprs = [t["expr"] for p in panels() for t in p.get("targets", [])]
    rules = [{"record": f"dashboard_query_{i}",
              "expr": re.sub(r"\$__(rate_interval|interval|range)", "5m", e)}
             for i, e in enumerate(exprs)]
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = promtool("check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(exprs)} rules found" in result.stdout


# ---------------------------------------------------------------------------------------------
# The rules


def test_every_rule_is_unit_tested() -> None:
    """Each alert has a promtool test where it fires and one where it must be absent; each
    recorded series has its values checked."""
    tests = yaml.safe_load(RULES_TEST.read_text())["tests"]
    assert yaml.safe_load(RULES_TEST.read_text())["rule_files"] == ["rules.yml"]
    fired: set[str] = set()
    absent: set[str] = set()
    checked = " ".join(t["expr"] for test in tests for t in test.get("promql_expr_test", []))
    for test in tests:
        for case in test.get("alert_rule_test", []):
            (fired if case.get("exp_alerts") else absent).add(case["alertname"])
    rules = load_rules()
    alerts = {r["alert"] for r in rules if "alert" in r}
    records = {r["record"] for r in rules if "record" in r}
    assert alerts - fired == set(), "alerts no test fires"
    assert alerts - absent == set(), "alerts no test shows absent"
    assert (fired | absent) - alerts == set(), "tests of alerts rules.yml does not have"
    assert {r for r in records if r not in scan(checked)[0]} == set(), "records not checked"


def test_alerts_have_severity_and_runbook_annotations() -> None:
    for rule in (r for r in load_rules() if "alert" in r):
        name = rule["alert"]
        assert re.fullmatch(r"Gearvisor[A-Z][A-Za-z]+", name), name
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}, name
        annotations = rule["annotations"]
        assert set(annotations) == {"summary", "description"}, name
        assert annotations["summary"].endswith("."), name
        # the description says what happened and what to do about it
        assert len(annotations["description"]) > 150, name


def test_recording_rules_are_named_level_metric_operations() -> None:
    for rule in (r for r in load_rules() if "record" in r):
        level, metric, operations = rule["record"].split(":")
        assert level and operations and metric.startswith("gearvisor_"), rule["record"]


def test_rules_use_only_exported_series_and_labels() -> None:
    rules = load_rules()
    records = {r["record"] for r in rules if "record" in r}
    # GearvisorMasterDown reads `up`, the series Prometheus records for every target.
    series = exported_series() | records | {"up"}
    labels = exported_labels() | RECORDED_LABELS
    problems = []
    for rule in rules:
        name = rule.get("alert") or rule["record"]
        problems += check_expr(name, rule["expr"], series, labels)
        for key, text in rule.get("annotations", {}).items():
            for query in template_queries(text):
                problems += check_expr(f"{name}.{key}", query, series, labels)
    assert problems == []
    backlog = next(r for r in rules if r.get("alert") == "GearvisorBacklogGrowing")
    assert template_queries(backlog["annotations"]["description"]), "the drain time query"


# ---------------------------------------------------------------------------------------------
# The dashboard


def dashboard() -> dict[str, Any]:
    """conf/grafana/gearvisor.json, parsed."""
    return json.loads(DASHBOARD.read_text())


def panels() -> list[dict[str, Any]]:
    """Every panel of the dashboard, rows' collapsed panels included, rows excluded."""
    out = []
    for panel in dashboard()["panels"]:
        out += panel.get("panels", []) if panel["type"] == "row" else [panel]
    return out


def test_dashboard_is_valid_json_with_variables() -> None:
    board = dashboard()
    assert board["schemaVersion"] >= 36
    assert board["uid"] == "gearvisor" and board["title"]
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for name in ("pool", "function"):
        assert variables[name]["type"] == "query" and variables[name]["includeAll"], name
        assert variables[name]["datasource"] == {"type": "prometheus", "uid": "${datasource}"}


def test_dashboard_panels_are_well_formed() -> None:
    rows = [p for p in dashboard()["panels"] if p["type"] == "row"]
    ids = [p["id"] for p in rows] + [p["id"] for p in panels()]
    assert len(ids) == len(set(ids)), "panel ids are unique"
    for panel in panels():
        where = panel["title"]
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, where
        pos = panel["gridPos"]
        assert pos["w"] > 0 and pos["h"] > 0 and pos["x"] + pos["w"] <= 24, where
        assert panel.get("description"), where
        refs = [t["refId"] for t in panel["targets"]]
        assert refs and len(refs) == len(set(refs)), where
        for target in panel["targets"]:
            assert target["datasource"] == panel["datasource"], where
            assert target["expr"].strip(), where


def test_dashboard_uses_only_exported_series_and_labels() -> None:
    """The dashboard reads the raw series (it works without rules.yml loaded), each one a
    master exports, and shows every series of the metrics interface."""
    series, labels = exported_series(), exported_labels()
    problems = []
    used: set[str] = set()
    for panel in panels():
        for target in panel["targets"]:
            problems += check_expr(f'{panel["title"]}/{target["refId"]}', target["expr"],
                                   series, labels)
            used |= scan(target["expr"])[0]
    for var in dashboard()["templating"]["list"]:
        if var["type"] != "query":
            continue
        query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
        m = re.fullmatch(r"label_values\((.*),\s*(\w+)\)", query)
        assert m, query
        problems += check_expr(f'variable {var["name"]}', m[1], series, labels)
        assert m[2] in labels, query
    assert problems == []
    wanted = set(COUNTERS_AND_GAUGES) | {"gearvisor_job_duration_seconds_bucket"}
    assert wanted - used == set(), "series no panel shows"
