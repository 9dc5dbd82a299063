"""`canaryml serve` end to end through the CLI: a real Prometheus scraping an exporter the test
drives, canary Deployments discovered by label in the kmock Kubernetes emulator (official
client), a tiny trained scorer, and the exact patches the rollback sends."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, Gauge

from canaryml.cli import main
from canaryml.control.types import Action
from canaryml.serving.decision_log import DecisionLog
from tests.harness.kube import DEPLOYMENTS, KubeHarness, start_kube
from tests.harness.prometheus import serve_registry, start_prometheus, wait_for_scrapes

pytestmark = [pytest.mark.timeout(300), pytest.mark.services,
              pytest.mark.skipif(shutil.which("prometheus") is None,
                                 reason="needs the Debian prometheus package")]

NS = "shop"
DEP = "/apis/apps/v1/namespaces/shop/deployments/"


def levels() -> dict[str, float]:
    from canaryml.models.synthetic import _PROFILE

    return {m: p[0] for m, p in _PROFILE.items()}


def export(gauge: Gauge, app: str, *, bad: bool) -> None:
    """Set both groups of `app`; a bad canary has 5x latency and 10x errors."""
    for metric, level in levels().items():
        gauge.labels(app, "baseline", metric).set(level)
        worse = 10.0 if (bad and metric == "error_rate") else 5.0 if (
            bad and metric.startswith("latency")) else 1.0
        gauge.labels(app, "canary", metric).set(level * worse)


def query_overrides() -> list[str]:
    return [f"++serve.source.prometheus.queries.{m}="
            f"'max(canary_metric{{{{selector}},metric=\"{m}\"}})'" for m in levels()]


def canary_objects(kube: KubeHarness) -> None:
    for app in ("web", "api"):
        kube.put(DEPLOYMENTS, NS, f"{app}-canary", {
            "metadata": {"labels": {"app": app, "canaryml.io/track": "canary"}, "annotations": {
                "canaryml.io/stable": f"{app}-stable",
                "canaryml.io/canary-selector": f'app="{app}",track="canary"',
                "canaryml.io/baseline-selector": f'app="{app}",track="baseline"'}},
            "spec": {"replicas": 2}})
        kube.put(DEPLOYMENTS, NS, f"{app}-stable", {
            "metadata": {"labels": {"app": app, "canaryml.io/track": "stable"}},
            "spec": {"replicas": 8}})


@pytest.fixture
def services(tmp_path: Path) -> Iterator[tuple[Gauge, str, KubeHarness]]:
    reg = CollectorRegistry()
    gauge = Gauge("canary_metric", "test telemetry", ["app", "track", "metric"], registry=reg)
    with serve_registry(reg) as target, start_prometheus(tmp_path / "prom", [target]) as url, \
            start_kube() as kube:
        yield gauge, url, kube


def serve_args(url: str, kube: KubeHarness, scorer: Path, log_path: Path, ticks: int) -> list[str]:
    return ["serve", f"serve.model={scorer}", "serve.step_s=1",
            "serve.lookback=1", f"serve.max_ticks={ticks}", f"serve.decision_log={log_path}",
            "serve.http.port=0", "serve.source.kind=prometheus",
            f"serve.source.prometheus.url={url}", "serve.source.prometheus.retries=1",
            "serve.source.prometheus.timeout_s=2", "serve.actuator.kind=deployment",
            f"serve.actuator.kube_host=http://127.0.0.1:{kube.port}", "serve.actuator.retries=2",
            "serve.discover={namespace: shop, label_selector: 'canaryml.io/track=canary'}",
            "policy.warmup_s=0", "policy.consecutive_breaches=2", "policy.monitoring_interval_s=1",
            "policy.rollback_strategy=immediate", *query_overrides()]


def replicas(kube: KubeHarness, app: str) -> tuple[int, int]:
    return (kube.get(DEPLOYMENTS, NS, f"{app}-canary")["spec"]["replicas"],
            kube.get(DEPLOYMENTS, NS, f"{app}-stable")["spec"]["replicas"])


def test_serve_cli_discovers_scores_and_rolls_back_the_bad_canary_only(
        mlflow_uri: str, tmp_path: Path, tiny_scorer_dir: Path, capsys: pytest.CaptureFixture[str],
        services: tuple[Gauge, str, KubeHarness]) -> None:
    gauge, url, kube = services
    export(gauge, "web", bad=True)
    export(gauge, "api", bad=False)
    canary_objects(kube)
    # the history the scorer needs (lookback 16 + horizon 3 steps of 1 s): before that the
    # controller pauses, as replay does for a canary younger than the model's window
    wait_for_scrapes(url, 'canary_metric{metric="load1"}', 21, timeout_s=90)
    log_path = tmp_path / "decisions.sqlite"

    assert main(serve_args(url, kube, tiny_scorer_dir, log_path, ticks=4)) == 0
    out = capsys.readouterr().out
    assert f"model {tiny_scorer_dir}" in out and "stopped after 4 tick(s)" in out

    assert replicas(kube, "web") == (0, 10)  # rolled back: canary to 0, stable restored
    assert replicas(kube, "api") == (2, 8)  # healthy: untouched
    sent = kube.patches()
    assert [(p, b["spec"]) for p, b in sent] == [(DEP + "web-stable", {"replicas": 10}),
                                                 (DEP + "web-canary", {"replicas": 0})]
    ann = sent[1][1]["metadata"]["annotations"]
    assert ann["canaryml.io/last-action"] == "rollback" and ann["canaryml.io/last-step"] == "1"
    assert ann["canaryml.io/actor"] == "canaryml" and float(ann["canaryml.io/score"]) > 0.5

    with DecisionLog(log_path) as log:
        web, api = log.entries("web-canary"), log.entries("api-canary")
    assert [(e.step, e.action) for e in web] == [(0, Action.CONTINUE), (1, Action.ROLLBACK)]
    assert all(e.applied for e in web) and web[0].score is not None and web[0].score > 0.5
    assert [e.action for e in api] == [Action.CONTINUE] * 4
    assert all(e.score is not None and e.score < 0.5 for e in api)
    assert {e.model_version for e in web + api} == {str(tiny_scorer_dir)}
    assert np.isfinite([e.decided_at for e in api]).all()

    # restart: the controller resumes from the log (web stays finished, api continues at step 4)
    assert main(serve_args(url, kube, tiny_scorer_dir, log_path, ticks=1)) == 0
    with DecisionLog(log_path) as log:
        assert [e.step for e in log.entries("api-canary")] == [0, 1, 2, 3, 4]
        assert len(log.entries("web-canary")) == 2
    assert len(kube.patches()) == 2  # nothing acted twice


def test_gradual_rollback_shrinks_batch_by_batch_and_stops_when_the_score_recovers(
        mlflow_uri: str, tmp_path: Path, tiny_scorer_dir: Path) -> None:
    """The whole path — scorer → RollbackPolicy (gradual) → Controller → ServeLoop →
    DeploymentActuator → kmock — on a canary that goes bad for a moment, then recovers."""
    from omegaconf import OmegaConf

    from canaryml.cli import compose
    from canaryml.control.policy import PolicyConfig
    from canaryml.data.dataset import DeploymentArrays
    from canaryml.replay.sim import ReplaySource
    from canaryml.serving.actuators import DeploymentActuator, DeploymentTarget
    from canaryml.tasks import serve as serve_task

    names = tuple(levels())
    steps = 80
    base = np.array([levels()[m] for m in names])
    rng = np.random.default_rng(0)
    noise = lambda: 1 + 0.01 * rng.standard_normal((steps, len(base)))  # noqa: E731
    bad = (np.arange(steps) >= 40) & (np.arange(steps) < 42)  # two bad scrapes, then healthy
    mult = np.where(bad[:, None], [10.0 if m == "error_rate" else 5.0 if m.startswith("latency")
                                   else 1.0 for m in names], 1.0)
    arrays = DeploymentArrays("web", np.arange(steps, dtype=np.int64),
                              (base * mult * noise()).astype(np.float32),
                              (base * noise()).astype(np.float32), names)
    ticks = iter(range(30, 50))
    cfg = compose("serve", [f"serve.model={tiny_scorer_dir}",
                            f"serve.decision_log={tmp_path / 'd.sqlite'}", "serve.lookback=1"])
    serve = OmegaConf.to_container(cfg.serve, resolve=True)
    serve["deployments"] = [{"id": "web"}]  # type: ignore[index]
    policy = PolicyConfig(rollback_strategy="gradual", warmup_s=0, consecutive_breaches=1,  # type: ignore[arg-type]
                          batch_interval_s=2, max_batches=5, monitoring_interval_s=0.01)
    with start_kube() as kube:
        kube.put(DEPLOYMENTS, NS, "web-canary", {"spec": {"replicas": 5}})  # 5 batches of 1
        kube.put(DEPLOYMENTS, NS, "web-stable", {"spec": {"replicas": 7}})
        act = DeploymentActuator(kube.api_client, {"web": DeploymentTarget(NS, "web-canary",
                                                                             "web-stable")},
                                 actor="canaryml-test", backoff_s=0.01)
        svc = serve_task.build(serve, policy, source=ReplaySource({"web": arrays}),  # type: ignore[arg-type]
                               actuator=act, http=False, clock=lambda: float(next(ticks)))
        try:
            assert svc.run(max_ticks=20) == 20
            entries = svc.loop.log.entries("web")
        finally:
            svc.close()
        seen = [(int(e.decided_at), str(e.action), e.evidence.get("batch")) for e in entries]
        actions = [a for _, a, _ in seen]
        shrinks = [i for i, a in enumerate(actions) if a == "shrink"]
        # the batch grew while clean; then one batch shrunk per breaching tick, in a row ...
        assert len(shrinks) >= 2 and shrinks == list(range(shrinks[0], shrinks[-1] + 1)), seen
        before = seen[shrinks[0] - 1][2]
        assert before is not None and before > len(shrinks), seen
        assert [seen[i][2] for i in shrinks] == [before - k for k in range(1, len(shrinks) + 1)]
        # ... and no more once the score recovered: no rollback, no further shrink
        assert "rollback" not in actions and "shrink" not in actions[shrinks[-1] + 1:], seen
        recovered = entries[shrinks[-1] + 1].score
        assert recovered is not None and recovered < policy.rollback_threshold
        n = len(shrinks)
        assert replicas(kube, "web") == (5 - n, 7 + n)  # one replica (batch) per shrink
        expected = []
        for k in range(1, n + 1):
            expected += [("web-stable", 7 + k), ("web-canary", 5 - k)]
        assert [(p.rsplit("/", 1)[1], b["spec"]["replicas"]) for p, b in kube.patches()] == expected
