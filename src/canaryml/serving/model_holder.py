"""Hot-swappable scorer for the live controller.

`ModelHolder` is a `Scorer` (canaryml.control.types) that delegates to the model currently in
use. For an alias URI (`models:/canary-scorer@champion`) a daemon thread resolves the alias
every `poll_s`; when it points at a new version, that exact version (`models:/name/N`) is loaded
in the background and *staged*. The serve loop calls `swap_if_ready()` between ticks, so the swap
is atomic with respect to decisions and no tick waits for a download.

Failure handling (fail-safe, never a silent fallback):
  * a registry that cannot be reached or a version that fails to load keeps the previous model;
    the reason goes to `/healthz` (`Health.degraded("model", …)`), to the log and to
    `canaryml_errors{kind="model"}`; the same version is retried at the next poll;
  * with no model at all, `score()` raises `ScoringError`, which the policy turns into a PAUSE
    with the reason (never a rollback or a promotion).
Fixed URIs (a directory, `models:/name/N`, `runs:/…`) are loaded once and never polled.

`check(scorer)` (serve: does the source provide every metric the model needs?) runs on every
load, before a model is staged: a model it refuses (`check` returns why) is never swapped in —
at startup `refused` says why (serve exits with it), on a hot-swap the previous model is kept,
`/healthz` says why, and the refused version is not loaded again until the alias moves on.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from canaryml.control.types import Scorer, ScoreResult, Window
from canaryml.errors import ModelLoadError, ScoringError
from canaryml.serving.server import Health, ServeMetrics

log = logging.getLogger(__name__)

ALIAS_URI = re.compile(r"^models:/(?P<name>[^/@]+)@(?P<alias>[^/@]+)$")


@dataclass(frozen=True)
class LoadedModel:
    scorer: Scorer
    version: str  # "canary-scorer/3", or the URI for fixed models
    uri: str  # what was loaded (pinned version URI)
    loaded_at_s: float


def default_loader(uri: str) -> Scorer:
    from canaryml.tracking import load_scorer

    return load_scorer(uri)


def registry_resolver(tracking_uri: str | None = None) -> Callable[[str, str], str]:
    """(name, alias) → version, via the MLflow registry; raises ModelLoadError when the registry
    is unreachable or the alias does not exist."""

    def resolve(name: str, alias: str) -> str:
        from mlflow.tracking import MlflowClient

        from canaryml.tracking import tracking_uri as _uri

        uri = _uri(tracking_uri)
        try:
            mv = MlflowClient(tracking_uri=uri, registry_uri=uri).get_model_version_by_alias(
                name, alias)
        except Exception as exc:  # MlflowException, connection errors, a broken store
            raise ModelLoadError(f"cannot resolve models:/{name}@{alias} in the registry {uri}: "
                                 f"{type(exc).__name__}: {str(exc)[:300]}") from exc
        return str(mv.version)

    return resolve


class ModelHolder:
    """The scorer in use, swapped between ticks when the alias moves. Thread-safe."""

    def __init__(self, uri: str, *, poll_s: float = 30.0,
                 loader: Callable[[str], Scorer] = default_loader,
                 resolver: Callable[[str, str], str] | None = None,
                 metrics: ServeMetrics | None = None, health: Health | None = None,
                 on_swap: Callable[[LoadedModel], None] | None = None,
                 check: Callable[[Scorer], str | None] | None = None,
                 role: str = "model") -> None:
        self.uri = str(uri)
        self.role = role  # "model" (the champion) or "shadow": log prefix, health component
        self.check = check
        self.refused: str | None = None  # why the last loaded version was refused by `check`
        self._refused_version: str | None = None
        self.poll_s = float(poll_s)
        self.loader = loader
        m = ALIAS_URI.match(self.uri)
        self.alias: tuple[str, str] | None = (m["name"], m["alias"]) if m else None
        self.resolver = resolver or registry_resolver()
        self.metrics = metrics or ServeMetrics()
        self.health = health or Health()
        self.on_swap = on_swap
        self._lock = threading.Lock()
        self._current: LoadedModel | None = None
        self._staged: LoadedModel | None = None
        self._last_error: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.swaps = 0
        self.failures = 0

    # ---- state -----------------------------------------------------------------------------
    @property
    def current(self) -> LoadedModel | None:
        with self._lock:
            return self._current

    @property
    def version(self) -> str | None:
        cur = self.current
        return None if cur is None else cur.version

    @property
    def last_error(self) -> str | None:
        with self._lock:
            return self._last_error

    # ---- Scorer protocol -------------------------------------------------------------------
    @property
    def metrics_names(self) -> tuple[str, ...]:
        cur = self.current
        return () if cur is None else tuple(cur.scorer.metrics)

    @property
    def lookback(self) -> int:
        cur = self.current
        # steps a decision reads (the breach predictor's longer window when the model has one)
        return 1 if cur is None else int(getattr(cur.scorer, "window_steps", cur.scorer.lookback))

    def score(self, window: Window) -> ScoreResult:
        cur = self.current
        if cur is None:
            raise ScoringError(f"no model loaded from {self.uri}: "
                               f"{self.last_error or 'not loaded yet'}")
        return cur.scorer.score(window)

    # ---- loading -----------------------------------------------------------------------------
    def _target(self) -> tuple[str, str]:
        """(version label, pinned URI) the holder should be running."""
        if self.alias is None:
            return self.uri, self.uri
        name, alias = self.alias
        version = self.resolver(name, alias)
        return f"{name}/{version}", f"models:/{name}/{version}"

    def _fail(self, reason: str) -> None:
        with self._lock:
            self._last_error = reason
            have = self._current
        self.failures += 1
        self.metrics.error(self.role)
        kept = f"; keeping {have.version}" if have else "; no model: deployments pause"
        self.health.degraded(self.role, reason + kept)
        log.error("%s: %s%s", self.role, reason, kept)

    def refresh(self) -> bool:
        """Resolve the alias and, when it moved, load the new version and stage it.
        Returns True when a new model was staged. Never raises."""
        try:
            version, pinned = self._target()
        except ModelLoadError as exc:
            self._fail(str(exc))
            return False
        with self._lock:
            active = self._staged or self._current
        if version == self._refused_version:
            return False  # refused once (e.g. metrics the source lacks): not reloaded
        if active is not None and active.version == version:
            if self.last_error is not None and self._current is not None \
                    and self._current.version == version:
                with self._lock:
                    self._last_error = None
                self.health.ok(self.role)
            return False
        t0 = time.perf_counter()
        try:
            scorer = self.loader(pinned)
        except Exception as exc:  # ModelLoadError, download errors, a corrupt bundle
            self._fail(f"loading {pinned} failed: {type(exc).__name__}: {str(exc)[:300]}")
            return False
        why = None if self.check is None else self.check(scorer)
        if why is not None:
            self.refused = f"model {version} ({pinned}) refused: {why}"
            self._refused_version = version
            self._fail(self.refused)
            return False
        self.refused = self._refused_version = None
        loaded = LoadedModel(scorer, version, pinned, time.time())
        with self._lock:
            self._staged = loaded
            self._last_error = None
        log.info("%s: loaded %s from %s in %.1f s; swapping in at the next tick", self.role,
                 version, pinned, time.perf_counter() - t0)
        return True

    def swap_if_ready(self) -> LoadedModel | None:
        """Between ticks: make a staged model current. Returns it, or None when nothing changed."""
        with self._lock:
            staged, self._staged = self._staged, None
            if staged is None:
                return None
            previous, self._current = self._current, staged
        self.swaps += 1
        self.metrics.set_model(staged.version)
        self.health.ok(self.role)
        log.info("%s: now using %s (was %s)", self.role, staged.version,
                 previous.version if previous else "none")
        if self.on_swap is not None:
            self.on_swap(staged)
        return staged

    def start(self) -> ModelHolder:
        """Load synchronously once (so the first tick has a model when possible), then poll the
        alias in a daemon thread."""
        self.refresh()
        self.swap_if_ready()
        if self.alias is not None and self.poll_s > 0 and self._thread is None:
            self._thread = threading.Thread(target=self._poll, name="canaryml-model-poll",
                                            daemon=True)
            self._thread.start()
        elif self.alias is None and self.current is None:
            # a fixed URI that failed: retry in the background too
            self._thread = threading.Thread(target=self._poll, name="canaryml-model-poll",
                                            daemon=True)
            self._thread.start()
        return self

    def _poll(self) -> None:
        while not self._stop.wait(self.poll_s if self.poll_s > 0 else 30.0):
            if self.alias is None and self.current is not None:
                return
            self.refresh()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None


class HeldScorer:
    """Scorer-protocol view of a ModelHolder (`metrics` is a property name clash otherwise)."""

    def __init__(self, holder: ModelHolder) -> None:
        self.holder = holder

    @property
    def metrics(self) -> tuple[str, ...]:
        return self.holder.metrics_names

    @property
    def lookback(self) -> int:
        return self.holder.lookback

    def score(self, window: Window) -> ScoreResult:
        return self.holder.score(window)

    def __getattr__(self, name: str) -> Any:  # e.g. `info` for reports
        cur = self.holder.current
        if cur is None:
            raise AttributeError(name)
        return getattr(cur.scorer, name)
