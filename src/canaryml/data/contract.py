"""Telemetry bundle contract (DESIGN §2.1): read, validate and normalise `deployments` + `samples`.

A bundle is a folder with `deployments.{parquet,csv}` and `samples.{parquet,csv}` (or a
`samples/` folder of Parquet files). Validation uses Arrow schemas and compute kernels so a 10 M
row bundle validates in seconds; every violation raises `DataContractError` naming the file, the
column, the first offending rows and the fix.
"""

from __future__ import annotations

import contextlib
import csv
import ctypes
import dataclasses
import io
import logging
import os
import queue
import re
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from canaryml.data.atomic import atomic_dir, holds_only
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
class SampleCodes:
    """Integer view of validated samples, shared by validation and the canonical writer.

    All arrays have one entry per sample row of `Bundle.samples`: `deployment` indexes the
    deployments table rows, `group` is 0 = baseline / 1 = canary, `metric` indexes `metrics`,
    `timestamp_us` is epoch microseconds and `value` float64 (NaN = missed scrape). `keep`
    (None = all) marks the rows that survived de-duplication: the arrays stay aligned with the
    input rows so dropping 0.1 % duplicates does not copy five 10 M-entry arrays.
    """

    deployment: np.ndarray  # int32 [N]
    group: np.ndarray  # int8 [N]
    metric: np.ndarray  # int32 [N]
    timestamp_us: np.ndarray  # int64 [N]
    value: np.ndarray  # float64 [N]
    metrics: tuple[str, ...]
    keep: np.ndarray | None = None  # bool [N]
    # instance codes int32 [N] indexing `instances` (None: no instance column was read)
    instance: np.ndarray | None = None
    instances: tuple[str, ...] = ("",)

    @property
    def n_kept(self) -> int:
        return len(self.value) if self.keep is None else int(np.count_nonzero(self.keep))


@dataclass(frozen=True)
class Bundle:
    """Validated bundle tables. `samples` is an Arrow table (it can be tens of millions of rows).

    Samples are de-duplicated but keep their input row order: the canonical writer does not
    need it sorted, and sorting 10 M rows would cost more than the rest of ingest. `codes` is
    the integer view computed during validation (reused by `write_canonical`); None when the
    bundle was built by hand. `read_bundle` keeps only the codes (~25 bytes a sample) and builds
    the Arrow `samples` table from them the first time something asks for it (`table` None),
    so ingest never holds the parsed CSV and a second copy of it at once.
    """

    deployments: pd.DataFrame
    table: pa.Table | None
    source: str
    duplicates_dropped: int = 0
    unsorted_rows: int = 0
    codes: SampleCodes | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.table is None and self.codes is None:
            raise ValueError("Bundle needs a samples table or its codes")

    @property
    def samples(self) -> pa.Table:
        """Validated samples in SAMPLES_SCHEMA (de-duplicated, input order)."""
        if self.table is None:
            assert self.codes is not None  # __post_init__
            object.__setattr__(self, "table", samples_table(self.codes, self.deployments))
        assert self.table is not None
        return self.table

    @property
    def num_samples(self) -> int:
        """Samples kept (after de-duplication), without building the table."""
        if self.table is not None:
            return int(self.table.num_rows)
        assert self.codes is not None
        return self.codes.n_kept


def table_from_pandas(df: pd.DataFrame) -> pa.Table:
    """`pa.Table.from_pandas` without the pandas-3 tz deprecation path: tz-aware datetime
    columns go through their UTC int64 view (same Arrow timestamp type, no warning)."""
    tz_cols = [c for c in df.columns if isinstance(df[c].dtype, pd.DatetimeTZDtype)]
    if not tz_cols:
        return pa.Table.from_pandas(df, preserve_index=False)
    table = pa.Table.from_pandas(df.drop(columns=tz_cols), preserve_index=False)
    for c in tz_cols:
        dtype = df[c].dtype
        assert isinstance(dtype, pd.DatetimeTZDtype)  # narrows the type for mypy
        naive = df[c].dt.tz_convert(None).to_numpy()
        arr = pa.array(naive, pa.timestamp(dtype.unit), from_pandas=True).cast(
            pa.timestamp(dtype.unit, tz=str(dtype.tz)))
        table = table.append_column(str(c), arr)
    return table.select([str(c) for c in df.columns])


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
        return _read_csv(path, csv_types)
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


