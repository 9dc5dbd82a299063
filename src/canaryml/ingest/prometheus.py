"""`source=prometheus`: range queries against the Prometheus HTTP API, one PromQL per metric.

Each metric has a PromQL template with a `{selector}` placeholder (label matchers without
braces, as in `conf/serve`); each group has a selector template that may use `{deployment}`
and `{service}`. For every deployment (id, service, start, end, label) and group, every metric's
query runs over start..end at the step and the returned series become long samples (a query
that returns several series, e.g. one per pod, keeps them apart as `instance`s; the canonical
writer averages them per group).

`baseline` says where the baseline group comes from: `selector` (default) runs the queries with
`selectors.baseline` over the same window; `history` runs them with the canary selector over the
window `history_offset_s` earlier and re-stamps the result onto the deployment's window (for
services with one replica, no live baseline exists); `none` writes the canary group only.

`PrometheusClient` is the reusable HTTP client (the live source uses it too).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import requests

from canaryml.data.contract import (
    GROUPS,
    make_bundle,
    read_deployments,
    table_from_pandas,
    validate_deployments,
)
from canaryml.errors import ConfigError, DataContractError, SourceError
from canaryml.ingest import Ingested

log = logging.getLogger(__name__)

PLACEHOLDER = "{selector}"
BASELINES = ("selector", "history", "none")
MAX_POINTS = 11_000  # Prometheus refuses range queries over 11 000 points per series


@dataclass(frozen=True)
class Series:
    """One returned series: its labels, epoch-second timestamps [T] and float values [T]."""

    labels: dict[str, str]
    timestamps_s: np.ndarray
    values: np.ndarray


class PrometheusClient:
    """Minimal Prometheus HTTP API client with retries and exponential backoff.

    Connection errors, timeouts and 5xx answers are retried `retries` times (waiting
    `backoff_s`, 2×, 4×, …); a 4xx answer (a bad query) fails at once. Every failure is a
    `SourceError` naming the URL, the query and what to check.
    """

    def __init__(self, url: str, timeout_s: float = 10.0, retries: int = 3,
                 backoff_s: float = 0.5, session: requests.Session | None = None,
                 url_key: str | None = None) -> None:
        if retries < 0:
            raise ConfigError(f"retries={retries} must be >= 0")
        if timeout_s <= 0:
            raise ConfigError(f"timeout_s={timeout_s} must be > 0")
        self.url = url.rstrip("/")
        self.timeout_s = float(timeout_s)
        self.retries = int(retries)
        self.backoff_s = float(backoff_s)
        self.session = session or requests.Session()
        # the config key that set `url`, for error messages (the caller knows which command)
        self.url_key = url_key or ("serve.source.prometheus.url for `canaryml serve`, "
                                   "ingest.prometheus.url for `canaryml ingest`")

    def _get(self, path: str, params: Mapping[str, Any]) -> Any:
        last: str = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff_s * 2 ** (attempt - 1))
            try:
                resp = self.session.get(f"{self.url}{path}", params=dict(params),
                                        timeout=self.timeout_s)
            except requests.RequestException as exc:
                last = f"{type(exc).__name__}: {exc}"
                log.debug("prometheus %s attempt %d failed: %s", self.url, attempt + 1, last)
                continue
            if resp.status_code >= 500:
                last = f"HTTP {resp.status_code}: {resp.text[:200]}"
                continue
            try:
                body = resp.json()
            except ValueError:
                raise SourceError(f"Prometheus at {self.url}{path} answered HTTP "
                                  f"{resp.status_code} with non-JSON {resp.text[:200]!r}; is the "
                                  "URL a Prometheus server?") from None
            if resp.status_code >= 400 or body.get("status") != "success":
                raise SourceError(f"Prometheus at {self.url} rejected query "
                                  f"{params.get('query')!r}: {body.get('errorType', '')} "
                                  f"{body.get('error', resp.text[:200])}; fix the PromQL")
            return body["data"]
        raise SourceError(f"Prometheus at {self.url} is unreachable after {self.retries + 1} "
                          f"attempt(s) ({last}); check the URL ({self.url_key}) and that "
                          "the server is up")

    def query_range(self, promql: str, start_s: float, end_s: float, step_s: float
                    ) -> list[Series]:
        """Range query over [start_s, end_s] at `step_s`, split into ≤ 11 000-point requests."""
        if step_s <= 0:
            raise ConfigError(f"step_s={step_s} must be > 0")
        if end_s < start_s:
            raise ConfigError(f"end {end_s} is before start {start_s}")
        merged: dict[tuple[tuple[str, str], ...], list[tuple[np.ndarray, np.ndarray]]] = {}
        chunk_s = step_s * (MAX_POINTS - 1)
        lo = float(start_s)
        while lo <= end_s:
            hi = min(float(end_s), lo + chunk_s)
            data = self._get("/api/v1/query_range", {"query": promql, "start": lo, "end": hi,
                                                     "step": step_s})
            for item in data.get("result", []):
                pts = item.get("values", [])
                ts = np.array([float(p[0]) for p in pts], dtype=np.float64)
                vs = np.array([_float(p[1]) for p in pts], dtype=np.float64)
                key = tuple(sorted(item.get("metric", {}).items()))
                merged.setdefault(key, []).append((ts, vs))
            lo = hi + step_s
        out = []
        for key, chunks in merged.items():
            out.append(Series(dict(key), np.concatenate([c[0] for c in chunks]),
                              np.concatenate([c[1] for c in chunks])))
        return out

    def query(self, promql: str, at_s: float | None = None) -> list[tuple[dict[str, str], float,
                                                                         float]]:
        """Instant query: [(labels, timestamp_s, value)] for a vector (a scalar gives one row)."""
        params: dict[str, Any] = {"query": promql}
        if at_s is not None:
            params["time"] = at_s
        data = self._get("/api/v1/query", params)
        kind, result = data.get("resultType"), data.get("result", [])
        if kind in ("scalar", "string"):
            return [({}, float(result[0]), _float(result[1]))]
        return [(dict(r.get("metric", {})), float(r["value"][0]), _float(r["value"][1]))
                for r in result]

    def ready(self) -> bool:
        try:
            return self.session.get(f"{self.url}/-/ready", timeout=self.timeout_s).ok
        except requests.RequestException:
            return False


def _float(text: Any) -> float:
    try:
        return float(text)
    except (TypeError, ValueError):
        return math.nan


def render(template: str, selector: str) -> str:
    """Put `selector` into `template` in place of `{selector}` (PromQL braces are untouched)."""
    if PLACEHOLDER not in template:
        raise ConfigError(f"PromQL template {template!r} has no {PLACEHOLDER} placeholder; write "
                          "e.g. sum(rate(http_requests_total{{selector}}[1m]))")
    return template.replace(PLACEHOLDER, selector)


def _deployments(deployments: Sequence[Mapping[str, Any]] | None,
                 deployments_file: str | Path | None) -> pd.DataFrame:
    if deployments_file:
        path = Path(deployments_file)
        if not path.is_file():
            raise DataContractError(f"ingest.prometheus.deployments_file={path} does not exist; "
                                    "write a deployments table (CSV/Parquet, DESIGN §2.1)")
        return read_deployments(path)
    if not deployments:
        raise ConfigError("source=prometheus needs deployments: set "
                          "ingest.prometheus.deployments (a list of {deployment_id, service, "
                          "start, end, label}) or ingest.prometheus.deployments_file")
    df = pd.DataFrame([dict(d) for d in deployments])
    for col, default in (("service", "unknown"), ("label", "unknown")):
        if col not in df:
            df[col] = default
    return validate_deployments(df, "ingest.prometheus.deployments")


def read(url: str, queries: Mapping[str, str], selectors: Mapping[str, str], *,
         step_s: int, deployments: Sequence[Mapping[str, Any]] | None = None,
         deployments_file: str | Path | None = None, timeout_s: float = 10.0,
         retries: int = 3, client: PrometheusClient | None = None,
         baseline: str = "selector", history_offset_s: float = 3600.0) -> Ingested:
    """Run every (deployment, group, metric) range query and validate the result as a bundle.

    `queries`: metric → PromQL template with `{selector}`; `selectors`: group (`canary`,
    optionally `baseline`) → label matchers, which may use `{deployment}` and `{service}`.
    `baseline`: `selector` | `history` (canary selector, `history_offset_s` earlier) | `none`.
    """
    if not queries:
        raise ConfigError("ingest.prometheus.queries is empty; give one PromQL per metric")
    unknown = sorted(set(selectors) - set(GROUPS))
    if unknown or "canary" not in selectors:
        raise ConfigError(f"ingest.prometheus.selectors has groups {sorted(selectors)}; it needs "
                          "canary and optionally baseline")
    if baseline not in BASELINES:
        raise ConfigError(f"ingest.prometheus.baseline={baseline!r} is not one of "
                          f"{'|'.join(BASELINES)}")
    if baseline == "history" and not history_offset_s > 0:
        raise ConfigError(f"ingest.prometheus.history_offset_s={history_offset_s} must be > 0 "
                          "seconds for baseline: history")
    # (group, selector template, shift s): the query window is [start - shift, end - shift]
    plan: list[tuple[str, str, float]] = [("canary", selectors["canary"], 0.0)]
    if baseline == "selector" and "baseline" in selectors:
        plan.append(("baseline", selectors["baseline"], 0.0))
    elif baseline == "history":
        plan.append(("baseline", selectors["canary"], float(history_offset_s)))
    for template in queries.values():
        render(template, "")
    deps = _deployments(deployments, deployments_file)
    client = client or PrometheusClient(url, timeout_s=timeout_s, retries=retries,
                                        url_key="ingest.prometheus.url")
    frames = []
    n_queries = n_empty = 0
    starts_s = deps["start"].astype("int64").to_numpy() / 1e6  # timestamp[us, UTC]
    ends_s = deps["end"].astype("int64").to_numpy() / 1e6
    for i, dep in enumerate(deps.itertuples(index=False)):
        start_s, end_s = float(starts_s[i]), float(ends_s[i])
        for group, sel_template, shift in plan:
            selector = sel_template.replace("{deployment}", str(dep.deployment_id)).replace(
                "{service}", str(dep.service))
            for metric, template in queries.items():
                n_queries += 1
                series = client.query_range(render(template, selector), start_s - shift,
                                            end_s - shift, step_s)
                if not series:
                    n_empty += 1
                    continue
                for s in series:
                    frames.append(pd.DataFrame({
                        "timestamp": pd.to_datetime(np.round((s.timestamps_s + shift) * 1e6)
                                                    .astype(np.int64), unit="us", utc=True),
                        "deployment_id": str(dep.deployment_id), "group": group,
                        "metric": metric, "value": s.values,
                        "instance": s.labels.get("instance", "") if len(series) > 1 else ""}))
    if not frames:
        raise SourceError(f"Prometheus at {url} returned no data for any of {n_queries} "
                          "queries; check ingest.prometheus.queries/selectors and the "
                          "deployments' time windows")
    if n_empty:
        log.warning("prometheus: %d of %d queries returned no series (gaps in the dataset)",
                    n_empty, n_queries)
    samples = table_from_pandas(pd.concat(frames, ignore_index=True))
    bundle = make_bundle(deps, samples, url)
    return Ingested(bundle=bundle, source="prometheus", native_step_s=int(step_s),
                    extra_manifest={"prometheus": {"url": url, "queries": dict(queries),
                                                   "selectors": dict(selectors),
                                                   "baseline": baseline,
                                                   "history_offset_s": (
                                                       float(history_offset_s)
                                                       if baseline == "history" else None),
                                                   "queries_run": n_queries,
                                                   "queries_empty": n_empty}})
