"""How big a pod's VM is, how big it may be, and what its cgroup lets the VMM use of the host.

A VM gets the configured default size plus what the pod's resources ask for (as
Kata sizes its VMs), refused when that exceeds `[vm] max_vcpus` / `max_memory_mib`.
Its host processes (the jailed QEMU and virtiofsd) share one cgroup,
`<pod cgroup>/<sandbox id>`, below the kubelet's pod cgroup, so the kubelet's pod
accounting sees the VMM; its limits are the guest's size plus what QEMU and
virtiofsd need beyond it, measured on these hosts (the numbers below).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import signal
from dataclasses import dataclass
from pathlib import Path

from core import cgroups
from core.errors import InvalidArgument
from core.proc import wait_exit
from core.settings import VmSettings
from protos import cri_pb2 as pb

MIB = 2**20

# Host memory the VM's processes use beyond guest RAM, MiB, as the cgroup charges it. Measured here under TCG
# (QEMU 7.2, tb-size=32, a 256 MiB busybox pod whose guest then used all its RAM; memory.stat and
# memory.max_usage_in_bytes of the VM's cgroup, /proc/PID/smaps of QEMU): peak usage 309 MiB = 256 MiB of guest
# RAM (shmem) + 53 MiB anon (QEMU 45, with the 32 MiB translation cache; virtiofsd 8). Besides, QEMU keeps the
# kernel and initramfs mapped (77 MiB then, with a 27 MiB initramfs) and its binary and libraries (~20 MiB): page
# cache charged to the first VM that faults it in, reclaimable but in use, so the limit left room for it (53 + 100
# -> 160). Since every VM maps the userland image (vm_backend/guest_memory.py), QEMU maps the kernel (51 MiB), the
# initramfs (2.5) and the image (36): 12 MiB more than the 77, so 10 more (53 + 110 -> 170).
# The translation cache is `[vm] tcg_cache_mib` since (24 by default): the limit keeps the 8 MiB it no longer
# needed at 24 as margin, so a VM's is 146 MiB plus its cache (170 by default). QEMU's records of what the cache
# holds grow with it, outside it: an idle VM pod's anonymous memory besides the cache measured 14.1 MiB with 24,
# 21.9 with 64 and 24.4 with 128 (88 MiB of it in use; `bench.vm --tcg-cache-mib N`), so a cache beyond 24 adds
# a fifth of the excess again.
# KVM cannot be measured here (these hosts' /dev/kvm is PVM): estimated as the same less the translation cache.
OVERHEAD_KVM_MIB = 138
OVERHEAD_TCG_MIB = 146  # plus the VM's translation cache and, beyond 24 MiB of it, a fifth of the excess
UNRECORDED_TCG_CACHE_MIB = 24  # the cache of VMs whose records predate `[vm] tcg_cache_mib`: 24 was fixed then
# What a VM pod costs beyond its containers, for a RuntimeClass's overhead.podFixed (`tandem config
# runtimeclasses`). Memory: the VM cgroup's limit beyond the containers' own limits -- the default guest RAM plus
# vmm_overhead_mib -- because the kubelet's pod cgroup (the containers' limits plus podFixed) holds the VM's cgroup and
# must never be the smaller of the two; an idle pod uses less (PSS 147 MiB each with 3 pods, 117 with 150, as every
# VM maps the same kernel and userland image: `python -m bench.vm --skip jail --idle-pods 3 --idle-seconds 20`,
# TCG, a busybox `sleep 3600` pod). CPU: an idle pod's QEMU + virtiofsd measured 14 millicores (10-18) in one
# such run and 27 (6-38) in another at load 3, 7 since the guest's timers were quieted (qemu.py); podFixed asks
# 100m, room for the VMM's device emulation when the
# guest does I/O, without reserving a whole CPU per pod at scheduling (the VM cgroup's quota is a ceiling, not a
# reservation).
POD_FIXED_CPU_MILLICORES = 100
# Tasks (the pids controller counts threads). Measured: 8 under 8 parallel `find | cat` loops in the guest --
# QEMU 4 (main, RCU, the vCPU, one worker; one more thread per extra vCPU), virtiofsd 4 (no thread pool by
# default). 64 leaves room for QEMU's on-demand workers and the jailer while it starts.
PIDS_BASE = 64
CPU_PERIOD_US = 100_000
# vCPUs run on threads of their own; QEMU's main loop (device emulation) and virtiofsd get one more CPU.
CPU_EXTRA = 1


def node_memory_mib() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) // 1024
    raise OSError("no MemTotal in /proc/meminfo")


def default_max_memory_mib() -> int:
    """Three quarters of the node's memory: a bigger VM leaves too little for the node's own daemons."""
    return node_memory_mib() * 3 // 4


def default_max_vcpus() -> int:
    """The node's CPU count: more vCPUs than CPUs only make the guest slower."""
    return os.cpu_count() or 1


