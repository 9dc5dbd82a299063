"""HTTP server benchmark under hostile clients → experiments/benchmarks/http.json.

The controller's real HTTP server (`ObservabilityServer` with the Argo/Flagger endpoints and a
bearer token) runs in its own process (`python -m canaryml.bench.http --serve`), so its
resident memory (VmRSS, VmHWM from /proc) is measured alone. Against it, at the same time:

* `clients` parallel well-formed, authenticated clients (one connection each; Argo verdict
  GETs and Flagger rollout-check POSTs, alternating) — latency p50/p99 reported;
* the hostile mix (`HOSTILE`): bodies over the size limit (announced and actually sent), slow
  clients dribbling headers or a body (slowloris), bad Content-Length values, chunked bodies,
  deeply nested JSON, garbage request lines — each must get its 4xx (or be dropped), never a
  500, and must not starve the well-formed clients.

`hostile_round(...)` is also what tests/integration/test_http_hostile.py runs (it asserts
answers and memory, never timings; speed is this benchmark's job).
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import platform
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from canaryml.data.atomic import atomic_write_json

TOKEN = "bench-token"
DEPLOYMENT = {"id": "api", "namespace": "demo", "rollout": "api", "flagger": "api"}
ARGO = "/api/v1/argo/verdict"
FLAGGER = "/api/v1/flagger/rollout-check"
HOST = "127.0.0.1"


# ---- the server process ------------------------------------------------------------------
def _serve(read_timeout_s: float, backlog: int | None = None,
           request_deadline_s: float | None = None) -> None:
    """Run the real server until stdin closes; print its port first."""
    from canaryml.control.types import Action, Decision
    from canaryml.serving.endpoints import VerdictBoard, install
    from canaryml.serving.server import (
        BACKLOG,
        REQUEST_DEADLINE_S,
        Health,
        ObservabilityServer,
        ServeMetrics,
    )

    server = ObservabilityServer(ServeMetrics(), Health(), host=HOST, port=0,
                                 read_timeout_s=read_timeout_s,
                                 backlog=BACKLOG if backlog is None else backlog,
                                 request_deadline_s=REQUEST_DEADLINE_S
                                 if request_deadline_s is None else request_deadline_s)
    board = VerdictBoard([DEPLOYMENT])
    install(server, board, token=TOKEN, stale_after_s=3600)
    board.update("api", Decision(Action.CONTINUE, "ok", 0.1), "bench/1", time.time())
    with server:
        print(server.port, flush=True)
        sys.stdin.read()  # the parent closes stdin to stop us


@dataclass
class ServerProcess:
    proc: subprocess.Popen[str]
    port: int

    @classmethod
    def start(cls, read_timeout_s: float = 1.0, backlog: int | None = None,
              request_deadline_s: float | None = None) -> ServerProcess:
        env = {k: v for k, v in os.environ.items() if k != "CANARYML_HTTP_HOST"}
        proc = subprocess.Popen([sys.executable, "-m", "canaryml.bench.http", "--serve",
                                 "--read-timeout-s", str(read_timeout_s),
                                 *([] if backlog is None else ["--backlog", str(backlog)]),
                                 *([] if request_deadline_s is None else
                                   ["--request-deadline-s", str(request_deadline_s)])],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                env=env)
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line.strip().isdigit():
            proc.kill()
            raise RuntimeError(f"the bench server did not start (printed {line!r})")
        return cls(proc, int(line))

    def memory_kb(self) -> dict[str, int]:
        """VmRSS and VmHWM (peak RSS) of the server process, in KiB."""
        out = {}
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "Threads"):
                out[key] = int(value.split()[0])
        return out

    def stop(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


# ---- clients -----------------------------------------------------------------------------
def _well_formed(port: int, i: int) -> tuple[int, float]:
    """One authenticated request on a fresh connection; (status, seconds)."""
    t0 = time.perf_counter()
    conn = http.client.HTTPConnection(HOST, port, timeout=60)
    try:
        auth = {"Authorization": f"Bearer {TOKEN}"}
        if i % 2:
            conn.request("GET", f"{ARGO}?namespace=demo&rollout=api", headers=auth)
        else:
            body = json.dumps({"name": "api", "namespace": "demo", "phase": "Progressing",
                               "metadata": {"token": TOKEN}})
            conn.request("POST", FLAGGER, body=body,
                         headers={**auth, "Content-Type": "application/json"})
        resp = conn.getresponse()
        resp.read()
        return resp.status, time.perf_counter() - t0
    finally:
        conn.close()


def _raw(port: int, data: bytes, *, wait_s: float = 20.0) -> bytes:
    """Send `data` on a fresh connection; the answer's first bytes, or b"" when dropped."""
    try:
        with socket.create_connection((HOST, port), timeout=wait_s) as s:
            with contextlib.suppress(OSError):  # the server may close before a refused
                s.sendall(data)  # body is all sent
            return _answer(s)
    except OSError:
        return b""


