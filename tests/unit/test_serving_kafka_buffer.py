"""The Kafka source's ring buffer and offset bookkeeping, without a broker (no polling)."""

from __future__ import annotations

import json
from collections.abc import Iterator

import numpy as np
import pytest

from canaryml.serving.kafka import KafkaSource, parse_timestamp

pytestmark = pytest.mark.timeout(60)  # a hung service fails the test, not CI


@pytest.fixture
def source() -> Iterator[KafkaSource]:
    # nothing listens on port 9 (discard); the consumer never connects because we never poll
    src = KafkaSource("127.0.0.1:9", "canary-telemetry", "g", ["latency_p99", "error_rate"],
                      step_s=10, buffer_steps=6)
    yield src
    src.consumer.close()


def ev(dep: str, group: str, metric: str, value: float, ts: float) -> bytes:
    return json.dumps({"deployment_id": dep, "group": group, "metric": metric, "value": value,
                       "timestamp": ts}).encode()


def test_out_of_order_duplicates_and_late_events(source: KafkaSource) -> None:
    off = iter(range(100))
    put = lambda *a: source._ingest(0, next(off), b"d1", ev(*a))  # noqa: E731
    put("d1", "canary", "latency_p99", 0.3, 1030)
    put("d1", "canary", "latency_p99", 0.1, 1000)  # out of order: lands at its own slot
    put("d1", "baseline", "latency_p99", 0.2, 1010)
    put("d1", "canary", "latency_p99", 0.5, 1035)  # duplicate slot (1030): last wins
    put("d1", "canary", "error_rate", 0.01, "1970-01-01T00:17:10Z")  # ISO-8601, = 1030
    put("d1", "canary", "unknown_metric", 9.0, 1030)
    put("d1", "canary", "latency_p99", 9.9, 960)  # older than the 6-step buffer: dropped
    source._ingest(0, next(off), b"d1", b"{not json")
    w = source.window("d1", now_s=1039, lookback=4)  # grid 1000..1030
    assert w.timestamps_s.tolist() == [1000, 1010, 1020, 1030]
    assert w.metrics == ("latency_p99", "error_rate")
    np.testing.assert_allclose(w.canary[:, 0], [0.1, np.nan, np.nan, 0.5])
    np.testing.assert_allclose(w.canary[:, 1], [np.nan, np.nan, np.nan, 0.01])
    assert w.baseline is not None and w.baseline[1, 0] == pytest.approx(0.2)
    assert source.stats == {"events": 5, "duplicates": 1, "late": 1, "out_of_order": 2,
                            "invalid": 1, "unknown_metric": 1, "non_finite": 0, "future": 0,
                            "broker_down": 0}
    assert w.canary.dtype == np.float32


def test_offsets_are_committable_only_after_ack(source: KafkaSource) -> None:
    source._ingest(0, 0, b"a", ev("a", "canary", "error_rate", 0.0, 1000))
    source._ingest(0, 1, b"b", ev("b", "canary", "error_rate", 0.0, 1000))
    source._ingest(0, 2, b"a", ev("a", "canary", "error_rate", 0.0, 1010))
    source._ingest(1, 0, b"c", ev("c", "canary", "error_rate", 0.0, 1000))
    assert source.committable() == {}  # nothing decided yet (offsets 0 of each partition held)
    source.window("a", 1010, 2)
    source._ingest(0, 3, b"a", ev("a", "canary", "error_rate", 0.0, 1020))  # after the fetch
    source.release("a")
    assert source.committable() == {0: 1}  # b's offset 1 is still needed
    source.window("b", 1010, 2)
    source.release("b")
    assert source.committable() == {0: 3}  # a's offset 3 came after a's window
    source.window("c", 1010, 2)
    source.release("c")
    assert source.committable() == {0: 3, 1: 1}


def test_parse_timestamp() -> None:
    assert parse_timestamp(12.5) == 12.5
    assert parse_timestamp("1970-01-01T00:01:00+00:00") == 60.0


def test_a_quiet_topic_costs_one_wait_per_tick_not_one_per_deployment(
        source: KafkaSource, monkeypatch: pytest.MonkeyPatch) -> None:
    timeouts: list[float] = []

    def consume(num_messages: int, timeout: float) -> list[object]:
        timeouts.append(timeout)
        return []

    monkeypatch.setattr(source, "consumer", type("C", (), {"consume": staticmethod(consume),
                                                           "close": lambda self: None})())
    source.poll_timeout_s = 60.0  # one tick over many deployments fits well inside it
    for i in range(10):
        source._ingest(0, i, b"d", ev(f"d{i}", "canary", "latency_p99", 0.1, 1000))
    for i in range(10):
        source.fetch(f"d{i}", now_s=1001, lookback=1)
    assert timeouts == [60.0] + [0] * 9


def test_non_finite_and_future_events_are_counted_not_buffered() -> None:
    """Issue 16 #7: NaN/Infinity values or timestamps (json.loads accepts them) and events
    dated past max_future_s are rejected with a count, never raised or buffered."""
    src = KafkaSource("127.0.0.1:9", "canary-telemetry", "g", ["latency_p99"], step_s=10,
                      buffer_steps=6, max_future_s=60, clock=lambda: 1000.0)
    try:
        raw = '{{"deployment_id": "d1", "group": "canary", "metric": "latency_p99", ' \
              '"value": {v}, "timestamp": {t}}}'
        for off, (v, t) in enumerate([("NaN", "990"), ("-Infinity", "990"), ("0.5", "NaN"),
                                      ("0.5", "1e400"), ("0.5", "1061"), ("0.4", "1060"),
                                      ("0.3", "1010")]):
            src._ingest(0, off, b"d1", raw.format(v=v, t=t).encode())
        assert src.stats["non_finite"] == 4 and src.stats["future"] == 1
        assert src.stats["events"] == 2  # 1060 is exactly max_future_s ahead: accepted
        w = src.window("d1", now_s=1069, lookback=8)
        assert w.canary[-1, 0] == pytest.approx(0.4) and w.canary[2, 0] == pytest.approx(0.3)
    finally:
        src.consumer.close()
