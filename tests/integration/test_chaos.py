"""Issue 16, chaos: a real `canaryml serve` process drives 20 canaries from Kafka (tansu) to
Kubernetes (kmock) while it is killed -9 at seeded random moments and restarted, the broker is
restarted once, PATCHes answer injected 500s and 409s (one landed, the answer lost), and
poisoned events (unknown deployment, non-finite value, far-future timestamp, malformed JSON)
are published. At the end every canary is finished, its replicas match its final decision,
every logged action landed exactly once (landed PATCHes counted per object and step), no
PATCH landed that the log does not hold, and each deployment's steps have no gap."""

from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from canaryml.control.types import Action
from canaryml.serving.decision_log import DecisionLog
from tests.harness.kafka import TansuBroker
from tests.harness.kube import DEPLOYMENTS, KubeHarness, start_kube
from tests.integration.test_serve_faults import until
from tests.integration.test_serve_task import levels

pytestmark = [pytest.mark.slow, pytest.mark.services, pytest.mark.timeout(300)]

NS = "shop"
TOPIC = "canary-telemetry"
N_CANARIES = 20
CANARY_REPLICAS, STABLE_REPLICAS = 3, 7
SEED = 16


def _landed_patches(kube: KubeHarness) -> list[tuple[str, dict[str, Any]]]:
    """Record (object name, body) of every PATCH that changed the object: answered 2xx, or
    answered an injected error after landing (`landed=True` faults)."""
    emu = kube.emulator
    inner = emu._handle
    landed: list[tuple[str, dict[str, Any]]] = []

    async def handle(request: Any) -> Any:
        method = str(getattr(request.method, "value", request.method)).upper()
        before = sum(f.count for f in emu.faults if f.landed)
        resp = await inner(request)
        if method == "PATCH":
            fired_landed = sum(f.count for f in emu.faults if f.landed) < before
            if resp.status < 300 or fired_landed:
                landed.append((request.url.path.rsplit("/", 1)[1], request.data))
        return resp

    emu._handle = handle  # type: ignore[method-assign]
    return landed


class Telemetry:
    """Produces one step per second for every started canary (history backfilled when it
    starts); a bad canary turns 5x latency / 10x errors `bad_after` seconds after its start.
    A canary without a start offset waits for `release` (so every controller incarnation has
    canaries in flight, however fast the machine)."""

    def __init__(self, broker: TansuBroker,
                 plan: dict[str, tuple[float | None, float | None]]) -> None:
        self.broker = broker
        self.plan = plan  # dep -> (start offset s or None: held, bad after s or None)
        self.t0 = time.time()
        self.lock = threading.Lock()  # held while the broker restarts
        self.stop = threading.Event()
        self.started: set[str] = set()
        self.errors: list[str] = []
        self.thread = threading.Thread(target=self._run, name="telemetry", daemon=True)

    def _events(self, dep: str, ts: float, bad: bool) -> Iterator[bytes]:
        for group in ("canary", "baseline"):
            for metric, level in levels().items():
                worse = 1.0
                if bad and group == "canary":
                    worse = 10.0 if metric == "error_rate" else 5.0 if metric.startswith(
                        "latency") else 1.0
                yield json.dumps({"deployment_id": dep, "group": group, "metric": metric,
                                  "value": level * worse, "timestamp": ts}).encode()

    def _run(self) -> None:
        from confluent_kafka import Producer

        producer = None
        while not self.stop.wait(0.5):
            with self.lock:
                if producer is None:
                    producer = Producer({"bootstrap.servers": self.broker.bootstrap,
                                         "linger.ms": 5, "message.timeout.ms": 5000})
                now = time.time()
                for dep, (start, bad_after) in list(self.plan.items()):
                    if start is None or now - self.t0 < start:
                        continue
                    bad = bad_after is not None and now - self.t0 >= start + bad_after
                    stamps = [now - k for k in range(12, -1, -1)] if dep not in self.started \
                        else [now]  # history the scorer needs, then one step per tick
                    self.started.add(dep)
                    for ts in stamps:
                        for ev in self._events(dep, ts, bad):
                            producer.produce(TOPIC, ev, key=dep.encode())
                if producer.flush(5) != 0:
                    self.errors.append(f"undelivered events at {now - self.t0:.1f}s")
                    producer = None  # a fresh producer after the broker restart

    def release(self, deps: list[str], spread_s: float, rng: random.Random) -> None:
        """Start the held canaries `deps` within the next `spread_s` seconds."""
        now = time.time() - self.t0
        with self.lock:
            for d in deps:
                self.plan[d] = (now + rng.uniform(0, spread_s), self.plan[d][1])

    def poison(self) -> None:
        """Events the controller must reject without harm."""
        from confluent_kafka import Producer

        p = Producer({"bootstrap.servers": self.broker.bootstrap})
        now, dep = time.time(), "c00"
        good = {"deployment_id": dep, "group": "canary", "metric": "error_rate", "value": 0.01,
                "timestamp": now}
        for value in (
                json.dumps({**good, "deployment_id": "ghost"}).encode(),  # unknown deployment
                json.dumps({**good, "value": float("nan")}).encode(),  # non-finite value
                json.dumps({**good, "value": float("inf")}).encode(),
                json.dumps({**good, "timestamp": now + 10 * 365 * 86400}).encode(),  # future
                b'{"deployment_id": "c00", "group": "canary", "metric": ',  # malformed JSON
                b"\xff\xfe not json at all"):
            p.produce(TOPIC, value, key=dep.encode())
        assert p.flush(10) == 0