def _read_csv(path: Path, csv_types: dict[str, pa.DataType]) -> pa.Table:
    """Arrow's multi-threaded CSV reader with declared column types.

    Timestamp inference is the slowest part of a CSV read, so the first data row decides the
    timestamp column's type (zoned ISO-8601 → timestamp[us, UTC], naive → timestamp[us], a
    number → epoch seconds). If a later row does not fit that type (mixed zones, a typo), the
    column is re-read as text and `to_utc_timestamps` names the bad rows.
    """
    types = dict(csv_types)
    if "timestamp" not in types:
        sniffed = _sniff_timestamp_type(path)
        if sniffed is not None:
            types["timestamp"] = sniffed
    read = pacsv.ReadOptions(block_size=8 << 20)
    try:
        return pacsv.read_csv(path, read_options=read, convert_options=pacsv.ConvertOptions(
            column_types=types, strings_can_be_null=True, timestamp_parsers=[pacsv.ISO8601]))
    except pa.ArrowInvalid as exc:
        if "timestamp" not in csv_types and "column #" in str(exc) and (
                types.get("timestamp") is not None and _csv_column_index(path, "timestamp")
                == _error_column(str(exc))):
            types["timestamp"] = pa.string()
            return pacsv.read_csv(path, read_options=read, convert_options=pacsv.ConvertOptions(
                column_types=types, strings_can_be_null=True))
        raise


def _csv_header_and_first_row(path: Path) -> tuple[list[str], list[str]]:
    with open(path, newline="", encoding="utf-8", errors="replace") as fh:
        head = fh.read(1 << 16)
    rows = list(csv.reader(io.StringIO(head)))
    return (rows[0] if rows else []), (rows[1] if len(rows) > 1 else [])


def _csv_column_index(path: Path, name: str) -> int:
    header, _ = _csv_header_and_first_row(path)
    return header.index(name) if name in header else -1


def _error_column(msg: str) -> int:
    found = re.search(r"column #(\d+)", msg)
    return int(found.group(1)) if found else -2


