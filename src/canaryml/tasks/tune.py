"""`canaryml tune dataset=DIR n_trials=N [tune.…=…] [any train override]` — an Optuna study.

Every trial composes the Hydra config of `canaryml train` from this command's overrides plus the
trial's sampled overrides (`conf/tune/<space>.yaml` → `tune.space`), trains a CanaryScorer on the
non-hold-out deployments (reporting `val/loss` per epoch to the pruner), replays the hold-out
through the controller and returns the objective (`canaryml.tune.objective`). One MLflow parent
run per study, one nested run per trial; the best trial's scorer is registered as
`canary-scorer@challenger`; `best.json` and the optimisation-history / parameter-importance plots
go to `tune.out_dir` and the parent run.

`canaryml tune -m forecaster.hidden=16,32 trainer.max_epochs=1,2` runs the Hydra-style grid
(BasicSweeper syntax: `a,b`, `range(…)`, `choice(…)`) as a study with Optuna's GridSampler.

Scale-out: start the same command N times (`tune.storage=postgresql://… tune.study=NAME`, or the
default journal file on one machine) with distinct `tune.worker=K`; they share one trial budget.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import shutil
import socket
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import optuna
from omegaconf import DictConfig, OmegaConf

from canaryml.errors import CanarymlError, ConfigError

log = logging.getLogger(__name__)

# the CLI passes its overrides so every trial re-composes exactly what the user asked for
ACCEPTS_OVERRIDES = True
_TUNE_ONLY = ("tune.", "tune=", "n_trials=", "study=", "storage=")
_NOISY = ("pytorch_lightning", "lightning.pytorch", "lightning_fabric", "lightning")


def _as_dict(node: Any) -> dict[str, Any]:
    return cast(dict[str, Any], OmegaConf.to_container(node, resolve=True))


@dataclass(frozen=True)
class TrialSetup:
    """Everything a trial needs, decided once before the first trial starts."""

    base: tuple[str, ...]  # overrides every trial composes with
    params: tuple[Any, ...]  # canaryml.tune.space.Param
    objective: str
    max_frr: float
    thresholds: int
    horizon_s: float | None
    prune: bool
    maximize: bool
    experiment_id: str
    parent_run_id: str
    scorers_dir: Path
    n_trials: int
    worker: int = 0


def _train_spec(cfg: DictConfig) -> Any:
    from canaryml.models.train import spec_from_mapping

    return spec_from_mapping(_as_dict(cfg.forecaster), _as_dict(cfg.detector),
                             _as_dict(cfg.scorer), _as_dict(cfg.trainer), seed=int(cfg.seed))


def _policy_config(cfg: DictConfig) -> Any:
    from canaryml.control.policy import PolicyConfig

    return PolicyConfig.from_mapping(_as_dict(cfg.policy))


def trial_config(base: Sequence[str], overrides: Sequence[str]) -> DictConfig:
    from canaryml.cli import compose

    return cast(DictConfig, compose("train", [*base, *overrides]))


class OverBudget(CanarymlError):
    """A worker's trial would exceed the study's shared trial budget."""


_COUNTED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED,
            optuna.trial.TrialState.RUNNING, optuna.trial.TrialState.WAITING)


def over_budget(trial: optuna.Trial, n_trials: int) -> bool:
    """True when at least `n_trials` trials numbered before this one are finished, running or
    queued. The safety net behind `BudgetedStudy.ask` for storages without an ask lock: trial
    numbers are assigned atomically by the storage, so of several workers racing for the last
    slot exactly one stays within the budget."""
    earlier = [t for t in trial.study.get_trials(deepcopy=False, states=_COUNTED)
               if t.number < trial.number]
    return len(earlier) >= n_trials


class TrialRunner:
    """The Optuna objective: compose → train (pruned on val/loss) → replay the hold-out."""

    def __init__(self, setup: TrialSetup, dataset: Any, holdout: Any):
        self.setup = setup
        self.dataset = dataset
        self.holdout = holdout

    def __call__(self, trial: optuna.Trial) -> float | tuple[float, float]:
        import mlflow

        from canaryml.tune.space import suggest

        s = self.setup
        if over_budget(trial, s.n_trials):
            # another worker took the last slot between our budget check and this ask:
            # give the slot back (FAIL does not count) and stop this worker
            trial.set_user_attr("over_budget", True)
            trial.study.stop()
            raise OverBudget(f"trial {trial.number} is beyond the study budget of "
                             f"{s.n_trials} trials; not run")
        overrides = suggest(trial, list(s.params))
        run = mlflow.start_run(experiment_id=s.experiment_id, run_name=f"trial-{trial.number}",
                               parent_run_id=s.parent_run_id, nested=True,
                               tags={"canaryml.kind": "trial", "command": "tune",
                                     "optuna.study": trial.study.study_name,
                                     "optuna.trial": str(trial.number),
                                     "dataset_hash": self.dataset.content_hash})
        trial.set_user_attr("mlflow_run_id", run.info.run_id)
        trial.set_user_attr("worker", f"{s.worker}@{socket.gethostname()}:{os.getpid()}")
        state, status = "FAIL", "FAILED"
        try:
            value = self._run(trial, overrides)
            state, status = "COMPLETE", "FINISHED"
            return value
        except optuna.TrialPruned:
            state, status = "PRUNED", "FINISHED"
            raise
        except CanarymlError as exc:  # a bad sampled combination: this trial fails, others go on
            log.warning("trial %d failed: %s", trial.number, exc)
            mlflow.set_tag("error", str(exc)[:4000])
            raise
        finally:
            mlflow.set_tag("optuna.state", state)
            mlflow.end_run(status)

    def _run(self, trial: optuna.Trial, overrides: list[str]) -> float | tuple[float, float]:
        import mlflow
        import yaml

        from canaryml import tracking
        from canaryml.models.train import train_scorer
        from canaryml.tasks.train import summary_metrics
        from canaryml.tune.objective import PruningCallback, replay_score

        s = self.setup
        cfg = trial_config(s.base, overrides)
        spec, pcfg = _train_spec(cfg), _policy_config(cfg)
        mlflow.log_params({"trial": trial.number, **{k: str(v) for k, v in trial.params.items()}})
        mlflow.log_text(yaml.safe_dump(_as_dict(cfg), sort_keys=False), "config.yaml")
        mlflow.log_text("\n".join([*s.base, *overrides]) + "\n", "overrides.txt")
        callbacks = [PruningCallback(trial, maximize=s.maximize)] if s.prune else []
        # the trial's curves reach its nested run live (Lightning's MLFlowLogger), so a trial
        # still running, or pruned, shows how far it got
        result = train_scorer(self.dataset, spec, deployments=self.holdout.train,
                              callbacks=callbacks, logger=tracking.lightning_logger())
        mlflow.log_metrics({k: v for k, v in summary_metrics(result).items()
                            if math.isfinite(v)})
        best_loss = float(result.metrics.get("val/best_loss", float("nan")))
        attrs: dict[str, Any] = {"val/best_loss": best_loss}
        value: float | tuple[float, float]
        if s.objective == "val_loss":
            if not math.isfinite(best_loss):
                raise ConfigError("tune.objective=val_loss but the forecaster reported no val/loss "
                                  "(too few validation deployments); use tune.objective=replay")
            value = best_loss
        else:
            score = replay_score(result.scorer, self.dataset, self.holdout.holdout, pcfg,
                                 max_frr=s.max_frr, thresholds=s.thresholds,
                                 horizon_s=s.horizon_s, model_version=f"trial-{trial.number}")
            mlflow.log_metrics(score.metrics())
            attrs |= score.metrics()
            if score.threshold_at_frr is not None:  # the trial's own operating point, fitted
                result.scorer.operating_point = {  # on the hold-out like train's on validation
                    "rollback_threshold": float(score.threshold_at_frr),
                    "consecutive_breaches": pcfg.consecutive_breaches,
                    "target_frr": float(s.max_frr), "chosen_on": "tune hold-out"}
            value = (score.caught_at_frr if s.objective == "replay"
                     else (score.caught, score.false_rollback))
        if "test/roc_auc" in result.metrics:
            attrs["test/roc_auc"] = result.metrics["test/roc_auc"]
        scorer_dir = result.scorer.save(s.scorers_dir / f"trial-{trial.number:04d}")
        attrs["scorer_dir"] = str(scorer_dir)
        for k, v in attrs.items():
            trial.set_user_attr(k, v)
        mlflow.log_metric("objective" if isinstance(value, float) else "objective_0",
                          value if isinstance(value, float) else value[0])
        return value


def parse_grid(overrides: Sequence[str]) -> tuple[list[str], dict[str, list[str]]]:
    """Split Hydra BasicSweeper-style overrides into fixed ones and the sweep grid."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import ValueType
    from hydra.errors import HydraException

    parser = OverridesParser.create()
    try:
        parsed = parser.parse_overrides(list(overrides))
    except HydraException as exc:
        raise ConfigError(f"bad sweep override for `canaryml tune -m`: {exc}") from exc
    base: list[str] = []
    grid: dict[str, list[str]] = {}
    for o in parsed:
        if not o.is_sweep_override():
            base.append(o.input_line or "")
            continue
        key = o.get_key_element()
        if o.value_type == ValueType.INTERVAL_SWEEP:
            raise ConfigError(f"{o.input_line}: interval(...) is continuous and has no grid; "
                              f"list values (a,b,c) or put {key} in a tune.space")
        try:
            values = list(o.sweep_string_iterator())
        except HydraException as exc:
            raise ConfigError(f"{o.input_line}: cannot expand this sweep ({exc})") from exc
        if not values:
            raise ConfigError(f"{o.input_line}: the sweep has no values")
        grid[key] = values
    if not grid:
        raise ConfigError("`canaryml tune -m` needs at least one sweep, e.g. "
                          "forecaster.hidden=16,32 (comma-separated values)")
    return base, grid


