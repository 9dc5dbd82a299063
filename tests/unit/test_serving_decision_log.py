from __future__ import annotations

import logging
import sqlite3
from pathlib import Path

import pytest

from canaryml.control.controller import LogRecord, format_decision
from canaryml.control.types import Action, Decision
from canaryml.errors import ConfigError
from canaryml.serving.decision_log import DecisionLog

pytestmark = pytest.mark.timeout(60)  # a hung service fails the test, not CI


def test_record_is_durable_idempotent_and_resumes(tmp_path: Path) -> None:
    path = tmp_path / "log" / "decisions.sqlite"
    with DecisionLog(path) as log:
        e1 = log.record("d1", 1, Decision(Action.CONTINUE, "warm-up", 0.1), decided_at=100.0,
                        model_version="3")
        log.mark_applied(e1.id)
        e2 = log.record("d1", 2, Decision(Action.SHRINK, "score 0.91 > 0.8", 0.91,
                                          {"reasons": ["latency_p99=0.70", "error_rate=0.20"]}))
        again = log.record("d1", 2, Decision(Action.PROMOTE, "other", 0.0))  # a replay of step 2
        assert again.id == e2.id and again.action is Action.SHRINK
        log.save_state("d1", 2, {"consecutive": 2, "batch": 1})
        # a crash here: step 2 was logged (intent) but never marked applied
    with DecisionLog(path) as log:  # restart
        assert [e.step for e in log.entries("d1")] == [1, 2]
        assert [e.step for e in log.pending()] == [2]
        assert log.pending()[0].reasons == ("latency_p99=0.70", "error_rate=0.20")
        assert log.entries("d1")[0].applied and log.entries("d1")[0].model_version == "3"
        assert log.load_state("d1") == (2, {"consecutive": 2, "batch": 1})
        assert log.load_state("unknown") is None
        log.mark_failed(e2.id, "503 from the API server")
        assert log.pending()[0].error == "503 from the API server"
        log.mark_applied(e2.id)
        assert log.pending() == []
        assert set(log.states()) == {"d1"}
    mode = sqlite3.connect(path).execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"


def test_one_key_value_line_per_new_decision(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="canaryml.decision")
    with DecisionLog(tmp_path / "d.sqlite") as log:
        log.record("web 1", 7, Decision(Action.ROLLBACK, "score high", 0.95), policy="model",
                   model_version="4")
        log.record("web 1", 7, Decision(Action.ROLLBACK, "score high", 0.95), policy="model")
    lines = [r.getMessage() for r in caplog.records if r.name == "canaryml.decision"]
    assert lines == ['event=decision deployment="web 1" step=7 action=rollback score=0.9500 '
                     'policy=model model=4 reason="score high"']


def test_format_without_score() -> None:
    line = format_decision(LogRecord("d", "model", 1, 0.0, "pause", None, "no data: latency_p99",
                                     ()))
    assert "score=nan" in line and 'reason="no data: latency_p99"' in line


def test_directory_path_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="is a directory"):
        DecisionLog(tmp_path)


def _half_file(path: Path) -> None:
    with DecisionLog(path) as log:
        for step in range(400):  # several pages, so half the file loses table pages
            log.record("d1", step, Decision(Action.CONTINUE, "x" * 200, 0.1))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("damage", ["bad_header", "half_file"])
def test_a_corrupt_log_names_the_file_and_the_recovery(tmp_path: Path, damage: str) -> None:
    """Issue 16 #8: a raw sqlite3.DatabaseError on every restart became a clear message."""
    from canaryml.serving.decision_log import DecisionLogError

    path = tmp_path / "decisions.sqlite"
    if damage == "bad_header":
        path.write_bytes(b"this is not SQLite" + bytes(4096))
    else:
        _half_file(path)
    with pytest.raises(DecisionLogError) as exc:
        DecisionLog(path)
    msg = str(exc.value)
    assert f"decision log {path} is corrupt" in msg
    assert f"mv {path} {path}.corrupt" in msg and "resumes from the state it reads in Kubernetes" in msg
    assert path.is_file()  # the default mode touches nothing

    with DecisionLog(path, on_corrupt="move_aside") as log:  # what `canaryml serve` uses
        assert log.moved_aside is not None and log.moved_aside.name.startswith(
            "decisions.sqlite.corrupt-")
        assert log.moved_aside.is_file() and log.entries() == []
        log.record("d1", 0, Decision(Action.PAUSE, "fresh", None))
    with DecisionLog(path) as log:
        assert [e.reasons for e in log.entries()] == [("fresh",)] and log.moved_aside is None


def test_a_log_written_before_the_reason_column_opens_and_keeps_working(tmp_path: Path) -> None:
    import sqlite3

    path = tmp_path / "old.sqlite"
    db = sqlite3.connect(path)
    db.executescript("""
        CREATE TABLE decisions (id INTEGER PRIMARY KEY AUTOINCREMENT, deployment_id TEXT NOT NULL,
            policy TEXT NOT NULL, step INTEGER NOT NULL, decided_at REAL NOT NULL,
            action TEXT NOT NULL, score REAL, reasons TEXT NOT NULL, evidence TEXT NOT NULL,
            model_version TEXT, applied INTEGER NOT NULL DEFAULT 0, applied_at REAL, error TEXT,
            UNIQUE (deployment_id, policy, step));
        INSERT INTO decisions (deployment_id, policy, step, decided_at, action, score, reasons,
            evidence) VALUES ('web', 'model', 0, 1.0, 'pause', NULL, '["no data"]', '{}');""")
    db.commit()
    db.close()
    with DecisionLog(path) as log:
        (old,) = log.entries("web")
        assert old.reason == "no data" and old.action is Action.PAUSE
        new = log.record("web", 1, Decision(Action.ROLLBACK, "score 0.9 > 0.5", 0.9,
                                            {"reasons": ["error_rate=0.8"]}))
        assert new.reason == "score 0.9 > 0.5" and new.reasons == ("error_rate=0.8",)
        assert log.entries("web")[1].reason == "score 0.9 > 0.5"
