"""Fault tests of the serve task's Service (the code `canaryml serve` runs) against real
services: Prometheus down, a Kafka broker restart, Kubernetes API 409/503 (kmock), the model
registry unreachable or serving a broken version, a restart resuming from the decision log, and
SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

import numpy as np
import pytest
import requests
from omegaconf import OmegaConf

from canaryml import tracking
from canaryml.cli import compose
from canaryml.control.policy import PolicyConfig
from canaryml.control.types import Action, Decision
from canaryml.data.dataset import DeploymentArrays
from canaryml.replay.sim import ReplaySource
from canaryml.serving.actuators import DeploymentActuator, DeploymentTarget, DryRunActuator
from canaryml.serving.decision_log import DecisionLog
from canaryml.serving.model_holder import ModelHolder
from canaryml.tasks import serve as serve_task
from tests.harness.kube import DEPLOYMENTS, KubeHarness, start_kube
from tests.harness.prometheus import free_port
from tests.integration.test_serve_task import levels

pytestmark = [pytest.mark.services, pytest.mark.timeout(300)]

NS = "shop"
NAME = "canary-scorer"


def serve_cfg(tmp: Path, *overrides: str) -> dict[str, Any]:
    cfg = compose("serve", [f"serve.decision_log={tmp / 'decisions.sqlite'}",
                            "serve.step_s=1", "serve.lookback=1", "serve.http.port=0",
                            *overrides])
    return cast(dict[str, Any], OmegaConf.to_container(cfg.serve, resolve=True))


POLICY = PolicyConfig(warmup_s=0, consecutive_breaches=1, monitoring_interval_s=0.2)


def arrays(dep: str, *, bad: bool, steps: int = 40) -> DeploymentArrays:
    """Telemetry at the catalog's typical levels; a bad canary has 5x latency and 10x errors."""
    names = tuple(levels())
    base = np.array([levels()[m] for m in names])
    rng = np.random.default_rng(0)
    b = base * (1 + 0.01 * rng.standard_normal((steps, len(base))))
    mult = np.array([10.0 if bad and m == "error_rate" else 5.0 if bad and m.startswith("latency")
                     else 1.0 for m in names])
    c = base * mult * (1 + 0.01 * rng.standard_normal((steps, len(base))))
    ts = np.arange(steps, dtype=np.int64) + int(time.time()) - steps
    return DeploymentArrays(dep, ts, c.astype(np.float32), b.astype(np.float32), names)


def until(cond: Callable[[], bool], timeout_s: float, what: str, every_s: float = 0.1) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(every_s)


@pytest.fixture
def kube() -> Iterator[KubeHarness]:
    with start_kube() as k:
        for app in ("web", "api"):
            k.put(DEPLOYMENTS, NS, f"{app}-canary", {"spec": {"replicas": 3}})
            k.put(DEPLOYMENTS, NS, f"{app}-stable", {"spec": {"replicas": 7}})
        yield k


def replicas(kube: KubeHarness, app: str) -> tuple[int, int]:
    return (kube.get(DEPLOYMENTS, NS, f"{app}-canary")["spec"]["replicas"],
            kube.get(DEPLOYMENTS, NS, f"{app}-stable")["spec"]["replicas"])


def deployment_actuator(kube: KubeHarness, retries: int = 2) -> DeploymentActuator:
    return DeploymentActuator(kube.api_client, {a: DeploymentTarget(NS, f"{a}-canary", f"{a}-stable")
                                                for a in ("web", "api")},
                              actor="canaryml-test", retries=retries, backoff_s=0.01)


