"""Predictive rollback: the probability that a canary *causes* an SLO breach within a horizon.

The anomaly score says "the canary looks unlike healthy canaries"; this says "at this pace the
canary will hurt users within `horizon_s`". It reads the deployment's last `window` steps (the
scorer's `window_steps`, longer than its forecaster's lookback) and, per tick, builds features a
reliability engineer would look at:

* for each SLO-bearing metric (catalog `slo`), on both groups, in units of the SLO (1 = at the
  SLO): the level of the last minute, the worst value of the last 3 minutes, the trend over the
  last 3 and 10 minutes, and the level extrapolated `horizon_s` ahead along each trend; and the
  canary − baseline difference of each (a shared slowdown moves both);
* for every metric, the log ratio canary / baseline over the last 1, 3 and 10 minutes, over the
  canary's first 2 minutes (a difference there since the start) and the trend of that ratio
  (precursors: memory before OOM, CPU before queueing, storage before request latency);
* the canary's age within the window (`window` steps, the first observed row = its start).

A gradient-boosted classifier (scikit-learn `HistGradientBoostingClassifier`, NaN-native) is fitted
on the labelled ticks of the training split — positive where a faulty canary's fault has begun and
its first SLO breach (`impact_at`) comes within `horizon_s` — and its output is recalibrated (isotonic regression,
ranking kept) on out-of-fold predictions (deployment folds), so `0.8` means "8 in 10 such ticks
breached"; the final classifier is fitted on every deployment. The out-of-fold reliability table
is kept with the model (`reliability`). It needs
labelled faults with an impact in the training data; without them there is no predictor and the
policy's predictive rule stays off.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from canaryml.catalog import Catalog, Direction

log = logging.getLogger(__name__)

SHORT, MID, LONG, START = 4, 12, 40, 8  # steps: 1, 3 and 10 minutes, the first 2 (at 15 s)


@dataclass(frozen=True)
class PredictorSpec:
    horizon_s: float = 1200.0
    window: int = 240  # steps of history read (the canary's age and first minutes within it)
    tick_every_s: float = 30.0  # training ticks, like the controller's monitoring interval
    max_iter: int = 300
    learning_rate: float = 0.05
    max_leaf_nodes: int = 31
    l2_regularization: float = 1.0
    folds: int = 3  # deployment folds for the out-of-fold recalibration

    def __post_init__(self) -> None:
        from canaryml.errors import ConfigError

        if not self.horizon_s > 0:
            raise ConfigError(f"trainer.predict_horizon_s={self.horizon_s} must be > 0 seconds "
                              "(e.g. 600); 0 or null turns the breach predictor off")
        if self.window < LONG:
            raise ConfigError(f"predictor window={self.window} steps must be ≥ {LONG}")


def _nan_slope(x: np.ndarray) -> np.ndarray:
    """Least-squares slope per step along axis 1 of [N, W, K], ignoring NaN (NaN if < 2 points).
    Like `_nanmedian` and `_nanmax`, called under `np.errstate(all="ignore")`."""
    t = np.arange(x.shape[1], dtype=np.float64)
    ok = np.isfinite(x)
    xz = np.where(ok, x, 0.0)
    okf = ok.astype(np.float64)
    n = ok.sum(1)
    st, stt, sx, stx = t @ okf, (t * t) @ okf, xz.sum(1), t @ xz  # sums over the observed
    var = stt - st * st / n
    return np.where((n >= 2) & (var > 0), (stx - st * sx / n) / var, np.nan)


def _nanmedian(x: np.ndarray) -> np.ndarray:
    """Median along axis 1 ignoring NaN, NaN where nothing is observed."""
    ok = np.isfinite(x)
    n = ok.sum(1)
    mid = np.stack([np.maximum((n - 1) // 2, 0), n // 2], 1)  # the middle one or two
    pair = np.take_along_axis(np.sort(np.where(ok, x, np.inf), axis=1), mid, 1)
    return np.where(n > 0, 0.5 * (pair[:, 0] + pair[:, 1]), np.nan)


def _nanmax(x: np.ndarray) -> np.ndarray:
    ok = np.isfinite(x)
    return np.where(ok.any(1), np.where(ok, x, -np.inf).max(1), np.nan)


class FeatureMap:
    """Windows [N, W, M] (canary, baseline or None) → features [N, F], NaN where undefined."""

    def __init__(self, metrics: Sequence[str], catalog: Catalog, step_s: float, spec: PredictorSpec):
        self.metrics = tuple(metrics)
        self.spec = spec
        self.step_s = float(step_s)
        specs = [catalog.get(m) for m in self.metrics]
        self.slo_idx = np.array([i for i, s in enumerate(specs) if s.slo is not None], np.int64)
        slo = np.array([float(specs[i].slo) for i in self.slo_idx])  # type: ignore[arg-type]
        self.slo = np.where(slo == 0, 1e-12, slo)
        self.down = np.array([specs[i].direction is Direction.DOWN for i in self.slo_idx])

    @property
    def has_slo(self) -> bool:
        return len(self.slo_idx) > 0

    def names(self) -> list[str]:
        slo = [self.metrics[i] for i in self.slo_idx]
        parts = ("level", "max3m", "trend3m", "trend", "ahead3m", "ahead")
        out = [f"{g}:{p}:{m}" for g in ("canary", "baseline", "diff") for p in parts for m in slo]
        out += [f"ratio:{w}:{m}" for w in ("1m", "3m", "10m", "start", "trend")
                for m in self.metrics]
        return [*out, "age_s"]

    def _layout(self, groups: int) -> tuple[np.ndarray, ...]:
        """Per number of groups (1: canary, 2: canary and baseline side by side), the columns
        and row masks that let `__call__` compute every median and every slope in one call
        each. Rows: the last LONG steps, then the canary's first START steps."""
        layouts = self.__dict__.setdefault("_layouts", {})
        if groups not in layouts:
            m, k = len(self.metrics), len(self.slo_idx)
            cols = np.concatenate([self.slo_idx + g * m for g in range(groups)])
            rows = np.arange(LONG + START)[:, None]
            recent = rows < LONG

            def last(n: int, width: int) -> np.ndarray:
                return np.broadcast_to((rows >= LONG - n) & recent, (LONG + START, width))

            g, r = groups * k, m if groups == 2 else 0  # SLO columns, ratio columns
            # medians: SLO level (1 min), ratio over 1, 3 and 10 min, ratio over the first 2
            med = np.concatenate([last(SHORT, g), last(SHORT, r), last(MID, r), last(LONG, r),
                                  np.broadcast_to(~recent, (LONG + START, r))], 1)
            # slopes: SLO units over 3 and 10 min, ratio over 10 min
            slope = np.concatenate([last(MID, g), last(LONG, g), last(LONG, r)], 1)
            layouts[groups] = (cols, np.tile(self.slo, groups), np.tile(self.down, groups),
                               med, slope)
        return layouts[groups]  # type: ignore[no-any-return]

    def __call__(self, can: np.ndarray, base: np.ndarray | None) -> np.ndarray:
        # every median and every slope in one call each, over stacked columns: a live tick is
        # a single window, where numpy's per-call overhead, not the arithmetic, is the cost
        w = self.spec.window
        can = can[:, -w:]
        n, k, m = len(can), len(self.slo_idx), len(self.metrics)
        seen = ~np.isnan(can).all(2)  # [N, W]: rows the canary has data for
        first = np.where(seen.any(1), seen.argmax(1), can.shape[1])
        age_s = (can.shape[1] - first) * self.step_s
        both = can if base is None else np.concatenate([can, base[:, -w:]], 2)
        cols, slo, down, med_mask, slope_mask = self._layout(1 if base is None else 2)
        start = np.clip(first[:, None] + np.arange(START), 0, can.shape[1] - 1)
        x = np.concatenate([both[:, -LONG:], both[np.arange(n)[:, None], start]], 1
                           ).astype(np.float64)  # [N, LONG + START, groups·M]
        with np.errstate(all="ignore"):
            u = x[:, :, cols] / slo
            u = np.where(down, 2.0 - u, u)  # SLO units: 1 = at the SLO, above = worse
            parts = [u, u]
            if base is not None:
                lx = np.log(np.abs(x) + 1e-9)
                ratio = lx[..., :m] - lx[..., m:]  # log canary / baseline
                parts.append(ratio)
            slope = _nan_slope(np.where(slope_mask, np.concatenate(parts, 2), np.nan))
            slope *= 3600.0 / self.step_s
            med = _nanmedian(np.where(med_mask, np.concatenate(
                [u] if base is None else [u, ratio, ratio, ratio, ratio], 2), np.nan))
            g = u.shape[2]  # K (canary) or 2K (canary, baseline)
            level, t_mid, t_all = med[:, :g], slope[:, :g], slope[:, g:2 * g]
            ahead = self.spec.horizon_s / 3600.0
            grp = np.stack([level, _nanmax(u[:, LONG - MID:LONG]), t_mid, t_all,
                            level + t_mid * ahead, level + t_all * ahead], 1)  # [N, 6, g]
            c = grp[..., :k].reshape(n, 6 * k)
            if base is None:
                b = np.full((n, 6 * k), np.nan)
                r = np.full((n, 5 * m), np.nan)
            else:
                b = grp[..., k:].reshape(n, 6 * k)
                r = np.concatenate([med[:, g:], slope[:, 2 * g:]], 1)
            return np.concatenate([c, b, c - b, r, age_s[:, None]], 1)


