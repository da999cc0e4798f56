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

The daemon keeps one `_Pod` handle per pod (QemuVm + AgentClient); after a restart
it is rebuilt lazily from `sandbox.backend_state`, and the agent's Hello replays
every unacked event: output lands in the logs, exits in the exit files.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import secrets
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core import cgroups, mounts, proc
from core.errors import FailedPrecondition, InvalidArgument, TandemError, Unavailable
from core.files import atomic_write_json, private_dir
from cri.config import Config
from protos import agent_pb2
from protos import cri_pb2 as pb
from runc_backend import rootfs, spec
from sandbox import podfiles, signals
from sandbox.backend import Backend, ContainerUsage, ExecResult, ExitStatus, ImageRootfs, Process
from sandbox.crilog import STDERR, STDOUT, CriLogWriter
from sandbox.model import ContainerRecord, ContainerState, ProcessUser, SandboxRecord
from vm_backend import resources
from vm_backend.accel import choose_accel
from vm_backend.assets import GuestAssets, current_assets
from vm_backend.channel import AgentClient
from vm_backend.jail import Jail, JailIds
from vm_backend.network import attach_tap, detach_tap
from vm_backend.qemu import QemuVm, TapNic, VmSpec, wait_exit
from vm_backend.virtiofs import Virtiofsd

log = logging.getLogger("tandem.vm")

GUEST_POD_DIR = "/run/tandem/pod"
GUEST_SHARE = "/run/tandem/share"
SHARE_TAG = "tandem"
TAP = "tap0"
STOP_GRACE_AFTER_KILL = 10.0
SHUTDOWN_WAIT = 5.0
AGENT_CONNECT_TIMEOUT = 60.0
REATTACH_TIMEOUT = 10.0
RETRY_CONNECT = 30.0
_POLL = 0.05
VM_DIED = "VMDied"  # the reason of a container whose pod's QEMU died under it


def guest_host_info(hostname: str, dev_dir: Path) -> spec.HostInfo:
    """The machine a VM pod's containers run on: the guest, where the agent holds every capability."""
    return spec.HostInfo(
        capabilities=frozenset(spec.CAPABILITIES),
        cgroup_mode="v2",
        swap_accounting=False,
        hugetlb=False,
        hostname=hostname,
        dev_dir=dev_dir,
    )


def guest_pod_files() -> spec.PodFiles:
    return spec.PodFiles(
        hostname=Path(GUEST_POD_DIR) / "hostname",
        resolv_conf=Path(GUEST_POD_DIR) / "resolv.conf",
        hosts=Path(GUEST_POD_DIR) / "hosts",
        shm=Path(GUEST_POD_DIR) / "shm",
    )


def check_vm_container(config: pb.ContainerConfig) -> None:
    """Refuse what a VM pod cannot give a container: host devices, the host's or another container's PID
    namespace, mounts that propagate (virtio-fs carries none)."""
    if config.devices:
        raise InvalidArgument("devices cannot be passed into a VM pod")
    if config.linux.security_context.namespace_options.pid in (pb.NODE, pb.TARGET):
        raise InvalidArgument("a VM pod's containers cannot join the host's or another container's PID namespace")
    for mount in config.mounts:
        if mount.propagation != pb.PROPAGATION_PRIVATE:
            raise InvalidArgument(f"mount {mount.container_path}: only private propagation reaches a VM pod")