def run_multirun(overrides: Sequence[str]) -> int:
    """`canaryml tune -m a=1,2 b=x,y`: every grid point is one trial of a GridSampler study."""
    from canaryml.cli import compose

    base, grid = parse_grid(overrides)
    cfg = compose("tune", base)
    return _tune(cfg, base, grid)


def run(cfg: DictConfig, overrides: Sequence[str] | None = None) -> int:
    """Run (or join, or resume) the study described by `cfg.tune`.

    `overrides` are the ones `cfg` was composed with; each trial re-composes them with its own.
    Called without them (from Python), trials compose from conf/ defaults plus the trial's
    parameters and `cfg.dataset`/`cfg.seed`."""
    if overrides is None:
        overrides = [f"dataset={cfg.dataset}", f"seed={cfg.seed}"]
    return _tune(cfg, list(overrides), None)


def _tune(cfg: DictConfig, overrides: list[str], grid: dict[str, list[str]] | None) -> int:
    import mlflow
    import optuna.distributions as od

    from canaryml import tracking
    from canaryml.paths import conf_dir, repo_root
    from canaryml.tasks.train import _dataset
    from canaryml.tune import objective as obj
    from canaryml.tune import study as st
    from canaryml.tune.space import Param, config_groups, defaults, parse_space, validate_keys

    t = cfg.tune
    objective = str(t.objective)
    dirs = obj.directions(objective)
    max_frr = float(t.max_frr)
    base = ["trainer.progress_bar=false", *overrides]

    # ---- validate everything before any trial starts -------------------------------------
    groups = config_groups(conf_dir())
    train_cfg = trial_config(base, [])
    if grid is None:
        space = t.get("space")
        params = parse_space(_as_dict(space) if space is not None else {})
    else:
        params = [Param(k, od.CategoricalDistribution(v)) for k, v in grid.items()]
    validate_keys(params, train_cfg, groups)
    probes = _probe_points(params, grid)
    for point in probes:  # each probe must compose and build a train spec + policy
        try:
            c = trial_config(base, point)
            _train_spec(c), _policy_config(c)
        except CanarymlError as exc:
            raise ConfigError(f"trial overrides {point} do not build a valid config: {exc}") from exc
    n_trials = int(math.prod(len(v) for v in grid.values())) if grid else int(cfg.n_trials)
    mode = _register_mode(t.register)
    dataset = _dataset(str(cfg.dataset))
    holdout = obj.holdout_split(dataset, float(t.holdout_fraction), int(t.holdout_seed))
    name = t.get("study") or cfg.get("study") or _default_name(cfg, objective, grid)
    storage = t.get("storage") or cfg.get("storage")
    out_dir = Path(str(t.out_dir)) if t.get("out_dir") else repo_root() / "experiments" / "runs" / "tune" / str(name)
    spec = st.StudySpec(name=str(name), storage=None if storage is None else str(storage),
                        out_dir=out_dir, n_trials=n_trials, directions=dirs,
                        sampler=str(t.sampler), pruner=str(t.pruner), seed=int(t.seed),
                        worker=int(t.worker),
                        timeout_s=None if t.timeout_s is None else float(t.timeout_s),
                        pruner_startup_trials=int(t.pruner_startup_trials),
                        pruner_warmup_steps=int(t.pruner_warmup_steps))
    sampler = (optuna.samplers.GridSampler(dict(grid), seed=int(t.seed)) if grid else None)
    study = st.open_study(spec, sampler=sampler)
    _check_same_dataset(study, dataset, holdout, storage)

    # ---- tracking ---------------------------------------------------------------------------
    tracking.configure(cfg.mlflow.tracking_uri)
    experiment_id = _experiment_id(str(cfg.mlflow.experiment))
    parent = st.parent_run_id(study, experiment_id, st.storage_key(spec))
    if bool(t.reclaim_running):
        again = st.reclaim_running(study)
        if again:
            log.warning("reclaimed running trials %s (failed + re-enqueued)", again)
    else:
        running = [x.number for x in study.get_trials(deepcopy=False,
                                                      states=(optuna.trial.TrialState.RUNNING,))]
        if running:
            log.warning("study %s has RUNNING trials %s: other workers, or left by a crash (then "
                        "rerun with tune.reclaim_running=true to retry them)", name, running)
    if grid is None and bool(t.baseline_trial):
        base_params = defaults(params, train_cfg, groups)
        with study.lock():  # workers starting together queue the baseline once
            if not study.get_trials(deepcopy=False):
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                    study.enqueue_trial(base_params, user_attrs={"baseline": True},
                                        skip_if_exists=True)
    setup = TrialSetup(base=tuple(base), params=tuple(params), objective=objective,
                       max_frr=max_frr, thresholds=int(cfg.replay.sweep.thresholds),
                       horizon_s=cfg.replay.get("horizon_s"),
                       prune=len(dirs) == 1 and str(t.pruner) != "none",
                       maximize=dirs[0] == "maximize", experiment_id=experiment_id,
                       parent_run_id=parent, scorers_dir=out_dir / "scorers", n_trials=n_trials,
                       worker=int(t.worker))
    runner = TrialRunner(setup, dataset, holdout)
    for noisy in _NOISY:
        logging.getLogger(noisy).setLevel(logging.WARNING)
    log.info("study %s: %d trials, objective %s %s, hold-out %d of %d deployments, storage %s",
             name, n_trials, objective, "/".join(dirs), len(holdout.holdout),
             len(holdout.holdout) + len(holdout.train), storage or out_dir / "journal.log")
    st.optimize(study, spec, runner, show_progress=bool(t.progress), catch=(CanarymlError,))

    # ---- results ----------------------------------------------------------------------------
    best = st.choose_best(study, max_frr)
    registered, register_reason = None, None
    if mode != "off" and best is not None:
        with study.lock():  # workers finishing together: one registers, the others see it
            registered, register_reason = _register(study, best, cfg, runner,
                                                    _policy_config(train_cfg), dirs,
                                                    force=mode == "force")
    _prune_scorers(study, best, setup.scorers_dir)
    baseline = next((x for x in study.get_trials(deepcopy=False)
                     if x.user_attrs.get("baseline")), None)
    targets = obj.target_names(objective, max_frr)
    extra: dict[str, Any] = {
        "objective": objective, "objective_doc": _OBJECTIVE_DOC[objective].format(max_frr),
        "dataset": {"path": str(cfg.dataset), "content_hash": dataset.content_hash,
                    "deployments": len(holdout.train) + len(holdout.holdout),
                    "holdout": len(holdout.holdout), "holdout_seed": int(t.holdout_seed)},
        "n_trials": n_trials, "storage": str(storage or "journal.log"),
        "base_overrides": [o for o in base],
        "grid": grid, "registered": registered, "register_decision": register_reason,
        "mlflow_parent_run_id": parent,
    }
    if baseline is not None:
        extra["baseline"] = {"trial": baseline.number, "state": baseline.state.name.lower(),
                             "params": baseline.params,
                             "value": baseline.value if len(dirs) == 1 and baseline.values else
                             baseline.values,
                             "metrics": {k: v for k, v in baseline.user_attrs.items()
                                         if k not in ("mlflow_run_id", "scorer_dir", "baseline", "worker")}}
    if best is not None:
        extra["best_overrides"] = [f"{k}={v}" for k, v in best.params.items()]
        keep = [o for o in overrides if not o.lstrip("~+").startswith(_TUNE_ONLY)]
        extra["train_command"] = " ".join(["canaryml", "train", *keep,
                                           *extra["best_overrides"]])
    with mlflow.start_run(run_id=parent):
        # tags, not params: a resumed study may raise n_trials (params are immutable)
        mlflow.set_tags({"tune.objective": objective, "tune.n_trials": n_trials,
                           "tune.sampler": str(t.sampler), "tune.pruner": str(t.pruner),
                           "dataset": str(cfg.dataset)})
        summary = st.write_results(study, out_dir, extra, target_names=targets, best=best)
        if best is not None:
            if len(dirs) == 1 and best.value is not None:
                mlflow.log_metric("best/objective", float(best.value))
            mlflow.set_tag("best_trial", str(best.number))
    if st.finished(study) >= n_trials:
        from mlflow.tracking import MlflowClient

        MlflowClient().set_terminated(parent)
    _print_summary(summary, out_dir)
    if best is None:
        print(f"canaryml tune: no trial of study {name!r} completed; see the warnings above "
              "(every trial failed or was pruned)", file=sys.stderr)
        return 1
    return 0


