"""Promotion as a library: replay-based evaluation, gates, alias moves and their record (DESIGN §5).

`promote()` compares the version behind alias `challenger` with the one behind `champion` by
replaying both on the same evaluation dataset, through the same Controller/RollbackPolicy code
and at the configured operating point (`policy.rollback_threshold`, hysteresis, …). A logged
evaluation of the same model version on the same dataset hash with the same policy/replay
settings is reused instead of replaying again (runs tagged `eval_key`, see `eval_key`).

Gates (conf/registry/default.yaml):
  * absolute, on the challenger: `detection_rate_min`, `false_rollback_rate_max`;
  * relative to the champion (skipped when there is none yet): `caught_before_impact_min_delta`,
    `detection_rate_min_delta`, `false_rollback_rate_max_delta`.
Before any of them, the evaluation dataset must not be the challenger's training corpus (its
content hash equal to the `dataset_hash` tag of the challenger's training run): that replay
would measure fit, so it is refused unless `registry.allow_training_dataset=true`.
A refused promotion raises `PromotionGateError` naming every failed gate with both numbers; the
champion does not move. Every outcome (promoted, refused, rolled back) is an MLflow run named
`promote`; a promoted or rolled-back-to version carries tags `promoted_at`, `promoted_from`,
`promote_run_id`, `promote_reason` and one `gate.<name>` tag per gate.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime
from typing import Any

from canaryml.control.policy import PolicyConfig
from canaryml.data.dataset import CanonicalDataset
from canaryml.errors import ConfigError, ModelLoadError, PromotionGateError, reject_unknown_keys

log = logging.getLogger(__name__)

# replay summary keys a gate may read (also what an evaluation run logs as replay/<policy>/<key>)
EVAL_METRICS = ("detection_rate", "false_rollback_rate", "caught_before_impact",
                "lead_time_s_p50", "time_to_detect_s_p50")
EVAL_VERSION = 1  # bump when the evaluation itself changes (invalidates cached evaluations)


@dataclass(frozen=True)
class Gates:
    """Promotion gates; None disables a gate. Rates are shares in [0, 1]."""

    caught_before_impact_min_delta: float | None = 0.0
    false_rollback_rate_max: float | None = 0.05
    detection_rate_min: float | None = 0.5
    detection_rate_min_delta: float | None = None
    false_rollback_rate_max_delta: float | None = None

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if v is not None and (not isinstance(v, int | float) or not math.isfinite(v)):
                raise ConfigError(f"registry.gates.{f.name}={v!r} must be a finite number or "
                                  "null (disabled)")

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> Gates:
        reject_unknown_keys(data, (f.name for f in fields(cls)), "registry.gates")
        return cls(**{k: (None if v is None else float(v)) for k, v in data.items()})


@dataclass(frozen=True)
class Evaluation:
    """Replay numbers of one model version on one dataset at one operating point."""

    model: str  # registered model name
    version: str
    dataset_hash: str
    metrics: dict[str, float | None]
    threshold: float
    key: str
    run_id: str | None = None  # the MLflow run that logged it
    reused: bool = False

    def get(self, name: str) -> float | None:
        v = self.metrics.get(name)
        return None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)


@dataclass(frozen=True)
class GateResult:
    gate: str
    metric: str
    passed: bool
    challenger: float | None
    limit: float
    champion: float | None = None  # relative gates only
    message: str = ""


@dataclass(frozen=True)
class PromotionResult:
    outcome: str  # promoted | refused | rollback | unchanged
    name: str
    to_version: str
    from_version: str | None
    gates: tuple[GateResult, ...] = ()
    challenger: Evaluation | None = None
    champion: Evaluation | None = None
    run_id: str | None = None

    def summary(self) -> str:
        src = f"v{self.from_version}" if self.from_version else "none"
        return f"{self.name} @champion: {src} -> v{self.to_version} ({self.outcome})"


@dataclass(frozen=True)
class PromoteSettings:
    """Aliases, the evaluating policy variant and the gates (conf/registry/default.yaml)."""

    gates: Gates = field(default_factory=Gates)
    challenger_alias: str = "challenger"
    champion_alias: str = "champion"
    policy: str = "scorer"
    reuse_logged: bool = True
    # evaluating a challenger on the corpus it was trained on measures fit, not generalisation
    allow_training_dataset: bool = False

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> PromoteSettings:
        d = dict(data)
        d.pop("register_alias", None)
        d.pop("shadow", None)  # registry.shadow: read by `canaryml promote` (tasks/promote.py)
        gates = Gates.from_mapping(dict(d.pop("gates", None) or {}))
        reject_unknown_keys(d, {f.name for f in fields(cls)} | {"register_alias"}, "registry config")
        from canaryml.replay.protocol import SCORER_VARIANTS

        if d.get("policy", "scorer") not in SCORER_VARIANTS:
            raise ConfigError(f"registry.policy={d['policy']!r} is unknown; use one of "
                              f"{sorted(SCORER_VARIANTS)}")
        for flag in ("reuse_logged", "allow_training_dataset"):
            if flag in d and not isinstance(d[flag], bool):
                raise ConfigError(f"registry.{flag}={d[flag]!r} must be true or false")
        return cls(gates=gates, **d)


# ---- gates (pure) ----------------------------------------------------------------------------
def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.4f}"


def check_gates(gates: Gates, challenger: Evaluation, champion: Evaluation | None
                ) -> list[GateResult]:
    """Every enabled gate, passed or not. A metric the dataset cannot give (no faulty or no
    healthy deployments) fails its gate: promotion needs evidence."""
    out: list[GateResult] = []
    cv = f"challenger v{challenger.version}"

    def absolute(gate: str, metric: str, limit: float | None, at_least: bool) -> None:
        if limit is None:
            return
        x = challenger.get(metric)
        ok = x is not None and (x >= limit - 1e-12 if at_least else x <= limit + 1e-12)
        op = ">=" if at_least else "<="
        msg = (f"gate {gate}: {cv} {metric}={_fmt(x)}, required {op} {limit:.4f}"
               + ("" if x is not None else
                  " (the evaluation dataset gives no value: it needs faulty and healthy canaries)"))
        out.append(GateResult(gate, metric, ok, x, limit, None, msg))

    def relative(gate: str, metric: str, limit: float | None, at_least: bool) -> None:
        if limit is None or champion is None:
            return
        x, y = challenger.get(metric), champion.get(metric)
        delta = None if x is None or y is None else x - y
        ok = delta is not None and (delta >= limit - 1e-12 if at_least else delta <= limit + 1e-12)
        op = ">=" if at_least else "<="
        msg = (f"gate {gate}: {cv} {metric}={_fmt(x)} vs champion v{champion.version} "
               f"{_fmt(y)} (delta {_fmt(delta)}, required {op} {limit:+.4f})")
        out.append(GateResult(gate, metric, ok, x, limit, y, msg))

    g = gates
    absolute("detection_rate_min", "detection_rate", g.detection_rate_min, True)
    absolute("false_rollback_rate_max", "false_rollback_rate", g.false_rollback_rate_max, False)
    relative("caught_before_impact_min_delta", "caught_before_impact",
             g.caught_before_impact_min_delta, True)
    relative("detection_rate_min_delta", "detection_rate", g.detection_rate_min_delta, True)
    relative("false_rollback_rate_max_delta", "false_rollback_rate",
             g.false_rollback_rate_max_delta, False)
    return out


# ---- evaluation ------------------------------------------------------------------------------
def eval_key(name: str, version: str, dataset_hash: str, policy: PolicyConfig,
             replay_cfg: Mapping[str, Any], variant: str = "scorer") -> str:
    """Identity of an evaluation: same key ⇒ same numbers (deterministic replay)."""
    payload = {
        "v": EVAL_VERSION, "model": name, "version": str(version), "dataset": dataset_hash,
        "variant": variant,
        "policy": {k: str(v) for k, v in asdict(policy).items()},
        "lookback": replay_cfg.get("lookback"), "horizon_s": replay_cfg.get("horizon_s"),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:24]


def find_logged(key: str, experiment: str, variant: str = "scorer") -> Evaluation | None:
    """A finished run tagged `eval_key=key` with the replay metrics of `variant`, or None."""
    import mlflow

    exp = mlflow.get_experiment_by_name(experiment)
    if exp is None:
        return None
    runs = mlflow.search_runs(experiment_ids=[exp.experiment_id],
                              filter_string=f"tags.eval_key = '{key}' and "
                                            "attributes.status = 'FINISHED'",
                              order_by=["attributes.start_time DESC"], max_results=5,
                              output_format="list")
    for run in runs:
        tags, m = run.data.tags, run.data.metrics
        if f"replay/{variant}/false_rollback_rate" not in m and \
                f"replay/{variant}/detection_rate" not in m:
            continue
        metrics = {k: m.get(f"replay/{variant}/{k}") for k in EVAL_METRICS}
        return Evaluation(model=tags.get("eval_model", ""), version=tags.get("eval_version", ""),
                          dataset_hash=tags.get("dataset_hash", ""), metrics=metrics,
                          threshold=float(tags.get("eval_threshold", "nan")), key=key,
                          run_id=run.info.run_id, reused=True)
    return None


def eval_tags(name: str, version: str, key: str, threshold: float) -> dict[str, str]:
    """Tags that make a run's `replay/<variant>/…` metrics reusable by `promote`."""
    return {"eval_key": key, "eval_model": name, "eval_version": str(version),
            "eval_threshold": f"{threshold:g}"}


