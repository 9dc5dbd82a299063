"""Single-group mode (no baseline group: SMD, NAB): the PCA values detector, per-series
normalisation, end-to-end scoring, the save/load round trip, and the series lookup."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from canaryml.cli import compose
from canaryml.control.types import Window
from canaryml.data.dataset import CanonicalDataset
from canaryml.models.detectors import DetectorSpec, PCADetector
from canaryml.models.networks import NetworkSpec
from canaryml.models.scorer import CanaryScorer, ScorerWeights, SingleGroup
from canaryml.models.train import TrainerSpec, TrainSpec, train_scorer
from canaryml.tasks import ingest as ingest_task

TINY = TrainSpec(network=NetworkSpec(lookback=8, horizon=2, hidden=8),
                 trainer=TrainerSpec(max_epochs=1, progress_bar=False, stride=2, num_threads=1,
                                     val_fraction=0.4, test_fraction=0.0, unknown_is_normal=True,
                                     predict_horizon_s=None))
BREAK = slice(150, 170)  # test rows where metrics 0-5 stop following their factor


def _machine(rng: np.random.Generator, n: int, mix: np.ndarray, broken: bool) -> np.ndarray:
    """38 metrics driven by 3 shared factors (+ noise), float32-exact values."""
    t = np.arange(n)
    f = np.stack([np.sin(t / 7.0 + rng.uniform(0, 6)), np.cos(t / 11.0), rng.normal(0, 1, n)], 1)
    x = 0.5 + 0.1 * (f @ mix) + rng.normal(0, 0.01, (n, 38))
    if broken:  # each metric stays in its usual range, their correlation breaks
        x[BREAK, :6] = 0.5 - (x[BREAK, :6] - 0.5)
    return x.astype(np.float32)


def _smd_dir(root: Path, factor: float = 1.0) -> Path:
    rng = np.random.default_rng(0)
    for sub in ("train", "test", "test_label"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for name, k in (("machine-9-1", 1.0), ("machine-9-2", factor)):
        mix = rng.uniform(0.5, 1.5, (3, 38)) * rng.choice([-1.0, 1.0], (3, 38))
        train = _machine(rng, 400, mix, False)
        test = _machine(rng, 300, mix, name == "machine-9-1")
        for sub, x in (("train", train), ("test", test)):
            np.savetxt(root / sub / f"{name}.txt", x.astype(np.float64) * k, fmt="%.17g",
                       delimiter=",")
        label = np.zeros(300, dtype=int)
        label[BREAK if name == "machine-9-1" else slice(10, 12)] = 1
        np.savetxt(root / "test_label" / f"{name}.txt", label, fmt="%d")
    return root


def _ingest(root: Path, factor: float = 1.0) -> CanonicalDataset:
    src = _smd_dir(root / "raw", factor)
    assert ingest_task.run(compose("ingest", ["source=smd", f"input={src}",
                                              f"out={root / 'ds'}"])) == 0
    return CanonicalDataset(root / "ds")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> CanonicalDataset:
    torch.set_num_threads(1)
    return _ingest(tmp_path_factory.mktemp("smd"))


@pytest.fixture(scope="module")
def scorer(dataset: CanonicalDataset) -> CanaryScorer:
    return train_scorer(dataset, TINY).scorer


# ---- the PCA detector ------------------------------------------------------------------------
def test_pca_detector_flags_a_broken_correlation_no_single_metric_shows() -> None:
    rng = np.random.default_rng(1)
    f = rng.normal(0, 1, (2000, 1))
    x = np.concatenate([f, 2 * f, -f], 1) + rng.normal(0, 0.05, (2000, 3))
    det = DetectorSpec("pca", (("variance", 0.9),)).build().fit(x)
    assert isinstance(det, PCADetector)
    normal, broken = np.array([[1.5, 3.0, -1.5]]), np.array([[1.5, -3.0, -1.5]])
    # per metric both rows are equally ordinary (|z| ≈ 1.5 everywhere) …
    z = np.abs((np.concatenate([normal, broken]) - x.mean(0)) / x.std(0))
    assert np.allclose(z[0], z[1], atol=0.1) and z.max() < 2
    # … jointly only the broken one is off the healthy subspace
    s_normal, s_broken = det.decision_function(normal)[0], det.decision_function(broken)[0]
    assert s_normal < det.threshold_ < s_broken
    assert det.normalised(broken)[0] > 10 * max(det.normalised(normal)[0], 0.1)


def test_pca_detector_equals_sklearn_reconstruction() -> None:
    from sklearn.decomposition import PCA

    rng = np.random.default_rng(2)
    x = rng.normal(0, 1, (500, 6)) @ rng.normal(0, 1, (6, 6))
    det = PCADetector(variance=0.8).fit(x)
    z = (x - x.mean(0)) / x.std(0)
    pca = PCA(n_components=0.8, svd_solver="full").fit(z)
    want = np.sqrt(((z - pca.inverse_transform(pca.transform(z))) ** 2).mean(1))
    np.testing.assert_allclose(det.decision_function(x), want, rtol=1e-6, atol=1e-9)
    one = PCADetector().fit(x[:, :1])  # one metric: no subspace, the score is |z|
    np.testing.assert_allclose(one.decision_function(x[:, :1]), np.abs(z[:, 0]), rtol=1e-6)


# ---- series lookup ---------------------------------------------------------------------------
def test_series_lookup_by_alias_and_whole_id_part() -> None:
    m = 2
    sg = SingleGroup(["machine-1-6", "frontend", "realAWSCloudwatch/ec2_a"], np.zeros((4, m)),
                     np.ones((4, m)), [None] * 4, {"odd-id": "frontend"})
    assert sg.index("machine-1-6.test") == 0
    assert sg.index("machine-1-60.test") == 3  # not a whole part: the pooled fallback
    assert sg.index("2022-08-22/frontend/fault-01") == 1
    assert sg.index("realAWSCloudwatch/ec2_a.test") == 2
    assert sg.index("odd-id") == 1
    assert sg.index("somewhere-else") == 3


# ---- end to end ------------------------------------------------------------------------------
def test_single_group_model_scales_each_series_by_its_own_data(scorer: CanaryScorer) -> None:
    sg = scorer.single
    assert sg is not None and sg.keys == ("machine-9-1", "machine-9-2")
    assert all(isinstance(v, PCADetector) for v in sg.values)
    info = scorer.info["single_group"]
    vw = scorer.weights.values_weight
    assert info["series"] == 2 and vw is not None and 0.0 <= vw <= 1.0
    assert set(info["values_weight_injected_ap"]) == {"0.0", "0.25", "0.5", "0.75", "1.0"}


def test_single_group_scoring_finds_the_broken_correlation(scorer: CanaryScorer,
                                                           dataset: CanonicalDataset) -> None:
    a = dataset.arrays("machine-9-1.test")
    s = scorer.score_series(a)
    ok = np.isfinite(s)
    assert ok[scorer.lookback:].all() and ((s[ok] >= 0) & (s[ok] <= 1)).all()
    inside, outside = s[BREAK], np.concatenate([s[scorer.lookback:140], s[180:]])
    assert np.median(inside) > np.quantile(outside, 0.95)
    assert (s[BREAK] > 0.5).mean() > 0.8 and (outside > 0.5).mean() < 0.1  # per-tick alarm
    # the values detector is what sees it: forecast error alone ranks the break far worse
    fe = scorer.with_values_weight(0.0).score_series(a)
    from sklearn.metrics import average_precision_score

    assert a.anomaly is not None
    y = a.anomaly[ok].astype(int)
    assert average_precision_score(y, s[ok]) > average_precision_score(y, fe[ok]) + 0.2


def test_tick_batch_and_series_agree_in_single_group_mode(scorer: CanaryScorer,
                                                          dataset: CanonicalDataset) -> None:
    a = dataset.arrays("machine-9-1.test")
    series = scorer.score_series_components(a)
    w = scorer.lookback
    ends = [w, 100, 160, 165, 290]
    wins = [Window(a.deployment_id, float(a.timestamps_s[e - 1]), a.timestamps_s[e - w:e],
                   a.canary[e - w:e], None, a.metrics) for e in ends]
    batch = scorer.score_batch(wins)
    for e, b in zip(ends, batch, strict=True):
        assert b.score == pytest.approx(series["score"][e - 1], abs=1e-6)
        assert scorer.score(wins[ends.index(e)]).score == pytest.approx(b.score, abs=1e-6)


def test_single_group_save_load_round_trip(scorer: CanaryScorer, dataset: CanonicalDataset,
                                           tmp_path: Path) -> None:
    a = dataset.arrays("machine-9-1.test")
    scorer.save(tmp_path / "m")
    assert (tmp_path / "m" / "single_group.joblib").is_file()
    back = CanaryScorer.load(tmp_path / "m")
    assert back.single is not None and back.single.keys == scorer.single.keys  # type: ignore[union-attr]
    assert back.weights == scorer.weights
    assert np.array_equal(scorer.score_series(a), back.score_series(a), equal_nan=True)


def test_per_series_normalisation_makes_a_series_scale_irrelevant(
        scorer: CanaryScorer, dataset: CanonicalDataset, tmp_path: Path) -> None:
    """machine-9-2 in units 1024× larger (exact in floating point): with per-series scaling every
    number of machine-9-1 stays the same; one pooled scaler changes them."""
    big = _ingest(tmp_path / "big", factor=1024.0)
    a = dataset.arrays("machine-9-1.test")
    b2, b2_big = dataset.arrays("machine-9-2.test"), big.arrays("machine-9-2.test")
    assert np.array_equal(b2_big.canary, b2.canary * 1024)
    other = train_scorer(big, TINY).scorer
    assert np.array_equal(scorer.score_series(a), other.score_series(big.arrays(a.deployment_id)),
                          equal_nan=True)
    assert np.array_equal(scorer.score_series(b2), other.score_series(b2_big), equal_nan=True)
    pooled = replace(TINY, weights=ScorerWeights(series_normalisation=False))
    p1 = train_scorer(dataset, pooled).scorer.score_series(a)
    p2 = train_scorer(big, pooled).scorer.score_series(big.arrays(a.deployment_id))
    assert not np.allclose(p1, p2, equal_nan=True, atol=1e-3)


def test_injected_anomalies_for_the_weight_choice_work_for_one_metric() -> None:
    """NAB has one metric: the injection that weighs the values detector must handle it."""
    from canaryml.data.dataset import DeploymentArrays
    from canaryml.models.train import _inject

    rng = np.random.default_rng(0)
    for m in (1, 2, 38):
        x = rng.normal(0, 1, (500, m)).astype(np.float32)
        arr = DeploymentArrays("s.train", np.arange(500) * 60, x, None, tuple(f"m{i}" for i in range(m)))
        y, lab = _inject(arr, np.ones(m, np.float32), rng)
        assert y.shape == x.shape and 0.1 <= lab.mean() < 0.3
        assert not np.array_equal(y[lab], x[lab]) and np.array_equal(y[~lab], x[~lab])
