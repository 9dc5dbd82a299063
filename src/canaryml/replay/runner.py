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

import contextlib
import copy
import logging
import multiprocessing as mp
import os
import re
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from canaryml.control.controller import (
    Controller,
    LogRecord,
    MemoryLog,
    trim_before,
    window_problem,
)
from canaryml.control.policies import KayentaJudge, Policy, ScorerPolicy, ThresholdJudge
from canaryml.control.policy import RollbackPolicy
from canaryml.control.types import Scorer, Window
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
    per_policy_wall_s: dict[str, float] = field(default_factory=dict)  # summed over workers
    workers: int = 1


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


def shard_of(deps: pd.DataFrame, shard: tuple[int, int] | None) -> pd.DataFrame:
    """The deployments of shard `(index, count)`: every `count`-th row of the deployment table
    from row `index` (deterministic for a dataset; all of them for None)."""
    if shard is None:
        return deps
    index, count = shard
    return deps.iloc[index::count].reset_index(drop=True)


def parse_shard(spec: object) -> tuple[int, int] | None:
    """`i/n` (0 ≤ i < n) → (i, n); None or empty → None."""
    from canaryml.errors import ConfigError

    if spec is None or str(spec).strip() == "":
        return None
    parts = str(spec).split("/")
    try:
        index, count = (int(p) for p in parts)
    except ValueError:
        index, count = -1, 0
    if len(parts) != 2 or count < 1 or not 0 <= index < count:
        raise ConfigError(f"shard={spec!r}: use shard=i/n with 0 <= i < n, e.g. shard=0/4 (in a "
                          "Kubernetes indexed Job: shard=$JOB_COMPLETION_INDEX/<completions>)")
    return index, count


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


