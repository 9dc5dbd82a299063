"""The registry of live sources and actuators, keyed by `kind` (Flagger's provider factory).

`build_source(serve, metrics)` and `build_actuator(serve, api_client, batch_size=…)` look the
configured `serve.source.kind` / `serve.actuator.kind` up in `SOURCES` / `ACTUATORS`; an unknown
kind is a `ConfigError` naming the known ones (never a silent default). The task layer passes
the plain `serve` mapping (`OmegaConf.to_container(cfg.serve, resolve=True)`).

Every registered source is a `LiveSource` and every actuator a `LiveActuator`: the serve loop
calls the same methods on all of them (no isinstance/hasattr dispatch on concrete classes).
`live_source` / `live_actuator` give a plain `MetricSource` / `Actuator` (tests, the demo's
in-memory source) the same interface with no-op methods.

Actuator kinds:
  dry_run     logs what it would do (`DryRunActuator`)
  deployment  Kubernetes canary/stable Deployments (needs `serve.deployments[*].canary/stable`)
  argo        Argo Rollouts (needs `serve.deployments[*].rollout`)
  swarm       Docker Swarm canary/stable services (`serve.actuator.swarm`, and
              `serve.deployments[*].canary_service/stable_service`)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from canaryml.control.types import Actuator, Decision, MetricSource, Window
from canaryml.errors import ConfigError
from canaryml.serving.actuators import (
    ArgoRolloutActuator,
    DeploymentActuator,
    DeploymentTarget,
    DryRunActuator,
    RolloutTarget,
    UnknownTargetError,
)
from canaryml.serving.prometheus import PrometheusSource, Selectors


@runtime_checkable
class LiveSource(Protocol):
    """A `MetricSource` the serve loop drives: ack after a durable decision, refresh between
    ticks (returns why the backend is down, or None), the deployments this replica owns (None =
    all), wiring for a discovered deployment (why not, or None), close."""

    def fetch(self, deployment_id: str, now_s: float, lookback: int) -> Window: ...

    def ack(self, deployment_id: str) -> Any: ...

    def refresh(self) -> str | None: ...

    def owned(self) -> set[str] | None: ...

    def wire(self, entry: dict[str, Any]) -> str | None: ...

    def close(self) -> None: ...


@runtime_checkable
class LiveActuator(Protocol):
    """An `Actuator` that can also target a discovered deployment (why not, or None)."""

    def apply(self, deployment_id: str, decision: Decision, step: int) -> None: ...

    def wire(self, entry: dict[str, Any]) -> str | None: ...


class PlainSource:
    """A plain MetricSource with the LiveSource methods as no-ops."""

    def __init__(self, inner: MetricSource) -> None:
        self.inner = inner

    def fetch(self, deployment_id: str, now_s: float, lookback: int) -> Window:
        return self.inner.fetch(deployment_id, now_s, lookback)

    def ack(self, deployment_id: str) -> None:
        pass

    def refresh(self) -> str | None:
        return None

    def owned(self) -> set[str] | None:
        return None

    def wire(self, entry: dict[str, Any]) -> str | None:
        return None

    def close(self) -> None:
        pass


class PlainActuator:
    """A plain Actuator that accepts every discovered deployment as is."""

    def __init__(self, inner: Actuator) -> None:
        self.inner = inner

    def apply(self, deployment_id: str, decision: Decision, step: int) -> None:
        self.inner.apply(deployment_id, decision, step)

    def wire(self, entry: dict[str, Any]) -> str | None:
        return None


def live_source(source: MetricSource) -> LiveSource:
    return source if isinstance(source, LiveSource) else PlainSource(source)


def live_actuator(actuator: Actuator) -> LiveActuator:
    return actuator if isinstance(actuator, LiveActuator) else PlainActuator(actuator)


def _deployments(serve: Mapping[str, Any]) -> list[dict[str, Any]]:
    deps = [dict(d) for d in serve.get("deployments") or []]
    for i, d in enumerate(deps):
        if not d.get("id"):
            raise ConfigError(f"serve.deployments[{i}] has no id; each entry needs id, namespace "
                              "and canary/stable (Deployments), rollout (Argo) or "
                              "canary_service/stable_service (Swarm)")
    return deps


# ---- sources ------------------------------------------------------------------------------
def _prometheus(serve: Mapping[str, Any], metrics: Sequence[str]) -> LiveSource:
    p = dict(serve["source"]["prometheus"])
    selectors = {}
    for d in _deployments(serve):
        sel = d.get("selectors") or {}
        if "canary" not in sel:
            raise ConfigError(f"serve.deployments id={d['id']}: selectors.canary is missing "
                              "(a PromQL label matcher such as app=\"web\",track=\"canary\")")
        selectors[str(d["id"])] = Selectors(str(sel["canary"]), sel.get("baseline"))
    return PrometheusSource(str(p["url"]), dict(p["queries"]), selectors,
                            step_s=float(serve["step_s"]), metrics=list(metrics),
                            timeout_s=float(p["timeout_s"]), retries=int(p["retries"]),
                            backoff_s=float(p["backoff_s"]),
                            baseline=str(p.get("baseline", "selector")),
                            history_offset_s=float(p.get("history_offset_s", 3600.0)))


def _kafka(serve: Mapping[str, Any], metrics: Sequence[str]) -> LiveSource:
    from canaryml.serving.kafka import KafkaSource

    k = dict(serve["source"]["kafka"])
    return KafkaSource(str(k["bootstrap_servers"]), str(k["topic"]), str(k["group_id"]),
                       list(metrics), step_s=float(serve["step_s"]),
                       buffer_steps=int(k["buffer_steps"]),
                       poll_timeout_s=float(k["poll_timeout_s"]),
                       config={"session.timeout.ms": int(k["session_timeout_ms"])},
                       max_future_s=float(k.get("max_future_s", 300.0)))


SOURCES: dict[str, Callable[[Mapping[str, Any], Sequence[str]], LiveSource]] = {
    "prometheus": _prometheus, "kafka": _kafka}


def build_source(serve: Mapping[str, Any], metrics: Sequence[str]) -> LiveSource:
    kind = (serve.get("source") or {}).get("kind")
    if kind not in SOURCES:
        raise ConfigError(f"serve.source.kind={kind!r} is unknown; use "
                          f"{' or '.join(SOURCES)}")
    return SOURCES[kind](serve, metrics)


# ---- actuators ----------------------------------------------------------------------------
@dataclass(frozen=True)
class ActuatorKind:
    """How to build one actuator kind. `discovers`: what `serve.discover` lists for it
    (`deployment` or `argo`: Kubernetes objects), None when discovery does not apply."""

    build: Callable[[Mapping[str, Any], Any, int], LiveActuator]
    needs_kube: bool = False
    discovers: str | None = None


def _kube_common(a: Mapping[str, Any]) -> dict[str, Any]:
    return {"retries": int(a["retries"]), "request_timeout_s": float(a["request_timeout_s"]),
            "actor": a.get("field_manager")}


def _dry_run(serve: Mapping[str, Any], api_client: Any, batch_size: int) -> LiveActuator:
    return DryRunActuator()


def _deployment(serve: Mapping[str, Any], api_client: Any, batch_size: int) -> LiveActuator:
    try:
        targets = {str(d["id"]): DeploymentTarget(str(d["namespace"]), str(d["canary"]),
                                                   str(d["stable"])) for d in _deployments(serve)}
    except KeyError as exc:
        raise ConfigError(f"serve.deployments entry lacks {exc} for actuator kind=deployment "
                          "(needs id, namespace, canary, stable)") from exc
    return DeploymentActuator(api_client, targets, batch_size=batch_size,
                              **_kube_common(serve["actuator"]))


def _argo(serve: Mapping[str, Any], api_client: Any, batch_size: int) -> LiveActuator:
    a = serve["actuator"]
    try:
        targets = {str(d["id"]): RolloutTarget(str(d["namespace"]), str(d["rollout"]))
                   for d in _deployments(serve)}
    except KeyError as exc:
        raise ConfigError(f"serve.deployments entry lacks {exc} for actuator kind=argo "
                          "(needs id, namespace, rollout)") from exc
    return ArgoRolloutActuator(api_client, targets, weight_step=int(a["argo_weight_step"]),
                               **_kube_common(a))


class SwarmFleet:
    """One `SwarmActuator` per deployment (its canary/stable service pair), one Engine client."""

    def __init__(self, client: Any, services: Mapping[str, tuple[str, str]],
                 strategy: Any) -> None:
        from canaryml.serving.swarm import SwarmActuator

        self.client = client
        self.strategy = strategy
        self.actuators = {dep: SwarmActuator(client, canary, stable, strategy)
                          for dep, (canary, stable) in services.items()}

    def apply(self, deployment_id: str, decision: Decision, step: int) -> None:
        try:
            actuator = self.actuators[deployment_id]
        except KeyError:
            raise UnknownTargetError(
                f"deployment {deployment_id!r} has no Swarm services; add it to "
                "serve.deployments with canary_service and stable_service") from None
        actuator.apply(deployment_id, decision, step)

    def wire(self, entry: dict[str, Any]) -> str | None:
        return "Swarm services are configured in serve.deployments, not discovered"

    def close(self) -> None:
        self.client.close()


def _swarm(serve: Mapping[str, Any], api_client: Any, batch_size: int) -> LiveActuator:
    from canaryml.serving.swarm import SwarmStrategy, build_swarm_actuator

    s = dict(serve["actuator"].get("swarm") or {})
    strategy = SwarmStrategy(rollback=str(s.get("rollback", "previous_spec")),  # type: ignore[arg-type]
                             batch_size=batch_size,
                             keep_capacity=bool(s.get("keep_capacity", True)),
                             actor=str(serve["actuator"].get("field_manager") or "canaryml"),
                             conflict_retries=int(s.get("conflict_retries", 2)))
    services = {}
    for d in _deployments(serve):
        if not d.get("canary_service") or not d.get("stable_service"):
            raise ConfigError(f"serve.deployments id={d['id']}: actuator kind=swarm needs "
                              "canary_service and stable_service (Swarm service names)")
        services[str(d["id"])] = (str(d["canary_service"]), str(d["stable_service"]))
    if not services:
        raise ConfigError("serve.actuator.kind=swarm needs serve.deployments entries with id, "
                          "canary_service and stable_service")
    first = build_swarm_actuator(str(s.get("docker_host") or "unix:///var/run/docker.sock"),
                                 *next(iter(services.values())), strategy,
                                 timeout_s=float(serve["actuator"]["request_timeout_s"]))
    return SwarmFleet(first.client, services, strategy)


ACTUATORS: dict[str, ActuatorKind] = {
    "dry_run": ActuatorKind(_dry_run),
    "deployment": ActuatorKind(_deployment, needs_kube=True, discovers="deployment"),
    "argo": ActuatorKind(_argo, needs_kube=True, discovers="argo"),
    "swarm": ActuatorKind(_swarm),
}


def actuator_kind(serve: Mapping[str, Any]) -> ActuatorKind:
    kind = (serve.get("actuator") or {}).get("kind")
    if kind not in ACTUATORS:
        raise ConfigError(f"serve.actuator.kind={kind!r} is unknown; use "
                          f"{', '.join(list(ACTUATORS)[:-1])} or {list(ACTUATORS)[-1]}")
    return ACTUATORS[kind]


def build_actuator(serve: Mapping[str, Any], api_client: Any = None, *,
                   batch_size: int = 1) -> LiveActuator:
    """The configured actuator; `batch_size` is `policy.canary_batch_size` (replicas per
    batch). A Kubernetes kind without `api_client` loads in-cluster config, else kubeconfig."""
    kind = actuator_kind(serve)
    if kind.needs_kube and api_client is None:
        from kubernetes import client, config

        try:
            config.load_incluster_config()
        except config.ConfigException:
            config.load_kube_config()
        api_client = client.ApiClient()
    return kind.build(serve, api_client, int(batch_size))
