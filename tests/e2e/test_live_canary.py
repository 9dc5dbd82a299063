"""Live end-to-end canary: real service processes, real Prometheus, Kafka, a trained scorer,
the serving loop, and the Kubernetes actuator against the API emulator.

  * the service (tests/e2e/liveapp) runs as three processes: the stable version, a canary with
    a latency-creep fault switched on at start (acting `FAULT_ONSET_S` after start) and a
    healthy canary of the same new version; a load generator drives all three;
  * a real Prometheus scrapes them every second; a bridge publishes the same telemetry to a
    real Kafka-protocol broker (tansu);
  * a CanaryScorer trained in the test on the synthetic corpus scores 1-second windows through
    `Controller` + `ServeLoop` (Prometheus source, durable decision log) and acts through
    `DeploymentActuator` on Deployments held by kmock; the Argo verdict endpoint answers from
    the same decisions (VerdictBoard);
  * asserted: the faulty canary is rolled back after the fault started and before its SLO
    breach (p99 latency over the catalog SLO, measured from the service's own histogram in
    Prometheus); the healthy canary is promoted and never rolled back; Kafka carried the creep.

When `canaryml serve` (src/canaryml/tasks/serve.py) exists this still drives the same
components in-process so it can observe each decision's wall time.
"""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests

from canaryml.catalog import Catalog
from canaryml.control.controller import Controller
from canaryml.control.policies import ScorerPolicy
from canaryml.control.policy import PolicyConfig, RollbackPolicy
from canaryml.control.types import Action, Decision
from canaryml.serving.actuators import DeploymentActuator, DeploymentTarget
from canaryml.serving.decision_log import DecisionLog
from canaryml.serving.endpoints import ARGO_VERDICT, VerdictBoard, install
from canaryml.serving.loop import ServeLoop
from canaryml.serving.prometheus import PrometheusSource, Selectors
from canaryml.serving.server import Health, ObservabilityServer, ServeMetrics
from tests.e2e.liveapp.bridge import PromToKafkaBridge
from tests.e2e.liveapp.load import LoadGenerator, start_app, stop
from tests.harness.kafka import free_port, start_tansu
from tests.harness.kube import DEPLOYMENTS, start_kube
from tests.harness.prometheus import INSTALL, find_binary, start_prometheus

pytestmark = [pytest.mark.slow, pytest.mark.services]

STEP_S = 1.0
FAULT_ONSET_S = 40.0  # after the faulty canary starts: lookback filled, scorer trained
CREEP_S_PER_S = 0.03  # p99 latency grows ~30 ms per second after onset → SLO in ~30 s
NS = "shop"
# PromQL templates (`{selector}` → the group's label matchers), 5 s rate windows
APP_QUERIES = {
    "request_rate": "sum(rate(http_requests_total{{selector}}[5s]))",
    "error_rate": ('(sum(rate(http_requests_total{{selector},code=~"5.."}[5s])) or vector(0))'
                   " / sum(rate(http_requests_total{{selector}}[5s]))"),
    **{f"latency_p{q}": ("histogram_quantile(0." + q + ", sum by (le) "
                         "(rate(http_request_duration_seconds_bucket{{selector}}[5s])))")
       for q in ("50", "95", "99")},
    "app_cpu": "sum(rate(process_cpu_seconds_total{{selector}}[5s]))",
    "app_memory": "sum(process_resident_memory_bytes{{selector}})",
}
# Infra metrics from a real node exporter on this host: both groups share the node, as pods on
# one node do; `+ 0 * sum(up{selector})` ties each series to the group's target being up.
_UP = " + 0 * sum(up{{selector}})"
INFRA_QUERIES = {
    "node_cpu": '(1 - avg(rate(node_cpu_seconds_total{mode="idle"}[5s])))' + _UP,
    "node_memory": "(1 - sum(node_memory_MemAvailable_bytes) / sum(node_memory_MemTotal_bytes))"
                   + _UP,
    "net_rx": "sum(rate(node_network_receive_bytes_total[5s]))" + _UP,
    "net_tx": "sum(rate(node_network_transmit_bytes_total[5s]))" + _UP,
    "disk_io": ("(sum(rate(node_disk_read_bytes_total[5s])) + "
                "sum(rate(node_disk_written_bytes_total[5s])))") + _UP,
    "storage_latency": ("(sum(rate(node_disk_io_time_seconds_total[5s])) / "
                        "clamp_min(sum(rate(node_disk_reads_completed_total[5s])) + "
                        "sum(rate(node_disk_writes_completed_total[5s])), 1))") + _UP,
    "load1": "avg(node_load1)" + _UP,
}
P99 = APP_QUERIES["latency_p99"]


