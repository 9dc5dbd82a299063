"""The canary corpus simulator: determinism, contract, labels, families, scrape defects."""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from omegaconf import OmegaConf

from canaryml.catalog import Catalog
from canaryml.cli import compose
from canaryml.data.contract import read_bundle, write_bundle
from canaryml.data.dataset import CanonicalDataset, write_canonical
from canaryml.errors import ConfigError
from canaryml.simulate import (
    FAMILIES,
    FAULT_FAMILIES,
    HEALTHY_VARIANTS,
    ONSET_STYLES,
    SimParams,
    first_breach,
    plan_family,
    plan_onset_style,
    simulate_corpus,
    simulate_deployment,
    simulate_deployments,
)

CAT = Catalog.default()


@pytest.fixture(scope="module")
def params() -> SimParams:
    cfg = compose("simulate")
    return SimParams.from_mapping(cast(dict[str, Any], OmegaConf.to_container(cfg.simulate)))


@pytest.fixture(scope="module")
def corpus(params: SimParams) -> tuple[pd.DataFrame, pa.Table]:
    """The default corpus: `canaryml simulate` with defaults (n=200, seed=0)."""
    cfg = compose("simulate")
    return simulate_corpus(int(cfg.n), int(cfg.seed), params, CAT, progress=False)


def _wide_canary(samples: pa.Table, deployment_id: str, metrics: list[str]) -> pd.DataFrame:
    df = samples.filter(pa.compute.equal(samples.column("deployment_id").cast(pa.string()),
                                         deployment_id)).to_pandas()
    df = df[(df["group"] == "canary") & df["metric"].isin(metrics)]
    return df.pivot_table(index="timestamp", columns="metric", values="value",
                          aggfunc="first", dropna=False)


# --------------------------------------------------------------------------- determinism


def test_same_seed_same_tables_other_seed_differs(params: SimParams) -> None:
    d1, s1 = simulate_corpus(12, 7, params, CAT)
    d2, s2 = simulate_corpus(12, 7, params, CAT)
    pd.testing.assert_frame_equal(d1, d2)
    pd.testing.assert_frame_equal(s1.to_pandas(), s2.to_pandas())  # NaN-aware
    d3, s3 = simulate_corpus(12, 8, params, CAT)
    assert not s1.column("value").equals(s3.column("value"))
    assert not d1["deployment_id"].equals(d3["deployment_id"])


def test_one_deployment_regenerates_alone(params: SimParams) -> None:
    deps = simulate_deployments(10, 3, params, CAT)
    for i in (0, 4, 9):
        d = deps[i]
        again = simulate_deployment(plan_family(3, i, params), 3, params, CAT, index=i)
        assert again.family == d.family and again.deployment_id == d.deployment_id
        np.testing.assert_array_equal(again.canary, d.canary)
        np.testing.assert_array_equal(again.baseline, d.baseline)
        assert again.impact_at_s == d.impact_at_s and again.fault_onset_s == d.fault_onset_s


def test_deployment_shape_and_grid(params: SimParams) -> None:
    d = simulate_deployment("mem_leak", seed=1, params=params, catalog=CAT)
    T, M = params.steps, len(CAT.names)
    assert T == 240 and d.canary.shape == d.baseline.shape == (T, M)
    assert d.metrics == tuple(CAT.names) and d.row_missing.shape == (2, T, M)
    assert np.all(np.diff(d.timestamps_s) == params.step_s)
    assert d.label == "faulty" and d.fault_kind == "mem_leak"


# --------------------------------------------------------------------------- contract


