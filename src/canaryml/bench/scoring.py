"""Scoring benchmark → experiments/benchmarks/scoring.json.

Trains the default scorer (lstm + iforest, default window) on the default corpus (the project
simulator when available — 200 deployments × 240 steps — else the built-in synthetic corpus of
the same size), then measures on one thread:
  * p50/p99 latency of one decision tick (`score(window)`, canary + baseline, all metrics);
  * batched throughput (`score_batch` of 256 windows; `score_series` of whole deployments);
  * training seconds per epoch.
Target: p99 ≤ 1 ms per tick.
"""

from __future__ import annotations

import logging
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from canaryml.data.atomic import atomic_write_json

log = logging.getLogger(__name__)


def simulated_dataset(root: Path, n: int, seed: int, step_s: int = 15) -> Path:
    """Canonical dataset from the project simulator through the public path (simulate →
    write_bundle → read_bundle → write_canonical). Raises ImportError without a simulator."""
    import inspect

    from canaryml.catalog import Catalog
    from canaryml.data.contract import read_bundle, write_bundle
    from canaryml.data.dataset import write_canonical
    from canaryml.simulate import simulate_corpus  # type: ignore[attr-defined]

    bundle = root / "bundle"
    params = inspect.signature(simulate_corpus).parameters
    kwargs: dict[str, Any] = {"n": n, "seed": seed}
    if "out" in params:
        kwargs["out"] = bundle
    result = simulate_corpus(**{k: v for k, v in kwargs.items() if k in params})
    if isinstance(result, tuple) and len(result) >= 2:  # (deployments, samples) tables
        write_bundle(result[0], result[1], bundle)
    elif hasattr(result, "deployments") and hasattr(result, "samples"):
        write_bundle(result.deployments, result.samples, bundle)
    write_canonical(read_bundle(bundle), root / "canonical", step_s=step_s,
                    catalog=Catalog.default(), source="simulator")
    return root / "canonical"


def _corpus(root: Path, n: int, steps: int, seed: int) -> tuple[Path, str]:
    try:
        return simulated_dataset(root, n, seed), "simulator"
    except ImportError:
        from canaryml.models.synthetic import make_corpus

        log.info("canaryml.simulate not available: benchmarking on the built-in synthetic corpus")
        return make_corpus(root / "canonical", n=n, steps=steps, seed=seed), "synthetic"


def run(out_dir: Path, n: int = 200, steps: int = 240, seed: int = 0, max_epochs: int = 3,
        ticks: int = 2000, forecaster: str = "lstm") -> dict[str, Any]:
    from canaryml.control.types import Window
    from canaryml.data.dataset import CanonicalDataset
    from canaryml.models.networks import NetworkSpec
    from canaryml.models.train import TrainerSpec, TrainSpec, train_scorer

    out_dir = Path(out_dir)
    threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory(prefix="canaryml-bench-") as tmp:
        path, source = _corpus(Path(tmp), n, steps, seed)
        ds = CanonicalDataset(path)
        spec = TrainSpec(network=NetworkSpec(kind=forecaster),
                         trainer=TrainerSpec(max_epochs=max_epochs, progress_bar=False), seed=seed)
        result = train_scorer(ds, spec)
        scorer = result.scorer
        arrays = [ds.arrays(d) for d in result.split["test"][:20]]
    torch.set_num_threads(1)
    try:
        w = scorer.lookback
        windows = []
        for a in arrays:
            for end in range(w, len(a.timestamps_s) + 1, 7):
                windows.append(Window(a.deployment_id, float(a.timestamps_s[end - 1]),
                                      a.timestamps_s[end - w:end], a.canary[end - w:end],
                                      None if a.baseline is None else a.baseline[end - w:end],
                                      a.metrics))
        for win in windows[:50]:  # warm-up
            scorer.score(win)
        lat = np.empty(ticks)
        for i in range(ticks):
            win = windows[i % len(windows)]
            t_ns = time.perf_counter_ns()
            scorer.score(win)
            lat[i] = (time.perf_counter_ns() - t_ns) / 1e6
        batch = windows[:256]
        t0 = time.perf_counter()
        reps = 5
        for _ in range(reps):
            scorer.score_batch(batch)
        batch_tps = reps * len(batch) / (time.perf_counter() - t0)
        t0 = time.perf_counter()
        n_ticks = 0
        for a in arrays:
            scorer.score_series(a)
            n_ticks += max(len(a.timestamps_s) - w + 1, 0)
        series_tps = n_ticks / (time.perf_counter() - t0)
    finally:
        torch.set_num_threads(threads)
    summary = {
        "tick_latency_ms_p50": float(np.percentile(lat, 50)),
        "tick_latency_ms_p99": float(np.percentile(lat, 99)),
        "target_p99_ms": 1.0,
        "meets_target": bool(np.percentile(lat, 99) <= 1.0),
        "batch_ticks_per_s": float(batch_tps),
        "series_ticks_per_s": float(series_tps),
        "train_sec_per_epoch": float(result.metrics["train/sec_per_epoch"]),
        "test_roc_auc": result.metrics.get("test/roc_auc"),
    }
    report = {
        "summary": summary,
        "setup": {"corpus": source, "deployments": n, "steps": steps, "metrics": len(scorer.metrics),
                  "forecaster": forecaster, "detector": "iforest", "lookback": scorer.spec.lookback,
                  "horizon": scorer.spec.horizon, "window_steps": scorer.lookback,
                  "train_windows": result.metrics["train/windows"], "epochs": max_epochs,
                  "scoring_threads": 1, "train_threads": threads, "cpu_count": os.cpu_count(),
                  "machine": platform.processor() or platform.machine(), "torch": torch.__version__},
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out_dir / "scoring.json", report)
    return report


if __name__ == "__main__":
    import json

    from canaryml.paths import repo_root

    logging.basicConfig(level=logging.INFO)
    print(json.dumps(run(repo_root() / "experiments" / "benchmarks")["summary"], indent=2))