def _sniff_timestamp_type(path: Path) -> pa.DataType | None:
    header, first = _csv_header_and_first_row(path)
    if "timestamp" not in header or len(first) != len(header):
        return None
    value = first[header.index("timestamp")].strip()
    if re.fullmatch(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?", value):
        return pa.float64()  # epoch seconds; float64 holds µs exactly for 285 years
    if re.fullmatch(r"\d{4}-\d\d-\d\d[T ]\d\d:\d\d(:\d\d(\.\d+)?)?", value):
        return pa.timestamp("us")
    if re.fullmatch(r"\d{4}-\d\d-\d\d[T ]\d\d:\d\d(:\d\d(\.\d+)?)?(Z|[+-]\d\d:?\d\d)", value):
        return TS
    return None


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
        iso = pc.match_substring_regex(
            s, r"^\d{4}-\d\d-\d\d([T ]\d\d:\d\d(:\d\d(\.\d+)?)?)?(Z|[+-]\d\d:?\d\d)?$")
        bad_mask = pc.and_(present, pc.invert(pc.fill_null(iso, False)))
        bad = np.flatnonzero(bad_mask.to_numpy(zero_copy_only=False))
        if len(bad):
            raise _rows_error(path, column, table, bad, "is not an ISO-8601 timestamp",
                              "write ISO-8601 (2024-05-01T12:00:00Z) or epoch seconds")
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
            raise _rows_error(path, column, table, bad, "is not a valid ISO-8601 timestamp",
                              "write ISO-8601 (2024-05-01T12:00:00Z) or epoch seconds")
        naive_utc = parsed.dt.tz_convert(None).dt.as_unit("us").to_numpy()
        return pa.array(naive_utc, type=pa.timestamp("us"), from_pandas=True).cast(TS)
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
        table = table_from_pandas(table)
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
    # extra columns (e.g. `split` for SMD/NAB) pass through after the contract's columns
    for name in table.column_names:
        if name not in DEPLOYMENTS_SCHEMA.names and not name.startswith("__index"):
            df[name] = table.column(name).to_pandas()
    return df


# --------------------------------------------------------------------------- samples


def _codes(path: Path, table: pa.Table, column: str, allowed: list[str] | None
           ) -> tuple[np.ndarray, list[str], np.ndarray | None]:
    """Row codes of a string column: (codes int32 [N], dictionary, null-mask [N] or None).

    With `allowed`, codes index `allowed` and values outside it (or null) get -1; without, they
    index the returned dictionary (null → ""). Works on the Arrow dictionary, so a 10 M-row
    column costs one gather and no string comparison per row.
    """
    n = table.num_rows
    if column not in table.column_names:
        return np.zeros(n, np.int32), [""], None
    col = table.column(column)
    if not pa.types.is_dictionary(col.type):
        col = pc.dictionary_encode(pc.cast(col, pa.string()))
    col = col.unify_dictionaries()  # every chunk now shares one dictionary
    chunks = [c if c.type == DICT else c.cast(DICT) for c in col.chunks]
    if not chunks:
        return np.zeros(0, np.int32), [""], None
    dictionary = [None if v is None else str(v) for v in chunks[0].dictionary.to_pylist()]
    has_nulls = col.null_count > 0
    parts = [np.asarray(pc.fill_null(c.indices, 0) if has_nulls else c.indices) for c in chunks]
    indices = parts[0] if len(parts) == 1 else np.concatenate(parts)
    nulls = (np.concatenate([np.asarray(c.is_null(), dtype=bool) for c in chunks])
             if has_nulls else None)
    if allowed is None:
        if nulls is not None:
            dictionary.append(None)
            indices = np.where(nulls, len(dictionary) - 1, indices).astype(np.int32)
        return indices, [d or "" for d in dictionary], nulls
    pos = {v: i for i, v in enumerate(allowed)}
    mapping = np.array([pos.get(v, -1) if v is not None else -1 for v in dictionary] or [-1],
                       dtype=np.int32)
    codes = mapping[indices]
    if nulls is not None:
        codes[nulls] = -1
    return codes, allowed, nulls


_F32_MAX = float(np.finfo(np.float32).max)


def sample_codes(table: pa.Table, deployments: pd.DataFrame, path: Path | str = "<samples>"
                 ) -> SampleCodes:
    """Validate samples against the contract and return their integer codes.

    Raises `DataContractError` for a missing column, an unknown group, a sample for an unknown
    deployment, an empty metric, a non-numeric, infinite or beyond-float32 value or a bad
    timestamp.
    """
    path = Path(path)
    _require_columns(path, table, SAMPLES_REQUIRED)
    ts = to_utc_timestamps(path, table, "timestamp")
    if ts.null_count:
        null_ts = np.flatnonzero(pc.is_null(ts).to_numpy(zero_copy_only=False))
        raise _rows_error(path, "timestamp", table, null_ts, "is empty",
                          "drop rows without a timestamp")
    grp, _, _ = _codes(path, table, "group", list(GROUPS))
    if len(grp) and grp.min() < 0:  # one reduction; the row scan only runs on failure
        bad = np.flatnonzero(grp < 0)
        raise _rows_error(path, "group", table, bad, "is not baseline|canary",
                          "label each sample's group 'baseline' (control) or 'canary' (new version)")
    dep, _, _ = _codes(path, table, "deployment_id",
                       deployments["deployment_id"].astype(str).tolist())
    if len(dep) and dep.min() < 0:
        bad = np.flatnonzero(dep < 0)
        raise _rows_error(path, "deployment_id", table, bad, "names a deployment that is not "
                          "in the deployments table",
                          "add those deployments to deployments.* or drop their samples")
    met, met_names, _ = _codes(path, table, "metric", None)
    empty_name = np.array([not m for m in met_names], dtype=bool)
    bad = np.flatnonzero(empty_name[met]) if empty_name.any() else np.zeros(0, np.int64)
    if len(bad):
        raise _rows_error(path, "metric", table, bad, "is empty", "name every metric")
    value = table.column("value")
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
    values = pc.cast(value, pa.float64()).to_numpy()  # nulls become NaN
    # the canonical dataset stores float32: ±inf or a value past its range would arrive there as
    # inf and poison every mean and forecast it touches
    if not (np.abs(values[~np.isnan(values)]) <= _F32_MAX).all():
        bad = np.flatnonzero(~np.isnan(values) & ~(np.abs(values) <= _F32_MAX))
        raise _rows_error(path, "value", table, bad, "is infinite or beyond float32 (±3.4e38)",
                          "write finite values (NaN for a missed scrape); for a metric that "
                          "large, use a bigger unit")
    tsi = pc.cast(ts, pa.int64()).to_numpy(zero_copy_only=False)
    return SampleCodes(dep, grp.astype(np.int8), met, tsi, np.asarray(values, np.float64),
                       tuple(met_names))


def validate_samples(table: pa.Table, deployments: pd.DataFrame,
                     path: Path | str = "<samples>") -> tuple[pa.Table, int, int]:
    """Validate and normalise samples to SAMPLES_SCHEMA and drop exact key duplicates.

    Returns (table, duplicates_dropped, unsorted_rows). See `validate_samples_codes`.
    """
    out, dups, unsorted, _ = validate_samples_codes(table, deployments, path)
    return out, dups, unsorted


def validate_samples_codes(table: pa.Table, deployments: pd.DataFrame,
                           path: Path | str = "<samples>"
                           ) -> tuple[pa.Table, int, int, SampleCodes]:
    """Validate samples; drop exact duplicates (same deployment, group, instance, metric,
    timestamp: the last written wins) and count rows out of time order within their series.

    See `deduplicate` for how duplicates and order are found. Rows keep their input order.
    Returns (table, duplicates_dropped, unsorted_rows, codes).
    """
    path = Path(path)
    codes = sample_codes(table, deployments, path)
    inst, inst_names, _ = _codes(path, table, "instance", None)
    codes = dataclasses.replace(codes, instance=inst, instances=tuple(inst_names))
    codes, duplicates, unsorted = deduplicate(codes, len(deployments), path)
    return samples_table(codes, deployments), duplicates, unsorted, codes


def deduplicate(codes: SampleCodes, n_deployments: int, path: Path | str = "<samples>"
                ) -> tuple[SampleCodes, int, int]:
    """Mark exact duplicates (same deployment, group, instance, metric, timestamp: the last
    written wins) in `codes.keep` and count rows out of time order within their series.

    Rows already in one of the two common layouts — per series (series, time) or scrape order
    (deployment, time, series) — are checked in one linear pass over a composite key; other
    orders take one stable radix sort on the series id (< 65 536 series) and a full
    (series, time) sort only when some series is out of order.
    Returns (codes with `keep` set when something was dropped, duplicates, unsorted_rows).
    """
    n = len(codes.value)
    n_met, n_inst = max(1, len(codes.metrics)), max(1, len(codes.instances))
    if codes.instance is None:
        n_inst = 1
    n_series = n_deployments * 2 * n_inst * n_met
    dup_rows = _adjacent_duplicates(codes, n_inst, n_met, n_series)
    unsorted = 0
    if dup_rows is None:  # neither common layout: find each series' order with a sort
        series = _series_ids(codes, 0, n, n_inst, n_met, n_series)
        tsi = codes.timestamp_us
        if n_series < 2**16:
            order = np.argsort(series.astype(np.uint16), kind="stable")  # radix sort, O(n)
        else:
            order = np.argsort(series, kind="stable")
        s_o, t_o = series[order], tsi[order]
        same = s_o[1:] == s_o[:-1]
        unsorted = int(np.count_nonzero(same & (t_o[1:] < t_o[:-1])))
        if unsorted:
            order = np.lexsort((tsi, series))  # lexsort is stable: ties keep input order
            s_o, t_o = series[order], tsi[order]
            same = s_o[1:] == s_o[:-1]
        dup_next = same & (t_o[1:] == t_o[:-1])
        dup_rows = order[:-1][dup_next]  # of a duplicate run, keep the last written
        del order, s_o, t_o, same, dup_next, series
    duplicates = len(dup_rows)
    if duplicates:
        keep = np.ones(n, dtype=bool)
        keep[dup_rows] = False
        codes = dataclasses.replace(codes, keep=keep)
        log.info("%s: dropped %d duplicate sample(s) (same deployment, group, instance, metric, "
                 "timestamp; kept the last)", path, duplicates)
    if unsorted:
        log.info("%s: %d sample(s) were out of time order within their series; sorted", path,
                 unsorted)
    return codes, duplicates, unsorted


def samples_table(codes: SampleCodes, deployments: pd.DataFrame) -> pa.Table:
    """The validated samples as an Arrow table in SAMPLES_SCHEMA (rows `codes.keep`)."""
    dep_dict = pa.array(deployments["deployment_id"].astype(str).tolist(), pa.string())
    n = len(codes.value)
    inst = codes.instance if codes.instance is not None else np.zeros(n, np.int32)
    out = pa.table([
        pa.chunked_array([_ts_array(codes.timestamp_us)]),
        pa.DictionaryArray.from_arrays(pa.array(codes.deployment), dep_dict),
        pa.DictionaryArray.from_arrays(pa.array(codes.group.astype(np.int32)),
                                       pa.array(list(GROUPS), pa.string())),
        pa.DictionaryArray.from_arrays(pa.array(codes.metric),
                                       pa.array(list(codes.metrics), pa.string())),
        pa.array(codes.value, pa.float64()),
        pa.DictionaryArray.from_arrays(pa.array(inst),
                                       pa.array(list(codes.instances), pa.string())),
    ], schema=SAMPLES_SCHEMA)
    if codes.keep is not None:
        idx = pa.array(np.flatnonzero(codes.keep))
        # column by column: ~3x faster than Table.take, ~5x faster than Table.filter
        out = pa.table([c.take(idx) for c in out.columns], schema=SAMPLES_SCHEMA)
    return out


def _series_ids(codes: SampleCodes, lo: int, hi: int, n_inst: int, n_met: int,
                n_series: int) -> np.ndarray:
    """Series id (deployment, group, instance, metric) of rows lo..hi."""
    series: np.ndarray = codes.deployment[lo:hi].astype(
        np.int32 if n_series < 2**31 else np.int64)
    series *= 2
    series += codes.group[lo:hi]
    if n_inst > 1 and codes.instance is not None:
        series *= n_inst
        series += codes.instance[lo:hi]
    series *= n_met
    series += codes.metric[lo:hi]
    return series


_DEDUP_CHUNK = 1 << 16  # rows: the key temporaries stay in the CPU's cache and the heap


def _adjacent_duplicates(codes: SampleCodes, n_inst: int, n_met: int, n_series: int
                         ) -> np.ndarray | None:
    """Rows to drop as duplicates when the samples are already in one of the two common
    layouts: per series (series, time) or scrape order (deployment, time, series). Then every
    series is in time order and duplicates sit next to each other, so one linear pass over a
    composite int64 key finds them (in chunks of rows, overlapping by one, so the temporaries
    stay small). Returns None when the rows are in neither layout (or the key would overflow)
    and the caller sorts."""
    ts = codes.timestamp_us
    n = len(ts)
    if n < 2:
        return np.zeros(0, np.int64)
    t_min = int(ts.min())
    span = int(ts.max()) - t_min + 1
    per_dep = 2 * n_inst * n_met
    n_dep = int(codes.deployment.max()) + 1
    layouts = []
    if n_series * span < 2**62:
        layouts.append(1)
    if n_dep * span * per_dep < 2**62:
        layouts.append(2)
    for layout in layouts:
        found: list[np.ndarray] = []
        for lo in range(0, n - 1, _DEDUP_CHUNK):
            hi = min(n, lo + _DEDUP_CHUNK + 1)  # one row of overlap with the next chunk
            series = _series_ids(codes, lo, hi, n_inst, n_met, n_series)
            if layout == 1:  # non-decreasing in (series, time)
                key = series.astype(np.int64)
            else:  # non-decreasing in (deployment, time, series within the deployment)
                key = codes.deployment[lo:hi].astype(np.int64)
            key *= span
            key += ts[lo:hi]
            key -= t_min
            if layout == 2:
                key *= per_dep
                key += series % per_dep
            if (key[1:] < key[:-1]).any():
                break
            found.append(np.flatnonzero(key[1:] == key[:-1]) + lo)
        else:
            return np.concatenate(found) if found else np.zeros(0, np.int64)
    return None


def _ts_array(us: np.ndarray) -> pa.Array:
    return pa.array(us, pa.int64()).cast(pa.timestamp("us")).cast(TS)


def read_samples(path: Path) -> pa.Table:
    table = _read_table(path, {"deployment_id": DICT, "group": DICT, "metric": DICT,
                               "instance": DICT, "value": pa.float64()})
    _require_columns(path, table, SAMPLES_REQUIRED)
    return table


# --------------------------------------------------------------------------- streaming reader


class _Fallback(Exception):
    """The streaming reader met input only the whole-table path handles or reports."""


_STREAM_BLOCK = 2 << 20  # CSV bytes per batch; the reader parses several ahead, so this bounds memory
_SAMPLE_COLUMNS = ("timestamp", "deployment_id", "group", "metric", "value", "instance")


def _sample_batches(path: Path) -> Iterator[pa.RecordBatch]:
    """Record batches of the sample columns, parsed with their final types (CSV: Arrow's
    streaming reader, parsing ahead in a thread; Parquet: the dataset scanner). Raises
    `_Fallback` for an input the streaming reader does not handle (unknown timestamp format,
    missing columns)."""
    if path.suffix == ".csv" and path.is_file():
        if path.stat().st_size == 0:
            raise _Fallback("empty file")
        header, _ = _csv_header_and_first_row(path)
        if any(c not in header for c in SAMPLES_REQUIRED) or len(set(header)) != len(header):
            raise _Fallback("columns")
        ts_type = _sniff_timestamp_type(path)
        if ts_type is None:
            raise _Fallback("timestamp format")
        # names as plain text: Arrow's CSV dictionary converter cost ~0.3-0.4 CPU-s per name
        # column of 10 M rows, plain text ~0.07 and `_batch_codes` ~0.06 (measured)
        types = {"timestamp": ts_type, "deployment_id": pa.string(), "group": pa.string(),
                 "metric": pa.string(), "instance": pa.string(), "value": pa.float64()}
        # check_utf8=False: `_batch_codes` only accepts names equal to known (valid) ones or
        # whose dictionary validates, which checks the few distinct names instead of every row
        convert = pacsv.ConvertOptions(
            column_types=types, strings_can_be_null=True, timestamp_parsers=[pacsv.ISO8601],
            include_columns=[c for c in _SAMPLE_COLUMNS if c in header], check_utf8=False)
        read = pacsv.ReadOptions(block_size=_STREAM_BLOCK, use_threads=False)
        reader = pacsv.open_csv(path, read_options=read, convert_options=convert)
        with reader:
            yield from (_parsed_ahead(reader) if _parse_in_threads() else reader)
        return
    if path.is_dir() or path.suffix == ".parquet":
        if path.is_file() and path.stat().st_size == 0:
            raise _Fallback("empty file")
        dataset = pads.dataset(path, format="parquet")
        names = dataset.schema.names
        if any(c not in names for c in SAMPLES_REQUIRED):
            raise _Fallback("columns")
        yield from dataset.to_batches(columns=[c for c in _SAMPLE_COLUMNS if c in names],
                                      batch_size=1 << 20)
        return
    raise _Fallback("not a CSV or Parquet table")


def _parsed_ahead(batches: Iterator[pa.RecordBatch], depth: int = 2
                  ) -> Iterator[pa.RecordBatch]:
    """The batches of `batches`, parsed by a background thread up to `depth` ahead while the
    caller codes the previous ones (Arrow parses without holding the GIL): the parse and the
    coding overlap on two cores. An error in the parse is raised here; closing this iterator
    early stops the thread before it returns."""
    done = object()
    ahead: queue.Queue[object] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item: object) -> bool:
        while not stop.is_set():
            try:
                ahead.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def parse() -> None:
        try:
            for batch in batches:
                if not put(batch):
                    return
            put(done)
        except BaseException as exc:  # handed to the consumer, raised there
            put(exc)

    thread = threading.Thread(target=parse, name="canaryml-csv-parse", daemon=True)
    thread.start()
    try:
        while (item := ahead.get()) is not done:
            if isinstance(item, BaseException):
                raise item
            assert isinstance(item, pa.RecordBatch)
            yield item
    finally:
        stop.set()
        thread.join()


