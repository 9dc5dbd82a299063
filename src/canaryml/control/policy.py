"""RollbackPolicy: a pure function of the score history (DESIGN §3).

`RollbackPolicy.decide(score, now_s, state)` → `(Decision, new_state)`. No I/O, no clock, no
randomness: the same inputs always give the same decision, which is what lets replay, the
threshold sweep and the live controller agree.

Canary progression (seed parameters):
  * the canary runs in batches of `canary_batch_size` replicas, starting with one batch, up to
    `max_batches`;
  * nothing is decided (except the fail-safe) during `warmup_s` after the first tick;
  * a tick *breaches* when `score > rollback_threshold` (`>=` with `breach_inclusive`); after
    `consecutive_breaches` breaches in a row the policy acts:
      - `immediate`: ROLLBACK at once;
      - `gradual`: SHRINK one batch per breaching tick while the score stays over the threshold,
        ROLLBACK when the canary is shrunk to zero batches;
  * predictive rule: a tick also breaches when the scorer's breach probability (P that the
    canary causes an SLO breach within the model's horizon, canaryml.models.predict) exceeds
    `predict_probability`; it shares the hysteresis and everything after it with the score;
  * a batch is *clean* while `score <= clean_threshold` (default: the rollback threshold);
    a tick between the two thresholds ("marginal") is neither a breach nor clean: it holds the
    progression and restarts the clean period;
  * after a batch stays clean for `batch_interval_s` the canary grows by one batch (CONTINUE
    with evidence `batch`); after the last batch stays clean → PROMOTE;
  * fail-safe: a missing score (NaN / None, or a failure reason from the controller — source
    down, all-NaN window, scorer exception) → PAUSE with the reason. It never rolls back or
    promotes on its own; it does not count as a breach, and it restarts the clean period (a
    gap in the data is not evidence of health);
  * consecutive-error limit (Argo's `consecutiveErrorLimit`): after `consecutive_error_limit`
    fail-safe ticks in a row (null = no limit) the policy takes `error_limit_action`:
    `rollback` (terminal ROLLBACK) or `pause` (terminal PAUSE: held for an operator, no more
    decisions). A usable score resets the count.

ROLLBACK and PROMOTE are terminal: the state remembers them and later calls repeat them.
For evaluation, "rolled back" means the first SHRINK or ROLLBACK (see canaryml.replay.evaluate).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from enum import StrEnum
from typing import Any

from canaryml.control.types import Action, Decision
from canaryml.errors import ConfigError, reject_unknown_keys


class RollbackStrategy(StrEnum):
    IMMEDIATE = "immediate"
    GRADUAL = "gradual"


@dataclass(frozen=True)
class PolicyConfig:
    """Seed parameters of the rollback policy (conf/policy/default.yaml)."""

    rollback_threshold: float = 0.5
    monitoring_interval_s: float = 30.0
    canary_batch_size: int = 1
    rollback_strategy: RollbackStrategy = RollbackStrategy.IMMEDIATE
    consecutive_breaches: int = 2
    warmup_s: float = 120.0
    batch_interval_s: float = 600.0
    max_batches: int = 5
    clean_threshold: float | None = None  # None = rollback_threshold
    breach_inclusive: bool = False
    consecutive_error_limit: int | None = None  # fail-safe ticks in a row; None = no limit
    error_limit_action: str = "pause"  # pause | rollback, once the limit is reached
    # a scorer policy takes its threshold and hysteresis from the model's fitted operating point
    # when it has one (config `rollback_threshold: null`); the values above are the fallback
    follow_model: bool = False
    # predictive rule: breach when P(canary-caused SLO breach within predict_horizon_s) exceeds
    # this. None = the model's fitted value (off for a model without a breach predictor); 1 = off
    predict_probability: float | None = None
    # None = the model's horizon; a number must equal it (the predictor is trained for one)
    predict_horizon_s: float | None = None

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "rollback_strategy", RollbackStrategy(self.rollback_strategy))
        except ValueError as exc:
            raise ConfigError(f"policy.rollback_strategy={self.rollback_strategy!r} is unknown; "
                              "use immediate or gradual") from exc
        checks = [
            (self.monitoring_interval_s > 0, "monitoring_interval_s", "a positive number of seconds"),
            (self.canary_batch_size >= 1, "canary_batch_size", "an integer ≥ 1"),
            (self.consecutive_breaches >= 1, "consecutive_breaches", "an integer ≥ 1"),
            (self.warmup_s >= 0, "warmup_s", "≥ 0 seconds"),
            (self.batch_interval_s >= 0, "batch_interval_s", "≥ 0 seconds"),
            (self.max_batches >= 1, "max_batches", "an integer ≥ 1"),
            (math.isfinite(self.rollback_threshold), "rollback_threshold", "a finite number"),
        ]
        if self.consecutive_error_limit is not None:
            checks.append((self.consecutive_error_limit >= 1, "consecutive_error_limit",
                           "an integer ≥ 1 or null (no limit)"))
        checks.append((self.error_limit_action in ("pause", "rollback"), "error_limit_action",
                       "pause or rollback"))
        for ok, name, want in checks:
            if not ok:
                raise ConfigError(f"policy.{name}={getattr(self, name)!r} is invalid; it must be "
                                  f"{want} (conf/policy/*.yaml or `policy.{name}=…`)")
        if self.clean_threshold is not None and self.clean_threshold > self.rollback_threshold:
            raise ConfigError(f"policy.clean_threshold={self.clean_threshold} exceeds "
                              f"rollback_threshold={self.rollback_threshold}; it must be ≤ it")

    @property
    def clean_at(self) -> float:
        return self.rollback_threshold if self.clean_threshold is None else self.clean_threshold

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> PolicyConfig:
        """From user config: also requires the thresholds to lie in the score's range [0, 1]
        (library code may still build out-of-range sentinels, e.g. 2.0 = never roll back)."""
        reject_unknown_keys(data, (f.name for f in fields(cls) if f.name != "follow_model"),
                            "policy config")
        d = dict(data)
        if d.get("rollback_threshold", 0.5) is None:  # null: the model's own operating point
            d["rollback_threshold"] = cls.rollback_threshold
            d["follow_model"] = True
        cfg = cls(**d)
        for name in ("rollback_threshold", "clean_threshold", "predict_probability"):
            value = getattr(cfg, name)
            if value is not None and not 0.0 <= value <= 1.0:
                raise ConfigError(
                    f"policy.{name}={value!r} is outside the score's range [0, 1]: the scorer's "
                    "calibrated score never goes beyond it, so this threshold would "
                    f"{'never' if value > 1 else 'always'} be crossed. Use a value in [0, 1], "
                    f"e.g. policy.{name}=0.5 (conf/policy/*.yaml).")
        return cfg

    def for_model(self, scorer: object) -> PolicyConfig:
        """This config at the model's fitted operating point (`scorer.operating_point`) when it
        follows the model and the model has one, and with the model's predictive rule when
        `predict_probability` is None; else unchanged."""
        op = getattr(scorer, "operating_point", None) or {}
        cfg = self
        if self.follow_model and op.get("rollback_threshold") is not None:
            cfg = replace(self.with_threshold(float(op["rollback_threshold"])),
                          consecutive_breaches=int(op.get("consecutive_breaches",
                                                          self.consecutive_breaches)))
        horizon = predict_horizon(scorer)
        if horizon is None:  # no breach predictor: the rule cannot fire
            return replace(cfg, predict_probability=None)
        if self.predict_horizon_s is not None and abs(self.predict_horizon_s - horizon) > 1e-6:
            raise ConfigError(f"policy.predict_horizon_s={self.predict_horizon_s:g} but the model's "
                              f"breach predictor was trained for {horizon:g} s; set it to null "
                              f"(the model's) or retrain with trainer.predict_horizon_s="
                              f"{self.predict_horizon_s:g}")
        p = self.predict_probability
        if p is None:
            p = op.get("predict_probability")
        return replace(cfg, predict_probability=None if p is None else float(p),
                       predict_horizon_s=horizon)

    def with_threshold(self, threshold: float) -> PolicyConfig:
        """Copy at another rollback threshold (the clean threshold keeps its offset)."""
        clean = None if self.clean_threshold is None else (
            self.clean_threshold + threshold - self.rollback_threshold)
        return replace(self, rollback_threshold=float(threshold), clean_threshold=clean)


def predict_horizon(scorer: object) -> float | None:
    """The horizon of the scorer's breach predictor; None when it has none."""
    predictor = getattr(scorer, "predictor", None)
    return None if predictor is None else float(predictor.horizon_s)


