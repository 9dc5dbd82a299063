"""Controller.step — the one loop body of replay, serve, demo and bench (DESIGN §1, §3).

    step(deployment_id, now_s):  fetch window (MetricSource) → score + decide (Policy)
        → append the record to the decision sink → observer.decided (metrics; Kafka ack)
        → apply (Actuator) → observer.applied / apply_failed → observer.stepped (checkpoint)

`step_many(deployment_ids, now_s)` is the same body for a whole tick, phase by phase: every
due deployment's window is fetched, the policy's scorer scores them all in one batched pass
(`prepare`, when it has one; each result equals scoring the window alone), the policy decides
each, the sink stores all records in one group commit (`append_many`: one fsync per tick), the
observer hears `decided_many` (serve: one Kafka offset commit), and only then is any action
applied. `step(deployment_id)` is `step_many([deployment_id])`.

What differs between replay and the live controller is injected, never branched on:

* the **decision sink** — `MemoryLog` (replay, tests) or the durable SQLite
  `canaryml.serving.decision_log.DecisionLog`, whose `append` returns the stored record (with
  its row id);
* the **clock** — `now_s` passed by the caller (replay's simulated clock) or `clock()` when
  `step` is called without one (serve: `time.time`);
* the **actuator** — replay's recorder, dry-run, Kubernetes/Argo/Swarm;
* the **observer** (`ControllerObserver`) — metrics, health, the retry queue of unapplied
  actions and the state checkpoint in serve; the base class (no-ops) in replay.

Windows are made alike: a live source's NaN rows before a deployment's first sample are
dropped (`_since_first_sample`), so live and replay score the same rows at a canary's first
ticks — a scorer that needs more history than the canary has pauses (fail-safe) in both.

Terminal state comes from the policy: `is_final(deployment_id)` is true once the
`PolicyState` holds ROLLBACK or PROMOTE (or the error-limit PAUSE, `policy.py`).

Fail-safe: a source error, a window whose canary is all NaN, or a scorer exception becomes a
PAUSE with the reason (never a rollback or a promotion unless `policy.consecutive_error_limit`
says so). The controller reports each such failure to the observer by kind (`source`, `data`,
`scorer`) — it does not swallow it. An actuator exception never escapes `step`: the record is
logged either way and the observer decides what to do about the unapplied action (serve
retries it with backoff; see `canaryml.serving.loop`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import numpy as np

from canaryml.control.policies import Policy
from canaryml.control.policy import PolicyState
from canaryml.control.types import Action, Actuator, Decision, MetricSource, Window

log = logging.getLogger(__name__)
decision_log = logging.getLogger("canaryml.decision")  # one key=value line per decision


@dataclass(frozen=True)
class LogRecord:
    """One decision-log entry (what replay writes and serving persists; the durable log's rows
    are `canaryml.serving.decision_log.LogEntry`, a subclass with the apply status)."""

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
        return Decision(Action(self.action), self.reason, self.score, dict(self.evidence))


def format_decision(record: LogRecord) -> str:
    """The key=value line logged per decision (values with spaces are quoted)."""

    def q(v: object) -> str:
        s = str(v)
        return json.dumps(s) if (not s or any(c in s for c in ' ="')) else s

    score = "nan" if record.score is None else f"{record.score:.4f}"
    parts: list[tuple[str, object]] = [
        ("event", "decision"), ("deployment", record.deployment_id), ("step", record.step),
        ("action", str(record.action)), ("score", score), ("policy", record.policy)]
    if record.model_version:
        parts.append(("model", record.model_version))
    parts.append(("reason", record.reason))
    return " ".join(f"{k}={q(v)}" for k, v in parts)


class DecisionSink(Protocol):
    """Where records go. `append` may return the stored record (the durable log returns its
    row, with id and apply status); None means the record itself was stored."""

    def append(self, record: LogRecord) -> Any: ...


class MemoryLog(list[LogRecord]):
    """In-memory decision log (replay, tests)."""


def append_all(sink: DecisionSink, records: Sequence[LogRecord]) -> list[LogRecord]:
    """Store a tick's records: one `append_many` (group commit) when the sink has it, else one
    `append` each; returns the stored records (the sink's rows where it returns them)."""
    many = getattr(sink, "append_many", None)
    stored = list(many(records)) if callable(many) and records else [sink.append(r) for r in records]
    return [s if isinstance(s, LogRecord) else r for r, s in zip(records, stored, strict=True)]


class ControllerObserver:
    """Hooks of one `Controller.step`; the base class does nothing (replay). Serve's
    `canaryml.serving.loop.ServeLoop` overrides them for metrics, health, the Kafka ack, the
    retry queue and the state checkpoint."""

    def fetch_ok(self, deployment_id: str) -> None:
        """The source answered for `deployment_id`."""

    def failed(self, kind: str, deployment_id: str, message: str) -> None:
        """A fail-safe PAUSE was caused by `kind`: `source` (fetch raised), `data` (unusable
        window) or `scorer` (the policy could not score)."""

    def decided(self, record: LogRecord) -> None:
        """The record is in the sink (durable in serve) and not yet applied."""

    def decided_many(self, records: Sequence[LogRecord]) -> None:
        """All records of a tick are in the sink (one group commit), none applied yet. The
        default calls `decided` for each; serve acks the source once for all of them."""
        for record in records:
            self.decided(record)

    def applied(self, record: LogRecord) -> None:
        """The actuator applied the record's action."""

    def apply_failed(self, record: LogRecord, exc: Exception) -> None:
        """The actuator raised. The default logs it; the record stays logged."""
        log.error("deployment=%s step=%d action=%s not applied: %s: %s", record.deployment_id,
                  record.step, record.action, type(exc).__name__, exc)

    def stepped(self, record: LogRecord, state: dict[str, Any]) -> None:
        """End of the step; `state` is what `Controller.restore` takes back after a restart."""

    def tick_done(self, records: Sequence[LogRecord]) -> None:
        """End of a `step_many` (every action of the tick applied or failed)."""


NULL_OBSERVER = ControllerObserver()


def _has_data(window: Window) -> np.ndarray:
    """Per row: does either group hold any finite value."""
    has = np.isfinite(np.asarray(window.canary)).any(axis=1)
    if window.baseline is not None:
        has |= np.isfinite(np.asarray(window.baseline)).any(axis=1)
    return np.asarray(has)


def trim_before(window: Window, first_s: float) -> Window:
    """The window without its rows dated before `first_s` (the deployment's first sample)."""
    keep = np.asarray(window.timestamps_s) >= first_s
    if keep.all():
        return window
    return replace(window, timestamps_s=window.timestamps_s[keep],
                   canary=np.asarray(window.canary)[keep],
                   baseline=None if window.baseline is None else window.baseline[keep])


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
                 lookback: int | None = None, observer: ControllerObserver | None = None,
                 clock: Callable[[], float] | None = None) -> None:
        self.policy = policy
        self.source = source
        self.actuator = actuator
        self.log: DecisionSink = MemoryLog() if log_sink is None else log_sink
        self._model_version = model_version
        self.lookback = int(lookback or policy.lookback)
        self.observer = observer or NULL_OBSERVER
        self.clock = clock
        self.states: dict[str, PolicyState] = {}
        self.steps: dict[str, int] = {}
        self.first_sample_s: dict[str, float] = {}

    @property
    def model_version(self) -> str | None:
        mv = self._model_version
        return mv() if callable(mv) else mv

    def is_final(self, deployment_id: str) -> bool:
        """True once the policy state is terminal (no new decisions are useful)."""
        st = self.states.get(deployment_id)
        return st is not None and st.final is not None

    # ---- fetch + policy (updates only the in-memory policy state) ---------------------------
    def decide(self, deployment_id: str, now_s: float) -> Decision:
        """Fetch, score and decide; failures are reported to the observer by kind."""
        return self.decide_many([deployment_id], now_s)[0]

    def decide_many(self, deployment_ids: Sequence[str], now_s: float) -> list[Decision]:
        """`decide` for a tick: every window fetched first, then scored in one batch (the
        policy's scorer `prepare`s them, when it can), then each decided in order."""
        fetched = [self._fetch(dep, now_s) for dep in deployment_ids]
        self._prepare([w for _, w, failure, _ in fetched if w is not None and failure is None])
        return [self._decide(dep, now_s, state, window, failure, kind)
                for dep, (state, window, failure, kind) in zip(deployment_ids, fetched,
                                                                strict=True)]

    def _fetch(self, deployment_id: str, now_s: float
               ) -> tuple[PolicyState, Window | None, str | None, str]:
        state = self.states.get(deployment_id) or self.policy.initial_state()
        window: Window | None = None
        failure: str | None = None
        kind = ""
        if state.final is None:
            try:
                window = self._since_first_sample(
                deployment_id, self.source.fetch(deployment_id, now_s, self.lookback))
            except Exception as exc:  # fail-safe boundary: any source failure pauses
                failure, kind = f"source failed: {type(exc).__name__}: {exc}", "source"
            else:
                self.observer.fetch_ok(deployment_id)
                failure = window_problem(window)
                kind = "data" if failure else ""
        return state, window, failure, kind

    def _prepare(self, windows: list[Window]) -> None:
        """Batch-score a tick's windows ahead of the policy (ScorerPolicy's scorer `prepare`);
        a failure here only means each window is scored alone by the policy."""
        if len(windows) < 2:
            return
        try:
            prepare = getattr(getattr(self.policy, "scorer", None), "prepare", None)
        except Exception:  # e.g. a model holder with no model loaded yet
            return
        if not callable(prepare):
            return
        try:
            prepare(windows)
        except Exception as exc:  # the policy's own scoring handles (and reports) it
            log.debug("batched scoring failed (%s: %s); scoring each window alone",
                      type(exc).__name__, exc)

    def _decide(self, deployment_id: str, now_s: float, state: PolicyState,
                window: Window | None, failure: str | None, kind: str) -> Decision:
        decision, new_state = self.policy.step(None if failure else window, now_s, state,
                                               failure=failure)
        self.states[deployment_id] = new_state
        if failure is not None:
            self.observer.failed(kind, deployment_id, failure)
        elif state.final is None and decision.action is Action.PAUSE and \
                decision.evidence.get("failure"):
            # the policy could not score the window it was given (ScorerPolicy: model broken
            # or not loaded): a scorer failure
            self.observer.failed("scorer", deployment_id, str(decision.evidence["failure"]))
        return decision

    def _since_first_sample(self, deployment_id: str, window: Window) -> Window:
        """Drop the rows before the deployment's first sample: a live source (Prometheus,
        Kafka) returns them as NaN rows, replay's source does not return them at all; without
        this the two would score different windows at a canary's first ticks. The first sample
        is the earliest row with data this controller has seen (kept in memory: after a
        restart it is found again in the next window)."""
        can = np.asarray(window.canary)
        if can.ndim != 2 or can.shape[0] == 0:
            return window
        first = self.first_sample_s.get(deployment_id)
        if first is None:
            has = _has_data(window)
            if not has.any():
                return window
            first = float(window.timestamps_s[int(np.argmax(has))])
            self.first_sample_s[deployment_id] = first
        return trim_before(window, first)

    def state(self, deployment_id: str) -> dict[str, Any]:
        st = self.states.get(deployment_id)
        return {} if st is None else st.to_dict()

    def restore(self, deployment_id: str, state: dict[str, Any], *, next_step: int = 0) -> None:
        """Resume a deployment from `state` (as given to `observer.stepped`)."""
        if state:
            self.states[deployment_id] = PolicyState.from_dict(state)
        if next_step:
            self.steps[deployment_id] = int(next_step)

    # ---- the whole loop body -----------------------------------------------------------------
    def step(self, deployment_id: str, now_s: float | None = None) -> LogRecord:
        """fetch → score → decide → log → apply. Returns the logged record (the stored one
        when the sink returns it). `now_s` defaults to `clock()`."""
        return self.step_many([deployment_id], now_s)[0]

    def step_many(self, deployment_ids: Sequence[str], now_s: float | None = None
                  ) -> list[LogRecord]:
        """One tick over `deployment_ids` (see the module doc): fetch all → score all in one
        batch → decide each → log all in one group commit → `decided_many` → apply each.
        Every intent of the tick is stored before any action is applied."""
        if now_s is None:
            if self.clock is None:
                raise TypeError("Controller.step needs now_s when the controller has no clock")
            now_s = self.clock()
        if not deployment_ids:
            return []
        decisions = self.decide_many(deployment_ids, now_s)
        records = []
        model_version = self.model_version
        for dep, decision in zip(deployment_ids, decisions, strict=True):
            raw = decision.evidence.get("reasons")
            reasons = tuple(str(r) for r in raw) if isinstance(raw, list | tuple) else ()
            records.append(LogRecord(deployment_id=dep, policy=self.policy.name,
                                     step=self.steps.get(dep, 0), decided_at=float(now_s),
                                     action=str(decision.action), score=decision.score,
                                     reason=decision.reason, reasons=reasons,
                                     evidence=decision.evidence, model_version=model_version))
        records = append_all(self.log, records)
        for record in records:
            self.steps[record.deployment_id] = record.step + 1
            if decision_log.isEnabledFor(logging.INFO):
                decision_log.info(format_decision(record))
        self.observer.decided_many(records)
        for record, decision in zip(records, decisions, strict=True):
            if self.actuator is not None:
                try:
                    self.actuator.apply(record.deployment_id, decision, record.step)
                except Exception as exc:  # never fatal: the observer retries (serve) or logs
                    self.observer.apply_failed(record, exc)
                else:
                    self.observer.applied(record)
            self.observer.stepped(record, self.state(record.deployment_id))
        self.observer.tick_done(records)
        return records
