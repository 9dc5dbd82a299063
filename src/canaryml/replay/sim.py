"""Replay plumbing: a Parquet-backed MetricSource, a simulated clock, a recording actuator and a
scorer that serves precomputed per-tick scores (fast path, same decision code)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import numpy as np

from canaryml.control.types import Decision, ScoreResult, Window
from canaryml.data.dataset import CanonicalDataset, DeploymentArrays
from canaryml.errors import ScoringError, SourceError


class ReplaySource:
    """MetricSource over a canonical dataset (or in-memory DeploymentArrays).

    `fetch(id, now_s, lookback)` returns the last `lookback` grid rows with timestamp ≤ now_s —
    exactly what a live source would have had at `now_s`, nothing from the future."""

    def __init__(self, data: CanonicalDataset | Mapping[str, DeploymentArrays],
                 cache_size: int = 4) -> None:
        self._ds = data if isinstance(data, CanonicalDataset) else None
        self._mem = None if isinstance(data, CanonicalDataset) else dict(data)
        self._cache: OrderedDict[str, DeploymentArrays] = OrderedDict()
        self._cache_size = cache_size

    def arrays(self, deployment_id: str) -> DeploymentArrays:
        if self._mem is not None:
            if deployment_id not in self._mem:
                raise SourceError(f"replay source has no deployment {deployment_id!r}")
            return self._mem[deployment_id]
        hit = self._cache.get(deployment_id)
        if hit is None:
            if self._ds is None:
                raise SourceError("replay source has neither a dataset nor arrays")
            hit = self._ds.arrays(deployment_id)
            self._cache[deployment_id] = hit
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(deployment_id)
        return hit

    def fetch(self, deployment_id: str, now_s: float, lookback: int) -> Window:
        a = self.arrays(deployment_id)
        hi = int(np.searchsorted(a.timestamps_s, now_s, side="right"))
        if hi == 0:
            raise SourceError(f"deployment {deployment_id!r} has no telemetry at or before "
                              f"t={now_s:.0f}")
        lo = max(0, hi - int(lookback))
        return Window(deployment_id, float(now_s), a.timestamps_s[lo:hi], a.canary[lo:hi],
                      None if a.baseline is None else a.baseline[lo:hi], a.metrics)


@dataclass(frozen=True)
class SimulatedClock:
    """Ticks every `interval_s` from `start_s` while ≤ `end_s`."""

    start_s: float
    end_s: float
    interval_s: float

    def __iter__(self) -> Iterator[float]:
        n = int(np.floor((self.end_s - self.start_s) / self.interval_s + 1e-9)) + 1
        for k in range(max(n, 0)):
            yield self.start_s + k * self.interval_s


@dataclass
class RecordingActuator:
    """Records what would have been done. Idempotent for a repeated (deployment, step, action)."""

    actions: list[tuple[str, int, str]] = field(default_factory=list)
    _seen: set[tuple[str, int, str]] = field(default_factory=set)

    def apply(self, deployment_id: str, decision: Decision, step: int) -> None:
        key = (deployment_id, int(step), str(decision.action))
        if key not in self._seen:
            self._seen.add(key)
            self.actions.append(key)


class SeriesScorer:
    """Scorer protocol over scores computed once per deployment with `score_series` (fast path).

    `score(window)` returns the precomputed score of the tick ending at `window.now_s` — equal to
    what the wrapped scorer's `score(window)` returns (CanaryScorer guarantees it) — and raises
    ScoringError where that one would (NaN). Contributions are not part of the fast path; replay
    fills the top reasons of the deciding tick with one real `score()` call."""

    def __init__(self, metrics: tuple[str, ...], lookback: int,
                 min_steps: int | None = None, *, wrapped: object = None) -> None:
        self._metrics = tuple(metrics)
        self._lookback = int(lookback)
        # the wrapped scorer's fewest steps: ScorerPolicy reports "warming up" below it, as live
        self.min_steps = None if min_steps is None else int(min_steps)
        # what the policy reads off the model besides scores: its breach predictor (the
        # predictive rule is off without one) and its fitted operating point
        self.predictor = getattr(wrapped, "predictor", None)
        self.operating_point = getattr(wrapped, "operating_point", None)
        self._series: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray | None]] = {}

    @property
    def metrics(self) -> tuple[str, ...]:
        return self._metrics

    @property
    def lookback(self) -> int:
        return self._lookback

    def load(self, deployment_id: str, timestamps_s: np.ndarray, scores: np.ndarray,
             breach_probability: np.ndarray | None = None) -> None:
        self._series = {deployment_id: (
            np.asarray(timestamps_s), np.asarray(scores, float),
            None if breach_probability is None else np.asarray(breach_probability, float))}

    def score(self, window: Window) -> ScoreResult:
        got = self._series.get(window.deployment_id)
        if got is None:
            raise ScoringError(f"no precomputed scores for deployment {window.deployment_id!r}")
        ts, scores, probs = got
        i = int(np.searchsorted(ts, window.now_s, side="right")) - 1
        s = float(scores[i]) if i >= 0 else float("nan")
        if not np.isfinite(s):
            raise ScoringError(f"deployment {window.deployment_id!r}: no score at "
                               f"t={window.now_s:.0f} (window too short or a metric missing)")
        p = float("nan") if probs is None else float(probs[i])
        return ScoreResult(score=s, app_score=s, infra_score=s, forecast_error=float("nan"),
                           detector_score=float("nan"),
                           breach_probability=p if np.isfinite(p) else None)
