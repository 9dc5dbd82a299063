"""Prometheus → Kafka for the live canary test, through the supported forwarder
(`canaryml forward`, canaryml.serving.forward): every `interval_s` each (deployment, group,
metric) is pulled on the step grid and produced as one `canaryml.serving.kafka` event
(`{"deployment_id", "group", "metric", "value", "timestamp"}`, keyed by deployment)."""

from __future__ import annotations

import threading
from collections.abc import Mapping

from canaryml.serving.forward import Forwarder
from canaryml.serving.prometheus import PrometheusSource, Selectors


class PromToKafkaBridge:
    """The forwarder in a background thread, with the test's selectors and queries."""

    def __init__(self, prom_url: str, bootstrap: str, topic: str,
                 selectors: Mapping[str, Mapping[str, str]], queries: Mapping[str, str],
                 interval_s: float = 1.0) -> None:
        from confluent_kafka import Producer

        self.interval_s = interval_s
        source = PrometheusSource(prom_url, dict(queries),
                                  {dep: Selectors(g["canary"], g.get("baseline"))
                                   for dep, g in selectors.items()},
                                  step_s=interval_s, metrics=list(queries), timeout_s=2.0,
                                  retries=1)
        self.forwarder = Forwarder(source, Producer({"bootstrap.servers": bootstrap,
                                                     "linger.ms": 5}),
                                   topic, list(selectors), backfill_steps=60)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self.forwarder.run, name="bridge", daemon=True,
                                        kwargs={"interval_s": interval_s, "stop": self._stop})

    @property
    def produced(self) -> int:
        return self.forwarder.produced

    def start(self) -> PromToKafkaBridge:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)
        self.forwarder.close()
