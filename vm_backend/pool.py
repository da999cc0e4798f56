"""The warm pool: VMs booted ahead of their pods (`[vm] warm_pool`), so a VM pod does not wait for a boot.

Each warm VM is booted with the agent up (Hello answered), its own virtiofsd and
empty share, jail uid, cgroup and a network namespace with its tap already in it
(`warm.py` makes and destroys them). A pod whose VM would have the pool's size
claims one; a warm VM serves exactly one pod and goes with it: never reused,
never shared, and it never held anything of another pod.

What the pool knows is on disk as one record per VM (`<dir>/<id>.json`), written
before anything of the VM is made, so a daemon killed at any point leaves a
record naming everything to undo. After a restart every record is settled: one
whose claim its pod recorded is the pod's from then on (the record goes); any
other VM is destroyed and the pool boots afresh (reaping is simpler than
re-adopting a VM whose boot nobody watched, and it costs one boot).

Refills run in the background, one boot at a time, and wait while a pod start is
in progress: on a small node a refill must not slow the start it exists for.
A boot that fails, or a warm VM that dies before a pod claims it, counts as a
failure; consecutive failures back off (`BACKOFF_FIRST` doubling up to
`BACKOFF_MAX`) until a claim shows the pool works, so a host that cannot boot VMs
tries a few times an hour instead of spinning.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

from core.errors import TandemError
from core.files import atomic_write_json, private_dir
from vm_backend.resources import UNRECORDED_TCG_CACHE_MIB

log = logging.getLogger("tandem.vm.pool")

BACKOFF_FIRST = 5.0
BACKOFF_MAX = 600.0
ID_PREFIX = "warm-"
_ID = re.compile(r"warm-[0-9a-f]{8}")


def is_warm_id(name: str) -> bool:
    """Whether `name` is a warm VM's id (and nothing else that lives beside warm VMs' directories)."""
    return _ID.fullmatch(name) is not None


@dataclass
class WarmRecord:
    """One warm VM as the pool records it. Every name of what it holds derives from `id` (`warm.py`)."""

    id: str
    vcpus: int
    memory_mib: int
    size_mib: int
    accel: str = ""
    tcg_cache_mib: int = UNRECORDED_TCG_CACHE_MIB  # under TCG; set at boot from `[vm] tcg_cache_mib`
    mac: str = ""  # the guest NIC's MAC at boot; the pod's veth's MAC replaces it at SetupPod
    ready: bool = False  # booted, its agent answered
    qemu: dict[str, int] = field(default_factory=dict)  # QEMU's identity (pid, start time) once launched
    claimed_by: str = ""  # the pod that claimed it
    pod_netns: str = ""  # where the claim pins its network namespace for that pod
    pod_cgroup: str = ""  # the pod's VM cgroup, into which the claim moves QEMU and virtiofsd

    @classmethod
    def new(cls, vcpus: int, memory_mib: int, size_mib: int) -> WarmRecord:
        return cls(f"{ID_PREFIX}{secrets.token_hex(4)}", vcpus, memory_mib, size_mib)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> WarmRecord:
        record = cls(str(data["id"]), int(data["vcpus"]), int(data["memory_mib"]), int(data["size_mib"]))
        record.accel, record.mac = str(data.get("accel", "")), str(data.get("mac", ""))
        record.tcg_cache_mib = int(data.get("tcg_cache_mib", UNRECORDED_TCG_CACHE_MIB))
        record.ready, record.qemu = bool(data.get("ready")), dict(data.get("qemu") or {})
        record.claimed_by, record.pod_netns = str(data.get("claimed_by", "")), str(data.get("pod_netns", ""))
        record.pod_cgroup = str(data.get("pod_cgroup", ""))
        return record

    def fits(self, vcpus: int, memory_mib: int, size_mib: int) -> bool:
        """Whether a pod whose VM would be booted with this size gets exactly that from this VM."""
        return (self.vcpus, self.memory_mib, self.size_mib) == (vcpus, memory_mib, size_mib)


def warm_records(directory: Path) -> list[WarmRecord]:
    """The warm VMs recorded in `directory`, read only (for `tandem doctor` beside a running daemon)."""
    found = []
    for path in sorted(directory.glob("*.json")) if directory.is_dir() else []:
        if is_warm_id(path.stem):
            with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
                found.append(WarmRecord.from_dict(json.loads(path.read_bytes())))
    return found


H = TypeVar("H")


class WarmVms(Protocol[H]):
    """What the pool needs of the VMs it keeps (`warm.py`, or a test's double)."""

    def size(self) -> tuple[int, int, int]:
        """(vCPUs, memory MiB it boots with, MiB its pod may use) of a warm VM: a pod of the default size's."""

    async def boot(self, record: WarmRecord, save: Callable[[], None], on_end: Callable[[], None]) -> H:
        """Make and boot the VM `record` names, calling `save` whenever the record changed; `on_end` is called
        if the VM dies later. On failure, what was made may remain: `destroy` removes it."""

    async def destroy(self, record: WarmRecord, handle: H | None) -> None:
        """Remove everything of the VM, whatever state a crash left it in. Idempotent."""

    def strays(self, known: set[str]) -> list[WarmRecord]:
        """Warm VMs' leftovers on this host that no record in `known` (ids) names: to destroy."""


@dataclass
class WarmVm(Generic[H]):
    """A ready warm VM: its record and the handle `WarmVms.boot` gave."""

    record: WarmRecord
    handle: H


class WarmPool(Generic[H]):
    """`size` warm VMs made by `vms`, recorded in `directory`."""

    def __init__(
        self,
        size: int,
        vms: WarmVms[H],
        directory: Path,
        *,
        backoff_first: float = BACKOFF_FIRST,
        backoff_max: float = BACKOFF_MAX,
    ) -> None:
        self.size = size
        self.vms = vms
        self.directory = directory
        self.backoff_first, self.backoff_max = backoff_first, backoff_max
        self.ready: dict[str, WarmVm[H]] = {}
        self.booting: WarmRecord | None = None
        self.failures = 0  # consecutive: boots that failed and warm VMs that died unclaimed
        self.last_error = ""
        self.claimed = 0
        self._retry_at = 0.0  # monotonic time before which no boot starts (the back-off)
        self._starts: set[str] = set()  # pods whose start is in progress: refills wait for them
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._refill: asyncio.Task[None] | None = None
        self._ending: set[asyncio.Task[None]] = set()
        self._closed = False

    # ---- records -----------------------------------------------------------------------------

    def _path(self, vm_id: str) -> Path:
        if not is_warm_id(vm_id):
            raise ValueError(f"not a warm VM id: {vm_id!r}")
        return self.directory / f"{vm_id}.json"

    def save(self, record: WarmRecord) -> None:
        atomic_write_json(self._path(record.id), asdict(record), durable=False)

    def forget(self, vm_id: str) -> None:
        """Drop a record: its VM is destroyed, or belongs to the pod that claimed it."""
        self._path(vm_id).unlink(missing_ok=True)

    def records(self) -> list[WarmRecord]:
        """Every record on disk; an unreadable one is set aside (the strays scan finds what it named)."""
        found = []
        for path in sorted(p for p in private_dir(self.directory).glob("*.json") if is_warm_id(p.stem)):
            try:
                found.append(WarmRecord.from_dict(json.loads(path.read_bytes())))
            except (OSError, ValueError, KeyError, TypeError) as e:
                log.error("unreadable warm VM record set aside: %s: %s", path, e)
                os.replace(path, path.with_suffix(".corrupt"))
        return found

    # ---- start-up and shutdown ---------------------------------------------------------------

    async def start(self, owned: dict[str, str]) -> None:
        """Settle what a previous daemon left (`owned`: warm VM id -> the pod whose record names it), then refill.

        A VM whose claim its pod recorded is that pod's; every other one is destroyed.
        """
        records = self.records()
        for record in records:
            if record.claimed_by and owned.get(record.id) == record.claimed_by:
                self.forget(record.id)
                continue
            await self._reap(record, "left by the previous daemon")
        for record in self.vms.strays({r.id for r in records} | set(owned)):
            await self._reap(record, "a leftover without a record")
        if self.size > 0:
            self._refill = asyncio.create_task(self._refill_loop())
            self._wake.set()

    async def _reap(self, record: WarmRecord, why: str) -> None:
        log.info("warm VM %s destroyed: %s", record.id, why)
        try:
            await self.vms.destroy(record, None)
        except (TandemError, OSError) as e:
            log.error("warm VM %s: not all of it could be removed: %s", record.id, e)
            return  # its record stays: the next start tries again
        self.forget(record.id)

    async def close(self) -> None:
        """The daemon is stopping: no more refills, and the unclaimed VMs go (a restart boots new ones)."""
        self._closed = True
        if self._refill is not None:
            self._refill.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._refill
        await asyncio.gather(*self._ending, return_exceptions=True)
        for vm_id in list(self.ready):
            entry = self.ready.pop(vm_id)
            await self._destroy(entry.record, entry.handle)

    async def _destroy(self, record: WarmRecord, handle: H | None) -> None:
        try:
            await self.vms.destroy(record, handle)
        except (TandemError, OSError) as e:
            log.error("warm VM %s: not all of it could be removed: %s", record.id, e)
            return
        self.forget(record.id)

    # ---- claims ------------------------------------------------------------------------------

    def claim(self, pod_id: str, vcpus: int, memory_mib: int, size_mib: int, pod_netns: str) -> WarmVm[H] | None:
        """A ready warm VM of exactly this size for `pod_id`, its claim recorded; None if there is none."""
        for vm_id, entry in self.ready.items():
            if entry.record.fits(vcpus, memory_mib, size_mib):
                del self.ready[vm_id]
                entry.record.claimed_by, entry.record.pod_netns = pod_id, pod_netns
                self.save(entry.record)
                self.claimed += 1
                self.failures = 0  # the pool works
                self._retry_at = 0.0
                self._wake.set()
                return entry
        return None

    async def discard(self, entry: WarmVm[H]) -> None:
        """A claimed VM whose hand-over failed: destroyed (its pod boots cold)."""
        await self._destroy(entry.record, entry.handle)

    def starting(self, pod_id: str) -> None:
        """A pod's start began (before its network: a claim comes then): no refill boot begins until it ends."""
        self._starts.add(pod_id)
        self._idle.clear()

    def started(self, pod_id: str) -> None:
        """The pod's start is over, whichever way (idempotent: its removal says so again)."""
        self._starts.discard(pod_id)
        if not self._starts:
            self._idle.set()

    # ---- refills -----------------------------------------------------------------------------

    def _backoff(self) -> float:
        if self.failures == 0:
            return 0.0
        return min(self.backoff_max, self.backoff_first * 2 ** (self.failures - 1))

    def _failed(self, why: str) -> None:
        self.failures += 1
        self.last_error = why
        self._retry_at = time.monotonic() + self._backoff()
        log.warning("warm pool: %s; next boot in %.0fs (%d failures in a row)", why, self._backoff(), self.failures)

    async def _refill_loop(self) -> None:
        while not self._closed:
            await self._wake.wait()
            self._wake.clear()
            while not self._closed and len(self.ready) < self.size:
                if (wait := self._retry_at - time.monotonic()) > 0:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._retry_wait(), wait)
                    continue
                await self._idle.wait()
                await self._boot_one()

    async def _retry_wait(self) -> None:
        """Until the back-off is lifted early (a claim: the pool works after all)."""
        while self._retry_at > time.monotonic():
            await self._wake.wait()
            self._wake.clear()

    async def _boot_one(self) -> None:
        vcpus, memory, size = self.vms.size()
        record = WarmRecord.new(vcpus, memory, size)
        self.save(record)  # before anything is made: a crash from here on leaves a record naming it all
        self.booting = record
        began = time.monotonic()
        try:
            handle = await self.vms.boot(record, lambda: self.save(record), lambda: self._ended(record.id))
        except asyncio.CancelledError:
            await asyncio.shield(self._destroy(record, None))
            raise
        except (TandemError, OSError) as e:
            self._failed(f"warm VM {record.id} did not boot: {e}")
            await self._destroy(record, None)
            return
        finally:
            self.booting = None
        record.ready = True
        self.save(record)
        self.ready[record.id] = WarmVm(record, handle)
        took = time.monotonic() - began
        log.info("warm VM %s ready in %.2fs (%d of %d)", record.id, took, len(self.ready), self.size)

    def _ended(self, vm_id: str) -> None:
        """A warm VM's QEMU ended before any pod claimed it: destroyed and replaced (a failure: it should not)."""
        entry = self.ready.pop(vm_id, None)
        if entry is None or self._closed:
            return
        self._failed(f"warm VM {vm_id} died unclaimed")
        task = asyncio.create_task(self._destroy(entry.record, entry.handle))
        self._ending.add(task)
        task.add_done_callback(self._ending.discard)
        self._wake.set()

    # ---- what it tells ----------------------------------------------------------------------

    def describe(self) -> dict[str, Any]:
        """For `crictl info` and the logs: how many, what size, and how refills are going."""
        vcpus, memory, size = self.vms.size()
        info: dict[str, Any] = {
            "size": self.size,
            "ready": len(self.ready),
            "booting": self.booting is not None,
            "vcpus": vcpus,
            "memoryMiB": size,
            "bootMemoryMiB": memory,
            "claimed": self.claimed,
            "failuresInARow": self.failures,
        }
        if self.last_error:
            info["lastError"] = self.last_error
        if (wait := self._retry_at - time.monotonic()) > 0 and len(self.ready) < self.size:
            info["nextBootInSeconds"] = round(wait)
        return info
