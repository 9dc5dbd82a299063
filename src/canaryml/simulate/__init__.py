"""Realistic canary corpus simulator (`canaryml simulate`).

Public API:
  simulate_corpus(n, seed, params, catalog) -> (deployments DataFrame, samples Arrow table)
  simulate_deployment(family, seed, params, catalog, index) -> SimulatedDeployment (wide arrays)
  SimParams.from_mapping(cfg.simulate) / SimParams.default()
See `canaryml.simulate.model` for the service model, fault families, onset styles and the
labelling rule.
"""

from __future__ import annotations

from canaryml.simulate.corpus import (
    deployments_table,
    family_summary,
    plan_family,
    samples_table,
    simulate_corpus,
    simulate_deployment,
    simulate_deployments,
)
from canaryml.simulate.model import (
    BREACH_RUN,
    SIM_METRICS,
    SimulatedDeployment,
    first_breach,
    plan_onset_style,
)
from canaryml.simulate.params import (
    FAMILIES,
    FAULT_FAMILIES,
    HEALTHY_VARIANTS,
    ONSET_STYLES,
    SimParams,
    label_of,
)

__all__ = [
    "BREACH_RUN",
    "FAMILIES",
    "FAULT_FAMILIES",
    "HEALTHY_VARIANTS",
    "ONSET_STYLES",
    "SIM_METRICS",
    "SimParams",
    "SimulatedDeployment",
    "deployments_table",
    "family_summary",
    "first_breach",
    "label_of",
    "plan_family",
    "plan_onset_style",
    "samples_table",
    "simulate_corpus",
    "simulate_deployment",
    "simulate_deployments",
]

# `canaryml.simulate(...)` is the Python API function (canaryml.api): the package is callable
from canaryml.api import callable_package as _callable_package

_callable_package(__name__)
