from __future__ import annotations

import numpy as np
import pytest

from canaryml.catalog import Catalog, Direction
from canaryml.control.kayenta import (
    Classification,
    KayentaConfig,
    MetricResult,
    classify,
    mann_whitney,
    summary_score,
)
from canaryml.control.policies import KayentaJudge, ThresholdJudge
from canaryml.control.policy import PolicyConfig
from canaryml.control.types import Window

X = np.array([1.83, 0.50, 1.62, 2.48, 1.68, 1.88, 1.55, 3.06, 1.30])
Y = np.array([0.878, 0.647, 0.598, 2.05, 1.06, 1.29, 1.06, 3.14, 1.29])
CFG = KayentaConfig()


def test_mann_whitney_matches_r_wilcox_test() -> None:
    # R: wilcox.test(X, Y, conf.int=TRUE, exact=FALSE, correct=TRUE) → W = 58, p = 0.1329
    r = mann_whitney(X, Y, confidence=0.95)
    assert r.p_value == pytest.approx(0.1329, abs=1e-4)
    assert r.lower_confidence < r.estimate < r.upper_confidence
    assert r.lower_confidence < 0 < r.upper_confidence  # not significant at 95 %


def test_classify_high_low_pass_nodata() -> None:
    rng = np.random.default_rng(0)
    base = rng.normal(1.0, 0.05, 40)
    assert classify("m", base * 1.5, base, Direction.UP, CFG).classification is Classification.HIGH
    assert classify("m", base * 0.5, base, Direction.DOWN, CFG).classification is Classification.LOW
    # direction: an increase of a `down` metric is not a failure
    assert classify("m", base * 1.5, base, Direction.DOWN, CFG).classification is Classification.PASS
    assert classify("m", base, base[::-1], Direction.BOTH, CFG).classification is Classification.PASS
    nan = np.full(40, np.nan)
    assert classify("m", nan, base, Direction.UP, CFG).classification is Classification.NODATA
    # NaN removal keeps the rest
    noisy = np.where(rng.random(40) < 0.3, np.nan, base * 1.5)
    assert classify("m", noisy, base, Direction.UP, CFG).classification is Classification.HIGH
    # effect-size threshold turns a small but significant increase into a pass
    cfg = KayentaConfig(allowed_increase=1.2)
    assert classify("m", base * 1.1, base, Direction.UP, cfg).classification is Classification.PASS


def test_weighted_sum_scorer() -> None:
    res = [MetricResult("a", Classification.PASS, 1.0), MetricResult("b", Classification.HIGH, 2.0),
           MetricResult("c", Classification.PASS, 1.0), MetricResult("d", Classification.NODATA, 0)]
    groups = {"a": "app", "b": "app", "c": "infra", "d": "infra"}
    score, gs = summary_score(res, groups, KayentaConfig(group_weights={"app": 70, "infra": 30}))
    assert gs == {"app": 50.0, "infra": 100.0} and score == pytest.approx(65.0)
    score, gs = summary_score(res, groups, KayentaConfig(group_weights={"app": 70, "infra": 30},
                                                         data_required=True))
    assert gs["infra"] == 50.0 and score == pytest.approx(50.0)
    assert summary_score(res, groups, KayentaConfig(critical=("b",)))[0] == 0.0


def _window(can: np.ndarray, base: np.ndarray, metrics: tuple[str, ...], now: float) -> Window:
    ts = np.arange(len(can), dtype=np.int64) * 15
    return Window("d", now, ts, can.astype(np.float32), base.astype(np.float32), metrics)


def test_argo_failure_limit() -> None:
    judge = ThresholdJudge(failure_limit=3, measure_s=15,
                           base=PolicyConfig(warmup_s=0, consecutive_breaches=1))
    st = judge.initial_state()
    actions = []
    for t, err in enumerate([0.01, 0.2, 0.2, 0.01, 0.2, 0.2, 0.2]):
        can = np.array([[err, 0.3]] * (t + 1))
        d, st = judge.step(_window(can, can, ("error_rate", "latency_p99"), t * 15.0), t * 15.0, st)
        actions.append(str(d.action))
    assert actions == ["continue"] * 6 + ["rollback"]
    d, _ = judge.step(_window(np.full((3, 2), np.nan), np.full((3, 2), np.nan),
                              ("error_rate", "latency_p99"), 45.0), 45.0, judge.initial_state())
    assert d.action == "pause"


def test_kayenta_judge_rolls_back_on_a_bad_interval() -> None:
    rng = np.random.default_rng(0)
    metrics = ("error_rate", "latency_p99")
    cat = Catalog.default()
    judge = KayentaJudge(cat, interval_s=300, base=PolicyConfig(warmup_s=0))
    base = rng.normal(1.0, 0.05, (80, 2))
    good, bad = base * rng.normal(1.0, 0.05, (80, 2)), base * 2.0
    for can, want in ((good, "continue"), (bad, "rollback")):
        st, last = judge.initial_state(), None
        for k in range(0, 80, 2):
            now = k * 15.0
            last, st = judge.step(_window(can[: k + 1], base[: k + 1], metrics, now), now, st)
            if last.action == "rollback":
                break
        assert last is not None and last.action == want


def test_mann_whitney_p_value_equals_scipy_asymptotic_with_continuity() -> None:
    from scipy.stats import mannwhitneyu

    rng = np.random.default_rng(4)
    for _ in range(30):
        x = np.round(rng.normal(1.0, 0.3, rng.integers(3, 12)), 1)  # ties on purpose
        y = np.round(rng.normal(1.1, 0.3, rng.integers(3, 12)), 1)
        want = mannwhitneyu(x, y, alternative="two-sided", method="asymptotic",
                            use_continuity=True).pvalue
        assert mann_whitney(x, y).p_value == pytest.approx(min(1.0, want), abs=1e-12)


def test_batched_mann_whitney_equals_the_scalar_test_bit_for_bit() -> None:
    from canaryml.control.kayenta import mann_whitney_batch, mann_whitney_test, mann_whitney_tests

    rng = np.random.default_rng(3)
    pairs, items = [], []
    for i in range(400):
        nx, ny = (int(v) for v in rng.integers(1, 25, 2))
        if i % 3 == 0:  # continuous
            x, y = rng.normal(0, 1, nx), rng.normal(rng.normal(0, 1), 1, ny)
        elif i % 3 == 1:  # discretised: many ties, exact zero differences
            x, y = np.round(rng.normal(5, 2, nx)), np.round(rng.normal(5 + rng.integers(-2, 3), 2, ny))
        else:  # small rates like error_rate
            x, y = rng.gamma(2, 0.002, nx), rng.gamma(2, 0.002 * rng.uniform(0.5, 3), ny)
        x[rng.random(nx) < 0.1] = np.nan
        items.append((f"m{i}", x, y, Direction.BOTH))
        xf, yf = x[np.isfinite(x)], y[np.isfinite(y)]
        if len(xf) and np.unique(np.concatenate([xf, yf])).size > 1:
            pairs.append((xf, yf))
    assert mann_whitney_batch(pairs, 0.98) == [mann_whitney(x, y, 0.98) for x, y in pairs]
    cfg = KayentaConfig(tolerance=0.1)
    assert mann_whitney_tests(items, cfg) == [mann_whitney_test(*it, cfg) for it in items]
