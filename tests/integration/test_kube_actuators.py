"""Actuators through the official kubernetes client against kmock's API emulation."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from canaryml.control.policy import PolicyState, RollbackPolicy
from canaryml.control.types import Action, Decision, Window
from canaryml.errors import ActuatorError
from canaryml.serving.actuators import (
    ArgoRolloutActuator,
    DeploymentActuator,
    DeploymentTarget,
    RolloutTarget,
)
from canaryml.serving.decision_log import DecisionLog
from tests.harness.kube import DEPLOYMENTS, ROLLOUTS, KubeHarness, start_kube

pytestmark = [pytest.mark.services, pytest.mark.timeout(180)]

NS = "shop"
DEP = "/apis/apps/v1/namespaces/shop/deployments/"
RO = "/apis/argoproj.io/v1alpha1/namespaces/shop/rollouts/"


@pytest.fixture
def kube() -> Iterator[KubeHarness]:
    with start_kube() as k:
        k.put(DEPLOYMENTS, NS, "web-canary", {"spec": {"replicas": 3}})
        k.put(DEPLOYMENTS, NS, "web-stable", {"spec": {"replicas": 7}})
        steps = [{"setWeight": 10}, {"pause": {}}, {"setWeight": 40}, {"pause": {}}]
        k.put(ROLLOUTS, NS, "web", {"spec": {"strategy": {"canary": {"steps": steps}}},
                                    "status": {"currentStepIndex": 3}})
        yield k


def ann(step: int, action: str, reason: str, score: str) -> dict[str, str]:
    return {"canaryml.io/last-step": str(step), "canaryml.io/last-action": action,
            "canaryml.io/actor": "canaryml-test", "canaryml.io/reason": reason,
            "canaryml.io/score": score}


def deployments(kube: KubeHarness, **kw: object) -> DeploymentActuator:
    return DeploymentActuator(kube.api_client, {"d1": DeploymentTarget(NS, "web-canary", "web-stable")},
                              actor="canaryml-test", backoff_s=0.01, **kw)  # type: ignore[arg-type]


def replicas(kube: KubeHarness) -> tuple[int, int]:
    return (kube.get(DEPLOYMENTS, NS, "web-canary")["spec"]["replicas"],
            kube.get(DEPLOYMENTS, NS, "web-stable")["spec"]["replicas"])


def test_gradual_rollback_shrinks_batch_by_batch_and_stops_when_score_recovers(
        kube: KubeHarness) -> None:
    act = deployments(kube, batch_size=1)
    threshold, seen = 0.8, []
    for step, score in enumerate([0.9, 0.92, 0.5, 0.4], start=1):
        action = Action.SHRINK if score > threshold else Action.CONTINUE
        act.apply("d1", Decision(action, f"score {score}", score), step)
        seen.append(replicas(kube))
    assert seen == [(2, 8), (1, 9), (1, 9), (1, 9)]
    assert kube.patches() == [
        (DEP + "web-stable", {"metadata": {"annotations": ann(1, "shrink", "score 0.9", "0.9000")},
                              "spec": {"replicas": 8}}),
        (DEP + "web-canary", {"metadata": {"annotations": ann(1, "shrink", "score 0.9", "0.9000")},
                              "spec": {"replicas": 2}}),
        (DEP + "web-stable", {"metadata": {"annotations": ann(2, "shrink", "score 0.92", "0.9200")},
                              "spec": {"replicas": 9}}),
        (DEP + "web-canary", {"metadata": {"annotations": ann(2, "shrink", "score 0.92", "0.9200")},
                              "spec": {"replicas": 1}}),
    ]  # continue sends nothing
    assert all(s.content_type.startswith("application/merge-patch+json") for s in kube.sent)


def test_immediate_rollback_scales_canary_to_zero_and_restores_stable(kube: KubeHarness) -> None:
    act = deployments(kube, batch_size=1)
    act.apply("d1", Decision(Action.ROLLBACK, "breach predicted in 120s", 0.97), 5)
    act.apply("d1", Decision(Action.ROLLBACK, "breach predicted in 120s", 0.97), 5)  # retried tick
    assert replicas(kube) == (0, 10)
    assert [(p, b["spec"]) for p, b in kube.patches()] == [
        (DEP + "web-stable", {"replicas": 10}), (DEP + "web-canary", {"replicas": 0})]
    canary = kube.get(DEPLOYMENTS, NS, "web-canary")
    assert canary["metadata"]["annotations"] == ann(5, "rollback", "breach predicted in 120s", "0.9700")


def test_pause_and_promote_only_annotate(kube: KubeHarness) -> None:
    act = deployments(kube)
    act.apply("d1", Decision(Action.PAUSE, "no data: latency_p99", None), 1)
    act.apply("d1", Decision(Action.PROMOTE, "healthy for 20 intervals", 0.05), 2)
    assert kube.patches() == [
        (DEP + "web-canary", {"metadata": {"annotations": ann(1, "pause", "no data: latency_p99", "")}}),
        (DEP + "web-canary", {"metadata": {"annotations": ann(2, "promote", "healthy for 20 intervals",
                                                              "0.0500")}}),
    ]
    assert replicas(kube) == (3, 7)


@pytest.mark.parametrize("landed", [False, True])
@pytest.mark.parametrize("status", [409, 503])
def test_retry_after_409_or_503_never_acts_twice(kube: KubeHarness, status: int, landed: bool) -> None:
    act = deployments(kube, batch_size=2)
    kube.inject("PATCH", status, landed=landed, name="web-stable")
    kube.inject("PATCH", status, landed=landed, name="web-canary")
    act.apply("d1", Decision(Action.SHRINK, "high", 0.9), 3)
    assert replicas(kube) == (1, 9)  # exactly one batch of 2 moved
    n_patches = len(kube.patches())
    assert n_patches == (2 if landed else 4)  # a landed write is never re-sent
    act.apply("d1", Decision(Action.SHRINK, "high", 0.9), 3)  # the controller retries the tick
    assert replicas(kube) == (1, 9) and len(kube.patches()) == n_patches


def test_persistent_503_raises_and_the_decision_stays_pending(kube: KubeHarness,
                                                               tmp_path: Path) -> None:
    act = deployments(kube, retries=2)
    kube.inject("PATCH", 503, count=10)
    log = DecisionLog(tmp_path / "d.sqlite")
    decision = Decision(Action.ROLLBACK, "score 0.99", 0.99)
    entry = log.record("d1", 9, decision)  # intent first
    with pytest.raises(ActuatorError, match="failed after 3 attempt"):
        act.apply("d1", decision, 9)
    log.mark_failed(entry.id, "503")
    assert replicas(kube) == (3, 7)
    kube.emulator.faults.clear()
    for pending in log.pending():  # restart: re-apply what was logged but not applied
        act.apply(pending.deployment_id, pending.decision, pending.step)
        log.mark_applied(pending.id)
    assert replicas(kube) == (0, 10) and log.pending() == []
    assert len(log.entries()) == 1


def argo(kube: KubeHarness) -> ArgoRolloutActuator:
    return ArgoRolloutActuator(kube.api_client, {"d1": RolloutTarget(NS, "web")},
                               actor="canaryml-test", weight_step=15, backoff_s=0.01)


def test_argo_gradual_lowers_weight_then_aborts(kube: KubeHarness) -> None:
    act = argo(kube)
    for step in (1, 2, 3):
        act.apply("d1", Decision(Action.SHRINK, "high", 0.9), step)
    act.apply("d1", Decision(Action.SHRINK, "high", 0.9), 3)  # repeated: no-op
    a = lambda s: {"annotations": ann(s, "shrink", "high", "0.9000")}  # noqa: E731
    assert kube.patches() == [
        (RO + "web", {"metadata": a(1), "spec": {"strategy": {"canary": {
            "steps": [{"setWeight": 25}, {"pause": {}}]}}}}),
        (RO + "web", {"metadata": a(2), "spec": {"strategy": {"canary": {
            "steps": [{"setWeight": 10}, {"pause": {}}]}}}}),
        (RO + "web/status", {"status": {"abort": True}}),  # 10 - 15 < 0: finish by aborting
        (RO + "web", {"metadata": a(3), "spec": {"strategy": {"canary": {
            "steps": [{"setWeight": 0}, {"pause": {}}]}}}}),
    ]


def test_argo_abort_pause_promote(kube: KubeHarness) -> None:
    act = argo(kube)
    act.apply("d1", Decision(Action.PAUSE, "model unavailable", None), 1)
    act.apply("d1", Decision(Action.ROLLBACK, "score 0.95", 0.95), 2)
    kube.inject("PATCH", 503, landed=True, name="web")  # status landed, answer lost
    act.apply("d1", Decision(Action.PROMOTE, "passed", 0.1), 3)
    got = [(p, b.get("spec"), b.get("status")) for p, b in kube.patches()]
    assert got == [
        (RO + "web", {"paused": True}, None),
        (RO + "web/status", None, {"abort": True}),
        (RO + "web", None, None),
        (RO + "web/status", None, {"promoteFull": True}),  # 503, landed
        (RO + "web/status", None, {"promoteFull": True}),  # retry: same value, idempotent
        (RO + "web", None, None),
    ]
    ro = kube.get(ROLLOUTS, NS, "web")
    assert ro["spec"]["paused"] is True and ro["status"]["abort"] is True
    assert ro["metadata"]["annotations"]["canaryml.io/last-action"] == "promote"


class Scores:
    """A policy deciding shrink above 0.8 else continue, from a scripted score series."""

    name = "model"
    lookback = 1
    rollback = RollbackPolicy()

    def __init__(self, scores: list[float]) -> None:
        self.scores = scores

    def initial_state(self) -> PolicyState:
        return PolicyState()

    def step(self, window: Window | None, now_s: float, state: PolicyState, *,
             failure: str | None = None) -> tuple[Decision, PolicyState]:
        s = self.scores.pop(0)
        return Decision(Action.SHRINK if s > 0.8 else Action.CONTINUE, f"score {s}", s), state


class OneRow:
    def fetch(self, deployment_id: str, now_s: float, lookback: int) -> Window:
        return Window(deployment_id, now_s, np.array([int(now_s)]), np.ones((1, 1), np.float32),
                      None, ("m",))


def test_serve_loop_survives_api_faults_and_a_restart(kube: KubeHarness, tmp_path: Path) -> None:
    from canaryml.serving.loop import ServeLoop

    path = tmp_path / "decisions.sqlite"
    loop = ServeLoop(Scores([0.9, 0.9]), OneRow(), deployments(kube, retries=1),
                     DecisionLog(path))
    kube.inject("PATCH", 409, name="web-stable")  # conflict, retried within the call
    loop.tick(["d1"])
    assert replicas(kube) == (2, 8)
    kube.inject("PATCH", 503, count=4)  # the API is down for this whole tick
    loop.tick(["d1"])
    assert replicas(kube) == (2, 8)
    assert loop.health.snapshot()["status"] == "degraded"
    loop.log.close()  # the controller dies here

    loop2 = ServeLoop(Scores([0.3]), OneRow(), deployments(kube), DecisionLog(path))
    loop2.resume()  # re-applies step 1 (pending) exactly once
    loop2.resume()
    loop2.tick(["d1"])  # step 2: the score recovered, nothing more shrinks
    assert replicas(kube) == (1, 9)
    entries = loop2.log.entries("d1")
    assert [(e.step, e.action, e.applied) for e in entries] == [
        (0, Action.SHRINK, True), (1, Action.SHRINK, True), (2, Action.CONTINUE, True)]
