"""SwarmActuator against an emulated Docker Engine API (no engine runs on this machine).

The emulator is a stdlib HTTP server on 127.0.0.1 implementing the three endpoints the
actuator uses — `GET /version`, `GET /v{api}/services/{id}`, `POST /v{api}/services/{id}/update`
— with Swarm's semantics for `version` (optimistic concurrency, "update out of sequence") and
`rollback=previous` (swap Spec and PreviousSpec, mark UpdateStatus). Every request is recorded
so the tests assert the exact paths, query arguments and JSON bodies the docker SDK sends.
"""

from __future__ import annotations

import copy
import json
import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

docker = pytest.importorskip("docker")

from canaryml.control.types import Action, Actuator, Decision  # noqa: E402
from canaryml.errors import ActuatorError, ConfigError  # noqa: E402
from canaryml.serving.swarm import (  # noqa: E402
    LABEL_LAST_STEP,
    SwarmActuator,
    SwarmRollbackMode,
    SwarmStrategy,
    build_swarm_actuator,
)

pytestmark = pytest.mark.timeout(60)  # a hung service fails the test, not CI

API = "1.45"
CLOCK_S = 1_700_000_000.0  # 2023-11-14T22:13:20Z
OLD_IMAGE = "registry.example/web:1.4.2"
NEW_IMAGE = "registry.example/web:1.5.0"


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    query: dict[str, str]
    body: dict[str, Any] | None


class EngineEmulator:
    """Just enough of the Docker Engine API (Swarm services) to exercise an actuator."""

    def __init__(self) -> None:
        self.services: dict[str, dict[str, Any]] = {}
        self.requests: list[Request] = []
        self.bump_before_next_update = 0  # simulate a concurrent writer N times
        self._next_index = 100
        self._lock = threading.Lock()
        emulator = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:  # quiet
                pass

            def do_GET(self) -> None:
                emulator._handle(self, "GET")

            def do_POST(self) -> None:
                emulator._handle(self, "POST")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"tcp://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, args=(0.02,),
                                        daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    # -- state -------------------------------------------------------------------------------
    def add_service(self, name: str, image: str, replicas: int | None = None,
                    previous_image: str | None = None, labels: dict[str, str] | None = None,
                    update_state: str | None = None) -> dict[str, Any]:
        mode: dict[str, Any] = ({"Global": {}} if replicas is None
                                else {"Replicated": {"Replicas": replicas}})
        spec = {
            "Name": name,
            "Labels": dict(labels or {"com.example.team": "web"}),
            "TaskTemplate": {"ContainerSpec": {"Image": image, "Env": ["PORT=8080"]},
                             "ForceUpdate": 0},
            "Mode": mode,
            "UpdateConfig": {"Parallelism": 1, "FailureAction": "pause"},
            "EndpointSpec": {"Mode": "vip"},
        }
        service: dict[str, Any] = {"ID": f"id-{name}", "Version": {"Index": self._bump()},
                                   "Spec": spec}
        if previous_image is not None:
            previous = copy.deepcopy(spec)
            previous["TaskTemplate"]["ContainerSpec"]["Image"] = previous_image
            service["PreviousSpec"] = previous
        if update_state is not None:
            service["UpdateStatus"] = {"State": update_state, "Message": "update rolled back"}
        self.services[service["ID"]] = service
        return service

    def get(self, name: str) -> dict[str, Any]:
        return self._find(name) or {}

    def posts(self) -> list[Request]:
        return [r for r in self.requests if r.method == "POST"]

    def _bump(self) -> int:
        self._next_index += 1
        return self._next_index

    def _find(self, ref: str) -> dict[str, Any] | None:
        for service in self.services.values():
            if ref in (service["ID"], service["Spec"]["Name"]):
                return service
        return None

    # -- HTTP --------------------------------------------------------------------------------
    def _handle(self, handler: BaseHTTPRequestHandler, method: str) -> None:
        parts = urlsplit(handler.path)
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        length = int(handler.headers.get("Content-Length") or 0)
        raw = handler.rfile.read(length) if length else b""
        body = json.loads(raw) if raw else None
        with self._lock:
            self.requests.append(Request(method, parts.path, query, body))
            status, payload = self._route(method, parts.path, query, body)
        data = json.dumps(payload).encode()
        handler.send_response(status)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        handler.wfile.write(data)

    def _route(self, method: str, path: str, query: dict[str, str],
               body: dict[str, Any] | None) -> tuple[int, Any]:
        if method == "GET" and path == "/version":
            return 200, {"ApiVersion": API, "MinAPIVersion": "1.24", "Version": "26.1.4"}
        segments = path.strip("/").split("/")
        if len(segments) < 3 or segments[0] != f"v{API}" or segments[1] != "services":
            return 404, {"message": f"page not found: {path}"}
        service = self._find(segments[2])
        if service is None:
            return 404, {"message": f"service {segments[2]} not found"}
        if method == "GET" and len(segments) == 3:
            return 200, service
        if method == "POST" and len(segments) == 4 and segments[3] == "update":
            return self._update(service, query, body)
        return 404, {"message": f"page not found: {path}"}

    def _update(self, service: dict[str, Any], query: dict[str, str],
                body: dict[str, Any] | None) -> tuple[int, Any]:
        if self.bump_before_next_update > 0:  # someone else wrote first
            self.bump_before_next_update -= 1
            service["Version"]["Index"] = self._bump()
        if "version" not in query:
            return 400, {"message": "invalid service version ''"}
        if int(query["version"]) != service["Version"]["Index"]:
            return 500, {"message": "rpc error: code = Unknown desc = update out of sequence"}
        if body is None:
            return 400, {"message": "missing service spec"}
        if query.get("rollback") == "previous":
            if "PreviousSpec" not in service:
                return 500, {"message": "service does not have a previous spec"}
            service["Spec"], service["PreviousSpec"] = service["PreviousSpec"], service["Spec"]
            service["UpdateStatus"] = {"State": "rollback_started",
                                       "Message": "manually requested rollback"}
        else:
            service["PreviousSpec"] = service["Spec"]
            service["Spec"] = body
            service.pop("UpdateStatus", None)
        service["Version"]["Index"] = self._bump()
        return 200, {"Warnings": None}