@pytest.mark.parametrize("fmt", ["parquet", "csv"])
def test_bundle_passes_contract_and_ingest(tmp_path: Path, params: SimParams, fmt: str) -> None:
    deps, samples = simulate_corpus(6, 2, params, CAT)
    write_bundle(deps, samples, tmp_path / "bundle", fmt=fmt)
    bundle = read_bundle(tmp_path / "bundle")
    assert bundle.duplicates_dropped == 0 and bundle.unsorted_rows == 0
    assert bundle.samples.num_rows == samples.num_rows
    assert list(bundle.deployments["variant"]) == list(deps["variant"])
    manifest = write_canonical(bundle, tmp_path / "canon", step_s=params.step_s, catalog=CAT,
                               source="simulator")
    ds = CanonicalDataset(tmp_path / "canon")
    # the onset style survives ingest as an extra deployments column (empty when healthy)
    styles = ds.deployments.set_index("deployment_id")["fault_onset_style"]
    for _, row in deps.iterrows():
        got = styles[row["deployment_id"]]
        if row["label"] == "faulty":
            assert got == row["fault_onset_style"] and got in ONSET_STYLES
        else:
            assert pd.isna(got) or got == ""
    assert manifest["counts"]["rows"] == 6 * 2 * params.steps
    assert set(ds.metrics) == set(CAT.names)
    arr = ds.arrays(str(deps["deployment_id"].iloc[0]))
    assert arr.canary.shape == (params.steps, len(ds.metrics))


# --------------------------------------------------------------------------- defaults


def test_defaults_give_200_half_faulty_every_family(corpus: tuple[pd.DataFrame, pa.Table]
                                                    ) -> None:
    deps, samples = corpus
    assert len(deps) >= 200
    assert 0.4 <= (deps["label"] == "faulty").mean() <= 0.6
    assert set(deps["variant"]) == set(FAMILIES)
    assert deps["deployment_id"].is_unique
    faulty = deps[deps["label"] == "faulty"]
    assert set(faulty["fault_kind"]) == set(FAULT_FAMILIES)
    assert set(deps.loc[deps["label"] == "healthy", "variant"]) == set(HEALTHY_VARIANTS)
    assert set(samples.column("metric").unique().to_pylist()) == set(CAT.names)
    assert set(samples.column("group").unique().to_pylist()) == {"baseline", "canary"}


def test_labels_are_computed_from_the_canary(corpus: tuple[pd.DataFrame, pa.Table],
                                             params: SimParams) -> None:
    deps, samples = corpus
    healthy = deps[deps["label"] == "healthy"]
    assert healthy[["fault_onset", "impact_at", "fault_kind"]].isna().all().all()
    faulty = deps[deps["label"] == "faulty"]
    assert faulty["fault_onset"].notna().all() and faulty["fault_kind"].notna().all()
    hit = faulty[faulty["impact_at"].notna()]
    assert (hit["impact_at"] >= hit["fault_onset"]).all()
    # mid-run onsets in the middle third, from-start onsets at the first sample; severities
    # spread: quick, slow and never
    rel = (faulty["fault_onset"] - faulty["start"]).dt.total_seconds() / params.duration_s
    mid = faulty["fault_onset_style"] == "mid_run"
    assert rel[mid].between(0.3, 0.7).all() and (rel[~mid] == 0).all()
    lead_min = (hit["impact_at"] - hit["fault_onset"]).dt.total_seconds() / 60
    assert (lead_min < 5).any() and (lead_min > 15).any()
    assert 0.05 <= faulty["impact_at"].isna().mean() <= 0.4
    # recompute the breach rule (an SLO metric over its SLO for 2 consecutive steps) from the
    # long samples: it must give the same timestamp
    slo = {m.name: m.slo for m in CAT.slo_metrics()}
    checked = 0
    styles_checked: set[str] = set()
    for _, row in faulty.head(40).iterrows():
        wide = _wide_canary(samples, row["deployment_id"], list(slo))
        grid = pd.date_range(row["start"], row["end"], freq=f"{params.step_s}s")
        wide = wide.reindex(grid)
        first = None
        for name, level in slo.items():
            over = (wide[name] > level).to_numpy()
            both = np.flatnonzero(over[:-1] & over[1:])
            if len(both) and (first is None or both[0] < first):
                first = int(both[0])
        expected = pd.NaT if first is None else grid[first]
        assert (pd.isna(expected) and pd.isna(row["impact_at"])) or expected == row["impact_at"]
        checked += int(first is not None)
        styles_checked.add(str(row["fault_onset_style"]))
    assert checked >= 20 and styles_checked == set(ONSET_STYLES)


