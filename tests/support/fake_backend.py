"""A backend that runs nothing: pods and containers are entries in dicts, exits happen when a test says so.

It keeps the Backend contract (idempotent stops and removes, exits pushed to the
listener, `container_exit` as the source of truth), so the manager and the
servicers can be tested in milliseconds, without root, runc or QEMU. Its state
outlives a `PodManager`, as real pods outlive a daemon: hand the same instance
to the next manager to test recovery.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.errors import FailedPrecondition, NotFound
from core.settings import Config
from images.store import ImageRecord
from protos import cri_pb2 as pb
from sandbox.backend import (
    Backend,
    ByteChannel,
    ContainerUsage,
    ExecResult,
    ExitListener,
    ExitStatus,
    ImageRootfs,
    PodContainers,
    Process,
)
from sandbox.cni import CniPlugins
from sandbox.manager import PodManager
from sandbox.model import ContainerRecord, SandboxRecord
from sandbox.oci.capabilities import DEFAULT_CAPABILITIES
from sandbox.oci.model import Resources, Spec
from sandbox.oci.namespaces import NEW, Namespaces
from sandbox.oci.platform import ContainerPlatform, HostInfo, PodFiles


@dataclass
class FakeContainer:
    spec: Spec
    stop_signal: int
    started: bool = False
    exit: ExitStatus | None = None
    resources: list[Resources] = field(default_factory=list)
    ignores_signals: bool = False  # stop_container cannot end it
    sandbox_id: str = ""


class FakeBackend(Backend[Path]):
    """Pods and containers in memory; `root` holds the containers' root filesystems (an /etc/passwd each)."""

    def __init__(self, root: Path, name: str = "runc") -> None:
        self.name = name
        self.root = root
        self.pods: dict[str, bool] = {}  # sandbox id -> alive
        self.containers: dict[str, FakeContainer] = {}
        self.listener: ExitListener | None = None
        self.exit_on_start: dict[str, int] = {}  # container name -> exit code at once when started
        self.fail_start: set[str] = set()  # container names whose start fails
        self.unmeasured: set[str] = set()  # container ids `usage` leaves out (a guest that did not answer)
        self.calls: list[tuple[str, str]] = []
        self.holder_ends_containers = False  # as a VM: stopping the pod's holder ends every container in it
        self.sandbox_resources: dict[str, Resources] = {}

    @classmethod
    def create(cls, settings: Path) -> FakeBackend:
        return cls(settings)

    # ---- what a test does to it --------------------------------------------------------------

    def exit(self, container_id: str, code: int, *, notify: bool = True) -> None:
        """The container's process ends with `code`; the manager hears of it unless `notify` is off."""
        self.containers[container_id].exit = ExitStatus(code, time.time_ns())
        if notify and self.listener is not None:
            self.listener(container_id)

    def end_pod(self, sandbox_id: str, *, notify: bool = True) -> None:
        """The pod's holder ends (an infra process killed, a VM crashed); the manager hears of it unless not."""
        self.pods[sandbox_id] = False
        if notify and self.listener is not None:
            self.listener(sandbox_id)

    # ---- the Backend contract ----------------------------------------------------------------

    async def watch_exits(self, listener: ExitListener) -> None:
        self.listener = listener

    async def close(self) -> None:
        self.listener = None

    async def start_sandbox(self, sandbox: SandboxRecord) -> None:
        self.calls.append(("start_sandbox", sandbox.id))
        self.pods[sandbox.id] = True

    async def stop_sandbox(self, sandbox: SandboxRecord) -> None:
        self.calls.append(("stop_sandbox", sandbox.id))
        if sandbox.id in self.pods:
            self.pods[sandbox.id] = False
        if self.holder_ends_containers:
            for fake in self.containers.values():
                if fake.sandbox_id == sandbox.id and fake.started and fake.exit is None:
                    fake.exit = ExitStatus(255, time.time_ns(), reason="VMDied")

    async def remove_sandbox(self, sandbox: SandboxRecord) -> None:
        self.calls.append(("remove_sandbox", sandbox.id))
        self.pods.pop(sandbox.id, None)

    async def sandbox_alive(self, sandbox: SandboxRecord) -> bool:
        return self.pods.get(sandbox.id, False)

    def host_info(self, sandbox: SandboxRecord) -> HostInfo:
        return HostInfo(
            capabilities=frozenset(DEFAULT_CAPABILITIES),
            cgroup_mode="v2",
            swap_accounting=True,
            hugetlb=False,
            hostname="fake-node",
            dev_dir=self.root / "dev",
        )

    async def prepare_container(
        self, sandbox: SandboxRecord, container: ContainerRecord, rootfs: ImageRootfs
    ) -> ContainerPlatform:
        root = self.root / container.id / "rootfs"
        (root / "etc").mkdir(parents=True, exist_ok=True)
        (root / "etc" / "passwd").write_text("root:x:0:0::/root:/bin/sh\napp:x:1000:1000::/:/bin/sh\n")
        pod_dir = self.root / sandbox.id
        return ContainerPlatform(
            rootfs=root,
            host=self.host_info(sandbox),
            namespaces=Namespaces(network=NEW, ipc=NEW, uts=NEW, pid=NEW),
            cgroups_path=f"/fake/{container.id}",
            pod_files=PodFiles(pod_dir / "hostname", pod_dir / "resolv.conf", pod_dir / "hosts", pod_dir / "shm"),
            oom_score_adj_floor=0,
        )

    async def create_container(
        self, sandbox: SandboxRecord, container: ContainerRecord, spec: Spec, stop_signal: int
    ) -> None:
        self.calls.append(("create_container", container.id))
        self.containers[container.id] = FakeContainer(spec, stop_signal, sandbox_id=sandbox.id)

    async def start_container(self, sandbox: SandboxRecord, container: ContainerRecord) -> None:
        self.calls.append(("start_container", container.id))
        if container.name in self.fail_start:
            raise FailedPrecondition(f"cannot start container {container.id}: it refuses")
        self.containers[container.id].started = True
        if container.name in self.exit_on_start:
            self.exit(container.id, self.exit_on_start[container.name])  # before the manager records the start

    async def stop_container(self, sandbox: SandboxRecord, container: ContainerRecord, timeout: int) -> None:
        self.calls.append(("stop_container", container.id))
        fake = self.containers.get(container.id)
        if fake is not None and fake.started and fake.exit is None and not fake.ignores_signals:
            fake.exit = ExitStatus(137, time.time_ns())

    async def remove_container(self, sandbox: SandboxRecord, container: ContainerRecord) -> None:
        self.calls.append(("remove_container", container.id))
        self.containers.pop(container.id, None)

    async def container_exit(self, sandbox: SandboxRecord, container: ContainerRecord) -> ExitStatus | None:
        fake = self.containers.get(container.id)
        if fake is None:
            return ExitStatus(255, time.time_ns(), reason="Unknown", message="the fake backend forgot it")
        return fake.exit

    async def exec_sync(
        self, sandbox: SandboxRecord, container: ContainerRecord, cmd: list[str], timeout: int
    ) -> ExecResult:
        return ExecResult(0, " ".join(cmd).encode(), b"")

    async def update_sandbox_resources(self, sandbox: SandboxRecord, resources: Resources) -> None:
        self.calls.append(("update_sandbox_resources", sandbox.id))
        self.sandbox_resources[sandbox.id] = resources

    async def update_resources(self, sandbox: SandboxRecord, container: ContainerRecord, resources: Resources) -> None:
        self.containers[container.id].resources.append(resources)

    async def usage(self, pods: list[PodContainers]) -> dict[str, ContainerUsage]:
        self.calls.append(("usage", ",".join(p.sandbox.id for p in pods)))
        return {
            c.id: ContainerUsage(timestamp=time.time_ns(), cpu_usage_ns=1000, memory_working_set_bytes=4096)
            for pod in pods
            for c in pod.containers
            if c.id not in self.unmeasured
        }

    async def reopen_log(self, sandbox: SandboxRecord, container: ContainerRecord) -> None:
        self.calls.append(("reopen_log", container.id))

    async def exec(
        self,
        sandbox: SandboxRecord,
        container: ContainerRecord,
        cmd: list[str],
        *,
        tty: bool,
        stdin: bool,
        terminal_size: tuple[int, int] | None = None,
    ) -> Process:
        raise NotFound("the fake backend runs no processes")

    async def attach(self, sandbox: SandboxRecord, container: ContainerRecord, *, tty: bool, stdin: bool) -> Process:
        raise NotFound("the fake backend runs no processes")

    async def port_forward(self, sandbox: SandboxRecord, port: int) -> ByteChannel:
        raise NotFound("the fake backend has no network")


