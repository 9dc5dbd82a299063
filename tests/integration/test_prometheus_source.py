"""PrometheusSource against a real Prometheus (Debian binary on 127.0.0.1) scraping an exporter
that the test drives."""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, Gauge, start_http_server

from canaryml.errors import SourceError
from canaryml.serving.prometheus import PrometheusSource, Selectors
from tests.harness.prometheus import free_port, start_prometheus

pytestmark = [pytest.mark.timeout(180), pytest.mark.services,
              pytest.mark.skipif(shutil.which("prometheus") is None,
                                 reason="needs the Debian prometheus package")]


@pytest.fixture
def exporter_and_prom(tmp_path: Path) -> Iterator[tuple[Gauge, str, ExitStack]]:
    reg = CollectorRegistry()
    gauge = Gauge("demo_latency_p99_seconds", "p99", ["app", "track"], registry=reg)
    port = free_port()
    server, _thread = start_http_server(port, addr="127.0.0.1", registry=reg)
    with ExitStack() as prom:  # closing the stack stops Prometheus (the fault test does)
        url = prom.enter_context(start_prometheus(tmp_path, [f"127.0.0.1:{port}"]))
        try:
            yield gauge, url, prom
        finally:
            server.shutdown()


QUERIES = {"latency_p99": "max(demo_latency_p99_seconds{{selector}})",
           "error_rate": "sum(demo_errors_total{{selector}})"}  # never exported: no data


def test_fetch_canary_and_baseline_then_prometheus_down(
        exporter_and_prom: tuple[Gauge, str, ExitStack]) -> None:
    gauge, url, prom = exporter_and_prom
    gauge.labels("web", "canary").set(0.8)
    gauge.labels("web", "baseline").set(0.2)
    src = PrometheusSource(url, QUERIES,
                           {"d1": Selectors('app="web",track="canary"', 'app="web",track="baseline"')},
                           step_s=1, timeout_s=2, retries=1, backoff_s=0.05)
    deadline = time.monotonic() + 20
    while True:  # wait for the first scrapes
        w = src.fetch("d1", now_s=time.time(), lookback=5)
        if not np.isnan(w.canary[-1, 0]) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert w.canary[-1, 0] == pytest.approx(0.8)
    assert w.baseline is not None and w.baseline[-1, 0] == pytest.approx(0.2)
    assert np.isnan(w.canary[:, 1]).all() and np.isnan(w.baseline[:, 1]).all()  # missing series
    assert w.canary.shape == (5, 2) and w.metrics == ("latency_p99", "error_rate")

    gauge.labels("web", "canary").set(1.5)  # the exporter moves; Prometheus follows
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        w = src.fetch("d1", now_s=time.time(), lookback=5)
        if w.canary[-1, 0] == pytest.approx(1.5):
            break
        time.sleep(0.5)
    assert w.canary[-1, 0] == pytest.approx(1.5)

    prom.close()  # fault: Prometheus down: bounded by retries=1 (2 attempts), no hang
    with pytest.raises(SourceError, match="unreachable after 2 attempt"):
        src.fetch("d1", now_s=time.time(), lookback=5)
