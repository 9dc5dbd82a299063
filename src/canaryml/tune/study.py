"""Study orchestration: storage, sampler/pruner, MLflow parent/nested runs, budget, plots.

Any number of workers (`canaryml tune tune.storage=URL tune.study=NAME` started N times, on one
machine or many) join the same study and share its budget: a `BudgetedStudy` starts a trial only
while the study holds fewer than `n_trials` complete, pruned, running or queued trials, checked
and asked under a lock every worker takes (a PostgreSQL/MySQL advisory lock, or a lock file next
to a journal/SQLite file), so the study never holds more trials than its budget. An interrupted
study resumes where it stopped (`load_if_exists`). Storage:

* default / `journal://PATH` / `*.log`: Optuna's journal file (file-locked appends; safe for
  several processes on one machine or on a shared POSIX file system);
* any SQLAlchemy URL (`sqlite:///study.db`, `postgresql://…`, `mysql+pymysql://…`): an
  `RDBStorage` with heartbeats, so a trial whose worker died is marked failed and retried.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import warnings
from collections.abc import Callable, Iterator, Sequence
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
# a trial in one of these states holds a slot of the study's budget (FAIL gives it back)
COUNTED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.WAITING)
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
        # workers starting together on an empty database would race Optuna's schema creation
        # (`alembic_version already exists`): the first creates it, the others wait
        with storage_lock(url, out_dir, "schema")(), warnings.catch_warnings():
            # heartbeats are "experimental" since Optuna 2.8
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.storages.RDBStorage(
                url, engine_kwargs={"pool_pre_ping": True}, heartbeat_interval=HEARTBEAT_S,
                grace_period=3 * HEARTBEAT_S,
                heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(
                    max_retry=1))
    except ModuleNotFoundError as exc:
        raise ConfigError(f"study storage {url!r} needs the database driver {exc.name!r}; "
                          "pip install it (`pip install 'canaryml[postgres]'` for postgresql://)") from exc
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


class BudgetFull(Exception):  # a signal to stop asking, not an error
    """The study already holds its `n_trials` trials; this worker starts no more."""


AskLock = Callable[[], contextlib.AbstractContextManager[None]]


def storage_lock(url: str | None, out_dir: Path, name: str) -> AskLock:
    """A lock named `name` that every worker on the study storage `url` can take: around
    "count the trials, ask for one" (named after the study), or around schema creation.

    PostgreSQL and MySQL: a server-side advisory lock (workers on any machine); a journal file
    or SQLite database: `flock` on `<file>.<hash of name>.lock` beside it (one machine or a
    shared POSIX file system). Any other storage gets no lock: two workers racing for a study's
    last slot may then both ask, and `canaryml.tasks.tune.over_budget` hands the later trial
    back unrun."""
    from sqlalchemy.engine import make_url

    key = int.from_bytes(hashlib.sha1(f"canaryml-tune|{name}".encode()).digest()[:8],
                         "big", signed=True)
    if url is None or url.startswith("journal://") or url.endswith(".log"):
        journal = Path(url.removeprefix("journal://")) if url else out_dir / "journal.log"
        return _file_lock(journal, name)
    parsed = make_url(url)
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        if not parsed.database or parsed.database == ":memory:":
            return contextlib.nullcontext
        return _file_lock(Path(parsed.database), name)
    if backend in ("postgresql", "mysql", "mariadb"):
        return _advisory_lock(url, backend, key)
    log.info("study storage %s has no lock for asking trials; the budget is kept by handing "
             "back a trial that loses a race for the last slot", backend)
    return contextlib.nullcontext


def _file_lock(beside: Path, name: str) -> AskLock:
    digest = hashlib.sha1(name.encode()).hexdigest()[:12]
    path = beside.with_name(f"{beside.name}.{digest}.lock")

    @contextlib.contextmanager
    def lock() -> Iterator[None]:
        with open(path, "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    return lock


def _advisory_lock(url: str, backend: str, key: int) -> AskLock:
    import sqlalchemy as sa
    from sqlalchemy.pool import NullPool

    # NullPool: closing the connection ends the session, which releases the lock even if the
    # unlock statement never ran (a worker killed while holding it)
    engine = sa.create_engine(url, poolclass=NullPool)
    if backend == "postgresql":
        take = sa.text("SELECT pg_advisory_lock(:k)").bindparams(k=key)
        give = sa.text("SELECT pg_advisory_unlock(:k)").bindparams(k=key)
    else:
        name = f"canaryml-tune-{key & 0xFFFFFFFF:08x}"
        take = sa.text("SELECT GET_LOCK(:n, -1)").bindparams(n=name)
        give = sa.text("SELECT RELEASE_LOCK(:n)").bindparams(n=name)

    @contextlib.contextmanager
    def lock() -> Iterator[None]:
        with engine.connect() as conn:
            conn.execute(take)
            conn.commit()  # end the implicit transaction; the session lock stays held
            try:
                yield
            finally:
                conn.execute(give)
                conn.commit()

    return lock


class BudgetedStudy(optuna.Study):
    """An Optuna study whose `ask` keeps the study within `n_trials` trials across workers.

    Under `lock` (shared by every worker, see `storage_lock`): a queued (WAITING) trial is always
    taken, since it already holds a slot; otherwise a new trial is created only while fewer than
    `n_trials` trials are complete, pruned, running or queued, else `BudgetFull` is raised."""

    def __init__(self, study_name: str, storage: optuna.storages.BaseStorage,
                 sampler: optuna.samplers.BaseSampler, pruner: optuna.pruners.BasePruner,
                 n_trials: int, lock: AskLock):
        super().__init__(study_name=study_name, storage=storage, sampler=sampler, pruner=pruner)
        self.n_trials = n_trials
        self.lock = lock

    def ask(self, fixed_distributions: dict[str, Any] | None = None) -> optuna.Trial:
        with self.lock():
            held = self.get_trials(deepcopy=False, states=COUNTED)
            queued = any(t.state == TrialState.WAITING for t in held)
            if not queued and len(held) >= self.n_trials:
                raise BudgetFull(f"study {self.study_name} holds {len(held)} of its "
                                 f"{self.n_trials} trials")
            return super().ask(fixed_distributions)


def open_study(spec: StudySpec, sampler: optuna.samplers.BaseSampler | None = None
               ) -> BudgetedStudy:
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
    return BudgetedStudy(study.study_name, study._storage, study.sampler, study.pruner,
                         spec.n_trials, storage_lock(spec.storage, spec.out_dir, spec.name))


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
    counting those of every worker; with a `BudgetedStudy`, stop as soon as the remaining slots
    are taken by other workers' running trials."""
    done = finished(study)
    remaining = max(0, spec.n_trials - done)
    if remaining == 0:
        log.info("study %s already has %d finished trials; nothing to do", study.study_name, done)
        return
    log.info("study %s: %d finished, running up to %d more", study.study_name, done, remaining)
    try:
        study.optimize(
            fn,
            n_trials=remaining,
            timeout=spec.timeout_s,
            callbacks=[optuna.study.MaxTrialsCallback(spec.n_trials, states=FINISHED)],
            show_progress_bar=show_progress,
            gc_after_trial=True,
            catch=catch,
        )
    except BudgetFull as full:
        log.info("%s; this worker stops", full)


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
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                warnings.simplefilter("always", UserWarning)
                if len(study.directions) > 1:
                    ax: Any = plot(study, target=lambda t: t.values[0],
                                   target_name=target_name)
                else:
                    ax = plot(study, target_name=target_name)
            # e.g. "importances will be equal" when every trial scored the same: a note on
            # the plot, not a warning about the user's run
            for w in caught:
                log.info("plot %s: %s", name, w.message)
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
