"""Policies: everything the Controller can ask for a decision, behind one interface.

A `Policy` turns (window, now, state) into (Decision, new state). Three kinds plug in:
  * `ScorerPolicy`    — a Scorer (CanaryScorer, its forecast-only/detector-only variants, or any
                        stand-in) + the RollbackPolicy;
  * `ThresholdJudge`  — Argo Rollouts / Flagger style static thresholds on canary metrics with a
                        failure limit (consecutive failed measurements);
  * `KayentaJudge`    — Kayenta's NetflixACAJudge every `interval_s` over the last interval.
All of them feed a score in [0, 1] (higher = worse) into the same pure `RollbackPolicy`, so
warm-up, batch progression, promotion and the fail-safe are identical, and the replay threshold
sweep can re-run any of them on the recorded score history.
"""

from __future__ import annotations

import logging
import math
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol, runtime_checkable

import numpy as np

from canaryml.catalog import Catalog
from canaryml.control.kayenta import (
    Classification,
    KayentaConfig,
    MetricResult,
    mann_whitney_test,
    mann_whitney_tests,
    summary_score,
    with_effect_size,
)
from canaryml.control.policy import (
    PolicyConfig,
    PolicyState,
    RollbackPolicy,
    RollbackStrategy,
    predict_horizon,
)
from canaryml.control.types import Action, Decision, Scorer, Window
from canaryml.errors import ConfigError, ScoringError

log = logging.getLogger(__name__)


@runtime_checkable
class Policy(Protocol):
    """A decision maker the Controller can drive. `state` is a frozen PolicyState (JSON-able via
    `to_dict`), so the live controller can persist and resume it."""

    @property
    def name(self) -> str: ...

    @property
    def lookback(self) -> int: ...

    @property
    def rollback(self) -> RollbackPolicy: ...

    def initial_state(self) -> PolicyState: ...

    def step(self, window: Window | None, now_s: float, state: PolicyState, *,
             failure: str | None = None) -> tuple[Decision, PolicyState]: ...


@dataclass
class ScorerPolicy:
    """Scorer + RollbackPolicy. A scorer exception becomes a fail-safe PAUSE with the reason.

    With `rollback.config.follow_model` (config `policy.rollback_threshold: null`) the threshold
    and hysteresis come from the scorer's fitted `operating_point`, looked up at every tick: a
    hot-swapped model (serve's ModelHolder) brings its own operating point with it."""

    name: str
    scorer: Scorer
    rollback: RollbackPolicy = field(default_factory=RollbackPolicy)
    model_version: str | None = None
    _followed: tuple[Any, RollbackPolicy] | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.current_rollback()  # a policy the model cannot run fails here, not at a tick

    @property
    def lookback(self) -> int:
        # steps a decision reads: the breach predictor's longer window when the model has one
        return int(getattr(self.scorer, "window_steps", self.scorer.lookback))

    def initial_state(self) -> PolicyState:
        return self.rollback.initial_state()

    def current_rollback(self) -> RollbackPolicy:
        """The rollback policy in force now: the model's operating point when following it, and
        the model's breach predictor (predictive rule) when it has one."""
        op = getattr(self.scorer, "operating_point", None) or {}
        key = (op.get("rollback_threshold"), op.get("consecutive_breaches"),
               op.get("predict_probability"), predict_horizon(self.scorer))
        if self._followed is None or self._followed[0] != key:
            self._followed = (key, RollbackPolicy(self.rollback.config.for_model(self.scorer)))
        return self._followed[1]

    def step(self, window: Window | None, now_s: float, state: PolicyState, *,
             failure: str | None = None) -> tuple[Decision, PolicyState]:
        try:
            rollback = self.current_rollback()
        except ConfigError as exc:  # a hot-swapped model this policy cannot run: hold, say why
            return self.rollback.decide(None, now_s, state, failure=str(exc))
        if failure is not None or window is None:
            return rollback.decide(None, now_s, state, failure=failure or "no window")
        if state.final is not None:  # terminal: no need to score again
            return rollback.decide(None, now_s, state)
        need = getattr(self.scorer, "min_steps", None)
        have = len(window.timestamps_s)
        if isinstance(need, int) and have < need:  # a canary's first steps: not a failure
            return rollback.warming_up(now_s, state, f"warming up: {have}/{need} steps")
        try:
            result = self.scorer.score(window)
        except Exception as exc:  # fail-safe boundary: a broken model pauses, never acts
            level = logging.DEBUG if isinstance(exc, ScoringError) else logging.WARNING
            log.log(level, "policy=%s deployment=%s scorer failed: %s: %s", self.name,
                        window.deployment_id, type(exc).__name__, exc)
            return rollback.decide(None, now_s, state,
                                   failure=f"scorer failed: {type(exc).__name__}: {exc}")
        top = sorted(result.contributions.items(), key=lambda kv: -kv[1])[:5]
        evidence = {"app_score": result.app_score, "infra_score": result.infra_score,
                    "forecast_error": result.forecast_error,
                    "detector_score": result.detector_score,
                    "breach_eta_s": result.breach_eta_s,
                    "breach_probability": result.breach_probability,
                    "contributions": {m: round(v, 4) for m, v in top if v > 0}}
        return rollback.decide(result.score, now_s, state, reasons=result.top_reasons(3),
                               evidence=evidence, predicted=result.breach_probability)


