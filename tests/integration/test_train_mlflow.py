"""`canaryml train` against a real MLflow SQLite store: log, register, load back, same scores."""

from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from canaryml import tracking
from canaryml.cli import compose
from canaryml.data.dataset import CanonicalDataset
from canaryml.errors import DataContractError, ModelLoadError
from canaryml.models.scorer import CanaryScorer
from canaryml.models.synthetic import make_corpus
from canaryml.tasks import train as train_task

TINY = ["forecaster.lookback=16", "forecaster.horizon=3", "forecaster.hidden=16",
        "trainer.max_epochs=1", "trainer.progress_bar=false", "trainer.stride=3",
        "trainer.num_threads=1"]


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    return make_corpus(tmp_path / "corpus", n=20, steps=90, seed=4)


def test_train_registers_challenger_and_round_trips(mlflow_uri: str, corpus: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    cfg = compose("train", [f"dataset={corpus}", *TINY])
    assert train_task.run(cfg) == 0
    assert "@challenger" in capsys.readouterr().out

    client = MlflowClient(mlflow_uri)
    mv = tracking.get_alias_version("canary-scorer", "challenger")
    assert mv is not None and str(mv.version) == "1"
    assert mv.run_id is not None
    run_id: str = mv.run_id
    run = client.get_run(run_id)
    ds = CanonicalDataset(corpus)
    assert run.data.tags["dataset_hash"] == ds.content_hash
    assert run.data.tags["git_commit"]
    assert run.data.params["forecaster.kind"] == "lstm"
    assert "test/roc_auc" in run.data.metrics and "val/loss" in run.data.metrics
    # curves from Lightning's MLFlowLogger: one val/loss point per epoch, not repeated after
    epochs = int(run.data.metrics["train/epochs"])
    assert len(client.get_metric_history(run_id, "val/loss")) == epochs
    assert len(client.get_metric_history(run_id, "train/loss")) == epochs
    arts = {a.path for a in client.list_artifacts(run_id)}
    assert {"config.yaml", "plots", "split.json"} <= arts
    assert [a.path for a in client.list_artifacts(run_id, "plots")] == ["plots/loss_curves.png"]

    # pyfunc has a signature and an input example; the pyfunc and the native loader agree
    info = mlflow.models.get_model_info("models:/canary-scorer@challenger")
    assert info.signature is not None and info.saved_input_example_info is not None
    scorer = tracking.load_scorer("models:/canary-scorer@challenger")
    same = tracking.load_scorer("models:/canary-scorer/1")
    arr = ds.arrays(str(ds.deployments["deployment_id"].iloc[0]))
    s1, s2 = scorer.score_series(arr), same.score_series(arr)
    assert np.array_equal(s1, s2, equal_nan=True)
    pyf = mlflow.pyfunc.load_model("models:/canary-scorer@challenger")
    from canaryml.control.types import Window
    from canaryml.models.pyfunc import window_to_frame

    w = scorer.lookback
    win = Window(arr.deployment_id, 0.0, arr.timestamps_s[:w], arr.canary[:w], arr.baseline[:w],  # type: ignore[index]
                 arr.metrics)
    out = pyf.predict(window_to_frame(win))
    assert out["score"].iloc[0] == pytest.approx(s1[w - 1], abs=1e-6)

    # identical to the scorer before the round trip (retrain with the same seed is not needed:
    # the run's own bundle, saved locally, must score the same)
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri="models:/canary-scorer@challenger"))
    assert np.array_equal(CanaryScorer.load(local / "artifacts" / "scorer").score_series(arr), s1,
                          equal_nan=True)
    assert np.array_equal(tracking.load_scorer(str(local)).score_series(arr), s1, equal_nan=True)

    # continuous learning: fine-tune the champion, new version becomes challenger
    tracking.set_alias("canary-scorer", "champion", "1")
    cfg2 = compose("train", [f"dataset={corpus}", *TINY,
                             "trainer.init_from=models:/canary-scorer@champion",
                             "trainer.since=2026-01-01T00:00:00Z"])
    assert train_task.run(cfg2) == 0
    assert str(tracking.get_alias_version("canary-scorer", "challenger").version) == "2"  # type: ignore[union-attr]
    assert str(tracking.get_alias_version("canary-scorer", "champion").version) == "1"  # type: ignore[union-attr]


