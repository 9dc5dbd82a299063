"""Issue 16, hostile clients: the controller's real HTTP server (own process, 127.0.0.1, bearer
token, Argo/Flagger endpoints) under a huge body, slow clients (slowloris), bad Content-Length,
deeply nested JSON and 500 parallel clients. Every well-formed authenticated request is
answered 200, every malformed one gets its 4xx (or is dropped) and never a 500, and the
server's memory stays bounded. Every client has a timeout; no timing is asserted (speed is
`canaryml bench`'s http suite)."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from canaryml.bench.http import ServerProcess, _well_formed, hostile_round

pytestmark = [pytest.mark.services, pytest.mark.timeout(240)]

RSS_GROWTH_BOUND_MB = 64  # measured: ~2 MB of peak growth for a round


@pytest.fixture
def server() -> Iterator[ServerProcess]:
    srv = ServerProcess.start(read_timeout_s=1.0, request_deadline_s=2.0)
    try:
        yield srv
    finally:
        srv.stop()


def _threads_settle(srv: ServerProcess, at_most: int, timeout_s: float = 30.0) -> int:
    deadline = time.monotonic() + timeout_s
    while True:
        n = srv.memory_kb()["Threads"]
        if n <= at_most or time.monotonic() > deadline:
            return n
        time.sleep(0.2)


def test_500_clients_arriving_while_the_server_is_stalled_are_all_answered(
        server: ServerProcess) -> None:
    """The accept loop is stopped (SIGSTOP) while 500 clients connect and send: the listen
    backlog must queue them, not reset them (with the old backlog of 128 ~15 % were reset)."""
    clients = 500
    barrier = threading.Barrier(clients + 1, timeout=60)

    def client(i: int) -> int | str:
        barrier.wait()
        try:
            return _well_formed(server.port, i)[0]
        except OSError as exc:
            return type(exc).__name__

    os.kill(server.proc.pid, signal.SIGSTOP)
    try:
        with ThreadPoolExecutor(max_workers=clients) as pool:
            futures = [pool.submit(client, i) for i in range(clients)]
            barrier.wait()
            time.sleep(1.0)  # every client has connected and sent its request by now
            os.kill(server.proc.pid, signal.SIGCONT)
            got = Counter(f.result(timeout=120) for f in futures)
    finally:
        os.kill(server.proc.pid, signal.SIGCONT)
    assert got == Counter({200: clients}), got


def test_hostile_mix_beside_500_parallel_clients_answers_every_well_formed_request(
        server: ServerProcess) -> None:
    idle = server.memory_kb()
    results = [hostile_round(server, clients=500, requests_per_client=2, slow_clients=40)
               for _ in range(2)]
    for r in results:
        statuses = Counter(status for status, _ in r.well_formed)
        assert statuses == Counter({200: 1000}), statuses  # every well-formed request: 200
        # each malformed request got its 4xx or was dropped; every slow client (a byte every
        # 0.2 s for up to 4 s) was cut by the 2 s request deadline before it gave up
        bad = [(name, status) for name, status, ok in r.hostile if status not in ok]
        assert not bad, bad
        seen = {name: status for name, status, _ in r.hostile}
        assert seen["huge_body_announced"] == 413 and seen["deeply_nested_json"] == 400
        assert seen["bad_content_length_text"] == 400 and seen["chunked_body"] == 411
        assert not any(500 <= status < 600 for _, status, _ in r.hostile)
    # memory bounded, and the slow connections' threads are released once the clients go
    assert _threads_settle(server, idle["Threads"]) <= idle["Threads"]
    peak_growth_mb = (server.memory_kb()["VmHWM"] - idle["VmRSS"]) / 1024
    assert peak_growth_mb < RSS_GROWTH_BOUND_MB, peak_growth_mb
    base = f"http://127.0.0.1:{server.port}"
    assert requests.get(base + "/livez", timeout=10).status_code == 200
    metrics = requests.get(base + "/metrics", timeout=10).text
    assert 'canaryml_errors_total{kind="http"}' not in metrics  # not one 500
