"""Replay every deployment of a canonical dataset through Controller.step, per policy.

For each policy and deployment, a simulated clock ticks every `monitoring_interval_s` from the
deployment's first sample; each tick is one `Controller.step` (ReplaySource → policy → decision
log → RecordingActuator) until the policy rolls back or promotes. Scorer policies take the fast
path when the scorer has `score_series`: all ticks are scored once per deployment and served by
a `SeriesScorer`; the decisions still go through the same Controller/Policy code. The per-tick
score history (every tick, also past a terminal decision) feeds the threshold sweep: for scorer
policies it is the score series itself, for judges a shadow run of the same judge whose
RollbackPolicy never acts.
"""

from __future__ import annotations

import copy
import logging
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from canaryml.control.controller import Controller, LogRecord, MemoryLog
from canaryml.control.policies import Policy, ScorerPolicy
from canaryml.control.policy import RollbackPolicy
from canaryml.control.types import Scorer
from canaryml.data.dataset import CanonicalDataset, DeploymentArrays
from canaryml.replay.evaluate import ROLLED_BACK, ScoreHistory
from canaryml.replay.sim import RecordingActuator, ReplaySource, SeriesScorer, SimulatedClock

log = logging.getLogger(__name__)


@dataclass
class ReplayPolicy:
    """A policy to replay. `full_scorer` (scorer policies) enables the score_series fast path
    and fills the deciding tick's top reasons."""

    policy: Policy
    full_scorer: Scorer | None = None

    @property
    def name(self) -> str:
        return self.policy.name


@dataclass
class ReplayResult:
    outcomes: pd.DataFrame  # one row per (deployment, policy)
    records: list[LogRecord]
    histories: dict[str, ScoreHistory]
    deployments: pd.DataFrame  # deployment_id, label, fault_onset_s, impact_at_s, start_s, end_s
    ticks: int = 0
    wall_s: float = 0.0
    simulated_s: float = 0.0
    per_policy_wall_s: dict[str, float] = field(default_factory=dict)


def _epoch_s(col: pd.Series) -> np.ndarray:
    ts = pd.to_datetime(col, utc=True)
    return ((ts - pd.Timestamp(0, tz="UTC")) / pd.Timedelta(seconds=1)).to_numpy(float, na_value=np.nan)


def deployment_table(ds: CanonicalDataset) -> pd.DataFrame:
    d = ds.deployments

    def text(col: str) -> np.ndarray | str:
        return d[col].fillna("").astype(str).to_numpy() if col in d else ""

    return pd.DataFrame({
        "deployment_id": d["deployment_id"].astype(str).to_numpy(),
        "label": d["label"].astype(str).to_numpy(),
        "fault_kind": text("fault_kind"),
        "fault_onset_style": text("fault_onset_style"),  # simulator: from_start_* | mid_run
        "fault_onset_s": _epoch_s(d["fault_onset"]),
        "impact_at_s": _epoch_s(d["impact_at"]),
        "start_s": _epoch_s(d["start"]), "end_s": _epoch_s(d["end"]),
    })


class _Discard:
    """Decision sink of the shadow runs: their per-tick scores are kept, their records are not."""

    def append(self, record: LogRecord) -> None:
        pass


def _never_acting(policy: Policy) -> Policy:
    """A copy of `policy` that scores every tick but never acts and never promotes."""
    shadow = copy.copy(policy)
    cfg = policy.rollback.config
    shadow.rollback = RollbackPolicy(replace(  # type: ignore[misc]
        cfg, rollback_threshold=2.0, clean_threshold=None, max_batches=10**9, follow_model=False))
    return shadow


def replay_deployment(controller: Controller, deployment_id: str, ticks: Sequence[float]
                      ) -> list[LogRecord]:
    """Controller.step at every tick until a terminal action. Returns this deployment's records."""
    out = []
    for now in ticks:
        rec = controller.step(deployment_id, now)
        out.append(rec)
        if controller.is_final(deployment_id):  # the policy state says so, as in serve
            break
    return out


def _outcome(deployment_id: str, policy: str, recs: list[LogRecord]) -> dict[str, Any]:
    first = next((r for r in recs if r.action in ROLLED_BACK), None)
    last = recs[-1] if recs else None
    r = first or last
    return {
        "deployment_id": deployment_id, "policy": policy,
        "action": r.action if r else "none",
        "rolled_back": first is not None,
        "decided_at": pd.Timestamp(r.decided_at, unit="s", tz="UTC") if r else pd.NaT,
        "decided_at_s": r.decided_at if r else np.nan,
        "score": np.nan if (r is None or r.score is None) else float(r.score),
        "reasons": list(r.reasons) if r else [],
        "final_action": last.action if last else "none",
        "ticks": len(recs),
        "paused_ticks": sum(1 for x in recs if x.action == "pause"),
        "model_version": r.model_version if r else None,
    }


