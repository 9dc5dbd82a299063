"""CanaryScorer: the deployable bundle (forecaster network + scaler + detectors + calibration).

Scoring one window of `lookback + horizon` steps, for each group (canary, baseline):
  1. the network forecasts the last `horizon` steps from the `lookback` steps before them;
     residual r = (actual − median) / σ̂, σ̂ from the predicted quantile spread, averaged over
     the horizon (observed steps only);
  2. the canary residual is taken **relative to the baseline**: d = r_canary − r_baseline, so a
     shock that hits both groups cancels. The gap drift — change of the scaled canary−baseline
     gap from the first to the last `horizon` steps of the window — catches slow trends (leaks)
     a forecaster would simply follow;
  3. both are made *directional* with the catalog (`up`: only increases count, `down`: only
     decreases, `both`: either), giving a per-metric error e_m ≥ 0;
  4. forecast error per kind = RMS of e_m over the app (resp. infra) metrics; the detector of
     that kind scores the feature vector [e_d, e_drift]; each is normalised on healthy
     calibration ticks (forecast error by its 99th percentile, detector so that the healthy
     median → 0 and `threshold_` → 1);
  5. kind score = mix · forecast + (1 − mix) · detector; combined = weighted mean of the app and
     infra kind scores (`weightApplicationMetrics`, `weightInfrastructureMetrics`);
  6. calibration: the empirical CDF of healthy calibration ticks, with an exponential tail past
     the largest healthy value, maps each raw score to [0, 1] and keeps scores rankable.

A window with `baseline=None` (SMD/NAB, one group) is scored on raw canary residuals and with
no drift term (documented degradation, logged once). A model *trained* without a baseline group
(single-group mode, `SingleGroup`) also (a) scales each series (service) by its own healthy
training distribution (robust median/IQR) instead of one pooled scaler, (b) scores the current
values of all metrics at once with a per-series multivariate detector (PCA reconstruction, which
catches a broken correlation no single metric shows), mixed with the forecast-error score by
`values_weight`, and (c) calibrates per tick (the `single_group_alarm_quantile` of healthy
calibration ticks scores 0.5) instead of per deployment: a point-labelled series has no
deployments. Windows with a baseline never take this path. `score`, `score_batch` and
`score_series` all run `_score_block`, the same batched code path.
"""

from __future__ import annotations

import itertools
import json
import logging
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from canaryml.catalog import Catalog, Direction, MetricKind
from canaryml.control.types import ScoreResult, Window
from canaryml.data.atomic import atomic_dir, atomic_write_json, json_marker
from canaryml.data.dataset import DeploymentArrays
from canaryml.errors import ModelLoadError, ScoringError
from canaryml.models.detectors import (
    IsolationForestDetector,
    JointForest,
    PCADetector,
    ResidualDetector,
)
from canaryml.models.networks import NetworkSpec, build_network
from canaryml.models.predict import BreachPredictor, tick_windows
from canaryml.models.windows import Scaler, model_input

log = logging.getLogger(__name__)

FORMAT_VERSION = 2
KINDS = ("app", "infra")
_CLIP = 50.0
_CHUNK = 2048
_MEMO_MIN_BLOCK = 32
_PARALLEL_MIN = 128  # windows per thread below which one thread is as fast


@dataclass(frozen=True)
class ScorerWeights:
    weight_application_metrics: float = 0.7
    weight_infrastructure_metrics: float = 0.3
    forecast_weight: float = 1.0
    drift_weight: float = 1.0
    max_eta_s: float = 3600.0
    # deployment-level calibration: the worst tick of the `deployment_quantile` healthy
    # calibration deployment scores `deployment_anchor` (a robust median anchor; the tail above
    # keeps the tick ranking, so the threshold reads as a deployment-level false-rollback rate)
    deployment_quantile: float = 0.5
    deployment_anchor: float = 0.2
    # single-group mode (a model trained without a baseline group: SMD, NAB, Nezha with the
    # history baseline off); none of these is read for windows with a baseline
    series_normalisation: bool = True  # each series (service) scaled by its own training data
    values_detector: str | None = "pca"  # multivariate detector on the current values; None = off
    values_variance: float = 0.95  # PCA: share of the healthy variance the components keep
    # share of the values detector in the single-group raw score (1 − it: the forecast error /
    # residual-detector mix); None = chosen at training on anomalies injected into the healthy
    # calibration windows (never on evaluation labels)
    values_weight: float | None = None
    single_group_alarm_quantile: float = 0.99  # this quantile of healthy ticks scores 0.5

    def __post_init__(self) -> None:
        from canaryml.errors import ConfigError

        if self.values_weight is not None and not 0.0 <= self.values_weight <= 1.0:
            raise ConfigError(f"scorer.values_weight={self.values_weight} must be in [0, 1] or "
                              "null (chosen at training)")
        if not 0.5 < self.single_group_alarm_quantile < 1.0:
            raise ConfigError(f"scorer.single_group_alarm_quantile="
                              f"{self.single_group_alarm_quantile} must be in (0.5, 1)")
        if self.values_detector not in (None, "pca"):
            raise ConfigError(f"scorer.values_detector={self.values_detector!r}: use pca or null")

        if not (0.0 < self.deployment_quantile < 1.0 and 0.0 < self.deployment_anchor < 1.0):
            raise ConfigError(
                f"scorer.deployment_quantile={self.deployment_quantile} and "
                f"scorer.deployment_anchor={self.deployment_anchor} must both be in (0, 1); the "
                "defaults 0.5 and 0.2 score the worst tick of the median healthy deployment 0.2")
        if not 0.0 <= self.forecast_weight <= 1.0:
            raise ConfigError(f"scorer.forecast_weight={self.forecast_weight} must be in [0, 1]")
        if min(self.weight_application_metrics, self.weight_infrastructure_metrics) < 0 or (
                self.weight_application_metrics + self.weight_infrastructure_metrics <= 0):
            raise ConfigError(
                f"scorer weights app={self.weight_application_metrics}, "
                f"infra={self.weight_infrastructure_metrics}: need ≥ 0 and a positive sum"
            )