def _one_thread() -> Any:
    """scikit-learn's OpenMP pool pinned to one thread: a busy 2-core machine (the controller,
    other work) turned a one-row predict into 60 ms of spin-waiting and a fit into minutes."""
    global _POOLS
    if _POOLS is None:  # finding the loaded libraries takes milliseconds: once per process
        from threadpoolctl import ThreadpoolController

        _POOLS = ThreadpoolController()
    return _POOLS.limit(limits=1, user_api="openmp")


_POOLS: Any = None


class FlatForest:
    """A fitted `HistGradientBoostingClassifier`'s trees as flat node arrays, walked for every
    tree at once in numpy. scikit-learn predicts tree by tree through an OpenMP region each:
    ~20 ms for one row of 300 trees on a busy 2-core machine, against ~0.07 ms here (measured).
    Same decisions as `predict_proba` (numeric splits; NaN follows `missing_go_to_left`); tested
    equal. `from_model` returns None for a model it cannot flatten (then predict_proba is used).

    Layout, for few numpy calls per tree level: node n lives at slot 2n; `child[2n + go_left]` is
    the next node's slot (a leaf points to itself, so every tree walks the same number of
    levels); a row is doubled as [x with NaN → +inf | x with NaN → −inf] and each node reads its
    feature from the half that sends a missing value the way the node does."""

    def __init__(self, trees: Sequence[np.ndarray], baseline: float) -> None:
        nodes = np.concatenate(trees)
        sizes = [len(t) for t in trees]
        roots = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.intp)
        offset = np.repeat(roots, sizes)  # child indices are per tree
        leaf = nodes["is_leaf"].astype(bool)
        own = np.arange(len(nodes), dtype=np.intp)
        left = np.where(leaf, own, nodes["left"].astype(np.intp) + offset)
        right = np.where(leaf, own, nodes["right"].astype(np.intp) + offset)
        self.n_features = int(nodes["feature_idx"].max()) + 1
        feature = np.where(leaf, 0, nodes["feature_idx"].astype(np.intp)
                           + self.n_features * nodes["missing_go_to_left"].astype(np.intp))
        self.feature = np.repeat(feature, 2)  # indexed by slot
        self.threshold = np.repeat(np.where(leaf, np.inf, nodes["num_threshold"]), 2)
        self.child = 2 * np.stack([right, left], 1).ravel()  # slot 2n + go_left → slot
        self.value = np.repeat(np.where(leaf, nodes["value"], 0.0), 2).astype(np.float64)
        self.roots = 2 * roots
        self.depth = int(nodes["depth"].max())
        self.baseline = baseline

    @classmethod
    def from_model(cls, model: Any) -> FlatForest | None:
        try:
            trees = [p[0].nodes for p in model._predictors]
            if any(t["is_categorical"].any() for t in trees):
                return None
            return cls(trees, float(np.ravel(model._baseline_prediction)[0]))
        except (AttributeError, KeyError, TypeError, ValueError):  # another scikit-learn layout
            return None

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        """P(class 1) for [N, F] features."""
        x = np.asarray(x, np.float64)
        if x.shape[1] < self.n_features:
            raise ValueError(f"{x.shape[1]} features, the trees read {self.n_features}")
        nan = np.isnan(x)
        both = np.concatenate([np.where(nan, np.inf, x)[:, :self.n_features],
                               np.where(nan, -np.inf, x)[:, :self.n_features]], 1)
        flat = both.ravel()
        row = (np.arange(len(x)) * both.shape[1])[:, None]
        slot = np.broadcast_to(self.roots, (len(x), len(self.roots)))
        for _ in range(self.depth):
            slot = self.child[slot + (flat[self.feature[slot] + row] <= self.threshold[slot])]
        raw = self.baseline + self.value[slot].sum(axis=1)
        return 1.0 / (1.0 + np.exp(-raw))


