"""Single-group ablations on a point-labelled corpus (SMD, NAB): one trained scorer, re-weighted
copies (values_weight 0 = forecast error only, 1 = values detector only) and the same run's PCA
and random baselines, with TSB-AD 1.5 like `canaryml replay replay.mode=pointwise`.

    python experiments/replay/smd/ablation.py DATASET MODEL OUT.csv [--weights 0,0.5,1] [--series a,b]

Ablations over the test parts are *oracle* readings (they look at evaluation labels): they say
whether a component helps, they never choose the default (that is chosen at training on
injected anomalies, see canaryml.models.train.choose_values_weight).
"""

from __future__ import annotations

import argparse

import numpy as np
import pandas as pd

from canaryml.data.dataset import CanonicalDataset
from canaryml.models.scorer import CanaryScorer
from canaryml.replay import pointwise as pw


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("dataset")
    ap.add_argument("model")
    ap.add_argument("out")
    ap.add_argument("--weights", default="")
    ap.add_argument("--series", default="")
    ap.add_argument("--label", default="")
    ap.add_argument("--baselines", action="store_true")
    a = ap.parse_args()
    ds = CanonicalDataset(a.dataset)
    scorer = CanaryScorer.load(a.model)
    ids = ds.deployments["deployment_id"].astype(str).tolist()
    tests = [i for i in ids if i.endswith(".test")]
    if a.series:
        keep = a.series.split(",")
        tests = [t for t in tests if any(t.startswith(k) for k in keep)]
    variants = {f"{a.label}default(vw={scorer.weights.values_weight})": scorer}
    for w in filter(None, a.weights.split(",")):
        variants[f"{a.label}vw={float(w)}"] = scorer.with_values_weight(float(w))
    rows = []
    for tid in tests:
        arr = ds.arrays(tid)
        if arr.anomaly is None or arr.anomaly.sum() == 0:
            continue
        train = ds.arrays(tid[: -len(".test")] + ".train").canary
        scores = {k: v.score_series(arr) for k, v in variants.items()}
        if a.baselines:
            scores["pca"] = pw.pca_scores(train, arr.canary)
            scores["random"] = pw.random_scores(len(arr.anomaly), 0)
        for k, s in scores.items():
            m = pw.evaluate_scores(s, arr.anomaly, 0.5, 100).to_dict()
            rows.append({"series": tid, "method": k, "VUS-PR": m["VUS-PR"], "VUS-ROC": m["VUS-ROC"],
                         "AUC-PR": m["AUC-PR"], "F1@0.5": m["F1"] if k not in ("pca", "random") else np.nan})
            print(tid, k, round(m["VUS-PR"], 3), flush=True)
    t = pd.DataFrame(rows)
    t.to_csv(a.out, index=False)
    print(t.drop(columns=["series"]).groupby("method").mean().round(3).to_string())


if __name__ == "__main__":
    main()
