"""Which namespaces a container joins or gets, and the pod settings that only fit namespaces of its own."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from core.errors import InvalidArgument
from sandbox.oci.model import Linux, Namespace
from sandbox.oci.userns import IdMappings

NEW = "new"
HOST = "host"

# Sysctls runc accepts, by the namespace that makes them per-pod.
_IPC_SYSCTLS = frozenset(
    {
        "kernel.msgmax",
        "kernel.msgmnb",
        "kernel.msgmni",
        "kernel.sem",
        "kernel.shmall",
        "kernel.shmmax",
        "kernel.shmmni",
        "kernel.shm_rmid_forced",
    }
)


@dataclass(frozen=True)
class Namespaces:
    """For each of network/ipc/uts/pid: a path to join, NEW (a fresh namespace) or HOST (no entry).

    `user` is HOST or the path of the pod's user namespace, whose mappings are
    `id_mappings`: the others then belong to it (the pod's were created inside
    it, a NEW one is created after joining it), so the container's root can
    mount /proc and /sys for them.
    """

    network: str
    ipc: str
    uts: str
    pid: str
    user: str = HOST
    id_mappings: IdMappings | None = None

    def __post_init__(self) -> None:
        for kind, value in self._items():
            if value not in (NEW, HOST) and not value.startswith("/"):
                raise ValueError(f"{kind} namespace must be NEW, HOST or an absolute path, not {value!r}")
        if (self.user == HOST) != (self.id_mappings is None):
            raise ValueError("a user namespace to join needs its ID mappings, and only one has them")

    def _items(self) -> tuple[tuple[str, str], ...]:
        return (
            ("user", self.user),
            ("pid", self.pid),
            ("network", self.network),
            ("ipc", self.ipc),
            ("uts", self.uts),
        )

    def entries(self) -> list[Namespace]:
        """`linux.namespaces` for these choices, plus the private mount namespace every container has."""
        entries: list[Namespace] = [
            {"type": kind} if value == NEW else {"type": kind, "path": value}
            for kind, value in self._items()
            if value != HOST
        ]
        return [*entries, {"type": "mount"}]

    def id_mapping_entries(self) -> Linux:
        """`linux.uidMappings`/`gidMappings` of the user namespace joined (runc wants them even to join one)."""
        if self.id_mappings is None:
            return {}
        return {"uidMappings": [self.id_mappings.uids.oci()], "gidMappings": [self.id_mappings.gids.oci()]}


def check_sysctls(sysctls: Mapping[str, str], namespaces: Namespaces) -> None:
    """Refuse what runc would refuse later: sysctls outside the namespaces the pod owns."""
    for name in sorted(sysctls):
        if name in _IPC_SYSCTLS or name.startswith("fs.mqueue."):
            needed, have = "IPC", namespaces.ipc
        elif name.startswith("net."):
            needed, have = "network", namespaces.network
        elif name == "kernel.domainname":
            needed, have = "UTS", namespaces.uts
        else:
            raise InvalidArgument(f"sysctl {name} is not namespaced, so a pod cannot set it")
        if have == HOST:
            raise InvalidArgument(f"sysctl {name} needs the pod's own {needed} namespace, but the pod uses the host's")
