"""Build the serving components from the plain `serve` config mapping (the task layer passes
`OmegaConf.to_container(cfg.serve, resolve=True)`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from canaryml.control.types import Actuator, MetricSource
from canaryml.errors import ConfigError
from canaryml.serving.actuators import (
    ArgoRolloutActuator,
    DeploymentActuator,
    DeploymentTarget,
    DryRunActuator,
    RolloutTarget,
)
from canaryml.serving.prometheus import PrometheusSource, Selectors


def _deployments(serve: Mapping[str, Any]) -> list[dict[str, Any]]:
    deps = [dict(d) for d in serve.get("deployments") or []]
    for i, d in enumerate(deps):
        if not d.get("id"):
            raise ConfigError(f"serve.deployments[{i}] has no id; each entry needs id, namespace "
                              "and canary/stable (Deployments) or rollout (Argo)")
    return deps


def build_source(serve: Mapping[str, Any], metrics: Sequence[str]) -> MetricSource:
    src = dict(serve.get("source") or {})
    kind = src.get("kind")
    step_s = float(serve["step_s"])
    if kind == "prometheus":
        p = dict(src["prometheus"])
        selectors = {}
        for d in _deployments(serve):
            sel = d.get("selectors") or {}
            if "canary" not in sel:
                raise ConfigError(f"serve.deployments id={d['id']}: selectors.canary is missing "
                                  "(a PromQL label matcher such as app=\"web\",track=\"canary\")")
            selectors[str(d["id"])] = Selectors(str(sel["canary"]), sel.get("baseline"))
        return PrometheusSource(str(p["url"]), dict(p["queries"]), selectors, step_s=step_s,
                                metrics=list(metrics), timeout_s=float(p["timeout_s"]),
                                retries=int(p["retries"]), backoff_s=float(p["backoff_s"]))
    if kind == "kafka":
        from canaryml.serving.kafka import KafkaSource

        k = dict(src["kafka"])
        return KafkaSource(str(k["bootstrap_servers"]), str(k["topic"]), str(k["group_id"]),
                           list(metrics), step_s=step_s, buffer_steps=int(k["buffer_steps"]),
                           poll_timeout_s=float(k["poll_timeout_s"]),
                           config={"session.timeout.ms": int(k["session_timeout_ms"])},
                           max_future_s=float(k.get("max_future_s", 300.0)))
    raise ConfigError(f"serve.source.kind={kind!r} is unknown; use prometheus or kafka")


def build_actuator(serve: Mapping[str, Any], api_client: Any = None) -> Actuator:
    a = dict(serve.get("actuator") or {})
    kind = a.get("kind")
    if kind == "dry_run":
        return DryRunActuator()
    if kind not in ("deployment", "argo"):
        raise ConfigError(f"serve.actuator.kind={kind!r} is unknown; use dry_run, deployment "
                          "or argo")
    if api_client is None:
        from kubernetes import client, config

        try:
            config.load_incluster_config()
        except config.ConfigException:
            config.load_kube_config()
        api_client = client.ApiClient()
    common = {"retries": int(a["retries"]), "request_timeout_s": float(a["request_timeout_s"]),
              "actor": a.get("field_manager")}
    deps = _deployments(serve)
    try:
        if kind == "deployment":
            targets = {str(d["id"]): DeploymentTarget(str(d["namespace"]), str(d["canary"]),
                                                       str(d["stable"])) for d in deps}
            return DeploymentActuator(api_client, targets,
                                      batch_size=int(a["canary_batch_size"]), **common)
        rollouts = {str(d["id"]): RolloutTarget(str(d["namespace"]), str(d["rollout"]))
                    for d in deps}
    except KeyError as exc:
        raise ConfigError(f"serve.deployments entry lacks {exc} for actuator kind={kind}") from exc
    return ArgoRolloutActuator(api_client, rollouts, weight_step=int(a["argo_weight_step"]),
                               **common)
