"""A canary's first steps, before the scorer has the steps it needs, are a quiet warm-up state
("warming up: 1/4 steps", CONTINUE, no error counted), not a fail-safe scorer failure."""

from __future__ import annotations

import numpy as np

from canaryml.control.controller import Controller, ControllerObserver
from canaryml.control.policies import ScorerPolicy
from canaryml.control.policy import PolicyConfig, RollbackPolicy
from canaryml.control.types import Action, ScoreResult, Window
from canaryml.errors import ScoringError


class FourStepScorer:
    metrics = ("latency_p99",)
    lookback = 8
    min_steps = 4

    def score(self, window: Window) -> ScoreResult:
        if len(window.timestamps_s) < self.min_steps:
            raise ScoringError(f"window has {len(window.timestamps_s)} steps")
        return ScoreResult(score=0.1, app_score=0.1, infra_score=0.0, forecast_error=0.0,
                           detector_score=0.0)


class GrowingSource:
    """A canary whose samples start at t=100: NaN rows before (as Prometheus/Kafka return)."""

    def fetch(self, deployment_id: str, now_s: float, lookback: int) -> Window:
        ts = np.arange(now_s - lookback + 1, now_s + 1, dtype=np.int64)
        can = np.where(ts[:, None] >= 100, 1.0, np.nan).astype(np.float32)
        return Window(deployment_id=deployment_id, now_s=now_s, timestamps_s=ts, canary=can,
                      baseline=can.copy(), metrics=("latency_p99",))


class Failures(ControllerObserver):
    def __init__(self) -> None:
        self.failed_kinds: list[str] = []

    def failed(self, kind: str, deployment_id: str, message: str) -> None:
        self.failed_kinds.append(kind)


def test_first_steps_are_warming_up_not_failures() -> None:
    cfg = PolicyConfig(warmup_s=0, consecutive_error_limit=2, rollback_threshold=0.5)
    obs = Failures()
    ctl = Controller(ScorerPolicy("model", FourStepScorer(), RollbackPolicy(cfg)),
                     GrowingSource(), observer=obs)
    recs = [ctl.step("d1", now_s=float(t)) for t in range(100, 106)]
    assert [r.reason for r in recs[:3]] == [f"warming up: {n}/4 steps" for n in (1, 2, 3)]
    assert all(r.action == str(Action.CONTINUE) and r.score is None for r in recs[:3])
    assert not any("fail-safe" in r.reason for r in recs)
    # no error counted: three warm-up ticks under consecutive_error_limit=2 end nothing
    assert obs.failed_kinds == []
    assert not ctl.is_final("d1")
    assert [r.score for r in recs[3:]] == [0.1, 0.1, 0.1]


def test_a_real_scorer_failure_is_still_a_fail_safe_pause() -> None:
    class Broken(FourStepScorer):
        def score(self, window: Window) -> ScoreResult:
            raise ScoringError("model broken")

    obs = Failures()
    ctl = Controller(ScorerPolicy("model", Broken(), RollbackPolicy(PolicyConfig(warmup_s=0))),
                     GrowingSource(), observer=obs)
    recs = [ctl.step("d1", now_s=float(t)) for t in range(100, 106)]
    assert recs[0].reason.startswith("warming up")
    assert recs[-1].action == str(Action.PAUSE) and "fail-safe" in recs[-1].reason
    assert obs.failed_kinds == ["scorer", "scorer", "scorer"]