_OBJECTIVE_DOC = {
    "replay": "share of faulty hold-out canaries rolled back before impact at the best rollback "
              "threshold whose false-rollback rate on healthy hold-out canaries is <= {:g}",
    "val_loss": "forecaster's best validation pinball loss (lower is better){}",
    "multi": "(caught before impact, false-rollback rate) at policy.rollback_threshold on the "
             "hold-out; Pareto front; registered = most caught with false-rollback rate <= {:g}",
}


def _probe_points(params: Sequence[Any], grid: dict[str, list[str]] | None) -> list[list[str]]:
    """Overrides to try-compose before starting: every grid point (up to 64), or each space
    parameter at its extremes."""
    import itertools

    import optuna.distributions as od

    if grid:
        keys = list(grid)
        points = itertools.islice(itertools.product(*grid.values()), 64)
        return [[f"{k}={v}" for k, v in zip(keys, p, strict=True)] for p in points]
    lows, highs = [], []
    for p in params:
        d = p.distribution
        if isinstance(d, od.CategoricalDistribution):
            lows.append(p.override(d.choices[0]))
            highs.append(p.override(d.choices[-1]))
        else:
            lows.append(p.override(d.low))
            highs.append(p.override(d.high))
    return [lows, highs]


def _default_name(cfg: DictConfig, objective: str, grid: dict[str, list[str]] | None) -> str:
    ds = Path(str(cfg.dataset)).name or "dataset"
    if grid:
        digest = hashlib.sha1(repr(sorted(grid.items())).encode()).hexdigest()[:8]
        return f"{ds}-grid-{digest}-{objective}"
    return f"{ds}-{cfg.tune.name}-{objective}"


