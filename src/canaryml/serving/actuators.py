"""Actuators: plain Kubernetes Deployments, Argo Rollouts, and a dry run.

Idempotency (the `Actuator` contract): every acting patch also writes annotations
`canaryml.io/last-step`, `…/last-action`, `…/actor`, `…/reason`, `…/score` on the object it
changes, in the same merge patch. Before acting, the actuator reads the object; when
`last-step`/`last-action` already match this (step, action), that object is left alone. A retry
after a 409 or 5xx (whether or not the failed write landed) therefore never acts twice.

Only scalar fields are patched (`spec.replicas`, annotations, `spec.paused`, `status.abort`,
`status.promoteFull`) with JSON merge patches, plus Argo's `spec.strategy.canary.steps` which a
merge patch replaces as a whole (RFC 7386), exactly what lowering the weight needs.
"""

from __future__ import annotations

import json
import logging
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from canaryml.control.types import Action, Decision
from canaryml.errors import ActuatorError, ConfigError

log = logging.getLogger(__name__)

ANNOTATION_PREFIX = "canaryml.io/"
MERGE_PATCH = "application/merge-patch+json"
RETRYABLE = {409, 429, 500, 502, 503, 504}


class UnknownTargetError(ConfigError):
    """The actuator has no target (Deployment, Rollout) for this deployment id — e.g. a Kafka
    event for a deployment missing from `serve.deployments`. The serve loop logs, counts and
    skips such an action; it is never retried and never stops the controller."""


def default_actor() -> str:
    return f"canaryml@{socket.gethostname()}"


def action_annotations(step: int, decision: Decision, actor: str) -> dict[str, str]:
    return {
        f"{ANNOTATION_PREFIX}last-step": str(int(step)),
        f"{ANNOTATION_PREFIX}last-action": str(decision.action),
        f"{ANNOTATION_PREFIX}actor": actor,
        f"{ANNOTATION_PREFIX}reason": decision.reason[:1000],
        f"{ANNOTATION_PREFIX}score": "" if decision.score is None else f"{decision.score:.4f}",
    }


def already_applied(obj: dict[str, Any], step: int, action: Action) -> bool:
    ann = (obj.get("metadata") or {}).get("annotations") or {}
    return (ann.get(f"{ANNOTATION_PREFIX}last-step") == str(int(step))
            and ann.get(f"{ANNOTATION_PREFIX}last-action") == str(action))


@dataclass(frozen=True)
class AppliedAction:
    """What an actuator did (or, for the dry run, would do) for one decision."""

    deployment_id: str
    step: int
    action: Action
    patches: tuple[tuple[str, dict[str, Any]], ...]  # (object name, merge patch)
    skipped: bool = False  # True when the (step, action) had already been applied


@dataclass(frozen=True)
class DeploymentTarget:
    """A canary and its stable Deployment in one namespace."""

    namespace: str
    canary: str
    stable: str


@dataclass(frozen=True)
class RolloutTarget:
    """An Argo Rollout (argoproj.io/v1alpha1 rollouts)."""

    namespace: str
    name: str


def _status(exc: BaseException) -> int | None:
    status = getattr(exc, "status", None)
    return int(status) if isinstance(status, int) else None


class _KubeBase:
    def __init__(self, api_client: Any, *, actor: str | None = None, retries: int = 3,
                 backoff_s: float = 0.2, request_timeout_s: float = 10.0) -> None:
        if retries < 0:
            raise ConfigError(f"actuator retries={retries} must be >= 0 (serve.actuator.retries)")
        self.api_client = api_client
        self.actor = actor or default_actor()
        self.retries = retries
        self.backoff_s = backoff_s
        self.request_timeout_s = request_timeout_s
        self.history: list[AppliedAction] = []

    def _with_retries(self, what: str, fn: Callable[[], AppliedAction]) -> AppliedAction:
        """Run `fn` (read, check, patch) again on 409/429/5xx; each attempt re-reads the object."""
        for attempt in range(self.retries + 1):
            try:
                result = fn()
                self.history.append(result)
                return result
            except Exception as exc:  # the kubernetes client raises ApiException / urllib3 errors
                status = _status(exc)
                transient = status in RETRYABLE or (status is None and _is_connection_error(exc))
                if not transient or attempt == self.retries:
                    raise ActuatorError(
                        f"{what} failed after {attempt + 1} attempt(s): "
                        f"{status or type(exc).__name__} {getattr(exc, 'reason', exc)}; check the "
                        "API server, the object name/namespace in serve.deployments and the RBAC "
                        "in serving/rbac.yaml"
                    ) from exc
                log.warning("%s: HTTP %s (attempt %d/%d), re-reading and retrying", what, status,
                            attempt + 1, self.retries + 1)
                time.sleep(self.backoff_s * (2 ** attempt))
        raise AssertionError("unreachable")


