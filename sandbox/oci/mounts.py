"""A container's mounts: the kernel filesystems, the pod's files and the CRI mounts, ordered parents first.

The one side effect of building a spec lives here: a missing host directory of
a CRI mount is created, as containerd does.
"""

from __future__ import annotations

import os
import posixpath

from core.errors import FailedPrecondition, InvalidArgument, Unimplemented
from core.mounts import mount_holding
from protos import cri_pb2 as pb
from sandbox.oci.model import Mount
from sandbox.oci.platform import HostInfo, PodFiles
from sandbox.oci.userns import IdMappings

# The infra process gets the classic masks; containers get what kubelet sends
# (kubelet sends these same defaults unless the pod asks for an unmasked /proc).
DEFAULT_MASKED_PATHS = (
    "/proc/acpi",
    "/proc/asound",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/sys/firmware",
    "/sys/devices/virtual/powercap",
)
DEFAULT_READONLY_PATHS = ("/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger")


def kernel_mounts(privileged: bool) -> list[Mount]:
    """The kernel filesystems every container gets; /sys and the cgroup tree are writable only when privileged.

    The infra process needs only the first two (/proc and /dev).
    """
    sys_mode = "rw" if privileged else "ro"
    return [
        {"destination": "/proc", "type": "proc", "source": "proc", "options": ["nosuid", "noexec", "nodev"]},
        {
            "destination": "/dev",
            "type": "tmpfs",
            "source": "tmpfs",
            "options": ["nosuid", "strictatime", "mode=755", "size=65536k"],
        },
        {
            "destination": "/dev/pts",
            "type": "devpts",
            "source": "devpts",
            "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"],
        },
        {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue", "options": ["nosuid", "noexec", "nodev"]},
        {"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", sys_mode]},
        {
            "destination": "/sys/fs/cgroup",
            "type": "cgroup",
            "source": "cgroup",
            "options": ["nosuid", "noexec", "nodev", "relatime", sys_mode],
        },
    ]


def check_mount(mount: pb.Mount, id_mappings: IdMappings | None) -> str:
    """Validate a CRI mount without touching the host; returns its cleaned container path.

    Recursive read-only follows the CRI (and containerd): only on a read-only
    mount, and only with private propagation (a read-only tree that receives
    new mounts from the host would not stay read-only). ID mappings need the
    pod's user namespace, must be its own (kubelet copies the pod's onto
    every mount), and private propagation.
    """
    if mount.HasField("image") and mount.image.image:
        raise InvalidArgument("image volumes are not supported by this runtime")
    if not mount.container_path.startswith("/"):
        raise InvalidArgument(f"mount container path {mount.container_path!r} must be absolute")
    if not mount.host_path.startswith("/"):
        raise InvalidArgument(f"mount host path {mount.host_path!r} must be absolute")
    if mount.recursive_read_only:
        if not mount.readonly:
            raise InvalidArgument(f"mount {mount.container_path}: a recursive read-only mount must be read-only")
        if mount.propagation != pb.PROPAGATION_PRIVATE:
            raise InvalidArgument(
                f"mount {mount.container_path}: a recursive read-only mount needs private propagation,"
                f" not {pb.MountPropagation.Name(mount.propagation)}"
            )
    if mount.uidMappings or mount.gidMappings:
        if id_mappings is None:
            raise InvalidArgument(f"mount {mount.container_path}: ID mappings need the pod's user namespace")
        if mount.propagation != pb.PROPAGATION_PRIVATE:
            raise InvalidArgument(
                f"mount {mount.container_path}: an ID-mapped mount is a copy of the host's tree, which neither"
                " receives nor sends mounts: it needs private propagation"
            )
        if not id_mappings.same_as(mount.uidMappings, mount.gidMappings):
            raise Unimplemented(
                f"mount {mount.container_path}: ID mappings other than the pod's user namespace's are not supported"
            )
    return posixpath.normpath(mount.container_path)


