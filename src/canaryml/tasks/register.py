"""`canaryml register scorer=DIR [alias=challenger]`: register a saved CanaryScorer directory.

The directory is what `CanaryScorer.save` writes (e.g. `canaryml train scorer_out=models/scorer`,
the DVC `train` stage's output). It becomes a new version of the registered model (default
`canary-scorer`, logged as a pyfunc with signature and input example) in an MLflow run named
`register` that carries the scorer's training dataset hash when the bundle knows it; `alias`
(default `challenger`, `alias=null` for none) is pointed at the new version.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

from omegaconf import DictConfig, OmegaConf

from canaryml.errors import ConfigError

log = logging.getLogger(__name__)


def translate_args(args: Sequence[str]) -> list[str]:
    """`scorer=DIR` → `scorer_dir=DIR` (`scorer` is also the scorer config group, which register
    does not use) and `alias=X` → `registry.register_alias=X`."""
    out: list[str] = []
    for arg in args:
        key, sep, value = arg.partition("=")
        if sep and key in ("scorer", "scorer_dir"):
            out.append(f"scorer_dir={value}")
        elif sep and key == "alias":
            out.append(f"registry.register_alias={value}")
        else:
            out.append(arg)
    return out


def run(cfg: DictConfig) -> int:
    from canaryml import tracking

    raw = cfg.get("scorer_dir")
    if not raw:
        raise ConfigError("register needs scorer=DIR: a directory written by CanaryScorer.save "
                          "(e.g. `canaryml train dataset=DIR scorer_out=models/scorer`, then "
                          "`canaryml register scorer=models/scorer`)")
    path = Path(str(raw))
    if not path.is_dir():
        raise ConfigError(f"scorer={raw!r} is not a directory; give the folder written by "
                          "CanaryScorer.save (it holds scorer.json)")
    scorer = tracking.load_scorer(str(path))  # ModelLoadError names what is wrong with the bundle
    alias = cfg.registry.get("register_alias")
    alias = None if alias in (None, "", "null", "none", "None") else str(alias)
    name = str(cfg.mlflow.registered_model)
    dataset_hash = scorer.info.get("dataset_hash")
    conf = cast(dict[str, Any], OmegaConf.to_container(cfg, resolve=True))
    tracking.configure(cfg.mlflow.tracking_uri)
    with tracking.start_run(conf, experiment=str(cfg.mlflow.experiment), run_name="register",
                            dataset_hash=None if dataset_hash is None else str(dataset_hash),
                            tags={"command": "register", "scorer_dir": str(path.resolve()),
                                  # lineage: the version's own run is this one; link the training
                                  "train_run_id": str(scorer.info.get("train_run_id") or "")}
                            ) as run:
        mv = tracking.log_scorer(scorer, name, alias=alias)
    print(f"registered {name} v{mv.version}{f' @{alias}' if alias else ''} from {path} "
          f"(run {run.info.run_id}, dataset_hash={dataset_hash or 'unknown'})")
    return 0
