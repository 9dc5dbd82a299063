"""Bundle contract (DESIGN §2.1) and canonical dataset (§2.3): round trip and every bad input."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from canaryml.catalog import Catalog
from canaryml.cli import compose, main
from canaryml.data.contract import read_bundle, write_bundle
from canaryml.data.dataset import CanonicalDataset, write_canonical
from canaryml.errors import DataContractError
from canaryml.tasks import ingest as ingest_task

T0 = pd.Timestamp("2024-05-01T00:00:00Z")
STEP = 15
METRICS = ("latency_p99", "error_rate", "node_cpu")


def tiny_bundle(n_steps: int = 20) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Two deployments × two groups × 3 metrics on a 15 s grid, with one missing scrape per
    deployment (a gap) and NaN values on d2's canary error_rate."""
    deps = pd.DataFrame({
        "deployment_id": ["d1", "d2"], "service": ["web", "api"],
        "start": [T0.isoformat()] * 2,
        "end": [(T0 + pd.Timedelta(seconds=STEP * (n_steps - 1))).isoformat()] * 2,
        "label": ["healthy", "faulty"],
        "fault_onset": [None, (T0 + pd.Timedelta(seconds=60)).isoformat()],
    })
    rows = []
    for d_i, dep in enumerate(("d1", "d2")):
        for g_i, group in enumerate(("baseline", "canary")):
            for k in range(n_steps):
                if k == 5:
                    continue  # missed scrape for every metric at step 5
                ts = T0 + pd.Timedelta(seconds=STEP * k)
                for m_i, metric in enumerate(METRICS):
                    value = 100 * d_i + 10 * g_i + m_i + k / 100
                    if dep == "d2" and group == "canary" and metric == "error_rate" and k > 15:
                        value = np.nan
                    rows.append((ts.strftime("%Y-%m-%dT%H:%M:%SZ"), dep, group, metric, value))
    samples = pd.DataFrame(rows, columns=["timestamp", "deployment_id", "group", "metric",
                                          "value"])
    return deps, samples


def expected_value(d_i: int, g_i: int, m_i: int, k: int) -> float:
    return 100 * d_i + 10 * g_i + m_i + k / 100


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_round_trip_counts_step_gaps(tmp_path: Path, fmt: str) -> None:
    deps, samples = tiny_bundle()
    write_bundle(deps, samples, tmp_path / "bundle", fmt=fmt)
    bundle = read_bundle(tmp_path / "bundle")
    assert bundle.samples.num_rows == len(samples)
    manifest = write_canonical(bundle, tmp_path / "out", step_s=STEP, catalog=Catalog.default(),
                               source="bundle")
    ds = CanonicalDataset(tmp_path / "out")
    assert ds.step_s == STEP and ds.content_hash == manifest["content_hash"]
    assert list(ds.metrics) == [m for m in Catalog.default().names if m in METRICS]
    assert ds.catalog.get("node_cpu").kind == "infra"
    assert manifest["counts"]["rows"] == 2 * 2 * 20
    # gaps: step 5 of every (deployment, group, metric) + d2 canary error_rate k = 16..19
    assert manifest["counts"]["gaps"] == 2 * 2 * 3 + 4
    assert list(ds.deployments["deployment_id"]) == ["d1", "d2"]
    assert ds.deployments["fault_onset"].iloc[1] == T0 + pd.Timedelta(seconds=60)
    for d_i, dep in enumerate(("d1", "d2")):
        arr = ds.arrays(dep)
        assert arr.baseline is not None and arr.canary.shape == (20, 3)
        assert np.all(np.diff(arr.timestamps_s) == STEP)
        assert arr.timestamps_s[0] == T0.timestamp()
        assert np.isnan(arr.canary[5]).all() and np.isnan(arr.baseline[5]).all()
        k = 7
        for m_i, metric in enumerate(METRICS):
            col = arr.metrics.index(metric)
            assert arr.baseline[k, col] == pytest.approx(expected_value(d_i, 0, m_i, k))
            assert arr.canary[k, col] == pytest.approx(expected_value(d_i, 1, m_i, k))
    d2 = ds.arrays("d2")
    assert np.isnan(d2.canary[16:, d2.metrics.index("error_rate")]).all()
    assert ds.arrays("d2").anomaly is None


