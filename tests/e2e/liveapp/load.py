"""Load generator and process helpers for the live canary test."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import requests

REPO = Path(__file__).resolve().parents[3]


def start_app(port: int, version: str, log: Path, *extra: str) -> subprocess.Popen[bytes]:
    """Start one version of the service as its own process; wait until it answers."""
    with open(log, "ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "tests.e2e.liveapp.app", "--port",
                                 str(port), "--version", version, *extra],
                                cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"app {version} exited with {proc.returncode}; see {log}")
        try:
            if requests.get(f"http://127.0.0.1:{port}/metrics", timeout=0.5).ok:
                return proc
        except requests.RequestException:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"app {version} did not answer on port {port}")


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


class LoadGenerator:
    """`threads_per_target` threads per target, each at most `rate_per_thread` req/s."""

    def __init__(self, targets: Sequence[str], threads_per_target: int = 2,
                 rate_per_thread: float = 5.0) -> None:
        self.targets = list(targets)
        self.n = threads_per_target
        self.period_s = 1.0 / rate_per_thread
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.sent = 0
        self.errors = 0

    def _run(self, url: str) -> None:
        with requests.Session() as s:
            while not self._stop.is_set():
                t0 = time.monotonic()
                try:
                    s.get(url, timeout=10)
                    self.sent += 1
                except requests.RequestException:
                    self.errors += 1
                self._stop.wait(max(0.0, self.period_s - (time.monotonic() - t0)))

    def start(self) -> LoadGenerator:
        for url in self.targets:
            for _ in range(self.n):
                t = threading.Thread(target=self._run, args=(url,), daemon=True)
                t.start()
                self._threads.append(t)
        return self

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(12)