def _experiment_id(name: str) -> str:
    """The MLflow experiment's id; workers starting together may race to create it."""
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        return str(mlflow.set_experiment(name).experiment_id)
    except MlflowException:
        existing = mlflow.get_experiment_by_name(name)  # the other worker created it
        if existing is None:
            raise
        mlflow.set_experiment(experiment_id=existing.experiment_id)
        return str(existing.experiment_id)


def _check_same_dataset(study: optuna.Study, dataset: Any, holdout: Any, storage: Any) -> None:
    """Workers (and resumes) of one study must tune on the same data and hold-out."""
    key = {"dataset_hash": dataset.content_hash,
           "holdout": hashlib.sha1("\n".join(sorted(holdout.holdout)).encode()).hexdigest()[:12]}
    have = study.user_attrs.get("data")
    if have is None:
        study.set_user_attr("data", key)
    elif have != key:
        raise ConfigError(
            f"study {study.study_name!r} ({storage or 'journal'}) was run on other data or another "
            f"hold-out ({have} vs {key}); keep dataset=, tune.holdout_fraction and "
            "tune.holdout_seed the same for every worker, or use another tune.study name")


def _register_mode(value: Any) -> str:
    """`tune.register`: true (registers a best trial that beats the incumbents), force (skips
    that comparison) or false."""
    if isinstance(value, str) and value.lower() == "force":
        return "force"
    if isinstance(value, bool):
        return "gate" if value else "off"
    raise ConfigError(f"tune.register={value!r} is not true, false or force")


