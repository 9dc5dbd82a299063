"""The top-level Python API (issue 15): `from canaryml import simulate, ingest, train, replay,
load_scorer` — thin functions over the commands' tasks, keyword arguments as config overrides,
returning paths and objects — through a whole workbench round trip."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import canaryml
from canaryml import config, ingest, load_scorer, replay, simulate, train
from canaryml.api import overrides
from canaryml.errors import CanarymlError

pytestmark = [pytest.mark.timeout(600)]


def test_keyword_arguments_are_hydra_overrides() -> None:
    assert overrides(trainer__max_epochs=2, forecaster="transformer", out=Path("a b"),
                     seed=None, flag=True, x=0.5) == [
        "trainer.max_epochs=2", "forecaster='transformer'", "out='a b'", "seed=null",
        "flag=true", "x=0.5"]
    assert overrides(**{"replay.policies": ["scorer", "argo"]}) == [
        "replay.policies=['scorer','argo']"]
    assert overrides(d={"a": 1, "b": "it's"}) == ["d={a:1,b:'it\\'s'}"]
    cfg = config("train", trainer__max_epochs=2, forecaster="transformer")
    assert cfg.trainer.max_epochs == 2 and cfg.forecaster.kind == "transformer"
    with pytest.raises(CanarymlError):
        config("train", trainer__no_such_key=1)


def test_subpackages_stay_importable_and_are_the_api_functions() -> None:
    import canaryml.simulate as sim_pkg
    from canaryml.replay.runner import deployment_table  # noqa: F401 - the package imports
    from canaryml.simulate import simulate_corpus  # noqa: F401

    assert sim_pkg is simulate and callable(simulate) and callable(ingest) and callable(replay)
    assert canaryml.train is train and canaryml.load_scorer is load_scorer


def test_workbench_round_trip_through_the_python_api(mlflow_uri: str, tmp_path: Path) -> None:
    raw = simulate(out=tmp_path / "raw", n=6, seed=3)  # type: ignore[operator]
    assert raw == tmp_path / "raw" and any(raw.iterdir())
    ds = ingest(input=raw, out=tmp_path / "ds")  # type: ignore[operator]
    assert json.loads((ds / "manifest.json").read_text())["content_hash"]
    model = train(ds, trainer__max_epochs=1, trainer__progress_bar=False,
                  trainer__num_threads=1, forecaster__hidden=8, forecaster__lookback=16,
                  trainer__stride=4, scorer_out=tmp_path / "scorer")
    assert model == "models:/canary-scorer/1"
    out = replay(model=model, dataset=ds, out=tmp_path / "replay",  # type: ignore[operator]
                 replay__report__enabled=False, replay__mlflow=False,
                 replay__policies=["scorer", "argo"])
    summary = json.loads((out / "summary.json").read_text())
    assert "scorer" in json.dumps(summary) and "argo" in json.dumps(summary)
    scorer = load_scorer(model)
    assert tuple(scorer.metrics) == tuple(config("train").metrics)
    assert load_scorer(tmp_path / "scorer").metrics == scorer.metrics


def test_notebooks_use_the_api_not_cli_internals() -> None:
    notebooks = sorted((Path(__file__).resolve().parents[2] / "notebooks").glob("*.py"))
    assert notebooks
    for nb in notebooks:
        text = nb.read_text()
        assert "canaryml.cli" not in text and "canaryml.tasks" not in text, nb.name
    assert any("from canaryml import config" in nb.read_text() for nb in notebooks)