def guest_container_spec(
    config: pb.ContainerConfig,
    sandbox: pb.PodSandboxConfig,
    *,
    sandbox_id: str,
    container_id: str,
    host_rootfs: Path,
    image_config: dict[str, Any],
    share: Path,
    empty_dev: Path,
) -> dict[str, Any]:
    """The OCI spec the guest's crun runs: runc_backend's rules with the guest's facts and paths.

    The guest is the pod: network, IPC and UTS are the guest's own (no entry); PID is the guest's
    for a pod-wide PID namespace, else new. `config`'s mounts must already name binds inside
    `share` (the host side); they come out under the guest's mount of the share. `host_rootfs` is
    read for user and group names; root.path is left for the agent to fill in.
    """
    check_vm_container(config)
    pid_mode = config.linux.security_context.namespace_options.pid
    result = spec.container_spec(
        config,
        sandbox,
        sandbox_id=sandbox_id,
        container_id=container_id,
        rootfs=host_rootfs,
        image_config=image_config,
        namespaces=spec.Namespaces(
            network=spec.HOST, ipc=spec.HOST, uts=spec.HOST, pid=spec.HOST if pid_mode == pb.POD else spec.NEW
        ),
        cgroups_path=f"/tandem/{container_id}",
        pod_files=guest_pod_files(),
        oom_score_adj_floor=-1000,  # the agent runs with every capability in the guest
        host=guest_host_info(podfiles.hostname(sandbox), empty_dev),
    )
    share_prefix = f"{share}/"
    for mount in result["mounts"]:
        if mount.get("source", "").startswith(share_prefix):
            mount["source"] = f"{GUEST_SHARE}/{mount['source'][len(share_prefix) :]}"
    result["root"]["path"] = "rootfs"  # the agent puts the shared rootfs here
    return result


# ---- streaming processes -------------------------------------------------------------------


class _Stream:
    """Output chunks for one reader; b"" at the end. Unbounded: events must never wait for a slow client."""

    def __init__(self) -> None:
        self._queue: asyncio.Queue[bytes] = asyncio.Queue()
        self.ended = False

    def put(self, data: bytes) -> None:
        if data and not self.ended:
            self._queue.put_nowait(data)

    def end(self) -> None:
        if not self.ended:
            self.ended = True
            self._queue.put_nowait(b"")

    async def get(self) -> bytes:
        if self.ended and self._queue.empty():
            return b""
        return await self._queue.get()


class _VmExec(Process):
    def __init__(self, client: AgentClient, container_id: str, exec_id: str, tty: bool) -> None:
        self.client, self.container_id, self.exec_id, self.tty = client, container_id, exec_id, tty
        self.stdout, self.stderr = _Stream(), _Stream()
        self.exited: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        if tty:
            self.stderr.end()

    def output(self, stream: int, data: bytes) -> None:
        (self.stderr if stream == agent_pb2.STDERR and not self.tty else self.stdout).put(data)

    def finished(self, code: int) -> None:
        self.stdout.end()
        self.stderr.end()
        if not self.exited.done():
            self.exited.set_result(code)

    async def read_stdout(self) -> bytes:
        return await self.stdout.get()

    async def read_stderr(self) -> bytes:
        return await self.stderr.get()

    async def write_stdin(self, data: bytes) -> None:
        with contextlib.suppress(TandemError):
            await self.client.write_stdin(self.container_id, self.exec_id, data)

    async def close_stdin(self) -> None:
        with contextlib.suppress(TandemError):
            await self.client.write_stdin(self.container_id, self.exec_id, b"", close=True)

    async def resize(self, width: int, height: int) -> None:
        if self.tty:
            with contextlib.suppress(TandemError):
                await self.client.resize_terminal(self.container_id, self.exec_id, width, height)

    async def wait(self) -> int:
        return await asyncio.shield(self.exited)

    async def kill(self) -> None:
        if not self.exited.done():
            with contextlib.suppress(TandemError):
                await self.client.signal(self.container_id, signal.SIGKILL, process_id=self.exec_id)


class _VmAttach(Process):
    def __init__(
        self, pod: _Pod, container_id: str, *, tty: bool, stdin: bool, stdin_once: bool, detach_on_eof: bool
    ) -> None:
        self.pod, self.container_id, self.tty = pod, container_id, tty
        self.stdin, self.stdin_once, self.detach_on_eof = stdin, stdin_once, detach_on_eof
        self.stdout, self.stderr = _Stream(), _Stream()
        self.done = asyncio.Event()
        if tty:
            self.stderr.end()

    def output(self, stream: int, data: bytes) -> None:
        (self.stderr if stream == agent_pb2.STDERR and not self.tty else self.stdout).put(data)

    def finished(self) -> None:
        self.stdout.end()
        self.stderr.end()
        self.done.set()

    async def read_stdout(self) -> bytes:
        return await self.stdout.get()

    async def read_stderr(self) -> bytes:
        return await self.stderr.get()

    async def write_stdin(self, data: bytes) -> None:
        if self.stdin and not self.done.is_set():
            with contextlib.suppress(TandemError):
                await self.pod.client_or_fail().write_stdin(self.container_id, "", data)

    async def close_stdin(self) -> None:
        if self.detach_on_eof:
            await self.kill()
        elif self.stdin and self.stdin_once:
            with contextlib.suppress(TandemError):
                await self.pod.client_or_fail().write_stdin(self.container_id, "", b"", close=True)

    async def resize(self, width: int, height: int) -> None:
        if self.tty:
            with contextlib.suppress(TandemError):
                await self.pod.client_or_fail().resize_terminal(self.container_id, "", width, height)

    async def wait(self) -> None:
        await self.done.wait()

    async def kill(self) -> None:
        self.pod.attachers.get(self.container_id, set()).discard(self)
        self.finished()