def test_prometheus_down_pauses_with_the_reason_and_never_acts(
        mlflow_uri: str, tmp_path: Path, tiny_scorer_dir: Path, kube: KubeHarness) -> None:
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens: Prometheus is down
    serve = serve_cfg(tmp_path, f"serve.model={tiny_scorer_dir}", f"serve.source.prometheus.url={dead}",
                      "serve.source.prometheus.retries=1", "serve.source.prometheus.backoff_s=0.01",
                      "serve.source.prometheus.timeout_s=1")
    serve["deployments"] = [{"id": "web", "selectors": {"canary": 'app="web",track="canary"'}}]
    svc = serve_task.build(serve, POLICY, actuator=deployment_actuator(kube))
    try:
        assert svc.run(max_ticks=3) == 3
        entries = svc.loop.log.entries("web")
        assert [e.action for e in entries] == [Action.PAUSE] * 3
        assert all("source failed" in e.reasons[0] and "unreachable" in e.reasons[0]
                   for e in entries)
        assert svc.server is not None
        health = requests.get(f"{svc.server.url}/healthz", timeout=5)
        assert health.status_code == 503
        assert "unreachable" in health.json()["reasons"]["telemetry"]
        # the liveness probe's path (serving/k8s) stays 200: a pausing controller is not killed
        assert requests.get(f"{svc.server.url}/livez", timeout=5).status_code == 200
        metrics = requests.get(f"{svc.server.url}/metrics", timeout=5).text
        assert 'canaryml_errors_total{kind="source"} 3.0' in metrics
    finally:
        svc.close()
    assert replicas(kube, "web") == (3, 7)  # never scaled; a pause only annotates
    assert {b["metadata"]["annotations"]["canaryml.io/last-action"] for _, b in kube.patches()} == {
        "pause"}


def test_api_409_and_503_never_act_twice_and_a_restart_reapplies_pending(
        mlflow_uri: str, tmp_path: Path, tiny_scorer_dir: Path, kube: KubeHarness) -> None:
    serve = serve_cfg(tmp_path, f"serve.model={tiny_scorer_dir}")
    serve["deployments"] = [{"id": "web"}, {"id": "api"}]
    source = ReplaySource({d: arrays(d, bad=True) for d in ("web", "api")})
    kube.inject("PATCH", 409, landed=True, name="web-stable")  # the write lands, the answer is lost
    kube.inject("PATCH", 503, count=3, name="api-stable")  # api: down for all 3 attempts
    svc = serve_task.build(serve, POLICY, source=source, actuator=deployment_actuator(kube),
                           http=False)
    try:
        assert svc.run(max_ticks=1) == 1
        assert replicas(kube, "web") == (0, 10)  # exactly once despite the retried 409
        assert replicas(kube, "api") == (3, 7)
        (api_entry,) = svc.loop.log.entries("api")
        assert api_entry.action is Action.ROLLBACK and not api_entry.applied
        assert "503" in (api_entry.error or "")
        assert svc.loop.health.snapshot()["status"] == "degraded"
    finally:
        svc.close()  # the controller dies with the api rollback pending

    kube.emulator.faults.clear()
    svc2 = serve_task.build(serve, POLICY, source=source, actuator=deployment_actuator(kube),
                            http=False)
    try:
        assert svc2.run(max_ticks=2) == 2  # resume re-applies the pending rollback once
        assert svc2.entries == 0  # both deployments finished: nothing new to decide
    finally:
        svc2.close()
    assert replicas(kube, "api") == (0, 10) and replicas(kube, "web") == (0, 10)
    with DecisionLog(tmp_path / "decisions.sqlite") as log:
        got = [(e.deployment_id, e.step, e.action, e.applied) for e in log.entries()]
    assert sorted(got) == [("api", 0, Action.ROLLBACK, True), ("web", 0, Action.ROLLBACK, True)]
    per_object: dict[str, int] = {}
    for path, _ in kube.patches():
        per_object[path.rsplit("/", 1)[1]] = per_object.get(path.rsplit("/", 1)[1], 0) + 1
    # web: stable (landed) + canary; api: 3 failed stable attempts, then stable + canary
    assert per_object == {"web-stable": 1, "web-canary": 1, "api-stable": 4, "api-canary": 1}


