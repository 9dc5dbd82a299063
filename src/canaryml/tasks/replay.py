"""`canaryml replay model=… dataset=DIR out=DIR [policy.…] [replay.…]` (DESIGN §4, §7)."""

from __future__ import annotations

import json
import logging
import pickle
import re
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any, cast

import numpy as np
import pandas as pd
from omegaconf import DictConfig, OmegaConf

from canaryml.control.policy import PolicyConfig, predict_horizon
from canaryml.data.atomic import atomic_outputs, atomic_write_json, json_marker
from canaryml.data.dataset import CanonicalDataset
from canaryml.errors import ConfigError
from canaryml.replay import report
from canaryml.replay.details import false_rollbacks, model_version, native_threshold
from canaryml.replay.evaluate import (
    ScoreHistory,
    operating_point,
    predictor_reliability,
    sweep_table,
)
from canaryml.replay.protocol import (
    CalibrationSpace,
    Evaluation,
    PolicyBuilder,
    Tuned,
    blind,
    breakpoints,
    calibrate,
    configured_settings,
    evaluate_blind,
    family,
    load_scorer_uri,
    load_scorers,
    per_group,
    policy_history,
    pooled_metrics,
)
from canaryml.replay.runner import (
    ReplayPolicy,
    ReplayResult,
    deployment_table,
    merge_results,
    parse_shard,
)

log = logging.getLogger(__name__)


def _datasets(spec: Any) -> list[tuple[str, CanonicalDataset]]:
    paths = [str(p) for p in spec] if isinstance(spec, list | tuple) else [str(spec)]
    if not paths:
        raise ConfigError("replay needs dataset=DIR (or a list of evaluation corpora)")
    out = [(Path(p).name or p, CanonicalDataset(p)) for p in paths]
    names = [n for n, _ in out]
    if len(set(names)) != len(names):
        out = [(f"{i}:{n}", d) for i, (n, d) in enumerate(out)]
    return out


def _concat(histories: list[ScoreHistory]) -> ScoreHistory:
    T = max(h.times_s.shape[1] for h in histories)

    def pad(a: np.ndarray) -> np.ndarray:
        return np.pad(a, ((0, 0), (0, T - a.shape[1])), constant_values=np.nan)

    predicted = None
    if any(h.predicted is not None for h in histories):
        predicted = np.vstack([pad(np.full(h.scores.shape, np.nan) if h.predicted is None
                                   else h.predicted) for h in histories])
    return ScoreHistory(tuple(i for h in histories for i in h.deployment_ids),
                        np.vstack([pad(h.times_s) for h in histories]),
                        np.vstack([pad(h.scores) for h in histories]), predicted)


