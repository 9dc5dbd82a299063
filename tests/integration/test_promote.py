"""`canaryml register` / `canaryml promote` against a real MLflow SQLite registry, with a live
controller (the serve task's Service + ModelHolder, in a thread) that must pick up each champion
between ticks without missing one."""

from __future__ import annotations

import re
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from canaryml import tracking
from canaryml.cli import compose, main
from canaryml.control.policy import PolicyConfig
from canaryml.control.types import Action
from canaryml.data.dataset import CanonicalDataset
from canaryml.models.scorer import Calibration, CanaryScorer
from canaryml.models.synthetic import make_corpus
from canaryml.replay.sim import ReplaySource
from canaryml.serving.actuators import DryRunActuator
from canaryml.serving.model_holder import ModelHolder
from canaryml.tasks import serve as serve_task
from canaryml.tasks import train as train_task
from tests.integration.test_train_mlflow import TINY

NAME = "canary-scorer"
# The gate mechanics are under test here, not the tiny model's quality (tests/unit/
# test_models_quality.py holds the floors): the absolute gates are loose enough for a 1-epoch
# model; the blind model still fails them and the relative gate.
EVAL = ["policy.warmup_s=60", "registry.gates.false_rollback_rate_max=0.5",
        "registry.gates.detection_rate_min=0.2"]


def blind_copy(s: CanaryScorer) -> CanaryScorer:
    """A genuinely worse scorer: the same network and detectors, calibrated against a 'healthy'
    range no real deviation reaches, so its score stays ~0 and it never rolls anything back."""
    c = s.calibration
    never = Calibration(np.full_like(c.components, 1e6), c.fe_norm, c.det_center, c.det_scale)
    return CanaryScorer(spec=s.spec, network=s.network, scaler=s.scaler, metrics=s.metrics,
                        catalog=s.catalog, detectors=s.detectors, calibration=never,
                        weights=s.weights, step_s=s.step_s, gap_scale=s.gap_scale, info=s.info)


def champion() -> str | None:
    mv = tracking.get_alias_version(NAME, "champion")
    return None if mv is None else str(mv.version)


def promote_runs(client: MlflowClient) -> list[dict[str, str]]:
    exp = client.get_experiment_by_name("canaryml")
    assert exp is not None
    runs = client.search_runs([exp.experiment_id], "tags.command = 'promote'",
                              order_by=["attributes.start_time ASC"])
    return [r.data.tags for r in runs]


