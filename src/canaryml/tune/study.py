"""Study orchestration: storage, sampler/pruner, MLflow parent/nested runs, budget, plots.

Any number of workers (`canaryml tune tune.storage=URL tune.study=NAME` started N times, on one
machine or many) join the same study; `MaxTrialsCallback` caps the total budget across workers
(complete + pruned trials), and an interrupted study resumes where it stopped
(`load_if_exists`). Storage:

* default / `journal://PATH` / `*.log`: Optuna's journal file (file-locked appends; safe for
  several processes on one machine or on a shared POSIX file system);
* any SQLAlchemy URL (`sqlite:///study.db`, `postgresql://…`, `mysql+pymysql://…`): an
  `RDBStorage` with heartbeats, so a trial whose worker died is marked failed and retried.
"""

from __future__ import annotations

import hashlib
import json
import logging
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlflow
import numpy as np
import optuna
from mlflow.tracking import MlflowClient
from optuna.storages.journal import JournalFileBackend, JournalStorage
from optuna.trial import FrozenTrial, TrialState

from canaryml.data.atomic import atomic_write_json
from canaryml.errors import ConfigError

if TYPE_CHECKING:
    from matplotlib.figure import Figure

log = logging.getLogger(__name__)

PARENT_RUN_ATTR = "mlflow_parent_run_id"
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
HEARTBEAT_S = 60


@dataclass(frozen=True)
class StudySpec:
    name: str
    storage: str | None  # None → journal file under out_dir
    out_dir: Path
    n_trials: int
    directions: tuple[str, ...] = ("maximize",)
    sampler: str = "tpe"
    pruner: str = "median"
    seed: int = 0
    worker: int = 0  # distinct per worker so random start-up suggestions differ
    timeout_s: float | None = None
    pruner_startup_trials: int = 2
    pruner_warmup_steps: int = 1

    def __post_init__(self) -> None:
        if self.n_trials < 1:
            raise ConfigError(f"n_trials={self.n_trials}: give at least 1 trial")
        for d in self.directions:
            _direction(d)


def make_storage(url: str | None, out_dir: Path) -> optuna.storages.BaseStorage:
    """A journal file by default (safe for several local processes); any RDB URL otherwise.

    Raises ConfigError when the URL cannot be used, before any trial starts."""
    if url is None or url.startswith("journal://") or url.endswith(".log"):
        path = Path(url.removeprefix("journal://")) if url else out_dir / "journal.log"
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            return JournalStorage(JournalFileBackend(str(path)))
        except OSError as exc:
            raise ConfigError(f"study journal {str(path)!r} cannot be created ({exc}); give a "
                              "writable path with tune.storage=journal://PATH") from exc
    if "://" not in url:
        raise ConfigError(f"tune.storage={url!r} is neither a database URL (sqlite:///study.db, "
                          "postgresql://user:pass@host/db) nor a journal file (journal://PATH "
                          "or a path ending in .log)")
    try:
        with warnings.catch_warnings():  # heartbeats are "experimental" since Optuna 2.8
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.storages.RDBStorage(
                url, engine_kwargs={"pool_pre_ping": True}, heartbeat_interval=HEARTBEAT_S,
                grace_period=3 * HEARTBEAT_S,
                heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(
                    max_retry=1))
    except ModuleNotFoundError as exc:
        raise ConfigError(f"study storage {url!r} needs the database driver {exc.name!r}; "
                          f"pip install it (e.g. psycopg2-binary for postgresql://)") from exc
    except Exception as exc:  # sqlalchemy raises many kinds; all mean the same to the user
        raise ConfigError(f"study storage {url!r} is unreachable or not a database URL ({exc}); "
                          "check host, credentials and that the database exists, or drop "
                          "`tune.storage` to use the local journal file") from exc


def _sampler(name: str, seed: int, multi: bool) -> optuna.samplers.BaseSampler:
    if name == "tpe" and not multi:
        # constant_liar: running trials of other workers count as "bad" so workers spread out
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, constant_liar=True,
                                          n_startup_trials=5)
    if name == "tpe" or name == "nsga2":
        # TPE supports several objectives too, but NSGA-II is the standard for a Pareto front
        return (optuna.samplers.TPESampler(seed=seed, constant_liar=True, n_startup_trials=5)
                if name == "tpe" else optuna.samplers.NSGAIISampler(seed=seed))
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    raise ConfigError(f"tune.sampler={name!r} is not tpe|random|nsga2")