class _PortTransport(asyncio.WriteTransport):
    """The writing half of a forwarded connection: WritePort requests in order, ClosePort at the end."""

    def __init__(self, client: AgentClient, stream_id: str, on_close: Any) -> None:
        super().__init__()
        self.client, self.stream_id, self._on_close = client, stream_id, on_close
        self._queue: asyncio.Queue[bytes | None] = asyncio.Queue()
        self._closing = False
        self._sender = asyncio.create_task(self._send(), name=f"port {stream_id}")

    async def _send(self) -> None:
        try:
            while (data := await self._queue.get()) is not None:
                await self.client.write_port(self.stream_id, data)
        except TandemError as e:
            log.debug("port stream %s: %s", self.stream_id, e)
        finally:
            with contextlib.suppress(TandemError):
                await self.client.close_port(self.stream_id)
            self._on_close()

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not self._closing and data:
            self._queue.put_nowait(bytes(data))

    def can_write_eof(self) -> bool:
        return False

    def is_closing(self) -> bool:
        return self._closing

    def close(self) -> None:
        if not self._closing:
            self._closing = True
            self._queue.put_nowait(None)

    def abort(self) -> None:
        self.close()

    def get_write_buffer_size(self) -> int:
        return self._queue.qsize()


# ---- the per-pod handle --------------------------------------------------------------------


@dataclass(eq=False)
class _Pod:
    """What the daemon holds for one running pod VM."""

    run_dir: Path
    vm: QemuVm
    client: AgentClient | None = None
    logs: dict[str, CriLogWriter] = field(default_factory=dict)
    attachers: dict[str, set[_VmAttach]] = field(default_factory=dict)
    execs: dict[str, _VmExec] = field(default_factory=dict)
    ports: dict[str, asyncio.StreamReader] = field(default_factory=dict)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    connect_failed_at: float = -math.inf

    def container_dir(self, container_id: str) -> Path:
        return self.run_dir / "c" / container_id

    def client_or_fail(self) -> AgentClient:
        if self.client is None:
            raise Unavailable(f"no connection to the agent of the VM in {self.run_dir}")
        return self.client

    def _log(self, container_id: str) -> CriLogWriter | None:
        writer = self.logs.get(container_id)
        if writer is None:
            try:
                path = (self.container_dir(container_id) / "log_path").read_text()
            except OSError:
                return None
            if not path:
                return None
            writer = self.logs[container_id] = CriLogWriter(Path(path))
        return writer

    def on_event(self, event: agent_pb2.Event) -> None:
        kind = event.WhichOneof("kind")
        if kind == "output":
            out = event.output
            if out.process_id:
                if (process := self.execs.get(out.process_id)) is not None:
                    process.output(out.stream, out.data)
                return
            writer = self._log(out.container_id)
            if writer is not None:
                stream = STDERR if out.stream == agent_pb2.STDERR else STDOUT
                try:
                    writer.write(stream, out.data, out.timestamp_unix_ns or time.time_ns())
                except OSError as e:
                    log.warning("cannot write the log of %s: %s", out.container_id[:12], e)
            for attacher in list(self.attachers.get(out.container_id, ())):
                attacher.output(out.stream, out.data)
        elif kind == "process_exited":
            exited = event.process_exited
            if exited.process_id:
                if (process := self.execs.pop(exited.process_id, None)) is not None:
                    process.finished(exited.exit_code)
                return
            directory = self.container_dir(exited.container_id)
            if directory.is_dir():
                record = {"code": exited.exit_code, "finished": exited.finished_unix_ns, "oom": exited.oom_killed}
                atomic_write_json(directory / "exit", record)
            for attacher in self.attachers.pop(exited.container_id, set()):
                attacher.finished()
        elif kind == "port_data":
            if (reader := self.ports.get(event.port_data.stream_id)) is not None:
                reader.feed_data(event.port_data.data)
        elif kind == "port_closed":
            if (reader := self.ports.pop(event.port_closed.stream_id, None)) is not None:
                reader.feed_eof()

    async def close(self) -> None:
        if self.client is not None:
            await self.client.close()
            self.client = None
        for writer in self.logs.values():
            writer.close()
        self.logs.clear()
        for process in self.execs.values():
            process.finished(255)
        for attachers in self.attachers.values():
            for attacher in attachers:
                attacher.finished()
        for reader in self.ports.values():
            reader.feed_eof()


