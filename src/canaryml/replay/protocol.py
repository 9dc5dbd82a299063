"""The honest evaluation protocol (DESIGN §7): tune every policy on calibration data, then touch
the evaluation corpora once.

1. **Calibrate.** Every policy (scorer variants, Argo-style thresholds, the Kayenta judge) is
   replayed on a labelled calibration corpus — training-side data, never an evaluation corpus —
   for every configuration of its knobs (`CalibrationSpace`). Per configuration the recorded
   score history is swept over all rollback thresholds (`sweep_first_rollback`, no rescoring) and
   each policy keeps the configuration with the most faulty canaries caught before impact at a
   false-rollback rate ≤ the target (ties: higher detection, lower false rollbacks, the most
   conservative threshold). The threshold is a knob of every family: the scorer's
   `rollback_threshold`, Argo's limits as a fraction of each metric's SLO, Kayenta's marginal
   score.
2. **Evaluate once.** The tuned policies replay each evaluation corpus through
   `Controller.step` with the labels hidden (`blind`); only then are the labels read, metrics
   computed (`metrics_from_times`), bootstrap intervals drawn over deployments, and the
   evaluation-set threshold sweep kept as an *oracle* curve, named so.

`settings` are plain JSON-able dicts per policy family; `build_policy` turns them into a
`ReplayPolicy`, and `at_threshold` maps a swept threshold back onto the family's own knob.
"""

from __future__ import annotations

import itertools
import logging
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import pandas as pd

from canaryml.catalog import Catalog
from canaryml.control.kayenta import KayentaConfig
from canaryml.control.policies import KayentaJudge, ScorerPolicy, TestCache, ThresholdJudge
from canaryml.control.policy import PolicyConfig, RollbackPolicy
from canaryml.data.dataset import CanonicalDataset
from canaryml.errors import ConfigError
from canaryml.replay.evaluate import (
    ScoreHistory,
    bootstrap_intervals,
    metrics_from_times,
    operating_point,
    sweep_table,
)
from canaryml.replay.runner import (
    ReplayPolicy,
    ReplayResult,
    deployment_table,
    replay,
    shard_of,
)

log = logging.getLogger(__name__)
SCORER_VARIANTS: dict[str, float | None] = {"scorer": None, "scorer_forecast": 1.0,
                                            "scorer_detector": 0.0, "scorer_nopredict": None,
                                            "scorer_predict": None}
# how a scorer policy uses the model's breach predictor (the predictive rule): `on` (its
# predict_probability tuned with the threshold), `off`, or `only` (the anomaly score never acts).
# The parts of the default scorer (forecast-only, detector-only) run without it: ablations.
PREDICT_MODES: dict[str, str] = {"scorer_forecast": "off", "scorer_detector": "off",
                                 "scorer_nopredict": "off", "scorer_predict": "only"}
NEVER = 2.0  # a rollback threshold the calibrated score (in [0, 1]) never exceeds


def predict_mode(name: str) -> str:
    return PREDICT_MODES.get(name, "on")
JUDGES = ("argo", "kayenta")
HEADLINE = ("detection_rate", "false_rollback_rate", "caught_before_impact",
            "healthy_rolled_back_rate", "rolled_back_before_onset_rate",
            "lead_time_s_p50", "lead_share_p50", "time_to_detect_s_p50")


def family(name: str, models: Mapping[str, str]) -> str:
    if name in SCORER_VARIANTS or name in models:
        return "scorer"
    if name in JUDGES:
        return name
    raise ConfigError(f"replay.policies: unknown policy {name!r}; use "
                      f"{', '.join([*SCORER_VARIANTS, *JUDGES])} or a key of replay.models")