def _pruner(spec: StudySpec) -> optuna.pruners.BasePruner:
    if spec.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=spec.pruner_startup_trials,
                                           n_warmup_steps=spec.pruner_warmup_steps)
    if spec.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1)
    if spec.pruner == "none":
        return optuna.pruners.NopPruner()
    raise ConfigError(f"tune.pruner={spec.pruner!r} is not median|hyperband|none")


def _direction(name: str) -> optuna.study.StudyDirection:
    try:
        return optuna.study.StudyDirection[name.upper()]
    except KeyError:
        raise ConfigError(f"study direction {name!r} is not maximize|minimize") from None


def open_study(spec: StudySpec, sampler: optuna.samplers.BaseSampler | None = None
               ) -> optuna.Study:
    """Create the study or join the existing one of the same name (resume / more workers)."""
    storage = make_storage(spec.storage, spec.out_dir)
    multi = len(spec.directions) > 1
    pruner = _pruner(spec)
    seed = spec.seed + 7919 * spec.worker
    try:
        study = optuna.create_study(
            study_name=spec.name, storage=storage,
            sampler=sampler or _sampler(spec.sampler, seed, multi), pruner=pruner,
            directions=[_direction(d) for d in spec.directions], load_if_exists=True)
    except ValueError as exc:  # e.g. existing study with other directions
        raise ConfigError(f"study {spec.name!r} in {spec.storage or spec.out_dir}: {exc}; use "
                          "another tune.study name") from exc
    have = tuple(d.name.lower() for d in study.directions)
    if have != tuple(spec.directions):
        raise ConfigError(f"study {spec.name!r} already exists with directions {list(have)}, "
                          f"not {list(spec.directions)} (another tune.objective); use another "
                          "tune.study name")
    return study


def reclaim_running(study: optuna.Study) -> list[int]:
    """Mark RUNNING trials failed and re-enqueue their parameters (after a crash, when no other
    worker is running). Returns the trial numbers reclaimed."""
    reclaimed = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        study._storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
        study.enqueue_trial(t.params, user_attrs={"retry_of": t.number}, skip_if_exists=False)
        reclaimed.append(t.number)
    return reclaimed


def storage_key(spec: StudySpec) -> str:
    """A short, credential-free id of the study's storage (tags the MLflow parent run)."""
    where = spec.storage or str((spec.out_dir / "journal.log").absolute())
    return hashlib.sha1(f"{where}|{spec.name}".encode()).hexdigest()[:16]


def parent_run_id(study: optuna.Study, experiment_id: str, key: str) -> str:
    """The study's MLflow parent run, shared by every worker through a study user attribute.

    Workers that start together may each create one: all then pick the earliest recent
    parent run of this study and storage (`key`), and the others delete theirs."""
    client = MlflowClient()
    rid = study.user_attrs.get(PARENT_RUN_ATTR)
    if rid:
        try:
            client.get_run(str(rid))
            return str(rid)
        except mlflow.exceptions.MlflowException:
            log.warning("study %s: parent run %s is not in this MLflow store; starting a new one",
                        study.study_name, rid)
    mine = client.create_run(experiment_id, run_name=f"study-{study.study_name}",
                             tags={"canaryml.kind": "study", "optuna.study": study.study_name,
                                   "optuna.storage": key, "command": "tune"})
    since_ms = mine.info.start_time - 10 * 60 * 1000
    name = study.study_name.replace("'", "")
    recent = client.search_runs(
        [experiment_id],
        filter_string=(f"tags.`optuna.study` = '{name}' and tags.`optuna.storage` = '{key}' "
                       f"and attributes.status = 'RUNNING' and attributes.start_time >= {since_ms}"),
        max_results=50)
    ranked = sorted(recent, key=lambda r: (r.info.start_time, r.info.run_id))
    winner = ranked[0].info.run_id if ranked else mine.info.run_id
    if winner != mine.info.run_id:
        client.delete_run(mine.info.run_id)
    study.set_user_attr(PARENT_RUN_ATTR, winner)
    return winner


TrialFn = Callable[[optuna.Trial], float | Sequence[float]]


