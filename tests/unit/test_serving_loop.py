from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest

from canaryml.control.types import Action, Decision
from canaryml.errors import ActuatorError, SourceError
from canaryml.serving.decision_log import DecisionLog
from canaryml.serving.loop import ServeLoop
from canaryml.serving.server import Health, ServeMetrics


class Scripted:
    """A decider that replays a script; keeps a counter as its resumable state."""

    def __init__(self, script: list[Any]) -> None:
        self.script = script
        self.seen: dict[str, int] = {}

    def decide(self, deployment_id: str, now_s: float) -> Decision:
        self.seen[deployment_id] = self.seen.get(deployment_id, 0) + 1
        item = self.script.pop(0)
        if isinstance(item, Exception):
            raise item
        return item

    def state(self, deployment_id: str) -> dict[str, Any]:
        return {"seen": self.seen.get(deployment_id, 0)}

    def restore(self, deployment_id: str, state: dict[str, Any]) -> None:
        self.seen[deployment_id] = int(state.get("seen", 0))


class Flaky:
    def __init__(self, fail_steps: set[int]) -> None:
        self.fail_steps = fail_steps
        self.applied: list[tuple[str, int, Action]] = []

    def apply(self, deployment_id: str, decision: Decision, step: int) -> None:
        if step in self.fail_steps:
            raise ActuatorError("503 from the API server")
        if (deployment_id, step, decision.action) not in self.applied:
            self.applied.append((deployment_id, step, decision.action))


class OneDown:
    """Fails every action for one deployment while `down` names it."""

    def __init__(self, down: str | None) -> None:
        self.down = down
        self.calls: list[int] = []

    def apply(self, deployment_id: str, decision: Decision, step: int) -> None:
        if deployment_id == "a":
            self.calls.append(step)
        if deployment_id == self.down:
            raise ActuatorError("503 from the API server")


class Acking:
    def __init__(self) -> None:
        self.acked: list[str] = []

    def ack(self, deployment_id: str) -> bool:
        self.acked.append(deployment_id)
        return True


