"""`source=nezha`: Nezha's microservice fault-injection telemetry (IntelligentDDS/Nezha, MIT).

Input: a day folder (`metric/<pod>_metric.csv`, `metric/front_service.csv`,
`<day>-fault_list.json`) or a folder of day folders (`ingest.nezha.days` / `systems` pick).
Each pod's minutes become canary deployments (DESIGN §2.1), per day:

- one `faulty` deployment per injection: the injected pod from `pre_s` before to `post_s`
  after `inject_time`, cut at the next injection anywhere in the system
  (`clip_at_next_injection`); `fault_onset` = `inject_time`, `fault_kind` = `inject_type`,
  `impact_at` = the first front-service SLO breach measured after onset inside the window
  (`front_service.csv` latency p99 above `slo_latency_p99_s`, by default the `slo_quantile`
  of the day's fault-free minutes, or success rate below `slo_success_rate` where that column
  was collected), else empty;
- `healthy_per_pod` `healthy` windows of the same length per pod (the injected pods, or all
  with `healthy_pods: all`) drawn from reference minutes (`_Reference`): no injection anywhere
  in the system during the window or the `quiet_s` before it (earlier faults linger), nothing
  inside the injection campaign of a day whose fault list is incomplete, and the same system
  workload as the faulty windows (`load_match`).

Groups: `canary` is the pod. Each service runs one pod, so there is no live baseline replica:
`baseline: history` takes the same pod's own minutes `history_offset_s` earlier, re-stamped
onto the deployment's grid. When that earlier window is not a reference window (or lies
before the data starts), `history_fallback: nearest_clean` uses the clean
earlier window closest to that offset, else the nearest clean later one (the pod's own
fault-free minutes; a live controller could not look ahead, say so in results), else keeps the
contaminated one; the columns `baseline_offset_s` (positive = earlier) and `baseline_clean`
record what was used. `baseline: none` writes the canary group only, like SMD and NAB.

Timestamps come from the `Time` string (the `TimeStamp` columns are wrong: one pod file is
2e8 s ahead on 2022-08-22 and the fault list's `inject_timestamp` is ~8 h off on 2023-01-29).
Each minute is stamped on the first grid step at or after its measurement, so a decision at T
only sees what was measured by T (a conservative 40-50 s on time to detect). A repeated minute
keeps its last row.
"""

from __future__ import annotations

import json
import logging
import warnings
import zlib
from collections import Counter
from collections.abc import Collection, Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from canaryml.catalog import Catalog
from canaryml.data.contract import make_bundle
from canaryml.errors import ConfigError, DataContractError, reject_unknown_keys
from canaryml.ingest import Ingested

log = logging.getLogger(__name__)

STEP_S = 60
_US = 1_000_000
METRIC_SUFFIX = "_metric.csv"
FRONT_FILE = "front_service.csv"
FAULT_LIST_GLOB = "*fault_list.json"
FAULT_KEYS = ("inject_time", "inject_pod", "inject_type")

# Nezha per-pod column -> (canonical metric, factor to the catalog unit)
COLUMNS: dict[str, tuple[str, float]] = {
    "PodWorkload(Ops)": ("request_rate", 1.0),
    "PodServerLatencyP90(s)": ("latency_p90", 1.0),
    "PodServerLatencyP95(s)": ("latency_p95", 1.0),
    "PodServerLatencyP99(s)": ("latency_p99", 1.0),
    "PodClientLatencyP90(s)": ("client_latency_p90", 1.0),
    "PodClientLatencyP95(s)": ("client_latency_p95", 1.0),
    "PodClientLatencyP99(s)": ("client_latency_p99", 1.0),
    "CpuUsageRate(%)": ("app_cpu", 0.01),  # share of the pod's CPU limit
    "MemoryUsage(Mi)": ("app_memory", float(1 << 20)),  # bytes
    "NetworkReceiveBytes": ("net_rx", 1.0),
    "NetworkTransmitBytes": ("net_tx", 1.0),
    "SyscallRead": ("syscall_read", 1.0),
    "SyscallWrite": ("syscall_write", 1.0),
    "NodeCpuUsageRate(%)": ("node_cpu", 0.01),
    "NodeMemoryUsageRate(%)": ("node_memory", 0.01),
    "NodeNetworkReceiveBytes": ("node_net_rx", 1.0),
}
# columns not ingested, and why
DROPPED = {
    "TimeStamp": "wrong on one pod of 2022-08-22 (2e8 s ahead); Time is used",
    "PodName": "the file name says it",
    "CpuUsage(m)": "its scale disagrees with CpuUsageRate(%) across the two systems",
    "MemoryUsageRate(%)": "MemoryUsage(Mi) as a share of the limit; app_memory keeps the bytes",
    "PodSuccessRate(%)": "0 in every file (not collected)",
}
METRICS = tuple(name for name, _ in COLUMNS.values())
BASELINES = ("history", "none")
FALLBACKS = ("nearest_clean", "keep")
HEALTHY_PODS = ("injected", "all")