def configured_settings(name: str, models: Mapping[str, str], pcfg: PolicyConfig,
                        rcfg: Mapping[str, Any], scorer: object = None) -> dict[str, Any]:
    """A policy's settings as configured (`policy.*`, `replay.argo.*`, `replay.kayenta.*`); a
    scorer's come from its fitted operating point when the policy follows the model."""
    fam = family(name, models)
    if fam == "scorer":
        cfg = pcfg.for_model(scorer)
        mode = predict_mode(name)
        return {"rollback_threshold": NEVER if mode == "only" else cfg.rollback_threshold,
                "consecutive_breaches": cfg.consecutive_breaches,
                "predict_probability": None if mode == "off" else cfg.predict_probability}
    if fam == "argo":
        a = rcfg["argo"]
        return {"metrics": a["metrics"], "limit_fraction": float(a["limit_fraction"]),
                "limits_relative_to": str(a.get("limits_relative_to", "slo")),
                "failure_limit": int(a["failure_limit"]), "measure_s": float(a["measure_s"])}
    k = rcfg["kayenta"]
    return {"metrics": k.get("metrics", "all"), "interval_s": float(k["interval_s"]),
            "confidence": float(k["confidence"]), "tolerance": float(k["tolerance"]),
            "allowed_increase": float(k.get("allowed_increase", 1.0)),
            "allowed_decrease": float(k.get("allowed_decrease", 1.0)),
            "pass_threshold": float(k["pass_threshold"]),
            "marginal_threshold": float(k["marginal_threshold"]),
            "groups": {g: float(w) for g, w in (k.get("groups") or {}).items()},
            "data_required": bool(k.get("data_required", False)),
            "critical": list(k.get("critical") or [])}


def metric_set(spec: str | Sequence[str], catalog: Catalog, available: Sequence[str],
               key: str) -> tuple[str, ...]:
    """`all` | `app` | `infra` | `slo` (metrics with an SLO) | an explicit list, restricted to
    the dataset's metrics."""
    if isinstance(spec, str):
        if spec == "all":
            chosen = list(available)
        elif spec in ("app", "infra"):
            chosen = [m for m in available if str(catalog.get(m).kind) == spec]
        elif spec == "slo":
            chosen = [m for m in available if catalog.get(m).slo is not None]
        else:
            raise ConfigError(f"{key}={spec!r} is unknown; use all, app, infra, slo or a list "
                              "of metric names")
    else:
        missing = [m for m in spec if m not in available]
        if missing:
            raise ConfigError(f"{key}: metric(s) {missing} are not in the dataset "
                              f"({', '.join(available)}); pick from those")
        chosen = list(spec)
    if not chosen:
        raise ConfigError(f"{key}={spec!r} selects no metric of the dataset "
                          f"({', '.join(available)})")
    return tuple(chosen)


def load_scorer_uri(uri: str) -> Any:
    """A trained scorer from a model URI or directory; None for `standin` (the transparent
    z-score stand-in of tests, built per dataset)."""
    if uri == "standin":
        return None
    from canaryml.tracking import load_scorer

    return load_scorer(uri)


def load_scorers(names: list[str], models: dict[str, str], model_uri: str, lookback: int | None,
                 ds: CanonicalDataset) -> tuple[dict[str, Any], dict[str, str]]:
    """Scorer per scorer policy (variants share one load) and its version string."""
    scorers: dict[str, Any] = {}
    versions: dict[str, str] = {}
    base: Any = None
    for name in names:
        if name in SCORER_VARIANTS:
            if base is None:
                base = load_scorer_uri(model_uri)
                if base is None:
                    from canaryml.replay.standin import GapZScorer

                    base = GapZScorer(ds.metrics, ds.catalog, lookback=int(lookback or 20))
            mix = SCORER_VARIANTS[name]
            sc = base if mix is None else base.with_mix(mix)
            if predict_mode(name) == "off" and hasattr(sc, "without_predictor"):
                sc = sc.without_predictor()  # its rule stays off: no probabilities to compute
            scorers[name] = sc
            versions[name] = str(getattr(base, "info", {}).get("model_uri", model_uri))
        elif name in models:
            sc = load_scorer_uri(str(models[name]))
            if sc is None:
                raise ConfigError(f"replay.models.{name}: give a model URI or directory")
            scorers[name], versions[name] = sc, str(models[name])
    return scorers, versions


