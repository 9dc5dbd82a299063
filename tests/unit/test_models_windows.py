"""Windows / data module: splits by deployment, scaler on train only, NaN masked."""

from __future__ import annotations

import numpy as np
import pytest

from canaryml.errors import DataContractError
from canaryml.models.windows import (
    DeploymentInfo,
    Scaler,
    WindowDataset,
    healthy_mask,
    model_input,
    split_deployments,
)


def _infos(n: int) -> list[DeploymentInfo]:
    return [DeploymentInfo(f"d{i}", "faulty" if i % 3 == 0 else "healthy", 100.0 if i % 3 == 0 else None,
                           float(i)) for i in range(n)]


def test_split_is_by_whole_deployment_and_disjoint() -> None:
    s = split_deployments(_infos(30), 0.2, 0.2, seed=1)
    sets = [set(s.train), set(s.val), set(s.test)]
    assert sum(map(len, sets)) == 30
    assert not (sets[0] & sets[1]) and not (sets[0] & sets[2]) and not (sets[1] & sets[2])
    # stratified: each split holds faulty deployments
    assert all(any(int(d[1:]) % 3 == 0 for d in part) for part in sets)


def test_time_split_puts_latest_deployments_last() -> None:
    s = split_deployments(_infos(10), 0.2, 0.2, seed=0, by="time")
    assert s.test == ("d8", "d9") and s.val == ("d6", "d7")


def test_bad_split_fractions_raise() -> None:
    with pytest.raises(DataContractError, match="val_fraction"):
        split_deployments(_infos(10), 0.6, 0.5, seed=0)


def test_healthy_mask_uses_pre_onset_part_only() -> None:
    ts = np.arange(10) * 15
    assert healthy_mask(ts, "healthy", None).all()
    assert healthy_mask(ts, "faulty", 60.0).tolist() == [True] * 4 + [False] * 6
    assert not healthy_mask(ts, "unknown", None).any()


def test_scaler_ignores_nan_and_is_fitted_only_on_given_blocks() -> None:
    rng = np.random.default_rng(0)
    train = rng.normal(10, 2, (500, 3)).astype(np.float32)
    train[::7, 1] = np.nan
    sc = Scaler.fit([train])
    z = sc.transform(train)
    assert np.nanmedian(z, axis=0) == pytest.approx(np.zeros(3), abs=1e-5)
    other = Scaler.fit([train + 100])
    assert not np.allclose(sc.center, other.center)
    assert np.allclose(sc.inverse(z), train, equal_nan=True, atol=1e-4)


def test_window_dataset_indexes_without_materialising_and_masks_nan() -> None:
    s1 = np.arange(40 * 2, dtype=np.float32).reshape(40, 2)
    s1[12, 0] = np.nan
    s2 = np.ones((7, 2), np.float32)  # shorter than a window: contributes nothing
    ds = WindowDataset([s1, s2], lookback=6, horizon=2, stride=3)
    assert len(ds) == len(range(0, 40 - 8 + 1, 3))
    assert ds.index.shape == (len(ds), 2)  # only (series, start) pairs are stored
    x, y = ds[2]  # start 6: input rows 6..11, target rows 12..13
    assert x.shape == (6, 4) and y.shape == (2, 2)
    assert np.isnan(y[0, 0].item()) and x[:, 2:].all()
    # the gap inside an input is zero-filled only together with a mask that says so
    mi = model_input(s1[10:14])
    assert mi[2, 0] == 0 and mi[2, 2] == 0 and mi[1, 2] == 1


def test_window_dataset_caps_windows() -> None:
    ds = WindowDataset([np.zeros((100, 1), np.float32)], 4, 1, 1, max_windows=10)
    assert len(ds) == 10
