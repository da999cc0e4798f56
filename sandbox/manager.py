"""The pod manager: every pod and container Tandem runs, whichever backend runs it.

It owns the records (persisted before and after each step, so a crash at any
point leaves something recovery can finish or undo), the per-object locks,
pod networking (netns + CNI, shared by both backends), names, the conversion
of CRI requests into OCI specs, exits and events. What actually runs is the
backend's business; each backend tells it of exits as they happen.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from core import metrics
from core.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, TandemError
from core.files import private_dir
from core.records import RecordStore
from core.settings import TrustSettings
from images.store import ImageStore
from protos import cri_pb2 as pb
from sandbox import signals, trust
from sandbox.backend import Backend, ByteChannel, ContainerUsage, ExecResult, ExitStatus, ImageRootfs, Process
from sandbox.cni import CniPlugins
from sandbox.events import ContainerEvent, EventHub
from sandbox.locks import KeyedLocks
from sandbox.model import ContainerRecord, ContainerState, ProcessUser, SandboxRecord, SandboxState, now_ns
from sandbox.oci import spec as oci
from sandbox.oci.resources import linux_resources
from sandbox.podnet import PodNetworking

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


def _match_labels(labels: dict[str, str] | object, selector: dict[str, str] | object) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())  # type: ignore[union-attr]


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
        self._sandboxes: dict[str, SandboxRecord] = {}
        self._containers: dict[str, ContainerRecord] = {}
        self._names: dict[str, str] = {}
        self._locks = KeyedLocks()
        self._exit_checks: set[asyncio.Task[None]] = set()

    # ---- start-up and shutdown -------------------------------------------------------------

    async def recover(self) -> None:
        """Reload every record and reconcile it with what is still running."""
        self._sandboxes = self._sandbox_store.load_all()
        self._containers = self._container_store.load_all()
        for sandbox in self._sandboxes.values():
            self._names[self._sandbox_name(sandbox.config)] = sandbox.id
        for container in self._containers.values():
            if container.sandbox_id not in self._sandboxes:
                log.warning("container without its pod forgotten", extra={"container": container.id})
                self._container_store.delete(container.id)
                continue
            self._names[self._container_name(container.sandbox_id, container.config)] = container.id
        self._containers = {c.id: c for c in self._containers.values() if c.sandbox_id in self._sandboxes}
        for each in self.backends.values():  # before reconciling: no exit falls between the two
            await each.watch_exits(self._exited)
        for sandbox in self._sandboxes.values():
            backend = self.backends.get(sandbox.backend)
            if backend is None:  # it is not NOTREADY for that: its pods run on, unserved, until it is back
                log.warning("pod's backend not available", extra={"pod": sandbox.id, "backend": sandbox.backend})
            elif sandbox.state == SandboxState.READY and not await backend.sandbox_alive(sandbox):
                log.warning("pod died while Tandem was down", extra={"pod": sandbox.id})
                sandbox.state = SandboxState.NOTREADY
                self._sandbox_store.put(sandbox)
        for container in list(self._containers.values()):
            await self._refresh(container)
        log.info("pods recovered", extra={"pods": len(self._sandboxes), "containers": len(self._containers)})

    async def close(self) -> None:
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

    def _find(self, table: dict, kind: str, ident: str) -> object:
        if not ident:
            raise InvalidArgument(f"{kind} ID is empty")
        if ident in table:
            return table[ident]
        matches = [v for k, v in table.items() if k.startswith(ident)]
        if len(matches) == 1:
            return matches[0]
        if len(matches) > 1:
            raise InvalidArgument(f"{kind} ID prefix {ident!r} is ambiguous")
        raise NotFound(f"{kind} {ident!r} not found")

    def sandbox(self, ident: str) -> SandboxRecord:
        return self._find(self._sandboxes, "pod sandbox", ident)  # type: ignore[return-value]

    def container(self, ident: str) -> ContainerRecord:
        return self._find(self._containers, "container", ident)  # type: ignore[return-value]

    def containers_of(self, sandbox_id: str) -> list[ContainerRecord]:
        return [c for c in self._containers.values() if c.sandbox_id == sandbox_id]

    @staticmethod
    def _sandbox_name(config: pb.PodSandboxConfig) -> str:
        m = config.metadata
        return f"{m.name}_{m.namespace}_{m.uid}_{m.attempt}"

    @staticmethod
    def _container_name(sandbox_id: str, config: pb.ContainerConfig) -> str:
        return f"{config.metadata.name}_{config.metadata.attempt}@{sandbox_id}"

    def _reserve(self, name: str, ident: str, kind: str) -> None:
        holder = self._names.get(name)
        if holder is not None:
            raise AlreadyExists(f"{kind} name {name!r} is already in use by {holder}")
        self._names[name] = ident

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
        sandbox = SandboxRecord(
            id=_new_id(),
            config=config,
            runtime_handler=runtime_handler,
            backend=decision.backend,
            trust_reason=decision.reason,
        )
        name = self._sandbox_name(config)
        self._reserve(name, sandbox.id, "pod sandbox")
        began = time.monotonic()
        async with self._locks.hold(sandbox.id):
            self._sandboxes[sandbox.id] = sandbox
            self._sandbox_store.put(sandbox)
            try:
                with metrics.timed(metrics.Timing.SANDBOX_NETWORK):
                    await self.network.connect(sandbox)
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
        self._sandboxes.pop(sandbox.id, None)
        self._names.pop(self._sandbox_name(sandbox.config), None)

    async def sandbox_ready(self, sandbox: SandboxRecord) -> bool:
        """READY only while the pod's holder is alive; a crash shows up as NOTREADY (so does a pod whose
        backend is not available, without that being recorded: it may come back)."""
        if sandbox.state != SandboxState.READY:
            return False
        backend = self.backends.get(sandbox.backend)
        if backend is None:
            return False
        if await backend.sandbox_alive(sandbox):
            return True
        async with self._locks.hold(sandbox.id):
            if sandbox.state == SandboxState.READY:
                log.warning("pod's holder died", extra={"pod": sandbox.id[:12]})
                sandbox.state = SandboxState.NOTREADY
                self._sandbox_store.put(sandbox)
        return False

    def list_sandboxes(self, flt: pb.PodSandboxFilter | None) -> list[SandboxRecord]:
        sandboxes = list(self._sandboxes.values())
        if flt is None:
            return sandboxes
        if flt.id:
            sandboxes = [s for s in sandboxes if s.id.startswith(flt.id)]
        if flt.HasField("state"):
            wanted = SandboxState.READY if flt.state.state == pb.SANDBOX_READY else SandboxState.NOTREADY
            sandboxes = [s for s in sandboxes if s.state == wanted]
        return [s for s in sandboxes if _match_labels(s.config.labels, flt.label_selector)]

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
        container = ContainerRecord(
            id=_new_id(),
            sandbox_id=sandbox.id,
            config=config,
            image_id=image.image_id,
            image_ref=image.repo_digests[0] if image.repo_digests else image.image_id,
            log_path=_log_path(sandbox.config, config),
        )
        name = self._container_name(sandbox.id, config)
        async with self._locks.hold(sandbox.id):
            if sandbox.state != SandboxState.READY:
                raise FailedPrecondition(f"pod sandbox {sandbox.id} is not ready")
            self._reserve(name, container.id, "container")
            self._containers[container.id] = container
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
        self._containers.pop(container.id, None)
        self._names.pop(self._container_name(container.sandbox_id, container.config), None)

    def _mark_exited(self, container: ContainerRecord, exit_status: ExitStatus) -> None:
        container.state = ContainerState.EXITED
        container.exit_code = exit_status.exit_code
        container.finished_at = exit_status.finished_at
        container.reason = exit_status.reason or ("Completed" if exit_status.exit_code == 0 else "Error")
        container.message = exit_status.message
        self._container_store.put(container)
        self._publish(container, "stopped")

    async def _refresh(self, container: ContainerRecord) -> ContainerRecord:
        """Notice a running container's exit (the watcher does this too; status calls must not lag behind)."""
        if container.state != ContainerState.RUNNING:
            return container
        sandbox = self._sandboxes.get(container.sandbox_id)
        backend = None if sandbox is None else self.backends.get(sandbox.backend)
        if sandbox is None or backend is None:  # without its backend, what is recorded is all there is to say
            return container
        exit_status = await backend.container_exit(sandbox, container)
        if exit_status is not None and container.state == ContainerState.RUNNING:
            self._mark_exited(container, exit_status)
        return container

    async def container_status(self, ident: str) -> ContainerRecord:
        return await self._refresh(self.container(ident))

    async def list_containers(self, flt: pb.ContainerFilter | None) -> list[ContainerRecord]:
        containers = list(self._containers.values())
        if flt is not None:
            if flt.id:
                containers = [c for c in containers if c.id.startswith(flt.id)]
            if flt.pod_sandbox_id:
                containers = [c for c in containers if c.sandbox_id.startswith(flt.pod_sandbox_id)]
            containers = [c for c in containers if _match_labels(c.config.labels, flt.label_selector)]
        for container in containers:
            await self._refresh(container)
        if flt is not None and flt.HasField("state"):
            wanted = {
                pb.CONTAINER_CREATED: ContainerState.CREATED,
                pb.CONTAINER_RUNNING: ContainerState.RUNNING,
                pb.CONTAINER_EXITED: ContainerState.EXITED,
                pb.CONTAINER_UNKNOWN: ContainerState.UNKNOWN,
            }[flt.state.state]
            containers = [c for c in containers if c.state == wanted]
        return containers

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

    async def container_usage(self, container: ContainerRecord) -> ContainerUsage:
        sandbox = self.sandbox(container.sandbox_id)
        return await self._backend(sandbox).container_usage(sandbox, container)

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

    def _exited(self, container_id: str | None) -> None:
        """A backend saw a container's process end (None: it may have missed some): record it, in a task."""
        if container_id is None:
            ids = [c.id for c in self._containers.values() if c.state == ContainerState.RUNNING]
        elif container_id in self._containers:
            ids = [container_id]
        else:
            return  # an infra process, a container already removed, or a file that is no exit
        for ident in ids:
            task = asyncio.create_task(self._record_exit(ident), name=f"exit of {ident[:12]}")
            self._exit_checks.add(task)
            task.add_done_callback(self._exit_checks.discard)

    async def _record_exit(self, container_id: str) -> None:
        """Under the container's lock, so that an exit during StartContainer lands after its start is recorded."""
        try:
            async with self._locks.hold(container_id):
                container = self._containers.get(container_id)
                if container is not None:
                    await self._refresh(container)
        except TandemError:
            log.exception("recording a container's exit failed", extra={"container": container_id[:12]})