@pytest.fixture
def engine() -> Iterator[EngineEmulator]:
    emulator = EngineEmulator()
    yield emulator
    emulator.close()


@pytest.fixture
def client(engine: EngineEmulator) -> Iterator[Any]:
    c = docker.DockerClient(base_url=engine.url, version="auto", timeout=5)
    yield c
    c.close()


def _actuator(client: Any, **strategy: Any) -> SwarmActuator:
    return SwarmActuator(client, "web-canary", "web", SwarmStrategy(**strategy),
                         clock=lambda: CLOCK_S)


def _stamp(step: int, action: str, score: str = "0.9100",
           reason: str = "score 0.91 > 0.80 for 3 ticks") -> dict[str, str]:
    return {
        "canaryml.io/last-step": str(step),
        "canaryml.io/last-action": action,
        "canaryml.io/deployment-id": "web-rollout-42",
        "canaryml.io/actor": "canaryml-controller",
        "canaryml.io/reason": reason,
        "canaryml.io/score": score,
        "canaryml.io/applied-at": "2023-11-14T22:13:20Z",
    }


def _decision(action: Action, score: float | None = 0.91) -> Decision:
    return Decision(action=action, reason="score 0.91 > 0.80 for 3 ticks", score=score)


def _calls(engine: EngineEmulator) -> list[tuple[str, str, dict[str, str]]]:
    return [(r.method, r.path, r.query) for r in engine.requests]


V = f"/v{API}/services"


def test_is_an_actuator(client: Any) -> None:
    assert isinstance(_actuator(client), Actuator)


