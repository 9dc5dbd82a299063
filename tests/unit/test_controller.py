from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from canaryml.control.controller import Controller, ControllerObserver, LogRecord
from canaryml.control.policies import ScorerPolicy
from canaryml.control.policy import PolicyConfig, RollbackPolicy
from canaryml.control.types import ScoreResult, Window
from canaryml.data.dataset import DeploymentArrays
from canaryml.errors import ActuatorError, ConfigError, SourceError
from canaryml.models.synthetic import as_arrays, episode
from canaryml.replay.runner import ReplayPolicy, replay, replay_deployment
from canaryml.replay.sim import RecordingActuator, ReplaySource, SimulatedClock
from canaryml.replay.standin import GapZScorer

pytestmark = pytest.mark.timeout(120)  # a hung service fails the test, not CI

CFG = PolicyConfig(rollback_threshold=0.6, monitoring_interval_s=30, warmup_s=60,
                   batch_interval_s=300, max_batches=3)


def corpus(n: int = 6) -> dict[str, DeploymentArrays]:
    rng = np.random.default_rng(3)
    out = {}
    for i in range(n):
        fault = ("latency", "error_spike", None)[i % 3]
        ep = episode(rng, 160, fault=fault, onset=80 if fault else None)
        a = as_arrays(ep, f"d{i}")
        out[a.deployment_id] = a
    return out


class _Broken:
    metrics = ("error_rate",)
    lookback = 4

    def score(self, window: Window) -> ScoreResult:
        raise RuntimeError("model exploded")


class _DownSource:
    def fetch(self, deployment_id: str, now_s: float, lookback: int) -> Window:
        raise SourceError("prometheus unreachable")


def test_fail_safe_pauses() -> None:
    data = corpus(1)
    a = data["d0"]
    now = float(a.timestamps_s[50])
    ctl = Controller(ScorerPolicy("m", _Broken(), RollbackPolicy(CFG)), ReplaySource(data))
    rec = ctl.step("d0", now)
    assert rec.action == "pause" and "model exploded" in rec.reason
    ctl = Controller(ScorerPolicy("m", GapZScorer(a.metrics), RollbackPolicy(CFG)), _DownSource())
    rec = ctl.step("d0", now)
    assert rec.action == "pause" and "prometheus unreachable" in rec.reason
    nan = DeploymentArrays("d0", a.timestamps_s, np.full_like(a.canary, np.nan), a.baseline,
                           a.metrics)
    ctl = Controller(ScorerPolicy("m", GapZScorer(a.metrics), RollbackPolicy(CFG)),
                     ReplaySource({"d0": nan}))
    rec = ctl.step("d0", now)
    assert rec.action == "pause" and "all NaN" in rec.reason


def test_live_path_and_replay_make_the_same_decisions() -> None:
    """Live: Controller.step with the real scorer per tick. Replay: the score_series fast path.
    Every tick's action and score must be equal."""
    data = corpus()
    scorer = GapZScorer(data["d0"].metrics, lookback=20, scale=1.0)
    res = replay(data, [ReplayPolicy(ScorerPolicy("m", scorer, RollbackPolicy(CFG)), scorer)],
                 interval_s=CFG.monitoring_interval_s,
                 deployments=_deps(data), progress=False)
    actions = set()
    for dep_id, a in data.items():
        live = Controller(ScorerPolicy("m", scorer, RollbackPolicy(CFG)), ReplaySource(data),
                          RecordingActuator())
        ticks = list(SimulatedClock(float(a.timestamps_s[0]), float(a.timestamps_s[-1]), 30))
        live_recs = replay_deployment(live, dep_id, ticks)
        fast = [r for r in res.records if r.deployment_id == dep_id]
        assert [r.action for r in live_recs] == [r.action for r in fast]
        assert [r.score for r in live_recs] == pytest.approx([r.score for r in fast], nan_ok=True)
        actions |= {r.action for r in fast}
    assert {"rollback", "pause", "continue"} <= actions


def test_state_roundtrip_resumes_the_same() -> None:
    data = corpus(1)
    a = data["d0"]
    scorer = GapZScorer(a.metrics)
    ticks = list(SimulatedClock(float(a.timestamps_s[0]), float(a.timestamps_s[-1]), 30))
    full = Controller(ScorerPolicy("m", scorer, RollbackPolicy(CFG)), ReplaySource(data))
    ref = [full.step("d0", t).action for t in ticks]
    first = Controller(ScorerPolicy("m", scorer, RollbackPolicy(CFG)), ReplaySource(data))
    got = [first.step("d0", t).action for t in ticks[:30]]
    second = Controller(ScorerPolicy("m", scorer, RollbackPolicy(CFG)), ReplaySource(data))
    second.restore("d0", first.state("d0"))
    got += [second.step("d0", t).action for t in ticks[30:]]
    assert got == ref


def _deps(data: dict[str, DeploymentArrays]):  # type: ignore[no-untyped-def]
    import pandas as pd

    return pd.DataFrame({"deployment_id": list(data), "label": "healthy",
                         "fault_onset_s": np.nan, "impact_at_s": np.nan})


class _Watcher(ControllerObserver):
    def __init__(self) -> None:
        self.failures: list[tuple[str, str]] = []
        self.unapplied: list[str] = []

    def failed(self, kind: str, deployment_id: str, message: str) -> None:
        self.failures.append((kind, message))

    def apply_failed(self, record: LogRecord, exc: Exception) -> None:
        self.unapplied.append(f"{record.step}:{exc}")