@contextlib.contextmanager
def small_pages() -> Iterator[None]:
    """Memory allocated inside gets ordinary pages, not transparent huge pages (THP).

    numpy asks the kernel for huge pages on every array over 4 MB; where THP defrag is
    `madvise` (common), each first touch may compact memory synchronously, which cost ingest
    ~0.6 s of system time per 10 M samples (measured) — more than the arrays' whole fill.
    Arrow's buffers get huge pages as well (`_thp_disable`), so THP is also off for the
    process meanwhile. Both settings are process-wide, so they are restored on exit."""
    setter = getattr(getattr(getattr(np, "_core", None), "multiarray", None),
                     "_set_madvise_hugepage", None)
    previous = setter(False) if setter is not None else None
    thp_was_off = _thp_disable(True)
    try:
        yield
    finally:
        if setter is not None:
            setter(previous)
        if thp_was_off is False:
            _thp_disable(False)


def _thp_disable(off: bool) -> bool | None:
    """Turn transparent huge pages off (or back on) for this process (Linux prctl); returns
    whether they were off before, None where the call is not available.

    The CSV parser's buffers (Arrow's allocator) came on huge pages too (~150 MB in ~2,000
    page faults), freed and reallocated batch after batch: the first parse in a fresh process
    spent 0.05-0.9 s of system time on them, as much as the parse itself at worst, depending
    on how fragmented the machine's memory was. With THP off it spent 0.05-0.08 s every time
    (10 M samples, measured)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        before = libc.prctl(42, 0, 0, 0, 0)  # PR_GET_THP_DISABLE
        if before < 0 or libc.prctl(41, int(off), 0, 0, 0) != 0:  # PR_SET_THP_DISABLE
            return None
        return bool(before)
    except (OSError, AttributeError, TypeError):
        return None


def _parse_in_threads() -> bool:
    """Parse CSV blocks in a background thread (`_parsed_ahead`) only while the machine has
    idle cores.

    The parse thread overlaps the coding of the previous batch: 10 M samples on 2 shared
    cores read in 1.07-1.48 s instead of 1.39-1.77 s, but for ~0.1-0.3 s more CPU time
    (measured at load 2.6-3.8, where the gain came from taking time slices from the
    neighbours). On a saturated machine every hand-off waits for a time slice (Arrow's own
    multi-threaded reader at load 9 on 2 cores: 2.9 s against 1.4-2.8 s in one thread and
    ~15 % more CPU, measured), so a busy machine gets the one-thread path."""
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        return True
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return load < (cores or 1)


def _batch_codes(col: pa.Array, pos: dict[str, int], grow: bool, out: np.ndarray) -> None:
    """Write the codes of a string column's rows in `pos` (grown with new values when `grow`)
    into `out`; `_Fallback` on a null, an empty name or a value outside `pos` (the whole-table
    path names them), ArrowInvalid on a new name that is not UTF-8.

    Plain text is looked up in the names already known (`pc.index_in`: one hash probe a row,
    the codes come out directly); only a batch with a new name is dictionary-encoded to grow
    `pos`. Either costs a fraction of Arrow's CSV dictionary conversion (measured)."""
    if col.null_count:
        raise _Fallback("null")
    if not pa.types.is_dictionary(col.type):
        if not (pa.types.is_string(col.type) or pa.types.is_large_string(col.type)):
            raise _Fallback("not text")
        if pos:  # names seen before: one hash lookup a row gives the codes
            codes = pc.index_in(col, value_set=pa.array(list(pos), col.type))
            if not codes.null_count:
                np.copyto(out, codes.to_numpy(zero_copy_only=False), casting="unsafe")
                return
            if not grow:
                raise _Fallback("unknown value")
        col = pc.dictionary_encode(col)  # new names: coded in order of first appearance
    assert isinstance(col, pa.DictionaryArray)
    dictionary = col.dictionary
    if not (pa.types.is_string(dictionary.type) or pa.types.is_large_string(dictionary.type)):
        raise _Fallback("not text")
    dictionary.validate(full=True)  # UTF-8 (the CSV parser does not check it): ArrowInvalid
    mapping = np.empty(max(1, len(dictionary)), out.dtype)
    for i, value in enumerate(dictionary.to_pylist()):
        code = pos.get(value)
        if code is None:
            if not grow or not value:
                raise _Fallback("unknown value")
            code = pos[value] = len(pos)
        mapping[i] = code
    np.take(mapping, col.indices.to_numpy(zero_copy_only=False), out=out)