def _deployments_override(deps: list[str]) -> str:
    items = ", ".join(f"{{id: {d}, namespace: {NS}, canary: {d}-canary, stable: {d}-stable}}"
                      for d in deps)
    return f"serve.deployments=[{items}]"


def _decided(log_path: Path) -> int:
    """Rows in the decision log (read-only; the controller writes it concurrently)."""
    if not log_path.is_file():
        return 0
    try:
        db = sqlite3.connect(f"file:{log_path}?mode=ro", uri=True, timeout=5)
        try:
            return int(db.execute("SELECT count(*) FROM decisions").fetchone()[0])
        finally:
            db.close()
    except sqlite3.OperationalError:  # schema not created yet
        return 0


def _finished(log_path: Path, deps: list[str]) -> bool:
    """Every deployment has a terminal decision and nothing is left unapplied."""
    if not log_path.is_file():
        return False
    db = sqlite3.connect(f"file:{log_path}?mode=ro", uri=True, timeout=5)
    try:
        final = {r[0] for r in db.execute(
            "SELECT deployment_id FROM decisions WHERE action IN ('rollback', 'promote') "
            "AND applied=1")}
        pending = db.execute("SELECT count(*) FROM decisions WHERE applied=0").fetchone()[0]
    except sqlite3.OperationalError:
        return False
    finally:
        db.close()
    return final >= set(deps) and pending == 0


