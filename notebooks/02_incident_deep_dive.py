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
# # 02 · Deep dive into one replayed incident
#
# `canaryml replay` runs every past deployment through the same `Controller.step` the live
# controller runs, once per monitoring interval, and logs every decision. This notebook takes
# one faulty deployment from a replay and shows, per policy (the learned scorer and the
# Argo-threshold / Kayenta baselines):
#
# - the score over time against the rollback threshold,
# - when each policy rolled back, relative to the fault onset and to the first SLO breach
#   (lead time = impact − rollback; positive = users were spared),
# - which metrics contributed most to the scorer's rollback decision,
# - the telemetry of those metrics, canary vs baseline.
#
# **Inputs** (environment variables; the defaults work after `make demo`):
#
# | variable | default | meaning |
# |---|---|---|
# | `CANARYML_REPLAY_DIR` | the demo's replay folder, else `experiments/replay/dvc` | a `canaryml replay … out=DIR` folder |
# | `CANARYML_DATASET` | the dataset recorded in the replay's `summary.json` | canonical dataset replayed |
# | `CANARYML_DEPLOYMENT` | the first faulty deployment the scorer rolled back | deployment id |
# | `CANARYML_POLICY` | `scorer` (else the first policy) | policy whose contributions are shown |

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


def default_replay_dir() -> Path:
    for candidate in (demo_out() / "replay", repo_root() / "experiments/replay/dvc"):
        if (candidate / "summary.json").is_file():
            return candidate
    raise FileNotFoundError("no replay output found: run `make demo` or `dvc repro`, or "
                            "`canaryml replay model=… dataset=DIR out=DIR` and set "
                            "CANARYML_REPLAY_DIR=DIR")


REPLAY_DIR = Path(os.environ.get("CANARYML_REPLAY_DIR") or default_replay_dir())
DATASET = os.environ.get("CANARYML_DATASET") or None
DEPLOYMENT = os.environ.get("CANARYML_DEPLOYMENT") or None
POLICY = os.environ.get("CANARYML_POLICY") or "scorer"
print(f"replay: {REPLAY_DIR}")

# %%
import json

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from canaryml.data.dataset import CanonicalDataset

summary = json.loads((REPLAY_DIR / "summary.json").read_text())
outcomes = pd.read_parquet(REPLAY_DIR / "decisions.parquet")
log = pd.read_parquet(REPLAY_DIR / "decision_log.parquet")
paths, hashes = summary["dataset"]["path"], summary["dataset"]["content_hash"]
if isinstance(paths, list):  # a replay over several evaluation corpora: look at the first
    paths, hashes = paths[0], hashes[0]
    first = next(iter(summary["dataset"]["corpora"]))
    log, outcomes = log[log["corpus"] == first], outcomes[outcomes["corpus"] == first]
if DATASET is None:
    DATASET = paths
    if not Path(DATASET).is_absolute() and not Path(DATASET).exists():
        DATASET = str(repo_root() / DATASET)
ds = CanonicalDataset(DATASET)
if ds.content_hash != hashes:
    print("warning: the dataset changed since this replay (content hash differs)")
policies = list(summary["policies"])
if POLICY not in policies:
    POLICY = policies[0]
# the policy's own settings (chosen on calibration data when the replay had a calibration corpus)
threshold = float(summary["policies"][POLICY].get("settings", {}).get(
    "rollback_threshold", summary["policy_config"]["rollback_threshold"]))
print(f"{summary['dataset']['deployments']} deployments {summary['dataset']['labels']}, "
      f"policies {policies}, model {summary['model']}, rollback threshold {threshold}")
pd.DataFrame({p: {k: m.get(k) for k in ("detection_rate", "false_rollback_rate",
                                        "caught_before_impact", "lead_time_s_p50")}
              for p, m in summary["policies"].items()}).T

