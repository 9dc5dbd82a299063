"""Windows / data module over the canonical dataset (DESIGN §3).

A *series* is one group (canary or baseline) of one deployment restricted to a contiguous
healthy span. Windows are `(lookback + horizon)` slices of a series taken at `stride`; they are
indexed as (series, start) pairs and sliced on access, never materialised all at once.

Missing values (NaN) are never zero-filled silently: the network input carries an explicit
observed-mask channel per metric, and the loss ignores masked targets.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from canaryml.data.dataset import CanonicalDataset, DeploymentArrays
from canaryml.errors import DataContractError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Scaler:
    """Per-metric robust standardisation `(x - center) / scale`, fitted on training data only."""

    center: np.ndarray  # float32 [M]
    scale: np.ndarray  # float32 [M], > 0

    @classmethod
    def fit(cls, blocks: Sequence[np.ndarray]) -> Scaler:
        """Fit on float [T, M] blocks (NaN ignored). Metrics with no data get center 0, scale 1."""
        if not blocks:
            raise DataContractError("no training data to fit the scaler on; the split is empty")
        x = np.concatenate([np.asarray(b, np.float64) for b in blocks], axis=0)
        with np.errstate(all="ignore"):
            import warnings

            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                center = np.nanmedian(x, axis=0)
                q25, q75 = np.nanpercentile(x, [25, 75], axis=0)
                std = np.nanstd(x, axis=0)
        scale = (q75 - q25) / 1.349
        scale = np.where(np.isfinite(scale) & (scale > 0), scale, std)
        floor = 1e-3 * np.maximum(np.abs(np.nan_to_num(center)), 1e-6)
        scale = np.where(np.isfinite(scale) & (scale > floor), scale, np.maximum(floor, 1e-6))
        center = np.where(np.isfinite(center), center, 0.0)
        return cls(center.astype(np.float32), scale.astype(np.float32))

    def transform(self, x: np.ndarray) -> np.ndarray:
        return ((x - self.center) / self.scale).astype(np.float32)

    def inverse(self, z: np.ndarray) -> np.ndarray:
        return (z * self.scale + self.center).astype(np.float32)


def healthy_mask(ts_s: np.ndarray, label: str, fault_onset_s: float | None) -> np.ndarray:
    """Ticks usable as *normal* training data: all of a healthy deployment, pre-onset of a faulty
    one, none of an `unknown` one."""
    if label == "healthy":
        return np.ones(len(ts_s), dtype=bool)
    if label == "faulty" and fault_onset_s is not None:
        return ts_s < fault_onset_s
    return np.zeros(len(ts_s), dtype=bool)


def _ts_s(value: object) -> float | None:
    if value is None:
        return None
    ts = pd.Timestamp(value)  # type: ignore[arg-type]
    if pd.isna(ts):
        return None
    return float(ts.timestamp())


@dataclass(frozen=True)
class DeploymentInfo:
    deployment_id: str
    label: str
    fault_onset_s: float | None
    start_s: float


def deployment_infos(ds: CanonicalDataset) -> list[DeploymentInfo]:
    deps = ds.deployments
    out = []
    for row in deps.itertuples(index=False):
        out.append(DeploymentInfo(
            deployment_id=str(row.deployment_id),
            label=str(row.label),
            fault_onset_s=_ts_s(getattr(row, "fault_onset", None)),
            start_s=float(_ts_s(row.start) or 0.0),
        ))
    return out


@dataclass(frozen=True)
class Split:
    train: tuple[str, ...]
    val: tuple[str, ...]
    test: tuple[str, ...]


def split_deployments(infos: Sequence[DeploymentInfo], val_fraction: float, test_fraction: float,
                      seed: int, by: str = "deployment") -> Split:
    """Split by whole deployments (shuffled with `seed`, stratified by label) or by time
    (`by="time"`: the latest deployments go to val/test). Never by random rows."""
    if by not in ("deployment", "time"):
        raise DataContractError(f"split={by!r} is not supported; use deployment or time")
    if not 0 <= val_fraction < 1 or not 0 <= test_fraction < 1 or val_fraction + test_fraction >= 1:
        raise DataContractError(
            f"val_fraction={val_fraction}, test_fraction={test_fraction}: each in [0,1) and "
            "their sum < 1"
        )
    train: list[str] = []
    val: list[str] = []
    test: list[str] = []
    rng = np.random.default_rng(seed)
    groups: dict[str, list[DeploymentInfo]] = {}
    for info in infos:
        groups.setdefault(info.label if by == "deployment" else "all", []).append(info)
    for members in groups.values():
        if by == "time":
            members = sorted(members, key=lambda i: i.start_s)
        else:
            members = [members[i] for i in rng.permutation(len(members))]
        n = len(members)
        n_test = round(n * test_fraction)
        n_val = round(n * val_fraction)
        if n >= 3:
            n_val = max(n_val, 1 if val_fraction > 0 else 0)
        ids = [m.deployment_id for m in members]
        train += ids[: n - n_val - n_test]
        val += ids[n - n_val - n_test: n - n_test]
        test += ids[n - n_test:]
    return Split(tuple(train), tuple(val), tuple(test))


def healthy_segments(arr: DeploymentArrays, info: DeploymentInfo) -> list[tuple[int, int]]:
    """Contiguous [lo, hi) index ranges of healthy ticks."""
    mask = healthy_mask(arr.timestamps_s, info.label, info.fault_onset_s)
    if not mask.any():
        return []
    edges = np.flatnonzero(np.diff(np.concatenate([[0], mask.astype(np.int8), [0]])))
    return [(int(a), int(b)) for a, b in zip(edges[::2], edges[1::2], strict=True)]


def model_input(z: np.ndarray) -> np.ndarray:
    """Network input from scaled values [..., T, M]: NaN → 0 plus an observed mask → [..., T, 2M]."""
    obs = np.isfinite(z)
    return np.concatenate([np.where(obs, z, 0.0), obs], axis=-1).astype(np.float32)


class WindowDataset(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """(input [L, 2M], target [H, M] with NaN for gaps) windows over scaled series.

    Holds the series and an int index of (series, start); each item is sliced on access.
    """

    def __init__(self, series: Sequence[np.ndarray], lookback: int, horizon: int, stride: int = 1,
                 max_windows: int | None = None, seed: int = 0, min_history: int = 0,
                 partial_share: float = 0.3):
        self.series = [np.ascontiguousarray(s, dtype=np.float32) for s in series]
        self.lookback, self.horizon = lookback, horizon
        w = lookback + horizon
        idx = [(i, s) for i, x in enumerate(self.series) for s in range(0, len(x) - w + 1, stride)]
        index = np.array(idx, dtype=np.int64).reshape(-1, 2)
        # drop windows whose target is entirely missing: nothing to learn from them
        if len(index):
            keep = np.array([np.isfinite(self.series[i][s + lookback: s + w]).any()
                             for i, s in index])
            index = index[keep]
        if max_windows is not None and len(index) > max_windows:
            rng = np.random.default_rng(seed)
            index = index[np.sort(rng.choice(len(index), max_windows, replace=False))]
        self.index = index
        # a share of the windows sees only the last `min_history`..`lookback - 1` steps (the rest
        # NaN, as at a canary's first minutes): drawn once, so an epoch is reproducible
        self.cut = np.zeros(len(index), np.int64)
        if 0 < min_history < lookback and len(index):
            rng = np.random.default_rng(seed + 1)
            partial = rng.random(len(index)) < partial_share
            self.cut[partial] = rng.integers(1, lookback - min_history + 1, int(partial.sum()))

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        i, s = self.index[k]
        x = self.series[i][s: s + self.lookback]
        if self.cut[k]:
            x = x.copy()
            x[: self.cut[k]] = np.nan
        y = self.series[i][s + self.lookback: s + self.lookback + self.horizon]
        return torch.from_numpy(model_input(x)), torch.from_numpy(y.copy())
