"""`canaryml tune` end to end on tiny data: Optuna study + MLflow parent/nested runs + registry,
two worker processes sharing one journal, resume, grid (-m), and errors before any trial."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf
from optuna.storages.journal import JournalFileBackend, JournalStorage
from optuna.trial import TrialState

from canaryml import cli, tracking
from canaryml.control.policy import PolicyConfig
from canaryml.data.dataset import CanonicalDataset
from canaryml.models.scorer import CanaryScorer
from canaryml.models.synthetic import make_corpus
from canaryml.tune import gate
from canaryml.tune.objective import holdout_split, replay_score

TINY = ["forecaster.lookback=16", "forecaster.horizon=3", "forecaster.hidden=16",
        "trainer.max_epochs=2", "trainer.stride=3", "trainer.num_threads=1",
        "tune.progress=false"]
SPACE = ["~tune.space",
         "+tune.space={forecaster.hidden:{type:int,low:8,high:16,step:8},"
         "scorer.forecast_weight:{type:float,low:0.0,high:1.0}}"]
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_corpus(tmp_path_factory.mktemp("tune") / "corpus", n=20, steps=90, seed=4)


def _study(out: Path, name: str) -> optuna.Study:
    storage = JournalStorage(JournalFileBackend(str(out / "journal.log")))
    return optuna.load_study(study_name=name, storage=storage)


def _trial_runs(client: MlflowClient, parent: str) -> list:
    exp = client.get_run(parent).info.experiment_id
    return client.search_runs([exp], f"tags.mlflow.parentRunId = '{parent}'")


def test_four_trial_study_end_to_end(mlflow_uri: str, corpus: Path, tmp_path: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "study"
    # force: this test checks how a best trial is registered; whether it may be (it must beat
    # the untuned default and the incumbents) is test_challenger_only_when_it_beats_...
    rc = cli.main(["tune", f"dataset={corpus}", "n_trials=4", *TINY, *SPACE,
                   f"tune.out_dir={out}", "study=e2e", "tune.pruner_warmup_steps=0",
                   "tune.pruner_startup_trials=1", "tune.register=force"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "study e2e:" in printed and "registered canary-scorer v1 @challenger" in printed

    study = _study(out, "e2e")
    trials = study.get_trials()
    assert [t.number for t in trials] == [0, 1, 2, 3]
    assert all(t.state in FINISHED for t in trials)
    assert trials[0].user_attrs.get("baseline") is True  # trial 0 = the untuned config
    default_mix = float(cli.compose("train").scorer.forecast_weight)
    assert trials[0].params == {"forecaster.hidden": 16, "scorer.forecast_weight": default_mix}

    summary = json.loads((out / "best.json").read_text())
    best = study.best_trial
    assert summary["best_trial"] == best.number and summary["best_value"] == best.value
    assert 0.0 <= best.value <= 1.0
    assert summary["objective"] == "replay" and summary["baseline"]["trial"] == 0
    assert summary["train_command"].startswith("canaryml train ")
    assert "tune." not in summary["train_command"]
    assert {"optimization_history.png", "param_importances.png"} <= set(summary["plots"])
    assert (out / "optimization_history.png").stat().st_size > 1000

    # MLflow: one parent run with the artifacts, one nested run per trial with its state
    client = MlflowClient(mlflow_uri)
    parent = summary["mlflow_parent_run_id"]
    assert study.user_attrs["mlflow_parent_run_id"] == parent
    arts = {a.path for a in client.list_artifacts(parent)}
    assert {"best.json", "optimization_history.png", "param_importances.png"} <= arts
    assert client.get_run(parent).data.tags["tune.objective"] == "replay"
    runs = _trial_runs(client, parent)
    assert sorted(int(r.data.tags["optuna.trial"]) for r in runs) == [0, 1, 2, 3]
    by_trial = {int(r.data.tags["optuna.trial"]): r for r in runs}
    for t in trials:
        r = by_trial[t.number]
        assert r.data.tags["optuna.state"] == t.state.name
        assert r.data.params["forecaster.hidden"] == str(t.params["forecaster.hidden"])
        # the curve came in live from Lightning's MLFlowLogger: one point per validated epoch,
        # the same epochs the pruner saw, each at its own (optimizer) step
        val = client.get_metric_history(r.info.run_id, "val/loss")
        assert len(val) == len(t.intermediate_values) >= 1
        assert len({m.step for m in val}) == len(val)
        if t.state == TrialState.COMPLETE:
            assert r.data.metrics["replay/caught_at_frrle0.01"] == t.value

    # the best trial's scorer is registered as @challenger, from the best trial's run
    mv = tracking.get_alias_version("canary-scorer", "challenger")
    assert mv is not None and mv.run_id == best.user_attrs["mlflow_run_id"]
    assert summary["registered"]["version"] == str(mv.version)
    scorer = tracking.load_scorer("models:/canary-scorer@challenger")
    assert scorer.spec.hidden == best.params["forecaster.hidden"]
    assert [p.name for p in (out / "scorers").iterdir()] == [f"trial-{best.number:04d}"]
    assert json.loads(mv.tags[gate.VALUE_TAG]) == [best.value]  # what a later study must beat


def _run_study(corpus: Path, out: Path, name: str, *extra: str) -> dict:
    assert cli.main(["tune", f"dataset={corpus}", *TINY, *SPACE, "tune.pruner=none",
                     f"tune.out_dir={out / name}", f"study={name}", *extra]) == 0
    return json.loads((out / name / "best.json").read_text())


def test_challenger_only_when_it_beats_the_default_and_the_incumbents(
        mlflow_uri: str, corpus: Path, tmp_path: Path, tiny_scorer_dir: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    client = MlflowClient(mlflow_uri, registry_uri=mlflow_uri)  # not an earlier test's registry

    def versions() -> list[str]:
        return sorted(v.version for v in client.search_model_versions("name='canary-scorer'"))

    # 1. the best trial of a study of one trial is the untuned default itself: a tie, no version
    a = _run_study(corpus, tmp_path, "a", "n_trials=1")
    assert a["best_trial"] == 0 and a["registered"] is None
    assert a["register_decision"].startswith("best trial 0 (")
    assert "only ties the untuned default, trial 0 (" in a["register_decision"]
    assert versions() == []

    # 2. a champion registered outside tune carries no tuning numbers: it is replayed on the
    # study's hold-out, and the best trial must beat that
    champion = CanaryScorer.load(tiny_scorer_dir)
    with tracking.start_run({"test": True}, experiment="outside"):
        tracking.log_scorer(champion, alias="champion")
    b = _run_study(corpus, tmp_path, "b", "n_trials=1", "tune.baseline_trial=false")
    cfg = cli.compose("tune", [f"dataset={corpus}"])
    ds = CanonicalDataset(corpus)
    hold = holdout_split(ds, float(cfg.tune.holdout_fraction), int(cfg.tune.holdout_seed))
    policy = PolicyConfig.from_mapping(OmegaConf.to_container(cfg.policy, resolve=True))
    expected = replay_score(champion, ds, hold.holdout, policy, max_frr=float(cfg.tune.max_frr),
                            thresholds=int(cfg.replay.sweep.thresholds),
                            horizon_s=cfg.replay.get("horizon_s")).caught_at_frr
    tags = client.get_model_version("canary-scorer", "1").tags
    assert json.loads(tags[gate.VALUE_TAG]) == [pytest.approx(expected)]
    key = tags[gate.KEY_TAG]
    assert key == gate.objective_key("replay", float(cfg.tune.max_frr), ds.content_hash,
                                     hold.holdout)
    assert (b["registered"] is not None) == (b["best_value"] > expected + gate.TIE_TOL)

    # 3. incumbents as good as the objective allows cannot be beaten, only tied
    for v in versions():
        client.set_model_version_tag("canary-scorer", v, gate.VALUE_TAG, "[1.0]")
    before = versions()
    c = _run_study(corpus, tmp_path, "c", "n_trials=1", "tune.baseline_trial=false")
    assert c["registered"] is None and "@c" in c["register_decision"]
    assert versions() == before

    # 4. worse incumbents (same objective, data and hold-out): the best trial becomes @challenger
    for v in versions():
        client.set_model_version_tag("canary-scorer", v, gate.VALUE_TAG, "[-1.0]")
    d = _run_study(corpus, tmp_path, "d", "n_trials=1", "tune.baseline_trial=false")
    assert d["registered"] is not None and "beats" in d["register_decision"]
    mv = tracking.get_alias_version("canary-scorer", "challenger")
    assert mv is not None and str(mv.version) == d["registered"]["version"]
    assert mv.tags[gate.KEY_TAG] == key
    assert json.loads(mv.tags[gate.VALUE_TAG]) == [d["best_value"]]
    assert str(tracking.get_alias_version("canary-scorer", "champion").version) == "1"  # type: ignore[union-attr]
    # rerunning the finished study registers nothing new
    again = _run_study(corpus, tmp_path, "d", "n_trials=1", "tune.baseline_trial=false")
    assert again["registered"] == d["registered"] and versions() == [*before, mv.version]

    # 5. an incumbent that cannot be replayed on this data (here: its artifacts are gone) has
    # nothing to beat on the objective: it is left out of the comparison, loudly
    client.set_model_version_tag("canary-scorer", mv.version, gate.VALUE_TAG, "[-1.0]")
    client.delete_model_version_tag("canary-scorer", "1", gate.KEY_TAG)
    source = client.get_model_version("canary-scorer", "1").source
    model_id = source.removeprefix("models:/")
    shutil.rmtree(client.get_logged_model(model_id).artifact_location.removeprefix("file://"))
    caplog.set_level(logging.WARNING, logger="canaryml.tasks.tune")
    e = _run_study(corpus, tmp_path, "e", "n_trials=1", "tune.baseline_trial=false")
    assert "@champion v1 cannot be replayed on this study's hold-out" in caplog.text
    assert e["registered"] is not None and "@champion" not in e["register_decision"]
    assert f"@challenger v{mv.version} (-1)" in e["register_decision"]


def _worker(corpus: Path, out: Path, worker: int, uri: str, n_trials: int,
            extra: tuple[str, ...] = ()) -> subprocess.Popen[str]:
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "CANARYML_LOG_LEVEL": "WARNING",
           "MLFLOW_DISABLE_TELEMETRY": "true"}
    cmd = [sys.executable, "-m", "canaryml", "tune", f"dataset={corpus}", f"n_trials={n_trials}",
           *TINY, *SPACE, f"tune.out_dir={out}", "study=shared", f"tune.worker={worker}",
           "tune.register=false", "tune.pruner=none", *extra]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, cwd=out.parent)


def test_two_workers_share_one_journal_and_budget(mlflow_uri: str, corpus: Path,
                                                  tmp_path: Path) -> None:
    out = tmp_path / "shared"
    # create the SQLite schema first: MLflow's migrations are not safe to race (a real team
    # store is a tracking server or a database that already exists)
    MlflowClient(mlflow_uri).search_experiments()
    procs = [_worker(corpus, out, w, mlflow_uri, 5) for w in (0, 1)]
    logs = [p.communicate(timeout=600)[0] for p in procs]
    for p, text in zip(procs, logs, strict=True):
        assert p.returncode == 0, text[-3000:]

    study = _study(out, "shared")
    trials = study.get_trials()
    numbers = [t.number for t in trials]
    assert len(numbers) == len(set(numbers)) == numbers[-1] + 1  # no duplicate numbers
    done = [t for t in trials if t.state in FINISHED]
    assert len(done) == 5  # the budget is shared: exactly n_trials, never more
    assert len(trials) == 5  # asked under the journal's lock: no trial beyond it was created
    # every trial (of either worker) is nested under the one shared parent run
    client = MlflowClient(mlflow_uri)
    parent = study.user_attrs["mlflow_parent_run_id"]
    runs = _trial_runs(client, parent)
    assert sorted(int(r.data.tags["optuna.trial"]) for r in runs) == sorted(t.number for t in done)
    assert {t.user_attrs["worker"].split("@")[0] for t in done} <= {"0", "1"}


def test_interrupted_study_resumes(mlflow_uri: str, corpus: Path, tmp_path: Path) -> None:
    out = tmp_path / "resume"
    args = ["tune", f"dataset={corpus}", *TINY, *SPACE, f"tune.out_dir={out}", "study=resume",
            "tune.register=false", "tune.pruner=none"]
    assert cli.main([*args, "n_trials=2"]) == 0
    first = json.loads((out / "best.json").read_text())
    # a worker killed mid-trial leaves a RUNNING trial behind
    crashed = _study(out, "resume").ask({"forecaster.hidden": optuna.distributions.IntDistribution(
        8, 16, step=8)})
    assert cli.main([*args, "n_trials=3", "tune.reclaim_running=true"]) == 0

    study = _study(out, "resume")
    states = {t.number: t.state for t in study.get_trials()}
    assert states[crashed.number] == TrialState.FAIL  # reclaimed, not counted
    assert sum(s in FINISHED for s in states.values()) == 3
    assert sorted(states) == list(range(len(states)))
    retried = [t for t in study.get_trials() if t.user_attrs.get("retry_of") == crashed.number]
    assert len(retried) == 1 and retried[0].state in FINISHED
    second = json.loads((out / "best.json").read_text())
    assert second["mlflow_parent_run_id"] == first["mlflow_parent_run_id"]
    # nothing left to do: a third start is a no-op
    assert cli.main([*args, "n_trials=3"]) == 0
    assert sum(t.state in FINISHED for t in _study(out, "resume").get_trials()) == 3


def test_multirun_grid_is_one_gridsampler_study(mlflow_uri: str, corpus: Path,
                                               tmp_path: Path) -> None:
    out = tmp_path / "grid"
    rc = cli.main(["tune", "-m", f"dataset={corpus}", *TINY, "forecaster.hidden=8,16",
                   "trainer.max_epochs=1", f"tune.out_dir={out}", "study=grid",
                   "tune.register=false", "tune.objective=val_loss"])
    assert rc == 0
    study = _study(out, "grid")
    assert study.directions == [optuna.study.StudyDirection.MINIMIZE]
    assert sorted(t.params["forecaster.hidden"] for t in study.get_trials()) == ["16", "8"]
    assert all(t.state in FINISHED for t in study.get_trials())
    summary = json.loads((out / "best.json").read_text())
    assert summary["grid"] == {"forecaster.hidden": ["8", "16"]}


def test_bad_storage_and_data_fail_before_any_trial(mlflow_uri: str, corpus: Path,
                                                    tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "bad"
    rc = cli.main(["tune", f"dataset={corpus}", *TINY, f"tune.out_dir={out}",
                   "storage=postgresql://u:p@127.0.0.1:1/x"])
    assert rc == 2
    assert "postgresql://u:p@127.0.0.1:1/x" in capsys.readouterr().err
    rc = cli.main(["tune", f"dataset={corpus}", *TINY, f"tune.out_dir={out}",
                   "tune.holdout_fraction=1.5"])
    assert rc == 2
    assert "tune.holdout_fraction=1.5" in capsys.readouterr().err
    rc = cli.main(["tune", f"dataset={tmp_path / 'nope'}", *TINY, f"tune.out_dir={out}"])
    assert rc == 2
    assert "not a canonical dataset" in capsys.readouterr().err
    assert not out.exists()
    assert not MlflowClient(mlflow_uri).search_experiments(filter_string="name = 'canaryml'")
