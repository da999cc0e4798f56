"""A VM pod's containers as the guest runs them: the platform the guest is, and specs moved into its paths.

The spec itself is the shared OCI layer's (`sandbox.oci`), built for the guest's
facts: every capability (the agent holds them all), cgroup v2, no swap or
hugetlb accounting, no host devices, the pod's files where the agent writes them.
The host-side paths left in it (the container's root, the host paths of CRI
mounts, attached to the pod's virtio-fs share) become the share's paths in the guest.
"""

from __future__ import annotations

import copy
import posixpath
from pathlib import Path

from core.errors import InvalidArgument
from protos import cri_pb2 as pb
from sandbox import podfiles
from sandbox.oci.capabilities import CAPABILITIES
from sandbox.oci.model import Mount, Spec
from sandbox.oci.namespaces import HOST, NEW, Namespaces
from sandbox.oci.platform import ContainerPlatform, HostInfo, PodFiles
from vm_backend.share import mount_path

GUEST_POD_DIR = "/run/tandem/pod"
GUEST_SHARE = "/run/tandem/share"
GUEST_OOM_FLOOR = -1000  # the agent runs with every capability in the guest


def guest_host_info(hostname: str, dev_dir: Path) -> HostInfo:
    """The machine a VM pod's containers run on: the guest, where the agent holds every capability."""
    return HostInfo(
        capabilities=frozenset(CAPABILITIES),
        cgroup_mode="v2",
        swap_accounting=False,
        hugetlb=False,
        hostname=hostname,
        dev_dir=dev_dir,
    )


def guest_pod_files() -> PodFiles:
    return PodFiles(
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


def guest_platform(
    config: pb.ContainerConfig, sandbox: pb.PodSandboxConfig, *, container_id: str, host_rootfs: Path, empty_dev: Path
) -> ContainerPlatform:
    """Where a VM pod's container runs: in the guest, which is the pod.

    Network, IPC and UTS are the guest's own (no entry); PID is the guest's for a
    pod-wide PID namespace, else new. `host_rootfs` (the container's root mounted
    on the host, where the guest cannot reach it) is read for user and group names
    before it is attached to the share. `empty_dev` stands for the guest's host
    devices: there are none to hand a privileged container. Recursive read-only
    mounts are made on the host's side of the share (`vm_backend/share.py`).
    """
    pid_mode = config.linux.security_context.namespace_options.pid
    return ContainerPlatform(
        rootfs=host_rootfs,
        host=guest_host_info(podfiles.hostname(sandbox), empty_dev),
        namespaces=Namespaces(network=HOST, ipc=HOST, uts=HOST, pid=HOST if pid_mode == pb.POD else NEW),
        cgroups_path=f"/tandem/{container_id}",
        pod_files=guest_pod_files(),
        oom_score_adj_floor=GUEST_OOM_FLOOR,
    )


def _cri_binds(spec: Spec, config: pb.ContainerConfig) -> list[Mount]:
    """The spec's bind mount of each CRI mount of `config`, in the request's order.

    The spec holds them in the same relative order (sorted by depth, stably), and
    no default mount shares a destination with a CRI mount, which wins over it.
    """
    waiting: dict[str, list[Mount]] = {}
    for entry in spec.get("mounts", []):
        if entry["type"] == "bind":
            waiting.setdefault(entry["destination"], []).append(entry)
    binds = []
    for mount in config.mounts:
        candidates = waiting.get(posixpath.normpath(mount.container_path))
        if not candidates:
            raise InvalidArgument(f"mount {mount.container_path} is missing from the container's spec")
        binds.append(candidates.pop(0))
    return binds


def to_guest(spec: Spec, config: pb.ContainerConfig, container_id: str) -> Spec:
    """`spec` as the guest's crun runs it: each CRI mount from its bind in the share, root.path for the agent.

    Read-only is enforced on the host's side of the share (on the top mount only, as
    runc does on a node, or on every mount below it too for recursive_read_only), where
    the guest cannot undo it: a write there fails with EROFS. In the guest the whole
    share is one virtio-fs mount, where a read-only bind would cover the mounts below
    too, so the guest's bind is read-write (and an `rro` option is the host's alone).
    """
    guest = copy.deepcopy(spec)
    for index, entry in enumerate(_cri_binds(guest, config)):
        entry["source"] = f"{GUEST_SHARE}/{mount_path(container_id, index)}"
        entry["options"] = ["rw" if option == "ro" else option for option in entry["options"] if option != "rro"]
    guest["root"] = {"path": "rootfs", "readonly": spec["root"]["readonly"]}  # the agent puts the rootfs here
    return guest


def host_sources(spec: Spec, config: pb.ContainerConfig) -> list[str]:
    """The host path of each CRI mount of `config` as the spec resolved it (symlinks resolved, created if missing)."""
    return [entry["source"] for entry in _cri_binds(spec, config)]
