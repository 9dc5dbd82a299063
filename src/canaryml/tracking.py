"""MLflow helpers (DESIGN §5): tracking URI, runs with config/hash/commit, scorer registry.

Registered model `canary-scorer`; aliases `challenger` and `champion` (no stages).
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlflow
import numpy as np
from mlflow.entities import Run
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from canaryml.errors import ConfigError, ModelLoadError
from canaryml.paths import default_tracking_uri, repo_root

if TYPE_CHECKING:
    from canaryml.control.types import Window
    from canaryml.models.scorer import CanaryScorer

log = logging.getLogger(__name__)

REGISTERED_MODEL = "canary-scorer"
_PIP = ["canaryml", "torch", "scikit-learn", "numpy", "pandas", "mlflow"]


def tracking_uri(cfg_value: str | None = None) -> str:
    """The config value, else $MLFLOW_TRACKING_URI, else the project's SQLite file."""
    if cfg_value:
        return str(cfg_value)
    return os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri()


def configure(cfg_value: str | None = None) -> str:
    uri = tracking_uri(cfg_value)
    if uri.startswith("sqlite:///"):  # MLflow would create the missing folders, then find nothing
        folder = Path(uri[len("sqlite:///"):]).expanduser().parent
        if not folder.is_dir():
            raise ConfigError(f"MLflow store {uri}: the folder {folder} does not exist; create it "
                              "or point MLFLOW_TRACKING_URI / mlflow.tracking_uri at an existing "
                              "one (e.g. sqlite:///mlflow.db in the working directory)")
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return uri


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo_root(), capture_output=True,
                             text=True, timeout=5, check=False)
        sha = out.stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=repo_root(), capture_output=True, text=True, timeout=5,
                               check=False).stdout.strip()
        return (sha + ("-dirty" if dirty else "")) if sha else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out |= _flatten(v, key + ".")
        else:
            out[key] = str(v)[:500]
    return out


@contextlib.contextmanager
def start_run(config: Mapping[str, Any], *, experiment: str = "canaryml",
              run_name: str | None = None, dataset_hash: str | None = None,
              uri: str | None = None, tags: Mapping[str, str] | None = None) -> Iterator[Run]:
    """Start an MLflow run that logs the resolved config (config.yaml + flattened params), the
    dataset manifest hash and the git commit (tags)."""
    import yaml

    configure(uri)
    mlflow.set_experiment(experiment)
    all_tags = {"git_commit": git_commit(), **(tags or {})}
    if dataset_hash:
        all_tags["dataset_hash"] = dataset_hash
    with mlflow.start_run(run_name=run_name, tags=all_tags) as run:
        mlflow.log_text(yaml.safe_dump(dict(config), sort_keys=False), "config.yaml")
        params = _flatten(config)
        items = list(params.items())
        for i in range(0, len(items), 100):
            mlflow.log_params(dict(items[i: i + 100]))
        yield run


def example_window(scorer: CanaryScorer) -> Window:
    """A valid input example: the scaler's typical values over `lookback` steps."""
    from canaryml.control.types import Window

    rng = np.random.default_rng(0)
    base = scorer.scaler.center + 0.1 * scorer.scaler.scale * rng.standard_normal(
        (scorer.lookback, len(scorer.metrics)))
    ts = np.arange(scorer.lookback, dtype=np.int64) * scorer.step_s
    return Window("example", float(ts[-1]), ts, base.astype(np.float32),
                  base[::-1].copy().astype(np.float32), scorer.metrics)


class _DropMessages(logging.Filter):
    """Drops log records whose message starts with one of `prefixes`."""

    def __init__(self, *prefixes: str) -> None:
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefixes)


@contextlib.contextmanager
def _quiet_cloudpickle_warning() -> Iterator[None]:
    """MLflow warns on every `log_model(python_model=<object>)` that the object is serialised
    with cloudpickle. Ours is a bare `ScorerModel()`: it holds no state (everything loads from
    the artifact bundle in `load_context`), so the warning tells the user nothing. Dropped for
    this one call only, by its exact opening words."""
    logger = logging.getLogger("mlflow.pyfunc")
    drop = _DropMessages("Passing a Python object as `python_model`")
    logger.addFilter(drop)
    try:
        yield
    finally:
        logger.removeFilter(drop)


