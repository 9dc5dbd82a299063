# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 01 · Explore a telemetry corpus
#
# A canonical dataset (what `canaryml ingest` writes, see `docs/data-contract.md`) holds one
# row per canary deployment with its ground truth, and telemetry for the **canary** and the
# **baseline** group on one fixed time grid. This notebook shows
#
# 1. what the corpus contains: deployments per label and per fault family / healthy variant,
#    observation length, data gaps;
# 2. canary vs baseline for a faulty and a healthy deployment, with the SLO lines of the metric
#    catalog and the fault-onset and impact moments;
# 3. how far canaries drift from their baseline, per family — the signal the scorer learns.
#
# **Inputs** (environment variables; the defaults work after `make demo`):
#
# | variable | default | meaning |
# |---|---|---|
# | `CANARYML_DATASET` | the demo's training dataset, else `data/processed/simulated` | canonical dataset folder |
# | `CANARYML_DEPLOYMENTS` | (first faulty and first healthy) | comma-separated deployment ids to plot |
#
# Run it as a script (`python notebooks/01_explore_corpus.py`) or open it as a notebook with
# jupytext (`jupytext --to ipynb notebooks/01_explore_corpus.py`).

# %% tags=["parameters"]
# ruff: noqa: E402, B018  (a notebook: imports where they are used; bare expressions display)
import os
from pathlib import Path

from canaryml.paths import repo_root


def demo_out() -> Path:
    """`demo.out` of the project config (where `make demo` writes), relative to the repo."""
    from canaryml import config

    cfg = config("demo")
    out = Path(str(cfg.demo.out)) if cfg.get("demo") is not None else Path("experiments/demo")
    return out if out.is_absolute() else repo_root() / out


def default_dataset() -> Path:
    for candidate in (demo_out() / "dataset" / "train", repo_root() / "data/processed/simulated"):
        if (candidate / "manifest.json").is_file():
            return candidate
    raise FileNotFoundError(
        "no canonical dataset found: run `make demo`, or build one with the Python API — "
        "`from canaryml import simulate, ingest; ingest(input=simulate(out='data/raw/simulated'),"
        " out='data/processed/simulated')` — or set CANARYML_DATASET=DIR")


DATASET = Path(os.environ.get("CANARYML_DATASET") or default_dataset())
DEPLOYMENTS = [d for d in os.environ.get("CANARYML_DEPLOYMENTS", "").split(",") if d]
print(f"dataset: {DATASET}")

# %%
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from canaryml.data.dataset import CanonicalDataset

ds = CanonicalDataset(DATASET)
deps = ds.deployments.copy()
catalog = ds.catalog
manifest = ds.manifest
print(f"{len(deps)} deployments, {len(ds.metrics)} metrics at {ds.step_s}s, "
      f"source {manifest.get('source')!r}, content hash {ds.content_hash[:12]}")
print("counts:", manifest.get("counts"))

# %% [markdown]
# ## 1. What the corpus contains
#
# `family` is the fault kind of a faulty canary and, for simulated corpora, the healthy variant
# of a healthy one (`plain`, `benign_shift`, `traffic_surge`, `shared_downstream_slowdown`):
# healthy variants are the hard negatives — a good policy must **not** roll them back.

# %%
if "variant" in deps.columns:
    deps["family"] = deps["variant"].fillna(deps["fault_kind"]).fillna("plain")
else:
    deps["family"] = deps["fault_kind"].fillna("plain")
deps["duration_min"] = (deps["end"] - deps["start"]).dt.total_seconds() / 60
deps["onset_after_min"] = (deps["fault_onset"] - deps["start"]).dt.total_seconds() / 60
deps["impact_after_onset_min"] = (deps["impact_at"] - deps["fault_onset"]).dt.total_seconds() / 60
families = (deps.groupby(["label", "family"])
            .agg(deployments=("deployment_id", "size"),
                 with_impact=("impact_at", lambda s: int(s.notna().sum())),
                 onset_after_min=("onset_after_min", "median"),
                 impact_after_onset_min=("impact_after_onset_min", "median"))
            .reset_index())
families

# %%
fig, ax = plt.subplots(figsize=(7, 3))
colors = families["label"].map({"faulty": "tab:red", "healthy": "tab:green"}).fillna("tab:gray")
ax.barh(families["label"] + " · " + families["family"], families["deployments"], color=colors)
ax.set_xlabel("deployments")
ax.set_title("deployments per label and family")
fig.tight_layout()
plt.show()

# %% [markdown]
# Missing telemetry per metric (share of NaN cells over all deployments and both groups):
# scrapes that were missed, or metrics a source does not have. The scorer and the policies
# treat a gap as "no data", never as zero.

# %%
ids = deps["deployment_id"].astype(str).tolist()
nan_share = np.zeros(len(ds.metrics))
cells = 0
for dep_id in ids:
    a = ds.arrays(dep_id)
    for block in (a.canary, a.baseline):
        if block is not None:
            nan_share += np.isnan(block).sum(axis=0)
            cells += len(block)
