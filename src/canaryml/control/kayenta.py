"""Kayenta's NetflixACAJudge, ported from spinnaker/kayenta (kayenta-judge, Scala).

Per metric (`MannWhitneyClassifier.classify`):
  1. NaN removal (NaNStrategy.Remove); an empty side → NODATA;
  2. identical samples (sorted) or a single distinct value over both → PASS;
  3. two-sided Mann-Whitney with the normal approximation, tie and continuity correction
     (Kayenta's `kayenta-mannwhitney` is a port of R's `wilcox.test(x, y, conf.int=TRUE,
     exact=FALSE, correct=TRUE)`): confidence interval and Hodges-Lehmann location estimate by
     root finding of the corrected z statistic over the shift `d` (R's `wdiff`/`uniroot`,
     tol 1e-4); the p-value of the same corrected statistic at shift 0 (what
     `scipy.stats.mannwhitneyu(method="asymptotic", use_continuity=True)` returns);
  4. tolerance bounds ±`tolerance`·|estimate|; HIGH when the lower confidence bound is above
     the upper bound (direction up/both), LOW when the upper confidence bound is below the lower
     bound (direction down/both), else PASS; effect size = mean(canary)/mean(baseline), and a
     HIGH/LOW whose effect size stays within `allowed_increase`/`allowed_decrease` is a PASS
     (Kayenta's effectSize thresholds; 1.0 = off).
Scoring (`WeightedSumScorer`): group score = 100·pass/(pass + high + low + nodata-fail), where a
NODATA metric counts as a failure only when `data_required`; groups with no classified metric
are left out; summary = Σ group score · weight/100, groups without a configured weight share
what is left of 100. A critical metric that is not PASS makes the summary 0. Pass ≥ 95,
marginal 75: an interval at or below marginal ends the canary run.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum

import numpy as np
from scipy.optimize import brentq
from scipy.stats import norm

from canaryml.catalog import Direction


class Classification(StrEnum):
    PASS = "Pass"
    HIGH = "High"
    LOW = "Low"
    NODATA = "Nodata"


@dataclass(frozen=True)
class MannWhitneyResult:
    p_value: float
    lower_confidence: float
    upper_confidence: float
    estimate: float  # Hodges-Lehmann location shift, canary − baseline


@dataclass(frozen=True)
class MetricResult:
    metric: str
    classification: Classification
    effect_size: float  # mean(canary) / mean(baseline)
    result: MannWhitneyResult | None = None
    reason: str = ""


@dataclass(frozen=True)
class KayentaConfig:
    confidence: float = 0.98
    tolerance: float = 0.25
    pass_threshold: float = 95.0
    marginal_threshold: float = 75.0
    group_weights: Mapping[str, float] = field(default_factory=dict)  # percent per group
    allowed_increase: float = 1.0
    allowed_decrease: float = 1.0
    data_required: bool = False
    critical: tuple[str, ...] = ()


def _wdiff(x: np.ndarray, y: np.ndarray, d: float, zq: float) -> float:
    """R wilcox.test's corrected z statistic of the shift `d`, minus `zq` (decreasing in d)."""
    nx, ny = len(x), len(y)
    xd = x - d
    diff = xd[:, None] - y[None, :]
    # Σ ranks of x-d in c(x-d, y) − nx(nx+1)/2 = #{x-d > y} + ½#{x-d == y} (Mann-Whitney U)
    dz = float((diff > 0).sum() + 0.5 * (diff == 0).sum()) - nx * ny / 2.0
    _, counts = np.unique(np.concatenate([xd, y]), return_counts=True)
    n = nx + ny
    sigma = math.sqrt((nx * ny / 12.0) * ((n + 1) - float((counts ** 3 - counts).sum()) / (n * (n - 1))))
    correction = math.copysign(0.5, dz) if dz != 0 else 0.0
    if sigma == 0:
        return -zq
    return (dz - correction) / sigma - zq


@functools.lru_cache(maxsize=16)
def _z_bounds(confidence: float) -> tuple[float, float]:
    alpha = 1.0 - confidence
    return float(norm.ppf(1 - alpha / 2)), float(norm.ppf(alpha / 2))


