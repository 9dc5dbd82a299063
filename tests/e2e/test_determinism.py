"""Same seed → same replay summary; every artefact of the tiny pipeline links back to its inputs.

The tiny pipeline (simulate → ingest → train → replay) runs twice, with the same seed, into two
different folders and two different MLflow stores; the replay summaries and decision tables must
be identical apart from wall-clock timings and the output paths. Lineage (DESIGN §5, issue 8 §5):
the training run carries the dataset hash, the resolved config and the git commit; the
registered version points at that run; the saved scorer bundle and the replay run refer to the
same dataset hash and training run.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
import pytest
import yaml
from mlflow.tracking import MlflowClient

from canaryml import tracking
from canaryml.cli import compose
from canaryml.data.dataset import CanonicalDataset
from canaryml.tasks import ingest, replay, simulate, train

SEED = 7
TINY_SIM = ["n=10", "simulate.duration_s=1500", "simulate.spacing_s=3600"]
TINY_TRAIN = ["forecaster.lookback=16", "forecaster.horizon=3", "forecaster.hidden=16",
              "trainer.max_epochs=1", "trainer.progress_bar=false", "trainer.stride=3",
              "trainer.num_threads=1"]
TINY_REPLAY = ["replay.policies=[scorer,argo,kayenta]", "replay.report.enabled=false",
               "replay.sweep.thresholds=21"]
# fields that measure the machine, not the result, or name where the run wrote its files
WALL_CLOCK = {("replay", "wall_s"), ("replay", "speed_x_realtime")}


def _pipeline(root: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """simulate → ingest → train (scorer_out) → replay, in-process, into `root`."""
    uri = f"sqlite:///{root / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(root)  # MLflow's default artifact root ./mlruns lands in root
    raw, ds, scorer, out = root / "raw", root / "ds", root / "scorer", root / "replay"
    assert simulate.run(compose("simulate", [f"out={raw}", f"seed={SEED}", *TINY_SIM])) == 0
    assert ingest.run(compose("ingest", ["source=bundle", f"input={raw}", f"out={ds}"])) == 0
    assert train.run(compose("train", [f"dataset={ds}", f"seed={SEED}", f"scorer_out={scorer}",
                                       *TINY_TRAIN])) == 0
    assert replay.run(compose("replay", [f"model={scorer}", f"dataset={ds}", f"out={out}",
                                         f"seed={SEED}", *TINY_REPLAY])) == 0
    return {"uri": uri, "raw": raw, "ds": ds, "scorer": scorer, "out": out}


def _comparable(summary: dict[str, Any]) -> dict[str, Any]:
    s = json.loads(json.dumps(summary))
    for section, key in WALL_CLOCK:
        s[section].pop(key)
    for m in s["policies"].values():
        m.pop("replay_wall_s")
        m.pop("model_version", None)  # the scorer directory of each run
    s["dataset"].pop("path")
    for corpus in s["dataset"]["corpora"].values():
        corpus.pop("path")
    s.pop("model")  # the scorer directory of each run
    s.pop("model_version", None)  # its URI: that directory again
    return s


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], dict[str, Any]]:
    with pytest.MonkeyPatch.context() as mp:
        first = _pipeline(tmp_path_factory.mktemp("run_a"), mp)
        second = _pipeline(tmp_path_factory.mktemp("run_b"), mp)
    mlflow.set_tracking_uri("")  # do not leak the last store into other tests
    return first, second


def test_same_seed_gives_the_same_replay_summary(runs: tuple[dict[str, Any], dict[str, Any]]
                                                 ) -> None:
    a, b = runs
    assert CanonicalDataset(a["ds"]).content_hash == CanonicalDataset(b["ds"]).content_hash
    sa = json.loads((a["out"] / "summary.json").read_text())
    sb = json.loads((b["out"] / "summary.json").read_text())
    # the comparison is not vacuous: every policy was evaluated on faulty and healthy canaries
    assert set(sa["policies"]) == {"scorer", "argo", "kayenta"}
    assert sa["dataset"]["labels"].get("faulty", 0) > 0 and sa["dataset"]["labels"].get("healthy", 0) > 0
    assert _comparable(sa) == _comparable(sb)
    da = pd.read_parquet(a["out"] / "decisions.parquet").drop(columns=["model_version"])
    db = pd.read_parquet(b["out"] / "decisions.parquet").drop(columns=["model_version"])
    pd.testing.assert_frame_equal(da, db)
    la = pd.read_parquet(a["out"] / "decision_log.parquet").drop(columns=["model_version"])
    lb = pd.read_parquet(b["out"] / "decision_log.parquet").drop(columns=["model_version"])
    pd.testing.assert_frame_equal(la, lb)


def test_a_different_seed_changes_the_data(runs: tuple[dict[str, Any], dict[str, Any]],
                                           tmp_path: Path) -> None:
    """Guards the test above: the comparison must be able to see a difference."""
    a, _ = runs
    raw, ds = tmp_path / "raw", tmp_path / "ds"
    assert simulate.run(compose("simulate", [f"out={raw}", f"seed={SEED + 1}", *TINY_SIM])) == 0
    assert ingest.run(compose("ingest", ["source=bundle", f"input={raw}", f"out={ds}"])) == 0
    assert CanonicalDataset(ds).content_hash != CanonicalDataset(a["ds"]).content_hash


def test_lineage_links_runs_versions_data_and_config(runs: tuple[dict[str, Any], dict[str, Any]]
                                                      ) -> None:
    a, _ = runs
    ds_hash = CanonicalDataset(a["ds"]).content_hash
    tracking.configure(a["uri"])
    client = MlflowClient(a["uri"])
    try:
        mv = tracking.get_alias_version("canary-scorer", "challenger")
        assert mv is not None and mv.run_id, "train registers a version with a source run"
        train_run = client.get_run(mv.run_id)
        tags = train_run.data.tags
        assert tags["command"] == "train"
        assert tags["dataset_hash"] == ds_hash
        commit = tags["git_commit"]
        assert commit and commit != "unknown", "run inside a git checkout: the commit is known"
        assert commit.removesuffix("-dirty") == tracking.git_commit().removesuffix("-dirty")
        # the resolved config is an artifact and as flat params
        conf = yaml.safe_load(Path(mlflow.artifacts.download_artifacts(
            run_id=train_run.info.run_id, artifact_path="config.yaml",
            tracking_uri=a["uri"])).read_text())
        assert conf["seed"] == SEED and conf["forecaster"]["lookback"] == 16
        assert conf["dataset"] == str(a["ds"])
        assert train_run.data.params["trainer.max_epochs"] == "1"
        # the scorer bundle saved beside MLflow links back to the same run and version
        info = json.loads((a["scorer"] / "scorer.json").read_text())["info"]
        assert info["train_run_id"] == train_run.info.run_id
        assert info["registered_version"] == str(mv.version)
        assert info["dataset_hash"] == ds_hash
        assert tags.get("scorer_out") == str(a["scorer"])
        # the replay run evaluated that dataset and logged its summary
        replays = client.search_runs([train_run.info.experiment_id],
                                     filter_string="tags.command = 'replay'")
        assert len(replays) == 1
        rr = replays[0]
        assert rr.data.tags["dataset_hash"] == ds_hash
        assert rr.data.params["model"] == str(a["scorer"])
        assert "replay/scorer/detection_rate" in rr.data.metrics
        arts = {x.path for x in client.list_artifacts(rr.info.run_id, "replay")}
        assert "replay/summary.json" in arts
    finally:
        mlflow.set_tracking_uri("")


def test_a_ddp_worker_neither_logs_nor_registers(runs: tuple[dict[str, Any], dict[str, Any]],
                                                 tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """With trainer.devices > 1 Lightning re-runs `canaryml train` as rank 1..N-1: those copies
    train (DDP needs every rank) but must not add runs or model versions (one per command)."""
    from canaryml.tasks.train import process_rank

    a, _ = runs
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    for key in ("RANK", "SLURM_PROCID", "NODE_RANK"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert process_rank() == 1
    assert train.run(compose("train", [f"dataset={a['ds']}", f"scorer_out={tmp_path / 'sc'}",
                                       *TINY_TRAIN])) == 0
    client = MlflowClient(uri)
    try:
        assert client.search_runs([e.experiment_id for e in client.search_experiments()]) == []
        assert client.search_model_versions("name='canary-scorer'") == []
        assert not (tmp_path / "sc").exists()
        monkeypatch.setenv("RANK", "0")  # torchrun: RANK wins over LOCAL_RANK
        assert process_rank() == 0
    finally:
        mlflow.set_tracking_uri("")