def run(cfg: DictConfig) -> int:
    rc = cast(dict, OmegaConf.to_container(cfg.replay, resolve=True))
    if rc.get("mode", "deployments") == "pointwise":
        return _run_pointwise(cfg, rc)
    if not cfg.out:
        raise ConfigError("replay needs out=DIR for decisions.parquet, summary.json and the report")
    if cfg.get("merge"):
        return _run_merge(cfg)
    shard = parse_shard(cfg.get("shard"))
    t0 = time.perf_counter()
    datasets = _datasets(OmegaConf.to_container(cfg.dataset) if OmegaConf.is_list(cfg.dataset)
                         else cfg.dataset)
    pcfg = PolicyConfig.from_mapping(cast(dict, OmegaConf.to_container(cfg.policy, resolve=True)))
    models = {str(k): str(v) for k, v in (rc.get("models") or {}).items()}
    names = list(dict.fromkeys([*rc["policies"], *models]))
    for n in names:
        family(n, models)  # unknown names fail before anything is loaded
    first = datasets[0][1]
    scorers, versions = load_scorers(names, models, str(cfg.model), rc.get("lookback"), first)
    base = {n: configured_settings(n, models, pcfg, rc, scorers.get(n)) for n in names}
    thresholds = np.linspace(0.0, 1.0, int(rc["sweep"]["thresholds"]))
    cal = rc["calibration"]
    tuned = None
    cal_info = None
    if cal.get("dataset"):
        cds = CanonicalDataset(str(cal["dataset"]))
        clash = [n for n, d in datasets if d.content_hash == cds.content_hash]
        if clash:
            raise ConfigError(f"replay.calibration.dataset={cal['dataset']} is the evaluation "
                              f"corpus {clash[0]}; thresholds must be chosen on other (training-"
                              "side) data: give a separately simulated or held-back corpus")
        for iv in cal["kayenta"]["interval_s"] if "kayenta" in names else ():
            _check_interval(float(iv), [("calibration", cds)], rc.get("horizon_s"),
                            "replay.calibration.kayenta.interval_s", fatal=False)
        builder = PolicyBuilder(cds.catalog, tuple(cds.metrics), float(cds.step_s), pcfg,
                                scorers, models, versions)
        tuned = calibrate(cds, names, base, builder, CalibrationSpace.from_mapping(cal),
                          float(cal["target_frr"]), thresholds, horizon_s=rc.get("horizon_s"),
                          workers=rc.get("workers"), confidence=_confidence(cal))
        cal_info = {"path": str(cal["dataset"]), "content_hash": cds.content_hash,
                    "target_frr": float(cal["target_frr"]), "frr_confidence": _confidence(cal)}
    settings = {n: (tuned[n].settings if tuned else base[n]) for n in names}
    for n in names:
        if family(n, models) == "kayenta":
            _check_interval(float(settings[n]["interval_s"]), datasets, rc.get("horizon_s"),
                            "replay.calibration.kayenta.interval_s" if tuned
                            else "replay.kayenta.interval_s", fatal=True)
    make = _maker(pcfg, scorers, models, versions, names, settings)
    evals = evaluate_blind(datasets, make, pcfg.monitoring_interval_s, horizon_s=rc.get("horizon_s"),
                           workers=rc.get("workers"), shard=shard)
    _check_scored(evals, names, models)
    if shard is not None:
        _write_shard(cfg, shard, datasets, evals, settings, tuned, cal_info)
        log.info("replay shard %d/%d wrote %s in %.1f s", *shard, cfg.out, time.perf_counter() - t0)
        return 0
    _finish(cfg, rc, datasets, evals, make(first), settings, tuned, cal_info, versions)
    log.info("replay wrote %s in %.1f s", cfg.out, time.perf_counter() - t0)
    return 0


def _confidence(cal: Any) -> float | None:
    c = cal.get("frr_confidence")
    if c is not None and not 0.0 < float(c) < 1.0:
        raise ConfigError(f"replay.calibration.frr_confidence={c} must be in (0, 1) or null")
    return None if c is None else float(c)


def _check_interval(interval_s: float, datasets: list[tuple[str, CanonicalDataset]],
                    horizon_s: float | None, key: str, *, fatal: bool) -> None:
    """Kayenta judges its first interval `interval_s` after a canary starts: an interval longer
    than every deployment never judges anything (an error, not a silent "detection 0.0"); one
    longer than some deployments leaves those unjudged (a warning)."""
    for name, ds in datasets:
        d = deployment_table(ds)  # start and end only
        span = (d["end_s"] - d["start_s"]).to_numpy(float)
        if horizon_s is not None:
            span = np.minimum(span, float(horizon_s))
        short = int((span < interval_s).sum())
        if not short:
            continue
        msg = (f"{key}={interval_s:g} s is longer than {short} of the {len(span)} deployments of "
               f"{name} (longest {np.nanmax(span):.0f} s): Kayenta judges its first interval "
               f"{interval_s:g} s after a canary starts, so it never judges those")
        if short == len(span) and fatal:
            raise ConfigError(f"{msg}; set {key} to at most {np.nanmax(span):.0f} (e.g. "
                              f"{key}={max(60, int(np.nanmax(span) // 2))})")
        log.warning("%s", msg)


