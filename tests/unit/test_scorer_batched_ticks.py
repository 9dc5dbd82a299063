"""Batched live ticks: one forward pass for every due deployment gives the per-deployment scores
(`score_batch`, `prepare` → `score`, the worker split) to the last bit, and the time-major network
input is bit-identical to the batch-first one. No timing here: speed is shown by `canaryml bench`."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from canaryml.control.types import Window
from canaryml.data.dataset import CanonicalDataset, DeploymentArrays
from canaryml.errors import ScoringError
from canaryml.models import scorer as scorer_mod
from canaryml.models.networks import NetworkSpec, build_network
from canaryml.models.predict import PredictorSpec, fit_on_dataset
from canaryml.models.scorer import CanaryScorer
from canaryml.models.synthetic import make_corpus
from canaryml.models.train import TrainerSpec, TrainSpec, train_scorer

TINY = TrainSpec(network=NetworkSpec(lookback=16, horizon=3, hidden=16),
                 trainer=TrainerSpec(max_epochs=1, progress_bar=False, stride=3, num_threads=1))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> CanonicalDataset:
    torch.set_num_threads(1)
    return CanonicalDataset(make_corpus(tmp_path_factory.mktemp("corpus") / "c", n=16, steps=80,
                                        seed=5, gap_fraction=0.01))


@pytest.fixture(scope="module")
def scorer(dataset: CanonicalDataset) -> CanaryScorer:
    scorer = train_scorer(dataset, TINY).scorer
    # too few labelled impacts in the training split for train's own predictor: fit one on the
    # whole corpus so batched ticks (and their worker split) carry breach probabilities
    scorer.predictor = fit_on_dataset(dataset, list(dataset.deployments["deployment_id"]),
                                      scorer.metrics, dataset.catalog,
                                      PredictorSpec(horizon_s=600.0, window=60, max_iter=30))
    assert scorer.predictor is not None
    return scorer


def _window(a: DeploymentArrays, end: int, n: int) -> Window:
    sl = slice(end - n, end)
    return Window(a.deployment_id, float(a.timestamps_s[end - 1]), a.timestamps_s[sl],
                  a.canary[sl], None if a.baseline is None else a.baseline[sl], a.metrics)


def _tick_windows(dataset: CanonicalDataset, w: int, n: int) -> list[Window]:
    """`n` windows across all deployments and ends (a tick's worth of different canaries)."""
    arrays = [dataset.arrays(str(d)) for d in dataset.deployments["deployment_id"]]
    out: list[Window] = []
    k = 0
    while len(out) < n:
        a = arrays[k % len(arrays)]
        end = w + (k // len(arrays)) % (len(a.timestamps_s) - w + 1)
        out.append(_window(a, end, w))
        k += 1
    return out


def _fields(r: object) -> tuple[float, ...]:
    return (r.score, r.app_score, r.infra_score, r.forecast_error,  # type: ignore[attr-defined]
            r.detector_score, np.nan if r.breach_eta_s is None else r.breach_eta_s)  # type: ignore[attr-defined]


def _probability(r: object) -> float:
    p = r.breach_probability  # type: ignore[attr-defined]
    return np.nan if p is None else p


@pytest.mark.parametrize("workers", [1, 2])
def test_a_batched_tick_equals_scoring_each_deployment_alone(scorer: CanaryScorer,
                                                             dataset: CanonicalDataset,
                                                             workers: int) -> None:
    n = 2 * scorer_mod._PARALLEL_MIN + 7  # large enough to be split over two workers
    windows = _tick_windows(dataset, scorer.lookback, n)
    alone = [scorer.score(w) for w in windows]
    scorer.workers = workers
    try:
        batch = scorer.score_batch(windows)
    finally:
        scorer.workers = 1
    assert len(batch) == n
    for a, b in zip(alone, batch, strict=True):
        np.testing.assert_allclose(_fields(b), _fields(a), rtol=0, atol=0)
        # one window walks the predictor's trees in numpy, a batch goes to scikit-learn: the
        # same trees, summed in another order
        assert np.isfinite(_probability(a))
        np.testing.assert_allclose(_probability(b), _probability(a), rtol=0, atol=1e-12)
        assert a.contributions.keys() == b.contributions.keys()
        np.testing.assert_allclose(list(b.contributions.values()), list(a.contributions.values()),
                                   rtol=0, atol=0)


def test_prepare_scores_the_tick_once_and_score_returns_those_results(
        scorer: CanaryScorer, dataset: CanonicalDataset, monkeypatch: pytest.MonkeyPatch) -> None:
    windows = _tick_windows(dataset, scorer.lookback, 40)
    short = _window(dataset.arrays(windows[0].deployment_id), 5, 5)  # too few steps
    expected = [scorer.score(w) for w in windows]
    scorer.prepare([*windows, short])
    blocks: list[int] = []
    real = scorer._score_block

    def counted(c: np.ndarray, b: np.ndarray | None, **kw: bool) -> dict[str, np.ndarray]:
        blocks.append(len(c))
        return real(c, b, **kw)

    monkeypatch.setattr(scorer, "_score_block", counted)
    got = [scorer.score(w) for w in windows]
    assert blocks == []  # every prepared window answered without another forward pass
    for a, b in zip(expected, got, strict=True):
        np.testing.assert_allclose(_fields(b), _fields(a), rtol=0, atol=0)
    with pytest.raises(ScoringError, match="steps but the scorer needs"):
        scorer.score(short)  # its own error, kept for the tick's score() call
    # each result is used once: a second score() of the same window scores it afresh
    again = scorer.score(windows[0])
    assert blocks == [1]
    np.testing.assert_allclose(_fields(again), _fields(expected[0]), rtol=0, atol=0)
    # a window that was not prepared (an equal copy) is scored, not matched by value
    copy = Window(**{**windows[1].__dict__})
    scorer.score(copy)
    assert blocks == [1, 1]


def test_score_batch_still_raises_the_first_unscorable_window(scorer: CanaryScorer,
                                                              dataset: CanonicalDataset) -> None:
    windows = _tick_windows(dataset, scorer.lookback, 3)
    short = _window(dataset.arrays(windows[0].deployment_id), 5, 5)
    with pytest.raises(ScoringError, match="steps but the scorer needs"):
        scorer.score_batch([windows[0], short, windows[1]])
    each = scorer.score_each([windows[0], short, windows[1]])
    assert isinstance(each[1], ScoringError) and not isinstance(each[0], Exception)


def test_a_scorer_with_workers_pickles_without_its_thread_pool(scorer: CanaryScorer,
                                                               dataset: CanonicalDataset) -> None:
    scorer.workers = 2
    try:
        scorer.score_batch(_tick_windows(dataset, scorer.lookback, 2 * scorer_mod._PARALLEL_MIN))
        clone = pickle.loads(pickle.dumps(scorer))
    finally:
        scorer.workers = 1
    w = _tick_windows(dataset, scorer.lookback, 1)[0]
    assert clone.score(w).score == pytest.approx(scorer.score(w).score, abs=1e-9)


@pytest.mark.parametrize("kind", ["lstm", "transformer"])
def test_time_major_input_is_bit_identical_to_batch_first(kind: str) -> None:
    torch.manual_seed(0)
    net = build_network(NetworkSpec(kind=kind, n_metrics=5, lookback=12, horizon=2, hidden=16,
                                    layers=2)).eval()
    x = torch.randn(37, 12, 10)
    with torch.inference_mode():
        a = net(x)
        b = net(x.transpose(0, 1).contiguous(), time_major=True)
    assert a.shape == (37, 2, 5, 3)
    assert torch.equal(a, b)
