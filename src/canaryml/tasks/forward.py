"""`canaryml forward [forward.…=…]`: the telemetry forwarder, Prometheus → Kafka.

Pulls the catalog's metrics of every `forward.deployments` entry (default `serve.deployments`)
from Prometheus each `forward.interval_s` and produces them to `forward.kafka.topic` in the event
format `canaryml serve serve.source.kind=kafka` consumes (canaryml.serving.forward). Stops after
`forward.max_ticks` ticks or `forward.duration_s` seconds (null = forever) or on SIGTERM/SIGINT,
flushing what it produced.
"""

from __future__ import annotations

import logging
from typing import Any, cast

from omegaconf import DictConfig, OmegaConf

from canaryml.serving.forward import build
from canaryml.tasks.serve import stop_on_signals

log = logging.getLogger(__name__)


def run(cfg: DictConfig) -> int:
    fwd = cast(dict[str, Any], OmegaConf.to_container(cfg.forward, resolve=True))
    catalog = list(cast(dict, OmegaConf.to_container(cfg.metrics, resolve=True)))
    forwarder, server = build(fwd, catalog)
    interval = float(fwd.get("interval_s") or fwd["step_s"])
    print(f"canaryml forward: {len(forwarder.deployments)} deployment(s), "
          f"{len(forwarder.source.metrics)} metric(s) from {forwarder.source.client.url} to "
          f"{fwd['kafka']['topic']} every {interval:g} s, http "
          f"{server.url if server is not None else '-'}", flush=True)
    try:
        with stop_on_signals() as stop:
            ticks = forwarder.run(interval_s=interval, max_ticks=fwd.get("max_ticks"),
                                  duration_s=fwd.get("duration_s"), stop=stop)
    finally:
        forwarder.close()
        if server is not None:
            server.stop()
    print(f"canaryml forward: stopped after {ticks} tick(s), {forwarder.produced} event(s) "
          "delivered")
    return 0
