"""A small transparent Scorer: directional z-score of the canary−baseline gap.

Not the product model (that is canaryml.models.scorer.CanaryScorer); it implements the same
Scorer protocol (score, score_batch, score_series) so the controller, replay and their tests
run without a trained network. Score = 1 − exp(−max_m e_m / scale), e_m = the directional
z-score of the last `recent` steps' gap against the window's earlier gap statistics.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np

from canaryml.catalog import Catalog, Direction
from canaryml.control.types import ScoreResult, Window
from canaryml.data.dataset import DeploymentArrays
from canaryml.errors import ScoringError


class GapZScorer:
    def __init__(self, metrics: Sequence[str], catalog: Catalog | None = None,
                 lookback: int = 20, recent: int = 4, scale: float = 4.0) -> None:
        self._metrics = tuple(metrics)
        cat = catalog or Catalog.default()
        dirs = [cat.get(m).direction for m in self._metrics]
        self._up = np.array([d in (Direction.UP, Direction.BOTH) for d in dirs], float)
        self._down = np.array([d in (Direction.DOWN, Direction.BOTH) for d in dirs], float)
        self._lookback, self.recent, self.scale = int(lookback), int(recent), float(scale)

    @property
    def metrics(self) -> tuple[str, ...]:
        return self._metrics

    @property
    def lookback(self) -> int:
        return self._lookback

    def _block(self, can: np.ndarray, base: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """[N, W, M] windows → (score [N], per-metric error [N, M]); NaN score = unscorable."""
        gap = can if base is None else can - base
        ref, last = gap[:, : -self.recent], gap[:, -self.recent:]
        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # an all-NaN window: NaN, said below
            mu = np.nanmean(ref, axis=1)
            sd = np.nanstd(ref, axis=1)
            z = (np.nanmean(last, axis=1) - mu) / np.maximum(sd, 1e-9 + 1e-3 * np.abs(mu))
        e = self._up * np.maximum(np.nan_to_num(z), 0) + self._down * np.maximum(-np.nan_to_num(z), 0)
        score = 1.0 - np.exp(-e.max(axis=1) / self.scale)
        score[~np.isfinite(z).any(axis=1)] = np.nan
        return score, e

    def _index(self, metrics: Sequence[str]) -> np.ndarray:
        pos = {m: i for i, m in enumerate(metrics)}
        missing = [m for m in self._metrics if m not in pos]
        if missing:
            raise ScoringError(f"window lacks metric(s) {missing}; score with the same metrics")
        return np.array([pos[m] for m in self._metrics])

    def score(self, window: Window) -> ScoreResult:
        return self.score_batch([window])[0]

    def score_batch(self, windows: Sequence[Window]) -> list[ScoreResult]:
        out = []
        for w in windows:
            if len(w.canary) < self._lookback:
                raise ScoringError(f"deployment {w.deployment_id!r}: window has {len(w.canary)} "
                                   f"steps, the scorer needs {self._lookback}")
            idx = self._index(w.metrics)
            can = np.asarray(w.canary, float)[-self._lookback:, idx][None]
            base = None if w.baseline is None else np.asarray(w.baseline, float)[-self._lookback:, idx][None]
            s, e = self._block(can, base)
            if not np.isfinite(s[0]):
                raise ScoringError(f"deployment {w.deployment_id!r}: no observed data in window")
            total = e[0].sum()
            contrib = {m: float(v / total) if total > 0 else 0.0 for m, v in zip(self._metrics, e[0], strict=True)}
            out.append(ScoreResult(float(s[0]), float(s[0]), float(s[0]), float(e[0].max()),
                                   float("nan"), contrib))
        return out

    def score_series(self, arrays: DeploymentArrays) -> np.ndarray:
        """Score of the window ending at every row; NaN before the first full window."""
        n, w = len(arrays.timestamps_s), self._lookback
        out = np.full(n, np.nan)
        if n < w:
            return out
        idx = self._index(arrays.metrics)
        can = np.lib.stride_tricks.sliding_window_view(arrays.canary[:, idx].astype(float), w, axis=0)
        base = (None if arrays.baseline is None else np.lib.stride_tricks.sliding_window_view(
            arrays.baseline[:, idx].astype(float), w, axis=0).transpose(0, 2, 1))
        out[w - 1:] = self._block(can.transpose(0, 2, 1), base)[0]
        return out
