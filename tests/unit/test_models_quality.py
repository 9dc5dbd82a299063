"""Quality floors that can fail: held-back ROC-AUC ≥ 0.9 for both forecasters, and a traffic
surge that hits both groups scores lower than the same surge on the canary only."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from canaryml.data.dataset import CanonicalDataset
from canaryml.models.networks import NetworkSpec
from canaryml.models.scorer import CanaryScorer
from canaryml.models.synthetic import as_arrays, episode, make_corpus
from canaryml.models.train import TrainerSpec, TrainResult, TrainSpec, train_scorer

pytestmark = pytest.mark.slow

NETS = {"lstm": NetworkSpec(kind="lstm", hidden=48),
        "transformer": NetworkSpec(kind="transformer", hidden=32, layers=2, heads=4)}


def _simulated(root: Path) -> CanonicalDataset:
    """The project simulator's corpus, through the public bundle → canonical path."""
    pytest.importorskip("canaryml.simulate")
    from canaryml.bench.scoring import simulated_dataset

    return CanonicalDataset(simulated_dataset(root, n=60, seed=11))


@pytest.fixture(scope="module", params=["synthetic", "simulator"])
def corpus(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> CanonicalDataset:
    torch.set_num_threads(2)
    root = tmp_path_factory.mktemp(request.param)
    if request.param == "simulator":
        return _simulated(root)
    return CanonicalDataset(make_corpus(root / "c", n=60, steps=200, seed=11))


@pytest.fixture(scope="module")
def trained(corpus: CanonicalDataset) -> dict[str, TrainResult]:
    return {name: train_scorer(corpus, TrainSpec(network=net, trainer=TrainerSpec(
        max_epochs=3, progress_bar=False), seed=0)) for name, net in NETS.items()}


@pytest.mark.parametrize("name", list(NETS))
def test_held_back_roc_auc_floor(trained: dict[str, TrainResult], name: str) -> None:
    m = trained[name].metrics
    assert m["test/n_ticks"] > 500
    assert m["test/roc_auc"] >= 0.9, m


@pytest.mark.parametrize("name", list(NETS))
def test_shared_surge_scores_lower_than_canary_only_fault(trained: dict[str, TrainResult],
                                                          name: str) -> None:
    scorer: CanaryScorer = trained[name].scorer
    # mean score over the surge (ticks 80..100); same seeds, so same noise, for every variant
    means: dict[str, list[float]] = {"none": [], "both": [], "canary": []}
    for seed in range(4):
        for groups in means:
            ep = episode(np.random.default_rng(100 + seed), 140,
                         surge_at=None if groups == "none" else 80,
                         surge_groups=groups, surge_size=0.8)
            s = scorer.score_series(as_arrays(ep))
            means[groups].append(float(np.nanmean(s[80:100])))
    m = {k: float(np.mean(v)) for k, v in means.items()}
    assert m["canary"] > 0.75, means
    assert m["both"] < m["canary"] - 0.2, means
    assert m["both"] < m["none"] + 0.2, means  # a shared shock is (nearly) not the canary's fault
