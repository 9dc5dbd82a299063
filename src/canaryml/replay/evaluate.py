"""Evaluation protocol (DESIGN §7) and the threshold sweep.

"Rolled back" = the first SHRINK or ROLLBACK of a deployment (a gradual policy's first shrink
already takes traffic away from the canary). Per policy, over deployments labelled
faulty/healthy (`unknown` is left out):
  * detection_rate       = faulty rolled back at or after their fault onset / faulty;
  * false_rollback_rate  = (healthy rolled back + faulty rolled back *before* their fault began)
                           / (healthy + faulty whose fault began after the start): a rollback
                           before the fault began is a false alarm, not a catch;
  * caught_before_impact = faulty rolled back after onset and before `impact_at` (or never
                           impacted) / faulty;
  * healthy_rolled_back_rate, rolled_back_before_onset_rate: the two parts of the false alarms;
  * lead_time_s          = impact_at − decided_at over rolled-back faulty canaries with an
                           impact (positive = before users were hurt), p10/p50/p90;
  * time_to_detect_s     = decided_at − fault_onset, p10/p50/p90.

The sweep re-runs the RollbackPolicy state machine on the recorded score histories (no
rescoring) for every threshold at once: `sweep_first_rollback` is a vectorised transcription of
`RollbackPolicy.decide` (a unit test holds it equal to the scalar policy on random histories).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import pandas as pd

from canaryml.control.policy import PolicyConfig, RollbackStrategy

ROLLED_BACK = ("shrink", "rollback")


@dataclass(frozen=True)
class ScoreHistory:
    """Per-tick decision times and scores of one policy over D deployments, padded with NaN
    times past each deployment's end. A NaN score is a fail-safe tick (no usable score)."""

    deployment_ids: tuple[str, ...]
    times_s: np.ndarray  # float64 [D, T]
    scores: np.ndarray  # float64 [D, T]
    predicted: np.ndarray | None = None  # float64 [D, T] breach probabilities (NaN = none)

    def with_predictive_rule(self, probability: float | None, *, only: bool = False
                             ) -> ScoreHistory:
        """The history as the rollback policy sees it with `predict_probability=probability`:
        a tick whose breach probability exceeds it breaches at every rollback threshold (its
        score becomes 2, over any threshold in [0, 1]); None or no predictions: unchanged.
        `only`: the anomaly score never breaches (scores 0), only the predictive rule acts."""
        scores = np.where(np.isfinite(self.scores), 0.0, self.scores) if only else self.scores
        if probability is None or self.predicted is None:
            return replace(self, scores=scores)
        over = np.isfinite(scores) & (np.nan_to_num(self.predicted, nan=-1.0) > probability)
        return replace(self, scores=np.where(over, 2.0, scores))


_SWEEP_BLOCK = 128