def vm_size(
    config: pb.PodSandboxConfig, default_vcpus: int, default_memory_mib: int, max_vcpus: int, max_memory_mib: int
) -> tuple[int, int]:
    """(vCPUs, MiB) for a pod: the defaults plus what its resources ask for; more than the caps is refused."""
    resources = config.linux.resources
    asked_vcpus = asked_mib = 0
    if resources.cpu_quota > 0 and resources.cpu_period > 0:
        asked_vcpus = math.ceil(resources.cpu_quota / resources.cpu_period)
    if resources.memory_limit_in_bytes > 0:
        asked_mib = math.ceil(resources.memory_limit_in_bytes / MIB)
    vcpus, memory = default_vcpus + asked_vcpus, default_memory_mib + asked_mib
    if vcpus > max_vcpus:
        raise InvalidArgument(
            f"the pod's VM would need {vcpus} vCPUs ({default_vcpus} + {asked_vcpus} for its CPU limit of "
            f"{resources.cpu_quota}/{resources.cpu_period}); at most {max_vcpus} ([vm] max_vcpus)"
        )
    if memory > max_memory_mib:
        raise InvalidArgument(
            f"the pod's VM would need {memory} MiB ({default_memory_mib} + {asked_mib} for its memory limit of "
            f"{resources.memory_limit_in_bytes} bytes); at most {max_memory_mib} MiB ([vm] max_memory_mib)"
        )
    return vcpus, memory


@dataclass(frozen=True)
class VmSizing:
    """How big a pod's VM boots: `[vm]`'s defaults and headroom, within the node's caps. One for the backend,
    shared by a cold boot and the warm pool, so both size a pod's VM the same way."""

    default_vcpus: int
    default_memory_mib: int
    headroom_mib: int
    max_vcpus: int
    max_memory_mib: int

    @classmethod
    def of(cls, vm: VmSettings) -> VmSizing:
        """From the settings; an unset cap is the node's (`default_max_vcpus`, `default_max_memory_mib`)."""
        return cls(
            vm.default_vcpus,
            vm.default_memory_mib,
            vm.memory_headroom_mib,
            vm.max_vcpus or default_max_vcpus(),
            vm.max_memory_mib or default_max_memory_mib(),
        )

    def boot_size(self, config: pb.PodSandboxConfig) -> tuple[int, int, int]:
        """(vCPUs, MiB the VM boots with, MiB its pod may use): `vm_size` plus the headroom the balloon holds."""
        vcpus, size = vm_size(config, self.default_vcpus, self.default_memory_mib, self.max_vcpus, self.max_memory_mib)
        return vcpus, max(size, min(size + self.headroom_mib, self.max_memory_mib)), size


def vm_cgroup(cgroup_parent: str, sandbox_id: str) -> str:
    """The VM's cgroup: `<pod cgroup>/<sandbox id>`, where a runc pod's infra container would be."""
    return cgroups.cgroups_path(cgroups.pod_parent(cgroup_parent, sandbox_id), sandbox_id)


def vmm_overhead_mib(accel: str, tcg_cache_mib: int) -> int:
    """Host memory a VM's QEMU and virtiofsd use beyond its guest RAM (see above); under TCG its cache adds to it."""
    if accel != "tcg":
        return OVERHEAD_KVM_MIB
    return OVERHEAD_TCG_MIB + tcg_cache_mib + math.ceil(max(0, tcg_cache_mib - 24) / 5)


def pod_fixed_overhead(default_memory_mib: int, overhead_mib: int) -> tuple[int, int]:
    """(CPU millicores, memory MiB) a RuntimeClass's overhead.podFixed needs for VM pods (see above)."""
    return POD_FIXED_CPU_MILLICORES, default_memory_mib + overhead_mib


def vm_limits(vcpus: int, memory_mib: int, overhead_mib: int) -> cgroups.Limits:
    """The VM's cgroup limits: guest RAM and what QEMU and virtiofsd use besides (`vmm_overhead_mib`)."""
    return cgroups.Limits(
        memory_bytes=(memory_mib + overhead_mib) * MIB,
        pids=PIDS_BASE + vcpus,
        cpu_quota_us=(vcpus + CPU_EXTRA) * CPU_PERIOD_US,
        cpu_period_us=CPU_PERIOD_US,
    )


def create_cgroup(path: str, limits: cgroups.Limits) -> None:
    cgroups.create(path)
    cgroups.set_limits(path, limits)


async def kill_cgroup(path: str, timeout: float = 10.0) -> None:
    """SIGKILL every process in the cgroup and wait until they are gone.

    Each is signalled through a pidfd opened while it was still listed there, so a
    pid that ends and is reused meanwhile is never hit.
    """
    for pid in await asyncio.to_thread(cgroups.processes, path):
        try:
            pidfd = os.pidfd_open(pid)
        except ProcessLookupError:
            continue
        try:
            if pid in await asyncio.to_thread(cgroups.processes, path):
                with contextlib.suppress(ProcessLookupError):
                    signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        finally:
            os.close(pidfd)
        await wait_exit(pid, timeout)


def remove_cgroup(cgroup_parent: str, sandbox_id: str) -> None:
    """The VM's cgroup, and the pod's too when Tandem made it (no kubelet parent)."""
    cgroups.remove(vm_cgroup(cgroup_parent, sandbox_id))
    if not cgroup_parent:
        cgroups.remove(cgroups.pod_parent(cgroup_parent, sandbox_id))