def _batch_timestamps(col: pa.Array, out: np.ndarray, text_type: list[pa.DataType]) -> None:
    """Epoch microseconds (int64) of a timestamp column, as `to_utc_timestamps` computes them.

    ISO-8601 text (a Parquet file written from strings) must keep one zone style in the whole
    column: the first batch decides (zoned → UTC; naive → taken as UTC) and is remembered in
    `text_type`; Arrow's cast refuses the other style, so a mix falls back to the whole-table
    path, which names the rows."""
    if col.null_count:
        raise _Fallback("null timestamp")
    typ = col.type
    if pa.types.is_timestamp(typ):
        micros = pc.cast(col, pa.timestamp("us", tz=typ.tz))  # safe: refuses lossy ns
    elif pa.types.is_integer(typ) or pa.types.is_floating(typ):
        micros = pc.round(pc.multiply(pc.cast(col, pa.float64()), 1e6))
    elif pa.types.is_string(typ) or pa.types.is_large_string(typ):
        for target in list(text_type) or [TS, pa.timestamp("us")]:
            try:
                micros = pc.cast(col, target)
            except pa.ArrowInvalid:
                continue
            text_type[:] = [target]
            break
        else:
            raise _Fallback("timestamp text")
    else:
        raise _Fallback("timestamp type")
    out[:] = pc.cast(micros, pa.int64()).to_numpy(zero_copy_only=False)


