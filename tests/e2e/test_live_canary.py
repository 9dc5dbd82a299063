"""Live end-to-end canary: real service processes, real Prometheus, Kafka, a trained scorer,
`canaryml serve`, and the Kubernetes actuator against the API emulator.

  * the service (tests/e2e/liveapp) runs as three processes: the stable version, a canary with
    a latency-creep fault switched on at start (acting `FAULT_ONSET_S` after start) and a
    healthy canary of the same new version; a load generator drives all three;
  * a real Prometheus scrapes them every second; a bridge publishes the same telemetry to a
    real Kafka-protocol broker (tansu);
  * a CanaryScorer trained in the test on the synthetic corpus is registered as
    `canary-scorer@champion` in an MLflow SQLite store; the serve task (`canaryml serve
    serve=e2e`, the user's own conf/serve/e2e.yaml) loads it, decides every second from
    Prometheus and acts through `DeploymentActuator` on Deployments held by kmock; the Argo
    verdict endpoint of the same process is polled while it runs;
  * asserted: the faulty canary is rolled back after the fault started and before its SLO
    breach (p99 latency over the catalog SLO, measured from the service's own histogram in
    Prometheus); the healthy canary is promoted and never rolled back; Kafka carried the creep.
"""

from __future__ import annotations

import contextlib
import shutil
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
import yaml

from canaryml import tracking
from canaryml.catalog import Catalog
from canaryml.cli import compose
from canaryml.control.types import Action
from canaryml.serving.actuators import DeploymentTarget
from canaryml.serving.decision_log import DecisionLog
from canaryml.serving.endpoints import ARGO_VERDICT
from canaryml.tasks import serve as serve_task
from tests.conftest import REPO
from tests.e2e.liveapp.bridge import PromToKafkaBridge
from tests.e2e.liveapp.load import LoadGenerator, start_app, stop
from tests.e2e.liveapp.stack import node_exporter
from tests.harness.kafka import free_port, start_tansu
from tests.harness.kube import DEPLOYMENTS, start_kube
from tests.harness.prometheus import start_prometheus

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
        stack: dict[str, Any], tmp_path: Path, mlflow_uri: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
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
    with tracking.start_run({}, run_name="e2e-scorer"):
        tracking.log_scorer(scorer, "canary-scorer", alias="champion")
    metrics = list(scorer.metrics)
    slo = Catalog.default().get("latency_p99").slo
    assert slo is not None

    bridge = PromToKafkaBridge(prom, stack["broker"].bootstrap, "canary-telemetry",
                               {d: {"canary": s, "baseline": sel["stable"]}
                                for d, (s, _) in deployments.items()},
                               {m: APP_QUERIES[m] for m in ("latency_p99", "request_rate")})
    bridge.start()
    # `canaryml serve` itself, with the user's own serve config file (conf/serve/e2e.yaml)
    http_port = free_port()
    conf = tmp_path / "conf"
    shutil.copytree(REPO / "conf", conf)
    log_path = tmp_path / "decisions.sqlite"
    deadline = stack["bad_onset"] + 75
    (conf / "serve" / "e2e.yaml").write_text(yaml.safe_dump({
        "defaults": ["default", "_self_"],
        "model": "models:/canary-scorer@champion", "model_poll_s": 5,
        "step_s": STEP_S, "metrics": metrics,
        "duration_s": max(deadline - time.time(), 10.0), "decision_log": str(log_path),
        "deployments": [{"id": d, "namespace": NS, "canary": t.canary, "stable": t.stable,
                         "selectors": {"canary": s, "baseline": sel["stable"]}}
                        for d, (s, t) in deployments.items()],
        "source": {"kind": "prometheus", "prometheus": {
            "url": prom, "timeout_s": 5.0, "retries": 1,
            "queries": {m: {**APP_QUERIES, **INFRA_QUERIES}[m] for m in metrics}}},
        "actuator": {"kind": "deployment", "kube_host": kube.api_client.configuration.host,
                     "retries": 1},
        "http": {"host": "127.0.0.1", "port": http_port}}))
    monkeypatch.setenv("CANARYML_CONF", str(conf))
    cfg = compose("serve", ["serve=e2e", "policy.rollback_threshold=0.5",
                            "policy.monitoring_interval_s=1", "policy.consecutive_breaches=2",
                            "policy.warmup_s=5", "policy.batch_interval_s=15",
                            "policy.max_batches=3"])
    result: dict[str, Any] = {}
    server = threading.Thread(target=lambda: result.setdefault("rc", serve_task.run(cfg)),
                              daemon=True)
    server.start()
    breach: float | None = None
    verdicts: dict[str, str] = {}
    url = f"http://127.0.0.1:{http_port}"
    while server.is_alive():
        time.sleep(2)
        for d in deployments:
            with contextlib.suppress(requests.RequestException):  # not listening yet
                verdicts[d] = requests.get(url + ARGO_VERDICT, params={"deployment": d},
                                           timeout=5).json()["verdict"]
        breach = breach or _first_breach(prom, sel["bad"], slo, stack["t_start"])
    server.join()
    assert result.get("rc") == 0
    with DecisionLog(log_path) as dlog:
        assert dlog.pending() == []  # every decision applied
        entries = dlog.entries()
    acted = {}
    for e in entries:
        if e.action is not Action.CONTINUE:
            acted.setdefault((e.deployment_id, e.action), e.decided_at)
    rolled_back = acted.get(("web-bad", Action.ROLLBACK))
    assert rolled_back is not None, (
        f"the faulty canary was not rolled back; decisions: {sorted(acted.items())}")
    assert breach is not None, "the faulty canary never breached its SLO during the test"
    assert rolled_back >= stack["bad_onset"], "rolled back before the fault even started"
    assert rolled_back < breach, (f"rollback {rolled_back - breach:+.1f} s after the SLO breach")
    lead_s = breach - rolled_back

    assert ("web-good", Action.PROMOTE) in acted, (
        f"healthy canary not promoted; decisions: {sorted(acted.items())}")
    assert ("web-good", Action.ROLLBACK) not in acted and ("web-good", Action.SHRINK) not in acted
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