def default_workers() -> int:
    """Processes for replay: the cores this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


class _LogLines:
    """A tqdm `file` for logs and CI: each refresh becomes one log line (no carriage returns),
    none repeated for the same count (tqdm refreshes once more on close)."""

    def __init__(self) -> None:
        self._last = ""

    def write(self, text: str) -> None:
        line = text.replace("\r", "").strip()
        count = re.search(r"\d+/\d+", line)
        key = count[0] if count else line
        if line and key != self._last:
            self._last = key
            log.info("%s", line)

    def flush(self) -> None:
        pass


def progress_bar(total: int, desc: str, *, enabled: bool = True, unit: str = "dep") -> Any:
    """A tqdm bar: live in a terminal; in logs and CI one plain log line every 10 % (and at the
    end) instead of carriage-return updates that pile up in one line."""
    tty = sys.stderr.isatty()
    if tty:
        return tqdm(total=total, desc=desc, unit=unit, disable=not enabled, mininterval=0.2,
                    file=sys.stderr)
    return tqdm(total=total, desc=desc, unit=unit, disable=not enabled, ascii=True,
                file=_LogLines(), mininterval=0.0, miniters=max(1, total // 10), ncols=80)


@dataclass
class _Plan:
    """Everything a replay worker needs, built once in the parent (a forked worker inherits it)."""

    source: ReplaySource
    policies: Sequence[ReplayPolicy]
    ctrls: dict[str, tuple[Controller, Controller | None, SeriesScorer | None]]
    interval_s: float
    horizon_s: float | None
    decide: bool


_PLAN: _Plan | None = None  # set in the parent right before the worker processes fork


def _build_plan(dataset: CanonicalDataset | dict[str, DeploymentArrays],
                policies: Sequence[ReplayPolicy], interval_s: float, horizon_s: float | None,
                decide: bool) -> _Plan:
    source = ReplaySource(dataset)
    ctrls: dict[str, tuple[Controller, Controller | None, SeriesScorer | None]] = {}
    for rp in policies:
        series = None
        pol = rp.policy
        if rp.full_scorer is not None and hasattr(rp.full_scorer, "score_series"):
            series = SeriesScorer(rp.full_scorer.metrics, rp.full_scorer.lookback,
                                  getattr(rp.full_scorer, "min_steps", None),
                                  wrapped=rp.full_scorer)
            assert isinstance(pol, ScorerPolicy)
            pol = replace(pol, scorer=series)
        main = Controller(pol, source, RecordingActuator(), MemoryLog(),
                          model_version=getattr(rp.policy, "model_version", None))
        shadow = None if series is not None else Controller(_never_acting(pol), source,
                                                            log_sink=_Discard())
        ctrls[rp.name] = (main, shadow, series)
    return _Plan(source, policies, ctrls, interval_s, horizon_s, decide)


def _window(ctrl: Controller, arrays: DeploymentArrays, now: float) -> Window:
    """The window `ctrl.step` fetches at `now` (rows before the first sample dropped)."""
    w = ctrl.source.fetch(arrays.deployment_id, now, ctrl.lookback)
    has = np.isfinite(arrays.canary).any(axis=1)
    if arrays.baseline is not None:
        has |= np.isfinite(arrays.baseline).any(axis=1)
    return trim_before(w, float(arrays.timestamps_s[int(np.argmax(has))])) if has.any() else w


def _prefetch(rp: ReplayPolicy, ctrl: Controller, arrays: DeploymentArrays,
              ticks: list[float]) -> None:
    """Let a judge compute its statistics for a whole deployment at once (Kayenta: every
    interval's Mann-Whitney tests in one vectorised batch). Only a cache: the per-tick steps
    below use a prefetched result only where their window's data is the same."""
    pol: Any = rp.policy
    if not hasattr(pol, "prefetch"):
        return
    windows = []
    for now in pol.schedule(ticks):
        try:
            windows.append(_window(ctrl, arrays, now))
        except Exception:  # the step will meet (and report) the same failure
            continue
    pol.prefetch(windows)


def _series(scorer: Any, arrays: DeploymentArrays) -> tuple[np.ndarray, np.ndarray | None]:
    """A deployment's per-row scores (one batched pass) and breach probabilities (None when
    the scorer has no breach predictor)."""
    if hasattr(scorer, "score_series_components"):
        comps = scorer.score_series_components(arrays)
        prob = comps.get("breach_probability")
        if prob is not None and not np.isfinite(prob).any():
            prob = None
        return comps["score"], prob
    return scorer.score_series(arrays), None


def _replay_deployment(dep_id: str) -> dict[str, Any]:
    """Every policy on one deployment (in a worker process or in the caller)."""
    plan = _PLAN
    assert plan is not None
    arrays = plan.source.arrays(dep_id)
    ts = arrays.timestamps_s
    end = float(ts[-1]) if plan.horizon_s is None else min(float(ts[-1]),
                                                          float(ts[0]) + plan.horizon_s)
    ticks = list(SimulatedClock(float(ts[0]), end, plan.interval_s))
    out: dict[str, Any] = {"simulated": end - float(ts[0]), "ticks": ticks, "policies": {}}
    for rp in plan.policies:
        t0 = time.perf_counter()
        main, shadow, series = plan.ctrls[rp.name]
        predicted = None
        if series is not None:
            full, prob = _series(rp.full_scorer, arrays)
            if prob is None:
                series.load(dep_id, ts, full)
            else:  # the breach predictor's probabilities ride along (predictive rule)
                series.load(dep_id, ts, full, prob)  # type: ignore[call-arg]
            idx = np.searchsorted(ts, np.asarray(ticks), side="right") - 1
            hist = np.where(idx >= 0, full[np.clip(idx, 0, None)], np.nan)
            if prob is not None:
                predicted = np.where(idx >= 0, prob[np.clip(idx, 0, None)], np.nan)
        else:
            assert shadow is not None
            _prefetch(rp, shadow, arrays, ticks)
            judged = _judge_scores(shadow, dep_id, ticks)
            hist = judged if judged is not None else np.array(
                [np.nan if r.score is None else r.score
                 for r in (shadow.step(dep_id, now) for now in ticks)], float)
        recs: list[LogRecord] = []
        outcome = None
        if plan.decide:
            recs = replay_deployment(main, dep_id, ticks)
            if series is not None and rp.full_scorer is not None:
                recs = _with_reasons(recs, rp.full_scorer, plan.source)
            outcome = _outcome(dep_id, rp.name, recs)
        out["policies"][rp.name] = {"records": recs, "outcome": outcome, "history": hist,
                                    "predicted": predicted, "wall_s": time.perf_counter() - t0}
    return out


def _judge_scores(shadow: Controller, dep_id: str, ticks: list[float]) -> np.ndarray | None:
    """The score a never-acting judge reports at every tick — what `shadow.step` records, tick
    for tick (a unit test holds them equal) — without the decision machinery around it: the
    controller's window (fetch, rows before the first sample dropped, unusable windows a
    fail-safe) and the judge's own measurement and interval schedule. None: not a judge this
    knows (or an error limit that could end the shadow run), use `shadow.step`."""
    pol = shadow.policy
    if pol.rollback.config.consecutive_error_limit is not None or not isinstance(
            pol, ThresholdJudge | KayentaJudge):
        return None
    out = np.full(len(ticks), np.nan)
    first: float | None = None
    last_eval: float | None = None
    last_score: float | None = None
    started = ticks[0] if ticks else 0.0
    for i, now in enumerate(ticks):
        try:
            w = shadow.source.fetch(dep_id, now, shadow.lookback)
        except Exception:  # the controller's fail-safe: no score this tick
            continue
        can = np.asarray(w.canary)
        if can.ndim == 2 and can.shape[0]:
            if first is None:
                has = np.isfinite(can).any(axis=1)
                if w.baseline is not None:
                    has |= np.isfinite(np.asarray(w.baseline)).any(axis=1)
                if has.any():
                    first = float(w.timestamps_s[int(np.argmax(has))])
            if first is not None:
                w = trim_before(w, first)
        if window_problem(w) is not None:
            continue
        if isinstance(pol, ThresholdJudge):
            try:
                score, _ = pol.measure(w)
            except ValueError:
                continue
            if score is not None:
                out[i] = score
            continue
        due = (now - started >= pol.interval_s if last_eval is None
               else now - last_eval >= pol.interval_s)
        if not due:
            if last_score is not None:
                out[i] = last_score
            continue
        try:
            kscore, _ = pol.judge(w)
        except Exception:  # the judge's fail-safe: no score, the interval is judged again
            continue
        last_eval, last_score = now, 1.0 - kscore / 100.0
        out[i] = last_score
    return out


def _worker_init() -> None:
    """One intra-op thread per worker process: the processes are the parallelism (several torch
    threads per process on a busy machine spin against each other)."""
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(1)


@contextlib.contextmanager
def _one_torch_thread() -> Iterator[None]:
    """Score with one intra-op thread in the caller too, so that scores (float rounding of the
    network's reductions) are the same for any number of workers or shards."""
    torch = sys.modules.get("torch")
    if torch is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def replay(dataset: CanonicalDataset | dict[str, DeploymentArrays], policies: Sequence[ReplayPolicy],
           *, interval_s: float, deployments: pd.DataFrame | None = None,
           horizon_s: float | None = None, progress: bool = True, decide: bool = True,
           workers: int | None = None) -> ReplayResult:
    """Replay all deployments for every policy (see module docstring). `decide=False` records
    only the score histories (what calibration sweeps): no decisions, no outcomes. `workers`
    processes (default: the cores available) replay deployments in parallel; the result is the
    same for any number of workers (deployments are independent and merged in order)."""
    global _PLAN
    deps = deployments if deployments is not None else deployment_table(dataset)  # type: ignore[arg-type]
    ids = deps["deployment_id"].tolist()
    n_workers = max(1, min(default_workers() if workers is None else int(workers), len(ids)))
    decision_logger = logging.getLogger("canaryml.decision")
    old_level = decision_logger.level
    decision_logger.setLevel(logging.WARNING)  # one line per decision is for the live loop
    t_start = time.perf_counter()
    per_dep: list[dict[str, Any]] = []
    _PLAN = _build_plan(dataset, policies, interval_s, horizon_s, decide)
    try:
        with _one_torch_thread(), progress_bar(
                len(ids), "replay" if decide else "calibration replay", enabled=progress) as bar:
            if n_workers > 1 and "fork" in mp.get_all_start_methods():
                # forked workers inherit the plan (policies, scorers, dataset handle): nothing
                # is pickled on the way in, only each deployment's results on the way back
                ctx = mp.get_context("fork")
                with ctx.Pool(n_workers, initializer=_worker_init) as pool:
                    for res in pool.imap(_replay_deployment, ids, chunksize=1):
                        per_dep.append(res)
                        bar.update(1)
            else:
                for dep_id in ids:
                    per_dep.append(_replay_deployment(dep_id))
                    bar.update(1)
    finally:
        _PLAN = None
        decision_logger.setLevel(old_level)
    total = time.perf_counter() - t_start
    all_records: list[LogRecord] = []
    outcomes: list[dict[str, Any]] = []
    wall: dict[str, float] = {p.name: 0.0 for p in policies}
    n_ticks = 0
    for res in per_dep:
        for rp in policies:
            r = res["policies"][rp.name]
            all_records.extend(r["records"])
            n_ticks += len(r["records"])
            if r["outcome"] is not None:
                outcomes.append(r["outcome"])
            wall[rp.name] += r["wall_s"]
    packed = {}
    T = max((len(r["ticks"]) for r in per_dep), default=0)
    for rp in policies:
        times = np.full((len(per_dep), T), np.nan)
        scores = np.full((len(per_dep), T), np.nan)
        pred = np.full((len(per_dep), T), np.nan)
        has_pred = False
        for i, res in enumerate(per_dep):
            r = res["policies"][rp.name]
            t, h = res["ticks"], r["history"]
            times[i, :len(t)], scores[i, :len(h)] = t, h
            if r["predicted"] is not None:
                pred[i, :len(t)] = r["predicted"]
                has_pred = True
        extra = {"predicted": pred} if has_pred else {}
        packed[rp.name] = ScoreHistory(tuple(ids), times, scores, **extra)
    return ReplayResult(pd.DataFrame(outcomes), all_records, packed, deps.reset_index(drop=True),
                        ticks=n_ticks, wall_s=total,
                        simulated_s=float(sum(r["simulated"] for r in per_dep)),
                        per_policy_wall_s=wall, workers=n_workers)


def merge_results(parts: Sequence[ReplayResult], deployments: pd.DataFrame) -> ReplayResult:
    """Shards' results of one corpus as the single run's: outcomes, records and histories in
    the order of `deployments` (the corpus's blind deployment table)."""
    ids = deployments["deployment_id"].tolist()
    pos = {d: i for i, d in enumerate(ids)}
    names = list(parts[0].histories)
    rank = {n: i for i, n in enumerate(names)}
    outcomes = pd.concat([p.outcomes for p in parts if len(p.outcomes)], ignore_index=True)
    if len(outcomes):
        key = (outcomes["deployment_id"].map(pos) * len(names)
               + outcomes["policy"].map(rank)).to_numpy()
        outcomes = outcomes.iloc[np.argsort(key, kind="stable")].reset_index(drop=True)
    records = sorted((r for p in parts for r in p.records), key=lambda r: pos[r.deployment_id])
    histories = {}
    T = max(p.histories[n].times_s.shape[1] for p in parts for n in names)
    for n in names:
        times = np.full((len(ids), T), np.nan)
        scores = np.full((len(ids), T), np.nan)
        pred = np.full((len(ids), T), np.nan)
        has_pred = False
        for p in parts:
            h = p.histories[n]
            rows = [pos[d] for d in h.deployment_ids]
            times[rows, :h.times_s.shape[1]] = h.times_s
            scores[rows, :h.scores.shape[1]] = h.scores
            hp = getattr(h, "predicted", None)
            if hp is not None:
                pred[rows, :hp.shape[1]] = hp
                has_pred = True
        extra = {"predicted": pred} if has_pred else {}
        histories[n] = ScoreHistory(tuple(ids), times, scores, **extra)
    wall = {n: sum(p.per_policy_wall_s.get(n, 0.0) for p in parts) for n in names}
    return ReplayResult(outcomes, records, histories, deployments.reset_index(drop=True),
                        ticks=sum(p.ticks for p in parts), wall_s=sum(p.wall_s for p in parts),
                        simulated_s=sum(p.simulated_s for p in parts), per_policy_wall_s=wall,
                        workers=max(p.workers for p in parts))


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
