"""A small, self-contained synthetic canary corpus for model tests and the scoring bench.

This is *not* the project simulator (`canaryml simulate`); it exists so that the model code can
be tested and benchmarked without it. It produces the same canonical dataset layout through the
public path (bundle tables → `write_bundle` → `read_bundle` → `write_canonical`).

Per deployment both groups share a load signal (slow oscillation + random walk + optional
traffic surge); each metric responds to load with per-group noise. Healthy variants include a
benign resource shift (canary uses a few % more CPU/memory from the start). Faults act on the
canary only from `fault_onset`: error spike, latency regression, memory leak, CPU hog.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from canaryml.catalog import Catalog
from canaryml.data.dataset import DeploymentArrays

# metric: (base level, load sensitivity, relative noise)
_PROFILE: dict[str, tuple[float, float, float]] = {
    "request_rate": (100.0, 1.0, 0.03), "error_rate": (0.01, 0.2, 0.08),
    "latency_p50": (0.05, 0.3, 0.04), "latency_p95": (0.2, 0.4, 0.05),
    "latency_p99": (0.4, 0.5, 0.06), "app_cpu": (0.5, 0.8, 0.04),
    "app_memory": (1.0e9, 0.1, 0.01), "node_cpu": (0.4, 0.6, 0.04),
    "node_memory": (0.5, 0.05, 0.01), "net_rx": (5e6, 1.0, 0.04), "net_tx": (4e6, 1.0, 0.04),
    "disk_io": (2e6, 0.5, 0.06), "storage_latency": (0.004, 0.3, 0.06), "load1": (1.5, 0.7, 0.05),
}
FAULTS = ("error_spike", "latency", "mem_leak", "cpu_hog")


@dataclass(frozen=True)
class Episode:
    canary: np.ndarray
    baseline: np.ndarray
    onset: int | None  # step index of fault onset


def episode(rng: np.random.Generator, steps: int, *, fault: str | None = None,
            onset: int | None = None, surge_at: int | None = None, surge_groups: str = "both",
            surge_size: float = 0.6, benign_shift: bool = False, severity: float = 1.0,
            metrics: tuple[str, ...] = tuple(_PROFILE)) -> Episode:
    """One deployment: [steps, M] canary and baseline in raw units."""
    t = np.arange(steps)
    load = 1.0 + 0.15 * np.sin(2 * np.pi * t / rng.uniform(80, 200) + rng.uniform(0, 6))
    load = load + np.cumsum(rng.normal(0, 0.005, steps))
    load_c, load_b = load.copy(), load.copy()
    if surge_at is not None:
        bump = surge_size * np.exp(-0.5 * ((t - surge_at - 6) / 3.0) ** 2)
        if surge_groups in ("both", "canary"):
            load_c = load_c + bump
        if surge_groups in ("both", "baseline"):
            load_b = load_b + bump
    out = []
    for lg in (load_c, load_b):
        cols = []
        for m in metrics:
            base, sens, noise = _PROFILE.get(m, (1.0, 0.5, 0.05))
            level = base * (1.0 + sens * (lg - 1.0))
            cols.append(level * (1.0 + rng.normal(0, noise, steps)))
        out.append(np.stack(cols, 1))
    can, bas = out
    idx = {m: i for i, m in enumerate(metrics)}
    if benign_shift:
        for m in ("app_cpu", "app_memory"):
            if m in idx:
                can[:, idx[m]] *= 1.05
    if fault is not None and onset is not None:
        k = np.clip(t - onset, 0, None).astype(float)
        ramp = np.minimum(k / 4.0, 1.0) * severity

        def scale_up(m: str, factor: np.ndarray) -> None:
            if m in idx:
                can[:, idx[m]] *= 1.0 + factor

        if fault == "error_spike":
            scale_up("error_rate", 3.0 * ramp)
            scale_up("latency_p99", 0.2 * ramp)
        elif fault == "latency":
            for m, f in (("latency_p50", 0.5), ("latency_p95", 0.8), ("latency_p99", 1.0)):
                scale_up(m, f * ramp)
        elif fault == "mem_leak":
            scale_up("app_memory", 0.006 * k * severity)
            scale_up("node_memory", 0.002 * k * severity)
        elif fault == "cpu_hog":
            scale_up("app_cpu", 0.6 * ramp)
            scale_up("node_cpu", 0.4 * ramp)
            scale_up("load1", 0.5 * ramp)
    return Episode(can.astype(np.float32), bas.astype(np.float32), onset)


def as_arrays(ep: Episode, deployment_id: str = "x", step_s: int = 15,
              metrics: tuple[str, ...] = tuple(_PROFILE)) -> DeploymentArrays:
    ts = 1_700_000_000 + np.arange(len(ep.canary), dtype=np.int64) * step_s
    return DeploymentArrays(deployment_id, ts, ep.canary, ep.baseline, metrics)


def make_corpus(out: str | Path, n: int = 60, steps: int = 200, step_s: int = 15, seed: int = 0,
                faulty_fraction: float = 0.4, gap_fraction: float = 0.0) -> Path:
    """Write a canonical dataset of `n` deployments to `out` and return its path."""
    from canaryml.data.contract import read_bundle, write_bundle
    from canaryml.data.dataset import write_canonical

    rng = np.random.default_rng(seed)
    metrics = tuple(_PROFILE)
    t0 = pd.Timestamp("2026-01-01", tz="UTC")
    dep_rows, frames = [], []
    for i in range(n):
        start = t0 + pd.Timedelta(seconds=i * steps * step_s * 2)
        faulty = rng.random() < faulty_fraction
        fault = FAULTS[i % len(FAULTS)] if faulty else None
        onset = int(rng.integers(steps // 3, steps // 2)) if faulty else None
        surge = int(rng.integers(40, steps - 30)) if rng.random() < 0.3 else None
        ep = episode(rng, steps, fault=fault, onset=onset, surge_at=surge,
                     benign_shift=(not faulty and rng.random() < 0.3), metrics=metrics)
        ts = start + pd.to_timedelta(np.arange(steps) * step_s, unit="s")
        onset_ts = ts[onset] if onset is not None else pd.NaT
        dep_rows.append({"deployment_id": f"d{i:04d}", "service": "checkout", "start": ts[0],
                         "end": ts[-1], "label": "faulty" if faulty else "healthy",
                         "fault_onset": onset_ts,
                         "impact_at": ts[min(onset + 20, steps - 1)] if onset is not None else pd.NaT,
                         "fault_kind": fault or ""})
        for g, arr in (("canary", ep.canary), ("baseline", ep.baseline)):
            vals = arr.astype(np.float64)
            if gap_fraction:
                vals = np.where(rng.random(vals.shape) < gap_fraction, np.nan, vals)
            frames.append(pd.DataFrame({
                "timestamp": np.repeat(ts, len(metrics)), "deployment_id": f"d{i:04d}",
                "group": g, "metric": np.tile(metrics, steps), "value": vals.ravel()}))
    out = Path(out)
    bundle_dir = out.parent / f".{out.name}.bundle"
    write_bundle(pd.DataFrame(dep_rows), pd.concat(frames, ignore_index=True), bundle_dir)
    write_canonical(read_bundle(bundle_dir), out, step_s=step_s, catalog=Catalog.default(),
                    source="synthetic")
    return out
