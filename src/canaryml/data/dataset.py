"""Canonical dataset (DESIGN §2.3): fixed step, wide float32, one partition per deployment.

Layout of `<out>/`:
  deployments.parquet
  telemetry/deployment_id=<uri-quoted id>/part-0.parquet   columns: timestamp, group, <metrics…>[, anomaly]
  manifest.json                                             schema version, step, catalog, counts, hash

Both groups of a deployment share one timestamp grid (start..end at `step_s`), so canary and
baseline rows align index for index. Resampling takes the mean of every sample in a step bucket
(instances of a group, duplicates): a per-pod mean keeps a 1-pod canary comparable to a 10-pod
baseline.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from pyarrow.fs import FileType
from tqdm.auto import tqdm

from canaryml.catalog import Catalog
from canaryml.data.atomic import atomic_dir, atomic_write_json, json_marker
from canaryml.data.contract import (
    GROUPS,
    TS,
    Bundle,
    sample_codes,
    small_pages,
    table_from_pandas,
    validate_deployments,
)
from canaryml.data.storage import Location, is_uri, locate, publish
from canaryml.errors import DataContractError

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
# an existing folder ingest may replace: it holds a canonical dataset's manifest (DESIGN §2.3)
OWNS_DATASET = json_marker(MANIFEST, "schema_version", "content_hash", "counts")
GROUP_CODES = {g: i for i, g in enumerate(GROUPS)}  # baseline=0, canary=1
# samples per chunk of the resampling arithmetic: its ~10 temporaries stay in the CPU's L2
# cache (chunks of 1 << 20 took 1.5-2x as long on 10 M samples, measured)
_CHUNK = 1 << 16


def _owns_remote(loc: Location) -> bool:
    """An object-storage prefix holding a canonical dataset's manifest (like OWNS_DATASET)."""
    try:
        data = json.loads(loc.read_bytes(MANIFEST)) if loc.is_file(MANIFEST) else None
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and all(k in data for k in ("schema_version", "content_hash",
                                                              "counts"))


def _dataset_file(rel: str) -> bool:
    """A file a canonical dataset consists of (what an interrupted upload may have left)."""
    return rel in (MANIFEST, "deployments.parquet") or (
        rel.startswith("telemetry/deployment_id=") and rel.endswith(".parquet")
        and rel.count("/") == 2)


def partition_parts(deployment_id: str) -> tuple[str, str]:
    """The partition folder of a deployment, relative to the dataset root."""
    return "telemetry", f"deployment_id={quote(str(deployment_id), safe='')}"


def partition_dir(root: Path, deployment_id: str) -> Path:
    return root.joinpath(*partition_parts(deployment_id))


