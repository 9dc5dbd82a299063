"""CanaryScorer: one code path for tick/batch/series, round trip, variants, bad inputs."""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from canaryml.control.types import Scorer, Window
from canaryml.data.dataset import CanonicalDataset, DeploymentArrays
from canaryml.errors import DataContractError, ModelLoadError, ScoringError
from canaryml.models.networks import NetworkSpec
from canaryml.models.scorer import CanaryScorer
from canaryml.models.synthetic import as_arrays, episode, make_corpus
from canaryml.models.train import TrainerSpec, TrainSpec, train_scorer

TINY = TrainSpec(network=NetworkSpec(lookback=16, horizon=3, hidden=16),
                 trainer=TrainerSpec(max_epochs=1, progress_bar=False, stride=3, num_threads=1))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> CanonicalDataset:
    torch.set_num_threads(1)
    return CanonicalDataset(make_corpus(tmp_path_factory.mktemp("corpus") / "c", n=24, steps=100,
                                        seed=3, gap_fraction=0.01))


@pytest.fixture(scope="module")
def scorer(dataset: CanonicalDataset) -> CanaryScorer:
    return train_scorer(dataset, TINY).scorer


def _window(a: DeploymentArrays, end: int, n: int, baseline: bool = True) -> Window:
    sl = slice(end - n, end)
    return Window(a.deployment_id, float(a.timestamps_s[end - 1]), a.timestamps_s[sl],
                  a.canary[sl], a.baseline[sl] if baseline and a.baseline is not None else None,
                  a.metrics)


def test_implements_scorer_protocol(scorer: CanaryScorer, dataset: CanonicalDataset) -> None:
    assert isinstance(scorer, Scorer)
    assert scorer.metrics == tuple(dataset.metrics)
    assert scorer.lookback == 16 + 3 and scorer.step_s == 15


def test_tick_batch_and_series_give_the_same_numbers(scorer: CanaryScorer,
                                                     dataset: CanonicalDataset) -> None:
    a = dataset.arrays(str(dataset.deployments["deployment_id"].iloc[0]))
    w = scorer.lookback
    series = scorer.score_series_components(a)
    assert np.isnan(series["score"][: w - 1]).all()
    ends = list(range(w, len(a.timestamps_s) + 1, 9))
    windows = [_window(a, e, w) for e in ends]
    batch = scorer.score_batch(windows)
    for e, win, b in zip(ends, windows, batch, strict=True):
        one = scorer.score(win)
        assert one.score == pytest.approx(b.score, abs=1e-5)
        assert one.score == pytest.approx(series["score"][e - 1], abs=1e-5)
        assert one.app_score == pytest.approx(series["app_score"][e - 1], abs=1e-5)
        assert 0.0 <= one.score <= 1.0
    # a longer window is cut to the last `lookback` steps
    assert scorer.score(_window(a, ends[-1], w + 10)).score == pytest.approx(batch[-1].score, abs=1e-5)


def test_save_load_round_trip_is_identical(scorer: CanaryScorer, dataset: CanonicalDataset,
                                           tmp_path: Path) -> None:
    a = dataset.arrays(str(dataset.deployments["deployment_id"].iloc[1]))
    scorer.save(tmp_path / "s")
    back = CanaryScorer.load(tmp_path / "s")
    assert np.array_equal(scorer.score_series(a), back.score_series(a), equal_nan=True)
    win = _window(a, 60, scorer.lookback)
    assert scorer.score(win) == back.score(win)
    with pytest.raises(ModelLoadError, match=r"no scorer.json"):
        CanaryScorer.load(tmp_path)


def test_variants_recalibrate_and_change_the_mix(scorer: CanaryScorer) -> None:
    rng = np.random.default_rng(5)
    a = as_arrays(episode(rng, 80, fault="error_spike", onset=40))
    fo, do = scorer.with_mix(1.0), scorer.with_mix(0.0)
    r_f, r_d = fo.score(_window(a, 70, scorer.lookback)), do.score(_window(a, 70, scorer.lookback))
    assert fo.weights.forecast_weight == 1.0 and do.weights.forecast_weight == 0.0
    assert r_f.score != r_d.score
    app_only = scorer.with_weights(1.0, 0.0).score(_window(a, 70, scorer.lookback))
    assert app_only.score == pytest.approx(app_only.app_score, abs=1e-9)
    # healthy calibration ticks map to ~uniform scores for every variant
    for v in (fo, do, scorer.with_weights(0.2, 0.8)):
        _, _, kind_raw = v._kind_raw(v.calibration.components[:, :2], v.calibration.components[:, 2:])
        from canaryml.models.scorer import _ecdf_apply

        cal = _ecdf_apply(v._combine_raw(kind_raw), *v._ecdf)
        assert 0.4 < float(np.median(cal)) < 0.6