def build_policies(names: list[str], models: dict[str, str], model_uri: str, pcfg: PolicyConfig,
                   rcfg: dict[str, Any], ds: CanonicalDataset) -> list[ReplayPolicy]:
    """The policies `names` (+ one per `models` entry) at their configured settings."""
    names = [*names, *[m for m in models if m not in names]]
    scorers, versions = load_scorers(names, models, model_uri, rcfg.get("lookback"), ds)
    builder = PolicyBuilder(ds.catalog, tuple(ds.metrics), float(ds.step_s), pcfg, scorers,
                            models, versions)
    return [builder.build(n, configured_settings(n, models, pcfg, rcfg, scorers.get(n)))
            for n in names]


@dataclass
class PolicyBuilder:
    """Builds `ReplayPolicy`s of any family for one dataset layout (catalog, metrics, step)."""

    catalog: Catalog
    metrics: tuple[str, ...]
    step_s: float
    pcfg: PolicyConfig
    scorers: Mapping[str, Any]  # policy name → Scorer (variants already mixed)
    models: Mapping[str, str] = field(default_factory=dict)
    versions: Mapping[str, str] = field(default_factory=dict)
    test_cache: TestCache = field(default_factory=OrderedDict)

    def build(self, name: str, settings: Mapping[str, Any], *, as_name: str | None = None
              ) -> ReplayPolicy:
        """The policy `name` (its family's scorer or judge) with `settings`, reported as
        `as_name` (default: `name`)."""
        fam = family(name, self.models)
        s = dict(settings)
        label = as_name or name
        if fam == "scorer":
            sc = self.scorers[name]
            p = s.get("predict_probability")
            cfg = replace(self.pcfg, rollback_threshold=float(s["rollback_threshold"]),
                          consecutive_breaches=int(s["consecutive_breaches"]), follow_model=False,
                          predict_probability=1.0 if p is None else float(p))  # 1.0: rule off
            return ReplayPolicy(ScorerPolicy(label, sc, RollbackPolicy(cfg),
                                             self.versions.get(name)), sc)
        if fam == "argo":
            frac = float(s["limit_fraction"])
            if frac <= 0:
                raise ConfigError(f"replay.argo.limit_fraction={frac} must be > 0")
            rel = s.get("limits_relative_to", "slo")
            if rel not in ("slo", "baseline"):
                raise ConfigError(f"replay.argo.limits_relative_to={rel!r}; use slo or baseline")
            limits = {}
            for m in metric_set(s["metrics"], self.catalog, self.metrics, "replay.argo.metrics"):
                slo = self.catalog.get(m).slo
                if rel == "slo" and slo is None:
                    raise ConfigError(f"replay.argo.metrics: {m!r} has no SLO in the metric "
                                      "catalog, so its limit (limit_fraction × SLO) is undefined;"
                                      " give it an `slo` in conf/metrics, drop it, or set "
                                      "replay.argo.limits_relative_to=baseline")
                limits[m] = frac * (float(slo) if rel == "slo" else 1.0)  # type: ignore[arg-type]
            return ReplayPolicy(ThresholdJudge(limits, int(s["failure_limit"]),
                                               float(s["measure_s"]), self.pcfg, name=label,
                                               step_s=self.step_s,
                                               relative_to_baseline=rel == "baseline"))
        kc = KayentaConfig(confidence=float(s["confidence"]), tolerance=float(s["tolerance"]),
                           pass_threshold=float(s["pass_threshold"]),
                           marginal_threshold=float(s["marginal_threshold"]),
                           group_weights=dict(s["groups"]),
                           allowed_increase=float(s["allowed_increase"]),
                           allowed_decrease=float(s["allowed_decrease"]),
                           data_required=bool(s["data_required"]),
                           critical=tuple(s["critical"]))
        judged = metric_set(s["metrics"], self.catalog, self.metrics, "replay.kayenta.metrics")
        return ReplayPolicy(KayentaJudge(self.catalog, kc, float(s["interval_s"]), self.pcfg,
                                         name=label, step_s=self.step_s, metrics=judged,
                                         test_cache=self.test_cache))


