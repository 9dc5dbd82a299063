"""The notebooks in notebooks/ (jupytext percent scripts) execute on tiny data.

A module fixture builds the inputs the notebooks read after `make demo`, only smaller: a
simulated corpus ingested to a canonical dataset, a replay of it (the transparent stand-in
scorer beside the Argo-threshold baseline, so no network is trained here) and a two-trial
`canaryml tune` study in a temporary MLflow store. Each notebook is converted with jupytext,
executed by nbclient in a python3 kernel (this interpreter), and must finish without an error,
show its plots and print what it found.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import jupytext
import mlflow
import nbformat
import pytest
from nbclient import NotebookClient

from canaryml.cli import compose, main
from canaryml.tasks import ingest, replay, simulate

REPO = Path(__file__).resolve().parents[2]
NOTEBOOKS = REPO / "notebooks"
TINY_TRAIN = ["forecaster.lookback=16", "forecaster.horizon=3", "forecaster.hidden=16",
              "trainer.max_epochs=1", "trainer.progress_bar=false", "trainer.stride=3",
              "trainer.num_threads=1"]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("notebooks")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.chdir(root)
        raw, ds, out = root / "raw", root / "ds", root / "replay"
        assert simulate.run(compose("simulate", [f"out={raw}", "n=8", "seed=5",
                                                 "simulate.duration_s=1500"])) == 0
        assert ingest.run(compose("ingest", ["source=bundle", f"input={raw}", f"out={ds}"])) == 0
        assert replay.run(compose("replay", [f"dataset={ds}", f"out={out}", "model=standin",
                                             "replay.policies=[scorer,argo]",
                                             "replay.report.enabled=false",
                                             "replay.mlflow=false"])) == 0
        assert main(["tune", f"dataset={ds}", "n_trials=2", f"tune.out_dir={root / 'tune'}",
                     "tune.progress=false", "tune.register=false", *TINY_TRAIN]) == 0
    mlflow.set_tracking_uri("")
    return {"root": root, "uri": uri, "dataset": ds, "replay": out}


def _execute(name: str, env: dict[str, str], workdir: Path,
             monkeypatch: pytest.MonkeyPatch) -> nbformat.NotebookNode:
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    # plots must reach the notebook: the test session's Agg backend would swallow them
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    nb = jupytext.read(NOTEBOOKS / name)
    client = NotebookClient(nb, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(workdir)}})
    client.execute()
    nbformat.write(nb, workdir / name.replace(".py", ".ipynb"))  # for a look when it fails
    return nb


def _text(nb: nbformat.NotebookNode) -> str:
    parts = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            parts.append(out.get("text", ""))
            parts.append(str(out.get("data", {}).get("text/plain", "")))
    return "\n".join(parts)


def _images(nb: nbformat.NotebookNode) -> int:
    return sum("image/png" in out.get("data", {})
               for cell in nb.cells for out in cell.get("outputs", []))


def test_notebooks_are_reviewable_scripts_with_a_parameters_cell() -> None:
    names = sorted(p.name for p in NOTEBOOKS.glob("*.py"))
    assert names == ["01_explore_corpus.py", "02_incident_deep_dive.py",
                     "03_compare_sweep_trials.py"]
    for name in names:
        nb = jupytext.read(NOTEBOOKS / name)
        assert nb.cells[0].cell_type == "markdown"
        assert any("parameters" in c.metadata.get("tags", []) for c in nb.cells), name


def test_explore_corpus(inputs: dict[str, Any], tmp_path: Path,
                        monkeypatch: pytest.MonkeyPatch) -> None:
    nb = _execute("01_explore_corpus.py", {"CANARYML_DATASET": str(inputs["dataset"])},
                  tmp_path, monkeypatch)
    text = _text(nb)
    assert "8 deployments" in text and "faulty" in text and "healthy" in text
    assert _images(nb) >= 4  # families, one faulty + one healthy deployment, drift


def test_incident_deep_dive(inputs: dict[str, Any], tmp_path: Path,
                            monkeypatch: pytest.MonkeyPatch) -> None:
    nb = _execute("02_incident_deep_dive.py", {"CANARYML_REPLAY_DIR": str(inputs["replay"])},
                  tmp_path, monkeypatch)
    text = _text(nb)
    assert "fault onset after" in text and "lead time" in text
    # the scorer rolled this incident back, so its top contributing metrics are explained
    assert "scorer: rollback" in text and "reasons:" in text
    assert _images(nb) >= 3  # scores vs threshold, contributions, telemetry


def test_compare_sweep_trials(inputs: dict[str, Any], tmp_path: Path,
                              monkeypatch: pytest.MonkeyPatch) -> None:
    nb = _execute("03_compare_sweep_trials.py", {"MLFLOW_TRACKING_URI": inputs["uri"]},
                  tmp_path, monkeypatch)
    text = _text(nb)
    assert "2 trials" in text and "best trial:" in text
    assert _images(nb) >= 2  # objective history, parameters vs objective


def test_a_failing_notebook_fails_the_test(inputs: dict[str, Any], tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    from nbclient.exceptions import CellExecutionError

    with pytest.raises(CellExecutionError, match="DataContractError"):
        _execute("01_explore_corpus.py", {"CANARYML_DATASET": str(tmp_path / "missing")},
                 tmp_path, monkeypatch)


def test_notebook_defaults_point_at_the_demo_outputs(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without inputs a notebook looks where `make demo` writes and says how to get data."""
    monkeypatch.delenv("CANARYML_DATASET", raising=False)
    monkeypatch.setenv("CANARYML_HOME", os.fspath(Path("/nonexistent-canaryml-home")))
    monkeypatch.setenv("CANARYML_CONF", os.fspath(REPO / "conf"))
    nb = jupytext.read(NOTEBOOKS / "01_explore_corpus.py")
    params = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    scope: dict[str, Any] = {}
    with pytest.raises(FileNotFoundError, match="make demo"):
        exec(compile(params.source, "parameters", "exec"), scope)
