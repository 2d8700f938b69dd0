"""The monitoring files of docs/monitoring/: Prometheus rules that promtool accepts and
whose unit tests pass, a Grafana dashboard whose every panel has a query that parses,
and only metric names the worker exports (here: its metrics in a registry of their
own; tests/integration/test_monitoring.py: a running worker's /metrics)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from outbox import EventRegistry, EventSpec, Prop
from worker.keycheck import KeyStateMetric
from worker.metrics import WorkerMetrics
from worker.sinks.metrics import MetricsSink

ROOT = Path(__file__).resolve().parents[2]
MONITORING = ROOT / "docs" / "monitoring"
RULES = MONITORING / "outbox-alerts.yml"
RULE_TESTS = MONITORING / "outbox-alerts.test.yml"
DASHBOARD = MONITORING / "outbox-dashboard.json"
OPERATIONS = ROOT / "docs" / "operations.md"

#: Series Prometheus makes itself for every target, not the worker.
PROMETHEUS_SERIES = {"up"}
#: What the dashboard's variables stand for when its queries are checked.
SAMPLE_VARIABLES = {
    "job": "outbox",
    "instance": ".*",
    "namespace": "app",
    "__rate_interval": "5m",
}
#: A contract with a metrics-only event of each kind: one with labels and a duration.
CONTRACT = EventRegistry()
CONTRACT.add(
    EventSpec(
        "runtime_ready",
        "operational",
        description="A runtime became ready.",
        properties=[Prop("provider", str), Prop("ready_ms", int, required=False)],
        metrics_only=True,
        metric_labels=["provider"],
        duration_property="ready_ms",
        duration_unit="milliseconds",
    )
)


def promtool() -> str:
    path = shutil.which("promtool") or (
        "/usr/bin/promtool" if Path("/usr/bin/promtool").exists() else None
    )
    if path is None:
        pytest.skip("install Debian's prometheus package for promtool")
    return path


# -- what the files use ---------------------------------------------------------------------

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_LABEL_LIST = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset"}
_WORDS |= {"and", "or", "unless", "atan2", "inf", "nan"}


def promql_names(expr: str) -> set[str]:
    """The metric names an expression selects (not functions, keywords or labels)."""
    text = _STRING.sub('""', expr)
    text = re.sub(r"\{[^}]*\}", " ", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", " ", text)  # ranges and subqueries
    text = _LABEL_LIST.sub(" ", text)
    names = set()
    for match in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", text):
        before = text[match.start() - 1] if match.start() else " "
        if before.isdigit() or before == ".":  # 1e3, 5m
            continue
        if text[match.end() :].lstrip().startswith("("):  # a function or an aggregation
            continue
        if match.group(0).lower() in _WORDS:
            continue
        names.add(match.group(0))
    return names


def label_matchers(expr: str) -> Iterator[tuple[str, str, str]]:
    """(metric, label, value) of each equality or regex matcher, per alternative."""
    for match in re.finditer(r"([A-Za-z_:][A-Za-z0-9_:]*)?\{([^}]*)\}", expr):
        metric = match.group(1) or ""
        for label, op, value in re.findall(r'(\w+)\s*(=~|=)\s*"([^"]*)"', match.group(2)):
            for alternative in value.split("|") if op == "=~" else [value]:
                yield metric, label, alternative


def rules() -> list[dict[str, Any]]:
    document = yaml.safe_load(RULES.read_text())
    return [rule for group in document["groups"] for rule in group["rules"]]


def alerts() -> list[dict[str, Any]]:
    return [rule for rule in rules() if "alert" in rule]


def rule_tests() -> list[dict[str, Any]]:
    return list(yaml.safe_load(RULE_TESTS.read_text())["tests"])


def dashboard() -> dict[str, Any]:
    return dict(json.loads(DASHBOARD.read_text()))


def panels(board: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in board["panels"]:
        yield panel
        yield from panel.get("panels", [])  # a collapsed row holds its panels


def variables(board: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {v["name"]: v for v in board["templating"]["list"]}


def substitute(text: str, values: dict[str, str]) -> str:
    """Grafana's ``$name`` and ``${name}`` replaced by ``values``."""

    def one(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        if name not in values:
            raise AssertionError(f"no value for the dashboard variable {name!r} in {text!r}")
        return values[name]

    return re.sub(r"\$\{(\w+)\}|\$(\w+)", one, text)


def resolve_variable(variable: dict[str, Any], exported: set[str]) -> list[str]:
    """What a ``label_values({__name__=~"..."}, __name__)`` variable lists, given the
    metric names a worker exports (and the variable's regex, as Grafana applies it)."""
    query = substitute(variable["query"]["query"], SAMPLE_VARIABLES)
    selector = re.fullmatch(r'label_values\(\{__name__=~"([^"]+)".*\},\s*__name__\)', query)
    assert selector, f"unexpected variable query {query!r}"
    names = sorted(n for n in exported if re.fullmatch(selector.group(1), n))
    regex = variable.get("regex", "")
    if not regex:
        return names
    pattern = re.compile(regex.strip("/"))
    out = []
    for name in names:
        match = pattern.fullmatch(name)
        if match:
            out.append(match.group(1) if match.groups() else name)
    return out


def dashboard_queries(exported: set[str]) -> list[tuple[str, str]]:
    """(where, PromQL) of every panel query, variables substituted; a repeated panel's
    queries once for each value its variable takes with ``exported``."""
    board = dashboard()
    found = variables(board)
    out = []
    for panel in panels(board):
        choices: list[dict[str, str]] = [dict(SAMPLE_VARIABLES)]
        if "repeat" in panel:
            values = resolve_variable(found[panel["repeat"]], exported)
            assert values, f"panel {panel['title']!r}: ${panel['repeat']} lists nothing"
            choices = [{**SAMPLE_VARIABLES, panel["repeat"]: v} for v in values]
        for target in panel.get("targets", []):
            for values in choices:
                out.append((panel["title"], substitute(target["expr"], values)))
    for name, variable in found.items():
        if variable["type"] == "query":
            query = substitute(variable["query"]["query"], SAMPLE_VARIABLES)
            inner = re.fullmatch(r"label_values\((.*),\s*\w+\)", query)
            assert inner, f"variable {name}: unexpected query {query!r}"
            if not inner.group(1).startswith("{__name__"):
                out.append((f"variable {name}", inner.group(1)))
    return out


def exported_names(exposition: str) -> set[str]:
    """Every series name a /metrics text offers, with the suffixes of its families'
    types (a counter's ``_total``, a histogram's ``_bucket``, ``_sum`` and ``_count``),
    so that a family without a sample yet is counted too."""
    names = set()
    suffixes = {
        "counter": ["_total", "_created"],
        "histogram": ["_bucket", "_sum", "_count", "_created"],
        "summary": ["_sum", "_count", "_created"],
    }
    for family in text_string_to_metric_families(exposition):
        names.update(sample.name for sample in family.samples)
        names.update(family.name + s for s in suffixes.get(family.type, [""]))
    return names


def exported_label_values(exposition: str) -> set[tuple[str, str, str]]:
    """(series, label, value) of every sample of a /metrics text."""
    return {
        (sample.name, label, value)
        for family in text_string_to_metric_families(exposition)
        for sample in family.samples
        for label, value in sample.labels.items()
    }


def used_names(exported: set[str]) -> dict[str, set[str]]:
    """Metric name -> where it is used: the rules, their tests' input series and the
    dashboard (its repeated panels resolved against ``exported``)."""
    used: dict[str, set[str]] = {}
    recorded = {rule["record"] for rule in rules() if "record" in rule}
    for rule in rules():
        for name in promql_names(rule["expr"]) - recorded - PROMETHEUS_SERIES:
            used.setdefault(name, set()).add(f"rule {rule.get('alert') or rule.get('record')}")
    for test in rule_tests():
        for series in test.get("input_series", []):
            name = series["series"].split("{", 1)[0]
            if name not in PROMETHEUS_SERIES:
                used.setdefault(name, set()).add("outbox-alerts.test.yml")
    for where, expr in dashboard_queries(exported):
        for name in promql_names(expr):
            used.setdefault(name, set()).add(f"dashboard {where!r}")
    return used


def used_label_values() -> set[tuple[str, str, str]]:
    """(metric, label, value) of the rules' and the dashboard's matchers on the worker's
    state labels."""
    exprs = [rule["expr"] for rule in rules()]
    for panel in panels(dashboard()):
        exprs += [target["expr"] for target in panel.get("targets", [])]
    return {
        m for expr in exprs for m in label_matchers(expr) if m[1] in ("state", "sink", "reason")
    }


def unexported(exported: set[str]) -> dict[str, set[str]]:
    """The names used that ``exported`` does not hold, with where they are used."""
    return {name: where for name, where in used_names(exported).items() if name not in exported}


# -- the extraction itself -------------------------------------------------------------------


def test_promql_names_finds_metrics_and_nothing_else() -> None:
    expr = (
        'histogram_quantile(0.9, sum by (job, le) (rate(a_bucket{job="x", le!="1"}[15m])))'
        " > 10 and on (job) count by (job) (max_over_time(b_up[1d] offset 5m))"
        ' unless on () absent(c:recorded{state=~"a|b"}) or 1e3 * d_total'
    )
    assert promql_names(expr) == {"a_bucket", "b_up", "c:recorded", "d_total"}
    assert promql_names('{__name__="x"} + sum(y) by (z)') == {"y"}
    assert list(label_matchers('m{state=~"a|b", job="j"}')) == [
        ("m", "state", "a"),
        ("m", "state", "b"),
        ("m", "job", "j"),
    ]


def test_a_name_the_worker_does_not_export_is_found() -> None:
    exported = worker_exposition_names() - {"outbox_oldest_pending_age_seconds"}
    missing = unexported(exported)
    assert missing.keys() == {"outbox_oldest_pending_age_seconds"}
    where = missing["outbox_oldest_pending_age_seconds"]
    assert "rule outbox:oldest_pending_age_seconds:max" in where
    assert "outbox-alerts.test.yml" in where
    assert any(w.startswith("dashboard ") for w in where)


# -- the rules -------------------------------------------------------------------------------


def test_promtool_accepts_the_rules() -> None:
    result = subprocess.run(
        [promtool(), "check", "rules", str(RULES)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rules())} rules found" in result.stdout


def test_the_rules_unit_tests_pass() -> None:
    result = subprocess.run(
        [promtool(), "test", "rules", RULE_TESTS.name],
        cwd=MONITORING,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout + result.stderr


def github_anchors(markdown: str) -> set[str]:
    """The anchors GitHub gives a page's headings."""
    anchors = set()
    for heading in re.findall(r"^#+ (.+)$", markdown, re.MULTILINE):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        anchors.add(slug)
    return anchors


def test_every_alert_says_how_long_how_bad_what_and_where_to_read_on() -> None:
    anchors = github_anchors(OPERATIONS.read_text())
    assert alerts()
    for alert in alerts():
        name = alert["alert"]
        assert re.fullmatch(r"\d+[smh]", alert.get("for", "")), f"{name} has no for:"
        assert alert["labels"]["severity"] in ("warning", "critical"), name
        annotations = alert["annotations"]
        assert annotations["summary"] and annotations["description"], name
        page, _, anchor = annotations["runbook"].partition("#")
        assert page == "docs/operations.md", name
        assert anchor == name.lower(), name
        assert anchor in anchors, f"{name}: docs/operations.md has no section #{anchor}"


def test_every_alert_has_a_case_that_fires_and_one_that_does_not() -> None:
    fires: set[str] = set()
    quiet: set[str] = set()
    for test in rule_tests():
        for case in test.get("alert_rule_test", []):
            (fires if case.get("exp_alerts") else quiet).add(case["alertname"])
    names = {alert["alert"] for alert in alerts()}
    assert names - fires == set(), "alerts without a firing case"
    assert names - quiet == set(), "alerts without a case where they stay quiet"
    assert (fires | quiet) - names == set(), "tests of alerts that do not exist"


def test_the_runbooks_name_every_alert_and_its_threshold() -> None:
    operations = OPERATIONS.read_text()
    header = RULES.read_text().split("groups:", 1)[0]
    rows = [line for line in operations.splitlines() if line.startswith("| [Outbox")]
    assert len(rows) == len(alerts())
    for alert in alerts():
        name = alert["alert"]
        assert f"### {name}" in operations
        assert re.search(rf"#\s+{name}\s", header), f"{name}: no threshold in the header"
        row = next(r for r in rows if r.startswith(f"| [{name}]"))
        assert row.endswith(f"| {alert['for']} | {alert['labels']['severity']} |"), row


# -- the dashboard ---------------------------------------------------------------------------


def test_the_dashboard_is_importable_and_every_panel_has_a_query() -> None:
    board = dashboard()
    assert board["uid"] and board["title"]
    found = variables(board)
    assert found["datasource"]["type"] == "datasource"
    assert found["datasource"]["query"] == "prometheus"
    assert {"job", "instance", "namespace"} <= found.keys()
    ids = [panel["id"] for panel in panels(board)]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    shown = [panel for panel in panels(board) if panel["type"] != "row"]
    assert len(shown) >= 10
    for panel in shown:
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert panel["targets"], f"panel {panel['title']!r} has no query"
        for target in panel["targets"]:
            assert target["expr"].strip(), f"panel {panel['title']!r} has an empty query"
            assert target["datasource"]["uid"] == "${datasource}"
        assert panel.get("description"), f"panel {panel['title']!r} says nothing"


def test_promtool_parses_every_dashboard_query(tmp_path: Path) -> None:
    exported = worker_exposition_names()
    queries = dashboard_queries(exported)
    group = [{"record": f"dashboard:q{i}", "expr": expr} for i, (_, expr) in enumerate(queries)]
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": group}]}))
    result = subprocess.run(
        [promtool(), "check", "rules", str(path)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


# -- the names, against the worker's own metrics ---------------------------------------------


def worker_exposition() -> str:
    """What /metrics shows for a worker's metrics before any event: the metrics of
    WorkerMetrics, the key check and the metrics sink (with CONTRACT), as the worker
    puts them in one registry."""
    registry = CollectorRegistry()
    WorkerMetrics(registry)
    KeyStateMetric(registry)
    MetricsSink(registry, CONTRACT)
    return generate_latest(registry).decode()


def worker_exposition_names() -> set[str]:
    return exported_names(worker_exposition())


def test_every_metric_the_rules_and_the_dashboard_use_is_one_the_worker_exports() -> None:
    exported = worker_exposition_names()
    assert "outbox_batch_duration_seconds_bucket" in exported
    assert "app_runtime_ready_total" in exported
    assert unexported(exported) == {}


def test_every_state_the_rules_and_the_dashboard_name_is_one_the_worker_reports() -> None:
    exported = exported_label_values(worker_exposition())
    for metric, label, value in used_label_values():
        if label == "state" and metric in ("outbox_sink_state", "outbox_api_key_state"):
            assert (metric, label, value) in exported, (metric, label, value)