IMAGE_ID = "sha256:" + "a" * 64
IMAGE_REF = "registry.test/app:1"


class FakeImages:
    """The manager's view of an image store holding one image, `registry.test/app:1`."""

    def __init__(self, config: dict[str, Any] | None = None) -> None:
        self.record = ImageRecord(
            image_id=IMAGE_ID,
            repo_tags=[IMAGE_REF],
            repo_digests=["registry.test/app@sha256:" + "b" * 64],
            manifest_digest="sha256:" + "b" * 64,
            layers=[],
            blobs=[IMAGE_ID],
            size=1,
            user="",
        )
        self.config = config or {"config": {"Cmd": ["sleep", "3600"], "StopSignal": "SIGINT"}}

    def resolve(self, ref: str) -> ImageRecord | None:
        return self.record if ref in (IMAGE_REF, IMAGE_ID) else None

    def layer_dirs(self, record: ImageRecord) -> list[Path]:
        return []

    def config_of(self, record: ImageRecord) -> dict[str, Any]:
        return self.config


def fake_manager(tmp_path: Path, *backends: FakeBackend, default_trust: str = "trusted") -> PodManager:
    """A PodManager over fake backends, its records under `tmp_path` (a second one there recovers the first's)."""
    return PodManager(
        state_dir=tmp_path / "state",
        runtime_dir=tmp_path / "run",
        trust=Config(default_workload_trust=default_trust).trust(),
        images=FakeImages(),  # type: ignore[arg-type]
        backends={b.name: b for b in backends},
        cni=CniPlugins(tmp_path / "net.d", ()),
    )


def host_network_pod(name: str = "web", **annotations: str) -> pb.PodSandboxConfig:
    """A pod in the host's network namespace: the manager makes no netns for it (no root needed)."""
    config = pb.PodSandboxConfig(
        metadata=pb.PodSandboxMetadata(name=name, namespace="tests", uid=f"uid-{name}"),
        hostname=name,
        annotations=annotations,
    )
    config.linux.security_context.namespace_options.network = pb.NODE
    return config


def container(name: str = "app", image: str = IMAGE_REF, **fields: Any) -> pb.ContainerConfig:
    return pb.ContainerConfig(metadata=pb.ContainerMetadata(name=name), image=pb.ImageSpec(image=image), **fields)