def _require_propagation(source: str, host: HostInfo, wanted: tuple[str, ...], what: str) -> None:
    """Bidirectional / host-to-container propagation only works if the host side propagates at all."""
    mount = mount_holding(source, host.mountinfo.read_text())
    point, optional = (mount.mount_point, mount.optional) if mount is not None else ("", ())
    if not any(field.startswith(wanted) for field in optional):
        raise FailedPrecondition(f"path {source} is mounted on {point} but it is not a {what} mount")


def _host_source(mount: pb.Mount, host: HostInfo) -> tuple[str, str]:
    """Create a missing host directory (as containerd does), resolve symlinks; returns (source, propagation)."""
    path = mount.host_path
    try:
        if not os.path.exists(path):
            os.makedirs(path, 0o755, exist_ok=True)
    except OSError as e:
        raise InvalidArgument(f"cannot create mount host path {path}: {e.strerror}") from None
    source = os.path.realpath(path)
    if mount.propagation == pb.PROPAGATION_BIDIRECTIONAL:
        _require_propagation(source, host, ("shared:",), "shared")
        return source, "rshared"
    if mount.propagation == pb.PROPAGATION_HOST_TO_CONTAINER:
        _require_propagation(source, host, ("shared:", "master:"), "shared or slave")
        return source, "rslave"
    return source, "rprivate"


def _bind(destination: str, source: str, options: list[str]) -> Mount:
    return {"destination": destination, "type": "bind", "source": source, "options": options}


def _cri_bind(destination: str, source: str, mode: str, mount: pb.Mount) -> Mount:
    """A CRI mount's bind: read-only through every mount below it with `rro`, ID-mapped when it has mappings."""
    options = ["rbind", mode, "ro" if mount.readonly else "rw"]
    if mount.recursive_read_only:
        options.append("rro")
    bind = _bind(destination, source, options)
    if mount.uidMappings or mount.gidMappings:
        bind["uidMappings"] = [
            {"containerID": m.container_id, "hostID": m.host_id, "size": m.length} for m in mount.uidMappings
        ]
        bind["gidMappings"] = [
            {"containerID": m.container_id, "hostID": m.host_id, "size": m.length} for m in mount.gidMappings
        ]
    return bind


def _depth(destination: str) -> int:
    return len([part for part in destination.split("/") if part])


def container_mounts(
    requested: list[tuple[str, pb.Mount]], sc: pb.LinuxContainerSecurityContext, pod_files: PodFiles, host: HostInfo
) -> tuple[list[Mount], str | None]:
    """Default mounts, the pod's files, then the CRI mounts (which win), ordered parents first.

    Returns the mounts and the rootfs propagation the CRI mounts need: a
    bidirectional mount only propagates back if the container's root is
    rshared, a host-to-container one needs at least rslave.
    """
    binds: list[Mount] = []
    propagation: str | None = None
    for destination, mount in requested:
        source, mode = _host_source(mount, host)
        binds.append(_cri_bind(destination, source, mode, mount))
        if mode == "rshared" or (mode == "rslave" and propagation is None):
            propagation = mode
    taken = {destination for destination, _ in requested}
    etc_mode = "ro" if sc.readonly_rootfs else "rw"
    etc_files = {
        "/etc/hostname": pod_files.hostname,
        "/etc/resolv.conf": pod_files.resolv_conf,
        "/etc/hosts": pod_files.hosts,
    }
    for destination, file in etc_files.items():
        if destination not in taken:
            binds.append(_bind(destination, str(file), ["rbind", "rprivate", etc_mode]))
    if "/dev/shm" not in taken:
        # The pod's own tmpfs, or the host's /dev/shm when the pod shares the host IPC namespace.
        shm = str(pod_files.shm) if pod_files.shm else "/dev/shm"
        binds.append(_bind("/dev/shm", shm, ["rbind", "rprivate", "nosuid", "nodev", "noexec", "rw"]))
    bound = {m["destination"] for m in binds}
    defaults = [
        m
        for m in kernel_mounts(sc.privileged)
        if m["destination"] not in bound and not ("/dev" in bound and m["destination"].startswith("/dev/"))
    ]
    return sorted([*defaults, *binds], key=lambda m: _depth(m["destination"])), propagation