def at_threshold(fam: str, settings: Mapping[str, Any], threshold: float,
                 consecutive: int) -> dict[str, Any]:
    """`settings` moved to the swept `threshold` (and `consecutive` breaches where the family
    has that knob), expressed in the family's own terms."""
    s = dict(settings)
    if fam == "scorer":
        s |= {"rollback_threshold": NEVER if s["rollback_threshold"] == NEVER else float(threshold),
              "consecutive_breaches": int(consecutive)}
    elif fam == "argo":  # score = max(value / limit) / 2, breach when > 0.5
        s |= {"limit_fraction": float(s["limit_fraction"]) * 2.0 * float(threshold),
              "failure_limit": int(consecutive)}
    else:  # score = 1 − kayenta/100, breach when ≥ 1 − marginal/100; pass keeps its distance
        marginal = 100.0 * (1.0 - float(threshold))
        gap = float(s["pass_threshold"]) - float(s["marginal_threshold"])
        s |= {"marginal_threshold": marginal, "pass_threshold": min(100.0, marginal + gap)}
    return s


@dataclass(frozen=True)
class CalibrationSpace:
    """The knobs tuned per family besides the threshold (conf/replay `calibration.*`)."""

    consecutive_breaches: tuple[int, ...] = (1, 2, 3)
    argo_measure_s: tuple[float, ...] = (30.0, 60.0, 120.0)
    argo_metrics: tuple[Any, ...] = ("slo",)
    kayenta_interval_s: tuple[float, ...] = (120.0, 300.0)
    kayenta_effect_size: tuple[float, ...] = (1.0, 1.1, 1.25, 1.5, 2.0)
    kayenta_metrics: tuple[Any, ...] = ("all", "app", "slo")
    # the predictive rule's probability (None = off); each healthy calibration deployment's
    # highest probability is added, so the sweep resolves every change of the false-rollback rate
    predict_probability: tuple[float | None, ...] = (None, 0.5, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99)

    @classmethod
    def from_mapping(cls, c: Mapping[str, Any]) -> CalibrationSpace:
        a, k = dict(c.get("argo") or {}), dict(c.get("kayenta") or {})
        pp = c.get("predict_probability", cls.predict_probability)
        return cls(predict_probability=tuple(None if x is None else float(x) for x in pp),
                   consecutive_breaches=tuple(int(x) for x in c["consecutive_breaches"]),
                   argo_measure_s=tuple(float(x) for x in a["measure_s"]),
                   argo_metrics=tuple(a["metrics"]),
                   kayenta_interval_s=tuple(float(x) for x in k["interval_s"]),
                   kayenta_effect_size=tuple(float(x) for x in k["effect_size"]),
                   kayenta_metrics=tuple(k["metrics"]))

    def structural(self, fam: str, base: Mapping[str, Any]) -> list[dict[str, Any]]:
        """Configurations that need a replay of their own (the rest is swept)."""
        if fam == "scorer":
            return [dict(base)]
        if fam == "argo":
            return [dict(base) | {"measure_s": ms, "metrics": m, "limit_fraction": 1.0}
                    for ms, m in itertools.product(self.argo_measure_s, self.argo_metrics)]
        return [dict(base) | {"interval_s": iv, "allowed_increase": e, "allowed_decrease": 1.0 / e,
                              "metrics": m}
                for iv, e, m in itertools.product(self.kayenta_interval_s,
                                                   self.kayenta_effect_size, self.kayenta_metrics)]

    def consecutive(self, fam: str) -> tuple[int, ...]:
        # Kayenta holds one score per interval between its evaluations: consecutive *ticks*
        # over its threshold are the same interval, so it acts on the first failing interval.
        return (1,) if fam == "kayenta" else self.consecutive_breaches


