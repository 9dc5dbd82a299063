"""Replay's speed-ups change nothing: worker processes and the judges' per-deployment prefetch
(Kayenta's vectorised Mann-Whitney) give the same histories, outcomes and records."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from canaryml.control.kayenta import KayentaConfig
from canaryml.control.policies import KayentaJudge, ScorerPolicy, ThresholdJudge
from canaryml.control.policy import PolicyConfig, RollbackPolicy
from canaryml.data.dataset import CanonicalDataset
from canaryml.models.synthetic import make_corpus
from canaryml.replay import runner
from canaryml.replay.runner import ReplayPolicy, ReplayResult, progress_bar, replay
from canaryml.replay.standin import GapZScorer


def _policies(ds: CanonicalDataset) -> list[ReplayPolicy]:
    cfg = PolicyConfig(warmup_s=60.0)
    sc = GapZScorer(ds.metrics, ds.catalog)
    return [ReplayPolicy(ScorerPolicy("scorer", sc, RollbackPolicy(cfg)), sc),
            ReplayPolicy(ThresholdJudge(base=cfg)),
            ReplayPolicy(KayentaJudge(ds.catalog, KayentaConfig(group_weights={"app": 70}),
                                      interval_s=120.0, base=cfg, step_s=15.0))]


def _same(a: ReplayResult, b: ReplayResult) -> None:
    pd.testing.assert_frame_equal(a.outcomes, b.outcomes)
    assert [repr(r) for r in a.records] == [repr(r) for r in b.records]  # NaN-safe
    for name, h in a.histories.items():
        np.testing.assert_array_equal(h.scores, b.histories[name].scores)
        np.testing.assert_array_equal(h.times_s, b.histories[name].times_s)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> CanonicalDataset:
    return CanonicalDataset(make_corpus(tmp_path_factory.mktemp("c") / "ds", n=6, steps=120,
                                        seed=4, gap_fraction=0.05))


def test_workers_and_prefetch_do_not_change_the_replay(corpus: CanonicalDataset,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    one = replay(corpus, _policies(corpus), interval_s=30.0, progress=False, workers=1)
    two = replay(corpus, _policies(corpus), interval_s=30.0, progress=False, workers=2)
    assert two.workers == 2 and len(one.outcomes) == 18
    _same(one, two)
    monkeypatch.setattr(KayentaJudge, "prefetch", lambda self, windows: None)
    _same(one, replay(corpus, _policies(corpus), interval_s=30.0, progress=False, workers=1))
    # the judges' scores without the decision machinery equal their shadow Controller.step's
    monkeypatch.setattr(runner, "_judge_scores", lambda shadow, dep_id, ticks: None)
    _same(one, replay(corpus, _policies(corpus), interval_s=30.0, progress=False, workers=1))


def test_kayenta_schedule_is_what_step_judges(corpus: CanonicalDataset) -> None:
    judge = KayentaJudge(corpus.catalog, interval_s=100.0)
    ticks = [0.0, 30.0, 60.0, 90.0, 120.0, 150.0, 180.0, 210.0, 240.0]
    assert judge.schedule(ticks) == [120.0, 240.0]  # first ≥ 100 s after start, then ≥ 100 s apart


def test_progress_in_logs_is_plain_lines(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("INFO", logger="canaryml.replay.runner"), \
            progress_bar(20, "replay") as bar:
        for _ in range(20):
            bar.update(1)
    lines = [r.getMessage() for r in caplog.records]
    assert lines and all("\r" not in m and m.startswith("replay:") for m in lines)
    assert sum("20/20" in m for m in lines) == 1 and len(lines) <= 12