def _recent(window: Window, seconds: float) -> np.ndarray:
    """Row mask of the window's samples in (now − seconds, now]."""
    ts = np.asarray(window.timestamps_s, dtype=np.float64)
    return (ts > window.now_s - seconds) & (ts <= window.now_s)


@dataclass
class ThresholdJudge:
    """Argo Rollouts AnalysisTemplate / Flagger style: each tick one measurement per metric
    (mean of the canary over the last `measure_s`), failed when it exceeds its limit; the canary
    is aborted after `failure_limit` consecutive failed measurements.

    Score = clip(max(value/limit) / 2, 0, 1), threshold 0.5 (so `score > 0.5` ⇔ some metric over
    its limit); sweeping the threshold sweeps the limits by the same factor.

    `relative_to_baseline`: a limit is a ratio to the baseline group's mean over the same
    window (`canary / stable < 1.2` in an AnalysisTemplate), for metrics without an SLO."""

    limits: Mapping[str, float] = field(
        default_factory=lambda: {"error_rate": 0.05, "latency_p99": 1.0})
    failure_limit: int = 3
    measure_s: float = 60.0
    base: PolicyConfig = field(default_factory=PolicyConfig)
    name: str = "argo"
    step_s: float = 15.0
    relative_to_baseline: bool = False

    def __post_init__(self) -> None:
        self.rollback = RollbackPolicy(replace(
            self.base, rollback_threshold=0.5, clean_threshold=None, breach_inclusive=False,
            consecutive_breaches=int(self.failure_limit),
            rollback_strategy=RollbackStrategy.IMMEDIATE))

    @property
    def lookback(self) -> int:
        return max(1, math.ceil(self.measure_s / self.step_s))

    def initial_state(self) -> PolicyState:
        return self.rollback.initial_state()

    def measure(self, window: Window) -> tuple[float | None, dict[str, float]]:
        rows = _recent(window, self.measure_s)
        values: dict[str, float] = {}
        ratios = []
        for metric, limit in self.limits.items():
            if metric not in window.metrics:
                continue
            j = window.metrics.index(metric)
            col = window.canary[rows, j]
            col = col[np.isfinite(col)]
            if self.relative_to_baseline:
                if window.baseline is None:
                    raise ValueError("limits relative to the baseline need a baseline group")
                ref = window.baseline[rows, j]
                ref = ref[np.isfinite(ref)]
                if not len(ref) or float(ref.mean()) <= 0:
                    continue
                limit = limit * float(ref.mean())
            if len(col):
                values[metric] = float(col.mean())
                ratios.append(values[metric] / limit)
        if not ratios:
            return None, values
        return float(np.clip(max(ratios) / 2.0, 0.0, 1.0)), values

    def step(self, window: Window | None, now_s: float, state: PolicyState, *,
             failure: str | None = None) -> tuple[Decision, PolicyState]:
        if failure is not None or window is None:
            return self.rollback.decide(None, now_s, state, failure=failure or "no window")
        try:
            score, values = self.measure(window)
        except ValueError as exc:
            return self.rollback.decide(None, now_s, state, failure=str(exc))
        if score is None:
            return self.rollback.decide(
                None, now_s, state, failure=f"no measurement for {sorted(self.limits)}")
        over = [f"{m}={v:.4g} over its limit" for m, v in values.items()
                if v > self.limits[m] and not self.relative_to_baseline]
        return self.rollback.decide(score, now_s, state, reasons=over,
                                    evidence={"measurements": values})


TestCache = OrderedDict[tuple[str, float, float, str, int], MetricResult]


