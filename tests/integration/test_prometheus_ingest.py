"""`canaryml ingest source=prometheus` against a real Prometheus scraping a test exporter."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from omegaconf import open_dict
from prometheus_client import CollectorRegistry, Gauge

from canaryml.cli import compose
from canaryml.data.dataset import CanonicalDataset
from canaryml.errors import SourceError
from canaryml.ingest.prometheus import PrometheusClient
from canaryml.tasks import ingest as ingest_task
from tests.harness.prometheus import serve_registry, start_prometheus, wait_for_scrapes

pytestmark = pytest.mark.services

QUERIES = {
    "latency_p99": "max(test_latency_p99_seconds{{selector}})",
    "error_rate": "max(test_error_ratio{{selector}})",
    "node_cpu": "max(test_node_cpu_ratio{{selector}})",
}
# value served per (metric, deployment, group) in phase 0 and phase 1
SERVED = {
    ("latency_p99", "web-1", "canary"): (0.25, 0.75),
    ("latency_p99", "web-1", "baseline"): (0.20, 0.21),
    ("error_rate", "web-1", "canary"): (0.01, 0.08),
    ("error_rate", "web-1", "baseline"): (0.01, 0.01),
    ("node_cpu", "web-1", "canary"): (0.40, 0.90),
    ("node_cpu", "web-1", "baseline"): (0.35, 0.36),
}


def test_ingest_range_queries_into_canonical_dataset(tmp_path: Path) -> None:
    registry = CollectorRegistry()
    gauges = {
        "latency_p99": Gauge("test_latency_p99_seconds", "p99", ["deployment", "group"],
                             registry=registry),
        "error_rate": Gauge("test_error_ratio", "errors", ["deployment", "group"],
                            registry=registry),
        "node_cpu": Gauge("test_node_cpu_ratio", "cpu", ["deployment", "group"],
                          registry=registry),
    }

    def serve_phase(phase: int) -> None:
        for (metric, dep, group), values in SERVED.items():
            gauges[metric].labels(deployment=dep, group=group).set(values[phase])

    serve_phase(0)
    with serve_registry(registry) as target, \
            start_prometheus(tmp_path / "prom", [target], scrape_interval_s=1) as url:
        wait_for_scrapes(url, "test_latency_p99_seconds", 1)
        t_start = int(np.ceil(time.time())) + 1
        time.sleep(5)  # the served values span ≥ 5 s of scrapes before the flip (data, not a wait)
        switch_at = time.time()
        # a concurrent writer flips the served values while Prometheus keeps scraping
        flipper = threading.Thread(target=serve_phase, args=(1,))
        flipper.start()
        flipper.join()
        time.sleep(5)
        t_end = int(time.time()) - 1
        wait_for_scrapes(url, "test_latency_p99_seconds", 9)

        deployments = tmp_path / "deployments.csv"
        pd.DataFrame({
            "deployment_id": ["web-1"], "service": ["web"],
            "start": [pd.Timestamp(t_start, unit="s", tz="UTC").isoformat()],
            "end": [pd.Timestamp(t_end, unit="s", tz="UTC").isoformat()],
            "label": ["faulty"],
        }).to_csv(deployments, index=False)
        out = tmp_path / "canonical"
        cfg = compose("ingest", ["source=prometheus", f"out={out}",
                                 f"ingest.prometheus.url={url}",
                                 f"ingest.prometheus.deployments_file={deployments}",
                                 "ingest.prometheus.step_s=1", "ingest.prometheus.retries=1"])
        with open_dict(cfg):
            cfg.ingest.prometheus.queries = QUERIES
        assert ingest_task.run(cfg) == 0

        # a bad query is a clear SourceError, not an empty dataset
        client = PrometheusClient(url, timeout_s=5, retries=0)
        with pytest.raises(SourceError, match="rejected query"):
            client.query_range("sum(", t_start, t_end, 1)
        instant = client.query('test_error_ratio{group="canary"}')
        assert instant and instant[0][2] == pytest.approx(0.08)

    ds = CanonicalDataset(out)
    assert ds.step_s == 1
    assert ds.manifest["source"] == "prometheus"
    assert set(ds.metrics) == set(QUERIES)
    tele = ds.telemetry("web-1")
    assert set(tele["group"]) == {"canary", "baseline"}
    arrays = ds.arrays("web-1")
    assert arrays.baseline is not None
    assert len(arrays.timestamps_s) == t_end - t_start + 1
    assert np.all(np.diff(arrays.timestamps_s) == 1)
    for (metric, _, group), (before, after) in SERVED.items():
        col = (arrays.canary if group == "canary" else arrays.baseline)[
            :, arrays.metrics.index(metric)]
        assert np.isfinite(col).mean() > 0.8, (metric, group, col)
        early = col[arrays.timestamps_s < switch_at - 2]
        late = col[arrays.timestamps_s > switch_at + 2]
        assert len(early) >= 2 and len(late) >= 2
        np.testing.assert_allclose(early[np.isfinite(early)], before, rtol=1e-6)
        np.testing.assert_allclose(late[np.isfinite(late)], after, rtol=1e-6)
        # every value on the grid is one the exporter served
        finite = col[np.isfinite(col)]
        assert np.all(np.isclose(finite, before) | np.isclose(finite, after))


def test_unreachable_prometheus_is_a_source_error() -> None:
    from tests.harness.prometheus import free_port

    client = PrometheusClient(f"http://127.0.0.1:{free_port()}", timeout_s=0.5, retries=2,
                              backoff_s=0.01)
    with pytest.raises(SourceError, match=r"unreachable after 3 attempt\(s\)"):
        client.query_range("up", 0, 10, 1)