def test_source_down_pauses_actuator_failure_is_pending_and_restart_resumes(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    path = tmp_path / "decisions.sqlite"
    decider = Scripted([Decision(Action.CONTINUE, "ok", 0.2),
                        SourceError("prometheus unreachable after 4 attempts"),
                        Decision(Action.SHRINK, "score 0.9 > 0.8", 0.9)])
    actuator, health, metrics, source = Flaky({2}), Health(), ServeMetrics(), Acking()
    loop = ServeLoop(decider, actuator, DecisionLog(path), source=source, metrics=metrics,
                     health=health, model_version=lambda: "5", clock=lambda: 1000.0)
    loop.tick(["d1"])
    e1, = loop.tick(["d1"])
    assert e1.action is Action.PAUSE
    assert e1.reasons == ("source unavailable: prometheus unreachable after 4 attempts",)
    assert health.snapshot()["reasons"] == {"source": "prometheus unreachable after 4 attempts"}
    e2, = loop.tick(["d1"])  # the source is back, but the actuator fails
    assert health.snapshot()["reasons"] == {"actuator": "deployment=d1 step=2 action=shrink not "
                                            "applied after 1 attempt(s), retrying: 503 from the "
                                            "API server"}
    assert not e2.applied and loop.log.pending()[0].error == "503 from the API server"
    assert source.acked == ["d1", "d1", "d1"]  # acked after each decision was logged
    assert [(s, a) for _, s, a in actuator.applied] == [(0, Action.CONTINUE), (1, Action.PAUSE)]
    loop.log.close()

    # restart: same log, new process objects
    decider2 = Scripted([Decision(Action.ROLLBACK, "score 0.97", 0.97)])
    actuator.fail_steps.clear()
    loop2 = ServeLoop(decider2, actuator, DecisionLog(path), metrics=metrics, health=health)
    loop2.resume()
    assert decider2.seen == {"d1": 3}  # decider state restored
    assert actuator.applied[-1] == ("d1", 2, Action.SHRINK)  # the pending intent re-applied
    e3, = loop2.tick(["d1"])
    assert e3.step == 3 and e3.action is Action.ROLLBACK
    assert loop2.tick(["d1"]) == []  # rolled back: no more decisions for d1
    entries = loop2.log.entries("d1")
    assert [(e.step, e.action, e.applied) for e in entries] == [
        (0, Action.CONTINUE, True), (1, Action.PAUSE, True), (2, Action.SHRINK, True),
        (3, Action.ROLLBACK, True)]
    assert entries[0].model_version == "5"
    assert sum(1 for r in caplog.records if r.name == "canaryml.decision") == 4
    text = metrics.registry.get_sample_value("canaryml_errors_total", {"kind": "source"})
    assert text == 1.0


def test_unapplied_action_is_retried_with_backoff_and_blocks_only_its_deployment(
        tmp_path: Path) -> None:
    """Issue 16 #1: per-deployment exponential backoff on the retry clock; the other deployment
    keeps deciding; health names the unapplied action until it lands."""
    t = {"now": 0.0}
    decider = Scripted([Decision(Action.ROLLBACK, "score 0.97", 0.97),
                        Decision(Action.CONTINUE, "ok", 0.1)] + [
                        Decision(Action.CONTINUE, "ok", 0.1)] * 10)
    actuator, health, metrics = OneDown("a"), Health(), ServeMetrics()
    loop = ServeLoop(decider, actuator, DecisionLog(tmp_path / "d.sqlite"), metrics=metrics,
                     health=health, retry_backoff_s=10, retry_backoff_max_s=25,
                     retry_clock=lambda: t["now"])
    calls = actuator.calls
    assert [e.deployment_id for e in loop.tick(["a", "b"])] == ["a", "b"]
    assert "deployment=a step=0 action=rollback not applied after 1 attempt(s)" in (
        health.snapshot()["reasons"]["actuator"])  # b's success did not clear it
    t["now"] = 9.9
    assert [e.deployment_id for e in loop.tick(["a", "b"])] == ["b"]
    assert calls == [0]  # backoff (10 s) not elapsed: no retry yet
    t["now"] = 10.0
    loop.tick(["a", "b"])
    assert calls == [0, 0] and loop.unapplied["a"].attempts == 2
    t["now"] = 29.9  # second wait is 20 s
    loop.tick(["a", "b"])
    assert calls == [0, 0]
    t["now"] = 30.0
    loop.tick(["a", "b"])
    assert calls == [0, 0, 0] and loop.unapplied["a"].attempts == 3
    assert loop.unapplied["a"].next_attempt_s == 55.0  # capped at 25 s
    actuator.down = None
    t["now"] = 55.0
    assert [e.deployment_id for e in loop.tick(["a", "b"])] == ["b"]  # a: rolled back, finished
    assert calls == [0, 0, 0, 0] and loop.unapplied == {}
    assert health.snapshot()["status"] == "ok"
    (a,) = loop.log.entries("a")
    assert a.applied and a.error is None
    assert metrics.registry.get_sample_value("canaryml_errors_total", {"kind": "actuator"}) == 3
    loop.log.close()


def test_an_actuator_bug_is_retried_not_fatal(tmp_path: Path) -> None:
    """Issue 16 #3: any exception out of an actuator is a failed apply (retried), never a crash."""

    class Buggy:
        def __init__(self) -> None:
            self.fail = True

        def apply(self, deployment_id: str, decision: Decision, step: int) -> None:
            if self.fail:
                raise KeyError("spec")

    actuator, health = Buggy(), Health()
    loop = ServeLoop(Scripted([Decision(Action.SHRINK, "score 0.9", 0.9),
                               Decision(Action.CONTINUE, "score 0.2", 0.2)]), actuator,
                     DecisionLog(tmp_path / "d.sqlite"), health=health, retry_backoff_s=0)
    (entry,) = loop.tick(["d1"])
    assert not entry.applied and "KeyError" in health.snapshot()["reasons"]["actuator"]
    actuator.fail = False
    (after,) = loop.tick(["d1"])  # the retry lands first, then d1 is decided again
    assert after.step == 1 and loop.log.entries("d1")[0].applied
    assert loop.log.pending() == [] and health.snapshot()["status"] == "ok"
    loop.log.close()
