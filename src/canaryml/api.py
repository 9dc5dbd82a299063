"""The Python API: the workbench commands as functions (what the notebooks use).

    from canaryml import simulate, ingest, train, replay, load_scorer

    raw = simulate(out="data/raw/mine", n=40, seed=1)                 # → Path of the bundle
    ds = ingest(input=raw, out="data/processed/mine")                   # → Path of the dataset
    model = train(dataset=ds, trainer__max_epochs=2)                    # → "models:/canary-scorer/N"
    out = replay(model=model, dataset=ds, out="experiments/replay/mine")  # → Path (summary.json)
    scorer = load_scorer(model)                                         # → CanaryScorer

Each function is a thin layer over the command's task (`canaryml.tasks.<command>.run`): the
keyword arguments are config overrides — `trainer__max_epochs=2` (or
`**{"trainer.max_epochs": 2}`) is `trainer.max_epochs=2` on the command line, `forecaster=
"transformer"` picks a config option — composed with the same `conf/` tree as the CLI, so
the defaults, validation and error messages are the CLI's. `config(command, **overrides)`
returns the composed configuration itself.

`canaryml.simulate`, `canaryml.ingest` and `canaryml.replay` are also subpackages: importing
them keeps working, and the package modules are callable (`canaryml.simulate(...)` is
`canaryml.api.simulate(...)`).
"""

from __future__ import annotations

import importlib
import sys
import types
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from omegaconf import DictConfig

    from canaryml.models.scorer import CanaryScorer

__all__ = ["config", "ingest", "load_scorer", "replay", "simulate", "train"]


def _value(v: Any) -> str:
    """A Python value as a Hydra override value."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, list | tuple):
        return "[" + ",".join(_value(x) for x in v) + "]"
    if isinstance(v, Mapping):
        return "{" + ",".join(f"{k}:{_value(x)}" for k, x in v.items()) + "}"
    text = str(v)  # str, Path, …
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def overrides(**kwargs: Any) -> list[str]:
    """Keyword arguments as Hydra overrides (`a__b=1` → `a.b=1`)."""
    return [f"{k.replace('__', '.')}={_value(v)}" for k, v in kwargs.items()]


def config(command: str, **kwargs: Any) -> DictConfig:
    """The configuration `canaryml <command>` composes with these overrides."""
    from canaryml.cli import compose

    return compose(command, overrides(**kwargs))


def _run(command: str, kwargs: Mapping[str, Any]) -> DictConfig:
    from canaryml.cli import quiet_third_party

    quiet_third_party()  # the CLI's filters (Lightning's tip and pytree warning, …)
    cfg = config(command, **kwargs)
    task = importlib.import_module(f"canaryml.tasks.{command}")
    code = int(task.run(cfg) or 0)
    if code != 0:
        from canaryml.errors import CanarymlError

        raise CanarymlError(f"canaryml {command} ended with exit status {code}")
    return cfg


def _abs(path: Any) -> Path:
    p = Path(str(path)).expanduser()
    return p if p.is_absolute() else Path.cwd() / p


def simulate(out: str | Path = "data/raw/simulated", **kwargs: Any) -> Path:
    """Write a simulated telemetry bundle (`canaryml simulate`); returns its folder."""
    _run("simulate", {"out": str(out), **kwargs})
    return _abs(out)


def ingest(input: str | Path, out: str | Path, source: str = "bundle",
           **kwargs: Any) -> Path:
    """Validate telemetry and write the canonical dataset (`canaryml ingest`); returns its
    folder (manifest.json, deployments and samples)."""
    _run("ingest", {"source": source, "input": str(input), "out": str(out), **kwargs})
    return _abs(out)


def train(dataset: str | Path, **kwargs: Any) -> str:
    """Train a scorer, log the run to MLflow and register it as `@challenger` (`canaryml
    train`); returns the registered version's URI, `models:/<name>/<version>` (usable as
    replay's `model=` and by `load_scorer`). `scorer_out=DIR` also saves it there."""
    from mlflow.tracking import MlflowClient

    from canaryml import tracking

    cfg = _run("train", {"dataset": str(dataset), **kwargs})
    name = str(cfg.mlflow.registered_model)
    uri = tracking.tracking_uri(cfg.mlflow.tracking_uri)
    mv = MlflowClient(tracking_uri=uri, registry_uri=uri).get_model_version_by_alias(
        name, "challenger")
    return f"models:/{name}/{mv.version}"


def replay(model: str | Path, dataset: str | Path | list[str | Path], out: str | Path,
           **kwargs: Any) -> Path:
    """Replay past deployments through the controller (`canaryml replay`); returns the output
    folder (summary.json, decisions.parquet, the report)."""
    data: Any = [str(d) for d in dataset] if isinstance(dataset, list) else str(dataset)
    _run("replay", {"model": str(model), "dataset": data, "out": str(out), **kwargs})
    return _abs(out)


def load_scorer(uri: str | Path) -> CanaryScorer:
    """A CanaryScorer from `models:/name@alias`, `models:/name/N`, `runs:/…` or a directory."""
    from canaryml.tracking import load_scorer as _load

    return _load(str(uri))


class _CallablePackage(types.ModuleType):
    """A subpackage that is also the API function of the same name (`canaryml.simulate`)."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        name = self.__name__.rsplit(".", 1)[1]
        return globals()[name](*args, **kwargs)


def callable_package(module_name: str) -> None:
    """Make the (already imported) package `module_name` callable as its API function."""
    module = sys.modules[module_name]
    if not isinstance(module, _CallablePackage):
        module.__class__ = _CallablePackage