def _json(resp: Any) -> dict[str, Any]:
    data = json.loads(resp.data or b"{}")
    if not isinstance(data, dict):
        raise ActuatorError(f"API server answered {type(data).__name__}, not an object")
    return data


def _is_connection_error(exc: BaseException) -> bool:
    import urllib3

    return isinstance(exc, urllib3.exceptions.HTTPError | ConnectionError | TimeoutError)


class DeploymentActuator(_KubeBase):
    """Plain Deployments: a canary and a stable Deployment per canary deployment.

    - continue: nothing is sent;
    - pause: annotate the canary (the controller holds; no replicas change);
    - shrink (gradual rollback, one call per interval while the score stays high): move one
      batch of `batch_size` replicas from the canary to the stable Deployment;
    - rollback (immediate): canary to 0 replicas, its replicas back to the stable Deployment;
    - promote: annotate the canary as passed (the rollout tool finishes the promotion).
    Replica moves keep the total constant, so when the canary reaches 0 the stable is restored.
    """

    def __init__(self, api_client: Any, targets: dict[str, DeploymentTarget], *,
                 batch_size: int = 1, **kw: Any) -> None:
        if batch_size < 1:
            raise ConfigError(f"canary batch size {batch_size} must be >= 1 "
                              "(policy.canary_batch_size)")
        super().__init__(api_client, **kw)
        from kubernetes import client

        self.apps = client.AppsV1Api(api_client)
        self.targets = dict(targets)
        self.batch_size = batch_size

    def wire(self, entry: dict[str, Any]) -> str | None:
        """Target a discovered deployment (`serve.deployments`-shaped entry); why not, or None."""
        if not entry.get("canary") or not entry.get("stable"):
            return ("no canaryml.io/stable annotation (the Deployment actuator needs the stable "
                    "Deployment's name)")
        self.targets[str(entry["id"])] = DeploymentTarget(str(entry["namespace"]),
                                                          str(entry["canary"]),
                                                          str(entry["stable"]))
        return None

    def _target(self, deployment_id: str) -> DeploymentTarget:
        try:
            return self.targets[deployment_id]
        except KeyError:
            raise UnknownTargetError(
                f"deployment {deployment_id!r} has no Kubernetes target; add it to "
                "serve.deployments with namespace, canary and stable (or label its canary for "
                "serve.discover)") from None

    def _read(self, ns: str, name: str) -> dict[str, Any]:
        # raw JSON: no client-side model validation of fields we neither read nor write
        resp = self.apps.read_namespaced_deployment(name, ns, _preload_content=False,
                                                    _request_timeout=self.request_timeout_s)
        return _json(resp)

    def _patch(self, ns: str, name: str, body: dict[str, Any]) -> None:
        self.apps.patch_namespaced_deployment(name, ns, body, _content_type=MERGE_PATCH,
                                              _preload_content=False,
                                              _request_timeout=self.request_timeout_s)

    def apply(self, deployment_id: str, decision: Decision, step: int) -> None:
        self.apply_detailed(deployment_id, decision, step)

    def apply_detailed(self, deployment_id: str, decision: Decision, step: int) -> AppliedAction:
        t = self._target(deployment_id)
        if decision.action is Action.CONTINUE:
            return AppliedAction(deployment_id, step, decision.action, ())
        return self._with_retries(f"{decision.action} of Deployment {t.namespace}/{t.canary}",
                                  lambda: self._once(deployment_id, t, decision, step))

    def _once(self, deployment_id: str, t: DeploymentTarget, decision: Decision,
              step: int) -> AppliedAction:
        ann = {"metadata": {"annotations": action_annotations(step, decision, self.actor)}}
        canary = self._read(t.namespace, t.canary)
        canary_done = already_applied(canary, step, decision.action)
        patches: list[tuple[str, dict[str, Any]]] = []
        if decision.action in (Action.SHRINK, Action.ROLLBACK):
            replicas = int((canary.get("spec") or {}).get("replicas") or 0)
            move = replicas if decision.action is Action.ROLLBACK else min(self.batch_size, replicas)
            stable = self._read(t.namespace, t.stable)
            # the stable side first: a crash in between leaves extra capacity, never too little
            if not already_applied(stable, step, decision.action) and not canary_done:
                s_replicas = int((stable.get("spec") or {}).get("replicas") or 0)
                body = {**ann, "spec": {"replicas": s_replicas + move}}
                self._patch(t.namespace, t.stable, body)
                patches.append((t.stable, body))
            if not canary_done:
                body = {**ann, "spec": {"replicas": replicas - move}}
                self._patch(t.namespace, t.canary, body)
                patches.append((t.canary, body))
        elif not canary_done:  # pause, promote: the annotation is the action
            self._patch(t.namespace, t.canary, ann)
            patches.append((t.canary, ann))
        skipped = not patches
        log.info("actuator=deployment deployment=%s step=%d action=%s %s", deployment_id, step,
                 decision.action, "skipped (already applied)" if skipped else
                 " ".join(f"{n}={p.get('spec', {}).get('replicas', '-')}" for n, p in patches))
        return AppliedAction(deployment_id, step, decision.action, tuple(patches), skipped)