class RankIsotonic:
    """Isotonic recalibration that keeps the classifier's ranking: (1 − ε)·iso(p) + ε·p. Plain
    isotonic regression maps whole ranges of p to one plateau value, which would leave the
    operating-point sweep only a handful of distinct thresholds; the ε term (≤ 0.001 off the
    calibrated value) orders the ticks inside each plateau."""

    EPS = 1e-3

    def __init__(self) -> None:
        self.iso: Any = None

    def fit(self, p: np.ndarray, y: np.ndarray) -> RankIsotonic:
        from sklearn.isotonic import IsotonicRegression

        self.iso = IsotonicRegression(y_min=0.0, y_max=1.0, out_of_bounds="clip").fit(p, y)
        return self

    def predict(self, p: np.ndarray) -> np.ndarray:
        """`iso.predict` (linear between its thresholds, clipped at the ends) as one np.interp:
        scikit-learn's call costs ~40 µs, a tenth of a live tick's budget."""
        p = np.asarray(p, np.float64)
        iso = np.interp(p, self.iso.X_thresholds_, self.iso.y_thresholds_)
        return (1.0 - self.EPS) * iso + self.EPS * p


@dataclass
class BreachPredictor:
    """P(the canary causes an SLO breach within `spec.horizon_s`) for scorer windows."""

    spec: PredictorSpec
    features: FeatureMap
    model: Any  # fitted HistGradientBoostingClassifier
    calibrator: RankIsotonic  # recalibrates the classifier's probability
    reliability: list[dict[str, float]] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)
    _forest: Any = field(default=None, init=False, repr=False, compare=False)

    @property
    def horizon_s(self) -> float:
        return self.spec.horizon_s

    def predict(self, can: np.ndarray, base: np.ndarray | None) -> np.ndarray:
        """[N, W, M] windows in `features.metrics` order → probabilities [N] (NaN: no data)."""
        x = self.features(can, base)
        if self._forest is None:
            self._forest = FlatForest.from_model(self.model) or False
        if self._forest and len(x) <= 64:  # live ticks; big batches: scikit-learn's loop
            p = self._forest.predict_proba(x)
        else:
            with _one_thread():  # OpenMP hand-offs cost more than a tick's trees (measured)
                p = self.model.predict_proba(x)[:, 1]
        out = np.asarray(self.calibrator.predict(p), np.float64)
        return np.where(x[:, -1] > 0, out, np.nan)  # nothing observed yet: no probability


