"""`canaryml forward [forward.…=…]`: the telemetry forwarder, Prometheus → Kafka.

Pulls the catalog's metrics of every `forward.deployments` entry (default `serve.deployments`)
from Prometheus each `forward.interval_s` and produces them to `forward.kafka.topic` in the event
format `canaryml serve serve.source.kind=kafka` consumes (canaryml.serving.forward). Stops after
`forward.max_ticks` ticks or `forward.duration_s` seconds (null = forever) or on SIGTERM/SIGINT,
flushing what it produced.
"""

from __future__ import annotations

import logging
import signal
import threading
from typing import Any, cast

from omegaconf import DictConfig, OmegaConf

from canaryml.serving.forward import build

log = logging.getLogger(__name__)


def run(cfg: DictConfig) -> int:
    fwd = cast(dict[str, Any], OmegaConf.to_container(cfg.forward, resolve=True))
    catalog = list(cast(dict, OmegaConf.to_container(cfg.metrics, resolve=True)))
    forwarder, server = build(fwd, catalog)
    stop = threading.Event()
    previous: dict[signal.Signals, Any] = {}
    if threading.current_thread() is threading.main_thread():
        def on_signal(signum: int, _frame: Any) -> None:
            log.info("received %s: finishing the current tick, then stopping",
                     signal.Signals(signum).name)
            stop.set()

        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, on_signal)
    interval = float(fwd.get("interval_s") or fwd["step_s"])
    print(f"canaryml forward: {len(forwarder.deployments)} deployment(s), "
          f"{len(forwarder.source.metrics)} metric(s) from {forwarder.source.client.url} to "
          f"{fwd['kafka']['topic']} every {interval:g} s, http "
          f"{server.url if server is not None else '-'}", flush=True)
    try:
        ticks = forwarder.run(interval_s=interval, max_ticks=fwd.get("max_ticks"),
                              duration_s=fwd.get("duration_s"), stop=stop)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        forwarder.close()
        if server is not None:
            server.stop()
    print(f"canaryml forward: stopped after {ticks} tick(s), {forwarder.produced} event(s) "
          "delivered")
    return 0