def evaluate(name: str, version: str, ds: CanonicalDataset, policy: PolicyConfig,
             replay_cfg: Mapping[str, Any], *, variant: str = "scorer", reuse: bool = True,
             experiment: str = "canaryml", config: Mapping[str, Any] | None = None) -> Evaluation:
    """Replay `models:/name/version` on `ds` at the `policy` operating point (or reuse a logged
    evaluation with the same key) and log the result as an MLflow run tagged with the key."""
    import mlflow
    import numpy as np

    from canaryml import tracking
    from canaryml.replay.protocol import build_policies, summarize
    from canaryml.replay.runner import replay

    key = eval_key(name, version, ds.content_hash, policy, replay_cfg, variant)
    if reuse:
        hit = find_logged(key, experiment, variant)
        if hit is not None:
            log.info("reusing logged evaluation of %s v%s on dataset %s (run %s)", name, version,
                     ds.content_hash[:12], hit.run_id)
            return Evaluation(name, str(version), ds.content_hash, hit.metrics,
                              policy.rollback_threshold, key, hit.run_id, reused=True)
    uri = f"models:/{name}/{version}"
    t0 = time.perf_counter()
    policies = build_policies([variant], {}, uri, policy, dict(replay_cfg), ds)
    result = replay(ds, policies, interval_s=policy.monitoring_interval_s,
                    horizon_s=replay_cfg.get("horizon_s"))
    per_policy, _ = summarize(result, policies, np.linspace(0.0, 1.0, 11), [0.01, 0.05])
    m = per_policy[variant]
    metrics: dict[str, float | None] = {k: (None if m.get(k) is None else float(m[k]))
                                        for k in EVAL_METRICS}
    wall = time.perf_counter() - t0
    log.info("evaluated %s v%s on %d deployments in %.1f s: %s", name, version,
             len(result.deployments), wall,
             " ".join(f"{k}={_fmt(v)}" for k, v in metrics.items() if "rate" in k or "caught" in k))
    with tracking.start_run(dict(config or {}), experiment=experiment,
                            run_name=f"replay-eval-v{version}", dataset_hash=ds.content_hash,
                            tags={"command": "promote-eval",
                                  **eval_tags(name, str(version), key,
                                              policy.rollback_threshold)}) as run:
        mlflow.log_metrics({f"replay/{variant}/{k}": v for k, v in metrics.items()
                            if v is not None} | {"replay/wall_s": wall})
        run_id = run.info.run_id
    return Evaluation(name, str(version), ds.content_hash, metrics, policy.rollback_threshold,
                      key, run_id)


