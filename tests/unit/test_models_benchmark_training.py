"""Training on point-labelled benchmarks (SMD layout): the unlabelled `<id>.train` parts are the
normal reference only with `trainer.unknown_is_normal`; canary corpora keep `unknown` out."""

from __future__ import annotations

import pytest

from canaryml.cli import compose
from canaryml.data.dataset import CanonicalDataset
from canaryml.errors import DataContractError
from canaryml.models.networks import NetworkSpec
from canaryml.models.train import TrainerSpec, TrainSpec, train_scorer
from canaryml.tasks import ingest as ingest_task
from tests.unit.test_ingest_smd import fake_smd


@pytest.fixture(scope="module")
def smd_dataset(tmp_path_factory: pytest.TempPathFactory) -> CanonicalDataset:
    root = tmp_path_factory.mktemp("smd")
    # every test part is anomalous from its 3rd minute: only the train parts hold long normal spans
    src = fake_smd(root / "raw", {f"machine-9-{i}": (80, 60, [2, 3, 40]) for i in range(1, 7)})
    assert ingest_task.run(compose("ingest", ["source=smd", f"input={src}",
                                              f"out={root / 'ds'}"])) == 0
    return CanonicalDataset(root / "ds")


def _spec(unknown_is_normal: bool) -> TrainSpec:
    return TrainSpec(network=NetworkSpec(lookback=8, horizon=2, hidden=8),
                     trainer=TrainerSpec(max_epochs=1, progress_bar=False, num_threads=1,
                                         val_fraction=0.4, unknown_is_normal=unknown_is_normal))


def test_unlabelled_train_parts_are_not_normal_by_default(smd_dataset: CanonicalDataset) -> None:
    with pytest.raises(DataContractError, match="healthy"):
        train_scorer(smd_dataset, _spec(unknown_is_normal=False))


def test_unknown_is_normal_trains_and_calibrates_on_the_train_parts(
        smd_dataset: CanonicalDataset) -> None:
    result = train_scorer(smd_dataset, _spec(unknown_is_normal=True))
    assert result.metrics["train/windows"] > 0
    assert any(d.endswith(".train") for d in result.split["train"])
    arr = smd_dataset.arrays("machine-9-1.test")
    scores = result.scorer.score_series(arr)
    assert scores.shape == (60,)
    assert (scores[result.scorer.lookback - 1:] >= 0).all()  # no baseline group: still scored