def _answer(s: socket.socket) -> bytes:
    chunks: list[bytes] = []
    try:
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
            got = b"".join(chunks)
            if b"\r\n\r\n" in got:
                head, _, body = got.partition(b"\r\n\r\n")
                length = next((int(h.split(b":")[1]) for h in head.split(b"\r\n")
                               if h.lower().startswith(b"content-length:")), 0)
                if len(body) >= length:
                    break
    except OSError:
        pass
    return b"".join(chunks)


def _slow(port: int, data: bytes, every_s: float, total_s: float) -> bytes:
    """Dribble `data` one byte every `every_s` for at most `total_s`, then read the answer
    (what a slowloris client does; b"" when the server dropped it)."""
    try:
        with socket.create_connection((HOST, port), timeout=total_s + 20) as s:
            deadline = time.monotonic() + total_s
            for b in data:
                if time.monotonic() > deadline:
                    return b"(client gave up)"
                try:
                    s.sendall(bytes([b]))
                except OSError:
                    return _answer(s)
                time.sleep(every_s)
            return _answer(s)
    except OSError:
        return b""


def _post(path: str, body: bytes, extra: str = "") -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n{extra}\r\n"
            ).encode() + body


def _hostile_cases(slow_clients: int) -> list[tuple[str, Callable[[int], bytes], tuple[int, ...]]]:
    """(name, client, acceptable statuses; 0 = the server dropped the connection)."""
    huge = 50 * 1024 * 1024
    head = (f"POST {FLAGGER} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {huge}\r\n\r\n").encode()
    nested = b"[" * 200_000 + b"]" * 200_000
    cases: list[tuple[str, Callable[[int], bytes], tuple[int, ...]]] = [
        ("huge_body_announced", lambda p: _raw(p, head + b"x" * 65536), (413,)),
        ("huge_body_sent", lambda p: _raw(p, _post(FLAGGER, b"{" + b" " * (4 << 20) + b"}")),
         (413, 0)),
        ("bad_content_length_text", lambda p: _raw(
            p, f"POST {FLAGGER} HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n".encode()),
         (400,)),
        ("bad_content_length_negative", lambda p: _raw(
            p, f"POST {FLAGGER} HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n".encode()),
         (400,)),
        ("content_length_longer_than_body", lambda p: _raw(
            p, _post(FLAGGER, b'{"name": "api"}').replace(b"Content-Length: 15",
                                                           b"Content-Length: 900")),
         (400, 0)),  # the server waits for 900 bytes, then drops the silent client
        ("chunked_body", lambda p: _raw(
            p, f"POST {FLAGGER} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
               "5\r\nhello\r\n0\r\n\r\n".encode()), (411,)),
        ("deeply_nested_json", lambda p: _raw(p, _post(FLAGGER, nested)), (400,)),
        ("garbage_request_line", lambda p: _raw(p, b"\x16\x03\x01 GARBAGE\r\n\r\n"), (400, 0)),
        ("unauthenticated", lambda p: _raw(p, f"GET {ARGO}?rollout=api HTTP/1.1\r\nHost: x"
                                              "\r\nConnection: close\r\n\r\n".encode()), (401,)),
    ]
    slow_head = f"GET {ARGO}?rollout=api HTTP/1.1\r\nHost: x\r\n".encode()
    slow_body = _post(FLAGGER, json.dumps({"name": "api", "namespace": "demo",
                                           "metadata": {"token": TOKEN}}).encode())
    def slow(data: bytes) -> Callable[[int], bytes]:
        return lambda p: _slow(p, data, every_s=0.2, total_s=4.0)

    for k in range(slow_clients):  # slowloris: headers, or a body, one byte at a time
        cases.append((f"slowloris_{'headers' if k % 2 else 'body'}",
                      slow(slow_head if k % 2 else slow_body), (408, 0)))
    return cases


