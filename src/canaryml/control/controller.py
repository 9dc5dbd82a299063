"""Controller.step — the one loop body that replay and serving share (DESIGN §1, §3).

    step(deployment_id, now_s):  fetch window (MetricSource) → score + decide (Policy)
                                 → append decision-log record → apply (Actuator)

`decide()` is the side-effect-free half (fetch + policy + state update) that
`canaryml.serving.loop.ServeLoop` drives; `state()`/`restore()` persist the per-deployment
policy state so a restarted controller resumes. Fail-safe: a source error, a window whose
canary is all NaN, or a scorer exception becomes a PAUSE with the reason (never a rollback or a
promotion).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from canaryml.control.policies import Policy
from canaryml.control.policy import PolicyState
from canaryml.control.types import Actuator, Decision, MetricSource, Window
from canaryml.errors import ActuatorError

log = logging.getLogger(__name__)
decision_log = logging.getLogger("canaryml.decision")


@dataclass(frozen=True)
class LogRecord:
    """One decision-log entry (what replay writes and serving persists)."""

    deployment_id: str
    policy: str
    step: int
    decided_at: float
    action: str
    score: float | None
    reason: str
    reasons: tuple[str, ...]
    evidence: dict[str, Any] = field(default_factory=dict)
    model_version: str | None = None

    @property
    def decision(self) -> Decision:
        from canaryml.control.types import Action

        return Decision(Action(self.action), self.reason, self.score, dict(self.evidence))


class DecisionSink(Protocol):
    def append(self, record: LogRecord) -> None: ...


class MemoryLog(list[LogRecord]):
    """In-memory decision log (replay, tests)."""


def window_problem(window: Window) -> str | None:
    """Why a fetched window cannot be used, or None."""
    can = np.asarray(window.canary)
    if can.ndim != 2 or can.shape[0] == 0:
        return f"empty window for deployment {window.deployment_id!r}"
    if not np.isfinite(can).any():
        return (f"no canary data for deployment {window.deployment_id!r} in the last "
                f"{can.shape[0]} steps (all NaN)")
    return None


class Controller:
    """Drives one Policy for many deployments. Not thread-safe per deployment."""

    def __init__(self, policy: Policy, source: MetricSource, actuator: Actuator | None = None,
                 log_sink: DecisionSink | None = None, *,
                 model_version: str | Callable[[], str | None] | None = None,
                 lookback: int | None = None) -> None:
        self.policy = policy
        self.source = source
        self.actuator = actuator
        self.log: DecisionSink = MemoryLog() if log_sink is None else log_sink
        self._model_version = model_version
        self.lookback = int(lookback or policy.lookback)
        self.states: dict[str, PolicyState] = {}
        self.steps: dict[str, int] = {}

    @property
    def model_version(self) -> str | None:
        mv = self._model_version
        return mv() if callable(mv) else mv

    # ---- the side-effect-free half (ServeLoop's Decider protocol) ---------------------------
    def decide(self, deployment_id: str, now_s: float) -> Decision:
        """Fetch, score and decide; updates only this controller's in-memory policy state."""
        state = self.states.get(deployment_id) or self.policy.initial_state()
        window: Window | None = None
        failure: str | None = None
        if state.final is None:
            try:
                window = self.source.fetch(deployment_id, now_s, self.lookback)
                failure = window_problem(window)
            except Exception as exc:  # fail-safe boundary: any source failure pauses
                failure = f"source failed: {type(exc).__name__}: {exc}"
        decision, new_state = self.policy.step(None if failure else window, now_s, state,
                                               failure=failure)
        self.states[deployment_id] = new_state
        return decision

    def state(self, deployment_id: str) -> dict[str, Any]:
        st = self.states.get(deployment_id)
        return {} if st is None else st.to_dict()

    def restore(self, deployment_id: str, state: dict[str, Any]) -> None:
        if state:
            self.states[deployment_id] = PolicyState.from_dict(state)

    # ---- the whole loop body -----------------------------------------------------------------
    def step(self, deployment_id: str, now_s: float) -> LogRecord:
        """fetch → score → decide → log → apply. Returns the logged record."""
        step = self.steps.get(deployment_id, 0)
        decision = self.decide(deployment_id, now_s)
        raw = decision.evidence.get("reasons")
        reasons = tuple(str(r) for r in raw) if isinstance(raw, list | tuple) else ()
        record = LogRecord(deployment_id=deployment_id, policy=self.policy.name, step=step,
                           decided_at=float(now_s), action=str(decision.action),
                           score=decision.score, reason=decision.reason, reasons=reasons,
                           evidence=decision.evidence, model_version=self.model_version)
        self.log.append(record)
        self.steps[deployment_id] = step + 1
        if log.isEnabledFor(logging.DEBUG) or decision.action != "continue":
            decision_log.info("event=decision deployment=%s policy=%s step=%d action=%s "
                              "score=%s reason=%r", deployment_id, self.policy.name, step,
                              decision.action, "nan" if decision.score is None
                              else f"{decision.score:.4f}", decision.reason)
        if self.actuator is not None:
            try:
                self.actuator.apply(deployment_id, decision, step)
            except ActuatorError:
                log.error("deployment=%s step=%d action=%s not applied", deployment_id, step,
                          decision.action)
                raise
        return record
