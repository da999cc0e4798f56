"""CRI resources as OCI `linux.resources`: at creation and for UpdateContainerResources, by the same rules."""

from __future__ import annotations

from core.errors import InvalidArgument
from protos import cri_pb2 as pb
from sandbox.oci.model import CpuResources, MemoryResources, Resources
from sandbox.oci.platform import HostInfo


def container_resources(linux: pb.LinuxContainerConfig, host: HostInfo) -> Resources:
    """CPU, memory and hugepage limits; swap equals the memory limit unless set (no swapping by default)."""
    if not linux.HasField("resources"):
        return {}
    return linux_resources(linux.resources, host)


def linux_resources(r: pb.LinuxContainerResources, host: HostInfo) -> Resources:
    """The OCI `linux.resources` (less devices) for CRI resources, on `host`."""
    if r.cpu_period < 0 or r.cpu_shares < 0:
        raise InvalidArgument("cpu period and shares cannot be negative")
    cpu: CpuResources = {}
    if r.cpu_shares:
        cpu["shares"] = r.cpu_shares
    if r.cpu_quota:
        cpu["quota"] = r.cpu_quota
    if r.cpu_period:
        cpu["period"] = r.cpu_period
    if r.cpuset_cpus:
        cpu["cpus"] = r.cpuset_cpus
    if r.cpuset_mems:
        cpu["mems"] = r.cpuset_mems
    memory: MemoryResources = {}
    if r.memory_limit_in_bytes:
        memory["limit"] = r.memory_limit_in_bytes
    swap = r.memory_swap_limit_in_bytes or r.memory_limit_in_bytes
    if swap and host.swap_accounting:
        memory["swap"] = swap
    out: Resources = {}
    if cpu:
        out["cpu"] = cpu
    if memory:
        out["memory"] = memory
    if r.hugepage_limits and host.hugetlb:  # kubelet sends limits for every page size; no controller, no limits
        out["hugepageLimits"] = [{"pageSize": h.page_size, "limit": h.limit} for h in r.hugepage_limits]
    if r.unified and host.cgroup_mode == "v2":  # runc refuses v2 keys on a v1 or hybrid host
        out["unified"] = dict(sorted(r.unified.items()))
    return out