def _check_scored(evals: list[Evaluation], names: list[str], models: dict[str, str]) -> None:
    """A judge that produced no score on any tick of any deployment cannot judge this dataset
    (every tick a fail-safe pause): fail with its reason and the config key to fix."""
    keys = {"argo": "replay.argo.metrics (and replay.argo.limits_relative_to)",
            "kayenta": "replay.kayenta.metrics"}
    for n in names:
        fam = family(n, models)
        if fam not in keys or any(np.isfinite(e.result.histories[n].scores).any() for e in evals):
            continue
        why = next((str(r.evidence.get("failure") or r.reason) for e in evals
                    for r in e.result.records if r.policy == n and r.action == "pause"),
                   "no usable score")
        raise ConfigError(f"replay: policy {n!r} could not judge a single tick of "
                          f"{', '.join(e.name for e in evals)} ({why}); its metrics have no data "
                          f"in this dataset: set {keys[fam]} to metrics the dataset has, e.g. "
                          f"{keys[fam].split(' ')[0]}=[{', '.join(evals[0].dataset.metrics[:2])}]")


def _maker(pcfg: PolicyConfig, scorers: dict[str, Any], models: dict[str, str],
           versions: dict[str, str], names: list[str], settings: dict[str, dict[str, Any]]
           ) -> Callable[[CanonicalDataset], list[ReplayPolicy]]:
    def make(ds: CanonicalDataset) -> list[ReplayPolicy]:
        b = PolicyBuilder(ds.catalog, tuple(ds.metrics), float(ds.step_s), pcfg, scorers, models,
                          versions)
        return [b.build(n, settings[n]) for n in names]

    return make