@contextmanager
def node_exporter(log: Path) -> Iterator[str]:
    port = free_port()
    binary = find_binary("prometheus-node-exporter") or find_binary("node_exporter")
    if binary is None:
        pytest.fail("prometheus-node-exporter is not installed; run as root: " + INSTALL)
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [binary, f"--web.listen-address=127.0.0.1:{port}", "--collector.disable-defaults",
             "--collector.cpu", "--collector.meminfo", "--collector.netdev",
             "--collector.diskstats", "--collector.loadavg"], stdout=out,
            stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                if requests.get(f"http://127.0.0.1:{port}/metrics", timeout=0.5).ok:
                    break
            except requests.RequestException:
                if time.monotonic() > deadline or proc.poll() is not None:
                    pytest.fail(f"node exporter did not start; see {log}")
                time.sleep(0.1)
        yield f"127.0.0.1:{port}"
    finally:
        stop(proc)


@dataclass
class Acted:
    at_s: float
    deployment_id: str
    action: Action
    reason: str
    score: float | None


class RecordingActuator:
    """The real DeploymentActuator, with the wall time of each acting call recorded."""

    def __init__(self, inner: DeploymentActuator) -> None:
        self.inner = inner
        self.acted: list[Acted] = []

    def apply(self, deployment_id: str, decision: Decision, step: int) -> None:
        self.inner.apply(deployment_id, decision, step)
        if decision.action is not Action.CONTINUE:
            self.acted.append(Acted(time.time(), deployment_id, decision.action,
                                    decision.reason, decision.score))


class BoardDecider:
    """Controller wrapper that posts each decision to the VerdictBoard (as `serve` does)."""

    def __init__(self, controller: Controller, board: VerdictBoard) -> None:
        self.controller, self.board = controller, board

    def decide(self, deployment_id: str, now_s: float) -> Decision:
        d = self.controller.decide(deployment_id, now_s)
        self.board.update(deployment_id, d, "e2e-scorer", now_s)
        return d

    def state(self, deployment_id: str) -> dict[str, Any]:
        return self.controller.state(deployment_id)

    def restore(self, deployment_id: str, state: dict[str, Any]) -> None:
        self.controller.restore(deployment_id, state)


def _train_scorer(root: Path) -> Any:
    from canaryml.data.dataset import CanonicalDataset
    from canaryml.models.networks import NetworkSpec
    from canaryml.models.synthetic import make_corpus
    from canaryml.models.train import TrainerSpec, TrainSpec, train_scorer

    ds = CanonicalDataset(make_corpus(root / "corpus", n=20, steps=90, seed=4))
    spec = TrainSpec(network=NetworkSpec(lookback=16, horizon=3, hidden=16),
                     trainer=TrainerSpec(max_epochs=1, stride=3, progress_bar=False,
                                         num_threads=1), seed=0)
    return train_scorer(ds, spec).scorer


def _query_range(url: str, q: str, start: float, end: float) -> list[tuple[float, float]]:
    body = requests.get(url + "/api/v1/query_range", timeout=10, params={
        "query": q, "start": start, "end": end, "step": STEP_S}).json()
    result = body["data"]["result"]
    return [] if not result else [(float(t), float(v)) for t, v in result[0]["values"]]


