"""The documented tuning scale-out, for real: two `canaryml tune` worker processes on one Optuna
study in a PostgreSQL started by the test, MLflow on the same server (tracking + registry)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from canaryml.models.synthetic import make_corpus
from tests.harness.postgres import PgServer, postgres  # noqa: F401 - the fixture
from tests.integration.test_tune import SPACE, TINY

pytestmark = pytest.mark.services

N_TRIALS = 4


def _worker(corpus: Path, cwd: Path, worker: int, storage: str, mlflow_uri: str
            ) -> subprocess.Popen[str]:
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_uri, "CANARYML_LOG_LEVEL": "WARNING",
           "MLFLOW_DISABLE_TELEMETRY": "true"}
    cmd = [sys.executable, "-m", "canaryml", "tune", f"dataset={corpus}", f"n_trials={N_TRIALS}",
           *TINY, *SPACE, f"tune.out_dir={cwd / 'study'}", "study=pg", f"storage={storage}",
           f"tune.worker={worker}", "tune.pruner=none"]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, cwd=cwd)


def test_two_workers_share_one_study_and_budget_on_postgres(
        postgres: PgServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    corpus = make_corpus(tmp_path / "corpus", n=20, steps=90, seed=4)
    storage = postgres.create_database("optuna")
    mlflow_uri = postgres.create_database("mlflow")
    monkeypatch.chdir(tmp_path)  # artifacts: ./mlruns of the shared working directory
    # MLflow's schema migration is not safe to race: a team's database is migrated once
    MlflowClient(mlflow_uri).search_experiments()

    procs = [_worker(corpus, tmp_path, w, storage, mlflow_uri) for w in (0, 1)]
    logs = [p.communicate(timeout=800)[0] for p in procs]
    for p, text in zip(procs, logs, strict=True):
        assert p.returncode == 0, text[-3000:]

    study = optuna.load_study(study_name="pg", storage=storage)
    trials = study.get_trials()
    # the budget is the study's: exactly n_trials trials across both workers, none handed back
    assert [t.number for t in trials] == list(range(N_TRIALS))
    assert all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials), \
        [t.state for t in trials]
    assert sum(bool(t.user_attrs.get("baseline")) for t in trials) == 1  # queued once
    ran_by = {t.user_attrs["worker"].split("@")[0] for t in trials}
    assert ran_by == {"0", "1"}, ran_by  # both workers took trials of the one study

    # MLflow in the same PostgreSQL: one parent run, one nested run per trial, from both workers
    client = MlflowClient(mlflow_uri, registry_uri=mlflow_uri)
    parent = study.user_attrs["mlflow_parent_run_id"]
    exp = client.get_run(parent).info.experiment_id
    runs = client.search_runs([exp], f"tags.mlflow.parentRunId = '{parent}'")
    assert sorted(int(r.data.tags["optuna.trial"]) for r in runs) == list(range(N_TRIALS))
    by_trial = {int(r.data.tags["optuna.trial"]): r for r in runs}
    for t in trials:
        assert by_trial[t.number].info.run_id == t.user_attrs["mlflow_run_id"]
        assert by_trial[t.number].data.tags["optuna.state"] == t.state.name
    studies = client.search_runs([exp], "tags.`canaryml.kind` = 'study'")
    assert [r.info.run_id for r in studies] == [parent]  # the loser of the parent race deleted
    # both workers finish by deciding on @challenger, one after the other under the study's
    # lock: one version at most, never one per worker
    summary = json.loads((tmp_path / "study" / "best.json").read_text())
    assert summary["register_decision"]
    versions = client.search_model_versions("name='canary-scorer'")
    assert len(versions) == (1 if summary["registered"] else 0)