def test_point_labels_round_trip(tmp_path: Path) -> None:
    deps, samples = tiny_bundle()
    write_bundle(deps, samples, tmp_path / "bundle")
    labels = pd.DataFrame({"deployment_id": ["d2", "d2"],
                           "timestamp": [T0 + pd.Timedelta(seconds=STEP * 3),
                                         T0 + pd.Timedelta(seconds=STEP * 4)],
                           "anomaly": [1, 1]})
    write_canonical(read_bundle(tmp_path / "bundle"), tmp_path / "out", step_s=STEP,
                    catalog=Catalog.default(), source="bundle", point_labels=labels)
    ds = CanonicalDataset(tmp_path / "out")
    assert ds.manifest["point_labels"] is True
    assert ds.arrays("d1").anomaly.sum() == 0
    assert list(np.flatnonzero(ds.arrays("d2").anomaly)) == [3, 4]


def test_coarser_step_averages_instances_and_steps(tmp_path: Path) -> None:
    deps, samples = tiny_bundle()
    a, b = samples.copy(), samples.copy()
    a["instance"], b["instance"] = "pod-a", "pod-b"
    b["value"] = b["value"] + 2.0
    write_bundle(deps, pd.concat([a, b]), tmp_path / "bundle")
    write_canonical(read_bundle(tmp_path / "bundle"), tmp_path / "out", step_s=60,
                    catalog=Catalog.default(), source="bundle")
    arr = CanonicalDataset(tmp_path / "out").arrays("d1")
    assert len(arr.timestamps_s) == 5  # 20 steps of 15 s = 5 buckets of 60 s
    # bucket 2 holds k = 8..11: mean over k and over the two pods (+0, +2)
    want = np.mean([expected_value(0, 0, 0, k) for k in range(8, 12)]) + 1.0
    assert arr.baseline[2, arr.metrics.index("latency_p99")] == pytest.approx(want, rel=1e-6)


def test_duplicates_and_unsorted_are_fixed_and_counted(tmp_path: Path,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    deps, samples = tiny_bundle()
    dups = samples.iloc[:7].copy()
    dups["value"] = 999.0  # the last written duplicate wins
    shuffled = pd.concat([samples.sample(frac=1.0, random_state=1), dups])
    write_bundle(deps, shuffled, tmp_path / "bundle", fmt="csv")
    caplog.set_level(logging.INFO)
    cfg = compose("ingest", ["source=bundle", f"input={tmp_path / 'bundle'}",
                             f"out={tmp_path / 'out'}", "ingest.step_s=15"])
    assert ingest_task.run(cfg) == 0
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["counts"]["duplicates_dropped"] == 7
    assert manifest["counts"]["unsorted_rows"] > 0
    assert manifest["counts"]["samples_in"] == len(shuffled)
    assert "dropped 7 duplicate sample(s)" in caplog.text
    assert "out of time order" in caplog.text
    arr = CanonicalDataset(tmp_path / "out").arrays("d1")
    col = arr.metrics.index("latency_p99")
    assert arr.baseline[0, col] == pytest.approx(999.0)  # first sample row was duplicated
    assert arr.baseline[1, col] == pytest.approx(999.0)
    assert arr.baseline[3, col] == pytest.approx(expected_value(0, 0, 0, 3))


def test_native_step_is_inferred_when_step_is_null(tmp_path: Path) -> None:
    deps, samples = tiny_bundle()
    write_bundle(deps, samples, tmp_path / "bundle")
    cfg = compose("ingest", ["source=bundle", f"input={tmp_path / 'bundle'}",
                             f"out={tmp_path / 'out'}"])
    assert cfg.ingest.step_s is None
    assert ingest_task.run(cfg) == 0
    assert CanonicalDataset(tmp_path / "out").step_s == STEP


def test_epoch_seconds_and_naive_iso_timestamps(tmp_path: Path) -> None:
    deps, samples = tiny_bundle()
    epoch = samples.copy()
    epoch["timestamp"] = pd.to_datetime(epoch["timestamp"], utc=True).dt.as_unit("s").astype(
        "int64")
    write_bundle(deps, epoch, tmp_path / "epoch", fmt="csv")
    naive = samples.copy()
    naive["timestamp"] = naive["timestamp"].str.rstrip("Z")
    write_bundle(deps, naive, tmp_path / "naive", fmt="csv")
    for name in ("epoch", "naive"):
        write_canonical(read_bundle(tmp_path / name), tmp_path / f"out-{name}", step_s=STEP,
                        catalog=Catalog.default(), source="bundle")
    a = CanonicalDataset(tmp_path / "out-epoch").arrays("d1")
    b = CanonicalDataset(tmp_path / "out-naive").arrays("d1")
    np.testing.assert_array_equal(a.timestamps_s, b.timestamps_s)
    np.testing.assert_array_equal(a.canary, b.canary)


# ----------------------------------------------------------------------------- bad input


def _write_csv_bundle(folder: Path, deps: pd.DataFrame, samples: pd.DataFrame) -> Path:
    folder.mkdir(parents=True)
    deps.to_csv(folder / "deployments.csv", index=False)
    samples.to_csv(folder / "samples.csv", index=False)
    return folder


def _ingest_fails(tmp_path: Path, bundle: Path) -> str:
    out = tmp_path / "out"
    cfg = compose("ingest", ["source=bundle", f"input={bundle}", f"out={out}"])
    with pytest.raises(DataContractError) as info:
        ingest_task.run(cfg)
    assert not out.exists(), "a failed ingest must not leave an output folder"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.tmp")]
    return str(info.value)


def test_missing_column(tmp_path: Path) -> None:
    deps, samples = tiny_bundle()
    bundle = _write_csv_bundle(tmp_path / "b", deps, samples.drop(columns=["metric"]))
    msg = _ingest_fails(tmp_path, bundle)
    assert "samples.csv" in msg and "missing column(s) ['metric']" in msg
    assert "Required" in msg and "docs/data-contract.md" in msg


def test_unknown_group(tmp_path: Path) -> None:
    deps, samples = tiny_bundle()
    samples.loc[[3, 10], "group"] = "canary-v2"
    bundle = _write_csv_bundle(tmp_path / "b", deps, samples)
    msg = _ingest_fails(tmp_path, bundle)
    assert "samples.csv" in msg and "column 'group'" in msg and "baseline|canary" in msg
    assert "2 row(s)" in msg and "lines 5, 12" in msg and "canary-v2" in msg
    assert "Fix:" in msg


def test_samples_for_unknown_deployment(tmp_path: Path) -> None:
    deps, samples = tiny_bundle()
    samples.loc[0, "deployment_id"] = "ghost"
    bundle = _write_csv_bundle(tmp_path / "b", deps, samples)
    msg = _ingest_fails(tmp_path, bundle)
    assert "column 'deployment_id'" in msg and "not in the deployments table" in msg
    assert "ghost" in msg and "lines 2" in msg
    assert "add those deployments" in msg


@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), 1e39])
def test_infinite_or_beyond_float32_values_are_refused(tmp_path: Path, bad: float) -> None:
    deps, samples = tiny_bundle()
    samples.loc[3, "value"] = bad
    bundle = _write_csv_bundle(tmp_path / "b", deps, samples)
    msg = _ingest_fails(tmp_path, bundle)
    assert "column 'value'" in msg and "infinite or beyond float32" in msg
    assert "lines 5" in msg and "NaN for a missed scrape" in msg


