"""The live loop: every monitoring interval, one decision per deployment, logged then applied.

Per deployment and tick (the body is `ServeLoop.tick_one`):

1. `decider.decide(deployment_id, now_s)` → Decision (fetch + score + policy, no side effects:
   the Controller). A `SourceError` or `ScoringError` becomes a PAUSE with the reason — missing
   data or a broken model never promotes and never rolls back on its own.
2. The decision is recorded in the `DecisionLog` (durable intent, one key=value line).
3. The source is acked (Kafka commits offsets only now).
4. The actuator applies it (idempotent per (deployment, step, action)); the entry is marked
   applied, or failed with the reason (health degraded; the next start re-applies pending ones).
5. The decider's state is saved so a restarted controller resumes instead of starting over.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from typing import Any, Protocol, runtime_checkable

from canaryml.control.types import Action, Actuator, Decision
from canaryml.errors import ActuatorError, ScoringError, SourceError
from canaryml.serving.decision_log import DecisionLog, LogEntry
from canaryml.serving.server import Health, ServeMetrics

log = logging.getLogger(__name__)


@runtime_checkable
class Decider(Protocol):
    """What the loop needs from the Controller: a side-effect-free decision per deployment."""

    def decide(self, deployment_id: str, now_s: float) -> Decision: ...


@runtime_checkable
class StatefulDecider(Decider, Protocol):
    def state(self, deployment_id: str) -> dict[str, Any]: ...

    def restore(self, deployment_id: str, state: dict[str, Any]) -> None: ...


class ServeLoop:
    def __init__(self, decider: Decider, actuator: Actuator, decision_log: DecisionLog, *,
                 source: Any = None, metrics: ServeMetrics | None = None,
                 health: Health | None = None, policy: str = "model",
                 model_version: Callable[[], str | None] = lambda: None,
                 clock: Callable[[], float] = time.time) -> None:
        self.decider = decider
        self.actuator = actuator
        self.log = decision_log
        self.source = source
        self.metrics = metrics or ServeMetrics()
        self.health = health or Health()
        self.policy = policy
        self.model_version = model_version
        self.clock = clock
        self.steps: dict[str, int] = {}
        self.finished: set[str] = set()  # rolled back or promoted: no more decisions

    def resume(self) -> None:
        """Restore per-deployment state from the log and re-apply intents never applied."""
        for dep, (last_step, state) in self.log.states().items():
            self.steps[dep] = last_step + 1
            if state.get("_finished"):
                self.finished.add(dep)
            if isinstance(self.decider, StatefulDecider):
                self.decider.restore(dep, state.get("decider", {}))
        for entry in self.log.pending():
            log.info("resume: re-applying deployment=%s step=%d action=%s", entry.deployment_id,
                     entry.step, entry.action)
            self._apply(entry)
        if self.steps:
            log.info("resumed %d deployment(s) from %s", len(self.steps), self.log.path)

    def tick(self, deployment_ids: Iterable[str]) -> list[LogEntry]:
        now = self.clock()
        return [self.tick_one(d, now) for d in deployment_ids if d not in self.finished]

    def tick_one(self, deployment_id: str, now_s: float) -> LogEntry:
        step = self.steps.get(deployment_id, 0)
        try:
            decision = self.decider.decide(deployment_id, now_s)
            self.health.ok("source")
        except SourceError as exc:
            self.metrics.error("source")
            self.health.degraded("source", str(exc))
            decision = Decision(Action.PAUSE, f"source unavailable: {exc}", None)
        except ScoringError as exc:
            self.metrics.error("scorer")
            decision = Decision(Action.PAUSE, f"cannot score: {exc}", None)
        entry = self.log.record(deployment_id, step, decision, policy=self.policy,
                                decided_at=now_s, model_version=self.model_version())
        self.metrics.observe(deployment_id, decision)
        if self.source is not None and hasattr(self.source, "ack"):
            self.source.ack(deployment_id)
        self._apply(entry)
        if decision.action in (Action.ROLLBACK, Action.PROMOTE):
            self.finished.add(deployment_id)
        state: dict[str, Any] = {"_finished": deployment_id in self.finished}
        if isinstance(self.decider, StatefulDecider):
            state["decider"] = self.decider.state(deployment_id)
        self.log.save_state(deployment_id, step, state)
        self.steps[deployment_id] = step + 1
        return entry

    def _apply(self, entry: LogEntry) -> None:
        try:
            self.actuator.apply(entry.deployment_id, entry.decision, entry.step)
        except ActuatorError as exc:
            self.metrics.error("actuator")
            self.health.degraded("actuator", str(exc))
            self.log.mark_failed(entry.id, str(exc))
            log.error("deployment=%s step=%d action=%s not applied: %s", entry.deployment_id,
                      entry.step, entry.action, exc)
            return
        self.health.ok("actuator")
        self.log.mark_applied(entry.id)

    def run(self, deployment_ids: Callable[[], Iterable[str]], interval_s: float,
            stop: Callable[[], bool] = lambda: False) -> None:
        """Tick every `interval_s` until `stop()`; `deployment_ids()` is re-read each tick."""
        self.resume()
        while not stop():
            started = time.monotonic()
            self.tick(deployment_ids())
            time.sleep(max(0.0, interval_s - (time.monotonic() - started)))
