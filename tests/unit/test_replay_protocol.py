"""The honest evaluation protocol (DESIGN §7): settings chosen on calibration data only, the
evaluation corpus replayed once with its labels hidden, pre-onset rollbacks as false alarms."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from canaryml.catalog import Catalog, Direction
from canaryml.control.kayenta import Classification, KayentaConfig, classify, mann_whitney_test
from canaryml.control.policies import KayentaJudge
from canaryml.control.policy import PolicyConfig
from canaryml.data.dataset import CanonicalDataset
from canaryml.models.synthetic import make_corpus
from canaryml.replay import protocol
from canaryml.replay.evaluate import bootstrap_intervals, metrics_from_times
from canaryml.replay.protocol import CalibrationSpace, PolicyBuilder, at_threshold
from canaryml.replay.runner import deployment_table
from canaryml.replay.standin import GapZScorer

POLICIES = ("scorer", "argo", "kayenta")
SMALL = CalibrationSpace(consecutive_breaches=(1, 2), argo_measure_s=(30.0, 60.0),
                         argo_metrics=("slo",), kayenta_interval_s=(300.0,),
                         kayenta_effect_size=(1.0, 1.5), kayenta_metrics=("all", "app"))


def _table(label: list[str], onset: list[float], impact: list[float], start: float = 0.0
           ) -> pd.DataFrame:
    n = len(label)
    return pd.DataFrame({"deployment_id": [f"d{i}" for i in range(n)], "label": label,
                         "fault_onset_s": onset, "impact_at_s": impact,
                         "start_s": [start] * n, "fault_kind": ["x" if lb == "faulty" else ""
                                                               for lb in label]})


def test_a_rollback_before_the_fault_began_is_a_false_alarm_not_a_catch() -> None:
    nan = np.nan
    deps = _table(["faulty", "faulty", "faulty", "healthy", "healthy"],
                  [600.0, 600.0, 0.0, nan, nan], [1200.0, 1200.0, nan, nan, nan])
    # d0 rolled back before its onset, d1 after onset before impact, d2 (bad from the start)
    # after start, healthy d3 rolled back, d4 not
    m = metrics_from_times(np.array([300.0, 900.0, 60.0, 500.0, nan]), deps)
    assert m["detection_rate"] == pytest.approx(2 / 3)
    assert m["caught_before_impact"] == pytest.approx(2 / 3)
    assert m["rolled_back_before_onset"] == 1
    # false alarms: healthy d3 and faulty d0 (pre-onset), over canaries that ran healthy for a
    # while: d3, d4 and the mid-run faults d0, d1 (d2 was bad from its first minute)
    assert m["false_rollback_rate"] == pytest.approx(2 / 4)
    assert m["healthy_rolled_back_rate"] == pytest.approx(1 / 2)
    assert m["lead_time_s_p50"] == pytest.approx(300.0)  # only d1 has an impact and a catch


def test_bootstrap_intervals_cover_the_point_estimate_and_shrink_with_more_data() -> None:
    rng = np.random.default_rng(0)

    def width(n: int) -> float:
        deps = _table(["faulty"] * n + ["healthy"] * n, [0.0] * n + [np.nan] * n,
                      [1000.0] * n + [np.nan] * n)
        decided = np.where(rng.random(2 * n) < 0.6, 500.0, np.nan)
        m = metrics_from_times(decided, deps)
        ci = bootstrap_intervals(decided, deps, ["detection_rate"], n_boot=300, seed=1)
        lo, hi = ci["detection_rate"]  # type: ignore[misc]
        assert lo <= m["detection_rate"] <= hi
        return hi - lo

    assert width(400) < width(25)


def test_kayenta_effect_size_is_applied_after_the_cached_test() -> None:
    rng = np.random.default_rng(0)
    base = rng.normal(1.0, 0.02, 40)
    raw = mann_whitney_test("m", base * 1.1, base, Direction.UP, KayentaConfig())
    assert raw.classification is Classification.HIGH
    assert classify("m", base * 1.1, base, Direction.UP,
                    KayentaConfig(allowed_increase=1.2)).classification is Classification.PASS


@pytest.fixture(scope="module")
def corpora(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("protocol")
    return {"calibration": make_corpus(root / "cal", n=16, steps=160, seed=11),
            "evaluation": make_corpus(root / "eval", n=12, steps=160, seed=12)}


def _builder(ds: CanonicalDataset) -> PolicyBuilder:
    scorer = GapZScorer(ds.metrics, ds.catalog, lookback=20)
    return PolicyBuilder(ds.catalog, tuple(ds.metrics), float(ds.step_s),
                         PolicyConfig(warmup_s=0.0), {"scorer": scorer})


def _base(builder: PolicyBuilder) -> dict[str, dict]:
    rc = {"argo": {"metrics": ["error_rate", "latency_p99"], "limit_fraction": 1.0,
                   "failure_limit": 3, "measure_s": 60},
          "kayenta": {"interval_s": 300, "confidence": 0.98, "tolerance": 0.25,
                      "pass_threshold": 95, "marginal_threshold": 75,
                      "groups": {"app": 70, "infra": 30}}}
    return {n: protocol.configured_settings(n, {}, builder.pcfg, rc) for n in POLICIES}


def _run(cal: CanonicalDataset, ev: CanonicalDataset) -> tuple[dict, pd.DataFrame]:
    b = _builder(cal)
    tuned = protocol.calibrate(cal, POLICIES, _base(b), b, SMALL, 0.2, np.linspace(0, 1, 21),
                               progress=False)
    settings = {n: t.settings for n, t in tuned.items()}
    evals = protocol.evaluate_blind(
        [("eval", ev)], lambda ds: [_builder(ds).build(n, settings[n]) for n in POLICIES],
        30.0, progress=False)
    return settings, evals[0].result.outcomes


def test_evaluation_labels_are_never_read_before_the_single_evaluation_pass(
        corpora: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cal = CanonicalDataset(corpora["calibration"])
    ev = CanonicalDataset(corpora["evaluation"])
    replays: list[str] = []
    reads: list[str] = []
    real_replay, real_table = protocol.replay, protocol.deployment_table

    def spy_replay(ds, policies, **kw):  # type: ignore[no-untyped-def]
        replays.append(str(ds.path))
        if str(ds.path) == str(ev.path):
            # what the evaluation replay sees carries no label, onset or impact
            deps = kw["deployments"]
            assert set(deps["label"]) == {"unknown"}
            assert deps["fault_onset_s"].isna().all() and deps["impact_at_s"].isna().all()
        return real_replay(ds, policies, **kw)

    def spy_table(ds):  # type: ignore[no-untyped-def]
        reads.append(f"{ds.path}@{len(replays)}")
        return real_table(ds)

    monkeypatch.setattr(protocol, "replay", spy_replay)
    monkeypatch.setattr(protocol, "deployment_table", spy_table)
    settings, outcomes = _run(cal, ev)
    assert replays == [str(cal.path), str(ev.path)]
    # the evaluation corpus's table is read twice: blinded for the replay, then for scoring
    # after the last replay
    ev_reads = [r for r in reads if r.startswith(str(ev.path))]
    assert ev_reads == [f"{ev.path}@1", f"{ev.path}@2"]
    monkeypatch.undo()

    # the same protocol on a copy of the evaluation corpus with its labels shuffled: the chosen
    # settings and every decision are identical (nothing downstream of tuning saw the labels)
    shuffled = tmp_path / "shuffled"
    shutil.copytree(corpora["evaluation"], shuffled)
    deps = pd.read_parquet(shuffled / "deployments.parquet")
    rng = np.random.default_rng(3)
    perm = rng.permutation(len(deps))
    for col in ("label", "fault_onset", "impact_at", "fault_kind"):
        if col in deps:
            deps[col] = deps[col].to_numpy()[perm]
    deps.to_parquet(shuffled / "deployments.parquet", index=False)
    ev2 = CanonicalDataset(shuffled)
    assert not deployment_table(ev2)["label"].equals(deployment_table(ev)["label"])
    settings2, outcomes2 = _run(cal, ev2)
    assert settings2 == settings
    cols = ["deployment_id", "policy", "action", "decided_at_s", "rolled_back"]
    pd.testing.assert_frame_equal(outcomes[cols].reset_index(drop=True),
                                  outcomes2[cols].reset_index(drop=True))


def test_tuned_kayenta_effect_size_and_metrics_reach_the_judge(corpora: dict[str, Path]) -> None:
    cal = CanonicalDataset(corpora["calibration"])
    b = _builder(cal)
    space = CalibrationSpace(consecutive_breaches=(1,), argo_measure_s=(60.0,),
                             argo_metrics=("slo",), kayenta_interval_s=(300.0,),
                             kayenta_effect_size=(1.5,), kayenta_metrics=("app",))
    tuned = protocol.calibrate(cal, ["kayenta"], _base(b), b, space, 1.0,
                               np.linspace(0, 1, 11), progress=False)
    s = tuned["kayenta"].settings
    assert s["allowed_increase"] == 1.5 and s["allowed_decrease"] == pytest.approx(1 / 1.5)
    judge = b.build("kayenta", s).policy
    assert isinstance(judge, KayentaJudge)
    assert judge.config.allowed_increase == 1.5
    assert judge.config.allowed_decrease == pytest.approx(1 / 1.5)
    assert judge.metrics == tuple(m for m in cal.metrics
                                  if str(cal.catalog.get(m).kind) == "app")
    # the chosen marginal score is the swept threshold mapped back onto Kayenta's scale
    assert judge.rollback.config.rollback_threshold == pytest.approx(
        1 - s["marginal_threshold"] / 100)


def test_argo_threshold_maps_onto_limits_as_a_fraction_of_the_slo() -> None:
    s = at_threshold("argo", {"limit_fraction": 1.0, "failure_limit": 3,
                              "metrics": ["error_rate"], "measure_s": 60}, 0.4, 2)
    assert s["limit_fraction"] == pytest.approx(0.8) and s["failure_limit"] == 2
    b = PolicyBuilder(Catalog.default(), ("error_rate", "latency_p99"), 15.0, PolicyConfig(), {})
    judge = b.build("argo", s).policy
    assert judge.limits == {"error_rate": pytest.approx(0.8 * 0.05)}  # type: ignore[attr-defined]


def test_calibration_corpus_equal_to_an_evaluation_corpus_is_refused(
        corpora: dict[str, Path], tmp_path: Path) -> None:
    from canaryml.cli import compose
    from canaryml.errors import ConfigError
    from canaryml.tasks import replay as task

    ev = corpora["evaluation"]
    cfg = compose("replay", [f"dataset={ev}", f"out={tmp_path / 'o'}", "model=standin",
                             f"replay.calibration.dataset={ev}", "replay.mlflow=false"])
    with pytest.raises(ConfigError, match="calibration"):
        task.run(cfg)
    assert not (tmp_path / "o").exists()


def test_argo_limits_relative_to_the_baseline_for_metrics_without_an_slo() -> None:
    from canaryml.control.types import Window

    cat = Catalog.from_mapping({"latency_p99": {"kind": "app", "direction": "up"}})
    b = PolicyBuilder(cat, ("latency_p99",), 60.0, PolicyConfig(warmup_s=0), {})
    with pytest.raises(Exception, match="limits_relative_to=baseline"):
        b.build("argo", {"metrics": "all", "limit_fraction": 1.0, "failure_limit": 1,
                         "measure_s": 120})
    judge = b.build("argo", {"metrics": "all", "limit_fraction": 1.5, "failure_limit": 1,
                             "measure_s": 120, "limits_relative_to": "baseline"}).policy
    ts = np.arange(4, dtype=np.int64) * 60
    base = np.full((4, 1), 0.2, np.float32)
    for factor, want in ((1.4, "continue"), (1.6, "rollback")):
        w = Window("d", 180.0, ts, base * factor, base, ("latency_p99",))
        d, _ = judge.step(w, 180.0, judge.initial_state())
        assert d.action == want


def test_metrics_from_truth_arrays_equal_the_table() -> None:
    from canaryml.replay.evaluate import truth_arrays

    rng = np.random.default_rng(2)
    n = 80
    label = rng.choice(["faulty", "healthy", "unknown"], n)
    onset = np.where(label == "faulty", rng.uniform(0, 900, n), np.nan)
    table = _table(list(label), list(onset), list(onset + rng.uniform(0, 600, n)))
    decided = np.where(rng.random(n) < 0.5, rng.uniform(0, 1500, n), np.nan)
    assert metrics_from_times(decided, truth_arrays(table)) == metrics_from_times(decided, table)


def test_lead_share_is_the_lead_time_over_the_faults_own_onset_to_impact() -> None:
    import pandas as pd

    from canaryml.replay.evaluate import metrics_from_times

    deps = pd.DataFrame({"label": ["faulty", "faulty", "faulty", "healthy"],
                         "fault_onset_s": [0.0, 100.0, 0.0, np.nan],
                         "impact_at_s": [100.0, 500.0, np.nan, np.nan]})
    # caught 20 s after onset (share 0.8), caught at 300 s of 100 → 500 (share 0.5), no impact
    m = metrics_from_times(np.array([20.0, 300.0, 50.0, np.nan]), deps)
    assert m["lead_share_p50"] == pytest.approx(0.65)
    assert m["lead_time_s_p50"] == pytest.approx(140.0)


def test_row_percentiles_equal_numpys_nanpercentile_to_the_bit() -> None:
    import warnings

    from canaryml.replay.evaluate import _row_percentiles

    rng = np.random.default_rng(3)
    v = rng.normal(size=(200, 90)) * 100
    v[rng.random(v.shape) < 0.6] = np.nan
    v[3] = np.nan  # nothing measured
    v[4] = np.nan
    v[4, 7] = 5.0  # one value
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN rows
        ref = np.nanpercentile(v, (10, 50, 90), axis=-1)
    np.testing.assert_array_equal(_row_percentiles(v, (10, 50, 90)), ref)
