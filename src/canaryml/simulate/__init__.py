"""Realistic canary corpus simulator (`canaryml simulate`).

Public API:
  simulate_corpus(n, seed, params, catalog) -> (deployments DataFrame, samples Arrow table)
  simulate_deployment(family, seed, params, catalog, index) -> SimulatedDeployment (wide arrays)
  SimParams.from_mapping(cfg.simulate) / SimParams.default()
See `canaryml.simulate.model` for the service model, fault families and the labelling rule.
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
from canaryml.simulate.model import BREACH_RUN, SIM_METRICS, SimulatedDeployment, first_breach
from canaryml.simulate.params import (
    FAMILIES,
    FAULT_FAMILIES,
    HEALTHY_VARIANTS,
    SimParams,
    label_of,
)

__all__ = [
    "BREACH_RUN",
    "FAMILIES",
    "FAULT_FAMILIES",
    "HEALTHY_VARIANTS",
    "SIM_METRICS",
    "SimParams",
    "SimulatedDeployment",
    "deployments_table",
    "family_summary",
    "first_breach",
    "label_of",
    "plan_family",
    "samples_table",
    "simulate_corpus",
    "simulate_deployment",
    "simulate_deployments",
]
