"""`canaryml serve [serve.…=…] [policy.…=…]`: the live controller.

The task composes the config into typed arguments and runs `canaryml.serving.service`: a
Service (scheduling, discovery, resume, HTTP) around the ServeLoop, whose loop body is
`Controller.step` — the same as `canaryml replay`'s. See that module for the composition and
the discovery annotations.

The loop stops after `serve.max_ticks` ticks or `serve.duration_s` seconds (null = forever) or
on SIGTERM/SIGINT, finishing the current tick and closing the source and the decision log.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, cast

from omegaconf import DictConfig, OmegaConf

from canaryml.control.policy import PolicyConfig
from canaryml.errors import ConfigError
from canaryml.serving.service import (
    KubeDiscovery,
    Service,
    build,
    kube_api_client,
    labels_match,
)

__all__ = ["KubeDiscovery", "Service", "build", "kube_api_client", "labels_match", "run"]

log = logging.getLogger(__name__)


@contextmanager
def stop_on_signals() -> Iterator[threading.Event]:
    """An event SIGTERM/SIGINT set (the current tick finishes, then the loop stops), the
    previous handlers restored on exit; in a non-main thread just an event."""
    stop = threading.Event()
    previous: dict[signal.Signals, Any] = {}
    if threading.current_thread() is threading.main_thread():
        def on_signal(signum: int, _frame: Any) -> None:
            log.info("received %s: finishing the current tick, then stopping",
                     signal.Signals(signum).name)
            stop.set()

        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, on_signal)
    try:
        yield stop
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


# serve keys that moved to policy.* (one key per seed parameter, read by replay and serve alike)
MOVED_TO_POLICY = {("interval_s",): "policy.monitoring_interval_s",
                   ("actuator", "canary_batch_size"): "policy.canary_batch_size"}


def refuse_removed_keys(serve: dict[str, Any]) -> None:
    """A user config (e.g. an older `serve=cluster` option) still setting a key that moved to
    `policy.*` is refused with the new key, never silently ignored."""
    for path, new in MOVED_TO_POLICY.items():
        node: Any = serve
        for part in path:
            node = node.get(part) if isinstance(node, dict) else None
        if node is not None:
            old = "serve." + ".".join(path)
            raise ConfigError(f"{old} is gone: use {new} (one key, read by replay and serve "
                              "alike)")


def refuse_nothing_to_watch(serve: dict[str, Any]) -> None:
    """A controller with no deployment to watch would tick forever deciding nothing: say so.
    (The Kafka source learns its deployments from the topic's keys.)"""
    kind = (serve.get("source") or {}).get("kind")
    if not serve.get("deployments") and not serve.get("discover") and kind != "kafka":
        raise ConfigError(
            "serve has no deployment to watch: list them in serve.deployments (e.g. "
            "'serve.deployments=[{id: web, selectors: {canary: \"app=\\\"web\\\",track="
            "\\\"canary\\\"\"}}]'), discover them with serve.discover={namespace: …, "
            "label_selector: …}, or read them from a topic with serve.source.kind=kafka")


def run(cfg: DictConfig) -> int:
    from canaryml import tracking

    serve = cast(dict[str, Any], OmegaConf.to_container(cfg.serve, resolve=True))
    refuse_removed_keys(serve)
    refuse_nothing_to_watch(serve)
    pcfg = PolicyConfig.from_mapping(cast(dict, OmegaConf.to_container(cfg.policy, resolve=True)))
    tracking.configure(cfg.mlflow.tracking_uri)
    catalog = list(cast(dict, OmegaConf.to_container(cfg.metrics, resolve=True)))
    service = build(serve, pcfg, catalog_names=catalog)
    url = service.server.url if service.server is not None else "-"
    shadow = service.shadow
    print(f"canaryml serve: model {service.holder.version or 'none (pausing)'} from "
          f"{serve['model']}, http {url}, decision log {serve['decision_log']}"
          + ("" if shadow is None else f", shadow {shadow.holder.version or 'not loaded'} "
             f"from {serve['shadow']['model']} (logged, never applied)"), flush=True)
    try:
        with stop_on_signals() as stop:
            ticks = service.run(max_ticks=serve.get("max_ticks"),
                                duration_s=serve.get("duration_s"), stop=stop)
    finally:
        service.close()
    print(f"canaryml serve: stopped after {ticks} tick(s), {service.entries} decision(s), "
          f"{service.holder.swaps} model swap(s), model {service.holder.version or 'none'}")
    if shadow is not None:
        t = shadow.tally
        print(f"canaryml serve: shadow {shadow.holder.version or 'none'}: {t.decisions} would-be "
              f"decision(s), agreement {t.agreement if t.agreement is not None else float('nan'):.3f}"
              f", would-be catches {t.outcomes['catch']}, false rollbacks "
              f"{t.outcomes['false_rollback']}, misses {t.outcomes['miss']}")
    return 0
