"""The untrusted backend: each pod is its own QEMU micro-VM, its containers run inside by the guest agent.

What lives on the host, per pod (runtime dirs vanish on reboot, as the VMs do):
    <runtime_dir>/vm/<pod id[:16]>/                 the VM's run dir, a tmpfs of its own (`rundir.py`):
                                                    virtiofsd's socket, pidfiles, QEMU's and virtiofsd's logs
    <runtime_dir>/vm/<pod id[:16]>/vmm/             QEMU's sockets and console log, a tmpfs owned by the jail uid
    <runtime_dir>/vm/<pod id[:16]>/share.ns         the pod's share namespace (`share.py`): the virtio-fs share,
                                                    where each container's rootfs and CRI mounts are attached
    <runtime_dir>/vm/<pod id[:16]>/c/<id>/          a container's overlay mount point (rootfs/, never seen by the
                                                    guest) and its process spec
    <state_dir>/vm/layers/<id>/                     a container's writable layer (upper, work)
    <runtime_dir>/vm/jail-ids/<uid> -> <pod id>     the jail uid (= gid) the pod's QEMU runs as
    <cgroup root>/<hierarchy>/<pod cgroup>/<pod id>   the VM's cgroup: QEMU and virtiofsd, with their limits

The daemon keeps one `PodVm` handle per pod (`pod.py`: QemuVm + AgentClient + the
watch on QEMU's end); after a restart it is rebuilt from the records (`resume_sandbox`:
the manager names the pod's containers) and reconnects in the background; the agent's
Hello replays every unacked event: output lands in the logs, exits reach the manager,
which persists them before they are acknowledged (`events.py`). Every event is guest
data: the router accepts only IDs this host created for the pod. The guest's specs
come from the shared OCI layer, moved into the guest's paths (`guest_spec.py`); exec,
attach and port-forward sessions are `processes.py`'s, bounded by `flow.py`'s credit.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import math
import shutil
import signal
import time
from pathlib import Path
from typing import Any

from core import cgroups, metrics, mounts
from core.errors import FailedPrecondition, InvalidArgument, TandemError, Unavailable
from core.files import atomic_write_json, private_dir
from core.proc import wait_exit
from core.settings import VmBackendSettings
from sandbox import netns, podfiles
from sandbox.backend import (
    Backend,
    BackendFeatures,
    ByteChannel,
    ContainerUsage,
    ExecResult,
    ExitListener,
    ExitStatus,
    ImageRootfs,
    PodContainers,
    Process,
)
from sandbox.model import ContainerRecord, ContainerState, SandboxRecord
from sandbox.oci import rootfs
from sandbox.oci.layer_usage import LayerUsage
from sandbox.oci.model import Resources, Spec
from sandbox.oci.platform import ContainerPlatform, HostInfo
from vm_backend import resize, resources, sessions
from vm_backend.accel import choose_accel
from vm_backend.channel import AgentClient
from vm_backend.events import PodEvents
from vm_backend.guest_image import GuestAssets, current_assets
from vm_backend.guest_spec import check_vm_container, guest_host_info, guest_platform, host_sources, to_guest
from vm_backend.jail import Jail, JailIds
from vm_backend.network import attach_tap, detach_tap
from vm_backend.pod import PodVm
from vm_backend.pool import WarmPool
from vm_backend.qemu import VMM_DIR, QemuVm, TapNic, VmSpec, qmp
from vm_backend.rundir import make_run_dir, remove_run_dir
from vm_backend.setup import setup_pod
from vm_backend.share import Attached, PodShare, ShareMount, rootfs_path
from vm_backend.stats import STATS_WAIT, pod_usage
from vm_backend.virtiofs import Virtiofsd
from vm_backend.warm import WarmVmMaker

log = logging.getLogger("tandem.vm")

SHARE_TAG = "tandem"
TAP = "tap0"
STOP_GRACE_AFTER_KILL = 10.0
SHUTDOWN_WAIT = 5.0
AGENT_CONNECT_TIMEOUT = 60.0
REATTACH_TIMEOUT = 10.0  # for a call that needs the agent: how long it waits for a connection being made
FIRST_CONTAINER_GRACE = 10.0  # seconds after a VM pod is up in which no refill boots unless its container started
VM_DIED = "VMDied"  # the reason of a container whose pod's QEMU died under it


# ---- the backend ---------------------------------------------------------------------------


class VmBackend(Backend[VmBackendSettings]):
    name = "vm"
    usage_wait = STATS_WAIT
    # recursive read-only: made on the host's side of the share (`share.py`); user namespaces: not in VM pods
    # (README, What a VM pod cannot do)
    features = BackendFeatures(recursive_read_only_mounts=True, user_namespaces=False)

    def __init__(self, settings: VmBackendSettings, assets: GuestAssets) -> None:
        self.settings = settings.vm
        self.state_dir = settings.state_dir
        self.assets = assets
        self.root = private_dir(settings.run_dir)
        self.layers = private_dir(settings.state_dir / "vm" / "layers")
        self.empty_dev = private_dir(self.root / "empty-dev")  # a privileged guest container's "host" devices: none
        self.jail_ids = JailIds(self.root / "jail-ids", settings.vm.jail_uid_first, settings.vm.jail_uid_count)
        self.sizing = resources.VmSizing.of(settings.vm)
        self.log_size_max = settings.log_size_max
        self._accel: str | None = None
        self._pods: dict[str, PodVm] = {}
        self._exit_listener: ExitListener | None = None
        self.layer_usage = LayerUsage()
        self.warm = WarmVmMaker(
            self.settings,
            self.root,
            assets,
            self.jail_ids,
            self.sizing,
            self._accel_choice,
            self._exited,
            self.log_size_max,
        )
        self.pool: WarmPool[PodVm] = WarmPool(settings.vm.warm_pool, self.warm, self.root / "pool")
        self._warm_owned: dict[str, str] = {}  # after a restart: warm VM id -> the pod whose record names it

    @classmethod
    def create(cls, settings: VmBackendSettings) -> VmBackend:
        """The backend, if this host can run it: QEMU, virtiofsd and built guest assets must exist."""
        missing = [str(p) for p in (settings.vm.qemu, settings.vm.virtiofsd) if not Path(p).exists()]
        assets = current_assets(settings.state_dir)
        if assets is None:
            missing.append(f"guest assets in {settings.state_dir / 'vm' / 'assets'} (run `tandem assets`)")
        if missing:
            raise Unavailable(f"vm backend needs {', '.join(missing)}")
        assert assets is not None
        return cls(settings, assets)

    async def watch_exits(self, listener: ExitListener) -> None:
        """Exits come as the agents' ProcessExited events, and as the end of a pod's QEMU."""
        self._exit_listener = listener

    async def close(self) -> None:
        await self.layer_usage.close()
        for pod in self._pods.values():
            pod.unwatch()
        await self.pool.close()

    async def recovered(self) -> None:
        """Every pod is resumed: the warm pool settles what the last daemon left, then fills."""
        await self.pool.start(self._warm_owned)

    def status_info(self) -> dict[str, Any]:
        return {"warmPool": self.pool.describe()}

    def _exited(self, ident: str, status: ExitStatus | None = None) -> None:
        """A container's exit (with its status, from an agent event) or the pod's VM's end (its pod's ID)."""
        if self._exit_listener is not None:
            self._exit_listener(ident, status)

    # ---- handles ---------------------------------------------------------------------------

    def _run_dir(self, sandbox: SandboxRecord) -> Path:
        """Where its record says (a warm VM's keeps its own), else where a cold start makes it."""
        recorded = sandbox.backend_state.get("run_dir")
        return Path(recorded) if recorded else self.root / sandbox.id[:16]

    def _spec(self, sandbox: SandboxRecord) -> VmSpec:
        state = sandbox.backend_state
        jail = None
        if state.get("jail_uid"):
            cgroup_dirs = tuple(cgroups.directories(state["cgroup"]))
            jail = Jail(int(state["jail_uid"]), int(state["jail_gid"]), cgroup_dirs)
        return VmSpec(
            name=state.get("vm_name") or sandbox.id[:12],
            run_dir=self._run_dir(sandbox),
            kernel=Path(state.get("kernel") or self.assets.kernel),
            initramfs=Path(state.get("initramfs") or self.assets.initramfs),
            userland=Path(state.get("userland") or self.assets.userland),
            userland_bytes=int(state.get("userland_bytes") or self.assets.userland_bytes),
            accel=state.get("accel", "tcg"),
            tcg_cache_mib=int(state.get("tcg_cache_mib", resources.UNRECORDED_TCG_CACHE_MIB)),
            vcpus=int(state.get("vcpus", 1)),
            memory_mib=int(state.get("memory_mib", 256)),
            share_tag=SHARE_TAG,
            tap=TapNic(state["tap"], state["mac"]) if state.get("tap") else None,
            netns=Path(sandbox.netns_path) if sandbox.netns_path else None,
            qemu=str(self.settings.qemu),
            jail=jail,
        )

    def _virtiofsd(self, run_dir: Path, memory_mib: int = 0) -> Virtiofsd:
        return Virtiofsd.of_vm(run_dir, str(self.settings.virtiofsd), memory_mib)

    def _vm(self, sandbox: SandboxRecord) -> QemuVm:
        spec = self._spec(sandbox)
        return QemuVm(spec, self._virtiofsd(spec.run_dir, spec.memory_mib))

    def _new_pod(self, sandbox: SandboxRecord) -> PodVm:
        run_dir = self._run_dir(sandbox)
        events = PodEvents(sandbox.id, self._exited, self.log_size_max)
        pod = PodVm(run_dir, self._vm(sandbox), events, lambda: self._exited(sandbox.id))
        self._pods[sandbox.id] = pod
        return pod

    def _pod(self, sandbox: SandboxRecord) -> PodVm:
        """The pod's handle (one that `resume_sandbox` did not make knows no containers: its pod never ran
        under this daemon, and is only stopped or removed)."""
        pod = self._pods.get(sandbox.id)
        if pod is None:
            pod = self._new_pod(sandbox)
            pod.watch()
        return pod

    async def _connected(self, sandbox: SandboxRecord, timeout: float = REATTACH_TIMEOUT) -> PodVm:
        """The pod's handle with a live agent connection, waiting up to `timeout` for one being made."""
        pod = self._pod(sandbox)
        await pod.connect(timeout)
        return pod

    async def _accel_choice(self) -> str:
        if self._accel is None:
            choice = await choose_accel(self.settings.accel, self.state_dir, self.assets, self.settings.qemu)
            self._accel = choice.accel
        return self._accel

    # ---- pods ------------------------------------------------------------------------------

    async def create_network_namespace(self, sandbox: SandboxRecord, path: Path) -> None:
        """A warm VM's, made the pod's, when the pool has one of the pod's size (`warm.py`); else a new one.
        From here until the pod's first container started (or `FIRST_CONTAINER_GRACE` after the pod is up, or
        its removal) the pool boots nothing: the pod's start comes first."""
        self.pool.starting(sandbox.id)
        if self.pool.ready:
            pod = await self.warm.claim(self.pool, sandbox, path)
            if pod is not None:
                self._pods[sandbox.id] = pod
                return
        await netns.create_at(path)

    async def start_sandbox(self, sandbox: SandboxRecord) -> None:
        if not sandbox.netns_path:
            raise FailedPrecondition("a VM pod needs its own network namespace")
        podfiles.hostname(sandbox.config)  # refuse a bad hostname before booting anything
        try:
            if sandbox.backend_state.get("warm"):
                began = time.monotonic()
                await self.warm.start(self.pool, sandbox, self._pod(sandbox))
                metrics.timing(metrics.Timing.VM_SETUP_POD, time.monotonic() - began)
                log.info("pod %s: warm VM ready in %.2fs", sandbox.id[:12], time.monotonic() - began)
            else:
                await self._boot(sandbox)
        except BaseException:
            self.pool.started(sandbox.id)
            raise
        # the pod's start goes on until its first container started (kubelet creates it next), or for a while
        asyncio.get_running_loop().call_later(FIRST_CONTAINER_GRACE, self.pool.started, sandbox.id)

    async def _boot(self, sandbox: SandboxRecord) -> None:
        """A cold start: a VM booted for this pod."""
        config = sandbox.config
        netns = Path(sandbox.netns_path)
        settings = self.settings
        vcpus, memory, size = self.sizing.boot_size(config)
        cgroup = resources.vm_cgroup(config.linux.cgroup_parent, sandbox.id)  # refuses a systemd slice
        run_dir = private_dir(self._run_dir(sandbox))
        await asyncio.to_thread(mounts.make_private, self.root)  # the run dirs' tmpfs mounts stay in this namespace
        await asyncio.to_thread(make_run_dir, run_dir, run_dir / VMM_DIR)
        await PodShare(run_dir).create()
        accel = await self._accel_choice()
        cache = settings.tcg_cache_mib
        sandbox.backend_state.update(
            run_dir=str(run_dir),
            accel=accel,
            tcg_cache_mib=cache,
            vcpus=vcpus,
            memory_mib=memory,
            size_mib=size,
            **self.assets.boot_state(),
        )
        began = time.monotonic()
        if settings.jail:
            uid = self.jail_ids.allocate(sandbox.id)
            limits = resources.vm_limits(vcpus, size, resources.vmm_overhead_mib(accel, cache))
            await asyncio.to_thread(resources.create_cgroup, cgroup, limits)
            sandbox.backend_state.update(jail_uid=uid, jail_gid=uid, cgroup=cgroup)
        guest = await attach_tap(netns, tap=TAP)
        (nic,) = guest.interfaces[:1]
        sandbox.backend_state.update(tap=guest.tap_name, mac=nic.mac)
        pod = self._new_pod(sandbox)
        await pod.vm.start(boot_timeout=self.settings.boot_timeout_seconds)
        pod.watch()
        booted = time.monotonic()
        sandbox.backend_state["qemu_pid"] = pod.vm.pid()
        await pod.connect(AGENT_CONNECT_TIMEOUT)
        connected = time.monotonic()
        await pod.client_or_fail().setup_pod(setup_pod(sandbox, guest, SHARE_TAG))
        if memory > size:  # the headroom goes into the balloon until a resize lets it go
            await qmp(pod.vm.spec.qmp_socket, "balloon", value=size * resize.MIB)
        ready = time.monotonic()
        metrics.timing(metrics.Timing.VM_BOOT, booted - began)
        metrics.timing(metrics.Timing.VM_AGENT_READY, connected - booted)
        metrics.timing(metrics.Timing.VM_SETUP_POD, ready - connected)
        log.info(
            "pod %s: VM ready in %.2fs (boot %.2fs, agent start %.2fs, pod setup %.2fs)",
            sandbox.id[:12], ready - began, booted - began, connected - booted, ready - connected,
        )  # fmt: skip

    async def stop_sandbox(self, sandbox: SandboxRecord) -> None:
        # The run dir and tap have fixed names, so a pod whose start a crash cut short (its backend_state
        # never persisted) is stopped all the same.
        if not self._run_dir(sandbox).is_dir():
            return
        pod = self._pod(sandbox)
        async with pod.lock:
            pod.unwatch()  # its containers were stopped: the VM's end is no news
            qemu = pod.vm.identity()
            if qemu is not None and pod.client is not None:
                with contextlib.suppress(TandemError, TimeoutError):
                    await asyncio.wait_for(pod.client.shutdown(), SHUTDOWN_WAIT)
                    await wait_exit(qemu, SHUTDOWN_WAIT)
            await pod.close()
            await pod.vm.kill()  # also stops virtiofsd and removes the sockets
            # a virtiofsd started for a boot that never reached QEMU has no QEMU to outlive it
            await self._virtiofsd(self._run_dir(sandbox)).stop()
            # and what no pidfile names: a jailer cut short, a QEMU whose daemon died before writing its pidfile
            if (cgroup := self._cgroup(sandbox)) is not None:
                await resources.kill_cgroup(cgroup)
        if sandbox.netns_path:
            await detach_tap(Path(sandbox.netns_path), sandbox.backend_state.get("tap", TAP))

    async def remove_sandbox(self, sandbox: SandboxRecord) -> None:
        """QEMU and virtiofsd first (the guest can no longer act), then the share namespace (every mount in it
        goes with it), the containers' host-side roots and layers, and the run dir: a share the guest tampered
        with goes all the same, since nothing of it is looked at."""
        await self.stop_sandbox(sandbox)
        run_dir = self._run_dir(sandbox)
        if run_dir.is_dir():
            await asyncio.to_thread(PodShare(run_dir).unpin)
            containers = run_dir / "c"
            for name in sorted(p.name for p in containers.iterdir()) if containers.is_dir() else []:
                await rootfs.unmount(containers / name / "rootfs")
                self.layer_usage.forget(self._upper(name))
                await asyncio.to_thread(shutil.rmtree, self.layers / name, True)
            await asyncio.to_thread(remove_run_dir, run_dir)
        if self._cgroup(sandbox) is not None:
            await asyncio.to_thread(resources.remove_cgroup, sandbox.config.linux.cgroup_parent, sandbox.id)
        self.jail_ids.release(sandbox.id)
        self.pool.started(sandbox.id)  # a start that failed before the VM was asked for
        if warm := sandbox.backend_state.get("warm"):
            self.pool.forget(str(warm))  # a start cut short after the claim left the pool's record
        self._pods.pop(sandbox.id, None)

    @staticmethod
    def _cgroup(sandbox: SandboxRecord) -> str | None:
        """The VM's cgroup, from the pod's config: found even when a crash kept its start from being recorded."""
        try:
            return resources.vm_cgroup(sandbox.config.linux.cgroup_parent, sandbox.id)
        except InvalidArgument:
            return None  # a systemd slice: refused at start, so no cgroup was ever made

    async def sandbox_alive(self, sandbox: SandboxRecord) -> bool:
        """QEMU's process identity (its pid and start time, from the run dir): never a word with the agent."""
        return bool(sandbox.backend_state.get("run_dir")) and self._pod(sandbox).vm.alive()

    async def resume_sandbox(self, sandbox: SandboxRecord, containers: list[ContainerRecord]) -> None:
        """The pod's containers from its records, then a reconnection in the background: the agent replays
        what the last daemon did not acknowledge, and only what the host knows of is taken."""
        if warm := sandbox.backend_state.get("warm"):
            self._warm_owned[str(warm)] = sandbox.id
        pod = self._pod(sandbox)
        for container in containers:
            since = container.started_at or container.created_at
            pod.events.add_container(container.id, container.log_path, since, create_log=False)
        pod.reconnect(sandbox.id)

    def sandbox_info(self, sandbox: SandboxRecord) -> dict[str, Any]:
        pod = self._pods.get(sandbox.id)
        if pod is None:
            return {}
        info = pod.events.info()
        if pod.client is not None:
            info.update(agentConnected=pod.client.connected, eventIntakePeakBytes=pod.client.intake.peak_bytes)
        return info

    # ---- containers ------------------------------------------------------------------------

    def host_info(self, sandbox: SandboxRecord) -> HostInfo:
        return guest_host_info(podfiles.hostname(sandbox.config), self.empty_dev)

    async def prepare_container(
        self, sandbox: SandboxRecord, container: ContainerRecord, image: ImageRootfs
    ) -> ContainerPlatform:
        check_vm_container(container.config)
        pod = await self._connected(sandbox)
        directory = private_dir(pod.container_dir(container.id))
        layer = self.layers / container.id
        host_root = directory / "rootfs"
        await rootfs.mount_rootfs(image.layers, layer / "upper", layer / "work", host_root)
        return guest_platform(
            container.config, sandbox.config, container_id=container.id, host_rootfs=host_root, empty_dev=self.empty_dev
        )

    async def create_container(
        self, sandbox: SandboxRecord, container: ContainerRecord, spec: Spec, stop_signal: int
    ) -> None:
        config = container.config
        pod = await self._connected(sandbox)
        directory = pod.container_dir(container.id)
        pod.events.add_container(container.id, container.log_path, container.created_at, create_log=True)
        share_mounts = [
            ShareMount(source, mount.readonly, mount.recursive_read_only)
            for mount, source in zip(config.mounts, host_sources(spec, config), strict=True)
        ]
        attached = await PodShare(self._run_dir(sandbox)).attach(container.id, directory / "rootfs", share_mounts)
        container.backend_state["share_mounts"] = [a.to_list() for a in attached]
        guest_rootfs = rootfs_path(container.id)
        guest = to_guest(spec, config, container.id)
        atomic_write_json(directory / "process.json", guest["process"], durable=False)
        await pod.client_or_fail().create_container(
            container.id,
            guest,
            guest_rootfs,
            terminal=config.tty,
            stdin=config.stdin,
            stdin_once=config.stdin_once,
        )
        container.backend_state["stop_signal"] = stop_signal

    async def _release_container(self, sandbox: SandboxRecord, container: ContainerRecord) -> None:
        """Detach what CreateContainer attached to the share (by the mount IDs it recorded), then the host side."""
        run_dir = self._run_dir(sandbox)
        recorded = [Attached.from_list(value) for value in container.backend_state.get("share_mounts", [])]
        try:
            await PodShare(run_dir).detach(container.id, [a for a in recorded if a is not None])
        except TandemError as e:
            if self._pod(sandbox).vm.alive():
                raise
            # the guest can no longer act, and the share namespace takes every mount in it when the pod goes:
            # whatever the guest did to the share must not keep its pod from being removed
            log.warning("container %s: share not cleaned (%s); its mounts go with the pod", container.id[:12], e)
        await rootfs.unmount(run_dir / "c" / container.id / "rootfs")
        await asyncio.to_thread(shutil.rmtree, run_dir / "c" / container.id, True)
        self.layer_usage.forget(self._upper(container.id))
        await asyncio.to_thread(shutil.rmtree, self.layers / container.id, True)

    async def start_container(self, sandbox: SandboxRecord, container: ContainerRecord) -> None:
        pod = await self._connected(sandbox)
        pod.events.starting(container.id)
        try:
            await pod.client_or_fail().start_container(container.id)
        finally:
            self.pool.started(sandbox.id)  # its first container is up: a refill may boot now

    async def _wait_exit(self, pod: PodVm, container_id: str, timeout: float) -> bool:
        """Whether the container's exit was heard within `timeout` (or its VM is gone)."""
        if not pod.vm.alive():
            return pod.events.exit_of(container_id) is not None
        return await pod.events.wait_exit(container_id, timeout)

    async def stop_container(self, sandbox: SandboxRecord, container: ContainerRecord, timeout: int) -> None:
        pod = self._pod(sandbox)
        if pod.events.exit_of(container.id) is not None or not pod.vm.alive():
            return
        client = (await self._connected(sandbox)).client_or_fail()
        try:
            if timeout > 0 and container.state == ContainerState.RUNNING:
                await client.signal(container.id, container.backend_state.get("stop_signal", signal.SIGTERM))
                if await self._wait_exit(pod, container.id, timeout):
                    return
            await client.signal(container.id, signal.SIGKILL, all_processes=True)
        except TandemError as e:
            if container.state != ContainerState.RUNNING:
                return  # created, never started: removal takes care of it
            log.info("signalling %s: %s", container.id[:12], e)
        if container.state != ContainerState.RUNNING:
            return
        if not await self._wait_exit(pod, container.id, STOP_GRACE_AFTER_KILL):
            raise FailedPrecondition(f"container {container.id} did not die after SIGKILL")

    async def remove_container(self, sandbox: SandboxRecord, container: ContainerRecord) -> None:
        pod = self._pod(sandbox)
        if pod.vm.alive():
            try:
                await (await self._connected(sandbox)).client_or_fail().remove_container(container.id)
            except Unavailable as e:
                log.warning("agent did not remove %s: %s", container.id[:12], e)
        pod.events.forget_container(container.id)
        await self._release_container(sandbox, container)

    async def container_exit(self, sandbox: SandboxRecord, container: ContainerRecord) -> ExitStatus | None:
        """The exit the agent reported; else None while the VM runs (QEMU's identity: no agent round trip),
        and VMDied once it is gone."""
        pod = self._pod(sandbox)
        exited = pod.events.exit_of(container.id)
        if exited is not None or await self.sandbox_alive(sandbox):
            return exited
        vm = pod.vm.spec
        message = f"the pod's VM tandem-{vm.name} (QEMU, run dir {vm.run_dir}) is gone"
        return ExitStatus(255, time.time_ns(), reason=VM_DIED, message=message)

    def _process(self, sandbox: SandboxRecord, container: ContainerRecord) -> dict[str, Any]:
        try:
            return json.loads((self._run_dir(sandbox) / "c" / container.id / "process.json").read_text())
        except (OSError, ValueError) as e:
            raise FailedPrecondition(f"container {container.id} has no process spec: {e}") from None

    async def exec_sync(
        self, sandbox: SandboxRecord, container: ContainerRecord, cmd: list[str], timeout: int
    ) -> ExecResult:
        process = self._process(sandbox, container)
        process.update(args=cmd, terminal=False)
        pod = await self._connected(sandbox)
        result = await pod.client_or_fail().exec_sync(container.id, process, float(timeout) if timeout > 0 else 0.0)
        return ExecResult(result.exit_code, result.stdout, result.stderr)

    async def update_resources(self, sandbox: SandboxRecord, container: ContainerRecord, resources: Resources) -> None:
        """The container's limits change in the guest; a memory limit the VM is too small for grows it first."""
        pod = await self._connected(sandbox)
        limit = resources.get("memory", {}).get("limit", 0)
        wanted = resize.target_for(self.settings.default_memory_mib, limit)
        async with pod.lock:
            if wanted > int(sandbox.backend_state.get("size_mib", sandbox.backend_state["memory_mib"])):
                await resize.resize_memory(sandbox.backend_state, pod.vm.spec.qmp_socket, wanted)
        await pod.client_or_fail().update_resources(container.id, resources)

    async def update_sandbox_resources(self, sandbox: SandboxRecord, resources: Resources) -> None:
        """The VM grows or shrinks to its default size plus the pod's memory limit; its vCPUs cannot change."""
        pod = await self._connected(sandbox)
        state = sandbox.backend_state
        cpu = resources.get("cpu", {})
        if cpu.get("quota", 0) > 0 and cpu.get("period", 0) > 0:
            wanted_vcpus = self.settings.default_vcpus + math.ceil(cpu["quota"] / cpu["period"])
            if wanted_vcpus > int(state.get("vcpus", 1)):
                raise FailedPrecondition(
                    f"the pod's CPU limit needs {wanted_vcpus} vCPUs, but its VM booted with {state.get('vcpus', 1)} "
                    "and cannot add any: QEMU's microvm machine has no CPU hotplug. Recreate the pod with the new limit"
                )
        wanted = resize.target_for(self.settings.default_memory_mib, resources.get("memory", {}).get("limit", 0))
        async with pod.lock:
            await resize.resize_memory(state, pod.vm.spec.qmp_socket, wanted)

    def _upper(self, container_id: str) -> Path:
        return self.layers / container_id / "upper"

    def _client(self, sandbox: SandboxRecord) -> AgentClient | None:
        """The pod's agent connection if there is one now (stats do not wait for one to be made)."""
        handle = self._pods.get(sandbox.id)
        return None if handle is None else handle.client

    async def usage(self, pods: list[PodContainers]) -> dict[str, ContainerUsage]:
        """One GetPodStats round trip per pod, all at once, each within a short deadline (`stats.py`); the
        writable layers (on the host) as last measured. A pod whose agent is not connected now, or does
        not answer in time, is left out: a stats call never waits long on a silent guest."""
        answers = await asyncio.gather(*(pod_usage(self._client(pod.sandbox), pod) for pod in pods))
        found = {cid: usage for answer in answers for cid, usage in answer.items()}
        layers = await self.layer_usage.figures([self._upper(cid) for cid in found])
        for cid, usage in found.items():
            layer = layers.get(self._upper(cid))
            if layer is not None:
                found[cid] = dataclasses.replace(
                    usage,
                    writable_layer_bytes=layer.used_bytes,
                    writable_layer_inodes=layer.inodes,
                    writable_layer_mountpoint=str(self.layers),
                    writable_layer_timestamp=layer.measured_at,
                )
        return found

    async def reopen_log(self, sandbox: SandboxRecord, container: ContainerRecord) -> None:
        self._pod(sandbox).events.reopen_log(container.id)

    # ---- streaming -------------------------------------------------------------------------

    async def exec(
        self,
        sandbox: SandboxRecord,
        container: ContainerRecord,
        cmd: list[str],
        *,
        tty: bool,
        stdin: bool,
        terminal_size: tuple[int, int] | None = None,
    ) -> Process:
        process_spec = self._process(sandbox, container)
        process_spec.update(args=cmd, terminal=tty)
        pod = await self._connected(sandbox)
        return await sessions.start_exec(pod, container.id, process_spec, tty=tty, stdin=stdin, size=terminal_size)

    async def attach(self, sandbox: SandboxRecord, container: ContainerRecord, *, tty: bool, stdin: bool) -> Process:
        return sessions.attach(await self._connected(sandbox), container, stdin=stdin)

    async def port_forward(self, sandbox: SandboxRecord, port: int) -> ByteChannel:
        return await sessions.open_port(await self._connected(sandbox), port)
