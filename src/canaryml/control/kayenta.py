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
from collections.abc import Callable, Mapping, Sequence
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


def _trivial(metric: str, x: np.ndarray, y: np.ndarray) -> MetricResult | None:
    """The classification of NaN-free `x`, `y` when no Mann-Whitney test is needed, else None."""
    if len(x) == 0 or len(y) == 0:
        return MetricResult(metric, Classification.NODATA, math.nan, None, "no data")
    if len(x) == len(y) and np.array_equal(np.sort(x), np.sort(y)):
        return MetricResult(metric, Classification.PASS, 1.0, None, "identical data")
    if np.unique(np.concatenate([x, y])).size == 1:
        return MetricResult(metric, Classification.PASS, 1.0, None, "a single distinct value")
    return None


def _classified(metric: str, x: np.ndarray, y: np.ndarray, res: MannWhitneyResult,
                direction: Direction, cfg: KayentaConfig) -> MetricResult:
    mean_y = float(y.mean())
    ratio = float(x.mean()) / mean_y if mean_y != 0 else (math.inf if x.mean() > 0 else 1.0)
    critical = cfg.tolerance * abs(res.estimate)
    if direction in (Direction.UP, Direction.BOTH) and res.lower_confidence > critical:
        return MetricResult(metric, Classification.HIGH, ratio, res, f"{metric} high")
    if direction in (Direction.DOWN, Direction.BOTH) and res.upper_confidence < -critical:
        return MetricResult(metric, Classification.LOW, ratio, res, f"{metric} low")
    return MetricResult(metric, Classification.PASS, ratio, res, "")


def _finite(v: np.ndarray) -> np.ndarray:
    a = np.asarray(v, np.float64)
    return a[np.isfinite(a)]  # NaNStrategy.Remove


def mann_whitney_test(metric: str, canary: np.ndarray, baseline: np.ndarray,
                      direction: Direction, cfg: KayentaConfig) -> MetricResult:
    """Kayenta's MannWhitneyClassifier for one metric over one interval, before the effect-size
    step: depends on `confidence` and `tolerance` only, so a judge can cache it and apply other
    effect sizes (`with_effect_size`) without testing again."""
    x, y = _finite(canary), _finite(baseline)
    done = _trivial(metric, x, y)
    if done is not None:
        return done
    return _classified(metric, x, y, mann_whitney(x, y, cfg.confidence), direction, cfg)


def mann_whitney_tests(items: Sequence[tuple[str, np.ndarray, np.ndarray, Direction]],
                       cfg: KayentaConfig) -> list[MetricResult]:
    """`mann_whitney_test` of many (metric, canary, baseline, direction) at once: every test's
    three root searches run in lock-step over numpy arrays (`mann_whitney_batch`). Each result
    equals the scalar function's, bit for bit (a unit test holds them equal)."""
    out: list[MetricResult | None] = []
    todo: list[tuple[int, str, np.ndarray, np.ndarray, Direction]] = []
    for metric, canary, baseline, direction in items:
        x, y = _finite(canary), _finite(baseline)
        done = _trivial(metric, x, y)
        if done is None:
            todo.append((len(out), metric, x, y, direction))
        out.append(done)
    res = mann_whitney_batch([(x, y) for _, _, x, y, _ in todo], cfg.confidence)
    for (i, metric, x, y, direction), r in zip(todo, res, strict=True):
        out[i] = _classified(metric, x, y, r, direction, cfg)
    return [r for r in out if r is not None]


# ---- the same computation over many tests at once ----------------------------------------
_BATCH_CELLS = 1 << 21  # pairwise differences per vectorised evaluation (memory bound, ~16 MB)
_RTOL = 4 * np.finfo(float).eps  # scipy.optimize.brentq's default rtol
_MAXITER = 100  # and its default maxiter


def _copies(v: np.ndarray) -> np.ndarray:
    """Per element of each row of `v` [P, K]: how many elements of its row equal it (NaN: 0)."""
    return (v[:, :, None] == v[:, None, :]).sum(2)