def _register(study: optuna.Study, best: optuna.trial.FrozenTrial, cfg: DictConfig,
              runner: TrialRunner, policy: Any, directions: Sequence[str], *, force: bool
              ) -> tuple[dict[str, Any] | None, str]:
    """Register the best trial's scorer as `@challenger`, in the trial's MLflow run (once), if
    it strictly beats the untuned default trial and the current `@challenger` / `@champion` on
    the study's objective (`canaryml.tune.gate`). Returns (what was registered, why)."""
    import json

    import mlflow
    from mlflow.tracking import MlflowClient

    from canaryml import tracking
    from canaryml.models.scorer import CanaryScorer
    from canaryml.tune import gate

    model = str(cfg.mlflow.registered_model)
    done = study.user_attrs.get("registered")
    if done and done.get("trial") == best.number:
        mv = tracking.get_alias_version(model, "challenger")
        if mv is not None and str(mv.version) == str(done.get("version")):
            return cast(dict[str, Any], done), f"trial {best.number} is already @challenger"
    scorer_dir = Path(str(best.user_attrs.get("scorer_dir", "")))
    if not (scorer_dir / "scorer.json").is_file():
        reason = f"best trial {best.number} has no saved scorer at {scorer_dir}"
        log.warning("%s; nothing registered", reason)
        return None, reason
    s = runner.setup
    key = gate.objective_key(s.objective, s.max_frr, runner.dataset.content_hash,
                             runner.holdout.holdout)
    contender = gate.Contender(f"best trial {best.number}", tuple(best.values))
    if force:
        reason = f"{contender.name} registered without comparison (tune.register=force)"
    else:
        incumbents, blocked = _incumbents(study, model, key, runner, policy)
        decision = (gate.Decision(False, blocked) if blocked
                    else gate.decide(contender, incumbents, directions))
        if not decision.register:
            log.info("not registered as @challenger: %s (tune.register=force registers it "
                     "anyway)", decision.reason)
            return None, decision.reason
        reason = decision.reason
    with mlflow.start_run(run_id=str(best.user_attrs["mlflow_run_id"])):
        version = tracking.log_scorer(CanaryScorer.load(scorer_dir), model, alias="challenger")
        mlflow.set_tag("registered", f"{model}/{version.version}@challenger")
    _tag_objective(MlflowClient(), model, str(version.version), key, s.objective,
                   json.dumps(list(best.values)))
    info = {"trial": best.number, "model": model, "version": str(version.version),
            "alias": "challenger", "run_id": str(best.user_attrs["mlflow_run_id"]),
            "reason": reason}
    study.set_user_attr("registered", info)
    log.info("registered %s v%s @challenger: %s", model, version.version, reason)
    return info, reason