def default_input() -> Path:
    from canaryml.paths import repo_root

    return repo_root().parent / "shared" / "data" / "public" / "nezha"


def default_catalog() -> Path:
    from canaryml.paths import conf_dir

    return conf_dir() / "metrics" / "nezha.yaml"


@dataclass(frozen=True)
class NezhaOptions:
    """`ingest.nezha.*` (conf/ingest/default.yaml documents each key)."""

    days: tuple[str, ...] | None = None
    systems: tuple[str, ...] | None = None
    pre_s: int = 300
    post_s: int = 600
    clip_at_next_injection: bool = True
    quiet_s: int = 600
    incomplete_fault_lists: tuple[str, ...] = ("2022-08-22",)
    load_match: float | None = 0.5
    healthy_per_pod: int = 3
    healthy_pods: str = "injected"
    seed: int = 0
    baseline: str = "history"
    history_offset_s: int = 3600
    history_fallback: str = "nearest_clean"
    slo_latency_p99_s: float | None = None
    slo_quantile: float = 0.999
    slo_success_rate: float | None = 99.0
    metrics: tuple[str, ...] | None = None
    catalog: str | None = None

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any] | None) -> NezhaOptions:
        raw = dict(data or {})
        reject_unknown_keys(raw, (f.name for f in fields(cls)), "ingest.nezha")
        kw: dict[str, Any] = {}
        for key, value in raw.items():
            if key == "incomplete_fault_lists":
                kw[key] = () if value is None else (
                    (str(value),) if isinstance(value, str) else tuple(str(v) for v in value))
            elif key in ("days", "systems", "metrics"):
                kw[key] = None if value is None else (
                    (str(value),) if isinstance(value, str) else tuple(str(v) for v in value))
            elif key in ("pre_s", "post_s", "quiet_s", "healthy_per_pod", "seed",
                         "history_offset_s"):
                kw[key] = int(value)
            elif key in ("slo_latency_p99_s", "slo_success_rate", "load_match"):
                kw[key] = None if value is None else float(value)
            elif key == "slo_quantile":
                kw[key] = float(value)
            elif key == "clip_at_next_injection":
                kw[key] = bool(value)
            else:
                kw[key] = None if value is None else str(value)
        opts = cls(**kw)
        opts.check()
        return opts

    def check(self) -> None:
        def bad(key: str, why: str) -> ConfigError:
            return ConfigError(f"ingest.nezha.{key}={getattr(self, key)!r} {why}")

        if self.pre_s < 0:
            raise bad("pre_s", "must be >= 0 seconds")
        if self.post_s < STEP_S:
            raise bad("post_s", f"must be at least one step ({STEP_S} s)")
        if self.quiet_s < 0:
            raise bad("quiet_s", "must be >= 0 seconds")
        if self.healthy_per_pod < 0:
            raise bad("healthy_per_pod", "must be >= 0")
        if self.healthy_pods not in HEALTHY_PODS:
            raise bad("healthy_pods", f"is not one of {'|'.join(HEALTHY_PODS)}")
        if self.baseline not in BASELINES:
            raise bad("baseline", f"is not one of {'|'.join(BASELINES)}")
        if self.history_fallback not in FALLBACKS:
            raise bad("history_fallback", f"is not one of {'|'.join(FALLBACKS)}")
        if self.history_offset_s <= 0 or self.history_offset_s % STEP_S:
            raise bad("history_offset_s", f"must be a positive multiple of {STEP_S} s (the "
                      "step), so the earlier minutes land on the deployment's grid")
        if self.load_match is not None and not 0.0 < self.load_match <= 1.0:
            raise bad("load_match", "must be in (0, 1] or null")
        if not 0.0 < self.slo_quantile < 1.0:
            raise bad("slo_quantile", "must be in (0, 1)")
        if self.slo_latency_p99_s is not None and self.slo_latency_p99_s <= 0:
            raise bad("slo_latency_p99_s", "must be > 0 seconds or null")
        if self.metrics is not None:
            unknown = sorted(set(self.metrics) - set(METRICS))
            if unknown or not self.metrics:
                raise bad("metrics", f"names unknown metric(s) {unknown}; choose from "
                          f"{list(METRICS)} or null for all")


# --------------------------------------------------------------------------- files


