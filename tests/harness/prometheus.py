"""A real Prometheus for tests: the Debian binary on 127.0.0.1, temp TSDB, generated config.

`start_prometheus(workdir, targets)` is a context manager yielding the base URL; the fixtures
below wrap it. The binary is found on PATH or in /usr/bin; when it is missing and the test runs
as root it is installed with apt-get (CI runs these tests, it never skips them); otherwise the
test fails with the install command.

Also here: `exporter` — a `prometheus_client` registry served on 127.0.0.1 from this process,
so a test sets gauge values and Prometheus scrapes them.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
import requests

INSTALL = "apt-get update && apt-get install -y prometheus prometheus-node-exporter"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def find_binary(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    candidate = Path("/usr/bin") / name
    return str(candidate) if candidate.is_file() and os.access(candidate, os.X_OK) else None


def ensure_prometheus() -> str:
    """Path of the `prometheus` binary, installing the Debian package as root if needed."""
    binary = find_binary("prometheus")
    if binary:
        return binary
    is_root = getattr(os, "geteuid", lambda: -1)() == 0
    if is_root and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update"], check=False, env=env, capture_output=True,
                       timeout=300)
        res = subprocess.run(["apt-get", "install", "-y", "prometheus",
                              "prometheus-node-exporter"], check=False, env=env,
                             capture_output=True, text=True, timeout=600)
        binary = find_binary("prometheus")
        if binary:
            return binary
        pytest.fail(f"installing Prometheus failed (exit {res.returncode}): "
                    f"{res.stderr[-500:]}\nInstall it by hand: {INSTALL}")
    pytest.fail(f"the `prometheus` binary is not installed; run as root: {INSTALL}")
    raise AssertionError("unreachable")  # pytest.fail raises


def write_config(path: Path, targets: Sequence[str], scrape_interval_s: float = 1.0) -> Path:
    """A Prometheus config scraping `targets` (host:port) every `scrape_interval_s` seconds."""
    listed = ", ".join(f"'{t}'" for t in targets)
    path.write_text(
        "global:\n"
        f"  scrape_interval: {scrape_interval_s:g}s\n"
        f"  evaluation_interval: {scrape_interval_s:g}s\n"
        "scrape_configs:\n"
        "  - job_name: test\n"
        f"    scrape_interval: {scrape_interval_s:g}s\n"
        f"    scrape_timeout: {min(scrape_interval_s, 10):g}s\n"
        "    honor_labels: true\n"
        f"    static_configs:\n      - targets: [{listed}]\n"
    )
    return path


@contextlib.contextmanager
def start_prometheus(workdir: Path, targets: Sequence[str], scrape_interval_s: float = 1.0,
                     timeout_s: float = 30.0) -> Iterator[str]:
    """Run Prometheus on 127.0.0.1:<free port> scraping `targets`; yield its base URL."""
    binary = ensure_prometheus()
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    config = write_config(workdir / "prometheus.yml", targets, scrape_interval_s)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    logfile = open(workdir / "prometheus.log", "wb")  # noqa: SIM115 - owned by the process
    proc = subprocess.Popen(
        [binary, f"--config.file={config}", f"--storage.tsdb.path={workdir / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{port}", "--storage.tsdb.retention.time=1d",
         "--web.enable-admin-api", "--log.level=warn"],
        stdout=logfile, stderr=subprocess.STDOUT, cwd=workdir)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if proc.poll() is not None:
                pytest.fail(f"prometheus exited with {proc.returncode}: "
                            f"{(workdir / 'prometheus.log').read_text()[-1000:]}")
            try:
                if requests.get(f"{url}/-/ready", timeout=0.5).ok:
                    break
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"prometheus on {url} not ready after {timeout_s}s; see "
                            f"{workdir / 'prometheus.log'}")
            time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
        logfile.close()


def wait_for_scrapes(url: str, query: str, n: int, timeout_s: float = 30.0) -> None:
    """Block until `count_over_time(query[1h])` reaches `n` for some series."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            body = requests.get(f"{url}/api/v1/query",
                                params={"query": f"max(count_over_time({query}[1h]))"},
                                timeout=2).json()
            result = body.get("data", {}).get("result", [])
            if result and float(result[0]["value"][1]) >= n:
                return
        except (requests.RequestException, ValueError, KeyError):
            pass
        time.sleep(0.2)
    pytest.fail(f"prometheus at {url} did not record {n} scrapes of {query} in {timeout_s}s")


@contextlib.contextmanager
def serve_registry(registry: object) -> Iterator[str]:
    """Serve a prometheus_client registry on 127.0.0.1:<free port>; yield `host:port`."""
    from prometheus_client import start_http_server

    port = free_port()
    server, thread = start_http_server(port, addr="127.0.0.1", registry=registry)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture
def prometheus_binary() -> str:
    return ensure_prometheus()


@pytest.fixture
def exporter() -> Iterator[tuple[object, str]]:
    """(registry, target): an empty CollectorRegistry served on 127.0.0.1."""
    from prometheus_client import CollectorRegistry

    registry = CollectorRegistry()
    with serve_registry(registry) as target:
        yield registry, target


@pytest.fixture
def prometheus_url(tmp_path: Path, exporter: tuple[object, str]) -> Iterator[str]:
    """A Prometheus scraping the `exporter` fixture's registry every second."""
    _, target = exporter
    with start_prometheus(tmp_path / "prometheus", [target]) as url:
        yield url
