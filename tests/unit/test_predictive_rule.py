"""Predictive rollback: the breach predictor (canaryml.models.predict), the policy's predictive
rule, its sweep (replay calibration) and the model's operating point that carries it."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from canaryml.catalog import Catalog
from canaryml.control.policies import ScorerPolicy
from canaryml.control.policy import PolicyConfig, RollbackPolicy
from canaryml.control.types import ScoreResult, Window
from canaryml.data.dataset import CanonicalDataset
from canaryml.errors import ConfigError
from canaryml.models.predict import (
    FeatureMap,
    LabelledDeployment,
    PredictorSpec,
    fit_on_dataset,
    fit_predictor,
    tick_windows,
)
from canaryml.models.synthetic import make_corpus
from canaryml.replay.evaluate import ScoreHistory, sweep_first_rollback

CATALOG = Catalog.from_mapping({
    "error_rate": {"kind": "app", "direction": "up", "slo": 0.05},
    "app_cpu": {"kind": "app", "direction": "up"},
})
METRICS = ("error_rate", "app_cpu")


def _deployment(rng: np.random.Generator, faulty: bool, steps: int = 160) -> LabelledDeployment:
    """Error ratio 1 % on both groups; a faulty canary's ramps from step 40 to the 5 % SLO at
    step 110 (impact), its CPU rising with it (a precursor)."""
    t = np.arange(steps)
    ts = 1_700_000_000 + 15 * t
    base = np.stack([0.01 + 0.002 * rng.standard_normal(steps),
                     1.0 + 0.05 * rng.standard_normal(steps)], 1)
    can = np.stack([0.01 + 0.002 * rng.standard_normal(steps),
                    1.0 + 0.05 * rng.standard_normal(steps)], 1)
    onset = impact = None
    if faulty:
        ramp = np.clip((t - 40) / 70.0, 0, None)
        can[:, 0] += 0.045 * ramp
        can[:, 1] += 0.5 * ramp
        onset, impact = float(ts[40]), float(ts[110])
    return LabelledDeployment(can.astype(np.float32), base.astype(np.float32), ts, faulty, onset,
                              impact)


@pytest.fixture(scope="module")
def predictor():  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(0)
    deps = [_deployment(rng, i % 2 == 0) for i in range(40)]
    return fit_predictor(deps, METRICS, CATALOG, 15.0,
                         PredictorSpec(horizon_s=600.0, window=60, max_iter=60), seed=0)


def test_features_are_named_and_nan_where_nothing_is_observed() -> None:
    fm = FeatureMap(METRICS, CATALOG, 15.0, PredictorSpec(window=60))
    rng = np.random.default_rng(1)
    d = _deployment(rng, True)
    c, b = tick_windows(d.canary, d.baseline, 60, np.array([0, 50, 159]))
    x = fm(c, b)
    assert x.shape == (3, len(fm.names()))
    age = x[:, fm.names().index("age_s")]
    assert list(age) == [15.0, 51 * 15.0, 60 * 15.0]  # capped at the window
    assert np.isnan(fm(c, None)[:, fm.names().index("ratio:1m:app_cpu")]).all()  # no baseline


def _reference_features(fm: FeatureMap, can: np.ndarray, base: np.ndarray | None) -> np.ndarray:
    """The features as the module docstring defines them, one window and one column at a time
    with numpy's nan-functions and polyfit: what the vectorised FeatureMap must equal."""
    long, mid, short, start = 40, 12, 4, 8

    def slope(v: np.ndarray) -> float:
        t = np.arange(len(v), dtype=float)
        ok = np.isfinite(v)
        if ok.sum() < 2 or np.ptp(t[ok]) == 0:
            return np.nan
        return float(np.polyfit(t[ok], v[ok], 1)[0]) * 3600.0 / fm.step_s

    def med(v: np.ndarray) -> float:
        return float(np.nanmedian(v)) if np.isfinite(v).any() else np.nan

    def group(x: np.ndarray | None) -> list[float]:
        if x is None:
            return [np.nan] * (6 * len(fm.slo_idx))
        cols = []
        for i, slo, down in zip(fm.slo_idx, fm.slo, fm.down, strict=True):
            u = x[-long:, i].astype(float) / slo
            u = 2.0 - u if down else u
            level, tm, ta = med(u[-short:]), slope(u[-mid:]), slope(u)
            top = float(np.nanmax(u[-mid:])) if np.isfinite(u[-mid:]).any() else np.nan
            ahead = fm.spec.horizon_s / 3600.0
            cols.append([level, top, tm, ta, level + tm * ahead, level + ta * ahead])
        return [c[p] for p in range(6) for c in cols]

    rows = []
    for j in range(len(can)):
        c = can[j, -fm.spec.window:]
        b = None if base is None else base[j, -fm.spec.window:]
        seen = ~np.isnan(c).all(1)
        first = int(seen.argmax()) if seen.any() else len(c)
        gc, gb = np.array(group(c)), np.array(group(b))
        ratios = [np.nan] * (5 * len(fm.metrics))
        if b is not None:
            with np.errstate(all="ignore"):
                lr = np.log(np.abs(c.astype(float)) + 1e-9) - np.log(np.abs(b.astype(float)) + 1e-9)
            r, s0 = lr[-long:], lr[np.clip(first + np.arange(start), 0, len(c) - 1)]
            ratios = ([med(r[-short:, i]) for i in range(len(fm.metrics))]
                      + [med(r[-mid:, i]) for i in range(len(fm.metrics))]
                      + [med(r[:, i]) for i in range(len(fm.metrics))]
                      + [med(s0[:, i]) for i in range(len(fm.metrics))]
                      + [slope(r[:, i]) for i in range(len(fm.metrics))])
        rows.append([*gc, *gb, *(gc - gb), *ratios, (len(c) - first) * fm.step_s])
    return np.array(rows)