def tick_windows(canary: np.ndarray, baseline: np.ndarray | None, window: int, ends: np.ndarray
                 ) -> tuple[np.ndarray, np.ndarray | None]:
    """Windows of `window` steps ending at each index of `ends` (NaN-padded at the front)."""
    pad = window - 1

    def cut(x: np.ndarray) -> np.ndarray:
        xp = np.concatenate([np.full((pad, x.shape[1]), np.nan, np.float32), x.astype(np.float32)])
        view = np.lib.stride_tricks.sliding_window_view(xp, (window, x.shape[1]))[:, 0]
        return view[ends]

    return cut(canary), None if baseline is None else cut(baseline)


@dataclass(frozen=True)
class LabelledDeployment:
    canary: np.ndarray  # [T, M] in the predictor's metric order
    baseline: np.ndarray | None
    timestamps_s: np.ndarray
    faulty: bool
    onset_s: float | None
    impact_s: float | None


def _ticks(d: LabelledDeployment, fm: FeatureMap, first: int, every: int
           ) -> tuple[np.ndarray, np.ndarray]:
    ends = np.arange(first, len(d.timestamps_s), every)
    if len(ends) == 0:
        return np.empty((0, len(fm.names()))), np.empty(0, bool)
    c, b = tick_windows(d.canary, d.baseline, fm.spec.window, ends)
    t = d.timestamps_s[ends].astype(np.float64)
    y = np.zeros(len(ends), bool)
    if d.faulty and d.onset_s is not None and d.impact_s is not None:
        y = (t >= d.onset_s) & (d.impact_s <= t + fm.spec.horizon_s)
    return fm(c, b), y


