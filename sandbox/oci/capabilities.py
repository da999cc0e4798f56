"""Linux capabilities in OCI specs: names, containerd's defaults and rules, and what a process holds."""

from __future__ import annotations

from core.errors import InvalidArgument
from protos import cri_pb2 as pb
from sandbox.oci.model import Capabilities
from sandbox.oci.platform import HostInfo

# Capability names by number (0 = CAP_CHOWN ... 40 = CAP_CHECKPOINT_RESTORE).
CAPABILITIES = (
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_DAC_READ_SEARCH",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETPCAP",
    "CAP_LINUX_IMMUTABLE",
    "CAP_NET_BIND_SERVICE",
    "CAP_NET_BROADCAST",
    "CAP_NET_ADMIN",
    "CAP_NET_RAW",
    "CAP_IPC_LOCK",
    "CAP_IPC_OWNER",
    "CAP_SYS_MODULE",
    "CAP_SYS_RAWIO",
    "CAP_SYS_CHROOT",
    "CAP_SYS_PTRACE",
    "CAP_SYS_PACCT",
    "CAP_SYS_ADMIN",
    "CAP_SYS_BOOT",
    "CAP_SYS_NICE",
    "CAP_SYS_RESOURCE",
    "CAP_SYS_TIME",
    "CAP_SYS_TTY_CONFIG",
    "CAP_MKNOD",
    "CAP_LEASE",
    "CAP_AUDIT_WRITE",
    "CAP_AUDIT_CONTROL",
    "CAP_SETFCAP",
    "CAP_MAC_OVERRIDE",
    "CAP_MAC_ADMIN",
    "CAP_SYSLOG",
    "CAP_WAKE_ALARM",
    "CAP_BLOCK_SUSPEND",
    "CAP_AUDIT_READ",
    "CAP_PERFMON",
    "CAP_BPF",
    "CAP_CHECKPOINT_RESTORE",
)
_CAPABILITY_NUMBER = {name: number for number, name in enumerate(CAPABILITIES)}

DEFAULT_CAPABILITIES = frozenset(
    {
        "CAP_CHOWN",
        "CAP_DAC_OVERRIDE",
        "CAP_FSETID",
        "CAP_FOWNER",
        "CAP_MKNOD",
        "CAP_NET_RAW",
        "CAP_SETGID",
        "CAP_SETUID",
        "CAP_SETFCAP",
        "CAP_SETPCAP",
        "CAP_NET_BIND_SERVICE",
        "CAP_SYS_CHROOT",
        "CAP_KILL",
        "CAP_AUDIT_WRITE",
    }
)

# The infra process gets the classic masks; containers get what kubelet sends


def capabilities_from_status(status: str) -> frozenset[str]:
    """The effective capabilities in a /proc/<pid>/status text (bits beyond the known ones ignored)."""
    for line in status.splitlines():
        if line.startswith("CapEff:"):
            mask = int(line.split()[1], 16)
            return frozenset(name for number, name in enumerate(CAPABILITIES) if mask >> number & 1)
    return frozenset()


def capability_name(name: str) -> str:
    upper = name.strip().upper()
    if upper in ("ALL", "CAP_ALL"):
        return "ALL"
    full = upper if upper.startswith("CAP_") else f"CAP_{upper}"
    if full not in _CAPABILITY_NUMBER:
        raise InvalidArgument(f"unknown capability {name!r}")
    return full


def capability_sets(caps: set[str], ambient: set[str]) -> Capabilities:
    ordered = sorted(caps, key=_CAPABILITY_NUMBER.__getitem__)
    ambient_ordered = sorted(ambient, key=_CAPABILITY_NUMBER.__getitem__)
    return {
        "bounding": ordered,
        "effective": list(ordered),
        "permitted": list(ordered),
        "inheritable": ambient_ordered,
        "ambient": list(ambient_ordered),
    }


def container_capabilities(sc: pb.LinuxContainerSecurityContext, host: HostInfo) -> Capabilities:
    """containerd's rules: defaults, "ALL" added then "ALL" dropped, then single adds, then single drops.

    Privileged containers get every capability this daemon holds. Ambient
    capabilities (KEP-2763) are added last, to every set including inheritable,
    because the kernel keeps only ambient caps that are permitted and inheritable.
    """
    adds = {capability_name(c) for c in sc.capabilities.add_capabilities}
    drops = {capability_name(c) for c in sc.capabilities.drop_capabilities}
    ambient = {capability_name(c) for c in sc.capabilities.add_ambient_capabilities}
    if "ALL" in ambient:
        raise InvalidArgument("ALL cannot be an ambient capability")
    if sc.privileged:
        caps = set(host.capabilities)
    else:
        caps = set(host.capabilities) if "ALL" in adds else set(DEFAULT_CAPABILITIES)
        if "ALL" in drops:
            caps = set()
        caps = (caps | (adds - {"ALL"})) - (drops - {"ALL"})
    return capability_sets(caps | ambient, ambient)
