"""MLflow pyfunc flavour of the CanaryScorer: everything loads from the `scorer` artifact dir.

Input: a DataFrame with a `group` column (`canary` | `baseline`), one float column per metric
and optionally `deployment_id`; rows of each group in time order, at least `lookback` per group.
Output: one row per deployment with score, app_score, infra_score, forecast_error,
detector_score, breach_eta_s (NaN = none) and top_reasons.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
from mlflow.pyfunc import PythonModel

from canaryml.control.types import Window
from canaryml.errors import ScoringError
from canaryml.models.scorer import CanaryScorer

OUTPUT_COLUMNS = ("score", "app_score", "infra_score", "forecast_error", "detector_score",
                  "breach_eta_s")


def window_to_frame(window: Window) -> pd.DataFrame:
    parts = []
    for group, values in (("canary", window.canary), ("baseline", window.baseline)):
        if values is None:
            continue
        df = pd.DataFrame(np.asarray(values, np.float64), columns=list(window.metrics))
        df.insert(0, "group", group)
        df.insert(0, "deployment_id", window.deployment_id)
        parts.append(df)
    return pd.concat(parts, ignore_index=True)


def frame_to_windows(df: pd.DataFrame, metrics: tuple[str, ...], step_s: int) -> list[Window]:
    if "group" not in df.columns:
        raise ScoringError("pyfunc input needs a `group` column (canary|baseline)")
    dep = df["deployment_id"].astype(str) if "deployment_id" in df.columns else pd.Series("input", index=df.index)
    metric_cols = tuple(c for c in df.columns if c not in ("group", "deployment_id", "timestamp"))
    windows = []
    for dep_id, part in df.groupby(dep, sort=False):
        can = part[part["group"] == "canary"][list(metric_cols)].to_numpy(np.float32)
        base = part[part["group"] == "baseline"][list(metric_cols)].to_numpy(np.float32)
        if len(can) == 0:
            raise ScoringError(f"pyfunc input for deployment {dep_id!r} has no canary rows")
        ts = np.arange(len(can), dtype=np.int64) * step_s
        windows.append(Window(str(dep_id), float(ts[-1]), ts, can,
                              base if len(base) == len(can) else None, metric_cols))
    return windows


class ScorerModel(PythonModel):  # type: ignore[misc]
    def load_context(self, context: Any) -> None:
        self.scorer = CanaryScorer.load(context.artifacts["scorer"])

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None
                ) -> pd.DataFrame:
        windows = frame_to_windows(model_input, self.scorer.metrics, self.scorer.step_s)
        results = self.scorer.score_batch(windows)
        rows = []
        for w, r in zip(windows, results, strict=True):
            rows.append({"deployment_id": w.deployment_id, "score": r.score,
                         "app_score": r.app_score, "infra_score": r.infra_score,
                         "forecast_error": r.forecast_error, "detector_score": r.detector_score,
                         "breach_eta_s": np.nan if r.breach_eta_s is None else r.breach_eta_s,
                         "top_reasons": ",".join(r.top_reasons())})
        return pd.DataFrame(rows)
