"""The service under canary: stdlib HTTP server exporting Prometheus metrics.

    python -m tests.e2e.liveapp.app --port 8001 --version v2 [--fault latency|memory]
        [--fault-onset-s 20] [--creep-s-per-s 0.03]

`GET /` answers after a small random delay (a few ms). Metrics on `GET /metrics`:
`http_requests_total{code}`, `http_request_duration_seconds` (histogram), and the default
process collector (`process_cpu_seconds_total`, `process_resident_memory_bytes`).

Faults, switched on at start, acting from `--fault-onset-s` after start:
  * `latency`: every request is delayed by creep × seconds since onset (latency creep);
  * `memory`: the process grows by `--leak-mb-per-s` MiB per second (a leak).
"""

from __future__ import annotations

import argparse
import random
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, Counter, Histogram, generate_latest

BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.5, 5.0, 10.0)
REQUESTS = Counter("http_requests", "Requests served", ["code"])
LATENCY = Histogram("http_request_duration_seconds", "Request latency", buckets=BUCKETS)


class Service:
    def __init__(self, fault: str | None, onset_s: float, creep_s_per_s: float,
                 leak_mb_per_s: float) -> None:
        self.fault = fault
        self.started = time.monotonic()
        self.onset_s = onset_s
        self.creep = creep_s_per_s
        self.leak_mb_per_s = leak_mb_per_s
        self._leak: list[bytearray] = []

    def since_onset(self) -> float:
        return max(0.0, time.monotonic() - self.started - self.onset_s)

    def delay_s(self) -> float:
        delay = random.uniform(0.002, 0.008)
        if self.fault == "latency":
            delay += self.creep * self.since_onset()
        return delay

    def leak_forever(self) -> None:
        while True:
            time.sleep(1.0)
            if self.fault == "memory" and self.since_onset() > 0:
                block = bytearray(int(self.leak_mb_per_s * 2**20))
                block[::4096] = b"x" * len(block[::4096])  # touch pages: resident, not virtual
                self._leak.append(block)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--version", default="v1")
    p.add_argument("--fault", choices=["latency", "memory"], default=None)
    p.add_argument("--fault-onset-s", type=float, default=20.0)
    p.add_argument("--creep-s-per-s", type=float, default=0.03)
    p.add_argument("--leak-mb-per-s", type=float, default=20.0)
    args = p.parse_args(argv)
    svc = Service(args.fault, args.fault_onset_s, args.creep_s_per_s, args.leak_mb_per_s)
    threading.Thread(target=svc.leak_forever, daemon=True).start()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _send(self, code: int, body: bytes, ctype: str) -> None:
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:
            if self.path == "/metrics":
                self._send(200, generate_latest(), CONTENT_TYPE_LATEST)
                return
            t0 = time.perf_counter()
            time.sleep(svc.delay_s())
            self._send(200, f"hello from {args.version}\n".encode(), "text/plain")
            LATENCY.observe(time.perf_counter() - t0)
            REQUESTS.labels("200").inc()

        def log_message(self, fmt: str, *a: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    server.daemon_threads = True
    server.serve_forever()


if __name__ == "__main__":
    main()
