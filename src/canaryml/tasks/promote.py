"""`canaryml promote [dataset=DIR] [registry.gates.…=…]` and `canaryml promote --to-version N`.

Moves alias `champion` to the `challenger` version only when the replay gates in
conf/registry/default.yaml pass (see canaryml.registry); otherwise exits non-zero naming each
failed gate with both numbers. `to_version=N` (CLI spelling `--to-version N`) moves `champion`
back to version N (model rollback). Every outcome is recorded as an MLflow run named `promote`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, cast

from omegaconf import DictConfig, OmegaConf

from canaryml.errors import ConfigError

log = logging.getLogger(__name__)


def translate_args(args: Sequence[str]) -> list[str]:
    """CLI spellings → Hydra overrides: `--to-version N` / `--to-version=N` → `to_version=N`."""
    out: list[str] = []
    it = iter(args)
    for arg in it:
        if arg == "--to-version":
            value = next(it, None)
            if value is None or value.startswith("-") or "=" in value:
                raise ConfigError("--to-version needs a version number, e.g. "
                                  "`canaryml promote --to-version 3`")
            out.append(f"to_version={value}")
        elif arg.startswith("--to-version="):
            out.append(f"to_version={arg.split('=', 1)[1]}")
        else:
            out.append(arg)
    return out


def run(cfg: DictConfig) -> int:
    from canaryml import registry, tracking
    from canaryml.control.policy import PolicyConfig
    from canaryml.tasks.train import _dataset

    def as_dict(node: Any) -> dict[str, Any]:
        return cast(dict[str, Any], OmegaConf.to_container(node, resolve=True))

    tracking.configure(cfg.mlflow.tracking_uri)
    name = str(cfg.mlflow.registered_model)
    experiment = str(cfg.mlflow.experiment)
    settings = registry.PromoteSettings.from_mapping(as_dict(cfg.registry))
    conf = as_dict(cfg)
    if cfg.get("to_version") is not None:
        version = str(cfg.to_version).strip()
        if not version.isdigit():
            raise ConfigError(f"to_version={cfg.to_version!r} is not a version number; use "
                              "`canaryml promote --to-version 3`")
        res = registry.rollback_to(name, version, champion_alias=settings.champion_alias,
                                   experiment=experiment, config=conf)
    else:
        ds = _dataset(str(cfg.dataset))
        pcfg = PolicyConfig.from_mapping(as_dict(cfg.policy))
        res = registry.promote(name, ds, pcfg, as_dict(cfg.replay), settings,
                               experiment=experiment, config=conf)
    print(res.summary())
    for g in res.gates:
        print(f"  {'PASS' if g.passed else 'FAIL'} {g.message}")
    if res.run_id:
        print(f"  recorded as MLflow run {res.run_id}")
    return 0
