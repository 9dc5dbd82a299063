from __future__ import annotations

import math

import numpy as np
import pytest

from canaryml.control.policy import PolicyConfig, PolicyState, RollbackPolicy
from canaryml.errors import ConfigError
from canaryml.replay.evaluate import ScoreHistory, sweep_first_rollback

BASE = dict(rollback_threshold=0.5, monitoring_interval_s=10, consecutive_breaches=2,
            warmup_s=20, batch_interval_s=30, max_batches=2)
N = math.nan


def run(scores: list[float | None], **over: object) -> list[str]:
    pol = RollbackPolicy(PolicyConfig(**{**BASE, **over}))  # type: ignore[arg-type]
    st = pol.initial_state()
    out = []
    for i, s in enumerate(scores):
        d, st = pol.decide(s, i * 10.0, st)
        out.append(str(d.action))
    return out


@pytest.mark.parametrize(("scores", "over", "expected"), [
    # warm-up (0, 10 s) ignores breaches; then 2 consecutive breaches → rollback
    ([.9, .9, .9, .9], {}, ["continue", "continue", "continue", "rollback"]),
    # hysteresis: an isolated breach is forgiven
    ([.1, .1, .9, .1, .9, .1], {}, ["continue"] * 6),
    # immediate vs gradual: gradual shrinks batch 2 → 1, then rolls back at zero
    # (batch 2 from t=50)
    ([.1] * 7 + [.9, .9, .9], {}, ["continue"] * 8 + ["rollback", "rollback"]),
    ([.1] * 7 + [.9, .9, .9], {"rollback_strategy": "gradual"},
     ["continue"] * 8 + ["shrink", "rollback"]),
    # clean batches grow then promote: clean from t=20; batch 1→2 at t=50, promote at t=80
    ([.1] * 10, {}, ["continue"] * 8 + ["promote", "promote"]),
    # fail-safe: missing scores pause, never roll back or promote, and restart the clean period
    ([.1, .1, .1, N, None, .9, N, .9], {},
     ["continue", "continue", "continue", "pause", "pause", "continue", "pause", "rollback"]),
    ([.1, .1, .1, .1, N, .1, .1, .1, .1, .1], {},
     ["continue"] * 4 + ["pause"] + ["continue"] * 5),
    # marginal scores hold the batch (no promotion) without rolling back
    ([.4] * 12, {"clean_threshold": 0.3}, ["continue"] * 12),
    # inclusive breach at exactly the threshold
    ([.5, .5, .5, .5], {"breach_inclusive": True, "consecutive_breaches": 1},
     ["continue", "continue", "rollback", "rollback"]),
])
def test_policy_table(scores: list[float | None], over: dict[str, object], expected: list[str]) -> None:
    assert run(scores, **over) == expected


def test_fail_safe_reason_and_state_roundtrip() -> None:
    pol = RollbackPolicy(PolicyConfig(**BASE))  # type: ignore[arg-type]
    d, st = pol.decide(None, 0.0, pol.initial_state(), failure="prometheus down")
    assert d.action == "pause" and "prometheus down" in d.reason
    assert PolicyState.from_dict(st.to_dict()) == st


@pytest.mark.parametrize("bad", [{"rollback_strategy": "sideways"}, {"consecutive_breaches": 0},
                                 {"monitoring_interval_s": 0}, {"clean_threshold": 0.9}])
def test_config_validation(bad: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        PolicyConfig(**{**BASE, **bad})  # type: ignore[arg-type]


@pytest.mark.parametrize("block", [128, 4])  # 14 thresholds in one block, or in four
@pytest.mark.parametrize("strategy", ["immediate", "gradual"])
def test_vectorised_sweep_equals_scalar_policy(strategy: str, block: int,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    from canaryml.replay import evaluate

    monkeypatch.setattr(evaluate, "_SWEEP_BLOCK", block)
    rng = np.random.default_rng(1)
    D, T = 30, 40
    scores = rng.random((D, T)) ** 2
    scores[rng.random((D, T)) < 0.08] = np.nan
    times = np.tile(np.arange(T) * 10.0, (D, 1))
    times[0, 30:] = np.nan  # a shorter deployment
    cfg = PolicyConfig(**{**BASE, "rollback_strategy": strategy, "clean_threshold": 0.4,
                          "max_batches": 3})  # type: ignore[arg-type]
    thresholds = np.linspace(0.3, 0.95, 14)
    got = sweep_first_rollback(ScoreHistory(tuple(map(str, range(D))), times, scores), cfg,
                               thresholds)
    for k, thr in enumerate(thresholds):
        pol = RollbackPolicy(cfg.with_threshold(thr))
        for d in range(D):
            st, first = pol.initial_state(), math.nan
            for t in range(T):
                if not np.isfinite(times[d, t]):
                    break
                dec, st = pol.decide(float(scores[d, t]), times[d, t], st)
                if dec.action in ("shrink", "rollback") and math.isnan(first):
                    first = times[d, t]
                if st.final is not None:
                    break
            assert (math.isnan(first) and math.isnan(got[k, d])) or first == got[k, d], (k, d)


@pytest.mark.parametrize("key,value,word", [("rollback_threshold", 2, "never"),
                                            ("rollback_threshold", -0.1, "always"),
                                            ("clean_threshold", -0.2, "always")])
def test_config_thresholds_outside_the_score_range_are_refused(key: str, value: float,
                                                               word: str) -> None:
    """Issue 16 #9: policy.rollback_threshold=2 (scores live in [0, 1]) was accepted silently."""
    data = {**BASE, "rollback_threshold": 0.5, key: value}
    with pytest.raises(ConfigError, match=rf"policy\.{key}={value!r} is outside the score's "
                                          rf"range \[0, 1\].*would {word} be crossed.*"
                                          rf"e\.g\. policy\.{key}=0\.5"):
        PolicyConfig.from_mapping(data)
    assert PolicyConfig.from_mapping({**BASE, "rollback_threshold": 1.0}).rollback_threshold == 1.0
