"""Search-space parsing/validation, grid parsing, storage and budget checks of `canaryml tune`."""

from __future__ import annotations

import re
import threading
from pathlib import Path
from typing import Any

import optuna
import pytest
from omegaconf import OmegaConf

from canaryml import cli
from canaryml.errors import ConfigError
from canaryml.paths import conf_dir
from canaryml.tasks.tune import over_budget, parse_grid
from canaryml.tune.space import config_groups, defaults, parse_space, suggest, validate_keys
from canaryml.tune.study import (
    BudgetFull,
    StudySpec,
    choose_best,
    make_storage,
    open_study,
)

optuna.logging.set_verbosity(optuna.logging.WARNING)


def test_parse_space_builds_distributions() -> None:
    params = parse_space({
        "forecaster.hidden": {"type": "int", "low": 16, "high": 64, "step": 16},
        "trainer.lr": {"type": "float", "low": 1e-3, "high": 1e-2, "log": True},
        "forecaster": {"type": "categorical", "choices": ["lstm", "transformer"]},
        "dropped": None,
    })
    d = {p.key: p.distribution for p in params}
    assert set(d) == {"forecaster.hidden", "trainer.lr", "forecaster"}
    assert isinstance(d["forecaster.hidden"], optuna.distributions.IntDistribution)
    assert d["forecaster.hidden"].step == 16
    assert d["trainer.lr"].log is True
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    overrides = suggest(study.ask(), params)
    assert [o.split("=")[0] for o in overrides] == ["forecaster.hidden", "trainer.lr", "forecaster"]
    hidden = int(overrides[0].split("=")[1])
    assert 16 <= hidden <= 64 and hidden % 16 == 0


@pytest.mark.parametrize("space, message", [
    ({}, "empty"),
    ({"a.b": None}, "empty"),
    ({"forecaster.hidden": {"type": "int", "low": 64, "high": 16}}, "empty range"),
    ({"forecaster.hidden": {"type": "int", "low": 8, "high": 8}}, "empty range"),
    ({"trainer.lr": {"type": "float", "low": 0.0, "high": 1.0, "log": True}}, "log scale"),
    ({"trainer.lr": {"type": "gaussian", "low": 0, "high": 1}}, "type: float|int|categorical"),
    ({"trainer.lr": {"type": "float", "low": 0, "high": 1, "scale": 2}}, "unknown field"),
    ({"trainer.lr": {"type": "float", "low": 0}}, "give `low` and `high`"),
    ({"forecaster": {"type": "categorical", "choices": []}}, "choices"),
])
def test_parse_space_rejects_malformed_entries(space: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_space(space)


def test_validate_keys_against_the_composed_config() -> None:
    cfg = cli.compose("train")
    groups = config_groups(conf_dir())
    assert "lstm" in groups["forecaster"] and "iforest" in groups["detector"]
    ok = parse_space({"forecaster.hidden": {"type": "int", "low": 8, "high": 16},
                      "forecaster": {"type": "categorical", "choices": ["lstm", "transformer"]}})
    validate_keys(ok, cfg, groups)
    with pytest.raises(ConfigError, match=r"forecaster\.hiden: no such parameter"):
        validate_keys(parse_space({"forecaster.hiden": {"type": "int", "low": 8, "high": 16}}),
                      cfg, groups)
    with pytest.raises(ConfigError, match="unknown option"):
        validate_keys(parse_space({"forecaster": {"type": "categorical",
                                                  "choices": ["lstm", "gru"]}}), cfg, groups)
    with pytest.raises(ConfigError, match="takes `type: categorical`"):
        validate_keys(parse_space({"forecaster": {"type": "int", "low": 1, "high": 2}}),
                      cfg, groups)


def test_defaults_are_the_untuned_config_values() -> None:
    cfg = cli.compose("train", ["forecaster.hidden=24"])
    params = parse_space({"forecaster.hidden": {"type": "int", "low": 16, "high": 64},
                          "trainer.lr": {"type": "float", "low": 1e-3, "high": 1e-2},
                          "forecaster": {"type": "categorical", "choices": ["lstm", "transformer"]}})
    got = defaults(params, cfg, config_groups(conf_dir()))
    assert got == {"forecaster.hidden": 24, "trainer.lr": float(cfg.trainer.lr),
                   "forecaster": "lstm"}


def test_every_tune_config_parses_and_validates() -> None:
    groups = config_groups(conf_dir())
    for option in groups["tune"]:
        cfg = cli.compose("tune", [f"tune={option}"])
        params = parse_space(OmegaConf.to_container(cfg.tune.space, resolve=True))  # type: ignore[arg-type]
        validate_keys(params, cli.compose("train"), groups)
        assert params, option


def test_parse_grid_splits_sweeps_from_fixed_overrides() -> None:
    base, grid = parse_grid(["forecaster.hidden=16,32", "trainer.max_epochs=range(1,3)",
                             "seed=3", "forecaster=lstm,transformer"])
    assert base == ["seed=3"]
    assert grid == {"forecaster.hidden": ["16", "32"], "trainer.max_epochs": ["1", "2"],
                    "forecaster": ["lstm", "transformer"]}
    with pytest.raises(ConfigError, match="at least one sweep"):
        parse_grid(["seed=3"])
    with pytest.raises(ConfigError, match="interval"):
        parse_grid(["trainer.lr=interval(0.001,0.01)"])


def test_unreachable_or_malformed_storage_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=re.escape("postgresql://u:p@127.0.0.1:1/x")):
        make_storage("postgresql://u:p@127.0.0.1:1/x", tmp_path)
    with pytest.raises(ConfigError, match="unreachable"):
        make_storage(f"sqlite:///{tmp_path}/no/such/dir/study.db", tmp_path)
    with pytest.raises(ConfigError, match="neither a database URL"):
        make_storage("study.db", tmp_path)
    journal = make_storage(None, tmp_path / "out")
    assert journal is not None and (tmp_path / "out" / "journal.log").exists()