# ---- alias moves and their record ------------------------------------------------------------
def _version(client: Any, name: str, version: str | int) -> Any:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version(name, str(version))
    except MlflowException as exc:
        raise ConfigError(f"{name} has no version {version!r} in the registry "
                          f"({exc.message}); it has {_versions_text(client, name)}. See them in "
                          "the MLflow UI (Models) or register one with "
                          "`canaryml register scorer=DIR`") from exc


def _versions_text(client: Any, name: str) -> str:
    """'versions 1, 2 (@champion), 3 (@challenger)' or 'no versions'."""
    from mlflow.exceptions import MlflowException

    try:
        versions = client.search_model_versions(f"name = '{name}'")
    except MlflowException:
        return "no versions"
    if not versions:
        return "no versions"
    parts = []
    for mv in sorted(versions, key=lambda v: int(v.version)):
        aliases = " ".join(f"@{a}" for a in (getattr(mv, "aliases", None) or []))
        parts.append(f"{mv.version}" + (f" ({aliases})" if aliases else ""))
    return "versions " + ", ".join(parts)


def _alias(client: Any, name: str, alias: str) -> Any:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def _record(name: str, outcome: str, to_version: str, from_version: str | None,
            gates: list[GateResult], challenger: Evaluation | None, champion: Evaluation | None,
            *, experiment: str, config: Mapping[str, Any], dataset_hash: str | None,
            threshold: float | None, reason: str) -> str:
    """The `promote` MLflow run; returns its id."""
    import mlflow

    from canaryml import tracking

    tags = {"command": "promote", "outcome": outcome, "registered_model": name,
            "to_version": str(to_version), "from_version": str(from_version or "none"),
            "reason": reason[:5000]}
    if threshold is not None:
        tags["operating_point.rollback_threshold"] = f"{threshold:g}"
    with tracking.start_run(dict(config), experiment=experiment, run_name="promote",
                            dataset_hash=dataset_hash, tags=tags) as run:
        metrics: dict[str, float] = {}
        for role, ev in (("challenger", challenger), ("champion", champion)):
            if ev is None:
                continue
            metrics |= {f"promote/{role}/{k}": v for k, v in ev.metrics.items() if v is not None}
        metrics |= {f"promote/gate/{g.gate}": float(g.passed) for g in gates}
        if metrics:
            mlflow.log_metrics(metrics)
        mlflow.log_dict({"outcome": outcome, "to_version": str(to_version),
                         "from_version": from_version, "reason": reason,
                         "gates": [asdict(g) for g in gates],
                         "challenger": None if challenger is None else asdict(challenger),
                         "champion": None if champion is None else asdict(champion)},
                        "promotion.json")
        return str(run.info.run_id)