def _first_breach(url: str, selector: str, slo: float, start: float) -> float | None:
    """First time the service's own p99 latency (its histogram, in Prometheus) exceeds `slo`."""
    for t, v in _query_range(url, P99.replace("{selector}", selector), start, time.time()):
        if np.isfinite(v) and v > slo:
            return t
    return None


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[dict[str, Any]]:
    with ExitStack() as es:
        ports = {name: free_port() for name in ("stable", "bad", "good")}
        t_start = time.time()
        procs = {
            "stable": start_app(ports["stable"], "v1", tmp_path / "stable.log"),
            "bad": start_app(ports["bad"], "v2", tmp_path / "bad.log", "--fault", "latency",
                             "--fault-onset-s", str(FAULT_ONSET_S),
                             "--creep-s-per-s", str(CREEP_S_PER_S)),
            "good": start_app(ports["good"], "v2", tmp_path / "good.log"),
        }
        bad_onset = t_start + FAULT_ONSET_S  # a lower bound: the process started after t_start
        for p in procs.values():
            es.callback(stop, p)
        load = LoadGenerator([f"http://127.0.0.1:{p}/" for p in ports.values()]).start()
        es.callback(load.stop)
        node = es.enter_context(node_exporter(tmp_path / "node.log"))
        prom = es.enter_context(start_prometheus(
            tmp_path / "prom", [f"127.0.0.1:{p}" for p in ports.values()] + [node],
            scrape_interval_s=1))
        broker = es.enter_context(start_tansu(tmp_path / "tansu"))
        broker.create_topic("canary-telemetry", 2)
        kube = es.enter_context(start_kube())
        yield {"ports": ports, "prom": prom, "broker": broker, "kube": kube, "load": load,
               "bad_onset": bad_onset, "t_start": t_start}