def test_a_failed_rollback_is_retried_until_applied_and_health_says_so(
        mlflow_uri: str, tmp_path: Path, tiny_scorer_dir: Path, kube: KubeHarness) -> None:
    """Issue 16 #1: a ROLLBACK whose PATCH fails (500, all attempts of one apply) is retried on
    later ticks until it lands; meanwhile /healthz stays degraded although the other
    deployment's actions succeed, and the failed deployment gets no new decision."""
    serve = serve_cfg(tmp_path, f"serve.model={tiny_scorer_dir}",
                      "serve.actuator.retry_backoff_s=0.05", "serve.actuator.retry_backoff_max_s=0.2")
    serve["deployments"] = [{"id": "web"}, {"id": "api"}]
    kube.put(DEPLOYMENTS, NS, "web-canary", {"spec": {"replicas": 4}})
    kube.put(DEPLOYMENTS, NS, "web-stable", {"spec": {"replicas": 6}})
    source = ReplaySource({"web": arrays("web", bad=True), "api": arrays("api", bad=False)})
    # retries=0: one 500 fails the whole apply; the stable side landed, the canary did not
    kube.inject("PATCH", 500, count=3, name="web-canary")
    svc = serve_task.build(serve, POLICY, source=source,
                           actuator=deployment_actuator(kube, retries=0))
    try:
        svc.tick()
        assert replicas(kube, "web") == (4, 10)
        (web,) = svc.loop.log.entries("web")
        assert web.action is Action.ROLLBACK and not web.applied and "500" in (web.error or "")
        svc.tick()  # api's successful actions must not turn health green
        assert svc.server is not None
        health = requests.get(f"{svc.server.url}/healthz", timeout=5)
        assert health.status_code == 503
        assert "deployment=web step=0 action=rollback not applied" in health.json()["reasons"][
            "actuator"]

        def rolled_back() -> bool:
            svc.tick()
            return replicas(kube, "web") == (0, 10)
        until(rolled_back, 30, "the failed rollback to be retried and land", every_s=0.05)
        assert kube.emulator.faults[0].count == 0  # it landed only after all 3 injected 500s
        assert requests.get(f"{svc.server.url}/healthz", timeout=5).status_code == 200
        assert 'canaryml_errors_total{kind="actuator"} 3.0' in requests.get(
            f"{svc.server.url}/metrics", timeout=5).text
        api_ticks = len(svc.loop.log.entries("api"))
        svc.tick()
        assert len(svc.loop.log.entries("api")) == api_ticks + 1  # api kept deciding throughout
    finally:
        svc.close()
    with DecisionLog(tmp_path / "decisions.sqlite") as log:
        (web,) = log.entries("web")  # no new decision for web while its rollback was pending
        assert web.applied and web.error is None and log.pending() == []
    canary_patches = [b for p, b in kube.patches() if p.endswith("/web-canary")]
    assert [b["spec"]["replicas"] for b in canary_patches] == [0] * 4  # 3 failed + the one landed
    assert sum(1 for p, _ in kube.patches() if p.endswith("/web-stable")) == 1  # moved once


def test_discovery_reports_the_rollout_revision_the_verdict_board_trusts(
        kube: KubeHarness) -> None:
    """Issue 16 #5: the canary revision comes from the controller's own read of the Rollout
    (status.currentPodHash), not from what a request claims."""
    from canaryml.serving.endpoints import VerdictBoard
    from tests.harness.kube import ROLLOUTS

    kube.put(ROLLOUTS, NS, "web", {"metadata": {"labels": {"canaryml.io/track": "canary"}},
                                   "status": {"currentPodHash": "5d8f9c"}})
    found = serve_task.KubeDiscovery(kube.api_client, NS, "canaryml.io/track=canary",
                                     kind="argo").discover()
    assert found == [{"id": "web", "namespace": NS, "rollout": "web", "revision": "5d8f9c"}]
    board = VerdictBoard()
    svc = serve_task.Service.__new__(serve_task.Service)  # only _wire's board part is exercised
    svc.actuator, svc.source, svc.board = DryRunActuator(), None, board
    assert svc._wire(found[0])
    assert board.observe_revision("web", "5d8f9c") is None  # known: its decisions count
    assert board.observe_revision("web", "forged") == float("inf")  # unauthenticated: ignored