class _Flipping:
    """Down while `down` is set, else the replay data."""

    def __init__(self, inner: ReplaySource) -> None:
        self.inner, self.down = inner, True

    def fetch(self, deployment_id: str, now_s: float, lookback: int) -> Window:
        if self.down:
            raise SourceError("prometheus unreachable")
        return self.inner.fetch(deployment_id, now_s, lookback)


@pytest.mark.parametrize("outcome", ["pause", "rollback"])
def test_consecutive_error_limit_takes_the_configured_outcome(outcome: str) -> None:
    """Source down for N ticks → the configured outcome, logged with the reason; then terminal."""
    data = corpus(1)
    a = data["d0"]
    cfg = replace(CFG, consecutive_error_limit=3, error_limit_action=outcome)
    watcher = _Watcher()
    ctl = Controller(ScorerPolicy("m", GapZScorer(a.metrics), RollbackPolicy(cfg)),
                     _Flipping(ReplaySource(data)), RecordingActuator(), observer=watcher)
    t0 = float(a.timestamps_s[50])
    recs = [ctl.step("d0", t0 + 30 * i) for i in range(3)]
    assert [r.action for r in recs] == ["pause", "pause", outcome]
    assert "consecutive_error_limit=3" in recs[-1].reason
    assert "prometheus unreachable" in recs[-1].reason
    assert [k for k, _ in watcher.failures] == ["source"] * 3
    assert ctl.is_final("d0") and ctl.state("d0")["final"] == outcome
    assert ctl.log == recs  # every tick, the outcome included, is in the decision log
    ctl.source.down = False  # type: ignore[attr-defined]
    assert ctl.step("d0", t0 + 90).action == outcome  # terminal: no new decisions


def test_error_count_resets_on_a_usable_score_and_is_off_by_default() -> None:
    data = corpus(1)
    a = data["d0"]
    src = _Flipping(ReplaySource(data))
    cfg = replace(CFG, consecutive_error_limit=2, error_limit_action="rollback")
    ctl = Controller(ScorerPolicy("m", GapZScorer(a.metrics), RollbackPolicy(cfg)), src)
    off = Controller(ScorerPolicy("m", GapZScorer(a.metrics), RollbackPolicy(CFG)), src)
    t0 = float(a.timestamps_s[50])
    actions = []
    for i, down in enumerate([True, False, True, False, True, True]):
        src.down = down
        actions.append(ctl.step("d0", t0 + 30 * i).action)
        off.step("d0", t0 + 30 * i)
    assert actions[:5] == ["pause", "continue", "pause", "continue", "pause"]
    assert actions[5] == "rollback"
    assert not off.is_final("d0") and off.state("d0")["errors"] == 2


def test_scorer_failure_is_reported_and_actuator_failure_never_escapes() -> None:
    class Failing:
        def apply(self, deployment_id: str, decision: object, step: int) -> None:
            raise ActuatorError("503")

    data = corpus(1)
    watcher = _Watcher()
    ctl = Controller(ScorerPolicy("m", _Broken(), RollbackPolicy(CFG)), ReplaySource(data),
                     Failing(), observer=watcher)
    rec = ctl.step("d0", float(data["d0"].timestamps_s[50]))
    assert rec.action == "pause"
    assert watcher.failures[0][0] == "scorer" and "model exploded" in watcher.failures[0][1]
    assert watcher.unapplied == ["0:503"]


def test_policy_config_rejects_a_bad_error_limit() -> None:
    with pytest.raises(ConfigError, match="consecutive_error_limit"):
        PolicyConfig.from_mapping({"consecutive_error_limit": 0})
    with pytest.raises(ConfigError, match="error_limit_action"):
        PolicyConfig.from_mapping({"error_limit_action": "abort"})


class _Padded:
    """A live-style source: always `lookback` rows on the grid, NaN before the first sample."""

    def __init__(self, inner: ReplaySource, step_s: int) -> None:
        self.inner, self.step_s = inner, step_s

    def fetch(self, deployment_id: str, now_s: float, lookback: int) -> Window:
        w = self.inner.fetch(deployment_id, now_s, lookback)
        pad = lookback - len(w.timestamps_s)
        if pad <= 0:
            return w
        ts = np.concatenate([w.timestamps_s[0] - self.step_s * np.arange(pad, 0, -1),
                             w.timestamps_s])
        nan = np.full((pad, w.canary.shape[1]), np.nan, np.float32)
        return replace(w, timestamps_s=ts, canary=np.vstack([nan, w.canary]),
                       baseline=None if w.baseline is None else np.vstack([nan, w.baseline]))


def test_rows_before_the_first_sample_are_not_scored_so_live_equals_replay() -> None:
    data = corpus(2)
    for dep, a in data.items():
        step = int(a.timestamps_s[1] - a.timestamps_s[0])
        scorer = GapZScorer(a.metrics, lookback=20, scale=1.0)
        replayed = Controller(ScorerPolicy("m", scorer, RollbackPolicy(CFG)), ReplaySource(data))
        live = Controller(ScorerPolicy("m", scorer, RollbackPolicy(CFG)),
                          _Padded(ReplaySource(data), step))
        ticks = list(SimulatedClock(float(a.timestamps_s[0]), float(a.timestamps_s[-1]), 30))
        got = [(r.action, r.reason, r.score) for r in replay_deployment(live, dep, ticks)]
        want = [(r.action, r.reason, r.score) for r in replay_deployment(replayed, dep, ticks)]
        assert got == want
        assert live.first_sample_s[dep] == float(a.timestamps_s[0])