def test_shrink_scales_canary_down_one_batch_and_moves_capacity_to_stable(
        engine: EngineEmulator, client: Any) -> None:
    canary = engine.add_service("web-canary", NEW_IMAGE, replicas=3, previous_image=OLD_IMAGE)
    stable = engine.add_service("web", OLD_IMAGE, replicas=7)
    canary_v, stable_v = canary["Version"]["Index"], stable["Version"]["Index"]
    original_canary_spec = copy.deepcopy(canary["Spec"])

    _actuator(client, batch_size=2).apply("web-rollout-42", _decision(Action.SHRINK), step=7)

    assert _calls(engine) == [
        ("GET", "/version", {}),
        ("GET", f"{V}/web-canary", {}),
        ("GET", f"{V}/web", {}),
        ("POST", f"{V}/id-web/update", {"version": str(stable_v)}),
        ("POST", f"{V}/id-web-canary/update", {"version": str(canary_v)}),
    ]
    stable_body, canary_body = (r.body for r in engine.posts())
    assert stable_body is not None and canary_body is not None
    assert stable_body["Mode"] == {"Replicated": {"Replicas": 9}}
    assert canary_body["Mode"] == {"Replicated": {"Replicas": 1}}
    assert canary_body["Labels"] == {"com.example.team": "web", **_stamp(7, "shrink")}
    assert stable_body["Labels"] == {"com.example.team": "web", **_stamp(7, "shrink")}
    # Only Mode and Labels change: the task template (image, env) is sent back untouched.
    expected = {**original_canary_spec, "Mode": {"Replicated": {"Replicas": 1}},
                "Labels": canary_body["Labels"]}
    assert canary_body == expected


def test_repeated_step_is_a_no_op(engine: EngineEmulator, client: Any) -> None:
    engine.add_service("web-canary", NEW_IMAGE, replicas=3)
    engine.add_service("web", OLD_IMAGE, replicas=7)
    actuator = _actuator(client)
    actuator.apply("web-rollout-42", _decision(Action.SHRINK), step=7)
    n_posts = len(engine.posts())
    actuator.apply("web-rollout-42", _decision(Action.SHRINK), step=7)  # controller retry
    actuator.apply("web-rollout-42", _decision(Action.ROLLBACK), step=6)  # stale step
    assert len(engine.posts()) == n_posts == 2
    assert engine.requests[-1] == Request("GET", f"{V}/web-canary", {}, None)
    assert engine.get("web-canary")["Spec"]["Mode"]["Replicated"]["Replicas"] == 2
    actuator.apply("web-rollout-42", _decision(Action.SHRINK), step=8)
    assert engine.get("web-canary")["Spec"]["Mode"]["Replicated"]["Replicas"] == 1
    assert engine.get("web")["Spec"]["Mode"]["Replicated"]["Replicas"] == 9


def test_retry_after_crash_between_writes_does_not_scale_stable_twice(
        engine: EngineEmulator, client: Any) -> None:
    engine.add_service("web-canary", NEW_IMAGE, replicas=3)
    # The stable write of step 7 landed, the canary write did not (controller crashed).
    engine.add_service("web", OLD_IMAGE, replicas=8, labels=_stamp(7, "shrink"))
    _actuator(client).apply("web-rollout-42", _decision(Action.SHRINK), step=7)
    assert [r.path for r in engine.posts()] == [f"{V}/id-web-canary/update"]
    assert engine.get("web")["Spec"]["Mode"]["Replicated"]["Replicas"] == 8
    assert engine.get("web-canary")["Spec"]["Mode"]["Replicated"]["Replicas"] == 2


def test_rollback_previous_spec_posts_rollback_then_stamps(
        engine: EngineEmulator, client: Any) -> None:
    canary = engine.add_service("web-canary", NEW_IMAGE, replicas=2, previous_image=OLD_IMAGE)
    engine.add_service("web", OLD_IMAGE, replicas=8)
    v0 = canary["Version"]["Index"]
    spec_before = copy.deepcopy(canary["Spec"])

    _actuator(client).apply("web-rollout-42", _decision(Action.ROLLBACK), step=12)

    rollback, stamp = engine.posts()
    assert (rollback.path, rollback.query) == (
        f"{V}/id-web-canary/update", {"version": str(v0), "rollback": "previous"})
    assert rollback.body == spec_before  # what `docker service rollback` sends
    after_rollback_version = engine.requests[-2]  # the GET before the stamp
    assert after_rollback_version == Request("GET", f"{V}/web-canary", {}, None)
    assert stamp.path == f"{V}/id-web-canary/update"
    assert "rollback" not in stamp.query
    assert int(stamp.query["version"]) > v0
    assert stamp.body is not None
    assert stamp.body["TaskTemplate"]["ContainerSpec"]["Image"] == OLD_IMAGE
    assert stamp.body["Mode"] == {"Replicated": {"Replicas": 2}}  # replicas untouched
    assert stamp.body["Labels"] == {"com.example.team": "web", **_stamp(12, "rollback"),
                                    "canaryml.io/rollback-mode": "previous_spec"}
    assert engine.get("web")["Spec"]["Mode"]["Replicated"]["Replicas"] == 8  # stable untouched
    assert engine.get("web-canary")["Spec"]["TaskTemplate"]["ContainerSpec"]["Image"] == OLD_IMAGE


