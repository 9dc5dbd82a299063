from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from canaryml.cli import compose
from canaryml.models.synthetic import make_corpus
from canaryml.tasks import replay as task


def test_replay_cli_writes_decisions_summary_report(tmp_path: Path, mlflow_uri: str) -> None:
    ds = make_corpus(tmp_path / "ds", n=8, steps=160, seed=2)
    out = tmp_path / "out"
    cfg = compose("replay", [f"dataset={ds}", f"out={out}", "model=standin",
                             "replay.policies=[scorer,argo,kayenta]", "replay.report.incidents=1",
                             "policy.rollback_threshold=0.4"])
    assert task.run(cfg) == 0
    dec = pd.read_parquet(out / "decisions.parquet")
    assert set(dec["policy"]) == {"scorer", "argo", "kayenta"} and len(dec) == 24
    assert {"deployment_id", "policy", "action", "decided_at", "score", "reasons"} <= set(dec.columns)
    summary = json.loads((out / "summary.json").read_text())
    for name in ("scorer", "argo", "kayenta"):
        m = summary["policies"][name]
        assert 0.0 <= m["detection_rate"] <= 1.0 and 0.0 <= m["false_rollback_rate"] <= 1.0
        # the oracle sweep: the 101-point grid plus up to one breakpoint per deployment (8 here)
        assert 101 <= len(m["oracle_sweep"]["threshold"]) <= 101 + 8
        assert "frr<=0.01" in m["oracle_operating_points"]
        assert m["settings_chosen_on"] == "configuration"
        lo, hi = m["ci95"]["detection_rate"]
        assert lo <= m["detection_rate"] <= hi
    # the stand-in scorer catches the injected faults better than chance
    assert summary["policies"]["scorer"]["detection_rate"] >= 0.5
    assert summary["replay"]["speed_x_realtime"] > 1
    html = (out / "report.html").read_text()
    assert "data:image/png;base64" in html and (out / "curve.png").is_file()
    assert list(out.glob("incident_*.png"))


def test_replay_cli_unknown_policy_is_a_config_error(tmp_path: Path) -> None:
    import pytest

    from canaryml.errors import ConfigError

    ds = make_corpus(tmp_path / "ds", n=2, steps=120, seed=0)
    cfg = compose("replay", [f"dataset={ds}", f"out={tmp_path / 'o'}", "model=standin",
                             "replay.policies=[nope]", "replay.mlflow=false"])
    with pytest.raises(ConfigError, match="nope"):
        task.run(cfg)


def test_replay_cli_calibrates_on_one_corpus_and_evaluates_several(tmp_path: Path) -> None:
    cal = make_corpus(tmp_path / "cal", n=10, steps=160, seed=5)
    evals = [make_corpus(tmp_path / f"ev{i}", n=6, steps=160, seed=6 + i) for i in range(2)]
    out = tmp_path / "out"
    cfg = compose("replay", [f"dataset=[{evals[0]},{evals[1]}]", f"out={out}", "model=standin",
                             f"replay.calibration.dataset={cal}", "replay.calibration.target_frr=0.3",
                             "replay.calibration.kayenta.effect_size=[1.0,1.25]",
                             "replay.calibration.kayenta.interval_s=[300]",
                             "replay.bootstrap.samples=50", "replay.report.incidents=1",
                             "replay.mlflow=false", "policy.warmup_s=0"])
    assert task.run(cfg) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["protocol"]["settings_chosen_on"]["path"] == str(cal)
    assert set(summary["dataset"]["corpora"]) == {"ev0", "ev1"}
    for name in ("scorer", "argo", "kayenta"):
        m = summary["policies"][name]
        assert m["settings_chosen_on"] == "calibration"
        assert m["calibration"]["false_rollback_rate"] <= 0.3
        assert set(m["per_corpus"]) == {"ev0", "ev1"}
        assert m["configurations_compared"] > 0
    assert summary["policies"]["kayenta"]["settings"]["allowed_increase"] in (1.0, 1.25)
    dec = pd.read_parquet(out / "decisions.parquet")
    assert set(dec["corpus"]) == {"ev0", "ev1"} and len(dec) == 3 * 12


def test_replay_writes_beside_a_readme_and_refuses_a_foreign_folder(tmp_path: Path) -> None:
    import pytest

    from canaryml.data.atomic import OutputDirError

    ds = make_corpus(tmp_path / "ds", n=4, steps=120, seed=1)
    out = tmp_path / "exp"
    out.mkdir()
    args = [f"dataset={ds}", "model=standin", "replay.policies=[scorer]", "replay.mlflow=false",
            "replay.report.enabled=false", "replay.bootstrap.samples=10"]
    (out / "notes.txt").write_text("mine")
    with pytest.raises(OutputDirError, match=r"notes\.txt"):
        task.run(compose("replay", [*args, f"out={out}"]))
    (out / "notes.txt").unlink()
    assert task.run(compose("replay", [*args, f"out={out}"])) == 0
    (out / "README.md").write_text("how this was made")
    assert task.run(compose("replay", [*args, f"out={out}"])) == 0  # a second run beside it
    assert (out / "README.md").read_text() == "how this was made"
    assert (out / "summary.json").is_file() and (out / "decisions.parquet").is_file()
