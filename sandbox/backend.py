"""The one interface both isolation backends implement: the seam between the pod manager and what runs.

`sandbox.manager` owns records, locks, networking (netns + CNI), events and the
conversion of CRI requests into OCI specs (`sandbox.oci`); a backend owns only
what runs: the pod's holder (infra container or VM) and its containers. It says
where a container will run, runs the spec it is given, and tells the manager of
exits as they happen. Every assumption that a container process lives on the
host belongs in `runc_backend/`, never here or above.
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, Protocol, Self, TypeVar

from sandbox import netns
from sandbox.model import ContainerRecord, ExitStatus, SandboxRecord
from sandbox.oci.model import Resources, Spec
from sandbox.oci.platform import ContainerPlatform, HostInfo


@dataclass(frozen=True)
class ImageRootfs:
    """What a container's root filesystem is made of: the image's layers and its config."""

    image_id: str
    layers: list[Path]
    config: dict[str, Any]  # the image's OCI config JSON


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
    writable_layer_timestamp: int = 0  # when the layer was measured (it is not measured at every sample)
    cpu_nano_cores: int | None = None  # derived by the manager from successive samples, not by backends


@dataclass(frozen=True)
class PodContainers:
    """Some containers of one pod (the running ones a stats call is about)."""

    sandbox: SandboxRecord
    containers: list[ContainerRecord]


class Process(ABC):
    """What exec or attach connected the streaming server to: a process's stdio, its terminal, its end.

    Both backends implement it, so the streaming server never knows where the process runs.
    """

    @abstractmethod
    async def read_stdout(self) -> bytes:
        """The next chunk of output; b"" at its end. With a terminal, all output comes here."""

    @abstractmethod
    async def read_stderr(self) -> bytes:
        """The next chunk of error output; b"" at its end, and at once with a terminal."""

    @abstractmethod
    async def write_stdin(self, data: bytes) -> None:
        """Feed the process; what it no longer takes (it closed stdin, or exited) is dropped."""

    @abstractmethod
    async def close_stdin(self) -> None:
        """The client's input ended: the process sees end of file (a terminal has none to see).

        Attached to a container that keeps stdin open for the next client
        (`stdin` without `stdin_once`, no tty), this ends the attach instead, as CRI-O does.
        """

    @abstractmethod
    async def resize(self, width: int, height: int) -> None:
        """Set the terminal's size in characters (no effect without a terminal)."""

    @abstractmethod
    async def wait(self) -> int | None:
        """Wait for the end: an exec'd command's exit code, or None when an attach is over."""

    @abstractmethod
    async def kill(self) -> None:
        """End it now (the client went away): an exec'd command is killed, an attach detaches."""


SettingsT = TypeVar("SettingsT")


class ExitListener(Protocol):
    """Told the ID of a container whose process has ended, or of a pod whose holder (infra process, VM) has;
    None when exits may have gone unheard (look at all).

    With `status`, the backend heard a container's exit as a message it must acknowledge (a VM agent's event):
    the listener has persisted it when it returns, so the backend may acknowledge it then (at least once, even
    across a crash).
    """

    def __call__(self, ident: str | None, status: ExitStatus | None = None) -> None: ...


class ByteChannel(ABC):
    """A byte stream both ways between the streaming server and a pod: a port-forwarded TCP connection.

    Both backends implement it, so the streaming server never knows how the bytes travel.
    """

    @abstractmethod
    async def read(self) -> bytes:
        """The next bytes from the pod, waiting for some; b"" at the end.

        What is not read holds the pod's side back: no more than a buffer's worth is read ahead.
        """

    @abstractmethod
    async def write(self, data: bytes) -> None:
        """Send `data` to the pod, waiting while it takes no more; `ConnectionError` once it is gone."""

    @abstractmethod
    async def write_eof(self) -> None:
        """The client sends no more: the pod's side reads end of file (where the transport can tell it)."""

    @abstractmethod
    async def close(self) -> None:
        """Close both ways. Idempotent."""


class StreamChannel(ByteChannel):
    """A `ByteChannel` over an asyncio stream pair, such as a connected socket's."""

    READ_SIZE = 64 * 1024

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer

    async def read(self) -> bytes:
        return await self._reader.read(self.READ_SIZE)

    async def write(self, data: bytes) -> None:
        if self._writer.is_closing():
            raise ConnectionResetError("the connection is closed")
        self._writer.write(data)
        await self._writer.drain()

    async def write_eof(self) -> None:
        if self._writer.can_write_eof() and not self._writer.is_closing():
            self._writer.write_eof()

    async def close(self) -> None:
        self._writer.close()


@dataclass(frozen=True)
class BackendFeatures:
    """What a backend's pods can have beyond the CRI's baseline: each runtime handler reports its backend's
    (RuntimeHandlerFeatures), and a request for one the backend lacks is UNIMPLEMENTED."""

    recursive_read_only_mounts: bool = False  # a read-only CRI mount stays read-only in every mount below it
    user_namespaces: bool = False  # userns_options mode POD: the pod in a user namespace of its own