def mann_whitney(canary: np.ndarray, baseline: np.ndarray, confidence: float = 0.98
                 ) -> MannWhitneyResult:
    """Two-sided Mann-Whitney of canary (x) vs baseline (y) with Kayenta's (R's) confidence
    interval and Hodges-Lehmann estimate. Both inputs must be non-empty, NaN-free."""
    x = np.asarray(canary, np.float64)
    y = np.asarray(baseline, np.float64)
    # the corrected z of shift 0 is scipy's `mannwhitneyu(method="asymptotic",
    # use_continuity=True)` statistic: the same p-value without its per-call overhead
    p = min(1.0, math.erfc(abs(_wdiff(x, y, 0.0, 0.0)) / math.sqrt(2.0)))
    mumin, mumax = float(x.min() - y.max()), float(x.max() - y.min())
    z_hi, z_lo = _z_bounds(confidence)

    def root(zq: float) -> float:
        f_lo, f_hi = _wdiff(x, y, mumin, zq), _wdiff(x, y, mumax, zq)
        if f_lo <= 0:
            return mumin
        if f_hi >= 0:
            return mumax
        return float(brentq(lambda d: _wdiff(x, y, d, zq), mumin, mumax, xtol=1e-4))

    lower = root(z_hi)
    upper = root(z_lo)
    estimate = root(0.0)
    return MannWhitneyResult(p, lower, upper, estimate)


def mann_whitney_test(metric: str, canary: np.ndarray, baseline: np.ndarray,
                      direction: Direction, cfg: KayentaConfig) -> MetricResult:
    """Kayenta's MannWhitneyClassifier for one metric over one interval, before the effect-size
    step: depends on `confidence` and `tolerance` only, so a judge can cache it and apply other
    effect sizes (`with_effect_size`) without testing again."""
    x = np.asarray(canary, np.float64)
    y = np.asarray(baseline, np.float64)
    x, y = x[np.isfinite(x)], y[np.isfinite(y)]  # NaNStrategy.Remove
    if len(x) == 0 or len(y) == 0:
        return MetricResult(metric, Classification.NODATA, math.nan, None, "no data")
    if len(x) == len(y) and np.array_equal(np.sort(x), np.sort(y)):
        return MetricResult(metric, Classification.PASS, 1.0, None, "identical data")
    if np.unique(np.concatenate([x, y])).size == 1:
        return MetricResult(metric, Classification.PASS, 1.0, None, "a single distinct value")
    res = mann_whitney(x, y, cfg.confidence)
    mean_y = float(y.mean())
    ratio = float(x.mean()) / mean_y if mean_y != 0 else (math.inf if x.mean() > 0 else 1.0)
    critical = cfg.tolerance * abs(res.estimate)
    if direction in (Direction.UP, Direction.BOTH) and res.lower_confidence > critical:
        return MetricResult(metric, Classification.HIGH, ratio, res, f"{metric} high")
    if direction in (Direction.DOWN, Direction.BOTH) and res.upper_confidence < -critical:
        return MetricResult(metric, Classification.LOW, ratio, res, f"{metric} low")
    return MetricResult(metric, Classification.PASS, ratio, res, "")


def with_effect_size(r: MetricResult, cfg: KayentaConfig) -> MetricResult:
    """A HIGH whose mean ratio stays below `allowed_increase`, or a LOW whose ratio stays above
    `allowed_decrease`, is a PASS (Kayenta's effectSize thresholds; 1.0 = off)."""
    if (r.classification is Classification.HIGH and r.effect_size < cfg.allowed_increase) or (
            r.classification is Classification.LOW and r.effect_size > cfg.allowed_decrease):
        return MetricResult(r.metric, Classification.PASS, r.effect_size, r.result,
                            f"{r.metric} within the allowed effect size")
    return r


def classify(metric: str, canary: np.ndarray, baseline: np.ndarray, direction: Direction,
             cfg: KayentaConfig) -> MetricResult:
    """Kayenta's MannWhitneyClassifier for one metric over one interval."""
    return with_effect_size(mann_whitney_test(metric, canary, baseline, direction, cfg), cfg)


def summary_score(results: Sequence[MetricResult], groups: Mapping[str, str],
                  cfg: KayentaConfig) -> tuple[float, dict[str, float]]:
    """Kayenta's WeightedSumScorer: (summary score 0..100, group scores)."""
    counts: dict[str, list[int]] = {}
    for r in results:
        c = counts.setdefault(groups.get(r.metric, "default"), [0, 0])  # [pass, total]
        if r.classification is Classification.PASS:
            c[0] += 1
            c[1] += 1
        elif r.classification in (Classification.HIGH, Classification.LOW) or cfg.data_required:
            c[1] += 1
    group_scores = {g: 100.0 * p / t for g, (p, t) in counts.items() if t > 0}
    weights = dict(cfg.group_weights)
    missing = [g for g in counts if g not in weights]
    share = (100.0 - sum(weights.values())) / len(missing) if missing else 0.0
    summary = sum(s * weights.get(g, share) / 100.0 for g, s in group_scores.items())
    if any(r.metric in cfg.critical and r.classification is not Classification.PASS
           for r in results):
        summary = 0.0
    return float(summary), group_scores
