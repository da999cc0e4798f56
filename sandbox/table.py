"""The daemon's in-memory view of every pod and container: lookups by ID or prefix, names, lists.

The manager keeps it current (from the records at start-up, then with every call and every exit a
backend pushes), so kubelet's relist (ListPodSandbox, ListContainers every second) is answered from
here without a file read or a backend call per object. It owns no records on disk and no locks.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TypeVar

from core.errors import AlreadyExists, InvalidArgument, NotFound
from protos import cri_pb2 as pb
from sandbox.model import ContainerRecord, ContainerState, SandboxRecord

_CONTAINER_STATES = {
    pb.CONTAINER_CREATED: ContainerState.CREATED,
    pb.CONTAINER_RUNNING: ContainerState.RUNNING,
    pb.CONTAINER_EXITED: ContainerState.EXITED,
    pb.CONTAINER_UNKNOWN: ContainerState.UNKNOWN,
}


def sandbox_name(config: pb.PodSandboxConfig) -> str:
    """The name the CRI makes unique among pods (kubelet retries a pod with a new attempt number)."""
    m = config.metadata
    return f"{m.name}_{m.namespace}_{m.uid}_{m.attempt}"


def container_name(sandbox_id: str, config: pb.ContainerConfig) -> str:
    """The name the CRI makes unique among one pod's containers."""
    return f"{config.metadata.name}_{config.metadata.attempt}@{sandbox_id}"


def _match_labels(labels: Mapping[str, str], selector: Mapping[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


T = TypeVar("T")


def _find(table: dict[str, T], kind: str, ident: str) -> T:
    """By full ID, or by a prefix that names exactly one (as crictl lets a user type)."""
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


class PodTable:
    def __init__(self) -> None:
        self.sandboxes: dict[str, SandboxRecord] = {}
        self.containers: dict[str, ContainerRecord] = {}
        self._by_pod: dict[str, dict[str, ContainerRecord]] = {}  # sandbox id -> its containers by id
        self._names: dict[str, str] = {}  # a unique name -> the ID holding it

    # ---- lookups ---------------------------------------------------------------------------

    def sandbox(self, ident: str) -> SandboxRecord:
        return _find(self.sandboxes, "pod sandbox", ident)

    def container(self, ident: str) -> ContainerRecord:
        return _find(self.containers, "container", ident)

    def containers_of(self, sandbox_id: str) -> list[ContainerRecord]:
        return list(self._by_pod.get(sandbox_id, {}).values())

    # ---- changes ---------------------------------------------------------------------------

    def reserve(self, name: str, ident: str, kind: str) -> None:
        """Claim a unique name before the object exists; AlreadyExists names the holder."""
        holder = self._names.get(name)
        if holder is not None and holder != ident:
            raise AlreadyExists(f"{kind} name {name!r} is already in use by {holder}")
        self._names[name] = ident

    def add_sandbox(self, sandbox: SandboxRecord) -> None:
        self.reserve(sandbox_name(sandbox.config), sandbox.id, "pod sandbox")
        self.sandboxes[sandbox.id] = sandbox

    def drop_sandbox(self, sandbox: SandboxRecord) -> None:
        self.sandboxes.pop(sandbox.id, None)
        if self._names.get(sandbox_name(sandbox.config)) == sandbox.id:
            del self._names[sandbox_name(sandbox.config)]

    def add_container(self, container: ContainerRecord) -> None:
        self.reserve(container_name(container.sandbox_id, container.config), container.id, "container")
        self.containers[container.id] = container
        self._by_pod.setdefault(container.sandbox_id, {})[container.id] = container

    def drop_container(self, container: ContainerRecord) -> None:
        self.containers.pop(container.id, None)
        siblings = self._by_pod.get(container.sandbox_id, {})
        siblings.pop(container.id, None)
        if not siblings:
            self._by_pod.pop(container.sandbox_id, None)
        name = container_name(container.sandbox_id, container.config)
        if self._names.get(name) == container.id:
            del self._names[name]

    # ---- lists: from memory, filtered as the CRI says --------------------------------------

    def list_sandboxes(
        self, flt: pb.PodSandboxFilter | None, is_ready: Callable[[SandboxRecord], bool]
    ) -> list[SandboxRecord]:
        sandboxes = list(self.sandboxes.values())
        if flt is None:
            return sandboxes
        if flt.id in self.sandboxes:
            sandboxes = [self.sandboxes[flt.id]]
        elif flt.id:
            sandboxes = [s for s in sandboxes if s.id.startswith(flt.id)]
        if flt.HasField("state"):
            ready = flt.state.state == pb.SANDBOX_READY
            sandboxes = [s for s in sandboxes if is_ready(s) == ready]
        if flt.label_selector:
            sandboxes = [s for s in sandboxes if _match_labels(s.config.labels, flt.label_selector)]
        return sandboxes

    def list_containers(self, flt: pb.ContainerFilter | None) -> list[ContainerRecord]:
        if flt is None:
            return list(self.containers.values())
        if flt.id in self.containers:
            containers = [self.containers[flt.id]]
        elif flt.id:
            containers = [c for c in self.containers.values() if c.id.startswith(flt.id)]
        elif flt.pod_sandbox_id in self._by_pod:
            containers = list(self._by_pod[flt.pod_sandbox_id].values())
        else:
            containers = list(self.containers.values())
        if flt.pod_sandbox_id:
            containers = [c for c in containers if c.sandbox_id.startswith(flt.pod_sandbox_id)]
        if flt.HasField("state"):
            wanted = _CONTAINER_STATES[flt.state.state]
            containers = [c for c in containers if c.state == wanted]
        if flt.label_selector:
            containers = [c for c in containers if _match_labels(c.config.labels, flt.label_selector)]
        return containers
