"""Shadow challenger (issue 15): `canaryml serve` scores `@challenger` beside `@champion` on the
same live windows; the challenger's would-be decisions are logged beside the champion's (log
line, serve.shadow.log, /metrics, the challenger's model-version tags) and never applied; and
`canaryml promote` can require a shadow period."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from omegaconf import OmegaConf
from prometheus_client import generate_latest

from canaryml import tracking
from canaryml.cli import compose, main
from canaryml.control.policy import PolicyConfig
from canaryml.control.types import Decision
from canaryml.data.dataset import DeploymentArrays
from canaryml.models.scorer import CanaryScorer
from canaryml.replay.sim import ReplaySource
from canaryml.serving import service

pytestmark = [pytest.mark.timeout(300)]


class Recorder:
    """The actuator: every action it is asked to apply."""

    def __init__(self) -> None:
        self.applied: list[tuple[str, str, int]] = []

    def apply(self, deployment_id: str, decision: Decision, step: int) -> None:
        self.applied.append((deployment_id, str(decision.action), step))


def levels() -> dict[str, float]:
    from canaryml.models.synthetic import _PROFILE

    return {m: p[0] for m, p in _PROFILE.items()}


def bad_canary(steps: int = 60) -> DeploymentArrays:
    names = tuple(levels())
    base = np.array([levels()[m] for m in names])
    rng = np.random.default_rng(0)
    mult = np.array([10.0 if m == "error_rate" else 5.0 if m.startswith("latency") else 1.0
                     for m in names])
    noise = lambda: 1 + 0.01 * rng.standard_normal((steps, len(base)))  # noqa: E731
    return DeploymentArrays("web", np.arange(steps, dtype=np.int64),
                            (base * mult * noise()).astype(np.float32),
                            (base * noise()).astype(np.float32), names)


def with_threshold(src: Path, out: Path, threshold: float) -> CanaryScorer:
    """The tiny scorer at another fitted operating point (followed by policy: null)."""
    scorer = CanaryScorer.load(src)
    scorer.operating_point = {"rollback_threshold": threshold, "consecutive_breaches": 1}
    scorer.save(out)
    return CanaryScorer.load(out)


def serve_mapping(tmp_path: Path, champion: str, challenger: str) -> dict[str, Any]:
    cfg = compose("serve", [f"serve.model={champion}", f"serve.shadow.model={challenger}",
                            f"serve.decision_log={tmp_path / 'd.sqlite'}",
                            f"serve.shadow.log={tmp_path / 'shadow.jsonl'}",
                            "serve.shadow.report_every_s=0", "serve.lookback=1"])
    serve: dict[str, Any] = OmegaConf.to_container(cfg.serve, resolve=True)  # type: ignore[assignment]
    serve["deployments"] = [{"id": "web"}]
    return serve


# champion: never over its threshold, promotes after two clean batches; challenger: rolls back
POLICY = PolicyConfig(follow_model=True, warmup_s=0, batch_interval_s=2, max_batches=2,
                      monitoring_interval_s=0.01)


def run_service(tmp_path: Path, champion: str, challenger: str, ticks: int = 8) -> tuple[
        service.Service, Recorder, list[Any]]:
    clock = iter(range(30, 30 + ticks))
    rec = Recorder()
    svc = service.build(serve_mapping(tmp_path, champion, challenger), POLICY,
                        source=ReplaySource({"web": bad_canary()}), actuator=rec, http=False,
                        clock=lambda: float(next(clock)))
    try:
        assert svc.run(max_ticks=ticks) == ticks
        entries = svc.loop.log.entries("web")
    finally:
        svc.close()
    return svc, rec, entries


def test_shadow_decisions_are_logged_beside_the_champions_and_never_applied(
        mlflow_uri: str, tmp_path: Path, tiny_scorer_dir: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    champion = tmp_path / "champion"
    challenger = tmp_path / "challenger"
    with_threshold(tiny_scorer_dir, champion, 1.0)
    with_threshold(tiny_scorer_dir, challenger, 0.0)
    with caplog.at_level(logging.INFO, logger="canaryml.shadow"):
        svc, rec, entries = run_service(tmp_path, str(champion), str(challenger))

    actions = [str(e.action) for e in entries]
    assert actions[-1] == "promote" and "rollback" not in actions, actions
    # the actuator got exactly the champion's decisions: the challenger's rollback never
    assert rec.applied == [("web", str(e.action), e.step) for e in entries]
    shadow = [json.loads(line) for line in (tmp_path / "shadow.jsonl").read_text().splitlines()]
    # one shadow record per champion decision, same steps, same windows' time
    assert [(s["step"], s["decided_at"], s["champion_action"]) for s in shadow] == [
        (e.step, e.decided_at, str(e.action)) for e in entries]
    assert shadow[0]["challenger_action"] == "rollback" and shadow[0]["agree"] is False
    assert shadow[0]["challenger_score"] == pytest.approx(entries[0].score, rel=1e-5)
    assert all(s["applied"] is False for s in shadow)
    assert all(s["challenger_model"] == str(challenger) for s in shadow)
    assert all(s["champion_model"] == str(champion) for s in shadow)
    # the champion promoted a canary the challenger would have rolled back
    assert shadow[-1]["outcome"] == "false_rollback"
    assert [s for s in shadow if "outcome" in s] == [shadow[-1]]
    lines = [r.getMessage() for r in caplog.records if r.name == "canaryml.shadow"]
    assert len(lines) == len(entries)
    assert lines[0].startswith("event=shadow deployment=web step=0 champion_action=continue "
                               "challenger_action=rollback agree=False")
    text = generate_latest(svc.loop.metrics.registry).decode()
    # once rolled back the challenger's would-be state stays "rollback" (as the policy's does)
    assert ("canaryml_shadow_decisions_total"
            f'{{action="rollback",deployment="web"}} {len(entries):.1f}') in text
    assert f'canaryml_shadow_agreements_total{{agree="false"}} {len(entries):.1f}' in text
    assert 'canaryml_shadow_outcomes_total{outcome="false_rollback"} 1.0' in text
    assert "canaryml_shadow_agreement_ratio 0.0" in text


def test_registry_shadow_tags_and_promote_requiring_a_shadow_period(
        mlflow_uri: str, tmp_path: Path, tiny_scorer_dir: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    for alias, threshold in (("champion", 1.0), ("challenger", 0.0)):
        scorer = with_threshold(tiny_scorer_dir, tmp_path / alias, threshold)
        with tracking.start_run({}, run_name=alias):
            tracking.log_scorer(scorer, "canary-scorer", alias=alias)
    # no shadow yet: promote requiring one refuses, before any replay
    assert main(["promote", "registry.shadow.required=true"]) == 2
    assert "has not run in shadow" in capsys.readouterr().err

    _, _, entries = run_service(tmp_path, "models:/canary-scorer@champion",
                                "models:/canary-scorer@challenger")
    from mlflow.tracking import MlflowClient

    n = len(entries)
    tags = MlflowClient().get_model_version("canary-scorer", "2").tags
    assert tags["canaryml.shadow.decisions"] == str(n)
    assert tags["canaryml.shadow.false_rollback"] == "1"
    assert tags["canaryml.shadow.agreement"] == "0.0000"
    assert float(tags["canaryml.shadow.last"]) - float(tags["canaryml.shadow.since"]) == n - 1
    assert "canaryml.shadow.decisions" not in MlflowClient().get_model_version(
        "canary-scorer", "1").tags  # the champion is never tagged as a shadow
    # a shadow period too short, then one with a would-be false rollback: refused, with both
    assert main(["promote", "registry.shadow.required=true", "registry.shadow.min_s=3600",
                 "registry.shadow.max_false_rollbacks=null"]) == 2
    err = capsys.readouterr().err
    assert f"shadow period {n - 1} s < registry.shadow.min_s=3600" in err
    assert main(["promote", "registry.shadow.required=true", "registry.shadow.min_s=0",
                 "registry.shadow.min_decisions=1"]) == 2
    err = capsys.readouterr().err
    assert "1 would-be false rollback(s) > registry.shadow.max_false_rollbacks=0" in err