def _finish(cfg: DictConfig, rc: dict[str, Any], datasets: list[tuple[str, CanonicalDataset]],
            evals: list[Evaluation], policies: list[ReplayPolicy],
            settings: dict[str, dict[str, Any]], tuned: dict[str, Tuned] | None,
            cal_info: dict[str, Any] | None, versions: dict[str, str]) -> None:
    """Metrics, summary.json, decisions, report and MLflow run from the evaluation replays (one
    run, or the shards of one run merged: the same code, so the same summary)."""
    # ---- labels are read from here on ----
    first = datasets[0][1]
    frr_targets = list(rc["sweep"]["frr_targets"])
    thresholds = np.linspace(0.0, 1.0, int(rc["sweep"]["thresholds"]))
    boot = rc["bootstrap"]
    per_policy: dict[str, Any] = {}
    sweeps: dict[str, pd.DataFrame] = {}
    truth = pd.concat([e.truth for e in evals], ignore_index=True)
    for rp in policies:
        m = pooled_metrics(evals, rp.name, n_boot=int(boot["samples"]), seed=int(boot["seed"]))
        outs = pd.concat([e.result.outcomes[e.result.outcomes["policy"] == rp.name] for e in evals])
        m["promoted"] = int((outs["final_action"] == "promote").sum())
        m["paused_ticks"] = int(outs["paused_ticks"].sum())
        m["settings"] = settings[rp.name]
        m["settings_chosen_on"] = "calibration" if tuned else "configuration"
        m["threshold"] = native_threshold(rp)
        m["model_version"] = versions.get(rp.name)
        if tuned:
            m["calibration"] = tuned[rp.name].calibration
            m["configurations_compared"] = tuned[rp.name].configurations
        m["per_fault_kind"] = per_group(evals, rp.name, "fault_kind")
        m["per_onset_style"] = per_group(evals, rp.name, "fault_onset_style")
        m["false_rollbacks"] = false_rollbacks(evals, rp.name)
        hist = _concat([e.result.histories[rp.name] for e in evals])
        pcfg_rp = rp.policy.rollback.config
        horizon = predict_horizon(rp.full_scorer)
        if horizon is not None and hist.predicted is not None:  # labels are read: it may look
            m["predictor_reliability"] = {
                "horizon_s": horizon,
                "training_held_back": rp.full_scorer.predictor.reliability,  # type: ignore[union-attr]
                "evaluation": predictor_reliability(hist, truth, horizon)}
        hist = policy_history(rp, hist)
        sw = sweep_table(hist, pcfg_rp, truth, breakpoints(hist, pcfg_rp, thresholds))
        sweeps[rp.name] = sw
        m["oracle_operating_points"] = {f"frr<={t:g}": operating_point(sw, t) for t in frr_targets}
        m["oracle_sweep"] = sw.replace({np.nan: None}).to_dict(orient="list")
        m["replay_wall_s"] = sum(e.result.per_policy_wall_s.get(rp.name, 0.0) for e in evals)
        per_policy[rp.name] = m
    wall = sum(e.result.wall_s for e in evals)
    simulated = sum(e.result.simulated_s for e in evals)
    boot_note = (f"95 % bootstrap over deployments ({int(boot['samples'])} resamples, "
                 "within corpus and label)")
    summary: dict[str, Any] = {
        "dataset": {"path": [str(d.path) for _, d in datasets] if len(datasets) > 1
                    else str(first.path),
                    "content_hash": first.content_hash if len(datasets) == 1
                    else [d.content_hash for _, d in datasets],
                    "deployments": len(truth),
                    "labels": truth["label"].value_counts().to_dict(),
                    "corpora": {e.name: {"path": str(e.dataset.path),
                                         "content_hash": e.dataset.content_hash,
                                         "deployments": len(e.truth),
                                         "labels": e.truth["label"].value_counts().to_dict()}
                                for e in evals}},
        "protocol": {
            "settings_chosen_on": cal_info,
            "evaluation": "each corpus replayed once with its labels hidden, then scored",
            "rolled_back_means": "first shrink or rollback",
            "false_rollback_means": "rollbacks of healthy canaries and of faulty canaries before "
                                    "their fault began, per canary that ran healthy for a while",
            "intervals": boot_note,
            "oracle": "oracle_* = the threshold sweep on the evaluation corpora themselves: an "
                      "upper bound no deployed policy can reach, never a headline",
        },
        "model": str(cfg.model), "model_version": model_version(str(cfg.model), versions),
        "policy_config": OmegaConf.to_container(cfg.policy),
        "replay": {"ticks": sum(e.result.ticks for e in evals), "wall_s": wall,
                   "simulated_s": simulated, "speed_x_realtime": simulated / max(wall, 1e-9)},
        "policies": per_policy,
    }
    unmeasured = [k for k in ("detection_rate", "false_rollback_rate", "lead_time_s_p50")
                  if all(m.get(k) is None for m in per_policy.values())]
    if unmeasured:
        labels = truth["label"].value_counts().to_dict()
        summary["protocol"]["not_measured"] = (
            f"{', '.join(unmeasured)} cannot be measured on these corpora (labels {labels}: "
            "no faulty canary, no canary that ran healthy, or none rolled back with an impact "
            "time); reported as null")
        log.warning("replay: %s", summary["protocol"]["not_measured"])
    out = Path(cfg.out)
    cal_path = cal_info["path"] if cal_info else None
    with _outputs(out, [*(d.path for _, d in datasets), cal_path]) as tmp:
        dec = pd.concat([e.result.outcomes.assign(corpus=e.name) for e in evals], ignore_index=True)
        dec.drop(columns=["decided_at_s"]).to_parquet(tmp / "decisions.parquet", index=False)
        pd.DataFrame([{**{k: v for k, v in r.__dict__.items() if k != "evidence"}, "corpus": e.name,
                       "reasons": list(r.reasons), "evidence": json.dumps(r.evidence, default=str)}
                      for e in evals for r in e.result.records]
                     ).to_parquet(tmp / "decision_log.parquet", index=False)
        atomic_write_json(tmp / "summary.json", summary)
        if rc["report"]["enabled"]:
            e0 = evals[0]
            _report(tmp, e0.dataset, replace(e0.result, deployments=e0.truth), policies, summary,
                    sweeps, int(rc["report"]["incidents"]), int(rc["report"]["top_metrics"]))
    if rc.get("mlflow", True):
        _log_mlflow(cfg, out, summary)
    for name, m in per_policy.items():
        ci = m["ci95"]
        print(f"{name:>18}: detection={_pm(m['detection_rate'], ci['detection_rate'])} "
              f"false_rollback={_pm(m['false_rollback_rate'], ci['false_rollback_rate'])} "
              f"caught_before_impact={_pm(m['caught_before_impact'], ci['caught_before_impact'])}"
              f" lead_p50={m['lead_time_s_p50']}")


# ---- sharded replay ------------------------------------------------------------------------
SHARD_FILE = "shard.json"
_NOT_COMPARED = ("out", "shard", "merge")  # keys that differ between the shards of one run