# ---- the backend ---------------------------------------------------------------------------


class VmBackend(Backend):
    name = "vm"

    def __init__(self, config: Config, assets: GuestAssets) -> None:
        self.config = config
        self.assets = assets
        self.root = private_dir(config.runtime_dir / "vm")
        self.layers = private_dir(config.state_dir / "vm" / "layers")
        self.empty_dev = private_dir(self.root / "empty-dev")  # a privileged guest container's "host" devices: none
        self.jail_ids = JailIds(self.root / "jail-ids", config.vm.jail_uid_first, config.vm.jail_uid_count)
        self.max_vcpus = config.vm.max_vcpus or resources.default_max_vcpus()
        self.max_memory_mib = config.vm.max_memory_mib or resources.default_max_memory_mib()
        self._accel: str | None = None
        self._pods: dict[str, _Pod] = {}

    @classmethod
    def create(cls, config: Config) -> VmBackend:
        """The backend, if this host can run it: QEMU, virtiofsd and built guest assets must exist."""
        missing = [str(p) for p in (config.vm.qemu, config.vm.virtiofsd) if not Path(p).exists()]
        assets = current_assets(config.state_dir)
        if assets is None:
            missing.append(f"guest assets in {config.state_dir / 'vm' / 'assets'} (run `tandem assets`)")
        if missing:
            raise Unavailable(f"vm backend needs {', '.join(missing)}")
        assert assets is not None
        return cls(config, assets)

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
            accel=state.get("accel", "tcg"),
            vcpus=int(state.get("vcpus", 1)),
            memory_mib=int(state.get("memory_mib", 256)),
            share_tag=SHARE_TAG,
            tap=TapNic(state["tap"], state["mac"]) if state.get("tap") else None,
            netns=Path(sandbox.netns_path) if sandbox.netns_path else None,
            qemu=str(self.config.vm.qemu),
            jail=jail,
        )

    def _vm(self, sandbox: SandboxRecord) -> QemuVm:
        run_dir = self._run_dir(sandbox)
        return QemuVm(self._spec(sandbox), Virtiofsd(run_dir, binary=str(self.config.vm.virtiofsd)))

    def _pod(self, sandbox: SandboxRecord) -> _Pod:
        pod = self._pods.get(sandbox.id)
        if pod is None:
            pod = self._pods[sandbox.id] = _Pod(self._run_dir(sandbox), self._vm(sandbox))
        return pod

    async def _connected(self, sandbox: SandboxRecord, timeout: float = REATTACH_TIMEOUT) -> _Pod:
        """The pod's handle with a live agent connection (re-made after a daemon restart)."""
        pod = self._pod(sandbox)
        async with pod.lock:
            if pod.client is None:
                if not pod.vm.alive():
                    raise FailedPrecondition(f"the VM of pod {sandbox.id} is not running")
                client = AgentClient(pod.vm.spec.agent_socket, pod.on_event)
                await client.start(timeout)
                pod.client = client
        return pod

    async def _accel_choice(self) -> str:
        if self._accel is None:
            choice = await choose_accel(self.config.vm.accel, self.config.state_dir, self.assets, self.config.vm.qemu)
            self._accel = choice.accel
        return self._accel

    # ---- pods ------------------------------------------------------------------------------

    async def start_sandbox(self, sandbox: SandboxRecord) -> None:
        if not sandbox.netns_path:
            raise FailedPrecondition("a VM pod needs its own network namespace")
        config = sandbox.config
        podfiles.hostname(config)  # refuse a bad hostname before booting anything
        netns = Path(sandbox.netns_path)
        settings = self.config.vm
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
        )
        began = time.monotonic()
        if settings.jail:
            uid = self.jail_ids.allocate(sandbox.id)
            await asyncio.to_thread(resources.create_cgroup, cgroup, resources.vm_limits(vcpus, memory, accel))
            sandbox.backend_state.update(jail_uid=uid, jail_gid=uid, cgroup=cgroup)
        guest = await attach_tap(netns, tap=TAP)
        (nic,) = guest.interfaces[:1]
        sandbox.backend_state.update(tap=guest.tap_name, mac=nic.mac)
        pod = self._pods[sandbox.id] = _Pod(run_dir, self._vm(sandbox))
        await pod.vm.start(boot_timeout=self.config.vm.boot_timeout_seconds)
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
            pid = pod.vm.pid()
            if pid is not None and pod.client is not None:
                with contextlib.suppress(TandemError, TimeoutError):
                    await asyncio.wait_for(pod.client.shutdown(), SHUTDOWN_WAIT)
                    await wait_exit(pid, SHUTDOWN_WAIT)
            await pod.close()
            await pod.vm.kill()  # also stops virtiofsd and removes the sockets
            # a virtiofsd started for a boot that never reached QEMU has no QEMU to outlive it
            await Virtiofsd(self._run_dir(sandbox), binary=str(self.config.vm.virtiofsd)).stop()
            # and what no pidfile names: a jailer cut short, a QEMU whose daemon died before writing its pidfile
            if (cgroup := self._cgroup(sandbox)) is not None:
                await resources.kill_cgroup(cgroup)
        if sandbox.netns_path:
            await detach_tap(Path(sandbox.netns_path), sandbox.backend_state.get("tap", TAP))

    async def remove_sandbox(self, sandbox: SandboxRecord) -> None:
        await self.stop_sandbox(sandbox)
        run_dir = self._run_dir(sandbox)
        vfs = Virtiofsd(run_dir, binary=str(self.config.vm.virtiofsd))
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

    async def create_container(self, sandbox: SandboxRecord, container: ContainerRecord, image: ImageRootfs) -> None:
        config = container.config
        check_vm_container(config)
        pod = await self._connected(sandbox)
        vfs = pod.vm.virtiofsd
        assert vfs is not None
        directory = private_dir(pod.container_dir(container.id))
        (directory / "log_path").write_text(container.log_path)
        if container.log_path:
            pod.logs[container.id] = CriLogWriter(Path(container.log_path))
            pod.logs[container.id].open()
        layer = self.layers / container.id
        host_root = directory / "rootfs"
        await rootfs.mount_rootfs(image.layers, layer / "upper", layer / "work", host_root)
        guest_rootfs = await vfs.bind_rootfs(container.id, host_root)
        shared = await self._share_mounts(vfs, container.id, config)
        container_spec = guest_container_spec(
            shared,
            sandbox.config,
            sandbox_id=sandbox.id,
            container_id=container.id,
            host_rootfs=host_root,
            image_config=image.config,
            share=vfs.share,
            empty_dev=self.empty_dev,
        )
        atomic_write_json(directory / "process.json", container_spec["process"], durable=False)
        await pod.client_or_fail().create_container(
            container.id,
            container_spec,
            guest_rootfs,
            terminal=config.tty,
            stdin=config.stdin,
            stdin_once=config.stdin_once,
        )
        user = container_spec["process"]["user"]
        container.user = ProcessUser(user.get("uid", 0), user.get("gid", 0), list(user.get("additionalGids", [])))
        container.backend_state["stop_signal"] = signals.stop_signal(config, image.config)

    async def _share_mounts(self, vfs: Virtiofsd, container_id: str, config: pb.ContainerConfig) -> pb.ContainerConfig:
        """Bind each host path the container mounts into the share; the copy of `config` names the binds."""
        shared = pb.ContainerConfig()
        shared.CopyFrom(config)
        for i, mount in enumerate(shared.mounts):
            source = os.path.realpath(mount.host_path)
            if not os.path.exists(source):
                os.makedirs(source, 0o755, exist_ok=True)
            target = vfs.share / container_id / "mounts" / str(i)
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
            mount.host_path = str(target)
            # Read-only is enforced here, on the top mount only, as runc does on a node: mounts below
            # it stay writable. In the guest the whole share is one virtio-fs mount, where a read-only
            # bind would cover them too.
            mount.readonly = False
        return shared

    async def _release_container_mounts(self, vfs: Virtiofsd, run_dir: Path, container_id: str) -> None:
        mounts_dir = vfs.share / container_id / "mounts"
        inside = sorted(
            (m.mount_point for m in mounts.mounts() if m.mount_point.startswith(f"{mounts_dir}/")),
            key=len,
            reverse=True,
        )
        for point in inside:
            await rootfs.unmount(Path(point))
        if mounts_dir.exists():
            await asyncio.to_thread(shutil.rmtree, mounts_dir, True)
        await vfs.unbind_rootfs(container_id)
        await rootfs.unmount(run_dir / "c" / container_id / "rootfs")
        await asyncio.to_thread(shutil.rmtree, run_dir / "c" / container_id, True)

    async def start_container(self, sandbox: SandboxRecord, container: ContainerRecord) -> None:
        pod = await self._connected(sandbox)
        await pod.client_or_fail().start_container(container.id)

    def _read_exit(self, sandbox: SandboxRecord, container_id: str) -> dict[str, Any] | None:
        try:
            return json.loads((self._run_dir(sandbox) / "c" / container_id / "exit").read_text())
        except (OSError, ValueError):
            return None

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
        writer = pod.logs.pop(container.id, None)
        if writer is not None:
            writer.close()
        vfs = Virtiofsd(self._run_dir(sandbox), binary=str(self.config.vm.virtiofsd))
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

    async def update_resources(
        self, sandbox: SandboxRecord, container: ContainerRecord, resources: pb.LinuxContainerResources
    ) -> None:
        host = guest_host_info("", self.empty_dev)
        pod = await self._connected(sandbox)
        await pod.client_or_fail().update_resources(container.id, spec.linux_resources(resources, host))

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
        writer = self._pod(sandbox).logs.get(container.id)
        if writer is not None:
            writer.reopen()

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
        process = pod.execs[exec_id] = _VmExec(client, container.id, exec_id, tty)
        try:
            await client.start_exec(container.id, exec_id, process_spec, terminal=tty, stdin=stdin)
        except BaseException:
            pod.execs.pop(exec_id, None)
            raise
        if tty and terminal_size is not None:
            await process.resize(*terminal_size)
        return process

    async def attach(self, sandbox: SandboxRecord, container: ContainerRecord, *, tty: bool, stdin: bool) -> Process:
        pod = await self._connected(sandbox)
        config = container.config
        attacher = _VmAttach(
            pod,
            container.id,
            tty=config.tty,
            stdin=stdin and config.stdin,
            stdin_once=config.stdin_once,
            detach_on_eof=config.stdin and not config.stdin_once and not config.tty,
        )
        if self._read_exit(sandbox, container.id) is not None:
            attacher.finished()
        else:
            pod.attachers.setdefault(container.id, set()).add(attacher)
        return attacher

    async def port_forward(
        self, sandbox: SandboxRecord, port: int
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        pod = await self._connected(sandbox)
        client = pod.client_or_fail()
        stream_id = f"p{secrets.token_hex(8)}"
        reader = asyncio.StreamReader()
        pod.ports[stream_id] = reader
        try:
            await client.open_port(stream_id, port)
        except BaseException:
            pod.ports.pop(stream_id, None)
            raise
        loop = asyncio.get_running_loop()
        protocol = asyncio.StreamReaderProtocol(reader)
        transport = _PortTransport(client, stream_id, lambda: None)
        protocol.connection_made(transport)
        writer = asyncio.StreamWriter(transport, protocol, reader, loop)
        return reader, writer