def test_a_corrupt_decision_log_is_moved_aside_not_a_crash_loop(
        mlflow_uri: str, tmp_path: Path, tiny_scorer_dir: Path) -> None:
    """Issue 16 #8: a damaged decision log (here: a bad header) raised sqlite3.DatabaseError at
    every start. serve moves it aside, says where, counts it, and runs on a fresh log."""
    serve = serve_cfg(tmp_path, f"serve.model={tiny_scorer_dir}")
    serve["deployments"] = [{"id": "web"}]
    (tmp_path / "decisions.sqlite").write_bytes(b"garbage, not SQLite" + bytes(8192))
    for attempt in range(2):  # and the next start is clean
        svc = serve_task.build(serve, POLICY, source=ReplaySource({"web": arrays("web", bad=False)}),
                               actuator=DryRunActuator())
        try:
            assert svc.run(max_ticks=1) == 1
            assert svc.server is not None
            count = 'canaryml_errors_total{kind="decision_log"} 1.0' in requests.get(
                f"{svc.server.url}/metrics", timeout=5).text
            assert count == (attempt == 0)
        finally:
            svc.close()
    (aside,) = tmp_path.glob("decisions.sqlite.corrupt-*")
    assert aside.read_bytes().startswith(b"garbage, not SQLite")  # kept for the audit trail
    with DecisionLog(tmp_path / "decisions.sqlite") as log:
        assert [e.step for e in log.entries("web")] == [0, 1]


