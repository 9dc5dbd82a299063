"""The streaming CSV ingest path (issue 14) gives what the whole-table path gives.

The streaming reader parses names as plain text, codes them per batch and skips the parser's
per-row UTF-8 check; these tests pin what that must not change: the codes and the metric
order of the whole-table path, a metric first seen late in the file, a name that is not
UTF-8, values beyond float32, samples outside their window, and the process's huge-page
setting restored after ingest. Speed is measured by `make bench`, never here.
"""

from __future__ import annotations

import ctypes
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from canaryml.catalog import Catalog
from canaryml.data import contract
from canaryml.data.contract import (
    _Fallback,
    _parsed_ahead,
    read_bundle,
    read_samples,
    small_pages,
    stream_sample_codes,
    validate_samples_codes,
)
from canaryml.data.dataset import write_canonical
from canaryml.errors import DataContractError


def _bundle(folder: Path, rows: list[tuple[str, str, str, str, str]]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    pd.DataFrame({"deployment_id": ["d1", "d2"], "service": ["s", "s"],
                  "start": ["2024-05-01T00:00:00Z"] * 2, "end": ["2024-05-01T00:10:00Z"] * 2,
                  "label": ["healthy", "faulty"]}).to_csv(folder / "deployments.csv",
                                                          index=False)
    lines = ["timestamp,deployment_id,group,metric,value"]
    lines += [",".join(r) for r in rows]
    (folder / "samples.csv").write_bytes(("\n".join(lines) + "\n").encode("utf-8"))
    return folder


def _rows(n_steps: int = 40) -> list[tuple[str, str, str, str, str]]:
    rows = []
    for t in range(n_steps):
        ts = (pd.Timestamp("2024-05-01T00:00:00Z") + pd.Timedelta(seconds=15 * t)
              ).strftime("%Y-%m-%dT%H:%M:%SZ")
        for dep in ("d1", "d2"):
            for grp in ("baseline", "canary"):
                metrics = ["latency_p99", "error_rate"] + (["zz_late"] if t >= n_steps // 2
                                                           else [])
                for m in metrics:
                    value = "" if (t + len(m)) % 17 == 0 else f"{t * 0.5 + len(m):.3f}"
                    rows.append((ts, dep, grp, m, value))
    return rows


def test_streaming_codes_equal_the_whole_table_path(tmp_path: Path) -> None:
    folder = _bundle(tmp_path / "b", _rows())
    bundle = read_bundle(folder)
    assert bundle.table is None  # the streaming path took it
    assert bundle.codes is not None
    deps = bundle.deployments
    _, dups, unsorted, whole = validate_samples_codes(read_samples(folder / "samples.csv"),
                                                      deps, folder / "samples.csv")
    codes = bundle.codes
    # the metric first seen halfway through the file keeps its place after the others
    assert codes.metrics == whole.metrics == ("latency_p99", "error_rate", "zz_late")
    for name in ("deployment", "group", "metric", "timestamp_us"):
        assert np.array_equal(getattr(codes, name), getattr(whole, name)), name
    assert np.array_equal(codes.value, whole.value, equal_nan=True)
    assert (bundle.duplicates_dropped, bundle.unsorted_rows) == (dups, unsorted)


def test_a_metric_name_that_is_not_utf8_is_refused(tmp_path: Path) -> None:
    folder = _bundle(tmp_path / "b", _rows(4))
    with open(folder / "samples.csv", "ab") as fh:
        fh.write(b"2024-05-01T00:01:00Z,d1,canary,lat\xff\xfe,1.0\n")
    # the streaming reader refuses it (the parser does not check UTF-8 row by row) ...
    deployments = read_bundle(_bundle(tmp_path / "ok", _rows(4))).deployments
    with pytest.raises((_Fallback, pa.ArrowInvalid)):
        stream_sample_codes(folder / "samples.csv", deployments)
    # ... and the whole-table path reports it
    with pytest.raises(DataContractError):
        read_bundle(folder)


@pytest.mark.parametrize("bad", [("d9", "canary", "latency_p99", "1.0", "deployment_id"),
                                 ("d1", "canry", "latency_p99", "1.0", "group"),
                                 ("d1", "canary", "latency_p99", "1e39", "value")])
def test_bad_rows_are_named_by_the_whole_table_path(tmp_path: Path,
                                                     bad: tuple[str, ...]) -> None:
    dep, grp, metric, value, column = bad
    rows = _rows(4)
    rows.insert(5, ("2024-05-01T00:00:15Z", dep, grp, metric, value))
    folder = _bundle(tmp_path / "b", rows)
    with pytest.raises(DataContractError, match=rf"column '{column}'.*line"):
        read_bundle(folder)


def test_samples_outside_the_window_are_dropped_and_counted(tmp_path: Path) -> None:
    rows = _rows(4)
    rows.append(("2024-04-30T23:59:00Z", "d1", "canary", "latency_p99", "1.0"))  # before start
    rows.append(("2024-05-01T00:10:15Z", "d2", "canary", "latency_p99", "1.0"))  # after end
    folder = _bundle(tmp_path / "b", rows)
    manifest = write_canonical(read_bundle(folder), tmp_path / "out", step_s=15,
                               catalog=Catalog.default(), source="bundle")
    assert manifest["counts"]["outside_window_dropped"] == 2
    assert manifest["counts"]["samples_in"] == len(rows)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl is Linux only")
def test_small_pages_restores_the_huge_page_setting() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    before = libc.prctl(42, 0, 0, 0, 0)  # PR_GET_THP_DISABLE
    with small_pages():
        pass
    assert libc.prctl(42, 0, 0, 0, 0) == before


def test_manifest_counts_survive_a_round_trip(tmp_path: Path) -> None:
    folder = _bundle(tmp_path / "b", _rows(8))
    manifest = write_canonical(read_bundle(folder), tmp_path / "out", step_s=15,
                               catalog=Catalog.default(), source="bundle")
    saved = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert saved["counts"] == manifest["counts"]
    assert "zz_late" in saved["metrics"]  # a metric outside the catalog is kept


def test_parsing_ahead_yields_every_batch_in_order_and_raises_the_parse_error() -> None:
    batches = [pa.record_batch({"x": [i]}) for i in range(7)]
    assert [b.column(0)[0].as_py() for b in _parsed_ahead(iter(batches))] == list(range(7))

    def broken():
        yield batches[0]
        raise pa.ArrowInvalid("CSV parse error: row 3")

    got = []
    with pytest.raises(pa.ArrowInvalid, match="row 3"):
        for b in _parsed_ahead(broken()):
            got.append(b)
    assert len(got) == 1


def test_parsing_ahead_stops_its_thread_when_the_reader_leaves_early() -> None:
    import threading

    produced = []

    def endless():
        i = 0
        while True:
            produced.append(i)
            yield pa.record_batch({"x": [i]})
            i += 1

    ahead = _parsed_ahead(endless(), depth=2)
    next(ahead)
    ahead.close()  # what a `_Fallback` raised by the consumer does
    assert not [t for t in threading.enumerate() if t.name == "canaryml-csv-parse"]
    assert len(produced) <= 5  # it parsed at most `depth` batches ahead


@pytest.mark.parametrize("threaded", [True, False])
def test_a_bad_row_deep_in_a_large_file_falls_back_in_both_modes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, threaded: bool) -> None:
    monkeypatch.setattr(contract, "_parse_in_threads", lambda: threaded)
    monkeypatch.setattr(contract, "_STREAM_BLOCK", 1 << 12)  # many batches
    rows = _rows(60)
    rows.insert(len(rows) - 10, ("2024-05-01T00:02:00Z", "d1", "canry", "latency_p99", "1.0"))
    folder = _bundle(tmp_path / "b", rows)
    with pytest.raises(DataContractError, match=r"column 'group'.*line"):
        read_bundle(folder)
    good = _bundle(tmp_path / "g", _rows(60))
    assert read_bundle(good).num_samples == len(_rows(60))