@dataclass(frozen=True)
class PolicyState:
    """Everything the policy remembers between ticks (JSON-able via to_dict/from_dict)."""

    started_at_s: float | None = None
    batch: int = 1
    breaches: int = 0
    clean_since_s: float | None = None
    final: Action | None = None  # ROLLBACK or PROMOTE once reached (PAUSE: error limit)
    ticks: int = 0
    # interval judges (Kayenta) evaluate every interval and hold their last score in between
    last_eval_s: float | None = None
    last_score: float | None = None
    errors: int = 0  # fail-safe ticks in a row (consecutive_error_limit)

    def to_dict(self) -> dict[str, Any]:
        # every field is a plain value: a flat copy equals `asdict` at a fraction of its cost
        # (the controller takes one per step)
        d = {f.name: getattr(self, f.name) for f in _STATE_FIELDS}
        d["final"] = None if self.final is None else str(self.final)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> PolicyState:
        d = dict(d)
        if d.get("final") is not None:
            d["final"] = Action(d["final"])
        return cls(**{k: v for k, v in d.items() if k in {f.name for f in fields(cls)}})


_STATE_FIELDS = fields(PolicyState)


@dataclass(frozen=True)
class RollbackPolicy:
    config: PolicyConfig = field(default_factory=PolicyConfig)

    def initial_state(self) -> PolicyState:
        return PolicyState()

    def warming_up(self, now_s: float, state: PolicyState, reason: str
                   ) -> tuple[Decision, PolicyState]:
        """A tick before the scorer has the steps it needs (a canary's first minutes): CONTINUE
        (the batch is held), no score, and not a failure — no fail-safe, no error count."""
        if state.final is not None:
            return self.decide(None, now_s, state)
        cfg = self.config
        started = now_s if state.started_at_s is None else state.started_at_s
        st = replace(state, started_at_s=started, ticks=state.ticks + 1, clean_since_s=None)
        ev = {"reasons": [reason], "threshold": cfg.rollback_threshold, "warming_up": True,
              "batch": st.batch, "replicas": st.batch * cfg.canary_batch_size,
              "breaches": st.breaches}
        return Decision(Action.CONTINUE, reason, None, ev), st

    def decide(self, score: float | None, now_s: float, state: PolicyState, *,
               failure: str | None = None, reasons: Sequence[str] = (),
               evidence: Mapping[str, Any] | None = None,
               predicted: float | None = None) -> tuple[Decision, PolicyState]:
        """One tick. `score` in [0, 1] (higher = worse) or None/NaN; `failure` says why there is
        no usable score; `predicted` is the breach probability (predictive rule) or None.
        `reasons`/`evidence` are passed through into the Decision."""
        cfg = self.config
        ev: dict[str, Any] = dict(evidence or {})
        ev["reasons"] = list(reasons)
        ev["threshold"] = cfg.rollback_threshold
        if state.final is not None:
            ev |= {"batch": state.batch, "replicas": state.batch * cfg.canary_batch_size}
            return Decision(state.final, f"already {state.final}", score, ev), state
        started = now_s if state.started_at_s is None else state.started_at_s
        st = replace(state, started_at_s=started, ticks=state.ticks + 1)

        def out(action: Action, reason: str, new: PolicyState) -> tuple[Decision, PolicyState]:
            ev.update(batch=new.batch, replicas=new.batch * cfg.canary_batch_size,
                      breaches=new.breaches)
            if not ev["reasons"]:
                ev["reasons"] = [reason]
            return Decision(action, reason, score, ev), new

        if failure is not None or score is None or not math.isfinite(score):
            why = failure or "no score (missing data)"
            if failure is not None:
                ev["failure"] = failure
            st = replace(st, clean_since_s=None, errors=st.errors + 1)
            limit = cfg.consecutive_error_limit
            if limit is not None and st.errors >= limit:
                final = Action(cfg.error_limit_action)
                st = replace(st, final=final, batch=0 if final is Action.ROLLBACK else st.batch)
                return out(final, f"fail-safe: {st.errors} errors in a row reached "
                           f"consecutive_error_limit={limit}: {final} ({why})", st)
            return out(Action.PAUSE, f"fail-safe: {why}; holding the canary", st)
        if st.errors:
            st = replace(st, errors=0)
        if now_s - started < cfg.warmup_s:
            return out(Action.CONTINUE, f"warm-up ({now_s - started:.0f}/{cfg.warmup_s:.0f} s)",
                       st)
        breach = score >= cfg.rollback_threshold if cfg.breach_inclusive else (
            score > cfg.rollback_threshold)
        what = f"score {score:.3f} over threshold {cfg.rollback_threshold:.3f}"
        if (not breach and cfg.predict_probability is not None and predicted is not None
                and math.isfinite(predicted) and predicted > cfg.predict_probability):
            breach = True
            ev["predicted_breach"] = True
            what = (f"predicted SLO breach within {cfg.predict_horizon_s or 0:.0f} s "
                    f"(p={predicted:.2f} > {cfg.predict_probability:.2f})")
        if breach:
            n = st.breaches + 1
            st = replace(st, breaches=n, clean_since_s=None)
            if n < cfg.consecutive_breaches:
                return out(Action.CONTINUE, f"{what} ({n}/{cfg.consecutive_breaches})", st)
            if cfg.rollback_strategy is RollbackStrategy.GRADUAL and st.batch > 1:
                st = replace(st, batch=st.batch - 1)
                return out(Action.SHRINK, f"{what} {n}× in a row: shrink to batch {st.batch}",
                           st)
            st = replace(st, batch=0, final=Action.ROLLBACK)
            return out(Action.ROLLBACK, f"{what} {n}× in a row: roll back", st)
        st = replace(st, breaches=0)
        if score > cfg.clean_at:
            return out(Action.CONTINUE, f"marginal score {score:.3f} (clean ≤ {cfg.clean_at:.3f}): "
                       "holding batch", replace(st, clean_since_s=None))
        clean_since = now_s if st.clean_since_s is None else st.clean_since_s
        st = replace(st, clean_since_s=clean_since)
        if now_s - clean_since < cfg.batch_interval_s:
            return out(Action.CONTINUE, f"batch {st.batch} clean for "
                       f"{now_s - clean_since:.0f}/{cfg.batch_interval_s:.0f} s", st)
        if st.batch >= cfg.max_batches:
            st = replace(st, final=Action.PROMOTE)
            return out(Action.PROMOTE, f"all {cfg.max_batches} batches clean: promote", st)
        st = replace(st, batch=st.batch + 1, clean_since_s=now_s)
        return out(Action.CONTINUE, f"batch {st.batch - 1} clean for "
                   f"{cfg.batch_interval_s:.0f} s: grow to batch {st.batch}", st)
