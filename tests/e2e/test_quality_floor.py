"""A quality floor on the headline, under the honest protocol (issue 12): a scorer trained on
one simulated corpus, every policy calibrated on a second, evaluated once on a third. Fails when
a change makes the scorer catch fewer faulty canaries before impact than the floor, or no more
than the tuned Argo-style thresholds."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from canaryml.bench.scoring import simulated_dataset
from canaryml.control.policy import PolicyConfig
from canaryml.data.dataset import CanonicalDataset
from canaryml.models.networks import NetworkSpec
from canaryml.models.train import TrainerSpec, TrainSpec, train_scorer
from canaryml.replay import protocol

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

FLOOR = 0.30  # measured 0.40 (Argo 0.175) on these seeds at commit time; the 3-seed headline is 0.59


def test_caught_before_impact_floor_on_held_back_seeds(tmp_path: Path) -> None:
    torch.set_num_threads(2)
    train = CanonicalDataset(simulated_dataset(tmp_path / "train", n=60, seed=21))
    cal = CanonicalDataset(simulated_dataset(tmp_path / "cal", n=60, seed=22))
    ev = CanonicalDataset(simulated_dataset(tmp_path / "eval", n=80, seed=23))
    scorer = train_scorer(train, TrainSpec(network=NetworkSpec(kind="lstm", min_history=4),
                                           trainer=TrainerSpec(max_epochs=3, progress_bar=False),
                                           seed=0)).scorer
    pcfg = PolicyConfig()
    rc = {"argo": {"metrics": "slo", "limit_fraction": 1.0, "failure_limit": 3, "measure_s": 60}}
    names = ["scorer", "argo"]
    b = protocol.PolicyBuilder(cal.catalog, tuple(cal.metrics), float(cal.step_s), pcfg,
                               {"scorer": scorer})
    base = {n: protocol.configured_settings(n, {}, pcfg, rc) for n in names}
    space = protocol.CalibrationSpace(argo_measure_s=(30.0, 60.0), argo_metrics=("slo",))
    tuned = protocol.calibrate(cal, names, base, b, space, 0.02, np.linspace(0, 1, 101),
                               progress=False)
    evals = protocol.evaluate_blind(
        [("eval", ev)], lambda ds: [b.build(n, tuned[n].settings) for n in names],
        pcfg.monitoring_interval_s, progress=False)
    m = {n: protocol.pooled_metrics(evals, n, n_boot=10, seed=0) for n in names}
    print({n: (v["caught_before_impact"], v["false_rollback_rate"]) for n, v in m.items()})
    assert m["scorer"]["false_rollback_rate"] <= 0.1, m["scorer"]
    assert m["scorer"]["caught_before_impact"] >= FLOOR, m["scorer"]
    assert m["scorer"]["caught_before_impact"] >= m["argo"]["caught_before_impact"] + 0.1, m