def replay(dataset: CanonicalDataset | dict[str, DeploymentArrays], policies: Sequence[ReplayPolicy],
           *, interval_s: float, deployments: pd.DataFrame | None = None,
           horizon_s: float | None = None, progress: bool = True, decide: bool = True
           ) -> ReplayResult:
    """Replay all deployments for every policy (see module docstring). `decide=False` records
    only the score histories (what calibration sweeps): no decisions, no outcomes."""
    deps = deployments if deployments is not None else deployment_table(dataset)  # type: ignore[arg-type]
    source = ReplaySource(dataset)
    ids = deps["deployment_id"].tolist()
    all_records: list[LogRecord] = []
    outcomes: list[dict[str, Any]] = []
    histories: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {p.name: [] for p in policies}
    ctrls: dict[str, tuple[Controller, Controller | None, SeriesScorer | None]] = {}
    for rp in policies:
        series = None
        pol = rp.policy
        if rp.full_scorer is not None and hasattr(rp.full_scorer, "score_series"):
            series = SeriesScorer(rp.full_scorer.metrics, rp.full_scorer.lookback,
                                  getattr(rp.full_scorer, "min_steps", None))
            assert isinstance(pol, ScorerPolicy)
            pol = replace(pol, scorer=series)
        main = Controller(pol, source, RecordingActuator(), MemoryLog(),
                          model_version=getattr(rp.policy, "model_version", None))
        shadow = None if series is not None else Controller(_never_acting(pol), source, log_sink=_Discard())
        ctrls[rp.name] = (main, shadow, series)
    wall: dict[str, float] = {p.name: 0.0 for p in policies}
    n_ticks = 0
    simulated = 0.0
    decision_logger = logging.getLogger("canaryml.decision")
    old_level = decision_logger.level
    decision_logger.setLevel(logging.WARNING)  # one line per decision is for the live loop
    t_start = time.perf_counter()
    try:
        # in a terminal a live bar; in logs and CI one line every 30 s instead of silence
        tty = sys.stderr.isatty()
        bar = tqdm(ids, desc="replay" if decide else "calibration replay", unit="dep",
                   disable=not progress, mininterval=0.1 if tty else 30.0,
                   ascii=not tty, file=sys.stderr)
        for dep_id in bar:
            arrays = source.arrays(dep_id)
            ts = arrays.timestamps_s
            end = float(ts[-1]) if horizon_s is None else min(float(ts[-1]),
                                                              float(ts[0]) + horizon_s)
            ticks = list(SimulatedClock(float(ts[0]), end, interval_s))
            simulated += end - float(ts[0])
            for rp in policies:
                t0 = time.perf_counter()
                main, shadow, series = ctrls[rp.name]
                if series is not None:
                    full = rp.full_scorer.score_series(arrays)  # type: ignore[union-attr]
                    series.load(dep_id, ts, full)
                    idx = np.searchsorted(ts, np.asarray(ticks), side="right") - 1
                    hist = np.where(idx >= 0, full[np.clip(idx, 0, None)], np.nan)
                else:
                    assert shadow is not None
                    hist = np.array([np.nan if r.score is None else r.score
                                     for r in (shadow.step(dep_id, now) for now in ticks)], float)
                if decide:
                    recs = replay_deployment(main, dep_id, ticks)
                    n_ticks += len(recs)
                    if series is not None and rp.full_scorer is not None:
                        recs = _with_reasons(recs, rp.full_scorer, source)
                    all_records.extend(recs)
                    outcomes.append(_outcome(dep_id, rp.name, recs))
                histories[rp.name].append((np.asarray(ticks, float), hist))
                wall[rp.name] += time.perf_counter() - t0
    finally:
        decision_logger.setLevel(old_level)
    total = time.perf_counter() - t_start
    packed = {}
    for name, hs in histories.items():
        T = max((len(t) for t, _ in hs), default=0)
        times = np.full((len(hs), T), np.nan)
        scores = np.full((len(hs), T), np.nan)
        for i, (t, s) in enumerate(hs):
            times[i, :len(t)], scores[i, :len(s)] = t, s
        packed[name] = ScoreHistory(tuple(ids), times, scores)
    return ReplayResult(pd.DataFrame(outcomes), all_records, packed, deps.reset_index(drop=True),
                        ticks=n_ticks, wall_s=total, simulated_s=simulated,
                        per_policy_wall_s=wall)


def _with_reasons(recs: list[LogRecord], scorer: Scorer, source: ReplaySource) -> list[LogRecord]:
    """Fill the top contributing metrics of the first rollback tick with one real score()."""
    for i, r in enumerate(recs):
        if r.action in ROLLED_BACK:
            try:
                res = scorer.score(source.fetch(r.deployment_id, r.decided_at, scorer.lookback))
            except Exception as exc:  # reasons are cosmetic; the decision stands
                log.warning("deployment %s: cannot compute reasons: %s", r.deployment_id, exc)
                break
            ev = dict(r.evidence)
            ev["contributions"] = dict(sorted(res.contributions.items(), key=lambda kv: -kv[1])[:5])
            recs[i] = replace(r, reasons=tuple(res.top_reasons(3)), evidence=ev)
            break
    return recs
