"""How many faulty canaries any policy could catch before impact, given when it may first decide.

    .venv/bin/python experiments/replay/simulated/ceiling.py [data/processed/sim-eval1 ...]

A fault counts as catchable by a first decision at t seconds into the rollout when its first SLO
breach (`impact_at`) comes later than t, or never. Read after the evaluation (labels only).
"""

from __future__ import annotations

import sys

import pandas as pd

from canaryml.data.dataset import CanonicalDataset

paths = sys.argv[1:] or [f"data/processed/sim-eval{s}" for s in (1, 2, 3)]
faulty = pd.concat([d[d["label"] == "faulty"] for d in
                    (CanonicalDataset(p).deployments for p in paths)])
impact = (pd.to_datetime(faulty["impact_at"]) - pd.to_datetime(faulty["start"])).dt.total_seconds()
print(f"{len(faulty)} faulty canaries in {', '.join(paths)}")
print("first decision at t s | catchable (all) | by onset style")
for t in (0, 30, 120, 150, 180):
    ok = impact.isna() | (impact > t)
    by = ok.groupby(faulty["fault_onset_style"]).mean().round(2).to_dict()
    print(f"{t:>5} | {ok.mean():.3f} | {by}")
