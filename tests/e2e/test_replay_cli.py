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
        # the 101-point grid plus up to one breakpoint per deployment (8 here)
        assert 101 <= len(m["sweep"]["threshold"]) <= 101 + 8
        assert "frr<=0.01" in m["operating_points"]
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
