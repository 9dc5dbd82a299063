"""What a replay report names besides the metrics: each policy's threshold in its own terms,
the model version replayed, and the false rollbacks one by one."""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from canaryml.control.policies import KayentaJudge, ScorerPolicy, ThresholdJudge
from canaryml.replay.runner import ReplayPolicy

log = logging.getLogger(__name__)


def native_threshold(rp: ReplayPolicy) -> dict[str, Any]:
    """The threshold a policy acts on, in its own units (the sweep's normalised score is not):
    the scorer's calibrated score, Argo's per-metric limits, Kayenta's marginal score."""
    pol = rp.policy
    cfg = pol.rollback.config
    if isinstance(pol, ThresholdJudge):
        unit = "× the baseline's mean" if pol.relative_to_baseline else ""
        limits = {m: float(v) for m, v in pol.limits.items()}
        text = ", ".join(f"{m} > {v:.4g}{unit}" for m, v in limits.items())
        return {"limits": limits, "relative_to_baseline": pol.relative_to_baseline,
                "failure_limit": int(pol.failure_limit), "measure_s": float(pol.measure_s),
                "text": f"{text}; {pol.failure_limit} failed {pol.measure_s:.0f}-s "
                        "measurements in a row"}
    if isinstance(pol, KayentaJudge):
        c = pol.config
        return {"marginal_threshold": float(c.marginal_threshold),
                "pass_threshold": float(c.pass_threshold), "interval_s": float(pol.interval_s),
                "text": f"Kayenta score ≤ {c.marginal_threshold:.4g} (pass ≥ "
                        f"{c.pass_threshold:.4g}) over {pol.interval_s:.0f}-s intervals"}
    out: dict[str, Any] = {"rollback_threshold": float(cfg.rollback_threshold),
                           "consecutive_breaches": int(cfg.consecutive_breaches)}
    text = (f"score > {cfg.rollback_threshold:.3f}, {cfg.consecutive_breaches}× in a row"
            if cfg.rollback_threshold <= 1.0 else "score never acts")
    p = getattr(cfg, "predict_probability", None)
    if isinstance(pol, ScorerPolicy) and p is not None and p < 1.0:
        out["predict_probability"] = float(p)
        text += f"; or predicted SLO breach p > {p:.2f}"
    out["text"] = text
    return out


def model_version(uri: str, versions: Mapping[str, str]) -> dict[str, Any]:
    """The model replayed: its URI, and for a registry URI the registered name, version and
    run id (resolved in the MLflow store; the URI alone when it cannot be reached)."""
    out: dict[str, Any] = {"uri": uri, "policies": dict(versions)}
    m = re.fullmatch(r"models:/([^/@]+)(?:@([^/]+)|/(\d+))", uri)
    if uri == "standin":
        out["note"] = "the transparent z-score stand-in (canaryml.replay.standin), no trained model"
    if not m:
        return out
    try:
        from mlflow.tracking import MlflowClient

        from canaryml import tracking

        tracking.configure()
        name, alias, version = m.groups()
        client = MlflowClient()
        mv = (client.get_model_version_by_alias(name, alias) if alias
              else client.get_model_version(name, version))
        out |= {"registered_model": name, "version": str(mv.version), "run_id": mv.run_id}
        if alias:
            out["alias"] = alias
    except Exception as exc:  # the report still names the URI
        log.warning("model version of %s not resolved: %s", uri, exc)
    return out


def version_text(mv: Mapping[str, Any]) -> str:
    """`canary-scorer v3 (@challenger, run 1a2b…)`, or the URI."""
    if mv.get("version"):
        alias = f"@{mv['alias']}, " if mv.get("alias") else ""
        return f"{mv['registered_model']} v{mv['version']} ({alias}run {mv.get('run_id')})"
    return str(mv.get("uri"))


def false_rollbacks(evals: Sequence[Any], policy: str) -> list[dict[str, Any]]:
    """Every false rollback of `policy`: healthy canaries rolled back, and faulty canaries
    rolled back before their fault began, with when and why."""
    rows: list[dict[str, Any]] = []
    for e in evals:
        o = e.result.outcomes
        o = o[(o["policy"] == policy) & o["rolled_back"]].set_index("deployment_id")
        truth = e.truth.set_index("deployment_id")
        for dep, r in o.iterrows():
            t = truth.loc[dep]
            at = float(r["decided_at_s"])
            onset = float(t["fault_onset_s"])
            early = t["label"] == "faulty" and np.isfinite(onset) and at < onset
            if t["label"] != "healthy" and not early:
                continue
            rows.append({"corpus": e.name, "deployment_id": str(dep), "label": str(t["label"]),
                         "fault_kind": str(t.get("fault_kind", "") or ""),
                         "action": str(r["action"]),
                         "decided_after_s": at - float(t["start_s"]),
                         "before_onset_s": (onset - at) if early else None,
                         "reasons": [str(x) for x in (r["reasons"] or [])][:3]})
    return rows