def test_non_numeric_values(tmp_path: Path) -> None:
    deps, samples = tiny_bundle()
    samples["value"] = samples["value"].astype(object)
    samples.loc[4, "value"] = "12,5ms"
    bundle = _write_csv_bundle(tmp_path / "b", deps, samples)
    msg = _ingest_fails(tmp_path, bundle)
    assert "samples.csv" in msg and "column 'value'" in msg and "is not a number" in msg
    assert "lines 6" in msg and "12,5ms" in msg and "write floats" in msg


def test_non_numeric_values_parquet(tmp_path: Path) -> None:
    deps, samples = tiny_bundle()
    samples["value"] = samples["value"].astype(str)
    samples.loc[2, "value"] = "n/a-ish"
    bundle = tmp_path / "b"
    write_bundle(deps, samples, bundle)
    msg = _ingest_fails(tmp_path, bundle)
    assert "samples.parquet" in msg and "column 'value'" in msg and "n/a-ish" in msg


def test_empty_file(tmp_path: Path) -> None:
    deps, samples = tiny_bundle()
    bundle = _write_csv_bundle(tmp_path / "b", deps, samples)
    (bundle / "samples.csv").write_text("")
    msg = _ingest_fails(tmp_path, bundle)
    assert "samples.csv" in msg and "empty" in msg and "header row" in msg


def test_header_only_file(tmp_path: Path) -> None:
    deps, samples = tiny_bundle()
    bundle = _write_csv_bundle(tmp_path / "b", deps, samples.iloc[:0])
    msg = _ingest_fails(tmp_path, bundle)
    assert "samples.csv" in msg and "no rows" in msg