def test_rollback_is_not_repeated_when_swarm_already_rolled_back(
        engine: EngineEmulator, client: Any) -> None:
    # e.g. FailureAction=rollback fired, or we crashed after our rollback request: a second
    # rollback=previous would swap the bad image back in.
    engine.add_service("web-canary", OLD_IMAGE, replicas=2, previous_image=NEW_IMAGE,
                       update_state="rollback_completed")
    _actuator(client).apply("web-rollout-42", _decision(Action.ROLLBACK), step=12)
    (stamp,) = engine.posts()
    assert "rollback" not in stamp.query
    assert engine.get("web-canary")["Spec"]["TaskTemplate"]["ContainerSpec"]["Image"] == OLD_IMAGE
    assert engine.get("web-canary")["Spec"]["Labels"][LABEL_LAST_STEP] == "12"


def test_rollback_falls_back_to_scale_to_zero_when_previous_spec_keeps_the_image(
        engine: EngineEmulator, client: Any, caplog: pytest.LogCaptureFixture) -> None:
    # The last update was a scale (same image): rollback=previous would only undo the scale.
    engine.add_service("web-canary", NEW_IMAGE, replicas=2, previous_image=NEW_IMAGE)
    engine.add_service("web", OLD_IMAGE, replicas=8)
    with caplog.at_level(logging.WARNING, logger="canaryml.serving.swarm"):
        _actuator(client).apply("web-rollout-42", _decision(Action.ROLLBACK), step=3)
    assert "scaling the canary to 0" in caplog.text
    assert all("rollback" not in r.query for r in engine.posts())
    assert engine.get("web-canary")["Spec"]["Mode"]["Replicated"]["Replicas"] == 0
    assert engine.get("web")["Spec"]["Mode"]["Replicated"]["Replicas"] == 10
    labels = engine.get("web-canary")["Spec"]["Labels"]
    assert labels["canaryml.io/rollback-mode"] == "scale_to_zero"


def test_rollback_scale_to_zero_mode_without_keeping_capacity(
        engine: EngineEmulator, client: Any) -> None:
    canary = engine.add_service("web-canary", NEW_IMAGE, replicas=2, previous_image=OLD_IMAGE)
    engine.add_service("web", OLD_IMAGE, replicas=8)
    v0 = canary["Version"]["Index"]
    actuator = _actuator(client, rollback="scale_to_zero", keep_capacity=False)
    actuator.apply("web-rollout-42", _decision(Action.ROLLBACK, score=None), step=4)
    (post,) = engine.posts()
    assert (post.path, post.query) == (f"{V}/id-web-canary/update",
                                       {"version": str(v0)})
    assert post.body is not None
    assert post.body["Mode"] == {"Replicated": {"Replicas": 0}}
    assert post.body["Labels"] == {"com.example.team": "web", **_stamp(4, "rollback", score=""),
                                   "canaryml.io/rollback-mode": "scale_to_zero"}
    assert engine.get("web")["Spec"]["Mode"]["Replicated"]["Replicas"] == 8


def test_promote_moves_image_and_capacity_to_stable(engine: EngineEmulator, client: Any) -> None:
    engine.add_service("web-canary", NEW_IMAGE, replicas=2, previous_image=OLD_IMAGE)
    engine.add_service("web", OLD_IMAGE, replicas=8)
    _actuator(client).apply("web-rollout-42", _decision(Action.PROMOTE, score=0.05), step=20)
    stable_body, canary_body = (r.body for r in engine.posts())
    assert stable_body is not None and canary_body is not None
    assert stable_body["TaskTemplate"]["ContainerSpec"] == {"Image": NEW_IMAGE,
                                                            "Env": ["PORT=8080"]}
    assert stable_body["Mode"] == {"Replicated": {"Replicas": 10}}
    assert canary_body["Mode"] == {"Replicated": {"Replicas": 0}}
    assert canary_body["Labels"]["canaryml.io/last-action"] == "promote"
    assert canary_body["Labels"]["canaryml.io/score"] == "0.0500"


