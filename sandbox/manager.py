"""The pod manager: every pod and container Tandem runs, whichever backend runs it.

It owns the records (persisted before and after each step, so a crash at any
point leaves something recovery can finish or undo), the per-object locks,
pod networking (netns + CNI, shared by both backends), names, the conversion
of CRI requests into OCI specs, exits and events. What actually runs is the
backend's business; each backend tells it of exits as they happen, a container's
or a pod holder's (infra process, VM), so the state kept here in memory is
current and list calls answer from it without asking any backend.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import secrets
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from core import metrics
from core.errors import FailedPrecondition, InvalidArgument, NotFound, TandemError, Unimplemented
from core.files import private_dir
from core.records import RecordStore
from core.settings import TrustSettings
from images.store import ImageStore
from protos import cri_pb2 as pb
from sandbox import signals, trust
from sandbox.backend import (
    Backend,
    BackendFeatures,
    ByteChannel,
    ContainerUsage,
    ExecResult,
    ExitStatus,
    ImageRootfs,
    PodContainers,
    Process,
)
from sandbox.cni import CniPlugins
from sandbox.events import ContainerEvent, EventHub
from sandbox.locks import KeyedLocks
from sandbox.model import ContainerRecord, ContainerState, ProcessUser, SandboxRecord, SandboxState, now_ns
from sandbox.oci import spec as oci
from sandbox.oci.resources import linux_resources
from sandbox.oci.userns import pod_user_namespace
from sandbox.podnet import PodNetworking
from sandbox.stats import UsageCollector
from sandbox.table import PodTable

log = logging.getLogger("tandem.pods")


def _new_id() -> str:
    return secrets.token_hex(32)


def _log_path(sandbox: pb.PodSandboxConfig, container: pb.ContainerConfig) -> str:
    """The container's CRI log file, confined to the pod's log directory."""
    if not container.log_path:
        return ""
    directory = sandbox.log_directory
    if not directory or not os.path.isabs(directory):
        raise InvalidArgument(f"pod log_directory {directory!r} must be an absolute path when log_path is set")
    if os.path.isabs(container.log_path):
        raise InvalidArgument(f"container log_path {container.log_path!r} must be relative to the log directory")
    path = os.path.normpath(os.path.join(directory, container.log_path))
    if os.path.commonpath([path, os.path.normpath(directory)]) != os.path.normpath(directory):
        raise InvalidArgument(f"container log_path {container.log_path!r} escapes the pod's log directory")
    return path


class PodManager:
    def __init__(
        self,
        *,
        state_dir: Path,
        runtime_dir: Path,
        trust: TrustSettings,
        images: ImageStore,
        backends: dict[str, Backend[Any]],
        cni: CniPlugins,
    ) -> None:
        """Records live under `state_dir`, pod network namespaces under `runtime_dir`."""
        self.trust = trust
        self.images = images
        self.backends = backends
        self.events = EventHub()
        self._sandbox_store = RecordStore(state_dir / "sandboxes", SandboxRecord)
        self._container_store = RecordStore(state_dir / "containers", ContainerRecord)
        self.network = PodNetworking(private_dir(runtime_dir / "netns"), cni, self._sandbox_store.put)
        self.table = PodTable()
        self._locks = KeyedLocks()
        self._exit_checks: set[asyncio.Task[None]] = set()
        self._usage = UsageCollector(backends)

    # ---- start-up and shutdown -------------------------------------------------------------

    async def recover(self) -> None:
        """Reload every record and reconcile it with what is still running."""
        for sandbox in self._sandbox_store.load_all().values():
            self.table.add_sandbox(sandbox)
        for container in self._container_store.load_all().values():
            if container.sandbox_id not in self.table.sandboxes:
                log.warning("container without its pod forgotten", extra={"container": container.id})
                self._container_store.delete(container.id)
                continue
            self.table.add_container(container)
        for each in self.backends.values():  # before reconciling: no exit falls between the two
            await each.watch_exits(self._exited)
        for sandbox in self.table.sandboxes.values():
            backend = self.backends.get(sandbox.backend)
            if backend is None:  # it is not NOTREADY for that: its pods run on, unserved, until it is back
                log.warning("pod's backend not available", extra={"pod": sandbox.id, "backend": sandbox.backend})
                continue
            await backend.resume_sandbox(sandbox, self.containers_of(sandbox.id))
            if sandbox.state == SandboxState.READY and not await backend.sandbox_alive(sandbox):
                log.warning("pod died while Tandem was down", extra={"pod": sandbox.id})
                sandbox.state = SandboxState.NOTREADY
                self._sandbox_store.put(sandbox)
        for container in list(self.table.containers.values()):
            await self._refresh(container)
        log.info("pods recovered", extra={"pods": len(self.table.sandboxes), "containers": len(self.table.containers)})

    async def close(self) -> None:
        await self._usage.close()
        for backend in self.backends.values():
            await backend.close()
        for task in list(self._exit_checks):
            task.cancel()
        await asyncio.gather(*self._exit_checks, return_exceptions=True)

    # ---- lookups ---------------------------------------------------------------------------

    def _backend(self, sandbox: SandboxRecord) -> Backend[Any]:
        backend = self.backends.get(sandbox.backend)
        if backend is None:
            raise FailedPrecondition(f"{sandbox.backend} backend not available")
        return backend

    def sandbox(self, ident: str) -> SandboxRecord:
        return self.table.sandbox(ident)

    def container(self, ident: str) -> ContainerRecord:
        return self.table.container(ident)

    def handler_features(self, handler: str) -> BackendFeatures:
        """What pods of a runtime handler ("": the node's default) can have: its backend's, none while unavailable."""
        if handler:
            entry = self.trust.runtimes.get(handler)
            backend_name = entry.backend if entry is not None else ""
        else:
            backend_name = trust.default_backend(self.trust.default_workload_trust)
        backend = self.backends.get(backend_name)
        return backend.features if backend is not None else BackendFeatures()

    def containers_of(self, sandbox_id: str) -> list[ContainerRecord]:
        return self.table.containers_of(sandbox_id)

    # ---- pods ------------------------------------------------------------------------------

    async def run_sandbox(self, config: pb.PodSandboxConfig, runtime_handler: str) -> SandboxRecord:
        m = config.metadata
        if not (m.name and m.namespace and m.uid):
            raise InvalidArgument("pod metadata needs a name, a namespace and a uid")
        decision = trust.decide(
            config,
            runtime_handler,
            self.trust.runtimes,
            self.trust.default_workload_trust,
            self.trust.host_pods_on_untrusted_node,
        )
        backend = self.backends.get(decision.backend)
        if backend is None:
            raise FailedPrecondition(
                f"{decision.backend} backend not available (pod routed there by {decision.reason})"
            )
        if pod_user_namespace(config.linux.security_context.namespace_options) and not backend.features.user_namespaces:
            raise Unimplemented(
                f"user namespaces are not supported on the {decision.backend} backend (pod routed there by"
                f" {decision.reason}); see the README's conformance table"
            )
        sandbox = SandboxRecord(
            id=_new_id(),
            config=config,
            runtime_handler=runtime_handler,
            backend=decision.backend,
            trust_reason=decision.reason,
        )
        self.table.add_sandbox(sandbox)
        began = time.monotonic()
        async with self._locks.hold(sandbox.id):
            self._sandbox_store.put(sandbox)
            try:
                with metrics.timed(metrics.Timing.SANDBOX_NETWORK):
                    await self.network.connect(sandbox, lambda path: backend.create_network_namespace(sandbox, path))
                with metrics.timed(metrics.Timing.SANDBOX_RUNTIME_CREATE, backend.name):
                    await backend.start_sandbox(sandbox)
            except BaseException:
                await self._release_sandbox(sandbox, best_effort=True)
                raise
            sandbox.state = SandboxState.READY
            self._sandbox_store.put(sandbox)
        metrics.timing(metrics.Timing.SANDBOX_RUN, time.monotonic() - began, backend.name)
        log.info(
            "pod started",
            extra={
                "pod": sandbox.id[:12],
                "pod_name": f"{m.namespace}/{m.name}",
                "handler": runtime_handler or "<default>",
                "backend": decision.backend,
                "why": decision.reason,
                "ip": sandbox.ips[0] if sandbox.ips else "",
            },
        )
        return sandbox

    async def stop_sandbox(self, ident: str) -> None:
        try:
            sandbox = self.sandbox(ident)
        except NotFound:
            return
        async with self._locks.hold(sandbox.id):
            await self._stop_containers_and_holder(sandbox)
            await self.network.disconnect(sandbox)
            if sandbox.state != SandboxState.NOTREADY:
                sandbox.state = SandboxState.NOTREADY
                self._sandbox_store.put(sandbox)
        log.info("pod stopped", extra={"pod": sandbox.id[:12]})

    async def remove_sandbox(self, ident: str) -> None:
        try:
            sandbox = self.sandbox(ident)
        except NotFound:
            return
        async with self._locks.hold(sandbox.id):
            await self._stop_containers_and_holder(sandbox)
            for container in self.containers_of(sandbox.id):
                async with self._locks.hold(container.id):
                    await self._remove_container(sandbox, container)
            await self._release_sandbox(sandbox, best_effort=False)
        log.info("pod removed", extra={"pod": sandbox.id[:12]})

    async def _stop_containers_and_holder(self, sandbox: SandboxRecord) -> None:
        """Kill every container, then the pod's holder. A container that survived its kill may still end
        with the holder (a VM's do, even when its guest could not kill them): only one that outlives both
        fails the stop, so a broken guest never keeps its pod from being stopped and removed."""
        survivors: list[tuple[ContainerRecord, TandemError]] = []
        for container in self.containers_of(sandbox.id):
            async with self._locks.hold(container.id):
                try:
                    await self._stop_container(sandbox, container, timeout=0)
                except TandemError as e:
                    survivors.append((container, e))
        backend = self._backend(sandbox)
        await backend.stop_sandbox(sandbox)
        for container, error in survivors:
            async with self._locks.hold(container.id):
                if container.state in (ContainerState.EXITED, ContainerState.UNKNOWN):
                    continue
                exit_status = await backend.container_exit(sandbox, container)
                if exit_status is None:
                    raise error
                log.warning("container ended with its pod's holder", extra={"container": container.id[:12]})
                self._mark_exited(container, exit_status)

    async def _release_sandbox(self, sandbox: SandboxRecord, best_effort: bool) -> None:
        steps: list[Callable[[], Awaitable[None]]] = [
            lambda: self._backend(sandbox).stop_sandbox(sandbox),
            lambda: self.network.disconnect(sandbox),
            lambda: self._backend(sandbox).remove_sandbox(sandbox),
        ]
        for step in steps:
            try:
                await step()
            except TandemError:
                if not best_effort:
                    raise
                log.exception("cleanup step failed", extra={"pod": sandbox.id[:12]})
        self._sandbox_store.delete(sandbox.id)
        self.table.drop_sandbox(sandbox)
        self._usage.forget(sandbox.id)

    def is_ready(self, sandbox: SandboxRecord) -> bool:
        """What is known without asking: READY as recorded (the backends push a holder's end), and only
        while its backend is available (without that being recorded: it may come back)."""
        return sandbox.state == SandboxState.READY and sandbox.backend in self.backends

    async def sandbox_ready(self, sandbox: SandboxRecord) -> bool:
        """`is_ready`, confirmed by the backend now: for calls about one pod, not for lists."""
        if not self.is_ready(sandbox):
            return False
        await self._check_holder(sandbox)
        return sandbox.state == SandboxState.READY

    async def _check_holder(self, sandbox: SandboxRecord) -> None:
        """Record a READY pod whose holder (infra process, pinned namespaces, VM) is gone as NOTREADY."""
        backend = self.backends.get(sandbox.backend)
        if sandbox.state != SandboxState.READY or backend is None or await backend.sandbox_alive(sandbox):
            return
        async with self._locks.hold(sandbox.id):
            current = self.table.sandboxes.get(sandbox.id) is sandbox  # not removed meanwhile
            if current and sandbox.state == SandboxState.READY and not await backend.sandbox_alive(sandbox):
                log.warning("pod's holder died", extra={"pod": sandbox.id[:12]})
                sandbox.state = SandboxState.NOTREADY
                self._sandbox_store.put(sandbox)

    def list_sandboxes(self, flt: pb.PodSandboxFilter | None) -> list[SandboxRecord]:
        """From memory: a holder's end is recorded as its backend pushes it."""
        return self.table.list_sandboxes(flt, self.is_ready)

    # ---- containers ------------------------------------------------------------------------

    async def create_container(
        self, sandbox_id: str, config: pb.ContainerConfig, sandbox_config: pb.PodSandboxConfig
    ) -> ContainerRecord:
        sandbox = self.sandbox(sandbox_id)
        if not config.metadata.name:
            raise InvalidArgument("container metadata needs a name")
        if not config.image.image:
            raise InvalidArgument("container config names no image")
        image = self.images.resolve(config.image.image)
        if image is None:
            raise NotFound(f"image {config.image.image!r} not found; pull it first")
        recursive = [m.container_path for m in config.mounts if m.recursive_read_only]
        if recursive and not self._backend(sandbox).features.recursive_read_only_mounts:
            raise Unimplemented(
                f"recursive read-only mounts ({', '.join(recursive)}) are not supported on the"
                f" {sandbox.backend} backend"
            )
        container = ContainerRecord(
            id=_new_id(),
            sandbox_id=sandbox.id,
            config=config,
            image_id=image.image_id,
            image_ref=image.repo_digests[0] if image.repo_digests else image.image_id,
            log_path=_log_path(sandbox.config, config),
        )
        async with self._locks.hold(sandbox.id):
            if sandbox.state != SandboxState.READY:
                raise FailedPrecondition(f"pod sandbox {sandbox.id} is not ready")
            self.table.add_container(container)
            self._container_store.put(container)
            rootfs = ImageRootfs(image.image_id, self.images.layer_dirs(image), self.images.config_of(image))
            backend = self._backend(sandbox)
            began = time.monotonic()
            try:
                platform = await backend.prepare_container(sandbox, container, rootfs)
                spec = oci.container_spec(
                    config, sandbox.config, sandbox_id=sandbox.id, image_config=rootfs.config, platform=platform
                )
                user = spec["process"]["user"]
                container.user = ProcessUser(user["uid"], user["gid"], list(user.get("additionalGids", [])))
                await backend.create_container(sandbox, container, spec, signals.stop_signal(config, rootfs.config))
            except BaseException:
                with contextlib.suppress(TandemError):
                    await self._backend(sandbox).remove_container(sandbox, container)
                self._forget(container)
                raise
            self._container_store.put(container)
            metrics.timing(metrics.Timing.CONTAINER_CREATE, time.monotonic() - began, backend.name)
        self._publish(container, "created")
        return container

    async def start_container(self, ident: str) -> None:
        container = self.container(ident)
        sandbox = self.sandbox(container.sandbox_id)
        async with self._locks.hold(container.id):
            if container.state != ContainerState.CREATED:
                raise FailedPrecondition(f"container {container.id} is {container.state}, not created")
            try:
                with metrics.timed(metrics.Timing.CONTAINER_START, sandbox.backend):
                    await self._backend(sandbox).start_container(sandbox, container)
            except TandemError as e:
                container.state = ContainerState.EXITED
                container.finished_at = now_ns()
                container.exit_code = 128
                container.reason = "StartError"
                container.message = str(e)
                self._container_store.put(container)
                raise
            container.state = ContainerState.RUNNING
            container.started_at = now_ns()
            self._container_store.put(container)
        self._publish(container, "started")

    async def stop_container(self, ident: str, timeout: int) -> None:
        try:
            container = self.container(ident)
        except NotFound:
            return
        sandbox = self.sandbox(container.sandbox_id)
        async with self._locks.hold(container.id):
            await self._stop_container(sandbox, container, timeout)

    async def _stop_container(self, sandbox: SandboxRecord, container: ContainerRecord, timeout: int) -> None:
        if container.state in (ContainerState.EXITED, ContainerState.UNKNOWN):
            return
        await self._backend(sandbox).stop_container(sandbox, container, timeout)
        if container.state == ContainerState.EXITED:  # its exit was reported while it was being stopped
            return
        if container.state == ContainerState.CREATED:
            self._mark_exited(container, ExitStatus(exit_code=0, finished_at=now_ns(), reason="NeverStarted"))
            return
        exit_status = await self._backend(sandbox).container_exit(sandbox, container)
        if exit_status is None:
            raise FailedPrecondition(f"container {container.id} is still running after being killed")
        self._mark_exited(container, exit_status)

    async def remove_container(self, ident: str) -> None:
        try:
            container = self.container(ident)
        except NotFound:
            return
        sandbox = self.sandbox(container.sandbox_id)
        async with self._locks.hold(container.id):
            await self._stop_container(sandbox, container, timeout=0)
            await self._remove_container(sandbox, container)

    async def _remove_container(self, sandbox: SandboxRecord, container: ContainerRecord) -> None:
        await self._backend(sandbox).remove_container(sandbox, container)
        self._forget(container)
        self._publish(container, "deleted")

    def _forget(self, container: ContainerRecord) -> None:
        self._container_store.delete(container.id)
        self.table.drop_container(container)

    def _mark_exited(self, container: ContainerRecord, exit_status: ExitStatus) -> None:
        container.state = ContainerState.EXITED
        container.exit_code = exit_status.exit_code
        container.finished_at = max(exit_status.finished_at, container.started_at)
        container.reason = exit_status.reason or ("Completed" if exit_status.exit_code == 0 else "Error")
        container.message = exit_status.message
        self._container_store.put(container)
        self._publish(container, "stopped")

    async def _refresh(self, container: ContainerRecord) -> ContainerRecord:
        """Notice a running container's exit (the watcher does this too; status calls must not lag behind)."""
        if container.state != ContainerState.RUNNING:
            return container
        sandbox = self.table.sandboxes.get(container.sandbox_id)
        backend = None if sandbox is None else self.backends.get(sandbox.backend)
        if sandbox is None or backend is None:  # without its backend, what is recorded is all there is to say
            return container
        exit_status = container.exit_report or await backend.container_exit(sandbox, container)
        if exit_status is not None and container.state == ContainerState.RUNNING:
            self._mark_exited(container, exit_status)
        return container

    async def container_status(self, ident: str) -> ContainerRecord:
        return await self._refresh(self.container(ident))

    def list_containers(self, flt: pb.ContainerFilter | None) -> list[ContainerRecord]:
        """From memory: exits are recorded as the backends push them (a status call also asks the backend)."""
        return self.table.list_containers(flt)

    async def running(self, ident: str) -> tuple[SandboxRecord, ContainerRecord]:
        container = await self._refresh(self.container(ident))
        if container.state != ContainerState.RUNNING:
            raise FailedPrecondition(f"container {container.id} is not running ({container.state})")
        return self.sandbox(container.sandbox_id), container

    async def exec_sync(self, ident: str, cmd: list[str], timeout: int) -> ExecResult:
        if not cmd:
            raise InvalidArgument("exec needs a command")
        sandbox, container = await self.running(ident)
        return await self._backend(sandbox).exec_sync(sandbox, container, cmd, timeout)

    async def update_resources(self, ident: str, resources: pb.LinuxContainerResources) -> None:
        container = self.container(ident)
        sandbox = self.sandbox(container.sandbox_id)
        async with self._locks.hold(container.id):
            if container.state not in (ContainerState.CREATED, ContainerState.RUNNING):
                raise FailedPrecondition(f"container {container.id} is {container.state}")
            backend = self._backend(sandbox)
            oci_resources = linux_resources(resources, backend.host_info(sandbox))
            await backend.update_resources(sandbox, container, oci_resources)
            container.config.linux.resources.CopyFrom(resources)
            self._container_store.put(container)
            self._sandbox_store.put(sandbox)  # a VM may have grown for it

    async def update_sandbox_resources(self, ident: str, resources: pb.LinuxContainerResources) -> None:
        sandbox = self.sandbox(ident)
        async with self._locks.hold(sandbox.id):
            if sandbox.state != SandboxState.READY:
                raise FailedPrecondition(f"pod sandbox {sandbox.id} is not ready")
            backend = self._backend(sandbox)
            await backend.update_sandbox_resources(sandbox, linux_resources(resources, backend.host_info(sandbox)))
            sandbox.config.linux.resources.CopyFrom(resources)
            self._sandbox_store.put(sandbox)

    async def reopen_log(self, ident: str) -> None:
        sandbox, container = await self.running(ident)
        await self._backend(sandbox).reopen_log(sandbox, container)

    async def usage(self, containers: list[ContainerRecord]) -> dict[str, ContainerUsage]:
        """The usage of those of `containers` that run (on an available backend), by container id, from
        samples every stats call shares (`sandbox.stats`): a container with no sample yet is left out."""
        pods: dict[str, PodContainers] = {}
        for container in containers:
            sandbox = self.table.sandboxes.get(container.sandbox_id)
            if container.state == ContainerState.RUNNING and sandbox is not None and sandbox.backend in self.backends:
                pods.setdefault(sandbox.id, PodContainers(sandbox, [])).containers.append(container)
        return await self._usage.usage(list(pods.values()))

    async def container_usage(self, container: ContainerRecord) -> ContainerUsage:
        """One container's usage; no figures for one that is not running."""
        self._backend(self.sandbox(container.sandbox_id))  # refused when its backend is not available
        found = await self.usage([container])
        return found.get(container.id) or ContainerUsage(timestamp=now_ns())

    def backend_info(self, sandbox: SandboxRecord) -> dict[str, Any]:
        """What the pod's backend knows of it beyond the records (verbose PodSandboxStatus)."""
        backend = self.backends.get(sandbox.backend)
        return {} if backend is None else backend.sandbox_info(sandbox)

    def backend_names(self) -> list[str]:
        """The backends this host runs."""
        return sorted(self.backends)

    # ---- streaming: looked up again when the connection arrives (it may have stopped since the URL) ----

    async def exec(
        self, ident: str, cmd: list[str], *, tty: bool, stdin: bool, terminal_size: tuple[int, int] | None
    ) -> Process:
        sandbox, container = await self.running(ident)
        return await self._backend(sandbox).exec(
            sandbox, container, cmd, tty=tty, stdin=stdin, terminal_size=terminal_size
        )

    async def attach(self, ident: str, *, tty: bool, stdin: bool) -> Process:
        sandbox, container = await self.running(ident)
        return await self._backend(sandbox).attach(sandbox, container, tty=tty, stdin=stdin)

    async def port_forward(self, sandbox_id: str, port: int) -> ByteChannel:
        sandbox = self.sandbox(sandbox_id)
        if not await self.sandbox_ready(sandbox):
            raise FailedPrecondition(f"pod sandbox {sandbox.id} is not ready")
        return await self._backend(sandbox).port_forward(sandbox, port)

    # ---- exits and events ------------------------------------------------------------------

    def _publish(self, container: ContainerRecord, kind: str) -> None:
        self.events.publish(ContainerEvent(container.id, container.sandbox_id, kind, now_ns()))

    def _exited(self, ident: str | None, status: ExitStatus | None = None) -> None:
        """A backend saw a container's process or a pod's holder end (None: it may have missed some):
        record it, in a task.

        With `status` (a container's exit the backend must acknowledge), it is persisted before this returns.
        """
        if ident is None:
            running = [c.id for c in self.table.containers.values() if c.state == ContainerState.RUNNING]
            checks = [functools.partial(self._record_exit, cid) for cid in running]
            ready = [s for s in self.table.sandboxes.values() if s.state == SandboxState.READY]
            checks += [functools.partial(self._check_holder, s) for s in ready]
        elif ident in self.table.containers:
            checks = [functools.partial(self._record_exit, ident)]
            if status is not None:
                self._report_exit(self.table.containers[ident], status)
        elif ident in self.table.sandboxes:
            checks = [functools.partial(self._check_holder, self.table.sandboxes[ident])]
        else:
            return  # a container or pod already removed, or a file that is no exit
        for check in checks:
            task = asyncio.create_task(self._checked(check, ident), name=f"exit of {(ident or 'any')[:12]}")
            self._exit_checks.add(task)
            task.add_done_callback(self._exit_checks.discard)

    def _report_exit(self, container: ContainerRecord, status: ExitStatus) -> None:
        """Persist a reported exit now, without waiting for the container's lock (its holder may be waiting for
        this very exit): marked at once if the container runs; kept for `_refresh` if it is still starting."""
        if container.state not in (ContainerState.CREATED, ContainerState.RUNNING) or container.exit_report:
            return
        container.exit_report = status
        if container.state == ContainerState.RUNNING:
            self._mark_exited(container, status)
        else:
            self._container_store.put(container)

    @staticmethod
    async def _checked(check: Callable[[], Awaitable[None]], ident: str | None) -> None:
        try:
            await check()
        except TandemError:
            log.exception("recording an exit failed", extra={"id": (ident or "")[:12]})

    async def _record_exit(self, container_id: str) -> None:
        """Under the container's lock, so that an exit during StartContainer lands after its start is recorded."""
        async with self._locks.hold(container_id):
            container = self.table.containers.get(container_id)
            if container is not None:
                await self._refresh(container)
