"""The operating point is fitted state: chosen at training on held-back deployments, stored in
the model, followed by replay and serve unless `policy.rollback_threshold` is set explicitly."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np

from canaryml.control.policies import ScorerPolicy
from canaryml.control.policy import PolicyConfig, RollbackPolicy
from canaryml.control.types import ScoreResult, Window
from canaryml.data.dataset import CanonicalDataset
from canaryml.models.synthetic import make_corpus
from canaryml.replay import protocol
from canaryml.replay.standin import GapZScorer
from canaryml.serving.model_holder import HeldScorer


class FixedScorer:
    """Scores every window 0.6; its operating point can be swapped like a champion's."""

    metrics = ("latency_p99",)
    lookback = 1

    def __init__(self, operating_point: dict | None) -> None:
        self.operating_point = operating_point

    def score(self, window: Window) -> ScoreResult:
        return ScoreResult(0.6, 0.6, 0.6, 0.6, 0.0)


def _window(now: float) -> Window:
    return Window("d", now, np.array([int(now)]), np.ones((1, 1), np.float32),
                  np.ones((1, 1), np.float32), ("latency_p99",))


def test_null_threshold_follows_the_model_and_a_number_overrides_it() -> None:
    follow = PolicyConfig.from_mapping({"rollback_threshold": None, "warmup_s": 0})
    fixed = PolicyConfig.from_mapping({"rollback_threshold": 0.5, "warmup_s": 0})
    assert follow.follow_model and not fixed.follow_model
    model = SimpleNamespace(operating_point={"rollback_threshold": 0.7, "consecutive_breaches": 1})
    assert follow.for_model(model).rollback_threshold == 0.7
    assert follow.for_model(model).consecutive_breaches == 1
    assert fixed.for_model(model) == fixed
    assert follow.for_model(SimpleNamespace(operating_point=None)) == follow  # no op: fallback


def test_a_hot_swapped_model_brings_its_operating_point() -> None:
    scorer = FixedScorer({"rollback_threshold": 0.7, "consecutive_breaches": 1})
    holder = SimpleNamespace(current=SimpleNamespace(scorer=scorer), metrics_names=scorer.metrics,
                             lookback=1, score=scorer.score)
    held = HeldScorer(holder)  # type: ignore[arg-type]
    cfg = PolicyConfig.from_mapping({"rollback_threshold": None, "warmup_s": 0})
    policy = ScorerPolicy("model", held, RollbackPolicy(cfg))  # type: ignore[arg-type]
    st = policy.initial_state()
    d, st = policy.step(_window(0.0), 0.0, st)
    assert d.action == "continue" and d.evidence["threshold"] == 0.7  # 0.6 under the model's 0.7
    # the champion moves to a model whose own threshold is 0.5: the next tick rolls back
    holder.current = SimpleNamespace(scorer=FixedScorer({"rollback_threshold": 0.5,
                                                         "consecutive_breaches": 1}))
    d, st = policy.step(_window(30.0), 30.0, st)
    assert d.action == "rollback" and d.evidence["threshold"] == 0.5
    # an explicit policy.rollback_threshold wins over any model
    pinned = ScorerPolicy("model", held, RollbackPolicy(  # type: ignore[arg-type]
        PolicyConfig.from_mapping({"rollback_threshold": 0.9, "warmup_s": 0})))
    d, _ = pinned.step(_window(60.0), 60.0, pinned.initial_state())
    assert d.action == "continue" and d.evidence["threshold"] == 0.9