def test_the_vectorised_features_equal_their_definition() -> None:
    fm = FeatureMap(METRICS, CATALOG, 15.0, PredictorSpec(window=60))
    rng = np.random.default_rng(3)
    d = _deployment(rng, True)
    can, base = d.canary.copy(), d.baseline.copy()
    can[rng.random(can.shape) < 0.15] = np.nan  # missed scrapes
    can[100:110, 0] = np.nan  # a metric missing for a while
    c, b = tick_windows(can, base, 60, np.array([0, 1, 5, 50, 105, 159]))
    for bb in (b, None):
        np.testing.assert_allclose(fm(c, bb), _reference_features(fm, c, bb), rtol=1e-9,
                                   atol=1e-9, equal_nan=True)


def test_the_predictor_ranks_a_ramp_towards_the_slo_above_healthy_canaries(predictor) -> None:  # type: ignore[no-untyped-def]
    assert predictor is not None
    rng = np.random.default_rng(7)
    ends = np.array([30, 80, 100])  # before onset, mid-ramp, just before impact
    bad, good = _deployment(rng, True), _deployment(rng, False)
    p_bad = predictor.predict(*tick_windows(bad.canary, bad.baseline, 60, ends))
    p_good = predictor.predict(*tick_windows(good.canary, good.baseline, 60, ends))
    assert p_bad[1] > 0.5 and p_bad[2] > 0.5 and p_bad[0] < 0.5
    assert (p_good < 0.5).all()
    rel = predictor.reliability
    assert rel and sum(r["ticks"] for r in rel) == predictor.info["ticks"]
    # an all-NaN canary window has no probability
    nan = np.full((1, 60, 2), np.nan, np.float32)
    assert np.isnan(predictor.predict(nan, nan)).all()


def test_no_predictor_without_labelled_impacts_or_slo_metrics() -> None:
    rng = np.random.default_rng(3)
    healthy = [_deployment(rng, False) for _ in range(10)]
    assert fit_predictor(healthy, METRICS, CATALOG, 15.0, PredictorSpec(window=60)) is None
    no_slo = Catalog.from_mapping({m: {"kind": "app", "direction": "up"} for m in METRICS})
    deps = [_deployment(rng, i % 2 == 0) for i in range(10)]
    assert fit_predictor(deps, METRICS, no_slo, 15.0, PredictorSpec(window=60)) is None


class _Scorer:
    metrics = METRICS
    lookback = 1

    def __init__(self, p: float, op: dict | None = None, horizon: float = 600.0) -> None:
        self.p = p
        self.operating_point = op
        self.predictor = SimpleNamespace(horizon_s=horizon, spec=SimpleNamespace(window=1))

    def score(self, window: Window) -> ScoreResult:
        return ScoreResult(0.1, 0.1, 0.1, 0.1, 0.0, breach_probability=self.p)


def _window(now: float) -> Window:
    return Window("d", now, np.array([int(now)]), np.ones((1, 2), np.float32),
                  np.ones((1, 2), np.float32), METRICS)


