"""`source=nab`: the Numenta Anomaly Benchmark (CSV `timestamp,value` + label windows).

Each file `data/<category>/<name>.csv` is split at NAB's probationary period (the first 15 % of
its rows, where detectors are not scored) into `<category>/<name>.train` (label `unknown`) and
`<category>/<name>.test` (`faulty` when a labelled window reaches it, else `healthy`), with a
`split` column. The one metric is `value`. Every timestamp inside a window of
`labels/combined_windows.json` gets point label 1. Timestamps are naive in NAB and read as UTC;
repeated timestamps (two AWS files have them) are dropped by validation and counted.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv

from canaryml.catalog import Direction, MetricKind, MetricSpec
from canaryml.data.contract import make_bundle, to_utc_timestamps
from canaryml.errors import DataContractError
from canaryml.ingest import Ingested

log = logging.getLogger(__name__)

STEP_S = 300
PROBATION = 0.15
METRIC = "value"
SPECS = (MetricSpec(name=METRIC, kind=MetricKind.INFRA, direction=Direction.BOTH),)


def default_input() -> Path:
    from canaryml.paths import repo_root

    return repo_root().parent / "shared" / "data" / "public" / "nab"


def _read_file(path: Path) -> pa.Table:
    if path.stat().st_size == 0:
        raise DataContractError(f"{path}: the file is empty; NAB files have the header "
                                "timestamp,value and one row per observation")
    try:
        table = pacsv.read_csv(path, convert_options=pacsv.ConvertOptions(
            column_types={"timestamp": pa.string(), "value": pa.float64()}))
    except pa.ArrowInvalid as exc:
        raise DataContractError(f"{path}: cannot be read as NAB CSV ({exc}); columns must be "
                                "timestamp,value with numeric values") from exc
    missing = [c for c in ("timestamp", "value") if c not in table.column_names]
    if missing:
        raise DataContractError(f"{path}: missing column(s) {missing}; NAB files have the header "
                                "timestamp,value")
    if table.num_rows == 0:
        raise DataContractError(f"{path}: the table has a header but no rows")
    ts = to_utc_timestamps(path, table, "timestamp")
    return pa.table({"timestamp": ts, "value": table.column("value")})


def read(folder: str | Path | None = None, categories: Sequence[str] | None = None,
         probation: float = PROBATION) -> Ingested:
    """Read NAB files (all categories under `data/`, or `categories`) as a bundle."""
    folder = Path(folder) if folder is not None else default_input()
    data_dir = folder / "data"
    windows_path = folder / "labels" / "combined_windows.json"
    if not data_dir.is_dir() or not windows_path.is_file():
        raise DataContractError(f"{folder} is not a NAB folder (needs data/<category>/*.csv and "
                                "labels/combined_windows.json); pass input=<nab folder>")
    if not 0.0 <= probation < 1.0:
        raise DataContractError(f"ingest.nab.probation={probation} must be in [0, 1)")
    available = sorted(p.name for p in data_dir.iterdir() if p.is_dir())
    wanted = list(categories) if categories else available
    missing = sorted(set(wanted) - set(available))
    if missing:
        raise DataContractError(f"{data_dir}: no category {missing}; available: {available} "
                                "(ingest.categories)")
    try:
        windows = json.loads(windows_path.read_text())
    except json.JSONDecodeError as exc:
        raise DataContractError(f"{windows_path}: not valid JSON ({exc}); restore it from NAB"
                                ) from exc

    deployments, parts, labels = [], [], []
    unsorted_rows = 0
    for category in wanted:
        for path in sorted((data_dir / category).glob("*.csv")):
            key = f"{category}/{path.name}"
            table = _read_file(path)
            ts_us = table.column("timestamp").cast(pa.int64()).to_numpy()
            values = table.column("value").to_numpy(zero_copy_only=False)
            # the probationary split is by time: sort first (stable, so of repeated
            # timestamps the row written last still comes last and wins de-duplication)
            n_unsorted = int(np.count_nonzero(np.diff(ts_us) < 0))
            if n_unsorted:
                unsorted_rows += n_unsorted
                log.info("%s: %d row(s) out of time order; sorted", path, n_unsorted)
            order = np.argsort(ts_us, kind="stable")
            ts_us, values = ts_us[order], values[order]
            n = len(ts_us)
            n_train = int(np.floor(probation * n))
            in_window = np.zeros(n, dtype=bool)
            for lo, hi in windows.get(key, []):
                lo_us = pd.Timestamp(lo, tz="UTC").value // 1000
                hi_us = pd.Timestamp(hi, tz="UTC").value // 1000
                in_window |= (ts_us >= lo_us) & (ts_us <= hi_us)
            base = f"{category}/{path.stem}"
            for split, rows in (("train", slice(0, n_train)), ("test", slice(n_train, n))):
                ts_part, v_part, w_part = ts_us[rows], values[rows], in_window[rows]
                if not len(ts_part):
                    continue
                dep_id = f"{base}.{split}"
                label = "unknown" if split == "train" else (
                    "faulty" if w_part.any() else "healthy")
                deployments.append({
                    "deployment_id": dep_id, "service": base,
                    "start": pd.Timestamp(int(ts_part.min()), unit="us", tz="UTC"),
                    "end": pd.Timestamp(int(ts_part.max()), unit="us", tz="UTC"),
                    "label": label, "fault_kind": None, "split": split})
                parts.append(pd.DataFrame({
                    "timestamp": pd.to_datetime(ts_part, unit="us", utc=True),
                    "deployment_id": dep_id, "group": "canary", "metric": METRIC,
                    "value": v_part}))
                hit = np.flatnonzero(w_part)
                if len(hit):
                    labels.append(pd.DataFrame({
                        "deployment_id": dep_id,
                        "timestamp": pd.to_datetime(ts_part[hit], unit="us", utc=True),
                        "anomaly": np.ones(len(hit), np.int8)}))
    if not deployments:
        raise DataContractError(f"{data_dir}: no NAB CSV files in categories {wanted}")
    bundle = make_bundle(pd.DataFrame(deployments), pd.concat(parts, ignore_index=True),
                         str(folder))
    bundle = dataclasses.replace(bundle, unsorted_rows=bundle.unsorted_rows + unsorted_rows)
    if bundle.duplicates_dropped:
        log.info("nab: %d repeated timestamp(s) dropped (kept the last value)",
                 bundle.duplicates_dropped)
    point_labels = (pd.concat(labels, ignore_index=True) if labels else
                    pd.DataFrame({"deployment_id": pd.Series(dtype=str),
                                  "timestamp": pd.Series(dtype="datetime64[us, UTC]"),
                                  "anomaly": pd.Series(dtype=np.int8)}))
    log.info("nab: %d files from %s", len(deployments) // 2, ", ".join(wanted))
    return Ingested(bundle=bundle, source="nab", native_step_s=STEP_S, point_labels=point_labels,
                    metrics=SPECS, extra_manifest={"categories": wanted,
                                                   "probation": probation})
