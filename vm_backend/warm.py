"""Warm VMs for the pool (`pool.py`): made ahead of any pod, handed whole to the pod that claims one.

Each warm VM `warm-<hex>` holds, all named from its id (so a record or a leftover
alone says what to remove):
    <run_dir>/warm-<hex>/                  its run dir (a tmpfs, `rundir.py`), share namespace and sockets
    <run_dir>/netns-warm/warm-<hex>        its network namespace, with the tap (`tap0`) in it
    <cgroup root>/.../tandem/warm/warm-<hex>   its cgroup, with a pod of the default size's limits (a daemon
                                           with another runtime dir: tandem/warm-<hash of it>/)
    <run_dir>/jail-ids/<uid> -> warm-<hex>  its jail uid
A claim makes all of it the pod's (`claim`): the uid's link names the pod; the
pod's VM cgroup `<pod cgroup>/<pod id>` is made with the same limits and QEMU and
virtiofsd move into it (on a v1 memory hierarchy their charges move along; on v2
what the guest touched while it booted stays charged to `tandem/warm`, which
counts in no pod, until the VM ends); the network namespace is pinned where the
manager wants the pod's, and the pod's record names the run dir. From then on
the pod's stop and removal find everything as for a VM booted for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
from collections.abc import Awaitable, Callable
from pathlib import Path

from core import cgroups, mounts
from core.errors import FailedPrecondition, TandemError
from core.files import private_dir
from core.proc import ProcessIdentity, kill_and_wait
from core.settings import VmSettings
from protos import agent_pb2
from protos import cri_pb2 as pb
from sandbox import netns
from sandbox.backend import ExitStatus
from sandbox.model import SandboxRecord
from vm_backend import resize, resources
from vm_backend.events import PodEvents
from vm_backend.guest_image import GuestAssets
from vm_backend.jail import Jail, JailIds
from vm_backend.network import attach_tap, make_tap, random_mac
from vm_backend.pod import PodVm
from vm_backend.pool import WarmPool, WarmRecord, is_warm_id
from vm_backend.qemu import VMM_DIR, QemuVm, TapNic, VmSpec, qmp
from vm_backend.rundir import make_run_dir, remove_run_dir
from vm_backend.setup import setup_pod
from vm_backend.share import PodShare
from vm_backend.virtiofs import Virtiofsd

log = logging.getLogger("tandem.vm.warm")

TAP = "tap0"
SHARE_TAG = "tandem"
AGENT_CONNECT_TIMEOUT = 60.0
DEFAULT_ROOT = Path("/run/tandem/vm")


def warm_cgroup_parent(root: Path) -> str:
    """The cgroup every warm VM of one daemon sits under: `tandem/warm` for the default runtime dir, and one
    named after the VM run dir `root` for any other. A second daemon on the host (a test's, a benchmark's)
    scans only its own for leftovers, never taking another daemon's warm VMs for its own."""
    if root == DEFAULT_ROOT:
        return f"{cgroups.DEFAULT_PARENT}/warm"
    return f"{cgroups.DEFAULT_PARENT}/warm-{hashlib.sha256(os.fsencode(root)).hexdigest()[:12]}"


