"""The forwarder's batching and retries without services: a tick that could not be pulled
or delivered in full is re-sent at the next tick (no gap), backfill and catch-up bounds."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from canaryml.control.types import Window
from canaryml.errors import ConfigError, SourceError
from canaryml.serving.forward import Forwarder, build


class FakeSource:
    """Grid values = timestamp (canary) and −timestamp (baseline); NaN for metric `gap`."""

    step_s = 1.0
    metrics = ("latency_p99", "gap")

    def __init__(self) -> None:
        self.down = False
        self.calls: list[tuple[str, float, int]] = []

    def fetch(self, dep: str, now_s: float, lookback: int) -> Window:
        self.calls.append((dep, now_s, lookback))
        if self.down:
            raise SourceError("prometheus unreachable")
        ts = now_s - np.arange(lookback - 1, -1, -1, dtype=np.float64)
        can = np.stack([ts, np.full_like(ts, np.nan)], axis=1)
        return Window(deployment_id=dep, now_s=now_s, timestamps_s=ts.astype(np.int64),
                      canary=can, baseline=-can, metrics=self.metrics)


class FakeProducer:
    def __init__(self) -> None:
        self.fail = False
        self.sent: list[tuple[bytes, dict[str, Any]]] = []
        self._cbs: list[tuple[Callable[[Any, Any], None], bool]] = []

    def produce(self, topic: str, *, value: bytes, key: bytes,
                on_delivery: Callable[[Any, Any], None]) -> None:
        self._cbs.append((on_delivery, self.fail))
        if not self.fail:
            self.sent.append((key, json.loads(value)))

    def poll(self, timeout: float) -> int:
        return 0

    def flush(self, timeout: float) -> int:
        for cb, failed in self._cbs:
            cb("broker down" if failed else None, None)
        self._cbs = []
        return 0


def make(clock: list[float], **kw: Any) -> tuple[Forwarder, FakeSource, FakeProducer]:
    src, prod = FakeSource(), FakeProducer()
    fwd = Forwarder(src, prod, "t", ["web"], clock=lambda: clock[0], **kw)  # type: ignore[arg-type]
    return fwd, src, prod


def test_backfill_then_only_new_steps_keyed_by_deployment() -> None:
    clock = [100.5]
    fwd, _src, prod = make(clock, backfill_steps=5)
    assert fwd.tick() == 10  # 5 steps x 2 groups, the all-NaN metric sends nothing
    assert {k for k, _ in prod.sent} == {b"web"}
    assert sorted({ev["timestamp"] for _, ev in prod.sent}) == [96.0, 97.0, 98.0, 99.0, 100.0]
    assert {(ev["group"], ev["metric"]) for _, ev in prod.sent} == {
        ("canary", "latency_p99"), ("baseline", "latency_p99")}
    clock[0] = 102.2
    prod.sent.clear()
    assert fwd.tick() == 4
    assert sorted({ev["timestamp"] for _, ev in prod.sent}) == [101.0, 102.0]
    assert fwd.metrics.last.labels("web")._value.get() == 102.0


def test_missed_steps_are_re_sent_after_prometheus_and_kafka_outages() -> None:
    clock = [100.0]
    fwd, src, prod = make(clock, backfill_steps=1)
    fwd.tick()
    src.down = True
    clock[0] = 101.0
    assert fwd.tick() == 0
    assert fwd.health.snapshot()["reasons"]["prometheus"]
    src.down = False
    prod.fail = True
    clock[0] = 102.0
    assert fwd.tick() == 0  # pulled, not delivered
    assert "kafka" in fwd.health.snapshot()["reasons"]
    prod.fail = False
    prod.sent.clear()
    clock[0] = 103.0
    assert fwd.tick() == 6  # 101, 102, 103: nothing lost
    assert sorted({ev["timestamp"] for _, ev in prod.sent}) == [101.0, 102.0, 103.0]
    assert fwd.health.snapshot()["status"] == "ok"
    errors = {s.labels["kind"]: s.value for m in fwd.metrics.registry.collect()
              for s in m.samples if s.name == "canaryml_forward_errors_total"}
    assert errors == {"prometheus": 1.0, "kafka": 1.0}


def test_catch_up_is_bounded() -> None:
    clock = [100.0]
    fwd, src, _ = make(clock, backfill_steps=1, max_catchup_steps=10)
    fwd.tick()
    clock[0] = 1000.0
    fwd.tick()
    assert src.calls[-1] == ("web", 1000.0, 10)


def test_config_errors_name_the_keys() -> None:
    base = {"step_s": 1, "prometheus": {"url": "http://127.0.0.1:1", "queries": {
        "latency_p99": "max(x{{selector}})"}}, "kafka": {"topic": "t"},
        "deployments": [{"id": "web", "selectors": {"canary": 'app="web"'}}]}
    with pytest.raises(ConfigError, match=r"forward\.prometheus\.queries"):
        build(base, ["latency_p99", "node_cpu"], http=False, producer=FakeProducer())
    with pytest.raises(ConfigError, match=r"forward\.deployments"):
        build({**base, "deployments": []}, ["latency_p99"], http=False, producer=FakeProducer())
    fwd, server = build(base, ["latency_p99"], http=False, producer=FakeProducer())
    assert server is None and fwd.deployments == ["web"]


def test_a_delivery_report_after_its_tick_counts_but_does_not_decide() -> None:
    """A report for an event of a tick whose flush timed out arrives during the next tick: the
    event is counted as delivered, and the next tick is judged on its own events only."""
    clock = [100.0]
    fwd, _src, prod = make(clock, backfill_steps=1)
    late: list[Any] = []
    flush = prod.flush

    def slow_flush(timeout: float) -> int:  # the first tick's reports do not arrive in time
        late.extend(prod._cbs)
        prod._cbs = []
        return len(late)

    prod.flush = slow_flush  # type: ignore[method-assign]
    assert fwd.tick() == 0 and fwd.next_s == {"web": 100.0}  # not advanced
    prod.flush = flush  # type: ignore[method-assign]
    clock[0] = 101.0
    for cb, _ in late:  # the stragglers report during the next tick
        prod._cbs.append((cb, False))
    assert fwd.tick() == 4  # 100 and 101 re-sent and delivered; the 2 late reports don't count
    assert fwd.produced == 6 and fwd.next_s == {"web": 102.0}


class FakeDiscovery:
    def __init__(self) -> None:
        self.entries: list[dict[str, Any]] = []
        self.down = False

    def discover(self) -> list[dict[str, Any]]:
        if self.down:
            raise ConnectionError("api server down")
        return self.entries


def test_discovered_canaries_are_forwarded_with_their_annotated_selectors() -> None:
    from canaryml.serving.prometheus import PrometheusSource

    class Source(PrometheusSource):
        def query_range(self, query: str, start_s: float, end_s: float) -> dict[float, float]:
            return {t: 1.0 for t in np.arange(start_s, end_s + 1)}

    src = Source("http://127.0.0.1:1", {"latency_p99": "max(x{{selector}})"}, {}, step_s=1.0)
    disc = FakeDiscovery()
    prod = FakeProducer()
    clock = [100.0]
    fwd = Forwarder(src, prod, "t", [], backfill_steps=1, discovery=disc,
                    clock=lambda: clock[0])
    assert fwd.tick() == 0 and fwd.deployments == []
    disc.entries = [{"id": "web", "selectors": {"canary": 'app="web"', "baseline": None}},
                    {"id": "api"}]  # no canary-selector annotation: skipped
    clock[0] = 101.0
    assert fwd.tick() == 1 and fwd.deployments == ["web"]
    assert prod.sent[-1] == (b"web", {"deployment_id": "web", "group": "canary",
                                      "metric": "latency_p99", "value": 1.0,
                                      "timestamp": 101.0})
    disc.down = True
    clock[0] = 102.0
    assert fwd.tick() == 1 and fwd.deployments == ["web"]  # the API down: known ones kept
    assert "discovery" in fwd.health.snapshot()["reasons"]
