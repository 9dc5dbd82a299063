"""The live loop around `Controller.step`: scheduling, the durable log, retries and resume.

`ServeLoop` builds the one `Controller` (canaryml.control.controller) of a live process — the
same class and the same `step` replay runs — with the live injections: the durable
`DecisionLog` as decision sink, the wall clock, the configured actuator, and itself as the
controller's observer. Per deployment and tick, `Controller.step` does:

A tick is one `Controller.step_many` over every due deployment (the phases below for all of
them together): their windows are scored in one batched pass, their records stored in one
group commit of the `DecisionLog` (one fsync per tick), the source acked once (Kafka: one offset
commit for the tick, `ack_many`), then each action applied; the applied marks of the tick are
written in one transaction at its end (no fsync of their own: see `canaryml.serving.decision_log`).

1. fetch + score + policy. A source error, an unusable window or a scorer failure becomes a
   fail-safe PAUSE with the reason; the controller reports it here by kind (`source` →
   `canaryml_errors_total{kind="source"}` and `/healthz` component `telemetry`; `scorer` →
   `canaryml_errors_total{kind="scorer"}`). `policy.consecutive_error_limit` ends a run of such
   ticks with the configured outcome.
2. The record goes to the `DecisionLog` (durable intent, one key=value line).
3. `decided_many`: the source is acked (Kafka commits offsets only now, once per tick).
4. The actuator applies it (idempotent per (deployment, step, action)); `applied` /
   `apply_failed` mark the entry applied, or failed with the reason.
5. `stepped`: nothing more to save — the policy state after the decision was committed
   with the record in step 2 (one transaction), so a controller killed at any point after
   it resumes at the next step and never decides a logged step again.

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

A deployment whose policy state is terminal (`PolicyState.final`: rolled back, promoted, or
paused by the error limit) gets no more decisions; an unapplied terminal action is retried.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from canaryml.control.controller import Controller, ControllerObserver, LogRecord
from canaryml.control.policies import Policy
from canaryml.control.types import Actuator, MetricSource
from canaryml.errors import ActuatorError, ConfigError
from canaryml.serving.actuators import UnknownTargetError
from canaryml.serving.decision_log import DecisionLog, LogEntry
from canaryml.serving.server import Health, ServeMetrics

log = logging.getLogger(__name__)


@dataclass
class Unapplied:
    """An action the actuator has not applied yet, and when to try it again."""

    entry: LogEntry
    error: str
    attempts: int
    next_attempt_s: float  # on the loop's retry clock (monotonic)
    then: tuple[LogEntry, ...] = ()  # the deployment's later unapplied entries (after a restart)


class ServeLoop(ControllerObserver):
    """The live controller's Controller and what it needs around `step` (see module doc).

    `source`'s optional `ack(deployment_id)` is called once a decision is durable (the Kafka
    source commits offsets then); sources built by `canaryml.serving.registry` all have it.
    `ack_many(deployment_ids)` acks a whole tick at once (one Kafka commit); by default it is
    the `ack_many` of the object `ack` is bound to, when it has one, else `ack` per deployment."""

    def __init__(self, policy: Policy, source: MetricSource, actuator: Actuator,
                 decision_log: DecisionLog, *, lookback: int | None = None,
                 metrics: ServeMetrics | None = None, health: Health | None = None,
                 model_version: Callable[[], str | None] = lambda: None,
                 clock: Callable[[], float] = time.time, retry_backoff_s: float = 1.0,
                 retry_backoff_max_s: float = 300.0,
                 retry_clock: Callable[[], float] = time.monotonic,
                 ack: Callable[[str], Any] | None = None,
                 ack_many: Callable[[Sequence[str]], Any] | None = None) -> None:
        if not 0 <= retry_backoff_s <= retry_backoff_max_s:
            raise ConfigError(f"actuator retry backoff {retry_backoff_s}s / max "
                              f"{retry_backoff_max_s}s must satisfy 0 <= backoff <= max "
                              "(serve.actuator.retry_backoff_s, retry_backoff_max_s)")
        self.controller = Controller(policy, source, actuator, _CheckpointingSink(self),
                                     model_version=model_version, lookback=lookback,
                                     observer=self, clock=clock)
        self.actuator = actuator
        self.log = decision_log
        self.metrics = metrics or ServeMetrics()
        self.health = health or Health()
        self.ack = ack
        if ack_many is None and ack is not None:
            ack_many = getattr(getattr(ack, "__self__", None), "ack_many", None)
        self.ack_many = ack_many
        self._marks: list[int] = []  # landed actions not yet marked applied in the log
        self.unapplied: dict[str, Unapplied] = {}  # per deployment: the action still to land
        self.retry_backoff_s = float(retry_backoff_s)
        self.retry_backoff_max_s = float(retry_backoff_max_s)
        self.retry_clock = retry_clock
        self._warned_targets: set[str] = set()

    def resume(self) -> None:
        """Restore per-deployment state from the log and re-apply intents never applied (in
        the order they were logged; a deployment's later intents wait for its earlier ones)."""
        states = self.log.states()
        logged = self.log.last_steps()
        for dep, (last_step, state) in states.items():
            # ("decider": the key of logs written before the loop body was Controller.step)
            policy_state = state.get("policy") or state.get("decider") or {}
            # a log written before the state was saved with each record may hold a step past
            # the checkpoint: never decide a logged step again
            next_step = max(last_step, logged.get(dep, last_step)) + 1
            self.controller.restore(dep, policy_state, next_step=next_step)
        per_dep: dict[str, list[LogEntry]] = {}
        for entry in self.log.pending():
            per_dep.setdefault(entry.deployment_id, []).append(entry)
        for dep, entries in per_dep.items():
            log.info("resume: re-applying %d action(s) for deployment=%s (steps %s)",
                     len(entries), dep, ",".join(str(e.step) for e in entries))
            self._apply(entries[0], then=tuple(entries[1:]))
        self._flush_marks()
        if states:
            log.info("resumed %d deployment(s) from %s", len(states), self.log.path)

    def tick(self, deployment_ids: Iterable[str]) -> list[LogEntry]:
        """Retry unapplied actions that are due, then one `Controller.step` per deployment that
        is neither terminal nor waiting for an unapplied action. Returns the new entries."""
        self.retry_unapplied()
        due = [dep for dep in dict.fromkeys(deployment_ids)
               if not self.controller.is_final(dep) and dep not in self.unapplied]
        try:
            return [_entry(r) for r in self.controller.step_many(due)]
        finally:
            self._flush_marks()

    def retry_unapplied(self, *, force: bool = False) -> None:
        """Re-apply every unapplied action whose backoff has elapsed (all of them: `force`)."""
        now = self.retry_clock()
        for dep, pending in list(self.unapplied.items()):
            if force or now >= pending.next_attempt_s:
                log.info("retrying deployment=%s step=%d action=%s (attempt %d)", dep,
                         pending.entry.step, pending.entry.action, pending.attempts + 1)
                self._apply(pending.entry, then=pending.then)
        self._flush_marks()

    # ---- ControllerObserver ---------------------------------------------------------------
    def fetch_ok(self, deployment_id: str) -> None:
        self.health.ok("telemetry")

    def failed(self, kind: str, deployment_id: str, message: str) -> None:
        if kind == "source":
            self.metrics.error("source")
            self.health.degraded("telemetry", message)
        elif kind == "scorer":
            self.metrics.error("scorer")

    def decided(self, record: LogRecord) -> None:
        self.metrics.observe(record.deployment_id, record.decision)
        if self.ack is not None:
            self.ack(record.deployment_id)

    def decided_many(self, records: Sequence[LogRecord]) -> None:
        """The tick's records are durable: metrics, then one ack for all of them."""
        if self.ack_many is None:
            for record in records:
                self.decided(record)
            return
        for record in records:
            self.metrics.observe(record.deployment_id, record.decision)
        if records:
            self.ack_many([r.deployment_id for r in records])

    def tick_done(self, records: Sequence[LogRecord]) -> None:
        self._flush_marks()

    def applied(self, record: LogRecord) -> None:
        self._landed(_entry(record), ())

    def apply_failed(self, record: LogRecord, exc: Exception) -> None:
        self._not_landed(_entry(record), exc, ())

    def stepped(self, record: LogRecord, state: dict[str, Any]) -> None:
        """The state was committed with the record (`_CheckpointingSink`)."""

    # ---- applying and retrying ------------------------------------------------------------
    def _apply(self, entry: LogEntry, then: tuple[LogEntry, ...] = ()) -> None:
        """Apply `entry`, then the deployment's queued `then` entries in order; the first one
        that fails becomes the deployment's unapplied action (with the rest queued behind)."""
        try:
            self.actuator.apply(entry.deployment_id, entry.decision, entry.step)
        except Exception as exc:
            self._not_landed(entry, exc, then)
        else:
            self._landed(entry, then)

    def _not_landed(self, entry: LogEntry, exc: Exception, then: tuple[LogEntry, ...]) -> None:
        dep = entry.deployment_id
        if isinstance(exc, UnknownTargetError):
            self.metrics.skipped("unknown_target")
            self.log.mark_skipped(entry.id, f"skipped: {exc}", durable=False)
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
        if not isinstance(exc, ActuatorError):  # a bug: retried, never fatal
            log.error("actuator %s raised %s", type(self.actuator).__name__,
                      type(exc).__name__, exc_info=exc)
            exc = ActuatorError(f"{type(exc).__name__}: {exc}")
        self.metrics.error("actuator")
        self.log.mark_failed(entry.id, str(exc), durable=False)  # pending on disk either way
        previous = self.unapplied.get(dep)
        attempts = 1 if previous is None or previous.entry.id != entry.id \
            else previous.attempts + 1
        delay = min(self.retry_backoff_max_s, self.retry_backoff_s * 2 ** (attempts - 1))
        self.unapplied[dep] = Unapplied(entry, str(exc), attempts,
                                        self.retry_clock() + delay, then)
        log.error("deployment=%s step=%d action=%s not applied (attempt %d; retrying in "
                  "%.1fs): %s", dep, entry.step, entry.action, attempts, delay, exc)
        self._report_unapplied()

    def _flush_marks(self) -> None:
        """Write the landed actions' applied marks, one transaction (`mark_applied_many`)."""
        if self._marks:
            marks, self._marks = self._marks, []
            self.log.mark_applied_many(marks)

    def _landed(self, entry: LogEntry, then: tuple[LogEntry, ...]) -> None:
        dep = entry.deployment_id
        self._marks.append(entry.id)  # written by _flush_marks at the end of the tick
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


class _CheckpointingSink:
    """The controller's decision sink: the record and the deployment's policy state after
    it, in one DecisionLog transaction (`Controller.decide` has updated the state before
    `append` is called)."""

    def __init__(self, loop: ServeLoop) -> None:
        self.loop = loop

    def append(self, record: LogRecord) -> LogEntry:
        state = {"policy": self.loop.controller.state(record.deployment_id)}
        return self.loop.log.append(record, state)

    def append_many(self, records: Sequence[LogRecord]) -> list[LogEntry]:
        """A tick's records with their states: one group commit (one fsync)."""
        state = self.loop.controller.state
        return self.loop.log.append_many([(r, {"policy": state(r.deployment_id)})
                                          for r in records])


def _entry(record: LogRecord) -> LogEntry:
    if not isinstance(record, LogEntry):
        raise TypeError("ServeLoop's controller must log to a DecisionLog (its rows are "
                        f"LogEntry), got {type(record).__name__}")
    return record