def test_registry_unreachable_pauses_without_a_model(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    serve = serve_cfg(tmp_path, "serve.model_poll_s=60")
    serve["deployments"] = [{"id": "web"}]
    act = DryRunActuator()
    svc = serve_task.build(serve, POLICY, source=ReplaySource({"web": arrays("web", bad=True)}),
                           actuator=act)
    try:
        assert svc.run(max_ticks=2) == 2
        entries = svc.loop.log.entries("web")
        assert [e.action for e in entries] == [Action.PAUSE, Action.PAUSE]
        assert all("no model loaded from models:/canary-scorer@champion" in e.reasons[0]
                   and "cannot resolve" in e.reasons[0] for e in entries)
        assert {a.action for a in act.history} == {Action.PAUSE}  # bad data, still never acts
        assert svc.server is not None
        body = requests.get(f"{svc.server.url}/healthz", timeout=5).json()
        assert "no model: deployments pause" in body["reasons"]["model"]
        assert 'canaryml_errors_total{kind="model"} 1.0' in requests.get(
            f"{svc.server.url}/metrics", timeout=5).text
    finally:
        svc.close()


def _register(scorer_dir: Path, alias: str | None) -> str:
    with tracking.start_run({"test": True}, experiment="canaryml"):
        mv = tracking.log_scorer(tracking.load_scorer(str(scorer_dir)), NAME, alias=alias)
    return str(mv.version)


def _break(version: str) -> None:
    """Delete the network weights of a registered version in the artifact store."""
    import mlflow
    from mlflow.tracking import MlflowClient

    src = MlflowClient().get_model_version(NAME, version).source
    location = mlflow.get_logged_model(str(src).rsplit("/", 1)[1]).artifact_location
    weights = Path(location.removeprefix("file://")) / "artifacts" / "scorer" / "network.pt"
    assert weights.is_file(), weights
    weights.unlink()


def test_a_version_that_fails_to_load_keeps_the_previous_model(
        mlflow_uri: str, tmp_path: Path, tiny_scorer_dir: Path) -> None:
    assert _register(tiny_scorer_dir, "champion") == "1"
    serve = serve_cfg(tmp_path)
    serve["deployments"] = [{"id": "api"}]
    holder = ModelHolder(f"models:/{NAME}@champion", poll_s=0.1)
    svc = serve_task.build(serve, POLICY, source=ReplaySource({"api": arrays("api", bad=False)}),
                           actuator=DryRunActuator(), http=False, holder=holder)
    try:
        svc.tick()
        assert holder.version == f"{NAME}/1"
        v2 = _register(tiny_scorer_dir, None)
        _break(v2)
        tracking.set_alias(NAME, "champion", v2)  # the alias moves to a broken version
        until(lambda: holder.failures >= 1, 30, "the failed load of v2")
        for _ in range(3):
            svc.tick()
        assert holder.version == f"{NAME}/1"
        snap = svc.loop.health.snapshot()
        assert f"loading models:/{NAME}/{v2} failed" in snap["reasons"]["model"]
        assert f"keeping {NAME}/1" in snap["reasons"]["model"]
        tracking.set_alias(NAME, "champion", "1")  # operator moves it back: healthy again
        until(lambda: svc.loop.health.snapshot()["status"] == "ok", 30, "health to recover")
        svc.tick()
    finally:
        svc.close()
    with DecisionLog(tmp_path / "decisions.sqlite") as log:
        entries = log.entries("api")
    assert [e.step for e in entries] == list(range(5))  # no tick missed
    assert {e.model_version for e in entries} == {f"{NAME}/1"}
    assert all(e.action is Action.CONTINUE and e.score is not None for e in entries)


def test_broker_restart_pauses_then_recovers_without_losing_a_decision(
        mlflow_uri: str, tmp_path: Path, tiny_scorer_dir: Path) -> None:
    from confluent_kafka import Producer

    from canaryml.serving.kafka import KafkaSource
    from tests.harness.kafka import TansuBroker
    from tests.integration.test_kafka_source import FAST, TOPIC

    broker = TansuBroker(tmp_path / "tansu")
    broker.start()

    def produce(now: float) -> None:
        p = Producer({"bootstrap.servers": broker.bootstrap})
        for k in range(3):
            for group in ("canary", "baseline"):
                for metric, level in levels().items():
                    p.produce(TOPIC, key="d1", value=json.dumps({
                        "deployment_id": "d1", "group": group, "metric": metric, "value": level,
                        "timestamp": now - k}))
        assert p.flush(10) == 0

    try:
        broker.create_topic(TOPIC, 1)
        produce(time.time())
        source = KafkaSource(broker.bootstrap, TOPIC, "ctl", list(levels()), step_s=1,
                             buffer_steps=120, poll_timeout_s=0.2, config=FAST)
        serve = serve_cfg(tmp_path, f"serve.model={tiny_scorer_dir}")
        serve["deployments"] = [{"id": "d1"}]
        svc = serve_task.build(serve, POLICY, source=source, actuator=DryRunActuator(), http=False)
        returned: list[Any] = []
        svc.loop.resume()

        def tick_until(cond: Callable[[Any], bool], timeout_s: float, what: str) -> None:
            def step() -> bool:
                got = svc.tick()
                returned.extend(got)
                return any(cond(e) for e in got)
            until(step, timeout_s, what, every_s=0.2)

        try:
            tick_until(lambda e: e.score is not None, 45, "a scored decision")
            broker.stop()  # fault: the broker goes away
            tick_until(lambda e: e.action is Action.PAUSE and "unreachable" in e.reasons[0], 30,
                       "a pause while the broker is down")
            assert "telemetry" in svc.loop.health.snapshot()["reasons"]
            broker.start()
            broker.create_topic(TOPIC, 1)  # in-memory storage: the new broker starts empty
            produce(time.time() + 1)
            tick_until(lambda e: e.score is not None, 60, "scoring again after the restart")
        finally:
            svc.close()
    finally:
        broker.stop()
    with DecisionLog(tmp_path / "decisions.sqlite") as log:
        entries = log.entries("d1")
    assert [e.step for e in entries] == list(range(len(entries)))  # contiguous
    assert [e.id for e in entries] == [e.id for e in returned]  # every tick's decision is logged
    assert all(e.applied for e in entries)
    assert not any(e.action in (Action.ROLLBACK, Action.SHRINK) for e in entries)


def test_an_event_for_a_deployment_without_target_is_skipped_never_fatal(
        mlflow_uri: str, tmp_path: Path, tiny_scorer_dir: Path, kube: KubeHarness) -> None:
    """Issue 16 #3: a Kafka event for a deployment the actuator has no target for used to end
    the process (ConfigError out of the loop), and resume() re-applied the pending entry at
    every start: a crash loop. Now the action is logged, counted, marked skipped, and never
    re-applied; the known deployment is still decided and acted on."""
    from confluent_kafka import Producer

    from canaryml.serving.kafka import KafkaSource
    from tests.harness.kafka import TansuBroker
    from tests.integration.test_kafka_source import FAST, TOPIC

    broker = TansuBroker(tmp_path / "tansu")
    broker.start()
    serve = serve_cfg(tmp_path, f"serve.model={tiny_scorer_dir}")
    serve["deployments"] = []  # pure Kafka mode: every deployment seen on owned partitions

    def source() -> KafkaSource:
        return KafkaSource(broker.bootstrap, TOPIC, "ctl", list(levels()), step_s=1,
                           buffer_steps=120, poll_timeout_s=0.2, config=FAST)

    try:
        broker.create_topic(TOPIC, 1)
        p = Producer({"bootstrap.servers": broker.bootstrap})
        now = time.time()
        for dep in ("web", "ghost"):  # ghost: no actuator target anywhere
            for k in range(3):
                for group in ("canary", "baseline"):
                    for metric, level in levels().items():
                        p.produce(TOPIC, key=dep, value=json.dumps({
                            "deployment_id": dep, "group": group, "metric": metric,
                            "value": level, "timestamp": now - k}))
        assert p.flush(10) == 0
        svc = serve_task.build(serve, POLICY, source=source(), actuator=deployment_actuator(kube))
        try:
            svc.loop.resume()

            def both_decided() -> bool:
                svc.tick()
                return all(any(e.score is not None for e in svc.loop.log.entries(d))
                           for d in ("web", "ghost"))
            until(both_decided, 60, "scored decisions for web and ghost", every_s=0.2)
            ghost = svc.loop.log.entries("ghost")
            assert all(e.skipped and not e.applied for e in ghost)
            assert "'ghost' has no Kubernetes target" in (ghost[0].error or "")
            assert all(e.applied for e in svc.loop.log.entries("web"))
            assert svc.loop.log.pending() == []  # nothing for resume() to re-apply
            assert svc.loop.metrics.registry.get_sample_value(
                "canaryml_skipped_actions_total", {"reason": "unknown_target"}) == len(ghost)
            assert svc.loop.health.snapshot()["status"] == "ok"
            assert svc.server is not None
            assert 'canaryml_skipped_actions_total{reason="unknown_target"}' in requests.get(
                f"{svc.server.url}/metrics", timeout=5).text
        finally:
            svc.close()
        # a log written by an older controller: a pending rollback for ghost. The next start
        # must skip it, not crash on it every time.
        with DecisionLog(tmp_path / "decisions.sqlite") as log:
            stale = log.record("ghost", 10_000, Decision(Action.ROLLBACK, "old", 0.99))
        svc2 = serve_task.build(serve, POLICY, source=source(),
                                actuator=deployment_actuator(kube), http=False)
        try:
            assert svc2.run(max_ticks=1) == 1
        finally:
            svc2.close()
        with DecisionLog(tmp_path / "decisions.sqlite") as log:
            (again,) = [e for e in log.entries("ghost") if e.id == stale.id]
            assert again.skipped and log.pending() == []
    finally:
        broker.stop()
    assert replicas(kube, "web") == (3, 7) and replicas(kube, "api") == (3, 7)


def test_sigterm_finishes_the_tick_and_exits_cleanly(tmp_path: Path, tiny_scorer_dir: Path) -> None:
    log_path = tmp_path / "decisions.sqlite"
    cmd = [sys.executable, "-m", "canaryml", "serve", f"serve.model={tiny_scorer_dir}",
           f"serve.decision_log={log_path}", "policy.monitoring_interval_s=0.2", "serve.http.port=0",
           f"serve.source.prometheus.url=http://127.0.0.1:{free_port()}",
           "serve.source.prometheus.retries=0", "serve.source.prometheus.timeout_s=1",
           "serve.deployments=[{id: web, selectors: {canary: 'app=\"web\"'}}]"]
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, cwd=tmp_path)
    try:
        def ticked() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"serve exited early: {proc.communicate()}")
            if not log_path.is_file():
                return False
            with DecisionLog(log_path) as log:
                return len(log.entries("web")) >= 2
        until(ticked, 60, "two ticks", every_s=0.2)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err[-2000:]
    assert "received SIGTERM" in err and "canaryml serve: stopped after" in out
    with DecisionLog(log_path) as log:
        entries = log.entries("web")
    assert [e.step for e in entries] == list(range(len(entries)))
    assert all(e.applied for e in entries)  # the tick in flight was finished, not cut


