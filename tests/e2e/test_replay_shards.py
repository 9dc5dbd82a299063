"""Sharded replay (issue 14): `canaryml replay shard=i/n` on each shard, then `replay merge=…`,
gives the summary.json and decisions of a single run (wall-clock fields aside)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from canaryml.cli import compose
from canaryml.errors import ConfigError
from canaryml.models.synthetic import make_corpus
from canaryml.tasks import replay as task

TIMING = ("wall_s", "speed_x_realtime", "replay_wall_s")


def _without_timing(d: Any) -> Any:
    if isinstance(d, dict):
        return {k: _without_timing(v) for k, v in d.items() if k not in TIMING}
    if isinstance(d, list):
        return [_without_timing(v) for v in d]
    return d


def test_four_shards_merge_to_the_single_run(tmp_path: Path) -> None:
    cal = make_corpus(tmp_path / "cal", n=10, steps=160, seed=5)
    ev = make_corpus(tmp_path / "ev", n=11, steps=160, seed=6)
    common = [f"dataset={ev}", "model=standin", f"replay.calibration.dataset={cal}",
              "replay.calibration.target_frr=0.3", "replay.calibration.kayenta.effect_size=[1.0]",
              "replay.calibration.kayenta.interval_s=[300]", "replay.calibration.argo.measure_s=[60]",
              "replay.bootstrap.samples=50", "replay.report.incidents=1", "replay.mlflow=false",
              "policy.warmup_s=0", "replay.workers=1"]
    single = tmp_path / "single"
    assert task.run(compose("replay", [*common, f"out={single}"])) == 0
    for i in range(4):
        assert task.run(compose("replay", [*common, f"shard={i}/4",
                                           f"out={tmp_path / 'shards' / f'shard-{i}'}"])) == 0
    merged = tmp_path / "merged"
    assert task.run(compose("replay", [f"merge={tmp_path / 'shards'}", f"out={merged}"])) == 0

    a = json.loads((single / "summary.json").read_text())
    b = json.loads((merged / "summary.json").read_text())
    assert _without_timing(a) == _without_timing(b)
    assert a["dataset"]["deployments"] == 11 and set(a["policies"]) == {"scorer", "argo", "kayenta"}
    pd.testing.assert_frame_equal(pd.read_parquet(single / "decisions.parquet"),
                                  pd.read_parquet(merged / "decisions.parquet"))
    assert (merged / "report.html").is_file()
    shard0 = json.loads((tmp_path / "shards" / "shard-0" / "shard.json").read_text())
    assert shard0["corpora"][0]["deployments"] == pd.read_parquet(
        Path(ev) / "deployments.parquet")["deployment_id"].astype(str).tolist()[0::4]


def test_merge_refuses_missing_shards_and_bad_specs(tmp_path: Path) -> None:
    ev = make_corpus(tmp_path / "ev", n=4, steps=120, seed=1)
    common = [f"dataset={ev}", "model=standin", "replay.mlflow=false", "replay.workers=1",
              "replay.report.enabled=false", "replay.bootstrap.samples=10"]
    assert task.run(compose("replay", [*common, "shard=1/2", f"out={tmp_path / 's' / 'b'}"])) == 0
    with pytest.raises(ConfigError, match=r"every shard 0\.\.1"):
        task.run(compose("replay", [f"merge={tmp_path / 's'}", f"out={tmp_path / 'm'}"]))
    with pytest.raises(ConfigError, match="shard=i/n"):
        task.run(compose("replay", [*common, "shard=4/4", f"out={tmp_path / 'x'}"]))
