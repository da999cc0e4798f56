"""Resizing a running pod's VM: its memory through the balloon inside, its cgroup outside.

QEMU's microvm machine cannot grow a guest: it has no ACPI memory hotplug (QEMU 7.2:
"Device 'pc-dimm' can not be hotplugged on this machine"), its virtio-mem is not
plugged as a memory device (no device memory region: `query-memory-devices` is
empty), and it has no CPU hotplug either ("query-hotpluggable-cpus is not enabled").
So a VM boots with `[vm] memory_headroom_mib` more RAM than its pod asks for, the
virtio-balloon holds that headroom, and a resize moves the balloon: letting go of
it grows the guest, inflating it shrinks the guest. The VM's cgroup follows the
size the guest is allowed (plus the VMM's overhead): raised before the balloon lets
go, lowered after the guest has given the memory back. A size beyond what the VM
booted with is refused, saying why. vCPUs are fixed at boot: a CPU limit changes
inside the guest only (the VM's cgroup quota already covers all its vCPUs).

A hostile guest can refuse to inflate its balloon; it then keeps the cgroup limit it
had, never more.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from pathlib import Path
from typing import Any

from core import cgroups
from core.errors import FailedPrecondition
from vm_backend import resources
from vm_backend.qemu import qmp

log = logging.getLogger("tandem.vm")

MIB = 2**20
BALLOON_DEADLINE = 30.0  # seconds for a guest to give memory back (TCG guests are slow)
_POLL = 0.1


def target_for(default_memory_mib: int, limit_bytes: int) -> int:
    """The guest RAM (MiB) a pod or container memory limit needs: the VM's own default plus the limit."""
    return default_memory_mib + (math.ceil(limit_bytes / MIB) if limit_bytes > 0 else 0)


def check_fits(state: dict[str, Any], wanted_mib: int, what: str) -> None:
    """Refuse a size the VM cannot reach: more than the RAM it booted with."""
    booted = int(state.get("memory_mib", 0))
    if wanted_mib > booted:
        raise FailedPrecondition(
            f"{what} needs the pod's VM to have {wanted_mib} MiB of RAM, but it booted with {booted} MiB "
            f"({int(state.get('size_mib', booted))} MiB for the pod + [vm] memory_headroom_mib) and cannot grow "
            "beyond that: QEMU's microvm machine has no memory hotplug. Recreate the pod with the new limit, "
            "or give VMs more headroom ([vm] memory_headroom_mib)"
        )


async def resize_memory(state: dict[str, Any], qmp_socket: Path, wanted_mib: int) -> None:
    """Give the guest `wanted_mib` of RAM (within what it booted with) and move the VM's cgroup limit with it.

    `state` is the pod's backend state: `memory_mib` (booted), `size_mib` (allowed now), `accel`, `tcg_cache_mib`
    (absent in records from before it was a setting: it was 24 then), `cgroup`.
    """
    check_fits(state, wanted_mib, "this size")
    current = int(state.get("size_mib", state["memory_mib"]))
    if wanted_mib == current:
        return
    cgroup = state.get("cgroup")
    cache = int(state.get("tcg_cache_mib", resources.UNRECORDED_TCG_CACHE_MIB))
    overhead = resources.vmm_overhead_mib(state.get("accel", "tcg"), cache)
    if wanted_mib > current:
        if cgroup:
            await asyncio.to_thread(cgroups.set_memory_limit, cgroup, (wanted_mib + overhead) * MIB)
        await qmp(qmp_socket, "balloon", value=wanted_mib * MIB)
    else:
        await qmp(qmp_socket, "balloon", value=wanted_mib * MIB)
        if not await _balloon_reaches(qmp_socket, wanted_mib):
            log.warning("vm %s: the guest did not give memory back; its cgroup keeps %d MiB", qmp_socket, current)
            return
        if cgroup:
            await asyncio.to_thread(cgroups.set_memory_limit, cgroup, (wanted_mib + overhead) * MIB)
    state["size_mib"] = wanted_mib
    log.info("vm %s: guest memory now %d MiB (was %d)", qmp_socket.parent.parent.name, wanted_mib, current)


async def _balloon_reaches(qmp_socket: Path, wanted_mib: int) -> bool:
    """Whether the guest's memory comes down to `wanted_mib` within BALLOON_DEADLINE (QMP query-balloon)."""
    deadline = time.monotonic() + BALLOON_DEADLINE
    while True:
        actual = int((await qmp(qmp_socket, "query-balloon"))["actual"])
        if actual <= wanted_mib * MIB:
            return True
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(_POLL)
