"""`dvc repro` runs the repository's dvc.yaml end to end on tiny parameters.

The test copies dvc.yaml, the DVC config, conf/ and the src/ files the stages depend on into a
fresh git + DVC repository in a temporary folder, shrinks the parameters there by editing the
conf/ files (exactly what a user does; DVC reads `params` from them), and points the package at
that copy (`CANARYML_HOME`), so neither the real data/ folders nor the project's MLflow store are
touched. It checks that:

- the first `dvc repro` runs every stage, in order, and writes every output;
- a second `dvc repro` runs nothing;
- changing one policy parameter re-runs only `replay` and `register` (its downstream stages);
- `dvc metrics show` / `dvc metrics diff` / `dvc params diff` read the replay summary and conf/.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from mlflow.tracking import MlflowClient

REPO = Path(__file__).resolve().parents[2]
STAGES = ["simulate", "ingest", "train", "replay", "register"]
NEW_THRESHOLD = 0.35
# tiny parameters, written into the copied conf/ files: {file: {dotted.key: value}}
TINY: dict[str, dict[str, Any]] = {
    "conf/config.yaml": {"n": 8, "seed": 3},
    "conf/simulate/default.yaml": {"duration_s": 1200, "spacing_s": 3600},
    "conf/forecaster/lstm.yaml": {"lookback": 16, "horizon": 3, "hidden": 16},
    "conf/trainer/default.yaml": {"max_epochs": 1, "progress_bar": False, "stride": 3,
                                  "num_threads": 1},
    "conf/replay/default.yaml": {"policies": ["scorer", "argo"], "report.enabled": False,
                                 "sweep.thresholds": 21, "mlflow": False},
}


def _tool(name: str) -> str:
    """The venv's executable (`dvc`, `canaryml`), else one on PATH."""
    local = Path(sys.executable).parent / name
    found = str(local) if local.exists() else shutil.which(name)
    if not found:
        pytest.fail(f"`{name}` is not installed; it is a dev dependency: pip install -e '.[dev]'")
    return found


def _edit_yaml(path: Path, values: dict[str, Any]) -> None:
    data = yaml.safe_load(path.read_text())
    for dotted, value in values.items():
        node = data
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node[key]
        assert leaf in node, f"{path}: no key {dotted!r} to shrink; update TINY in this test"
        node[leaf] = value
    path.write_text(yaml.safe_dump(data, sort_keys=False))


def _versions(repo: Repo) -> int:
    uri = repo.env["MLFLOW_TRACKING_URI"]
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    return len(client.search_model_versions("name='canary-scorer'"))


def _ran(output: str) -> list[str]:
    return re.findall(r"Running stage '([^']+)'", output)