def _write_shard(cfg: DictConfig, shard: tuple[int, int],
                 datasets: list[tuple[str, CanonicalDataset]], evals: list[Evaluation],
                 settings: dict[str, dict[str, Any]], tuned: dict[str, Tuned] | None,
                 cal_info: dict[str, Any] | None) -> None:
    """One shard's blind replay results (no metrics: labels are read by the merge)."""
    conf = cast(dict, OmegaConf.to_container(cfg, resolve=True))
    meta = {"shard": list(shard), "config": {k: v for k, v in conf.items() if k not in _NOT_COMPARED},
            "corpora": [{"name": e.name, "path": str(e.dataset.path),
                         "content_hash": e.dataset.content_hash,
                         "deployments": e.result.deployments["deployment_id"].tolist()}
                        for e in evals],
            "settings": settings, "calibration": cal_info,
            "tuned": None if tuned is None else {n: {"settings": t.settings,
                                                     "calibration": t.calibration,
                                                     "configurations": t.configurations}
                                                 for n, t in tuned.items()}}
    out = Path(cfg.out)
    with atomic_outputs(out, marker=SHARD_FILE, owns=json_marker(SHARD_FILE, "shard"),
                        inputs=[d.path for _, d in datasets], kind="replay shard output") as tmp:
        with (tmp / "results.pkl").open("wb") as f:
            # the shard's own intermediate format, read back only by `replay merge=…`
            pickle.dump([e.result for e in evals], f, protocol=pickle.HIGHEST_PROTOCOL)
        atomic_write_json(tmp / SHARD_FILE, meta)


def _shard_dirs(spec: Any) -> list[Path]:
    items = [str(p) for p in spec] if isinstance(spec, list | tuple) else [str(spec)]
    dirs: list[Path] = []
    for item in items:
        p = Path(item)
        if (p / SHARD_FILE).is_file():
            dirs.append(p)
        elif p.is_dir():
            dirs += sorted(d for d in p.iterdir() if (d / SHARD_FILE).is_file())
    if not dirs:
        raise ConfigError(f"merge={spec}: no shard output ({SHARD_FILE}) found; give the folder "
                          "holding the shards' out=DIRs, or a list of them")
    return dirs


def _run_merge(cfg: DictConfig) -> int:
    """`canaryml replay merge=DIR out=DIR`: the summary, decisions and report of the run the
    shards split, computed by the same code as a single run's (so the same summary.json)."""
    t0 = time.perf_counter()
    spec = OmegaConf.to_container(cfg.merge) if OmegaConf.is_list(cfg.merge) else cfg.merge
    dirs = _shard_dirs(spec)
    metas = [json.loads((d / SHARD_FILE).read_text()) for d in dirs]
    count = int(metas[0]["shard"][1])
    seen = sorted(int(m["shard"][0]) for m in metas)
    if seen != list(range(count)) or any(int(m["shard"][1]) != count for m in metas):
        raise ConfigError(f"merge={spec}: shards {seen} of {count}; every shard 0..{count - 1} "
                          "must be present exactly once")
    for m, d in zip(metas, dirs, strict=True):
        for key in ("config", "settings", "calibration", "tuned"):
            if m[key] != metas[0][key]:
                raise ConfigError(f"merge: shard {d} differs from {dirs[0]} in its {key}; the "
                                  "shards of one run must share every override but shard/out")
    conf = dict(metas[0]["config"]) | {"out": str(cfg.out), "merge": None, "shard": None}
    run_cfg = OmegaConf.create(conf)
    rc = cast(dict, OmegaConf.to_container(run_cfg.replay, resolve=True))
    datasets = _datasets(OmegaConf.to_container(run_cfg.dataset)
                         if OmegaConf.is_list(run_cfg.dataset) else run_cfg.dataset)
    results: list[list[ReplayResult]] = []
    for d in dirs:
        with (d / "results.pkl").open("rb") as f:
            results.append(pickle.load(f))
    evals = []
    for k, (name, ds) in enumerate(datasets):
        c = metas[0]["corpora"][k]
        if c["content_hash"] != ds.content_hash:
            raise ConfigError(f"merge: corpus {c['path']} changed since the shards ran "
                              f"(content hash {ds.content_hash} ≠ {c['content_hash']})")
        order = deployment_table(ds)
        merged = merge_results([r[k] for r in results], blind(order))
        evals.append(Evaluation(name, ds, merged, order))
    pcfg = PolicyConfig.from_mapping(cast(dict, OmegaConf.to_container(run_cfg.policy,
                                                                       resolve=True)))
    models = {str(k): str(v) for k, v in (rc.get("models") or {}).items()}
    names = list(dict.fromkeys([*rc["policies"], *models]))
    first = datasets[0][1]
    scorers, versions = load_scorers(names, models, str(run_cfg.model), rc.get("lookback"), first)
    settings = metas[0]["settings"]
    tuned = None if metas[0]["tuned"] is None else {
        n: Tuned(n, t["settings"], t["calibration"], int(t["configurations"]))
        for n, t in metas[0]["tuned"].items()}
    make = _maker(pcfg, scorers, models, versions, names, settings)
    _finish(run_cfg, rc, datasets, evals, make(first), settings, tuned, metas[0]["calibration"],
            versions)
    log.info("replay merged %d shards into %s in %.1f s", count, cfg.out, time.perf_counter() - t0)
    return 0


