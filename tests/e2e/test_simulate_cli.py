"""`canaryml simulate out=… n=20 seed=1` through the real CLI entry point."""

from __future__ import annotations

from pathlib import Path

import pytest

from canaryml.cli import main
from canaryml.data.contract import read_bundle
from canaryml.simulate import FAMILIES


def test_simulate_cli_writes_bundle_and_prints_table(tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "bundle"
    assert main(["simulate", f"out={out}", "n=20", "seed=1"]) == 0
    printed = capsys.readouterr().out
    assert (out / "deployments.parquet").is_file() and (out / "samples.parquet").is_file()
    bundle = read_bundle(out)
    deps = bundle.deployments
    assert len(deps) == 20

    lines = printed.strip().splitlines()
    assert lines[0].startswith("simulated 20 deployments") and str(out) in lines[0]
    header = lines[1].split()
    assert header == ["label", "family", "n", "breached", "onset_to_impact_min_p50"]
    counts = {}
    for line in lines[2:]:
        label, family, n, breached, _ = line.split()
        assert family in FAMILIES and label in ("healthy", "faulty")
        counts[family] = int(n)
        assert 0 <= int(breached) <= int(n)
    assert sum(counts.values()) == 20
    assert counts == deps["variant"].value_counts().to_dict()
    n_faulty = int((deps["label"] == "faulty").sum())
    assert f"({n_faulty} faulty" in lines[0] and 7 <= n_faulty <= 13

    # same seed again: identical tables
    again = tmp_path / "again"
    assert main(["simulate", f"out={again}", "n=20", "seed=1"]) == 0
    assert read_bundle(again).samples.to_pandas().equals(bundle.samples.to_pandas())


def test_simulate_cli_bad_input_exits_nonzero(tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["simulate", f"out={tmp_path / 'x'}", "n=0"]) == 2
    assert "n=0" in capsys.readouterr().err
    assert main(["simulate", f"out={tmp_path / 'y'}", "n=2", "simulate.bogus=1"]) == 2
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_simulate_cli_csv_and_default_out(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                          ) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["simulate", "n=3", "seed=2", "simulate.format=csv"]) == 0
    assert (tmp_path / "data" / "simulated" / "samples.csv").is_file()
    assert len(read_bundle(tmp_path / "data" / "simulated").deployments) == 3