def best_threshold(history: ScoreHistory, cfg: PolicyConfig, deps: pd.DataFrame,
                   consecutive: Sequence[int], thresholds: np.ndarray, target_frr: float,
                   confidence: float | None = None) -> tuple[int, dict[str, Any] | None, int]:
    """Sweep `history` over every threshold for each hysteresis in `consecutive`: the best
    (consecutive, operating point) at a false-rollback rate ≤ `target_frr` (with `confidence`:
    its upper confidence bound, `operating_point`; op None if none reaches it) and how many
    (consecutive, threshold) pairs were compared."""
    best: tuple[int, dict[str, Any] | None] = (int(consecutive[0]), None)
    compared = 0
    for c in consecutive:
        cc = replace(cfg, consecutive_breaches=int(c))
        grid = breakpoints(history, cc, thresholds)
        compared += len(grid)
        op = operating_point(sweep_table(history, cc, deps, grid), target_frr, confidence)
        if op is not None and _better(op, best[1]):
            best = (int(c), op)
    return best[0], best[1], compared


def policy_history(rp: ReplayPolicy, history: ScoreHistory) -> ScoreHistory:
    """`history` as `rp`'s rollback policy acts on it: with a scorer policy's predictive rule
    applied (a predicted breach scores over every threshold), so its sweep is the policy's."""
    cfg = rp.policy.rollback.config
    only = cfg.rollback_threshold >= NEVER
    if cfg.predict_probability is None and not only:
        return history
    return history.with_predictive_rule(cfg.predict_probability, only=only)


def predict_candidates(history: ScoreHistory, deps: pd.DataFrame, grid: Sequence[float | None],
                       consecutive: Sequence[int] = (1,), top: int = 12,
                       target_frr: float | None = None) -> list[float | None]:
    """Probabilities to try for the predictive rule: `grid` plus, per hysteresis in
    `consecutive`, `top` false-alarm peaks — per deployment, the highest minimum of that many
    ticks in a row while the canary was healthy (a healthy deployment, or a faulty one before
    its onset): exactly where the rule's false-rollback rate changes. The highest `top`; with
    `target_frr`, `top` peaks spread evenly over the highest 2 × target × runs (a large corpus:
    the peaks around the target, not only its worst few runs)."""
    out = list(dict.fromkeys(grid))
    if history.predicted is None:
        return [None]
    d = deps.set_index("deployment_id").reindex(list(history.deployment_ids))
    onset = np.where(d["label"].to_numpy() == "healthy", np.inf,
                     d["fault_onset_s"].to_numpy(float))[:, None]
    with np.errstate(invalid="ignore"):
        healthy_tick = np.nan_to_num(onset, nan=-np.inf) > history.times_s
    p = np.where(np.isfinite(history.predicted), history.predicted, -1.0)
    for c in consecutive:
        run = p.copy()
        for k in range(1, int(c)):
            run[:, k:] = np.minimum(run[:, k:], p[:, :-k])
            run[:, :k] = -1.0
        peaks = np.where(healthy_tick, run, -1.0).max(axis=1)
        ranked = np.sort(peaks[peaks >= 0])[::-1]
        reach = top if target_frr is None else max(
            top, int(np.ceil(2 * target_frr * healthy_tick.any(axis=1).sum())))
        ranks = np.unique(np.linspace(0, reach - 1, top).round().astype(int))
        for v in ranked[ranks[ranks < len(ranked)]]:
            if float(v) not in out:
                out.append(float(v))
    return out


def best_setting(history: ScoreHistory, cfg: PolicyConfig, deps: pd.DataFrame,
                 consecutive: Sequence[int], thresholds: np.ndarray, target_frr: float,
                 mode: str, grid: Sequence[float | None], confidence: float | None = None
                 ) -> tuple[int, float | None, dict[str, Any] | None, int]:
    """`best_threshold` over the predictive rule's probabilities too (scorer policies):
    (consecutive, predict_probability, operating point, pairs compared). `mode` off: the rule
    stays off; only: the anomaly score never acts."""
    probs: list[float | None] = (
        [None] if mode == "off" else predict_candidates(history, deps, grid, consecutive,
                                                         target_frr=target_frr))
    if mode == "only":
        probs = [p for p in probs if p is not None] or [None]
    best: tuple[int, float | None, dict[str, Any] | None] = (int(consecutive[0]), None, None)
    compared = 0
    for p in probs:
        h = history.with_predictive_rule(p, only=mode == "only")
        c, op, n = best_threshold(h, cfg, deps, consecutive,
                                  np.array([1.0]) if mode == "only" else thresholds, target_frr,
                                  confidence)
        compared += n
        if op is not None and _better(op, best[2]):
            best = (c, p, op)
    return best[0], best[1], best[2], compared


