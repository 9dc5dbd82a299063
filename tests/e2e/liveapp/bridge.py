"""Prometheus → Kafka bridge: every second, the latest value of each telemetry query for each
(deployment, group) is produced to a Kafka topic as one `canaryml.serving.kafka` event
(`{"deployment_id", "group", "metric", "value", "timestamp"}`, keyed by deployment)."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Mapping

import requests


class PromToKafkaBridge:
    def __init__(self, prom_url: str, bootstrap: str, topic: str,
                 selectors: Mapping[str, Mapping[str, str]], queries: Mapping[str, str],
                 interval_s: float = 1.0) -> None:
        from confluent_kafka import Producer

        self.prom_url = prom_url
        self.topic = topic
        self.selectors = selectors  # deployment -> group -> label matchers
        self.queries = queries  # metric -> PromQL with {selector}
        self.interval_s = interval_s
        self.producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5})
        self.produced = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bridge", daemon=True)

    def _query(self, q: str) -> float | None:
        try:
            body = requests.get(self.prom_url + "/api/v1/query", params={"query": q},
                                timeout=2).json()
            result = body["data"]["result"]
            return float(result[0]["value"][1]) if result else None
        except (requests.RequestException, ValueError, KeyError, IndexError):
            return None

    def tick(self) -> None:
        ts = time.time()
        for dep, groups in self.selectors.items():
            for group, sel in groups.items():
                for metric, template in self.queries.items():
                    v = self._query(template.replace("{selector}", sel))
                    if v is None or v != v:
                        continue
                    ev = {"deployment_id": dep, "group": group, "metric": metric, "value": v,
                          "timestamp": ts}
                    self.producer.produce(self.topic, json.dumps(ev).encode(), key=dep.encode())
                    self.produced += 1
        self.producer.flush(5)

    def _run(self) -> None:
        while not self._stop.is_set():
            t0 = time.monotonic()
            self.tick()
            self._stop.wait(max(0.0, self.interval_s - (time.monotonic() - t0)))

    def start(self) -> PromToKafkaBridge:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)
        self.producer.flush(5)