def _outputs(out: Path, inputs: list[Any]) -> Any:
    """Replay's files go beside whatever else `out` holds (a README, notes): only its own
    outputs are replaced, summary.json last; a folder it did not write is refused."""
    return atomic_outputs(out, marker="summary.json", owns=json_marker("summary.json", "dataset"),
                          inputs=inputs, replaces=("incident_*.png",), kind="replay output")


def _pm(v: float | None, ci: list[float] | None) -> str:
    if v is None:
        return "n/a"
    return f"{v:.2f}" + ("" if ci is None else f" [{ci[0]:.2f}, {ci[1]:.2f}]")


def _report(out: Path, ds: CanonicalDataset, result: ReplayResult, policies: list[ReplayPolicy],
            summary: dict[str, Any], sweeps: dict[str, pd.DataFrame], n_incidents: int,
            top_k: int) -> None:
    curve = report.plot_curves(sweeps, summary["policies"], out / "curve.png")
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
        thresholds = {p.name: float(p.policy.rollback.config.rollback_threshold) for p in policies}
        pngs.append(report.plot_timeline(arrays, {str(k): v for k, v in d.items()}, scores, decisions,
                                         thresholds, top, out / f"incident_{_file_safe(dep_id)}.png"))
    reliability = report.plot_reliability(summary["policies"], out / "reliability.png")
    report.write_html(summary, curve, pngs, out / "report.html", reliability)


def _file_safe(name: str) -> str:
    """A deployment id as one file-name component (ids such as `day/pod/fault-01` hold `/`)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)


def _eval_tags(cfg: DictConfig, summary: dict[str, Any]) -> dict[str, str]:
    """Tags that let `canaryml promote` reuse this run's numbers (canaryml.registry)."""
    from canaryml.registry import replay_eval_tags

    if summary["protocol"]["settings_chosen_on"] or not isinstance(
            summary["dataset"]["content_hash"], str):
        return {}  # tuned settings or several corpora: not the configured operating point
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
                            dataset_hash=str(summary["dataset"]["content_hash"]),
                            uri=cfg.mlflow.tracking_uri,
                            tags={"command": "replay", **_eval_tags(cfg, summary)}):
        metrics: dict[str, float] = {"replay/speed_x_realtime": summary["replay"]["speed_x_realtime"]}
        for name, m in summary["policies"].items():
            for k in ("detection_rate", "false_rollback_rate", "caught_before_impact",
                      "lead_time_s_p10", "lead_time_s_p50", "lead_time_s_p90",
                      "time_to_detect_s_p50"):
                if m.get(k) is not None:
                    metrics[f"replay/{name}/{k}"] = float(m[k])
            for t, op in m["oracle_operating_points"].items():
                if op and op.get("caught_before_impact") is not None:
                    metrics[f"replay/{name}/oracle_caught_at_{t.replace('<=', 'le')}"] = float(
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
    scorer = load_scorer_uri(str(cfg.model))
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
    with _outputs(out, [ds.path]) as tmp:
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