def reliability_table(p: np.ndarray, y: np.ndarray, bins: int = 10) -> list[dict[str, float]]:
    """Predicted vs observed frequency per probability bin (the reliability diagram's points)."""
    edges = np.linspace(0.0, 1.0, bins + 1)
    idx = np.clip(np.digitize(p, edges[1:-1]), 0, bins - 1)
    out = []
    for k in range(bins):
        m = idx == k
        if m.any():
            out.append({"bin_low": float(edges[k]), "bin_high": float(edges[k + 1]),
                        "predicted": float(p[m].mean()), "observed": float(y[m].mean()),
                        "ticks": int(m.sum())})
    return out


def fit_predictor(deployments: Iterable[LabelledDeployment], metrics: Sequence[str],
                  catalog: Catalog, step_s: float, spec: PredictorSpec, *, min_steps: int = 8,
                  seed: int = 0) -> BreachPredictor | None:
    """Fit on labelled deployments (healthy and faulty); None (with a warning naming why) when
    the catalog has no SLO metric or the data holds too few positive ticks to learn from."""
    from sklearn.ensemble import HistGradientBoostingClassifier

    fm = FeatureMap(metrics, catalog, step_s, spec)
    if not fm.has_slo:
        log.warning("breach predictor: the catalog has no metric with an `slo`; the predictive "
                    "rule stays off (add `slo:` to the SLO metrics in conf/metrics)")
        return None
    every = max(1, round(spec.tick_every_s / step_s))
    per_dep = [_ticks(d, fm, min_steps - 1, every) for d in deployments]
    per_dep = [(x, y) for x, y in per_dep if len(y)]
    positives = sum(int(y.sum()) for _, y in per_dep)
    faulty_deps = sum(bool(y.any()) for _, y in per_dep)
    if faulty_deps < 4 or positives < 20:
        log.warning("breach predictor: %d faulty deployment(s) with an SLO breach in the training "
                    "split (%d positive ticks); need ≥ 4 and ≥ 20 — the predictive rule stays "
                    "off. Label incidents (fault_onset, impact_at) to enable it.", faulty_deps,
                    positives)
        return None
    # K folds of whole deployments, stratified (positives spread over the folds): out-of-fold
    # probabilities recalibrate the final model (fitted on every deployment) and give an honest
    # reliability table; every deployment trains the model that ships
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(per_dep))
    ranked = [i for i in order if per_dep[i][1].any()] + [i for i in order
                                                         if not per_dep[i][1].any()]
    k = max(2, min(spec.folds, faulty_deps))
    fold_of = np.empty(len(per_dep), np.int64)
    fold_of[ranked] = np.arange(len(ranked)) % k
    x = np.concatenate([xx for xx, _ in per_dep])
    y = np.concatenate([yy for _, yy in per_dep])
    fold = np.concatenate([np.full(len(yy), fold_of[i]) for i, (_, yy) in enumerate(per_dep)])
    x[:, ~np.isfinite(x).any(0)] = 0.0  # a feature never observed (e.g. no baseline group)

    def classifier() -> Any:
        return HistGradientBoostingClassifier(
            max_iter=spec.max_iter, learning_rate=spec.learning_rate,
            max_leaf_nodes=spec.max_leaf_nodes, l2_regularization=spec.l2_regularization,
            random_state=seed)

    oof = np.empty(len(y))
    with _one_thread():
        for f in range(k):
            test = fold == f
            oof[test] = classifier().fit(x[~test], y[~test]).predict_proba(x[test])[:, 1]
        model = classifier().fit(x, y)
    calibrator = RankIsotonic().fit(oof, y)
    # reliability: each fold's probabilities recalibrated on the other folds (out of sample)
    p_oof = np.empty(len(y))
    for f in range(k):
        test = fold == f
        ok = y[~test].any() and not y[~test].all()
        p_oof[test] = RankIsotonic().fit(oof[~test], y[~test]).predict(oof[test]) if ok \
            else oof[test]
    info = {"horizon_s": spec.horizon_s, "ticks": len(y), "positive_ticks": int(y.sum()),
            "deployments": len(per_dep), "faulty_deployments_with_impact": faulty_deps,
            "folds": k, "brier_out_of_fold": float(np.mean((p_oof - y) ** 2))}
    log.info("breach predictor: %d ticks (%d positive) of %d deployments, %d folds; "
             "out-of-fold Brier %.4f", info["ticks"], info["positive_ticks"], len(per_dep), k,
             info["brier_out_of_fold"])
    return BreachPredictor(spec, fm, model, calibrator, reliability_table(p_oof, y), info)


