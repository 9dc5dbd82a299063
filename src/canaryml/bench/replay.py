"""Replay speed benchmark → experiments/benchmarks/replay.json (× real time; target ≥ 10,000×).

Default corpus: 200 deployments × 60 min at 15 s (240 steps). Times the scorer policy through
Controller.step on the score_series fast path (the trained CanaryScorer when `model` is given,
else the GapZScorer stand-in), and the two judges separately.
"""

from __future__ import annotations

import logging
import os
import platform
import tempfile
from pathlib import Path
from typing import Any

from canaryml.data.atomic import atomic_write_json

log = logging.getLogger(__name__)


def run(out_dir: Path, n: int = 200, steps: int = 240, seed: int = 0, model: str | None = None,
        judges: bool = True) -> dict[str, Any]:
    from canaryml.control.kayenta import KayentaConfig
    from canaryml.control.policies import KayentaJudge, ScorerPolicy, ThresholdJudge
    from canaryml.control.policy import PolicyConfig, RollbackPolicy
    from canaryml.data.dataset import CanonicalDataset
    from canaryml.models.synthetic import make_corpus
    from canaryml.replay.runner import ReplayPolicy, replay
    from canaryml.replay.standin import GapZScorer

    with tempfile.TemporaryDirectory(prefix="canaryml-bench-replay-") as tmp:
        ds = CanonicalDataset(make_corpus(Path(tmp) / "c", n=n, steps=steps, seed=seed))
        if model:
            from canaryml.tracking import load_scorer

            scorer: Any = load_scorer(model)
        else:
            scorer = GapZScorer(ds.metrics, ds.catalog)
        cfg = PolicyConfig()
        results: dict[str, Any] = {}
        runs = [("scorer", ReplayPolicy(ScorerPolicy("scorer", scorer, RollbackPolicy(cfg)), scorer))]
        if judges:
            runs += [("argo", ReplayPolicy(ThresholdJudge(base=cfg))),
                     ("kayenta", ReplayPolicy(KayentaJudge(
                         ds.catalog, KayentaConfig(group_weights={"app": 70, "infra": 30}),
                         base=cfg)))]
        for name, rp in runs:
            r = replay(ds, [rp], interval_s=cfg.monitoring_interval_s, progress=False)
            results[name] = {"wall_s": r.wall_s, "ticks": r.ticks,
                             "x_realtime": r.simulated_s / max(r.wall_s, 1e-9)}
            log.info("replay bench %s: %.0f× real time", name, results[name]["x_realtime"])
    summary = {"x_realtime_scorer": results["scorer"]["x_realtime"], "target_x": 10_000,
               "meets_target": results["scorer"]["x_realtime"] >= 10_000,
               **{f"x_realtime_{k}": v["x_realtime"] for k, v in results.items() if k != "scorer"}}
    out = {"setup": {"deployments": n, "steps": steps, "step_s": 15, "minutes": steps * 15 / 60,
                     "scorer": type(scorer).__name__, "cpu_count": os.cpu_count(),
                     "machine": platform.machine()},
           "policies": results, "summary": summary}
    atomic_write_json(Path(out_dir) / "replay.json", out)
    return out


if __name__ == "__main__":
    import sys

    print(run(Path(sys.argv[1] if len(sys.argv) > 1 else "experiments/benchmarks"))["summary"])
