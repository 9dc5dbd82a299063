"""Simulator parameters: a frozen value built from `conf/simulate/*.yaml` (or any mapping)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from canaryml.errors import ConfigError, reject_unknown_keys

FAULT_FAMILIES = (
    "mem_leak",
    "latency_creep",
    "error_ramp",
    "cpu_hot_loop",
    "conn_pool_exhaustion",
    "slow_storage",
)
HEALTHY_VARIANTS = ("plain", "benign_shift", "traffic_surge", "shared_downstream_slowdown")
FAMILIES = FAULT_FAMILIES + HEALTHY_VARIANTS
# how a fault begins on the canary (the bundle's `fault_onset_style` column)
ONSET_STYLES = ("from_start_step", "from_start_ramp", "mid_run")


def label_of(family: str) -> str:
    """`faulty` for a fault family, `healthy` for a healthy variant."""
    if family in FAULT_FAMILIES:
        return "faulty"
    if family in HEALTHY_VARIANTS:
        return "healthy"
    raise ConfigError(f"unknown simulator family {family!r}; known: {', '.join(FAMILIES)}")


def _range(name: str, raw: Any, low: float = -math.inf, high: float = math.inf
           ) -> tuple[float, float]:
    if isinstance(raw, str) or not isinstance(raw, Sequence) or len(raw) != 2:
        raise ConfigError(f"simulate.{name}={raw!r} must be a [low, high] pair")
    a, b = float(raw[0]), float(raw[1])
    if not (low <= a <= b <= high):
        raise ConfigError(f"simulate.{name}={[a, b]} must satisfy {low} <= low <= high <= {high}")
    return a, b


def _weights(name: str, raw: Any, known: tuple[str, ...]) -> tuple[tuple[str, float], ...]:
    if not isinstance(raw, Mapping):
        raise ConfigError(f"simulate.{name} must map family -> weight, e.g. {{{known[0]}: 1}}")
    unknown = sorted(set(map(str, raw)) - set(known))
    if unknown:
        raise ConfigError(f"simulate.{name} has unknown families {unknown}; known: "
                          f"{', '.join(known)}")
    out = tuple((str(k), float(v)) for k, v in raw.items() if float(v) > 0)
    if any(float(v) < 0 for v in raw.values()):
        raise ConfigError(f"simulate.{name}: weights must be >= 0")
    if not out:
        raise ConfigError(f"simulate.{name}: at least one family needs a positive weight")
    return out


@dataclass(frozen=True)
class SimParams:
    """Everything the simulator draws from. Times in seconds; ranges are [low, high].

    `breach_after_s` is the planned time from fault onset to the canary's SLO breach in the
    noise-free model (log-uniform); beyond the end of the window the fault never breaches.
    A share `from_start_share` of faults is bad from the canary's first sample (onset = the
    deployment's start); of those, `from_start_step_share` are steps (the driven metric jumps to
    `step_level` × its SLO headroom at once, then grows by `step_drift_per_h` per hour) and the
    rest ramps from zero. The other faults begin mid-run, at a point of `onset_window`.
    The real `impact_at` label is always recomputed from the generated series.
    """

    step_s: int = 15
    duration_s: int = 3600
    start: str = "2024-05-06T00:00:00Z"
    spacing_s: int = 7200
    format: str = "parquet"
    faulty_share: float = 0.5
    fault_families: tuple[tuple[str, float], ...] = tuple((f, 1.0) for f in FAULT_FAMILIES)
    healthy_variants: tuple[tuple[str, float], ...] = (
        ("plain", 2.0), ("benign_shift", 1.0), ("traffic_surge", 1.0),
        ("shared_downstream_slowdown", 1.0))
    onset_window: tuple[float, float] = (1 / 3, 2 / 3)
    from_start_share: float = 0.5
    from_start_step_share: float = 0.5
    step_level: tuple[float, float] = (0.25, 1.25)
    step_drift_per_h: tuple[float, float] = (0.0, 0.6)
    breach_after_s: tuple[float, float] = (120.0, 3000.0)
    noise: float = 1.0
    tail_df: float = 4.0
    scrape_miss_rate: float = 0.01
    missing_rows_share: float = 0.5
    glitch_rate: float = 0.0005
    baseline_pods: tuple[int, int] = (2, 6)
    canary_pods: tuple[int, int] = (1, 2)
    memory_limit_bytes: float = 2.0e9
    surge_factor: tuple[float, float] = (1.5, 3.0)
    slowdown_headroom_share: tuple[float, float] = (0.2, 0.85)
    benign_cpu_factor: tuple[float, float] = (1.03, 1.15)
    benign_memory_factor: tuple[float, float] = (1.05, 1.2)
    services: tuple[str, ...] = field(default=(
        "checkout", "cart", "search", "payments", "catalog", "auth", "recommendations",
        "shipping"))

    @property
    def steps(self) -> int:
        return self.duration_s // self.step_s

    @property
    def start_s(self) -> int:
        """Corpus start as epoch seconds (UTC)."""
        ts = pd.Timestamp(self.start)
        ts = ts.tz_localize("UTC") if ts.tzinfo is None else ts.tz_convert("UTC")
        return int(ts.timestamp())

    @classmethod
    def from_mapping(cls, raw: Mapping[str, Any]) -> SimParams:
        """Build from `conf/simulate/*.yaml` content (a dict or a DictConfig section).

        Raises ConfigError naming the key for unknown keys and out-of-range values.
        """
        data = {str(k): _plain(v) for k, v in raw.items()}
        reject_unknown_keys(data, (f.name for f in fields(cls)), "simulate")
        kw: dict[str, Any] = {}
        for key, value in data.items():
            if key in ("fault_families", "healthy_variants"):
                kw[key] = _weights(key, value, FAULT_FAMILIES if key == "fault_families"
                                   else HEALTHY_VARIANTS)
            elif key in ("onset_window",):
                kw[key] = _range(key, value, 0.0, 1.0)
            elif key in ("breach_after_s", "surge_factor", "slowdown_headroom_share",
                         "benign_cpu_factor", "benign_memory_factor", "step_level",
                         "step_drift_per_h"):
                kw[key] = _range(key, value, 0.0)
            elif key in ("baseline_pods", "canary_pods"):
                a, b = _range(key, value, 1.0)
                kw[key] = (int(a), int(b))
            elif key == "services":
                if isinstance(value, str) or not isinstance(value, Sequence) or not value:
                    raise ConfigError("simulate.services must be a non-empty list of names")
                kw[key] = tuple(str(s) for s in value)
            elif key in ("step_s", "duration_s", "spacing_s"):
                kw[key] = int(value)
            elif key in ("start", "format"):
                kw[key] = str(value)
            else:
                try:
                    kw[key] = float(value)
                except (TypeError, ValueError) as exc:
                    raise ConfigError(f"simulate.{key}={value!r} must be a number") from exc
        params = cls(**kw)
        params.validate()
        return params

    @classmethod
    def load(cls, path: str | Path) -> SimParams:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"simulator config {path} does not exist; see conf/simulate/")
        return cls.from_mapping(yaml.safe_load(path.read_text()) or {})

    @classmethod
    def default(cls) -> SimParams:
        """`conf/simulate/default.yaml` of this checkout."""
        from canaryml.paths import conf_dir

        return cls.load(conf_dir() / "simulate" / "default.yaml")

    @classmethod
    def coerce(cls, params: SimParams | Mapping[str, Any] | None) -> SimParams:
        if params is None:
            return cls.default()
        if isinstance(params, SimParams):
            return params
        return cls.from_mapping(params)

    def validate(self) -> None:
        if self.step_s <= 0:
            raise ConfigError(f"simulate.step_s={self.step_s} must be > 0 seconds")
        if self.steps < 12:
            raise ConfigError(f"simulate.duration_s={self.duration_s} gives {self.steps} steps of "
                              f"{self.step_s}s; need at least 12")
        if self.spacing_s < self.duration_s:
            raise ConfigError(f"simulate.spacing_s={self.spacing_s} must be >= duration_s="
                              f"{self.duration_s} (deployments of a service do not overlap)")
        if self.format not in ("parquet", "csv"):
            raise ConfigError(f"simulate.format={self.format!r} must be parquet or csv")
        for name in ("faulty_share", "scrape_miss_rate", "missing_rows_share", "glitch_rate"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"simulate.{name}={value} must be in [0, 1]")
        for name, meaning in (
                ("from_start_share", "0 = every fault begins mid-run, 1 = every fault is bad "
                 "from the canary's first sample"),
                ("from_start_step_share", "of the from-start faults, 0 = all ramp from zero, "
                 "1 = all are steps")):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"simulate.{name}={value} must be a share in [0, 1] "
                                  f"({meaning}); e.g. simulate.{name}=0.5")
        if not 0.0 < self.step_level[0] <= self.step_level[1] <= 3.0:
            raise ConfigError(f"simulate.step_level={list(self.step_level)} must satisfy "
                              "0 < low <= high <= 3 (share of the SLO headroom at the first "
                              "sample; 1 = breaches at once), e.g. [0.25, 1.25]")
        if self.scrape_miss_rate > 0.5 or self.glitch_rate > 0.1:
            raise ConfigError("simulate.scrape_miss_rate must be <= 0.5 and glitch_rate <= 0.1")
        if self.noise < 0 or self.tail_df <= 2:
            raise ConfigError(f"simulate.noise={self.noise} must be >= 0 and tail_df="
                              f"{self.tail_df} > 2 (finite variance)")
        if self.breach_after_s[0] < self.step_s:
            raise ConfigError(f"simulate.breach_after_s low end must be >= step_s={self.step_s}")
        if self.surge_factor[0] < 1.0:
            raise ConfigError("simulate.surge_factor must be >= 1 (a surge adds load)")
        try:
            self.start_s  # noqa: B018  (parses `start` now so a typo fails early)
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"simulate.start={self.start!r} is not a timestamp; write ISO-8601 "
                              "such as 2024-05-06T00:00:00Z") from exc

    def to_mapping(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in ("fault_families", "healthy_variants"):
                value = dict(value)
            elif isinstance(value, tuple):
                value = list(value)
            out[f.name] = value
        return out


def _plain(value: Any) -> Any:
    """DictConfig/ListConfig → dict/list without importing omegaconf in library code."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, Sequence) and not isinstance(value, str):
        return [_plain(v) for v in value]
    return value