def _batch_values(col: pa.Array, out: np.ndarray) -> None:
    typ = col.type
    if not (pa.types.is_floating(typ) or pa.types.is_integer(typ) or pa.types.is_null(typ)):
        raise _Fallback("value type")
    if typ != pa.float64():
        col = pc.cast(col, pa.float64())
    out[:] = col.to_numpy(zero_copy_only=False)  # a null (missed scrape) becomes NaN
    lo, hi = np.nanmin(out, initial=0.0), np.nanmax(out, initial=0.0)  # all-NaN: no warning
    if not -_F32_MAX <= lo <= hi <= _F32_MAX:
        raise _Fallback("infinite or beyond float32")


class _Columns:
    """The code arrays, allocated once for the expected row count and filled batch by batch.

    Pages past the rows written are never touched, so over-estimating the row count costs
    address space, not memory; under-estimating grows the arrays by half (one copy)."""

    DTYPES: ClassVar[dict[str, type]] = {"dep": np.int32, "grp": np.int8, "met": np.int32,
                                         "inst": np.int32, "ts": np.int64, "val": np.float64}

    def __init__(self, capacity: int, instance: bool) -> None:
        self.n = 0
        self.capacity = max(1, capacity)
        self.arrays: dict[str, np.ndarray] = {
            k: np.empty(self.capacity, t) for k, t in self.DTYPES.items()
            if instance or k != "inst"}

    def take(self, rows: int) -> dict[str, np.ndarray]:
        """Views for the next `rows` rows (the caller fills them)."""
        if self.n + rows > self.capacity:
            self.capacity = max(self.n + rows, self.capacity + self.capacity // 2)
            for k, old in self.arrays.items():
                new = np.empty(self.capacity, old.dtype)
                new[:self.n] = old[:self.n]
                self.arrays[k] = new
        lo, self.n = self.n, self.n + rows
        return {k: a[lo:self.n] for k, a in self.arrays.items()}

    def get(self, key: str) -> np.ndarray:
        return self.arrays[key][:self.n]


def _expected_rows(path: Path, first_rows: int) -> int:
    """Rows the samples table likely holds, from its first batch (CSV) or its metadata."""
    if path.suffix == ".csv" and path.is_file():
        size = path.stat().st_size
        per_row = min(_STREAM_BLOCK, size) / max(1, first_rows)
        return int(size / per_row * 1.3) + first_rows
    return int(pads.dataset(path, format="parquet").count_rows())


def stream_sample_codes(path: Path, deployments: pd.DataFrame) -> SampleCodes:
    """Read a samples table batch by batch straight into `SampleCodes` (~25 bytes a sample).

    Each parsed batch is validated (known deployment and group, named metric, finite float32
    value, timestamp) and written into preallocated code arrays, then dropped, so the parsed
    table is never held whole. Raises `_Fallback` on anything unusual — a contract violation, a
    timestamp that is not in the first row's format, a type it does not handle — and the
    caller re-reads the file on the whole-table path, which reports violations with their rows.
    """
    dep_pos = {str(d): i for i, d in enumerate(deployments["deployment_id"].astype(str))}
    grp_pos = {g: i for i, g in enumerate(GROUPS)}
    met_pos: dict[str, int] = {}
    inst_pos: dict[str, int] = {}
    cols: _Columns | None = None
    ts_text: list[pa.DataType] = []  # the type ISO-8601 text timestamps parse to (first batch)
    for batch in _sample_batches(path):
        if not batch.num_rows:
            continue
        names = batch.schema.names
        if cols is None:
            cols = _Columns(_expected_rows(path, batch.num_rows), "instance" in names)
        if ("inst" in cols.arrays) != ("instance" in names):
            raise _Fallback("instance column in some batches only")
        out = cols.take(batch.num_rows)
        _batch_codes(batch.column(names.index("deployment_id")), dep_pos, False, out["dep"])
        _batch_codes(batch.column(names.index("group")), grp_pos, False, out["grp"])
        _batch_codes(batch.column(names.index("metric")), met_pos, True, out["met"])
        if "inst" in out:
            _batch_codes(batch.column(names.index("instance")), inst_pos, True, out["inst"])
        _batch_timestamps(batch.column(names.index("timestamp")), out["ts"], ts_text)
        _batch_values(batch.column(names.index("value")), out["val"])
    if cols is None:
        raise _Fallback("no rows")
    pa.default_memory_pool().release_unused()  # the parser's buffers, kept by the allocator
    has_instance = "inst" in cols.arrays
    return SampleCodes(cols.get("dep"), cols.get("grp"), cols.get("met"), cols.get("ts"),
                       cols.get("val"), tuple(met_pos),
                       instance=cols.get("inst") if has_instance else None,
                       instances=tuple(inst_pos) if has_instance else ("",))


def read_bundle(folder: str | Path) -> Bundle:
    """Read and validate a telemetry bundle folder (DESIGN §2.1).

    The samples stream into integer codes (`stream_sample_codes`); the Arrow samples table is
    built only if asked for (`Bundle.samples`). A file the streaming reader cannot take, or one
    that breaks the contract, is read whole instead, which names the offending rows.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DataContractError(f"bundle folder {folder} does not exist; pass input=DIR")
    dep_path = _find_table(folder, "deployments")
    deployments = read_deployments(dep_path)
    smp_path = _find_table(folder, "samples")
    try:
        with small_pages():
            codes = stream_sample_codes(smp_path, deployments)
            codes, dups, unsorted = deduplicate(codes, len(deployments), smp_path)
    except (_Fallback, pa.ArrowException, OSError) as exc:
        log.debug("%s: whole-table read (%s: %s)", smp_path, type(exc).__name__, exc)
    else:
        return Bundle(deployments, None, str(folder), dups, unsorted, codes)
    samples, dups, unsorted, codes = validate_samples_codes(read_samples(smp_path), deployments,
                                                            smp_path)
    return Bundle(deployments, samples, str(folder), dups, unsorted, codes)


BUNDLE_TABLES = ("deployments.parquet", "deployments.csv", "samples.parquet", "samples.csv")
# an existing folder a bundle writer may replace: it holds a bundle's two tables and nothing else
OWNS_BUNDLE = holds_only(*BUNDLE_TABLES, required=("deployments.parquet", "deployments.csv"))


def write_bundle(deployments: pd.DataFrame, samples: pd.DataFrame | pa.Table, out: str | Path,
                 fmt: str = "parquet") -> Path:
    """Write a bundle atomically as Parquet or CSV (what `simulate` and tests produce).

    `out` must be new, empty or an earlier bundle (only its tables): `OutputDirError` else."""
    if fmt not in ("parquet", "csv"):
        raise DataContractError(f"bundle format {fmt!r} is not parquet|csv")
    dep_t = table_from_pandas(deployments)
    smp_t = samples if isinstance(samples, pa.Table) else table_from_pandas(samples)
    with atomic_dir(out, owns=OWNS_BUNDLE, kind="telemetry bundle") as tmp:
        if fmt == "parquet":
            pq.write_table(dep_t, tmp / "deployments.parquet")
            pq.write_table(smp_t, tmp / "samples.parquet", compression="zstd")
        else:
            pacsv.write_csv(dep_t, tmp / "deployments.csv")
            pacsv.write_csv(smp_t, tmp / "samples.csv")
    return Path(out)


def make_bundle(deployments: pd.DataFrame | pa.Table, samples: pd.DataFrame | pa.Table,
                source: str) -> Bundle:
    """Validate in-memory tables (what readers for SMD, NAB and Prometheus build) as a bundle."""
    deps = validate_deployments(deployments, f"{source} deployments")
    table = samples if isinstance(samples, pa.Table) else table_from_pandas(samples)
    out, dups, unsorted, codes = validate_samples_codes(table, deps, f"{source} samples")
    return Bundle(deps, out, source, dups, unsorted, codes)
