"""Live Kafka source: telemetry events keyed by deployment, consumed in a consumer group.

Event (JSON value, key = deployment_id)::

    {"deployment_id": "d1", "group": "canary", "metric": "latency_p99", "value": 0.41,
     "timestamp": 1764187200.0}          # epoch seconds or ISO-8601

- Each deployment has a ring buffer on the step grid (`buffer_steps` long). Out-of-order events
  land at their timestamp's grid slot; a duplicate (same slot) overwrites: last wins.
- Consumer-group membership spreads partitions, hence deployments, over controller replicas;
  `owned()` lists the deployments this replica holds. On assignment the consumer seeks back
  `buffer_steps` steps in time (when the broker supports it) so a new owner has history.
- `enable.auto.commit=false`: `fetch()` remembers which offsets a window covered; the loop calls
  `ack(deployment_id)` after the decision is in the decision log, and only then are offsets
  committed — the lowest offset still needed by any undecided deployment of a partition.
- A tick acks all its deployments with `ack_many(deployment_ids)`: one synchronous offset commit
  per tick instead of one per deployment.
- Event-driven ticks: `ready()` lists the deployments with a complete new step since their last
  window — every series the deployment sends per step has arrived for its newest slot (the
  widest step seen so far), or `settle_s` passed since that slot's first event — each with that
  slot, so a controller decides as soon as a step is in instead of at its next timer tick.
- When the broker is unreachable `fetch()` raises `SourceError` (the controller pauses);
  `broker_down()` says so without fetching (serve reports it in `/healthz` as component
  `kafka` and counts each outage), and `stats["broker_down"]` counts outages.
- Rejected, counted in `stats` and never buffered: malformed events (`invalid`), a value or
  timestamp that is NaN or infinite (`non_finite`), and an event dated more than
  `max_future_s` after the controller's clock (`future`) — one such event would otherwise
  become the buffer's newest slot and make every real event "late".
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections import defaultdict, deque
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from typing import Any

import numpy as np

from canaryml.control.types import Window
from canaryml.errors import ConfigError, SourceError

log = logging.getLogger(__name__)

GROUPS = ("canary", "baseline")


def parse_timestamp(raw: Any) -> float:
    if isinstance(raw, int | float):
        return float(raw)
    ts = datetime.fromisoformat(str(raw).replace("Z", "+00:00"))
    return ts.timestamp()


class KafkaSource:
    """`MetricSource` over a Kafka topic of telemetry events (see module docstring)."""

    def __init__(self, bootstrap_servers: str, topic: str, group_id: str, metrics: Sequence[str],
                 *, step_s: float, buffer_steps: int = 720, poll_timeout_s: float = 0.2,
                 config: Mapping[str, Any] | None = None, max_future_s: float = 300.0,
                 clock: Callable[[], float] = time.time, settle_s: float = 5.0) -> None:
        if step_s <= 0 or buffer_steps < 1:
            raise ConfigError(f"step_s={step_s} must be > 0 and buffer_steps={buffer_steps} >= 1 "
                              "(serve.step_s, serve.source.kafka.buffer_steps)")
        if not max_future_s >= 0:
            raise ConfigError(f"max_future_s={max_future_s} must be >= 0 seconds "
                              "(serve.source.kafka.max_future_s)")
        from confluent_kafka import Consumer

        self.topic = topic
        self.metrics = tuple(metrics)
        self._col = {m: j for j, m in enumerate(self.metrics)}
        self.step_s = float(step_s)
        self.buffer_steps = int(buffer_steps)
        self.poll_timeout_s = poll_timeout_s
        self.max_future_s = float(max_future_s)
        self.clock = clock
        self.settle_s = float(settle_s)
        self._last_wait = float("-inf")  # monotonic time of the last waiting poll in fetch()
        conf: dict[str, Any] = {
            "bootstrap.servers": bootstrap_servers,
            "group.id": group_id,
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
            "partition.assignment.strategy": "range",
            "error_cb": self._on_error,
        }
        conf.update(config or {})
        if conf.get("enable.auto.commit") not in (False, "false"):
            raise ConfigError("enable.auto.commit must stay false: offsets are committed only "
                              "after the decision is logged (KafkaSource.ack)")
        self.consumer = Consumer(conf)
        self.consumer.subscribe([topic], on_assign=self._on_assign, on_revoke=self._on_revoke)
        # deployment -> group -> grid index -> float32[M]
        self._buf: dict[str, dict[str, dict[int, np.ndarray]]] = {}
        self._partition_of: dict[str, int] = {}
        self._pending: dict[int, dict[str, deque[int]]] = defaultdict(dict)  # offsets not acked
        self._position: dict[int, int] = {}  # next offset to consume per partition
        self._committed: dict[int, int] = {}
        self._fetched: dict[str, dict[int, int]] = {}  # offsets a fetched window covered
        # per deployment: newest slot, cells filled per recent slot, widest step seen, the
        # slot its last window ended on, and when its newest slot's first event arrived
        self._newest: dict[str, int] = {}
        self._fill: dict[str, dict[int, int]] = {}
        self._width: dict[str, int] = {}
        self._windowed: dict[str, int] = {}
        self._first_seen: dict[str, float] = {}
        self._candidates: set[str] = set()  # newest slot past their last window: ready() scans
        self._down: str | None = None
        self.stats = {"events": 0, "duplicates": 0, "late": 0, "out_of_order": 0, "invalid": 0,
                      "unknown_metric": 0, "non_finite": 0, "future": 0, "broker_down": 0}

    # --- consumer-group callbacks ------------------------------------------------------------
    def _on_error(self, err: Any) -> None:
        from confluent_kafka import KafkaError

        if err.code() in (KafkaError._ALL_BROKERS_DOWN, KafkaError._TRANSPORT,
                          KafkaError._RESOLVE) or err.fatal():
            if self._down is None:
                self.stats["broker_down"] += 1
            self._down = str(err)
        log.warning("kafka: %s", err)

    def _on_assign(self, consumer: Any, partitions: list[Any]) -> None:
        from confluent_kafka import TopicPartition

        self._forget_except({p.partition for p in partitions})
        try:
            committed = consumer.committed(partitions, timeout=5)
            since_ms = int((time.time() - self.buffer_steps * self.step_s) * 1000)
            by_time = consumer.offsets_for_times(
                [TopicPartition(p.topic, p.partition, since_ms) for p in partitions], timeout=5)
            start = []
            for c, t in zip(committed, by_time, strict=True):
                if c.offset >= 0:
                    self._committed[c.partition] = c.offset
                off = t.offset if t.offset >= 0 else c.offset
                if c.offset >= 0 and off >= 0:
                    off = min(off, c.offset)  # re-read history, commit only what is new
                start.append(TopicPartition(c.topic, c.partition, off))
            consumer.assign(start)
        except Exception as exc:
            log.warning("kafka: could not seek back for history (%s); starting at committed", exc)
            consumer.assign(partitions)
        log.info("kafka: assigned partitions %s", sorted(p.partition for p in partitions))

    def _on_revoke(self, consumer: Any, partitions: list[Any]) -> None:
        # commit what is decided; buffers stay until on_assign says which partitions moved away
        self._commit()
        log.info("kafka: revoked partitions %s", sorted(p.partition for p in partitions))

    def _forget_except(self, kept: set[int]) -> None:
        """Drop buffers of deployments whose partition is not ours any more; offsets restart."""
        for dep in [d for d, p in self._partition_of.items() if p not in kept]:
            self._buf.pop(dep, None)
            self._partition_of.pop(dep, None)
            for book in (self._newest, self._fill, self._width, self._windowed, self._first_seen):
                book.pop(dep, None)  # type: ignore[attr-defined]
            self._candidates.discard(dep)
        self._fetched.clear()
        self._pending.clear()  # re-read from the committed offsets, so rebuilt
        self._position.clear()
        self._committed.clear()

    # --- consuming ---------------------------------------------------------------------------
    def poll(self, timeout_s: float | None = None, max_messages: int = 100_000) -> int:
        """Consume what is available (waiting up to `timeout_s` for the first); returns count."""
        timeout = self.poll_timeout_s if timeout_s is None else timeout_s
        n = 0
        while n < max_messages:
            msgs = self.consumer.consume(num_messages=1000, timeout=timeout if n == 0 else 0)
            if not msgs:
                break
            for msg in msgs:
                if msg.error():
                    log.warning("kafka: %s", msg.error())
                    continue
                self._down = None
                n += 1
                self._ingest(int(msg.partition() or 0), int(msg.offset() or 0), msg.key(), msg.value())
        return n

    def _ingest(self, partition: int, offset: int, key: bytes | None, value: bytes | None) -> None:
        self._position[partition] = max(self._position.get(partition, 0), offset + 1)
        try:
            ev = json.loads(value or b"")
            dep = str(ev.get("deployment_id") or (key or b"").decode())
            group, metric = str(ev["group"]), str(ev["metric"])
            val, ts = float(ev["value"]), parse_timestamp(ev["timestamp"])
            if group not in GROUPS:
                raise ValueError(f"group {group!r}")
        except (ValueError, KeyError, TypeError, AttributeError, OverflowError) as exc:
            self.stats["invalid"] += 1
            log.warning("kafka: skipping invalid event at partition=%d offset=%d: %s",
                        partition, offset, exc)
            return
        if not (math.isfinite(val) and math.isfinite(ts)):
            self.stats["non_finite"] += 1
            log.warning("kafka: skipping event at partition=%d offset=%d for deployment=%s: "
                        "value=%r timestamp=%r must be finite (send no event for a missed "
                        "scrape)", partition, offset, dep, val, ts)
            return
        ahead_s = ts - self.clock()
        if ahead_s > self.max_future_s:
            self.stats["future"] += 1
            log.warning("kafka: skipping event at partition=%d offset=%d for deployment=%s "
                        "dated %.0f s in the future (> max_future_s=%g); check the producer's "
                        "clock", partition, offset, dep, ahead_s, self.max_future_s)
            return
        if offset >= self._committed.get(partition, 0):  # history re-reads are never pending
            self._pending[partition].setdefault(dep, deque()).append(offset)
        self._partition_of[dep] = partition
        j = self._col.get(metric)
        if j is None:
            self.stats["unknown_metric"] += 1
            return
        slot = math.floor(ts / self.step_s)
        groups = self._buf.setdefault(dep, {})
        ring = groups.setdefault(group, {})
        newest = self._newest.get(dep, slot)  # the newest slot buffered (a running maximum)
        if slot <= newest - self.buffer_steps:
            self.stats["late"] += 1
            return
        row = ring.get(slot)
        if row is None:
            row = ring[slot] = np.full(len(self.metrics), np.nan, dtype=np.float32)
        elif not math.isnan(row[j]):
            self.stats["duplicates"] += 1
        if math.isnan(row[j]):
            self._filled(dep, slot, newest)
        if slot < newest:  # out of order but inside the buffer: placed by its timestamp
            self.stats["out_of_order"] += 1
        row[j] = val
        self.stats["events"] += 1
        if len(ring) > self.buffer_steps + self.buffer_steps // 4:
            cutoff = max(ring) - self.buffer_steps
            for s in [s for s in ring if s <= cutoff]:
                del ring[s]

    def _filled(self, dep: str, slot: int, newest: int) -> None:
        """Bookkeeping of `ready()`: one more (group, metric) cell of `slot` has a value."""
        fill = self._fill.setdefault(dep, {})
        fill[slot] = fill.get(slot, 0) + 1
        self._candidates.add(dep)
        if slot > newest or dep not in self._newest:
            self._newest[dep] = slot
            self._first_seen[dep] = time.monotonic()
            # the slots before the new newest one are complete as far as width goes
            self._width[dep] = max([self._width.get(dep, 0),
                                    *(n for s, n in fill.items() if s < slot)])
            for s in [s for s in fill if s < slot - 2]:
                del fill[s]

    def ready(self) -> list[tuple[str, int]]:
        """(deployment, slot) for each deployment whose newest slot is newer than the end of
        its last window and complete: as many series as the widest step it has sent, or its
        first event `settle_s` ago (a deployment's very first step waits `settle_s`)."""
        now = time.monotonic()
        out = []
        for dep in list(self._candidates):
            slot = self._newest[dep]
            if slot <= self._windowed.get(dep, slot - 1):
                self._candidates.discard(dep)  # back when a newer slot arrives (_filled)
                continue
            width = self._width.get(dep, 0)
            if (width and self._fill[dep].get(slot, 0) >= width) or \
                    now - self._first_seen.get(dep, now) >= self.settle_s:
                out.append((dep, slot))
        return sorted(out, key=lambda ds: (ds[1], ds[0]))

    def refresh(self) -> str | None:
        """Between ticks: learn the partition assignment (a non-blocking poll), then say why the
        broker is unreachable, or None."""
        self.poll(0)
        return self.broker_down()

    def wire(self, entry: dict[str, Any]) -> str | None:
        """Events are keyed by deployment id: nothing to configure per deployment."""
        return None

    def owned(self) -> set[str]:
        """Deployments seen on the partitions this replica currently holds."""
        return set(self._buf) | set(self._partition_of)

    def broker_down(self) -> str | None:
        """Why the broker is unreachable, or None when it answers (probes it, ≤ 1 s, only
        after the client reported it down)."""
        if self._down is None:
            return None
        try:
            self.consumer.list_topics(self.topic, timeout=1.0)
        except Exception as exc:
            return (f"kafka broker unreachable ({self._down}; {exc}); check "
                    "serve.source.kafka.bootstrap_servers and the broker")
        self._down = None
        return None

    def _check_up(self) -> None:
        down = self.broker_down()
        if down is not None:
            raise SourceError(down)

    def fetch(self, deployment_id: str, now_s: float, lookback: int) -> Window:
        # wait for new events at most once per poll_timeout_s: a tick over N deployments must
        # not wait N × poll_timeout_s when the topic is quiet; later fetches only drain
        waited_recently = time.monotonic() - self._last_wait < self.poll_timeout_s
        if not waited_recently:
            self._last_wait = time.monotonic()
        self.poll(0 if waited_recently else None)
        self._check_up()
        return self.window(deployment_id, now_s, lookback)

    def window(self, deployment_id: str, now_s: float, lookback: int) -> Window:
        """The buffered window (no polling); remembers the offsets it covers for `ack`."""
        if lookback < 1:
            raise ConfigError(f"lookback={lookback} must be >= 1")
        end = math.floor(now_s / self.step_s)
        slots = np.arange(end - lookback + 1, end + 1, dtype=np.int64)
        out: dict[str, np.ndarray] = {}
        groups = self._buf.get(deployment_id, {})
        for g in GROUPS:
            arr = np.full((lookback, len(self.metrics)), np.nan, dtype=np.float32)
            ring = groups.get(g, {})
            for i, s in enumerate(slots):
                row = ring.get(int(s))
                if row is not None:
                    arr[i] = row
            out[g] = arr
        newest = self._newest.get(deployment_id)
        if newest is not None:
            prev, upto = self._windowed.get(deployment_id), min(end, newest)
            self._windowed[deployment_id] = upto if prev is None else max(prev, upto)
        p = self._partition_of.get(deployment_id)
        pend = self._pending.get(p, {}).get(deployment_id) if p is not None else None
        if p is not None and pend:
            self._fetched[deployment_id] = {p: pend[-1]}
        return Window(deployment_id=deployment_id, now_s=float(now_s),
                      timestamps_s=(slots * self.step_s).astype(np.int64), canary=out["canary"],
                      baseline=out["baseline"], metrics=self.metrics)

    # --- committing --------------------------------------------------------------------------
    def ack(self, deployment_id: str) -> bool:
        """The decision for the last `fetch(deployment_id)` is logged: release its offsets.

        Commits, synchronously, every partition offset no undecided deployment still needs.
        Returns False when the commit failed (it is retried by the next `ack`).
        """
        self.release(deployment_id)
        return self._commit()

    def ack_many(self, deployment_ids: Sequence[str]) -> bool:
        """`ack` for a whole tick: release every deployment's offsets, then ONE commit."""
        for dep in deployment_ids:
            self.release(dep)
        return self._commit()

    def release(self, deployment_id: str) -> None:
        """Bookkeeping half of `ack`: the offsets of the last window are no longer needed."""
        for p, upto in self._fetched.pop(deployment_id, {}).items():
            q = self._pending.get(p, {}).get(deployment_id)
            while q and q[0] <= upto:
                q.popleft()

    def committable(self) -> dict[int, int]:
        """partition -> offset that may be committed now."""
        out = {}
        for p, pos in self._position.items():
            heads = [q[0] for q in self._pending.get(p, {}).values() if q]
            off = min(heads) if heads else pos
            if off > self._committed.get(p, 0):
                out[p] = off
        return out

    def _commit(self) -> bool:
        from confluent_kafka import KafkaException, TopicPartition

        offsets = self.committable()
        if not offsets:
            return True
        try:
            self.consumer.commit(offsets=[TopicPartition(self.topic, p, o)
                                          for p, o in offsets.items()], asynchronous=False)
        except KafkaException as exc:
            log.warning("kafka: commit of %s failed (%s); retried at the next ack", offsets, exc)
            return False
        self._committed.update(offsets)
        return True

    def close(self) -> None:
        self._commit()
        self.consumer.close()