# %% [markdown]
# ## Pick the incident
#
# By default the first faulty deployment that the chosen policy rolled back (so there is a
# decision to explain), preferring one whose SLO was eventually breached (so there is a lead
# time); otherwise the first faulty deployment.

# %%
deps = ds.deployments.set_index("deployment_id")
faulty = [str(d) for d in deps.index[deps["label"] == "faulty"]]
if DEPLOYMENT is None:
    rolled = outcomes[(outcomes["policy"] == POLICY) & outcomes["rolled_back"]]
    hits = [d for d in faulty if d in set(rolled["deployment_id"].astype(str))]
    hits.sort(key=lambda d: pd.isna(deps.loc[d, "impact_at"]))  # impacted ones first (stable)
    if not (hits or faulty):
        raise ValueError(f"{DATASET}: no faulty deployment to look at; set CANARYML_DEPLOYMENT")
    DEPLOYMENT = (hits or faulty)[0]
dep = deps.loc[DEPLOYMENT]
start = dep["start"]


def minutes(ts: pd.Timestamp | float | None) -> float:
    """Minutes since deployment start (epoch seconds or timestamps)."""
    if ts is None or (isinstance(ts, float) and not np.isfinite(ts)) or pd.isna(ts):
        return float("nan")
    if not isinstance(ts, pd.Timestamp):
        ts = pd.Timestamp(float(ts), unit="s", tz="UTC")
    return (ts - start).total_seconds() / 60


onset_min, impact_min = minutes(dep["fault_onset"]), minutes(dep["impact_at"])
breach = "no SLO breach in the window" if not np.isfinite(impact_min) else \
    f"SLO breach after {impact_min:.1f} min"
print(f"{DEPLOYMENT}: {dep['label']} / {dep.get('fault_kind')} on {dep['service']}; fault onset "
      f"after {onset_min:.1f} min, {breach}")

# %% [markdown]
# ## Decisions and lead time per policy

# %%
dlog = log[log["deployment_id"].astype(str) == DEPLOYMENT].sort_values(["policy", "step"])
rows = []
for policy in policies:
    p = dlog[dlog["policy"] == policy]
    acted = p[p["action"].isin(["shrink", "rollback"])]
    first = acted.iloc[0] if len(acted) else None
    at = minutes(first["decided_at"]) if first is not None else float("nan")
    rows.append({"policy": policy, "first_rollback_min": at,
                 "action": first["action"] if first is not None else "none",
                 "score": first["score"] if first is not None else np.nan,
                 "after_onset_min": at - onset_min, "lead_time_min": impact_min - at,
                 "reason": first["reason"] if first is not None else ""})
decisions = pd.DataFrame(rows).set_index("policy")
decisions

# %% [markdown]
# ## Score against the threshold
#
# Every policy's score per monitoring interval (the scorer's calibrated score in [0, 1]; the
# baselines' verdicts mapped to the same scale); dashed lines are each policy's first rollback,
# orange the fault onset, black the SLO breach.

# %%
# orange and black stay reserved for the onset and impact lines
palette = ["tab:red", "tab:blue", "tab:green", "tab:purple", "tab:brown", "tab:pink", "tab:cyan"]
fig, ax = plt.subplots(figsize=(10, 3))
for i, policy in enumerate(policies):
    p = dlog[dlog["policy"] == policy]
    line, = ax.plot([minutes(t) for t in p["decided_at"]], p["score"], lw=1.2, label=policy,
                    color=palette[i % len(palette)])
    at = decisions.loc[policy, "first_rollback_min"]
    if np.isfinite(at):
        ax.axvline(at, color=line.get_color(), ls="--", lw=1)
ax.axhline(threshold, color="k", ls=":", lw=1, label=f"threshold {threshold:g}")
for x, color, text in ((onset_min, "orange", "onset"), (impact_min, "k", "impact")):
    if np.isfinite(x):
        ax.axvline(x, color=color, lw=1.5)
        ax.text(x, 1.0, text, fontsize=8, va="bottom")
