"""`canaryml ingest source=nezha`: Nezha's per-pod CSVs + fault list → canonical dataset.

Runs against the real files in ../shared/data/public/nezha (skipped when absent); every
expectation is recomputed here from the raw JSON/CSV, not from the reader's helpers.
"""

from __future__ import annotations

import json
import math
import shutil
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from omegaconf import open_dict

from canaryml.cli import compose
from canaryml.data.dataset import CanonicalDataset
from canaryml.errors import ConfigError, DataContractError
from canaryml.ingest import nezha, prometheus
from canaryml.tasks import ingest as ingest_task
from tests.conftest import PUBLIC_DATA

NEZHA = PUBLIC_DATA / "nezha"
DAYS = {"2022-08-22": 24, "2023-01-29": 28}  # injections in each fault list (README says 32
# for 2023-01-29; its fault list holds 28 entries)
needs_data = pytest.mark.skipif(not all((NEZHA / d / f"{d}-fault_list.json").is_file()
                                        for d in DAYS), reason="shared Nezha data not present")


def injections(day: str) -> list[dict[str, Any]]:
    raw = json.loads((NEZHA / day / f"{day}-fault_list.json").read_text())
    out = [dict(e, at=datetime.strptime(e["inject_time"], "%Y-%m-%d %H:%M:%S")
                .replace(tzinfo=UTC).timestamp()) for v in raw.values() for e in v]
    return sorted(out, key=lambda e: e["at"])


def raw_pod(day: str, pod: str) -> pd.DataFrame:
    """The pod's CSV indexed by the minute its `Time` string was measured, rounded up."""
    df = pd.read_csv(NEZHA / day / "metric" / f"{pod}_metric.csv")
    t = pd.to_datetime(df["Time"].str.extract(r"^(\S+ \S+) \+0000 UTC")[0], utc=True)
    df.index = [math.ceil(x.value / 60e9) * 60 for x in t]  # x.value: epoch ns
    return df


def ingest(tmp_path: Path, day: str, *extra: str) -> CanonicalDataset:
    out = tmp_path / f"nezha-{day}"
    cfg = compose("ingest", ["source=nezha", f"input={NEZHA / day}", f"out={out}", *extra])
    assert ingest_task.run(cfg) == 0
    return CanonicalDataset(out)


