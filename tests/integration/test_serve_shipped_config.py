"""The operator's path with the shipped serve config (issue 15): a model trained by the
documented commands (README: simulate → ingest → train) is served by `canaryml serve` with
conf/serve/default.yaml as shipped — only the Prometheus URL, the deployment's selectors and
the test's 1 s step are set — against a real Prometheus scraping the service and a real node
exporter, and every tick is scored: no missing-metric pause, no fail-safe."""

from __future__ import annotations

import math
import time
from pathlib import Path

import pytest

from canaryml.cli import compose, main
from canaryml.serving.decision_log import DecisionLog
from tests.e2e.liveapp.stack import SELECTORS, labelled_stack, wait_until_every_query_answers

pytestmark = [pytest.mark.services, pytest.mark.slow, pytest.mark.timeout(600)]

TICKS = 6


def deployments_override(dep: str) -> str:
    sel = {g: s.replace('"', '\\"') for g, s in SELECTORS.items()}
    return (f"serve.deployments=[{{id: {dep}, selectors: {{canary: \"{sel['canary']}\", "
            f"baseline: \"{sel['baseline']}\"}}}}]")


def train_by_the_documented_commands() -> None:
    """README's commands, at test sizes (fewer deployments, one epoch, a smaller network)."""
    assert main(["simulate", "out=raw", "n=6", "seed=0"]) == 0
    assert main(["ingest", "source=bundle", "input=raw", "out=ds"]) == 0
    assert main(["train", "dataset=ds", "trainer.max_epochs=1", "trainer.progress_bar=false",
                 "trainer.num_threads=1", "forecaster.hidden=8", "trainer.stride=4"]) == 0


def test_shipped_serve_config_scores_every_tick_of_the_documented_model(
        mlflow_uri: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    shipped = compose("serve", [])
    queries = dict(shipped.serve.source.prometheus.queries)
    assert set(queries) == set(shipped.metrics)  # every catalog metric, app and infra
    with labelled_stack(tmp_path) as stack:
        train_by_the_documented_commands()  # the service is scraped meanwhile: history
        wait_until_every_query_answers(stack.prom_url, queries)
        # the first tick needs the model's min_steps (8) one-second steps of history since the
        # queries first answered; a fast training run can leave less (the tick would warm up)
        time.sleep(10)
        log_path = tmp_path / "decisions.sqlite"
        args = ["serve", "serve.model=models:/canary-scorer@challenger", "serve.step_s=1",
                f"serve.source.prometheus.url={stack.prom_url}", deployments_override("web"),
                f"serve.max_ticks={TICKS}", "policy.monitoring_interval_s=1",
                "serve.http.port=0", f"serve.decision_log={log_path}"]
        assert main(args) == 0
    out = capsys.readouterr().out
    assert "model canary-scorer/1" in out and f"stopped after {TICKS} tick(s)" in out
    with DecisionLog(log_path) as log:
        entries = log.entries("web")
    assert len(entries) == TICKS
    for e in entries:
        assert e.score is not None and math.isfinite(e.score), e.reason
        assert "fail-safe" not in e.reason and "lacks metric" not in e.reason, e.reason
        assert e.model_version == "canary-scorer/1"


def test_serve_refuses_at_startup_a_model_the_config_cannot_feed(
        mlflow_uri: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The same documented model with the infra queries removed (the 7-query config of old):
    a clear error naming the missing metrics and the key, exit 2, before any tick."""
    train_by_the_documented_commands()
    drop = [f"~serve.source.prometheus.queries.{m}" for m in
            ("node_cpu", "node_memory", "net_rx", "net_tx", "disk_io", "storage_latency",
             "load1")]
    code = main(["serve", "serve.model=models:/canary-scorer@challenger",
                 deployments_override("web"), "serve.http.port=0", "serve.max_ticks=1",
                 f"serve.decision_log={tmp_path / 'd.sqlite'}", *drop])
    err = capsys.readouterr().err
    assert code == 2
    assert ("node_cpu, node_memory, net_rx, net_tx, disk_io, storage_latency, load1" in err)
    assert "serve.source.prometheus.queries" in err
    assert not (tmp_path / "d.sqlite").exists() or "decision" not in err