@dataclass(frozen=True)
class Day:
    """One Nezha day folder."""

    name: str
    folder: Path
    fault_list: Path
    pods: dict[str, Path]  # pod name -> metric file
    system: str


@dataclass(frozen=True)
class Injection:
    at_s: float  # epoch seconds, UTC
    pod: str
    kind: str


def service_of(pod: str) -> str:
    """`frontend-579b9bff58-t2dbm` -> `frontend` (drop the ReplicaSet hash and pod suffix)."""
    parts = pod.split("-")
    return "-".join(parts[:-2]) if len(parts) > 2 else pod


def _system(pods: Collection[str]) -> str:
    services = {service_of(p) for p in pods}
    if services and all(s.startswith("ts-") for s in services):
        return "train-ticket"
    if {"frontend", "cartservice", "checkoutservice"} <= services:
        return "online-boutique"
    return "unknown"


_DAY_LAYOUT = ("a Nezha day folder holds metric/<pod>_metric.csv, metric/front_service.csv and "
               "<day>-fault_list.json")


def _day_at(folder: Path) -> Day | None:
    metric = folder / "metric"
    lists = sorted(folder.glob(FAULT_LIST_GLOB))
    if not metric.is_dir() and not lists:
        return None
    if not metric.is_dir():
        raise DataContractError(f"{folder}: has {lists[0].name} but no metric/ folder; "
                                f"{_DAY_LAYOUT}: restore metric/ from the Nezha release")
    if not lists:
        raise DataContractError(f"{folder}: has metric/ but no <day>-fault_list.json; "
                                f"{_DAY_LAYOUT}: restore the fault list from the Nezha release")
    if len(lists) > 1:
        raise DataContractError(f"{folder}: several fault lists {[p.name for p in lists]}; keep "
                                "the one <day>-fault_list.json of this day")
    pods = {p.name[:-len(METRIC_SUFFIX)]: p for p in sorted(metric.glob(f"*{METRIC_SUFFIX}"))}
    if not pods:
        raise DataContractError(f"{metric}: no <pod>{METRIC_SUFFIX} files; {_DAY_LAYOUT}")
    if not (metric / FRONT_FILE).is_file():
        raise DataContractError(f"{metric}: no {FRONT_FILE} (the entry service's latency, used "
                                f"for impact_at); {_DAY_LAYOUT}")
    return Day(name=folder.name, folder=folder, fault_list=lists[0], pods=pods,
               system=_system(pods))