def _hash_files(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*.parquet")):
        h.update(str(p.relative_to(root)).encode())
        h.update(p.read_bytes())
    return h.hexdigest()


@dataclass(frozen=True)
class DeploymentArrays:
    """One deployment on its grid. `canary`/`baseline` are float32 [T, M] (NaN = gap)."""

    deployment_id: str
    timestamps_s: np.ndarray  # int64 [T], epoch seconds
    canary: np.ndarray
    baseline: np.ndarray | None
    metrics: tuple[str, ...]
    anomaly: np.ndarray | None = None  # int8 [T] point labels (SMD, NAB)


def write_canonical(
    bundle: Bundle,
    out: str | Path,
    *,
    step_s: int,
    catalog: Catalog,
    source: str,
    point_labels: pd.DataFrame | None = None,
    extra_manifest: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Resample a validated bundle onto a fixed grid and write the canonical dataset atomically.

    `point_labels` (deployment_id, timestamp, anomaly) adds an int8 `anomaly` column (1 when any
    labelled point falls in the step). Returns the manifest.
    """
    if step_s <= 0:
        raise DataContractError(f"step_s={step_s} must be a positive number of seconds")
    if is_uri(out):  # object storage: build the dataset locally, then publish it, manifest last
        loc = locate(out)
        with tempfile.TemporaryDirectory(prefix="canaryml-ingest-") as scratch:
            manifest = write_canonical(bundle, Path(scratch) / "dataset", step_s=step_s,
                                       catalog=catalog, source=source,
                                       point_labels=point_labels,
                                       extra_manifest=extra_manifest)
            publish(Path(scratch) / "dataset", loc, marker=MANIFEST, owns=_owns_remote,
                    replaceable=_dataset_file, kind="canonical dataset")
        log.info("published %s (hash %s)", loc.text, manifest["content_hash"][:12])
        return manifest
    with small_pages():
        return _write_local(bundle, out, step_s=step_s, catalog=catalog, source=source,
                            point_labels=point_labels, extra_manifest=extra_manifest)


def _write_local(bundle: Bundle, out: str | Path, *, step_s: int, catalog: Catalog, source: str,
                 point_labels: pd.DataFrame | None, extra_manifest: dict[str, Any] | None
                 ) -> dict[str, Any]:
    deps = bundle.deployments.reset_index(drop=True)
    n_samples = bundle.num_samples
    codes = bundle.codes
    if codes is None or codes.n_kept != n_samples:
        codes = sample_codes(bundle.samples, deps, bundle.source)
    # only metrics that have samples (a Parquet dictionary may carry unused entries); dropped
    # duplicates need no filtering here: each has a kept twin with the same metric and cell
    present = np.zeros(len(codes.metrics), dtype=bool)
    for lo in range(0, len(codes.metric), _CHUNK):  # in chunks: no 8-byte copy of every code
        present |= np.bincount(codes.metric[lo:lo + _CHUNK],
                               minlength=len(codes.metrics))[:len(codes.metrics)] > 0
    cat = catalog.with_metrics([m for m, p in zip(codes.metrics, present, strict=True) if p])
    metrics = cat.names
    m_index = {name: i for i, name in enumerate(metrics)}
    M = len(metrics)
    if M == 0:
        raise DataContractError(f"{bundle.source}: no samples to ingest; the samples table "
                                "has no rows with a metric")

    # grid per deployment
    start_b = (deps["start"].astype("int64").to_numpy() // 1_000_000) // step_s
    end_b = (deps["end"].astype("int64").to_numpy() // 1_000_000) // step_s
    n_steps = (end_b - start_b + 1).astype(np.int64)
    too_long = np.flatnonzero(n_steps > 5_000_000)
    if len(too_long):
        raise DataContractError(
            f"deployment {deps['deployment_id'][too_long[0]]!r}: window of {n_steps[too_long[0]]} "
            f"steps at step_s={step_s}; check start/end or use a larger step"
        )
    # row offset of (deployment d, group g) block: blocks ordered d0g0, d0g1, d1g0, ...
    block_len = np.repeat(n_steps, 2)
    block_off = np.concatenate([[0], np.cumsum(block_len)[:-1]]).astype(np.int64)
    R = int(block_len.sum())

    mm = np.array([m_index.get(name, -1) for name in codes.metrics] or [-1], np.int64)
    # one flat cell index per sample, in chunks of samples, each summed into the cells it
    # spans (rows in deployment or time order touch a narrow range): no per-sample index array
    # and no full-size temporaries. Rejected samples (duplicates, outside the window, NaN
    # values) are masked out of the chunk.
    start_cell = np.repeat(start_b, 2).astype(np.int64)
    n_steps_cell = np.repeat(n_steps, 2).astype(np.uint64)
    n_rows = len(codes.value)
    sums = np.zeros(R * M, np.float64)
    counts = np.zeros(R * M, np.int32)
    has_group = np.zeros(len(deps) * 2, dtype=bool)
    outside = 0
    bucket_us = 1_000_000 * step_s
    for lo in range(0, n_rows, _CHUNK):
        hi = min(n_rows, lo + _CHUNK)
        cell = codes.deployment[lo:hi] * 2
        cell += codes.group[lo:hi]
        step = codes.timestamp_us[lo:hi] // bucket_us
        step -= start_cell[cell]  # step index inside the deployment's window
        # 0 <= step < n_steps in one unsigned comparison (a negative step wraps to a huge one)
        ok = step.view(np.uint64) < n_steps_cell[cell]
        has_group[cell] = True
        outside += len(ok) - int(np.count_nonzero(ok))
        if codes.keep is not None:
            keep = codes.keep[lo:hi]
            # a dropped duplicate outside the window is not counted twice
            outside -= int(np.count_nonzero(~(keep | ok)))
            ok &= keep
        value = codes.value[lo:hi]
        ok &= value == value  # not NaN
        step += block_off[cell]
        step *= M
        step += mm[codes.metric[lo:hi]]
        if not ok.all():
            step, value = step[ok], value[ok]
        if not len(step):
            continue
        first = int(step.min())
        step -= first
        span = int(step.max()) + 1
        sums[first:first + span] += np.bincount(step, weights=value, minlength=span)
        np.add(counts[first:first + span], np.bincount(step, minlength=span),
               out=counts[first:first + span], casting="unsafe")
    if outside:
        log.warning("%d sample(s) fall outside their deployment's start..end window; dropped",
                    outside)
    with np.errstate(invalid="ignore", divide="ignore"):
        np.divide(sums, counts, out=sums)
    del counts
    # [M, R] float32: each metric column slices without a copy
    wide_t = sums.reshape(R, M).T.astype(np.float32, order="C")
    del sums

    pos = {d: i for i, d in enumerate(deps["deployment_id"].astype(str))}
    anomaly = None
    if point_labels is not None and len(point_labels):
        anomaly = np.zeros(R, dtype=np.int8)
        pl = point_labels[point_labels["anomaly"].astype(int) > 0]
        mapped = pl["deployment_id"].astype(str).map(pos)
        if mapped.isna().any():
            unknown = sorted(set(pl["deployment_id"].astype(str)[mapped.isna()]))[:5]
            raise DataContractError(
                f"{bundle.source}: point labels name deployments that are not in the "
                f"deployments table: {unknown}; label only ingested deployments")
        pd_idx = mapped.to_numpy(np.int64)
        pt = pd.to_datetime(pl["timestamp"], utc=True).astype("int64").to_numpy() // 1_000_000
        pb = pt // step_s - start_b[pd_idx]
        good = (pb >= 0) & (pb < n_steps[pd_idx])
        for g in (0, 1):
            anomaly[block_off[pd_idx[good] * 2 + g] + pb[good]] = 1

    written_rows = np.repeat(has_group, block_len)
    # empty cells of the rows written (a copy of the grid only when some group has no samples)
    gaps = int(np.count_nonzero(np.isnan(wide_t if written_rows.all()
                                         else wide_t[:, written_rows])))
    dep_ids = deps["deployment_id"].astype(str).tolist()
    no_samples = [dep_ids[d] for d in range(len(deps)) if not has_group[2 * d:2 * d + 2].any()]
    if no_samples:
        log.warning("%d deployment(s) have no samples and get no telemetry partition: %s",
                    len(no_samples), ", ".join(no_samples[:5]))

    def partition(d: int) -> pa.Table | None:
        parts = []
        for g, gname in enumerate(GROUPS):
            if not has_group[d * 2 + g]:
                continue
            lo = int(block_off[d * 2 + g])
            hi = lo + int(n_steps[d])
            ts = (start_b[d] + np.arange(n_steps[d], dtype=np.int64)) * step_s * 1_000_000
            cols: dict[str, Any] = {
                "timestamp": pa.array(ts, pa.int64()).cast(pa.timestamp("us")).cast(TS),
                "group": pa.repeat(pa.scalar(gname, pa.string()), hi - lo),
            }
            for j, name in enumerate(metrics):
                cols[name] = pa.array(wide_t[j, lo:hi], pa.float32())
            if anomaly is not None:
                cols["anomaly"] = pa.array(anomaly[lo:hi], pa.int8())
            parts.append(pa.table(cols))
        return pa.concat_tables(parts) if parts else None

    source_dir = Path(bundle.source) if Path(bundle.source).is_dir() else None
    with atomic_dir(out, marker=MANIFEST, owns=OWNS_DATASET, inputs=[source_dir],
                    kind="canonical dataset") as tmp:
        pq.write_table(table_from_pandas(deps),
                       tmp / "deployments.parquet")

        def write(d: int) -> int:
            table = partition(d)
            if table is None:
                return 0
            pdir = partition_dir(tmp, dep_ids[d])
            pdir.mkdir(parents=True)
            # dictionary pages only help the group column: float telemetry rarely repeats.
            # snappy (pandas' default codec): ~35 % less CPU than zstd for ~20 % more bytes
            # (10 M samples: 0.17 vs 0.27 CPU-s, 43 vs 36 MB; measured)
            pq.write_table(table, pdir / "part-0.parquet", compression="snappy",
                           use_dictionary=["group"])
            return int(table.num_rows)

        # Parquet encoding releases the GIL: one writer thread per core
        with ThreadPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 1))) as pool:
            rows_written = sum(tqdm(pool.map(write, range(len(deps))), total=len(deps),
                                    desc="write partitions", unit="dep", leave=False,
                                    disable=len(deps) < 50 or None))
        manifest = {
            "schema_version": SCHEMA_VERSION,
            "source": source,
            "input": bundle.source,
            "step_s": int(step_s),
            "metrics": metrics,
            "catalog": cat.to_mapping(),
            "point_labels": anomaly is not None,
            "counts": {
                "deployments": len(deps),
                "samples_in": int(n_samples + bundle.duplicates_dropped),
                "duplicates_dropped": bundle.duplicates_dropped,
                "unsorted_rows": bundle.unsorted_rows,
                "outside_window_dropped": outside,
                "rows": rows_written,
                "gaps": gaps,
                "labels": {k: int(v) for k, v in deps["label"].value_counts().items()},
            },
            **(extra_manifest or {}),
        }
        manifest["content_hash"] = _hash_files(tmp)
        atomic_write_json(tmp / "manifest.json", manifest)
    log.info("wrote %s: %d deployments, %d rows, %d metrics, step %ds, hash %s", out, len(deps),
             rows_written, M, step_s, manifest["content_hash"][:12])
    return manifest


class CanonicalDataset:
    """Read side of the canonical dataset. Reads one deployment without scanning the rest.

    `path` is a local folder or an object-storage URI (`s3://bucket/prefix`, see
    `canaryml.data.storage`); `self.path` is a `Path` for a local folder and the URI text
    otherwise, `self.location` the filesystem and path every read goes through.
    """

    def __init__(self, path: str | Path):
        self.location = locate(path)
        self.path: Path | str = (Path(path) if self.location.is_local else self.location.text)
        try:
            raw = self.location.read_bytes(MANIFEST) if self.location.is_file(MANIFEST) else None
        except OSError as exc:
            raise DataContractError(f"{self.path}: cannot read {MANIFEST} ({exc}); check the "
                                    "location and its credentials") from exc
        if raw is None:
            raise DataContractError(
                f"{self.path} is not a canonical dataset (no manifest.json); create it with "
                f"`canaryml ingest source=bundle input=DIR out={self.path}`"
            )
        self.manifest: dict[str, Any] = json.loads(raw)
        if self.manifest.get("schema_version") != SCHEMA_VERSION:
            raise DataContractError(
                f"{self.path}: schema_version {self.manifest.get('schema_version')} is not "
                f"{SCHEMA_VERSION}; re-run `canaryml ingest` with this version"
            )

    @property
    def step_s(self) -> int:
        return int(self.manifest["step_s"])

    @property
    def metrics(self) -> list[str]:
        return list(self.manifest["metrics"])

    @property
    def content_hash(self) -> str:
        return str(self.manifest["content_hash"])

    @cached_property
    def catalog(self) -> Catalog:
        return Catalog.from_mapping(self.manifest["catalog"], source=str(self.path))

    @cached_property
    def deployments(self) -> pd.DataFrame:
        loc = self.location
        df = pd.read_parquet(loc.join("deployments.parquet"), filesystem=loc.fs)
        return validate_deployments(df, f"{self.path}/deployments.parquet")

    def telemetry(self, deployment_id: str) -> pd.DataFrame:
        """Wide telemetry of one deployment: timestamp, group, one float32 column per metric."""
        loc = self.location
        pdir = loc.join(*partition_parts(deployment_id))
        if loc.fs.get_file_info(pdir).type != FileType.Directory:
            raise DataContractError(
                f"{self.path}: no telemetry for deployment {deployment_id!r}; known: "
                f"{', '.join(self.deployments['deployment_id'].astype(str)[:5])}…"
            )
        return pq.read_table(pdir, filesystem=loc.fs).to_pandas()

    def arrays(self, deployment_id: str) -> DeploymentArrays:
        df = self.telemetry(deployment_id)
        metrics = self.metrics
        can = df[df["group"] == "canary"]
        base = df[df["group"] == "baseline"]
        main = can if len(can) else base
        ts = main["timestamp"].astype("int64").to_numpy() // 1_000_000
        return DeploymentArrays(
            deployment_id=str(deployment_id),
            timestamps_s=ts,
            canary=main[metrics].to_numpy(np.float32),
            baseline=base[metrics].to_numpy(np.float32) if len(can) and len(base) else None,
            metrics=tuple(metrics),
            anomaly=main["anomaly"].to_numpy(np.int8) if "anomaly" in main else None,
        )

    def iter_arrays(self, ids: list[str] | None = None) -> Iterator[DeploymentArrays]:
        for dep_id in ids if ids is not None else self.deployments["deployment_id"].astype(str):
            yield self.arrays(dep_id)
