"""deploy/grafana-dashboard.json and deploy/alerts.yaml: valid, and every metric they query is one the
code exports (felixpy-node with BGP and health checks, a route reflector, felixpy-controllers).

With promtool installed (Debian package `prometheus`) the rules are also checked by Prometheus's own
parser, the alerts are unit-tested on synthetic series (tests/unit/promtool/alerts_test.yaml), and
the exposition is linted: only Calico's own names may break Prometheus's naming conventions.
"""

from __future__ import annotations

import json
import pathlib
import re
import shutil
import subprocess
from typing import Any, Iterator

import pytest
import yaml

from felixpy.controllers.metrics import ControllerMetrics
from felixpy.node.health import HealthServer
from felixpy.node.metrics import Metrics, reflector_registry
from tests.unit.test_health import parse_exposition

ROOT = pathlib.Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana-dashboard.json"
ALERTS = ROOT / "deploy" / "alerts.yaml"

_FUNCTIONS_AND_KEYWORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "bool",
    "offset", "inf", "nan",
}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (functions, keywords, labels and durations dropped)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # strings (label values, templates)
    text = re.sub(r"\{[^}]*\}", "", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", "", text)  # range selectors
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)  # label lists
    names = set()
    for match in re.finditer(r"(?<![\w$.])([a-zA-Z_:][a-zA-Z0-9_:]*)(\s*\()?", text):
        name, call = match.group(1), match.group(2)
        if call or name.lower() in _FUNCTIONS_AND_KEYWORDS:
            continue
        names.add(name)
    return names


def exported_names() -> set[str]:
    """Every series name the code can export, with the suffixes of histograms and summaries."""
    checks = HealthServer()
    status = {"sidecar": "connected", "peers": [{"peer": "192.0.2.12", "type": "mesh", "node": "n2",
                                                  "state": "Established", "since": 1.0, "routesReceived": 1}]}
    texts = [Metrics(host="n1", bgp_status=lambda: status, health=checks).render(),
             reflector_registry("rr1", lambda: status, checks).render(),
             ControllerMetrics().render()]
    names: set[str] = set()
    for text in texts:
        types, samples = parse_exposition(text)
        names |= {name for name, _ in samples}
        for family, kind in types.items():
            names.add(family)
            if kind == "histogram":
                names |= {family + "_bucket", family + "_sum", family + "_count"}
            if kind == "summary":
                names |= {family + "_sum", family + "_count"}
    return names


def dashboard_exprs() -> Iterator[tuple[str, str]]:
    data = json.loads(DASHBOARD.read_text())
    for panel in data["panels"]:
        for target in panel.get("targets", []):
            yield panel["title"], target["expr"]


def alert_rules() -> list[dict[str, Any]]:
    data = yaml.safe_load(ALERTS.read_text())
    return [rule for group in data["groups"] for rule in group["rules"]]


def test_metric_names_parser() -> None:
    assert metric_names('sum by (ippool) (ipam_allocations_in_use) / on (ippool) ipam_ippool_size > 0.9') == {
        "ipam_allocations_in_use", "ipam_ippool_size"}
    assert metric_names('histogram_quantile(0.99, sum by (le) (rate(x_bucket{a="b:c"}[5m])))') == {"x_bucket"}
    assert metric_names('time() - last_ts > 900 or increase(f_total{instance=~"$instance"}[$__rate_interval]) > 2') == {
        "last_ts", "f_total"}


def test_dashboard_is_valid_grafana_json() -> None:
    data = json.loads(DASHBOARD.read_text())
    assert data["uid"] and data["title"] and data["schemaVersion"] >= 30
    ids = [p["id"] for p in data["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    variables = {v["name"] for v in data["templating"]["list"]}
    assert variables == {"datasource", "instance"}
    for panel in data["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24 and grid["h"] > 0
        if panel["type"] == "row":
            continue
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["expr"].count("(") == target["expr"].count(")"), target["expr"]
            # Only the dashboard's own variables are referenced.
            assert set(re.findall(r"\$(\w+)", target["expr"])) <= variables, target["expr"]


def test_alert_rules_are_valid() -> None:
    rules = alert_rules()
    names = [r["alert"] for r in rules]
    assert len(names) == len(set(names))
    # The alerts the issue asks for, at least.
    assert {"FelixpyAgentNotReady", "FelixpyBGPSessionDown", "FelixpyIPAMPoolNearExhaustion",
            "FelixpyDataplaneApplyFailures"} <= set(names)
    for rule in rules:
        assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}, rule["alert"]
        assert rule["labels"]["severity"] in ("critical", "warning")
        assert rule["annotations"]["summary"]


def test_every_metric_used_is_exported() -> None:
    exported = exported_names()
    missing = {}
    for where, expr in [*dashboard_exprs(), *((r["alert"], r["expr"]) for r in alert_rules())]:
        unknown = metric_names(expr) - exported
        if unknown:
            missing[where] = sorted(unknown)
    assert not missing, f"queried but not exported: {missing}"


def used_metric_names() -> set[str]:
    """For the e2e scrape test: every series name the dashboard and the alerts query."""
    names: set[str] = set()
    for _, expr in dashboard_exprs():
        names |= metric_names(expr)
    for rule in alert_rules():
        names |= metric_names(rule["expr"])
    return names


PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool not installed (apt-get install prometheus)")


@needs_promtool
def test_promtool_accepts_and_fires_the_alerts() -> None:
    assert PROMTOOL is not None
    check = subprocess.run([PROMTOOL, "check", "rules", str(ALERTS)], capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr
    test = subprocess.run([PROMTOOL, "test", "rules", "alerts_test.yaml"], capture_output=True, text=True,
                          timeout=60, cwd=ROOT / "tests" / "unit" / "promtool")
    assert test.returncode == 0, test.stdout + test.stderr


@needs_promtool
def test_promtool_lint_only_flags_calicos_own_names() -> None:
    assert PROMTOOL is not None
    status = {"sidecar": "connected", "peers": []}
    for text in (Metrics(host="n1", bgp_status=lambda: status, health=HealthServer()).render(),
                 ControllerMetrics().render()):
        lint = subprocess.run([PROMTOOL, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60)
        complaints = [line for line in (lint.stdout + lint.stderr).splitlines() if line.strip()]
        ours = [line for line in complaints if not line.startswith(("felix_", "ipam_"))]
        assert not ours, ours


def documented_names() -> set[str]:
    """Metric names in the tables of docs/operations.md (rows starting with a backticked name)."""
    names: set[str] = set()
    for line in (ROOT / "docs" / "operations.md").read_text().splitlines():
        if line.startswith("| `"):
            first_cell = line.split("|")[1]
            names |= set(re.findall(r"`((?:felix|felixpy|ipam|process)_[a-z0-9_]+)`", first_cell))
    return names


def test_docs_describe_exactly_the_exported_metrics() -> None:
    status = {"sidecar": "connected", "peers": []}
    checks = HealthServer()
    families: set[str] = set()
    for text in (Metrics(host="n1", bgp_status=lambda: status, health=checks).render(),
                 reflector_registry("rr1", lambda: status, checks).render(), ControllerMetrics().render()):
        families |= set(parse_exposition(text)[0])
    documented = documented_names()
    assert sorted(families - documented) == [], "exported but not in docs/operations.md"
    assert sorted(documented - families) == [], "in docs/operations.md but not exported"
