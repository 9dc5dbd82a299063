from __future__ import annotations

from typing import Any

import pytest

from canaryml.control.types import Action, Decision
from canaryml.errors import ConfigError
from canaryml.serving.actuators import (
    DeploymentActuator,
    DryRunActuator,
    already_applied,
    current_weight,
)

pytestmark = pytest.mark.timeout(60)  # a hung service fails the test, not CI


def test_dry_run_logs_once_per_step_and_action() -> None:
    a = DryRunActuator()
    a.apply("d1", Decision(Action.SHRINK, "high", 0.9), 3)
    a.apply("d1", Decision(Action.SHRINK, "high", 0.9), 3)
    a.apply("d1", Decision(Action.SHRINK, "high", 0.9), 4)
    assert [(h.step, h.action) for h in a.history] == [(3, Action.SHRINK), (4, Action.SHRINK)]


def test_current_weight_from_status_or_steps() -> None:
    steps = [{"setWeight": 10}, {"pause": {}}, {"setWeight": 30}, {"pause": {}}, {"setWeight": 60}]
    ro: dict[str, Any] = {"spec": {"strategy": {"canary": {"steps": steps}}}, "status": {"currentStepIndex": 3}}
    assert current_weight(ro) == 30
    ro["status"]["canary"] = {"weights": {"canary": {"weight": 25}}}
    assert current_weight(ro) == 25


def test_already_applied_needs_step_and_action() -> None:
    obj = {"metadata": {"annotations": {"canaryml.io/last-step": "4",
                                        "canaryml.io/last-action": "shrink"}}}
    assert already_applied(obj, 4, Action.SHRINK)
    assert not already_applied(obj, 4, Action.ROLLBACK)
    assert not already_applied(obj, 5, Action.SHRINK)
    assert not already_applied({}, 4, Action.SHRINK)


def test_bad_batch_size_and_unknown_deployment() -> None:
    with pytest.raises(ConfigError, match="canary_batch_size"):
        DeploymentActuator(None, {}, batch_size=0)
    with pytest.raises(ConfigError, match=r"serve\.deployments"):
        DeploymentActuator(None, {}).apply("nope", Decision(Action.SHRINK, "x"), 1)
