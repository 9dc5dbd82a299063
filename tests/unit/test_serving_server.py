from __future__ import annotations

import pytest
import requests

from canaryml.control.types import Action, Decision
from canaryml.serving.server import Health, ObservabilityServer, Request, Response, ServeMetrics

pytestmark = pytest.mark.timeout(60)  # a hung service fails the test, not CI


def test_dispatch_routes_errors_and_extra_routes() -> None:
    srv = ObservabilityServer(ServeMetrics(), Health())
    srv.route("POST", "/api/v1/argo/score", lambda r: Response.json({"echo": r.json()}))
    srv.route("GET", "/boom", lambda r: 1 / 0)  # type: ignore[arg-type,return-value]
    req = lambda m, p, b=b"": Request(m, p, {}, b, {})  # noqa: E731
    assert srv.dispatch(req("GET", "/nope")).status == 404
    assert srv.dispatch(req("POST", "/metrics")).status == 405
    assert srv.dispatch(req("POST", "/api/v1/argo/score", b'{"a": 1}')).body == b'{"echo": {"a": 1}}'
    assert srv.dispatch(req("GET", "/boom")).status == 500
    assert b'canaryml_errors_total{kind="http"} 1.0' in srv.dispatch(req("GET", "/metrics")).body


def test_health_goes_degraded_and_back() -> None:
    h = Health()
    h.ok("source")
    assert h.snapshot() == {"status": "ok", "components": {"source": "ok"}, "reasons": {}}
    h.degraded("source", "prometheus unreachable")
    assert h.snapshot()["status"] == "degraded"
    assert h.snapshot()["reasons"] == {"source": "prometheus unreachable"}
    h.ok("source")
    assert h.snapshot()["status"] == "ok"


def test_serves_on_loopback_with_free_port() -> None:
    metrics = ServeMetrics()
    metrics.observe("d1", Decision(Action.SHRINK, "x", 0.9))
    with ObservabilityServer(metrics, Health(), port=0) as srv:
        assert srv.host == "127.0.0.1" and srv.port > 0
        text = requests.get(srv.url + "/metrics", timeout=5).text
    assert 'canaryml_score{deployment="d1"} 0.9' in text
