"""The Prometheus endpoint (`[metrics] address`): what the daemon did and how long it took.

Names follow the conventions of the runtimes and libraries operators already scrape:
- per RPC, go-grpc-prometheus' `grpc_server_handled_total{grpc_service,grpc_method,grpc_type,grpc_code}`
  and `grpc_server_handling_seconds{grpc_service,grpc_method,grpc_type}` (a histogram), which
  containerd exports too; errors are the handled calls whose `grpc_code` is not OK;
- pod and container lifecycles, containerd's `containerd_cri_*` timers under `tandem_cri_*`
  (`sandbox_create_network_seconds`, `sandbox_runtime_create_seconds`, `container_create_seconds`,
  `container_start_seconds`), labelled by `backend` where containerd labels by `runtime`, plus
  `tandem_cri_sandbox_run_seconds` for a whole RunPodSandbox; live objects as containerd's
  `sandbox_count_*` / `container_count_*`, as `tandem_cri_sandbox_count{backend,state}` and
  `tandem_cri_container_count{backend,state}`;
- image pulls, CRI-O's `image_pulls_bytes_total` and `image_pulls_failure_total` under `tandem_`,
  and `tandem_image_pull_seconds`;
- a VM pod's start in its three parts: `tandem_vm_boot_seconds`, `tandem_vm_agent_ready_seconds`,
  `tandem_vm_setup_pod_seconds`.
There is no warm pool of VMs, so no gauge for one.

It is served over HTTP on the daemon's event loop, so the live counts read the
manager's records on the thread that changes them.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import time
from collections import Counter as Tally
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any, cast

import grpc
import h11
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from core import errors, metrics
from core.errors import Unavailable
from cri.errors import Handler, status_code
from sandbox.manager import PodManager

log = logging.getLogger("tandem.metrics")

# Seconds: RPCs from a status call (milliseconds) to a VM pod's start under TCG or a big pull (minutes).
BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
HEAD_TIMEOUT = 10.0
MAX_HEAD = 16 * 1024

# Timing -> (series, help, labelled by backend)
TIMINGS: dict[metrics.Timing, tuple[str, str, bool]] = {
    metrics.Timing.SANDBOX_RUN: ("tandem_cri_sandbox_run_seconds", "RunPodSandbox, request to a ready pod", True),
    metrics.Timing.SANDBOX_NETWORK: (
        "tandem_cri_sandbox_create_network_seconds",
        "time to create the network (netns and CNI ADD) for a sandbox",
        False,
    ),
    metrics.Timing.SANDBOX_RUNTIME_CREATE: (
        "tandem_cri_sandbox_runtime_create_seconds",
        "time for the backend to bring a sandbox's holder (infra process or VM) up",
        True,
    ),
    metrics.Timing.CONTAINER_CREATE: ("tandem_cri_container_create_seconds", "time to create a container", True),
    metrics.Timing.CONTAINER_START: ("tandem_cri_container_start_seconds", "time to start a container", True),
    metrics.Timing.VM_BOOT: ("tandem_vm_boot_seconds", "QEMU started until the guest's init ran", False),
    metrics.Timing.VM_AGENT_READY: (
        "tandem_vm_agent_ready_seconds",
        "the guest's init running until its agent answered",
        False,
    ),
    metrics.Timing.VM_SETUP_POD: ("tandem_vm_setup_pod_seconds", "the agent's SetupPod (network, DNS, name)", False),
    metrics.Timing.IMAGE_PULL: ("tandem_image_pull_seconds", "a successful image pull, manifest to layers", False),
}
AMOUNTS: dict[metrics.Amount, tuple[str, str]] = {
    metrics.Amount.IMAGE_PULL_BYTES: ("tandem_image_pulls_bytes", "bytes fetched from registries by image pulls"),
    metrics.Amount.IMAGE_PULL_FAILURES: ("tandem_image_pulls_failure", "image pulls that failed"),
}


class PrometheusMetrics(metrics.MetricsSink):
    """The series above in a registry of their own, fed by `core.metrics` reports and the RPC interceptor."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.handled = Counter(
            "grpc_server_handled",
            "RPCs completed on the server, by gRPC status code",
            ["grpc_service", "grpc_method", "grpc_type", "grpc_code"],
            registry=self.registry,
        )
        self.handling = Histogram(
            "grpc_server_handling_seconds",
            "time from an RPC's arrival to its answer (to its end, for a stream)",
            ["grpc_service", "grpc_method", "grpc_type"],
            buckets=BUCKETS,
            registry=self.registry,
        )
        self._timings = {
            what: Histogram(name, text, ["backend"] if per_backend else [], buckets=BUCKETS, registry=self.registry)
            for what, (name, text, per_backend) in TIMINGS.items()
        }
        self._amounts = {what: Counter(name, text, registry=self.registry) for what, (name, text) in AMOUNTS.items()}

    def timing(self, what: metrics.Timing, seconds: float, backend: str = "") -> None:
        histogram = self._timings[what]
        (histogram.labels(backend) if TIMINGS[what][2] else histogram).observe(seconds)

    def amount(self, what: metrics.Amount, value: float = 1.0) -> None:
        self._amounts[what].inc(value)

    def count_objects(self, pods: PodManager) -> None:
        """Serve the live pod and container counts, read from `pods` at each scrape."""
        self.registry.register(_ObjectCounts(pods))

    def rpc(self, full_method: str, kind: str, code: grpc.StatusCode, seconds: float) -> None:
        service, _, method = full_method.lstrip("/").rpartition("/")
        self.handled.labels(service, method, kind, code.name).inc()
        self.handling.labels(service, method, kind).observe(seconds)