def finished(study: optuna.Study) -> int:
    return sum(t.state in FINISHED for t in study.get_trials(deepcopy=False))


def optimize(study: optuna.Study, spec: StudySpec, fn: TrialFn, *, show_progress: bool = True,
             catch: tuple[type[Exception], ...] = ()) -> None:
    """Run trials until the study holds `n_trials` finished (complete or pruned) trials,
    counting those of every worker."""
    done = finished(study)
    remaining = max(0, spec.n_trials - done)
    if remaining == 0:
        log.info("study %s already has %d finished trials; nothing to do", study.study_name, done)
        return
    log.info("study %s: %d finished, running up to %d more", study.study_name, done, remaining)
    study.optimize(
        fn,
        n_trials=remaining,
        timeout=spec.timeout_s,
        callbacks=[optuna.study.MaxTrialsCallback(spec.n_trials, states=FINISHED)],
        show_progress_bar=show_progress,
        gc_after_trial=True,
        catch=catch,
    )


def choose_best(study: optuna.Study, max_frr: float = 0.01) -> FrozenTrial | None:
    """The trial to register: the best trial (single objective); on a Pareto front (maximize
    caught-before-impact, minimize false rollbacks) the one catching most with a false-rollback
    rate ≤ `max_frr`, else the one with the fewest false rollbacks."""
    if not any(t.state == TrialState.COMPLETE for t in study.get_trials(deepcopy=False)):
        return None
    if len(study.directions) == 1:
        return study.best_trial
    front = study.best_trials
    ok = [t for t in front if t.values[1] <= max_frr + 1e-12]
    if ok:
        return max(ok, key=lambda t: (t.values[0], -t.values[1], -t.number))
    return min(front, key=lambda t: (t.values[1], -t.values[0], t.number))


def write_results(study: optuna.Study, out_dir: Path, extra: dict[str, Any], *,
                  target_names: Sequence[str] = ("objective",),
                  best: FrozenTrial | None = None) -> dict[str, Any]:
    """best.json + optimisation-history and parameter-importance plots (also logged to the
    active MLflow run as artifacts); returns the summary."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as ovm

    out_dir.mkdir(parents=True, exist_ok=True)
    trials = study.get_trials(deepcopy=False)
    states = {s.name.lower(): sum(t.state == s for t in trials) for s in TrialState}
    summary: dict[str, Any] = {"study": study.study_name, "trials": states,
                               "directions": [d.name.lower() for d in study.directions],
                               "objectives": list(target_names), **extra}
    best = best or choose_best(study)
    if best is not None:
        summary["best_trial"] = best.number
        summary["best_params"] = best.params
        if len(study.directions) == 1:
            summary["best_value"] = best.value
        else:
            summary["best_values"] = dict(zip(target_names, best.values, strict=False))
        summary["best_metrics"] = {k: v for k, v in best.user_attrs.items()
                                   if k not in ("mlflow_run_id", "scorer_dir", "worker")}
    if len(study.directions) > 1:
        summary["pareto"] = [{"number": t.number, "values": t.values, "params": t.params}
                             for t in study.best_trials]
    plots = []
    target_name = target_names[0]
    for name, plot in (("optimization_history", ovm.plot_optimization_history),
                       ("param_importances", ovm.plot_param_importances)):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                if len(study.directions) > 1:
                    ax: Any = plot(study, target=lambda t: t.values[0],
                                   target_name=target_name)
                else:
                    ax = plot(study, target_name=target_name)
        except (ValueError, RuntimeError, ZeroDivisionError) as exc:
            # e.g. importances need ≥ 2 complete trials with varying parameters
            log.warning("plot %s skipped: %s", name, exc)
            continue
        first: Any = ax if hasattr(ax, "figure") else np.ravel(ax)[0]
        fig: Figure = first.figure
        fig.set_size_inches(8, 5)
        fig.tight_layout()
        path = out_dir / f"{name}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        plots.append(path)
    summary["plots"] = [p.name for p in plots]
    atomic_write_json(out_dir / "best.json", summary)
    if mlflow.active_run() is not None:
        for p in plots:
            mlflow.log_artifact(str(p))
        mlflow.log_artifact(str(out_dir / "best.json"))
    log.info("study %s: %s", study.study_name, json.dumps(states))
    return summary