gaps = pd.DataFrame({"metric": ds.metrics,
                     "kind": [catalog.get(m).kind.value for m in ds.metrics],
                     "slo": [catalog.get(m).slo for m in ds.metrics],
                     "missing_share": nan_share / max(cells, 1)})
gaps

# %% [markdown]
# ## 2. Canary vs baseline
#
# Red: the canary (the new version); blue: the baseline (the control group). Dotted lines are
# the SLO of the metric catalog (`conf/metrics/default.yaml`); orange marks the fault onset and
# black the first SLO breach on the canary (user impact). Predictive rollback has to act in
# the gap between the two.

# %%
if not DEPLOYMENTS:
    for label in ("faulty", "healthy"):
        pick = deps[deps["label"] == label]
        if len(pick):
            DEPLOYMENTS.append(str(pick["deployment_id"].iloc[0]))
slo_metrics = [m.name for m in catalog.slo_metrics() if m.name in ds.metrics]
shown = (slo_metrics + [m for m in ("latency_p99", "app_cpu", "node_cpu") if m in ds.metrics
                        and m not in slo_metrics])[:4] or ds.metrics[:4]


def plot_deployment(dep_id: str) -> None:
    a = ds.arrays(dep_id)
    row = deps.set_index("deployment_id").loc[dep_id]
    minutes = (a.timestamps_s - a.timestamps_s[0]) / 60
    fig, axes = plt.subplots(len(shown), 1, figsize=(8, 1.7 * len(shown)), sharex=True)
    for ax, m in zip(np.atleast_1d(axes), shown, strict=False):
        j = a.metrics.index(m)
        ax.plot(minutes, a.canary[:, j], color="tab:red", lw=1, label="canary")
        if a.baseline is not None:
            ax.plot(minutes, a.baseline[:, j], color="tab:blue", lw=1, label="baseline")
        spec = catalog.get(m)
        if spec.slo is not None:
            ax.axhline(spec.slo, color="k", ls=":", lw=1, label="SLO")
        for col, color in (("fault_onset", "orange"), ("impact_at", "k")):
            if pd.notna(row[col]):
                ax.axvline((row[col] - row["start"]).total_seconds() / 60, color=color, lw=1.2)
        ax.set_ylabel(f"{m}\n[{spec.unit}]" if spec.unit else m, fontsize=8)
    np.atleast_1d(axes)[0].legend(fontsize=7, loc="upper left", ncol=3)
    np.atleast_1d(axes)[-1].set_xlabel("minutes since deployment start")
    fig.suptitle(f"{dep_id}: {row['label']} / {row['family']} ({row['service']})", fontsize=10)
    fig.tight_layout()
    plt.show()


for dep_id in DEPLOYMENTS:
    plot_deployment(dep_id)

# %% [markdown]
# ## 3. How far canaries drift from their baseline
#
# For every deployment: the largest robust z-score of the canary − baseline gap over the last
# quarter of the window (per metric, against the first quarter), in the metric's bad direction.
# Faulty families should stand out; `traffic_surge` and `shared_downstream_slowdown` hit both
# groups and so should not — which is why the scorer works on the *gap*.

# %%
def drift(dep_id: str) -> float:
    a = ds.arrays(dep_id)
    if a.baseline is None or len(a.canary) < 8:
        return float("nan")
    gap = a.canary.astype(float) - a.baseline.astype(float)
    q = max(2, len(gap) // 4)
    ref, last = gap[:q], gap[-q:]
    with np.errstate(all="ignore"):
        mu = np.nanmedian(ref, axis=0)
        mad = np.nanmedian(np.abs(ref - mu), axis=0) * 1.4826
        z = (np.nanmean(last, axis=0) - mu) / np.maximum(mad, 1e-9 + 1e-3 * np.abs(mu))
    sign = np.array([{"up": 1.0, "down": -1.0}.get(catalog.get(m).direction.value, 0.0)
                     for m in a.metrics])
    bad = np.where(sign == 0, np.abs(z), sign * z)
    return float(np.nanmax(bad)) if np.isfinite(bad).any() else float("nan")


deps["gap_drift_z"] = [drift(d) for d in ids]
order = deps.groupby("family")["gap_drift_z"].median().sort_values().index.tolist()
fig, ax = plt.subplots(figsize=(7, 3))
for i, fam in enumerate(order):
    sub = deps[deps["family"] == fam]
    color = "tab:red" if (sub["label"] == "faulty").all() else "tab:green"
    ax.scatter(sub["gap_drift_z"].clip(upper=50), np.full(len(sub), i), color=color, alpha=0.7)
ax.set_yticks(range(len(order)), order)
ax.set_xlabel("max canary−baseline gap drift (robust z, clipped at 50)")
ax.set_title("healthy (green) vs faulty (red) deployments")
fig.tight_layout()
plt.show()
deps.groupby(["label", "family"])["gap_drift_z"].describe()[["count", "50%", "max"]]
