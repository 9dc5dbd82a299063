from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from canaryml.control.policy import PolicyState, RollbackPolicy
from canaryml.control.types import Action, Decision, Window
from canaryml.errors import ActuatorError, SourceError
from canaryml.serving.decision_log import DecisionLog
from canaryml.serving.loop import ServeLoop
from canaryml.serving.server import Health, ServeMetrics

pytestmark = pytest.mark.timeout(60)  # a hung service fails the test, not CI


class Scripted:
    """A policy that replays a script of decisions; its PolicyState counts the ticks (what a
    restarted controller must resume). A fail-safe tick consumes nothing from the script."""

    name = "model"
    lookback = 1
    rollback = RollbackPolicy()

    def __init__(self, script: list[Decision]) -> None:
        self.script = script

    def initial_state(self) -> PolicyState:
        return PolicyState()

    def step(self, window: Window | None, now_s: float, state: PolicyState, *,
             failure: str | None = None) -> tuple[Decision, PolicyState]:
        if state.final is not None:
            return Decision(state.final, f"already {state.final}"), state
        st = replace(state, ticks=state.ticks + 1)
        if failure is not None:
            return Decision(Action.PAUSE, f"source unavailable: {failure}", None,
                            {"failure": failure}), st
        d = self.script.pop(0)
        if d.action in (Action.ROLLBACK, Action.PROMOTE):
            st = replace(st, final=d.action)
        return d, st


class Source:
    """One row of data per fetch; raises the queued errors first (one per fetch)."""

    def __init__(self, errors: list[Exception | None] | None = None) -> None:
        self.errors = list(errors or [])
        self.acked: list[str] = []

    def fetch(self, deployment_id: str, now_s: float, lookback: int) -> Window:
        err = self.errors.pop(0) if self.errors else None
        if err is not None:
            raise err
        return Window(deployment_id, now_s, np.array([int(now_s)]), np.ones((1, 1), np.float32),
                      None, ("m",))

    def ack(self, deployment_id: str) -> bool:
        self.acked.append(deployment_id)
        return True


def loop_of(script: list[Decision], actuator: Any, log: DecisionLog,
            source: Source | None = None, **kw: Any) -> ServeLoop:
    source = source or Source()
    return ServeLoop(Scripted(script), source, actuator, log, ack=source.ack, **kw)


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


def test_source_down_pauses_actuator_failure_is_pending_and_restart_resumes(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    path = tmp_path / "decisions.sqlite"
    script = [Decision(Action.CONTINUE, "ok", 0.2), Decision(Action.SHRINK, "score 0.9 > 0.8", 0.9)]
    source = Source([None, SourceError("prometheus unreachable after 4 attempts")])
    actuator, health, metrics = Flaky({2}), Health(), ServeMetrics()
    loop = loop_of(script, actuator, DecisionLog(path), source, metrics=metrics,
                   health=health, model_version=lambda: "5", clock=lambda: 1000.0)
    loop.tick(["d1"])
    e1, = loop.tick(["d1"])
    assert e1.action is Action.PAUSE
    why = "source failed: SourceError: prometheus unreachable after 4 attempts"
    assert e1.reasons == (f"source unavailable: {why}",)
    assert health.snapshot()["reasons"] == {"telemetry": why}
    e2, = loop.tick(["d1"])  # the source is back, but the actuator fails
    assert health.snapshot()["reasons"] == {"actuator": "deployment=d1 step=2 action=shrink not "
                                            "applied after 1 attempt(s), retrying: 503 from the "
                                            "API server"}
    assert not e2.applied and loop.log.pending()[0].error == "503 from the API server"
    assert source.acked == ["d1", "d1", "d1"]  # acked after each decision was logged
    assert [(s, a) for _, s, a in actuator.applied] == [(0, Action.CONTINUE), (1, Action.PAUSE)]
    loop.log.close()

    # restart: same log, new process objects
    actuator.fail_steps.clear()
    loop2 = loop_of([Decision(Action.ROLLBACK, "score 0.97", 0.97)], actuator, DecisionLog(path),
                    metrics=metrics, health=health)
    loop2.resume()
    assert loop2.controller.state("d1")["ticks"] == 3  # policy state restored
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
    script = [Decision(Action.ROLLBACK, "score 0.97", 0.97), Decision(Action.CONTINUE, "ok", 0.1)
              ] + [Decision(Action.CONTINUE, "ok", 0.1)] * 10
    actuator, health, metrics = OneDown("a"), Health(), ServeMetrics()
    loop = loop_of(script, actuator, DecisionLog(tmp_path / "d.sqlite"), metrics=metrics,
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
    loop = loop_of([Decision(Action.SHRINK, "score 0.9", 0.9),
                    Decision(Action.CONTINUE, "score 0.2", 0.2)], actuator,
                   DecisionLog(tmp_path / "d.sqlite"), health=health, retry_backoff_s=0)
    (entry,) = loop.tick(["d1"])
    assert not entry.applied and "KeyError" in health.snapshot()["reasons"]["actuator"]
    actuator.fail = False
    (after,) = loop.tick(["d1"])  # the retry lands first, then d1 is decided again
    assert after.step == 1 and loop.log.entries("d1")[0].applied
    assert loop.log.pending() == [] and health.snapshot()["status"] == "ok"
    loop.log.close()


def test_source_down_for_the_error_limit_rolls_back_through_the_durable_log(
        tmp_path: Path) -> None:
    """policy.consecutive_error_limit in the serve loop: N fetch failures in a row → the
    configured outcome, logged durably and applied; then no more decisions."""
    from canaryml.control.policies import ScorerPolicy
    from canaryml.control.policy import PolicyConfig
    from canaryml.replay.standin import GapZScorer

    cfg = PolicyConfig(warmup_s=0, consecutive_error_limit=3, error_limit_action="rollback")
    down = SourceError("prometheus unreachable after 4 attempts")
    source, actuator, metrics = Source([down, down, down]), Flaky(set()), ServeMetrics()
    loop = ServeLoop(ScorerPolicy("model", GapZScorer(("m",)), RollbackPolicy(cfg)), source,
                     actuator, DecisionLog(tmp_path / "d.sqlite"), metrics=metrics,
                     clock=lambda: 1000.0)
    for _ in range(3):
        loop.tick(["d1"])
    assert loop.tick(["d1"]) == []  # terminal: the policy state says rollback
    entries = loop.log.entries("d1")
    assert [e.action for e in entries] == [Action.PAUSE, Action.PAUSE, Action.ROLLBACK]
    assert "consecutive_error_limit=3" in entries[-1].reason and all(e.applied for e in entries)
    assert actuator.applied[-1] == ("d1", 2, Action.ROLLBACK)
    assert metrics.registry.get_sample_value("canaryml_errors_total", {"kind": "source"}) == 3
    loop.log.close()


def test_resume_reads_the_state_saved_before_the_loop_body_was_controller_step(
        tmp_path: Path) -> None:
    with DecisionLog(tmp_path / "d.sqlite") as log:
        log.save_state("d1", 2, {"_finished": False, "decider": PolicyState(ticks=3).to_dict()})
    loop = loop_of([Decision(Action.CONTINUE, "ok", 0.1)], Flaky(set()),
                   DecisionLog(tmp_path / "d.sqlite"))
    loop.resume()
    assert loop.controller.state("d1")["ticks"] == 3
    (entry,) = loop.tick(["d1"])
    assert entry.step == 3 and loop.controller.state("d1")["ticks"] == 4
    loop.log.close()
