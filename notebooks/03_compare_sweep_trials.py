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
# # 03 · Compare sweep trials from MLflow
#
# `canaryml tune` runs an Optuna study: one MLflow parent run per study (tag
# `canaryml.kind=study`) and one nested run per trial (tag `canaryml.kind=trial`) holding the
# sampled parameters, the training metrics, the hold-out replay metrics and the `objective`.
# This notebook reads them back with `mlflow.search_runs` and shows
#
# - the trials as a table (state, objective, parameters, replay metrics),
# - the objective over the trials, with the best so far,
# - every searched parameter against the objective,
# - detection vs false rollbacks of every trial (the trade-off the operating point picks from).
#
# **Inputs** (environment variables; the defaults read the project's MLflow store):
#
# | variable | default | meaning |
# |---|---|---|
# | `MLFLOW_TRACKING_URI` | `sqlite:///<repo>/mlflow.db` | the MLflow store |
# | `CANARYML_EXPERIMENT` | `canaryml` | MLflow experiment |
# | `CANARYML_STUDY` | the most recent study | Optuna study name (tag `optuna.study`) |

# %% tags=["parameters"]
# ruff: noqa: E402, B018  (a notebook: imports where they are used; bare expressions display)
import os

EXPERIMENT = os.environ.get("CANARYML_EXPERIMENT") or "canaryml"
STUDY = os.environ.get("CANARYML_STUDY") or None

# %%
import matplotlib.pyplot as plt
import mlflow
import numpy as np
import pandas as pd

from canaryml import tracking

uri = tracking.configure()
print(f"MLflow store: {uri}")
if mlflow.get_experiment_by_name(EXPERIMENT) is None:
    raise LookupError(f"no MLflow experiment {EXPERIMENT!r} in {uri}; run `canaryml tune "
                      "dataset=DIR n_trials=N` first or set CANARYML_EXPERIMENT")
studies = mlflow.search_runs(experiment_names=[EXPERIMENT],
                             filter_string="tags.`canaryml.kind` = 'study'",
                             order_by=["attributes.start_time DESC"])
if studies.empty:
    raise LookupError(f"experiment {EXPERIMENT!r} in {uri} has no tuning study; run "
                      "`canaryml tune dataset=DIR n_trials=N` first")
if STUDY is None:
    STUDY = str(studies["tags.optuna.study"].iloc[0])
study_run = studies[studies["tags.optuna.study"] == STUDY]
if study_run.empty:
    raise LookupError(f"no study {STUDY!r}; known: {sorted(studies['tags.optuna.study'].unique())}")
study_run = study_run.iloc[0]


def study_setting(key: str) -> str | None:
    """A study setting recorded on the parent run (as a tag, or as a param by older versions)."""
    for col in (f"tags.{key}", f"params.{key}"):
        value = study_run.get(col)
        if isinstance(value, str) and value:
            return value
    return None


OBJECTIVE = study_setting("tune.objective") or "replay"
print(f"study {STUDY!r}: parent run {study_run['run_id']}, objective {OBJECTIVE!r}, "
      f"best trial {study_run.get('tags.best_trial')}")

# %% [markdown]
# ## The trials

# %%
trials = mlflow.search_runs(
    experiment_names=[EXPERIMENT],
    filter_string=f"tags.`canaryml.kind` = 'trial' and tags.`optuna.study` = '{STUDY}'")
trials["trial"] = trials["tags.optuna.trial"].astype(int)
trials["state"] = trials.get("tags.optuna.state", pd.Series("?", index=trials.index)).fillna("?")
trials = trials.sort_values("trial").set_index("trial")
objective_col = "metrics.objective" if "metrics.objective" in trials else "metrics.objective_0"
searched = sorted(c for c in trials.columns
                  if c.startswith("params.") and c != "params.trial")
replay_cols = [c for c in ("metrics.replay/caught_before_impact", "metrics.replay/detection_rate",
                           "metrics.replay/false_rollback_rate", "metrics.val/best_loss",
                           "metrics.test/roc_auc") if c in trials]
maximize = OBJECTIVE != "val_loss"
print(f"{len(trials)} trials ({trials['state'].value_counts().to_dict()}); "
      f"`{objective_col.removeprefix('metrics.')}` is {'max' if maximize else 'min'}imised")
table = trials[["state", objective_col, *replay_cols, *searched]].rename(
    columns=lambda c: c.removeprefix("metrics.").removeprefix("params."))
table

# %% [markdown]
# ## Objective over the trials

# %%
done = trials[trials[objective_col].notna()]
fig, ax = plt.subplots(figsize=(7, 3))
ax.scatter(done.index, done[objective_col], label="trial", zorder=3)
best_so_far = done[objective_col].cummax() if maximize else done[objective_col].cummin()
ax.step(done.index, best_so_far, where="post", color="tab:red", label="best so far")
ax.set_xlabel("trial")
ax.set_ylabel(objective_col.removeprefix("metrics."))
ax.legend()
fig.tight_layout()
plt.show()
best_trial = (done[objective_col].idxmax() if maximize else done[objective_col].idxmin()) \
    if len(done) else None
print(f"best trial: {best_trial}")

# %% [markdown]
# ## Parameters vs objective
#
# One panel per searched parameter (numeric: scatter; categorical: one column per choice).
# Parameters are logged as strings; numeric ones are converted back.

# %%
if searched and len(done):
    cols = 3
    rows = int(np.ceil(len(searched) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.6 * rows), squeeze=False)
    for ax, col in zip(axes.flat, searched, strict=False):
        values = pd.to_numeric(done[col], errors="coerce")
        if values.notna().all():
            ax.scatter(values, done[objective_col])
        else:
            cats = sorted(done[col].astype(str).unique())
            ax.scatter([cats.index(v) for v in done[col].astype(str)], done[objective_col])
            ax.set_xticks(range(len(cats)), cats, fontsize=7)
        ax.set_title(col.removeprefix("params."), fontsize=8)
    for ax in list(axes.flat)[len(searched):]:
        ax.set_visible(False)
    fig.supylabel(objective_col.removeprefix("metrics."))
    fig.tight_layout()
    plt.show()

# %% [markdown]
# ## Detection vs false rollbacks
#
# Each trial's hold-out replay at the configured rollback threshold: up and to the left is
# better. The objective (caught before impact at ≤ 1 % false rollbacks, by default) picks its
# operating point on this trade-off.

# %%
det, frr = "metrics.replay/detection_rate", "metrics.replay/false_rollback_rate"
if det in trials and frr in trials:
    fig, ax = plt.subplots(figsize=(5, 4))
    ax.scatter(trials[frr], trials[det], c=trials[objective_col], cmap="viridis")
    for number, r in trials.iterrows():
        ax.annotate(str(number), (r[frr], r[det]), fontsize=7, xytext=(3, 3),
                    textcoords="offset points")
    ax.set_xlabel("false rollback rate")
    ax.set_ylabel("detection rate")
    ax.set_xlim(-0.05, 1.05)
    ax.set_ylim(-0.05, 1.05)
    fig.tight_layout()
    plt.show()
else:
    print("these trials logged no replay metrics (objective val_loss)")
