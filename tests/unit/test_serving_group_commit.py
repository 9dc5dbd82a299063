"""A serve tick over N deployments: one batched scoring pass, one group commit of the decision
log (one fsync), every intent durable before the first actuator call, one Kafka offset commit,
applied marks in one transaction — and the same decisions as stepping each deployment alone.
Event-driven readiness of the Kafka source. (No timing: speed is shown by `canaryml bench`.)"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from canaryml.control.controller import Controller, MemoryLog
from canaryml.control.policies import ScorerPolicy
from canaryml.control.policy import PolicyConfig, PolicyState, RollbackPolicy
from canaryml.control.types import Action, Decision, ScoreResult, Window
from canaryml.errors import ActuatorError, ScoringError
from canaryml.serving.decision_log import DecisionLog
from canaryml.serving.kafka import KafkaSource
from canaryml.serving.loop import ServeLoop

pytestmark = pytest.mark.timeout(60)

DEPS = [f"d{i}" for i in range(12)]


class Source:
    """Deterministic windows (value depends on deployment and time); records tick acks."""

    def __init__(self) -> None:
        self.acked: list[str] = []
        self.ack_batches: list[list[str]] = []

    def fetch(self, deployment_id: str, now_s: float, lookback: int) -> Window:
        k = int(deployment_id[1:])
        v = np.full((lookback, 1), 0.1 * k + now_s / 1000.0, np.float32)
        return Window(deployment_id, now_s, np.arange(lookback) * 15 + int(now_s), v, None,
                      ("m",))

    def ack(self, deployment_id: str) -> bool:
        self.acked.append(deployment_id)
        return True

    def ack_many(self, deployment_ids: Sequence[str]) -> bool:
        self.ack_batches.append(list(deployment_ids))
        return True


class BatchScorer:
    """A scorer with `prepare`: records the batches; `score` answers prepared windows from
    the batch, others alone (as CanaryScorer does). d5 cannot be scored."""

    metrics = ("m",)
    lookback = 4

    def __init__(self) -> None:
        self.batches: list[int] = []
        self.alone = 0
        self._prepared: dict[int, tuple[Window, Any]] = {}

    def _score(self, w: Window) -> ScoreResult | ScoringError:
        if w.deployment_id == "d5":
            return ScoringError("metric m has no observed value")
        s = float(np.clip(w.canary[-1, 0] - 0.5, 0.0, 1.0))
        return ScoreResult(s, s, 0.0, s, 0.0, {"m": 1.0})

    def prepare(self, windows: Sequence[Window]) -> None:
        self.batches.append(len(windows))
        self._prepared = {id(w): (w, self._score(w)) for w in windows}

    def score(self, window: Window) -> ScoreResult:
        hit = self._prepared.pop(id(window), None)
        if hit is None or hit[0] is not window:
            self.alone += 1
            hit = (window, self._score(window))
        if isinstance(hit[1], Exception):
            raise hit[1]
        return hit[1]


class IntentChecker:
    """Actuator that, at each call, reads the log through its own connection: every intent of
    the tick must already be on disk. Fails the deployments in `fail`."""

    def __init__(self, path: Path, fail: set[str] = frozenset()) -> None:  # type: ignore[assignment]
        self.path, self.fail = path, set(fail)
        self.calls: list[tuple[str, int, int]] = []  # (dep, step, rows on disk at the call)

    def apply(self, deployment_id: str, decision: Decision, step: int) -> None:
        with sqlite3.connect(self.path) as db:
            rows = db.execute("SELECT count(*) FROM decisions").fetchone()[0]
        self.calls.append((deployment_id, step, int(rows)))
        if deployment_id in self.fail:
            raise ActuatorError("503")


def policy(scorer: BatchScorer) -> ScorerPolicy:
    return ScorerPolicy("model", scorer, RollbackPolicy(PolicyConfig(
        rollback_threshold=0.6, monitoring_interval_s=30, warmup_s=0)))


def test_a_tick_is_one_batch_one_fsync_one_ack_and_intents_land_before_any_action(
        tmp_path: Path) -> None:
    path = tmp_path / "decisions.sqlite"
    scorer, source = BatchScorer(), Source()
    actuator = IntentChecker(path, fail={"d3"})
    now = {"t": 1000.0}
    with DecisionLog(path) as log:
        loop = ServeLoop(policy(scorer), source, actuator, log, ack=source.ack,
                         clock=lambda: now["t"], retry_backoff_s=1e6, retry_backoff_max_s=1e6)
        before = log.syncs
        entries = loop.tick(DEPS)
        assert len(entries) == len(DEPS)
        assert log.syncs - before == 1  # one durable commit for 12 decisions
        assert scorer.batches == [12] and scorer.alone == 0  # d5: its prepared error raised
        # every call saw all 12 intents on disk: the group commit precedes the first apply
        assert [c[2] for c in actuator.calls] == [12] * 12
        assert source.ack_batches == [DEPS] and source.acked == []  # one Kafka commit
        d5 = next(e for e in entries if e.deployment_id == "d5")
        assert d5.action is Action.PAUSE and "scorer failed" in d5.reason
        # the applied marks of the tick are in the log (one transaction, no fsync of its own)
        applied = {e.deployment_id for e in log.entries() if e.applied}
        assert applied == set(DEPS) - {"d3"}
        assert [e.deployment_id for e in log.pending()] == ["d3"]
        now["t"] += 30
        before = log.syncs
        second = loop.tick(DEPS)  # d3 waits for its unapplied action
        assert sorted(e.deployment_id for e in second) == sorted(set(DEPS) - {"d3"})
        assert log.syncs - before == 1
    # a restart reads back what the tick wrote: states after each step, d3 still pending
    with DecisionLog(path) as log:
        assert [e.deployment_id for e in log.pending()] == ["d3"]
        assert log.last_steps() == {d: (0 if d == "d3" else 1) for d in DEPS}


def test_marks_lost_in_a_crash_only_mean_an_idempotent_reapply(tmp_path: Path) -> None:
    """`mark_applied_many` commits without an fsync; the intents it marks are durable either
    way, and a log whose marks are missing lists them as pending (re-applied on resume)."""
    path = tmp_path / "d.sqlite"
    with DecisionLog(path) as log:
        rows = log.append_many([(_record(d, 0), {"policy": {}}) for d in ("a", "b")])
        syncs = log.syncs
        log.mark_applied_many([rows[0].id])
        assert log.syncs == syncs  # no durable commit of its own
        assert [e.deployment_id for e in log.pending()] == ["b"]
        # the marks reach the disk with the next durable commit (same WAL)
        log.append_many([(_record("a", 1), None)])
        assert log.syncs == syncs + 1
        mode = log._db.execute("PRAGMA synchronous").fetchone()[0]
        assert mode == 2  # FULL again after the no-fsync commit
    with DecisionLog(path) as log:
        assert [e.deployment_id for e in log.pending()] == ["b", "a"]
        again = log.append_many([(_record("a", 0), {"policy": {"x": 1}})])  # a replayed step
        assert again[0].id == rows[0].id and log.load_state("a") == (0, {"policy": {}})


def _record(dep: str, step: int) -> Any:
    from canaryml.control.controller import LogRecord

    return LogRecord(dep, "model", step, 1000.0 + step, "continue", 0.1, "ok", ("ok",))


def test_step_many_decides_like_stepping_each_deployment_alone() -> None:
    """Same records (actions, scores, steps, states) whether a tick is batched or stepped one
    deployment at a time, over ticks where scores cross the threshold."""
    def run(batched: bool) -> tuple[list[tuple[Any, ...]], dict[str, PolicyState]]:
        scorer = BatchScorer()
        c = Controller(policy(scorer), Source(), None, MemoryLog())
        for t in range(8):
            now = 1000.0 + 30 * t
            if batched:
                c.step_many(DEPS, now)
            else:
                for d in DEPS:
                    c.step(d, now)
        assert (scorer.batches != []) is batched
        log = c.log
        assert isinstance(log, MemoryLog)
        return [(r.deployment_id, r.step, r.action, r.score, r.reason) for r in log], c.states

    one, states_one = run(False)
    many, states_many = run(True)
    assert sorted(one) == sorted(many)
    assert states_one == states_many
    assert any(a == "rollback" for _, _, a, _, _ in many)


def test_duplicate_ids_in_a_tick_are_stepped_once(tmp_path: Path) -> None:
    scorer, source = BatchScorer(), Source()
    with DecisionLog(tmp_path / "d.sqlite") as log:
        loop = ServeLoop(policy(scorer), source, IntentChecker(tmp_path / "d.sqlite"), log,
                         ack=source.ack, clock=lambda: 1000.0)
        assert [e.deployment_id for e in loop.tick(["d1", "d2", "d1"])] == ["d1", "d2"]


# ---- Kafka source: one commit per tick, event-driven readiness ------------------------------

class FakeConsumer:
    def __init__(self) -> None:
        self.commits: list[list[tuple[int, int]]] = []

    def commit(self, offsets: list[Any], asynchronous: bool) -> None:
        assert asynchronous is False
        self.commits.append(sorted((o.partition, o.offset) for o in offsets))

    def close(self) -> None:
        pass


def ev(dep: str, group: str, metric: str, value: float, ts: float) -> bytes:
    return json.dumps({"deployment_id": dep, "group": group, "metric": metric, "value": value,
                       "timestamp": ts}).encode()


@pytest.fixture
def kafka() -> Any:
    src = KafkaSource("127.0.0.1:9", "t", "g", ["lat", "err"], step_s=10, buffer_steps=8,
                      settle_s=3600)
    real = src.consumer
    src.consumer = FakeConsumer()  # type: ignore[assignment]
    yield src
    real.close()


def test_ack_many_releases_a_tick_and_commits_once(kafka: KafkaSource) -> None:
    off = iter(range(100))
    for d, p in (("a", 0), ("b", 0), ("c", 1)):
        kafka._ingest(p, next(off), d.encode(), ev(d, "canary", "err", 0.0, 1000))
    for d in ("a", "b", "c"):
        kafka.window(d, 1005, 2)
    assert kafka.ack_many(["a", "b", "c"])
    assert kafka.consumer.commits == [[(0, 2), (1, 3)]]  # type: ignore[attr-defined]
    assert kafka.ack_many([]) and len(kafka.consumer.commits) == 1  # type: ignore[attr-defined]


def test_ready_lists_a_deployment_once_its_new_step_is_complete(kafka: KafkaSource) -> None:
    off = iter(range(1000))

    def step(dep: str, ts: float, cells: Sequence[tuple[str, str]]) -> None:
        for g, m in cells:
            kafka._ingest(0, next(off), dep.encode(), ev(dep, g, m, 1.0, ts))

    full = [("canary", "lat"), ("canary", "err"), ("baseline", "lat"), ("baseline", "err")]
    step("a", 1000, full)
    assert kafka.ready() == []  # first step: its width is unknown, waits settle_s
    step("a", 1010, full[:3])
    assert kafka.ready() == []  # 3 of the 4 series of a step
    step("a", 1010, full[3:])
    assert kafka.ready() == [("a", 101)]
    kafka.window("a", 1015, 4)  # decided up to slot 101
    assert kafka.ready() == []
    step("a", 1010, full[:1])  # a duplicate of the decided step
    assert kafka.ready() == []
    step("a", 1020, full)
    assert kafka.ready() == [("a", 102)]
    kafka.settle_s = 0.0  # an incomplete step is ready once settle_s has passed
    step("b", 1020, full[:1])
    assert ("b", 102) in kafka.ready()


def test_tick_without_ack_many_acks_each_deployment(tmp_path: Path) -> None:
    class Plain(Source):
        ack_many = None  # type: ignore[assignment]

    scorer, source = BatchScorer(), Plain()
    with DecisionLog(tmp_path / "d.sqlite") as log:
        loop = ServeLoop(policy(scorer), source, IntentChecker(tmp_path / "d.sqlite"), log,
                         ack=source.ack, clock=lambda: 1000.0)
        loop.tick(DEPS[:3])
    assert source.acked == DEPS[:3]


def test_final_deployments_are_not_fetched_again() -> None:
    scorer = BatchScorer()
    c = Controller(policy(scorer), Source(), None, MemoryLog())
    c.states["d1"] = replace(PolicyState(), final=Action.ROLLBACK)
    recs = c.step_many(["d1", "d2", "d3"], 1000.0)
    assert scorer.batches == [2]
    assert recs[0].action == "rollback"