def breakpoints(history: ScoreHistory, cfg: PolicyConfig, grid: np.ndarray) -> np.ndarray:
    """The grid plus, per deployment, the highest threshold that still rolls it back (the max
    over ticks of the min of `consecutive_breaches` scores in a row): the sweep then resolves
    every change of the curve, also where calibrated scores crowd near 1."""
    s = np.where(np.isfinite(history.scores), history.scores, -np.inf)
    c = max(1, int(cfg.consecutive_breaches))
    run = s.copy()
    for k in range(1, c):
        run[:, k:] = np.minimum(run[:, k:], s[:, :-k])
        run[:, :k] = -np.inf
    peaks = run.max(axis=1)
    return np.unique(np.concatenate([grid, peaks[np.isfinite(peaks) & (peaks >= 0)]]))


@dataclass(frozen=True)
class Tuned:
    """A policy's training-chosen configuration and what it scored on the calibration corpus."""

    name: str
    settings: dict[str, Any]
    calibration: dict[str, Any]
    configurations: int  # (structural configuration, consecutive, threshold) triples compared


def _better(a: Mapping[str, Any], b: Mapping[str, Any] | None) -> bool:
    if b is None:
        return True
    def key(m: Mapping[str, Any]) -> tuple[float, float, float]:
        return (m.get("caught_before_impact") or 0.0, m.get("detection_rate") or 0.0,
                -(m.get("false_rollback_rate") or 0.0))

    return key(a) > key(b)


def calibrate(ds: CanonicalDataset, names: Sequence[str], base: Mapping[str, dict[str, Any]],
              builder: PolicyBuilder, space: CalibrationSpace, target_frr: float,
              thresholds: np.ndarray, *, horizon_s: float | None = None,
              progress: bool = True, workers: int | None = None,
              confidence: float | None = None) -> dict[str, Tuned]:
    """Choose every policy's settings on the labelled calibration corpus `ds` (step 1); with
    `confidence`, the false-rollback target must hold at that confidence (`operating_point`)."""
    deps = deployment_table(ds)
    candidates: list[tuple[str, dict[str, Any], ReplayPolicy]] = []
    for name in names:
        fam = family(name, builder.models)
        for i, s in enumerate(space.structural(fam, base[name])):
            rp = builder.build(name, s, as_name=f"{name}#{i}")
            candidates.append((name, s, rp))
    log.info("calibration: %d configurations of %d policies on %d deployments", len(candidates),
             len(names), len(deps))
    result = replay(ds, [rp for _, _, rp in candidates], interval_s=builder.pcfg.monitoring_interval_s,
                    deployments=deps, horizon_s=horizon_s, progress=progress, decide=False,
                    workers=workers)
    best: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {}
    tried: dict[str, int] = dict.fromkeys(names, 0)
    for name, s, rp in candidates:
        fam = family(name, builder.models)
        history = result.histories[rp.name]
        if fam == "scorer":
            c, p, op, compared = best_setting(history, rp.policy.rollback.config, deps,
                                              space.consecutive(fam), thresholds, target_frr,
                                              predict_mode(name), space.predict_probability,
                                              confidence)
            s = dict(s) | {"predict_probability": p}
        else:
            c, op, compared = best_threshold(history, rp.policy.rollback.config, deps,
                                             space.consecutive(fam), thresholds, target_frr,
                                             confidence)
        tried[name] += compared
        if op is not None and _better(op, best.get(name, (None, None))[1]):
            best[name] = (at_threshold(fam, s, float(op["threshold"]), c), op)
    out = {}
    for name in names:
        if name not in best:
            raise ConfigError(f"calibration: no configuration of {name!r} reaches a false-rollback"
                              f" rate ≤ {target_frr:g} on the calibration corpus ({ds.path}); "
                              "raise replay.calibration.target_frr or check the corpus labels")
        settings, op = best[name]
        out[name] = Tuned(name, settings, {k: op.get(k) for k in op if k != "threshold"}
                          | {"swept_threshold": op.get("threshold")}, tried[name])
    return out


