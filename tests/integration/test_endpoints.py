"""Argo Rollouts `web` provider and Flagger webhook contracts over real HTTP.

The ObservabilityServer runs on 127.0.0.1 with the endpoints installed; a VerdictBoard with a
controllable clock stands in for the serve loop's `board.update(...)` calls. Each response is
parsed with a strict JSON parser (Go's encoding/json, used by Argo and Flagger, rejects NaN).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from canaryml.control.types import Action, Decision
from canaryml.errors import ConfigError
from canaryml.serving.endpoints import (
    ARGO_VERDICT,
    FLAGGER_CONFIRM_PROMOTION,
    FLAGGER_ROLLBACK,
    FLAGGER_ROLLOUT_CHECK,
    VerdictBoard,
    install,
    token_from_env,
)
from canaryml.serving.server import Health, ObservabilityServer, Response, ServeMetrics

pytestmark = [pytest.mark.services, pytest.mark.timeout(120)]

DEPLOYMENTS = [
    {"id": "web", "namespace": "demo", "rollout": "web-rollout", "canary": "web-canary",
     "stable": "web"},
    {"id": "api", "namespace": "demo", "flagger": "api"},
]
STALE_S = 90.0
TOKEN = "s3cret-token"


class Clock:
    def __init__(self, t: float = 1_700_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def _strict(text: str) -> Any:
    def reject(c: str) -> Any:
        raise ValueError(f"non-finite number {c} in JSON")
    return json.loads(text, parse_constant=reject)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def board(clock: Clock) -> VerdictBoard:
    return VerdictBoard(DEPLOYMENTS, clock=clock)


def _server(board: VerdictBoard, token: str | None) -> ObservabilityServer:
    srv = ObservabilityServer(ServeMetrics(), Health())
    install(srv, board, token=token, stale_after_s=STALE_S)
    return srv


@pytest.fixture
def url(board: VerdictBoard) -> Iterator[str]:
    with _server(board, None) as srv:
        yield srv.url


def argo(url: str, headers: dict[str, str] | None = None, **params: str) -> dict[str, Any]:
    r = requests.get(url + ARGO_VERDICT, params=params, headers=headers, timeout=5)
    assert r.status_code == 200, r.text  # never an HTTP error: 5 in a row abort a rollout
    body = _strict(r.text)
    assert set(body) >= {"score", "verdict", "action", "reasons", "model_version", "decided_at"}
    assert body["verdict"] in ("pass", "fail", "inconclusive")
    assert body["action"] in ("continue", "shrink", "rollback", "pause", "promote")
    return body


def flagger(url: str, path: str, payload: dict[str, Any], **kw: Any) -> requests.Response:
    return requests.post(url + path, json=payload, timeout=5, **kw)


def _cont(score: float, breaches: int = 0) -> Decision:
    return Decision(Action.CONTINUE, f"batch 1 clean ({score})", score,
                    {"reasons": [f"latency_p99={score:.2f}"], "breaches": breaches})


# ------------------------------------------------------------------------------------- Argo
def test_argo_verdicts_follow_the_latest_decision(board: VerdictBoard, clock: Clock,
                                                  url: str) -> None:
    board.set_revision("web", "abc")  # what serve's discovery reads from the Rollout
    q = {"namespace": "demo", "rollout": "web-rollout", "canary_hash": "abc", "stable_hash": "s1"}
    body = argo(url, **q)
    assert body["verdict"] == "inconclusive" and body["action"] == "pause"
    assert "no decision yet" in body["reasons"][0] and body["deployment"] == "web"

    board.update("web", _cont(0.12), "canary-scorer/3", clock.t)
    body = argo(url, **q)
    assert (body["verdict"], body["action"], body["score"]) == ("pass", "continue", 0.12)
    assert body["model_version"] == "canary-scorer/3" and body["decided_at"] == clock.t
    assert body["canary_hash"] == "abc" and body["stable_hash"] == "s1"

    board.update("web", _cont(0.71, breaches=1), "canary-scorer/3", clock.t)
    assert argo(url, **q)["verdict"] == "inconclusive"  # over threshold, not yet confirmed

    shrink = Decision(Action.SHRINK, "score 0.830 over threshold 0.500 2× in a row: shrink", 0.83,
                      {"reasons": ["latency_p99=0.61", "error_rate=0.22"], "breaches": 2})
    board.update("web", shrink, "canary-scorer/3", clock.t)
    body = argo(url, **q)
    assert (body["verdict"], body["action"], body["score"]) == ("fail", "shrink", 0.83)
    assert body["reasons"][:2] == ["latency_p99=0.61", "error_rate=0.22"]
    # the same deployment through every identity the endpoint accepts
    assert argo(url, deployment="web")["verdict"] == "fail"
    assert argo(url, rollout="web-rollout")["verdict"] == "fail"  # unique name, no namespace
    assert argo(url, canary_hash="abc")["verdict"] == "fail"  # a hash seen before


def test_argo_degraded_states_answer_inconclusive(board: VerdictBoard, clock: Clock,
                                                  url: str) -> None:
    body = argo(url, namespace="demo", rollout="nope")
    assert body["verdict"] == "inconclusive" and body["deployment"] is None
    assert "unknown deployment demo/nope" in body["reasons"][0]
    assert argo(url)["verdict"] == "inconclusive"  # no identity at all
    assert argo(url, deployment="ghost")["verdict"] == "inconclusive"

    # fail-safe pause (no data / model missing) with a NaN score: JSON null, not NaN
    pause = Decision(Action.PAUSE, "fail-safe: no canary data for deployment 'web'; holding",
                     float("nan"), {"reasons": []})
    board.update("web", pause, None, clock.t)
    body = argo(url, deployment="web")
    assert body["verdict"] == "inconclusive" and body["score"] is None
    assert "no canary data" in body["reasons"][0] and body["degraded"]

    # a decision older than stale_after_s: the loop stopped
    board.update("web", _cont(0.1), "v1", clock.t)
    clock.t += STALE_S + 1
    body = argo(url, deployment="web")
    assert body["verdict"] == "inconclusive" and body["reasons"][0].startswith("stale")

    # terminal decisions do not go stale (the loop stops ticking a rolled-back canary)
    board.update("web", Decision(Action.ROLLBACK, "roll back", 0.93, {}), "v1", clock.t)
    clock.t += 10 * STALE_S
    assert argo(url, deployment="web")["verdict"] == "fail"


def test_a_new_canary_revision_does_not_inherit_the_old_verdict(board: VerdictBoard,
                                                               clock: Clock) -> None:
    auth = {"Authorization": f"Bearer {TOKEN}"}  # an authenticated caller may report revisions
    with _server(board, TOKEN) as srv:
        url = srv.url
        board.update("web", Decision(Action.ROLLBACK, "roll back", 0.93, {}), "v1", clock.t)
        assert argo(url, auth, deployment="web", canary_hash="rev1")["verdict"] == "fail"
        clock.t += 5
        body = argo(url, auth, deployment="web", canary_hash="rev2")  # next rollout of the app
        assert body["verdict"] == "inconclusive" and "earlier revision" in body["reasons"][0]
        clock.t += 5
        board.update("web", _cont(0.05), "v1", clock.t)  # the controller decides again
        assert argo(url, auth, deployment="web", canary_hash="rev2")["verdict"] == "pass"


def test_an_unauthenticated_request_cannot_change_the_revision(board: VerdictBoard,
                                                               clock: Clock, url: str) -> None:
    """Issue 16 #5: one request with a made-up canary_hash/checksum used to flip a terminal
    fail to inconclusive for every later caller. Only the controller's own observation (or an
    authenticated caller) changes the revision; an odd request is answered for itself only."""
    board.set_revision("web", "rev1")  # the controller observed the Rollout's currentPodHash
    board.set_revision("api", "c1")
    board.update("web", Decision(Action.ROLLBACK, "roll back", 0.93, {}), "v1", clock.t)
    board.update("api", Decision(Action.ROLLBACK, "roll back", 0.91, {}), "v1", clock.t)
    clock.t += 5
    forged = argo(url, deployment="web", canary_hash="forged")
    assert forged["verdict"] == "inconclusive" and "not the one the controller knows" in (
        forged["reasons"][0])
    hook = {"name": "api", "namespace": "demo", "phase": "Progressing", "metadata": {}}
    assert flagger(url, FLAGGER_ROLLBACK, {**hook, "checksum": "forged"}).status_code == 409
    clock.t += 5
    # the real callers still get the controller's verdict
    assert argo(url, deployment="web", canary_hash="rev1")["verdict"] == "fail"
    assert argo(url, deployment="web")["verdict"] == "fail"
    assert flagger(url, FLAGGER_ROLLBACK, {**hook, "checksum": "c1"}).status_code == 200
    r = flagger(url, FLAGGER_ROLLOUT_CHECK, {**hook, "checksum": "c1"})
    assert r.status_code == 412 and r.json()["verdict"] == "fail"
    # without a known revision, an unauthenticated one adopts nothing either
    board.update("other", Decision(Action.ROLLBACK, "roll back", 0.9, {}), "v1", clock.t)
    assert argo(url, deployment="other", canary_hash="x")["verdict"] == "fail"
    assert argo(url, deployment="other", canary_hash="y")["verdict"] == "fail"
    # the controller observes a new revision: earlier decisions no longer count
    clock.t += 5
    board.set_revision("web", "rev2")
    assert argo(url, deployment="web", canary_hash="rev2")["verdict"] == "inconclusive"


# ---------------------------------------------------------------------------------- Flagger
def test_flagger_rollout_check_rollback_and_promotion_gate(board: VerdictBoard, clock: Clock,
                                                          url: str) -> None:
    hook = {"name": "api", "namespace": "demo", "phase": "Progressing", "checksum": "c1",
            "metadata": {}}
    # degraded (no decision yet): the check passes (Flagger's own metrics still run), no
    # rollback, and promotion waits
    r = flagger(url, FLAGGER_ROLLOUT_CHECK, hook)
    assert r.status_code == 200 and r.json()["verdict"] == "inconclusive"
    assert flagger(url, FLAGGER_ROLLBACK, hook).status_code == 409
    r = flagger(url, FLAGGER_CONFIRM_PROMOTION, hook)
    assert r.status_code == 409 and "no decision yet" in r.json()["reasons"][0]

    board.update("api", _cont(0.08), "v2", clock.t)
    assert flagger(url, FLAGGER_ROLLOUT_CHECK, hook).status_code == 200
    assert flagger(url, FLAGGER_ROLLBACK, hook).status_code == 409
    assert flagger(url, FLAGGER_CONFIRM_PROMOTION, hook).status_code == 200

    board.update("api", Decision(Action.ROLLBACK, "score 0.910 over threshold 0.500 2× in a row",
                                 0.91, {"reasons": ["error_rate=0.80"]}), "v2", clock.t)
    r = flagger(url, FLAGGER_ROLLOUT_CHECK, hook)
    assert r.status_code == 412  # non-2xx = failed check; the body says why
    body = r.json()
    assert body["verdict"] == "fail" and body["reasons"][0] == "error_rate=0.80"
    assert body["phase"] == "Progressing" and body["webhook"] == "rollout"
    assert flagger(url, FLAGGER_ROLLBACK, hook).status_code == 200  # roll back now
    assert flagger(url, FLAGGER_CONFIRM_PROMOTION, hook).status_code == 409

    # metadata.deployment names the id explicitly; unknown Canary → neutral
    other = {"name": "x", "namespace": "elsewhere", "metadata": {"deployment": "web"}}
    assert flagger(url, FLAGGER_ROLLOUT_CHECK, other).json()["deployment"] == "web"
    r = flagger(url, FLAGGER_ROLLOUT_CHECK, {"name": "x", "namespace": "elsewhere"})
    assert r.status_code == 200 and r.json()["deployment"] is None
    r = requests.post(url + FLAGGER_ROLLOUT_CHECK, data=b"{not json", timeout=5)
    assert r.status_code == 400 and "not JSON" in r.json()["error"]


# ------------------------------------------------------------------------------------- auth
def test_bearer_token_guards_every_api_route(board: VerdictBoard, clock: Clock) -> None:
    board.update("web", _cont(0.1), "v1", clock.t)
    with _server(board, TOKEN) as srv:
        ok = {"Authorization": f"Bearer {TOKEN}"}
        bad = {"Authorization": "Bearer nope"}
        for headers in ({}, bad, {"Authorization": TOKEN}):
            r = requests.get(srv.url + ARGO_VERDICT, params={"deployment": "web"},
                             headers=headers, timeout=5)
            assert r.status_code == 401 and "Bearer" in r.headers["WWW-Authenticate"]
        r = requests.get(srv.url + ARGO_VERDICT, params={"deployment": "web"},
                         headers={"authorization": f"bearer {TOKEN}"}, timeout=5)
        assert r.status_code == 200 and r.json()["verdict"] == "pass"
        # Flagger: the header or metadata.token
        hook = {"name": "web-rollout", "namespace": "demo", "metadata": {}}
        assert flagger(srv.url, FLAGGER_ROLLOUT_CHECK, hook).status_code == 401
        r = flagger(srv.url, FLAGGER_ROLLOUT_CHECK, {**hook, "metadata": {"token": "nope"}})
        assert r.status_code == 401
        r = flagger(srv.url, FLAGGER_ROLLOUT_CHECK, {**hook, "metadata": {"token": TOKEN}})
        assert r.status_code == 200 and r.json()["deployment"] == "web"
        assert flagger(srv.url, FLAGGER_ROLLOUT_CHECK, hook, headers=ok).status_code == 200
        # a bad body is not parsed for unauthenticated callers
        r = requests.post(srv.url + FLAGGER_ROLLBACK, data=b"{x", timeout=5)
        assert r.status_code == 401
        # any other /api route is guarded too; observability stays open
        srv.route("GET", "/api/v1/other", lambda _: Response.json({"x": 1}))
        assert requests.get(srv.url + "/api/v1/other", timeout=5).status_code == 401
        for path in ("/metrics", "/healthz", "/livez"):
            assert requests.get(srv.url + path, timeout=5).status_code == 200, path


def test_install_rejects_a_conflicting_token_and_bad_staleness(board: VerdictBoard) -> None:
    srv = ObservabilityServer(ServeMetrics(), Health(), token="a")
    with pytest.raises(ConfigError, match="different bearer token"):
        install(srv, board, token="b", stale_after_s=60)
    with pytest.raises(ConfigError, match="stale_after_s"):
        install(srv, board, token=None, stale_after_s=0)
    with pytest.raises(ConfigError, match="names both"):
        VerdictBoard([{"id": "a", "namespace": "n", "rollout": "r"},
                      {"id": "b", "namespace": "n", "canary": "r"}])


def test_host_defaults_to_loopback_and_env_overrides(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CANARYML_HTTP_HOST", raising=False)
    assert ObservabilityServer(ServeMetrics(), Health()).host == "127.0.0.1"
    monkeypatch.setenv("CANARYML_HTTP_HOST", "0.0.0.0")
    assert ObservabilityServer(ServeMetrics(), Health()).host == "0.0.0.0"
    assert ObservabilityServer(ServeMetrics(), Health(), host="127.0.0.1").host == "0.0.0.0"


def test_token_from_env(tmp_path: Path) -> None:
    assert token_from_env({}) is None
    assert token_from_env({"CANARYML_HTTP_TOKEN": " t1 \n"}) == "t1"
    f = tmp_path / "token"
    f.write_text("t2\n")
    assert token_from_env({"CANARYML_HTTP_TOKEN_FILE": str(f)}) == "t2"
    with pytest.raises(ConfigError, match="cannot be read"):
        token_from_env({"CANARYML_HTTP_TOKEN_FILE": str(tmp_path / "missing")})
    f.write_text("")
    with pytest.raises(ConfigError, match="is empty"):
        token_from_env({"CANARYML_HTTP_TOKEN_FILE": str(f)})