class _ObjectCounts(Collector):
    """Pods by backend and state, containers by their pod's backend and state, as the manager records them."""

    def __init__(self, pods: PodManager) -> None:
        self._pods = pods

    def collect(self) -> Iterator[GaugeMetricFamily]:
        sandboxes: Tally[tuple[str, str]] = Tally()
        containers: Tally[tuple[str, str]] = Tally()
        for sandbox in self._pods.list_sandboxes(None):
            sandboxes[sandbox.backend, sandbox.state.value] += 1
            for container in self._pods.containers_of(sandbox.id):
                containers[sandbox.backend, container.state.value] += 1
        for name, text, tally in (
            ("tandem_cri_sandbox_count", "pod sandboxes, by backend and state", sandboxes),
            ("tandem_cri_container_count", "containers, by their pod's backend and state", containers),
        ):
            family = GaugeMetricFamily(name, text, labels=["backend", "state"])
            for (backend, state), count in sorted(tally.items()):
                family.add_metric([backend, state], count)
            yield family


class MetricsInterceptor(grpc.aio.ServerInterceptor):
    """Times every RPC and counts it by its status code. Before or after `ErrorInterceptor`, it sees the code:
    a domain error is mapped as that interceptor maps it, an abort carries its own."""

    def __init__(self, sink: PrometheusMetrics) -> None:
        self._sink = sink

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]],
        details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        handler = await continuation(details)
        if handler is None:
            return handler
        method = details.method
        sink = self._sink
        if handler.unary_unary is not None:
            inner = cast(Any, handler.unary_unary)

            async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
                began = time.monotonic()
                code = grpc.StatusCode.OK
                try:
                    return await inner(request, context)
                except BaseException as e:
                    code = _code(e, context)
                    raise
                finally:
                    sink.rpc(method, "unary", code, time.monotonic() - began)

            return grpc.unary_unary_rpc_method_handler(
                cast(Any, unary),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:
            inner_stream = cast(Any, handler.unary_stream)

            async def stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                began = time.monotonic()
                code = grpc.StatusCode.OK
                try:
                    responses = inner_stream(request, context)
                    if inspect.isawaitable(responses):
                        await responses
                        return
                    async for response in responses:
                        yield response
                except BaseException as e:
                    code = _code(e, context)
                    raise
                finally:
                    sink.rpc(method, "server_stream", code, time.monotonic() - began)

            return grpc.unary_stream_rpc_method_handler(
                cast(Any, stream),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler


def _code(error: BaseException, context: grpc.aio.ServicerContext) -> grpc.StatusCode:
    if isinstance(error, errors.TandemError):
        return status_code(error)
    if isinstance(error, asyncio.CancelledError):
        return grpc.StatusCode.CANCELLED
    code = context.code()
    if isinstance(code, grpc.StatusCode) and code != grpc.StatusCode.OK:
        return code
    return grpc.StatusCode.UNKNOWN


class MetricsServer:
    """`GET /metrics` over HTTP/1.1 (h11) on the daemon's loop; one request per connection."""

    def __init__(self, address: str, registry: CollectorRegistry) -> None:
        host, _, port = address.rpartition(":")
        self._host = host.strip("[]")
        self._port = int(port)
        self._registry = registry
        self._server: asyncio.Server | None = None
        self.url = ""

    async def start(self) -> None:
        try:
            self._server = await asyncio.start_server(self._serve, self._host, self._port)
        except OSError as e:
            raise Unavailable(
                f"[metrics] address: cannot listen on {self._host} port {self._port}: {e.strerror}"
            ) from e
        port = self._server.sockets[0].getsockname()[1]
        host = f"[{self._host}]" if ":" in self._host else self._host
        self.url = f"http://{host}:{port}/metrics"
        log.info("metrics listening", extra={"url": self.url})

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
        try:
            async with asyncio.timeout(HEAD_TIMEOUT):
                request = await _read_request(conn, reader)
            if request is None:
                return
            if request.method not in (b"GET", b"HEAD"):
                status, body, kind = 405, b"method not allowed\n", "text/plain; charset=utf-8"
            elif request.target.split(b"?")[0] != b"/metrics":
                status, body, kind = 404, b"404 page not found\n", "text/plain; charset=utf-8"
            else:
                status, body, kind = 200, generate_latest(self._registry), CONTENT_TYPE_LATEST
            headers = [("Content-Type", kind), ("Content-Length", str(len(body))), ("Connection", "close")]
            data = conn.send(h11.Response(status_code=status, headers=headers))
            if request.method != b"HEAD":
                data += conn.send(h11.Data(data=body))
            writer.write(data + conn.send(h11.EndOfMessage()))
            await writer.drain()
        except (TimeoutError, h11.ProtocolError, ConnectionError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()


async def _read_request(conn: h11.Connection, reader: asyncio.StreamReader) -> h11.Request | None:
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(await reader.read(MAX_HEAD))
        elif isinstance(event, h11.Request):
            return event
        else:
            return None
