"""Argo Rollouts and Flagger endpoints on the controller's HTTP server (DESIGN §6).

The serve loop posts every decision to a `VerdictBoard` (`board.update(...)` after each tick);
`install(server, board, token=..., stale_after_s=...)` adds the routes that read it:

``GET  /api/v1/argo/verdict``            Argo Rollouts `web` metric provider. Always HTTP 200 with
                                         ``{"score", "verdict": pass|fail|inconclusive, "action",
                                         "reasons", "model_version", "decided_at", ...}``.
``POST /api/v1/flagger/rollout-check``   Flagger `rollout` webhook: 2xx = check passed,
                                         412 = failed check (the body says why).
``POST /api/v1/flagger/rollback``        Flagger `rollback` webhook: 200 = roll back now,
                                         409 = no rollback.
``POST /api/v1/flagger/confirm-promotion`` Flagger `confirm-promotion` webhook: 200 only on a
                                         fresh healthy verdict, 409 otherwise (promotion waits).

Verdict (a pure function of the latest decision, `verdict_for`):
  * shrink, rollback → ``fail``; promote → ``pass``; continue → ``pass``, or ``inconclusive``
    while the score is over the threshold but the policy's hysteresis has not confirmed it yet;
  * degraded → ``inconclusive`` with action ``pause``, never an HTTP error (Argo aborts a
    rollout after 5 consecutive errors): unknown deployment, no decision yet, a decision older
    than `stale_after_s` (the loop stopped ticking), a fail-safe PAUSE (no data, model missing),
    or a decision about an earlier canary revision (below). ROLLBACK and PROMOTE are terminal
    (the loop stops ticking that deployment), so they never go stale.

Identity — which deployment a request is about (`VerdictBoard.resolve`), first match wins:
  1. an explicit ``deployment=<id>`` query arg (Argo) or ``metadata.deployment`` (Flagger);
  2. ``namespace`` + name (``rollout=`` for Argo, the Canary ``name`` for Flagger) matching a
     `serve.deployments` entry's ``namespace`` and one of its ``rollout``/``canary``/``stable``/
     ``flagger`` names;
  3. a deployment id equal to ``<namespace>/<name>``, then one equal to ``<name>``;
  4. (Argo) a ``canary_hash`` seen before for exactly one deployment.
Revisions: Argo's ``canary_hash`` (pod-template hash of the canary ReplicaSet) and Flagger's
``checksum`` name the canary revision. The revision the board knows for a deployment changes
only through a trusted source: the controller's own observation (`VerdictBoard.set_revision`;
serve's Kubernetes discovery reports an Argo Rollout's ``status.currentPodHash``) or a request
authenticated with the bearer token. The first trusted revision adopts the deployment's
decisions; when a trusted source reports a *different* revision, decisions made before that
moment are about the old canary and are not reused — the answer is ``inconclusive`` until the
controller decides again. So a terminal ``fail`` of yesterday's canary never aborts today's.
An unauthenticated request's revision changes nothing: one that differs from the known
revision gets ``inconclusive`` for itself only (anyone who can reach the port must not be able
to turn a ``fail`` into ``inconclusive`` for the real caller); with no known revision its
decisions count as they are.

Flagger choices (non-2xx of a `rollout` hook counts as a failed check and `threshold` of them
roll the canary back): degraded answers 200 with ``verdict: inconclusive`` in the body, so a
controller outage does not roll every canary back — Flagger's own metric checks still run —
while `confirm-promotion` answers non-2xx until the controller has a fresh ``pass``, so missing
data never promotes (the same fail-safe as the policy).

Auth: with a token, every ``/api/`` route needs ``Authorization: Bearer <token>`` (enforced by
`ObservabilityServer`); Flagger cannot send headers (fluxcd/flagger#1192), so its routes also
accept ``metadata.token`` in the JSON body. `/metrics`, `/healthz`, `/livez` stay open.
A server bound off loopback must have a token: `install` refuses otherwise unless
``allow_unauthenticated`` (``serve.http.allow_unauthenticated`` or
``CANARYML_HTTP_ALLOW_UNAUTHENTICATED=1``) says the network in front is trusted.
Malformed input — names or ids that are not strings or longer than 253 characters, a
non-string token, bad or deeply nested JSON — is a 400 with the reason, never a 500.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from canaryml.control.types import Action, Decision
from canaryml.errors import ConfigError
from canaryml.serving.server import (
    BadRequest,
    ObservabilityServer,
    Request,
    Response,
    bearer_token,
    is_loopback,
    token_matches,
)

log = logging.getLogger(__name__)

ARGO_VERDICT = "/api/v1/argo/verdict"
FLAGGER_ROLLOUT_CHECK = "/api/v1/flagger/rollout-check"
FLAGGER_ROLLBACK = "/api/v1/flagger/rollback"
FLAGGER_CONFIRM_PROMOTION = "/api/v1/flagger/confirm-promotion"

TOKEN_ENV = "CANARYML_HTTP_TOKEN"
TOKEN_FILE_ENV = "CANARYML_HTTP_TOKEN_FILE"
ALLOW_UNAUTHENTICATED_ENV = "CANARYML_HTTP_ALLOW_UNAUTHENTICATED"
MAX_NAME_LEN = 253  # a Kubernetes object name (DNS subdomain) is at most 253 characters

PASS, FAIL, INCONCLUSIVE = "pass", "fail", "inconclusive"
TERMINAL = frozenset({Action.ROLLBACK, Action.PROMOTE})
NAME_KEYS = ("rollout", "canary", "stable", "flagger")  # serve.deployments keys that name objects


def token_from_env(environ: Mapping[str, str] | None = None) -> str | None:
    """The bearer token from `CANARYML_HTTP_TOKEN`, else the file named by
    `CANARYML_HTTP_TOKEN_FILE` (a mounted Secret), else None (no auth)."""
    env = os.environ if environ is None else environ
    if env.get(TOKEN_ENV):
        return env[TOKEN_ENV].strip() or None
    path = env.get(TOKEN_FILE_ENV)
    if not path:
        return None
    try:
        token = Path(path).read_text().strip()
    except OSError as exc:
        raise ConfigError(f"{TOKEN_FILE_ENV}={path} cannot be read ({exc}); mount the token "
                          "Secret there or unset the variable") from exc
    if not token:
        raise ConfigError(f"{TOKEN_FILE_ENV}={path} is empty; put the bearer token in it")
    return token


@dataclass(frozen=True)
class BoardEntry:
    """The latest decision for one deployment."""

    deployment_id: str
    decision: Decision
    model_version: str | None
    decided_at_s: float


@dataclass(frozen=True)
class Verdict:
    """What the endpoints answer about one deployment (JSON via `to_json`)."""

    deployment: str | None
    verdict: str
    action: str
    score: float | None
    reasons: tuple[str, ...]
    model_version: str | None = None
    decided_at: float | None = None
    age_s: float | None = None
    degraded: str | None = None  # why the answer is neutral, None when the decision is usable
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"deployment": self.deployment, "score": self.score, "verdict": self.verdict,
                "action": self.action, "reasons": list(self.reasons),
                "model_version": self.model_version, "decided_at": self.decided_at,
                "age_s": None if self.age_s is None else round(self.age_s, 3),
                "degraded": self.degraded, **self.extra}


def _finite(x: Any) -> float | None:
    """JSON-safe score: Go's encoding/json (Argo, Flagger) rejects NaN/Infinity."""
    try:
        f = float(x)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _reasons(decision: Decision) -> tuple[str, ...]:
    raw = decision.evidence.get("reasons")
    reasons = [str(r) for r in raw] if isinstance(raw, list | tuple) else []
    if decision.reason and decision.reason not in reasons:
        reasons.append(decision.reason)
    return tuple(reasons)


