"""Replay on datasets a judge cannot judge, or without faulty/healthy canaries (issue 15): loud
errors that name the config key, or what can be measured instead of a crash; the report names
the model version, each policy's real threshold, fault families and false rollbacks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from canaryml.cli import compose
from canaryml.errors import ConfigError
from canaryml.models.synthetic import make_corpus
from canaryml.replay.details import model_version
from canaryml.tasks import replay as task

QUICK = ["model=standin", "replay.workers=1", "replay.bootstrap.samples=20",
         "replay.report.incidents=1"]


def _run(ds: Path, out: Path, *extra: str) -> dict:
    assert task.run(compose("replay", [f"dataset={ds}", f"out={out}", *QUICK, *extra])) == 0
    return json.loads((out / "summary.json").read_text())


@pytest.mark.parametrize("faulty_fraction", [0.0, 1.0])
def test_all_healthy_or_all_faulty_corpus_reports_what_it_can(
        tmp_path: Path, mlflow_uri: str, faulty_fraction: float) -> None:
    ds = make_corpus(tmp_path / "ds", n=6, steps=120, seed=3, faulty_fraction=faulty_fraction)
    summary = _run(ds, tmp_path / "out")  # MLflow logging on: no float(None)
    m = summary["policies"]["scorer"]
    if faulty_fraction == 0.0:
        assert m["detection_rate"] is None and m["false_rollback_rate"] is not None
        assert "detection_rate" in summary["protocol"]["not_measured"]
    else:
        assert m["detection_rate"] is not None
    html = (tmp_path / "out" / "report.html").read_text()
    assert "data:image/png;base64" in html


def test_kayenta_interval_longer_than_every_deployment_is_an_error(tmp_path: Path) -> None:
    ds = make_corpus(tmp_path / "ds", n=3, steps=80, seed=1)  # 1185 s deployments
    with pytest.raises(ConfigError, match=r"replay\.kayenta\.interval_s=1800"):
        _run(ds, tmp_path / "out", "replay.policies=[kayenta]", "replay.mlflow=false",
             "replay.kayenta.interval_s=1800")
    summary = _run(ds, tmp_path / "ok", "replay.policies=[kayenta]", "replay.mlflow=false",
                   "replay.kayenta.interval_s=120")
    assert summary["policies"]["kayenta"]["threshold"]["interval_s"] == 120.0


def test_argo_metrics_without_data_is_an_error_naming_the_key(tmp_path: Path) -> None:
    ds = make_corpus(tmp_path / "ds", n=3, steps=80, seed=2)
    for part in Path(ds).glob("telemetry/*/part-0.parquet"):  # error_rate never scraped
        t = pq.read_table(part)
        i = t.schema.get_field_index("error_rate")
        nan = pa.array(np.full(t.num_rows, np.nan, np.float32))
        pq.write_table(t.set_column(i, t.schema.field(i), nan), part)
    with pytest.raises(ConfigError, match=r"replay\.argo\.metrics"):
        _run(ds, tmp_path / "out", "replay.policies=[argo]", "replay.mlflow=false",
             "replay.argo.metrics=[error_rate]")


def test_judge_metrics_are_a_plain_override(tmp_path: Path) -> None:
    ds = make_corpus(tmp_path / "ds", n=4, steps=120, seed=4)
    summary = _run(ds, tmp_path / "out", "replay.mlflow=false", "replay.policies=[argo,kayenta]",
                   "replay.argo.metrics=[latency_p99]", "replay.kayenta.metrics=app")
    argo, kayenta = summary["policies"]["argo"], summary["policies"]["kayenta"]
    assert argo["settings"]["metrics"] == ["latency_p99"]
    assert list(argo["threshold"]["limits"]) == ["latency_p99"]
    assert kayenta["settings"]["metrics"] == "app"
    summary = _run(ds, tmp_path / "out2", "replay.mlflow=false", "replay.policies=[argo]",
                   "replay.argo.metrics=slo")
    assert summary["policies"]["argo"]["settings"]["metrics"] == "slo"


def test_report_names_thresholds_fault_families_false_rollbacks_and_model(tmp_path: Path) -> None:
    ds = make_corpus(tmp_path / "ds", n=10, steps=160, seed=7)
    summary = _run(ds, tmp_path / "out", "replay.mlflow=false", "policy.rollback_threshold=0.02",
                   "policy.warmup_s=0")
    pol = summary["policies"]
    assert pol["argo"]["threshold"]["limits"] == {"error_rate": 0.05, "latency_p99": 1.0} or \
        set(pol["argo"]["threshold"]["limits"]) == {"error_rate", "latency_p99"}
    assert pol["kayenta"]["threshold"]["marginal_threshold"] == 75.0
    assert pol["scorer"]["threshold"]["rollback_threshold"] == pytest.approx(0.02)
    assert summary["model_version"]["uri"] == "standin"
    healthy_rb = [r for r in pol["scorer"]["false_rollbacks"] if r["label"] == "healthy"]
    assert healthy_rb, "a 0.02 threshold rolls back healthy canaries"
    html = (tmp_path / "out" / "report.html").read_text()
    assert "Kayenta score ≤ 75" in html and "score &gt; 0.020" in html
    assert "<h2>Per fault family</h2>" in html and "<h2>False rollbacks</h2>" in html
    assert healthy_rb[0]["deployment_id"] in html
    kinds = set(pol["scorer"]["per_fault_kind"])
    assert kinds and all(k in html for k in kinds)


def test_model_version_resolves_name_version_and_run(mlflow_uri: str) -> None:
    import mlflow
    from mlflow.tracking import MlflowClient

    from canaryml import tracking

    tracking.configure()  # this test's store (an earlier test may have set another and its
    mlflow.set_experiment("model-version")  # experiment)
    with mlflow.start_run() as run:
        pass
    client = MlflowClient()
    client.create_registered_model("canary-scorer")
    mv = client.create_model_version("canary-scorer", f"runs:/{run.info.run_id}/scorer",
                                     run_id=run.info.run_id)
    client.set_registered_model_alias("canary-scorer", "challenger", mv.version)
    got = model_version("models:/canary-scorer@challenger", {"scorer": "x"})
    assert got["registered_model"] == "canary-scorer" and got["version"] == str(mv.version)
    assert got["run_id"] == run.info.run_id and got["alias"] == "challenger"
    assert model_version(f"models:/canary-scorer/{mv.version}", {})["run_id"] == run.info.run_id