def _tag_objective(client: Any, model: str, version: str, key: str, objective: str,
                   values: str) -> None:
    from canaryml.tune import gate

    for tag, value in ((gate.KEY_TAG, key), (gate.OBJECTIVE_TAG, objective),
                       (gate.VALUE_TAG, values)):
        client.set_model_version_tag(model, version, tag, value)


def _incumbents(study: optuna.Study, model: str, key: str, runner: TrialRunner, policy: Any
                ) -> tuple[list[Any], str | None]:
    """The untuned default trial and the versions behind @challenger / @champion, with their
    objective values on this study's hold-out: from a version's `tune.objective_*` tags when
    they were measured on the same objective, data and hold-out, else by replaying the version
    on the hold-out now (and tagging it). Returns (contenders, why they cannot be compared)."""
    import json

    from mlflow.tracking import MlflowClient

    from canaryml import tracking
    from canaryml.registry import training_dataset_hash
    from canaryml.tune import gate
    from canaryml.tune.objective import replay_score

    s = runner.setup
    out: list[gate.Contender] = []
    base = next((x for x in study.get_trials(deepcopy=False,
                                             states=(optuna.trial.TrialState.COMPLETE,))
                 if x.user_attrs.get("baseline")), None)
    if base is not None:
        out.append(gate.Contender(f"the untuned default, trial {base.number}",
                                  tuple(base.values)))
    client = MlflowClient()
    seen: set[str] = set()
    for alias in ("challenger", "champion"):
        mv = tracking.get_alias_version(model, alias)
        if mv is None or str(mv.version) in seen:
            continue
        seen.add(str(mv.version))
        name = f"@{alias} v{mv.version}"
        values = gate.tagged_values(mv.tags or {}, key)
        if values is None:
            if s.objective == "val_loss":
                return out, (f"{name} has no val/loss measured on this study's data and hold-out, "
                             "so tune.objective=val_loss cannot compare with it")
            try:
                scorer = tracking.load_scorer(f"models:/{model}/{mv.version}")
                score = replay_score(scorer, runner.dataset, runner.holdout.holdout, policy,
                                     max_frr=s.max_frr, thresholds=s.thresholds,
                                     horizon_s=s.horizon_s, model_version=f"v{mv.version}")
            except CanarymlError as exc:
                # e.g. a model of other metrics, or one whose artifacts are gone: it cannot
                # judge this data, so there is nothing on this objective to beat
                log.warning("%s cannot be replayed on this study's hold-out, so it is not "
                            "compared: %s", name, exc)
                continue
            values = ((score.caught_at_frr,) if s.objective == "replay"
                      else (score.caught, score.false_rollback))
            if training_dataset_hash(client, mv) == runner.dataset.content_hash:
                log.warning("%s was trained on this dataset (possibly on these hold-out "
                            "deployments): its replayed objective %s may be in-sample and "
                            "favour it", name, list(values))
            _tag_objective(client, model, str(mv.version), key, s.objective,
                           json.dumps(list(values)))
            log.info("%s replayed on the tuning hold-out: %s", name, list(values))
        out.append(gate.Contender(name, values))
    return out, None