def test_the_predictive_rule_rolls_back_on_a_predicted_breach_with_a_low_score() -> None:
    cfg = PolicyConfig.from_mapping({"rollback_threshold": 0.5, "consecutive_breaches": 1,
                                     "warmup_s": 0, "predict_probability": 0.8})
    d, _ = ScorerPolicy("s", _Scorer(0.9), RollbackPolicy(cfg)).step(_window(0.0), 0.0,
                                                                     RollbackPolicy().initial_state())
    assert d.action == "rollback" and "predicted SLO breach within 600 s" in d.reason
    assert d.evidence["breach_probability"] == 0.9 and d.evidence["predicted_breach"]
    d, _ = ScorerPolicy("s", _Scorer(0.7), RollbackPolicy(cfg)).step(_window(0.0), 0.0,
                                                                     RollbackPolicy().initial_state())
    assert d.action == "continue"
    off = PolicyConfig.from_mapping({"rollback_threshold": 0.5, "consecutive_breaches": 1,
                                     "warmup_s": 0, "predict_probability": 1.0})
    d, _ = ScorerPolicy("s", _Scorer(1.0), RollbackPolicy(off)).step(_window(0.0), 0.0,
                                                                    RollbackPolicy().initial_state())
    assert d.action == "continue"  # 1.0 turns the rule off


def test_null_probability_follows_the_model_and_a_hot_swap_brings_it() -> None:
    cfg = PolicyConfig.from_mapping({"rollback_threshold": None, "warmup_s": 0})
    scorer = _Scorer(0.9, {"rollback_threshold": 0.5, "consecutive_breaches": 1,
                           "predict_probability": 0.95})
    policy = ScorerPolicy("s", scorer, RollbackPolicy(cfg))
    d, st = policy.step(_window(0.0), 0.0, policy.initial_state())
    assert d.action == "continue"  # 0.9 is not over the model's 0.95
    scorer.operating_point = {"rollback_threshold": 0.5, "consecutive_breaches": 1,
                              "predict_probability": 0.85}  # the champion is swapped
    d, _ = policy.step(_window(30.0), 30.0, st)
    assert d.action == "rollback" and "p=0.90 > 0.85" in d.reason
    # no predictor: the rule cannot fire whatever the config says
    bare = SimpleNamespace(operating_point=None)
    assert PolicyConfig.from_mapping({"predict_probability": 0.5}).for_model(
        bare).predict_probability is None


def test_a_horizon_the_model_was_not_trained_for_is_refused() -> None:
    cfg = PolicyConfig.from_mapping({"predict_horizon_s": 300, "predict_probability": 0.5})
    with pytest.raises(ConfigError, match=r"predict_horizon_s=300.*trained for 600"):
        ScorerPolicy("s", _Scorer(0.9), RollbackPolicy(cfg))
    with pytest.raises(ConfigError, match="outside the score's range"):
        PolicyConfig.from_mapping({"predict_probability": 1.5})


def test_the_sweep_of_the_predictive_rule_matches_the_policy() -> None:
    rng = np.random.default_rng(5)
    D, T = 30, 40
    times = np.tile(np.arange(T) * 30.0, (D, 1))
    scores = rng.random((D, T))
    scores[rng.random((D, T)) < 0.05] = np.nan  # fail-safe ticks
    predicted = rng.random((D, T))
    h = ScoreHistory(tuple(f"d{i}" for i in range(D)), times, scores, predicted)
    cfg = PolicyConfig(warmup_s=60, consecutive_breaches=2, batch_interval_s=300, max_batches=3)
    for p, thr in ((0.9, 0.95), (0.97, 0.8)):
        swept = sweep_first_rollback(h.with_predictive_rule(p), cfg, [thr])[0]
        pol = RollbackPolicy(cfg.with_threshold(thr))
        from dataclasses import replace

        pol = RollbackPolicy(replace(pol.config, predict_probability=p, predict_horizon_s=600.0))
        for i in range(D):
            st = pol.initial_state()
            first = np.nan
            for t in range(T):
                s = scores[i, t]
                d, st = pol.decide(None if np.isnan(s) else float(s), times[i, t], st,
                                   predicted=float(predicted[i, t]))
                if d.action in ("rollback", "shrink") and np.isnan(first):
                    first = times[i, t]
            assert (np.isnan(first) and np.isnan(swept[i])) or first == swept[i]


