"""Issue 16 #7 against a real broker (tansu): a future-dated event no longer blinds a
deployment, non-finite values are rejected and counted, and a broker outage is counted and shown
in /healthz even when no deployment is owned (so no fetch could fail)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import requests
from confluent_kafka import Producer

from canaryml.serving.actuators import DryRunActuator
from canaryml.serving.kafka import KafkaSource
from tests.harness.kafka import TansuBroker
from tests.integration.test_kafka_source import FAST, TOPIC
from tests.integration.test_serve_faults import POLICY, serve_cfg, until

pytestmark = [pytest.mark.services, pytest.mark.timeout(180)]

NOW = 1_700_000_000.0  # the controller's clock in these tests


def _source(broker: TansuBroker, group: str = "ctl") -> KafkaSource:
    return KafkaSource(broker.bootstrap, TOPIC, group, ["latency_p99", "error_rate"], step_s=10,
                       buffer_steps=100, config=FAST, max_future_s=300, clock=lambda: NOW)


def test_future_dated_and_non_finite_events_are_rejected_and_counted(tmp_path: Path) -> None:
    broker = TansuBroker(tmp_path / "tansu")
    broker.start()
    try:
        broker.create_topic(TOPIC, 1)
        p = Producer({"bootstrap.servers": broker.bootstrap})

        def send(value: str, ts: str) -> None:  # raw JSON: NaN/Infinity as Python emits them
            p.produce(TOPIC, key="d1", value=(
                '{"deployment_id": "d1", "group": "canary", "metric": "latency_p99", '
                f'"value": {value}, "timestamp": {ts}}}').encode())

        send("0.9", str(NOW + 365 * 86400))  # a producer with its clock a year ahead
        send("NaN", str(NOW - 10))
        send("Infinity", str(NOW - 10))
        send("0.5", "Infinity")
        for k in range(3):
            send(str(0.1 * (k + 1)), str(NOW - 20 + 10 * k))  # real telemetry, now-20..now
        assert p.flush(10) == 0
        src = _source(broker)
        try:
            until(lambda: src.poll(0.2) >= 0 and src.stats["events"] >= 3, 30, "three events")
            w = src.fetch("d1", NOW, 3)
            # before: the future event became the buffer's newest slot and all three were "late"
            assert np.allclose(w.canary[:, 0], [0.1, 0.2, 0.3])
            assert np.isfinite(w.canary[:, 0]).all()
            assert src.stats["future"] == 1 and src.stats["non_finite"] == 3
            assert src.stats["late"] == 0 and src.stats["events"] == 3
        finally:
            src.close()
    finally:
        broker.stop()


def test_broker_outage_is_counted_and_in_healthz_without_any_deployment(
        mlflow_uri: str, tmp_path: Path, tiny_scorer_dir: Path) -> None:
    from canaryml.tasks import serve as serve_task

    broker = TansuBroker(tmp_path / "tansu")
    broker.start()
    broker.create_topic(TOPIC, 1)
    serve = serve_cfg(tmp_path, f"serve.model={tiny_scorer_dir}")
    serve["deployments"] = []  # pure Kafka mode, and nothing has been produced: owns nothing
    from canaryml.models.scorer import CanaryScorer

    metrics = list(CanaryScorer.load(tiny_scorer_dir).metrics)  # serve refuses a source lacking one
    src = KafkaSource(broker.bootstrap, TOPIC, "ctl", metrics, step_s=1,
                      poll_timeout_s=0.2, config=FAST)
    svc = serve_task.build(serve, POLICY, source=src, actuator=DryRunActuator())
    assert svc.server is not None
    url = svc.server.url
    try:
        svc.tick()
        assert svc.loop.health.snapshot()["status"] == "ok"
        broker.stop()

        def reported_down() -> bool:
            svc.tick()
            return "kafka" in svc.loop.health.snapshot()["reasons"]
        until(reported_down, 60, "the outage in health")
        health = requests.get(f"{url}/healthz", timeout=5)
        assert health.status_code == 503
        assert "kafka broker unreachable" in health.json()["reasons"]["kafka"]
        for _ in range(2):
            svc.tick()  # still down: one outage, counted once
        metrics = requests.get(f"{url}/metrics", timeout=5).text
        assert 'canaryml_errors_total{kind="kafka_down"} 1.0' in metrics
        assert src.stats["broker_down"] >= 1
        broker.start()

        def recovered() -> bool:
            svc.tick()
            return svc.loop.health.snapshot()["status"] == "ok"
        until(recovered, 60, "health to recover after the broker is back")
        assert svc.entries == 0  # nothing was decided: the outage was visible without a fetch
    finally:
        svc.close()
        broker.stop()
