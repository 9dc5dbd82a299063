"""Shadow challenger: score `@challenger` beside `@champion` on the same live windows, log its
would-be decisions, never act.

`serve.shadow.model` (e.g. `models:/canary-scorer@challenger`; null = off) is held by its own
`ModelHolder` (hot-swapped when the alias moves, refused like the champion when the source lacks
a metric it needs). Each tick, for every deployment the champion decided on, the window the
champion was given (recorded by `WindowTap` around the source, trimmed to the deployment's first
sample as the Controller trims it) is scored by the challenger through its own
`ScorerPolicy` + `RollbackPolicy` (the same `policy.*`, the challenger's own operating point when
`policy.rollback_threshold` is null) and its own per-deployment policy state. The result is a
would-be decision: logged, counted, written to `serve.shadow.log` — and never given to the
actuator, the decision log or the verdict endpoints (the shadow holds no reference to them).
The shadow's policy state lives in memory: after a restart it starts again from the next
window (its tally carries on from the model-version tags).

Reported:
  * per tick: one `event=shadow` line (logger `canaryml.shadow`) with both actions, both scores
    and whether they agree; a JSON line in `serve.shadow.log`;
  * when the champion finishes a canary (rollback or promote), the challenger's would-be
    outcome relative to it — the only verdict a live system has: `catch` (both roll back;
    `lead_s` > 0 when the challenger would have been earlier), `false_rollback` (the challenger
    would have rolled back a canary the champion promoted), `miss` (the champion rolled back,
    the challenger would not have), `agree_promote`;
  * `/metrics`: `canaryml_shadow_decisions_total{deployment,action}`,
    `canaryml_shadow_agreements_total{agree}`, `canaryml_shadow_agreement_ratio`,
    `canaryml_shadow_score{deployment}`, `canaryml_shadow_outcomes_total{outcome}`,
    `canaryml_shadow_model{version}`;
  * the challenger's registry version gets tags `canaryml.shadow.*` (since, last, decisions,
    agreement, catches, false_rollbacks, misses, agree_promote) every `report_every_s` — what
    `canaryml promote` reads when `registry.shadow.required` is true.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Info

from canaryml.control.controller import LogRecord, trim_before
from canaryml.control.policies import ScorerPolicy
from canaryml.control.policy import PolicyConfig, PolicyState, RollbackPolicy
from canaryml.control.types import Action, Decision, Window
from canaryml.serving.factory import LiveSource
from canaryml.serving.model_holder import HeldScorer, ModelHolder

log = logging.getLogger(__name__)
shadow_log = logging.getLogger("canaryml.shadow")  # one key=value line per shadow decision

OUTCOMES = ("catch", "false_rollback", "miss", "agree_promote")
TAG = "canaryml.shadow."


class WindowTap:
    """A LiveSource that remembers the last window it returned per deployment."""

    def __init__(self, inner: LiveSource) -> None:
        self.inner = inner
        self.last: dict[str, Window] = {}

    @property
    def metrics(self) -> Any:
        return getattr(self.inner, "metrics", None)

    def fetch(self, deployment_id: str, now_s: float, lookback: int) -> Window:
        self.last.pop(deployment_id, None)
        window = self.inner.fetch(deployment_id, now_s, lookback)
        self.last[deployment_id] = window
        return window

    def ack(self, deployment_id: str) -> Any:
        return self.inner.ack(deployment_id)

    def refresh(self) -> str | None:
        return self.inner.refresh()

    def owned(self) -> set[str] | None:
        return self.inner.owned()

    def wire(self, entry: dict[str, Any]) -> str | None:
        return self.inner.wire(entry)

    def close(self) -> None:
        self.inner.close()


@dataclass
class ShadowTally:
    """Evidence for one challenger version (what the model-version tags carry)."""

    since: float | None = None
    last: float | None = None
    decisions: int = 0
    agreements: int = 0
    outcomes: dict[str, int] = field(default_factory=lambda: dict.fromkeys(OUTCOMES, 0))

    @property
    def agreement(self) -> float | None:
        return None if not self.decisions else self.agreements / self.decisions

    def tags(self) -> dict[str, str]:
        out = {"decisions": str(self.decisions), "agreements": str(self.agreements),
               **{k: str(v) for k, v in self.outcomes.items()}}
        if self.since is not None:
            out["since"] = f"{self.since:.0f}"
        if self.last is not None:
            out["last"] = f"{self.last:.0f}"
        if self.agreement is not None:
            out["agreement"] = f"{self.agreement:.4f}"
        return {TAG + k: v for k, v in out.items()}

    @classmethod
    def from_tags(cls, tags: Mapping[str, str]) -> ShadowTally:
        def num(key: str) -> float | None:
            try:
                return float(tags[TAG + key])
            except (KeyError, ValueError):
                return None

        t = cls(since=num("since"), last=num("last"),
                decisions=int(num("decisions") or 0), agreements=int(num("agreements") or 0))
        t.outcomes = {k: int(num(k) or 0) for k in OUTCOMES}
        return t


def registry_tagger(tracking_uri: str | None = None
                    ) -> tuple[Callable[[str, str], dict[str, str]],
                               Callable[[str, str, Mapping[str, str]], None]]:
    """(read tags, write tags) of a registry model version, via MLflow."""

    def client() -> Any:
        from mlflow.tracking import MlflowClient

        from canaryml.tracking import tracking_uri as _uri

        uri = _uri(tracking_uri)
        return MlflowClient(tracking_uri=uri, registry_uri=uri)

    def read(name: str, version: str) -> dict[str, str]:
        return dict(client().get_model_version(name, version).tags or {})

    def write(name: str, version: str, tags: Mapping[str, str]) -> None:
        c = client()
        for k, v in tags.items():
            c.set_model_version_tag(name, version, k, v)

    return read, write


class Shadow:
    """The shadow challenger of one serve process (see the module docstring)."""

    def __init__(self, holder: ModelHolder, policy: PolicyConfig, *,
                 registry: CollectorRegistry, log_path: str | Path | None = None,
                 report_every_s: float = 60.0,
                 tags: tuple[Callable[[str, str], dict[str, str]],
                             Callable[[str, str, Mapping[str, str]], None]] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.holder = holder
        self.policy = ScorerPolicy("shadow", HeldScorer(holder), RollbackPolicy(policy))
        self.states: dict[str, PolicyState] = {}
        self.rolled_back_at: dict[str, float] = {}
        self.finished: set[str] = set()
        self.log_path = None if log_path is None else Path(log_path)
        if self.log_path is not None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.report_every_s = float(report_every_s)
        self.tags = tags
        self.clock = clock
        self._reported_at = float("-inf")
        self._version: str | None = None
        self.tally = ShadowTally()
        self.records: list[dict[str, Any]] = []  # this process's shadow decisions (bounded)
        self.decisions = Counter("canaryml_shadow_decisions",
                                 "Would-be decisions of the shadow challenger (never applied)",
                                 ["deployment", "action"], registry=registry)
        self.agreements = Counter("canaryml_shadow_agreements",
                                  "Shadow decisions that agree / disagree with the champion's",
                                  ["agree"], registry=registry)
        self.agreement_ratio = Gauge("canaryml_shadow_agreement_ratio",
                                     "Share of shadow decisions equal to the champion's, for "
                                     "the current challenger version", registry=registry)
        self.score = Gauge("canaryml_shadow_score", "Latest shadow challenger score",
                           ["deployment"], registry=registry)
        self.outcomes = Counter("canaryml_shadow_outcomes",
                                "Would-be outcomes of finished canaries relative to the "
                                "champion's (catch, false_rollback, miss, agree_promote)",
                                ["outcome"], registry=registry)
        self.model = Info("canaryml_shadow_model", "Shadow challenger model", registry=registry)

    # ---- per tick -----------------------------------------------------------------------
    def _start_version(self, version: str) -> None:
        self._version = version
        self.states.clear()
        self.rolled_back_at.clear()
        self.finished.clear()
        self.tally = ShadowTally()
        name_version = self._registry_version()
        if name_version is not None and self.tags is not None:
            try:
                self.tally = ShadowTally.from_tags(self.tags[0](*name_version))
            except Exception as exc:  # the registry is down: start a fresh tally
                log.warning("shadow: reading the tags of %s failed: %s", version, exc)
        self.model.info({"version": version})
        log.info("shadow: scoring %s beside the champion (decisions logged, never applied)",
                 version)

    def _registry_version(self) -> tuple[str, str] | None:
        if self.holder.alias is None or self._version is None or "/" not in self._version:
            return None
        name, version = self._version.rsplit("/", 1)
        return (name, version) if version.isdigit() else None

    def observe(self, records: list[LogRecord], windows: Mapping[str, Window],
                first_sample_s: Mapping[str, float], finished: Callable[[str], bool]) -> None:
        """Score the challenger on the windows the champion just decided on."""
        self.holder.swap_if_ready()
        cur = self.holder.current
        if cur is None:
            return
        if cur.version != self._version:
            self._start_version(cur.version)
        for rec in records:
            window = windows.get(rec.deployment_id)
            if window is None or rec.deployment_id in self.finished:
                continue
            first = first_sample_s.get(rec.deployment_id)
            if first is not None:
                window = trim_before(window, first)
            self._step(rec, window, finished(rec.deployment_id))
        self.agreement_ratio.set(self.tally.agreement or 0.0)
        self.report()

    def _step(self, rec: LogRecord, window: Window, champion_final: bool) -> None:
        dep = rec.deployment_id
        state = self.states.get(dep) or self.policy.initial_state()
        decision: Decision
        decision, new = self.policy.step(window, rec.decided_at, state)
        self.states[dep] = new
        action = str(decision.action)
        if decision.action in (Action.ROLLBACK, Action.SHRINK) and dep not in self.rolled_back_at:
            self.rolled_back_at[dep] = rec.decided_at
        agree = action == str(rec.action)
        t = self.tally
        t.decisions += 1
        t.agreements += int(agree)
        t.since = rec.decided_at if t.since is None else t.since
        t.last = rec.decided_at
        self.decisions.labels(dep, action).inc()
        self.agreements.labels(str(agree).lower()).inc()
        if decision.score is not None:
            self.score.labels(dep).set(decision.score)
        entry: dict[str, Any] = {
            "event": "shadow", "deployment": dep, "step": rec.step, "decided_at": rec.decided_at,
            "champion_action": str(rec.action), "champion_score": rec.score,
            "champion_model": rec.model_version, "challenger_action": action,
            "challenger_score": decision.score, "challenger_model": self._version,
            "agree": agree, "reason": decision.reason, "applied": False}
        if champion_final:
            entry["outcome"] = self._finish(dep, str(rec.action), rec.decided_at)
            if entry["outcome"] == "catch":
                entry["lead_s"] = rec.decided_at - self.rolled_back_at[dep]
        self._write(entry)

    def _finish(self, dep: str, champion_action: str, at: float) -> str | None:
        self.finished.add(dep)
        challenger_rolled_back = dep in self.rolled_back_at
        if champion_action == str(Action.ROLLBACK):
            outcome = "catch" if challenger_rolled_back else "miss"
        elif champion_action == str(Action.PROMOTE):
            outcome = "false_rollback" if challenger_rolled_back else "agree_promote"
        else:
            return None  # paused by the error limit: no verdict to compare with
        self.tally.outcomes[outcome] += 1
        self.outcomes.labels(outcome).inc()
        log.info("shadow: deployment=%s finished by the champion (%s): challenger %s would-be "
                 "%s", dep, champion_action, self._version, outcome)
        return outcome

    def _write(self, entry: dict[str, Any]) -> None:
        def q(v: object) -> str:
            s = "nan" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v)
            return json.dumps(s) if (not s or any(c in s for c in ' ="')) else s

        keys = ("deployment", "step", "champion_action", "challenger_action", "agree",
                "champion_score", "challenger_score", "challenger_model", "outcome", "reason")
        shadow_log.info("event=shadow " + " ".join(
            f"{k}={q(entry[k])}" for k in keys if k in entry))
        self.records.append(entry)
        del self.records[:-1000]
        if self.log_path is not None:
            with open(self.log_path, "a") as f:
                f.write(json.dumps(entry) + "\n")

    def report(self, force: bool = False) -> None:
        """Write the tally to the challenger version's tags (at most every report_every_s)."""
        now = self.clock()
        if not force and now - self._reported_at < self.report_every_s:
            return
        target = self._registry_version()
        if target is None or self.tags is None or not self.tally.decisions:
            return
        self._reported_at = now
        try:
            self.tags[1](*target, self.tally.tags())
        except Exception as exc:  # never fatal: the next report retries
            log.warning("shadow: writing the tags of %s failed: %s", self._version, exc)

    def close(self) -> None:
        self.report(force=True)
        self.holder.stop()