def _epoch_s(value: Any) -> float | None:
    import pandas as pd

    if value is None or (not isinstance(value, str) and pd.isna(value)):
        return None
    ts = pd.Timestamp(value)
    return (ts.tz_localize("UTC") if ts.tzinfo is None else ts).timestamp()


def fit_on_dataset(dataset: Any, deployment_ids: Sequence[str], metrics: Sequence[str],
                   catalog: Catalog, spec: PredictorSpec, *, min_steps: int = 8, seed: int = 0
                   ) -> BreachPredictor | None:
    """`fit_predictor` on deployments of a CanonicalDataset (labels from its deployments table:
    `label`, `fault_onset`, `impact_at`), columns in the scorer's `metrics` order."""
    deps = dataset.deployments.set_index("deployment_id")

    def labelled() -> Iterable[LabelledDeployment]:
        for a in dataset.iter_arrays([str(i) for i in deployment_ids]):
            idx = [a.metrics.index(m) for m in metrics]
            row = deps.loc[a.deployment_id]
            yield LabelledDeployment(
                a.canary[:, idx], None if a.baseline is None else a.baseline[:, idx],
                a.timestamps_s, str(row["label"]) == "faulty", _epoch_s(row.get("fault_onset")),
                _epoch_s(row.get("impact_at")))

    return fit_predictor(labelled(), metrics, catalog, float(dataset.step_s), spec,
                         min_steps=min_steps, seed=seed)
