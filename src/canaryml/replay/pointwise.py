"""Point-labelled benchmarks (SMD, NAB): metrics from TSB-AD 1.5's evaluation module.

TSB-AD (`pip install --no-deps TSB-AD==1.5`, the `eval` extra) computes VUS-PR (the headline),
point-wise F1 and event-based F1 at a given prediction, and point-adjusted F1 (a legacy column
only: a random score reaches ~0.85 on SMD). Baselines in the same run: a random score (seeded)
and PCA reconstruction error (fit on the series' train split).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from canaryml.errors import ConfigError

log = logging.getLogger(__name__)


def _tsb() -> Any:
    try:
        from TSB_AD.evaluation.basic_metrics import basic_metricor, generate_curve
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise ConfigError("pointwise replay needs TSB-AD's evaluation module: "
                          "`pip install --no-deps TSB-AD==1.5` (the canaryml[eval] extra)") from exc
    return basic_metricor, generate_curve


@dataclass(frozen=True)
class PointwiseMetrics:
    vus_pr: float
    vus_roc: float
    auc_pr: float
    f1: float  # point-wise F1 at the given threshold
    event_f1: float
    pa_f1: float  # point-adjusted F1 (legacy, not a headline)
    threshold: float

    def to_dict(self) -> dict[str, float]:
        return {"VUS-PR": self.vus_pr, "VUS-ROC": self.vus_roc, "AUC-PR": self.auc_pr,
                "F1": self.f1, "event-F1": self.event_f1, "PA-F1 (legacy)": self.pa_f1,
                "threshold": self.threshold}


def sliding_window(series: np.ndarray) -> int:
    """TSB-AD's period estimate (find_length_rank) used as the VUS window."""
    try:
        from TSB_AD.utils.slidingWindows import find_length_rank
    except ImportError:  # it needs statsmodels, which the eval extra does not pull in
        log.warning("TSB-AD find_length_rank needs statsmodels; using the default window 100")
        return 100
    x = np.asarray(series, float)
    x = x if x.ndim == 1 else x[:, 0]
    return int(find_length_rank(np.nan_to_num(x), rank=1))


def evaluate_scores(scores: np.ndarray, labels: np.ndarray, threshold: float,
                    window: int = 100) -> PointwiseMetrics:
    """Metrics of one series: `scores` [T] (higher = more anomalous, NaN → lowest), `labels`
    [T] in {0,1}, `threshold` = the detector's real alarm threshold (pred = score > threshold)."""
    basic_metricor, generate_curve = _tsb()
    s = np.asarray(scores, float)
    y = np.asarray(labels).astype(int)
    if s.shape != y.shape:
        raise ConfigError(f"scores {s.shape} and labels {y.shape} must have the same length")
    if y.sum() == 0:
        raise ConfigError("labels contain no anomaly; point-wise metrics are undefined")
    s = np.where(np.isfinite(s), s, np.nanmin(s) if np.isfinite(s).any() else 0.0)
    pred = s > threshold
    g = basic_metricor()
    _, _, _, _, _, _, vus_roc, vus_pr = generate_curve(y, s, int(window), "opt", 250)
    return PointwiseMetrics(
        vus_pr=float(vus_pr), vus_roc=float(vus_roc), auc_pr=float(g.metric_PR(y, s)),
        f1=float(g.metric_PointF1(y, s, preds=pred)),
        event_f1=float(g.metric_EventF1PA(y, s, preds=pred)),
        pa_f1=float(g.metric_PointF1PA(y, s, preds=pred)), threshold=float(threshold))


def random_scores(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random(n)


def pca_scores(train: np.ndarray, test: np.ndarray, var: float = 0.95) -> np.ndarray:
    """PCA reconstruction error of `test` [T, M] with components fit on `train` [N, M]
    (standardised on train; NaN imputed with the train mean)."""
    from sklearn.decomposition import PCA

    tr = np.asarray(train, float)
    te = np.asarray(test, float)
    mu = np.nanmean(tr, axis=0)
    mu = np.where(np.isfinite(mu), mu, 0.0)
    sd = np.nanstd(tr, axis=0)
    sd = np.where(np.isfinite(sd) & (sd > 1e-9), sd, 1.0)
    ztr = np.nan_to_num((tr - mu) / sd)
    zte = np.nan_to_num((te - mu) / sd)
    k = min(ztr.shape) if min(ztr.shape) > 1 else 1
    pca = PCA(n_components=var if k > 1 else 1, svd_solver="full").fit(ztr)
    rec = pca.inverse_transform(pca.transform(zte))
    return np.sqrt(((zte - rec) ** 2).mean(axis=1))


def baseline_threshold(train_scores: np.ndarray, q: float = 0.99) -> float:
    """A baseline's real threshold: the q-quantile of its scores on the (normal) train split."""
    return float(np.nanquantile(np.asarray(train_scores, float), q))