def sweep_first_rollback(history: ScoreHistory, cfg: PolicyConfig,
                         thresholds: Sequence[float] | np.ndarray) -> np.ndarray:
    """Time of the first SHRINK/ROLLBACK per (threshold, deployment) → float64 [K, D], NaN for
    none. Same rules as RollbackPolicy.decide with `cfg.with_threshold(k)`. Many thresholds go
    in blocks of `_SWEEP_BLOCK`: the [D, K] state then stays in cache (2,000 deployments ×
    2,100 thresholds: 22 s in one block, 7 s in blocks, measured)."""
    thresholds = np.asarray(thresholds, float)
    if len(thresholds) > _SWEEP_BLOCK:
        return np.concatenate([sweep_first_rollback(history, cfg, thresholds[i:i + _SWEEP_BLOCK])
                               for i in range(0, len(thresholds), _SWEEP_BLOCK)])
    thr = thresholds[None, :]  # [1, K]
    times, scores = history.times_s, history.scores
    D, T = times.shape
    K = thr.shape[1]
    clean_at = thr + (cfg.clean_at - cfg.rollback_threshold)
    started = times[:, :1]  # [D, 1]
    batch = np.ones((D, K), np.int64)
    breaches = np.zeros((D, K), np.int64)
    clean_since = np.full((D, K), np.nan)
    final = np.zeros((D, K), bool)
    first = np.full((D, K), np.nan)
    gradual = cfg.rollback_strategy is RollbackStrategy.GRADUAL
    for t in range(T):
        now = times[:, t:t + 1]
        valid = np.isfinite(now)
        if not valid.any():
            break
        active = valid & ~final
        s = scores[:, t:t + 1]
        fail = active & ~np.isfinite(s)
        clean_since[fail] = np.nan
        ok = active & np.isfinite(s) & ((now - started) >= cfg.warmup_s)
        over = (s >= thr) if cfg.breach_inclusive else (s > thr)
        breach = ok & over
        breaches = np.where(breach, breaches + 1, np.where(ok, 0, breaches))
        clean_since[breach] = np.nan
        act = breach & (breaches >= cfg.consecutive_breaches)
        first = np.where(act & np.isnan(first), np.broadcast_to(now, (D, K)), first)
        if gradual:
            shrink = act & (batch > 1)
            batch = np.where(shrink, batch - 1, batch)
            final |= act & ~shrink
        else:
            final |= act
        c = ok & ~over
        marginal = c & (s > clean_at)
        clean_since[marginal] = np.nan
        good = c & ~marginal
        nowb = np.broadcast_to(now, (D, K))
        clean_since = np.where(good & np.isnan(clean_since), nowb, clean_since)
        done = good & (nowb - clean_since >= cfg.batch_interval_s)
        promote = done & (batch >= cfg.max_batches)
        final |= promote
        grow = done & ~promote
        batch = np.where(grow, batch + 1, batch)
        clean_since = np.where(grow, nowb, clean_since)
    return first.T


_COUNTS = ("n_faulty", "n_healthy", "rolled_back_before_onset", "false_rollbacks",
           "healthy_runs")


