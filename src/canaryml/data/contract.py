"""Telemetry bundle contract (DESIGN §2.1): read, validate and normalise `deployments` + `samples`.

A bundle is a folder with `deployments.{parquet,csv}` and `samples.{parquet,csv}` (or a
`samples/` folder of Parquet files). Validation uses Arrow schemas and compute kernels so a 10 M
row bundle validates in seconds; every violation raises `DataContractError` naming the file, the
column, the first offending rows and the fix.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from canaryml.data.atomic import atomic_dir
from canaryml.errors import DataContractError

log = logging.getLogger(__name__)

GROUPS = ("baseline", "canary")
LABELS = ("healthy", "faulty", "unknown")
TS = pa.timestamp("us", tz="UTC")
DICT = pa.dictionary(pa.int32(), pa.string())

DEPLOYMENTS_SCHEMA = pa.schema(
    [
        ("deployment_id", pa.string()),
        ("service", pa.string()),
        ("start", TS),
        ("end", TS),
        ("label", pa.string()),
        ("fault_onset", TS),
        ("impact_at", TS),
        ("fault_kind", pa.string()),
    ]
)
DEPLOYMENTS_REQUIRED = ("deployment_id", "service", "start", "end", "label")
SAMPLES_SCHEMA = pa.schema(
    [
        ("timestamp", TS),
        ("deployment_id", DICT),
        ("group", DICT),
        ("metric", DICT),
        ("value", pa.float64()),
        ("instance", DICT),
    ]
)
SAMPLES_REQUIRED = ("timestamp", "deployment_id", "group", "metric", "value")
_SHOW = 5  # offending rows shown in an error


@dataclass(frozen=True)
class Bundle:
    """Validated bundle tables. `samples` is an Arrow table (it can be tens of millions of rows)."""

    deployments: pd.DataFrame
    samples: pa.Table
    source: str
    duplicates_dropped: int = 0
    unsorted_rows: int = 0


# --------------------------------------------------------------------------- file discovery


def _find_table(folder: Path, name: str) -> Path:
    candidates = [folder / f"{name}.parquet", folder / f"{name}.csv", folder / name]
    found = [p for p in candidates if p.exists()]
    if not found:
        raise DataContractError(
            f"bundle {folder}: no '{name}' table; expected {name}.parquet or {name}.csv "
            "(see docs/data-contract.md)"
        )
    if len(found) > 1:
        log.warning("bundle %s: several '%s' tables %s; using %s", folder, name, found, found[0])
    return found[0]


def _read_table(path: Path, csv_types: dict[str, pa.DataType]) -> pa.Table:
    try:
        if path.is_dir() or path.suffix == ".parquet":
            if path.is_file() and path.stat().st_size == 0:
                raise DataContractError(f"{path}: the file is empty; write the table again")
            return pads.dataset(path, format="parquet").to_table()
        if path.stat().st_size == 0:
            raise DataContractError(f"{path}: the file is empty; it needs a header row and data")
        return pacsv.read_csv(
            path,
            convert_options=pacsv.ConvertOptions(
                column_types=csv_types,
                strings_can_be_null=True,
                timestamp_parsers=[pacsv.ISO8601],
            ),
        )
    except DataContractError:
        raise
    except pa.ArrowInvalid as exc:
        msg = str(exc)
        if path.suffix == ".csv" and "conversion error" in msg:
            # re-read untyped to name the bad rows precisely
            raise _csv_conversion_error(path, msg) from exc
        if "Empty CSV file" in msg:
            raise DataContractError(f"{path}: the file is empty; it needs a header row and data") from exc
        raise DataContractError(
            f"{path}: cannot be read ({msg}); the file is truncated or not "
            f"{'Parquet' if path.suffix != '.csv' else 'CSV'}: write it again"
        ) from exc
    except OSError as exc:
        raise DataContractError(f"{path}: cannot be read ({exc}); write it again") from exc


def _csv_conversion_error(path: Path, msg: str) -> DataContractError:
    raw = pacsv.read_csv(
        path,
        convert_options=pacsv.ConvertOptions(
            column_types={"value": pa.string(), "timestamp": pa.string()}, strings_can_be_null=True
        ),
    )
    if "value" in raw.column_names:
        vals = raw.column("value").to_pandas()
        num = pd.to_numeric(vals, errors="coerce")
        bad = np.flatnonzero(num.isna().to_numpy() & vals.notna().to_numpy()
                             & ~vals.astype("string").str.lower().isin(["nan", ""]).to_numpy())
        if len(bad):
            return _rows_error(path, "value", raw, bad, "is not a number",
                               "write floats (NaN or an empty cell for a missed scrape)")
    return DataContractError(f"{path}: {msg}; fix the column types (see docs/data-contract.md)")


def _rows_error(path: Path, column: str, table: pa.Table, rows: np.ndarray, what: str,
                fix: str) -> DataContractError:
    shown = table.take(pa.array(rows[:_SHOW])).to_pandas()
    lines = shown.to_string(index=False, max_colwidth=40)
    idx = ", ".join(str(int(r) + 2 if path.suffix == ".csv" else int(r)) for r in rows[:_SHOW])
    where = "lines" if path.suffix == ".csv" else "rows"
    return DataContractError(
        f"{path}: column '{column}' {what} in {len(rows)} row(s); first at {where} {idx}:\n"
        f"{lines}\nFix: {fix}."
    )


def _require_columns(path: Path, table: pa.Table, required: tuple[str, ...]) -> None:
    missing = [c for c in required if c not in table.column_names]
    if missing:
        raise DataContractError(
            f"{path}: missing column(s) {missing}; found {table.column_names}. "
            f"Required: {list(required)} (see docs/data-contract.md)"
        )
    if table.num_rows == 0:
        raise DataContractError(f"{path}: the table has a header but no rows")


# --------------------------------------------------------------------------- timestamps


def to_utc_timestamps(path: Path, table: pa.Table, column: str) -> pa.Array:
    """Normalise a timestamp column to timestamp[us, UTC].

    Accepts Arrow timestamps (naive = UTC), ISO-8601 strings with one consistent time-zone style
    and epoch seconds (int or float). Naive and zone-qualified values mixed in one column are
    ambiguous and rejected.
    """
    col = table.column(column).combine_chunks()
    if isinstance(col, pa.DictionaryArray):
        col = col.dictionary_decode()
    typ = col.type
    if pa.types.is_timestamp(typ):
        if typ.tz is None:
            col = pc.assume_timezone(col, "UTC")
        return pc.cast(col, TS)
    if pa.types.is_integer(typ) or pa.types.is_floating(typ):
        secs = pc.cast(col, pa.float64())
        micros = pc.cast(pc.round(pc.multiply(secs, 1e6)), pa.int64())
        return pc.cast(micros, pa.int64()).cast(pa.timestamp("us")).cast(TS)
    if pa.types.is_string(typ) or pa.types.is_large_string(typ) or pa.types.is_null(typ):
        s = pc.utf8_trim_whitespace(pc.cast(col, pa.string()))
        present = pc.is_valid(s)
        has_zone = pc.match_substring_regex(s, r"(Z|[+-]\d\d:?\d\d)$")
        n_zone = pc.sum(pc.and_(present, has_zone)).as_py() or 0
        n_present = pc.sum(present).as_py() or 0
        if 0 < n_zone < n_present:
            naive = np.flatnonzero(
                pc.and_(present, pc.invert(has_zone)).to_numpy(zero_copy_only=False))
            raise _rows_error(path, column, table, naive, "mixes time zones (some values have "
                              "an offset or Z, these have none)",
                              "write every timestamp in UTC with a Z suffix, or all without zone")
        ser = pd.Series(s.to_pandas(), dtype="object")
        parsed = pd.to_datetime(ser, utc=True, errors="coerce", format="ISO8601")
        bad = np.flatnonzero(parsed.isna().to_numpy() & ser.notna().to_numpy())
        if len(bad):
            raise _rows_error(path, column, table, bad, "is not an ISO-8601 timestamp",
                              "write ISO-8601 (2024-05-01T12:00:00Z) or epoch seconds")
        return pa.array(parsed.dt.as_unit("us"), type=TS)
    raise DataContractError(
        f"{path}: column '{column}' has type {typ}; write ISO-8601 timestamps or epoch seconds"
    )


# --------------------------------------------------------------------------- deployments


def read_deployments(path: Path) -> pd.DataFrame:
    table = _read_table(path, {"deployment_id": pa.string(), "service": pa.string(),
                               "label": pa.string(), "fault_kind": pa.string(),
                               "start": pa.string(), "end": pa.string(),
                               "fault_onset": pa.string(), "impact_at": pa.string()})
    _require_columns(path, table, DEPLOYMENTS_REQUIRED)
    return validate_deployments(table, path)


def validate_deployments(table: pa.Table | pd.DataFrame, path: Path | str = "<deployments>"
                         ) -> pd.DataFrame:
    """Validate and normalise a deployments table; returns a DataFrame in DEPLOYMENTS_SCHEMA."""
    path = Path(path)
    if isinstance(table, pd.DataFrame):
        table = pa.Table.from_pandas(table, preserve_index=False)
    _require_columns(path, table, DEPLOYMENTS_REQUIRED)
    cols: dict[str, pa.Array] = {}
    for name in ("deployment_id", "service", "label", "fault_kind"):
        if name in table.column_names:
            col = table.column(name).combine_chunks()
            if isinstance(col, pa.DictionaryArray):
                col = col.dictionary_decode()
            cols[name] = pc.cast(col, pa.string())
        else:
            cols[name] = pa.nulls(table.num_rows, pa.string())
    for name in ("start", "end", "fault_onset", "impact_at"):
        cols[name] = (to_utc_timestamps(path, table, name) if name in table.column_names
                      else pa.nulls(table.num_rows, TS))
    out = pa.table({f.name: cols[f.name] for f in DEPLOYMENTS_SCHEMA}, schema=DEPLOYMENTS_SCHEMA)

    ids = out.column("deployment_id")
    null_ids = np.flatnonzero(pc.is_null(ids).to_numpy(zero_copy_only=False))
    if len(null_ids):
        raise _rows_error(path, "deployment_id", out, null_ids, "is empty",
                          "give every deployment a unique id")
    dup = pd.Series(ids.to_pylist()).duplicated(keep=False).to_numpy()
    if dup.any():
        raise _rows_error(path, "deployment_id", out, np.flatnonzero(dup), "is not unique",
                          "give every deployment a unique id")
    label = pc.fill_null(out.column("label"), "unknown")
    bad = np.flatnonzero(pc.invert(pc.is_in(label, pa.array(LABELS))).to_numpy(zero_copy_only=False))
    if len(bad):
        raise _rows_error(path, "label", out, bad, "is not one of healthy|faulty|unknown",
                          "label each deployment healthy, faulty or unknown")
    for name in ("start", "end"):
        nulls = np.flatnonzero(pc.is_null(out.column(name)).to_numpy(zero_copy_only=False))
        if len(nulls):
            raise _rows_error(path, name, out, nulls, "is empty",
                              "give the observation window's start and end")
    backwards = np.flatnonzero(pc.less(out.column("end"), out.column("start"))
                               .to_numpy(zero_copy_only=False))
    if len(backwards):
        raise _rows_error(path, "end", out, backwards, "is before start", "swap start and end")
    df = out.to_pandas()
    df["label"] = label.to_pandas()
    df["service"] = df["service"].fillna("unknown")
    return df


# --------------------------------------------------------------------------- samples


def read_samples(path: Path) -> pa.Table:
    table = _read_table(path, {"deployment_id": DICT, "group": DICT, "metric": DICT,
                               "instance": DICT, "value": pa.float64()})
    _require_columns(path, table, SAMPLES_REQUIRED)
    return table


def validate_samples(table: pa.Table, deployments: pd.DataFrame,
                     path: Path | str = "<samples>") -> tuple[pa.Table, int, int]:
    """Validate and normalise samples to SAMPLES_SCHEMA; sort and drop exact key duplicates.

    Returns (table, duplicates_dropped, unsorted_rows).
    """
    path = Path(path)
    _require_columns(path, table, SAMPLES_REQUIRED)
    ts = to_utc_timestamps(path, table, "timestamp")
    null_ts = np.flatnonzero(pc.is_null(ts).to_numpy(zero_copy_only=False))
    if len(null_ts):
        raise _rows_error(path, "timestamp", table, null_ts, "is empty",
                          "drop rows without a timestamp")

    def as_dict(name: str) -> pa.DictionaryArray:
        if name not in table.column_names:
            return pa.DictionaryArray.from_arrays(pa.array(np.zeros(table.num_rows, np.int32)),
                                                  pa.array([""]))
        col = table.column(name).combine_chunks()
        if not isinstance(col, pa.DictionaryArray):
            col = pc.dictionary_encode(pc.cast(col, pa.string()))
        return col.cast(DICT)

    dep, grp, met, inst = (as_dict(c) for c in ("deployment_id", "group", "metric", "instance"))

    bad_group = pc.invert(pc.is_in(grp.dictionary_decode(), pa.array(GROUPS)))
    bad = np.flatnonzero(pc.fill_null(bad_group, True).to_numpy(zero_copy_only=False))
    if len(bad):
        raise _rows_error(path, "group", table, bad, "is not baseline|canary",
                          "label each sample's group 'baseline' (control) or 'canary' (new version)")
    known = pa.array(deployments["deployment_id"].astype(str).tolist(), pa.string())
    unknown = pc.invert(pc.is_in(dep.dictionary_decode(), known))
    bad = np.flatnonzero(pc.fill_null(unknown, True).to_numpy(zero_copy_only=False))
    if len(bad):
        raise _rows_error(path, "deployment_id", table, bad, "names a deployment that is not "
                          "in the deployments table",
                          "add those deployments to deployments.* or drop their samples")
    null_metric = np.flatnonzero(pc.is_null(met).to_numpy(zero_copy_only=False))
    if len(null_metric):
        raise _rows_error(path, "metric", table, null_metric, "is empty", "name every metric")
    value = table.column("value").combine_chunks()
    if not (pa.types.is_floating(value.type) or pa.types.is_integer(value.type)
            or pa.types.is_null(value.type)):
        try:
            value = pc.cast(value, pa.float64())
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            vals = value.to_pandas().astype("object")
            num = pd.to_numeric(vals, errors="coerce")
            bad = np.flatnonzero(num.isna().to_numpy() & vals.notna().to_numpy())
            raise _rows_error(path, "value", table, bad, "is not a number",
                              "write floats (NaN for a missed scrape)") from None
    value = pc.cast(value, pa.float64())

    out = pa.table([ts, dep, grp, met, value, inst], schema=SAMPLES_SCHEMA)
    # sort by key, then count and drop exact key duplicates (keep the last written)
    tsi = pc.cast(ts, pa.int64()).to_numpy(zero_copy_only=False)
    unsorted = int(np.count_nonzero(np.diff(tsi) < 0)) if len(tsi) > 1 else 0
    keys = [np.asarray(a.indices) for a in (dep, grp, inst, met)]
    order = np.lexsort((np.arange(len(tsi)), tsi, *reversed(keys)))
    sorted_keys = [k[order] for k in keys] + [tsi[order]]
    same_as_next = np.ones(len(order) - 1, dtype=bool) if len(order) > 1 else np.zeros(0, bool)
    for k in sorted_keys:
        same_as_next &= k[1:] == k[:-1]
    keep = np.ones(len(order), dtype=bool)
    keep[:-1] = ~same_as_next  # keep the last of each duplicate run
    duplicates = int(len(order) - keep.sum())
    out = out.take(pa.array(order[keep]))
    if duplicates:
        log.info("%s: dropped %d duplicate sample(s) (same deployment, group, instance, metric, "
                 "timestamp; kept the last)", path, duplicates)
    if unsorted:
        log.info("%s: %d sample(s) were out of time order; sorted", path, unsorted)
    return out, duplicates, unsorted


def read_bundle(folder: str | Path) -> Bundle:
    """Read and validate a telemetry bundle folder (DESIGN §2.1)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataContractError(f"bundle folder {folder} does not exist; pass input=DIR")
    dep_path = _find_table(folder, "deployments")
    deployments = read_deployments(dep_path)
    smp_path = _find_table(folder, "samples")
    samples, dups, unsorted = validate_samples(read_samples(smp_path), deployments, smp_path)
    return Bundle(deployments, samples, str(folder), dups, unsorted)


def write_bundle(deployments: pd.DataFrame, samples: pd.DataFrame | pa.Table, out: str | Path,
                 fmt: str = "parquet") -> Path:
    """Write a bundle atomically as Parquet or CSV (what `simulate` and tests produce)."""
    if fmt not in ("parquet", "csv"):
        raise DataContractError(f"bundle format {fmt!r} is not parquet|csv")
    dep_t = pa.Table.from_pandas(deployments, preserve_index=False)
    smp_t = (samples if isinstance(samples, pa.Table)
             else pa.Table.from_pandas(samples, preserve_index=False))
    with atomic_dir(out) as tmp:
        if fmt == "parquet":
            pq.write_table(dep_t, tmp / "deployments.parquet")
            pq.write_table(smp_t, tmp / "samples.parquet", compression="zstd")
        else:
            pacsv.write_csv(dep_t, tmp / "deployments.csv")
            pacsv.write_csv(smp_t, tmp / "samples.csv")
    return Path(out)