def test_a_trained_model_carries_its_predictor_through_save_and_load(tmp_path: Path) -> None:
    from dataclasses import replace

    from canaryml.models.networks import NetworkSpec
    from canaryml.models.scorer import CanaryScorer
    from canaryml.models.train import TrainerSpec, TrainSpec, train_scorer

    ds = CanonicalDataset(make_corpus(tmp_path / "c", n=24, steps=120, seed=4,
                                      faulty_fraction=0.5))
    spec = replace(TrainSpec(), network=NetworkSpec(lookback=16, horizon=4, hidden=8),
                   trainer=TrainerSpec(max_epochs=1, progress_bar=False, val_fraction=0.25,
                                       test_fraction=0.0))
    scorer = train_scorer(ds, spec).scorer
    assert scorer.predictor is not None  # the synthetic faults all breach 20 steps after onset
    assert scorer.window_steps == scorer.predictor.spec.window > scorer.lookback
    scorer.save(tmp_path / "m")
    back = CanaryScorer.load(tmp_path / "m")
    arrays = next(ds.iter_arrays())
    a = scorer.score_series_components(arrays)["breach_probability"]
    b = back.score_series_components(arrays)["breach_probability"]
    np.testing.assert_array_equal(a, b)
    assert np.isfinite(a).any()
    # one live window scores like the series at its last tick
    t = len(arrays.timestamps_s) - 1
    w = Window(arrays.deployment_id, float(arrays.timestamps_s[t]), arrays.timestamps_s,
               arrays.canary, arrays.baseline, arrays.metrics)
    assert back.score(w).breach_probability == pytest.approx(a[t], abs=1e-12)
    assert fit_on_dataset(ds, [], back.metrics, ds.catalog, PredictorSpec()) is None
    # replay's variants whose predictive rule is off drop the predictor, nothing else
    from canaryml.replay.protocol import load_scorers

    scorers, _ = load_scorers(["scorer", "scorer_nopredict", "scorer_detector"], {},
                              str(tmp_path / "m"), None, ds)
    assert scorers["scorer"].predictor is not None
    bare = scorers["scorer_nopredict"]
    assert bare.predictor is None and scorers["scorer_detector"].predictor is None
    assert bare.operating_point == scorers["scorer"].operating_point
    full, off = scorers["scorer"].score_series_components(arrays), bare.score_series_components(arrays)
    assert np.isnan(off["breach_probability"]).all()
    for k in ("score", "forecast_error", "detector_score", "breach_eta_s"):
        np.testing.assert_array_equal(off[k], full[k])


def test_the_flat_forest_predicts_exactly_what_scikit_learn_predicts(predictor) -> None:  # type: ignore[no-untyped-def]
    from canaryml.models.predict import FlatForest

    rng = np.random.default_rng(11)
    d = _deployment(rng, True)
    x = predictor.features(*tick_windows(d.canary, d.baseline, 60, np.arange(160)))
    x[rng.random(x.shape) < 0.1] = np.nan  # missing values take each split's learned side
    forest = FlatForest.from_model(predictor.model)
    assert forest is not None
    np.testing.assert_allclose(forest.predict_proba(x), predictor.model.predict_proba(x)[:, 1],
                               rtol=0, atol=1e-12)
    assert FlatForest.from_model(object()) is None  # not a fitted model: predict_proba is used


class _SeriesModel:
    """A scorer whose anomaly score never breaches and whose breach probability jumps to 0.9
    at step 60 of every deployment: only the predictive rule can roll back."""

    lookback = 4
    min_steps = 4
    operating_point = None
    predictor = SimpleNamespace(horizon_s=600.0, spec=SimpleNamespace(window=4))

    def __init__(self, metrics: tuple[str, ...]) -> None:
        self.metrics = metrics

    def score_series_components(self, arrays) -> dict:  # type: ignore[no-untyped-def]
        n = len(arrays.timestamps_s)
        p = np.where(np.arange(n) >= 60, 0.9, 0.1)
        return {"score": np.full(n, 0.1), "breach_probability": p}

    def score_series(self, arrays) -> np.ndarray:  # type: ignore[no-untyped-def]
        return self.score_series_components(arrays)["score"]

    def score(self, window: Window) -> ScoreResult:  # the deciding tick's reasons
        return ScoreResult(0.1, 0.1, 0.1, 0.1, 0.0, breach_probability=0.9)