def test_model_holder_swaps_only_between_ticks_and_keeps_the_last_good_model() -> None:
    """ModelHolder alone (no services): staged loads, failed loads, no model at all."""
    from canaryml.errors import ModelLoadError, ScoringError
    from canaryml.serving.server import Health, ServeMetrics

    class Fixed:
        def __init__(self, name: str) -> None:
            self.name, self.metrics, self.lookback = name, ("latency_p99",), 4

        def score(self, window: Any) -> Any:
            return self.name

    alias = {"v": "1"}
    broken = {"3"}

    def resolve(name: str, a: str) -> str:
        if alias["v"] == "down":
            raise ModelLoadError("registry unreachable")
        return alias["v"]

    def load(uri: str) -> Any:
        if uri.rsplit("/", 1)[1] in broken:
            raise ModelLoadError(f"{uri}: corrupt bundle")
        return Fixed(uri)

    health, metrics = Health(), ServeMetrics()
    h = ModelHolder("models:/m@champion", poll_s=0, loader=load, resolver=resolve,
                    health=health, metrics=metrics)
    alias["v"] = "down"
    h.start()  # nothing loadable: score() refuses, health says why
    with pytest.raises(ScoringError, match=r"no model loaded from models:/m@champion: "
                                           r"registry unreachable"):
        h.score(None)  # type: ignore[arg-type]
    assert "no model: deployments pause" in health.snapshot()["reasons"]["model"]
    alias["v"] = "1"
    assert h.refresh() and h.version is None  # staged, not yet in use
    assert h.swap_if_ready() is not None and h.score(None) == "models:/m/1"  # type: ignore[arg-type]
    assert health.snapshot()["status"] == "ok"
    alias["v"] = "3"  # the alias moves to a version that fails to load
    assert not h.refresh() and h.version == "m/1"
    assert "keeping m/1" in health.snapshot()["reasons"]["model"]
    alias["v"] = "2"
    assert h.refresh() and h.score(None) == "models:/m/1"  # type: ignore[arg-type]
    h.swap_if_ready()
    assert h.score(None) == "models:/m/2" and h.swaps == 2 and h.failures == 2  # type: ignore[arg-type]
    assert 'canaryml_model_info{version="m/2"} 1.0' in __import__(
        "prometheus_client").generate_latest(metrics.registry).decode()