class LiveController:
    """serve's Service on one replayed deployment (dry run), ticking in a thread."""

    def __init__(self, tmp: Path, ds: CanonicalDataset) -> None:
        dep = str(ds.deployments["deployment_id"].iloc[0])
        cfg = compose("serve", [f"serve.decision_log={tmp / 'decisions.sqlite'}",
                                f"serve.deployments=[{{id: {dep}}}]",
                                "serve.model_poll_s=0.1", "serve.lookback=1"])
        from omegaconf import OmegaConf

        serve = OmegaConf.to_container(cfg.serve, resolve=True)
        # warm-up forever: keeps deciding, never a terminal action
        policy = PolicyConfig(warmup_s=1e9, monitoring_interval_s=0.05)
        self.dep = dep
        self.service = serve_task.build(serve, policy, source=ReplaySource({dep: ds.arrays(dep)}),  # type: ignore[arg-type]
                                        actuator=DryRunActuator(), http=False,
                                        holder=ModelHolder(f"models:/{NAME}@champion", poll_s=0.1))
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.service.run, kwargs={"stop": self.stop},
                                       daemon=True)

    def wait_for(self, version: str, timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            entries = self.service.loop.log.entries(self.dep)
            if entries and entries[-1].model_version == f"{NAME}/{version}":
                return
            time.sleep(0.05)
        raise AssertionError(f"controller did not pick up {NAME}/{version}; "
                             f"now {self.service.holder.version}")


# the blind model's far-away calibration overflows exp() in the masked tail branch; harmless
@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")
def test_worse_refused_better_promoted_rollback_and_live_pickup(
        mlflow_uri: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    corpus = make_corpus(tmp_path / "corpus", n=20, steps=90, seed=4)
    held_out = make_corpus(tmp_path / "eval", n=16, steps=90, seed=7)
    client = MlflowClient(tracking_uri=mlflow_uri, registry_uri=mlflow_uri)

    # v1: a trained scorer; no champion yet → only the absolute gates apply
    assert train_task.run(compose("train", [f"dataset={corpus}", *TINY])) == 0
    # a replay of @challenger on the same dataset and settings: promote reuses its numbers
    assert main(["replay", "model=models:/canary-scorer@challenger", f"dataset={held_out}",
                 f"out={tmp_path / 'replay'}", "replay.policies=[scorer]",
                 "replay.report.enabled=false", *EVAL]) == 0
    assert main(["promote", f"dataset={held_out}", *EVAL]) == 0
    out = capsys.readouterr().out
    assert "@champion: none -> v1 (promoted)" in out and "PASS gate detection_rate_min" in out
    assert champion() == "1"
    tags = client.get_model_version(NAME, "1").tags
    assert tags["promoted_from"] == "none" and tags["promoted_at"]
    assert tags["gate.detection_rate_min"].startswith("pass challenger=")
    assert tags["promote_dataset_hash"] == CanonicalDataset(held_out).content_hash

    live = LiveController(tmp_path, CanonicalDataset(held_out))
    live.thread.start()
    try:
        live.wait_for("1")

        # v2: the same model made blind, registered from a directory through the CLI
        good = tracking.load_scorer(f"models:/{NAME}/1")
        good.save(tmp_path / "good")
        blind_copy(good).save(tmp_path / "blind")
        assert main(["register", f"scorer={tmp_path / 'blind'}"]) == 0
        assert f"registered {NAME} v2 @challenger" in capsys.readouterr().out
        v2_run = client.get_run(str(client.get_model_version(NAME, "2").run_id))
        assert v2_run.data.tags["dataset_hash"] == CanonicalDataset(corpus).content_hash

        rc = main(["promote", f"dataset={held_out}", *EVAL])
        err = capsys.readouterr().err
        assert rc == 2
        assert "canary-scorer v2 not promoted" in err and "champion stays v1" in err
        assert ("gate detection_rate_min: challenger v2 detection_rate=0.0000, required >= 0.2000"
                in err)
        v1_cbi = promote_runs(client)  # the refused attempt is recorded too
        assert [t["outcome"] for t in v1_cbi] == ["promoted", "refused"]
        assert re.search(r"gate caught_before_impact_min_delta: challenger v2 "
                         r"caught_before_impact=0\.0000 vs champion v1 [01]\.\d{4} \(delta -", err)
        assert champion() == "1"

        # v3: a good challenger again → champion; the live controller swaps to it
        assert main(["register", f"scorer={tmp_path / 'good'}"]) == 0
        assert main(["promote", f"dataset={held_out}", *EVAL]) == 0
        assert "@champion: v1 -> v3 (promoted)" in capsys.readouterr().out
        assert champion() == "3"
        live.wait_for("3")

        # model rollback: --to-version 1, recorded; the controller follows
        assert main(["promote", "--to-version", "1"]) == 0
        assert "@champion: v3 -> v1 (rollback)" in capsys.readouterr().out
        assert champion() == "1"
        assert client.get_model_version(NAME, "1").tags["promoted_from"] == "3"
        live.wait_for("1")
    finally:
        live.stop.set()
        live.thread.join(10)
        live.service.close()
    assert [t["outcome"] for t in promote_runs(client)] == [
        "promoted", "refused", "promoted", "rollback"]
    exp = client.get_experiment_by_name("canaryml")
    evals = client.search_runs([exp.experiment_id], "tags.command = 'promote-eval'")  # type: ignore[union-attr]
    # v1's numbers came from the `canaryml replay` run, every later comparison reused them
    assert sorted(r.data.tags["eval_version"] for r in evals) == ["2", "3"]
    replays = client.search_runs([exp.experiment_id], "tags.command = 'replay'")  # type: ignore[union-attr]
    assert [r.data.tags["eval_version"] for r in replays] == ["1"]

    # the decision log: one entry per tick, steps contiguous, every tick decided with a model
    from canaryml.serving.decision_log import DecisionLog

    with DecisionLog(tmp_path / "decisions.sqlite") as log:
        entries = log.entries(live.dep)
    assert [e.step for e in entries] == list(range(len(entries)))
    assert all(e.action is Action.CONTINUE and e.score is not None for e in entries)
    versions = [e.model_version for e in entries]
    changes = [v for i, v in enumerate(versions) if i == 0 or v != versions[i - 1]]
    assert changes == [f"{NAME}/1", f"{NAME}/3", f"{NAME}/1"]
    assert live.service.holder.swaps == 3
    gaps = np.diff([e.decided_at for e in entries])
    assert gaps.max() < 5.0  # a swap never stalls the loop for a download (generous bound)


def test_promote_errors_name_the_input_and_the_fix(
        mlflow_uri: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["promote", f"dataset={tmp_path}"]) == 2  # no dataset there
    assert "not a canonical dataset" in capsys.readouterr().err
    held_out = make_corpus(tmp_path / "eval", n=12, steps=90, seed=7)
    assert main(["promote", f"dataset={held_out}"]) == 2
    assert "no @challenger version to promote" in capsys.readouterr().err
    assert main(["promote", "--to-version", "7"]) == 2
    assert "has no version '7'" in capsys.readouterr().err


def test_register_errors_name_the_input_and_the_fix(
        mlflow_uri: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["register"]) == 2
    assert "register needs scorer=DIR" in capsys.readouterr().err
    assert main(["register", f"scorer={tmp_path / 'nope'}"]) == 2
    assert "is not a directory" in capsys.readouterr().err
    assert main(["register", f"scorer={tmp_path}", "alias=champion"]) == 2
    assert "no scorer.json" in capsys.readouterr().err
    assert tracking.get_alias_version(NAME, "champion") is None


def test_promote_refuses_the_challengers_training_dataset_unless_overridden(
        mlflow_uri: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    corpus = make_corpus(tmp_path / "corpus", n=16, steps=90, seed=4)
    assert train_task.run(compose("train", [f"dataset={corpus}", *TINY])) == 0
    capsys.readouterr()
    client = MlflowClient(tracking_uri=mlflow_uri, registry_uri=mlflow_uri)

    assert main(["promote", f"dataset={corpus}", *EVAL]) == 2
    err = capsys.readouterr().err
    assert "canary-scorer v1 not promoted" in err
    assert "is the corpus challenger v1 was trained on" in err
    assert "registry.allow_training_dataset=true" in err and "Traceback" not in err
    assert champion() is None
    assert [t["outcome"] for t in promote_runs(client)] == ["refused"]
    exp = client.get_experiment_by_name("canaryml")
    assert exp is not None  # refused before replaying anything
    assert client.search_runs([exp.experiment_id], "tags.command = 'promote-eval'") == []

    # the override: gates off, so only the training-data check is under test
    assert main(["promote", f"dataset={corpus}", "registry.allow_training_dataset=true",
                 "registry.gates.detection_rate_min=null",
                 "registry.gates.false_rollback_rate_max=null"]) == 0
    assert "@champion: none -> v1 (promoted)" in capsys.readouterr().out
    assert champion() == "1"
    tags = client.get_model_version(NAME, "1").tags
    assert "the challenger's training corpus, allowed by registry.allow_training_dataset" in \
        tags["promote_reason"]

    assert main(["promote", f"dataset={corpus}", "registry.allow_training_dataset=maybe"]) == 2
    assert "must be true or false" in capsys.readouterr().err
