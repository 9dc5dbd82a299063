"""KafkaSource against a real Kafka-protocol broker (tansu, in memory, on 127.0.0.1)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from confluent_kafka import Consumer, Producer, TopicPartition

from canaryml.errors import SourceError
from canaryml.serving.kafka import KafkaSource
from tests.harness.kafka import TansuBroker, start_tansu

pytestmark = [pytest.mark.services, pytest.mark.timeout(180)]

TOPIC = "canary-telemetry"
FAST = {"session.timeout.ms": 6000, "heartbeat.interval.ms": 500, "fetch.wait.max.ms": 50,
        "reconnect.backoff.max.ms": 500, "topic.metadata.refresh.interval.ms": 1000}
T0 = 1_800_000_000.0  # event time, epoch seconds


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[TansuBroker]:
    with start_tansu(tmp_path / "tansu") as b:
        yield b


def send(broker: TansuBroker, events: list[tuple[int, dict[str, object]]]) -> None:
    p = Producer({"bootstrap.servers": broker.bootstrap})
    for partition, ev in events:
        p.produce(TOPIC, key=str(ev["deployment_id"]), value=json.dumps(ev), partition=partition)
    assert p.flush(10) == 0


def ev(dep: str, group: str, value: float, t: float, metric: str = "latency_p99") -> dict[str, object]:
    return {"deployment_id": dep, "group": group, "metric": metric, "value": value, "timestamp": t}


def source(broker: TansuBroker, group: str = "ctl") -> KafkaSource:
    return KafkaSource(broker.bootstrap, TOPIC, group, ["latency_p99", "error_rate"], step_s=10,
                       buffer_steps=100, config=FAST,
                       clock=lambda: T0 + 60)  # the controller's clock on the events' time axis


def until(cond: Callable[[], bool], timeout_s: float = 30.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")


def committed(broker: TansuBroker, group: str, partitions: list[int]) -> list[int]:
    c = Consumer({"bootstrap.servers": broker.bootstrap, "group.id": group})
    try:
        return [tp.offset for tp in c.committed([TopicPartition(TOPIC, p) for p in partitions],
                                                timeout=10)]
    finally:
        c.close()


def test_windows_out_of_order_duplicates_and_commit_only_after_ack(broker: TansuBroker) -> None:
    broker.create_topic(TOPIC, 2)
    send(broker, [(0, ev("d1", "canary", 0.3, T0 + 20)),
                  (0, ev("d1", "canary", 0.1, T0)),            # out of order
                  (0, ev("d1", "baseline", 0.2, T0 + 20)),
                  (0, ev("d1", "canary", 0.4, T0 + 25)),       # same slot as T0+20: last wins
                  (1, ev("d2", "canary", 9.0, T0 + 20, "error_rate"))])
    a = source(broker)
    until(lambda: a.poll(0.5) >= 0 and a.owned() == {"d1", "d2"}, what="assignment")
    w1 = a.fetch("d1", T0 + 29, 3)
    np.testing.assert_allclose(w1.canary[:, 0], [0.1, np.nan, 0.4])
    assert w1.baseline is not None and w1.baseline[2, 0] == pytest.approx(0.2)
    w2 = a.fetch("d2", T0 + 29, 3)
    assert w2.canary[2, 1] == 9.0
    assert committed(broker, "ctl", [0, 1]) == [-1001, -1001]  # nothing before a decision
    assert a.ack("d1")  # the decision for d1 is logged
    assert committed(broker, "ctl", [0, 1]) == [4, -1001]  # d2 not decided: its offset is held
    a.close()

    send(broker, [(1, ev("d2", "canary", 8.0, T0 + 30, "error_rate"))])
    b = source(broker)  # a restarted replica of the same group
    until(lambda: b.poll(0.5) >= 0 and b.owned() == {"d1", "d2"}, what="re-assignment")
    until(lambda: b.poll(0.2) >= 0 and b.window("d2", T0 + 39, 3).canary[2, 1] == 8.0,
          timeout_s=10, what="new event")
    assert b.fetch("d1", T0 + 29, 3).canary[2, 0] == pytest.approx(0.4)  # history re-read
    assert b.committable() == {}  # d2's undecided events are still pending on partition 1
    b.fetch("d2", T0 + 39, 3)
    assert b.ack("d2") and b.ack("d1")
    assert committed(broker, "ctl", [0, 1]) == [4, 2]
    b.close()


def test_two_replicas_split_the_deployments(broker: TansuBroker) -> None:
    broker.create_topic(TOPIC, 4)
    deps = [f"d{i}" for i in range(4)]
    send(broker, [(i, ev(d, "canary", float(i), T0)) for i, d in enumerate(deps)])
    a, b = source(broker), source(broker)

    def split() -> bool:
        a.poll(0.2)
        b.poll(0.2)
        return (a.owned() | b.owned() == set(deps) and not a.owned() & b.owned()
                and bool(a.owned()) and bool(b.owned()))

    until(split, timeout_s=45, what="both replicas to own a share")
    for src in (a, b):
        for d in src.owned():
            assert src.fetch(d, T0 + 5, 1).canary[0, 0] == float(deps.index(d))
    a.close()
    b.close()


def test_broker_restart_raises_source_error_then_recovers(broker: TansuBroker) -> None:
    broker.create_topic(TOPIC, 1)
    send(broker, [(0, ev("d1", "canary", 0.5, T0))])
    a = source(broker)
    until(lambda: a.poll(0.5) >= 0 and a.owned() == {"d1"}, what="assignment")
    broker.stop()  # fault: the broker goes away

    def raises() -> bool:
        try:
            a.fetch("d1", T0 + 5, 1)
        except SourceError:
            return True
        return False

    until(raises, timeout_s=20, what="SourceError while the broker is down")
    broker.start()
    broker.create_topic(TOPIC, 1)  # in-memory storage: the restarted broker starts empty
    send(broker, [(0, ev("d1", "canary", 0.7, T0 + 10))])

    def recovered() -> bool:
        try:
            return bool(a.fetch("d1", T0 + 15, 2).canary[1, 0] == pytest.approx(0.7))
        except SourceError:
            return False

    until(recovered, timeout_s=45, what="recovery after the restart")
    assert a.fetch("d1", T0 + 15, 2).canary[0, 0] == pytest.approx(0.5)  # buffer survived
    a.close()
