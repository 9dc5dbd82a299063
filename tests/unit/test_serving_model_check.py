"""Serve checks, on every model load, that the source provides every metric the model needs:
at startup a clear error naming the missing metrics and the config key; on a hot-swap the
refused model is never swapped in (the previous one keeps deciding, /healthz says why)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from omegaconf import OmegaConf

from canaryml.cli import compose
from canaryml.control.policy import PolicyConfig
from canaryml.errors import ConfigError
from canaryml.serving import service
from canaryml.serving.model_holder import ModelHolder

CATALOG = ["request_rate", "error_rate", "latency_p50", "latency_p95", "latency_p99", "app_cpu",
           "app_memory", "node_cpu", "node_memory", "net_rx", "net_tx", "disk_io",
           "storage_latency", "load1"]


class FakeScorer:
    lookback = 8
    min_steps = 4

    def __init__(self, metrics: list[str]) -> None:
        self.metrics = tuple(metrics)

    def score(self, window: Any) -> Any:
        raise AssertionError("not scored in this test")


def shipped_serve(tmp_path: Path, *overrides: str) -> dict[str, Any]:
    cfg = compose("serve", [f"serve.decision_log={tmp_path / 'd.sqlite'}", *overrides])
    return OmegaConf.to_container(cfg.serve, resolve=True)  # type: ignore[return-value]


def test_shipped_config_has_a_query_for_every_catalog_metric() -> None:
    cfg = compose("serve", [])
    assert list(cfg.metrics) == CATALOG
    assert set(cfg.serve.source.prometheus.queries) == set(CATALOG)
    for q in cfg.serve.source.prometheus.queries.values():
        assert "{selector}" in q


def test_startup_refuses_a_model_whose_metrics_the_source_lacks(tmp_path: Path) -> None:
    serve = shipped_serve(tmp_path)
    del serve["source"]["prometheus"]["queries"]["node_cpu"]
    del serve["source"]["prometheus"]["queries"]["load1"]
    holder = ModelHolder("dir", loader=lambda uri: FakeScorer(CATALOG))
    with pytest.raises(ConfigError) as err:
        service.build(serve, PolicyConfig(), catalog_names=CATALOG, holder=holder, http=False)
    msg = str(err.value)
    assert "node_cpu, load1" in msg and "serve.source.prometheus.queries" in msg
    assert "refused" in msg


def test_startup_with_the_shipped_config_accepts_a_catalog_model(tmp_path: Path) -> None:
    holder = ModelHolder("dir", loader=lambda uri: FakeScorer(CATALOG))
    svc = service.build(shipped_serve(tmp_path), PolicyConfig(), catalog_names=CATALOG,
                        holder=holder, http=False)
    try:
        assert svc.holder.version == "dir" and svc.holder.refused is None
    finally:
        svc.close()


def test_kafka_source_names_the_catalog_key(tmp_path: Path) -> None:
    check = service.metric_check({"source": {"kind": "kafka"}, "metrics": None},
                                 ["latency_p99"])
    why = check(FakeScorer(["latency_p99", "syscall_read"]))
    assert why is not None and "syscall_read" in why and "metric catalog" in why
    assert check(FakeScorer(["latency_p99"])) is None


def test_hot_swap_to_a_model_the_source_cannot_feed_is_refused_and_the_old_one_kept() -> None:
    versions = {"v": "1"}
    models = {"1": FakeScorer(["latency_p99"]), "2": FakeScorer(["latency_p99", "node_cpu"])}
    loads: list[str] = []

    def loader(uri: str) -> FakeScorer:
        loads.append(uri)
        return models[uri.rsplit("/", 1)[1]]

    holder = ModelHolder("models:/canary-scorer@champion", poll_s=0, loader=loader,
                         resolver=lambda name, alias: versions["v"],
                         check=service.metric_check(
                             {"source": {"kind": "prometheus"}}, ["latency_p99"]))
    holder.start()
    assert holder.version == "canary-scorer/1"
    versions["v"] = "2"
    assert holder.refresh() is False
    assert holder.swap_if_ready() is None and holder.version == "canary-scorer/1"
    assert holder.refused is not None and "node_cpu" in holder.refused
    assert "serve.source.prometheus.queries.node_cpu" in holder.refused
    reason = holder.health.snapshot()["reasons"]["model"]
    assert "node_cpu" in reason and "keeping canary-scorer/1" in reason
    holder.refresh()  # the refused version is not downloaded again at every poll
    assert loads == ["models:/canary-scorer/1", "models:/canary-scorer/2"]
    versions["v"] = "3"
    models["3"] = FakeScorer(["latency_p99"])
    assert holder.refresh() is True and holder.swap_if_ready() is not None
    assert holder.version == "canary-scorer/3" and holder.refused is None
