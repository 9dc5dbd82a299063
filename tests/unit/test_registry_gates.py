"""Promotion gates are a pure function of two evaluations; settings validate like configs."""

from __future__ import annotations

import pytest

from canaryml.cli import compose
from canaryml.control.policy import PolicyConfig
from canaryml.errors import ConfigError
from canaryml.registry import Evaluation, Gates, PromoteSettings, check_gates, eval_key
from canaryml.tasks.promote import translate_args as promote_args
from canaryml.tasks.register import translate_args as register_args


def ev(version: str, det: float | None, frr: float | None, cbi: float | None) -> Evaluation:
    return Evaluation("canary-scorer", version, "hash", {"detection_rate": det,
                      "false_rollback_rate": frr, "caught_before_impact": cbi}, 0.5, "k")


def by_gate(results: list) -> dict:
    return {g.gate: g for g in results}


def test_without_champion_only_absolute_gates_apply() -> None:
    res = by_gate(check_gates(Gates(), ev("2", 0.8, 0.0, 0.7), None))
    assert set(res) == {"detection_rate_min", "false_rollback_rate_max"}
    assert all(g.passed for g in res.values())


def test_worse_challenger_fails_each_gate_with_both_numbers() -> None:
    res = by_gate(check_gates(Gates(), ev("2", 0.2, 0.1, 0.1), ev("1", 0.8, 0.0, 0.6)))
    assert not any(g.passed for g in res.values())
    assert res["detection_rate_min"].message == (
        "gate detection_rate_min: challenger v2 detection_rate=0.2000, required >= 0.5000")
    assert res["false_rollback_rate_max"].message == (
        "gate false_rollback_rate_max: challenger v2 false_rollback_rate=0.1000, required <= 0.0500")
    msg = res["caught_before_impact_min_delta"].message
    assert "challenger v2 caught_before_impact=0.1000 vs champion v1 0.6000" in msg
    assert "delta -0.5000" in msg and "+0.0000" in msg


def test_better_or_equal_challenger_passes_relative_gates() -> None:
    champ = ev("1", 0.6, 0.0, 0.6)
    assert all(g.passed for g in check_gates(Gates(), ev("2", 0.7, 0.0, 0.7), champ))
    assert all(g.passed for g in check_gates(Gates(), ev("3", 0.6, 0.0, 0.6), champ))  # equal ok
    strict = Gates(caught_before_impact_min_delta=0.05, false_rollback_rate_max_delta=0.0,
                   detection_rate_min_delta=0.0)
    res = by_gate(check_gates(strict, ev("3", 0.6, 0.0, 0.6), champ))
    assert not res["caught_before_impact_min_delta"].passed
    assert res["detection_rate_min_delta"].passed and res["false_rollback_rate_max_delta"].passed


def test_missing_metric_fails_the_gate_and_disabled_gates_are_skipped() -> None:
    res = by_gate(check_gates(Gates(), ev("2", None, 0.0, None), None))
    assert not res["detection_rate_min"].passed
    assert "needs faulty and healthy canaries" in res["detection_rate_min"].message
    off = Gates(caught_before_impact_min_delta=None, false_rollback_rate_max=None,
                detection_rate_min=None)
    assert check_gates(off, ev("2", 0.0, 1.0, 0.0), ev("1", 1.0, 0.0, 1.0)) == []


def test_settings_come_from_the_registry_config_and_reject_typos() -> None:
    cfg = compose("promote")
    from omegaconf import OmegaConf

    s = PromoteSettings.from_mapping(OmegaConf.to_container(cfg.registry))  # type: ignore[arg-type]
    assert s.gates == Gates() and s.champion_alias == "champion" and s.policy == "scorer"
    with pytest.raises(ConfigError, match="unknown key"):
        Gates.from_mapping({"detection_rate_minimum": 0.5})
    with pytest.raises(ConfigError, match=r"registry\.policy"):
        PromoteSettings.from_mapping({"policy": "argo"})
    with pytest.raises(ConfigError, match="finite number"):
        Gates(detection_rate_min=float("nan"))


def test_eval_key_changes_with_version_dataset_and_operating_point() -> None:
    p = PolicyConfig()
    base = eval_key("m", "1", "h", p, {"lookback": None, "horizon_s": None})
    assert base == eval_key("m", "1", "h", PolicyConfig(), {"lookback": None, "horizon_s": None})
    assert base != eval_key("m", "2", "h", p, {})
    assert base != eval_key("m", "1", "h2", p, {})
    assert base != eval_key("m", "1", "h", p.with_threshold(0.7), {})


def test_cli_spellings_translate_to_overrides() -> None:
    assert promote_args(["--to-version", "3"]) == ["to_version=3"]
    assert promote_args(["--to-version=4", "dataset=x"]) == ["to_version=4", "dataset=x"]
    with pytest.raises(ConfigError, match="--to-version needs a version"):
        promote_args(["--to-version"])
    assert register_args(["scorer=models/scorer", "alias=null"]) == [
        "scorer_dir=models/scorer", "registry.register_alias=null"]
