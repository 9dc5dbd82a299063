"""Residual detectors: numpy fast paths equal sklearn; higher = worse; fitted threshold_."""

from __future__ import annotations

import numpy as np
import pytest

from canaryml.errors import ConfigError, ScoringError
from canaryml.models.detectors import DetectorSpec, IsolationForestDetector, OneClassSVMDetector


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return rng.normal(size=(1500, 6)), rng.normal(size=(200, 6)) * 2.5


def test_iforest_numpy_path_equals_sklearn(data: tuple[np.ndarray, np.ndarray]) -> None:
    x, y = data
    det = IsolationForestDetector(n_estimators=50).fit(x)
    assert np.allclose(det.decision_function(y), -det.estimator_.score_samples(y), atol=1e-12)
    assert det.decision_function(y[:1]).shape == (1,)


@pytest.mark.parametrize("n_rows", [800, 1500])
def test_ocsvm_exact_and_approximate_paths_equal_sklearn(data: tuple[np.ndarray, np.ndarray],
                                                         n_rows: int) -> None:
    x, y = data
    det = OneClassSVMDetector(max_exact_rows=1000).fit(x[:n_rows])
    assert det.approximate_ == (n_rows > 1000)
    z = det.std_(y)
    ref = -det.estimator_.decision_function(det.map_.transform(z) if det.approximate_ else z)
    assert np.allclose(det.decision_function(y), ref, atol=1e-9)


@pytest.mark.parametrize("kind", ["iforest", "ocsvm"])
def test_higher_is_worse_and_threshold_is_fitted(data: tuple[np.ndarray, np.ndarray], kind: str) -> None:
    x, _ = data
    det = DetectorSpec(kind).build(0).fit(x)
    inlier = det.decision_function(np.zeros((1, 6)))[0]
    outlier = det.decision_function(np.full((1, 6), 6.0))[0]
    assert outlier > det.threshold_ > inlier
    assert 0.005 <= det.predict(x).mean() <= 0.03  # ~1 % of healthy rows above the 0.99 quantile


def test_bad_inputs_raise() -> None:
    det = IsolationForestDetector(n_estimators=10).fit(np.random.default_rng(0).normal(size=(100, 2)))
    with pytest.raises(ScoringError, match="non-finite"):
        det.decision_function(np.array([[np.nan, 0.0]]))
    with pytest.raises(ConfigError, match="unknown"):
        DetectorSpec("lof").build()
    with pytest.raises(ConfigError, match="bad parameter"):
        DetectorSpec("iforest", (("n_trees", 3),)).build()


def test_joint_forest_equals_each_forest(data: tuple[np.ndarray, np.ndarray]) -> None:
    from canaryml.models.detectors import JointForest

    x, y = data
    a = IsolationForestDetector(n_estimators=20).fit(x[:, :4])
    b = IsolationForestDetector(n_estimators=30, random_state=1).fit(x[:, 4:])
    joint = JointForest([a, b], [4, 2]).decision_function(y)
    assert np.allclose(joint[:, 0], a.decision_function(y[:, :4]), atol=1e-12)
    assert np.allclose(joint[:, 1], b.decision_function(y[:, 4:]), atol=1e-12)
