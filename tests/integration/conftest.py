"""Fixtures shared by the integration tests."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_scorer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny LSTM + IForest scorer trained on the synthetic corpus, saved as a directory."""
    from canaryml.data.dataset import CanonicalDataset
    from canaryml.models.networks import NetworkSpec
    from canaryml.models.synthetic import make_corpus
    from canaryml.models.train import TrainerSpec, TrainSpec, train_scorer

    root = tmp_path_factory.mktemp("scorer")
    ds = CanonicalDataset(make_corpus(root / "corpus", n=20, steps=90, seed=4))
    spec = TrainSpec(network=NetworkSpec(lookback=16, horizon=3, hidden=16),
                     trainer=TrainerSpec(max_epochs=1, progress_bar=False, num_threads=1))
    return train_scorer(ds, spec).scorer.save(root / "scorer")
