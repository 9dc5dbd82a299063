"""`canaryml replay model=… dataset=DIR out=DIR [policy.…] [replay.…]` (DESIGN §4, §7)."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, cast

import numpy as np
import pandas as pd
from omegaconf import DictConfig, OmegaConf

from canaryml.control.kayenta import KayentaConfig
from canaryml.control.policies import KayentaJudge, ScorerPolicy, ThresholdJudge
from canaryml.control.policy import PolicyConfig, RollbackPolicy
from canaryml.data.atomic import atomic_dir, atomic_write_json
from canaryml.data.dataset import CanonicalDataset
from canaryml.errors import ConfigError
from canaryml.replay import report
from canaryml.replay.evaluate import (
    ScoreHistory,
    metrics_from_times,
    operating_point,
    sweep_table,
)
from canaryml.replay.runner import ReplayPolicy, ReplayResult, replay

log = logging.getLogger(__name__)
SCORER_VARIANTS = {"scorer": None, "scorer_forecast": 1.0, "scorer_detector": 0.0}


def _load(uri: str) -> Any:
    if uri == "standin":  # transparent z-score stand-in (tests, no trained model yet)
        return None
    from canaryml.tracking import load_scorer

    return load_scorer(uri)


def build_policies(names: list[str], models: dict[str, str], model_uri: str, pcfg: PolicyConfig,
                   rcfg: dict[str, Any], ds: CanonicalDataset) -> list[ReplayPolicy]:
    out: list[ReplayPolicy] = []
    base_scorer: Any = None
    lookback = rcfg.get("lookback")
    for name in names:
        if name in SCORER_VARIANTS:
            if base_scorer is None:
                base_scorer = _load(model_uri)
                if base_scorer is None:
                    from canaryml.replay.standin import GapZScorer

                    base_scorer = GapZScorer(ds.metrics, ds.catalog, lookback=int(lookback or 20))
            mix = SCORER_VARIANTS[name]
            sc = base_scorer if mix is None else base_scorer.with_mix(mix)
            version = str(getattr(base_scorer, "info", {}).get("model_uri", model_uri))
            out.append(ReplayPolicy(ScorerPolicy(name, sc, RollbackPolicy(pcfg), version), sc))
        elif name == "argo":
            a = rcfg["argo"]
            out.append(ReplayPolicy(ThresholdJudge(dict(a["metrics"]), int(a["failure_limit"]),
                                                   float(a.get("measure_s", 60)), pcfg,
                                                   step_s=float(ds.step_s))))
        elif name == "kayenta":
            k = rcfg["kayenta"]
            kc = KayentaConfig(confidence=float(k["confidence"]), tolerance=float(k["tolerance"]),
                               pass_threshold=float(k["pass_threshold"]),
                               marginal_threshold=float(k["marginal_threshold"]),
                               group_weights={g: float(w) for g, w in k["groups"].items()},
                               data_required=bool(k.get("data_required", False)),
                               critical=tuple(k.get("critical", ()) or ()))
            out.append(ReplayPolicy(KayentaJudge(ds.catalog, kc, float(k["interval_s"]), pcfg,
                                                 step_s=float(ds.step_s))))
        else:
            raise ConfigError(f"replay.policies: unknown policy {name!r}; use "
                              f"{', '.join([*SCORER_VARIANTS, 'argo', 'kayenta'])}")
    for name, uri in models.items():  # e.g. the Transformer scorer beside the LSTM one
        sc = _load(str(uri))
        if sc is None:
            raise ConfigError(f"replay.models.{name}: give a model URI or directory")
        out.append(ReplayPolicy(ScorerPolicy(name, sc, RollbackPolicy(pcfg), str(uri)), sc))
    return out


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


def summarize(result: ReplayResult, policies: list[ReplayPolicy], thresholds: np.ndarray,
              frr_targets: list[float]) -> tuple[dict[str, Any], dict[str, pd.DataFrame]]:
    deps = result.deployments
    summary: dict[str, Any] = {}
    sweeps: dict[str, pd.DataFrame] = {}
    for rp in policies:
        o = result.outcomes[result.outcomes["policy"] == rp.name].set_index("deployment_id")
        o = o.loc[deps["deployment_id"]]
        decided = np.where(o["rolled_back"].to_numpy(bool), o["decided_at_s"].to_numpy(float),
                           np.nan)
        m = metrics_from_times(decided, deps)
        cfg = rp.policy.rollback.config
        hist = result.histories[rp.name]
        sw = sweep_table(hist, cfg, deps, breakpoints(hist, cfg, thresholds))
        sweeps[rp.name] = sw
        m["threshold"] = cfg.rollback_threshold
        m["promoted"] = int((o["final_action"] == "promote").sum())
        m["paused_ticks"] = int(o["paused_ticks"].sum())
        m["operating_points"] = {f"frr<={t:g}": operating_point(sw, t) for t in frr_targets}
        m["sweep"] = sw.replace({np.nan: None}).to_dict(orient="list")
        m["replay_wall_s"] = result.per_policy_wall_s.get(rp.name)
        summary[rp.name] = m
    return summary, sweeps


def run(cfg: DictConfig) -> int:
    rc = cast(dict, OmegaConf.to_container(cfg.replay, resolve=True))
    if rc.get("mode", "deployments") == "pointwise":
        return _run_pointwise(cfg, rc)
    if not cfg.out:
        raise ConfigError("replay needs out=DIR for decisions.parquet, summary.json and the report")
    ds = CanonicalDataset(cfg.dataset)
    pcfg = PolicyConfig.from_mapping(cast(dict, OmegaConf.to_container(cfg.policy, resolve=True)))
    policies = build_policies(list(rc["policies"]), dict(rc.get("models") or {}), str(cfg.model),
                              pcfg, rc, ds)
    t0 = time.perf_counter()
    result = replay(ds, policies, interval_s=pcfg.monitoring_interval_s,
                    horizon_s=rc.get("horizon_s"))
    thresholds = np.linspace(0.0, 1.0, int(rc["sweep"]["thresholds"]))
    per_policy, sweeps = summarize(result, policies, thresholds, list(rc["sweep"]["frr_targets"]))
    labels = result.deployments["label"].value_counts().to_dict()
    summary = {
        "dataset": {"path": str(cfg.dataset), "content_hash": ds.content_hash,
                    "deployments": len(result.deployments), "labels": labels},
        "model": str(cfg.model), "policy_config": OmegaConf.to_container(cfg.policy),
        "rolled_back_means": "first shrink or rollback",
        "replay": {"ticks": result.ticks, "wall_s": result.wall_s,
                   "simulated_s": result.simulated_s,
                   "speed_x_realtime": result.simulated_s / max(result.wall_s, 1e-9)},
        "policies": per_policy,
    }
    out = Path(cfg.out)
    with atomic_dir(out) as tmp:
        dec = result.outcomes.drop(columns=["decided_at_s"])
        dec.to_parquet(tmp / "decisions.parquet", index=False)
        pd.DataFrame([{**{k: v for k, v in r.__dict__.items() if k != "evidence"},
                       "reasons": list(r.reasons), "evidence": json.dumps(r.evidence, default=str)}
                      for r in result.records]).to_parquet(tmp / "decision_log.parquet", index=False)
        atomic_write_json(tmp / "summary.json", summary)
        if rc["report"]["enabled"]:
            _report(tmp, ds, result, policies, summary, sweeps, int(rc["report"]["incidents"]),
                    int(rc["report"]["top_metrics"]))
    log.info("replay wrote %s in %.1f s", out, time.perf_counter() - t0)
    if rc.get("mlflow", True):
        _log_mlflow(cfg, out, summary)
    for name, m in per_policy.items():
        op = m["operating_points"].get("frr<=0.01") or {}
        print(f"{name:>16}: detection={m['detection_rate']} false_rollback="
              f"{m['false_rollback_rate']} caught_before_impact={m['caught_before_impact']} "
              f"lead_p50={m['lead_time_s_p50']} | @FRR≤1%: {op.get('caught_before_impact')}")
    return 0


def _report(out: Path, ds: CanonicalDataset, result: ReplayResult, policies: list[ReplayPolicy],
            summary: dict[str, Any], sweeps: dict[str, pd.DataFrame], n_incidents: int,
            top_k: int) -> None:
    points = {n: (m["operating_points"].get("frr<=0.05") or {}) for n, m in
              summary["policies"].items()}
    curve = report.plot_curves(sweeps, points, out / "curve.png")
    deps = result.deployments
    faulty = deps[deps["label"] == "faulty"].head(n_incidents)
    pngs = []
    cat = ds.catalog
    for _, d in faulty.iterrows():
        dep_id = str(d["deployment_id"])
        i = deps.index[deps["deployment_id"] == dep_id][0]
        arrays = ds.arrays(dep_id)
        o = result.outcomes[result.outcomes["deployment_id"] == dep_id].set_index("policy")
        decisions = {p.name: float(cast(float, o.loc[p.name, "decided_at_s"]))
                     if o.loc[p.name, "rolled_back"] else float("nan") for p in policies}
        scores = {p.name: (result.histories[p.name].times_s[i], result.histories[p.name].scores[i])
                  for p in policies}
        contrib: dict[str, float] = {}
        for r in result.records:
            if r.deployment_id == dep_id and "contributions" in r.evidence and r.action in (
                    "shrink", "rollback"):
                contrib = dict(r.evidence["contributions"])
                break
        top = list(contrib)[:top_k] or [m.name for m in cat.slo_metrics()][:top_k] or list(
            arrays.metrics[:top_k])
        top = [m for m in top if m in arrays.metrics]
        pngs.append(report.plot_timeline(arrays, {str(k): v for k, v in d.items()}, scores, decisions,
                                         float(policies[0].policy.rollback.config.rollback_threshold),
                                         top, out / f"incident_{dep_id}.png"))
    report.write_html(summary, curve, pngs, out / "report.html")


def _eval_tags(cfg: DictConfig, summary: dict[str, Any]) -> dict[str, str]:
    """Tags that let `canaryml promote` reuse this run's numbers (canaryml.registry)."""
    from canaryml.registry import replay_eval_tags

    try:
        pcfg = PolicyConfig.from_mapping(cast(dict, OmegaConf.to_container(cfg.policy, resolve=True)))
        return replay_eval_tags(str(cfg.model), summary["dataset"]["content_hash"], pcfg,
                                cast(dict, OmegaConf.to_container(cfg.replay, resolve=True)))
    except Exception as exc:  # tagging is an optimisation; the replay result stands regardless
        log.warning("replay run not tagged for promote reuse: %s", exc)
        return {}


