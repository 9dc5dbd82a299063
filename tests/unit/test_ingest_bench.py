"""The ingest benchmark runs end to end on a small bundle and writes a complete report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from canaryml.bench import ingest as bench
from canaryml.data.contract import read_bundle


def test_generated_bundle_matches_its_metadata(tmp_path: Path) -> None:
    meta = bench.generate_bundle(tmp_path / "b", 20_000, seed=1)
    assert meta["samples"] >= 20_000
    bundle = read_bundle(tmp_path / "b")
    # ~0.1 % duplicated rows are dropped, everything else is kept
    assert bundle.samples.num_rows + bundle.duplicates_dropped == meta["samples"]
    assert 0 < bundle.duplicates_dropped < meta["samples"] * 0.01
    assert bundle.unsorted_rows == 0
    assert len(bundle.deployments) == meta["deployments"]


def test_bench_writes_report(tmp_path: Path) -> None:
    result = bench.run(tmp_path, n_samples=20_000, repeats=1)
    report = json.loads((tmp_path / "ingest.json").read_text())
    assert report["summary"] == result["summary"]
    samples = report["input"]["samples"]
    assert samples >= 20_000
    for side in ("canaryml", "pandas"):
        assert report[side]["seconds"] > 0
        # seconds are rounded to ms in the report
        assert report[side]["samples_per_s"] == pytest.approx(
            samples / report[side]["seconds"], rel=0.05)
        assert report[side]["peak_rss_mb"] > 0
        assert report[side]["cpu_s"] > 0
    assert report["canaryml"]["duplicates_dropped"] > 0
    checks = report["checks"]
    assert checks["samples_per_s"] == (report["canaryml"]["samples_per_s"] >= 2_000_000)
    assert checks["speedup_vs_pandas"] == (report["speedup_vs_pandas"] >= 1.0)
    assert report["peak_rss_vs_pandas"] == pytest.approx(
        report["canaryml"]["max_peak_rss_mb"] / report["pandas"]["peak_rss_mb"], abs=0.01)
    assert checks["peak_rss"] == (report["peak_rss_vs_pandas"] <= 1.0)
    assert checks["samples_10m"] is False  # a 20 k-sample bundle never meets the target
    assert report["meets_target"] is False
    assert len(report["machine"]["load_after"]) == 3
    assert report["machine"]["cpus"] >= 1
    # the cached bundle is reused by the next run
    assert (tmp_path / ".cache").is_dir()