def truth_arrays(deployments: pd.DataFrame | Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The columns `metrics_from_times` reads, as numpy arrays (index them once per resample
    instead of the DataFrame)."""
    out = {"label": np.asarray(deployments["label"]),
           "fault_onset_s": np.asarray(deployments["fault_onset_s"], float),
           "impact_at_s": np.asarray(deployments["impact_at_s"], float)}
    if "start_s" in deployments:
        out["start_s"] = np.asarray(deployments["start_s"], float)
    return out


def metrics_many(decided_at: np.ndarray, deployments: pd.DataFrame | Mapping[str, np.ndarray]
                 ) -> dict[str, np.ndarray]:
    """`metrics_from_times` for many outcomes at once: `decided_at` [K, D] (K thresholds of a
    sweep, K bootstrap draws, …), the truth columns [D] or [K, D]. Every metric is an array [K]:
    rates NaN where their denominator is 0, percentiles NaN where nothing is measured."""
    label = np.asarray(deployments["label"])
    faulty, healthy = label == "faulty", label == "healthy"
    rb = np.isfinite(decided_at)
    impact = np.asarray(deployments["impact_at_s"], float)
    onset = np.asarray(deployments["fault_onset_s"], float)
    start = (np.asarray(deployments["start_s"], float) if "start_s" in deployments
             else np.full(label.shape, -np.inf))
    with np.errstate(invalid="ignore", divide="ignore"):
        early = faulty & rb & np.isfinite(onset) & (decided_at < onset)  # a false alarm
        caught = faulty & rb & ~early
        before = caught & (~np.isfinite(impact) | (decided_at < impact))
        lead = np.where(caught & np.isfinite(impact), impact - decided_at, np.nan)
        ttd = np.where(caught & np.isfinite(onset), decided_at - onset, np.nan)
        # lead time as a share of the fault's own onset → impact time (1 = at onset, 0 = impact)
        span = impact - onset
        lead_share = np.where(caught & np.isfinite(span) & (span > 0), lead / span, np.nan)
        # every canary that ran healthy for a while could be falsely rolled back: the healthy
        # ones and the faulty ones whose fault began after the start
        healthy_runs = healthy | (faulty & np.isfinite(onset) & (onset > start))
        shape = decided_at.shape
        nf = np.broadcast_to(faulty, shape).sum(-1)
        nh = np.broadcast_to(healthy, shape).sum(-1)
        nr = np.broadcast_to(healthy_runs, shape).sum(-1)
        false_rb = ((rb & healthy) | early).sum(-1)
        out: dict[str, np.ndarray] = {
            "n_faulty": nf, "n_healthy": nh,
            "detection_rate": caught.sum(-1) / nf,
            "false_rollback_rate": false_rb / nr,
            "caught_before_impact": before.sum(-1) / nf,
            "healthy_rolled_back_rate": (rb & healthy).sum(-1) / nh,
            "rolled_back_before_onset": early.sum(-1),
            "rolled_back_before_onset_rate": early.sum(-1) / nf,
            "false_rollbacks": false_rb, "healthy_runs": nr,
        }
    for name, v, qs in (("lead_time_s", lead, (10, 50, 90)),
                        ("time_to_detect_s", ttd, (10, 50, 90)), ("lead_share", lead_share, (50,))):
        for q, row in zip(qs, _row_percentiles(v, qs), strict=True):
            out[f"{name}_p{q}"] = row
    return out


def _row_percentiles(v: np.ndarray, qs: Sequence[float]) -> np.ndarray:
    """`np.nanpercentile(v, qs, axis=-1)` (linear interpolation) for [K, D] rows with different
    numbers of NaN, in one sort: numpy's own goes row by row (apply_along_axis). NaN for a row
    without values."""
    x = np.sort(v, axis=-1)  # NaN last
    n = np.isfinite(x).sum(-1)
    out = np.full((len(qs), x.shape[0]), np.nan)
    has = n > 0
    for i, q in enumerate(qs):
        pos = (q / 100.0) * np.maximum(n - 1, 0)
        lo = np.floor(pos).astype(np.int64)
        hi = np.minimum(lo + 1, np.maximum(n - 1, 0))
        a = np.take_along_axis(x, lo[:, None], -1)[:, 0]
        b = np.take_along_axis(x, hi[:, None], -1)[:, 0]
        t = pos - lo
        lerp = np.where(t >= 0.5, b - (b - a) * (1 - t), a + (b - a) * t)  # numpy's own _lerp
        out[i] = np.where(has, lerp, np.nan)
    return out


def metrics_from_times(decided_at: np.ndarray, deployments: pd.DataFrame | Mapping[str, np.ndarray]
                       ) -> dict[str, Any]:
    """DESIGN §7 metrics from the first-rollback time per deployment (NaN = not rolled back).
    `deployments` aligned with `decided_at` (a table or `truth_arrays`): label, fault_onset_s,
    impact_at_s (NaN = none) and start_s (when present; a fault with onset after the start had
    a healthy stretch first). Rates and percentiles are None where undefined."""
    m = metrics_many(np.asarray(decided_at, float)[None, :], deployments)
    return {k: (int(v[0]) if k in _COUNTS else None if not np.isfinite(v[0]) else float(v[0]))
            for k, v in m.items()}


def bootstrap_intervals(decided_at: np.ndarray, deployments: pd.DataFrame, keys: Sequence[str],
                        *, n_boot: int = 1000, seed: int = 0, strata: pd.Series | None = None,
                        level: float = 0.95) -> dict[str, list[float] | None]:
    """Percentile bootstrap intervals of `metrics_from_times` over deployments, resampled with
    replacement within each stratum (default: label), so every replicate keeps the corpus's
    mix of faulty and healthy canaries. All draws are evaluated at once (`metrics_many`)."""
    groups = (deployments["label"] if strata is None else strata).astype(str).to_numpy()
    idx_by = [np.flatnonzero(groups == g) for g in np.unique(groups)]
    rng = np.random.default_rng(seed)
    cols = truth_arrays(deployments.reset_index(drop=True))
    idx = np.stack([np.concatenate([rng.choice(ix, size=len(ix), replace=True) for ix in idx_by])
                    for _ in range(int(n_boot))])  # [B, D]
    m = metrics_many(np.asarray(decided_at, float)[idx], {k: v[idx] for k, v in cols.items()})
    lo, hi = 100 * (1 - level) / 2, 100 * (1 + level) / 2
    out: dict[str, list[float] | None] = {}
    for k in keys:
        v = np.asarray(m[k], float)
        v = v[np.isfinite(v)]
        out[k] = [float(np.percentile(v, lo)), float(np.percentile(v, hi))] if len(v) else None
    return out


def sweep_table(history: ScoreHistory, cfg: PolicyConfig, deployments: pd.DataFrame,
                thresholds: np.ndarray) -> pd.DataFrame:
    """Detection vs false rollback over `thresholds` (deployments aligned with the history)."""
    m = metrics_many(sweep_first_rollback(history, cfg, thresholds), truth_arrays(deployments))
    cols = ("detection_rate", "false_rollback_rate", "caught_before_impact", "lead_time_s_p50",
            "false_rollbacks", "healthy_runs")
    return pd.DataFrame({"threshold": np.asarray(thresholds, float)} | {c: m[c] for c in cols})


def frr_upper_bound(false_rollbacks: np.ndarray, runs: np.ndarray, confidence: float
                    ) -> np.ndarray:
    """One-sided Clopper–Pearson upper bound on the false-rollback rate at `confidence` (k false
    rollbacks among n healthy runs); 0 where there are no runs."""
    from scipy.stats import beta

    k, n = np.asarray(false_rollbacks, float), np.asarray(runs, float)
    with np.errstate(invalid="ignore", divide="ignore"):
        ub = beta.ppf(confidence, k + 1, np.maximum(n - k, 1e-12))
    return np.where(n > 0, np.where(k >= n, 1.0, ub), 0.0)


def operating_point(sweep: pd.DataFrame, max_frr: float, confidence: float | None = None
                    ) -> dict[str, Any] | None:
    """Best threshold with false_rollback_rate ≤ max_frr: most faulty canaries caught before
    impact, then highest detection, then the highest threshold (most conservative). With
    `confidence` (e.g. 0.8) the rate must hold with that confidence: the one-sided
    Clopper–Pearson upper bound of the observed rate ≤ max_frr, so a small calibration corpus
    cannot promise a rate its few healthy runs do not show (the sweep needs the false_rollbacks
    and healthy_runs columns then)."""
    rate = sweep["false_rollback_rate"].fillna(0.0)
    if confidence is not None:
        rate = pd.Series(frr_upper_bound(sweep["false_rollbacks"].to_numpy(),
                                         sweep["healthy_runs"].to_numpy(), confidence),
                         index=sweep.index)
    ok = sweep[rate <= max_frr + 1e-12]
    if ok.empty:
        return None
    best = ok.sort_values(["caught_before_impact", "detection_rate", "threshold"],
                          ascending=[False, False, False]).iloc[0]
    return {str(k): (None if pd.isna(v) else float(v)) for k, v in best.items()}


def predictor_reliability(history: ScoreHistory, deployments: pd.DataFrame, horizon_s: float,
                          bins: int = 10) -> list[dict[str, float]]:
    """Reliability of the breach probabilities of a replayed `history` against what happened:
    a tick is positive when its canary is faulty, the fault has begun and the first SLO breach
    (`impact_at_s`) comes within `horizon_s` (the predictor's own label). [] without predictions.
    `deployments` needs deployment_id, label, fault_onset_s, impact_at_s (labels: only after the
    evaluation replay, or on a calibration corpus)."""
    from canaryml.models.predict import reliability_table

    if history.predicted is None:
        return []
    d = deployments.set_index("deployment_id").reindex(list(history.deployment_ids))
    faulty = (d["label"] == "faulty").to_numpy()[:, None]
    onset = d["fault_onset_s"].to_numpy(float)[:, None]
    impact = d["impact_at_s"].to_numpy(float)[:, None]
    t = history.times_s
    with np.errstate(invalid="ignore"):
        y = faulty & (t >= onset) & (impact <= t + horizon_s)
    ok = np.isfinite(history.predicted) & np.isfinite(t)
    return reliability_table(history.predicted[ok], y[ok], bins)

