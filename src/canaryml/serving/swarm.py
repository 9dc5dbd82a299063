"""Docker Swarm actuator: applies controller decisions to a canary/stable pair of Swarm services.

A Swarm canary is two replicated services behind one published port or network alias: the
stable service runs the current version, the canary service runs the new one with a few
replicas. The actuator talks to the Docker Engine API through the docker SDK:

- SHRINK    scale the canary down by one batch (`Mode.Replicated.Replicas -= batch_size`); with
            `keep_capacity` the stable service gains the same number of replicas first.
- ROLLBACK  `previous_spec`: `POST /services/{id}/update?version=N&rollback=previous`, the
            server-side equivalent of `docker service rollback`; `scale_to_zero`: replicas -> 0.
            `previous_spec` falls back to `scale_to_zero` when the previous spec would not take
            the new version out (no previous spec, or it runs the same image, e.g. because the
            last update was a scale) — a rollback must actually remove the canary version.
- PROMOTE   the stable service takes the canary's image (and its replicas with `keep_capacity`),
            then the canary scales to 0.
- CONTINUE / PAUSE change nothing (Swarm has nothing to pause between batches).

Idempotency: every write stamps the service with `canaryml.io/last-step` (plus who, why, score,
when). Before acting, the actuator reads that label and skips a step it has already applied
(or an older one). The stable service carries its own stamp, so a retry after a crash between
the two writes does not scale the stable service twice. A canary already rolling back or rolled
back (`UpdateStatus.State` `rollback_*`, e.g. from Swarm's own `FailureAction: rollback` or a
crash after our rollback request) is never rolled back again: a second `rollback=previous`
would swap the bad version back in.

Writes send the whole `ServiceSpec` with the `version` read just before (optimistic
concurrency, like `docker service update`); an "update out of sequence" answer re-reads and
retries. The tests drive this against an emulated Engine API on 127.0.0.1 — no Docker engine
runs on the development machine (see serving/README.md).
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from canaryml.control.types import Action, Decision
from canaryml.errors import ActuatorError, ConfigError

logger = logging.getLogger(__name__)

LABEL_LAST_STEP = "canaryml.io/last-step"
LABEL_LAST_ACTION = "canaryml.io/last-action"
LABEL_DEPLOYMENT = "canaryml.io/deployment-id"
LABEL_ACTOR = "canaryml.io/actor"
LABEL_REASON = "canaryml.io/reason"
LABEL_SCORE = "canaryml.io/score"
LABEL_APPLIED_AT = "canaryml.io/applied-at"
LABEL_ROLLBACK_MODE = "canaryml.io/rollback-mode"

REASON_MAX_CHARS = 256  # labels are for humans reading `docker service inspect`; the log has all


class SwarmRollbackMode(StrEnum):
    PREVIOUS_SPEC = "previous_spec"  # `docker service rollback` semantics
    SCALE_TO_ZERO = "scale_to_zero"


@dataclass(frozen=True)
class SwarmStrategy:
    """How decisions map onto Swarm service updates.

    `batch_size` is the seed's `canaryBatchSize` (replicas removed per SHRINK); `keep_capacity`
    moves removed canary replicas to the stable service so total capacity stays constant;
    `actor` is written to the `canaryml.io/actor` label; `conflict_retries` bounds re-reads after
    an "update out of sequence" answer.
    """

    rollback: SwarmRollbackMode = SwarmRollbackMode.PREVIOUS_SPEC
    batch_size: int = 1
    keep_capacity: bool = True
    actor: str = "canaryml-controller"
    conflict_retries: int = 2

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "rollback", SwarmRollbackMode(self.rollback))
        except ValueError:
            modes = ", ".join(m.value for m in SwarmRollbackMode)
            raise ConfigError(
                f"unknown Swarm rollback mode {self.rollback!r}; use one of: {modes}"
            ) from None
        if self.batch_size < 1:
            raise ConfigError(
                f"Swarm canary batch_size must be >= 1 replica, got {self.batch_size}"
            )
        if self.conflict_retries < 0:
            raise ConfigError(f"conflict_retries must be >= 0, got {self.conflict_retries}")
        if not self.actor:
            raise ConfigError("Swarm actor label must not be empty; set e.g. actor=canaryml")


# A mutation takes the freshly inspected service (read-only) and returns the new ServiceSpec.
_Mutation = Callable[[dict[str, Any]], dict[str, Any]]


class SwarmActuator:
    """Actuator (see `canaryml.control.types.Actuator`) for a canary/stable Swarm service pair.

    `client` is a `docker.DockerClient` (only its low-level `client.api` is used); services are
    named by name or ID. `clock` returns epoch seconds for the `applied-at` label.
    """

    def __init__(
        self,
        client: Any,
        canary_service: str,
        stable_service: str,
        strategy: SwarmStrategy | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not canary_service or not stable_service:
            raise ConfigError(
                "SwarmActuator needs both canary_service and stable_service names "
                f"(got canary={canary_service!r}, stable={stable_service!r})"
            )
        if canary_service == stable_service:
            raise ConfigError(
                f"canary and stable service are both {canary_service!r}; a Swarm canary needs "
                "two services (e.g. web and web-canary)"
            )
        self.client = client
        self.canary_service = canary_service
        self.stable_service = stable_service
        self.strategy = strategy if strategy is not None else SwarmStrategy()
        self.clock = clock

    # -- Actuator protocol -------------------------------------------------------------------
    def apply(self, deployment_id: str, decision: Decision, step: int) -> None:
        action = Action(decision.action)
        if action in (Action.CONTINUE, Action.PAUSE):
            logger.debug("swarm deployment=%s step=%d action=%s: nothing to change",
                         deployment_id, step, action)
            return
        canary = self._inspect(self.canary_service)
        last = _last_step(canary)
        if last is not None and last >= step:
            logger.info(
                "swarm deployment=%s service=%s step=%d action=%s skipped: already applied "
                "step %d", deployment_id, self.canary_service, step, action, last)
            return
        labels = self._decision_labels(deployment_id, decision, step)
        if action is Action.SHRINK:
            self._shrink(canary, labels, step)
        elif action is Action.ROLLBACK:
            self._rollback(canary, labels, step)
        elif action is Action.PROMOTE:
            self._promote(canary, labels, step)
        logger.info(
            "swarm deployment=%s canary=%s stable=%s step=%d action=%s score=%s reason=%r",
            deployment_id, self.canary_service, self.stable_service, step, action,
            labels[LABEL_SCORE] or "na", decision.reason)

    # -- actions -----------------------------------------------------------------------------
    def _shrink(self, canary: dict[str, Any], labels: dict[str, str], step: int) -> None:
        current = _replicas(canary, self.canary_service)
        remove = min(self.strategy.batch_size, current)
        if remove == 0:
            logger.info("swarm service=%s already at 0 replicas; recording step %d only",
                        self.canary_service, step)
        if self.strategy.keep_capacity and remove > 0:
            self._write(self.stable_service, _scaled_by(+remove, self.stable_service, labels),
                        step)
        self._write(self.canary_service, _scaled_by(-remove, self.canary_service, labels), step,
                    current=canary)

    def _rollback(self, canary: dict[str, Any], labels: dict[str, str], step: int) -> None:
        if self.strategy.rollback is SwarmRollbackMode.SCALE_TO_ZERO:
            self._scale_to_zero(canary, labels, step)
            return
        for attempt in range(self.strategy.conflict_retries + 1):
            state = str((canary.get("UpdateStatus") or {}).get("State", ""))
            if state.startswith("rollback_"):
                # Swarm (FailureAction) or an earlier attempt of ours already rolled it back:
                # another rollback=previous would swap the canary version back in.
                logger.warning(
                    "swarm service=%s is already in %s; not rolling back again, recording step "
                    "%d", self.canary_service, state, step)
                break
            if not _previous_spec_reverts_image(canary):
                logger.warning(
                    "swarm service=%s: previous spec would not remove image %s (no previous "
                    "spec, or the last update did not change the image); scaling the canary to "
                    "0 instead", self.canary_service, _image(canary.get("Spec", {})))
                self._scale_to_zero(canary, labels, step)
                return
            try:
                self._post_update(canary, canary["Spec"], rollback=True)
                break
            except _OutOfSequence:
                if attempt == self.strategy.conflict_retries:
                    raise self._conflict_error(self.canary_service) from None
                canary = self._inspect(self.canary_service)
        # Stamp the rolled-back spec (a service-level label change does not restart tasks).
        stamp = {**labels, LABEL_ROLLBACK_MODE: SwarmRollbackMode.PREVIOUS_SPEC.value}
        self._write(self.canary_service, _relabelled(stamp), step)

    def _scale_to_zero(self, canary: dict[str, Any], labels: dict[str, str], step: int) -> None:
        current = _replicas(canary, self.canary_service)
        stamp = {**labels, LABEL_ROLLBACK_MODE: SwarmRollbackMode.SCALE_TO_ZERO.value}
        if self.strategy.keep_capacity and current > 0:
            self._write(self.stable_service, _scaled_by(+current, self.stable_service, stamp),
                        step)
        self._write(self.canary_service, _scaled_to(0, self.canary_service, stamp), step,
                    current=canary)

    def _promote(self, canary: dict[str, Any], labels: dict[str, str], step: int) -> None:
        image = _image(canary.get("Spec", {}))
        if not image:
            raise ActuatorError(
                f"cannot promote: Swarm service {self.canary_service!r} has no "
                "Spec.TaskTemplate.ContainerSpec.Image; inspect it with `docker service inspect`"
            )
        moved = _replicas(canary, self.canary_service) if self.strategy.keep_capacity else 0

        def promote_stable(service: dict[str, Any]) -> dict[str, Any]:
            spec = _scaled_by(+moved, self.stable_service, labels)(service)
            spec["TaskTemplate"].setdefault("ContainerSpec", {})["Image"] = image
            return spec

        self._write(self.stable_service, promote_stable, step)
        self._write(self.canary_service, _scaled_to(0, self.canary_service, labels), step,
                    current=canary)

    # -- Engine API --------------------------------------------------------------------------
    def _write(self, name: str, mutate: _Mutation, step: int,
               current: dict[str, Any] | None = None) -> None:
        """Read-modify-write one service with optimistic concurrency; skip if already stamped."""
        service = current if current is not None else self._inspect(name)
        for attempt in range(self.strategy.conflict_retries + 1):
            if current is None or attempt > 0:
                last = _last_step(service)
                if last is not None and last >= step:
                    logger.info("swarm service=%s already stamped with step %d; skipping write",
                                name, last)
                    return
            try:
                self._post_update(service, mutate(service))
                return
            except _OutOfSequence:
                if attempt == self.strategy.conflict_retries:
                    raise self._conflict_error(name) from None
                logger.info("swarm service=%s changed under us; re-reading (attempt %d)",
                            name, attempt + 1)
                service = self._inspect(name)

    def _inspect(self, name: str) -> dict[str, Any]:
        import docker.errors
        import requests

        try:
            return dict(self.client.api.inspect_service(name))
        except docker.errors.NotFound:
            raise ActuatorError(
                f"Swarm service {name!r} not found on {self._engine()}; check the canary/stable "
                "service names (`docker service ls`) and that this engine is a Swarm manager"
            ) from None
        except docker.errors.APIError as exc:
            raise ActuatorError(
                f"Docker Engine refused to inspect Swarm service {name!r}: {exc.explanation or exc}"
            ) from exc
        except requests.exceptions.RequestException as exc:
            raise ActuatorError(
                f"cannot reach the Docker Engine API at {self._engine()} to inspect {name!r}: "
                f"{exc}; check the engine URL and that the controller may use it"
            ) from exc

    def _post_update(self, service: dict[str, Any], spec: dict[str, Any],
                     rollback: bool = False) -> None:
        """`POST /services/{id}/update?version=N[&rollback=previous]` with the whole spec.

        The SDK's `update_service` has no `rollback` argument, so this goes through the SDK's
        low-level HTTP helpers (the same ones its own methods use).
        """
        import docker.auth
        import docker.errors
        import requests

        api = self.client.api
        service_id = service.get("ID") or spec.get("Name")
        params: dict[str, Any] = {"version": int(service["Version"]["Index"])}
        if rollback:
            params["rollback"] = "previous"
        headers: dict[str, str] = {}
        image = _image(spec)
        if image and not rollback:  # swarm nodes may need registry credentials to pull
            registry, _ = docker.auth.resolve_repository_name(image)
            auth_header = docker.auth.get_config_header(api, registry)
            if auth_header:
                headers["X-Registry-Auth"] = auth_header
        try:
            response = api._post_json(api._url("/services/{0}/update", service_id), data=spec,
                                      params=params, headers=headers)
            result = api._result(response, json=True)
        except docker.errors.APIError as exc:
            text = str(exc.explanation or exc)
            if "out of sequence" in text:
                raise _OutOfSequence(text) from exc
            raise ActuatorError(
                f"Docker Engine refused to update Swarm service {spec.get('Name', service_id)!r}"
                f"{' (rollback=previous)' if rollback else ''}: {text}"
            ) from exc
        except requests.exceptions.RequestException as exc:
            raise ActuatorError(
                f"cannot reach the Docker Engine API at {self._engine()} to update "
                f"{spec.get('Name', service_id)!r}: {exc}"
            ) from exc
        for warning in (result or {}).get("Warnings") or []:
            logger.warning("swarm service=%s: engine warning: %s", spec.get("Name"), warning)

    # -- helpers -----------------------------------------------------------------------------
    def _decision_labels(self, deployment_id: str, decision: Decision, step: int) -> dict[str, str]:
        applied_at = datetime.fromtimestamp(self.clock(), tz=UTC)
        return {
            LABEL_LAST_STEP: str(int(step)),
            LABEL_LAST_ACTION: Action(decision.action).value,
            LABEL_DEPLOYMENT: deployment_id,
            LABEL_ACTOR: self.strategy.actor,
            LABEL_REASON: decision.reason[:REASON_MAX_CHARS],
            LABEL_SCORE: "" if decision.score is None else f"{decision.score:.4f}",
            LABEL_APPLIED_AT: applied_at.isoformat(timespec="seconds").replace("+00:00", "Z"),
        }

    def _engine(self) -> str:
        return str(getattr(self.client.api, "base_url", "the Docker Engine"))

    def _conflict_error(self, name: str) -> ActuatorError:
        return ActuatorError(
            f"Swarm service {name!r} kept changing while canaryml updated it "
            f"({self.strategy.conflict_retries + 1} attempts, 'update out of sequence'); another "
            "client is updating it — stop the concurrent deploy or raise conflict_retries"
        )


def build_swarm_actuator(
    base_url: str,
    canary_service: str,
    stable_service: str,
    strategy: SwarmStrategy | None = None,
    timeout_s: float = 10.0,
) -> SwarmActuator:
    """Connect to a Docker Engine (`unix:///var/run/docker.sock`, `tcp://host:2376`, `ssh://…`)
    that is a Swarm manager and return the actuator. The API version is negotiated."""
    import docker
    import docker.errors

    if not base_url.startswith(("unix://", "tcp://", "ssh://", "npipe://", "http://",
                                "https://")):
        raise ConfigError(
            f"Docker Engine URL {base_url!r} has no scheme; use unix:///var/run/docker.sock, "
            "tcp://HOST:2376 (with TLS) or ssh://user@host"
        )
    try:
        client = docker.DockerClient(base_url=base_url, version="auto", timeout=int(timeout_s))
    except docker.errors.DockerException as exc:
        raise ActuatorError(
            f"cannot connect to the Docker Engine at {base_url!r}: {exc}; check the URL and that "
            "the engine is running"
        ) from exc
    return SwarmActuator(client, canary_service, stable_service, strategy)


class _OutOfSequence(Exception):
    """The service version moved between our read and our write."""


def _labels_of(service: dict[str, Any]) -> dict[str, str]:
    return dict((service.get("Spec") or {}).get("Labels") or {})


def _last_step(service: dict[str, Any]) -> int | None:
    raw = _labels_of(service).get(LABEL_LAST_STEP)
    if raw is None:
        return None
    try:
        return int(raw)
    except ValueError:
        logger.warning("ignoring malformed %s=%r on service %s", LABEL_LAST_STEP, raw,
                       (service.get("Spec") or {}).get("Name"))
        return None


def _replicas(service: dict[str, Any], name: str) -> int:
    mode = (service.get("Spec") or {}).get("Mode") or {}
    if "Replicated" not in mode:
        kind = next(iter(mode), "unknown")
        raise ActuatorError(
            f"Swarm service {name!r} runs in {kind!r} mode; only replicated services can be "
            "scaled — deploy the canary with `--mode replicated`"
        )
    return int((mode["Replicated"] or {}).get("Replicas", 1))  # the Engine's default is 1


def _image(spec: dict[str, Any]) -> str:
    return str(((spec.get("TaskTemplate") or {}).get("ContainerSpec") or {}).get("Image", ""))


def _previous_spec_reverts_image(service: dict[str, Any]) -> bool:
    previous = service.get("PreviousSpec")
    if not previous:
        return False
    return _image(previous) != _image(service.get("Spec") or {})


def _new_spec(service: dict[str, Any], labels: dict[str, str]) -> dict[str, Any]:
    spec = copy.deepcopy(service.get("Spec") or {})
    spec["Labels"] = {**(spec.get("Labels") or {}), **labels}
    spec.setdefault("TaskTemplate", {})
    return spec


def _relabelled(labels: dict[str, str]) -> _Mutation:
    return lambda service: _new_spec(service, labels)


def _scaled_to(replicas: int, name: str, labels: dict[str, str]) -> _Mutation:
    def mutate(service: dict[str, Any]) -> dict[str, Any]:
        _replicas(service, name)  # refuses global mode
        spec = _new_spec(service, labels)
        spec["Mode"]["Replicated"] = {**(spec["Mode"]["Replicated"] or {}),
                                      "Replicas": max(0, replicas)}
        return spec

    return mutate


def _scaled_by(delta: int, name: str, labels: dict[str, str]) -> _Mutation:
    def mutate(service: dict[str, Any]) -> dict[str, Any]:
        return _scaled_to(_replicas(service, name) + delta, name, labels)(service)

    return mutate
