"""Observability HTTP server: `/metrics` (Prometheus text format) and `/healthz`.

A stdlib `ThreadingHTTPServer` in a daemon thread, bound to 127.0.0.1 by default. Routes are a
table: `server.route("GET", "/path", handler)` where a handler takes the request (method, path,
query, body) and returns a `Response` — the Argo/Flagger endpoints plug in the same way.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from prometheus_client import CollectorRegistry, Counter, Gauge, Info, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from canaryml.control.types import Decision

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    query: dict[str, list[str]]
    body: bytes
    headers: dict[str, str]

    def json(self) -> Any:
        return json.loads(self.body or b"null")


@dataclass(frozen=True)
class Response:
    status: int = 200
    body: bytes = b""
    content_type: str = "application/json"

    @classmethod
    def json(cls, payload: Any, status: int = 200) -> Response:
        return cls(status, json.dumps(payload, default=str).encode(), "application/json")


Handler = Callable[[Request], Response]


class ServeMetrics:
    """The controller's own metrics, in a registry of its own (no global state)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.score = Gauge("canaryml_score", "Latest calibrated anomaly score per deployment",
                           ["deployment"], registry=self.registry)
        self.decisions = Counter("canaryml_decisions", "Decisions per deployment and action",
                                 ["deployment", "action"], registry=self.registry)
        self.errors = Counter("canaryml_errors", "Errors by kind (source, scorer, actuator, log)",
                              ["kind"], registry=self.registry)
        self.model = Info("canaryml_model", "Scorer model in use", registry=self.registry)

    def observe(self, deployment_id: str, decision: Decision) -> None:
        self.decisions.labels(deployment_id, str(decision.action)).inc()
        if decision.score is not None:
            self.score.labels(deployment_id).set(decision.score)

    def error(self, kind: str) -> None:
        self.errors.labels(kind).inc()

    def set_model(self, version: str) -> None:
        self.model.info({"version": version})


@dataclass
class Health:
    """Components report in; `/healthz` is 503 while any is degraded, with the reasons."""

    _state: dict[str, str | None] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def ok(self, component: str) -> None:
        with self._lock:
            self._state[component] = None

    def degraded(self, component: str, reason: str) -> None:
        with self._lock:
            self._state[component] = reason

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            bad = {c: r for c, r in self._state.items() if r is not None}
            return {"status": "degraded" if bad else "ok",
                    "components": {c: r or "ok" for c, r in sorted(self._state.items())},
                    "reasons": bad}


class ObservabilityServer:
    """HTTP server with `/metrics` and `/healthz`; `route()` adds more."""

    def __init__(self, metrics: ServeMetrics, health: Health, *, host: str = "127.0.0.1",
                 port: int = 0) -> None:
        self.metrics = metrics
        self.health = health
        self.host = host
        self._port = port
        self._routes: dict[tuple[str, str], Handler] = {}
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.route("GET", "/metrics", self._metrics)
        self.route("GET", "/healthz", self._healthz)

    def route(self, method: str, path: str, handler: Handler) -> None:
        self._routes[(method.upper(), path)] = handler

    def _metrics(self, _: Request) -> Response:
        return Response(200, generate_latest(self.metrics.registry), CONTENT_TYPE_LATEST)

    def _healthz(self, _: Request) -> Response:
        snap = self.health.snapshot()
        return Response.json(snap, 200 if snap["status"] == "ok" else 503)

    def dispatch(self, req: Request) -> Response:
        handler = self._routes.get((req.method, req.path))
        if handler is None:
            allowed = sorted(m for m, p in self._routes if p == req.path)
            if allowed:
                return Response.json({"error": f"{req.method} not allowed; use {allowed}"}, 405)
            return Response.json({"error": f"no route {req.path}",
                                  "routes": sorted(p for _, p in self._routes)}, 404)
        try:
            return handler(req)
        except Exception as exc:
            log.exception("http %s %s failed", req.method, req.path)
            self.metrics.error("http")
            return Response.json({"error": f"{type(exc).__name__}: {exc}"}, 500)

    @property
    def port(self) -> int:
        if self._httpd is None:
            raise RuntimeError("server not started; call start() first")
        return int(self._httpd.server_address[1])

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> ObservabilityServer:
        server = self

        class _H(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _serve(self) -> None:
                parts = urlsplit(self.path)
                length = int(self.headers.get("Content-Length") or 0)
                req = Request(self.command, parts.path, parse_qs(parts.query),
                              self.rfile.read(length) if length else b"", dict(self.headers))
                resp = server.dispatch(req)
                self.send_response(resp.status)
                self.send_header("Content-Type", resp.content_type)
                self.send_header("Content-Length", str(len(resp.body)))
                self.end_headers()
                self.wfile.write(resp.body)

            do_GET = do_POST = do_PUT = do_DELETE = _serve

            def log_message(self, fmt: str, *args: Any) -> None:
                log.debug("http " + fmt, *args)

        self._httpd = ThreadingHTTPServer((self.host, self._port), _H)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="canaryml-http",
                                        daemon=True)
        self._thread.start()
        log.info("observability server on %s (/metrics, /healthz)", self.url)
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None

    def __enter__(self) -> ObservabilityServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