def _log_mlflow(cfg: DictConfig, out: Path, summary: dict[str, Any]) -> None:
    import mlflow

    from canaryml import tracking

    conf = cast(dict, OmegaConf.to_container(cfg, resolve=True))
    with tracking.start_run(conf, experiment=str(cfg.mlflow.experiment), run_name="replay",
                            dataset_hash=summary["dataset"]["content_hash"],
                            uri=cfg.mlflow.tracking_uri,
                            tags={"command": "replay", **_eval_tags(cfg, summary)}):
        metrics: dict[str, float] = {"replay/speed_x_realtime": summary["replay"]["speed_x_realtime"]}
        for name, m in summary["policies"].items():
            for k in ("detection_rate", "false_rollback_rate", "caught_before_impact",
                      "lead_time_s_p10", "lead_time_s_p50", "lead_time_s_p90",
                      "time_to_detect_s_p50"):
                if m.get(k) is not None:
                    metrics[f"replay/{name}/{k}"] = float(m[k])
            for t, op in m["operating_points"].items():
                if op:
                    metrics[f"replay/{name}/caught_at_{t.replace('<=', 'le')}"] = float(
                        op["caught_before_impact"])
        mlflow.log_metrics(metrics)
        mlflow.log_artifacts(str(out), artifact_path="replay")


