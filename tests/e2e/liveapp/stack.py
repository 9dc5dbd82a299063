"""A labelled live stack for the operator-path tests: a stable and a canary version of the
service (tests/e2e/liveapp/app.py) under load, a real node exporter, and a real Prometheus
scraping all three every second with the target labels a Kubernetes scrape config gives them
(`app`, `track`, and the `node` the pod runs on — relabelled from
`__meta_kubernetes_pod_node_name` in a cluster), so the shipped serve queries
(conf/serve/default.yaml) work unchanged, infra metrics joined to each group by `node`."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from tests.e2e.liveapp.load import LoadGenerator, start_app, stop
from tests.harness.prometheus import INSTALL, ensure_prometheus, find_binary, free_port

NODE = "node-a"
SELECTORS = {"canary": 'app="web",track="canary"', "baseline": 'app="web",track="stable"'}


@dataclass
class Stack:
    prom_url: str
    app_ports: dict[str, int]
    node_exporter: str
    load: LoadGenerator


@contextmanager
def node_exporter(log: Path) -> Iterator[str]:
    binary = find_binary("prometheus-node-exporter") or find_binary("node_exporter")
    if binary is None:
        pytest.fail("prometheus-node-exporter is not installed; run as root: " + INSTALL)
    port = free_port()
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


def prometheus_config(apps: dict[str, str], node: str) -> str:
    """Scrape jobs with Kubernetes-like target labels: app/track/node on the service's pods,
    node on the node exporter."""
    lines = ["global:", "  scrape_interval: 1s", "  evaluation_interval: 1s",
             "scrape_configs:", "  - job_name: web", "    scrape_interval: 1s",
             "    scrape_timeout: 1s", "    static_configs:"]
    for track, target in apps.items():
        lines += [f"      - targets: ['{target}']",
                  f"        labels: {{app: web, track: {track}, node: {NODE}}}"]
    lines += ["  - job_name: node-exporter", "    scrape_interval: 1s", "    scrape_timeout: 1s",
              "    static_configs:", f"      - targets: ['{node}']",
              f"        labels: {{node: {NODE}}}"]
    return "\n".join(lines) + "\n"


@contextmanager
def start_labelled_prometheus(workdir: Path, apps: dict[str, str], node: str) -> Iterator[str]:
    binary = ensure_prometheus()
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "prometheus.yml").write_text(prometheus_config(apps, node))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with open(workdir / "prometheus.log", "wb") as logfile:
        proc = subprocess.Popen(
            [binary, f"--config.file={workdir / 'prometheus.yml'}",
             f"--storage.tsdb.path={workdir / 'tsdb'}", f"--web.listen-address=127.0.0.1:{port}",
             "--storage.tsdb.retention.time=1d", "--log.level=warn"],
            stdout=logfile, stderr=subprocess.STDOUT, cwd=workdir)
        try:
            deadline = time.monotonic() + 30
            while True:
                if proc.poll() is not None:
                    pytest.fail(f"prometheus exited: {(workdir / 'prometheus.log').read_text()}")
                try:
                    if requests.get(f"{url}/-/ready", timeout=0.5).ok:
                        break
                except requests.RequestException:
                    pass
                if time.monotonic() > deadline:
                    pytest.fail(f"prometheus on {url} not ready after 30 s")
                time.sleep(0.1)
            yield url
        finally:
            stop(proc)


def query(url: str, q: str) -> list[dict[str, object]]:
    body = requests.get(url + "/api/v1/query", params={"query": q}, timeout=5).json()
    return list(body["data"]["result"])


def wait_until_every_query_answers(url: str, queries: dict[str, str], timeout_s: float = 60.0
                                   ) -> None:
    """Block until every query returns a value for both groups (rates need two scrapes)."""
    from canaryml.ingest.prometheus import render

    deadline = time.monotonic() + timeout_s
    missing: list[str] = list(queries)
    while time.monotonic() < deadline:
        missing = [f"{m}/{g}" for m, q in queries.items() for g, sel in SELECTORS.items()
                   if not query(url, render(q, sel))]
        if not missing:
            return
        time.sleep(0.5)
    pytest.fail(f"Prometheus at {url} has no data for {missing} after {timeout_s:g} s")


@contextmanager
def labelled_stack(tmp_path: Path) -> Iterator[Stack]:
    with ExitStack() as es:
        ports = {"stable": free_port(), "canary": free_port()}
        for track, version in (("stable", "v1"), ("canary", "v2")):
            es.callback(stop, start_app(ports[track], version, tmp_path / f"{track}.log"))
        load = LoadGenerator([f"http://127.0.0.1:{p}/" for p in ports.values()]).start()
        es.callback(load.stop)
        node = es.enter_context(node_exporter(tmp_path / "node.log"))
        url = es.enter_context(start_labelled_prometheus(
            tmp_path / "prom", {t: f"127.0.0.1:{p}" for t, p in ports.items()}, node))
        yield Stack(url, ports, node, load)