def test_training_side_choice_bounds_false_rollbacks_on_the_held_back_deployments(
        tmp_path: Path) -> None:
    ds = CanonicalDataset(make_corpus(tmp_path / "c", n=20, steps=160, seed=8))
    scorer = GapZScorer(ds.metrics, ds.catalog, lookback=20)
    ids = ds.deployments["deployment_id"].astype(str).tolist()
    cfg = PolicyConfig(warmup_s=0)
    op = protocol.choose_operating_point(scorer, ds, ids, cfg, target_frr=0.1)
    assert op is not None and op["consecutive_breaches"] in (1, 2, 3)
    assert op["false_rollback_rate"] <= 0.1 and op["deployments"] == 20
    # the replay built from it uses exactly that threshold
    b = protocol.PolicyBuilder(ds.catalog, tuple(ds.metrics), 15.0,
                               PolicyConfig.from_mapping({"rollback_threshold": None}),
                               {"scorer": SimpleNamespace(operating_point=op, lookback=20,
                                                          metrics=ds.metrics)})
    s = protocol.configured_settings("scorer", {}, b.pcfg, {}, b.scorers["scorer"])
    assert s == {"rollback_threshold": op["rollback_threshold"],
                 "consecutive_breaches": op["consecutive_breaches"],
                 "predict_probability": None}  # a stand-in has no breach predictor
    healthy = [i for i, lb in zip(ids, ds.deployments["label"], strict=True) if lb == "faulty"]
    assert protocol.choose_operating_point(scorer, ds, healthy, cfg, 0.1) is None


def test_the_operating_point_survives_save_and_load(tmp_path: Path) -> None:
    from dataclasses import replace

    from canaryml.models.networks import NetworkSpec
    from canaryml.models.scorer import CanaryScorer
    from canaryml.models.train import TrainerSpec, TrainSpec, train_scorer

    ds = CanonicalDataset(make_corpus(tmp_path / "c", n=10, steps=80, seed=2))
    spec = TrainSpec(network=NetworkSpec(lookback=8, horizon=2, hidden=8),
                     trainer=TrainerSpec(max_epochs=1, progress_bar=False, num_threads=1))
    sc = train_scorer(ds, replace(spec)).scorer
    sc.operating_point = {"rollback_threshold": 0.42, "consecutive_breaches": 2}
    back = CanaryScorer.load(sc.save(tmp_path / "sc"))
    assert back.operating_point == sc.operating_point
    assert back.with_mix(0.0).operating_point is None  # chosen for the default mix only


def test_a_false_rollback_target_with_confidence_needs_the_runs_to_show_it() -> None:
    import pandas as pd
    from scipy.stats import beta

    from canaryml.replay.evaluate import frr_upper_bound, operating_point

    # one-sided Clopper–Pearson: 0 of n → 1 − (1 − c)^(1/n); k of n → the Beta quantile
    assert np.isclose(frr_upper_bound(np.array([0]), np.array([100]), 0.8)[0],
                      1 - 0.2 ** (1 / 100))
    assert np.isclose(frr_upper_bound(np.array([3]), np.array([400]), 0.9)[0],
                      beta.ppf(0.9, 4, 397))
    sweep = pd.DataFrame({  # the same observed rates from a small and a large corpus
        "threshold": [0.3, 0.5, 0.7, 0.9], "caught_before_impact": [0.9, 0.8, 0.7, 0.6],
        "detection_rate": [1.0, 0.9, 0.8, 0.7],
        "false_rollback_rate": [0.009, 0.006, 0.003, 0.0],
        "false_rollbacks": [9, 6, 3, 0], "healthy_runs": [1000] * 4})
    assert operating_point(sweep, 0.01)["threshold"] == 0.3  # the observed rate ≤ 1 %
    # at 80 % confidence 9 of 1,000 (bound ~1.2 %) is not enough, 6 of 1,000 (~0.9 %) is
    assert operating_point(sweep, 0.01, confidence=0.8)["threshold"] == 0.5
    small = sweep.assign(false_rollbacks=[1, 1, 0, 0], healthy_runs=[100] * 4,
                         false_rollback_rate=[0.01, 0.01, 0.0, 0.0])
    # 0 of 100 healthy runs bounds the rate only at ~1.6 %: nothing qualifies for 1 %
    assert operating_point(small, 0.01, confidence=0.8) is None
    assert operating_point(small, 0.01)["threshold"] == 0.3