def _wdiff_batch(x: np.ndarray, y: np.ndarray, nx: np.ndarray, ny: np.ndarray, d: np.ndarray,
                 zq: np.ndarray, y_copies: np.ndarray) -> np.ndarray:
    """`_wdiff` of P problems at once: x [P, NX], y [P, NY] NaN-padded, shifts d [P], zq [P],
    `_copies(y)`. Every operation is the scalar function's, in the same order (the tie count
    exactly, in integers), so the values are identical."""
    xd = x - d[:, None]
    diff = xd[:, :, None] - y[:, None, :]  # NaN pads compare false: they count nowhere
    eq = diff == 0
    cross_x, cross_y = eq.sum(2), eq.sum(1)  # equal values in the other group
    dz = ((diff > 0).sum((1, 2)).astype(np.float64) + 0.5 * cross_x.sum(1)
          - (nx * ny) / 2.0)
    # Σ over distinct values of (c³ − c) = Σ over elements of (copies of its value)² − n, the
    # copies of an element of c(x − d, y) being those in its own group plus those in the other
    n = nx + ny
    ties = (((_copies(xd) + cross_x).astype(np.int64) ** 2).sum(1)
            + ((y_copies + cross_y).astype(np.int64) ** 2).sum(1) - n)
    sigma = np.sqrt((nx * ny / 12.0) * ((n + 1) - ties.astype(np.float64) / (n * (n - 1))))
    correction = np.where(dz != 0, np.copysign(0.5, dz), 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(sigma == 0, -zq, (dz - correction) / sigma - zq)


def _brentq_batch(f: Callable[[np.ndarray, np.ndarray], np.ndarray], xa: np.ndarray,
                  xb: np.ndarray, fa: np.ndarray, fb: np.ndarray, xtol: float) -> np.ndarray:
    """scipy.optimize.brentq (its C loop, scipy/optimize/Zeros/brentq.c, default rtol and
    maxiter) for many brackets at once; `f(idx, x)` evaluates the problems `idx` at `x`.
    Needs fa > 0 > fb (or the reverse) per problem, as the callers guarantee."""
    xpre, xcur = xa.astype(np.float64).copy(), xb.astype(np.float64).copy()
    fpre, fcur = fa.astype(np.float64).copy(), fb.astype(np.float64).copy()
    xblk = np.zeros_like(xpre)
    fblk = np.zeros_like(xpre)
    spre = np.zeros_like(xpre)
    scur = np.zeros_like(xpre)
    result = np.full_like(xpre, np.nan)
    active = np.ones(len(xpre), bool)
    for _ in range(_MAXITER):
        idx = np.flatnonzero(active)
        if not len(idx):
            break
        xp, xc, xk = xpre[idx], xcur[idx], xblk[idx]
        fp, fc, fk = fpre[idx], fcur[idx], fblk[idx]
        sp, sc = spre[idx], scur[idx]
        flip = (fp != 0) & (fc != 0) & (np.signbit(fp) != np.signbit(fc))
        xk, fk = np.where(flip, xp, xk), np.where(flip, fp, fk)
        sp, sc = np.where(flip, xc - xp, sp), np.where(flip, xc - xp, sc)
        swap = np.abs(fk) < np.abs(fc)
        xp, xc, xk = np.where(swap, xc, xp), np.where(swap, xk, xc), np.where(swap, xc, xk)
        fp, fc, fk = np.where(swap, fc, fp), np.where(swap, fk, fc), np.where(swap, fc, fk)
        delta = (xtol + _RTOL * np.abs(xc)) / 2
        sbis = (xk - xc) / 2
        conv = (fc == 0) | (np.abs(sbis) < delta)
        result[idx[conv]] = xc[conv]
        active[idx[conv]] = False
        keep = ~conv
        if not keep.any():
            break
        idx = idx[keep]
        xp, xc, xk, fp, fc, fk = xp[keep], xc[keep], xk[keep], fp[keep], fc[keep], fk[keep]
        sp, sc, delta, sbis = sp[keep], sc[keep], delta[keep], sbis[keep]
        with np.errstate(divide="ignore", invalid="ignore"):
            interp = -fc * (xc - xp) / (fc - fp)
            dpre = (fp - fc) / (xp - xc)
            dblk = (fk - fc) / (xk - xc)
            extrap = -fc * (fk * dblk - fp * dpre) / (dblk * dpre * (fk - fp))
        stry = np.where(xp == xk, interp, extrap)
        tried = (np.abs(sp) > delta) & (np.abs(fc) < np.abs(fp))
        good = tried & (2 * np.abs(stry) < np.minimum(np.abs(sp), 3 * np.abs(sbis) - delta))
        sp, sc = np.where(good, sc, sbis), np.where(good, stry, sbis)
        xp, fp = xc, fc
        xc = np.where(np.abs(sc) > delta, xc + sc, xc + np.where(sbis > 0, delta, -delta))
        fc = f(idx, xc)
        xpre[idx], xcur[idx], xblk[idx] = xp, xc, xk
        fpre[idx], fcur[idx], fblk[idx] = fp, fc, fk
        spre[idx], scur[idx] = sp, sc
    result[active] = xcur[active]  # scipy raises here (no convergence in 100 steps)
    return result


def mann_whitney_batch(pairs: Sequence[tuple[np.ndarray, np.ndarray]], confidence: float = 0.98
                       ) -> list[MannWhitneyResult]:
    """`mann_whitney(x, y, confidence)` of every (x, y) pair (non-empty, NaN-free), equal to
    the scalar function's results."""
    order = sorted(range(len(pairs)), key=lambda i: (len(pairs[i][0]), len(pairs[i][1])))
    results: dict[int, MannWhitneyResult] = {}
    start = 0
    while start < len(order):  # chunks of similar sizes bound the padded pairwise arrays
        stop = start + 1
        nx_max, ny_max = len(pairs[order[start]][0]), len(pairs[order[start]][1])
        while stop < len(order):
            a, b = len(pairs[order[stop]][0]), len(pairs[order[stop]][1])
            if (stop - start + 1) * 3 * max(nx_max, a) * max(ny_max, b) > _BATCH_CELLS:
                break
            nx_max, ny_max = max(nx_max, a), max(ny_max, b)
            stop += 1
        chunk = order[start:stop]
        for i, r in zip(chunk, _mann_whitney_chunk([pairs[i] for i in chunk], confidence),
                        strict=True):
            results[i] = r
        start = stop
    return [results[i] for i in range(len(pairs))]


def _mann_whitney_chunk(pairs: Sequence[tuple[np.ndarray, np.ndarray]], confidence: float
                        ) -> list[MannWhitneyResult]:
    if not pairs:
        return []
    P = len(pairs)
    nx = np.array([len(x) for x, _ in pairs], np.int64)
    ny = np.array([len(y) for _, y in pairs], np.int64)
    X = np.full((P, int(nx.max())), np.nan)
    Y = np.full((P, int(ny.max())), np.nan)
    for i, (x, y) in enumerate(pairs):
        X[i, :len(x)], Y[i, :len(y)] = x, y
    mumin = np.array([float(x.min() - y.max()) for x, y in pairs])
    mumax = np.array([float(x.max() - y.min()) for x, y in pairs])
    z_hi, z_lo = _z_bounds(confidence)
    # problems 0..P-1: the p-value (shift 0); then three roots per pair: z_hi, z_lo, 0
    rows = np.concatenate([np.arange(P)] * 4)
    zq = np.concatenate([np.zeros(P), np.full(P, z_hi), np.full(P, z_lo), np.zeros(P)])

    y_copies = _copies(Y)

    def f(idx: np.ndarray, d: np.ndarray) -> np.ndarray:
        r = rows[idx]
        return _wdiff_batch(X[r], Y[r], nx[r], ny[r], d, zq[idx], y_copies[r])

    at0 = f(np.arange(P), np.zeros(P))
    p = [min(1.0, math.erfc(abs(float(v)) / math.sqrt(2.0))) for v in at0]
    roots = np.arange(P, 4 * P)
    lo, hi = mumin[rows[roots]], mumax[rows[roots]]
    f_lo, f_hi = f(roots, lo), f(roots, hi)
    value = np.where(f_lo <= 0, lo, hi)
    search = (f_lo > 0) & (f_hi < 0)
    if search.any():
        s = roots[search]
        value[search] = _brentq_batch(lambda idx, d: f(s[idx], d), lo[search], hi[search],
                                      f_lo[search], f_hi[search], 1e-4)
    lower, upper, estimate = value[:P], value[P:2 * P], value[2 * P:]
    return [MannWhitneyResult(p[i], float(lower[i]), float(upper[i]), float(estimate[i]))
            for i in range(P)]


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
