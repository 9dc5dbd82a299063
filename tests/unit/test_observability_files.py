"""serving/monitoring (Grafana dashboard, Prometheus alert rules, ServiceMonitor) and the
Prometheus-provider templates in serving/examples: valid files that use the metric names the
controller really exports. The alert rules go through Debian's `promtool check rules` and a
`promtool test rules` unit test of each alert."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from canaryml.control.types import Action, Decision
from canaryml.serving.server import ServeMetrics
from tests.harness.prometheus import ensure_prometheus, find_binary

REPO = Path(__file__).resolve().parents[2]
MONITORING = REPO / "serving" / "monitoring"
EXAMPLES = REPO / "serving" / "examples"
DASHBOARD = MONITORING / "grafana-dashboard.json"
RULES = MONITORING / "canaryml.rules"
METRIC_RE = re.compile(r"\b(canaryml_[a-z_]+)\b")


@pytest.fixture(scope="module")
def exported() -> set[str]:
    """Sample names on the controller's /metrics once every metric has a value."""
    m = ServeMetrics()
    m.observe("shop/web", Decision(Action.CONTINUE, "ok", score=0.2))
    m.error("source")
    m.skipped("unknown_target")
    m.set_model("canary-scorer/3")
    text = generate_latest(m.registry).decode()
    return {s.name for fam in text_string_to_metric_families(text) for s in fam.samples}


def _metric_names(expr: str) -> set[str]:
    return set(METRIC_RE.findall(expr))


def _panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for p in dashboard["panels"]:
        out.append(p)
        out += p.get("panels", [])  # collapsed rows
    return out


def test_exported_names_are_what_the_files_assume(exported: set[str]) -> None:
    assert {"canaryml_score", "canaryml_decisions_total", "canaryml_errors_total",
            "canaryml_skipped_actions_total", "canaryml_model_info"} <= exported


def test_dashboard_panels_query_exported_metrics(exported: set[str]) -> None:
    dash = json.loads(DASHBOARD.read_text())
    assert dash["title"] and dash["uid"] and dash["schemaVersion"] >= 30
    panels = _panels(dash)
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    used: set[str] = set()
    for p in panels:
        assert p["title"] and p["type"] in {"stat", "timeseries", "table", "gauge", "row"}
        assert {"x", "y", "w", "h"} <= set(p["gridPos"])
        for t in p.get("targets", []):
            names = _metric_names(t["expr"])
            assert names or "up{" in t["expr"], f"panel {p['title']!r}: {t['expr']}"
            assert names <= exported, f"panel {p['title']!r} queries {names - exported}"
            used |= names
    for a in dash["annotations"]["list"]:
        assert _metric_names(a["expr"]) <= exported
    # what the issue asks the dashboard to show
    assert {"canaryml_score", "canaryml_decisions_total", "canaryml_errors_total",
            "canaryml_model_info"} <= used
    variables = {v["name"] for v in dash["templating"]["list"]}
    for p in panels:
        for t in p.get("targets", []):
            assert set(re.findall(r"\$(\w+)", t["expr"])) <= variables | {"__range"}


@pytest.fixture(scope="module")
def promtool() -> str:
    binary = find_binary("promtool")
    if binary is None:  # the Debian `prometheus` package ships promtool too
        ensure_prometheus()
        binary = find_binary("promtool")
    assert binary, "promtool missing: apt-get install -y prometheus"
    return binary