def test_healthy_canaries_never_breach_on_their_own(params: SimParams) -> None:
    for i in range(40):
        for family in ("plain", "benign_shift"):
            d = simulate_deployment(family, seed=11, params=params, catalog=CAT, index=i)
            assert d.breach_at_s is None, f"{family} #{i} breached"
            assert d.impact_at_s is None and d.fault_onset_s is None


def test_first_breach_needs_two_consecutive_steps() -> None:
    metrics = ("error_rate", "latency_p99")
    v = np.zeros((10, 2))
    v[2, 1] = 5.0  # a single-point glitch
    v[5, 0], v[6, 0] = np.nan, 0.5  # NaN breaks a run
    assert first_breach(v, metrics, CAT) is None
    v[7, 0] = 0.5
    assert first_breach(v, metrics, CAT) == 6


# --------------------------------------------------------------------------- families


def _idx(d: Any, metric: str) -> int:
    return list(d.metrics).index(metric)


def _pre_post(d: Any, metric: str, group: str = "canary") -> tuple[float, float]:
    onset = int((d.fault_onset_s - d.timestamps_s[0]) // 15)
    v = d.group(group)[:, _idx(d, metric)]
    return float(np.nanpercentile(v[:onset], 90)), float(np.nanpercentile(v[onset:], 90))


@pytest.mark.parametrize(("family", "precursor"), [
    ("mem_leak", "app_memory"), ("latency_creep", "latency_p99"), ("error_ramp", "error_rate"),
    ("cpu_hot_loop", "app_cpu"), ("conn_pool_exhaustion", "latency_p99"),
    ("slow_storage", "storage_latency")])
def test_faults_act_on_the_canary_only(params: SimParams, family: str, precursor: str) -> None:
    quick = SimParams.from_mapping(params.to_mapping() | {"breach_after_s": [600, 900]})
    rises = 0
    for i in range(6):
        d = simulate_deployment(family, seed=21, params=quick, catalog=CAT, index=i,
                                onset_style="mid_run")
        c_pre, c_post = _pre_post(d, precursor, "canary")
        b_pre, b_post = _pre_post(d, precursor, "baseline")
        rises += int(c_post > 1.5 * c_pre and b_post < 1.3 * b_pre)
        assert first_breach(d.baseline, d.metrics, CAT) is None, "the baseline breached"
        assert d.impact_at_s is not None and d.fault_onset_s is not None
        assert d.impact_at_s > d.fault_onset_s
    assert rises >= 5


def test_conn_pool_raises_the_tail_not_the_median(params: SimParams) -> None:
    quick = SimParams.from_mapping(params.to_mapping() | {"breach_after_s": [600, 900]})
    d = simulate_deployment("conn_pool_exhaustion", seed=4, params=quick, catalog=CAT,
                            onset_style="mid_run")
    assert d.impact_at_s is not None
    k = int((d.impact_at_s - d.timestamps_s[0]) // 15)
    onset = int((d.fault_onset_s - d.timestamps_s[0]) // 15)
    p50, p99 = d.canary[:, _idx(d, "latency_p50")], d.canary[:, _idx(d, "latency_p99")]
    assert np.nanmedian(p99[k: k + 4]) > 2.0 * np.nanmedian(p99[:onset])
    assert np.nanmedian(p50[k: k + 4]) < 1.5 * np.nanmedian(p50[:onset])


def test_shared_events_hit_both_groups(params: SimParams) -> None:
    for i in range(4):
        d = simulate_deployment("traffic_surge", seed=5, params=params, catalog=CAT, index=i)
        k = int(d.details["surge_at"])
        for group in ("baseline", "canary"):
            # per-pod load peaks, then the HPA scales out (rolling median: no glitches)
            rr = pd.Series(d.group(group)[:, _idx(d, "request_rate")]).rolling(3).median()
            assert rr[k: k + 40].max() > 1.3 * rr[:k].median()
            cpu = pd.Series(d.group(group)[:, _idx(d, "app_cpu")]).rolling(3).median()
            assert cpu[k: k + 40].max() > 1.2 * cpu[:k].median()
        d = simulate_deployment("shared_downstream_slowdown", seed=5, params=params,
                                catalog=CAT, index=i)
        k = int(d.details["slowdown_at"])
        for group in ("baseline", "canary"):
            p99 = d.group(group)[:, _idx(d, "latency_p99")]
            assert np.nanmedian(p99[k + 14: k + 22]) > 1.15 * np.nanmedian(p99[:k])


def test_correlated_metrics(params: SimParams) -> None:
    d = simulate_deployment("traffic_surge", seed=2, params=params, catalog=CAT)
    ok = ~np.isnan(d.canary).any(axis=1)
    c = np.corrcoef(d.canary[ok].T)
    assert c[_idx(d, "request_rate"), _idx(d, "app_cpu")] > 0.8
    assert c[_idx(d, "request_rate"), _idx(d, "net_tx")] > 0.8
    # the baseline's traffic mix is shared with the canary
    ok2 = ok & ~np.isnan(d.baseline).any(axis=1)
    rr = _idx(d, "request_rate")
    assert np.corrcoef(d.canary[ok2, rr], d.baseline[ok2, rr])[0, 1] > 0.8


def test_benign_shift_uses_more_resources_from_the_start(params: SimParams) -> None:
    d = simulate_deployment("benign_shift", seed=3, params=params, catalog=CAT)
    mem = _idx(d, "app_memory")
    assert np.nanmean(d.canary[:60, mem]) > 1.03 * np.nanmean(d.baseline[:60, mem])


# --------------------------------------------------------------------------- onset styles


def test_from_start_faults_at_the_configured_share(corpus: tuple[pd.DataFrame, pa.Table],
                                                   params: SimParams) -> None:
    deps, _ = corpus
    assert params.from_start_share == 0.5 and params.from_start_step_share == 0.5
    assert deps.loc[deps["label"] == "healthy", "fault_onset_style"].isna().all()
    faulty = deps[deps["label"] == "faulty"]
    style = faulty["fault_onset_style"]
    assert set(style) == set(ONSET_STYLES)
    from_start = style != "mid_run"
    assert 0.4 <= from_start.mean() <= 0.6
    assert 0.35 <= (style[from_start] == "from_start_step").mean() <= 0.65
    # from-start faults begin at the deployment's first sample; fault_kind stays the family
    assert (faulty.loc[from_start, "fault_onset"] == faulty.loc[from_start, "start"]).all()
    assert (faulty.loc[~from_start, "fault_onset"] > faulty.loc[~from_start, "start"]).all()
    assert set(faulty["fault_kind"]) == set(FAULT_FAMILIES)
    assert (faulty["fault_kind"] == faulty["variant"]).all()
    # the style is planned per (seed, index): the corpus agrees with plan_onset_style
    for i, row in enumerate(deps.itertuples()):
        if row.label == "faulty":
            assert row.fault_onset_style == plan_onset_style(0, i, params)


def test_from_start_steps_breach_at_once_later_or_never(corpus: tuple[pd.DataFrame, pa.Table]
                                                        ) -> None:
    deps, _ = corpus
    steps = deps[deps["fault_onset_style"] == "from_start_step"]
    lead_min = (steps["impact_at"] - steps["fault_onset"]).dt.total_seconds() / 60
    assert (lead_min <= 1).any()  # bad enough to breach from the first minute
    assert (lead_min > 10).any()  # a smaller step that a slow drift takes over the SLO later
    assert steps["impact_at"].isna().any()  # a regression that never breaches: still faulty
    assert (steps["label"] == "faulty").all()


DRIVEN = [("latency_creep", "latency_p99"), ("mem_leak", "app_memory"),
          ("error_ramp", "error_rate"), ("cpu_hot_loop", "app_cpu"),
          ("conn_pool_exhaustion", "latency_p99"), ("slow_storage", "storage_latency")]


def _first_minutes_ratio(d: Any, metric: str, steps: int = 5) -> float:
    j = _idx(d, metric)
    return float(np.nanmean(d.canary[:steps, j]) / np.nanmean(d.baseline[:steps, j]))


@pytest.mark.parametrize(("family", "metric"), DRIVEN)
def test_a_step_is_visible_from_the_first_minutes(params: SimParams, family: str,
                                                  metric: str) -> None:
    for i in range(8):
        step = simulate_deployment(family, seed=31, params=params, catalog=CAT, index=i,
                                   onset_style="from_start_step")
        assert step.fault_onset_s == step.timestamps_s[0]
        assert step.label == "faulty" and step.fault_kind == family
        assert _first_minutes_ratio(step, metric) > 1.4, (family, i)
        mid = simulate_deployment(family, seed=31, params=params, catalog=CAT, index=i,
                                  onset_style="mid_run")
        assert mid.fault_onset_s is not None and mid.fault_onset_s > mid.timestamps_s[60]
        if metric != "error_rate":  # a handful of errors per step: ratios of tiny counts
            assert _first_minutes_ratio(mid, metric) < 1.25, (family, i)
        # the style moves the onset only: the service and the baseline's app metrics are the
        # same draws (node noise comes after the error draws, whose length depends on the rate)
        app = [_idx(step, m) for m in ("request_rate", "error_rate", "latency_p99", "app_cpu",
                                       "app_memory")]
        np.testing.assert_array_equal(step.baseline[:, app], mid.baseline[:, app])


def test_from_start_ramp_starts_at_zero(params: SimParams) -> None:
    quick = SimParams.from_mapping(params.to_mapping() | {"breach_after_s": [1200, 1500]})
    for i in range(4):
        d = simulate_deployment("latency_creep", seed=8, params=quick, catalog=CAT, index=i,
                                onset_style="from_start_ramp")
        assert d.fault_onset_s == d.timestamps_s[0] and d.impact_at_s is not None
        mid = simulate_deployment("latency_creep", seed=8, params=quick, catalog=CAT, index=i,
                                  onset_style="mid_run")
        j = _idx(d, "latency_p99")
        # the first minute is almost the fault-free canary; 16-19 minutes in it is well above it
        assert np.nanmean(d.canary[:4, j]) < 1.1 * np.nanmean(mid.canary[:4, j])
        assert np.nanmean(d.canary[64:76, j]) > 1.5 * np.nanmean(mid.canary[64:76, j])


def test_labels_of_from_start_faults_are_computed(params: SimParams) -> None:
    """impact_at is the first breach of the generated canary series, at or after the onset."""
    seen = {"at_once": 0, "later": 0, "never": 0}
    for family in FAULT_FAMILIES:
        for i in range(5):
            d = simulate_deployment(family, seed=13, params=params, catalog=CAT, index=i,
                                    onset_style="from_start_step")
            assert d.fault_onset_s == d.timestamps_s[0]
            first = first_breach(d.canary, d.metrics, CAT)
            if first is None:
                assert d.impact_at_s is None
                seen["never"] += 1
                continue
            assert d.impact_at_s == d.timestamps_s[first] >= d.fault_onset_s
            # a real breach: some SLO metric is over its SLO at that step and the next
            over = [d.canary[first: first + 2, _idx(d, m.name)] > m.slo
                    for m in CAT.slo_metrics() if m.name in d.metrics]
            assert any(bool(o.all()) for o in over)
            seen["at_once" if first <= 4 else "later"] += 1
    assert all(n > 0 for n in seen.values()), seen


def test_from_start_share_zero_gives_only_mid_run_faults(params: SimParams) -> None:
    mid = SimParams.from_mapping(params.to_mapping() | {"from_start_share": 0})
    deps, _ = simulate_corpus(40, 0, mid, CAT)
    faulty = deps[deps["label"] == "faulty"]
    assert len(faulty) >= 15 and (faulty["fault_onset_style"] == "mid_run").all()
    rel = (faulty["fault_onset"] - faulty["start"]).dt.total_seconds() / mid.duration_s
    assert rel.between(0.3, 0.7).all()
    steps = SimParams.from_mapping(params.to_mapping() | {
        "from_start_share": 1, "from_start_step_share": 1})
    deps, _ = simulate_corpus(20, 0, steps, CAT)
    faulty = deps[deps["label"] == "faulty"]
    assert (faulty["fault_onset_style"] == "from_start_step").all()
    assert (faulty["fault_onset"] == faulty["start"]).all()


def test_healthy_variants_ignore_the_onset_settings(params: SimParams) -> None:
    other = SimParams.from_mapping(params.to_mapping() | {
        "from_start_share": 1, "from_start_step_share": 0, "step_level": [0.5, 0.6]})
    for family in HEALTHY_VARIANTS:
        a = simulate_deployment(family, seed=2, params=params, catalog=CAT)
        b = simulate_deployment(family, seed=2, params=other, catalog=CAT)
        np.testing.assert_array_equal(a.canary, b.canary)
        assert a.onset_style is None and a.fault_onset_s is None
    with pytest.raises(ConfigError, match="fault families only"):
        simulate_deployment("plain", params=params, catalog=CAT, onset_style="mid_run")
    with pytest.raises(ConfigError, match="onset_style='sudden'"):
        simulate_deployment("mem_leak", params=params, catalog=CAT, onset_style="sudden")


# --------------------------------------------------------------------------- defects, config


def test_missed_scrapes_and_glitches_exist(corpus: tuple[pd.DataFrame, pa.Table],
                                           params: SimParams) -> None:
    deps, samples = corpus
    full = len(deps) * 2 * params.steps * len(CAT.names)
    missing_rows = full - samples.num_rows
    nan_rows = int(np.isnan(samples.column("value").to_numpy()).sum())
    assert 0.002 * full < missing_rows < 0.02 * full
    assert 0.002 * full < nan_rows < 0.02 * full
    glitches = sum(d.glitches for d in simulate_deployments(20, 0, params, CAT))
    assert glitches >= 5


def test_glitches_are_single_points(params: SimParams) -> None:
    loud = SimParams.from_mapping(params.to_mapping() | {"glitch_rate": 0.05,
                                                         "scrape_miss_rate": 0.0})
    quiet = SimParams.from_mapping(params.to_mapping() | {"glitch_rate": 0.0,
                                                          "scrape_miss_rate": 0.0})
    a = simulate_deployment("plain", seed=9, params=loud, catalog=CAT)
    b = simulate_deployment("plain", seed=9, params=quiet, catalog=CAT)
    changed = a.canary != b.canary
    assert changed.sum() > 20
    assert not (changed[1:] & changed[:-1]).any()
    assert a.glitches > 20 and b.glitches == 0


def test_family_mix_is_configurable(params: SimParams) -> None:
    only = SimParams.from_mapping(params.to_mapping() | {
        "faulty_share": 1.0, "fault_families": {"mem_leak": 1, "error_ramp": 0}})
    deps, _ = simulate_corpus(8, 0, only, CAT)
    assert set(deps["fault_kind"]) == {"mem_leak"}


@pytest.mark.parametrize(("change", "match"), [
    ({"bogus": 1}, "unknown key"),
    ({"fault_families": {"mem_lek": 1}}, "mem_lek"),
    ({"onset_window": [0.8, 0.2]}, "onset_window"),
    ({"step_s": 0}, "step_s"),
    ({"start": "yesterday-ish"}, "start"),
    ({"format": "xlsx"}, "format"),
    ({"from_start_share": 1.5}, r"from_start_share=1.5 must be a share in \[0, 1\].*e\.g\. "
                                r"simulate\.from_start_share=0\.5"),
    ({"from_start_share": -0.1}, "from_start_share"),
    ({"from_start_share": "half"}, "from_start_share"),
    ({"from_start_step_share": 2}, r"from_start_step_share=2.0 must be a share in \[0, 1\]"),
    ({"step_level": [0.0, 1.0]}, "step_level"),
    ({"step_level": [1.0, 0.5]}, "step_level"),
    ({"step_drift_per_h": [-1, 1]}, "step_drift_per_h"),
])
def test_bad_parameters_are_config_errors(params: SimParams, change: dict[str, Any],
                                          match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        SimParams.from_mapping(params.to_mapping() | change)


def test_bad_family_and_n(params: SimParams) -> None:
    with pytest.raises(ConfigError, match="unknown simulator family"):
        simulate_deployment("meltdown", params=params, catalog=CAT)
    with pytest.raises(ConfigError, match="n=0"):
        simulate_corpus(0, 0, params, CAT)
