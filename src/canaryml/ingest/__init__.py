"""Telemetry readers (DESIGN §3): every source becomes a validated bundle, then one writer.

Each reader returns an `Ingested`: the validated `Bundle` (deployments + long samples), the
source's native step, optional per-timestamp anomaly labels (SMD, NAB), catalog entries for
metrics the default catalog does not know (`smd_00`…, NAB `value`) and, for sources whose units
differ from the default catalog (Nezha), the source's own catalog. `ingest()` writes it as the
canonical dataset (DESIGN §2.3) with `write_canonical`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from canaryml.catalog import Catalog, MetricSpec
from canaryml.data.contract import Bundle
from canaryml.data.dataset import write_canonical
from canaryml.errors import ConfigError

SOURCES = ("bundle", "smd", "nab", "prometheus", "nezha")


@dataclass(frozen=True)
class Ingested:
    """What a reader produced, before it is resampled and written."""

    bundle: Bundle
    source: str
    native_step_s: int
    point_labels: pd.DataFrame | None = None  # deployment_id, timestamp (UTC), anomaly (0/1)
    metrics: tuple[MetricSpec, ...] = ()  # catalog entries for metrics the catalog lacks
    # the source's own catalog (Nezha: conf/metrics/nezha.yaml): its entries win over the
    # command's `metrics` catalog, which only fills in metrics it does not define
    catalog: Catalog | None = None
    extra_manifest: dict[str, Any] = field(default_factory=dict)


def extend_catalog(catalog: Catalog, specs: tuple[MetricSpec, ...]) -> Catalog:
    """`catalog` plus `specs` for names it does not define (its own entries win)."""
    known = set(catalog.names)
    return Catalog(catalog.metrics + tuple(s for s in specs if s.name not in known))


def write_ingested(ingested: Ingested, out: str | Path, *, catalog: Catalog,
                   step_s: int | None = None, name: str | None = None) -> dict[str, Any]:
    """Resample `ingested` onto `step_s` (None = the source's native step) and write it."""
    step = int(step_s) if step_s is not None else int(ingested.native_step_s)
    if step <= 0:
        raise ConfigError(f"ingest.step_s={step_s} must be a positive number of seconds or null")
    extra = {**ingested.extra_manifest, "name": name or Path(out).name,
             "native_step_s": int(ingested.native_step_s)}
    if ingested.catalog is not None:
        catalog = extend_catalog(ingested.catalog, catalog.metrics)
    return write_canonical(ingested.bundle, out, step_s=step,
                           catalog=extend_catalog(catalog, ingested.metrics),
                           source=ingested.source, point_labels=ingested.point_labels,
                           extra_manifest=extra)

# `canaryml.ingest(...)` is the Python API function (canaryml.api): the package is callable
from canaryml.api import callable_package as _callable_package  # noqa: E402

_callable_package(__name__)
