"""The one interface both isolation backends implement.

`sandbox.manager` owns records, locks, networking (netns + CNI) and events;
a backend owns only what runs: the pod's holder (infra container or VM) and
its containers. Every assumption that a container process lives on the host
belongs in `runc_backend/`, never here or above.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

from protos import cri_pb2 as pb
from sandbox.model import ContainerRecord, SandboxRecord


@dataclass(frozen=True)
class ImageRootfs:
    """What a container's root filesystem is made of: the image's layers and its config."""

    image_id: str
    layers: list[Path]
    config: dict


@dataclass(frozen=True)
class ExitStatus:
    """A container process that has ended."""

    exit_code: int
    finished_at: int
    reason: str = ""  # "Completed", "Error", "OOMKilled"
    message: str = ""


@dataclass(frozen=True)
class ExecResult:
    exit_code: int
    stdout: bytes
    stderr: bytes


@dataclass(frozen=True)
class ContainerUsage:
    """A container's resource usage in CRI units; None where the backend cannot measure a figure."""

    timestamp: int
    cpu_usage_ns: int | None = None
    memory_working_set_bytes: int | None = None
    memory_available_bytes: int | None = None
    memory_usage_bytes: int | None = None
    memory_rss_bytes: int | None = None
    page_faults: int | None = None
    major_page_faults: int | None = None
    pids: int | None = None
    writable_layer_bytes: int | None = None
    writable_layer_inodes: int | None = None
    writable_layer_mountpoint: str = ""


class Backend(ABC):
    """Runs pods of one isolation kind. Every method is idempotent where the CRI call it serves is."""

    name: str

    @abstractmethod
    async def start_sandbox(self, sandbox: SandboxRecord) -> None:
        """Bring up what holds the pod (its namespaces, or its VM). The netns and CNI are already set up.

        May record what it needs later in `sandbox.backend_state`; the manager persists it.
        """

    @abstractmethod
    async def stop_sandbox(self, sandbox: SandboxRecord) -> None:
        """Stop the pod's holder; its containers have been stopped already. Idempotent."""

    @abstractmethod
    async def remove_sandbox(self, sandbox: SandboxRecord) -> None:
        """Release everything the backend holds for the pod. Idempotent."""

    @abstractmethod
    async def sandbox_alive(self, sandbox: SandboxRecord) -> bool:
        """Whether the pod's holder is still running (false after a crash)."""

    @abstractmethod
    async def create_container(
        self, sandbox: SandboxRecord, container: ContainerRecord, rootfs: ImageRootfs
    ) -> None:
        """Prepare the container so that `start_container` only has to start it."""

    @abstractmethod
    async def start_container(self, sandbox: SandboxRecord, container: ContainerRecord) -> None: ...

    @abstractmethod
    async def stop_container(self, sandbox: SandboxRecord, container: ContainerRecord, timeout: int) -> None:
        """Signal the container's stop signal, then SIGKILL after `timeout` seconds. Idempotent."""

    @abstractmethod
    async def remove_container(self, sandbox: SandboxRecord, container: ContainerRecord) -> None:
        """Release everything the container held. Idempotent; the container is not running."""

    @abstractmethod
    async def container_exit(self, sandbox: SandboxRecord, container: ContainerRecord) -> ExitStatus | None:
        """The exit of a started container, or None while it runs."""

    @abstractmethod
    async def exec_sync(
        self, sandbox: SandboxRecord, container: ContainerRecord, cmd: list[str], timeout: int
    ) -> ExecResult: ...

    @abstractmethod
    async def update_resources(
        self, sandbox: SandboxRecord, container: ContainerRecord, resources: pb.LinuxContainerResources
    ) -> None: ...

    @abstractmethod
    async def container_usage(self, sandbox: SandboxRecord, container: ContainerRecord) -> ContainerUsage: ...

    @abstractmethod
    async def reopen_log(self, sandbox: SandboxRecord, container: ContainerRecord) -> None: ...