def test_study_budget_is_shared_and_checked_by_trial_number(tmp_path: Path) -> None:
    spec = StudySpec(name="s", storage=f"journal://{tmp_path / 'j.log'}", out_dir=tmp_path,
                     n_trials=2)
    open_study(spec)
    # plain studies (no ask lock, as on a storage without one) racing past the budget
    a, b = (optuna.load_study(study_name="s", storage=make_storage(spec.storage, tmp_path))
            for _ in range(2))
    t0, t1, t2 = a.ask(), b.ask(), a.ask()
    assert (t0.number, t1.number, t2.number) == (0, 1, 2)
    assert not over_budget(t0, 2) and not over_budget(t1, 2)
    assert over_budget(t2, 2)  # two earlier trials are running: no slot left
    with pytest.raises(ConfigError, match=r"another tune\.objective"):
        open_study(StudySpec(name="s", storage=f"journal://{tmp_path / 'j.log'}",
                             out_dir=tmp_path, n_trials=2, directions=("minimize",)))
    with pytest.raises(ConfigError, match="at least 1"):
        StudySpec(name="s", storage=None, out_dir=tmp_path, n_trials=0)


def test_budgeted_study_never_creates_a_trial_beyond_the_budget(tmp_path: Path) -> None:
    spec = StudySpec(name="b", storage=f"journal://{tmp_path / 'j.log'}", out_dir=tmp_path,
                     n_trials=3)
    a, b = open_study(spec), open_study(spec)  # two workers
    t0, t1 = a.ask(), b.ask()
    b.enqueue_trial({})  # a queued trial already holds the third slot
    t2 = a.ask()
    assert t2.number == 2
    with pytest.raises(BudgetFull):
        b.ask()
    a.tell(t0, state=optuna.trial.TrialState.FAIL)  # a failed trial gives its slot back
    t3 = b.ask()
    assert t3.number == 3
    with pytest.raises(BudgetFull):
        a.ask()
    assert len(a.get_trials()) == 4 and t1.number == 1


def test_workers_racing_for_slots_take_exactly_the_budget(tmp_path: Path) -> None:
    spec = StudySpec(name="race", storage=f"journal://{tmp_path / 'j.log'}", out_dir=tmp_path,
                     n_trials=5)
    open_study(spec)
    studies = [open_study(spec) for _ in range(6)]  # six workers, each its own storage handle
    start = threading.Barrier(len(studies))
    asked: list[int] = []

    def worker(study: optuna.Study) -> None:
        start.wait()
        while True:
            try:
                asked.append(study.ask().number)
            except BudgetFull:
                return

    threads = [threading.Thread(target=worker, args=(s,)) for s in studies]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert sorted(asked) == [0, 1, 2, 3, 4]
    assert len(studies[0].get_trials()) == 5


def test_choose_best_on_a_pareto_front_respects_the_false_rollback_bound() -> None:
    study = optuna.create_study(directions=["maximize", "minimize"])
    for values in [(0.9, 0.2), (0.6, 0.0), (0.7, 0.01), (0.5, 0.0)]:
        t = study.ask()
        study.tell(t, values)
    best = choose_best(study, max_frr=0.01)
    assert best is not None and best.values == [0.7, 0.01]
    assert choose_best(optuna.create_study()) is None


def test_cli_rejects_bad_space_before_any_trial(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                                ) -> None:
    out = tmp_path / "out"
    rc = cli.main(["tune", f"tune.out_dir={out}", "+tune.space.forecaster={type:int,low:1,high:2}"])
    assert rc == 2
    assert "takes `type: categorical`" in capsys.readouterr().err
    rc = cli.main(["tune", f"tune.out_dir={out}", "~tune.space",
                   "+tune.space={forecaster.hidden:{type:int,low:64,high:16}}"])
    assert rc == 2
    assert "empty range" in capsys.readouterr().err
    rc = cli.main(["tune", f"tune.out_dir={out}", "~tune.space",
                   "+tune.space={forecaster.hiden:{type:int,low:8,high:16}}"])
    assert rc == 2
    assert "forecaster.hiden: no such parameter" in capsys.readouterr().err
    assert not out.exists()  # nothing started: no journal, no results