def _prune_scorers(study: optuna.Study, best: optuna.trial.FrozenTrial | None, root: Path) -> None:
    """Keep the saved scorers of the best trial (and the Pareto front) only."""
    if not root.is_dir():
        return
    keep = {best.number} if best is not None else set()
    if len(study.directions) > 1:
        keep |= {x.number for x in study.best_trials}
    numbers = {x.number: x.state for x in study.get_trials(deepcopy=False)}
    for d in root.glob("trial-*"):
        try:
            n = int(d.name.split("-")[1])
        except (IndexError, ValueError):
            continue
        if n not in keep and numbers.get(n) in (optuna.trial.TrialState.COMPLETE,
                                                optuna.trial.TrialState.PRUNED,
                                                optuna.trial.TrialState.FAIL):
            shutil.rmtree(d, ignore_errors=True)


def _print_summary(summary: dict[str, Any], out_dir: Path) -> None:
    trials = summary["trials"]
    line = (f"study {summary['study']}: {trials.get('complete', 0)} complete, "
            f"{trials.get('pruned', 0)} pruned, {trials.get('fail', 0)} failed")
    if "best_value" in summary:
        line += f"; best {summary['objectives'][0]}={summary['best_value']:.4f} " \
                f"(trial {summary['best_trial']})"
    elif "best_values" in summary:
        line += f"; chosen {summary['best_values']} (trial {summary['best_trial']})"
    base = summary.get("baseline")
    if base and base.get("value") is not None and not isinstance(base["value"], list):
        line += f" vs untuned default {base['value']:.4f}"
    if summary.get("best_params"):
        line += f"\n  best params: {summary['best_params']}"
    reg = summary.get("registered")
    if reg:
        line += f"\n  registered {reg['model']} v{reg['version']} @challenger"
    elif summary.get("register_decision"):
        line += f"\n  not registered as @challenger: {summary['register_decision']}"
    line += f"\n  results: {out_dir}/best.json"
    print(line)
