"""Parity (DESIGN §1, issue 13): `canaryml serve` with the Kafka source and the dry-run actuator
decides, tick for tick, what `canaryml replay` decides on the same telemetry.

The same canonical corpus is (a) replayed by the replay task (`decision_log.parquet`: every
tick's record) and (b) produced as Kafka events to a real broker (tansu) and consumed by the
serve path — `serve_task.build` → Service → ServeLoop → Controller.step, durable decision log —
whose clock is set to replay's tick times. Both read the same config keys
(`policy.monitoring_interval_s`, `policy.*`).
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import numpy as np
import pandas as pd
import pytest
from omegaconf import OmegaConf

from canaryml.cli import compose
from canaryml.control.policy import PolicyConfig
from canaryml.data.dataset import CanonicalDataset
from canaryml.replay.sim import SimulatedClock
from canaryml.tasks import replay as replay_task
from canaryml.tasks import serve as serve_task
from tests.harness.kafka import start_tansu

pytestmark = [pytest.mark.services, pytest.mark.timeout(600)]

TOPIC = "canary-telemetry"
POLICY = ["policy.warmup_s=60", "policy.consecutive_breaches=2", "policy.rollback_threshold=0.5",
          "policy.monitoring_interval_s=60", "policy.batch_interval_s=300",
          "policy.max_batches=2"]


def same_words(reason: str) -> str:
    """The reason, with the text of a too-short-window ScoringError elided: the live scorer
    says "window has N steps but the scorer needs ≥ M", replay's precomputed series says "no
    score at t=… (window too short …)" — the same fail-safe PAUSE, worded by two scorers."""
    return re.sub(r"ScoringError: .*; holding", "ScoringError: …; holding", reason)


def until(cond: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what}")


def produce(bootstrap: str, ds: CanonicalDataset) -> int:
    """Every finite sample of the corpus as one event; returns the number sent."""
    from confluent_kafka import Producer

    p = Producer({"bootstrap.servers": bootstrap})
    n = 0
    for dep in ds.deployments["deployment_id"].astype(str):
        a = ds.arrays(dep)
        for group, values in (("canary", a.canary), ("baseline", a.baseline)):
            assert values is not None
            for i, t in enumerate(a.timestamps_s):
                for j, metric in enumerate(a.metrics):
                    v = float(values[i, j])
                    if np.isfinite(v):
                        p.produce(TOPIC, key=dep, value=json.dumps(
                            {"deployment_id": dep, "group": group, "metric": metric,
                             "value": v, "timestamp": float(t)}))
                        n += 1
                p.poll(0)
    assert p.flush(30) == 0
    return n


def serve_decisions(scfg: Any, pcfg: PolicyConfig, bootstrap: str, ds: CanonicalDataset,
                    dep: str, sent: int, tmp_path: Path) -> list[Any]:
    """One `canaryml serve` Service for `dep`, ticked at replay's tick times."""
    serve = cast(dict[str, Any], OmegaConf.to_container(scfg.serve, resolve=True))
    serve["source"]["kafka"] |= {"bootstrap_servers": bootstrap, "group_id": f"parity-{dep}"}
    serve["metrics"] = list(ds.metrics)
    serve["deployments"] = [{"id": dep}]
    serve["decision_log"] = str(tmp_path / f"{dep}.sqlite")
    now = {"t": 0.0}
    svc = serve_task.build(serve, pcfg, clock=lambda: now["t"], http=False)
    try:
        src: Any = svc.source
        until(lambda: src.poll(0.2) >= 0 and src.stats["events"] >= sent, 120,
              "the corpus to be consumed")
        ts = ds.arrays(dep).timestamps_s
        for t in SimulatedClock(float(ts[0]), float(ts[-1]), pcfg.monitoring_interval_s):
            now["t"] = t
            svc.tick()
            if svc.controller.is_final(dep):
                break
        return svc.loop.log.entries(dep)
    finally:
        svc.close()


def test_serve_with_kafka_decides_tick_for_tick_what_replay_decides(
        tmp_path: Path, tiny_scorer_dir: Path) -> None:
    from canaryml.models.synthetic import make_corpus

    ds = CanonicalDataset(make_corpus(tmp_path / "corpus", n=4, steps=120, seed=2))
    ids = ds.deployments["deployment_id"].astype(str).tolist()

    # (a) canaryml replay
    out = tmp_path / "replay"
    cfg = compose("replay", [f"dataset={ds.path}", f"out={out}", f"model={tiny_scorer_dir}",
                             "replay.policies=[scorer]", "replay.report.enabled=false",
                             "replay.mlflow=false", "replay.bootstrap.samples=10", *POLICY])
    assert replay_task.run(cfg) == 0
    replayed = pd.read_parquet(out / "decision_log.parquet")
    replayed = replayed[replayed["policy"] == "scorer"]

    # (b) canaryml serve: Kafka source, dry-run actuator, the clock at replay's ticks
    scfg = compose("serve", [f"serve.model={tiny_scorer_dir}", "serve.source.kind=kafka",
                             "serve.actuator.kind=dry_run", "serve.lookback=1",
                             f"serve.step_s={ds.step_s}", "serve.http.port=0",
                             "serve.source.kafka.poll_timeout_s=0.05", *POLICY])
    pcfg = PolicyConfig.from_mapping(cast(dict, OmegaConf.to_container(scfg.policy,
                                                                       resolve=True)))
    with start_tansu(tmp_path / "tansu") as broker:
        broker.create_topic(TOPIC, 1)
        sent = produce(broker.bootstrap, ds)
        actions: set[str] = set()
        for dep in ids:
            served = serve_decisions(scfg, pcfg, broker.bootstrap, ds, dep, sent, tmp_path)
            rep = replayed[replayed["deployment_id"] == dep].sort_values("step")
            got = [(e.step, str(e.action), e.reason, e.score) for e in served]
            want = list(zip(rep["step"], rep["action"], rep["reason"], rep["score"], strict=True))
            assert len(served) == len(rep) > 0, (got, want)
            assert [str(e.action) for e in served] == rep["action"].tolist()
            assert [same_words(e.reason) for e in served] == [
                same_words(r) for r in rep["reason"]]
            assert [e.decided_at for e in served] == rep["decided_at"].tolist()
            assert [e.score for e in served] == pytest.approx(
                [None if pd.isna(s) else s for s in rep["score"]], abs=1e-5)
            first = next((i for i, e in enumerate(served) if e.action in ("shrink", "rollback")),
                         None)
            if first is not None:  # replay fills the deciding tick's top reasons too
                assert list(served[first].reasons) == list(rep["reasons"].iloc[first])
            actions |= {str(e.action) for e in served}
    assert "rollback" in actions or "shrink" in actions, actions  # a real decision was compared