class Backend(ABC, Generic[SettingsT]):
    """Runs pods of one isolation kind. Every method is idempotent where the CRI call it serves is.

    `SettingsT` is the backend's own settings section (from `core.settings`): the
    composition root builds it and hands it to `create`, never the whole config.
    """

    name: str
    features = BackendFeatures()
    usage_wait: float | None = None
    """How long a stats call waits for `usage` before serving the last figures (None: until it returns)."""

    @classmethod
    @abstractmethod
    def create(cls, settings: SettingsT) -> Self:
        """The backend, if this host can run it; `Unavailable` naming what is missing if not."""

    @abstractmethod
    async def watch_exits(self, listener: ExitListener) -> None:
        """From now on, tell `listener` of each container exit and each end of a pod's holder as it
        happens, from the event loop.

        The manager then asks `container_exit` (or `sandbox_alive`) and records it: an exit reaches
        GetContainerEvents, and list calls answer from what is recorded, without anyone polling.
        Called once, at start-up.
        """

    @abstractmethod
    async def close(self) -> None:
        """Stop watching: the daemon is shutting down (pods and containers keep running without it)."""

    async def create_network_namespace(self, sandbox: SandboxRecord, path: Path) -> None:
        """Create the pod's network namespace (`lo` up) pinned at `path`, before CNI ADD; on failure, none.

        It belongs to the host's user namespace unless the backend gives the pod a
        user namespace of its own on this host: then it must belong to that one
        (only a namespace's owner may mount sysfs for it).
        """
        await netns.create_at(path)

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
        """Whether the pod's holder is still running (false after a crash).

        Answers at once, from what the host knows (a process identity): kubelet's List* and Status calls
        ask it for every pod, and must never wait on what runs in one; lists rely on the holder's end
        being pushed.
        """

    async def resume_sandbox(self, sandbox: SandboxRecord, containers: list[ContainerRecord]) -> None:
        """At start-up, after a daemon restart: the pod and the containers its records hold.

        A backend that hears of its containers through a connection (a VM's agent) takes them up here, and
        reconnects in the background: recovery must not wait on a pod. One whose exits are files (conmon's)
        has nothing to do.
        """

    def sandbox_info(self, sandbox: SandboxRecord) -> dict[str, Any]:
        """What the backend knows of the pod beyond its records, for verbose PodSandboxStatus (none here)."""
        return {}

    @abstractmethod
    def host_info(self, sandbox: SandboxRecord) -> HostInfo:
        """The machine the pod's containers run on (this node, or the pod's VM), as their specs must see it."""

    @abstractmethod
    async def prepare_container(
        self, sandbox: SandboxRecord, container: ContainerRecord, rootfs: ImageRootfs
    ) -> ContainerPlatform:
        """Mount the container's root filesystem and say where and how the container will run.

        The manager builds the container's OCI spec from the CRI request and this,
        then calls `create_container`; on any failure it calls `remove_container`.
        """

    @abstractmethod
    async def create_container(
        self, sandbox: SandboxRecord, container: ContainerRecord, spec: Spec, stop_signal: int
    ) -> None:
        """Create the container from its spec, so that `start_container` only has to start it.

        `stop_signal` is what `stop_container` sends first (the image's or the request's).
        """

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
    async def update_resources(self, sandbox: SandboxRecord, container: ContainerRecord, resources: Resources) -> None:
        """Apply new OCI `linux.resources` (built for `host_info`) to a created or running container."""

    @abstractmethod
    async def update_sandbox_resources(self, sandbox: SandboxRecord, resources: Resources) -> None:
        """The pod's resources changed (kubelet's in-place resize tells before growing containers and after
        shrinking them): resize what holds the pod, or refuse with the reason. `resources` is OCI, for `host_info`.
        """

    @abstractmethod
    async def usage(self, pods: list[PodContainers]) -> dict[str, ContainerUsage]:
        """The resource usage of these running containers, by container id, all collected in one go.

        Returns within a short deadline however many pods there are: a container that cannot be
        measured now (its pod's guest did not answer in time) is left out, and keeps its last figures.
        """

    @abstractmethod
    async def reopen_log(self, sandbox: SandboxRecord, container: ContainerRecord) -> None: ...

    @abstractmethod
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
        """Start `cmd` in the running container as its own process would run.

        With `tty` it gets a terminal, `terminal_size` (width, height) big from the
        start when the client sent one: a later resize would race the command.
        """

    @abstractmethod
    async def attach(self, sandbox: SandboxRecord, container: ContainerRecord, *, tty: bool, stdin: bool) -> Process:
        """Connect to the container's own stdio, which its log also records; `stdin` if the client writes to it."""

    @abstractmethod
    async def port_forward(self, sandbox: SandboxRecord, port: int) -> ByteChannel:
        """A TCP connection to `port` on the pod's loopback, made inside the pod's network namespace."""
