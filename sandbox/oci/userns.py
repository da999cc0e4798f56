"""A pod's user namespace: the CRI's `userns_options` checked and turned into one UID and one GID mapping.

The rules are containerd's and the CRI's (critest checks them): mode NODE (or
no options) is the host's user namespace and takes no mappings; mode POD gives
the pod a user namespace of its own with exactly one UID and one GID mapping
that maps container ID 0; CONTAINER and TARGET are not modes a user namespace
can have. Every container of the pod must ask for what the pod has: they all
share it. Which host IDs the mapping may use is the node's business (kubelet
picks multiples of 65536); Tandem only refuses ranges the kernel would refuse
and ranges the node reserves (the VM jail's uids).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from core.errors import InvalidArgument
from protos import cri_pb2 as pb
from sandbox.oci.model import IDMapping

MAX_ID = 2**32 - 1  # (uid_t)-1 is never a valid ID


@dataclass(frozen=True)
class IdRange:
    """`size` IDs from `container_id` in the namespace are `host_id`... outside it."""

    container_id: int
    host_id: int
    size: int

    def to_host(self, container_id: int) -> int | None:
        """The host ID of `container_id`, or None when this range does not map it."""
        offset = container_id - self.container_id
        return self.host_id + offset if 0 <= offset < self.size else None

    def oci(self) -> IDMapping:
        return {"containerID": self.container_id, "hostID": self.host_id, "size": self.size}

    def line(self) -> str:
        """The range as /proc/<pid>/uid_map and gid_map take it."""
        return f"{self.container_id} {self.host_id} {self.size}\n"


@dataclass(frozen=True)
class IdMappings:
    """A pod user namespace's UID and GID mappings (one range each)."""

    uids: IdRange
    gids: IdRange

    @property
    def root(self) -> tuple[int, int]:
        """The host UID and GID of the namespace's root, who owns what the pod writes as root."""
        return self.uids.host_id, self.gids.host_id

    def same_as(self, uids: Sequence[pb.IDMapping], gids: Sequence[pb.IDMapping]) -> bool:
        """Whether CRI mappings (a mount's, say) are exactly these."""
        return [_range(m) for m in uids] == [self.uids] and [_range(m) for m in gids] == [self.gids]


def _range(mapping: pb.IDMapping) -> IdRange:
    return IdRange(mapping.container_id, mapping.host_id, mapping.length)


def _one_range(mappings: Sequence[pb.IDMapping], what: str, reserved: Iterable[range]) -> IdRange:
    if len(mappings) != 1:
        raise InvalidArgument(
            f"a pod's user namespace takes exactly one {what} mapping, got {len(mappings)}"
            " (one range is what ID-mapped layers and kubelet use)"
        )
    found = _range(mappings[0])
    if found.container_id != 0:
        raise InvalidArgument(f"the {what} mapping must map container ID 0, it starts at {found.container_id}")
    if found.size < 1:
        raise InvalidArgument(f"the {what} mapping has length {found.size}")
    if found.host_id + found.size > MAX_ID:
        raise InvalidArgument(f"the {what} mapping ends past the last ID ({found.host_id} + {found.size})")
    hosts = range(found.host_id, found.host_id + found.size)
    for taken in reserved:
        if hosts.start < taken.stop and taken.start < hosts.stop:
            raise InvalidArgument(
                f"the {what} mapping ({hosts.start}-{hosts.stop - 1}) overlaps host IDs this node reserves"
                f" ({taken.start}-{taken.stop - 1}: the VM jail's)"
            )
    return found


def _mode_name(mode: int) -> str:
    return pb.NamespaceMode.Name(mode) if mode in pb.NamespaceMode.values() else str(mode)


def pod_user_namespace(options: pb.NamespaceOption, reserved: Iterable[range] = ()) -> IdMappings | None:
    """The mappings of the pod's own user namespace, or None for the host's; INVALID_ARGUMENT if malformed."""
    if not options.HasField("userns_options"):
        return None
    userns = options.userns_options
    if userns.mode == pb.NODE:
        if userns.uids or userns.gids:
            raise InvalidArgument("user namespace mode NODE is the host's user namespace: it takes no mappings")
        return None
    if userns.mode != pb.POD:
        raise InvalidArgument(
            f"user namespace mode {_mode_name(userns.mode)} is not supported: a pod's containers share"
            " the pod's user namespace (POD) or the host's (NODE)"
        )
    for kind, mode in (("network", options.network), ("PID", options.pid), ("IPC", options.ipc)):
        if mode == pb.NODE:
            raise InvalidArgument(
                f"a pod with a user namespace cannot use the host's {kind} namespace (Kubernetes forbids"
                " hostUsers: false with it)"
            )
    reserved = list(reserved)
    return IdMappings(_one_range(userns.uids, "UID", reserved), _one_range(userns.gids, "GID", reserved))


def check_container_user_namespace(container: pb.NamespaceOption, pod: pb.NamespaceOption) -> None:
    """A container shares its pod's user namespace: it must ask for the same one (or leave it unset)."""
    if not container.HasField("userns_options"):
        return
    asked, has = container.userns_options, pod.userns_options
    pod_mode = has.mode if pod.HasField("userns_options") else pb.NODE
    same = asked.mode == pod_mode and list(asked.uids) == list(has.uids) and list(asked.gids) == list(has.gids)
    if not same:
        raise InvalidArgument("the container's user namespace options differ from its pod's, whose it shares")
