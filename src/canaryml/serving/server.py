"""Observability HTTP server: `/metrics` (Prometheus text format), `/healthz` and `/livez`.

A stdlib `ThreadingHTTPServer` in a daemon thread, bound to 127.0.0.1 by default
(`CANARYML_HTTP_HOST` overrides the host, e.g. `0.0.0.0` in a pod behind a Service). Routes are a
table: `server.route("GET", "/path", handler)` where a handler takes the request (method, path,
query, body) and returns a `Response` — the Argo/Flagger endpoints plug in the same way
(`canaryml.serving.endpoints.install`).

`/healthz` is 503 while a component is degraded (readiness); `/livez` is 200 while the HTTP
thread answers at all (liveness: a degraded controller must not be restarted in a loop).

Bearer token: with `token` set, every route under `/api/` needs `Authorization: Bearer <token>`
(compared in constant time) and answers 401 otherwise; `/metrics`, `/healthz` and `/livez`
stay open. A route registered with `authenticates=True` checks credentials itself (Flagger
webhooks, which cannot send headers, also accept the token in their JSON body).

Hardening (before any routing or auth): a request body over `max_body_bytes` (default 1 MiB)
is refused with 413 without being read, a bad or chunked `Content-Length` with 400/411; a
connection that sends nothing for `read_timeout_s` (default 10 s) is closed, and a request
whose line, headers and body have not all arrived within `request_deadline_s` (default 30 s)
is answered 408 and closed — a client dribbling a byte at a time (slowloris) never trips the
per-read timeout, so without the deadline it could hold a thread for as long as it liked; a
body shorter than its Content-Length is a 400, never handled as a request; the listen backlog is `backlog` (default 1024, not the stdlib's 5: with
128, a burst of 500 clients arriving while the accept loop is busy had ~15 % of its
connections reset; the kernel caps it at net.core.somaxconn); JSON
nested deeper than `MAX_JSON_DEPTH` is a 400, never a 500.
"""

from __future__ import annotations

import contextlib
import hmac
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Protocol
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
        """The body as JSON; `BadRequest` (answered 400) when it is not small, flat JSON."""
        return parse_json(self.body)

    def header(self, name: str, default: str | None = None) -> str | None:
        """Header value, case-insensitive (HTTP header names are)."""
        low = name.lower()
        for k, v in self.headers.items():
            if k.lower() == low:
                return v
        return default

    def arg(self, name: str) -> str | None:
        """First value of a query argument, or None when absent or empty."""
        values = self.query.get(name) or []
        return values[0] if values and values[0] != "" else None


HOST_ENV = "CANARYML_HTTP_HOST"
API_PREFIX = "/api/"
MAX_BODY_BYTES = 1 << 20  # webhook payloads are a few hundred bytes
MAX_JSON_DEPTH = 32
READ_TIMEOUT_S = 10.0
REQUEST_DEADLINE_S = 30.0
BACKLOG = 1024  # a burst of hundreds of probes/webhooks must queue, not be reset


