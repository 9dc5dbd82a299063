"""Replay speed benchmark → experiments/benchmarks/replay.json (target ≥ 10,000× real time per
core for every policy, issue 14).

Default corpus: the project simulator's (the scoring bench's corpus code), 200 deployments ×
60 min at 15 s, replayed through `Controller.step` exactly as `canaryml replay` does (policy
decisions plus the never-acting shadow that records every tick's score for the sweep). Policies:

  * the real scorers, trained here from the shipped conf (`max_epochs` shortened): LSTM +
    Isolation Forest (the default) and Transformer + OC-SVM, on a training corpus of another
    seed; the `score_series` fast path, one torch thread;
  * Argo-style thresholds and the Kayenta judge at their configured defaults;
  * the GapZScorer stand-in, beside them and named so (not a product model).

Each is replayed alone in ONE process (one worker, one torch thread) → × real time per core,
from wall time and from the process's CPU time (which a shared machine's load inflates less),
with the 1-minute load average around it. Baseline, measured in the same run on the first
`baseline_deployments`: the per-tick path before issue 14 — Kayenta testing each interval with
the scalar Mann-Whitney (scipy's brentq per root, no per-deployment batch) and scorers with
torch's default thread count.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from canaryml.data.atomic import atomic_write_json

log = logging.getLogger(__name__)


def _measure(run: Callable[[], Any]) -> dict[str, Any]:
    load0 = os.getloadavg()[0]
    cpu0, t0 = time.process_time(), time.perf_counter()
    r = run()
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    return {"wall_s": wall, "cpu_s": cpu, "ticks": r.ticks, "simulated_s": r.simulated_s,
            "deployments": len(r.deployments),
            "x_realtime_per_core": r.simulated_s / max(wall, 1e-9),
            "x_realtime_per_cpu_s": r.simulated_s / max(cpu, 1e-9),
            "loadavg_1m_before_after": [load0, os.getloadavg()[0]]}


def run(out_dir: Path, n: int = 200, steps: int = 240, seed: int = 0, max_epochs: int = 2,
        baseline_deployments: int = 40) -> dict[str, Any]:
    import numpy as np
    import torch

    from canaryml.bench.scoring import _corpus, _shipped_spec
    from canaryml.control.kayenta import KayentaConfig
    from canaryml.control.policies import KayentaJudge, ScorerPolicy, ThresholdJudge
    from canaryml.control.policy import PolicyConfig, RollbackPolicy
    from canaryml.data.dataset import CanonicalDataset
    from canaryml.models.train import train_scorer
    from canaryml.replay.runner import ReplayPolicy, deployment_table, replay
    from canaryml.replay.standin import GapZScorer

    threads = torch.get_num_threads()
    cfg = PolicyConfig()
    results: dict[str, Any] = {}
    baseline: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="canaryml-bench-replay-") as tmp:
        eval_path, source = _corpus(Path(tmp) / "eval", n, steps, seed + 1)
        train_path, _ = _corpus(Path(tmp) / "train", n, steps, seed)
        ds, train_ds = CanonicalDataset(eval_path), CanonicalDataset(train_path)
        scorers: dict[str, Any] = {}
        for forecaster, detector in (("lstm", "iforest"), ("transformer", "ocsvm")):
            log.info("replay bench: training %s+%s …", forecaster, detector)
            torch.set_num_threads(threads)
            trained = train_scorer(train_ds, _shipped_spec(forecaster, detector, max_epochs, seed))
            scorers[f"scorer {forecaster}+{detector}"] = trained.scorer

        def scorer_policy(name: str, sc: Any) -> ReplayPolicy:
            return ReplayPolicy(ScorerPolicy(name, sc, RollbackPolicy(cfg.for_model(sc))), sc)

        def judges() -> dict[str, ReplayPolicy]:
            return {"argo": ReplayPolicy(ThresholdJudge(base=cfg, step_s=float(ds.step_s))),
                    "kayenta": ReplayPolicy(KayentaJudge(
                        ds.catalog, KayentaConfig(group_weights={"app": 70, "infra": 30}),
                        base=cfg, step_s=float(ds.step_s)))}

        policies = {**{k: scorer_policy(k, v) for k, v in scorers.items()}, **judges(),
                    "stand-in GapZScorer (not a product model)": scorer_policy(
                        "standin", GapZScorer(ds.metrics, ds.catalog))}
        for name, rp in policies.items():
            log.info("replay bench: %s …", name)
            results[name] = _measure(functools.partial(
                replay, ds, [rp], interval_s=cfg.monitoring_interval_s, progress=False, workers=1))
        # all policies together, the worker processes sized to the cores (what replay runs)
        together = [scorer_policy(f"s{i}", sc) for i, sc in enumerate(scorers.values())]
        together += list(judges().values())
        all_cores = _measure(lambda: replay(ds, together, interval_s=cfg.monitoring_interval_s,
                                            progress=False))

        # ---- baseline: the per-tick path before issue 14, on the first deployments --------
        few = deployment_table(ds).head(int(baseline_deployments))
        lstm = scorers["scorer lstm+iforest"]
        old_kayenta = judges()["kayenta"]
        old_kayenta.policy.prefetch = lambda windows: None  # type: ignore[attr-defined]
        now_kayenta = judges()["kayenta"]
        runs = {"kayenta": (old_kayenta, now_kayenta),
                "scorer lstm+iforest": (scorer_policy("s", lstm), scorer_policy("s", lstm))}
        for name, (old, new) in runs.items():
            torch.set_num_threads(threads)
            one = functools.partial(replay, ds, interval_s=cfg.monitoring_interval_s,
                                    deployments=few, progress=False, workers=1)
            before = _measure(functools.partial(_default_threads, functools.partial(one, [old]),
                                                threads))
            after = _measure(functools.partial(one, [new]))
            baseline[name] = {"before": before, "now": after,
                              "speedup_wall": before["wall_s"] / max(after["wall_s"], 1e-9)}
        torch.set_num_threads(threads)
    per_core = {k: v["x_realtime_per_core"] for k, v in results.items()}
    real = {k: v for k, v in per_core.items() if "stand-in" not in k}
    summary = {
        "x_realtime_per_core": per_core,
        "x_realtime_per_cpu_s": {k: v["x_realtime_per_cpu_s"] for k, v in results.items()},
        "x_realtime_all_policies_all_cores": all_cores["x_realtime_per_core"],
        "target_x_per_core": 10_000,
        "meets_target": bool(min(real.values()) >= 10_000),
        "slowest_real_policy": min(real, key=lambda k: real[k]),
        "baseline_speedup_wall": {k: v["speedup_wall"] for k, v in baseline.items()},
        "loadavg_1m": float(np.mean([v["loadavg_1m_before_after"][0] for v in results.values()])),
    }
    out = {"setup": {"corpus": source, "deployments": n, "steps": steps, "step_s": 15,
                     "minutes": steps * 15 / 60, "monitoring_interval_s": cfg.monitoring_interval_s,
                     "scorers_trained_epochs": max_epochs, "cpu_count": os.cpu_count(),
                     "machine": platform.machine(), "processor": platform.processor(),
                     "python": sys.version.split()[0], "numpy": np.__version__,
                     "torch": torch.__version__, "baseline_deployments": int(baseline_deployments),
                     "note": "per core = one process, one torch thread; wall-based on a shared "
                             "machine (see loadavg), cpu-based beside it"},
           "policies": results, "all_policies_all_cores": all_cores, "baseline": baseline,
           "summary": summary}
    atomic_write_json(Path(out_dir) / "replay.json", out)
    return out


def _default_threads(fn: Callable[[], Any], threads: int) -> Any:
    """Run `fn` as replay ran before issue 14: scorers with torch's default thread count."""
    import canaryml.replay.runner as runner

    saved = runner._one_torch_thread
    runner._one_torch_thread = contextlib.nullcontext  # type: ignore[assignment]
    try:
        return fn()
    finally:
        runner._one_torch_thread = saved


if __name__ == "__main__":
    print(run(Path(sys.argv[1] if len(sys.argv) > 1 else "experiments/benchmarks"))["summary"])
