"""The tuning objective: hold-out split, replay score, pruning callback (typed library code).

Objective `replay` (default, maximise) — the share of faulty canaries in the tuning hold-out that
the scorer policy rolls back *before impact* (before `impact_at`, or rolled back and never
impacted), at the best rollback threshold whose false-rollback rate on the hold-out's healthy
canaries is ≤ `max_frr` (1 %). It is `operating_points["frr<=0.01"]["caught_before_impact"]` of
`canaryml replay`'s summary, computed by the same replay path (Controller.step per tick,
vectorised threshold sweep); 0 when no threshold meets the false-rollback bound.

Objective `val_loss` (minimise) — the forecaster's best validation pinball loss.

Objective `multi` — (maximise caught-before-impact, minimise false-rollback rate), both at the
configured `policy.rollback_threshold`, so the threshold itself is a searched parameter.

The hold-out is a seeded, label-stratified split *by deployment*, taken before `train_scorer`
splits the rest into its own train/val/test; the scorer never sees a hold-out deployment.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import optuna
import pytorch_lightning as pl

from canaryml.control.policies import ScorerPolicy
from canaryml.control.policy import PolicyConfig, RollbackPolicy
from canaryml.data.dataset import CanonicalDataset
from canaryml.errors import ConfigError, DataContractError
from canaryml.models.scorer import CanaryScorer
from canaryml.models.windows import deployment_infos, split_deployments

log = logging.getLogger(__name__)

OBJECTIVES = {
    "replay": (("maximize",), ("caught_before_impact@frr<=0.01",)),
    "val_loss": (("minimize",), ("val/best_loss",)),
    "multi": (("maximize", "minimize"), ("caught_before_impact", "false_rollback_rate")),
}


def directions(objective: str) -> tuple[str, ...]:
    if objective not in OBJECTIVES:
        raise ConfigError(f"tune.objective={objective!r} is not one of {sorted(OBJECTIVES)}")
    return OBJECTIVES[objective][0]


def target_names(objective: str, max_frr: float = 0.01) -> tuple[str, ...]:
    names = OBJECTIVES[objective][1]
    return tuple(n.replace("0.01", f"{max_frr:g}") for n in names)


@dataclass(frozen=True)
class Holdout:
    train: tuple[str, ...]  # deployments `train_scorer` may use (its own train/val/test)
    holdout: tuple[str, ...]  # deployments replayed for the objective


def holdout_split(dataset: CanonicalDataset, fraction: float, seed: int) -> Holdout:
    """Seeded split by deployment, stratified by label (the same ids for every trial/worker)."""
    if not 0.0 < fraction < 1.0:
        raise ConfigError(f"tune.holdout_fraction={fraction} must be in (0, 1), e.g. 0.25")
    infos = deployment_infos(dataset)
    split = split_deployments(infos, 0.0, fraction, seed, "deployment")
    labels = {i.deployment_id: i.label for i in infos}
    held = [labels[d] for d in split.test]
    if "faulty" not in held or "healthy" not in held:
        raise DataContractError(
            f"{dataset.path}: the tuning hold-out ({len(split.test)} of {len(infos)} deployments, "
            f"tune.holdout_fraction={fraction}) needs faulty and healthy deployments; the "
            "replay objective is undefined without both. Use more deployments, raise "
            "tune.holdout_fraction, or tune.objective=val_loss")
    return Holdout(tuple(split.train), tuple(split.test))


@dataclass(frozen=True)
class ReplayScore:
    """Replay metrics of one scorer on the hold-out."""

    caught_at_frr: float  # objective `replay`
    threshold_at_frr: float | None
    detection_at_frr: float
    frr_at_frr: float
    caught: float  # at the configured policy threshold
    detection: float
    false_rollback: float
    lead_time_s_p50: float | None
    max_frr: float

    def metrics(self) -> dict[str, float]:
        le = f"frrle{self.max_frr:g}"
        out = {f"replay/caught_at_{le}": self.caught_at_frr,
               f"replay/detection_at_{le}": self.detection_at_frr,
               f"replay/frr_at_{le}": self.frr_at_frr,
               "replay/caught_before_impact": self.caught,
               "replay/detection_rate": self.detection,
               "replay/false_rollback_rate": self.false_rollback}
        if self.threshold_at_frr is not None:
            out[f"replay/threshold_at_{le}"] = self.threshold_at_frr
        if self.lead_time_s_p50 is not None:
            out["replay/lead_time_s_p50"] = self.lead_time_s_p50
        return out


def replay_score(scorer: CanaryScorer, dataset: CanonicalDataset, deployment_ids: Sequence[str],
                 policy: PolicyConfig, *, max_frr: float = 0.01, thresholds: int = 101,
                 horizon_s: float | None = None, model_version: str = "trial") -> ReplayScore:
    """Replay `deployment_ids` through the scorer policy (the `canaryml replay` path)."""
    from canaryml.replay.protocol import summarize
    from canaryml.replay.runner import ReplayPolicy, deployment_table, replay

    keep = set(deployment_ids)
    deps = deployment_table(dataset)
    deps = deps[deps["deployment_id"].isin(keep)].reset_index(drop=True)
    rp = ReplayPolicy(ScorerPolicy("scorer", scorer, RollbackPolicy(policy), model_version),
                      scorer)
    result = replay(dataset, [rp], interval_s=policy.monitoring_interval_s, deployments=deps,
                    horizon_s=horizon_s, progress=False)
    key = f"frr<={max_frr:g}"
    per_policy, _ = summarize(result, [rp], np.linspace(0.0, 1.0, thresholds), [max_frr])
    m = per_policy["scorer"]
    op = m["operating_points"].get(key) or {}

    def num(v: Any) -> float:
        return 0.0 if v is None else float(v)

    return ReplayScore(
        caught_at_frr=num(op.get("caught_before_impact")),
        threshold_at_frr=op.get("threshold"),
        detection_at_frr=num(op.get("detection_rate")),
        frr_at_frr=num(op.get("false_rollback_rate")),
        caught=num(m["caught_before_impact"]), detection=num(m["detection_rate"]),
        false_rollback=num(m["false_rollback_rate"]),
        lead_time_s_p50=m.get("lead_time_s_p50"), max_frr=max_frr)


class PruningCallback(pl.Callback):
    """Reports the forecaster's `val/loss` after every validation epoch to the Optuna trial
    (negated when the study maximises, so "better" keeps one orientation for the pruner) and
    stops a trial the pruner rejects by raising `optuna.TrialPruned` out of `Trainer.fit`
    (the curve itself reaches MLflow through the fit's logger, before this hook runs)."""

    def __init__(self, trial: optuna.Trial, *, maximize: bool, monitor: str = "val/loss"):
        super().__init__()
        self.trial = trial
        self.sign = -1.0 if maximize else 1.0
        self.monitor = monitor

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        value = trainer.callback_metrics.get(self.monitor)
        if value is None:
            return
        loss = float(value)
        epoch = int(trainer.current_epoch)
        self.trial.report(self.sign * loss, step=epoch)
        if self.trial.should_prune():
            log.info("trial %d pruned after epoch %d (%s=%.4f)", self.trial.number, epoch,
                     self.monitor, loss)
            raise optuna.TrialPruned(f"pruned after epoch {epoch}: {self.monitor}={loss:.4f}")