class BadRequest(ValueError):
    """A request the server refuses with a 4xx (the message says what to send instead)."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def _depth(text: str) -> int:
    """Maximum nesting of [ and { outside strings (cheap pre-check before json.loads)."""
    depth = deepest = 0
    in_str = escaped = False
    for ch in text:
        if in_str:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_str = False
        elif ch == '"':
            in_str = True
        elif ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth -= 1
    return deepest


def parse_json(body: bytes) -> Any:
    """JSON from a request body; `BadRequest` (400) for bad UTF-8, bad JSON or deep nesting."""
    try:
        text = body.decode("utf-8") if body else "null"
    except UnicodeDecodeError as exc:
        raise BadRequest(f"body is not UTF-8 JSON ({exc})") from exc
    if _depth(text) > MAX_JSON_DEPTH:
        raise BadRequest(f"body JSON is nested deeper than {MAX_JSON_DEPTH} levels")
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise BadRequest(f"body is not JSON ({exc})") from exc


def is_loopback(host: str) -> bool:
    """True for an address only this machine can reach (127.0.0.0/8, ::1, localhost)."""
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def default_host() -> str:
    """`CANARYML_HTTP_HOST` when set, else loopback only."""
    return os.environ.get(HOST_ENV) or "127.0.0.1"


def bearer_token(req: Request) -> str | None:
    """The token of an `Authorization: Bearer <token>` header, or None."""
    auth = (req.header("Authorization") or "").strip()
    scheme, _, token = auth.partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None


def token_matches(given: object, expected: str) -> bool:
    """Constant-time comparison (no timing oracle on the token); anything but a string (a
    number or list in a JSON body, say) never matches."""
    if not isinstance(given, str):
        return False
    return hmac.compare_digest(given.encode("utf-8", "surrogateescape"),
                               expected.encode("utf-8", "surrogateescape"))


@dataclass(frozen=True)
class Response:
    status: int = 200
    body: bytes = b""
    content_type: str = "application/json"
    headers: tuple[tuple[str, str], ...] = ()

    @classmethod
    def json(cls, payload: Any, status: int = 200,
             headers: tuple[tuple[str, str], ...] = ()) -> Response:
        return cls(status, json.dumps(payload, default=str).encode(), "application/json", headers)

    @classmethod
    def unauthorized(cls, why: str) -> Response:
        return cls.json({"error": f"unauthorized: {why}; send `Authorization: Bearer <token>` "
                         "(the token of serve.http / CANARYML_HTTP_TOKEN[_FILE])"}, 401,
                        (("WWW-Authenticate", 'Bearer realm="canaryml"'),))


Handler = Callable[[Request], Response]


class ProcessMetrics(Protocol):
    """What the server needs of a process's metrics: the registry `/metrics` exports and an
    error counter (ServeMetrics for `canaryml serve`, ForwardMetrics for `canaryml forward`)."""

    registry: CollectorRegistry

    def error(self, kind: str) -> None: ...


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
        self.skipped_actions = Counter("canaryml_skipped_actions",
                                       "Actions skipped, never applied, by reason "
                                       "(unknown_target: no actuator target for the deployment)",
                                       ["reason"], registry=self.registry)

    def observe(self, deployment_id: str, decision: Decision) -> None:
        self.decisions.labels(deployment_id, str(decision.action)).inc()
        if decision.score is not None:
            self.score.labels(deployment_id).set(decision.score)

    def error(self, kind: str) -> None:
        self.errors.labels(kind).inc()

    def skipped(self, reason: str) -> None:
        self.skipped_actions.labels(reason).inc()

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
    """HTTP server with `/metrics`, `/healthz` and `/livez`; `route()` adds more.

    `host=None` binds `default_host()` (127.0.0.1 unless `CANARYML_HTTP_HOST` is set); the
    environment variable also overrides an explicit host, so a pod can expose the server
    without editing the config. `token` guards every `/api/` route (see the module docstring).
    """

    def __init__(self, metrics: ProcessMetrics, health: Health, *, host: str | None = None,
                 port: int = 0, token: str | None = None, max_body_bytes: int = MAX_BODY_BYTES,
                 read_timeout_s: float = READ_TIMEOUT_S, backlog: int = BACKLOG,
                 request_deadline_s: float = REQUEST_DEADLINE_S) -> None:
        self.metrics = metrics
        self.health = health
        env_host = os.environ.get(HOST_ENV)
        if env_host and host and env_host != host:
            log.info("%s=%s overrides the configured host %s", HOST_ENV, env_host, host)
        self.host = env_host or host or "127.0.0.1"
        self._port = port
        self.token = token or None
        self.max_body_bytes = int(max_body_bytes)
        self.read_timeout_s = float(read_timeout_s)
        self.request_deadline_s = float(request_deadline_s)
        # handler -> monotonic time by which its request must have been read (see _reap)
        self._deadlines: dict[Any, float] = {}
        self._deadline_lock = threading.Lock()
        self._reaper_stop = threading.Event()
        self._reaper: threading.Thread | None = None
        self.backlog = int(backlog)
        self._routes: dict[tuple[str, str], Handler] = {}
        self._self_auth: set[tuple[str, str]] = set()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.route("GET", "/metrics", self._metrics)
        self.route("GET", "/healthz", self._healthz)
        self.route("GET", "/livez", self._livez)

    def route(self, method: str, path: str, handler: Handler, *,
              authenticates: bool = False) -> None:
        """Register `handler`; `authenticates=True`: it checks the token itself."""
        key = (method.upper(), path)
        self._routes[key] = handler
        if authenticates:
            self._self_auth.add(key)
        else:
            self._self_auth.discard(key)

    def authorized(self, req: Request) -> bool:
        """True when no token is configured or the request carries it as a bearer token."""
        return self.token is None or token_matches(bearer_token(req), self.token)

    def _metrics(self, _: Request) -> Response:
        return Response(200, generate_latest(self.metrics.registry), CONTENT_TYPE_LATEST)

    def _healthz(self, _: Request) -> Response:
        snap = self.health.snapshot()
        return Response.json(snap, 200 if snap["status"] == "ok" else 503)

    def _livez(self, _: Request) -> Response:
        return Response.json({"status": "alive"})

    def dispatch(self, req: Request) -> Response:
        handler = self._routes.get((req.method, req.path))
        if handler is None:
            allowed = sorted(m for m, p in self._routes if p == req.path)
            if allowed:
                return Response.json({"error": f"{req.method} not allowed; use {allowed}"}, 405)
            return Response.json({"error": f"no route {req.path}",
                                  "routes": sorted(p for _, p in self._routes)}, 404)
        if (req.path.startswith(API_PREFIX) and (req.method, req.path) not in self._self_auth
                and not self.authorized(req)):
            return Response.unauthorized("missing or wrong bearer token")
        try:
            return handler(req)
        except BadRequest as exc:
            return Response.json({"error": str(exc)}, exc.status)
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
            timeout = server.read_timeout_s  # socket timeout: a silent client is dropped

            expired = False  # set by the reaper when the request deadline passed

            def handle_one_request(self) -> None:
                server._arm(self)
                try:
                    super().handle_one_request()
                finally:
                    server._disarm(self)

            def _body(self) -> bytes:
                """Read the body, or `BadRequest` before reading anything questionable."""
                if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
                    raise BadRequest("chunked bodies are not accepted; send Content-Length", 411)
                raw = (self.headers.get("Content-Length") or "0").strip()
                if not raw.isdigit():
                    raise BadRequest(f"Content-Length {raw[:40]!r} is not a byte count")
                length = int(raw)
                if length > server.max_body_bytes:
                    raise BadRequest(f"body of {length} bytes is over the limit of "
                                     f"{server.max_body_bytes} bytes", 413)
                body = self.rfile.read(length) if length else b""
                if len(body) < length:
                    raise BadRequest(f"body of {len(body)} bytes is shorter than its "
                                     f"Content-Length {length}")
                return body

            def _serve(self) -> None:
                parts = urlsplit(self.path)
                late = BadRequest(f"request not received within "
                                  f"{server.request_deadline_s:g} s", 408)
                try:
                    body = self._body()
                    server._disarm(self)  # the request is in: handling it is not the client's time
                    if self.expired:  # reads ended by the deadline: the request is cut short
                        raise late
                except BadRequest as exc:  # before routing and auth; the body stays unread
                    why = late if self.expired else exc
                    self.close_connection = True
                    resp = Response.json({"error": str(why)}, why.status)
                else:
                    req = Request(self.command, parts.path, parse_qs(parts.query), body,
                                  dict(self.headers))
                    resp = server.dispatch(req)
                self.send_response(resp.status)
                self.send_header("Content-Type", resp.content_type)
                self.send_header("Content-Length", str(len(resp.body)))
                for name, value in resp.headers:
                    self.send_header(name, value)
                if self.close_connection:
                    self.send_header("Connection", "close")
                self.end_headers()
                self.wfile.write(resp.body)

            do_GET = do_POST = do_PUT = do_DELETE = _serve

            def log_message(self, fmt: str, *args: Any) -> None:
                log.debug("http " + fmt, *args)

        class _Server(ThreadingHTTPServer):
            request_queue_size = self.backlog  # listen backlog (the stdlib default is 5)

        self._httpd = _Server((self.host, self._port), _H)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="canaryml-http",
                                        daemon=True)
        self._thread.start()
        self._reaper_stop.clear()
        self._reaper = threading.Thread(target=self._reap, name="canaryml-http-deadline",
                                        daemon=True)
        self._reaper.start()
        log.info("observability server on %s (/metrics, /healthz, /livez%s)", self.url,
                 ", /api/ with bearer token" if self.token else "")
        return self

    # ---- request deadline ------------------------------------------------------------------
    def _arm(self, handler: Any) -> None:
        with self._deadline_lock:
            self._deadlines[handler] = time.monotonic() + self.request_deadline_s

    def _disarm(self, handler: Any) -> None:
        with self._deadline_lock:
            self._deadlines.pop(handler, None)

    def _reap(self) -> None:
        """Cut the reading side of every connection whose request is past its deadline: the
        handler's blocked read returns, it answers 408 (`expired`) and closes."""
        every_s = min(0.5, self.request_deadline_s / 4)
        while not self._reaper_stop.wait(every_s):
            now = time.monotonic()
            with self._deadline_lock:
                due = [h for h, t in self._deadlines.items() if t <= now]
                for h in due:
                    del self._deadlines[h]
            for h in due:
                h.expired = True
                log.debug("http: request from %s not received within %g s; closing",
                          h.client_address, self.request_deadline_s)
                with contextlib.suppress(OSError):
                    h.connection.shutdown(socket.SHUT_RD)

    def stop(self) -> None:
        self._reaper_stop.set()
        if self._reaper is not None:
            self._reaper.join(5)
            self._reaper = None
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
