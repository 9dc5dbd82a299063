"""A corpus of simulated canary deployments as bundle tables (DESIGN §2.1)."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
from tqdm.auto import tqdm

from canaryml.catalog import Catalog
from canaryml.data.contract import DICT, GROUPS, TS
from canaryml.errors import ConfigError
from canaryml.simulate.model import SimulatedDeployment, generate
from canaryml.simulate.params import SimParams

log = logging.getLogger(__name__)

# R2 low-discrepancy sequence (plastic number): label and family per index are spread evenly
# over any prefix of the corpus, yet depend only on (seed, index).
_PLASTIC = 1.32471795724474602596
_A1, _A2 = 1.0 / _PLASTIC, 1.0 / _PLASTIC**2


def plan_family(seed: int, index: int, params: SimParams) -> str:
    """The family of deployment `index` in corpus `seed`.

    The share of faulty deployments in any prefix stays within a few deployments of
    `params.faulty_share`, and each label's families follow their weights.
    """
    u1, u2 = np.random.default_rng([seed, 2**32 - 1]).random(2)
    x = math.fmod(u1 + index * _A1, 1.0)
    y = math.fmod(u2 + index * _A2, 1.0)
    families = params.fault_families if x < params.faulty_share else params.healthy_variants
    weights = np.array([w for _, w in families])
    cum = np.cumsum(weights) / weights.sum()
    return families[min(int(np.searchsorted(cum, y, side="right")), len(families) - 1)][0]


def simulate_deployment(family: str, seed: int = 0, params: SimParams | Mapping[str, Any] |
                        None = None, catalog: Catalog | None = None, index: int = 0,
                        deployment_id: str | None = None, onset_style: str | None = None
                        ) -> SimulatedDeployment:
    """One deployment of `family` as wide arrays (for demos and live tests that stream a canary).

    Identical to deployment `index` of `simulate_corpus(…, seed)` when that deployment has the
    same family (and, with `onset_style` set, the same onset style; unset = drawn as in the
    corpus). `onset_style` is one of `from_start_step`, `from_start_ramp`, `mid_run`.
    """
    return generate(family, seed, index, SimParams.coerce(params), catalog or Catalog.default(),
                    deployment_id=deployment_id, onset_style=onset_style)


def simulate_deployments(n: int, seed: int = 0, params: SimParams | Mapping[str, Any] | None = None,
                         catalog: Catalog | None = None, progress: bool | None = None
                         ) -> list[SimulatedDeployment]:
    """The `n` deployments of corpus `seed` as wide arrays. A progress bar shows for n >= 50."""
    if n < 1:
        raise ConfigError(f"n={n}: simulate needs at least one deployment (n=200 by default)")
    p = SimParams.coerce(params)
    cat = catalog or Catalog.default()
    show = n >= 50 if progress is None else progress
    return [generate(plan_family(seed, i, p), seed, i, p, cat)
            for i in tqdm(range(n), desc="simulate", unit="dep", disable=not show)]


def simulate_corpus(n: int = 200, seed: int = 0, params: SimParams | Mapping[str, Any] |
                    None = None, catalog: Catalog | None = None, progress: bool | None = None
                    ) -> tuple[pd.DataFrame, pa.Table]:
    """`n` simulated deployments as bundle tables: (deployments DataFrame, samples Arrow table).

    `params` is a SimParams or the `simulate` config section (None = conf/simulate/default.yaml);
    `catalog` defaults to conf/metrics/default.yaml and supplies the metrics and SLOs.
    Deployments carry the contract's columns plus `variant` (the family, for every row) and
    `fault_onset_style` (`from_start_step`, `from_start_ramp` or `mid_run`; empty if healthy);
    samples are long format (timestamp, deployment_id, group, metric, value) in per-series
    order. Write them with `canaryml.data.contract.write_bundle`.
    """
    deps = simulate_deployments(n, seed, params, catalog, progress)
    return deployments_table(deps), samples_table(deps)


def deployments_table(deps: Sequence[SimulatedDeployment]) -> pd.DataFrame:
    def ts(values: list[int | None]) -> pd.Series:
        return pd.to_datetime(pd.Series([np.nan if v is None else float(v) for v in values]),
                              unit="s", utc=True).dt.as_unit("us")

    return pd.DataFrame({
        "deployment_id": pd.Series([d.deployment_id for d in deps], dtype="str"),
        "service": pd.Series([d.service for d in deps], dtype="str"),
        "start": ts([int(d.timestamps_s[0]) for d in deps]),
        "end": ts([int(d.timestamps_s[-1]) for d in deps]),
        "label": pd.Series([d.label for d in deps], dtype="str"),
        "fault_onset": ts([d.fault_onset_s for d in deps]),
        "impact_at": ts([d.impact_at_s for d in deps]),
        "fault_kind": pd.Series([d.fault_kind for d in deps], dtype="object"),
        "variant": pd.Series([d.family for d in deps], dtype="str"),
        "fault_onset_style": pd.Series([d.onset_style for d in deps], dtype="object"),
    })


def samples_table(deps: Sequence[SimulatedDeployment]) -> pa.Table:
    """Long-format samples in per-series order (deployment, group, metric, time)."""
    if not deps:
        raise ConfigError("no deployments to write")
    metrics = deps[0].metrics
    M = len(metrics)
    ts_parts, dep_parts, grp_parts, met_parts, val_parts = [], [], [], [], []
    for k, d in enumerate(deps):
        if d.metrics != metrics:
            raise ConfigError(f"deployment {d.deployment_id} has metrics {d.metrics}, "
                              f"expected {metrics}; simulate all with one catalog")
        T = len(d.timestamps_s)
        vals = np.stack([d.baseline, d.canary])  # [2, T, M]
        keep = ~d.row_missing.transpose(0, 2, 1).reshape(-1)  # (group, metric, time)
        ts_parts.append(np.tile(d.timestamps_s * 1_000_000, 2 * M)[keep])
        grp_parts.append(np.repeat(np.arange(2, dtype=np.int32), M * T)[keep])
        met_parts.append(np.tile(np.repeat(np.arange(M, dtype=np.int32), T), 2)[keep])
        val_parts.append(vals.transpose(0, 2, 1).reshape(-1)[keep])
        dep_parts.append(np.full(int(keep.sum()), k, dtype=np.int32))
    return pa.table({
        "timestamp": pa.array(np.concatenate(ts_parts), pa.int64()).cast(
            pa.timestamp("us")).cast(TS),
        "deployment_id": pa.DictionaryArray.from_arrays(
            pa.array(np.concatenate(dep_parts)),
            pa.array([d.deployment_id for d in deps], pa.string())).cast(DICT),
        "group": pa.DictionaryArray.from_arrays(
            pa.array(np.concatenate(grp_parts)), pa.array(list(GROUPS), pa.string())),
        "metric": pa.DictionaryArray.from_arrays(
            pa.array(np.concatenate(met_parts)), pa.array(list(metrics), pa.string())),
        "value": pa.array(np.concatenate(val_parts), pa.float64()),
    })


def family_summary(deps: Sequence[SimulatedDeployment] | pd.DataFrame) -> pd.DataFrame:
    """Counts per family: label, family, n, breached (canary SLO breach in the window; for
    healthy families a breach caused by a shared event), median onset→impact minutes."""
    rows = []
    if isinstance(deps, pd.DataFrame):
        frame = deps
        breach = frame["impact_at"]
    else:
        frame = deployments_table(deps)
        breach = pd.to_datetime(pd.Series([np.nan if d.breach_at_s is None else d.breach_at_s
                                           for d in deps], dtype=float), unit="s", utc=True)
    frame = frame.assign(_breach=breach.to_numpy())
    for (label, family), grp in frame.groupby(["label", "variant"], sort=True):
        lead = (grp["impact_at"] - grp["fault_onset"]).dt.total_seconds() / 60.0
        rows.append({"label": label, "family": family, "n": len(grp),
                     "breached": int(grp["_breach"].notna().sum()),
                     "onset_to_impact_min_p50": (round(float(lead.median()), 1)
                                                 if lead.notna().any() else None)})
    return pd.DataFrame(rows, columns=["label", "family", "n", "breached",
                                       "onset_to_impact_min_p50"])