def test_chaos_kills_broker_restart_api_faults_and_poison_never_lose_or_repeat_an_action(
        tmp_path: Path, tiny_scorer_dir: Path) -> None:
    rng = random.Random(SEED)
    deps = [f"c{i:02d}" for i in range(N_CANARIES)]
    # 8 bad canaries (rolled back), the others promoted; each start group holds both kinds
    bad = set(rng.sample(deps[:10], 4) + rng.sample(deps[10:15], 2) + rng.sample(deps[15:], 2))
    # 10 canaries start at once (staggered over 8 s); 5 more after each of the first two kills
    held = [deps[10:15], deps[15:]]
    plan: dict[str, tuple[float | None, float | None]] = {
        d: (rng.uniform(0, 8) if i < 10 else None,
            rng.uniform(2, 8) if d in bad else None) for i, d in enumerate(deps)}
    log_path = tmp_path / "decisions.sqlite"

    broker = TansuBroker(tmp_path / "tansu")
    broker.start()
    telemetry = Telemetry(broker, plan)
    procs: list[subprocess.Popen[bytes]] = []
    with start_kube() as kube:
        for d in deps:
            kube.put(DEPLOYMENTS, NS, f"{d}-canary", {"spec": {"replicas": CANARY_REPLICAS}})
            kube.put(DEPLOYMENTS, NS, f"{d}-stable", {"spec": {"replicas": STABLE_REPLICAS}})
        landed = _landed_patches(kube)
        # API faults on PATCH: a 500 retried inside one apply, a 409 whose write landed (the
        # answer lost), and one outage longer than an apply's retries (retried on later ticks)
        for name in rng.sample([f"{d}-canary" for d in deps], 5):
            kube.inject("PATCH", 500, name=name)
        for name in rng.sample([f"{d}-stable" for d in sorted(bad)[:-1]], 3):
            kube.inject("PATCH", 409, landed=True, name=name)
        outage = f"{sorted(bad)[-1]}-stable"
        kube.inject("PATCH", 500, count=5, name=outage)
        cmd = [sys.executable, "-m", "canaryml", "serve", f"serve.model={tiny_scorer_dir}",
               f"serve.decision_log={log_path}", "serve.http.port=0", "serve.step_s=1",
               "serve.lookback=1", "serve.source.kind=kafka",
               f"serve.source.kafka.bootstrap_servers={broker.bootstrap}",
               f"serve.source.kafka.topic={TOPIC}", "serve.source.kafka.session_timeout_ms=6000",
               "serve.source.kafka.poll_timeout_s=0.2", "serve.source.kafka.buffer_steps=120",
               "serve.actuator.kind=deployment", f"serve.actuator.kube_host=http://127.0.0.1:"
               f"{kube.port}", "serve.actuator.retries=2", "serve.actuator.retry_backoff_s=0.2",
               "serve.actuator.retry_backoff_max_s=1", "serve.actuator.request_timeout_s=5",
               _deployments_override(deps), "policy.monitoring_interval_s=0.5",
               "policy.warmup_s=0", "policy.consecutive_breaches=2",
               "policy.rollback_strategy=immediate", "policy.batch_interval_s=2",
               "policy.max_batches=3"]
        env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}

        def launch() -> subprocess.Popen[bytes]:
            n = len(procs)
            with open(tmp_path / f"serve-{n}.out", "wb") as out, \
                    open(tmp_path / f"serve-{n}.err", "wb") as err:
                proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env, cwd=tmp_path)
            procs.append(proc)
            return proc

        def alive(proc: subprocess.Popen[bytes]) -> None:
            if proc.poll() is not None:
                err = (tmp_path / f"serve-{procs.index(proc)}.err").read_text()[-3000:]
                raise AssertionError(f"serve exited with {proc.returncode}: {err}")

        def decides(proc: subprocess.Popen[bytes], more: int, timeout_s: float = 60) -> None:
            """Wait until this incarnation has logged `more` new decisions."""
            start = _decided(log_path)

            def check() -> bool:
                alive(proc)
                return _decided(log_path) >= start + more
            until(check, timeout_s, f"{more} new decisions", every_s=0.1)

        try:
            broker.create_topic(TOPIC, 2)
            telemetry.thread.start()
            proc = launch()
            for k in range(3):  # three kill -9s at random moments, each after some progress
                decides(proc, 1 + rng.randrange(15))
                if k == 1:  # the broker goes away under the second incarnation, once
                    telemetry.poison()
                    with telemetry.lock:
                        broker.stop()
                        time.sleep(rng.uniform(1, 2))
                        broker.start()
                        broker.create_topic(TOPIC, 2)  # in-memory storage: starts empty
                    decides(proc, 5)
                    telemetry.poison()
                time.sleep(rng.uniform(0, 1.5))
                proc.send_signal(signal.SIGKILL)
                proc.wait(10)
                proc = launch()
                if k < len(held):
                    telemetry.release(held[k], 4.0, rng)
            until(lambda: (alive(proc), _finished(log_path, deps))[1], 120,
                  "every canary finished and applied", every_s=0.25)
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(30) == 0
        finally:
            telemetry.stop.set()
            telemetry.thread.join(10)
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait(10)
            broker.stop()

        objects = {d: (kube.get(DEPLOYMENTS, NS, f"{d}-canary"),
                       kube.get(DEPLOYMENTS, NS, f"{d}-stable")) for d in deps}
        fired = [(f.name, f.status) for f in kube.emulator.faults if f.count == 0]
        kube_sent = [s for s in kube.sent if s.method == "PATCH"]

    assert len([p for p in procs if p.returncode == -signal.SIGKILL]) == 3
    assert (outage, 500) in fired  # 5 × 500: failed one apply's 3 attempts, retried on later ticks
    assert len(fired) >= 6, fired  # most injected faults were hit (the rest: no action came)
    errs = "\n".join(p.read_text() for p in sorted(tmp_path.glob("serve-*.err")))
    assert "skipping invalid event" in errs and "must be finite" in errs
    assert "in the future" in errs

    with DecisionLog(log_path) as log:
        entries = log.entries()
    by_dep: dict[str, list[Any]] = {}
    for e in entries:
        by_dep.setdefault(e.deployment_id, []).append(e)
    assert set(by_dep) == set(deps)  # "ghost" never got a decision
    expected: Counter[tuple[str, int, str]] = Counter()
    for d, es in by_dep.items():
        assert [e.step for e in es] == list(range(len(es))), d  # no gap, no repeat
        assert all(e.applied and not e.skipped for e in es), d  # none lost
        terminal = [e for e in es if e.action in (Action.ROLLBACK, Action.PROMOTE)]
        assert len(terminal) == 1 and terminal[0] is es[-1], (d, [e.action for e in es])
        final = es[-1]
        assert final.action is (Action.ROLLBACK if d in bad else Action.PROMOTE), d
        canary, stable = objects[d]
        want = (0, CANARY_REPLICAS + STABLE_REPLICAS) if final.action is Action.ROLLBACK \
            else (CANARY_REPLICAS, STABLE_REPLICAS)
        assert (canary["spec"]["replicas"], stable["spec"]["replicas"]) == want, d
        ann = canary["metadata"]["annotations"]
        assert (ann["canaryml.io/last-step"], ann["canaryml.io/last-action"]) == (
            str(final.step), str(final.action)), d
        for e in es:
            if e.action is not Action.CONTINUE:
                expected[(f"{d}-canary", e.step, str(e.action))] += 1
            if e.action is Action.ROLLBACK:
                expected[(f"{d}-stable", e.step, str(e.action))] += 1
    got = Counter((name, int(body["metadata"]["annotations"]["canaryml.io/last-step"]),
                   body["metadata"]["annotations"]["canaryml.io/last-action"])
                  for name, body in landed)
    twice = {k: n for k, n in got.items() if n > 1}
    assert not twice, f"actions applied more than once: {twice}"
    assert got == expected, (f"lost: {expected - got}; landed without a logged decision: "
                             f"{got - expected}")
    pauses = sum(1 for es in by_dep.values() for e in es if e.action is Action.PAUSE)
    assert pauses > 0  # the broker restart paused the canaries in flight
    print(f"chaos: {len(entries)} decisions, {pauses} pauses, {len(landed)} landed PATCHes, "
          f"{len(kube_sent)} PATCH requests, faults fired {fired}")