def log_scorer(scorer: CanaryScorer, registered_model: str = REGISTERED_MODEL,
               alias: str | None = "challenger", input_example: Window | None = None
               ) -> ModelVersion:
    """Log the scorer as a pyfunc (signature + input example) in the active run, register a new
    version of `registered_model` and point `alias` at it."""
    from mlflow.models import infer_signature

    from canaryml.models.pyfunc import ScorerModel, window_to_frame

    if mlflow.active_run() is None:
        raise ModelLoadError("log_scorer needs an active MLflow run; use tracking.start_run()")
    example = window_to_frame(input_example or example_window(scorer))
    pm = ScorerModel()
    pm.scorer = scorer
    output = pm.predict(None, example)
    with tempfile.TemporaryDirectory(prefix="canaryml-scorer-") as tmp, \
            _quiet_cloudpickle_warning():
        bundle = scorer.save(Path(tmp) / "scorer")
        info = mlflow.pyfunc.log_model(
            name="scorer", python_model=ScorerModel(), artifacts={"scorer": str(bundle)},
            signature=infer_signature(example, output), input_example=example,
            pip_requirements=_PIP, registered_model_name=registered_model)
    client = MlflowClient()
    version = str(info.registered_model_version)
    for key, value in (scorer.operating_point or {}).items():
        if isinstance(value, int | float | str):  # threshold, hysteresis, target: searchable tags
            client.set_model_version_tag(registered_model, version, f"operating_point.{key}",
                                         str(value))
    if alias:
        client.set_registered_model_alias(registered_model, alias, version)
    log.info("registered %s version %s%s", registered_model, version,
             f" as @{alias}" if alias else "")
    return client.get_model_version(registered_model, version)


def lightning_logger() -> Any | None:
    """A Lightning `MLFlowLogger` that writes the fit's curves (`train/loss`, `val/loss`, `epoch`,
    stepped by optimizer step) live into the active MLflow run; None when no run is active (the
    fit then logs to a local CSV file only). The run stays the caller's: the logger neither
    logs the module's hyper-parameters (the caller logs the whole config) nor ends the run."""
    run = mlflow.active_run()
    if run is None:
        return None
    from pytorch_lightning.loggers import MLFlowLogger

    class _ActiveRunLogger(MLFlowLogger):
        def log_hyperparams(self, params: Any) -> None:  # the run has the full config
            return None

        def finalize(self, status: str = "success") -> None:  # its owner ends the run
            return None

    return _ActiveRunLogger(tracking_uri=mlflow.get_tracking_uri(), run_id=run.info.run_id)


def set_alias(name: str, alias: str, version: str | int) -> None:
    MlflowClient().set_registered_model_alias(name, alias, str(version))


def get_alias_version(name: str, alias: str) -> ModelVersion | None:
    try:
        return MlflowClient().get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def load_scorer(uri: str) -> CanaryScorer:
    """Load a CanaryScorer from `models:/name@alias`, `models:/name/version`, `runs:/<id>/scorer`
    or a local directory written by `CanaryScorer.save`."""
    from canaryml.models.scorer import CanaryScorer

    path = Path(uri)
    if path.is_dir():
        # either a scorer bundle or a downloaded pyfunc model (artifacts/scorer inside)
        for candidate in (path, path / "artifacts" / "scorer"):
            if (candidate / "scorer.json").is_file():
                return CanaryScorer.load(candidate)
        raise ModelLoadError(f"{uri} is a directory without a CanaryScorer (no scorer.json); "
                             "pass the directory written by CanaryScorer.save")
    if not uri.startswith(("models:/", "runs:/")):
        raise ModelLoadError(
            f"cannot load a scorer from {uri!r}: use models:/canary-scorer@champion, "
            "models:/canary-scorer/<version>, runs:/<run_id>/scorer or an existing directory"
        )
    configure()
    try:
        local = mlflow.artifacts.download_artifacts(artifact_uri=uri)
    except MlflowException as exc:
        raise ModelLoadError(f"cannot resolve {uri!r} in the MLflow store {tracking_uri()}: "
                             f"{exc.message}. Check the name/alias (e.g. run `canaryml train` to "
                             "create @challenger) and MLFLOW_TRACKING_URI") from exc
    scorer_dir = Path(local) / "artifacts" / "scorer"
    if not (scorer_dir / "scorer.json").is_file():
        raise ModelLoadError(f"{uri!r} is not a canary scorer model (no artifacts/scorer)")
    scorer = CanaryScorer.load(scorer_dir)
    scorer.info["model_uri"] = uri
    return scorer