ARGO = ("argoproj.io", "v1alpha1", "rollouts")


def current_weight(rollout: dict[str, Any]) -> int:
    """The canary weight an Argo Rollout is at: status.canary.weights, else the steps so far."""
    status = rollout.get("status") or {}
    w = ((status.get("canary") or {}).get("weights") or {}).get("canary", {}).get("weight")
    if w is not None:
        return int(w)
    steps = (((rollout.get("spec") or {}).get("strategy") or {}).get("canary") or {}).get("steps") or []
    idx = int(status.get("currentStepIndex", len(steps)) or 0)
    weight = 0
    for s in steps[: idx + 1]:
        if "setWeight" in s:
            weight = int(s["setWeight"])
    return weight


class ArgoRolloutActuator(_KubeBase):
    """Argo Rollouts via the Rollout custom resource.

    - pause: `spec.paused: true` (as `kubectl argo rollouts pause`);
    - shrink (gradual): replace the canary steps with `[{setWeight: w - weight_step}, {pause: {}}]`
      so the Rollout moves to the lower weight and holds there;
    - rollback (immediate): `status.abort: true` on the status subresource (as
      `kubectl argo rollouts abort`): traffic returns to stable, the canary scales down;
    - promote: `status.promoteFull: true` (as `kubectl argo rollouts promote --full`).
    """

    def __init__(self, api_client: Any, targets: dict[str, RolloutTarget], *,
                 weight_step: int = 10, **kw: Any) -> None:
        if not 1 <= weight_step <= 100:
            raise ConfigError(f"argo weight step {weight_step} must be in 1..100 "
                              "(serve.actuator.argo_weight_step)")
        super().__init__(api_client, **kw)
        from kubernetes import client

        self.custom = client.CustomObjectsApi(api_client)
        self.targets = dict(targets)
        self.weight_step = weight_step

    def wire(self, entry: dict[str, Any]) -> str | None:
        """Target a discovered Rollout; why not, or None."""
        if not entry.get("rollout"):
            return "not an Argo Rollout (the argo actuator acts on Rollouts)"
        self.targets[str(entry["id"])] = RolloutTarget(str(entry["namespace"]),
                                                       str(entry["rollout"]))
        return None

    def apply(self, deployment_id: str, decision: Decision, step: int) -> None:
        self.apply_detailed(deployment_id, decision, step)

    def apply_detailed(self, deployment_id: str, decision: Decision, step: int) -> AppliedAction:
        try:
            t = self.targets[deployment_id]
        except KeyError:
            raise UnknownTargetError(
                f"deployment {deployment_id!r} has no Rollout target; add it to "
                "serve.deployments with namespace and rollout (or label the Rollout for "
                "serve.discover)") from None
        if decision.action is Action.CONTINUE:
            return AppliedAction(deployment_id, step, decision.action, ())
        return self._with_retries(f"{decision.action} of Rollout {t.namespace}/{t.name}",
                                  lambda: self._once(deployment_id, t, decision, step))

    def _once(self, deployment_id: str, t: RolloutTarget, decision: Decision,
              step: int) -> AppliedAction:
        g, v, plural = ARGO
        obj = _json(self.custom.get_namespaced_custom_object(
            g, v, t.namespace, plural, t.name, _preload_content=False,
            _request_timeout=self.request_timeout_s))
        if already_applied(obj, step, decision.action):
            log.info("actuator=argo deployment=%s step=%d action=%s skipped (already applied)",
                     deployment_id, step, decision.action)
            return AppliedAction(deployment_id, step, decision.action, (), skipped=True)
        ann = {"metadata": {"annotations": action_annotations(step, decision, self.actor)}}
        patches: list[tuple[str, dict[str, Any]]] = []
        status_patch: dict[str, Any] | None = None
        if decision.action is Action.PAUSE:
            body: dict[str, Any] = {**ann, "spec": {"paused": True}}
        elif decision.action is Action.SHRINK:
            weight = max(0, current_weight(obj) - self.weight_step)
            body = {**ann, "spec": {"strategy": {"canary": {
                "steps": [{"setWeight": weight}, {"pause": {}}]}}}}
            if weight == 0:  # nothing left to shrink: finish the rollback
                status_patch = {"status": {"abort": True}}
        elif decision.action is Action.ROLLBACK:
            body = ann
            status_patch = {"status": {"abort": True}}
        else:  # promote
            body = ann
            status_patch = {"status": {"promoteFull": True}}
        if status_patch is not None:  # the status first; the annotation marks completion
            self.custom.patch_namespaced_custom_object_status(
                g, v, t.namespace, plural, t.name, status_patch, _content_type=MERGE_PATCH,
                _preload_content=False, _request_timeout=self.request_timeout_s)
            patches.append((f"{t.name}/status", status_patch))
        self.custom.patch_namespaced_custom_object(
            g, v, t.namespace, plural, t.name, body, _content_type=MERGE_PATCH,
            _preload_content=False, _request_timeout=self.request_timeout_s)
        patches.append((t.name, body))
        log.info("actuator=argo deployment=%s step=%d action=%s patches=%d", deployment_id, step,
                 decision.action, len(patches))
        return AppliedAction(deployment_id, step, decision.action, tuple(patches))


@dataclass
class DryRunActuator:
    """Logs what it would do and records it in `history`; acts on nothing. Idempotent."""

    history: list[AppliedAction] = field(default_factory=list)
    _seen: set[tuple[str, int, str]] = field(default_factory=set)

    def wire(self, entry: dict[str, Any]) -> str | None:
        """Any deployment can be dry-run."""
        return None

    def apply(self, deployment_id: str, decision: Decision, step: int) -> None:
        key = (deployment_id, int(step), str(decision.action))
        if key in self._seen:
            return
        self._seen.add(key)
        self.history.append(AppliedAction(deployment_id, step, decision.action, ()))
        log.info("actuator=dry_run deployment=%s step=%d would=%s score=%s reason=%r",
                 deployment_id, step, decision.action,
                 "nan" if decision.score is None else f"{decision.score:.4f}", decision.reason)
