"""Forecast-error vs detector mix of one trained scorer, under the honest protocol.

Each mix is a re-weighted copy of the same scorer (`with_mix`), calibrated on the calibration
corpus (threshold and hysteresis at a false-rollback rate <= 1 %) and replayed once on the
evaluation corpora, exactly as `canaryml replay` does:

    .venv/bin/python experiments/replay/simulated/mix_ablation.py models/sim-lstm 0.5,0.75,0.9,1.0
"""

from __future__ import annotations

import sys

import numpy as np

from canaryml.control.policy import PolicyConfig
from canaryml.data.dataset import CanonicalDataset
from canaryml.replay import protocol as p


def main(model: str, mixes: list[float]) -> None:
    base = p.load_scorer_uri(model)
    scorers = {f"mix={m:g}": base.with_mix(m) for m in mixes}
    models = dict.fromkeys(scorers, model)
    pcfg = PolicyConfig()
    cal = CanonicalDataset("data/processed/sim-calib")
    b = p.PolicyBuilder(cal.catalog, tuple(cal.metrics), float(cal.step_s), pcfg, scorers, models)
    names = list(scorers)
    start = {n: p.configured_settings(n, models, pcfg, {}) for n in names}
    tuned = p.calibrate(cal, names, start, b, p.CalibrationSpace(), 0.01, np.linspace(0, 1, 101),
                        progress=False)
    evs = [(f"sim-eval{i}", CanonicalDataset(f"data/processed/sim-eval{i}")) for i in (1, 2, 3)]
    evals = p.evaluate_blind(evs, lambda ds: [b.build(n, tuned[n].settings) for n in names],
                             pcfg.monitoring_interval_s, progress=False)
    print("| forecast weight | detection | false rollbacks | caught before impact |")
    print("|---|---|---|---|")
    for n in names:
        m = p.pooled_metrics(evals, n, n_boot=1000, seed=0)
        lo, hi = m["ci95"]["caught_before_impact"]
        print(f"| {n.split('=')[1]} | {m['detection_rate']:.2f} | {m['false_rollback_rate']:.3f} "
              f"| {m['caught_before_impact']:.2f} [{lo:.2f}, {hi:.2f}] |")


if __name__ == "__main__":
    main(sys.argv[1], [float(x) for x in sys.argv[2].split(",")])