def degraded_verdict(deployment_id: str | None, why: str,
                     entry: BoardEntry | None = None, now_s: float | None = None) -> Verdict:
    """Neutral answer: `inconclusive`, action `pause` (the controller holds), with the reason."""
    return Verdict(
        deployment=deployment_id, verdict=INCONCLUSIVE, action=str(Action.PAUSE),
        score=None if entry is None else _finite(entry.decision.score), reasons=(why,),
        model_version=None if entry is None else entry.model_version,
        decided_at=None if entry is None else entry.decided_at_s,
        age_s=None if entry is None or now_s is None else now_s - entry.decided_at_s,
        degraded=why)


def verdict_for(entry: BoardEntry | None, deployment_id: str, now_s: float,
                stale_after_s: float, revision_since_s: float | None = None) -> Verdict:
    """Pure: the verdict on the latest decision (see the module docstring for the rules)."""
    if entry is None:
        return degraded_verdict(deployment_id, f"no decision yet for deployment "
                                f"{deployment_id!r} (the controller has not ticked it)")
    d = entry.decision
    age = now_s - entry.decided_at_s
    if revision_since_s == math.inf:
        return degraded_verdict(deployment_id, "this canary revision is not the one the "
                                "controller knows; a new revision counts only when the "
                                "controller observes it or an authenticated caller (bearer "
                                "token) reports it", entry, now_s)
    if revision_since_s is not None and entry.decided_at_s < revision_since_s:
        return degraded_verdict(deployment_id, "no decision yet for this canary revision (the "
                                "latest decision is about an earlier revision)", entry, now_s)
    if d.action not in TERMINAL and age > stale_after_s:
        return degraded_verdict(deployment_id, f"stale: the last decision is {age:.0f} s old "
                                f"(> {stale_after_s:g} s); is the controller loop running?",
                                entry, now_s)
    if d.action is Action.PAUSE:
        return degraded_verdict(deployment_id, d.reason or "controller paused (fail-safe)",
                                entry, now_s)
    if d.action in (Action.SHRINK, Action.ROLLBACK):
        verdict = FAIL
    elif d.action is Action.CONTINUE and int(d.evidence.get("breaches") or 0) > 0:
        verdict = INCONCLUSIVE  # over the threshold, hysteresis not yet confirmed
    else:
        verdict = PASS
    return Verdict(deployment=deployment_id, verdict=verdict, action=str(d.action),
                   score=_finite(d.score), reasons=_reasons(d), model_version=entry.model_version,
                   decided_at=entry.decided_at_s, age_s=age)


