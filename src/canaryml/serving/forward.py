"""Telemetry forwarder (`canaryml forward`): Prometheus → the Kafka topic `canaryml serve
serve.source.kind=kafka` consumes.

Every `interval_s` the forwarder pulls, for each configured deployment, the catalog's app and
infra metrics of its canary and baseline groups from Prometheus — the same PromQL templates and
label selectors as serve's Prometheus source (`PrometheusSource.fetch`, so both paths see the
same grid values) — and produces one event per finite value to the topic, keyed by deployment
(so a deployment's events stay on one partition, hence one controller replica), in the event
format of `canaryml.serving.kafka`:

    key = deployment_id
    {"deployment_id": "web", "group": "canary", "metric": "latency_p99", "value": 0.41,
     "timestamp": 1764187200.0}

- **Batching.** One tick's events go out through the producer's batches (`linger_ms`,
  `batch_num_messages`) and are flushed once per tick; Prometheus is asked once per
  (deployment, group, metric) per tick, for every grid step not yet delivered.
- **Retries.** Prometheus queries retry with backoff (`prometheus.retries`, `backoff_s`);
  the producer retries each message (`kafka.retries`). A deployment whose tick could not be
  pulled or delivered in full is not advanced: its missed steps are pulled and sent again at
  the next tick (at most `max_catchup_steps`), so an outage leaves no gap; a re-sent event
  lands on the same grid slot and the consumer keeps the last (idempotent).
- **History.** On start each deployment's last `backfill_steps` steps are sent, so the
  controller has a full window at its first tick.
- **Observability.** Its own `/metrics` (`canaryml_forward_*`), `/healthz` (components
  `prometheus` and `kafka`) and `/livez`.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge

from canaryml.control.types import Window
from canaryml.errors import ConfigError
from canaryml.serving.prometheus import PrometheusSource
from canaryml.serving.server import Health, ObservabilityServer
from canaryml.serving.ticks import run_ticks

log = logging.getLogger(__name__)


class ForwardMetrics:
    """The forwarder's own metrics, in a registry of its own."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.events = Counter("canaryml_forward_events", "Telemetry events delivered to Kafka",
                              ["deployment"], registry=self.registry)
        self.errors = Counter("canaryml_forward_errors",
                              "Errors by kind (prometheus: a pull failed; kafka: events not "
                              "delivered; http)", ["kind"], registry=self.registry)
        self.ticks = Counter("canaryml_forward_ticks", "Forwarding ticks",
                             registry=self.registry)
        self.last = Gauge("canaryml_forward_last_timestamp_seconds",
                          "Newest grid step delivered per deployment (epoch seconds)",
                          ["deployment"], registry=self.registry)
        self.batch = Gauge("canaryml_forward_batch_events",
                           "Events produced in the last tick", registry=self.registry)

    def error(self, kind: str) -> None:
        self.errors.labels(kind).inc()


def events_of(window: Window, since_s: float) -> list[dict[str, Any]]:
    """The window's finite values at or after `since_s` as events (canary, then baseline)."""
    out = []
    groups = {"canary": window.canary, "baseline": window.baseline}
    for group, values in groups.items():
        if values is None:
            continue
        arr = np.asarray(values, dtype=np.float64)
        for i, ts in enumerate(np.asarray(window.timestamps_s).tolist()):
            if ts < since_s:
                continue
            for j, metric in enumerate(window.metrics):
                v = float(arr[i, j])
                if math.isfinite(v):
                    out.append({"deployment_id": window.deployment_id, "group": group,
                                "metric": metric, "value": v, "timestamp": float(ts)})
    return out