ax.set_ylim(0, 1.05)
ax.set_xlabel("minutes since deployment start")
ax.set_ylabel("score")
ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
ax.set_title(f"{DEPLOYMENT}: score per policy")
fig.tight_layout()
plt.show()

# %% [markdown]
# ## What drove the decision
#
# At its first rollback the scorer policy records the per-metric contributions to the score
# (`evidence.contributions`, top 5, shares of the score) — the reasons an operator sees in the
# decision log and on the `/verdict` endpoint.

# %%
acted = dlog[(dlog["policy"] == POLICY) & dlog["action"].isin(["shrink", "rollback"])]
contributions: dict[str, float] = {}
if len(acted):
    evidence = json.loads(acted.iloc[0]["evidence"])
    contributions = {str(k): float(v) for k, v in (evidence.get("contributions") or {}).items()}
    print("reasons:", list(acted.iloc[0]["reasons"]))
if contributions:
    top = pd.Series(contributions).sort_values()
    fig, ax = plt.subplots(figsize=(6, 0.4 * len(top) + 1))
    top.plot.barh(ax=ax, color=["tab:red" if ds.catalog.get(m).kind.value == "app" else "tab:purple"
                                for m in top.index])
    ax.set_xlabel("share of the score (red: app metric, purple: infra metric)")
    ax.set_title(f"{POLICY}: top contributing metrics at the rollback")
    fig.tight_layout()
    plt.show()
else:
    print(f"{POLICY} recorded no contributions for {DEPLOYMENT} (no rollback, or a baseline "
          "policy); showing the catalog's SLO metrics instead")

# %% [markdown]
# ## The telemetry behind it
#
# The top contributing metrics (else the SLO metrics), canary vs baseline, with the SLO line,
# the onset/impact moments and each policy's rollback.

# %%
a = ds.arrays(DEPLOYMENT)
metrics = [m for m in contributions if m in a.metrics][:3] or \
    [m.name for m in ds.catalog.slo_metrics() if m.name in a.metrics][:3] or list(a.metrics[:3])
t_min = (a.timestamps_s - a.timestamps_s[0]) / 60
fig, axes = plt.subplots(len(metrics), 1, figsize=(9, 1.9 * len(metrics)), sharex=True)
for ax, m in zip(np.atleast_1d(axes), metrics, strict=False):
    j = a.metrics.index(m)
    ax.plot(t_min, a.canary[:, j], color="tab:red", lw=1, label="canary")
    if a.baseline is not None:
        ax.plot(t_min, a.baseline[:, j], color="tab:blue", lw=1, label="baseline")
    spec = ds.catalog.get(m)
    if spec.slo is not None:
        ax.axhline(spec.slo, color="k", ls=":", lw=1, label="SLO")
    for x, color in ((onset_min, "orange"), (impact_min, "k")):
        if np.isfinite(x):
            ax.axvline(x, color=color, lw=1.2)
    for policy in policies:
        at = decisions.loc[policy, "first_rollback_min"]
        if np.isfinite(at):
            ax.axvline(at, color="gray", ls="--", lw=0.8)
    ax.set_ylabel(m, fontsize=8)
np.atleast_1d(axes)[0].legend(fontsize=7, loc="upper left", ncol=3)
np.atleast_1d(axes)[-1].set_xlabel("minutes since deployment start (gray dashed: rollbacks)")
fig.tight_layout()
plt.show()

# %%
best = decisions["lead_time_min"].idxmax() if decisions["lead_time_min"].notna().any() else None
for policy, r in decisions.iterrows():
    lead = r["lead_time_min"]
    when = "never" if not np.isfinite(r["first_rollback_min"]) else \
        f"at {r['first_rollback_min']:.1f} min"
    print(f"{policy:>16}: {r['action']:<8} {when}, "
          f"lead time {'-' if not np.isfinite(lead) else f'{lead:+.1f} min'}")
if best is not None:
    print(f"earliest before impact: {best}")