class VerdictBoard:
    """Thread-safe latest decision per deployment, plus the identity and revision maps.

    `deployments`: the `serve.deployments` entries (``id``, ``namespace`` and any of
    ``rollout``/``canary``/``stable``/``flagger``) so requests naming a Rollout or Canary find
    the deployment id. `clock` gives "now" for staleness and revisions (epoch seconds).
    """

    def __init__(self, deployments: Iterable[Mapping[str, Any]] = (), *,
                 clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self._lock = threading.Lock()
        self._entries: dict[str, BoardEntry] = {}
        self._known: set[str] = set()
        self._aliases: dict[tuple[str, str], str] = {}
        self._revision: dict[str, tuple[str, float | None]] = {}  # id -> (revision, since_s)
        for i, d in enumerate(deployments):
            if not d.get("id"):
                raise ConfigError(f"serve.deployments[{i}] has no id")
            self.register(str(d["id"]), namespace=d.get("namespace"),
                          names=[str(d[k]) for k in NAME_KEYS if d.get(k)])

    def register(self, deployment_id: str, *, namespace: str | None = None,
                 names: Iterable[str] = ()) -> None:
        """Make `deployment_id` known and reachable as (namespace, name) for each name."""
        with self._lock:
            self._known.add(deployment_id)
            for name in names:
                key = (str(namespace or ""), str(name))
                other = self._aliases.get(key)
                if other is not None and other != deployment_id:
                    raise ConfigError(f"{key[0]}/{key[1]} names both deployment {other!r} and "
                                      f"{deployment_id!r} in serve.deployments; names must be "
                                      "unique per namespace")
                self._aliases[key] = deployment_id

    def update(self, deployment_id: str, decision: Decision, model_version: str | None,
               at_s: float) -> None:
        """Record the latest decision (called by the serve loop after every tick)."""
        entry = BoardEntry(deployment_id, decision, model_version, float(at_s))
        with self._lock:
            self._known.add(deployment_id)
            self._entries[deployment_id] = entry

    def get(self, deployment_id: str) -> BoardEntry | None:
        with self._lock:
            return self._entries.get(deployment_id)

    def deployment_ids(self) -> list[str]:
        with self._lock:
            return sorted(self._known)

    def resolve(self, *, deployment: str | None = None, namespace: str | None = None,
                name: str | None = None, revision: str | None = None) -> tuple[str | None, str]:
        """(deployment id or None, how it was found or why not)."""
        with self._lock:
            if deployment:
                if deployment in self._known:
                    return deployment, "deployment"
                return None, (f"unknown deployment {deployment!r}; known: "
                              f"{sorted(self._known)[:20]} (serve.deployments ids)")
            if name:
                hit = self._aliases.get((namespace or "", name))
                if hit is None and not namespace:  # a name without namespace: unique match
                    hits = {v for (_, n), v in self._aliases.items() if n == name}
                    hit = hits.pop() if len(hits) == 1 else None
                if hit is not None:
                    return hit, "namespace/name"
                for candidate in (f"{namespace}/{name}" if namespace else None, name):
                    if candidate and candidate in self._known:
                        return candidate, "id"
            if revision:
                hits = {d for d, (r, _) in self._revision.items() if r == revision}
                if len(hits) == 1:
                    return hits.pop(), "revision"
        who = "/".join(x for x in (namespace, name) if x) or revision or "(nothing)"
        return None, (f"unknown deployment {who}: no serve.deployments entry matches; add "
                      "{id, namespace, rollout|canary|flagger: NAME} or pass deployment=<id>")

    def set_revision(self, deployment_id: str, revision: str | None) -> float | None:
        """The controller observed `revision` as the deployment's canary (trusted)."""
        return self.observe_revision(deployment_id, revision, trusted=True)

    def observe_revision(self, deployment_id: str, revision: str | None, *,
                         trusted: bool = False) -> float | None:
        """The time from which decisions count for the canary `revision` a request is about
        (None = all decisions count). Only a `trusted` source (the controller, an authenticated
        caller) records a new revision; an untrusted one whose revision differs from the known
        one gets +inf (no decision counts for it) and changes nothing."""
        if not revision:
            with self._lock:
                current = self._revision.get(deployment_id)
            return None if current is None else current[1]
        with self._lock:
            current = self._revision.get(deployment_id)
            if not trusted:
                if current is None or current[0] == revision:
                    return None if current is None else current[1]
                log.warning("deployment=%s: unauthenticated request about canary revision %s "
                            "(known: %s) ignored; answering inconclusive", deployment_id,
                            revision, current[0])
                return math.inf
            if current is None:
                self._revision[deployment_id] = (revision, None)
                return None
            if current[0] == revision:
                return current[1]
            since = self.clock()
            log.info("deployment=%s new canary revision %s (was %s): earlier decisions no longer "
                     "count", deployment_id, revision, current[0])
            self._revision[deployment_id] = (revision, since)
            return since

    def verdict(self, deployment_id: str, stale_after_s: float,
                revision: str | None = None, *, trusted: bool = False) -> Verdict:
        since = self.observe_revision(deployment_id, revision, trusted=trusted)
        return verdict_for(self.get(deployment_id), deployment_id, self.clock(), stale_after_s,
                           since)


# --------------------------------------------------------------------------------- handlers
def _name(value: object, field: str) -> str | None:
    """A name/id/revision from a request: None, or a string of at most MAX_NAME_LEN chars."""
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise BadRequest(f"{field} must be a string, got {type(value).__name__}")
    if len(value) > MAX_NAME_LEN or any(ord(c) < 32 for c in value):
        raise BadRequest(f"{field} must be at most {MAX_NAME_LEN} printable characters")
    return value


def _flagger_payload(req: Request) -> dict[str, Any] | Response:
    try:
        body = req.json()
    except ValueError as exc:
        return Response.json({"error": f"body is not JSON ({exc}); Flagger sends "
                              '{"name", "namespace", "phase", "checksum", "metadata"}'}, 400)
    if not isinstance(body, dict):
        return Response.json({"error": "body must be a JSON object with name and namespace"}, 400)
    meta = body.get("metadata")
    if meta is not None and not isinstance(meta, dict):
        return Response.json({"error": "metadata must be an object of strings"}, 400)
    return body


def allow_unauthenticated_from_env(environ: Mapping[str, str] | None = None) -> bool:
    env = os.environ if environ is None else environ
    return env.get(ALLOW_UNAUTHENTICATED_ENV, "").strip().lower() in ("1", "true", "yes")


def install(server: ObservabilityServer, board: VerdictBoard, *, token: str | None,
            stale_after_s: float, allow_unauthenticated: bool = False) -> None:
    """Register the Argo and Flagger routes on `server`, answering from `board`.

    `token`: bearer token for every `/api/` route (None = no auth: `ConfigError` when the server
    is bound off loopback, unless `allow_unauthenticated`). `stale_after_s`: a non-terminal decision older than this is `inconclusive`
    (use a few monitoring intervals).
    """
    if not stale_after_s > 0:
        raise ConfigError(f"stale_after_s={stale_after_s} must be > 0 (a few policy.monitoring_interval_s)")
    if token:
        if server.token and server.token != token:
            raise ConfigError("the HTTP server already has a different bearer token; configure "
                              "one token (CANARYML_HTTP_TOKEN[_FILE])")
        server.token = token
    elif not is_loopback(server.host):
        if not allow_unauthenticated:
            raise ConfigError(
                f"the canaryml API would listen on {server.host} without a bearer token: anyone "
                "who reaches it could read verdicts and trigger Flagger rollbacks. Set "
                f"{TOKEN_FILE_ENV} (a mounted Secret) or {TOKEN_ENV}, bind 127.0.0.1 "
                f"(serve.http.host, {ALLOW_UNAUTHENTICATED_ENV} unset), or — only behind a "
                "network that already authenticates callers — set "
                f"serve.http.allow_unauthenticated=true / {ALLOW_UNAUTHENTICATED_ENV}=1")
        log.warning("the canaryml API on %s has no bearer token (allow_unauthenticated): anyone "
                    "who reaches it can read verdicts", server.host)

    def argo_verdict(req: Request) -> Response:
        canary_hash = _name(req.arg("canary_hash"), "canary_hash")
        stable_hash = _name(req.arg("stable_hash"), "stable_hash")
        dep, how = board.resolve(deployment=_name(req.arg("deployment"), "deployment"),
                                 namespace=_name(req.arg("namespace"), "namespace"),
                                 name=_name(req.arg("rollout"), "rollout"), revision=canary_hash)
        # with a token the server has already checked it: the caller is authenticated
        v = (degraded_verdict(None, how) if dep is None
             else board.verdict(dep, stale_after_s, revision=canary_hash,
                                trusted=server.token is not None))
        body = v.to_json() | {"canary_hash": canary_hash, "stable_hash": stable_hash}
        log.debug("argo verdict deployment=%s verdict=%s action=%s", dep, v.verdict, v.action)
        return Response.json(body)  # always 200: errors count towards aborting the rollout

    def flagger_authorized(req: Request, body: Mapping[str, Any]) -> bool:
        if server.token is None:
            return True
        meta = body.get("metadata") or {}
        return (token_matches(bearer_token(req), server.token)
                or token_matches(meta.get("token") if isinstance(meta, dict) else None,
                                 server.token))

    def flagger(kind: str) -> Callable[[Request], Response]:
        def handler(req: Request) -> Response:
            parsed = _flagger_payload(req)
            if not flagger_authorized(req, parsed if isinstance(parsed, dict) else {}):
                return Response.unauthorized("missing or wrong token (send it as "
                                             "metadata.token in the webhook)")
            if isinstance(parsed, Response):
                return parsed
            meta = parsed.get("metadata") or {}
            dep, how = board.resolve(deployment=_name(meta.get("deployment"),
                                                      "metadata.deployment"),
                                     namespace=_name(parsed.get("namespace"), "namespace"),
                                     name=_name(parsed.get("name"), "name"))
            checksum = _name(parsed.get("checksum"), "checksum")
            v = (degraded_verdict(None, how) if dep is None
                 else board.verdict(dep, stale_after_s, revision=checksum,
                                    trusted=server.token is not None))
            body = v.to_json() | {"phase": parsed.get("phase"), "webhook": kind}
            status = flagger_status(kind, v)
            log.info("flagger %s name=%s/%s deployment=%s verdict=%s action=%s status=%d", kind,
                     parsed.get("namespace"), parsed.get("name"), dep, v.verdict, v.action,
                     status)
            return Response.json(body, status)
        return handler

    server.route("GET", ARGO_VERDICT, argo_verdict)
    server.route("POST", FLAGGER_ROLLOUT_CHECK, flagger("rollout"), authenticates=True)
    server.route("POST", FLAGGER_ROLLBACK, flagger("rollback"), authenticates=True)
    server.route("POST", FLAGGER_CONFIRM_PROMOTION, flagger("confirm-promotion"),
                 authenticates=True)
    log.info("argo/flagger endpoints on %s (%s, %s, %s, %s), stale after %g s", server.host,
             ARGO_VERDICT, FLAGGER_ROLLOUT_CHECK, FLAGGER_ROLLBACK, FLAGGER_CONFIRM_PROMOTION,
             stale_after_s)


def flagger_status(kind: str, v: Verdict) -> int:
    """HTTP status for a Flagger webhook: 2xx means 'yes' to the hook's question."""
    if kind == "rollout":  # "is the canary healthy?" — only a predicted failure says no
        return 412 if v.verdict == FAIL else 200
    if kind == "rollback":  # "roll back now?"
        return 200 if v.verdict == FAIL else 409
    if kind == "confirm-promotion":  # "may it be promoted?" — only a fresh, healthy verdict
        return 200 if v.verdict == PASS else 409
    raise ValueError(f"unknown flagger webhook kind {kind!r}")