def choose_operating_point(scorer: Any, ds: CanonicalDataset, deployment_ids: Sequence[str],
                           pcfg: PolicyConfig, target_frr: float,
                           consecutive: Sequence[int] = (1, 2, 3), *,
                           thresholds: np.ndarray | None = None,
                           predict_grid: Sequence[float | None] = CalibrationSpace.predict_probability,
                           confidence: float | None = None) -> dict[str, Any] | None:
    """The scorer's own operating point, chosen like replay's calibration on held-back labelled
    deployments (training's validation split): the threshold, hysteresis and (with a breach
    predictor) the predictive rule's probability that catch most faulty canaries before impact
    at a false-rollback rate ≤ `target_frr`. None when those deployments hold no healthy canary
    (nothing to bound the false rollbacks with)."""
    deps = deployment_table(ds)
    deps = deps[deps["deployment_id"].isin(set(deployment_ids))].reset_index(drop=True)
    if not (deps["label"] == "healthy").any():
        log.warning("no healthy deployment among the %d held back: no operating point chosen; "
                    "policies use policy.rollback_threshold", len(deps))
        return None
    cfg = replace(pcfg, follow_model=False, predict_probability=1.0)
    rp = ReplayPolicy(ScorerPolicy("scorer", scorer, RollbackPolicy(cfg)), scorer)
    result = replay(ds, [rp], interval_s=cfg.monitoring_interval_s, deployments=deps,
                    progress=False, decide=False)
    grid = np.linspace(0.0, 1.0, 101) if thresholds is None else thresholds
    c, p, op, _ = best_setting(result.histories["scorer"], cfg, deps, consecutive, grid,
                               target_frr, "on", predict_grid, confidence)
    if op is None:
        return None
    return {"rollback_threshold": float(op["threshold"]), "consecutive_breaches": c,
            "predict_probability": p,
            "target_frr": float(target_frr), "frr_confidence": confidence,
            "chosen_on": "validation deployments",
            "deployments": len(deps), "healthy": int((deps["label"] == "healthy").sum()),
            "false_rollback_rate": op.get("false_rollback_rate"),
            "caught_before_impact": op.get("caught_before_impact")}


def blind(deps: pd.DataFrame) -> pd.DataFrame:
    """The deployment table with every label removed: what the evaluation replay may see."""
    return deps.assign(label="unknown", fault_kind="", fault_onset_s=np.nan, impact_at_s=np.nan)


def first_rollback(result: ReplayResult, policy: str) -> np.ndarray:
    """Time of each deployment's first SHRINK/ROLLBACK (NaN = none), in result.deployments order."""
    o = result.outcomes[result.outcomes["policy"] == policy].set_index("deployment_id")
    o = o.loc[result.deployments["deployment_id"]]
    return np.where(o["rolled_back"].to_numpy(bool), o["decided_at_s"].to_numpy(float), np.nan)


def summarize(result: ReplayResult, policies: Sequence[ReplayPolicy], thresholds: np.ndarray,
              frr_targets: Sequence[float], truth: pd.DataFrame | None = None
              ) -> tuple[dict[str, Any], dict[str, pd.DataFrame]]:
    """Per policy: DESIGN §7 metrics at the policy's own settings, and the threshold sweep of its
    recorded score history on this corpus (labels from `truth`, default the result's own table;
    the sweep's operating points are chosen on this same corpus: training-side use only)."""
    truth = result.deployments if truth is None else truth
    summary: dict[str, Any] = {}
    sweeps: dict[str, pd.DataFrame] = {}
    for rp in policies:
        m = metrics_from_times(first_rollback(result, rp.name), truth)
        cfg = rp.policy.rollback.config
        hist = policy_history(rp, result.histories[rp.name])
        sw = sweep_table(hist, cfg, truth, breakpoints(hist, cfg, thresholds))
        sweeps[rp.name] = sw
        o = result.outcomes[result.outcomes["policy"] == rp.name]
        m["promoted"] = int((o["final_action"] == "promote").sum())
        m["paused_ticks"] = int(o["paused_ticks"].sum())
        m["operating_points"] = {f"frr<={t:g}": operating_point(sw, t) for t in frr_targets}
        m["sweep"] = sw.replace({np.nan: None}).to_dict(orient="list")
        m["replay_wall_s"] = result.per_policy_wall_s.get(rp.name)
        summary[rp.name] = m
    return summary, sweeps


