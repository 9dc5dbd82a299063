"""A controller killed after a decision is logged (and maybe applied) but before its policy
state was checkpointed must not decide that step again on restart: the log keeps the first
decision (one row per step) while the actuator would act on the second."""

from __future__ import annotations

from pathlib import Path

import pytest

from canaryml.control.types import Action, Decision
from canaryml.serving.decision_log import DecisionLog
from tests.unit.test_serving_loop import Source, loop_of

pytestmark = pytest.mark.timeout(60)


class Killed(BaseException):
    """kill -9 stand-in: nothing after it runs (not an Exception: no handler catches it)."""


class Recording:
    """Idempotent per (deployment, step, action), like the Kubernetes actuators; `kill_at`:
    the write of that step lands, then the process dies before hearing back."""

    def __init__(self, kill_at: int | None = None) -> None:
        self.kill_at = kill_at
        self.applied: list[tuple[int, Action]] = []

    def apply(self, deployment_id: str, decision: Decision, step: int) -> None:
        if (step, decision.action) not in self.applied:
            self.applied.append((step, decision.action))
        if step == self.kill_at:
            self.kill_at = None
            raise Killed


def test_a_kill_between_logging_and_checkpoint_never_redecides_the_logged_step(
        tmp_path: Path) -> None:
    path = tmp_path / "decisions.sqlite"
    act = Recording(kill_at=1)
    loop = loop_of([Decision(Action.CONTINUE, "ok", 0.2), Decision(Action.SHRINK, "bad", 0.9)],
                   act, DecisionLog(path), clock=lambda: 1000.0)
    loop.tick(["d1"])
    with pytest.raises(Killed):
        loop.tick(["d1"])  # step 1 (shrink) is logged and landed; the process dies
    loop.log.close()

    # restart: this time the policy would roll back
    loop2 = loop_of([Decision(Action.ROLLBACK, "worse", 0.99)], act, DecisionLog(path),
                    source=Source(), clock=lambda: 1001.0)
    loop2.resume()
    assert loop2.controller.state("d1")["ticks"] == 2  # the state after the logged shrink
    (e,) = loop2.tick(["d1"])
    assert (e.step, e.action) == (2, Action.ROLLBACK)
    entries = loop2.log.entries("d1")
    loop2.log.close()
    got = [(x.step, x.action, x.applied) for x in entries]
    assert got == [(0, Action.CONTINUE, True), (1, Action.SHRINK, True),
                   (2, Action.ROLLBACK, True)]
    # what was acted on is exactly what the log says, once each
    assert act.applied == [(0, Action.CONTINUE), (1, Action.SHRINK), (2, Action.ROLLBACK)]