class Repo:
    def __init__(self, root: Path) -> None:
        self.root = root
        bindir = str(Path(_tool("canaryml")).parent)
        self.env = {
            **os.environ,
            "PATH": bindir + os.pathsep + os.environ.get("PATH", ""),
            "CANARYML_HOME": str(root),  # conf/ and the default MLflow store of the copy
            "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}",
            "CANARYML_LOG_LEVEL": "WARNING",
            "DVC_NO_ANALYTICS": "1",
            "DVC_SITE_CACHE_DIR": str(root.parent / "dvc-site-cache"),
            "MPLBACKEND": "Agg",
            "GIT_AUTHOR_NAME": "canaryml-test", "GIT_AUTHOR_EMAIL": "test@canaryml.invalid",
            "GIT_COMMITTER_NAME": "canaryml-test", "GIT_COMMITTER_EMAIL": "test@canaryml.invalid",
        }
        self.env.pop("CANARYML_CONF", None)

    def run(self, *args: str, check: bool = True) -> str:
        proc = subprocess.run(list(args), cwd=self.root, env=self.env, capture_output=True,
                              text=True, timeout=600, check=False)
        out = proc.stdout + proc.stderr
        if check and proc.returncode != 0:
            pytest.fail(f"`{' '.join(args)}` exited {proc.returncode}:\n{out[-4000:]}")
        return out

    def dvc(self, *args: str) -> str:
        return self.run(_tool("dvc"), *args)

    def commit(self, message: str) -> None:
        self.run("git", "add", "-A")
        self.run("git", "commit", "-q", "-m", message)


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Repo:
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    root = tmp_path_factory.mktemp("dvc") / "repo"
    root.mkdir()
    for name in ("dvc.yaml", ".dvcignore"):
        shutil.copy2(REPO / name, root / name)
    shutil.copytree(REPO / ".dvc", root / ".dvc", ignore=shutil.ignore_patterns("tmp", "cache"))
    shutil.copytree(REPO / "conf", root / "conf")
    shutil.copytree(REPO / "src" / "canaryml", root / "src" / "canaryml",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    shutil.copy2(REPO / ".gitignore", root / ".gitignore")
    for rel, values in TINY.items():
        _edit_yaml(root / rel, values)
    r = Repo(root)
    r.run("git", "init", "-q")
    r.commit("tiny pipeline")
    return r


def test_dvc_pipeline_reproduces_and_skips_what_did_not_change(repo: Repo) -> None:
    # 1. everything runs, in pipeline order, and every output exists
    out = repo.dvc("repro")
    assert _ran(out) == STAGES, out[-3000:]
    root = repo.root
    assert (root / "data/raw/simulated/deployments.parquet").is_file()
    assert (root / "data/processed/simulated/manifest.json").is_file()
    assert (root / "models/scorer/scorer.json").is_file()
    assert (root / "experiments/replay/dvc/decisions.parquet").is_file()
    summary = json.loads((root / "experiments/replay/dvc_summary.json").read_text())
    assert set(summary["policies"]) == {"scorer", "argo"}
    assert summary["dataset"]["deployments"] == 8
    lock = yaml.safe_load((root / "dvc.lock").read_text())
    assert set(lock["stages"]) == set(STAGES)
    assert _versions(repo) == 2  # train registered v1, the register stage v2
    repo.commit("run 1")

    # 2. nothing changed: nothing runs
    again = repo.dvc("repro")
    assert _ran(again) == [], again
    assert "up to date" in again
    assert "up to date" in repo.dvc("status")

    # 3. one policy parameter changed: only the stages downstream of it run
    policy = root / "conf/policy/default.yaml"
    _edit_yaml(policy, {"rollback_threshold": NEW_THRESHOLD})
    status = repo.dvc("status")
    assert "replay:" in status and "rollback_threshold" in status
    assert "train:" not in status and "simulate:" not in status
    params = json.loads(repo.dvc("params", "diff", "--json"))
    changed_param = params["conf/policy/default.yaml"]["rollback_threshold"]
    # null (the model's own operating point) -> an explicit threshold
    assert (changed_param["old"], changed_param["new"]) == (None, NEW_THRESHOLD)
    out3 = repo.dvc("repro")
    assert _ran(out3) == ["replay", "register"], out3[-3000:]
    assert _versions(repo) == 3

    # 4. the metrics file is DVC's: show and diff read it
    shown = json.loads(repo.dvc("metrics", "show", "--json"))
    metrics = shown[""]["data"]["experiments/replay/dvc_summary.json"]["data"]
    scorer = metrics["policies"]["scorer"]
    assert scorer["settings"]["rollback_threshold"] == NEW_THRESHOLD
    assert 0.0 <= scorer["detection_rate"] <= 1.0
    diff = json.loads(repo.dvc("metrics", "diff", "--json"))
    changed = diff["experiments/replay/dvc_summary.json"]
    assert changed["policies.scorer.settings.rollback_threshold"]["old"] != NEW_THRESHOLD
    assert changed["policies.scorer.settings.rollback_threshold"]["new"] == NEW_THRESHOLD
