"""`canaryml forward` → tansu → `canaryml serve serve.source.kind=kafka` → decisions, with a
real Prometheus scraping the service (tests/e2e/liveapp) and a real node exporter as the metric
origin (issue 15): the supported producer of the real-time pipeline, replacing the test-only
bridge."""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from canaryml.cli import compose, main
from canaryml.serving.decision_log import DecisionLog
from canaryml.serving.kafka import GROUPS
from tests.e2e.liveapp.stack import SELECTORS, labelled_stack, wait_until_every_query_answers
from tests.harness.kafka import free_port, start_tansu
from tests.harness.prometheus import wait_for_scrapes

pytestmark = [pytest.mark.services, pytest.mark.slow, pytest.mark.timeout(600)]

TOPIC = "canary-telemetry"


def deployments_override(key: str) -> str:
    sel = {g: s.replace('"', '\\"') for g, s in SELECTORS.items()}
    return (f"{key}=[{{id: web, selectors: {{canary: \"{sel['canary']}\", "
            f"baseline: \"{sel['baseline']}\"}}}}]")


def scrape(url: str) -> dict[str, float]:
    out = {}
    for line in requests.get(url + "/metrics", timeout=5).text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def until(cond, timeout_s: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what}")
        time.sleep(0.3)


def read_topic(bootstrap: str, n: int) -> list[tuple[bytes | None, dict[str, object]]]:
    from confluent_kafka import Consumer

    c = Consumer({"bootstrap.servers": bootstrap, "group.id": "test-reader",
                  "auto.offset.reset": "earliest", "session.timeout.ms": 6000})
    c.subscribe([TOPIC])
    got: list[tuple[bytes | None, dict[str, object]]] = []
    deadline = time.monotonic() + 30
    try:
        while len(got) < n and time.monotonic() < deadline:
            for msg in c.consume(num_messages=1000, timeout=1.0):
                if not msg.error():
                    got.append((msg.key(), json.loads(msg.value() or b"null")))
    finally:
        c.close()
    return got


def test_forwarder_to_tansu_to_serve_kafka_decides(
        tmp_path: Path, tiny_scorer_dir: Path, mlflow_uri: str,
        capsys: pytest.CaptureFixture[str]) -> None:
    catalog = list(compose("forward", []).metrics)
    with labelled_stack(tmp_path) as stack, start_tansu(tmp_path / "tansu") as broker:
        broker.create_topic(TOPIC, 2)
        wait_until_every_query_answers(
            stack.prom_url, dict(compose("serve", []).serve.source.prometheus.queries))
        # history for the backfill: the controller's first window is then a full one
        wait_for_scrapes(stack.prom_url, 'up{track="canary"}', 25, timeout_s=60)
        http_port = free_port()
        fwd = subprocess.Popen(
            [sys.executable, "-m", "canaryml", "forward", deployments_override(
                "forward.deployments"), f"forward.prometheus.url={stack.prom_url}",
             f"forward.kafka.bootstrap_servers={broker.bootstrap}", "forward.step_s=1",
             "forward.backfill_steps=30", f"forward.http.port={http_port}"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        fwd_url = f"http://127.0.0.1:{http_port}"
        try:
            def forwarded() -> bool:
                try:
                    return scrape(fwd_url).get(
                        'canaryml_forward_events_total{deployment="web"}', 0) > 0
                except requests.RequestException:
                    assert fwd.poll() is None, fwd.communicate()[0]
                    return False

            until(forwarded, 60, "the forwarder's first delivered events")
            log_path = tmp_path / "decisions.sqlite"
            assert main(["serve", "serve.source.kind=kafka",
                         f"serve.source.kafka.bootstrap_servers={broker.bootstrap}",
                         "serve.source.kafka.session_timeout_ms=6000",
                         f"serve.model={tiny_scorer_dir}", "serve.step_s=1",
                         "policy.monitoring_interval_s=1", "serve.max_ticks=15",
                         "serve.http.port=0", f"serve.decision_log={log_path}",
                         # the CLI with a shadow challenger (here the same model): logged only
                         f"serve.shadow.model={tiny_scorer_dir}",
                         f"serve.shadow.log={tmp_path / 'shadow.jsonl'}"]) == 0
            metrics = scrape(fwd_url)
            health = requests.get(fwd_url + "/healthz", timeout=5).json()
        finally:
            fwd.send_signal(signal.SIGTERM)
            out, _ = fwd.communicate(timeout=30)
        assert fwd.returncode == 0, out
        assert "canaryml forward: stopped after" in out
        events = read_topic(broker.bootstrap, 200)

    # serve decided on the forwarded telemetry: every decision scored
    with DecisionLog(log_path) as log:
        entries = log.entries("web")
    assert len(entries) >= 5
    for e in entries:
        assert e.score is not None and math.isfinite(e.score), e.reason
        assert "fail-safe" not in e.reason and "warming up" not in e.reason, e.reason
    # the shadow challenger scored the same windows: one record per decision, all agreeing
    out = capsys.readouterr().out
    assert "(logged, never applied)" in out and "agreement 1.000" in out
    shadow = [json.loads(line) for line in (tmp_path / "shadow.jsonl").read_text().splitlines()]
    assert [(s["step"], s["challenger_action"]) for s in shadow] == [
        (e.step, str(e.action)) for e in entries]
    assert all(s["agree"] and s["challenger_score"] == pytest.approx(s["champion_score"])
               for s in shadow)
    # the documented event format, keyed by deployment, app and infra metrics, both groups
    assert events
    assert {k for k, _ in events} == {b"web"}
    assert all(set(ev) == {"deployment_id", "group", "metric", "value", "timestamp"}
               for _, ev in events)
    assert {ev["group"] for _, ev in events} == set(GROUPS)
    assert {str(ev["metric"]) for _, ev in events} == set(catalog)
    # its own /metrics and /healthz
    assert metrics['canaryml_forward_events_total{deployment="web"}'] >= len(catalog) * 2 * 30
    assert metrics["canaryml_forward_ticks_total"] >= 1
    assert not any(k.startswith("canaryml_forward_errors_total") and v > 0
                   for k, v in metrics.items())
    assert health["status"] == "ok", health
