"""The trusted backend: each container a runc container watched by its own conmon; a pod's
namespaces are held by a catatonit infra container when its containers share a PID namespace
(it must be that namespace's PID 1), else by files: the IPC and UTS namespaces pinned in the pod
dir (see pinns.py), the network namespace by sandbox/netns.py. backend_state["mode"] says which
("infra" or "pinned"; records without it are infra pods).

Everything here assumes that container processes run on this host: that is
what makes this the runc backend, and why nothing above `sandbox/backend.py`
may assume it.

A pod with a user namespace of its own (CRI userns_options POD) has it pinned in its pod dir with its
network, IPC and UTS namespaces, all created inside it (userns.py); its containers' layers are ID-mapped
into it (sandbox/oci/rootfs.py) and its pod files belong to its root. runc runs inside it as root of it,
so the path to a container's root must be traversable by anyone: run/, bundles/ and such a container's
bundle are 0711 (searchable, not listable; containerd's state dirs are the same).

Where things live (runtime dirs vanish on reboot, as the containers do):
    <runtime_dir>/runc/root/            runc's state (`runc --root`)
    <runtime_dir>/runc/bundles/<id>/    config.json, the rootfs mount point, conmon's persist dir and ctl fifo
    <runtime_dir>/runc/exits/<id>       conmon's exit files
    <runtime_dir>/runc/pods/<id>/       a pod's hostname, resolv.conf, hosts and /dev/shm (and pinned ipc, uts,
                                        and user for a pod with a user namespace: see userns.py);
                                        pods/ itself is a private mount once a pod pinned namespaces
    <runtime_dir>/runc/infra-rootfs/    the read-only root of every infra container: a static catatonit (here, not
                                        in the state dir, so a user-namespaced runc can reach it)
    <runtime_dir>/a/                    conmon's attach-socket links (short: unix socket paths are limited)
    <state_dir>/runc/layers/<id>/       a container's writable layer (upper, work)
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import shutil
import signal
import time
from pathlib import Path
from typing import Any

from core import cgroups, mounts
from core.errors import FailedPrecondition, NotFound, Unavailable
from core.files import atomic_write_bytes, atomic_write_json, private_dir
from core.inotify import DirectoryWatch
from core.proc import ProcessIdentity
from core.settings import RuncBackendSettings
from protos import cri_pb2 as pb
from runc_backend import adapt, conmon, pinns, pod_files, streams, userns
from runc_backend.cgroups import CgroupStats, oom_score_adj_floor
from runc_backend.conmon import Conmon
from runc_backend.host import detect_host
from runc_backend.runc import Runc
from sandbox import netns
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
from sandbox.model import ContainerRecord, SandboxRecord
from sandbox.oci import rootfs
from sandbox.oci.layer_usage import LayerUsage
from sandbox.oci.model import Resources, Spec
from sandbox.oci.namespaces import HOST, NEW, Namespaces, check_sysctls
from sandbox.oci.platform import ContainerPlatform, HostInfo, PodFiles
from sandbox.oci.rootfs import IdMappedLayers
from sandbox.oci.spec import infra_spec
from sandbox.oci.userns import IdMappings, pod_user_namespace

log = logging.getLogger("tandem.runc")

CATATONIT = Path("/usr/bin/catatonit")
INFRA, PINNED = "infra", "pinned"  # backend_state["mode"]: records without one are infra pods
STOP_GRACE_AFTER_KILL = 10.0


class RuncBackend(Backend[RuncBackendSettings]):
    name = "runc"
    features = BackendFeatures(recursive_read_only_mounts=True, user_namespaces=True)

    def __init__(self, settings: RuncBackendSettings) -> None:
        run = settings.run_dir
        self.runc = Runc(private_dir(run / "root"))
        self.conmon = Conmon(self.runc, socket_dir=private_dir(settings.attach_dir))
        self.bundles = _traversable_dir(run / "bundles")
        os.chmod(run, 0o711)
        self.exits = private_dir(run / "exits")
        self.pods = private_dir(run / "pods")
        self.layers = private_dir(settings.state_dir / "layers")
        self.infra_rootfs = run / "infra-rootfs"
        self.reserved_ids = settings.reserved_ids
        self.oom_floor = oom_score_adj_floor()
        self.log_size_max = settings.log_size_max
        self.cgroup_stats = CgroupStats(cgroups.controller_roots())
        self.layer_usage = LayerUsage()
        self._pods_private = False
        self._exit_watch: DirectoryWatch | None = None

    @classmethod
    def create(cls, settings: RuncBackendSettings) -> RuncBackend:
        """The backend, if this host can run it: runc, conmon and a static catatonit must exist."""
        missing = [p for p in ("runc", "conmon") if shutil.which(p) is None]
        if not CATATONIT.exists():
            missing.append(str(CATATONIT))
        if missing:
            raise Unavailable(f"runc backend needs {', '.join(missing)} (apt-get install runc conmon catatonit)")
        backend = cls(settings)
        backend._install_infra_rootfs()
        return backend

    def _install_infra_rootfs(self) -> None:
        """A root holding only catatonit and the /proc and /dev mount points; runc mounts it read-only.

        The mount points exist up front: runc in a pod's user namespace may not create them.
        """
        target = self.infra_rootfs / "catatonit"
        data = CATATONIT.read_bytes()
        if not target.exists() or target.read_bytes() != data:
            private_dir(self.infra_rootfs)
            os.chmod(self.infra_rootfs, 0o755)
            atomic_write_bytes(target, data, mode=0o755)
        for mount_point in ("proc", "dev"):
            (self.infra_rootfs / mount_point).mkdir(mode=0o755, exist_ok=True)

    async def watch_exits(self, listener: ExitListener) -> None:
        """conmon writes `<exits>/<id>` when a container (or a pod's infra process) has exited: inotify says when."""
        self._exit_watch = DirectoryWatch(self.exits, listener)
        self._exit_watch.start()

    async def close(self) -> None:
        await self.layer_usage.close()
        if self._exit_watch is not None:
            self._exit_watch.close()
            self._exit_watch = None

    # ---- paths -----------------------------------------------------------------------------

    def _bundle(self, ident: str) -> Path:
        return self.bundles / ident

    def _persist(self, ident: str) -> Path:
        return self._bundle(ident) / "persist"

    def _pod_dir(self, sandbox: SandboxRecord) -> Path:
        return self.pods / sandbox.id

    @staticmethod
    def _pinned(sandbox: SandboxRecord) -> bool:
        """Whether the pod has no infra container: its IPC/UTS namespaces are pinned as files in its pod dir."""
        return sandbox.backend_state.get("mode") == PINNED

    @staticmethod
    def _infra_pid(sandbox: SandboxRecord) -> int:
        pid = sandbox.backend_state.get("pid")
        if not pid:
            raise FailedPrecondition(f"pod {sandbox.id} has no infra process")
        return int(pid)

    def _pod_cgroup(self, sandbox: SandboxRecord) -> str:
        return cgroups.pod_parent(sandbox.config.linux.cgroup_parent, sandbox.id)

    def _id_mappings(self, sandbox: SandboxRecord) -> IdMappings | None:
        """The mappings of the pod's own user namespace, or None when it has the host's."""
        options = sandbox.config.linux.security_context.namespace_options
        return pod_user_namespace(options, self.reserved_ids)

    def _user_files(self, sandbox: SandboxRecord) -> dict[str, Path]:
        """Where a pod with a user namespace pins it and the IPC and UTS namespaces it owns."""
        pod_dir = self._pod_dir(sandbox)
        return {kind: pod_dir / kind for kind in ("user", "ipc", "uts")}

    # ---- pods ------------------------------------------------------------------------------

    async def _write_pod_files(self, sandbox: SandboxRecord) -> PodFiles:
        pod_dir = private_dir(self._pod_dir(sandbox))
        mappings = self._id_mappings(sandbox)
        return await pod_files.write(pod_dir, sandbox, mappings.root if mappings is not None else (0, 0))

    def _pod_files(self, sandbox: SandboxRecord) -> PodFiles:
        return pod_files.paths(self._pod_dir(sandbox), sandbox)

    async def create_network_namespace(self, sandbox: SandboxRecord, path: Path) -> None:
        """A pod with a user namespace gets it here, with its network (at `path`), IPC and UTS namespaces inside."""
        mappings = self._id_mappings(sandbox)
        if mappings is None:
            await netns.create_at(path)
            return
        userns.check_traversable(self.bundles)  # the infra root is beside it
        await self._make_pods_private()  # before pinning in it: a later bind of pods/ onto itself would hide them
        private_dir(self._pod_dir(sandbox))
        await userns.create({**self._user_files(sandbox), "net": path}, mappings)

    async def _make_pods_private(self) -> None:
        """pods/ as a private mount of its own: namespaces pinned in it neither propagate nor get copied."""
        if not self._pods_private:
            await asyncio.to_thread(mounts.make_private, self.pods)
            self._pods_private = True

    async def start_sandbox(self, sandbox: SandboxRecord) -> None:
        options = sandbox.config.linux.security_context.namespace_options
        if options.pid != pb.POD:
            await self._start_pinned(sandbox)
            return
        await self._write_pod_files(sandbox)
        mappings = self._id_mappings(sandbox)
        if mappings is not None:
            await asyncio.to_thread(cgroups.create, self._pod_cgroup(sandbox), None, True)
            files = self._user_files(sandbox)
            namespaces = Namespaces(
                network=sandbox.netns_path,
                ipc=str(files["ipc"]),
                uts=str(files["uts"]),
                pid=NEW,
                user=str(files["user"]),
                id_mappings=mappings,
            )
        else:
            namespaces = Namespaces(
                network=sandbox.netns_path or HOST,
                ipc=HOST if options.ipc == pb.NODE else NEW,
                uts=HOST if sandbox.host_network else NEW,
                pid=HOST if options.pid == pb.NODE else NEW,
            )
        infra = infra_spec(
            sandbox.config,
            rootfs=self.infra_rootfs,
            namespaces=namespaces,
            cgroups_path=cgroups.cgroups_path(self._pod_cgroup(sandbox), sandbox.id),
            sandbox_id=sandbox.id,
        )
        bundle = private_dir(self._bundle(sandbox.id))
        atomic_write_json(bundle / "config.json", infra, durable=False)
        pid = await self.conmon.create(
            sandbox.id,
            bundle,
            log_path=bundle / "infra.log",
            exit_dir=self.exits,
            persist_dir=self._persist(sandbox.id),
        )
        await self.runc.start(sandbox.id)
        sandbox.backend_state.update({"mode": INFRA, "pid": pid, **_process_identity(pid, own_pid_ns=True)})

    async def _start_pinned(self, sandbox: SandboxRecord) -> None:
        """A pod without infra container (its containers do not share a PID namespace): pin IPC and UTS as files."""
        config = sandbox.config
        options = config.linux.security_context.namespace_options
        ipc, uts = options.ipc != pb.NODE, not sandbox.host_network
        pod_dir = self._pod_dir(sandbox)
        check_sysctls(
            config.linux.sysctls,
            Namespaces(
                network=sandbox.netns_path or HOST,
                ipc=str(pod_dir / "ipc") if ipc else HOST,
                uts=str(pod_dir / "uts") if uts else HOST,
                pid=NEW,
            ),
        )
        sandbox.backend_state["mode"] = PINNED  # from here on, removing the pod undoes what was done
        await self._make_pods_private()
        await self._write_pod_files(sandbox)
        if self._id_mappings(sandbox) is not None:  # pinned with the user namespace, before CNI
            hostname, netns_path = config.hostname or None, sandbox.netns_path or None
            await pinns.configure(pod_dir, hostname=hostname, netns=netns_path, sysctls=config.linux.sysctls)
        elif not (pinns.pinned(pod_dir, "ipc") or pinns.pinned(pod_dir, "uts")):
            await pinns.pin(
                pod_dir,
                ipc=ipc,
                uts=uts,
                hostname=config.hostname or None,
                netns=sandbox.netns_path or None,
                sysctls=config.linux.sysctls,
            )

    async def stop_sandbox(self, sandbox: SandboxRecord) -> None:
        if self._pinned(sandbox):
            pinns.unpin(self._pod_dir(sandbox))
        elif conmon.read_exit(self.exits, sandbox.id) is None:
            await self._signal_and_wait(sandbox.id, sandbox.backend_state, signal.SIGKILL, True, STOP_GRACE_AFTER_KILL)
        await asyncio.to_thread(userns.remove, self._user_files(sandbox).values())
        shm = self._pod_files(sandbox).shm
        if shm is not None:
            await asyncio.to_thread(mounts.unmount, shm)

    async def remove_sandbox(self, sandbox: SandboxRecord) -> None:
        await self.stop_sandbox(sandbox)
        if not self._pinned(sandbox):
            await self.runc.delete(sandbox.id, force=True)
            self.conmon.remove_attach_link(sandbox.id)
        await asyncio.to_thread(self._remove_dirs, self._bundle(sandbox.id), self._pod_dir(sandbox))
        (self.exits / sandbox.id).unlink(missing_ok=True)
        if not sandbox.config.linux.cgroup_parent:
            await asyncio.to_thread(cgroups.remove, self._pod_cgroup(sandbox))

    async def sandbox_alive(self, sandbox: SandboxRecord) -> bool:
        if self._pinned(sandbox):
            pod_dir = self._pod_dir(sandbox)
            options = sandbox.config.linux.security_context.namespace_options
            wanted = [k for k, w in (("ipc", options.ipc != pb.NODE), ("uts", not sandbox.host_network)) if w]
            if not wanted:
                return pod_dir.is_dir()
            return all(pinns.pinned(pod_dir, kind) for kind in wanted)
        return "pid" in sandbox.backend_state and conmon.read_exit(self.exits, sandbox.id) is None

    # ---- containers ------------------------------------------------------------------------

    def _namespaces(self, sandbox: SandboxRecord, config: pb.ContainerConfig) -> Namespaces:
        shared = self._shared_namespaces(sandbox, config)
        mappings = self._id_mappings(sandbox)
        if mappings is None:
            return shared
        return dataclasses.replace(shared, user=str(self._user_files(sandbox)["user"]), id_mappings=mappings)

    def _shared_namespaces(self, sandbox: SandboxRecord, config: pb.ContainerConfig) -> Namespaces:
        pod = sandbox.config.linux.security_context.namespace_options
        mode = config.linux.security_context.namespace_options
        if self._pinned(sandbox):
            pod_dir = self._pod_dir(sandbox)
            if mode.pid == pb.NODE:
                pid = HOST
            elif mode.pid == pb.TARGET:
                pid = f"/proc/{self._target_pid(mode.target_id)}/ns/pid"
            else:  # POD needs an infra process: a pod asking for it has one
                pid = NEW
            return Namespaces(
                network=sandbox.netns_path or HOST,
                ipc=HOST if pod.ipc == pb.NODE else str(pod_dir / "ipc"),
                uts=HOST if sandbox.host_network else str(pod_dir / "uts"),
                pid=pid,
            )
        infra = self._infra_pid(sandbox)
        if mode.pid == pb.NODE:
            pid = HOST
        elif mode.pid == pb.POD:
            pid = f"/proc/{infra}/ns/pid"
        elif mode.pid == pb.TARGET:
            target = self._target_pid(mode.target_id)
            pid = f"/proc/{target}/ns/pid"
        else:
            pid = NEW
        return Namespaces(
            network=HOST if sandbox.host_network else f"/proc/{infra}/ns/net",
            ipc=HOST if pod.ipc == pb.NODE else f"/proc/{infra}/ns/ipc",
            uts=HOST if sandbox.host_network else f"/proc/{infra}/ns/uts",
            pid=pid,
        )

    def _target_pid(self, container_id: str) -> int:
        try:
            return int((self._persist(container_id) / "pidfile").read_text().strip())
        except (FileNotFoundError, ValueError):
            raise FailedPrecondition(
                f"target container {container_id!r} for the PID namespace is not running"
            ) from None

    def host_info(self, sandbox: SandboxRecord) -> HostInfo:
        return detect_host()

    async def prepare_container(
        self, sandbox: SandboxRecord, container: ContainerRecord, image: ImageRootfs
    ) -> ContainerPlatform:
        mappings = self._id_mappings(sandbox)
        make_dir = private_dir if mappings is None else _traversable_dir
        bundle = make_dir(self._bundle(container.id))
        layer = self.layers / container.id
        root = bundle / "rootfs"
        id_mapped = None if mappings is None else IdMappedLayers(self._user_files(sandbox)["user"], mappings.root)
        await rootfs.mount_rootfs(image.layers, layer / "upper", layer / "work", root, id_mapped)
        cgroup = cgroups.cgroups_path(self._pod_cgroup(sandbox), container.id)
        if mappings is not None:  # made here, searchable, for runc in the pod's user namespace to bind
            await asyncio.to_thread(cgroups.create, cgroup, None, True)
        return ContainerPlatform(
            rootfs=root,
            host=detect_host(),
            namespaces=self._namespaces(sandbox, container.config),
            cgroups_path=cgroup,
            pod_files=self._pod_files(sandbox),
            oom_score_adj_floor=self.oom_floor,
        )

    async def create_container(
        self, sandbox: SandboxRecord, container: ContainerRecord, spec: Spec, stop_signal: int
    ) -> None:
        bundle = self._bundle(container.id)
        user = self._user_files(sandbox)["user"] if self._id_mappings(sandbox) is not None else None
        await asyncio.to_thread(adapt.bind_id_mapped_sources, spec, bundle, user)
        atomic_write_json(bundle / "config.json", spec, durable=False)
        config = container.config
        pid = await self.conmon.create(
            container.id,
            bundle,
            log_path=Path(container.log_path) if container.log_path else bundle / "discarded.log",
            exit_dir=self.exits,
            persist_dir=self._persist(container.id),
            terminal=config.tty,
            stdin=config.stdin,
            stdin_once=config.stdin_once,
            log_max_size=self.log_size_max,
        )
        own_pid_ns = {"type": "pid"} in spec.get("linux", {}).get("namespaces", [])
        container.backend_state.update({"pid": pid, "stop_signal": stop_signal, **_process_identity(pid, own_pid_ns)})
        await asyncio.to_thread(adapt.unbind_id_mapped_sources, bundle)

    async def start_container(self, sandbox: SandboxRecord, container: ContainerRecord) -> None:
        await self.runc.start(container.id)

    async def stop_container(self, sandbox: SandboxRecord, container: ContainerRecord, timeout: int) -> None:
        if conmon.read_exit(self.exits, container.id) is not None:
            return
        state = container.backend_state
        if timeout > 0:
            stop_signal = state.get("stop_signal", signal.SIGTERM)
            if await self._signal_and_wait(container.id, state, stop_signal, False, timeout):
                return
        if not await self._signal_and_wait(container.id, state, signal.SIGKILL, True, STOP_GRACE_AFTER_KILL):
            raise FailedPrecondition(f"container {container.id} did not die after SIGKILL")

    async def _signal_and_wait(
        self, cid: str, state: dict[str, Any], sig: int, all_processes: bool, timeout: float
    ) -> bool:
        """Signal a container (or infra) and wait up to `timeout` s for its exit; whether it is gone.

        With the init's identity recorded at create, the signal goes straight to
        it through a pidfd (immune to pid reuse), and the wait is on that pidfd,
        then briefly on conmon's exit file, which trails the death slightly.
        Killing every process takes more only when the container shares a PID
        namespace (else killing its init kills them all): SIGKILL to each
        process of its cgroup, or `runc kill --all` when that cannot be done.
        Without that identity (records of older versions) it is runc and polling.
        """
        known, pidfd = _open_init(state)
        try:
            shared_pid_ns = all_processes and not state.get("own_pid_ns")
            if shared_pid_ns and known and pidfd is not None and sig == signal.SIGKILL:
                if await asyncio.to_thread(self.runc.kill_cgroup, cid):
                    return await conmon.wait_exit(self.exits, cid, timeout, pidfd=pidfd) is not None
            if not known or pidfd is None or shared_pid_ns:
                if not known and await self.runc.state(cid) is None:
                    return True  # runc does not know it (any more): nothing runs
                if known and pidfd is None and conmon.read_exit(self.exits, cid) is None:
                    if conmon.running_monitor(self._persist(cid)) is None:
                        return True  # init gone and nobody left to record it
                with contextlib.suppress(NotFound):
                    await self.runc.kill(cid, sig, all_processes=all_processes)
            else:
                with contextlib.suppress(ProcessLookupError):
                    signal.pidfd_send_signal(pidfd, sig)
            return await conmon.wait_exit(self.exits, cid, timeout, pidfd=pidfd) is not None
        finally:
            if pidfd is not None:
                os.close(pidfd)

    async def remove_container(self, sandbox: SandboxRecord, container: ContainerRecord) -> None:
        await self.runc.delete(container.id, force=True)
        self.conmon.remove_attach_link(container.id)
        bundle = self._bundle(container.id)
        await rootfs.unmount(bundle / "rootfs")
        self.layer_usage.forget(self._upper(container.id))
        await asyncio.to_thread(adapt.unbind_id_mapped_sources, bundle)
        await asyncio.to_thread(self._remove_dirs, bundle, self.layers / container.id)
        (self.exits / container.id).unlink(missing_ok=True)

    @staticmethod
    def _remove_dirs(*dirs: Path) -> None:
        for d in dirs:
            shutil.rmtree(d, ignore_errors=True)

    async def container_exit(self, sandbox: SandboxRecord, container: ContainerRecord) -> ExitStatus | None:
        exited = conmon.read_exit(self.exits, container.id)
        if exited is None:
            if conmon.running_monitor(self._persist(container.id)) is not None:
                return None
            exited = conmon.read_exit(self.exits, container.id)  # the monitor may have just finished
            if exited is None:
                return ExitStatus(
                    exit_code=255,
                    finished_at=time.time_ns(),
                    reason="Unknown",
                    message="the container's monitor is gone and recorded no exit (was the node rebooted?)",
                )
        code, finished_at = exited
        # the exit file's mtime is the kernel's coarse clock (a tick behind): a container dying right
        # after start could seem to have finished before the manager recorded it started
        finished_at = max(finished_at, container.started_at)
        if conmon.oom_killed(self._persist(container.id)):
            return ExitStatus(code, finished_at, reason="OOMKilled")
        return ExitStatus(code if code >= 0 else 255, finished_at)

    async def exec_sync(
        self, sandbox: SandboxRecord, container: ContainerRecord, cmd: list[str], timeout: int
    ) -> ExecResult:
        process = json.loads((self._bundle(container.id) / "config.json").read_text())["process"]
        process.update(args=cmd, terminal=False)
        return await self.runc.exec_sync(container.id, process, float(timeout) if timeout > 0 else 0.0)

    async def update_sandbox_resources(self, sandbox: SandboxRecord, resources: Resources) -> None:
        """Nothing to do: kubelet writes the pod cgroup's limits itself (cgroupfs), and the infra process has none."""

    async def update_resources(self, sandbox: SandboxRecord, container: ContainerRecord, resources: Resources) -> None:
        await self.runc.update(container.id, resources)

    def _upper(self, container_id: str) -> Path:
        return self.layers / container_id / "upper"

    async def usage(self, pods: list[PodContainers]) -> dict[str, ContainerUsage]:
        """Straight from the containers' cgroup files, all in one thread; writable layers as last measured."""
        cgroup_paths = {
            c.id: cgroups.cgroups_path(self._pod_cgroup(pod.sandbox), c.id) for pod in pods for c in pod.containers
        }
        sampled = await asyncio.to_thread(
            lambda: {cid: self.cgroup_stats.usage(path, time.time_ns()) for cid, path in cgroup_paths.items()}
        )
        layers = await self.layer_usage.figures([self._upper(cid) for cid in sampled])
        found = {}
        for cid, usage in sampled.items():
            layer = layers.get(self._upper(cid))
            if layer is not None:
                usage = dataclasses.replace(
                    usage,
                    writable_layer_bytes=layer.used_bytes,
                    writable_layer_inodes=layer.inodes,
                    writable_layer_mountpoint=str(self.layers),
                    writable_layer_timestamp=layer.measured_at,
                )
            found[cid] = usage
        return found

    async def reopen_log(self, sandbox: SandboxRecord, container: ContainerRecord) -> None:
        if not container.log_path:
            return
        await self.conmon.reopen_log(self._bundle(container.id), Path(container.log_path))

    # ---- streaming (runc_backend/streams.py) -----------------------------------------------

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
        bundle = self._bundle(container.id)
        return await streams.exec_process(
            self.runc, bundle, container.id, cmd, tty=tty, stdin=stdin, terminal_size=terminal_size
        )

    async def attach(self, sandbox: SandboxRecord, container: ContainerRecord, *, tty: bool, stdin: bool) -> Process:
        config = container.config
        return await streams.attach_process(
            self.conmon.attach_socket_path(container.id),
            self._bundle(container.id) / "ctl",
            detach_on_stdin_eof=config.stdin and not config.stdin_once and not config.tty,
        )

    async def port_forward(self, sandbox: SandboxRecord, port: int) -> ByteChannel:
        return await streams.connect(sandbox.netns_path or None, port)


def _traversable_dir(path: Path) -> Path:
    """`path` made 0711: nobody can list it, a user-namespaced runc can pass through it to a container's root."""
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, 0o711)
    return path


def _process_identity(pid: int, own_pid_ns: bool) -> dict[str, Any]:
    """What `_open_init` needs later to find this very process again: its start time, and whether it is a PID 1."""
    identity = ProcessIdentity.of(pid)
    return {"start_time": None if identity is None else identity.start_time, "own_pid_ns": own_pid_ns}


def _open_init(state: dict[str, Any]) -> tuple[bool, int | None]:
    """(identity known, a pidfd of the recorded init or None when that process is gone)."""
    pid, started = state.get("pid"), state.get("start_time")
    if not pid or started is None:
        return False, None
    return True, ProcessIdentity(int(pid), int(started)).open()