@pytest.mark.parametrize("action", [Action.CONTINUE, Action.PAUSE])
def test_continue_and_pause_touch_nothing(engine: EngineEmulator, client: Any,
                                          action: Action) -> None:
    engine.add_service("web-canary", NEW_IMAGE, replicas=2)
    engine.add_service("web", OLD_IMAGE, replicas=8)
    _actuator(client).apply("web-rollout-42", _decision(action), step=1)
    assert engine.posts() == []
    assert [r.path for r in engine.requests] == ["/version"]


def test_out_of_sequence_write_is_reread_and_retried(engine: EngineEmulator, client: Any) -> None:
    engine.add_service("web-canary", NEW_IMAGE, replicas=3)
    engine.add_service("web", OLD_IMAGE, replicas=7)
    engine.bump_before_next_update = 1
    _actuator(client, keep_capacity=False).apply("web-rollout-42", _decision(Action.SHRINK), 2)
    first, second = engine.posts()
    assert first.query["version"] != second.query["version"]
    assert engine.requests[-2] == Request("GET", f"{V}/web-canary", {}, None)  # the re-read
    assert engine.get("web-canary")["Spec"]["Mode"]["Replicated"]["Replicas"] == 2


def test_persistent_conflict_raises(engine: EngineEmulator, client: Any) -> None:
    engine.add_service("web-canary", NEW_IMAGE, replicas=3)
    engine.add_service("web", OLD_IMAGE, replicas=7)
    engine.bump_before_next_update = 10
    with pytest.raises(ActuatorError, match="kept changing"):
        _actuator(client, keep_capacity=False, conflict_retries=1).apply(
            "web-rollout-42", _decision(Action.SHRINK), 2)
    assert len(engine.posts()) == 2


def test_missing_service_names_it(engine: EngineEmulator, client: Any) -> None:
    engine.add_service("web", OLD_IMAGE, replicas=7)
    with pytest.raises(ActuatorError, match=r"'web-canary' not found.*docker service ls"):
        _actuator(client).apply("web-rollout-42", _decision(Action.ROLLBACK), step=1)
    assert engine.posts() == []


def test_global_mode_canary_cannot_shrink(engine: EngineEmulator, client: Any) -> None:
    engine.add_service("web-canary", NEW_IMAGE, replicas=None)
    engine.add_service("web", OLD_IMAGE, replicas=7)
    with pytest.raises(ActuatorError, match="'Global' mode"):
        _actuator(client).apply("web-rollout-42", _decision(Action.SHRINK), step=1)
    assert engine.posts() == []


def test_unreachable_engine_is_an_actuator_error(engine: EngineEmulator, client: Any) -> None:
    engine.add_service("web-canary", NEW_IMAGE, replicas=3)
    actuator = _actuator(client)
    engine.close()
    with pytest.raises(ActuatorError, match="cannot reach the Docker Engine API"):
        actuator.apply("web-rollout-42", _decision(Action.SHRINK), step=1)


def test_build_swarm_actuator_negotiates_version(engine: EngineEmulator) -> None:
    engine.add_service("web-canary", NEW_IMAGE, replicas=1)
    engine.add_service("web", OLD_IMAGE, replicas=1)
    actuator = build_swarm_actuator(engine.url, "web-canary", "web",
                                    SwarmStrategy(rollback=SwarmRollbackMode.SCALE_TO_ZERO))
    actuator.apply("d", _decision(Action.ROLLBACK), step=1)
    assert engine.requests[0].path == "/version"
    assert engine.get("web-canary")["Spec"]["Mode"]["Replicated"]["Replicas"] == 0
    actuator.client.close()


@pytest.mark.parametrize("kwargs, match", [
    ({"rollback": "revert"}, "unknown Swarm rollback mode 'revert'"),
    ({"batch_size": 0}, "batch_size must be >= 1"),
    ({"conflict_retries": -1}, "conflict_retries"),
])
def test_strategy_validation(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        SwarmStrategy(**kwargs)


def test_bad_engine_url_and_same_services() -> None:
    with pytest.raises(ConfigError, match="no scheme"):
        build_swarm_actuator("127.0.0.1:2375", "web-canary", "web")
    with pytest.raises(ConfigError, match="two services"):
        SwarmActuator(object(), "web", "web")