class WarmVmMaker:
    """Makes, claims and destroys warm VMs for one VM backend."""

    def __init__(
        self,
        settings: VmSettings,
        root: Path,
        assets: GuestAssets,
        jail_ids: JailIds,
        sizing: resources.VmSizing,
        accel: Callable[[], Awaitable[str]],
        exited: Callable[[str, ExitStatus | None], None],
        log_size_max: int,
    ) -> None:
        self.settings = settings
        self.root = root
        self.netns_root = root / "netns-warm"
        self.cgroup_parent = warm_cgroup_parent(root)
        self.assets = assets
        self.jail_ids = jail_ids
        self.sizing = sizing
        self._accel = accel
        self._exited = exited
        self._log_size_max = log_size_max

    # ---- names -------------------------------------------------------------------------------

    def run_dir(self, vm_id: str) -> Path:
        return self.root / vm_id

    def netns(self, vm_id: str) -> Path:
        return self.netns_root / vm_id

    def cgroup(self, vm_id: str) -> str:
        return cgroups.cgroups_path(self.cgroup_parent, vm_id)

    def size(self) -> tuple[int, int, int]:
        """A warm VM's size: that of a pod without CPU or memory limits."""
        return self.sizing.boot_size(pb.PodSandboxConfig())

    def _spec(self, record: WarmRecord, jail: Jail | None = None) -> VmSpec:
        return VmSpec(
            name=record.id,
            run_dir=self.run_dir(record.id),
            kernel=self.assets.kernel,
            initramfs=self.assets.initramfs,
            userland=self.assets.userland,
            userland_bytes=self.assets.userland_bytes,
            accel=record.accel or "tcg",
            tcg_cache_mib=record.tcg_cache_mib,
            vcpus=record.vcpus,
            memory_mib=record.memory_mib,
            share_tag=SHARE_TAG,
            tap=TapNic(TAP, record.mac) if record.mac else None,
            netns=self.netns(record.id),
            qemu=str(self.settings.qemu),
            jail=jail,
        )

    @staticmethod
    def _overhead(record: WarmRecord) -> int:
        return resources.vmm_overhead_mib(record.accel or "tcg", record.tcg_cache_mib)

    def _virtiofsd(self, record: WarmRecord) -> Virtiofsd:
        return Virtiofsd.of_vm(self.run_dir(record.id), str(self.settings.virtiofsd), record.memory_mib)

    # ---- boot and destroy --------------------------------------------------------------------

    async def boot(self, record: WarmRecord, save: Callable[[], None], on_end: Callable[[], None]) -> PodVm:
        """Everything a cold start makes before CNI, then the boot and the agent's Hello: a pod's VM minus its pod."""
        record.accel = await self._accel()
        record.tcg_cache_mib = self.settings.tcg_cache_mib
        record.mac = random_mac()
        save()
        run_dir = self.run_dir(record.id)
        private_dir(run_dir)
        await asyncio.to_thread(mounts.make_private, self.root)  # the run dirs' tmpfs mounts stay in this namespace
        await asyncio.to_thread(make_run_dir, run_dir, run_dir / VMM_DIR)
        await PodShare(run_dir).create()
        path = await netns.create(self.netns_root, record.id)
        await make_tap(path, TAP)
        jail = None
        if self.settings.jail:
            uid = self.jail_ids.allocate(record.id)
            cgroup = self.cgroup(record.id)
            limits = resources.vm_limits(record.vcpus, record.size_mib, self._overhead(record))
            await asyncio.to_thread(resources.create_cgroup, cgroup, limits)
            jail = Jail(uid, uid, tuple(cgroups.directories(cgroup)))
        events = PodEvents(record.id, self._exited, self._log_size_max)
        pod = PodVm(run_dir, QemuVm(self._spec(record, jail), self._virtiofsd(record)), events, on_end)
        try:
            await pod.vm.start(boot_timeout=self.settings.boot_timeout_seconds)
            qemu = pod.vm.identity()
            if qemu is not None:
                record.qemu = {"pid": qemu.pid, "start_time": qemu.start_time}
                save()
            pod.watch()
            await pod.connect(AGENT_CONNECT_TIMEOUT)
            if record.memory_mib > record.size_mib:  # the headroom goes into the balloon, as for a cold boot
                await qmp(pod.vm.spec.qmp_socket, "balloon", value=record.size_mib * resize.MIB)
        except BaseException:
            await pod.close()
            raise
        return pod

    async def destroy(self, record: WarmRecord, handle: PodVm | None) -> None:
        """QEMU and virtiofsd (by their records, cgroups and pidfiles), then every other thing the VM held."""
        if handle is not None:
            await handle.close()
        run_dir = self.run_dir(record.id)
        if record.qemu:
            await kill_and_wait(ProcessIdentity(int(record.qemu["pid"]), int(record.qemu["start_time"])), 10.0)
        if run_dir.is_dir():
            await QemuVm(self._spec(record), self._virtiofsd(record)).kill()
        for cgroup in filter(None, (self.cgroup(record.id), record.pod_cgroup)):
            await resources.kill_cgroup(cgroup)
            await asyncio.to_thread(cgroups.remove, cgroup)
        if run_dir.is_dir():
            await asyncio.to_thread(PodShare(run_dir).unpin)
            await asyncio.to_thread(remove_run_dir, run_dir)
        await netns.remove(self.netns(record.id))
        if record.pod_netns and netns.exists(Path(record.pod_netns)):
            await netns.remove(Path(record.pod_netns))
        self.jail_ids.release(record.id)
        if record.claimed_by:
            self.jail_ids.release(record.claimed_by)

    def strays(self, known: set[str]) -> list[WarmRecord]:
        """Run dirs, network namespaces, jail uids and cgroups of warm VMs that no known id names."""
        found: set[str] = set()
        for directory in (self.root, self.netns_root):
            with contextlib.suppress(FileNotFoundError):
                found.update(e.name for e in os.scandir(directory) if is_warm_id(e.name))
        found.update(owner for owner in self.jail_ids.holders().values() if is_warm_id(owner))
        for directory in cgroups.directories(self.cgroup_parent):
            with contextlib.suppress(FileNotFoundError):
                found.update(e.name for e in os.scandir(directory) if e.is_dir() and is_warm_id(e.name))
        return [WarmRecord(vm_id, 0, 0, 0) for vm_id in sorted(found - known)]

    # ---- claims ------------------------------------------------------------------------------

    async def claim(self, pool: WarmPool[PodVm], sandbox: SandboxRecord, path: Path) -> PodVm | None:
        """A warm VM made `sandbox`'s, its network namespace pinned at `path`; None if the pool has none that fits
        (or the hand-over failed: that VM is destroyed, and the pod boots cold)."""
        vcpus, memory, size = self.sizing.boot_size(sandbox.config)
        cgroup = resources.vm_cgroup(sandbox.config.linux.cgroup_parent, sandbox.id) if self.settings.jail else ""
        entry = pool.claim(sandbox.id, vcpus, memory, size, str(path))
        if entry is None:
            return None
        record, pod = entry.record, entry.handle
        try:
            if cgroup:
                record.pod_cgroup = cgroup
                pool.save(record)
                uid = self.jail_ids.transfer(record.id, sandbox.id)
                limits = resources.vm_limits(vcpus, size, self._overhead(record))
                await asyncio.to_thread(resources.create_cgroup, cgroup, limits)
                await asyncio.to_thread(_move_all, self.cgroup(record.id), cgroup)
                sandbox.backend_state.update(jail_uid=uid, jail_gid=uid, cgroup=cgroup)
            await asyncio.to_thread(mounts.sys_mount, str(self.netns(record.id)), path, None, mounts.MS_BIND)
        except (TandemError, OSError) as e:
            log.warning("warm VM %s: hand-over to pod %s failed, booting it cold: %s", record.id, sandbox.id[:12], e)
            await pool.discard(entry)
            sandbox.backend_state.clear()
            return None
        with contextlib.suppress(TandemError, OSError):
            await netns.remove(self.netns(record.id))  # pinned at `path` now
        sandbox.backend_state.update(
            warm=record.id,
            warm_mac=record.mac,
            vm_name=record.id,
            run_dir=str(self.run_dir(record.id)),
            accel=record.accel,
            tcg_cache_mib=record.tcg_cache_mib,
            vcpus=vcpus,
            memory_mib=memory,
            size_mib=size,
            **self.assets.boot_state(),
            tap=TAP,
            mac=record.mac,
            qemu_pid=pod.vm.pid(),
        )
        pod.events.pod_id = sandbox.id
        pod.on_end = lambda: self._exited(sandbox.id, None)
        log.info("pod %s claimed warm VM %s", sandbox.id[:12], record.id)
        return pod

    async def start(self, pool: WarmPool[PodVm], sandbox: SandboxRecord, pod: PodVm) -> agent_pb2.SetupPod:
        """After CNI ADD: the tap joined to the pod's veth, then SetupPod; the pool's record goes (the pod's
        record, persisted before CNI ADD, names everything now)."""
        pool.forget(str(sandbox.backend_state["warm"]))
        guest = await attach_tap(Path(sandbox.netns_path), tap=TAP, made=True)
        setup = setup_pod(sandbox, guest, SHARE_TAG, current_mac=str(sandbox.backend_state["warm_mac"]))
        await pod.client_or_fail().setup_pod(setup)
        return setup


def _move_all(source: str, target: str) -> None:
    """Every process of `source` into `target`, checked: a process left behind would stay outside the pod."""
    cgroups.move_processes(source, target)
    left = cgroups.processes(source)
    if left:
        cgroups.move_processes(source, target)
        left = cgroups.processes(source)
    if left:
        raise FailedPrecondition(f"processes {sorted(left)} stayed in cgroup {source}")
    cgroups.remove(source)