@dataclass(frozen=True)
class Calibration:
    """Learned state from healthy calibration ticks: normalisers and raw components [N, 4]
    (fe_app, fe_infra, det_app, det_infra), kept so that re-weighted copies recalibrate, and the
    calibration deployment of each tick (`groups` [N], int) for deployment-level calibration."""

    components: np.ndarray
    fe_norm: np.ndarray  # [2]
    det_center: np.ndarray  # [2]
    det_scale: np.ndarray  # [2]
    groups: np.ndarray | None = None  # [N]; None = every tick its own deployment
    values: np.ndarray | None = None  # [N] normalised values-detector score (single-group mode)


_SEPARATORS = "./:@#"


class SingleGroup:
    """Per-series state of a model trained without a baseline group. Row k < K belongs to series
    `keys[k]` (a service / machine / file), row K is the pooled fallback for series not seen in
    training: robust `center`/`scale` [K+1, M] (each metric by its own series' healthy training
    distribution) and a detector on the scaled current values per row (None = none).

    A deployment id maps to its series by `aliases` (training deployment → series), else by the
    longest key that appears in the id as a whole `./:@#`-delimited part
    (`machine-1-6.test` → `machine-1-6`, `2022-08-22/frontend/x` → `frontend`), else row K."""

    def __init__(self, keys: Sequence[str], center: np.ndarray, scale: np.ndarray,
                 values: Sequence[PCADetector | None], aliases: dict[str, str] | None = None):
        self.keys = tuple(keys)
        self.center = np.asarray(center, np.float32)
        self.scale = np.asarray(scale, np.float32)
        self.values = tuple(values)
        self.aliases = dict(aliases or {})
        if not (len(self.center) == len(self.scale) == len(self.values) == len(self.keys) + 1):
            raise ModelLoadError("single-group state: center/scale/values need one row per "
                                 "series plus the pooled fallback")
        self._cache: dict[str, int] = {}

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_cache": {}}

    def index(self, deployment_id: str) -> int:
        hit = self._cache.get(deployment_id)
        if hit is not None:
            return hit
        pos = {k: i for i, k in enumerate(self.keys)}
        key = self.aliases.get(deployment_id)
        row = pos.get(key, len(self.keys)) if key is not None else pos.get(deployment_id)
        if row is None:
            row, best = len(self.keys), -1
            for k, i in pos.items():
                at = deployment_id.find(k)
                while at >= 0:
                    end = at + len(k)
                    if ((at == 0 or deployment_id[at - 1] in _SEPARATORS)
                            and (end == len(deployment_id) or deployment_id[end] in _SEPARATORS)):
                        if len(k) > best:
                            row, best = i, len(k)
                        break
                    at = deployment_id.find(k, at + 1)
        self._cache[deployment_id] = row
        return row

    def transform(self, x: np.ndarray, rows: np.ndarray, clip: bool = True) -> np.ndarray:
        """[N, W, M] raw windows (row per window) → per-series scaled; clipped to ±_CLIP for
        the forecaster (`clip`), unclipped for the values detector (it standardises itself)."""
        z = (x - self.center[rows][:, None, :]) / self.scale[rows][:, None, :]
        return (np.clip(z, -_CLIP, _CLIP) if clip else z).astype(np.float32)

    def values_score(self, z_now: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Normalised values-detector score (healthy median 0, threshold 1) of scaled current
        values [N, M] (NaN = not observed → the series' median)."""
        out = np.zeros(len(z_now))
        z_now = np.where(np.isfinite(z_now), z_now, 0.0)
        for r in np.unique(rows):
            det = self.values[int(r)]
            if det is not None:
                sel = rows == r
                out[sel] = det.normalised(z_now[sel])
        return out


def _masked_mean(x: np.ndarray) -> np.ndarray:
    """Mean over axis 1 ignoring NaN; 0 where nothing is observed (no RuntimeWarning)."""
    ok = np.isfinite(x)
    return np.where(ok, x, 0.0).sum(1) / np.maximum(ok.sum(1), 1)


def _ecdf_fit(values: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """(knots, their ECDF levels, tail scale) for `_ecdf_apply`."""
    v = np.sort(values[np.isfinite(values)])
    if len(v) == 0:
        raise ScoringError("no healthy calibration ticks; calibration needs healthy deployments")
    if len(v) > 4000:
        v = np.quantile(v, np.linspace(0, 1, 4000))
    tau = float(v[-1] - np.quantile(v, 0.9))
    tau = tau if tau > 1e-9 else max(float(np.std(v)), 1e-3)
    return v, np.arange(1, len(v) + 1) / (len(v) + 1), tau


def _deployment_power(raw: np.ndarray, groups: np.ndarray | None, quantile: float,
                      anchor: float) -> float:
    """Exponent k such that `tick_score**k` = `anchor` at the `quantile` of the per-deployment
    worst tick over healthy calibration deployments. A tick-level percentile alone puts half of all
    healthy ticks above 0.5 and would roll back every healthy canary; the power keeps the
    ranking and makes the threshold a deployment-level false-rollback rate. Each deployment's
    worst tick is ranked leave-one-deployment-out, so it is not compared with itself."""
    ok = np.isfinite(raw)
    if not ok.any():
        return 1.0
    x = raw[ok]
    g = np.zeros(len(raw), np.int64)[ok] if groups is None else np.asarray(groups)[ok]
    ids, sizes = np.unique(g, return_counts=True)
    if len(ids) < 3:
        # too few calibration deployments to rank their worst ticks: treat a deployment's ticks
        # as n/4 independent ones (the autocorrelation seen on the simulated corpus), whose
        # median maximum is 0.5**(4/n)
        n_eff = max(float(np.median(sizes)) / 4.0, 1.0)
        return float(n_eff * np.log(anchor) / np.log(0.5))
    p = []
    for gid in ids:
        others = np.sort(x[g != gid])
        worst = float(x[g == gid].max())
        p.append(float(_ecdf_apply(np.array([worst]), *_ecdf_fit(others))[0]))
    q = float(np.quantile(p, quantile))
    if not 0.0 < q < 1.0:
        return 1.0
    return float(np.log(anchor) / np.log(q))


def _ecdf_apply(x: np.ndarray, knots: np.ndarray, levels: np.ndarray, tau: float) -> np.ndarray:
    n = len(knots)
    p = np.interp(x, knots, levels, left=0.0)
    over = x > knots[-1]
    p_max = n / (n + 1)
    # np.where evaluates both branches: clip the exponent so ticks far below the last knot
    # (not `over`, value unused) do not overflow exp()
    p = np.where(over, 1.0 - (1.0 - p_max) * np.exp(-np.maximum(x - knots[-1], 0.0) / tau), p)
    return np.where(np.isfinite(x), p, np.nan)


class CanaryScorer:
    """Implements the `Scorer` protocol (canaryml.control.types). Build with `train_scorer`."""

    def __init__(self, *, spec: NetworkSpec, network: torch.nn.Module, scaler: Scaler,
                 metrics: Sequence[str], catalog: Catalog, detectors: dict[str, ResidualDetector | None],
                 calibration: Calibration, weights: ScorerWeights, step_s: int,
                 gap_scale: np.ndarray | None = None, info: dict[str, Any] | None = None,
                 operating_point: dict[str, Any] | None = None,
                 predictor: BreachPredictor | None = None,
                 single_group: SingleGroup | None = None):
        self.spec = spec
        # per-series state of a model trained without a baseline group (None: trained with one)
        self.single = single_group
        # P(canary-caused SLO breach within its horizon) per window: the predictive rule's input
        # (canaryml.models.predict); None = the model has none (no labelled faults to learn from)
        self.predictor = predictor
        # the rollback threshold and hysteresis chosen at training time for a target false-
        # rollback rate (canaryml.replay.protocol.choose_operating_point); policies that follow
        # the model (policy.rollback_threshold: null) use it. None = not chosen.
        self.operating_point = None if operating_point is None else dict(operating_point)
        self.gap_scale = (np.ones(spec.n_metrics, np.float32) if gap_scale is None
                          else np.asarray(gap_scale, np.float32))
        self.network = network.eval()
        self.scaler = scaler
        self.catalog = catalog
        self.detectors = detectors
        self.calibration = calibration
        self.weights = weights
        self._step_s = int(step_s)
        self.info = dict(info or {})
        # column order = the order the scaler and network were trained on
        self._metrics = tuple(metrics)
        if len(self._metrics) != spec.n_metrics:
            raise ModelLoadError(f"scorer has {len(self._metrics)} metrics but its network "
                                 f"expects {spec.n_metrics}")
        specs = [catalog.get(m) for m in self._metrics]
        self._is_app = np.array([s.kind is MetricKind.APP for s in specs])
        self._up = np.array([s.direction in (Direction.UP, Direction.BOTH) for s in specs], float)
        self._down = np.array([s.direction in (Direction.DOWN, Direction.BOTH) for s in specs], float)
        self._slo = np.array([np.nan if s.slo is None else s.slo for s in specs])
        self._slo_down = np.array([s.direction is Direction.DOWN for s in specs])
        self._slo_idx = np.flatnonzero(np.isfinite(self._slo))
        self._slo_sign = np.where(self._slo_down[self._slo_idx], -1.0, 1.0)  # breach: sign*(x-slo)>0
        t = np.arange(spec.lookback + spec.horizon, dtype=np.float64)
        self._slope_w = (t - t.mean()) / ((t - t.mean()) ** 2).sum()
        qs = spec.quantiles
        self._q_lo, self._q_mid, self._q_hi = 0, qs.index(0.5), len(qs) - 1
        from scipy.stats import norm

        self._sigma_div = float(norm.ppf(qs[-1]) - norm.ppf(qs[0]))
        self._joint = self._joint_forest()
        self._index_cache: dict[tuple[str, ...], np.ndarray] = {}
        # raw components of the last few series blocks, shared with the re-weighted copies
        # (`with_mix`, `with_weights`): replay scores a deployment's series once for all variants
        self._memo: OrderedDict[tuple[Any, ...], dict[str, np.ndarray]] = OrderedDict()
        self._warned_no_baseline = False
        # live ticks: results of the last `prepare`, by window identity (window, result)
        self._prepared: dict[int, tuple[Window, ScoreResult | ScoringError]] = {}
        # threads for the forecaster on large batches (torch ops release the GIL): with torch
        # pinned to one intra-op thread, `workers` = the cores to use; 1 = the caller's thread
        self.workers = 1
        self._executor: Any = None
        self._executor_size = 0
        import inspect

        self._time_major = "time_major" in inspect.signature(self.network.forward).parameters
        self._recalibrate()

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)  # no thread pool or pending tick results in a pickle
        state.update(_executor=None, _executor_size=0, _prepared={})
        return state

    # ---- Scorer protocol -------------------------------------------------------------------
    @property
    def metrics(self) -> tuple[str, ...]:
        return self._metrics

    @property
    def lookback(self) -> int:
        """Steps a Window must hold: the forecaster's lookback plus its horizon."""
        return self.spec.lookback + self.spec.horizon

    @property
    def window_steps(self) -> int:
        """Steps of history a decision reads: `lookback`, or the breach predictor's longer
        window (the canary's age and first minutes) when the model has one."""
        return max(self.lookback, 0 if self.predictor is None else self.predictor.spec.window)

    @property
    def min_steps(self) -> int:
        """Fewest steps a window may hold: `min_history + horizon` (the rest of `lookback` is
        NaN-padded at the front); `lookback` for a model trained without a `min_history`."""
        h = self.spec.min_history
        return self.lookback if h <= 0 else h + self.spec.horizon

    @property
    def step_s(self) -> int:
        return self._step_s

    def padded(self, canary: np.ndarray, baseline: np.ndarray | None
               ) -> tuple[np.ndarray, np.ndarray | None, int | None]:
        """[T, M] series NaN-padded at the front so that their sliding `lookback` windows end
        on ticks `first`, `first + 1`, … `T − 1` (`first` = min_steps − 1; None when T is
        shorter than min_steps)."""
        first = self.min_steps - 1
        if len(canary) <= first:
            return canary, baseline, None
        pad = self.lookback - self.min_steps

        def front(x: np.ndarray) -> np.ndarray:
            return np.concatenate([np.full((pad, x.shape[1]), np.nan, x.dtype), x]) if pad else x

        return front(canary), None if baseline is None else front(baseline), first

    def score(self, window: Window) -> ScoreResult:
        hit = self._prepared.pop(id(window), None)
        if hit is not None and hit[0] is window:  # scored by `prepare` in this tick's batch
            if isinstance(hit[1], Exception):
                raise hit[1]
            return hit[1]
        return self.score_batch([window])[0]

    def score_batch(self, windows: Sequence[Window]) -> list[ScoreResult]:
        """Score many windows in one batched pass (same code as `score`); the first window that
        cannot be scored raises its `ScoringError`."""
        out = self.score_each(windows)
        for r in out:
            if isinstance(r, Exception):
                raise r
        return out  # type: ignore[return-value]

    def prepare(self, windows: Sequence[Window]) -> None:
        """Score `windows` in one batched pass and keep each result for the `score(window)`
        call that follows with the same window object (a live tick: the controller fetches
        every due deployment's window, prepares them, then its policy scores each). Results
        equal `score(window)`'s; a window that cannot be scored keeps its `ScoringError` for
        `score` to raise. Each result is used once; the next `prepare` drops the rest."""
        results = self.score_each(windows)
        self._prepared = {id(w): (w, r) for w, r in zip(windows, results, strict=True)}

    def score_each(self, windows: Sequence[Window]) -> list[ScoreResult | ScoringError]:
        """Per window its result or the `ScoringError` `score(window)` would raise, from one
        batched pass (split over `workers` threads for large batches)."""
        out: list[ScoreResult | ScoringError | None] = [None] * len(windows)
        groups: dict[bool, tuple[list[int], list[np.ndarray], list[np.ndarray]]] = {
            True: ([], [], []), False: ([], [], [])}
        steps = self.window_steps  # the predictor reads more history than the forecaster
        for i, w in enumerate(windows):
            try:
                can = self._align(w, w.canary, "canary", steps)
                base = None if w.baseline is None else self._align(w, w.baseline, "baseline", steps)
            except ScoringError as exc:
                out[i] = exc
                continue
            idx, cs, bs = groups[base is not None]
            idx.append(i)
            cs.append(can)
            if base is not None:
                bs.append(base)
        for has_base, (idx, cs, bs) in groups.items():
            if not idx:
                continue
            can_w = np.stack(cs)
            base_w = np.stack(bs) if has_base else None
            k = self.spec.lookback + self.spec.horizon
            rows = (None if has_base or self.single is None else
                    np.array([self.single.index(windows[i].deployment_id) for i in idx]))
            res = self._score_block(can_w[:, -k:], None if base_w is None else base_w[:, -k:],
                                    memo=False, rows=rows)
            if self.predictor is not None:
                res["breach_probability"] = self._predict(can_w, base_w)
            bad = res["invalid"]
            for j, i in enumerate(idx):
                if bad[j]:
                    missing = [m for m, ok in zip(self._metrics, res["observed"][j], strict=True) if not ok]
                    out[i] = ScoringError(
                        f"deployment {windows[i].deployment_id!r}: metric(s) {', '.join(missing)} "
                        f"have no observed value in the last {self.lookback} steps of the canary; "
                        "fix the metric source (scrape/PromQL) — the scorer will not guess"
                    )
                else:
                    out[i] = self._result(res, j)
        return [r for r in out if r is not None]

    def _predict(self, can: np.ndarray, base: np.ndarray | None) -> np.ndarray:
        """Breach probabilities of aligned windows [N, window_steps, M]; a large batch split over
        `workers` threads like `_components_parallel` (each window's features are its own)."""
        assert self.predictor is not None
        predict = self.predictor.predict
        parts = min(self.workers, len(can) // _PARALLEL_MIN)
        if parts <= 1:
            return predict(can, base)
        spans = list(itertools.pairwise(np.linspace(0, len(can), parts + 1).astype(int)))
        return np.concatenate(list(self._pool().map(
            lambda ab: predict(can[ab[0]:ab[1]], None if base is None else base[ab[0]:ab[1]]),
            spans)))

    def score_series(self, arrays: DeploymentArrays) -> np.ndarray:
        """Score of every tick of a deployment in one batched pass; NaN before the first full
        window and where a metric is missing for a whole window (score() would raise there)."""
        return self.score_series_components(arrays)["score"]

    def score_series_components(self, arrays: DeploymentArrays) -> dict[str, np.ndarray]:
        """Per-tick arrays [T]: score, app_score, infra_score, forecast_error, detector_score,
        breach_eta_s, breach_probability (NaN = none). Equal to `score()` on the window ending
        at each tick (its last `window_steps` steps)."""
        w = self.lookback
        n_ticks = len(arrays.timestamps_s)
        keys = ("score", "app_score", "infra_score", "forecast_error", "detector_score",
                "breach_eta_s", "breach_probability")
        out = {k: np.full(n_ticks, np.nan) for k in keys}
        idx = self._index_for(arrays.metrics, arrays.deployment_id)
        can, base, first = self.padded(arrays.canary[:, idx],
                                       None if arrays.baseline is None else arrays.baseline[:, idx])
        if first is None:
            return out
        views_c = np.lib.stride_tricks.sliding_window_view(can, w, axis=0).transpose(0, 2, 1)
        views_b = (None if base is None else
                   np.lib.stride_tricks.sliding_window_view(base, w, axis=0).transpose(0, 2, 1))
        if self.predictor is not None:  # its own, longer windows, ending on the same ticks
            ends = np.arange(first, n_ticks)
            pc, pb = tick_windows(arrays.canary[:, idx],
                                  None if arrays.baseline is None else arrays.baseline[:, idx],
                                  self.predictor.spec.window, ends)
            out["breach_probability"][first:] = self.predictor.predict(pc, pb)
        n_invalid = 0
        row = (None if views_b is not None or self.single is None else
               self.single.index(arrays.deployment_id))
        for lo in range(0, len(views_c), _CHUNK):
            hi = min(lo + _CHUNK, len(views_c))
            res = self._score_block(np.ascontiguousarray(views_c[lo:hi]),
                                    None if views_b is None else np.ascontiguousarray(views_b[lo:hi]),
                                    rows=None if row is None else np.full(hi - lo, row))
            for k in keys:
                if k not in res:
                    continue
                vals = res[k].astype(float)
                vals[res["invalid"]] = np.nan
                out[k][first + lo: first + hi] = vals
            n_invalid += int(res["invalid"].sum())
        out["breach_probability"][~np.isfinite(out["score"])] = np.nan  # score() raises there
        if n_invalid:
            log.warning("deployment %s: %d tick(s) not scored (a metric missing for a whole "
                        "window); their score is NaN", arrays.deployment_id, n_invalid)
        return out

    # ---- variants --------------------------------------------------------------------------
    def with_mix(self, forecast_weight: float) -> CanaryScorer:
        """Copy with another forecast-error vs detector mix (1.0 forecast only, 0.0 detector only);
        calibration is recomputed from the stored healthy calibration components."""
        return self._copy(replace(self.weights, forecast_weight=float(forecast_weight)))

    def with_values_weight(self, values_weight: float) -> CanaryScorer:
        """Copy with another single-group share of the values detector (0 = forecast error /
        residual detector only, 1 = values detector only); recalibrated like `with_mix`."""
        return self._copy(replace(self.weights, values_weight=float(values_weight)))

    def with_weights(self, app: float, infra: float) -> CanaryScorer:
        return self._copy(replace(self.weights, weight_application_metrics=float(app),
                                  weight_infrastructure_metrics=float(infra)))

    def without_predictor(self) -> CanaryScorer:
        """Copy without the breach predictor, same mix and operating point: for a policy whose
        predictive rule is off, which then need not pay for the probabilities."""
        copy = self._copy(self.weights)
        copy.predictor = None
        copy.operating_point = self.operating_point
        return copy

    def _copy(self, weights: ScorerWeights) -> CanaryScorer:
        copy = CanaryScorer(spec=self.spec, network=self.network, scaler=self.scaler,
                            metrics=self._metrics, catalog=self.catalog, detectors=self.detectors,
                            calibration=self.calibration, weights=weights, step_s=self._step_s,
                            gap_scale=self.gap_scale, info=self.info, predictor=self.predictor,
                            single_group=self.single)
        copy.workers = self.workers
        copy._memo = self._memo  # operating_point stays None: it was chosen for this mix only
        return copy

    # ---- core ------------------------------------------------------------------------------
    def _index_for(self, metrics: Sequence[str], who: str) -> np.ndarray:
        key = tuple(metrics)
        idx = self._index_cache.get(key)
        if idx is None:
            pos = {m: i for i, m in enumerate(key)}
            missing = [m for m in self._metrics if m not in pos]
            if missing:
                raise ScoringError(
                    f"{who}: the window lacks metric(s) the model was trained on: "
                    f"{', '.join(missing)} (window has {', '.join(key) or 'none'}); score with "
                    "the same metric catalog or retrain the model on the new metrics"
                )
            extra = [m for m in key if m not in set(self._metrics)]
            if extra:
                log.warning("%s: metric(s) %s not known to the model are ignored", who, ", ".join(extra))
            idx = np.array([pos[m] for m in self._metrics], dtype=np.int64)
            self._index_cache[key] = idx
        return idx

    def _align(self, window: Window, values: np.ndarray, group: str, steps: int) -> np.ndarray:
        """The window's last `steps` rows in the model's metric order, NaN-padded at the front."""
        values = np.asarray(values, dtype=np.float32)
        if values.ndim != 2 or values.shape[1] != len(window.metrics):
            raise ScoringError(
                f"deployment {window.deployment_id!r}: {group} has shape {values.shape}, expected "
                f"[T, {len(window.metrics)}] for metrics {window.metrics}"
            )
        if values.shape[0] < self.min_steps:
            raise ScoringError(
                f"deployment {window.deployment_id!r}: window has {values.shape[0]} steps but the "
                f"scorer needs ≥ {self.min_steps} (history {self.spec.min_history or self.spec.lookback}"
                f" + horizon {self.spec.horizon}); the first score comes once the canary has run "
                "that long"
            )
        key = window.metrics if isinstance(window.metrics, tuple) else tuple(window.metrics)
        idx = self._index_cache.get(key)
        if idx is None:
            idx = self._index_for(window.metrics, f"deployment {window.deployment_id!r}")
        v = values[-steps:, idx]
        if len(v) < steps:  # a canary's first minutes: NaN-pad the front
            v = np.concatenate([np.full((steps - len(v), v.shape[1]), np.nan, v.dtype), v])
        return v

    def _forecast(self, inputs: np.ndarray) -> np.ndarray:
        """Quantile forecasts [N, H, M, Q] of scaled inputs [N, L, M] (NaN = not observed), one
        forward pass without autograd. The network gets a contiguous time-major [L, N, 2M]
        input (the CPU LSTM then needs no transpose copy; outputs are bit-identical)."""
        x = torch.from_numpy(model_input(np.swapaxes(inputs, 0, 1)))
        with torch.inference_mode():  # thread-local: entered in the thread that runs it
            if self._time_major:
                return self.network(x, time_major=True).numpy()
            return self.network(x.transpose(0, 1)).numpy()

    def _components_parallel(self, can: np.ndarray, base: np.ndarray | None,
                             rows: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """`_components` of a large block split over `workers` threads (torch and the large
        numpy operations release the GIL; run torch with one intra-op thread then, see
        `workers`). Every window's features are computed alone, so the split changes nothing."""
        n = len(can)
        parts = min(self.workers, n // _PARALLEL_MIN)
        if parts <= 1:
            return self._components(can, base, rows)
        bounds = np.linspace(0, n, parts + 1).astype(int)
        spans = list(itertools.pairwise(bounds))
        done = list(self._pool().map(
            lambda ab: self._components(can[ab[0]:ab[1]],
                                        None if base is None else base[ab[0]:ab[1]],
                                        None if rows is None else rows[ab[0]:ab[1]]), spans))
        return {k: np.concatenate([d[k] for d in done]) for k in done[0]}

    def _pool(self) -> Any:
        if self._executor is None or self._executor_size != self.workers:
            from concurrent.futures import ThreadPoolExecutor

            self._executor = ThreadPoolExecutor(self.workers, thread_name_prefix="canaryml-score")
            self._executor_size = self.workers
        return self._executor

    def _components(self, can: np.ndarray, base: np.ndarray | None,
                    rows: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """Raw features of [N, W, M] raw-unit windows (canary, baseline or None). `rows`: each
        window's series row in the single-group state (windows without a baseline of a model
        trained without one; None = the pooled fallback row)."""
        L, H = self.spec.lookback, self.spec.horizon
        n = len(can)
        single = base is None and self.single is not None
        if single:
            assert self.single is not None
            rows = np.full(n, len(self.single.keys)) if rows is None else np.asarray(rows)
            zc = self.single.transform(can, rows)
        else:
            zc = self.scaler.transform(can)
        observed = np.isfinite(zc).any(axis=1)  # [N, M]
        if base is not None:
            zb = self.scaler.transform(base)
            inputs = np.concatenate([zc[:, :L], zc[:, H:], zb[:, :L]])
        else:
            if not self._warned_no_baseline and not single:
                log.warning("windows without a baseline group: scoring raw canary residuals "
                            "(no relative-to-baseline correction, no drift term)")
                self._warned_no_baseline = True
            zb = None
            inputs = np.concatenate([zc[:, :L], zc[:, H:]])
        q = self._forecast(inputs)
        q_past_c, q_future_c = q[:n], q[n: 2 * n]

        def residual(z: np.ndarray, qq: np.ndarray) -> np.ndarray:
            actual = z[:, L:]
            sigma = np.maximum((qq[..., self._q_hi] - qq[..., self._q_lo]) / self._sigma_div, 0.05)
            r = np.clip((actual - qq[..., self._q_mid]) / sigma, -_CLIP, _CLIP)
            ok = np.isfinite(r)
            return np.where(ok, r, 0.0).sum(1) / np.maximum(ok.sum(1), 1)

        d = residual(zc, q_past_c)
        if zb is not None:
            d = d - residual(zb, q[2 * n:])
            gap = (zc - zb) / self.gap_scale
            level = np.clip(_masked_mean(gap[:, -H:]), -_CLIP, _CLIP)
            drift = np.clip(level - _masked_mean(gap[:, :H]), -_CLIP, _CLIP)
        else:
            level = np.zeros_like(d)
            drift = np.zeros_like(d)

        def directed(x: np.ndarray) -> np.ndarray:
            return self._up * np.maximum(x, 0) + self._down * np.maximum(-x, 0)

        e_d = directed(d)
        # drift and level of the canary-baseline gap share one weight (both baseline-relative)
        e_drift = np.maximum(directed(drift), directed(level))
        e = e_d + self.weights.drift_weight * e_drift
        comps: dict[str, np.ndarray] = {"e": e, "observed": observed,
                                        "invalid": ~observed.all(axis=1)}
        kinds = (("app", self._is_app), ("infra", ~self._is_app))
        for k, mask in kinds:
            comps[f"fe_{k}"] = np.sqrt((e[:, mask] ** 2).mean(1)) if mask.any() else np.zeros(n)
            comps[f"det_{k}"] = np.zeros(n)
        if self._joint is not None:
            feats = np.concatenate([np.concatenate([e_d[:, m], e_drift[:, m]], 1) for _, m in kinds], 1)
            det = self._joint.decision_function(feats)
            comps["det_app"], comps["det_infra"] = det[:, 0], det[:, 1]
        else:
            for k, mask in kinds:
                dk = self.detectors.get(k)
                if dk is not None and mask.any():
                    comps[f"det_{k}"] = dk.decision_function(
                        np.concatenate([e_d[:, mask], e_drift[:, mask]], axis=1))
        comps["eta"] = self._breach_eta(can, q_future_c, rows if single else None)
        comps["e_d"], comps["e_drift"] = e_d, e_drift
        if single:
            assert self.single is not None and rows is not None
            comps["values"] = self.single.values_score(
                self.single.transform(can[:, -1:], rows, clip=False)[:, 0], rows)
        return comps

    def _joint_forest(self) -> JointForest | None:
        dets = [self.detectors.get(k) for k in KINDS]
        if all(isinstance(d, IsolationForestDetector) for d in dets):
            widths = [2 * int(self._is_app.sum()), 2 * int((~self._is_app).sum())]
            return JointForest(dets, widths)  # type: ignore[arg-type]
        return None

    def _breach_eta(self, can: np.ndarray, q_future: np.ndarray,
                    rows: np.ndarray | None = None) -> np.ndarray:
        """Seconds until the first SLO metric's forecast median crosses its SLO: 0 if the latest
        observed value already breaches; within the horizon from the forecast; beyond it by the
        least-squares trend of the window. NaN = no breach within `max_eta_s`."""
        n = len(can)
        slo_idx = self._slo_idx
        if len(slo_idx) == 0:
            return np.full(n, np.nan)
        H = self.spec.horizon
        sign, slo = self._slo_sign, self._slo[slo_idx]
        if rows is None:
            med = self.scaler.inverse(q_future[..., self._q_mid])[:, :, slo_idx]  # [N, H, K]
        else:  # single-group: each window in its own series' units
            assert self.single is not None
            med = (q_future[..., self._q_mid] * self.single.scale[rows][:, None, :]
                   + self.single.center[rows][:, None, :]).astype(np.float32)[:, :, slo_idx]
        x = can[:, :, slo_idx].astype(np.float64)  # [N, W, K]
        ok = np.isfinite(x)
        mean = _masked_mean(x)
        xf = np.where(ok, x, mean[:, None, :])  # gaps → window mean (neutral for the slope)
        last = xf[:, -1]
        slope = np.einsum("t,ntk->nk", self._slope_w, xf)  # units per step
        step = float(self._step_s)
        cross = sign * (med - slo) > 0  # [N, H, K]
        any_cross = cross.any(1)
        first = np.where(any_cross, (cross.argmax(1) + 1) * step, np.nan)
        toward = sign * slope
        gap = sign * (slo - med[:, -1])
        with np.errstate(divide="ignore", invalid="ignore"):
            trend = np.where((toward > 0) & (gap > 0), H * step + gap / toward * step, np.nan)
        per = np.where(any_cross, first, trend)
        per = np.where(sign * (last - slo) > 0, 0.0, per)
        per = np.where(per <= self.weights.max_eta_s, per, np.inf)
        eta = per.min(axis=1)
        return np.where(np.isfinite(eta), eta, np.nan)

    def _kind_raw(self, fe: np.ndarray, det: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """fe [N,2], det [N,2] raw → normalised forecast, detector, mixed per kind [N,2]."""
        c = self.calibration
        fe_n = fe / c.fe_norm
        det_n = (det - c.det_center) / c.det_scale
        mix = self.weights.forecast_weight
        return fe_n, det_n, mix * fe_n + (1.0 - mix) * det_n

    def _combine_raw(self, kind_raw: np.ndarray) -> np.ndarray:
        w = np.array([self.weights.weight_application_metrics, self.weights.weight_infrastructure_metrics])
        w = w * self._kind_present
        return (kind_raw * w).sum(1) / max(w.sum(), 1e-12)

    def _recalibrate(self) -> None:
        comps = self.calibration.components
        self._kind_present = np.array([self._is_app.any(), (~self._is_app).any()], float)
        w = np.array([self.weights.weight_application_metrics,
                      self.weights.weight_infrastructure_metrics]) * self._kind_present
        w = w / max(w.sum(), 1e-12)  # per kind; per metric: shared by the kind's metrics
        self._kind_w = w, np.where(self._is_app, w[0] / max(self._is_app.sum(), 1),
                                   w[1] / max((~self._is_app).sum(), 1))
        _, _, kind_raw = self._kind_raw(comps[:, :2], comps[:, 2:])
        raw = self._combine_raw(kind_raw)
        self._ecdf = _ecdf_fit(raw)
        self._ecdf_kind = [_ecdf_fit(kind_raw[:, k]) for k in range(2)]
        q, a = self.weights.deployment_quantile, self.weights.deployment_anchor
        g = self.calibration.groups
        self._power = _deployment_power(raw, g, q, a)
        self._power_kind = [_deployment_power(kind_raw[:, k], g, q, a) for k in range(2)]
        self._single_cal: tuple[tuple[np.ndarray, np.ndarray, float], float] | None = None
        if self.single is not None and self.calibration.values is not None:
            # single-group: per-tick calibration (a point-labelled series has no deployments)
            ok = np.isfinite(raw)
            sg = self._single_raw(raw[ok], self.calibration.values[ok])
            ecdf = _ecdf_fit(sg)
            qa = self.weights.single_group_alarm_quantile
            self._single_cal = ecdf, float(np.log(0.5) / np.log(qa))

    def _single_raw(self, raw: np.ndarray, values: np.ndarray) -> np.ndarray:
        vw = self.weights.values_weight or 0.0
        return raw if vw == 0.0 else (1.0 - vw) * raw + vw * values

    def _score_block(self, can: np.ndarray, base: np.ndarray | None, *,
                     memo: bool = True, rows: np.ndarray | None = None) -> dict[str, np.ndarray]:
        if not memo or len(can) < _MEMO_MIN_BLOCK:  # live ticks: nothing to share
            comps = self._components_parallel(can, base, rows)
        else:
            key: tuple[Any, ...] = (self.weights.drift_weight, can.shape, hash(can.tobytes()),
                                    None if base is None else hash(base.tobytes()))
            if rows is not None:
                key = (*key, hash(np.asarray(rows).tobytes()))
            comps = self._memo.get(key)  # type: ignore[assignment]
            if comps is None:
                comps = self._components(can, base, rows)
                self._memo[key] = comps
                while len(self._memo) > 8:
                    self._memo.popitem(last=False)
        fe = np.stack([comps["fe_app"], comps["fe_infra"]], 1)
        det = np.stack([comps["det_app"], comps["det_infra"]], 1)
        fe_n, det_n, kind_raw = self._kind_raw(fe, det)
        raw = self._combine_raw(kind_raw)
        if "values" in comps and self._single_cal is not None:
            (knots, levels, tau), power = self._single_cal
            raw = self._single_raw(raw, comps["values"])
            score = _ecdf_apply(raw, knots, levels, tau) ** power
        else:
            score = _ecdf_apply(raw, *self._ecdf) ** self._power
        w, kind_w = self._kind_w
        contrib = comps["e"] * kind_w
        total = contrib.sum(1, keepdims=True)
        share = np.where(total > 0, contrib / np.maximum(total, 1e-12), 0.0)
        return {
            "score": score, "raw": raw,
            "app_score": _ecdf_apply(kind_raw[:, 0], *self._ecdf_kind[0]) ** self._power_kind[0],
            "infra_score": _ecdf_apply(kind_raw[:, 1], *self._ecdf_kind[1]) ** self._power_kind[1],
            # row sums, not `@`: BLAS would pick a kernel by batch size (last-bit changes)
            "forecast_error": (fe_n * w).sum(1), "detector_score": (det_n * w).sum(1),
            "contributions": share, "breach_eta_s": comps["eta"],
            "invalid": comps["invalid"], "observed": comps["observed"],
        }

    def _result(self, res: dict[str, np.ndarray], j: int) -> ScoreResult:
        eta = float(res["breach_eta_s"][j])
        p = float(res["breach_probability"][j]) if "breach_probability" in res else np.nan
        return ScoreResult(
            score=float(res["score"][j]), app_score=float(res["app_score"][j]),
            infra_score=float(res["infra_score"][j]),
            forecast_error=float(res["forecast_error"][j]),
            detector_score=float(res["detector_score"][j]),
            contributions={m: float(v) for m, v in zip(self._metrics, res["contributions"][j], strict=True)},
            breach_eta_s=eta if np.isfinite(eta) else None,
            breach_probability=p if np.isfinite(p) else None,
        )

    # ---- persistence -----------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write the bundle to one directory atomically (scorer.json, state.npz, network.pt,
        detectors.joblib, predictor.joblib / single_group.joblib when there is one). `path` must be new, empty or an earlier scorer bundle (it is
        replaced as a whole): `OutputDirError` else."""
        import joblib

        path = Path(path)
        with atomic_dir(path, marker="scorer.json",
                        owns=json_marker("scorer.json", "format_version", "spec"),
                        what="scorer_out", kind="scorer bundle") as tmp:
            atomic_write_json(tmp / "scorer.json", {
                "format_version": FORMAT_VERSION, "spec": asdict(self.spec),
                "weights": asdict(self.weights), "catalog": self.catalog.to_mapping(),
                "metrics": list(self._metrics), "step_s": self._step_s, "info": self.info,
                "operating_point": self.operating_point,
            })
            c = self.calibration
            arrays: dict[str, np.ndarray] = dict(
                center=self.scaler.center, scale=self.scaler.scale, gap_scale=self.gap_scale,
                components=c.components, fe_norm=c.fe_norm, det_center=c.det_center,
                det_scale=c.det_scale,
                groups=np.full(len(c.components), -1) if c.groups is None else c.groups)
            if c.values is not None:
                arrays["values"] = c.values
            np.savez(tmp / "state.npz", **arrays)  # type: ignore[arg-type]
            torch.save(self.network.state_dict(), tmp / "network.pt")
            joblib.dump(self.detectors, tmp / "detectors.joblib")
            if self.predictor is not None:
                joblib.dump(self.predictor, tmp / "predictor.joblib")
            if self.single is not None:
                joblib.dump(self.single, tmp / "single_group.joblib")
        return path

    @classmethod
    def load(cls, path: str | Path) -> CanaryScorer:
        import joblib

        path = Path(path)
        meta_path = path / "scorer.json"
        if not meta_path.is_file():
            raise ModelLoadError(f"{path} is not a CanaryScorer directory (no scorer.json); "
                                 "pass a directory written by CanaryScorer.save or a models:/ URI")
        try:
            meta = json.loads(meta_path.read_text())
            if meta.get("format_version") != FORMAT_VERSION:
                raise ModelLoadError(f"{path}: scorer format {meta.get('format_version')} is not "
                                     f"{FORMAT_VERSION}; retrain with this canaryml version")
            spec_d = dict(meta["spec"])
            spec_d["quantiles"] = tuple(spec_d["quantiles"])
            spec = NetworkSpec(**spec_d)
            net = build_network(spec)
            net.load_state_dict(torch.load(path / "network.pt", map_location="cpu", weights_only=True))
            st = np.load(path / "state.npz")
            catalog = Catalog.from_mapping(meta["catalog"], source=str(meta_path))
            return cls(spec=spec, network=net, scaler=Scaler(st["center"], st["scale"]),
                       metrics=tuple(meta["metrics"]), catalog=catalog, detectors=joblib.load(path / "detectors.joblib"),
                       calibration=Calibration(st["components"], st["fe_norm"], st["det_center"],
                                               st["det_scale"],
                                               None if (st["groups"] < 0).all() else st["groups"],
                                               st["values"] if "values" in st.files else None),
                       weights=ScorerWeights(**meta["weights"]), step_s=int(meta["step_s"]),
                       gap_scale=st["gap_scale"], info=meta.get("info", {}),
                       operating_point=meta.get("operating_point"),
                       predictor=(joblib.load(path / "predictor.joblib")
                                  if (path / "predictor.joblib").is_file() else None),
                       single_group=(joblib.load(path / "single_group.joblib")
                                     if (path / "single_group.joblib").is_file() else None))
        except ModelLoadError:
            raise
        except Exception as exc:  # corrupt/partial bundle: one clear error, not a traceback
            raise ModelLoadError(f"{path}: cannot load CanaryScorer ({type(exc).__name__}: {exc}); "
                                 "the directory is incomplete or from another version") from exc


def calibrate(components: dict[str, np.ndarray], detectors: dict[str, ResidualDetector | None]
              ) -> Calibration:
    """Calibration state from the raw components of healthy calibration ticks."""
    fe = np.stack([components["fe_app"], components["fe_infra"]], 1)
    det = np.stack([components["det_app"], components["det_infra"]], 1)
    keep = ~components["invalid"]
    fe, det = fe[keep], det[keep]
    groups = components["group"][keep] if "group" in components else None
    values = components["values"][keep] if "values" in components else None
    if len(fe) == 0:
        raise ScoringError("no valid healthy calibration windows; need healthy deployments "
                           "longer than lookback + horizon")
    fe_norm = np.maximum(np.quantile(fe, 0.99, axis=0), 1e-6)
    center = np.median(det, axis=0)
    thr = np.array([d.threshold_ if d is not None else 1.0 for d in
                    (detectors.get("app"), detectors.get("infra"))])
    scale = np.maximum(thr - center, 1e-6)
    return Calibration(np.concatenate([fe, det], 1), fe_norm, center, scale, groups, values)
