"""Values and seams of the decision path (DESIGN §3). Replay and serving share all of these."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol, runtime_checkable

import numpy as np


class Action(StrEnum):
    CONTINUE = "continue"
    PAUSE = "pause"
    SHRINK = "shrink"
    ROLLBACK = "rollback"
    PROMOTE = "promote"


@dataclass(frozen=True)
class Window:
    """The telemetry a decision looks at: the last `T` steps of one deployment, both groups.

    `canary` and `baseline` are float32 [T, M] on one grid (NaN = missed scrape); `metrics`
    names the M columns; `timestamps_s` is int64 [T] epoch seconds; `now_s` is the decision time.
    """

    deployment_id: str
    now_s: float
    timestamps_s: np.ndarray
    canary: np.ndarray
    baseline: np.ndarray | None
    metrics: tuple[str, ...]


@dataclass(frozen=True)
class ScoreResult:
    """What a scorer says about one window. `score` is calibrated to [0, 1], higher = worse."""

    score: float
    app_score: float
    infra_score: float
    forecast_error: float
    detector_score: float
    contributions: dict[str, float] = field(default_factory=dict)  # metric -> share of the score
    breach_eta_s: float | None = None  # predicted seconds until an SLO metric breaches
    # P(the canary causes an SLO breach within the model's predict horizon); None = no predictor
    breach_probability: float | None = None

    def top_reasons(self, k: int = 3) -> list[str]:
        top = sorted(self.contributions.items(), key=lambda kv: -kv[1])[:k]
        return [f"{m}={v:.2f}" for m, v in top if v > 0]


@dataclass(frozen=True)
class Decision:
    action: Action
    reason: str
    score: float | None = None
    evidence: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class Scorer(Protocol):
    """Anything that turns a window into a ScoreResult (CanaryScorer, a pyfunc wrapper, a judge)."""

    @property
    def metrics(self) -> tuple[str, ...]: ...

    @property
    def lookback(self) -> int: ...

    def score(self, window: Window) -> ScoreResult: ...


@runtime_checkable
class MetricSource(Protocol):
    """Fetches the latest `lookback` steps of a deployment at time `now_s`.

    Raises `SourceError` when the source is unreachable; returns NaN for missing series.
    """

    def fetch(self, deployment_id: str, now_s: float, lookback: int) -> Window: ...


@runtime_checkable
class Actuator(Protocol):
    """Applies a decision to the deployment. Must be idempotent for a repeated (step, action)."""

    def apply(self, deployment_id: str, decision: Decision, step: int) -> None: ...