def _run_pointwise(cfg: DictConfig, rc: dict[str, Any]) -> int:
    """SMD/NAB: score every `<id>.test` series, evaluate with TSB-AD beside random and PCA."""
    from canaryml.replay import pointwise as pw

    if not cfg.out:
        raise ConfigError("replay mode=pointwise needs out=DIR for summary.json")
    ds = CanonicalDataset(cfg.dataset)
    ids = ds.deployments["deployment_id"].astype(str).tolist()
    tests = [i for i in ids if i.endswith(".test")]
    if not tests:
        raise ConfigError(f"{cfg.dataset}: no `<id>.test` series; pointwise replay needs a "
                          "dataset ingested with source=smd or source=nab")
    scorer = _load(str(cfg.model))
    if scorer is None:
        raise ConfigError("replay mode=pointwise needs a trained scorer: model=models:/… or DIR")
    pcfg = PolicyConfig.from_mapping(cast(dict, OmegaConf.to_container(cfg.policy, resolve=True)))
    thr = rc["pointwise"].get("threshold")
    thr = pcfg.rollback_threshold if thr is None else float(thr)
    rows = []
    for tid in tests:
        a = ds.arrays(tid)
        if a.anomaly is None or a.anomaly.sum() == 0:
            log.warning("%s has no anomaly labels; skipped", tid)
            continue
        window = rc["pointwise"].get("sliding_window") or pw.sliding_window(a.canary)
        train_id = tid[: -len(".test")] + ".train"
        train = ds.arrays(train_id).canary if train_id in ids else a.canary[: len(a.canary) // 5]
        model = pw.evaluate_scores(scorer.score_series(a), a.anomaly, thr, window)
        rnd_train = pw.random_scores(len(train), seed=int(cfg.seed) + 1)
        rnd = pw.evaluate_scores(pw.random_scores(len(a.anomaly), int(cfg.seed)), a.anomaly,
                                 pw.baseline_threshold(rnd_train), window)
        pca = pw.pca_scores(train, a.canary)
        pca_m = pw.evaluate_scores(pca, a.anomaly,
                                   pw.baseline_threshold(pw.pca_scores(train, train)), window)
        for method, pm in (("model", model), ("random", rnd), ("pca", pca_m)):
            rows.append({"series": tid, "method": method, **pm.to_dict()})
    table = pd.DataFrame(rows)
    means = table.drop(columns=["series"]).groupby("method").mean().to_dict(orient="index")
    out = Path(cfg.out)
    with atomic_dir(out) as tmp:
        table.to_csv(tmp / "pointwise.csv", index=False)
        atomic_write_json(tmp / "summary.json", {
            "dataset": {"path": str(cfg.dataset), "content_hash": ds.content_hash,
                        "series": len(tests)},
            "model": str(cfg.model), "threshold": thr, "mean": means,
            "note": "VUS-PR is the headline; PA-F1 is a legacy column only (DESIGN §7)"})
    for key, mm in means.items():
        m = cast(dict[str, float], mm)
        print(f"{key!s:>8}: VUS-PR={m['VUS-PR']:.3f} F1={m['F1']:.3f} event-F1={m['event-F1']:.3f}"
              f" PA-F1(legacy)={m['PA-F1 (legacy)']:.3f}")
    return 0
