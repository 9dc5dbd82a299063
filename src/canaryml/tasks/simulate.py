"""`canaryml simulate out=DIR n=200 seed=0`: write a simulated telemetry bundle (DESIGN §2.1)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, cast

from omegaconf import DictConfig, OmegaConf

from canaryml.catalog import Catalog
from canaryml.data.contract import write_bundle
from canaryml.errors import ConfigError
from canaryml.simulate import (
    SimParams,
    deployments_table,
    family_summary,
    samples_table,
    simulate_deployments,
)

log = logging.getLogger(__name__)
DEFAULT_OUT = "data/simulated"


def run(cfg: DictConfig) -> int:
    params = SimParams.from_mapping(cast(dict[str, Any],
                                         OmegaConf.to_container(cfg.simulate, resolve=True)))
    catalog = Catalog.from_mapping(cast(dict[str, Any],
                                        OmegaConf.to_container(cfg.metrics, resolve=True)),
                                   source="conf/metrics")
    try:
        n, seed = int(cfg.n), int(cfg.seed)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"n={cfg.n!r} and seed={cfg.seed!r} must be integers") from exc
    out = Path(str(cfg.out)) if cfg.get("out") not in (None, "") else Path(DEFAULT_OUT)
    out = out.expanduser()
    if not out.is_absolute():
        out = Path.cwd() / out
    deps = simulate_deployments(n, seed, params, catalog)
    deployments = deployments_table(deps)
    samples = samples_table(deps)
    write_bundle(deployments, samples, out, fmt=params.format)
    n_faulty = int((deployments["label"] == "faulty").sum())
    log.info("wrote %d deployments (%d faulty), %d samples to %s", len(deployments), n_faulty,
             samples.num_rows, out)
    table = family_summary(deps)
    print(f"simulated {len(deployments)} deployments ({n_faulty} faulty, "
          f"{len(deployments) - n_faulty} healthy), {samples.num_rows} samples, "
          f"seed={seed} -> {out}")
    print(table.to_string(index=False, na_rep="-"))
    return 0
