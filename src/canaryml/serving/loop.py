"""The live loop: every monitoring interval, one decision per deployment, logged then applied.

Per deployment and tick (the body is `ServeLoop.tick_one`):

1. `decider.decide(deployment_id, now_s)` → Decision (fetch + score + policy, no side effects:
   the Controller). A `SourceError` or `ScoringError` becomes a PAUSE with the reason — missing
   data or a broken model never promotes and never rolls back on its own.
2. The decision is recorded in the `DecisionLog` (durable intent, one key=value line).
3. The source is acked (Kafka commits offsets only now).
4. The actuator applies it (idempotent per (deployment, step, action)); the entry is marked
   applied, or failed with the reason.
5. The decider's state is saved so a restarted controller resumes instead of starting over.

An action the actuator could not apply stays *unapplied*: the loop retries it at the start of
later ticks, per deployment with exponential backoff (`retry_backoff_s` doubling up to
`retry_backoff_max_s`, on the monotonic clock), until it lands — however long that takes. While
a deployment has an unapplied action the loop makes no new decision for it (actions land in the
order they were decided; a rollback is never overtaken by a later "continue"), and `/healthz`
reports the `actuator` component degraded, naming every unapplied action; another deployment's
successful action does not clear it. A restart re-applies unapplied entries from the log
(`resume`) and keeps retrying the ones that still fail. Any other exception an actuator raises
is treated like an `ActuatorError` (logged with its traceback, retried): never fatal.

An action for a deployment the actuator has no target for (`UnknownTargetError`, e.g. a Kafka
event for a deployment missing from `serve.deployments`) is logged (a warning once per
deployment), counted in `canaryml_skipped_actions_total{reason="unknown_target"}`, marked
skipped in the decision log and never retried or re-applied: it must not stop the controller.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from canaryml.control.types import Action, Actuator, Decision
from canaryml.errors import ActuatorError, ConfigError, ScoringError, SourceError
from canaryml.serving.actuators import UnknownTargetError
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


@dataclass
class Unapplied:
    """An action the actuator has not applied yet, and when to try it again."""

    entry: LogEntry
    error: str
    attempts: int
    next_attempt_s: float  # on the loop's retry clock (monotonic)
    then: tuple[LogEntry, ...] = ()  # the deployment's later unapplied entries (after a restart)


class ServeLoop:
    def __init__(self, decider: Decider, actuator: Actuator, decision_log: DecisionLog, *,
                 source: Any = None, metrics: ServeMetrics | None = None,
                 health: Health | None = None, policy: str = "model",
                 model_version: Callable[[], str | None] = lambda: None,
                 clock: Callable[[], float] = time.time, retry_backoff_s: float = 1.0,
                 retry_backoff_max_s: float = 300.0,
                 retry_clock: Callable[[], float] = time.monotonic) -> None:
        if not 0 <= retry_backoff_s <= retry_backoff_max_s:
            raise ConfigError(f"actuator retry backoff {retry_backoff_s}s / max "
                              f"{retry_backoff_max_s}s must satisfy 0 <= backoff <= max "
                              "(serve.actuator.retry_backoff_s, retry_backoff_max_s)")
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
        self.unapplied: dict[str, Unapplied] = {}  # per deployment: the action still to land
        self.retry_backoff_s = float(retry_backoff_s)
        self.retry_backoff_max_s = float(retry_backoff_max_s)
        self.retry_clock = retry_clock
        self._warned_targets: set[str] = set()

    def resume(self) -> None:
        """Restore per-deployment state from the log and re-apply intents never applied (in
        the order they were logged; a deployment's later intents wait for its earlier ones)."""
        for dep, (last_step, state) in self.log.states().items():
            self.steps[dep] = last_step + 1
            if state.get("_finished"):
                self.finished.add(dep)
            if isinstance(self.decider, StatefulDecider):
                self.decider.restore(dep, state.get("decider", {}))
        per_dep: dict[str, list[LogEntry]] = {}
        for entry in self.log.pending():
            per_dep.setdefault(entry.deployment_id, []).append(entry)
        for dep, entries in per_dep.items():
            log.info("resume: re-applying %d action(s) for deployment=%s (steps %s)",
                     len(entries), dep, ",".join(str(e.step) for e in entries))
            self._apply(entries[0], then=tuple(entries[1:]))
        if self.steps:
            log.info("resumed %d deployment(s) from %s", len(self.steps), self.log.path)

    def tick(self, deployment_ids: Iterable[str]) -> list[LogEntry]:
        """Retry unapplied actions that are due, then one decision per deployment that is
        neither finished nor waiting for an unapplied action. Returns the new entries."""
        self.retry_unapplied()
        now = self.clock()
        return [self.tick_one(d, now) for d in deployment_ids
                if d not in self.finished and d not in self.unapplied]

    def retry_unapplied(self, *, force: bool = False) -> None:
        """Re-apply every unapplied action whose backoff has elapsed (all of them: `force`)."""
        now = self.retry_clock()
        for dep, pending in list(self.unapplied.items()):
            if force or now >= pending.next_attempt_s:
                log.info("retrying deployment=%s step=%d action=%s (attempt %d)", dep,
                         pending.entry.step, pending.entry.action, pending.attempts + 1)
                self._apply(pending.entry, then=pending.then)

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
            self.finished.add(deployment_id)  # no new decisions; an unapplied one is retried
        state: dict[str, Any] = {"_finished": deployment_id in self.finished}
        if isinstance(self.decider, StatefulDecider):
            state["decider"] = self.decider.state(deployment_id)
        self.log.save_state(deployment_id, step, state)
        self.steps[deployment_id] = step + 1
        return entry

    def _apply(self, entry: LogEntry, then: tuple[LogEntry, ...] = ()) -> None:
        """Apply `entry`, then the deployment's queued `then` entries in order; the first one
        that fails becomes the deployment's unapplied action (with the rest queued behind)."""
        dep = entry.deployment_id
        try:
            self.actuator.apply(dep, entry.decision, entry.step)
        except UnknownTargetError as exc:
            self.metrics.skipped("unknown_target")
            self.log.mark_skipped(entry.id, f"skipped: {exc}")
            level = logging.DEBUG if dep in self._warned_targets else logging.WARNING
            self._warned_targets.add(dep)  # a stray Kafka key must not flood the log
            log.log(level, "deployment=%s step=%d action=%s skipped: %s", dep, entry.step,
                    entry.action, exc)
            if self.unapplied.get(dep) is not None and self.unapplied[dep].entry.id == entry.id:
                del self.unapplied[dep]
            if then:
                self._apply(then[0], then[1:])
                return
            self._report_unapplied()
            return
        except Exception as exc:  # ActuatorError, or a bug: retried, never fatal
            if not isinstance(exc, ActuatorError):
                log.exception("actuator %s raised %s", type(self.actuator).__name__,
                              type(exc).__name__)
                exc = ActuatorError(f"{type(exc).__name__}: {exc}")
            self.metrics.error("actuator")
            self.log.mark_failed(entry.id, str(exc))
            previous = self.unapplied.get(dep)
            attempts = 1 if previous is None or previous.entry.id != entry.id \
                else previous.attempts + 1
            delay = min(self.retry_backoff_max_s, self.retry_backoff_s * 2 ** (attempts - 1))
            self.unapplied[dep] = Unapplied(entry, str(exc), attempts,
                                            self.retry_clock() + delay, then)
            log.error("deployment=%s step=%d action=%s not applied (attempt %d; retrying in "
                      "%.1fs): %s", dep, entry.step, entry.action, attempts, delay, exc)
            self._report_unapplied()
            return
        self.log.mark_applied(entry.id)
        done = self.unapplied.get(dep)
        if done is not None and done.entry.id == entry.id:
            del self.unapplied[dep]
            log.info("deployment=%s step=%d action=%s applied after %d failed attempt(s)", dep,
                     entry.step, entry.action, done.attempts)
        if then:
            self._apply(then[0], then[1:])
            return
        self._report_unapplied()

    def _report_unapplied(self) -> None:
        """`actuator` health: degraded while any deployment has an action that has not landed
        (another deployment's success does not clear it)."""
        if not self.unapplied:
            self.health.ok("actuator")
            return
        self.health.degraded("actuator", "; ".join(
            f"deployment={dep} step={u.entry.step} action={u.entry.action} not applied after "
            f"{u.attempts} attempt(s), retrying: {u.error}"
            for dep, u in sorted(self.unapplied.items())))

    def run(self, deployment_ids: Callable[[], Iterable[str]], interval_s: float,
            stop: Callable[[], bool] = lambda: False) -> None:
        """Tick every `interval_s` until `stop()`; `deployment_ids()` is re-read each tick."""
        self.resume()
        while not stop():
            started = time.monotonic()
            self.tick(deployment_ids())
            time.sleep(max(0.0, interval_s - (time.monotonic() - started)))
