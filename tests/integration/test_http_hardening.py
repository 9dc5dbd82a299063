"""Issue 16 #6: the controller's HTTP server over real sockets — body cap before routing and
auth, read timeout, listen backlog, 4xx (never 500) for malformed input, and no unauthenticated
API off loopback unless explicitly allowed."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator

import pytest
import requests

from canaryml.errors import ConfigError
from canaryml.serving.endpoints import (
    ARGO_VERDICT,
    FLAGGER_ROLLBACK,
    FLAGGER_ROLLOUT_CHECK,
    VerdictBoard,
    install,
)
from canaryml.serving.server import Health, ObservabilityServer, ServeMetrics

pytestmark = [pytest.mark.services, pytest.mark.timeout(120)]

TOKEN = "t0ken"
DEPLOYMENTS = [{"id": "api", "namespace": "demo", "flagger": "api"}]


@pytest.fixture
def srv(monkeypatch: pytest.MonkeyPatch) -> Iterator[ObservabilityServer]:
    monkeypatch.delenv("CANARYML_HTTP_HOST", raising=False)
    server = ObservabilityServer(ServeMetrics(), Health(), read_timeout_s=0.5)
    install(server, VerdictBoard(DEPLOYMENTS), token=TOKEN, stale_after_s=60)
    with server:
        yield server


def _raw(srv: ObservabilityServer, data: bytes, wait_s: float = 10.0) -> bytes:
    """Send `data` on a fresh connection; what the server answers before closing it (bounded)."""
    with socket.create_connection(("127.0.0.1", srv.port), timeout=wait_s) as s:
        s.sendall(data)
        chunks = []
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            try:
                chunk = s.recv(65536)
            except TimeoutError:
                break
            if not chunk:
                break
            chunks.append(chunk)
            if b"\r\n\r\n" in b"".join(chunks) and b"Connection: close" not in chunks[0]:
                break
        return b"".join(chunks)


def test_an_oversized_body_is_refused_before_auth_and_without_reading_it(
        srv: ObservabilityServer) -> None:
    # the headers promise 50 MB that never come: the answer must not wait for them
    head = (f"POST {FLAGGER_ROLLOUT_CHECK} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
            f"\r\nContent-Length: {50 * 1024 * 1024}\r\n\r\n").encode()
    answer = _raw(srv, head)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]  # 413, not 401: before auth
    assert b"over the limit of 1048576 bytes" in answer
    for bad, status in ((b"Content-Length: abc", b"400"), (b"Content-Length: -5", b"400"),
                        (b"Transfer-Encoding: chunked", b"411")):
        answer = _raw(srv, b"POST " + FLAGGER_ROLLBACK.encode() + b" HTTP/1.1\r\nHost: x\r\n"
                      + bad + b"\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 " + status), (bad, answer[:200])
    assert requests.get(srv.url + "/livez", timeout=5).status_code == 200  # still serving


def test_a_silent_connection_is_closed_after_the_read_timeout(srv: ObservabilityServer) -> None:
    with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as s:
        s.sendall(b"GET /livez HTTP/1.1\r\n")  # a request line, then nothing (slowloris)
        assert s.recv(1024) == b""  # closed by the server (read_timeout_s=0.5), not by us
    assert requests.get(srv.url + "/livez", timeout=5).status_code == 200


def test_the_listen_backlog_is_not_the_stdlib_default(srv: ObservabilityServer) -> None:
    assert srv._httpd is not None and srv._httpd.request_queue_size >= 128  # stdlib: 5


def test_malformed_input_is_a_4xx_never_a_500(srv: ObservabilityServer) -> None:
    auth = {"Authorization": f"Bearer {TOKEN}"}
    hook = {"name": "api", "namespace": "demo", "metadata": {"token": TOKEN}}
    cases: list[tuple[object, int, str]] = [
        ({**hook, "name": ["api"]}, 400, "name must be a string"),
        ({**hook, "namespace": {"a": 1}}, 400, "namespace must be a string"),
        ({**hook, "name": "x" * 300}, 400, "at most 253"),
        ({**hook, "checksum": 7}, 400, "checksum must be a string"),
        ({**hook, "metadata": {"token": TOKEN, "deployment": ["api"]}}, 400,
         "metadata.deployment must be a string"),
        ({**hook, "metadata": {"token": 12345}}, 401, "unauthorized"),  # not a string token
        ({**hook, "metadata": {"token": ["x"]}}, 401, "unauthorized"),
    ]
    for payload, status, words in cases:
        r = requests.post(srv.url + FLAGGER_ROLLOUT_CHECK, json=payload, timeout=5)
        assert r.status_code == status and words in r.json()["error"], (payload, r.text)
    deep = b"[" * 100_000 + b"]" * 100_000
    r = requests.post(srv.url + FLAGGER_ROLLOUT_CHECK, data=deep, headers=auth, timeout=5)
    assert r.status_code == 400 and "nested deeper" in r.json()["error"]
    r = requests.post(srv.url + FLAGGER_ROLLOUT_CHECK, data=b"\xff\xfe", headers=auth, timeout=5)
    assert r.status_code == 400 and "not UTF-8" in r.json()["error"]
    r = requests.get(srv.url + ARGO_VERDICT, params={"rollout": "y" * 300}, headers=auth,
                     timeout=5)
    assert r.status_code == 400 and "rollout must be at most 253" in r.json()["error"]
    r = requests.get(srv.url + ARGO_VERDICT, headers={"Authorization": "Bearer \u00e9\u00e9"},
                     timeout=5)
    assert r.status_code == 401
    metrics = requests.get(srv.url + "/metrics", timeout=5).text
    assert 'canaryml_errors_total{kind="http"}' not in metrics  # not one 500
    ok = requests.post(srv.url + FLAGGER_ROLLOUT_CHECK, json=hook, timeout=5)
    assert ok.status_code == 200 and json.loads(ok.text)["deployment"] == "api"


def test_no_unauthenticated_api_off_loopback_unless_allowed(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CANARYML_HTTP_HOST", raising=False)
    exposed = ObservabilityServer(ServeMetrics(), Health(), host="0.0.0.0")
    with pytest.raises(ConfigError, match=r"would listen on 0\.0\.0\.0 without a bearer token.*"
                                          r"CANARYML_HTTP_TOKEN_FILE.*allow_unauthenticated"):
        install(exposed, VerdictBoard(DEPLOYMENTS), token=None, stale_after_s=60)
    install(exposed, VerdictBoard(DEPLOYMENTS), token=None, stale_after_s=60,
            allow_unauthenticated=True)  # explicit opt-out
    install(ObservabilityServer(ServeMetrics(), Health(), host="0.0.0.0"),
            VerdictBoard(DEPLOYMENTS), token=TOKEN, stale_after_s=60)
    install(ObservabilityServer(ServeMetrics(), Health(), host="127.0.0.2"),
            VerdictBoard(DEPLOYMENTS), token=None, stale_after_s=60)  # loopback: fine