def test_replay_applies_the_predictive_rule_like_its_sweep(tmp_path: Path) -> None:
    from canaryml.replay import protocol
    from canaryml.replay.runner import replay

    ds = CanonicalDataset(make_corpus(tmp_path / "c", n=4, steps=100, seed=1))
    model = _SeriesModel(tuple(ds.metrics))
    b = protocol.PolicyBuilder(ds.catalog, tuple(ds.metrics), float(ds.step_s),
                               PolicyConfig(warmup_s=60), {"scorer": model})
    on = b.build("scorer", {"rollback_threshold": 0.5, "consecutive_breaches": 2,
                            "predict_probability": 0.8})
    off = b.build("scorer", {"rollback_threshold": 0.5, "consecutive_breaches": 2,
                             "predict_probability": None}, as_name="off")
    res = replay(ds, [on, off], interval_s=30.0, progress=False)
    o = res.outcomes.set_index(["policy", "deployment_id"])
    assert o.loc["scorer", "rolled_back"].all() and not o.loc["off", "rolled_back"].any()
    starts = ds.deployments.set_index("deployment_id")["start"]
    for dep, t in o.loc["scorer", "decided_at_s"].items():
        # step 60 = 900 s after the start; the second tick over 0.8 rolls back
        assert t == starts[dep].timestamp() + 930.0
    h = res.histories["scorer"].with_predictive_rule(0.8)
    swept = sweep_first_rollback(h, on.policy.rollback.config, [0.5])[0]
    np.testing.assert_array_equal(swept, o.loc["scorer", "decided_at_s"].to_numpy())


def test_the_probability_candidates_are_the_false_alarm_breakpoints() -> None:
    import pandas as pd

    from canaryml.replay.protocol import predict_candidates

    times = np.tile(np.arange(6) * 30.0, (3, 1))
    predicted = np.array([[0.1, 0.9, 0.2, 0.8, 0.7, 0.1],    # healthy
                          [0.95, 0.6, 0.99, 0.99, 0.99, 0.99],  # faulty, onset at 60 s
                          [0.5, 0.5, 0.5, 0.5, 0.5, np.nan]])   # healthy
    h = ScoreHistory(("a", "b", "c"), times, np.zeros((3, 6)), predicted)
    deps = pd.DataFrame({"deployment_id": ["a", "b", "c"],
                         "label": ["healthy", "faulty", "healthy"],
                         "fault_onset_s": [np.nan, 60.0, np.nan]})
    one = predict_candidates(h, deps, [None], (1,))
    assert one == [None, 0.95, 0.9, 0.5]  # b's peak before its onset counts, after it not
    two = predict_candidates(h, deps, [None], (2,))
    assert two == [None, 0.7, 0.6, 0.5]  # the highest minimum of 2 ticks in a row


def test_the_recalibration_equals_scikit_learns_isotonic_prediction() -> None:
    from canaryml.models.predict import RankIsotonic

    rng = np.random.default_rng(5)
    p = rng.random(400)
    r = RankIsotonic().fit(p, rng.random(400) < p)
    q = np.concatenate([rng.uniform(-0.2, 1.2, 500), [0.0, 1.0, p.min(), p.max()]])
    np.testing.assert_allclose(r.predict(q), (1 - r.EPS) * r.iso.predict(q) + r.EPS * q,
                               rtol=0, atol=1e-15)


def test_on_a_large_corpus_the_probability_candidates_reach_the_target_rate() -> None:
    import pandas as pd

    from canaryml.replay.protocol import predict_candidates

    n = 1000  # healthy runs, each with its own peak probability
    peaks = np.linspace(0.999, 0.5, n)
    h = ScoreHistory(tuple(map(str, range(n))), np.tile([0.0, 30.0], (n, 1)), np.zeros((n, 2)),
                     np.stack([peaks, peaks * 0.5], 1))
    deps = pd.DataFrame({"deployment_id": list(h.deployment_ids), "label": "healthy",
                         "fault_onset_s": np.nan})
    highest = predict_candidates(h, deps, [], (1,), top=4)
    assert highest == list(peaks[:4])  # without a target: the worst few runs only
    spread = predict_candidates(h, deps, [], (1,), top=4, target_frr=0.01)
    # 1 % of 1,000 runs: the peaks spread over the highest 20, the 10th-worst run included
    assert spread == list(peaks[[0, 6, 13, 19]])
