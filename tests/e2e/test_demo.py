"""`canaryml demo` (README's first command) end to end on tiny sizes: every stage runs, the
challenger is promoted, the live controller rolls the bad canary back and promotes the good one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from canaryml import tracking
from canaryml.cli import main

pytestmark = pytest.mark.slow


def test_demo_runs_every_stage_and_prints_the_summary(
        mlflow_uri: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "demo"
    rc = main(["demo", f"demo.out={out}", "demo.n_train=30", "demo.n_eval=10",
               "trainer.max_epochs=1", "trainer.num_threads=1",
               'demo.train_overrides=["trainer.progress_bar=false"]',
               'demo.replay_overrides=["replay.policies=[scorer,argo]","replay.report.incidents=1"]'])
    assert rc == 0
    printed = capsys.readouterr().out
    for stage in ("simulate", "ingest", "train", "replay", "promote"):
        assert f"=== {stage}: canaryml {stage}" in printed
    assert "=== summary: replay of 10 held-out deployments" in printed
    assert f"report: {out / 'replay' / 'report.html'}" in printed
    assert f"mlflow ui --backend-store-uri {mlflow_uri}" in printed

    summary = json.loads((out / "demo_summary.json").read_text())
    assert set(summary["replay"]) == {"scorer", "argo"}
    assert (out / "replay" / "report.html").is_file()
    champion = tracking.get_alias_version("canary-scorer", "champion")
    challenger = tracking.get_alias_version("canary-scorer", "challenger")
    assert champion is not None and challenger is not None
    assert champion.version == challenger.version

    live = {row["label"]: row for row in summary["live"]}
    assert live["faulty"]["action"] in ("shrink", "rollback"), live
    assert live["healthy"]["action"] == "promote", live
    assert Path(live["faulty"]["decision_log"]).is_file()
