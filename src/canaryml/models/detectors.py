"""Residual detectors: scikit-learn estimators over residual features, higher = more anomalous.

The forest and SVM detectors are fitted with scikit-learn and then *compiled* into plain numpy
arrays so a single decision tick costs microseconds rather than sklearn's per-call overhead;
tests check that the numpy path equals sklearn's own `score_samples` / `decision_function`. The
PCA detector (`kind: pca`; also the single-group values detector on the current metric values)
keeps its components as arrays: scoring is two matrix products.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
from sklearn.ensemble import IsolationForest
from sklearn.kernel_approximation import Nystroem
from sklearn.linear_model import SGDOneClassSVM
from sklearn.svm import OneClassSVM

from canaryml.errors import ConfigError, ScoringError

log = logging.getLogger(__name__)


def _avg_path_length(n: np.ndarray) -> np.ndarray:
    """Average path length of an unsuccessful BST search (Liu et al.), as in sklearn."""
    n = np.asarray(n, dtype=np.float64)
    out = np.zeros_like(n)
    out[n == 2] = 1.0
    big = n > 2
    out[big] = 2.0 * (np.log(n[big] - 1.0) + np.euler_gamma) - 2.0 * (n[big] - 1.0) / n[big]
    return out


class _Standardize:
    def __init__(self) -> None:
        self.mean_ = np.zeros(0)
        self.scale_ = np.ones(0)

    def fit(self, x: np.ndarray) -> _Standardize:
        self.mean_ = x.mean(0)
        s = x.std(0)
        self.scale_ = np.where(s > 1e-9, s, 1.0)
        return self

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return (x - self.mean_) / self.scale_


class ResidualDetector:
    """Base: `fit(X)` on healthy residual features; `decision_function(X)` higher = worse;
    `threshold_` = `contamination_quantile` of healthy training scores."""

    contamination_quantile: float
    max_fit_rows: int
    random_state: int
    threshold_: float

    def _check(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64)
        if x.ndim != 2 or not np.isfinite(x).all():
            raise ScoringError(
                f"detector input must be a finite 2-D array of residual features, got shape "
                f"{x.shape} with {int((~np.isfinite(x)).sum())} non-finite values"
            )
        return x

    def _subsample(self, x: np.ndarray) -> np.ndarray:
        if len(x) > self.max_fit_rows:
            rng = np.random.default_rng(self.random_state)
            x = x[rng.choice(len(x), self.max_fit_rows, replace=False)]
        return x

    def _finish_fit(self, x: np.ndarray) -> None:
        self.threshold_ = float(np.quantile(self.decision_function(x), self.contamination_quantile))

    def fit(self, x: np.ndarray) -> ResidualDetector:
        raise NotImplementedError

    def decision_function(self, x: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def predict(self, x: np.ndarray) -> np.ndarray:
        """1 = anomalous (score above `threshold_`), 0 = normal."""
        return (self.decision_function(x) > self.threshold_).astype(np.int8)


class IsolationForestDetector(ResidualDetector):
    def __init__(self, n_estimators: int = 100, max_samples: int = 256,
                 contamination_quantile: float = 0.99, max_fit_rows: int = 20000,
                 random_state: int = 0):
        self.n_estimators = n_estimators
        self.max_samples = max_samples
        self.contamination_quantile = contamination_quantile
        self.max_fit_rows = max_fit_rows
        self.random_state = random_state

    def fit(self, x: np.ndarray) -> IsolationForestDetector:
        x = self._subsample(self._check(x))
        self.estimator_ = IsolationForest(n_estimators=self.n_estimators,
                                          max_samples=min(self.max_samples, len(x)),
                                          random_state=self.random_state).fit(x)
        self._compile()
        self._finish_fit(x)
        return self

    def _compile(self) -> None:
        """Pack every tree into flat arrays: feature (-1 = leaf), threshold, children, leaf depth."""
        feats, thrs, lefts, rights, values, roots = [], [], [], [], [], []
        offset = 0
        for tree, fmap in zip(self.estimator_.estimators_, self.estimator_.estimators_features_,
                              strict=True):
            t = tree.tree_
            n = t.node_count
            depth = np.zeros(n)
            for i in range(n):  # parents precede children in sklearn's node order
                for c in (t.children_left[i], t.children_right[i]):
                    if c >= 0:
                        depth[c] = depth[i] + 1
            leaf = t.children_left < 0
            f = np.where(leaf, -1, np.asarray(fmap)[np.maximum(t.feature, 0)])
            feats.append(f)
            thrs.append(t.threshold)
            lefts.append(np.where(leaf, np.arange(n), t.children_left) + offset)
            rights.append(np.where(leaf, np.arange(n), t.children_right) + offset)
            values.append(np.where(leaf, depth + _avg_path_length(t.n_node_samples), 0.0))
            roots.append(offset)
            offset += n
        self.feature_ = np.concatenate(feats).astype(np.int64)
        self.split_ = np.concatenate(thrs)
        self.left_ = np.concatenate(lefts).astype(np.int64)
        self.right_ = np.concatenate(rights).astype(np.int64)
        self.leaf_value_ = np.concatenate(values)
        self.roots_ = np.asarray(roots, dtype=np.int64)
        self.max_depth_ = int(max(t.tree_.max_depth for t in self.estimator_.estimators_))
        self.norm_ = float(_avg_path_length(np.array([self.estimator_.max_samples_]))[0])

    def decision_function(self, x: np.ndarray) -> np.ndarray:
        """Anomaly score 2^(-E[h(x)]/c(ψ)) in (0, 1] (equals `-IsolationForest.score_samples`)."""
        x = self._check(x)
        n = len(x)
        node = np.broadcast_to(self.roots_, (n, len(self.roots_))).copy()
        rows = np.arange(n)[:, None]
        for _ in range(self.max_depth_):
            f = self.feature_[node]
            go_left = x[rows, np.maximum(f, 0)] <= self.split_[node]
            node = np.where(go_left, self.left_[node], self.right_[node])
        return np.power(2.0, -self.leaf_value_[node].mean(1) / self.norm_)


class OneClassSVMDetector(ResidualDetector):
    """RBF one-class SVM; above `max_exact_rows` rows a Nystroem map + SGD linear one-class SVM."""

    def __init__(self, nu: float = 0.05, gamma: float | str = "scale", max_exact_rows: int = 3000,
                 n_components: int = 128, contamination_quantile: float = 0.99,
                 max_fit_rows: int = 20000, random_state: int = 0):
        self.nu = nu
        self.gamma = gamma
        self.max_exact_rows = max_exact_rows
        self.n_components = n_components
        self.contamination_quantile = contamination_quantile
        self.max_fit_rows = max_fit_rows
        self.random_state = random_state

    def fit(self, x: np.ndarray) -> OneClassSVMDetector:
        x = self._subsample(self._check(x))
        self.std_ = _Standardize().fit(x)
        z = self.std_(x)
        gamma = 1.0 / (z.shape[1] * max(z.var(), 1e-12)) if self.gamma == "scale" else float(self.gamma)
        self.gamma_ = float(gamma)
        self.approximate_ = len(z) > self.max_exact_rows
        if self.approximate_:
            self.map_ = Nystroem(gamma=self.gamma_, n_components=min(self.n_components, len(z)),
                                 random_state=self.random_state).fit(z)
            svm = SGDOneClassSVM(nu=self.nu, random_state=self.random_state).fit(self.map_.transform(z))
            self.estimator_: Any = svm
            self.components_ = self.map_.components_
            self.normalization_ = self.map_.normalization_
            self.coef_ = svm.coef_.ravel()
            self.offset_ = float(svm.offset_[0])
        else:
            svm = OneClassSVM(nu=self.nu, gamma=self.gamma_).fit(z)
            self.estimator_ = svm
            self.components_ = svm.support_vectors_
            self.coef_ = svm.dual_coef_.ravel()
            self.offset_ = float(-svm.intercept_[0])
        self._finish_fit(x)
        return self

    def decision_function(self, x: np.ndarray) -> np.ndarray:
        """Negated SVM decision value (higher = further outside the healthy region)."""
        z = self.std_(self._check(x))
        d2 = ((z[:, None, :] - self.components_[None, :, :]) ** 2).sum(-1)
        k = np.exp(-self.gamma_ * d2)
        if self.approximate_:
            k = k @ self.normalization_.T
        return -(k @ self.coef_ - self.offset_)


class PCADetector(ResidualDetector):
    """PCA reconstruction error: features standardised on the fit rows (mean/std), principal
    components keeping `variance` of their variance; score = RMS of the standardised
    reconstruction residual (higher = further off the healthy correlation structure). A value
    that each metric alone finds ordinary but that breaks how the metrics move together
    (e.g. CPU up while requests stay flat) scores high. `center_` = median healthy score, so
    `(score − center_) / (threshold_ − center_)` puts the healthy median at 0, `threshold_` at 1.
    `clip` (None = off, the default) bounds the standardised inputs; on SMD clipping at 50 σ
    cost VUS-PR (its anomalies are often further out than that)."""

    def __init__(self, variance: float = 0.95, clip: float | None = None,
                 contamination_quantile: float = 0.99, max_fit_rows: int = 20000,
                 random_state: int = 0):
        self.variance = variance
        self.clip = clip
        self.contamination_quantile = contamination_quantile
        self.max_fit_rows = max_fit_rows
        self.random_state = random_state

    def fit(self, x: np.ndarray) -> PCADetector:
        from sklearn.decomposition import PCA

        if not 0.0 < self.variance <= 1.0:
            raise ConfigError(f"detector.variance={self.variance} must be in (0, 1]")
        x = self._subsample(self._check(x))
        self.std_ = _Standardize().fit(x)
        z = self._z(x)
        k = min(z.shape)
        if k <= 1 or self.variance >= 1.0:
            n = max(min(k, z.shape[1]) - (0 if self.variance >= 1.0 else 1), 0)
        else:
            n = self.variance
        if n == 0:  # one feature: no subspace to project on; the score is |z| itself
            self.components_ = np.zeros((0, z.shape[1]))
            self.mean_ = np.zeros(z.shape[1])
        else:
            pca = PCA(n_components=n, svd_solver="full", random_state=self.random_state).fit(z)
            self.components_ = pca.components_
            self.mean_ = pca.mean_
        self.center_ = float(np.median(self.decision_function(x)))
        self._finish_fit(x)
        return self

    def decision_function(self, x: np.ndarray) -> np.ndarray:
        """RMS of the standardised reconstruction residual of each row."""
        z = self._z(self._check(x)) - self.mean_
        rec = (z @ self.components_.T) @ self.components_
        return np.sqrt(((z - rec) ** 2).mean(1))

    def _z(self, x: np.ndarray) -> np.ndarray:
        z = self.std_(x)
        return z if self.clip is None else np.clip(z, -self.clip, self.clip)

    def normalised(self, x: np.ndarray) -> np.ndarray:
        """Score with the healthy median at 0 and `threshold_` at 1."""
        return (self.decision_function(x) - self.center_) / max(self.threshold_ - self.center_, 1e-9)


class JointForest:
    """Several compiled IsolationForestDetectors, each on its own column block, evaluated in one
    vectorised traversal (one tick costs one numpy pass instead of one per forest). Node n lives
    at slot 2n and `child[2n + go_left]` is the next node's slot (leaves point to themselves):
    one gather, one compare and one step per tree level."""

    def __init__(self, forests: list[IsolationForestDetector], widths: list[int]):
        offs = np.concatenate([[0], np.cumsum(widths)[:-1]]).astype(np.int64)
        node_off = np.concatenate([[0], np.cumsum([len(f.feature_) for f in forests])[:-1]])
        feature = np.concatenate([np.where(f.feature_ >= 0, f.feature_ + o, 0)
                                  for f, o in zip(forests, offs, strict=True)])
        left = np.concatenate([f.left_ + n for f, n in zip(forests, node_off, strict=True)])
        right = np.concatenate([f.right_ + n for f, n in zip(forests, node_off, strict=True)])
        self.feature_ = np.repeat(feature, 2)  # by slot
        self.split_ = np.repeat(np.concatenate([f.split_ for f in forests]), 2)
        self.child_ = 2 * np.stack([right, left], 1).ravel()
        self.leaf_value_ = np.repeat(np.concatenate([f.leaf_value_ for f in forests]), 2)
        self.roots_ = 2 * np.concatenate([f.roots_ + n
                                          for f, n in zip(forests, node_off, strict=True)])
        self.bounds_ = np.cumsum([0] + [len(f.roots_) for f in forests])
        self.norm_ = np.array([f.norm_ for f in forests])
        self.max_depth_ = max(f.max_depth_ for f in forests)

    def decision_function(self, x: np.ndarray) -> np.ndarray:
        """[N, sum(widths)] → [N, n_forests] scores, equal to each forest's own."""
        n = len(x)
        flat = np.ascontiguousarray(x, np.float64).ravel()
        row = (np.arange(n) * x.shape[1])[:, None]
        slot = np.broadcast_to(self.roots_, (n, len(self.roots_)))
        for _ in range(self.max_depth_):
            slot = self.child_[slot + (flat[self.feature_[slot] + row] <= self.split_[slot])]
        depth = self.leaf_value_[slot]
        out = np.empty((n, len(self.norm_)))
        for k in range(len(self.norm_)):
            out[:, k] = np.power(2.0, -depth[:, self.bounds_[k]: self.bounds_[k + 1]].mean(1) / self.norm_[k])
        return out


@dataclass(frozen=True)
class DetectorSpec:
    kind: str = "iforest"
    params: tuple[tuple[str, Any], ...] = ()

    def build(self, random_state: int = 0) -> ResidualDetector:
        params = dict(self.params)
        try:
            if self.kind == "iforest":
                return IsolationForestDetector(random_state=random_state, **params)
            if self.kind == "ocsvm":
                return OneClassSVMDetector(random_state=random_state, **params)
            if self.kind == "pca":
                return PCADetector(random_state=random_state, **params)
        except TypeError as exc:
            raise ConfigError(f"detector={self.kind}: bad parameter ({exc}); see conf/detector/") from exc
        raise ConfigError(f"detector.kind={self.kind!r} is unknown; use iforest, ocsvm or pca")