@needs_data
@pytest.mark.parametrize("day", sorted(DAYS))
def test_nezha_day(tmp_path: Path, day: str) -> None:
    ds = ingest(tmp_path, day)
    m = ds.manifest
    assert m["source"] == "nezha" and ds.step_s == 60
    assert ds.catalog.get("app_cpu").unit == "ratio of CPU limit"
    assert ds.catalog.get("latency_p99").slo is None  # no per-pod SLO (default catalog: 1 s)
    assert ds.catalog.get("net_rx").kind == "infra" and ds.catalog.get("latency_p90").kind == "app"
    assert len(ds.metrics) == 16 and "success_rate" not in ds.metrics
    deps = ds.deployments
    faulty = deps[deps["label"] == "faulty"].reset_index(drop=True)
    healthy = deps[deps["label"] == "healthy"]
    inj = injections(day)
    assert len(inj) == DAYS[day] == len(faulty) == m["nezha"]["days"][day]["faulty"]
    assert len(healthy) == 3 * faulty["pod"].nunique()  # default: 3 per injected pod
    assert len(healthy) >= 0.9 * len(faulty)  # roughly balanced (27 vs 28 on 2023-01-29)
    # one faulty deployment per injection: onset = inject_time, kind = inject_type, the pod
    onset = faulty["fault_onset"].astype("int64").to_numpy() / 1e6
    np.testing.assert_array_equal(onset, [e["at"] for e in inj])
    assert list(faulty["fault_kind"]) == [e["inject_type"] for e in inj]
    assert list(faulty["pod"]) == [e["inject_pod"] for e in inj]
    start_s = deps["start"].astype("int64").to_numpy() / 1e6
    end_s = deps["end"].astype("int64").to_numpy() / 1e6
    at = np.array([e["at"] for e in inj])
    for i in np.flatnonzero(deps["label"] == "faulty"):
        o = deps["fault_onset"].iloc[i].timestamp()
        assert start_s[i] >= o - 300 and o < end_s[i] <= o + 600
        assert not np.any((at > o) & (at <= end_s[i]))  # cut at the next injection
    # healthy windows: no injection inside nor in the 10 minutes before; all the same length
    for i in np.flatnonzero(deps["label"] == "healthy"):
        assert not np.any((at >= start_s[i] - 600) & (at <= end_s[i])), deps.iloc[i]
    assert set(end_s[deps["label"] == "healthy"] - start_s[deps["label"] == "healthy"]) == {900}
    # impact_at, where set: after onset, inside the window
    hit = faulty.dropna(subset=["impact_at"])
    assert (hit["impact_at"] > hit["fault_onset"]).all() and (hit["impact_at"] <= hit["end"]).all()

    # both groups on one grid; the baseline is the pod's own minutes baseline_offset_s earlier
    checked = 0
    for _, dep in deps.iloc[[0, len(faulty) - 1, len(faulty), len(deps) - 1]].iterrows():
        arr = ds.arrays(dep["deployment_id"])
        assert arr.baseline is not None and arr.baseline.shape == arr.canary.shape
        assert bool(dep["baseline_clean"])
        raw = raw_pod(day, dep["pod"])
        off = int(dep["baseline_offset_s"])
        for col, name, scale in (("PodServerLatencyP99(s)", "latency_p99", 1.0),
                                 ("MemoryUsage(Mi)", "app_memory", 2.0 ** 20),
                                 ("CpuUsageRate(%)", "app_cpu", 0.01)):
            j = arr.metrics.index(name)
            for k in (0, len(arr.timestamps_s) // 2, len(arr.timestamps_s) - 1):
                t = int(arr.timestamps_s[k])
                for group, src_t in ((arr.canary, t), (arr.baseline, t - off)):
                    want = raw[col].get(src_t, np.nan) * scale
                    np.testing.assert_allclose(group[k, j], want, rtol=1e-6, equal_nan=True)
                    checked += int(np.isfinite(want) and want != 0)
    assert checked >= 4 * 3 * 2 * 2  # of 72 comparisons, most are real values (not NaN/0)


@needs_data
def test_nezha_parent_folder_picks_days_and_systems() -> None:
    ing = nezha.read(NEZHA, {"days": ["2023-01-29"], "metrics": ["latency_p99"],
                             "healthy_per_pod": 1})
    deps = ing.bundle.deployments
    assert set(deps["day"]) == {"2023-01-29"} and set(deps["system"]) == {"train-ticket"}
    assert (deps["label"] == "faulty").sum() == DAYS["2023-01-29"]
    ing = nezha.read(NEZHA, {"systems": ["online-boutique"], "metrics": ["latency_p99"],
                             "healthy_per_pod": 0, "baseline": "none"})
    deps = ing.bundle.deployments
    assert set(deps["day"]) == {"2022-08-22"} and len(deps) == DAYS["2022-08-22"]
    with pytest.raises(DataContractError, match=r"no day folder \['2020-01-01'\].*available"):
        nezha.read(NEZHA, {"days": ["2020-01-01"]})
    with pytest.raises(ConfigError, match="systems names"):
        nezha.read(NEZHA, {"systems": ["sock-shop"]})


@needs_data
def test_nezha_fixed_history_offset_and_no_baseline(tmp_path: Path) -> None:
    day = "2022-08-22"
    ds = ingest(tmp_path, day, "ingest.nezha.history_fallback=keep",
                "ingest.nezha.history_offset_s=1800", "ingest.nezha.metrics=[latency_p99]")
    deps = ds.deployments.set_index("deployment_id")
    assert set(deps["baseline_offset_s"]) == {1800}
    # first injection: 30 min earlier predates the data; kept (flagged) rather than moved
    first = deps[deps["label"] == "faulty"].index[0]
    assert not deps.loc[first, "baseline_clean"]
    arr = ds.arrays(first)
    assert arr.baseline is None or np.isnan(arr.baseline).all()
    dep = deps[deps["label"] == "healthy"].index[0]
    arr = ds.arrays(dep)
    raw = raw_pod(day, deps.loc[dep, "pod"])["PodServerLatencyP99(s)"]
    want = [raw.get(int(t) - 1800, np.nan) for t in arr.timestamps_s]
    assert arr.baseline is not None
    np.testing.assert_allclose(arr.baseline[:, 0], want, rtol=1e-6)

    ds = ingest(tmp_path / "none", day, "ingest.nezha.baseline=none")
    assert "baseline_offset_s" not in ds.deployments.columns
    dep = ds.deployments["deployment_id"].iloc[0]
    assert ds.arrays(dep).baseline is None  # canary group only, like SMD/NAB
    assert set(ds.telemetry(dep)["group"]) == {"canary"}


def fake_day(root: Path, faults: dict[str, list[dict[str, str]]]) -> Path:
    """A day folder from two real pod files and the real front_service.csv."""
    src = NEZHA / "2022-08-22" / "metric"
    (root / "metric").mkdir(parents=True)
    for name in ("front_service.csv", "frontend-579b9bff58-t2dbm_metric.csv",
                 "cartservice-579f59597d-wc2lz_metric.csv"):
        shutil.copy(src / name, root / "metric" / name)
    (root / f"{root.name}-fault_list.json").write_text(json.dumps(faults))
    return root


FAULT = {"inject_time": "2022-08-22 09:00:30", "inject_timestamp": "0",
         "inject_pod": "cartservice-579f59597d-wc2lz", "inject_type": "exception"}


@needs_data
def test_nezha_errors_name_the_file_and_write_nothing(tmp_path: Path) -> None:
    out = tmp_path / "out"

    def fails(input_dir: Path, match: str, *extra: str,
              error: type[Exception] = DataContractError) -> None:
        cfg = compose("ingest", ["source=nezha", f"input={input_dir}", f"out={out}", *extra])
        with pytest.raises(error, match=match):
            ingest_task.run(cfg)
        assert not out.exists() and not list(tmp_path.glob(".out.tmp-*"))

    (tmp_path / "empty").mkdir()
    fails(tmp_path / "empty", "is not a Nezha day folder nor a folder of them")
    fails(tmp_path / "missing", "does not exist")
    bad = dict(FAULT, inject_pod="paymentservice-9cdb6588f-554sm")
    day = fake_day(tmp_path / "2022-08-22", {"09": [FAULT, bad]})
    fails(day, r"fault_list.json: hour '09', entry 1: inject_pod "
               r"'paymentservice-9cdb6588f-554sm' has no metric/paymentservice")
    (day / "2022-08-22-fault_list.json").write_text(json.dumps(
        {"09": [dict(FAULT, inject_time="yesterday")]}))
    fails(day, r"entry 0: inject_time 'yesterday' is not a time")
    (day / "2022-08-22-fault_list.json").write_text(json.dumps({"09": [FAULT]}))
    pod = day / "metric" / "frontend-579b9bff58-t2dbm_metric.csv"
    lines = pod.read_text().splitlines()
    lines[3] = "not a time" + lines[3][lines[3].index(","):]
    pod.write_text("\n".join(lines) + "\n")
    fails(day, r"frontend-579b9bff58-t2dbm_metric.csv: column 'Time' is not a time .* lines 4",
          "ingest.nezha.healthy_pods=all")
    fails(day, r"unknown key\(s\) \['pre_minutes'\]", "+ingest.nezha.pre_minutes=5",
          error=ConfigError)
    fails(day, r"history_offset_s=90 must be a positive multiple of 60",
          "ingest.nezha.history_offset_s=90", error=ConfigError)
    (day / "metric" / "front_service.csv").unlink()
    fails(day, r"no front_service.csv")


@needs_data
def test_nezha_small_day_windows(tmp_path: Path) -> None:
    """A hand-made fault list: window bounds, the next-injection cut and a history baseline."""
    second = dict(FAULT, inject_time="2022-08-22 09:06:10")
    day = fake_day(tmp_path / "2022-08-22", {"09": [FAULT, second]})
    ing = nezha.read(day, {"metrics": ["latency_p99"], "healthy_per_pod": 2,
                           "incomplete_fault_lists": None, "load_match": None})
    deps = ing.bundle.deployments.set_index("deployment_id")
    first = deps.loc["2022-08-22/cartservice/fault-01-090030"]
    assert first["start"] == pd.Timestamp("2022-08-22 08:56:00Z")  # 5 min before, on the grid
    assert first["end"] == pd.Timestamp("2022-08-22 09:06:00Z")  # cut at the next injection
    assert first["fault_onset"] == pd.Timestamp("2022-08-22 09:00:30Z")
    assert first["baseline_offset_s"] == 3600 and first["baseline_clean"]
    last = deps.loc["2022-08-22/cartservice/fault-02-090610"]
    assert last["end"] == pd.Timestamp("2022-08-22 09:16:00Z") and not last["clean_lead"]
    assert last["prev_injection_gap_s"] == 340
    assert (deps["label"] == "healthy").sum() == 2


class FakeClient:
    """Answers every range query with value = timestamp, and records the queries."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, float, float]] = []

    def query_range(self, promql: str, start_s: float, end_s: float, step_s: float
                    ) -> list[prometheus.Series]:
        self.calls.append((promql, start_s, end_s))
        ts = np.arange(start_s, end_s + step_s / 2, step_s)
        return [prometheus.Series({}, ts, ts.copy())]


def test_prometheus_history_baseline() -> None:
    """source=prometheus, `baseline: history`: the canary selector, one offset earlier."""
    client = FakeClient()
    deps = [{"deployment_id": "web-1", "service": "web", "start": "2024-05-01T12:00:00Z",
             "end": "2024-05-01T12:10:00Z", "label": "faulty"}]
    sel = {"canary": 'pod="{deployment}-canary"', "baseline": 'pod="{deployment}-stable"'}
    ing = prometheus.read("http://prom", {"latency_p99": "max(lat{{selector}})"}, sel,
                          step_s=60, deployments=deps, client=client,  # type: ignore[arg-type]
                          baseline="history", history_offset_s=3600)
    t0 = pd.Timestamp("2024-05-01T12:00:00Z").timestamp()
    assert client.calls == [('max(lat{pod="web-1-canary"})', t0, t0 + 600),
                            ('max(lat{pod="web-1-canary"})', t0 - 3600, t0 + 600 - 3600)]
    s = ing.bundle.samples.to_pandas()
    base = s[s["group"] == "baseline"]
    ts = base["timestamp"].astype("int64").to_numpy() / 1e6
    np.testing.assert_array_equal(ts, t0 + np.arange(11) * 60)  # re-stamped onto the window
    np.testing.assert_array_equal(base["value"], ts - 3600)  # ... holding the earlier values
    assert ing.extra_manifest["prometheus"]["baseline"] == "history"
    client = FakeClient()
    ing = prometheus.read("http://prom", {"latency_p99": "max(lat{{selector}})"}, sel,
                          step_s=60, deployments=deps, client=client,  # type: ignore[arg-type]
                          baseline="none")
    assert len(client.calls) == 1 and set(ing.bundle.samples.column("group").to_pylist()) == {
        "canary"}
    with pytest.raises(ConfigError, match="baseline='hist' is not one of"):
        prometheus.read("http://prom", {"m": "x{{selector}}"}, sel, step_s=60,
                        deployments=deps, client=client, baseline="hist")  # type: ignore[arg-type]


def test_nezha_config_keys_compose() -> None:
    cfg = compose("ingest", ["source=nezha"])
    opts = nezha.NezhaOptions.from_mapping(cfg.ingest.nezha)
    assert opts == nezha.NezhaOptions()  # conf/ingest/default.yaml = the code's defaults
    with open_dict(cfg):
        cfg.ingest.nezha.metrics = ["latency_p99", "cpu"]
    with pytest.raises(ConfigError, match=r"unknown metric\(s\) \['cpu'\]"):
        nezha.NezhaOptions.from_mapping(cfg.ingest.nezha)
