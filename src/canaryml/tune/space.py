"""Search spaces (`conf/tune/*.yaml` → `tune.space`): Hydra override keys → Optuna distributions.

Each entry maps an override key to a distribution:

    forecaster: {type: categorical, choices: [lstm, transformer]}   # a config group choice
    forecaster.lr: {type: float, low: 1.0e-4, high: 1.0e-2, log: true}
    detector.n_estimators: {type: int, low: 50, high: 300, step: 50}

Keys are validated against the composed config before any trial starts, so a typo fails fast.
A space file that extends another (Hydra defaults list) drops an inherited entry with `key: null`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from omegaconf import DictConfig, OmegaConf

from canaryml.errors import ConfigError

_TYPES = ("float", "int", "categorical")


@dataclass(frozen=True)
class Param:
    key: str
    distribution: optuna.distributions.BaseDistribution

    def override(self, value: Any) -> str:
        return f"{self.key}={value}"


def parse_space(space: Mapping[str, Any]) -> list[Param]:
    """Parse `tune.space` into Optuna distributions; raise ConfigError on a malformed entry."""
    if not space or all(v is None for v in space.values()):
        raise ConfigError("tune.space is empty; list at least one parameter (see conf/tune/)")
    params = []
    for key, raw in space.items():
        where = f"tune.space.{key}"
        if raw is None:  # `key: null` drops a parameter inherited from another space file
            continue
        if not isinstance(raw, Mapping) or raw.get("type") not in _TYPES:
            raise ConfigError(f"{where}: give `type: float|int|categorical` and its range")
        kind = raw["type"]
        unknown = set(raw) - {"type", "low", "high", "log", "step", "choices"}
        if unknown:
            raise ConfigError(f"{where}: unknown field(s) {sorted(unknown)}")
        dist: optuna.distributions.BaseDistribution
        if kind == "categorical":
            choices = list(raw.get("choices") or [])
            if not choices:
                raise ConfigError(f"{where}: `choices` is empty; list at least one value")
            dist = optuna.distributions.CategoricalDistribution(choices)
        else:
            if "low" not in raw or "high" not in raw:
                raise ConfigError(f"{where}: give `low` and `high`")
            low, high = raw["low"], raw["high"]
            if not low < high:
                raise ConfigError(f"{where}: empty range low={low} ≥ high={high}; make low < high")
            log = bool(raw.get("log", False))
            if log and low <= 0:
                raise ConfigError(f"{where}: log scale needs low > 0 (got {low})")
            step = raw.get("step")
            if kind == "int":
                dist = optuna.distributions.IntDistribution(int(low), int(high), log=log,
                                                            step=int(step or 1))
            else:
                dist = optuna.distributions.FloatDistribution(float(low), float(high), log=log,
                                                              step=None if step is None
                                                              else float(step))
        params.append(Param(str(key), dist))
    return params


def validate_keys(params: list[Param], cfg: DictConfig, groups: Mapping[str, list[str]]) -> None:
    """Every key must be a config group (with valid choices) or an existing config value."""
    for p in params:
        if p.key in groups:
            choices = getattr(p.distribution, "choices", None)
            if choices is None:
                raise ConfigError(f"tune.space.{p.key}: a config group takes `type: categorical`")
            bad = [c for c in choices if str(c) not in groups[p.key]]
            if bad:
                raise ConfigError(f"tune.space.{p.key}: unknown option(s) {bad}; "
                                  f"conf/{p.key}/ has {groups[p.key]}")
            continue
        if OmegaConf.select(cfg, p.key, default="__missing__") == "__missing__":
            raise ConfigError(
                f"tune.space.{p.key}: no such parameter in the composed config; check the name "
                "against conf/<group>/<option>.yaml"
            )


def suggest(trial: optuna.Trial, params: list[Param]) -> list[str]:
    """Sample every parameter and return the Hydra overrides for this trial."""
    overrides = []
    for p in params:
        d = p.distribution
        if isinstance(d, optuna.distributions.CategoricalDistribution):
            value: Any = trial.suggest_categorical(p.key, d.choices)
        elif isinstance(d, optuna.distributions.IntDistribution):
            value = trial.suggest_int(p.key, d.low, d.high, step=d.step, log=d.log)
        elif isinstance(d, optuna.distributions.FloatDistribution):
            value = trial.suggest_float(p.key, d.low, d.high, step=d.step, log=d.log)
        else:
            raise ConfigError(f"tune.space.{p.key}: unsupported distribution {d!r}")
        overrides.append(p.override(value))
    return overrides


def config_groups(conf: Path) -> dict[str, list[str]]:
    """Config groups under `conf/` and their options: {"forecaster": ["lstm", ...], ...}."""
    return {d.name: sorted(p.stem for p in d.glob("*.yaml"))
            for d in sorted(conf.iterdir()) if d.is_dir()}


def defaults(params: list[Param], cfg: DictConfig, groups: Mapping[str, list[str]]
             ) -> dict[str, Any]:
    """Each parameter's value in the composed config `cfg` (the untuned default trial).

    A config group's current option is read from its `kind` field (conf/forecaster/lstm.yaml
    has `kind: lstm`); a group without one is left out and sampled."""
    out: dict[str, Any] = {}
    for p in params:
        if p.key in groups:
            kind = OmegaConf.select(cfg, f"{p.key}.kind", default=None)
            if kind is not None and kind in getattr(p.distribution, "choices", ()):
                out[p.key] = kind
            continue
        value = OmegaConf.select(cfg, p.key, default=None)
        if value is None:
            continue
        if isinstance(p.distribution, optuna.distributions.CategoricalDistribution):
            if value not in p.distribution.choices:
                continue
        elif isinstance(p.distribution, optuna.distributions.IntDistribution):
            value = int(value)
        else:
            value = float(value)
        out[p.key] = value
    return out
