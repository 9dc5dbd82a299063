"""`source=smd`: the Server Machine Dataset (OmniAnomaly, KDD 2019).

Layout: `train/<machine>.txt` and `test/<machine>.txt` (no header, 38 comma-separated floats
per minute) and `test_label/<machine>.txt` (one 0/1 per test row). Each machine with both
files becomes two deployments, `<machine>.train` (label `unknown`) and `<machine>.test`
(`faulty` when any minute is labelled, else `healthy`), with a `split` column. Timestamps are
synthetic: one per minute from a fixed epoch, the test part right after the train part. All
38 metrics (`smd_00`…`smd_37`, infra) are on the `canary` group; the per-minute labels become
the canonical `anomaly` column.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv

from canaryml.catalog import Direction, MetricKind, MetricSpec
from canaryml.data.contract import DICT, TS, make_bundle
from canaryml.errors import DataContractError
from canaryml.ingest import Ingested

log = logging.getLogger(__name__)

STEP_S = 60
N_METRICS = 38
EPOCH_S = 1_577_836_800  # 2020-01-01T00:00:00Z: SMD publishes no timestamps
METRICS = tuple(f"smd_{i:02d}" for i in range(N_METRICS))
SPECS = tuple(MetricSpec(name=m, kind=MetricKind.INFRA, direction=Direction.BOTH,
                         unit="min-max scaled") for m in METRICS)


def default_input() -> Path:
    from canaryml.paths import repo_root

    return repo_root().parent / "shared" / "data" / "public" / "smd"


def _read_matrix(path: Path) -> np.ndarray:
    if path.stat().st_size == 0:
        raise DataContractError(f"{path}: the file is empty; SMD files hold 38 comma-separated "
                                "floats per line: restore it from the SMD release")
    try:
        table = pacsv.read_csv(path, read_options=pacsv.ReadOptions(autogenerate_column_names=True),
                               convert_options=pacsv.ConvertOptions(
                                   column_types={f"f{i}": pa.float64() for i in range(N_METRICS)}))
    except pa.ArrowInvalid as exc:
        raise DataContractError(f"{path}: not an SMD file ({exc}); each line must hold 38 "
                                "comma-separated floats: restore it from the SMD release") from exc
    if table.num_columns != N_METRICS:
        raise DataContractError(f"{path}: {table.num_columns} columns, SMD has {N_METRICS}; "
                                "restore the file from the SMD release")
    return np.column_stack([table.column(i).to_numpy() for i in range(N_METRICS)])


def _read_labels(path: Path, n_rows: int) -> np.ndarray:
    labels = np.loadtxt(path, dtype=np.int8, ndmin=1)
    if len(labels) != n_rows:
        raise DataContractError(f"{path}: {len(labels)} labels for {n_rows} test rows; the label "
                                "file must have one 0/1 line per test row")
    return labels


def machines_in(folder: Path) -> list[str]:
    """Machines that have both a train and a test file."""
    train = {p.stem for p in (folder / "train").glob("*.txt")}
    test = {p.stem for p in (folder / "test").glob("*.txt")}
    return sorted(train & test)


def read(folder: str | Path | None = None, machines: Sequence[str] | None = None) -> Ingested:
    """Read SMD machines (all with train+test files, or `machines`) as a bundle."""
    folder = Path(folder) if folder is not None else default_input()
    if not (folder / "train").is_dir() or not (folder / "test").is_dir():
        raise DataContractError(f"{folder} is not an SMD folder (needs train/, test/ and "
                                "test_label/); pass input=<smd folder>")
    available = machines_in(folder)
    wanted = list(machines) if machines else available
    missing = sorted(set(wanted) - set(available))
    if missing:
        raise DataContractError(f"{folder}: no train+test files for machine(s) {missing}; "
                                f"available: {available} (ingest.machines)")
    if not wanted:
        raise DataContractError(f"{folder}: no machine has both train/ and test/ files")

    deployments, parts, labels = [], [], []
    metric_codes = np.arange(N_METRICS, dtype=np.int32)
    t0_s = EPOCH_S
    for machine in wanted:
        train = _read_matrix(folder / "train" / f"{machine}.txt")
        test = _read_matrix(folder / "test" / f"{machine}.txt")
        test_label = _read_labels(folder / "test_label" / f"{machine}.txt", len(test))
        for split, values in (("train", train), ("test", test)):
            dep_id = f"{machine}.{split}"
            n = len(values)
            ts_s = t0_s + STEP_S * np.arange(n, dtype=np.int64)
            label = "unknown" if split == "train" else (
                "faulty" if test_label.any() else "healthy")
            deployments.append({
                "deployment_id": dep_id, "service": machine,
                "start": pd.Timestamp(int(ts_s[0]), unit="s", tz="UTC"),
                "end": pd.Timestamp(int(ts_s[-1]), unit="s", tz="UTC"),
                "label": label, "fault_kind": None, "split": split,
            })
            parts.append(pa.table({
                "timestamp": pa.array(np.repeat(ts_s * 1_000_000, N_METRICS)).cast(
                    pa.timestamp("us")).cast(TS),
                "deployment_id": pa.DictionaryArray.from_arrays(
                    pa.array(np.zeros(n * N_METRICS, np.int32)), pa.array([dep_id])),
                "group": pa.DictionaryArray.from_arrays(
                    pa.array(np.zeros(n * N_METRICS, np.int32)), pa.array(["canary"])),
                "metric": pa.DictionaryArray.from_arrays(
                    pa.array(np.tile(metric_codes, n)), pa.array(list(METRICS))),
                "value": pa.array(values.reshape(-1), pa.float64()),
            }))
            if split == "test":
                hit = np.flatnonzero(test_label > 0)
                labels.append(pd.DataFrame({
                    "deployment_id": dep_id,
                    "timestamp": pd.to_datetime(ts_s[hit], unit="s", utc=True),
                    "anomaly": np.ones(len(hit), np.int8)}))
            t0_s = int(ts_s[-1]) + STEP_S
        log.info("smd %s: %d train + %d test minutes, %d labelled", machine, len(train),
                 len(test), int(test_label.sum()))
    samples = pa.concat_tables([p.cast(p.schema.set(1, pa.field("deployment_id", DICT))
                                       .set(2, pa.field("group", DICT))
                                       .set(3, pa.field("metric", DICT))) for p in parts]
                               ).unify_dictionaries()
    bundle = make_bundle(pd.DataFrame(deployments), samples, str(folder))
    point_labels = pd.concat(labels, ignore_index=True)
    return Ingested(bundle=bundle, source="smd", native_step_s=STEP_S,
                    point_labels=point_labels, metrics=SPECS,
                    extra_manifest={"machines": wanted, "epoch_s": EPOCH_S})
