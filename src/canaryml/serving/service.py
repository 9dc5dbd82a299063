"""One live controller process (what `canaryml serve` runs): scheduling, discovery and resume
around the `ServeLoop`, whose `Controller.step` is the loop body (as in replay).

    ModelHolder (serve.model, default models:/canary-scorer@champion; polls the alias every
      serve.model_poll_s, loads a moved alias in the background, swaps between ticks)
    → ScorerPolicy + RollbackPolicy (policy.*, the keys replay reads)
    → ServeLoop: the Controller with the source and actuator from the registry keyed by kind
      (canaryml.serving.factory: serve.source, serve.actuator), the DecisionLog as its sink
      (serve.decision_log, resumed on start) and the loop as its observer (metrics, health,
      retries of unapplied actions)
    → Service: a tick every policy.monitoring_interval_s, discovery, resume, and the
      ObservabilityServer (serve.http: /metrics, /healthz, the Argo/Flagger verdict endpoints).

Deployments come from `serve.deployments`, from Kubernetes (`serve.discover: {namespace,
label_selector}`, re-listed every tick; actuator kinds deployment and argo), and with the Kafka
source from the partitions this replica owns. A discovered canary Deployment (or Argo Rollout)
reads its wiring from annotations:

    canaryml.io/deployment-id      id in the decision log (default: the object's name)
    canaryml.io/stable             the stable Deployment (Deployment actuator)
    canaryml.io/canary-selector    PromQL label matchers of the canary, e.g. app="web",track="canary"
    canaryml.io/baseline-selector  … of the baseline (optional)

A discovered Rollout's `status.currentPodHash` is the canary revision the verdict endpoints
trust (a request's own `canary_hash` only counts when it carries the bearer token).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from canaryml.control.policies import ScorerPolicy
from canaryml.control.policy import PolicyConfig, RollbackPolicy
from canaryml.control.types import Actuator, MetricSource
from canaryml.errors import ConfigError, config_int
from canaryml.serving.decision_log import DecisionLog, LogEntry
from canaryml.serving.endpoints import VerdictBoard
from canaryml.serving.factory import LiveActuator, LiveSource
from canaryml.serving.loop import ServeLoop
from canaryml.serving.model_holder import HeldScorer, LoadedModel, ModelHolder
from canaryml.serving.server import Health, ObservabilityServer, ServeMetrics
from canaryml.serving.shadow import Shadow, WindowTap
from canaryml.serving.ticks import run_ticks

log = logging.getLogger(__name__)

ANN = "canaryml.io/"


def kube_api_client(kube_host: str | None) -> Any:
    """An ApiClient for `kube_host` (e.g. an emulator URL), else in-cluster config, else
    kubeconfig."""
    from kubernetes import client, config

    if kube_host:
        cfg = client.Configuration()
        cfg.host = str(kube_host)
        return client.ApiClient(cfg)
    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    return client.ApiClient()


def labels_match(selector: str, labels: Mapping[str, str]) -> bool:
    """Equality-based label selector (`a=b,c!=d,e,!f`); set-based terms are left to the server."""
    for term in (t.strip() for t in selector.split(",")):
        if not term or " in " in term or " notin " in term:
            continue
        if "!=" in term:
            k, v = (x.strip() for x in term.split("!=", 1))
            if labels.get(k) == v:
                return False
        elif "=" in term:
            k, v = (x.strip() for x in term.replace("==", "=").split("=", 1))
            if labels.get(k) != v:
                return False
        elif term.startswith("!"):
            if term[1:] in labels:
                return False
        elif term not in labels:
            return False
    return True


class KubeDiscovery:
    """Lists canary Deployments (or Argo Rollouts) by label selector; see the module docstring
    for the annotations it reads."""

    def __init__(self, api_client: Any, namespace: str, label_selector: str, *,
                 kind: str = "deployment", timeout_s: float = 10.0) -> None:
        if not label_selector:
            raise ConfigError("serve.discover.label_selector is empty; use e.g. "
                              "canaryml.io/track=canary")
        self.api_client = api_client
        self.namespace = str(namespace)
        self.label_selector = str(label_selector)
        self.kind = kind
        self.timeout_s = timeout_s

    def _items(self) -> list[dict[str, Any]]:
        import json

        from kubernetes import client

        resp: Any
        if self.kind == "argo":
            resp = client.CustomObjectsApi(self.api_client).list_namespaced_custom_object(
                "argoproj.io", "v1alpha1", self.namespace, "rollouts",
                label_selector=self.label_selector, _preload_content=False,
                _request_timeout=self.timeout_s)
        else:
            resp = client.AppsV1Api(self.api_client).list_namespaced_deployment(
                self.namespace, label_selector=self.label_selector, _preload_content=False,
                _request_timeout=self.timeout_s)
        return list(json.loads(resp.data or b"{}").get("items") or [])

    def discover(self) -> list[dict[str, Any]]:
        """`serve.deployments`-shaped entries for every matching object."""
        out = []
        for obj in self._items():
            meta = obj.get("metadata") or {}
            if not labels_match(self.label_selector, meta.get("labels") or {}):
                continue  # the server filters; this also holds for one that ignores the selector
            ann = meta.get("annotations") or {}
            name = str(meta.get("name"))
            entry: dict[str, Any] = {"id": ann.get(f"{ANN}deployment-id") or name,
                                     "namespace": meta.get("namespace") or self.namespace}
            if self.kind == "argo":
                entry["rollout"] = name
                # the canary revision Argo's web provider sends as canary_hash: the verdict
                # board trusts the controller's own observation, not a caller's claim
                pod_hash = (obj.get("status") or {}).get("currentPodHash")
                if pod_hash:
                    entry["revision"] = str(pod_hash)
            else:
                entry["canary"] = name
                if ann.get(f"{ANN}stable"):
                    entry["stable"] = ann[f"{ANN}stable"]
            if ann.get(f"{ANN}canary-selector"):
                entry["selectors"] = {"canary": ann[f"{ANN}canary-selector"],
                                      "baseline": ann.get(f"{ANN}baseline-selector")}
            out.append(entry)
        return out


class Service:
    """One controller process: scheduling, discovery and resume around the ServeLoop (whose
    Controller.step is the loop body), the model holder and the HTTP server."""

    def __init__(self, holder: ModelHolder, loop: ServeLoop, *,
                 deployments: Sequence[Mapping[str, Any]] = (), interval_s: float = 30.0,
                 min_lookback: int = 1, source: LiveSource | None = None,
                 actuator: LiveActuator | None = None, discovery: KubeDiscovery | None = None,
                 server: ObservabilityServer | None = None,
                 board: VerdictBoard | None = None, shadow: Shadow | None = None) -> None:
        self.holder = holder
        self.shadow = shadow  # scores @challenger on the same windows; never acts
        self.loop = loop
        self.controller = loop.controller
        self.static_ids = [str(d["id"]) for d in deployments]
        self.interval_s = float(interval_s)
        self.min_lookback = int(min_lookback)
        self.source = source
        self.actuator = actuator
        self.discovery = discovery
        self.server = server
        self.board = board
        self.ticks = 0
        self.entries = 0
        self._known: dict[str, dict[str, Any]] = {}
        self._discovered: list[str] = []
        self._broker_down = False
        holder.on_swap = self._on_swap
        if holder.current is not None:
            self._on_swap(holder.current)

    def _on_swap(self, model: LoadedModel) -> None:
        self.controller.lookback = max(self.min_lookback, int(getattr(
            model.scorer, "window_steps", model.scorer.lookback)))

    # ---- deployments -----------------------------------------------------------------------
    def _wire(self, entry: Mapping[str, Any]) -> bool:
        """Give a discovered deployment its actuator target and source selectors."""
        dep = str(entry["id"])
        for part, name in ((self.actuator, "actuator"), (self.source, "source")):
            why = None if part is None else part.wire(dict(entry))
            if why is not None:
                log.warning("discovered %s (%s/%s) skipped by the %s: %s", dep,
                            entry.get("namespace"), entry.get("rollout") or entry.get("canary"),
                            name, why)
                return False
        if self.board is not None:
            names = [str(entry[k]) for k in ("rollout", "canary", "stable") if entry.get(k)]
            try:
                self.board.register(dep, namespace=entry.get("namespace"), names=names)
            except ConfigError as exc:
                log.warning("verdict board: %s", exc)
            if entry.get("revision"):
                self.board.set_revision(dep, str(entry["revision"]))
        return True

    def deployment_ids(self) -> list[str]:
        ids = list(self.static_ids)
        if self.discovery is not None:
            try:
                found = self.discovery.discover()
                fresh: list[str] = []
                for entry in found:
                    dep = str(entry["id"])
                    if self._known.get(dep) != entry:
                        if not self._wire(entry):
                            continue
                        log.info("discovered deployment %s (%s)", dep, entry)
                        self._known[dep] = dict(entry)
                    fresh.append(dep)
                self._discovered = fresh
                self.loop.health.ok("discovery")
            except Exception as exc:  # API down: keep the last list, say so
                self.loop.metrics.error("discovery")
                self.loop.health.degraded("discovery", f"{type(exc).__name__}: {exc}")
                log.warning("discovery failed (%s); keeping %d known deployment(s)", exc,
                            len(self._discovered))
            ids += [d for d in self._discovered if d not in ids]
        owned = None if self.source is None else self.source.owned()
        if owned is not None:  # a partitioned source (Kafka): this replica's deployments only
            ids = [d for d in ids if d in owned] if ids else sorted(owned)
        return ids

    # ---- ticking ---------------------------------------------------------------------------
    def tick(self) -> list[LogEntry]:
        """Swap a staged model in (between ticks), refresh the source (Kafka: learn the
        assignment before choosing deployments), then one Controller.step per deployment."""
        self.holder.swap_if_ready()
        if self.source is not None:
            self._report_backend(self.source.refresh())
        tap = self.source if isinstance(self.source, WindowTap) else None
        if tap is not None:
            tap.last.clear()
        entries = self.loop.tick(self.deployment_ids())
        if self.shadow is not None and tap is not None:
            try:
                self.shadow.observe(list(entries), dict(tap.last),
                                    self.controller.first_sample_s, self.controller.is_final)
            except Exception:  # the shadow must never stop the champion
                self.loop.metrics.error("shadow")
                log.exception("shadow challenger failed this tick")
        if self.board is not None:
            for e in entries:
                self.board.update(e.deployment_id, e.decision, e.model_version, e.decided_at)
        self.ticks += 1
        self.entries += len(entries)
        return entries

    def _report_backend(self, down: str | None) -> None:
        """Broker reachability in /healthz (`kafka`), each outage counted once in
        canaryml_errors_total{kind="kafka_down"} — also when no deployment is owned, so no
        fetch would ever fail and say so. (Only the Kafka source reports outages here.)"""
        if down is None:
            if self._broker_down:
                log.info("kafka broker reachable again")
                self.loop.health.ok("kafka")
        else:
            if not self._broker_down:
                self.loop.metrics.error("kafka_down")
                log.error("%s", down)
            self.loop.health.degraded("kafka", down)
        self._broker_down = down is not None

    def run(self, *, max_ticks: int | None = None, duration_s: float | None = None,
            stop: threading.Event | None = None) -> int:
        """Resume from the decision log, then tick every `interval_s` until a limit or `stop`.
        Returns the number of ticks."""
        self.loop.resume()
        return run_ticks(self.tick, interval_s=self.interval_s, max_ticks=max_ticks,
                         duration_s=duration_s, stop=stop)

    def close(self) -> None:
        self.holder.stop()
        if self.shadow is not None:
            self.shadow.close()
        if self.server is not None:
            self.server.stop()
        if self.source is not None:
            try:
                self.source.close()
            except Exception as exc:  # closing must not hide the real exit reason
                log.warning("closing the source failed: %s", exc)
        self.loop.log.close()


def _source_metrics(serve: Mapping[str, Any], catalog_names: Iterable[str]) -> list[str]:
    if serve.get("metrics"):
        return [str(m) for m in serve["metrics"]]
    src = serve.get("source") or {}
    if src.get("kind") == "prometheus":
        return list((src.get("prometheus") or {}).get("queries") or {})
    return list(catalog_names)


def metric_check(serve: Mapping[str, Any], provided: Sequence[str]
                 ) -> Callable[[Any], str | None]:
    """`ModelHolder.check`: why a model cannot be served from this source (the metrics it needs
    that the source does not provide, and the config key that adds them), or None."""
    have = set(provided)
    kind = (serve.get("source") or {}).get("kind")

    def check(scorer: Any) -> str | None:
        missing = [m for m in getattr(scorer, "metrics", ()) if m not in have]
        if not missing:
            return None
        if serve.get("metrics"):
            fix = "add them to serve.metrics"
            if kind == "prometheus":
                fix += " and give each a PromQL query under serve.source.prometheus.queries"
        elif kind == "prometheus":
            fix = ("add a PromQL query for each under serve.source.prometheus.queries (e.g. "
                   f"serve.source.prometheus.queries.{missing[0]}=…)")
        else:
            fix = ("add them to the metric catalog (metrics=…, conf/metrics/) or list the "
                   "source's metrics in serve.metrics")
        return (f"the model needs metric(s) {', '.join(missing)} that the {kind} source does "
                f"not provide (it provides {', '.join(provided) or 'none'}); {fix}, or serve a "
                "model trained on the provided metrics")

    return check


def build(serve: Mapping[str, Any], policy: PolicyConfig, *, catalog_names: Iterable[str] = (),
          source: MetricSource | None = None, actuator: Actuator | None = None,
          api_client: Any = None, holder: ModelHolder | None = None,
          http: bool = True, clock: Callable[[], float] = time.time) -> Service:
    """Build a Service from the plain `serve` mapping (OmegaConf.to_container(cfg.serve)) and
    the policy config (its `monitoring_interval_s` is the tick interval, its
    `canary_batch_size` the actuator's batch). `source`/`actuator`/`api_client`/`holder`
    replace what the config would build (tests)."""
    from canaryml.serving.factory import (
        actuator_kind,
        build_actuator,
        build_source,
        live_actuator,
        live_source,
    )

    serve = dict(serve)
    interval_s = float(policy.monitoring_interval_s)
    deployments = [dict(d) for d in serve.get("deployments") or []]
    discover = serve.get("discover")
    kind = actuator_kind(serve)
    if discover and kind.discovers is None:
        raise ConfigError(f"serve.discover lists Kubernetes objects; actuator kind "
                          f"{(serve.get('actuator') or {}).get('kind')!r} takes its deployments "
                          "from serve.deployments only")
    needs_kube = kind.needs_kube or bool(discover)
    if api_client is None and needs_kube and (actuator is None or discover):
        api_client = kube_api_client((serve.get("actuator") or {}).get("kube_host"))
    metrics = ServeMetrics()
    health = Health()
    # configuration errors first (no thread, file or port held yet)
    provided: Sequence[str] | None = _source_metrics(serve, catalog_names)
    if source is not None:  # injected (tests, the demo): checked only when it names its metrics
        provided = getattr(source, "metrics", None)
    src = live_source(source) if source is not None else build_source(serve, provided or [])
    act = live_actuator(actuator) if actuator is not None else build_actuator(
        serve, api_client, batch_size=policy.canary_batch_size)
    discovery = None
    if discover:
        d = dict(discover)
        discovery = KubeDiscovery(api_client, str(d.get("namespace") or "default"),
                                  str(d.get("label_selector") or ""),
                                  kind=kind.discovers or "deployment")
    if holder is None:
        holder = ModelHolder(str(serve["model"]), poll_s=float(serve.get("model_poll_s") or 30),
                             metrics=metrics, health=health)
    else:
        holder.metrics, holder.health = metrics, health
    if holder.check is None and provided is not None:
        holder.check = metric_check(serve, list(provided))
    shadow = None
    sh = dict(serve.get("shadow") or {})
    if sh.get("model"):
        src = WindowTap(src)
        shadow_holder = ModelHolder(
            str(sh["model"]), poll_s=float(serve.get("model_poll_s") or 30), role="shadow",
            check=None if provided is None else metric_check(serve, list(provided)))
        from canaryml.serving.shadow import registry_tagger

        shadow = Shadow(shadow_holder, policy, registry=metrics.registry,
                        log_path=sh.get("log"),
                        report_every_s=float(sh.get("report_every_s") or 60.0),
                        tags=registry_tagger())
    # a corrupt log is moved aside (and said so), never a crash loop at every start
    decision_log = DecisionLog(serve["decision_log"], on_corrupt="move_aside")
    if decision_log.moved_aside is not None:
        metrics.error("decision_log")
    server = board = None
    try:
        holder.start()
        if holder.current is None and holder.refused is not None:
            raise ConfigError(f"{holder.refused}")
        if shadow is not None:  # a shadow that cannot load never stops the champion
            shadow.holder.start()
        min_lookback = int(serve.get("lookback") or 1)
        acfg = serve.get("actuator") or {}
        loop = ServeLoop(ScorerPolicy("model", HeldScorer(holder), RollbackPolicy(policy),
                                      str(serve["model"])),
                         src, act, decision_log, lookback=max(min_lookback, holder.lookback),
                         metrics=metrics, health=health, model_version=lambda: holder.version,
                         clock=clock, ack=src.ack,
                         retry_backoff_s=float(acfg.get("retry_backoff_s", 5.0)),
                         retry_backoff_max_s=float(acfg.get("retry_backoff_max_s", 300.0)))
        if http:
            h = dict(serve.get("http") or {})
            server = ObservabilityServer(metrics, health, host=h.get("host"),
                                         port=config_int(h.get("port") or 0, "serve.http.port",
                                                         low=0, high=65535))
            board = _install_endpoints(server, deployments, stale_after_s=3 * interval_s,
                                       allow_unauthenticated=bool(h.get("allow_unauthenticated")))
            server.start()
    except BaseException:
        holder.stop()
        if shadow is not None:
            shadow.holder.stop()
        decision_log.close()
        if server is not None:
            server.stop()
        raise
    return Service(holder, loop, deployments=deployments, interval_s=interval_s,
                   min_lookback=min_lookback, source=src, actuator=act, discovery=discovery,
                   server=server, board=board, shadow=shadow)


def _install_endpoints(server: ObservabilityServer, deployments: list[dict[str, Any]], *,
                       stale_after_s: float, allow_unauthenticated: bool = False) -> VerdictBoard:
    """The Argo/Flagger verdict endpoints (canaryml.serving.endpoints) on the same server."""
    from canaryml.serving import endpoints

    board = endpoints.VerdictBoard(deployments)
    endpoints.install(server, board, token=endpoints.token_from_env(),
                      stale_after_s=stale_after_s,
                      allow_unauthenticated=(allow_unauthenticated
                                             or endpoints.allow_unauthenticated_from_env()))
    return board
