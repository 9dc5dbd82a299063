"""Metric catalog (DESIGN §2.2): which metrics are app vs infra, which direction is bad, SLOs."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

import yaml

from canaryml.errors import ConfigError

log = logging.getLogger(__name__)


class MetricKind(StrEnum):
    APP = "app"
    INFRA = "infra"


class Direction(StrEnum):
    UP = "up"
    DOWN = "down"
    BOTH = "both"


@dataclass(frozen=True)
class MetricSpec:
    name: str
    kind: MetricKind = MetricKind.APP
    direction: Direction = Direction.BOTH
    slo: float | None = None
    unit: str = ""

    def breaches(self, value: float) -> bool:
        """True when `value` violates this metric's SLO (False when there is no SLO)."""
        if self.slo is None or value != value:  # NaN never breaches
            return False
        if self.direction is Direction.DOWN:
            return value < self.slo
        return value > self.slo


@dataclass(frozen=True)
class Catalog:
    metrics: tuple[MetricSpec, ...]

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], source: str = "<mapping>") -> Catalog:
        specs = []
        for name, raw in data.items():
            raw = dict(raw or {})
            unknown = set(raw) - {"kind", "direction", "slo", "unit"}
            if unknown:
                raise ConfigError(
                    f"metric catalog {source}: metric {name!r} has unknown keys {sorted(unknown)}; "
                    "allowed: kind, direction, slo, unit"
                )
            try:
                kind = MetricKind(raw.get("kind", "app"))
                direction = Direction(raw.get("direction", "both"))
            except ValueError as exc:
                raise ConfigError(
                    f"metric catalog {source}: metric {name!r}: {exc}; kind is app|infra, "
                    "direction is up|down|both"
                ) from exc
            slo = raw.get("slo")
            specs.append(
                MetricSpec(
                    name=str(name),
                    kind=kind,
                    direction=direction,
                    slo=None if slo is None else float(slo),
                    unit=str(raw.get("unit", "")),
                )
            )
        return cls(tuple(specs))

    @classmethod
    def load(cls, path: str | Path) -> Catalog:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"metric catalog {path} does not exist; see conf/metrics/default.yaml")
        return cls.from_mapping(yaml.safe_load(path.read_text()) or {}, source=str(path))

    @classmethod
    def default(cls) -> Catalog:
        from canaryml.paths import conf_dir

        return cls.load(conf_dir() / "metrics" / "default.yaml")

    def to_mapping(self) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for m in self.metrics:
            entry: dict[str, Any] = {"kind": str(m.kind), "direction": str(m.direction), "unit": m.unit}
            if m.slo is not None:
                entry["slo"] = m.slo
            out[m.name] = entry
        return out

    @property
    def names(self) -> list[str]:
        return [m.name for m in self.metrics]

    def __contains__(self, name: object) -> bool:
        return any(m.name == name for m in self.metrics)

    def get(self, name: str) -> MetricSpec:
        """The spec for `name`; unknown metrics are app/both without SLO (DESIGN §2.2)."""
        for m in self.metrics:
            if m.name == name:
                return m
        return MetricSpec(name=name)

    def with_metrics(self, names: Iterable[str]) -> Catalog:
        """Catalog restricted/extended to `names` in catalog order, unknown names appended sorted.

        Unknown metrics are kept, with a warning, as app/both.
        """
        names = set(names)
        known = [m for m in self.metrics if m.name in names]
        unknown = sorted(names - {m.name for m in known})
        if unknown:
            log.warning(
                "metrics not in the catalog kept as kind=app direction=both: %s "
                "(add them to conf/metrics/*.yaml to set kind, direction and SLO)",
                ", ".join(unknown),
            )
        return Catalog(tuple(known) + tuple(MetricSpec(name=n) for n in unknown))

    def slo_metrics(self) -> list[MetricSpec]:
        return [m for m in self.metrics if m.slo is not None]