class Forwarder:
    """Pulls each deployment's telemetry from Prometheus and produces it to Kafka (see the
    module docstring). `producer` is a confluent_kafka Producer (or anything with its
    produce/poll/flush)."""

    def __init__(self, source: PrometheusSource, producer: Any, topic: str,
                 deployments: Sequence[str], *, backfill_steps: int = 60,
                 max_catchup_steps: int = 240, flush_timeout_s: float = 10.0,
                 metrics: ForwardMetrics | None = None, health: Health | None = None,
                 clock: Callable[[], float] = time.time, discovery: Any = None) -> None:
        if backfill_steps < 1 or max_catchup_steps < 1:
            raise ConfigError(f"forward.backfill_steps={backfill_steps} and "
                              f"forward.max_catchup_steps={max_catchup_steps} must be >= 1")
        if not deployments and discovery is None:
            raise ConfigError("forward.deployments is empty: list the deployments to forward "
                              "as [{id, selectors: {canary, baseline}}] (default: "
                              "serve.deployments) or discover them (forward.discover, default "
                              "serve.discover)")
        self.discovery = discovery  # KubeDiscovery: canary objects by label, re-listed per tick
        self._discovered: dict[str, dict[str, Any]] = {}
        self.source = source
        self.producer = producer
        self.topic = str(topic)
        self.deployments = [str(d) for d in deployments]
        self.backfill_steps = int(backfill_steps)
        self.max_catchup_steps = int(max_catchup_steps)
        self.flush_timeout_s = float(flush_timeout_s)
        self.metrics = metrics or ForwardMetrics()
        self.health = health or Health()
        self.clock = clock
        self.step_s = source.step_s
        self.next_s: dict[str, float] = {}  # per deployment: the first grid step not delivered
        self.produced = 0
        self._undelivered: dict[str, int] = {}
        self._delivered: dict[str, int] = {}
        self._tick = 0

    def _on_delivery(self, dep: str) -> Callable[[Any, Any], None]:
        tick = self._tick  # a report arriving after its tick was given up counts, not decides

        def done(err: Any, _msg: Any) -> None:
            current = tick == self._tick
            if err is not None:
                if current:
                    self._undelivered[dep] = self._undelivered.get(dep, 0) + 1
                log.debug("kafka delivery failed for deployment=%s: %s", dep, err)
                return
            self.metrics.events.labels(dep).inc()
            self.produced += 1
            if current:
                self._delivered[dep] = self._delivered.get(dep, 0) + 1

        return done

    def _produce(self, dep: str, event: Mapping[str, Any]) -> None:
        value = json.dumps(event).encode()
        for attempt in range(3):
            try:
                self.producer.produce(self.topic, value=value, key=dep.encode(),
                                      on_delivery=self._on_delivery(dep))
                return
            except BufferError:  # the local queue is full: let it drain, then try again
                self.producer.poll(1.0 * (attempt + 1))
        self._undelivered[dep] = self._undelivered.get(dep, 0) + 1

    def discover(self) -> None:
        """Add discovered canaries (their canaryml.io/canary-selector annotations) to the
        deployments forwarded; on an API error keep the known ones and say so."""
        if self.discovery is None:
            return
        try:
            found = self.discovery.discover()
        except Exception as exc:
            self.metrics.error("discovery")
            self.health.degraded("discovery", f"{type(exc).__name__}: {exc}")
            log.warning("forward: discovery failed (%s); keeping %d deployment(s)", exc,
                        len(self.deployments))
            return
        self.health.ok("discovery")
        for entry in found:
            dep = str(entry["id"])
            if self._discovered.get(dep) == entry:
                continue
            why = self.source.wire(dict(entry))
            if why is not None:
                log.warning("forward: discovered %s skipped: %s", dep, why)
                continue
            self._discovered[dep] = dict(entry)
            if dep not in self.deployments:
                self.deployments.append(dep)
                log.info("forward: discovered deployment %s", dep)

    def tick(self) -> int:
        """One round: pull every deployment's undelivered steps, produce, flush. Returns the
        number of events delivered."""
        self.discover()
        end = math.floor(self.clock() / self.step_s) * self.step_s
        self._tick += 1
        sent: dict[str, tuple[float, int]] = {}
        pulled_all = True
        for dep in self.deployments:
            # the first tick's backfill start is kept even if that tick fails (no gap)
            first = self.next_s.setdefault(dep, end - (self.backfill_steps - 1) * self.step_s)
            first = max(first, end - (self.max_catchup_steps - 1) * self.step_s)
            if first > end:
                continue
            steps = round((end - first) / self.step_s) + 1
            try:
                window = self.source.fetch(dep, end, steps)
            except Exception as exc:  # Prometheus down or a bad query: retried next tick
                pulled_all = False
                self.metrics.error("prometheus")
                self.health.degraded("prometheus", f"{type(exc).__name__}: {exc}")
                log.warning("forward: pulling deployment=%s failed (%s); its %d step(s) are "
                            "retried at the next tick", dep, exc, steps)
                continue
            events = events_of(window, first)
            self._undelivered[dep] = 0
            self._delivered[dep] = 0
            for ev in events:
                self._produce(dep, ev)
            self.producer.poll(0)
            sent[dep] = (end, len(events))
        if pulled_all:
            self.health.ok("prometheus")
        left = self.producer.flush(self.flush_timeout_s) if sent else 0
        delivered = 0
        failed = []
        for dep, (upto, n) in sent.items():
            ok = self._delivered.get(dep, 0)
            delivered += ok
            if left == 0 and self._undelivered.get(dep, 0) == 0 and ok == n:
                self.next_s[dep] = upto + self.step_s
                self.metrics.last.labels(dep).set(upto)
            else:
                failed.append(f"{dep} ({n - ok} of {n} undelivered)")
        if failed:
            self.metrics.error("kafka")
            why = (f"events not delivered to {self.topic}: {', '.join(failed)}; re-sent at the "
                   "next tick (check forward.kafka.bootstrap_servers and the broker)")
            self.health.degraded("kafka", why)
            log.warning("forward: %s", why)
        elif sent:
            self.health.ok("kafka")
        self.metrics.ticks.inc()
        self.metrics.batch.set(sum(n for _, n in sent.values()))
        return delivered

    def run(self, *, interval_s: float, max_ticks: int | None = None,
            duration_s: float | None = None, stop: threading.Event | None = None) -> int:
        """Tick every `interval_s` until a limit or `stop`; returns the number of ticks."""
        return run_ticks(self.tick, interval_s=interval_s, max_ticks=max_ticks,
                         duration_s=duration_s, stop=stop)

    def close(self) -> None:
        self.producer.flush(self.flush_timeout_s)


