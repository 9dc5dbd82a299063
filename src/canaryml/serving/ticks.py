"""The wall-clock tick loop shared by `canaryml serve` and `canaryml forward`."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable


def run_ticks(tick: Callable[[], object], *, interval_s: float, max_ticks: int | None = None,
              duration_s: float | None = None, stop: threading.Event | None = None) -> int:
    """Call `tick` every `interval_s` (measured from each tick's start) until `max_ticks` ticks,
    `duration_s` seconds or `stop` is set; returns the number of ticks."""
    stop = stop or threading.Event()
    started = time.monotonic()
    n = 0
    while not stop.is_set():
        if max_ticks is not None and n >= max_ticks:
            break
        if duration_s is not None and time.monotonic() - started >= duration_s:
            break
        t0 = time.monotonic()
        tick()
        n += 1
        if max_ticks is not None and n >= max_ticks:
            break
        wait = max(0.0, interval_s - (time.monotonic() - t0))
        if duration_s is not None:
            wait = min(wait, max(0.0, duration_s - (time.monotonic() - started)))
        stop.wait(wait)
    return n
