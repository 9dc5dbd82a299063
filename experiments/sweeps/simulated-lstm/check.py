"""Re-train the untuned default and the sweep's best config on the tuning split, and score both
on the study's hold-out and on a fresh simulated corpus the study never saw.

    python experiments/sweeps/simulated-lstm/check.py experiments/sweeps/simulated-lstm FRESH_DIR

FRESH_DIR: `canaryml simulate out=RAW n=100 seed=7` + `canaryml ingest source=bundle input=RAW
out=FRESH_DIR`. Writes check.json beside best.json.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from canaryml.data.atomic import atomic_write_json
from canaryml.data.dataset import CanonicalDataset
from canaryml.models.train import train_scorer
from canaryml.paths import repo_root
from canaryml.tasks.tune import _policy_config, _train_spec, trial_config
from canaryml.tune.objective import holdout_split, replay_score


def main(sweep: Path, fresh_dir: Path) -> None:
    best = json.loads((sweep / "best.json").read_text())
    ds = CanonicalDataset(repo_root() / best["dataset"]["path"])
    fresh = CanonicalDataset(fresh_dir)
    h = holdout_split(ds, 0.25, int(best["dataset"]["holdout_seed"]))
    base = ["trainer.progress_bar=false", "trainer.num_threads=1"]
    out = {}
    for name, ov in [("default_3_epochs", ["trainer.max_epochs=3"]),
                     ("default_8_epochs", []),  # the untuned config exactly as in conf/
                     ("best_3_epochs", ["trainer.max_epochs=3", *best["best_overrides"]])]:
        cfg = trial_config(base, ov)
        t0 = time.perf_counter()
        res = train_scorer(ds, _train_spec(cfg), deployments=h.train)
        pcfg = _policy_config(cfg)
        hold = replay_score(res.scorer, ds, h.holdout, pcfg)
        ids = fresh.deployments["deployment_id"].astype(str).tolist()
        fr = replay_score(res.scorer, fresh, ids, pcfg)
        out[name] = {"overrides": ov, "holdout": hold.metrics(),
                     "fresh_corpus_seed7": fr.metrics(),
                     "test/roc_auc": res.metrics.get("test/roc_auc"),
                     "epochs": res.metrics.get("train/epochs"),
                     "wall_s": time.perf_counter() - t0}
    atomic_write_json(sweep / "check.json", out)


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
