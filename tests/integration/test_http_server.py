"""The observability server over real HTTP, scraped by a real Prometheus."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest
import requests

from canaryml.control.types import Action, Decision
from canaryml.serving.server import Health, ObservabilityServer, ServeMetrics
from tests.harness.prometheus import start_prometheus

pytestmark = [pytest.mark.services, pytest.mark.timeout(120)]


def test_metrics_and_healthz_over_http() -> None:
    metrics, health = ServeMetrics(), Health()
    metrics.set_model("canary-scorer/7")
    for d in (Decision(Action.CONTINUE, "ok", 0.1), Decision(Action.SHRINK, "high", 0.91)):
        metrics.observe("d1", d)
    metrics.error("source")
    health.ok("source")
    with ObservabilityServer(metrics, health) as srv:
        text = requests.get(srv.url + "/metrics", timeout=5).text
        assert 'canaryml_score{deployment="d1"} 0.91' in text
        assert 'canaryml_decisions_total{action="shrink",deployment="d1"} 1.0' in text
        assert 'canaryml_decisions_total{action="continue",deployment="d1"} 1.0' in text
        assert 'canaryml_errors_total{kind="source"} 1.0' in text
        assert 'canaryml_model_info{version="canary-scorer/7"} 1.0' in text
        r = requests.get(srv.url + "/healthz", timeout=5)
        assert r.status_code == 200 and r.json()["status"] == "ok"
        health.degraded("source", "prometheus unreachable after 4 attempts")
        r = requests.get(srv.url + "/healthz", timeout=5)
        assert r.status_code == 503
        assert r.json()["reasons"] == {"source": "prometheus unreachable after 4 attempts"}
        assert requests.get(srv.url + "/nope", timeout=5).status_code == 404


@pytest.mark.skipif(shutil.which("prometheus") is None, reason="needs the Debian prometheus package")
def test_prometheus_scrapes_the_controller(tmp_path: Path) -> None:
    metrics = ServeMetrics()
    metrics.observe("web-7", Decision(Action.SHRINK, "high", 0.87))
    with (ObservabilityServer(metrics, Health()) as srv,
          start_prometheus(tmp_path, [f"127.0.0.1:{srv.port}"]) as prom_url):
        deadline, result = time.monotonic() + 20, list[dict]()
        while not result and time.monotonic() < deadline:
            body = requests.get(prom_url + "/api/v1/query", timeout=5,
                                params={"query": 'canaryml_score{deployment="web-7"}'}).json()
            result = body["data"]["result"]
            time.sleep(0.3)
    assert result and float(result[0]["value"][1]) == pytest.approx(0.87)
