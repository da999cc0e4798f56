"""What a backend tells the OCI layer about where a container will run, before its spec is built.

The manager asks the pod's backend for a `ContainerPlatform` (the backend mounts
the container's root and knows its host, namespaces and cgroup), builds the spec
from the CRI request with it, and hands the spec back to the backend to run.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from sandbox.oci.namespaces import Namespaces

CgroupMode = Literal["v1", "hybrid", "v2"]


@dataclass(frozen=True)
class HostInfo:
    """Facts about the machine a container runs on that shape its spec: the node, or a VM's guest."""

    capabilities: frozenset[str]  # what privileged / "ALL" can hand out there
    cgroup_mode: CgroupMode
    swap_accounting: bool  # memory.memsw (v1) / memory.swap.max (v2) exists, so swap limits can be set
    hugetlb: bool  # the hugetlb controller is available
    hostname: str  # HOSTNAME for pods that did not ask for one
    dev_dir: Path = Path("/dev")  # the devices a privileged container is given
    mountinfo: Path = Path("/proc/self/mountinfo")  # read per container: mounts change


@dataclass(frozen=True)
class PodFiles:
    """Per-pod files the backend prepares; mounted into every container."""

    hostname: Path  # bind-mounted at /etc/hostname
    resolv_conf: Path  # /etc/resolv.conf
    hosts: Path  # /etc/hosts
    shm: Path | None  # a tmpfs dir bind-mounted at /dev/shm; None when the pod uses the host IPC namespace


@dataclass(frozen=True)
class ContainerPlatform:
    """Where and how one container will run, as its backend prepared it."""

    rootfs: Path  # the container's mounted root as this host sees it: user and group names resolve in it
    host: HostInfo
    namespaces: Namespaces
    cgroups_path: str
    pod_files: PodFiles
    oom_score_adj_floor: int  # the lowest oom_score_adj the runtime can set there
