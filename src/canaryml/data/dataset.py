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
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from canaryml.catalog import Catalog
from canaryml.data.atomic import atomic_dir, atomic_write_json
from canaryml.data.contract import GROUPS, TS, Bundle, validate_deployments
from canaryml.errors import DataContractError

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
GROUP_CODES = {g: i for i, g in enumerate(GROUPS)}  # baseline=0, canary=1


def partition_dir(root: Path, deployment_id: str) -> Path:
    return root / "telemetry" / f"deployment_id={quote(str(deployment_id), safe='')}"


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
    deps = bundle.deployments.reset_index(drop=True)
    s = bundle.samples
    metric_names = [str(x) for x in s.column("metric").combine_chunks().dictionary.to_pylist()]
    cat = catalog.with_metrics(metric_names)
    metrics = cat.names
    m_index = {name: i for i, name in enumerate(metrics)}
    M = len(metrics)

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
    block_off = np.concatenate([[0], np.cumsum(block_len)[:-1]])
    R = int(block_len.sum())

    dep_arr = s.column("deployment_id").combine_chunks()
    dep_dict = [str(x) for x in dep_arr.dictionary.to_pylist()]
    pos = {d: i for i, d in enumerate(deps["deployment_id"].astype(str))}
    dep_map = np.array([pos[d] for d in dep_dict], dtype=np.int64)
    d_idx = dep_map[np.asarray(dep_arr.indices)]
    grp_arr = s.column("group").combine_chunks()
    g_map = np.array([GROUP_CODES[str(x)] for x in grp_arr.dictionary.to_pylist()], np.int64)
    g_idx = g_map[np.asarray(grp_arr.indices)]
    met_arr = s.column("metric").combine_chunks()
    mm = np.array([m_index[str(x)] for x in met_arr.dictionary.to_pylist()], np.int64)
    m_idx = mm[np.asarray(met_arr.indices)]
    t_s = pc.cast(s.column("timestamp"), pa.int64()).to_numpy() // 1_000_000
    bucket = t_s // step_s - start_b[d_idx]
    inside = (bucket >= 0) & (bucket < n_steps[d_idx])
    outside = int(len(bucket) - inside.sum())
    if outside:
        log.warning("%d sample(s) fall outside their deployment's start..end window; dropped",
                    outside)
    value = s.column("value").to_numpy(zero_copy_only=False)
    ok = inside & ~np.isnan(value)
    row = block_off[d_idx[ok] * 2 + g_idx[ok]] + bucket[ok]
    flat = row * M + m_idx[ok]
    sums = np.bincount(flat, weights=value[ok], minlength=R * M)
    counts = np.bincount(flat, minlength=R * M)
    with np.errstate(invalid="ignore", divide="ignore"):
        wide = (sums / counts).astype(np.float32).reshape(R, M)

    anomaly = None
    if point_labels is not None and len(point_labels):
        anomaly = np.zeros(R, dtype=np.int8)
        pl = point_labels[point_labels["anomaly"].astype(int) > 0]
        pd_idx = pl["deployment_id"].astype(str).map(pos).to_numpy()
        pt = pd.to_datetime(pl["timestamp"], utc=True).astype("int64").to_numpy() // 1_000_000
        pb = pt // step_s - start_b[pd_idx]
        good = (pb >= 0) & (pb < n_steps[pd_idx])
        for g in (0, 1):
            anomaly[block_off[pd_idx[good] * 2 + g] + pb[good]] = 1

    has_group = np.zeros(len(deps) * 2, dtype=bool)
    has_group[np.unique(d_idx * 2 + g_idx)] = True
    rows_written = 0
    gaps = int(np.isnan(wide).sum())
    with atomic_dir(out) as tmp:
        pq.write_table(pa.Table.from_pandas(deps, preserve_index=False),
                       tmp / "deployments.parquet")
        for d, dep_id in enumerate(deps["deployment_id"].astype(str)):
            parts = []
            for g, gname in enumerate(GROUPS):
                if not has_group[d * 2 + g]:
                    continue
                lo = block_off[d * 2 + g]
                hi = lo + n_steps[d]
                ts = (start_b[d] + np.arange(n_steps[d], dtype=np.int64)) * step_s * 1_000_000
                cols: dict[str, Any] = {
                    "timestamp": pa.array(ts, pa.int64()).cast(pa.timestamp("us")).cast(TS),
                    "group": pa.array([gname] * int(n_steps[d]), pa.string()),
                }
                for j, name in enumerate(metrics):
                    cols[name] = pa.array(wide[lo:hi, j], pa.float32())
                if anomaly is not None:
                    cols["anomaly"] = pa.array(anomaly[lo:hi], pa.int8())
                parts.append(pa.table(cols))
            if not parts:
                log.warning("deployment %s has no samples; it is kept with an empty partition",
                            dep_id)
                continue
            table = pa.concat_tables(parts)
            rows_written += table.num_rows
            pdir = partition_dir(tmp, dep_id)
            pdir.mkdir(parents=True)
            pq.write_table(table, pdir / "part-0.parquet", compression="zstd")
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
                "samples_in": int(s.num_rows + bundle.duplicates_dropped),
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
    """Read side of the canonical dataset. Reads one deployment without scanning the rest."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        mpath = self.path / "manifest.json"
        if not mpath.is_file():
            raise DataContractError(
                f"{self.path} is not a canonical dataset (no manifest.json); create it with "
                "`canaryml ingest source=bundle input=DIR out={self.path}`"
            )
        self.manifest: dict[str, Any] = json.loads(mpath.read_text())
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
        df = pd.read_parquet(self.path / "deployments.parquet")
        return validate_deployments(df, self.path / "deployments.parquet")

    def telemetry(self, deployment_id: str) -> pd.DataFrame:
        """Wide telemetry of one deployment: timestamp, group, one float32 column per metric."""
        pdir = partition_dir(self.path, deployment_id)
        if not pdir.is_dir():
            raise DataContractError(
                f"{self.path}: no telemetry for deployment {deployment_id!r}; known: "
                f"{', '.join(self.deployments['deployment_id'].astype(str)[:5])}…"
            )
        return pq.read_table(pdir).to_pandas()

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