def test_scorer_round_trip_through_log_scorer_is_identical(mlflow_uri: str, corpus: Path) -> None:
    from canaryml.models.networks import NetworkSpec
    from canaryml.models.train import TrainerSpec, TrainSpec, train_scorer

    ds = CanonicalDataset(corpus)
    before = train_scorer(ds, TrainSpec(network=NetworkSpec(lookback=16, horizon=3, hidden=16),
                                        trainer=TrainerSpec(max_epochs=1, progress_bar=False))).scorer
    with tracking.start_run({"test": True}, experiment="t"):
        mv = tracking.log_scorer(before, alias="challenger")
    after = tracking.load_scorer("models:/canary-scorer@challenger")
    for dep in ds.deployments["deployment_id"].astype(str)[:3]:
        arr = ds.arrays(dep)
        assert np.array_equal(before.score_series(arr), after.score_series(arr), equal_nan=True)
    assert mv.aliases == ["challenger"] or "challenger" in mv.aliases


def test_fit_logs_curves_live_into_the_active_run(mlflow_uri: str, corpus: Path) -> None:
    import pytorch_lightning as pl

    from canaryml.models.networks import NetworkSpec
    from canaryml.models.train import TrainerSpec, TrainSpec, train_scorer

    class SeenDuringFit(pl.Callback):
        """Reads the run back from the store while the fit is still going."""

        def __init__(self, run_id: str) -> None:
            self.run_id = run_id
            self.seen: list[tuple[int, int, str]] = []

        def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            client = MlflowClient(mlflow_uri)
            points = len(client.get_metric_history(self.run_id, "val/loss"))
            self.seen.append((trainer.current_epoch, points,
                              client.get_run(self.run_id).info.status))

    ds = CanonicalDataset(corpus)
    spec = TrainSpec(network=NetworkSpec(lookback=16, horizon=3, hidden=16),
                     trainer=TrainerSpec(max_epochs=3, patience=5, progress_bar=False,
                                         num_threads=1, stride=3))
    with tracking.start_run({"test": True}, experiment="live") as run:
        probe = SeenDuringFit(run.info.run_id)
        result = train_scorer(ds, spec, callbacks=[probe], logger=tracking.lightning_logger())
        # the logger leaves the run to its owner: still running after the fit
        assert MlflowClient(mlflow_uri).get_run(run.info.run_id).info.status == "RUNNING"
    assert probe.seen == [(0, 1, "RUNNING"), (1, 2, "RUNNING"), (2, 3, "RUNNING")]
    assert len(result.history) == 3
    # without an active run there is no MLflow logger, and training works without a store
    assert tracking.lightning_logger() is None


def test_load_errors_are_clear(mlflow_uri: str, tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="models:/canary-scorer@champion"):
        tracking.load_scorer("s3-ish:thing")
    with pytest.raises(ModelLoadError, match="MLFLOW_TRACKING_URI"):
        tracking.load_scorer("models:/canary-scorer@nobody")
    with pytest.raises(ModelLoadError, match=r"no scorer.json"):
        tracking.load_scorer(str(tmp_path))
    assert tracking.get_alias_version("canary-scorer", "champion") is None
    assert tracking.tracking_uri("sqlite:///x.db") == "sqlite:///x.db"
    assert tracking.tracking_uri(None) == mlflow_uri


def test_missing_dataset_tells_how_to_make_one(mlflow_uri: str, tmp_path: Path) -> None:
    with pytest.raises(DataContractError, match=r"canaryml simulate.*canaryml ingest"):
        train_task.run(compose("train", [f"dataset={tmp_path / 'none'}", *TINY]))