def _status(answer: bytes) -> int:
    if answer == b"(client gave up)":
        return -1
    if not answer.startswith(b"HTTP/1."):
        return 0
    return int(answer.split(b" ", 2)[1])


@dataclass
class RoundResult:
    well_formed: list[tuple[int, float]] = field(default_factory=list)
    hostile: list[tuple[str, int, tuple[int, ...]]] = field(default_factory=list)
    memory_before_kb: dict[str, int] = field(default_factory=dict)
    memory_after_kb: dict[str, int] = field(default_factory=dict)
    wall_s: float = 0.0

    def unexpected(self) -> list[tuple[str, int, tuple[int, ...]]]:
        return [h for h in self.hostile if h[1] not in h[2]]


def hostile_round(server: ServerProcess, *, clients: int = 500, requests_per_client: int = 2,
                  slow_clients: int = 40, hostile_repeats: int = 3) -> RoundResult:
    """`clients` parallel well-formed clients while the hostile mix runs (bounded: every
    client has a timeout, the slow ones give up after 4 s)."""
    out = RoundResult(memory_before_kb=server.memory_kb())
    t0 = time.perf_counter()
    cases = [c for _ in range(hostile_repeats) for c in _hostile_cases(0)]
    cases += _hostile_cases(slow_clients)[len(_hostile_cases(0)):]
    start = threading.Barrier(clients + 1, timeout=60)
    lock = threading.Lock()

    def client(i: int) -> None:
        start.wait()
        for k in range(requests_per_client):
            try:
                got = _well_formed(server.port, i + k)
            except OSError:
                got = (0, float("nan"))  # reset or refused: counted as not answered
            with lock:
                out.well_formed.append(got)

    def hostile(case: tuple[str, Callable[[int], bytes], tuple[int, ...]]) -> None:
        name, run, ok = case
        status = _status(run(server.port))
        with lock:
            out.hostile.append((name, status, ok))

    with ThreadPoolExecutor(max_workers=clients) as good, \
            ThreadPoolExecutor(max_workers=len(cases)) as bad:
        futures = [good.submit(client, i) for i in range(clients)]
        hostile_futures = [bad.submit(hostile, c) for c in cases]
        start.wait()
        for f in futures + hostile_futures:
            f.result(timeout=120)
    out.wall_s = time.perf_counter() - t0
    out.memory_after_kb = server.memory_kb()
    return out


# ---- the suite ---------------------------------------------------------------------------
def _versions() -> dict[str, Any]:
    import numpy

    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"python": platform.python_version(), "platform": platform.platform(),
            "machine": platform.machine(), "cpu": cpu, "cpus": os.cpu_count(),
            "numpy": numpy.__version__, "load1_before": os.getloadavg()[0]}


