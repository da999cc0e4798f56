"""The untrusted backend: each pod is its own QEMU micro-VM, its containers run inside by the guest agent.

What lives on the host, per pod (runtime dirs vanish on reboot, as the VMs do):
    <runtime_dir>/vm/<pod id[:16]>/                 the VM's run dir: virtiofsd's socket, pidfiles, logs
    <runtime_dir>/vm/<pod id[:16]>/vmm/             QEMU's sockets and console log, owned by the VM's jail uid
    <runtime_dir>/vm/<pod id[:16]>/share/           the virtio-fs share: each container's rootfs bound in as <id>/rootfs
    <runtime_dir>/vm/<pod id[:16]>/c/<id>/          a container's overlay mount point (rootfs/), its log path,
                                                    its process spec and its exit file (written from ProcessExited)
    <state_dir>/vm/layers/<id>/                     a container's writable layer (upper, work)
    <runtime_dir>/vm/jail-ids/<uid> -> <pod id>     the jail uid (= gid) the pod's QEMU runs as
    <cgroup root>/<hierarchy>/<pod cgroup>/<pod id>   the VM's cgroup: QEMU and virtiofsd, with their limits

The daemon keeps one `PodVm` handle per pod (`pod.py`: QemuVm + AgentClient + the
watch on QEMU's end); after a restart it is rebuilt lazily from `sandbox.backend_state`,
and the agent's Hello replays every unacked event: output lands in the logs, exits in
the exit files (`events.py`). The guest's specs come from the shared OCI layer, moved
into the guest's paths (`guest_spec.py`); exec, attach and port-forward sessions are
`processes.py`'s.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import shutil
import signal
import time
from pathlib import Path
from typing import Any

from core import cgroups, mounts, proc
from core.errors import FailedPrecondition, InvalidArgument, TandemError, Unavailable
from core.files import atomic_write_json, private_dir
from core.proc import wait_exit
from core.settings import VmBackendSettings
from protos import agent_pb2
from protos import cri_pb2 as pb
from sandbox import podfiles
from sandbox.backend import (
    Backend,
    ByteChannel,
    ContainerUsage,
    ExecResult,
    ExitListener,
    ExitStatus,
    ImageRootfs,
    Process,
)
from sandbox.model import ContainerRecord, ContainerState, SandboxRecord
from sandbox.oci import rootfs
from sandbox.oci.model import Resources, Spec
from sandbox.oci.platform import ContainerPlatform, HostInfo
from vm_backend import resources
from vm_backend.accel import choose_accel
from vm_backend.events import PodEvents
from vm_backend.guest_image import GuestAssets, current_assets
from vm_backend.guest_spec import (
    check_vm_container,
    guest_host_info,
    guest_platform,
    host_sources,
    shared_mount,
    to_guest,
)
from vm_backend.jail import Jail, JailIds
from vm_backend.network import attach_tap, detach_tap
from vm_backend.pod import PodVm
from vm_backend.processes import VmAttach, VmExec, VmPort
from vm_backend.qemu import QemuVm, TapNic, VmSpec
from vm_backend.virtiofs import Virtiofsd

log = logging.getLogger("tandem.vm")

SHARE_TAG = "tandem"
TAP = "tap0"
STOP_GRACE_AFTER_KILL = 10.0
SHUTDOWN_WAIT = 5.0
AGENT_CONNECT_TIMEOUT = 60.0
REATTACH_TIMEOUT = 10.0
RETRY_CONNECT = 30.0
_POLL = 0.05
VM_DIED = "VMDied"  # the reason of a container whose pod's QEMU died under it


# ---- the backend ---------------------------------------------------------------------------


class VmBackend(Backend[VmBackendSettings]):
    name = "vm"

    def __init__(self, settings: VmBackendSettings, assets: GuestAssets) -> None:
        self.settings = settings.vm
        self.state_dir = settings.state_dir
        self.assets = assets
        self.root = private_dir(settings.run_dir)
        self.layers = private_dir(settings.state_dir / "vm" / "layers")
        self.empty_dev = private_dir(self.root / "empty-dev")  # a privileged guest container's "host" devices: none
        self.jail_ids = JailIds(self.root / "jail-ids", settings.vm.jail_uid_first, settings.vm.jail_uid_count)
        self.max_vcpus = settings.vm.max_vcpus or resources.default_max_vcpus()
        self.max_memory_mib = settings.vm.max_memory_mib or resources.default_max_memory_mib()
        self._accel: str | None = None
        self._pods: dict[str, PodVm] = {}
        self._exit_listener: ExitListener | None = None

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
        for pod in self._pods.values():
            pod.unwatch()

    def _exited(self, container_id: str) -> None:
        if self._exit_listener is not None:
            self._exit_listener(container_id)

    # ---- handles ---------------------------------------------------------------------------

    def _run_dir(self, sandbox: SandboxRecord) -> Path:
        return self.root / sandbox.id[:16]

    def _spec(self, sandbox: SandboxRecord) -> VmSpec:
        state = sandbox.backend_state
        jail = None
        if state.get("jail_uid"):
            cgroup_dirs = tuple(cgroups.directories(state["cgroup"]))
            jail = Jail(int(state["jail_uid"]), int(state["jail_gid"]), cgroup_dirs)
        return VmSpec(
            name=sandbox.id[:12],
            run_dir=self._run_dir(sandbox),
            kernel=Path(state.get("kernel") or self.assets.kernel),
            initramfs=Path(state.get("initramfs") or self.assets.initramfs),
            userland=Path(state.get("userland") or self.assets.userland),
            userland_bytes=int(state.get("userland_bytes") or self.assets.userland_bytes),
            accel=state.get("accel", "tcg"),
            vcpus=int(state.get("vcpus", 1)),
            memory_mib=int(state.get("memory_mib", 256)),
            share_tag=SHARE_TAG,
            tap=TapNic(state["tap"], state["mac"]) if state.get("tap") else None,
            netns=Path(sandbox.netns_path) if sandbox.netns_path else None,
            qemu=str(self.settings.qemu),
            jail=jail,
        )

    def _vm(self, sandbox: SandboxRecord) -> QemuVm:
        run_dir = self._run_dir(sandbox)
        return QemuVm(self._spec(sandbox), Virtiofsd(run_dir, binary=str(self.settings.virtiofsd)))

    def _new_pod(self, sandbox: SandboxRecord) -> PodVm:
        run_dir = self._run_dir(sandbox)
        pod = self._pods[sandbox.id] = PodVm(run_dir, self._vm(sandbox), PodEvents(run_dir, self._exited))
        return pod

    def _pod(self, sandbox: SandboxRecord) -> PodVm:
        """The pod's handle; made again after a restart, watching the VM if it survived."""
        pod = self._pods.get(sandbox.id)
        if pod is None:
            pod = self._new_pod(sandbox)
            pod.watch()
        return pod

    async def _connected(self, sandbox: SandboxRecord, timeout: float = REATTACH_TIMEOUT) -> PodVm:
        """The pod's handle with a live agent connection (re-made after a daemon restart)."""
        pod = self._pod(sandbox)
        async with pod.lock:
            if pod.client is None:
                if not pod.vm.alive():
                    raise FailedPrecondition(f"the VM of pod {sandbox.id} is not running")
                await pod.connect(timeout)
        return pod

    async def _accel_choice(self) -> str:
        if self._accel is None:
            choice = await choose_accel(self.settings.accel, self.state_dir, self.assets, self.settings.qemu)
            self._accel = choice.accel
        return self._accel

    # ---- pods ------------------------------------------------------------------------------

    async def start_sandbox(self, sandbox: SandboxRecord) -> None:
        if not sandbox.netns_path:
            raise FailedPrecondition("a VM pod needs its own network namespace")
        config = sandbox.config
        podfiles.hostname(config)  # refuse a bad hostname before booting anything
        netns = Path(sandbox.netns_path)
        settings = self.settings
        vcpus, memory = resources.vm_size(
            config, settings.default_vcpus, settings.default_memory_mib, self.max_vcpus, self.max_memory_mib
        )
        cgroup = resources.vm_cgroup(config.linux.cgroup_parent, sandbox.id)  # refuses a systemd slice
        run_dir = private_dir(self._run_dir(sandbox))
        accel = await self._accel_choice()
        sandbox.backend_state.update(
            run_dir=str(run_dir),
            accel=accel,
            vcpus=vcpus,
            memory_mib=memory,
            kernel=str(self.assets.kernel),
            initramfs=str(self.assets.initramfs),
            userland=str(self.assets.userland),
            userland_bytes=self.assets.userland_bytes,
        )
        began = time.monotonic()
        if settings.jail:
            uid = self.jail_ids.allocate(sandbox.id)
            limits = resources.vm_limits(vcpus, memory, accel, self.assets.userland_bytes)
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
        await self._connected(sandbox, AGENT_CONNECT_TIMEOUT)
        connected = time.monotonic()
        hostname = podfiles.hostname(config)
        setup = agent_pb2.SetupPod(
            hostname=hostname,
            resolv_conf=podfiles.resolv_conf(config.dns_config),
            hosts=podfiles.hosts(hostname, sandbox.ips),
            interfaces=[
                agent_pb2.Interface(name=i.name, mac=i.mac, addresses=i.addresses, mtu=i.mtu) for i in guest.interfaces
            ],
            routes=[
                agent_pb2.Route(destination=r.destination, gateway=r.gateway, device=r.device) for r in guest.routes
            ],
            sysctls=dict(config.linux.sysctls),
            host_time_unix_ns=time.time_ns(),
            shared_dir_tag=SHARE_TAG,
        )
        await pod.client_or_fail().setup_pod(setup)
        ready = time.monotonic()
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
            await Virtiofsd(self._run_dir(sandbox), binary=str(self.settings.virtiofsd)).stop()
            # and what no pidfile names: a jailer cut short, a QEMU whose daemon died before writing its pidfile
            if (cgroup := self._cgroup(sandbox)) is not None:
                await resources.kill_cgroup(cgroup)
        if sandbox.netns_path:
            await detach_tap(Path(sandbox.netns_path), sandbox.backend_state.get("tap", TAP))

    async def remove_sandbox(self, sandbox: SandboxRecord) -> None:
        await self.stop_sandbox(sandbox)
        run_dir = self._run_dir(sandbox)
        vfs = Virtiofsd(run_dir, binary=str(self.settings.virtiofsd))
        if (run_dir / "c").is_dir():
            for directory in (run_dir / "c").iterdir():
                await self._release_container_mounts(vfs, run_dir, directory.name)
                await asyncio.to_thread(shutil.rmtree, self.layers / directory.name, True)
        if vfs.share.exists():
            await vfs.remove_share()
        await asyncio.to_thread(shutil.rmtree, run_dir, True)
        if self._cgroup(sandbox) is not None:
            await asyncio.to_thread(resources.remove_cgroup, sandbox.config.linux.cgroup_parent, sandbox.id)
        self.jail_ids.release(sandbox.id)
        self._pods.pop(sandbox.id, None)

    @staticmethod
    def _cgroup(sandbox: SandboxRecord) -> str | None:
        """The VM's cgroup, from the pod's config: found even when a crash kept its start from being recorded."""
        try:
            return resources.vm_cgroup(sandbox.config.linux.cgroup_parent, sandbox.id)
        except InvalidArgument:
            return None  # a systemd slice: refused at start, so no cgroup was ever made

    async def sandbox_alive(self, sandbox: SandboxRecord) -> bool:
        if not sandbox.backend_state.get("run_dir"):
            return False
        pod = self._pod(sandbox)
        if not pod.vm.alive():
            return False
        # After a daemon restart: reconnect, so that the agent replays its events. Status calls come often:
        # an agent that does not answer is retried only every RETRY_CONNECT seconds from here.
        if pod.client is None and time.monotonic() - pod.connect_failed_at > RETRY_CONNECT:
            try:
                await self._connected(sandbox)
            except TandemError as e:
                pod.connect_failed_at = time.monotonic()
                log.warning("cannot reach the agent of pod %s: %s", sandbox.id[:12], e)
        return True

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
        vfs = pod.vm.virtiofsd
        assert vfs is not None
        directory = pod.container_dir(container.id)
        (directory / "log_path").write_text(container.log_path)
        if container.log_path:
            pod.events.open_log(container.id, Path(container.log_path))
        guest_rootfs = await vfs.bind_rootfs(container.id, directory / "rootfs")
        await self._share_mounts(vfs, container.id, config, host_sources(spec, config))
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

    async def _share_mounts(
        self, vfs: Virtiofsd, container_id: str, config: pb.ContainerConfig, sources: list[str]
    ) -> None:
        """Bind the host path of each CRI mount into the share, where the guest finds it (`shared_mount`)."""
        for i, (mount, source) in enumerate(zip(config.mounts, sources, strict=True)):
            target = vfs.share / shared_mount(container_id, i)
            target.parent.mkdir(parents=True, exist_ok=True)
            if os.path.isdir(source):
                target.mkdir(exist_ok=True)
            else:
                target.touch(exist_ok=True)
            if not mounts.is_mounted(target):
                await proc.run(["mount", "--rbind", source, target])
                await proc.run(["mount", "--make-rprivate", target])
                if mount.readonly:
                    await proc.run(["mount", "-o", "remount,bind,ro", target])

    async def _release_container_mounts(self, vfs: Virtiofsd, run_dir: Path, container_id: str) -> None:
        mounts_dir = vfs.share / container_id / "mounts"
        for point in mounts.mounts_below(mounts_dir):
            await asyncio.to_thread(mounts.unmount, point)
        if mounts_dir.exists():
            await asyncio.to_thread(shutil.rmtree, mounts_dir, True)
        await vfs.unbind_rootfs(container_id)
        await rootfs.unmount(run_dir / "c" / container_id / "rootfs")
        await asyncio.to_thread(shutil.rmtree, run_dir / "c" / container_id, True)

    async def start_container(self, sandbox: SandboxRecord, container: ContainerRecord) -> None:
        pod = await self._connected(sandbox)
        await pod.client_or_fail().start_container(container.id)

    def _read_exit(self, sandbox: SandboxRecord, container_id: str) -> dict[str, Any] | None:
        return self._pod(sandbox).events.read_exit(container_id)

    async def _wait_exit(self, sandbox: SandboxRecord, container_id: str, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while self._read_exit(sandbox, container_id) is None:
            if time.monotonic() > deadline or not self._pod(sandbox).vm.alive():
                return self._read_exit(sandbox, container_id) is not None
            await asyncio.sleep(_POLL)
        return True

    async def stop_container(self, sandbox: SandboxRecord, container: ContainerRecord, timeout: int) -> None:
        if self._read_exit(sandbox, container.id) is not None or not self._pod(sandbox).vm.alive():
            return
        client = (await self._connected(sandbox)).client_or_fail()
        try:
            if timeout > 0 and container.state == ContainerState.RUNNING:
                await client.signal(container.id, container.backend_state.get("stop_signal", signal.SIGTERM))
                if await self._wait_exit(sandbox, container.id, timeout):
                    return
            await client.signal(container.id, signal.SIGKILL, all_processes=True)
        except TandemError as e:
            if container.state != ContainerState.RUNNING:
                return  # created, never started: removal takes care of it
            log.info("signalling %s: %s", container.id[:12], e)
        if container.state != ContainerState.RUNNING:
            return
        if not await self._wait_exit(sandbox, container.id, STOP_GRACE_AFTER_KILL):
            raise FailedPrecondition(f"container {container.id} did not die after SIGKILL")

    async def remove_container(self, sandbox: SandboxRecord, container: ContainerRecord) -> None:
        pod = self._pod(sandbox)
        if pod.vm.alive():
            try:
                await (await self._connected(sandbox)).client_or_fail().remove_container(container.id)
            except Unavailable as e:
                log.warning("agent did not remove %s: %s", container.id[:12], e)
        pod.events.close_log(container.id)
        vfs = Virtiofsd(self._run_dir(sandbox), binary=str(self.settings.virtiofsd))
        await self._release_container_mounts(vfs, self._run_dir(sandbox), container.id)
        await asyncio.to_thread(shutil.rmtree, self.layers / container.id, True)

    async def container_exit(self, sandbox: SandboxRecord, container: ContainerRecord) -> ExitStatus | None:
        exited = self._read_exit(sandbox, container.id)
        if exited is None:
            if await self.sandbox_alive(sandbox):
                return None
            exited = self._read_exit(sandbox, container.id)
            if exited is None:
                vm = self._pod(sandbox).vm.spec
                return ExitStatus(
                    255,
                    time.time_ns(),
                    reason=VM_DIED,
                    message=f"the pod's VM tandem-{vm.name} (QEMU, run dir {vm.run_dir}) is gone",
                )
        code = int(exited["code"])
        if exited.get("oom"):
            return ExitStatus(code, int(exited["finished"]), reason="OOMKilled")
        return ExitStatus(code if code >= 0 else 255, int(exited["finished"]))

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
        pod = await self._connected(sandbox)
        await pod.client_or_fail().update_resources(container.id, resources)

    async def container_usage(self, sandbox: SandboxRecord, container: ContainerRecord) -> ContainerUsage:
        pod = await self._connected(sandbox)
        stats = await pod.client_or_fail().stats(container.id)
        used, inodes = await asyncio.to_thread(rootfs.writable_layer_usage, self.layers / container.id / "upper")
        return ContainerUsage(
            timestamp=time.time_ns(),
            cpu_usage_ns=stats.cpu_usage_ns,
            memory_working_set_bytes=stats.memory_working_set_bytes,
            memory_usage_bytes=stats.memory_usage_bytes,
            memory_rss_bytes=stats.memory_rss_bytes,
            page_faults=stats.page_faults,
            major_page_faults=stats.major_page_faults,
            pids=stats.pids,
            writable_layer_bytes=used,
            writable_layer_inodes=inodes,
            writable_layer_mountpoint=str(self.layers),
        )

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
        if tty and terminal_size is not None:
            process_spec["consoleSize"] = {"width": terminal_size[0], "height": terminal_size[1]}
        pod = await self._connected(sandbox)
        client = pod.client_or_fail()
        exec_id = f"x{secrets.token_hex(8)}"
        process = pod.events.execs[exec_id] = VmExec(client, container.id, exec_id, tty)
        try:
            await client.start_exec(container.id, exec_id, process_spec, terminal=tty, stdin=stdin)
        except BaseException:
            pod.events.execs.pop(exec_id, None)
            raise
        if tty and terminal_size is not None:
            await process.resize(*terminal_size)
        return process

    async def attach(self, sandbox: SandboxRecord, container: ContainerRecord, *, tty: bool, stdin: bool) -> Process:
        pod = await self._connected(sandbox)
        config = container.config
        attachers = pod.events.attachers
        attacher = VmAttach(
            pod.client_or_fail,
            container.id,
            tty=config.tty,
            stdin=stdin and config.stdin,
            stdin_once=config.stdin_once,
            detach_on_eof=config.stdin and not config.stdin_once and not config.tty,
            on_detach=lambda gone: attachers.get(container.id, set()).discard(gone),
        )
        if self._read_exit(sandbox, container.id) is not None:
            attacher.finished()
        else:
            attachers.setdefault(container.id, set()).add(attacher)
        return attacher

    async def port_forward(self, sandbox: SandboxRecord, port: int) -> ByteChannel:
        pod = await self._connected(sandbox)
        client = pod.client_or_fail()
        stream_id = f"p{secrets.token_hex(8)}"
        ports = pod.events.ports
        channel = ports[stream_id] = VmPort(client, stream_id, lambda sid: ports.pop(sid, None))
        try:
            await client.open_port(stream_id, port)
        except BaseException:
            ports.pop(stream_id, None)
            raise
        return channel