def test_contributions_and_breach_eta_point_at_the_faulty_metric(scorer: CanaryScorer) -> None:
    rng = np.random.default_rng(7)
    ep = episode(rng, 90, fault="error_spike", onset=50, severity=3.0)
    a = as_arrays(ep)
    r = scorer.score(_window(a, 70, scorer.lookback))
    assert r.score > 0.95
    assert max(r.contributions, key=r.contributions.__getitem__) == "error_rate"
    assert sum(r.contributions.values()) == pytest.approx(1.0)
    # error_rate 0.01 * (1 + 9) = 0.1 > SLO 0.05: already breaching
    assert r.breach_eta_s == 0.0
    healthy = scorer.score(_window(as_arrays(episode(rng, 90)), 70, scorer.lookback))
    assert healthy.breach_eta_s is None


def test_window_without_baseline_still_scores(scorer: CanaryScorer, caplog: pytest.LogCaptureFixture) -> None:
    a = as_arrays(episode(np.random.default_rng(1), 60))
    with caplog.at_level(logging.WARNING):
        r = scorer.score(_window(a, 50, scorer.lookback, baseline=False))
    assert 0 <= r.score <= 1
    s = scorer.score_series(replace(a, baseline=None))
    assert s[49] == pytest.approx(r.score, abs=1e-5)


def test_bad_inputs_are_clear_errors(scorer: CanaryScorer) -> None:
    a = as_arrays(episode(np.random.default_rng(2), 60))
    w = _window(a, 50, scorer.lookback)
    with pytest.raises(ScoringError, match="needs ≥ 19"):
        scorer.score(_window(a, 50, 10))
    missing = Window(w.deployment_id, w.now_s, w.timestamps_s, w.canary[:, 1:], w.baseline[:, 1:],  # type: ignore[index]
                     w.metrics[1:])
    with pytest.raises(ScoringError, match=r"lacks metric.*request_rate"):
        scorer.score(missing)
    can = w.canary.copy()
    can[:, 3] = np.nan
    with pytest.raises(ScoringError, match=r"latency_p95.*no observed value"):
        scorer.score(replace(w, canary=can))
    # the series path marks those ticks NaN instead of guessing
    a2 = replace(a, canary=a.canary.copy())
    a2.canary[20:45, 3] = np.nan
    s = scorer.score_series(a2)
    assert np.isnan(s[44]) and np.isfinite(s[59])
    # extra metrics are ignored (with a warning), order does not matter
    perm = np.arange(len(w.metrics))[::-1]
    shuffled = replace(w, canary=w.canary[:, perm], baseline=w.baseline[:, perm],  # type: ignore[index]
                       metrics=tuple(np.array(w.metrics)[perm]))
    assert scorer.score(shuffled).score == pytest.approx(scorer.score(w).score, abs=1e-6)


def test_fine_tune_needs_the_same_metrics(scorer: CanaryScorer, dataset: CanonicalDataset) -> None:
    other = replace(scorer.spec, n_metrics=3)
    fake = CanaryScorer.__new__(CanaryScorer)
    fake._metrics = ("a", "b", "c")  # type: ignore[attr-defined]
    fake.spec = other
    with pytest.raises(DataContractError, match="differ from the model"):
        train_scorer(dataset, TINY, init_from=fake)
    tuned = train_scorer(dataset, TINY, init_from=scorer, ).scorer
    assert tuned.metrics == scorer.metrics
    assert not torch.equal(next(tuned.network.parameters()), next(scorer.network.parameters()))


def test_a_min_history_scorer_scores_a_canary_from_its_first_minutes(
        dataset: CanonicalDataset) -> None:
    spec = replace(TINY, network=replace(TINY.network, min_history=3))
    sc = train_scorer(dataset, spec).scorer
    assert sc.min_steps == 3 + 3 and sc.lookback == 19
    a = dataset.arrays(str(dataset.deployments["deployment_id"].iloc[0]))
    series = sc.score_series(a)
    assert np.isnan(series[: sc.min_steps - 1]).all() and np.isfinite(series[sc.min_steps - 1])
    for end in (sc.min_steps, sc.min_steps + 4, sc.lookback, sc.lookback + 7):
        # a window shorter than the lookback (a canary's first minutes) scores like the series
        assert sc.score(_window(a, end, min(end, sc.lookback))).score == pytest.approx(
            series[end - 1], rel=1e-5, abs=1e-9)
    with pytest.raises(ScoringError, match="needs ≥ 6"):
        sc.score(_window(a, sc.min_steps - 1, sc.min_steps - 1))
