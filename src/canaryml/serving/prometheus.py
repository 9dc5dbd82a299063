"""Live Prometheus source: one PromQL query per catalog metric and group, on the step grid.

Queries are templates with a `{selector}` placeholder (a label-matcher list such as
`app="web",track="canary"`); each deployment has a canary and a baseline selector — or, with
`baseline="history"` (a service with no live baseline replica), the baseline is the canary
selector's own series `history_offset_s` earlier, re-stamped onto the decision's grid (the
stable version before the rollout, as Kayenta's retrospective analysis compares). A series
that Prometheus does not have becomes NaN (no data: the policy pauses, never promotes). An
unreachable server, after `retries` attempts with exponential backoff, raises `SourceError`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import requests

from canaryml.control.types import Window
from canaryml.errors import ConfigError
from canaryml.ingest.prometheus import PrometheusClient, render

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Selectors:
    """Label matchers (without braces) that pick a deployment's canary and baseline series."""

    canary: str
    baseline: str | None = None


render_query = render  # one implementation, shared with `canaryml ingest source=prometheus`


class PrometheusSource:
    """`MetricSource` over the Prometheus HTTP API (`/api/v1/query_range`), via the shared
    `PrometheusClient` (retries with backoff on connection errors and 5xx; 4xx fails at once)."""

    def __init__(self, url: str, queries: Mapping[str, str], selectors: Mapping[str, Selectors],
                 *, step_s: float, metrics: Sequence[str] | None = None, timeout_s: float = 5.0,
                 retries: int = 3, backoff_s: float = 0.5,
                 session: requests.Session | None = None, baseline: str = "selector",
                 history_offset_s: float = 3600.0) -> None:
        if baseline not in ("selector", "history"):
            raise ConfigError(f"serve.source.prometheus.baseline={baseline!r}; use selector (a "
                              "baseline label matcher per deployment) or history")
        if baseline == "history" and history_offset_s <= 0:
            raise ConfigError(f"serve.source.prometheus.history_offset_s={history_offset_s} must "
                              "be > 0 seconds (how far back the baseline window lies)")
        self.baseline = baseline
        self.history_offset_s = float(history_offset_s)
        if step_s <= 0:
            raise ConfigError(f"step_s={step_s} must be > 0 (serve.step_s)")
        if retries < 0:
            raise ConfigError(f"retries={retries} must be >= 0 (serve.source.prometheus.retries)")
        self.metrics = tuple(metrics) if metrics is not None else tuple(queries)
        missing = [m for m in self.metrics if m not in queries]
        if missing:
            raise ConfigError(f"no PromQL query for metrics {missing}; add them under "
                              "serve.source.prometheus.queries")
        for m in self.metrics:
            render_query(queries[m], "")  # validates the placeholder now, not at the first tick
        self.client = PrometheusClient(url, timeout_s=timeout_s, retries=retries,
                                       backoff_s=backoff_s, session=session)
        self.queries = dict(queries)
        self.selectors = dict(selectors)
        self.step_s = float(step_s)

    # ---- the live-source interface (canaryml.serving.factory.LiveSource) ------------------
    def ack(self, deployment_id: str) -> None:
        """Nothing to commit: Prometheus is queried, not consumed."""

    def refresh(self) -> str | None:
        """Nothing to poll between ticks; never reports an outage here (a failed query does)."""
        return None

    def owned(self) -> set[str] | None:
        """Every configured deployment (no partitioning): None."""
        return None

    def wire(self, entry: dict[str, Any]) -> str | None:
        """Selectors for a discovered deployment; why not, or None."""
        sel = entry.get("selectors") or {}
        if not sel.get("canary"):
            return ("no canaryml.io/canary-selector annotation (the Prometheus source needs "
                    "label matchers)")
        self.selectors[str(entry["id"])] = Selectors(str(sel["canary"]), sel.get("baseline"))
        return None

    def close(self) -> None:
        """Nothing held between queries."""

    def query_range(self, query: str, start_s: float, end_s: float) -> dict[float, float]:
        """{timestamp_s: value} of one aggregated series (the mean if several match)."""
        series = self.client.query_range(query, start_s, end_s, self.step_s)
        if len(series) > 1:
            log.warning("query %r returned %d series; averaging (aggregate it with sum/avg)",
                        query, len(series))
        acc: dict[float, list[float]] = {}
        for s in series:
            for ts, v in zip(s.timestamps_s.tolist(), s.values.tolist(), strict=True):
                if math.isfinite(v):
                    acc.setdefault(float(ts), []).append(float(v))
        return {ts: float(np.mean(vs)) for ts, vs in acc.items()}

    def fetch(self, deployment_id: str, now_s: float, lookback: int) -> Window:
        try:
            sel = self.selectors[deployment_id]
        except KeyError:
            raise ConfigError(f"deployment {deployment_id!r} has no Prometheus selectors; add "
                              "selectors: {canary: ..., baseline: ...} to serve.deployments") from None
        if lookback < 1:
            raise ConfigError(f"lookback={lookback} must be >= 1")
        end = math.floor(now_s / self.step_s) * self.step_s
        grid = end - self.step_s * np.arange(lookback - 1, -1, -1, dtype=np.float64)
        index = {round(t / self.step_s): i for i, t in enumerate(grid)}
        groups: dict[str, tuple[str, float]] = {"canary": (sel.canary, 0.0)}
        if self.baseline == "history":
            groups["baseline"] = (sel.canary, self.history_offset_s)
        elif sel.baseline:
            groups["baseline"] = (sel.baseline, 0.0)
        out = {g: np.full((lookback, len(self.metrics)), np.nan, dtype=np.float32) for g in groups}
        for g, (selector, shift) in groups.items():
            for j, metric in enumerate(self.metrics):
                q = render_query(self.queries[metric], selector)
                got = self.query_range(q, float(grid[0]) - shift, float(grid[-1]) - shift)
                for ts, v in got.items():
                    i = index.get(round((ts + shift) / self.step_s))
                    if i is not None:
                        out[g][i, j] = v
        nodata = [m for j, m in enumerate(self.metrics) if np.isnan(out["canary"][:, j]).all()]
        if nodata:
            log.warning("deployment=%s no canary data for %s", deployment_id, ",".join(nodata))
        return Window(deployment_id=deployment_id, now_s=float(now_s),
                      timestamps_s=grid.astype(np.int64), canary=out["canary"],
                      baseline=out.get("baseline"), metrics=self.metrics)
