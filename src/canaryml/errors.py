"""Specific exceptions. Every message names the bad input and says how to fix it."""

from __future__ import annotations

from collections.abc import Iterable


class CanarymlError(Exception):
    """Base class: the CLI prints the message and exits non-zero without a traceback."""


class ConfigError(CanarymlError):
    """A configuration value is missing, unknown or out of range."""


class DataContractError(CanarymlError):
    """Input telemetry violates the data contract (DESIGN §2)."""


class ModelLoadError(CanarymlError):
    """A scorer could not be loaded from a directory or the model registry."""


class ScoringError(CanarymlError):
    """A window cannot be scored (unknown metrics, too short, all NaN)."""


class PromotionGateError(CanarymlError):
    """`promote` refused: a replay gate failed."""


class SourceError(CanarymlError):
    """A live telemetry source (Prometheus, Kafka) failed or returned no data."""


class ActuatorError(CanarymlError):
    """An actuator (Kubernetes, Argo Rollouts, Flagger, Swarm) could not apply an action."""


def reject_unknown_keys(data: Iterable[str], known: Iterable[str], where: str) -> None:
    """ConfigError naming the keys of `data` that are not in `known` (a typo in a config file)."""
    allowed = set(known)
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise ConfigError(f"{where} has unknown key(s) {unknown}; allowed: {sorted(allowed)}")


def config_int(value: object, key: str, *, low: int | None = None, high: int | None = None) -> int:
    """`value` of config key `key` as an int in [low, high], or a ConfigError naming the key."""
    try:
        number = int(value)  # type: ignore[call-overload]
        if isinstance(value, float) and number != value:
            raise ValueError
    except (TypeError, ValueError):
        raise ConfigError(f"{key}={value!r} is not a whole number; give e.g. {key}=15") from None
    if (low is not None and number < low) or (high is not None and number > high):
        bounds = f"[{low if low is not None else '-inf'}, {high if high is not None else 'inf'}]"
        raise ConfigError(f"{key}={number} is outside {bounds}")
    return number