@dataclass
class Evaluation:
    """One evaluation corpus replayed blind, with its labels read afterwards."""

    name: str
    dataset: CanonicalDataset
    result: ReplayResult
    truth: pd.DataFrame


def evaluate_blind(datasets: Sequence[tuple[str, CanonicalDataset]],
                   make_policies: Callable[[CanonicalDataset], list[ReplayPolicy]],
                   interval_s: float, *, horizon_s: float | None = None,
                   progress: bool = True, workers: int | None = None,
                   shard: tuple[int, int] | None = None) -> list[Evaluation]:
    """Step 2: replay every evaluation corpus with its labels hidden; read the labels after the
    last replay (the only place this module reads evaluation labels). `shard` (index, count):
    only that shard's deployments of each corpus (`shard_of`)."""
    runs = []
    for name, ds in datasets:
        truth_free = blind(shard_of(deployment_table(ds), shard))
        policies = make_policies(ds)
        runs.append((name, ds, replay(ds, policies, interval_s=interval_s, deployments=truth_free,
                                      horizon_s=horizon_s, progress=progress,
                                      workers=workers)))
    return [Evaluation(name, ds, res, shard_of(deployment_table(ds), shard))
            for name, ds, res in runs]


def pooled_metrics(evals: Sequence[Evaluation], policy: str, *, n_boot: int, seed: int
                   ) -> dict[str, Any]:
    """Metrics over all evaluation corpora together, 95 % bootstrap intervals (deployments
    resampled within each corpus and label), per-corpus values and their mean."""
    decided = np.concatenate([first_rollback(e.result, policy) for e in evals])
    truth = pd.concat([e.truth.assign(corpus=e.name) for e in evals], ignore_index=True)
    out = metrics_from_times(decided, truth)
    out["ci95"] = bootstrap_intervals(decided, truth, HEADLINE, n_boot=n_boot, seed=seed,
                                      strata=truth["corpus"].astype(str) + "/" + truth["label"])
    per = {e.name: metrics_from_times(first_rollback(e.result, policy), e.truth) for e in evals}
    out["per_corpus"] = per
    out["mean_over_corpora"] = {k: (float(np.mean([p[k] for p in per.values()]))
                                    if all(p.get(k) is not None for p in per.values()) else None)
                                for k in HEADLINE}
    return out


def per_group(evals: Sequence[Evaluation], policy: str, column: str = "fault_kind"
              ) -> dict[str, dict[str, Any]]:
    """Detection, caught before impact, time from onset to rollback and lead time per value of
    a faulty-deployment `column` (fault kind, onset style); each group's false rollbacks are
    left out (they belong to no fault)."""
    decided = np.concatenate([first_rollback(e.result, policy) for e in evals])
    truth = pd.concat([e.truth for e in evals], ignore_index=True)
    faulty = (truth["label"] == "faulty").to_numpy()
    values = truth[column].astype(str) if column in truth else pd.Series([""] * len(truth))
    out = {}
    for value in sorted(set(values[faulty]) - {""}):
        keep = faulty & (values == value).to_numpy()
        m = metrics_from_times(decided[keep], truth[keep].reset_index(drop=True))
        out[value] = {k: m[k] for k in ("n_faulty", "detection_rate", "caught_before_impact",
                                        "time_to_detect_s_p50", "lead_time_s_p50")}
    return out