def find_days(folder: str | Path) -> list[Day]:
    """The day folder `folder`, or every day folder directly under it."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataContractError(f"input={folder} does not exist or is not a folder; pass "
                                "input=<nezha day folder> or input=<folder of day folders>")
    day = _day_at(folder)
    if day is not None:
        return [day]
    days = [d for sub in sorted(folder.iterdir()) if sub.is_dir()
            and (d := _day_at(sub)) is not None]
    if not days:
        raise DataContractError(
            f"{folder} is not a Nezha day folder nor a folder of them ({_DAY_LAYOUT}); pass "
            "input=../shared/data/public/nezha/2022-08-22 (one day) or "
            "input=../shared/data/public/nezha (every day; ingest.nezha.days picks)")
    return days


_TIME_RE = (r"^\s*(\d{4}-\d\d-\d\d)[ T](\d\d:\d\d:\d\d(?:\.\d+)?)"
            r"(?:\s*([+-]\d\d:?\d\d|Z))?")


def parse_times(path: Path, values: pd.Series, column: str = "Time") -> np.ndarray:
    """Epoch microseconds (int64) of Go-printed times such as
    `2022-08-22 03:51:19.607158889 +0000 UTC m=+0.113112869` (zone name and monotonic
    reading ignored; no offset = UTC). Bad values raise a `DataContractError` naming lines."""
    text = values.astype("string")
    parts = text.str.extract(_TIME_RE)
    offset = parts[2].fillna("+00:00").replace("Z", "+00:00")
    parsed = pd.to_datetime(parts[0] + "T" + parts[1] + offset, utc=True, errors="coerce",
                            format="ISO8601")
    bad = np.flatnonzero(parsed.isna().to_numpy())
    if len(bad):
        lines = ", ".join(str(int(i) + 2) for i in bad[:5])
        shown = [str(v) for v in values.iloc[bad[:3]].tolist()]
        raise DataContractError(
            f"{path}: column '{column}' is not a time like '2022-08-22 03:51:19.607158889 +0000 "
            f"UTC' in {len(bad)} row(s); first at lines {lines}: {shown}. Fix: restore the file "
            "from the Nezha release")
    return np.asarray(parsed.dt.tz_convert(None).to_numpy().astype("datetime64[us]")
                      .astype(np.int64))


def _stamp(us: np.ndarray) -> np.ndarray:
    """First grid step (epoch s) at or after each measurement: nothing is seen early."""
    return np.asarray(-((-us) // (STEP_S * _US)) * STEP_S, dtype=np.int64)


def _read_csv(path: Path, required: Collection[str]) -> pd.DataFrame:
    try:
        df = pd.read_csv(path, dtype={"Time": "string"})
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise DataContractError(f"{path}: cannot be read as CSV ({exc}); restore it from the "
                                "Nezha release") from exc
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise DataContractError(f"{path}: missing column(s) {missing}; found "
                                f"{list(df.columns)}. Restore the file from the Nezha release")
    if df.empty:
        raise DataContractError(f"{path}: the table has a header but no rows")
    return df


def _numeric(path: Path, df: pd.DataFrame, column: str) -> np.ndarray:
    raw = df[column]
    num = pd.to_numeric(raw, errors="coerce")
    bad = np.flatnonzero(num.isna().to_numpy() & raw.notna().to_numpy())
    if len(bad):
        lines = ", ".join(str(int(i) + 2) for i in bad[:5])
        raise DataContractError(f"{path}: column '{column}' is not a number in {len(bad)} "
                                f"row(s); first at lines {lines}. Fix: restore the file from "
                                "the Nezha release (an empty cell is a missed scrape)")
    return np.asarray(num.to_numpy(dtype=np.float64, na_value=np.nan))


def _dedup_sorted(stamps: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    order = np.argsort(stamps, kind="stable")
    stamps, values = stamps[order], values[order]
    keep = np.r_[stamps[1:] != stamps[:-1], True]  # a repeated minute keeps its last row
    return stamps[keep], values[keep], int(np.count_nonzero(~keep))


@dataclass(frozen=True)
class PodSeries:
    stamps: np.ndarray  # int64 [T] epoch s on the grid, sorted, unique
    values: np.ndarray  # float64 [T, M] in catalog units
    duplicates: int


def read_pod(path: Path, columns: Collection[str]) -> PodSeries:
    """One `<pod>_metric.csv`: the chosen Nezha columns, converted, on the minute grid."""
    cols = list(columns)
    df = _read_csv(path, ["Time", *cols])
    stamps = _stamp(parse_times(path, df["Time"]))
    values = np.column_stack([_numeric(path, df, c) * COLUMNS[c][1] for c in cols])
    stamps, values, dups = _dedup_sorted(stamps, values)
    if dups:
        log.info("%s: %d repeated minute(s); kept the last row of each", path, dups)
    return PodSeries(stamps, values, dups)


@dataclass(frozen=True)
class FrontSeries:
    measured_s: np.ndarray  # float64 [T] when each minute was measured
    stamps: np.ndarray  # int64 [T] grid stamps
    latency_p99: np.ndarray  # float64 [T] seconds
    success_rate: np.ndarray | None  # float64 [T] %, None when not collected (all 0)


def read_front(path: Path) -> FrontSeries:
    df = _read_csv(path, ("Time", "LatencyP99(s)", "SuccessRate(%)"))
    us = parse_times(path, df["Time"])
    p99 = _numeric(path, df, "LatencyP99(s)")
    sr = _numeric(path, df, "SuccessRate(%)")
    order = np.argsort(us, kind="stable")
    us, p99, sr = us[order], p99[order], sr[order]
    collected = bool(np.any(np.nan_to_num(sr) > 0))
    if not collected:
        log.info("%s: SuccessRate(%%) is 0 or empty throughout: treated as not collected", path)
    return FrontSeries(us / _US, _stamp(us), p99, sr if collected else None)


def read_fault_list(path: Path, pods: Collection[str]) -> list[Injection]:
    """Every injection of `<day>-fault_list.json` (hour -> list), sorted by `inject_time`."""
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataContractError(f"{path}: not valid JSON ({exc}); restore it from the Nezha "
                                "release") from exc
    if not isinstance(raw, dict):
        raise DataContractError(f"{path}: expected an object mapping each hour to a list of "
                                "{inject_time, inject_pod, inject_type}; restore the file")
    known = set(pods)
    out = []
    for hour, entries in raw.items():
        if not isinstance(entries, list):
            raise DataContractError(f"{path}: hour {hour!r} holds {type(entries).__name__}, "
                                    "not a list of injections; restore the file")
        for i, entry in enumerate(entries):
            where = f"{path}: hour {hour!r}, entry {i}"
            missing = [k for k in FAULT_KEYS
                       if not isinstance(entry, dict) or entry.get(k) in (None, "")]
            if missing:
                raise DataContractError(f"{where}: missing {missing}; each injection needs "
                                        f"{list(FAULT_KEYS)}")
            try:
                at = pd.Timestamp(str(entry["inject_time"]))
            except ValueError as exc:
                raise DataContractError(f"{where}: inject_time {entry['inject_time']!r} is not "
                                        "a time like '2022-08-22 03:53:54' (UTC)") from exc
            at = at.tz_localize("UTC") if at.tzinfo is None else at.tz_convert("UTC")
            pod = str(entry["inject_pod"])
            if pod not in known:
                raise DataContractError(
                    f"{where}: inject_pod {pod!r} has no metric/{pod}{METRIC_SUFFIX}; known pods: "
                    f"{sorted(known)[:8]}{'…' if len(known) > 8 else ''}. Fix: restore that "
                    "metric file or remove the injection from the fault list")
            out.append(Injection(at.value / 1e9, pod, str(entry["inject_type"])))
    if not out:
        raise DataContractError(f"{path}: no injections; a Nezha fault list maps each hour "
                                "to its injections")
    return sorted(out, key=lambda inj: (inj.at_s, inj.pod))


# --------------------------------------------------------------------------- windows


def _ceil_grid(t: float) -> int:
    return int(-(-np.floor(t) // STEP_S) * STEP_S)


def _floor_grid(t: float) -> int:
    return int(np.floor(t) // STEP_S * STEP_S)


def system_load(day: Day) -> tuple[np.ndarray, np.ndarray]:
    """(grid stamps [T], sum of every pod's PodWorkload(Ops) [T]) over a regular minute grid."""
    series = [read_pod(path, ["PodWorkload(Ops)"]) for path in day.pods.values()]
    t0 = min(int(p.stamps[0]) for p in series)
    t1 = max(int(p.stamps[-1]) for p in series)
    stamps = np.arange(t0, t1 + 1, STEP_S, dtype=np.int64)
    total = np.zeros(len(stamps))
    seen = np.zeros(len(stamps), dtype=bool)
    for p in series:
        idx = (p.stamps - t0) // STEP_S
        ok = np.isfinite(p.values[:, 0])
        np.add.at(total, idx[ok], p.values[ok, 0])
        seen[idx[ok]] = True
    return stamps, np.where(seen, total, np.nan)


class _Reference:
    """Which minutes may serve as fault-free reference (healthy windows, history baselines,
    SLO minutes) on one day:

    - no listed injection in the window nor `quiet_s` before it;
    - on a day of `incomplete_fault_lists`, nothing between the first and the last injection
      (+ `quiet_s`): its list likely misses injections;
    - with `load_match` f, the median system workload (all pods' PodWorkload) over the window
      within [f·R, R/f], R = its median over the faulty windows: TrainTicket's load drops
      fourfold at 16:02 on 2023-01-29, and windows under another load would differ from the
      faulty ones for a reason that is not the fault.
    """

    def __init__(self, injections: list[Injection], quiet_s: int, guard: bool) -> None:
        self.at = np.array([inj.at_s for inj in injections], dtype=np.float64)
        self.quiet_s = quiet_s
        self.guard = guard
        self.load: tuple[np.ndarray, np.ndarray] | None = None
        self.band: tuple[float, float] | None = None
        self._medians: dict[int, np.ndarray] = {}

    def match_load(self, stamps: np.ndarray, load: np.ndarray,
                   faulty: list[tuple[int, int]], factor: float) -> float | None:
        """Enable the load rule; returns the reference level R (None when it cannot be set)."""
        t0 = int(stamps[0])
        inside = np.zeros(len(stamps), dtype=bool)
        for lo, hi in faulty:
            inside[max(0, (lo - t0) // STEP_S):max(0, (hi - t0) // STEP_S + 1)] = True
        vals = load[inside & np.isfinite(load)]
        if not len(vals) or float(np.median(vals)) <= 0:
            return None
        level = float(np.median(vals))
        self.load, self.band = (stamps, load), (level * factor, level / factor)
        return level

    def listed_clean(self, lo: np.ndarray | float, hi: np.ndarray | float) -> np.ndarray:
        """True where no listed injection falls in [lo - quiet_s, hi]."""
        lo_a = np.asarray(lo, dtype=np.float64) - self.quiet_s
        hi_a = np.asarray(hi, dtype=np.float64)
        return np.asarray(np.searchsorted(self.at, hi_a, "right")
                          == np.searchsorted(self.at, lo_a, "left"))

    def ok(self, lo: np.ndarray | int, hi: np.ndarray | int) -> np.ndarray:
        """True where the window [lo, hi] (grid stamps; same length for all) is a reference."""
        lo_a = np.atleast_1d(np.asarray(lo, dtype=np.int64))
        hi_a = np.atleast_1d(np.asarray(hi, dtype=np.int64))
        ok = self.listed_clean(lo_a, hi_a)
        if self.guard and len(self.at):
            ok &= (hi_a < self.at[0]) | (lo_a - self.quiet_s > self.at[-1])
        if self.load is not None and self.band is not None and len(lo_a):
            stamps, load = self.load
            n = int(hi_a[0] - lo_a[0]) // STEP_S + 1
            if n not in self._medians:
                if n > len(load):
                    self._medians[n] = np.full(0, np.nan)
                else:
                    with np.errstate(all="ignore"), warnings.catch_warnings():
                        warnings.simplefilter("ignore", RuntimeWarning)
                        self._medians[n] = np.nanmedian(
                            np.lib.stride_tricks.sliding_window_view(load, n), axis=1)
            med = self._medians[n]
            i = (lo_a - int(stamps[0])) // STEP_S
            inside = (i >= 0) & (i < len(med))
            level = np.full(len(i), np.nan)
            level[inside] = med[i[inside]]
            with np.errstate(invalid="ignore"):
                ok &= (level >= self.band[0]) & (level <= self.band[1])
        return ok

    def previous(self, t: float) -> float | None:
        i = int(np.searchsorted(self.at, t, "left")) - 1
        return float(self.at[i]) if i >= 0 else None

    def next(self, t: float) -> float | None:
        i = int(np.searchsorted(self.at, t, "right"))
        return float(self.at[i]) if i < len(self.at) else None


def _history_offset(start: int, end: int, pod: PodSeries, ref: _Reference,
                    opts: NezhaOptions) -> tuple[int, bool]:
    """(offset s, clean) of the baseline window [start - offset, end - offset]."""
    off0 = opts.history_offset_s
    first, last = int(pod.stamps[0]), int(pod.stamps[-1])
    length = end - start
    hs = np.arange(first, last - length + 1, STEP_S, dtype=np.int64)
    offs = start - hs
    he = hs + length
    ok = ((he < start) | (hs > end)) & ref.ok(hs, he)
    at0 = np.flatnonzero(offs == off0)
    if len(at0) and ok[at0[0]]:
        return off0, True
    if opts.history_fallback == "keep":
        return off0, False
    earlier = np.flatnonzero(ok & (offs > 0))
    if len(earlier):
        # closest to the configured offset; on a tie the earlier window
        best = earlier[np.lexsort((-offs[earlier], np.abs(offs[earlier] - off0)))[0]]
        return int(offs[best]), True
    later = np.flatnonzero(ok & (offs < 0))
    if len(later):
        return int(offs[later[np.argmax(offs[later])]]), True
    return off0, False


def _slo(day: Day, front: FrontSeries, ref: _Reference, length: int,
         opts: NezhaOptions) -> tuple[float, int]:
    """(latency p99 SLO s, fault-free minutes it was derived from; 0 when configured)."""
    if opts.slo_latency_p99_s is not None:
        return float(opts.slo_latency_p99_s), 0
    free = ref.ok(front.stamps - length, front.stamps) & np.isfinite(front.latency_p99)
    n = int(np.count_nonzero(free))
    if n < 30:
        raise ConfigError(f"{day.folder}: only {n} fault-free minutes in {FRONT_FILE} to derive "
                          "the latency SLO from; set ingest.nezha.slo_latency_p99_s (seconds)")
    return float(np.quantile(front.latency_p99[free], opts.slo_quantile)), n


def _breaches(front: FrontSeries, slo_p99: float, opts: NezhaOptions) -> np.ndarray:
    with np.errstate(invalid="ignore"):
        hit = front.latency_p99 > slo_p99
        if front.success_rate is not None and opts.slo_success_rate is not None:
            hit |= front.success_rate < opts.slo_success_rate
    return np.asarray(hit)


@dataclass
class _Built:
    deployments: list[dict[str, Any]]
    samples: list[pd.DataFrame]
    stats: dict[str, Any]


def _samples(dep_id: str, group: str, pod: PodSeries, lo: int, hi: int, shift: int,
             metrics: tuple[str, ...]) -> pd.DataFrame:
    """Long samples of `pod` over [lo, hi] (its own clock), stamped `shift` s later."""
    a, b = np.searchsorted(pod.stamps, [lo, hi + 1])
    ts = pod.stamps[a:b] + shift
    n, m = len(ts), len(metrics)
    return pd.DataFrame({
        "timestamp": pd.to_datetime(np.repeat(ts, m), unit="s", utc=True),
        "deployment_id": dep_id, "group": group,
        "metric": np.tile(np.array(metrics, dtype=object), n),
        "value": pod.values[a:b].reshape(-1)})


def _build_day(day: Day, opts: NezhaOptions, columns: list[str]) -> _Built:
    metrics = tuple(COLUMNS[c][0] for c in columns)
    injections = read_fault_list(day.fault_list, day.pods)
    front = read_front(day.folder / "metric" / FRONT_FILE)
    ref = _Reference(injections, opts.quiet_s, day.name in opts.incomplete_fault_lists)
    injected = sorted({inj.pod for inj in injections})
    healthy_pods = injected if opts.healthy_pods == "injected" else sorted(day.pods)
    pods = {p: read_pod(day.pods[p], columns) for p in sorted(set(injected) | set(healthy_pods))}
    length = _floor_grid(opts.pre_s + opts.post_s)
    stats: dict[str, Any] = {
        "system": day.system, "injections": len(injections),
        "fault_kinds": dict(sorted(Counter(i.kind for i in injections).items())),
        "incomplete_fault_list": ref.guard,
        "duplicates_dropped": sum(p.duplicates for p in pods.values()),
        "faulty": 0, "faulty_skipped": 0, "impacted": 0, "healthy": 0,
        "healthy_front_breaches": 0, "baseline_shifted": 0, "baseline_later": 0,
        "baseline_contaminated": 0}

    faulty: list[tuple[Injection, int, int]] = []  # injection, start, end
    for inj in injections:
        pod = pods[inj.pod]
        start = max(_ceil_grid(inj.at_s - opts.pre_s), int(pod.stamps[0]))
        end = _floor_grid(inj.at_s + opts.post_s)
        nxt = ref.next(inj.at_s)
        if opts.clip_at_next_injection and nxt is not None:
            end = min(end, _floor_grid(nxt))
        end = min(end, int(pod.stamps[-1]))
        if end <= inj.at_s or end <= start:
            log.warning("nezha %s: no telemetry of %s after the injection at %s; skipped",
                        day.name, inj.pod, pd.Timestamp(inj.at_s, unit="s", tz="UTC"))
            stats["faulty_skipped"] += 1
            continue
        faulty.append((inj, start, end))
    if opts.load_match is not None and faulty:
        stamps, load = system_load(day)
        level = ref.match_load(stamps, load, [(lo, hi) for _, lo, hi in faulty],
                               opts.load_match)
        if level is None:
            log.warning("nezha %s: no workload during the faulty windows; load_match is off",
                        day.name)
        stats["load_reference_ops"] = level
    slo_p99, slo_minutes = _slo(day, front, ref, length, opts)
    stats["slo_latency_p99_s"] = slo_p99
    stats["slo_minutes"] = slo_minutes
    stats["slo_success_rate"] = (opts.slo_success_rate if front.success_rate is not None
                                 else None)
    breach = _breaches(front, slo_p99, opts)
    built = _Built([], [], stats)

    def add(dep: dict[str, Any], pod: PodSeries) -> None:
        start, end = int(dep["start_s"]), int(dep["end_s"])
        built.samples.append(_samples(dep["deployment_id"], "canary", pod, start, end, 0,
                                      metrics))
        if opts.baseline == "history":
            off, clean = _history_offset(start, end, pod, ref, opts)
            dep["baseline_offset_s"] = off
            dep["baseline_clean"] = clean
            stats["baseline_shifted"] += int(clean and off != opts.history_offset_s)
            stats["baseline_later"] += int(clean and off < 0)
            stats["baseline_contaminated"] += int(not clean)
            built.samples.append(_samples(dep["deployment_id"], "baseline", pod, start - off,
                                          end - off, off, metrics))
        built.deployments.append(dep)

    for inj, start, end in faulty:
        n = injections.index(inj) + 1
        stamp = pd.Timestamp(inj.at_s, unit="s", tz="UTC").strftime("%H%M%S")
        hits = np.flatnonzero((front.measured_s > inj.at_s) & (front.stamps <= end) & breach)
        prev = ref.previous(inj.at_s)
        add({"deployment_id": f"{day.name}/{service_of(inj.pod)}/fault-{n:02d}-{stamp}",
             "service": service_of(inj.pod), "start_s": start, "end_s": end, "label": "faulty",
             "fault_onset_s": inj.at_s,
             "impact_at_s": float(front.stamps[hits[0]]) if len(hits) else np.nan,
             "fault_kind": inj.kind, "day": day.name, "system": day.system, "pod": inj.pod,
             "prev_injection_gap_s": np.nan if prev is None else inj.at_s - prev,
             "clean_lead": bool(ref.listed_clean(start, np.nextafter(inj.at_s, -np.inf)))},
            pods[inj.pod])
        stats["faulty"] += 1
        stats["impacted"] += int(len(hits) > 0)

    for pod_name in healthy_pods:
        pod = pods[pod_name]
        starts = np.arange(int(pod.stamps[0]), int(pod.stamps[-1]) - length + 1, STEP_S,
                           dtype=np.int64)
        free = starts[ref.ok(starts, starts + length)] if len(starts) else starts
        rng = np.random.default_rng([opts.seed, zlib.crc32(f"{day.name}/{pod_name}".encode())])
        chosen: list[int] = []
        for s in rng.permutation(free):
            if len(chosen) >= opts.healthy_per_pod:
                break
            if all(abs(int(s) - c) > length for c in chosen):
                chosen.append(int(s))
        if len(chosen) < opts.healthy_per_pod:
            log.warning("nezha %s: only %d fault-free window(s) of %d s for %s (asked %d)",
                        day.name, len(chosen), length, pod_name, opts.healthy_per_pod)
        for s in sorted(chosen):
            stamp = pd.Timestamp(s, unit="s", tz="UTC").strftime("%H%M")
            prev = ref.previous(s)
            in_window = (front.stamps >= s) & (front.stamps <= s + length) & breach
            stats["healthy_front_breaches"] += int(in_window.any())
            add({"deployment_id": f"{day.name}/{service_of(pod_name)}/healthy-{stamp}",
                 "service": service_of(pod_name), "start_s": s, "end_s": s + length,
                 "label": "healthy", "fault_onset_s": np.nan, "impact_at_s": np.nan,
                 "fault_kind": None, "day": day.name, "system": day.system, "pod": pod_name,
                 "prev_injection_gap_s": np.nan if prev is None else s - prev,
                 "clean_lead": True}, pod)
            stats["healthy"] += 1
    return built


def read(folder: str | Path | None = None, options: NezhaOptions | Mapping[str, Any] | None = None
         ) -> Ingested:
    """Read Nezha day folder(s) as a bundle of faulty (per injection) and healthy windows."""
    opts = (options if isinstance(options, NezhaOptions)
            else NezhaOptions.from_mapping(options))
    folder = Path(folder) if folder is not None else default_input()
    days = find_days(folder)
    names = [d.name for d in days]
    if opts.days is not None:
        missing = sorted(set(opts.days) - set(names))
        if missing:
            raise DataContractError(f"{folder}: no day folder {missing}; available: {names} "
                                    "(ingest.nezha.days)")
        days = [d for d in days if d.name in opts.days]
    if opts.systems is not None:
        systems = sorted({d.system for d in days})
        missing = sorted(set(opts.systems) - set(systems))
        if missing:
            raise ConfigError(f"ingest.nezha.systems names {missing}; the days under {folder} "
                              f"hold {systems}")
        days = [d for d in days if d.system in opts.systems]
    chosen = set(opts.metrics) if opts.metrics is not None else set(METRICS)
    columns = [c for c, (name, _) in COLUMNS.items() if name in chosen]

    deployments: list[dict[str, Any]] = []
    samples: list[pd.DataFrame] = []
    per_day: dict[str, Any] = {}
    for day in days:
        built = _build_day(day, opts, columns)
        deployments += built.deployments
        samples += built.samples
        per_day[day.name] = built.stats
        s = built.stats
        log.info("nezha %s (%s): %d injections -> %d faulty (%d with impact), %d healthy; "
                 "front p99 SLO %.3f s", day.name, day.system, s["injections"], s["faulty"],
                 s["impacted"], s["healthy"], s["slo_latency_p99_s"])
    if not deployments:
        raise DataContractError(f"{folder}: no deployment could be built (check "
                                "ingest.nezha.days/systems and the window settings)")
    deps = pd.DataFrame(deployments)
    for col in ("start", "end", "fault_onset", "impact_at"):
        deps[col] = pd.to_datetime(deps.pop(f"{col}_s").astype(float), unit="s", utc=True)
    order = ["deployment_id", "service", "start", "end", "label", "fault_onset", "impact_at",
             "fault_kind"]
    deps = deps[order + [c for c in deps.columns if c not in order]]
    bundle = make_bundle(deps, pd.concat(samples, ignore_index=True), str(folder))
    catalog = Catalog.load(opts.catalog or default_catalog())
    return Ingested(bundle=bundle, source="nezha", native_step_s=STEP_S, catalog=catalog,
                    extra_manifest={"nezha": {"options": _jsonable(asdict(opts)),
                                              "days": per_day,
                                              "dropped_columns": DROPPED}})


def _jsonable(d: dict[str, Any]) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}
