"""The Tandem daemon: both CRI services on one root-only unix socket.

This is the composition root: the one place that knows which backends exist,
builds each part from its own settings section and wires them together. Nothing
below `cri/` reads the whole config or knows another layer's concrete classes.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc

from core import metrics
from core.errors import FailedPrecondition, TandemError
from core.files import private_dir
from core.settings import Config
from cri.encoded import add_servicer
from cri.errors import ErrorInterceptor
from cri.image_service import ImageServicer
from cri.prometheus import MetricsInterceptor, MetricsServer, PrometheusMetrics
from cri.runtime_service import RuntimeServicer
from cri.sdnotify import Notifier
from cri.streaming.pods import PodStreams
from cri.streaming.server import StreamingServer
from cri.version import RUNTIME_VERSION
from images.registry import RegistryClient
from images.store import ImageStore
from images.unpack import UnpackLimits
from protos import cri_pb2_grpc
from runc_backend.backend import RuncBackend
from sandbox.backend import Backend
from sandbox.cni import CniPlugins
from sandbox.default_network import write_default_network
from sandbox.manager import PodManager
from vm_backend.backend import VmBackend

log = logging.getLogger("tandem.daemon")

MAX_MESSAGE_BYTES = 16 * 2**20


def available_backends(config: Config) -> dict[str, Backend[Any]]:
    """Every backend that can start on this host, each built from its own settings section; one that
    can't is logged and left out.

    A pod routed to a missing backend is refused with FAILED_PRECONDITION by the
    manager: it never falls back to another kind of isolation.
    """
    backends: dict[str, Backend[Any]] = {}
    factories: list[Callable[[], Backend[Any]]] = [
        lambda: RuncBackend.create(config.runc_backend()),
        lambda: VmBackend.create(config.vm_backend()),
    ]
    for factory in factories:
        try:
            backend = factory()
        except TandemError as e:
            log.warning("backend unavailable", extra={"error": str(e)})
            continue
        backends[backend.name] = backend
    log.info("backends", extra={"available": ",".join(sorted(backends)) or "none"})
    return backends


def _claim_socket(path: Path) -> None:
    """Remove a stale socket, but never one another daemon is still serving."""
    if not path.exists() and not path.is_symlink():
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except OSError:
        path.unlink()
    else:
        raise FailedPrecondition(f"another process is already serving on {path}")
    finally:
        probe.close()


def _socket_dir(path: Path) -> None:
    """Create the socket's directory 0700; one that exists is left as it is: it may be shared (/run) with
    every other service's sockets. The socket itself is 0600 either way."""
    if not path.is_dir():
        private_dir(path)


class Daemon:
    def __init__(self, config: Config) -> None:
        self.config = config
        self._server: grpc.aio.Server | None = None
        self._registry: RegistryClient | None = None
        self.images: ImageStore | None = None
        self.pods: PodManager | None = None
        self.streaming: StreamingServer | None = None
        self.metrics: MetricsServer | None = None

    async def start(self) -> None:
        config = self.config
        sink = None
        if config.metrics.address:
            sink = PrometheusMetrics()
            metrics.install(sink)
        private_dir(config.state_dir)
        private_dir(config.runtime_dir)
        config.runtime_dir.chmod(0o711)  # searchable, not listable: runc in a pod's user namespace passes through
        _socket_dir(config.socket.parent)
        self._registry = RegistryClient(config.registry)
        self.images = ImageStore(
            config.state_dir / "images",
            self._registry,
            limits=UnpackLimits(
                max_bytes=config.images.max_layer_bytes,
                max_entries=config.images.max_layer_entries,
                allow_devices=config.images.allow_device_nodes,
            ),
            max_layers=config.images.max_layers,
            parallel_downloads=config.images.parallel_downloads,
        )
        await asyncio.to_thread(self.images.load)
        default = config.cni.default
        plugins = CniPlugins(
            config.cni.conf_dir,
            config.cni.bin_dirs,
            default=write_default_network(
                config.runtime_dir / "cni",
                bridge=default.bridge,
                subnet=default.subnet,
                masquerade=default.masquerade,
            )
            if default.enabled
            else None,
        )
        plugins.current()  # logs which network pods join, and why
        self.pods = PodManager(
            state_dir=config.state_dir,
            runtime_dir=config.runtime_dir,
            trust=config.trust(),
            images=self.images,
            backends=available_backends(config),
            cni=plugins,
        )
        await self.pods.recover()
        self.streaming = StreamingServer(config.streaming, PodStreams(self.pods))
        await self.streaming.start()
        interceptors: list[grpc.aio.ServerInterceptor] = [ErrorInterceptor()]
        if sink is not None:
            sink.count_objects(self.pods)
            self.metrics = MetricsServer(config.metrics.address, sink.registry)
            await self.metrics.start()
            interceptors.insert(0, MetricsInterceptor(sink))

        server = grpc.aio.server(
            interceptors=interceptors,
            options=[
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ],
        )
        runtime = RuntimeServicer(config, self.pods, self.streaming)
        add_servicer(cri_pb2_grpc.add_RuntimeServiceServicer_to_server, runtime, server)
        cri_pb2_grpc.add_ImageServiceServicer_to_server(ImageServicer(self.images), server)
        _claim_socket(config.socket)
        server.add_insecure_port(f"unix://{config.socket}")
        await server.start()
        os.chmod(config.socket, 0o600)
        self._server = server
        # What start-up made (modules, stubs, recovered records) lives as long as the daemon: kept out of the
        # cyclic collector's full passes, which otherwise pause every call in flight for as long as the
        # collector takes to walk it all (tens of ms).
        gc.freeze()
        log.info(
            "serving",
            extra={"socket": str(config.socket), "version": RUNTIME_VERSION, "config": config.source},
        )

    async def stop(self, grace: float = 5.0) -> None:
        if self._server is not None:
            await self._server.stop(grace)
            self._server = None
        if self.streaming is not None:
            await self.streaming.stop()
            self.streaming = None
        if self.metrics is not None:
            await self.metrics.stop()
            self.metrics = None
            metrics.install(metrics.MetricsSink())
        if self.pods is not None:
            await self.pods.close()
            self.pods = None
        if self._registry is not None:
            await self._registry.close()
            self._registry = None
        with contextlib.suppress(FileNotFoundError):
            self.config.socket.unlink()
        log.info("stopped")


async def serve(config: Config) -> None:
    """Serve until SIGTERM or SIGINT, then finish in-flight calls and exit."""
    os.umask(0o077)
    notifier = Notifier.from_environment()
    daemon = Daemon(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await daemon.start()
    notifier.notify("READY=1")
    try:
        await stop.wait()
        log.info("shutting down")
        notifier.notify("STOPPING=1")
    finally:
        await daemon.stop()
