"""Which namespaces a container joins or gets, and the pod settings that only fit namespaces of its own."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from core.errors import InvalidArgument
from protos import cri_pb2 as pb
from sandbox.oci.model import Namespace

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
    """For each of network/ipc/uts/pid: a path to join, NEW (a fresh namespace) or HOST (no entry)."""

    network: str
    ipc: str
    uts: str
    pid: str

    def __post_init__(self) -> None:
        for kind, value in self._items():
            if value not in (NEW, HOST) and not value.startswith("/"):
                raise ValueError(f"{kind} namespace must be NEW, HOST or an absolute path, not {value!r}")

    def _items(self) -> tuple[tuple[str, str], ...]:
        return (("pid", self.pid), ("network", self.network), ("ipc", self.ipc), ("uts", self.uts))

    def entries(self) -> list[Namespace]:
        """`linux.namespaces` for these choices, plus the private mount namespace every container has."""
        entries: list[Namespace] = [
            {"type": kind} if value == NEW else {"type": kind, "path": value}
            for kind, value in self._items()
            if value != HOST
        ]
        return [*entries, {"type": "mount"}]


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


def refuse_user_namespaces(options: pb.NamespaceOption) -> None:
    if options.HasField("userns_options") and options.userns_options.mode != pb.NODE:
        raise InvalidArgument("user namespaces are not supported by this runtime yet")
