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


SHADOW_KEYS = {"required", "min_s", "min_decisions", "max_false_rollbacks", "min_agreement"}


def require_shadow(name: str, alias: str, shadow: dict[str, Any]) -> str | None:
    """With `registry.shadow.required`: the challenger must have run in shadow beside the
    champion (`canaryml serve serve.shadow.model=models:/<name>@<alias>`, which tags the version
    `canaryml.shadow.*`) long enough and well enough. Raises PromotionGateError naming each
    shortfall; returns a one-line summary of the shadow evidence, or None when not required."""
    from mlflow.tracking import MlflowClient

    from canaryml.errors import PromotionGateError
    from canaryml.serving.shadow import ShadowTally

    unknown = set(shadow) - SHADOW_KEYS
    if unknown:
        raise ConfigError(f"registry.shadow has unknown keys {sorted(unknown)}; allowed: "
                          f"{sorted(SHADOW_KEYS)}")
    if not shadow.get("required"):
        return None
    client = MlflowClient()
    try:
        mv = client.get_model_version_by_alias(name, alias)
    except Exception as exc:
        raise PromotionGateError(f"no @{alias} version of {name} to promote ({exc})") from exc
    tally = ShadowTally.from_tags(dict(mv.tags or {}))
    if not tally.decisions or tally.since is None or tally.last is None:
        raise PromotionGateError(
            f"{name}/{mv.version} (@{alias}) has not run in shadow, and registry.shadow.required "
            f"is true: run `canaryml serve serve.shadow.model=models:/{name}@{alias}` beside "
            "the champion first (or registry.shadow.required=false)")
    period = tally.last - tally.since
    short = []
    if shadow.get("min_s") is not None and period < float(shadow["min_s"]):
        short.append(f"shadow period {period:.0f} s < registry.shadow.min_s={shadow['min_s']}")
    if shadow.get("min_decisions") is not None and tally.decisions < int(shadow["min_decisions"]):
        short.append(f"{tally.decisions} shadow decision(s) < registry.shadow.min_decisions="
                     f"{shadow['min_decisions']}")
    false_rb = tally.outcomes.get("false_rollback", 0)
    if shadow.get("max_false_rollbacks") is not None and \
            false_rb > int(shadow["max_false_rollbacks"]):
        short.append(f"{false_rb} would-be false rollback(s) > "
                     f"registry.shadow.max_false_rollbacks={shadow['max_false_rollbacks']}")
    agreement = tally.agreement or 0.0
    if shadow.get("min_agreement") is not None and agreement < float(shadow["min_agreement"]):
        short.append(f"agreement with the champion {agreement:.3f} < "
                     f"registry.shadow.min_agreement={shadow['min_agreement']}")
    summary = (f"shadow: {tally.decisions} decision(s) over {period:.0f} s, agreement "
               f"{agreement:.3f}, would-be catches {tally.outcomes.get('catch', 0)}, false "
               f"rollbacks {false_rb}, misses {tally.outcomes.get('miss', 0)}")
    if short:
        raise PromotionGateError(f"{name}/{mv.version} (@{alias}) not promoted: "
                                 + "; ".join(short) + f" ({summary})")
    return summary


def run(cfg: DictConfig) -> int:
    from canaryml import registry, tracking
    from canaryml.control.policy import PolicyConfig
    from canaryml.tasks.train import _dataset

    def as_dict(node: Any) -> dict[str, Any]:
        return cast(dict[str, Any], OmegaConf.to_container(node, resolve=True))

    tracking.configure(cfg.mlflow.tracking_uri)
    name = str(cfg.mlflow.registered_model)
    experiment = str(cfg.mlflow.experiment)
    reg = as_dict(cfg.registry)
    shadow = dict(reg.pop("shadow", None) or {})
    settings = registry.PromoteSettings.from_mapping(reg)
    conf = as_dict(cfg)
    if cfg.get("to_version") is not None:
        version = str(cfg.to_version).strip()
        if not version.isdigit():
            raise ConfigError(f"to_version={cfg.to_version!r} is not a version number; use "
                              "`canaryml promote --to-version 3`")
        res = registry.rollback_to(name, version, champion_alias=settings.champion_alias,
                                   experiment=experiment, config=conf)
    else:
        shadow_summary = require_shadow(name, settings.challenger_alias, shadow)
        if shadow_summary is not None:
            print(shadow_summary)
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