def test_alert_rules_pass_promtool_and_use_exported_metrics(promtool: str,
                                                           exported: set[str]) -> None:
    proc = subprocess.run([promtool, "check", "rules", str(RULES)], capture_output=True,
                          text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rules = [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]
    alerts = {r["alert"] for r in rules}
    assert {"CanarymlControllerDown", "CanarymlErrorsRising",
            "CanarymlCanaryPausedTooLong"} <= alerts
    for r in rules:
        assert _metric_names(r["expr"]) <= exported, r["alert"]
        assert r["labels"]["severity"] in ("critical", "warning")
        assert r["annotations"]["summary"] and r["annotations"]["description"]


RULE_TESTS = """
rule_files: [{rules}]
evaluation_interval: 1m
tests:
  - interval: 1m
    input_series:
      - series: 'up{{job="canaryml-controller", instance="c:8080"}}'
        values: '1 1 0x10'
      - series: 'canaryml_errors_total{{job="canaryml-controller", kind="source"}}'
        values: '0+5x40'
      - series: 'canaryml_errors_total{{job="canaryml-controller", kind="actuator"}}'
        values: '0x40'
      - series: 'canaryml_decisions_total{{deployment="shop/web", action="pause"}}'
        values: '0+2x60'
      - series: 'canaryml_decisions_total{{deployment="shop/api", action="pause"}}'
        values: '0+2x60'
      - series: 'canaryml_decisions_total{{deployment="shop/api", action="continue"}}'
        values: '0+1x60'
    alert_rule_test:
      - eval_time: 10m
        alertname: CanarymlControllerDown
        exp_alerts:
          - exp_labels: {{severity: critical}}
      - eval_time: 3m
        alertname: CanarymlControllerDown
        exp_alerts: []
      - eval_time: 30m
        alertname: CanarymlErrorsRising
        exp_alerts:
          - exp_labels: {{severity: warning, kind: source}}
      - eval_time: 50m
        alertname: CanarymlCanaryPausedTooLong
        exp_alerts:
          - exp_labels: {{severity: warning, deployment: shop/web}}
      - eval_time: 20m
        alertname: CanarymlCanaryPausedTooLong
        exp_alerts: []
"""


def test_alerts_fire_when_they_should(promtool: str, tmp_path: Path) -> None:
    # promtool compares annotations verbatim; the test is about expr/for/labels, so drop them
    rules = yaml.safe_load(RULES.read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            rule.pop("annotations", None)
    bare = tmp_path / "canaryml.rules"
    bare.write_text(yaml.safe_dump(rules))
    tests = tmp_path / "rules_test.yaml"
    tests.write_text(RULE_TESTS.format(rules=json.dumps(str(bare))))
    proc = subprocess.run([promtool, "test", "rules", str(tests)], capture_output=True,
                          text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _doc(path: Path) -> dict[str, Any]:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    assert len(docs) == 1, path
    return docs[0]


def test_servicemonitor_selects_the_controller_service() -> None:
    sm = _doc(MONITORING / "servicemonitor.yaml")
    svc = _doc(REPO / "serving" / "k8s" / "service.yaml")
    assert (sm["apiVersion"], sm["kind"]) == ("monitoring.coreos.com/v1", "ServiceMonitor")
    labels = svc["metadata"]["labels"]
    assert sm["spec"]["selector"]["matchLabels"].items() <= labels.items()
    ports = {p["name"] for p in svc["spec"]["ports"]}
    for ep in sm["spec"]["endpoints"]:
        assert ep["port"] in ports and ep["path"] == "/metrics"
    # the alert rules and the dashboard select the job the operator names after the Service
    assert f'job="{svc["metadata"]["name"]}"' in RULES.read_text()
    dash = json.loads(DASHBOARD.read_text())
    job = next(v for v in dash["templating"]["list"] if v["name"] == "job")
    assert job["query"] == svc["metadata"]["name"]


def test_prometheus_provider_templates_query_the_score(exported: set[str]) -> None:
    argo = _doc(EXAMPLES / "analysistemplate-prometheus.yaml")
    assert (argo["apiVersion"], argo["kind"]) == ("argoproj.io/v1alpha1", "AnalysisTemplate")
    (metric,) = argo["spec"]["metrics"]
    query = metric["provider"]["prometheus"]["query"]
    assert _metric_names(query) == {"canaryml_score"} <= exported
    args = {a["name"] for a in argo["spec"]["args"]}
    assert set(re.findall(r"\{\{args\.([\w-]+)\}\}", json.dumps(argo))) <= args
    assert "result[0]" in metric["successCondition"] and "len(result)" in metric["failureCondition"]

    flagger = _doc(EXAMPLES / "flagger-metrictemplate.yaml")
    assert (flagger["apiVersion"], flagger["kind"]) == ("flagger.app/v1beta1", "MetricTemplate")
    assert flagger["spec"]["provider"]["type"] == "prometheus"
    assert _metric_names(flagger["spec"]["query"]) == {"canaryml_score"}
    # the web-provider template stays beside it
    assert _doc(EXAMPLES / "analysistemplate.yaml")["metadata"]["name"] == "canaryml-verdict"