def build(fwd: Mapping[str, Any], catalog_names: Sequence[str], *, http: bool = True,
          producer: Any = None) -> tuple[Forwarder, ObservabilityServer | None]:
    """A Forwarder (and its HTTP server, started) from the plain `forward` mapping
    (`OmegaConf.to_container(cfg.forward, resolve=True)`)."""
    from canaryml.serving.prometheus import Selectors

    p = dict(fwd.get("prometheus") or {})
    metrics = [str(m) for m in (fwd.get("metrics") or catalog_names)]
    queries = dict(p.get("queries") or {})
    missing = [m for m in metrics if m not in queries]
    if missing:
        raise ConfigError(f"no PromQL query for metric(s) {', '.join(missing)}: add them under "
                          "forward.prometheus.queries (default: serve.source.prometheus.queries)"
                          " or leave them out of forward.metrics")
    selectors = {}
    for i, d in enumerate(fwd.get("deployments") or []):
        sel = dict(d.get("selectors") or {})
        if not d.get("id") or not sel.get("canary"):
            raise ConfigError(f"forward.deployments[{i}] needs id and selectors.canary (PromQL "
                              "label matchers such as app=\"web\",track=\"canary\")")
        selectors[str(d["id"])] = Selectors(str(sel["canary"]), sel.get("baseline"))
    step_s = float(fwd["step_s"])
    source = PrometheusSource(str(p["url"]), queries, selectors, step_s=step_s, metrics=metrics,
                              timeout_s=float(p.get("timeout_s", 5.0)),
                              retries=int(p.get("retries", 3)),
                              backoff_s=float(p.get("backoff_s", 0.5)),
                              baseline=str(p.get("baseline", "selector")),
                              history_offset_s=float(p.get("history_offset_s", 3600.0)))
    source.client.url_key = "forward.prometheus.url"
    k = dict(fwd.get("kafka") or {})
    if producer is None:
        from confluent_kafka import Producer

        producer = Producer({
            "bootstrap.servers": str(k["bootstrap_servers"]),
            "linger.ms": int(k.get("linger_ms", 50)),
            "batch.num.messages": int(k.get("batch_num_messages", 10000)),
            "message.send.max.retries": int(k.get("retries", 5)),
            "retry.backoff.ms": int(k.get("retry_backoff_ms", 200)),
            "message.timeout.ms": int(float(k.get("delivery_timeout_s", 30)) * 1000),
            "acks": "all",
            "error_cb": lambda err: log.warning("kafka: %s", err),
        })
    discovery = None
    if fwd.get("discover"):
        from canaryml.serving.service import KubeDiscovery, kube_api_client

        d = dict(fwd["discover"])
        discovery = KubeDiscovery(kube_api_client(fwd.get("kube_host")),
                                  str(d.get("namespace") or "default"),
                                  str(d.get("label_selector") or ""),
                                  kind="argo" if fwd.get("discover_kind") == "argo"
                                  else "deployment")
    metrics_ = ForwardMetrics()
    health = Health()
    forwarder = Forwarder(source, producer, str(k["topic"]), list(selectors),
                          backfill_steps=int(fwd.get("backfill_steps", 60)),
                          max_catchup_steps=int(fwd.get("max_catchup_steps", 240)),
                          flush_timeout_s=float(k.get("flush_timeout_s", 10.0)),
                          metrics=metrics_, health=health, discovery=discovery)
    server = None
    if http:
        from canaryml.errors import config_int

        h = dict(fwd.get("http") or {})
        server = ObservabilityServer(metrics_, health, host=h.get("host"),
                                     port=config_int(h.get("port") or 0, "forward.http.port",
                                                     low=0, high=65535)).start()
    return forwarder, server