def test_truncated_parquet(tmp_path: Path) -> None:
    deps, samples = tiny_bundle()
    bundle = tmp_path / "b"
    write_bundle(deps, samples, bundle)
    data = (bundle / "samples.parquet").read_bytes()
    (bundle / "samples.parquet").write_bytes(data[: len(data) // 2])
    msg = _ingest_fails(tmp_path, bundle)
    assert "samples.parquet" in msg and "truncated" in msg and "write it again" in msg


def test_mixed_time_zones(tmp_path: Path) -> None:
    deps, samples = tiny_bundle()
    samples.loc[[7, 8], "timestamp"] = samples.loc[[7, 8], "timestamp"].str.rstrip("Z")
    bundle = _write_csv_bundle(tmp_path / "b", deps, samples)
    msg = _ingest_fails(tmp_path, bundle)
    assert "samples.csv" in msg and "column 'timestamp'" in msg and "mixes time zones" in msg
    assert "lines 9, 10" in msg and "UTC" in msg


def test_bad_timestamp_text(tmp_path: Path) -> None:
    deps, samples = tiny_bundle()
    samples.loc[11, "timestamp"] = "yesterday"
    bundle = _write_csv_bundle(tmp_path / "b", deps, samples)
    msg = _ingest_fails(tmp_path, bundle)
    assert "column 'timestamp'" in msg and "yesterday" in msg and "ISO-8601" in msg


def test_bad_deployment_label(tmp_path: Path) -> None:
    deps, samples = tiny_bundle()
    deps.loc[1, "label"] = "broken"
    bundle = _write_csv_bundle(tmp_path / "b", deps, samples)
    msg = _ingest_fails(tmp_path, bundle)
    assert "deployments.csv" in msg and "column 'label'" in msg and "broken" in msg


def test_cli_exit_code_and_previous_output_kept(tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    deps, samples = tiny_bundle()
    good = tmp_path / "good"
    write_bundle(deps, samples, good)
    out = tmp_path / "out"
    assert main(["ingest", "source=bundle", f"input={good}", f"out={out}"]) == 0
    before = json.loads((out / "manifest.json").read_text())["content_hash"]
    samples.loc[0, "group"] = "blue"
    bad = _write_csv_bundle(tmp_path / "bad", deps, samples)
    capsys.readouterr()
    assert main(["ingest", "source=bundle", f"input={bad}", f"out={out}"]) == 2
    err = capsys.readouterr().err
    assert "canaryml ingest: error:" in err and "column 'group'" in err and "blue" in err
    # a failed ingest leaves the previous complete dataset untouched
    assert json.loads((out / "manifest.json").read_text())["content_hash"] == before
    assert main(["ingest", "source=bundle", f"input={tmp_path / 'missing'}",
                 f"out={tmp_path / 'out2'}"]) == 2
    assert not (tmp_path / "out2").exists()


def test_hand_built_bundle_without_codes(tmp_path: Path) -> None:
    """write_canonical also accepts a Bundle whose integer codes were not precomputed."""
    from canaryml.data.contract import Bundle, table_from_pandas, validate_deployments

    deps, samples = tiny_bundle()
    deps_v = validate_deployments(deps)
    table = table_from_pandas(samples.assign(
        timestamp=pd.to_datetime(samples["timestamp"], utc=True)))
    write_canonical(Bundle(deps_v, table, "hand"), tmp_path / "out", step_s=STEP,
                    catalog=Catalog.default(), source="bundle")
    arr = CanonicalDataset(tmp_path / "out").arrays("d2")
    assert arr.canary[7, arr.metrics.index("node_cpu")] == pytest.approx(
        expected_value(1, 1, 2, 7))
    part = next((tmp_path / "out" / "telemetry").glob("deployment_id=d2/*.parquet"))
    assert pq.read_schema(part).field("latency_p99").type == pa.float32()


def test_scrape_order_duplicates_and_outside_window(tmp_path: Path,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    """Exporter dumps come in scrape order (deployment, time, series) with repeats next to
    each other: found in one pass, nothing counted as unsorted, the last written kept."""
    deps, samples = tiny_bundle()
    scrape = samples.sort_values(["deployment_id", "timestamp", "group", "metric"],
                                 kind="stable").reset_index(drop=True)
    repeat = scrape.iloc[[10]].assign(value=-5.0)
    late = scrape.iloc[[0]].assign(timestamp="2024-05-02T00:00:00Z")  # after d1's end
    rows = pd.concat([scrape.iloc[:11], repeat, scrape.iloc[11:]], ignore_index=True)
    rows = pd.concat([rows.iloc[:-1], late, rows.iloc[-1:]], ignore_index=True)
    write_bundle(deps, rows, tmp_path / "bundle", fmt="csv")
    caplog.set_level(logging.INFO)
    bundle = read_bundle(tmp_path / "bundle")
    # the late row is the newest of its series: misplaced in the file, but not out of order
    assert bundle.duplicates_dropped == 1 and bundle.unsorted_rows == 0
    manifest = write_canonical(bundle, tmp_path / "out", step_s=STEP, catalog=Catalog.default(),
                               source="bundle")
    assert manifest["counts"]["outside_window_dropped"] == 1
    assert "fall outside" in caplog.text
    r = scrape.iloc[10]
    arr = CanonicalDataset(tmp_path / "out").arrays(r["deployment_id"])
    k = int((pd.Timestamp(r["timestamp"]) - T0).total_seconds() // STEP)
    block = arr.canary if r["group"] == "canary" else arr.baseline
    assert block[k, arr.metrics.index(r["metric"])] == -5.0


def test_simulated_corpus_round_trip(tmp_path: Path) -> None:
    """The simulator's bundle survives ingest: counts, step, gaps and labels."""
    simulate = pytest.importorskip("canaryml.simulate")
    from canaryml.ingest import bundle as bundle_reader

    cfg = compose("simulate", ["n=4", "seed=3"])
    result = simulate.simulate_corpus(4, 3, cfg.simulate, Catalog.default())
    deps, samples = ((result.deployments, result.samples) if hasattr(result, "deployments")
                     else result)
    write_bundle(deps, samples, tmp_path / "bundle")
    ing = bundle_reader.read(tmp_path / "bundle")
    n_samples = samples.num_rows if isinstance(samples, pa.Table) else len(samples)
    assert ing.bundle.samples.num_rows + ing.bundle.duplicates_dropped == n_samples
    step = int(cfg.simulate.step_s)
    assert ing.native_step_s == step
    manifest = write_canonical(ing.bundle, tmp_path / "out", step_s=step,
                               catalog=Catalog.default(), source="simulator")
    ds = CanonicalDataset(tmp_path / "out")
    assert ds.step_s == step and len(ds.deployments) == 4
    assert sorted(ds.deployments["label"]) == sorted(pd.DataFrame(deps)["label"])
    n_values = 0
    for arr in ds.iter_arrays():
        assert np.all(np.diff(arr.timestamps_s) == step)
        n_values += int(np.isfinite(arr.canary).sum())
        if arr.baseline is not None:
            n_values += int(np.isfinite(arr.baseline).sum())
    # every finite cell comes from at least one sample, and gaps are what is left
    assert 0 < n_values <= n_samples
    assert manifest["counts"]["gaps"] + n_values == manifest["counts"]["rows"] * len(ds.metrics)


@pytest.mark.parametrize("fmt", ["csv", "parquet", "parquet-typed"])
def test_streaming_read_matches_the_whole_table_path(tmp_path: Path, fmt: str) -> None:
    """A valid bundle streams into integer codes (no samples table held); the table built from
    them on demand equals what the whole-table reader produces, duplicates and disorder too."""
    from canaryml.data.contract import read_deployments, read_samples, validate_samples

    deps, samples = tiny_bundle()
    a, b = samples.copy(), samples.copy()
    a["instance"], b["instance"] = "pod-a", "pod-b"
    dups = a.iloc[:5].copy()
    dups["value"] = 7.0
    mixed = pd.concat([a, b.sample(frac=1.0, random_state=2), dups])
    if fmt == "parquet-typed":  # typed timestamps, as most Parquet producers write them
        mixed["timestamp"] = pd.to_datetime(mixed["timestamp"], utc=True)
    fmt = fmt.split("-")[0]
    write_bundle(deps, mixed, tmp_path / "bundle", fmt=fmt)
    bundle = read_bundle(tmp_path / "bundle")
    assert bundle.table is None and bundle.codes is not None  # the streaming path was taken
    assert bundle.num_samples == len(mixed) - 5 and bundle.duplicates_dropped == 5
    assert bundle.unsorted_rows > 0
    dep_t = read_deployments(tmp_path / "bundle" / f"deployments.{fmt}")
    whole, dups_n, unsorted = validate_samples(
        read_samples(tmp_path / "bundle" / f"samples.{fmt}"), dep_t)
    assert (dups_n, unsorted) == (bundle.duplicates_dropped, bundle.unsorted_rows)
    assert bundle.samples.to_pandas().equals(whole.to_pandas())


def test_mixed_time_zones_parquet_text(tmp_path: Path) -> None:
    deps, samples = tiny_bundle()
    samples.loc[[7, 8], "timestamp"] = samples.loc[[7, 8], "timestamp"].str.rstrip("Z")
    write_bundle(deps, samples, tmp_path / "b")
    msg = _ingest_fails(tmp_path, tmp_path / "b")
    assert "samples.parquet" in msg and "mixes time zones" in msg and "rows 7, 8" in msg
