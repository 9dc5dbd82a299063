from __future__ import annotations

from typing import Any

import pytest
from omegaconf import OmegaConf

from canaryml.cli import compose
from canaryml.errors import ConfigError
from canaryml.serving.actuators import ArgoRolloutActuator, DeploymentActuator, DryRunActuator
from canaryml.serving.factory import build_actuator, build_source
from canaryml.serving.prometheus import PrometheusSource

pytestmark = pytest.mark.timeout(60)  # a hung service fails the test, not CI

DEPS = [{"id": "d1", "namespace": "shop", "canary": "web-canary", "stable": "web-stable",
         "rollout": "web", "selectors": {"canary": 'app="web",track="canary"',
                                         "baseline": 'app="web",track="baseline"'}}]


def serve_cfg(*overrides: str) -> dict[str, Any]:
    cfg = compose("serve", list(overrides))
    serve = OmegaConf.to_container(cfg.serve, resolve=True)
    assert isinstance(serve, dict)
    serve["deployments"] = DEPS
    return serve  # type: ignore[return-value]


def test_default_config_builds_prometheus_source_and_dry_run() -> None:
    serve = serve_cfg()
    src = build_source(serve, ["latency_p99", "error_rate"])
    assert isinstance(src, PrometheusSource) and src.selectors["d1"].baseline is not None
    assert isinstance(build_actuator(serve), DryRunActuator)


def test_kube_actuators_and_kafka_from_config() -> None:
    assert isinstance(build_actuator(serve_cfg("serve.actuator.kind=deployment"), api_client=object()),
                      DeploymentActuator)
    argo = build_actuator(serve_cfg("serve.actuator.kind=argo"), api_client=object())
    assert isinstance(argo, ArgoRolloutActuator) and argo.targets["d1"].name == "web"
    src = build_source(serve_cfg("serve.source.kind=kafka",
                                 "serve.source.kafka.bootstrap_servers=127.0.0.1:9"), ["error_rate"])
    src.consumer.close()  # type: ignore[attr-defined]


def test_unknown_kinds_are_config_errors() -> None:
    with pytest.raises(ConfigError, match=r"serve\.source\.kind='nats'"):
        build_source(serve_cfg("serve.source.kind=nats"), ["error_rate"])
    with pytest.raises(ConfigError, match="use dry_run, deployment, argo or swarm"):
        build_actuator(serve_cfg("serve.actuator.kind=flagger"))
    bad = serve_cfg()
    bad["deployments"] = [{"id": "d1", "selectors": {}}]
    with pytest.raises(ConfigError, match=r"selectors\.canary"):
        build_source(bad, ["error_rate"])


def test_serve_keys_moved_to_policy_are_refused_with_the_new_key() -> None:
    from canaryml.tasks.serve import refuse_removed_keys

    refuse_removed_keys(serve_cfg())  # the shipped config has none of them
    with pytest.raises(ConfigError, match=r"use policy\.monitoring_interval_s"):
        refuse_removed_keys({**serve_cfg(), "interval_s": 30})
    bad = serve_cfg()
    bad["actuator"] = {**bad["actuator"], "canary_batch_size": 2}
    with pytest.raises(ConfigError, match=r"use policy\.canary_batch_size"):
        refuse_removed_keys(bad)
