"""`canaryml serve serve.actuator.kind=swarm` against the emulated Docker Engine API (the same
emulator as tests/unit/test_swarm_actuator.py): the actuator comes from the registry keyed by
kind, its config from `serve.actuator.swarm` and `serve.deployments[*].canary_service/
stable_service`, its batch size from `policy.canary_batch_size`."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest
from omegaconf import OmegaConf

from canaryml.cli import compose
from canaryml.control.policy import PolicyConfig
from canaryml.control.types import Action
from canaryml.errors import ConfigError
from canaryml.replay.sim import ReplaySource
from canaryml.tasks import serve as serve_task
from tests.harness.prometheus import free_port
from tests.integration.test_serve_faults import arrays

pytest.importorskip("docker")
from tests.unit.test_swarm_actuator import NEW_IMAGE, OLD_IMAGE, EngineEmulator

pytestmark = [pytest.mark.services, pytest.mark.timeout(300)]


@pytest.fixture
def engine() -> Iterator[EngineEmulator]:
    emulator = EngineEmulator()
    emulator.add_service("web-canary", NEW_IMAGE, replicas=2)
    emulator.add_service("web", OLD_IMAGE, replicas=8)
    yield emulator
    emulator.close()


def swarm_overrides(engine: EngineEmulator, tmp_path: Path) -> list[str]:
    return ["serve.actuator.kind=swarm", f"serve.actuator.swarm.docker_host={engine.url}",
            "serve.actuator.swarm.rollback=scale_to_zero", "serve.lookback=1",
            "serve.step_s=1", "serve.http.port=0",
            f"serve.decision_log={tmp_path / 'decisions.sqlite'}",
            "serve.deployments=[{id: web, canary_service: web-canary, stable_service: web, "
            "selectors: {canary: 'app=\"web\"'}}]"]


def test_serve_rolls_a_bad_swarm_canary_back(engine: EngineEmulator, tmp_path: Path,
                                             tiny_scorer_dir: Path) -> None:
    cfg = compose("serve", [f"serve.model={tiny_scorer_dir}", *swarm_overrides(engine, tmp_path)])
    serve = cast(dict[str, Any], OmegaConf.to_container(cfg.serve, resolve=True))
    policy = PolicyConfig(warmup_s=0, consecutive_breaches=1, monitoring_interval_s=0.01)
    svc = serve_task.build(serve, policy, source=ReplaySource({"web": arrays("web", bad=True)}))
    try:
        svc.tick()
        (entry,) = svc.loop.log.entries("web")
        assert entry.action is Action.ROLLBACK and entry.applied, entry
        assert svc.controller.is_final("web") and svc.tick() == []
    finally:
        svc.close()
    assert engine.get("web-canary")["Spec"]["Mode"]["Replicated"]["Replicas"] == 0
    # keep_capacity (default): the canary's replicas moved to the stable service
    assert engine.get("web")["Spec"]["Mode"]["Replicated"]["Replicas"] == 10
    labels = engine.get("web-canary")["Spec"]["Labels"]
    assert labels["canaryml.io/last-action"] == "rollback" and labels["canaryml.io/last-step"] == "0"


def test_serve_cli_with_the_swarm_actuator_runs_and_pauses_without_telemetry(
        engine: EngineEmulator, tmp_path: Path, tiny_scorer_dir: Path,
        mlflow_uri: str) -> None:
    """The whole command, config only: Prometheus is down, so every tick is a fail-safe PAUSE
    (applied by the Swarm actuator: nothing to change) and the command exits 0."""
    cfg = compose("serve", [f"serve.model={tiny_scorer_dir}", *swarm_overrides(engine, tmp_path),
                            f"serve.source.prometheus.url=http://127.0.0.1:{free_port()}",
                            "serve.source.prometheus.retries=0",
                            "serve.source.prometheus.timeout_s=1", "serve.max_ticks=2",
                            "policy.monitoring_interval_s=0.01"])
    assert serve_task.run(cfg) == 0
    from canaryml.serving.decision_log import DecisionLog

    with DecisionLog(tmp_path / "decisions.sqlite") as log:
        entries = log.entries("web")
    assert [e.action for e in entries] == [Action.PAUSE, Action.PAUSE]
    assert all(e.applied for e in entries) and "source failed" in entries[0].reason
    assert engine.get("web-canary")["Spec"]["Mode"]["Replicated"]["Replicas"] == 2


def test_swarm_needs_its_services_named(engine: EngineEmulator, tmp_path: Path) -> None:
    cfg = compose("serve", [*swarm_overrides(engine, tmp_path), "serve.deployments=[{id: web}]"])
    serve = cast(dict[str, Any], OmegaConf.to_container(cfg.serve, resolve=True))
    with pytest.raises(ConfigError, match="canary_service and stable_service"):
        serve_task.build(serve, PolicyConfig(), source=ReplaySource({}))