@dataclass
class KayentaJudge:
    """Kayenta NetflixACAJudge run every `interval_s` over the last `interval_s` of canary vs
    baseline. Score = 1 − kayenta/100; an interval at or below `marginal` ends the run
    (ROLLBACK, inclusive threshold 1 − marginal/100); an interval at or above `pass` is clean
    (threshold 1 − pass/100); in between holds the batch. Between evaluations the policy sees
    the last interval's score.

    `metrics` selects the metrics judged (None = every metric of the window). `test_cache`
    holds Mann-Whitney results before the effect-size step (bounded LRU); judges that differ
    only in effect size, metric selection, weights or thresholds can share one, so tuning them
    tests each interval once."""

    catalog: Catalog
    config: KayentaConfig = field(default_factory=KayentaConfig)
    interval_s: float = 300.0
    base: PolicyConfig = field(default_factory=PolicyConfig)
    name: str = "kayenta"
    step_s: float = 15.0
    metrics: tuple[str, ...] | None = None
    test_cache: TestCache = field(default_factory=OrderedDict)
    cache_size: int = 65536

    def __post_init__(self) -> None:
        c = self.config
        self.rollback = RollbackPolicy(replace(
            self.base, rollback_threshold=1.0 - c.marginal_threshold / 100.0,
            clean_threshold=1.0 - c.pass_threshold / 100.0, breach_inclusive=True,
            consecutive_breaches=1, rollback_strategy=RollbackStrategy.IMMEDIATE))

    @property
    def lookback(self) -> int:
        return max(2, math.ceil(self.interval_s / self.step_s))

    def initial_state(self) -> PolicyState:
        return self.rollback.initial_state()

    def _key(self, window: Window, x: np.ndarray, y: np.ndarray, metric: str
             ) -> tuple[str, float, float, str, int]:
        c = self.config
        return (window.deployment_id, float(window.now_s), float(self.interval_s), metric,
                hash((x.tobytes(), y.tobytes(), c.confidence, c.tolerance)))

    def _remember(self, key: tuple[str, float, float, str, int], result: MetricResult) -> None:
        self.test_cache[key] = result
        while len(self.test_cache) > self.cache_size:
            self.test_cache.popitem(last=False)

    def _test(self, window: Window, rows: np.ndarray, j: int) -> MetricResult:
        metric = window.metrics[j]
        assert window.baseline is not None
        x, y = window.canary[rows, j], window.baseline[rows, j]
        key = self._key(window, x, y, metric)
        hit = self.test_cache.get(key)
        if hit is None:
            hit = mann_whitney_test(metric, x, y, self.catalog.get(metric).direction, self.config)
            self._remember(key, hit)
        return hit

    def _judged(self, window: Window) -> list[int]:
        return [j for j, m in enumerate(window.metrics) if self.metrics is None or m in self.metrics]

    def schedule(self, ticks: Sequence[float]) -> list[float]:
        """The ticks at which `step` judges an interval when every tick has data: the first
        tick `interval_s` after the first, then each tick `interval_s` after the last judged."""
        out: list[float] = []
        if not len(ticks):
            return out
        last = None
        for now in ticks:
            if (now - ticks[0] >= self.interval_s if last is None
                    else now - last >= self.interval_s):
                out.append(float(now))
                last = now
        return out

    def prefetch(self, windows: Sequence[Window]) -> None:
        """Test every judged metric of `windows` (a deployment's intervals, see `schedule`) in
        one vectorised batch into the test cache. A cache only: `judge` uses a result where
        its own window holds the same data, and tests anything else itself."""
        keys, items = [], []
        for w in windows:
            if w.baseline is None:
                continue
            rows = _recent(w, self.interval_s)
            for j in self._judged(w):
                metric = w.metrics[j]
                x, y = w.canary[rows, j], w.baseline[rows, j]
                key = self._key(w, x, y, metric)
                if key not in self.test_cache:
                    keys.append(key)
                    items.append((metric, x, y, self.catalog.get(metric).direction))
        for key, result in zip(keys, mann_whitney_tests(items, self.config), strict=True):
            self._remember(key, result)

    def judge(self, window: Window) -> tuple[float, dict[str, Any]]:
        """Kayenta score 0..100 of the last interval and the per-metric classifications."""
        if window.baseline is None:
            raise ValueError("Kayenta needs a baseline group; this deployment has none")
        rows = _recent(window, self.interval_s)
        results = []
        groups = {}
        for j in self._judged(window):
            metric = window.metrics[j]
            groups[metric] = str(self.catalog.get(metric).kind)
            results.append(with_effect_size(self._test(window, rows, j), self.config))
        if not results:
            raise ValueError(f"none of the judged metrics {list(self.metrics or ())} is in the "
                             f"window ({', '.join(window.metrics)}); fix replay.kayenta.metrics")
        score, group_scores = summary_score(results, groups, self.config)
        failed = [f"{r.metric}:{r.classification}(x{r.effect_size:.2f})" for r in results
                  if r.classification in (Classification.HIGH, Classification.LOW)]
        return score, {"kayenta_score": score, "group_scores": group_scores, "failed": failed}

    def step(self, window: Window | None, now_s: float, state: PolicyState, *,
             failure: str | None = None) -> tuple[Decision, PolicyState]:
        if failure is not None or window is None:
            return self.rollback.decide(None, now_s, state, failure=failure or "no window")
        started = now_s if state.started_at_s is None else state.started_at_s
        due = (now_s - started >= self.interval_s if state.last_eval_s is None
               else now_s - state.last_eval_s >= self.interval_s)
        if not due:
            if state.last_score is None:
                st = replace(state, started_at_s=started, ticks=state.ticks + 1)
                return Decision(Action.CONTINUE, "awaiting the first Kayenta interval", None,
                                {"reasons": ["awaiting the first Kayenta interval"]}), st
            return self.rollback.decide(state.last_score, now_s, state,
                                        reasons=["last Kayenta interval"],
                                        evidence={"kayenta_score": 100 * (1 - state.last_score)})
        try:
            kscore, evidence = self.judge(window)
        except Exception as exc:  # a judge failure pauses like a scorer failure
            return self.rollback.decide(None, now_s, state,
                                        failure=f"kayenta failed: {type(exc).__name__}: {exc}")
        score = 1.0 - kscore / 100.0
        decision, st = self.rollback.decide(score, now_s, state, reasons=evidence["failed"],
                                            evidence=evidence)
        return decision, replace(st, last_eval_s=now_s, last_score=score)