def run(out_dir: Path, clients: int = 500, requests_per_client: int = 2, slow_clients: int = 40,
        rounds: int = 3, plain_requests: int = 400,
        request_deadline_s: float = 2.0) -> dict[str, Any]:
    import numpy as np

    machine = _versions()
    server = ServerProcess.start(read_timeout_s=1.0, request_deadline_s=request_deadline_s)
    try:
        idle_kb = server.memory_kb()
        # normal verdict requests alone, sequential: the latency floor
        plain = [_well_formed(server.port, i) for i in range(plain_requests)]
        rounds_out = [hostile_round(server, clients=clients,
                                    requests_per_client=requests_per_client,
                                    slow_clients=slow_clients) for _ in range(rounds)]
        time.sleep(2.0)  # let the slow connections' threads finish
        final_kb = server.memory_kb()
    finally:
        server.stop()
    plain_ms = np.array([s for _, s in plain]) * 1e3
    well = [w for r in rounds_out for w in r.well_formed]
    lat_ms = np.array([s for st, s in well if st == 200]) * 1e3
    hostile: dict[str, dict[str, int]] = {}
    for r in rounds_out:
        for name, status, _ in r.hostile:
            hostile.setdefault(name, {})
            hostile[name][str(status)] = hostile[name].get(str(status), 0) + 1
    summary = {
        "plain_verdict_ms_p50": float(np.percentile(plain_ms, 50)),
        "plain_verdict_ms_p99": float(np.percentile(plain_ms, 99)),
        "under_attack_ms_p50": float(np.percentile(lat_ms, 50)),
        "under_attack_ms_p99": float(np.percentile(lat_ms, 99)),
        "under_attack_ms_max": float(lat_ms.max()),
        "well_formed_requests": len(well),
        "well_formed_answered_200": int(sum(1 for st, _ in well if st == 200)),
        "hostile_requests": sum(len(r.hostile) for r in rounds_out),
        # slow clients (a byte every 0.2 s for up to 4 s) cut by the server's request deadline
        # (408 or dropped) vs still held when they gave up
        "slowloris_cut_by_server": sum(
            1 for r in rounds_out for name, status, _ in r.hostile
            if name.startswith("slowloris") and status in (408, 0)),
        "slowloris_held_until_client_gave_up": sum(
            1 for r in rounds_out for name, status, _ in r.hostile
            if name.startswith("slowloris") and status == -1),
        "hostile_unexpected": sum(len(r.unexpected()) for r in rounds_out),
        "hostile_5xx": sum(1 for r in rounds_out for _, status, _ in r.hostile
                           if 500 <= status < 600),
        "rss_mb_idle": idle_kb["VmRSS"] / 1024,
        "rss_mb_after": final_kb["VmRSS"] / 1024,
        "rss_mb_peak": final_kb["VmHWM"] / 1024,
        "round_wall_s": [round(r.wall_s, 2) for r in rounds_out],
    }
    result = {
        "setup": {"clients": clients, "requests_per_client": requests_per_client,
                  "slow_clients": slow_clients, "rounds": rounds,
                  "plain_requests": plain_requests, "server_read_timeout_s": 1.0,
                  "server_request_deadline_s": request_deadline_s,
                  "server": "canaryml.serving.server.ObservabilityServer + endpoints.install "
                            "(bearer token), own process on 127.0.0.1",
                  "clients_what": "one connection per request; Argo verdict GET and Flagger "
                                  "rollout-check POST alternating"},
        "summary": summary, "hostile_statuses": hostile,
        "machine": {**machine, "load1_after": os.getloadavg()[0]},
    }
    atomic_write_json(Path(out_dir) / "http.json", result)
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--serve", action="store_true", help="run the server (used by the bench)")
    ap.add_argument("--read-timeout-s", type=float, default=1.0)
    ap.add_argument("--backlog", type=int, default=None, help="listen backlog (server default)")
    ap.add_argument("--request-deadline-s", type=float, default=None,
                    help="time to receive a whole request (server default)")
    ap.add_argument("--out-dir", default="experiments/benchmarks")
    args = ap.parse_args(argv)
    if args.serve:
        _serve(args.read_timeout_s, args.backlog, args.request_deadline_s)
        return 0
    print(json.dumps(run(Path(args.out_dir))["summary"], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