def _tag_version(client: Any, name: str, version: str, from_version: str | None, run_id: str,
                 reason: str, gates: list[GateResult], dataset_hash: str | None) -> None:
    tags = {"promoted_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "promoted_from": str(from_version or "none"), "promote_run_id": run_id,
            "promote_reason": reason[:5000]}
    if dataset_hash:
        tags["promote_dataset_hash"] = dataset_hash
    for g in gates:
        tags[f"gate.{g.gate}"] = (f"{'pass' if g.passed else 'fail'} challenger={_fmt(g.challenger)}"
                                  + ("" if g.champion is None else f" champion={_fmt(g.champion)}")
                                  + f" limit={g.limit:g}")
    for k, v in tags.items():
        client.set_model_version_tag(name, version, k, v)


def training_dataset_hash(client: Any, version: Any) -> str | None:
    """The content hash of the dataset a registered version was trained on: the `dataset_hash`
    tag of the run that logged it (`canaryml train`, or `canaryml register` when the scorer
    bundle knows it); None when unknown."""
    from mlflow.exceptions import MlflowException

    if not getattr(version, "run_id", None):
        return None
    try:
        return client.get_run(version.run_id).data.tags.get("dataset_hash") or None
    except MlflowException:
        return None


def promote(name: str, ds: CanonicalDataset, policy: PolicyConfig,
            replay_cfg: Mapping[str, Any], settings: PromoteSettings, *,
            experiment: str = "canaryml", config: Mapping[str, Any] | None = None
            ) -> PromotionResult:
    """Challenger → champion when the gates pass; raises PromotionGateError otherwise."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    conf = dict(config or {})
    ch = _alias(client, name, settings.challenger_alias)
    if ch is None:
        raise ConfigError(f"{name} has no @{settings.challenger_alias} version to promote; "
                          "create one with `canaryml train dataset=DIR` or "
                          "`canaryml register scorer=DIR`")
    champ = _alias(client, name, settings.champion_alias)
    ch_v, champ_v = str(ch.version), None if champ is None else str(champ.version)
    if champ_v == ch_v:
        log.info("%s v%s is already @%s; nothing to do", name, ch_v, settings.champion_alias)
        return PromotionResult("unchanged", name, ch_v, champ_v)
    rec = {"experiment": experiment, "config": conf, "dataset_hash": ds.content_hash,
           "threshold": policy.rollback_threshold}
    on_training_data = training_dataset_hash(client, ch) == ds.content_hash
    if on_training_data and not settings.allow_training_dataset:
        reason = (f"dataset {ds.path} (hash {ds.content_hash[:12]}) is the corpus challenger "
                  f"v{ch_v} was trained on: its replay would measure fit, not how it does on "
                  "deployments it has not seen")
        run_id = _record(name, "refused", ch_v, champ_v, [], None, None, reason=reason,
                         **rec)  # type: ignore[arg-type]
        raise PromotionGateError(
            f"{name} v{ch_v} not promoted: {reason}. Evaluate on a held-out corpus (e.g. "
            "`canaryml simulate seed=1 out=DIR` + `canaryml ingest`, then `canaryml promote "
            "dataset=…`), or override with registry.allow_training_dataset=true. Champion stays "
            f"{'v' + champ_v if champ_v else 'unset'}; recorded as MLflow run {run_id}.")
    if on_training_data:
        log.warning("promoting %s v%s on its own training dataset %s "
                    "(registry.allow_training_dataset=true): the gates measure fit", name, ch_v,
                    ds.content_hash[:12])
    if champ is not None and training_dataset_hash(client, champ) == ds.content_hash:
        log.warning("dataset %s is champion v%s's training corpus: the relative gates favour "
                    "the champion", ds.content_hash[:12], champ_v)
    kw = {"variant": settings.policy, "reuse": settings.reuse_logged, "experiment": experiment,
          "config": conf}
    try:
        ev_ch = evaluate(name, ch_v, ds, policy, replay_cfg, **kw)  # type: ignore[arg-type]
    except ModelLoadError as exc:
        raise PromotionGateError(f"challenger {name} v{ch_v} cannot be loaded, so it cannot be "
                                 f"promoted: {exc}") from exc
    ev_champ = None
    if champ_v is not None:
        try:
            ev_champ = evaluate(name, champ_v, ds, policy, replay_cfg, **kw)  # type: ignore[arg-type]
        except ModelLoadError as exc:  # a broken champion should not block a working challenger
            log.warning("champion %s v%s cannot be loaded (%s); applying the absolute gates only",
                        name, champ_v, exc)
    results = check_gates(settings.gates, ev_ch, ev_champ)
    failed = [g for g in results if not g.passed]
    basis = (f"evaluated on dataset {ds.path} (hash {ds.content_hash[:12]}"
             + (", the challenger's training corpus, allowed by registry.allow_training_dataset"
                if on_training_data else "")
             + f") at rollback_threshold={policy.rollback_threshold:g}")
    if failed:
        reason = "; ".join(g.message for g in failed)
        run_id = _record(name, "refused", ch_v, champ_v, results, ev_ch, ev_champ,
                         reason=reason, **rec)  # type: ignore[arg-type]
        raise PromotionGateError(
            f"{name} v{ch_v} not promoted ({len(failed)} of {len(results)} gate(s) failed, "
            f"{basis}; champion stays {'v' + champ_v if champ_v else 'unset'}):\n  - "
            + "\n  - ".join(g.message for g in failed)
            + f"\nRecorded as MLflow run {run_id}. Retrain/tune the challenger, or adjust "
              "registry.gates.* if the gate is wrong.")
    reason = (f"gates passed ({', '.join(g.gate for g in results) or 'none enabled'}); {basis}"
              + ("" if ev_champ is not None or champ_v is None else
                 "; champion could not be evaluated"))
    run_id = _record(name, "promoted", ch_v, champ_v, results, ev_ch, ev_champ, reason=reason,
                     **rec)  # type: ignore[arg-type]
    client.set_registered_model_alias(name, settings.champion_alias, ch_v)
    _tag_version(client, name, ch_v, champ_v, run_id, reason, results, ds.content_hash)
    log.info("promoted %s v%s to @%s (was %s)", name, ch_v, settings.champion_alias,
             f"v{champ_v}" if champ_v else "unset")
    return PromotionResult("promoted", name, ch_v, champ_v, tuple(results), ev_ch, ev_champ,
                           run_id)


def rollback_to(name: str, version: str | int, *, champion_alias: str = "champion",
                experiment: str = "canaryml", config: Mapping[str, Any] | None = None,
                reason: str | None = None) -> PromotionResult:
    """Model rollback: move `champion` to an existing `version` (no gates), recorded the same way."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    mv = _version(client, name, version)
    to_v = str(mv.version)
    champ = _alias(client, name, champion_alias)
    from_v = None if champ is None else str(champ.version)
    if from_v == to_v:
        log.info("%s v%s is already @%s", name, to_v, champion_alias)
        return PromotionResult("unchanged", name, to_v, from_v)
    why = reason or (f"model rollback: @{champion_alias} moved back from "
                     f"{'v' + from_v if from_v else 'unset'} to v{to_v} by `canaryml promote "
                     f"--to-version {to_v}`")
    run_id = _record(name, "rollback", to_v, from_v, [], None, None, experiment=experiment,
                     config=dict(config or {}), dataset_hash=None, threshold=None, reason=why)
    client.set_registered_model_alias(name, champion_alias, to_v)
    _tag_version(client, name, to_v, from_v, run_id, why, [], None)
    log.info("rolled back %s @%s to v%s (was %s)", name, champion_alias, to_v, from_v)
    return PromotionResult("rollback", name, to_v, from_v, run_id=run_id)


def replay_eval_tags(model_uri: str, dataset_hash: str, policy: PolicyConfig,
                     replay_cfg: Mapping[str, Any], variant: str = "scorer") -> dict[str, str]:
    """Tags for a `canaryml replay` run of a registry model (`models:/name@alias` or
    `models:/name/N`) so that `promote` can reuse its `replay/<variant>/…` numbers; {} for other
    URIs or when the version cannot be resolved (the replay itself never fails over this)."""
    import re

    m = re.match(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/@]+)|/(?P<version>\d+))$",
                 str(model_uri))
    if m is None or variant not in (replay_cfg.get("policies") or [variant]):
        return {}
    name, version = m["name"], m["version"]
    if version is None:
        from canaryml.tracking import get_alias_version

        mv = get_alias_version(name, m["alias"])
        if mv is None:
            return {}
        version = str(mv.version)
    key = eval_key(name, version, dataset_hash, policy, replay_cfg, variant)
    return eval_tags(name, version, key, policy.rollback_threshold)