def test_faulty_canary_rolled_back_before_slo_breach_and_healthy_promoted(
        stack: dict[str, Any], tmp_path: Path) -> None:
    ports, prom, kube = stack["ports"], stack["prom"], stack["kube"]
    sel = {name: f'instance="127.0.0.1:{port}"' for name, port in ports.items()}
    deployments = {
        "web-bad": (sel["bad"], DeploymentTarget(NS, "web-v2-canary-a", "web-a")),
        "web-good": (sel["good"], DeploymentTarget(NS, "web-v2-canary-b", "web-b")),
    }
    for _, target in deployments.values():
        kube.put(DEPLOYMENTS, NS, target.canary, {"spec": {"replicas": 1}})
        kube.put(DEPLOYMENTS, NS, target.stable, {"spec": {"replicas": 4}})

    scorer = _train_scorer(tmp_path)  # the service keeps serving and being scraped meanwhile
    metrics = tuple(scorer.metrics)
    queries = {m: {**APP_QUERIES, **INFRA_QUERIES}[m] for m in metrics}
    source = PrometheusSource(prom, queries, {d: Selectors(s, sel["stable"])
                                              for d, (s, _) in deployments.items()},
                              step_s=STEP_S, metrics=metrics, timeout_s=5, retries=1)
    policy = RollbackPolicy(PolicyConfig(
        rollback_threshold=0.5, monitoring_interval_s=1.0, consecutive_breaches=2,
        warmup_s=5.0, batch_interval_s=15.0, max_batches=3))
    board = VerdictBoard([{"id": d, "namespace": NS, "canary": t.canary, "stable": t.stable}
                          for d, (_, t) in deployments.items()])
    controller = Controller(ScorerPolicy("model", scorer, policy), source)
    actuator = RecordingActuator(DeploymentActuator(
        kube.api_client, {d: t for d, (_, t) in deployments.items()}, retries=1))
    slo = Catalog.default().get("latency_p99").slo
    assert slo is not None

    bridge = PromToKafkaBridge(prom, stack["broker"].bootstrap, "canary-telemetry",
                               {d: {"canary": s, "baseline": sel["stable"]}
                                for d, (s, _) in deployments.items()},
                               {m: APP_QUERIES[m] for m in ("latency_p99", "request_rate")})
    bridge.start()
    stop_loop = threading.Event()
    with DecisionLog(tmp_path / "decisions.sqlite") as dlog, \
            ObservabilityServer(ServeMetrics(), Health()) as http:
        install(http, board, token=None, stale_after_s=10)
        loop = ServeLoop(BoardDecider(controller, board), actuator, dlog, policy="model")
        runner = threading.Thread(target=loop.run, args=(lambda: list(deployments), 1.0,
                                                         stop_loop.is_set), daemon=True)
        runner.start()
        breach: float | None = None
        verdicts: dict[str, str] = {}
        deadline = stack["bad_onset"] + 75
        try:
            while time.time() < deadline:
                time.sleep(2)
                for d in deployments:
                    verdicts[d] = requests.get(http.url + ARGO_VERDICT, params={"deployment": d},
                                               timeout=5).json()["verdict"]
                done = {a.deployment_id for a in actuator.acted
                        if a.action in (Action.ROLLBACK, Action.PROMOTE)}
                breach = breach or _first_breach(prom, sel["bad"], slo, stack["t_start"])
                if done == set(deployments) and breach is not None:
                    break
        finally:
            stop_loop.set()
            runner.join(15)
        entries = dlog.pending()  # nothing left un-applied
        assert entries == []

    acted = {(a.deployment_id, a.action): a.at_s for a in actuator.acted}
    rolled_back = acted.get(("web-bad", Action.ROLLBACK))
    assert rolled_back is not None, (
        f"the faulty canary was not rolled back; last decisions: {actuator.acted[-4:]}")
    assert breach is not None, "the faulty canary never breached its SLO during the test"
    assert rolled_back >= stack["bad_onset"], "rolled back before the fault even started"
    assert rolled_back < breach, (f"rollback {rolled_back - breach:+.1f} s after the SLO breach")
    lead_s = breach - rolled_back

    assert ("web-good", Action.PROMOTE) in acted, (
        f"healthy canary not promoted; last decisions: {actuator.acted[-4:]}")
    assert not any(a.deployment_id == "web-good" and a.action in (Action.ROLLBACK, Action.SHRINK)
                   for a in actuator.acted)
    # the Kubernetes side: replicas moved back to stable for the bad canary only
    bad_t, good_t = deployments["web-bad"][1], deployments["web-good"][1]
    assert kube.get(DEPLOYMENTS, NS, bad_t.canary)["spec"]["replicas"] == 0
    assert kube.get(DEPLOYMENTS, NS, bad_t.stable)["spec"]["replicas"] == 5
    good = kube.get(DEPLOYMENTS, NS, good_t.canary)
    assert good["spec"]["replicas"] == 1
    assert good["metadata"]["annotations"]["canaryml.io/last-action"] == "promote"
    assert verdicts == {"web-bad": "fail", "web-good": "pass"}

    # Kafka carried the same telemetry: the bad canary's p99 rose above the stable's (the
    # bridge keeps publishing while a fresh consumer group joins)
    from canaryml.serving.kafka import KafkaSource

    es = ExitStack()
    es.callback(bridge.stop)
    ks = KafkaSource(stack["broker"].bootstrap, "canary-telemetry", "e2e-check",
                     ["latency_p99", "request_rate"], step_s=STEP_S, buffer_steps=600)
    try:
        deadline_k = time.monotonic() + 20
        while time.monotonic() < deadline_k and "web-bad" not in ks.owned():
            ks.poll(0.5)
        ks.poll(0.5)
        time.sleep(3)
        ks.poll(0.5)
        w = ks.window("web-bad", time.time(), 60)
    finally:
        ks.close()
        es.close()
    assert bridge.produced > 0
    can, base = w.canary[:, 0], w.baseline[:, 0] if w.baseline is not None else None
    assert base is not None and np.nanmax(can) > 5 * np.nanmedian(base)
    print(f"\nlead time before SLO breach: {lead_s:.1f} s; rollback "
          f"{rolled_back - stack['bad_onset']:.1f} s after fault onset")
