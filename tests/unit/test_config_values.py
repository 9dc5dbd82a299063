"""Bad config values are clear errors naming the key, never tracebacks (issue 16, Low)."""

from __future__ import annotations

from pathlib import Path

import pytest

from canaryml import tracking
from canaryml.errors import ConfigError, config_int


def test_config_int_names_the_key_and_the_range() -> None:
    assert config_int("15", "ingest.step_s", low=1) == 15
    with pytest.raises(ConfigError, match=r"ingest\.step_s='abc' is not a whole number"):
        config_int("abc", "ingest.step_s")
    with pytest.raises(ConfigError, match="not a whole number"):
        config_int(2.5, "ingest.step_s")
    with pytest.raises(ConfigError, match=r"serve\.http\.port=99999 is outside \[0, 65535\]"):
        config_int(99999, "serve.http.port", low=0, high=65535)


def test_a_sqlite_store_in_a_missing_folder_is_refused_before_anything_is_created(
        tmp_path: Path) -> None:
    missing = tmp_path / "nope" / "deeper"
    with pytest.raises(ConfigError, match="does not exist"):
        tracking.configure(f"sqlite:///{missing / 'mlflow.db'}")
    assert not (tmp_path / "nope").exists()
    assert tracking.configure(f"sqlite:///{tmp_path / 'mlflow.db'}").endswith("mlflow.db")


def test_the_ingest_task_refuses_a_non_numeric_step(tmp_path: Path) -> None:
    from canaryml.cli import compose
    from canaryml.data.contract import write_bundle
    from canaryml.simulate import simulate_corpus
    from canaryml.tasks import ingest

    raw = write_bundle(*simulate_corpus(2, seed=0, progress=False), tmp_path / "raw")
    cfg = compose("ingest", ["source=bundle", f"input={raw}", f"out={tmp_path / 'o'}",
                             "ingest.step_s=abc"])
    with pytest.raises(ConfigError, match=r"ingest\.step_s='abc'"):
        ingest.run(cfg)
    assert not (tmp_path / "o").exists()  # nothing written
