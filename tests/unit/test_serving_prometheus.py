"""PrometheusSource against a scripted fake of the HTTP API (the real one: tests/integration)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from canaryml.errors import ConfigError, SourceError
from canaryml.serving.prometheus import PrometheusSource, Selectors, render_query
from canaryml.serving.server import Health, ObservabilityServer, Request, Response, ServeMetrics

pytestmark = pytest.mark.timeout(60)  # a hung service fails the test, not CI

QUERIES = {"latency_p99": "max(lat{{selector}})", "error_rate": "sum(err{{selector}})"}


@pytest.fixture
def fake() -> Iterator[tuple[ObservabilityServer, list[Any]]]:
    script: list[Any] = []  # queued responses: int status or a callable(request) -> Response
    seen: list[Request] = []

    def handle(req: Request) -> Response:
        seen.append(req)
        if script:
            item = script.pop(0)
            return Response.json({"status": "error"}, item) if isinstance(item, int) else item(req)
        q = req.query["query"][0]
        start, end = float(req.query["start"][0]), float(req.query["end"][0])
        if "err" in q:
            return Response.json({"status": "success", "data": {"result": []}})  # no series
        value = 2.0 if 'track="canary"' in q else 1.0
        values = [[t, str(value)] for t in np.arange(start, end + 1, 10.0)[1:]]
        return Response.json({"status": "success", "data": {"resultType": "matrix",
                                                            "result": [{"values": values}]}})

    srv = ObservabilityServer(ServeMetrics(), Health())
    srv.route("GET", "/api/v1/query_range", handle)
    with srv:
        yield srv, [script, seen]


def make(srv: ObservabilityServer, **kw: Any) -> PrometheusSource:
    sel = {"d1": Selectors('app="web",track="canary"', 'app="web",track="baseline"')}
    return PrometheusSource(srv.url, QUERIES, sel, step_s=10, backoff_s=0.01, **kw)


def test_window_on_grid_with_nodata_as_nan(fake: Any) -> None:
    srv, (_, seen) = fake
    w = make(srv).fetch("d1", now_s=1055, lookback=4)
    assert w.timestamps_s.tolist() == [1020, 1030, 1040, 1050]
    np.testing.assert_array_equal(w.canary[:, 0], [np.nan, 2, 2, 2])  # first slot not returned
    assert np.isnan(w.canary[:, 1]).all()  # no series -> NaN (no data, never a zero)
    assert w.baseline is not None and w.baseline[-1, 0] == 1.0
    assert {r.query["query"][0] for r in seen} >= {'max(lat{app="web",track="canary"})',
                                                   'sum(err{app="web",track="baseline"})'}


def test_retries_5xx_then_succeeds_and_gives_up_with_source_error(fake: Any) -> None:
    srv, (script, seen) = fake
    script.extend([503, 502])
    make(srv, retries=2).fetch("d1", now_s=1055, lookback=2)
    assert len(seen) == 2 + 4  # two failures, then 2 metrics x 2 groups
    script.extend([503, 503, 503])
    with pytest.raises(SourceError, match="unreachable after 3 attempt"):
        make(srv, retries=2).fetch("d1", now_s=1055, lookback=2)


def test_bad_query_is_not_retried(fake: Any) -> None:
    srv, (script, seen) = fake
    script.append(400)
    with pytest.raises(SourceError, match="rejected"):
        make(srv, retries=3).fetch("d1", now_s=1055, lookback=2)
    assert len(seen) == 1


def test_config_errors() -> None:
    with pytest.raises(ConfigError, match="placeholder"):
        render_query("up", 'a="b"')
    with pytest.raises(ConfigError, match="no PromQL query"):
        PrometheusSource("http://127.0.0.1:1", QUERIES, {}, step_s=10, metrics=["app_cpu"])
    src = PrometheusSource("http://127.0.0.1:1", QUERIES, {}, step_s=10)
    with pytest.raises(ConfigError, match="no Prometheus selectors"):
        src.fetch("nope", 0, 2)


def test_default_config_queries_render() -> None:
    from canaryml.cli import compose

    cfg = compose("serve")
    for metric, template in cfg.serve.source.prometheus.queries.items():
        q = render_query(template, 'app="web"')
        assert "{selector}" not in q and '{app="web"' in q, metric


def test_history_baseline_is_the_canary_series_shifted_back(fake: Any) -> None:
    srv, (_, seen) = fake
    sel = {"d1": Selectors('app="web",track="canary"')}  # no baseline replica
    src = PrometheusSource(srv.url, QUERIES, sel, step_s=10, backoff_s=0.01,
                           baseline="history", history_offset_s=600)
    w = src.fetch("d1", now_s=1055, lookback=4)
    assert w.baseline is not None
    np.testing.assert_array_equal(w.baseline[:, 0], w.canary[:, 0])  # the fake serves 2.0 both
    lat = [r for r in seen if r.query["query"][0].startswith("max(lat")]
    assert [(float(r.query["start"][0]), float(r.query["end"][0])) for r in lat] == [
        (1020.0, 1050.0), (420.0, 450.0)]  # the canary window, then 600 s earlier
    assert all('track="canary"' in r.query["query"][0] for r in lat)
    with pytest.raises(ConfigError, match="history_offset_s"):
        PrometheusSource(srv.url, QUERIES, sel, step_s=10, baseline="history", history_offset_s=0)
