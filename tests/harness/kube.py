"""Kubernetes API emulation for tests: kmock's KubernetesEmulator served on 127.0.0.1 from a
background thread, a `kubernetes.client.ApiClient` for it, a record of every write, and fault
injection (409/503, before or after the write lands)."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import kmock
from kmock._internal import rendering

DEPLOYMENTS = kmock.resource("apps", "v1", "deployments")
ROLLOUTS = kmock.resource("argoproj.io", "v1alpha1", "rollouts")


@dataclass(frozen=True)
class Sent:
    """One write request as the server received it."""

    method: str
    path: str
    content_type: str
    body: Any


@dataclass
class Fault:
    method: str  # PATCH, GET, ...
    status: int
    count: int = 1
    landed: bool = False  # True: the write is applied, then the error is answered
    name: str | None = None


class FaultyEmulator(kmock.KubernetesEmulator):
    """KubernetesEmulator that records writes and answers injected faults."""

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self.sent: list[Sent] = []
        self.faults: list[Fault] = []

    async def _handle(self, request: rendering.Request) -> Any:
        method = str(request.method.value if hasattr(request.method, "value") else request.method)
        method = method.upper()
        if method not in ("GET",):
            self.sent.append(Sent(method, request.url.path,
                                  request.headers.get("Content-Type", ""), request.data))
        for fault in self.faults:
            if fault.count > 0 and fault.method == method and fault.name in (None, request.name):
                fault.count -= 1
                if fault.landed:
                    await super()._handle(request)
                return await self._render_error(kmock.KubernetesError(
                    status=fault.status, reason="Injected", message=f"injected {fault.status}"))
        return await super()._handle(request)


@dataclass
class KubeHarness:
    emulator: FaultyEmulator
    port: int
    api_client: Any
    _loop: asyncio.AbstractEventLoop = field(repr=False)

    @property
    def sent(self) -> list[Sent]:
        return self.emulator.sent

    def patches(self) -> list[tuple[str, Any]]:
        """(path, body) of every PATCH received, in order."""
        return [(s.path, s.body) for s in self.emulator.sent if s.method == "PATCH"]

    def inject(self, method: str, status: int, *, count: int = 1, landed: bool = False,
               name: str | None = None) -> None:
        self.emulator.faults.append(Fault(method.upper(), status, count, landed, name))

    def put(self, resource: Any, namespace: str, name: str, obj: dict[str, Any]) -> None:
        obj = json.loads(json.dumps(obj))
        obj.setdefault("metadata", {}).update({"name": name, "namespace": namespace})
        self.emulator.objects[resource, namespace, name] = obj

    def get(self, resource: Any, namespace: str, name: str) -> dict[str, Any]:
        return dict(self.emulator.objects[resource, namespace, name].raw)


@contextmanager
def start_kube() -> Iterator[KubeHarness]:
    """Serve a FaultyEmulator on 127.0.0.1 (a free port) until the block ends."""
    from kubernetes import client

    emulator = FaultyEmulator()
    loop = asyncio.new_event_loop()
    started = threading.Event()
    stop: asyncio.Event | None = None
    box: dict[str, Any] = {}

    async def serve() -> None:
        nonlocal stop
        stop = asyncio.Event()
        async with emulator, kmock.Server(emulator) as server:
            box["port"] = server.port
            started.set()
            await stop.wait()

    def main() -> None:
        try:
            loop.run_until_complete(serve())
        except BaseException as exc:  # surface start-up failures to the test
            box["error"] = exc
            started.set()

    thread = threading.Thread(target=main, name="kmock", daemon=True)
    thread.start()
    if not started.wait(10) or "error" in box:
        raise RuntimeError(f"kmock did not start: {box.get('error')}")
    cfg = client.Configuration()
    cfg.host = f"http://127.0.0.1:{box['port']}"
    api = client.ApiClient(cfg)
    try:
        yield KubeHarness(emulator, box["port"], api, loop)
    finally:
        api.close()
        assert stop is not None
        loop.call_soon_threadsafe(stop.set)
        thread.join(10)
        loop.close()
