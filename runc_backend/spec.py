"""OCI runtime specs (runc's config.json) for a pod's infra process and for its containers.

Where Kubernetes leaves a choice, Tandem does what containerd's CRI plugin does,
so a workload behaves the same after moving here: the same default
capabilities, mounts, device rules, environment, user resolution and seccomp
semantics. Everything is computed from the request, the image and a few host
facts (`HostInfo`); the only side effects are stat-ing devices and host paths
and creating a missing host directory for a mount, as containerd does.
"""

from __future__ import annotations

import functools
import os
import posixpath
import re
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core import cgroups
from core.errors import FailedPrecondition, InvalidArgument, NotFound
from protos import cri_pb2 as pb
from runc_backend.seccomp import load_localhost_profile, runtime_default_profile
from runc_backend.users import resolve_identity

NEW = "new"
HOST = "host"

OCI_VERSION = "1.0.2"
DEFAULT_PATH_ENV = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
INFRA_ARGS = ("/catatonit", "-P")
SANDBOX_CPU_SHARES = 2  # containerd's: the infra process idles and should never win CPU

# Capability names by number (0 = CAP_CHOWN ... 40 = CAP_CHECKPOINT_RESTORE).
CAPABILITIES = (
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_DAC_READ_SEARCH",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETPCAP",
    "CAP_LINUX_IMMUTABLE",
    "CAP_NET_BIND_SERVICE",
    "CAP_NET_BROADCAST",
    "CAP_NET_ADMIN",
    "CAP_NET_RAW",
    "CAP_IPC_LOCK",
    "CAP_IPC_OWNER",
    "CAP_SYS_MODULE",
    "CAP_SYS_RAWIO",
    "CAP_SYS_CHROOT",
    "CAP_SYS_PTRACE",
    "CAP_SYS_PACCT",
    "CAP_SYS_ADMIN",
    "CAP_SYS_BOOT",
    "CAP_SYS_NICE",
    "CAP_SYS_RESOURCE",
    "CAP_SYS_TIME",
    "CAP_SYS_TTY_CONFIG",
    "CAP_MKNOD",
    "CAP_LEASE",
    "CAP_AUDIT_WRITE",
    "CAP_AUDIT_CONTROL",
    "CAP_SETFCAP",
    "CAP_MAC_OVERRIDE",
    "CAP_MAC_ADMIN",
    "CAP_SYSLOG",
    "CAP_WAKE_ALARM",
    "CAP_BLOCK_SUSPEND",
    "CAP_AUDIT_READ",
    "CAP_PERFMON",
    "CAP_BPF",
    "CAP_CHECKPOINT_RESTORE",
)
_CAPABILITY_NUMBER = {name: number for number, name in enumerate(CAPABILITIES)}

DEFAULT_CAPABILITIES = frozenset(
    {
        "CAP_CHOWN",
        "CAP_DAC_OVERRIDE",
        "CAP_FSETID",
        "CAP_FOWNER",
        "CAP_MKNOD",
        "CAP_NET_RAW",
        "CAP_SETGID",
        "CAP_SETUID",
        "CAP_SETFCAP",
        "CAP_SETPCAP",
        "CAP_NET_BIND_SERVICE",
        "CAP_SYS_CHROOT",
        "CAP_KILL",
        "CAP_AUDIT_WRITE",
    }
)

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

# Devices every container may use: null, zero, full, random, urandom, tty,
# console, ptmx and the pty slaves (runc appends the same list on its own).
_STANDARD_DEVICES = (
    ("c", 1, 3),
    ("c", 1, 5),
    ("c", 1, 7),
    ("c", 1, 8),
    ("c", 1, 9),
    ("c", 5, 0),
    ("c", 5, 1),
    ("c", 5, 2),
    ("c", 136, None),
)
# Not walked when a whole /dev is handed to a privileged container (containerd's list).
_SKIPPED_DEV_DIRS = frozenset({"pts", "shm", "fd", "mqueue", ".lxc", ".lxd-mounts", ".udev"})

# Sysctls runc accepts, by the namespace that makes them per-pod.
_IPC_SYSCTLS = frozenset(
    {
        "kernel.msgmax",
        "kernel.msgmnb",
        "kernel.msgmni",
        "kernel.sem",
        "kernel.shmall",
        "kernel.shmmax",
        "kernel.shmmni",
        "kernel.shm_rmid_forced",
    }
)

ANNOTATION_CONTAINER_TYPE = "io.kubernetes.cri.container-type"
ANNOTATION_SANDBOX_ID = "io.kubernetes.cri.sandbox-id"
ANNOTATION_SANDBOX_NAME = "io.kubernetes.cri.sandbox-name"
ANNOTATION_SANDBOX_NAMESPACE = "io.kubernetes.cri.sandbox-namespace"
ANNOTATION_SANDBOX_UID = "io.kubernetes.cri.sandbox-uid"
ANNOTATION_SANDBOX_LOG_DIRECTORY = "io.kubernetes.cri.sandbox-log-directory"
ANNOTATION_CONTAINER_NAME = "io.kubernetes.cri.container-name"
ANNOTATION_IMAGE_NAME = "io.kubernetes.cri.image-name"


@dataclass(frozen=True)
class PodFiles:
    """Per-pod files the backend prepares; mounted into every container."""

    hostname: Path  # bind-mounted at /etc/hostname
    resolv_conf: Path  # /etc/resolv.conf
    hosts: Path  # /etc/hosts
    shm: Path | None  # a tmpfs dir bind-mounted at /dev/shm; None when the pod uses the host IPC namespace


@dataclass(frozen=True)
class Namespaces:
    """For each of network/ipc/uts/pid: a path to join, NEW (a fresh namespace) or HOST (no entry)."""

    network: str
    ipc: str
    uts: str
    pid: str

    def __post_init__(self) -> None:
        for kind, value in self._items():
            if value not in (NEW, HOST) and not value.startswith("/"):
                raise ValueError(f"{kind} namespace must be NEW, HOST or an absolute path, not {value!r}")

    def _items(self) -> tuple[tuple[str, str], ...]:
        return (("pid", self.pid), ("network", self.network), ("ipc", self.ipc), ("uts", self.uts))

    def entries(self) -> list[dict[str, str]]:
        """`linux.namespaces` for these choices, plus the private mount namespace every container has."""
        entries = [
            {"type": kind} if value == NEW else {"type": kind, "path": value}
            for kind, value in self._items()
            if value != HOST
        ]
        return [*entries, {"type": "mount"}]


@dataclass(frozen=True)
class HostInfo:
    """Facts about this node that shape specs: detected once, replaceable in tests."""

    capabilities: frozenset[str]  # this daemon's effective set: what privileged / "ALL" can hand out
    cgroup_mode: cgroups.Mode
    swap_accounting: bool  # memory.memsw (v1) / memory.swap.max (v2) exists, so swap limits can be set
    hugetlb: bool  # the hugetlb controller is available
    hostname: str  # HOSTNAME for pods that did not ask for one
    dev_dir: Path = Path("/dev")
    mountinfo: Path = Path("/proc/self/mountinfo")  # read per container: mounts change


def capabilities_from_status(status: str) -> frozenset[str]:
    """The effective capabilities in a /proc/<pid>/status text (bits beyond the known ones ignored)."""
    for line in status.splitlines():
        if line.startswith("CapEff:"):
            mask = int(line.split()[1], 16)
            return frozenset(name for number, name in enumerate(CAPABILITIES) if mask >> number & 1)
    return frozenset()


@functools.cache
def detect_host() -> HostInfo:
    """This node's HostInfo, read from /proc and /sys once per process."""
    mode = cgroups.detect_mode()
    root = Path(cgroups.CGROUP_ROOT)
    if mode == "v2":
        own = Path("/proc/self/cgroup").read_text().splitlines()[0].partition("::")[2]
        swap = (root / own.lstrip("/") / "memory.swap.max").exists()
        controllers = root / "cgroup.controllers"
        hugetlb = "hugetlb" in controllers.read_text().split() if controllers.exists() else False
    else:
        swap = (root / "memory" / "memory.memsw.limit_in_bytes").exists()
        hugetlb = (root / "hugetlb").is_dir()
    return HostInfo(
        capabilities=capabilities_from_status(Path("/proc/self/status").read_text()),
        cgroup_mode=mode,
        swap_accounting=swap,
        hugetlb=hugetlb,
        hostname=os.uname().nodename,
    )


# ---------------------------------------------------------------- infra


def infra_spec(
    config: pb.PodSandboxConfig, *, rootfs: Path, namespaces: Namespaces, cgroups_path: str, sandbox_id: str = ""
) -> dict[str, Any]:
    """The spec of the pod's infra process: catatonit holding the pod's namespaces, with no privileges at all.

    `rootfs` holds only a static /catatonit and is mounted read-only. The pod's
    sysctls are applied here, inside the namespaces they belong to; the hostname
    too, unless the pod shares the host's UTS namespace. `sandbox_id` only
    labels the spec (annotation io.kubernetes.cri.sandbox-id).
    """
    sc = config.linux.security_context
    _refuse_user_namespaces(sc.namespace_options)
    _check_sysctls(config.linux.sysctls, namespaces)
    uid = _int64_id(sc.run_as_user, "run_as_user") if sc.HasField("run_as_user") else 0
    if sc.HasField("run_as_group") and not sc.HasField("run_as_user"):
        raise InvalidArgument("run_as_group is set without run_as_user")
    gid = _int64_id(sc.run_as_group, "run_as_group") if sc.HasField("run_as_group") else 0
    annotations = {
        ANNOTATION_CONTAINER_TYPE: "sandbox",
        **_sandbox_annotations(config, sandbox_id),
        ANNOTATION_SANDBOX_LOG_DIRECTORY: config.log_directory,
    }
    spec: dict[str, Any] = {
        "ociVersion": OCI_VERSION,
        "process": {
            "terminal": False,
            "user": {"uid": uid, "gid": gid},
            "args": list(INFRA_ARGS),
            "env": [DEFAULT_PATH_ENV],
            "cwd": "/",
            "capabilities": _capability_sets(set(), set()),
            "noNewPrivileges": True,
        },
        "root": {"path": str(rootfs), "readonly": True},
        "mounts": _kernel_mounts(privileged=False)[:2],
        "annotations": annotations,
        "linux": {
            "namespaces": namespaces.entries(),
            "cgroupsPath": cgroups_path,
            "resources": {"devices": _default_device_rules(), "cpu": {"shares": SANDBOX_CPU_SHARES}},
            "sysctl": dict(sorted(config.linux.sysctls.items())),
            "seccomp": runtime_default_profile(),
            "maskedPaths": list(DEFAULT_MASKED_PATHS),
            "readonlyPaths": list(DEFAULT_READONLY_PATHS),
        },
    }
    if namespaces.uts != HOST and config.hostname:
        spec["hostname"] = config.hostname
    return spec


def _check_sysctls(sysctls: Mapping[str, str], namespaces: Namespaces) -> None:
    """Refuse what runc would refuse later: sysctls outside the namespaces the pod owns."""
    for name in sorted(sysctls):
        if name in _IPC_SYSCTLS or name.startswith("fs.mqueue."):
            needed, have = "IPC", namespaces.ipc
        elif name.startswith("net."):
            needed, have = "network", namespaces.network
        elif name == "kernel.domainname":
            needed, have = "UTS", namespaces.uts
        else:
            raise InvalidArgument(f"sysctl {name} is not namespaced, so a pod cannot set it")
        if have == HOST:
            raise InvalidArgument(f"sysctl {name} needs the pod's own {needed} namespace, but the pod uses the host's")


# ---------------------------------------------------------------- containers


def container_spec(
    config: pb.ContainerConfig,
    sandbox: pb.PodSandboxConfig,
    *,
    sandbox_id: str,
    container_id: str,
    rootfs: Path,
    image_config: dict[str, Any],
    namespaces: Namespaces,
    cgroups_path: str,
    pod_files: PodFiles,
    oom_score_adj_floor: int,
    host: HostInfo | None = None,
) -> dict[str, Any]:
    """The spec of one container of a pod.

    `rootfs` is the container's mounted root (its /etc/passwd and /etc/group
    resolve user names); `image_config` the image's OCI config JSON. The
    request is validated completely before the one side effect, creating
    missing host directories for mounts. `container_id` is not part of the
    spec: runc gets it on its command line.
    """
    host = host or detect_host()
    image = image_config.get("config") or {}
    sc = config.linux.security_context
    privileged = sc.privileged
    if privileged and not sandbox.linux.security_context.privileged:
        raise InvalidArgument("a privileged container needs a privileged pod sandbox")
    _refuse_user_namespaces(sc.namespace_options)
    _check_apparmor(sc)
    seccomp_choice = _seccomp_choice(sc)
    requested_mounts = [(_check_mount(m), m) for m in config.mounts]
    identity = resolve_identity(
        rootfs,
        _user_string(sc, image),
        supplemental_groups=tuple(sc.supplemental_groups),
        image_groups=_merge_groups(sc),
    )
    capabilities = _container_capabilities(sc, host)
    process: dict[str, Any] = {
        "terminal": config.tty,
        "user": {"uid": identity.uid, "gid": identity.gid, "additionalGids": list(identity.additional_gids)},
        "args": _process_args(config, image),
        "env": _environment(config, sandbox, image, host),
        "cwd": _working_dir(config, image),
        "capabilities": capabilities,
        "noNewPrivileges": sc.no_new_privs,
    }
    if config.linux.HasField("resources"):
        process["oomScoreAdj"] = max(config.linux.resources.oom_score_adj, oom_score_adj_floor)
    resources = _resources(config.linux, host)
    devices, device_rules = _container_devices(config, host)
    seccomp = None if privileged else _seccomp_profile(seccomp_choice, capabilities["bounding"])
    mounts, rootfs_propagation = _container_mounts(requested_mounts, sc, pod_files, host)

    namespace_entries = namespaces.entries()
    if host.cgroup_mode == "v2" and not privileged:
        namespace_entries.append({"type": "cgroup"})  # hides the host's cgroup tree; v2 only, as containerd
    linux: dict[str, Any] = {
        "namespaces": namespace_entries,
        "cgroupsPath": cgroups_path,
        "resources": {"devices": device_rules, **resources},
        "devices": devices,
        "maskedPaths": [] if privileged else list(sc.masked_paths),
        "readonlyPaths": [] if privileged else list(sc.readonly_paths),
    }
    if rootfs_propagation:
        linux["rootfsPropagation"] = rootfs_propagation
    if seccomp is not None:
        linux["seccomp"] = seccomp
    return {
        "ociVersion": OCI_VERSION,
        "process": process,
        "root": {"path": str(rootfs), "readonly": sc.readonly_rootfs},
        "mounts": mounts,
        "annotations": {
            ANNOTATION_CONTAINER_TYPE: "container",
            **_sandbox_annotations(sandbox, sandbox_id),
            ANNOTATION_CONTAINER_NAME: config.metadata.name,
            ANNOTATION_IMAGE_NAME: config.image.user_specified_image or config.image.image,
        },
        "linux": linux,
    }


def _sandbox_annotations(sandbox: pb.PodSandboxConfig, sandbox_id: str) -> dict[str, str]:
    return {
        ANNOTATION_SANDBOX_ID: sandbox_id,
        ANNOTATION_SANDBOX_NAME: sandbox.metadata.name,
        ANNOTATION_SANDBOX_NAMESPACE: sandbox.metadata.namespace,
        ANNOTATION_SANDBOX_UID: sandbox.metadata.uid,
    }


def _refuse_user_namespaces(options: pb.NamespaceOption) -> None:
    if options.HasField("userns_options") and options.userns_options.mode != pb.NODE:
        raise InvalidArgument("user namespaces are not supported by this runtime yet")


# ---------------------------------------------------------------- process


def _process_args(config: pb.ContainerConfig, image: dict[str, Any]) -> list[str]:
    """Kubernetes' rules: command replaces the entrypoint, args replace the image's Cmd."""
    command, args = list(config.command), list(config.args)
    if not command:
        if not args:
            args = list(image.get("Cmd") or [])
        entrypoint = list(image.get("Entrypoint") or [])
        if entrypoint != [""]:
            command = entrypoint
    if not command and not args:
        raise InvalidArgument("no command specified")
    return command + args


def _merge_env(entries: list[str]) -> list[str]:
    """Later entries replace earlier ones with the same name, in place; a bare `NAME` removes it."""
    merged: dict[str, str] = {}
    for entry in entries:
        name, sep, _ = entry.partition("=")
        if sep:
            merged[name] = entry
        else:
            merged.pop(name, None)
    return list(merged.values())


def _environment(
    config: pb.ContainerConfig, sandbox: pb.PodSandboxConfig, image: dict[str, Any], host: HostInfo
) -> list[str]:
    base = [DEFAULT_PATH_ENV, *(["TERM=xterm"] if config.tty else []), f"HOSTNAME={sandbox.hostname or host.hostname}"]
    return _merge_env([*base, *map(str, image.get("Env") or []), *(f"{e.key}={e.value}" for e in config.envs)])


def _working_dir(config: pb.ContainerConfig, image: dict[str, Any]) -> str:
    cwd = config.working_dir or image.get("WorkingDir") or "/"
    if not cwd.startswith("/"):
        raise InvalidArgument(f"working directory {cwd!r} must be absolute")
    return cwd


def _int64_id(value: pb.Int64Value, what: str) -> int:
    if not 0 <= value.value <= 2**31 - 1:
        raise InvalidArgument(f"{what} {value.value} is out of range")
    return value.value


def _user_string(sc: pb.LinuxContainerSecurityContext, image: dict[str, Any]) -> str:
    """containerd's precedence: run_as_username, run_as_user, then the image's User."""
    user = sc.run_as_username or (str(_int64_id(sc.run_as_user, "run_as_user")) if sc.HasField("run_as_user") else "")
    if sc.HasField("run_as_group"):
        if not user:
            raise InvalidArgument("run_as_group is set without run_as_user or run_as_username")
        return f"{user}:{_int64_id(sc.run_as_group, 'run_as_group')}"
    return user or str(image.get("User") or "")


def _merge_groups(sc: pb.LinuxContainerSecurityContext) -> bool:
    """Whether the image's /etc/group memberships join the supplementary groups (policy Merge, not Strict)."""
    if sc.supplemental_groups_policy not in (pb.Merge, pb.Strict):
        raise InvalidArgument(f"unknown supplemental groups policy {sc.supplemental_groups_policy}")
    return sc.supplemental_groups_policy == pb.Merge


# ---------------------------------------------------------------- capabilities


def _capability_name(name: str) -> str:
    upper = name.strip().upper()
    if upper in ("ALL", "CAP_ALL"):
        return "ALL"
    full = upper if upper.startswith("CAP_") else f"CAP_{upper}"
    if full not in _CAPABILITY_NUMBER:
        raise InvalidArgument(f"unknown capability {name!r}")
    return full


def _capability_sets(caps: set[str], ambient: set[str]) -> dict[str, list[str]]:
    ordered = sorted(caps, key=_CAPABILITY_NUMBER.__getitem__)
    ambient_ordered = sorted(ambient, key=_CAPABILITY_NUMBER.__getitem__)
    return {
        "bounding": ordered,
        "effective": list(ordered),
        "permitted": list(ordered),
        "inheritable": ambient_ordered,
        "ambient": list(ambient_ordered),
    }


def _container_capabilities(sc: pb.LinuxContainerSecurityContext, host: HostInfo) -> dict[str, list[str]]:
    """containerd's rules: defaults, "ALL" added then "ALL" dropped, then single adds, then single drops.

    Privileged containers get every capability this daemon holds. Ambient
    capabilities (KEP-2763) are added last, to every set including inheritable,
    because the kernel keeps only ambient caps that are permitted and inheritable.
    """
    adds = {_capability_name(c) for c in sc.capabilities.add_capabilities}
    drops = {_capability_name(c) for c in sc.capabilities.drop_capabilities}
    ambient = {_capability_name(c) for c in sc.capabilities.add_ambient_capabilities}
    if "ALL" in ambient:
        raise InvalidArgument("ALL cannot be an ambient capability")
    if sc.privileged:
        caps = set(host.capabilities)
    else:
        caps = set(host.capabilities) if "ALL" in adds else set(DEFAULT_CAPABILITIES)
        if "ALL" in drops:
            caps = set()
        caps = (caps | (adds - {"ALL"})) - (drops - {"ALL"})
    return _capability_sets(caps | ambient, ambient)


# ---------------------------------------------------------------- LSMs


def _check_apparmor(sc: pb.LinuxContainerSecurityContext) -> None:
    """This host has no AppArmor: "runtime default" and unconfined both mean no profile; a named one cannot work."""
    if sc.HasField("apparmor"):
        named = sc.apparmor.profile_type == pb.SecurityProfile.Localhost
    else:
        name = sc.apparmor_profile
        if name not in ("", "runtime/default", "docker/default", "unconfined") and not name.startswith("localhost/"):
            raise InvalidArgument(f"invalid apparmor profile {name!r}")
        named = name.startswith("localhost/")
    if named:
        raise InvalidArgument("apparmor is not enabled on this host")


def _seccomp_choice(sc: pb.LinuxContainerSecurityContext) -> pb.SecurityProfile | None:
    """The structured `seccomp` field wins over the deprecated path string; neither set means unconfined."""
    if sc.HasField("seccomp"):
        if sc.seccomp.profile_type != pb.SecurityProfile.Localhost and sc.seccomp.localhost_ref:
            raise InvalidArgument("seccomp localhost_ref is only valid with profile type Localhost")
        return sc.seccomp
    path = sc.seccomp_profile_path
    if not path:
        return None
    if path in ("runtime/default", "docker/default"):
        return pb.SecurityProfile(profile_type=pb.SecurityProfile.RuntimeDefault)
    if path == "unconfined":
        return pb.SecurityProfile(profile_type=pb.SecurityProfile.Unconfined)
    if path.startswith("localhost/"):
        return pb.SecurityProfile(profile_type=pb.SecurityProfile.Localhost, localhost_ref=path)
    raise InvalidArgument(f"invalid seccomp profile {path!r}")


def _seccomp_profile(choice: pb.SecurityProfile | None, bounding: list[str]) -> dict[str, Any] | None:
    if choice is None or choice.profile_type == pb.SecurityProfile.Unconfined:
        return None
    if choice.profile_type == pb.SecurityProfile.RuntimeDefault:
        return runtime_default_profile(bounding)
    if choice.profile_type == pb.SecurityProfile.Localhost:
        return load_localhost_profile(choice.localhost_ref.removeprefix("localhost/"))
    raise InvalidArgument(f"unknown seccomp profile type {choice.profile_type}")


# ---------------------------------------------------------------- mounts


def _kernel_mounts(privileged: bool) -> list[dict[str, Any]]:
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


def _check_mount(mount: pb.Mount) -> str:
    """Validate a CRI mount without touching the host; returns its cleaned container path."""
    if mount.HasField("image") and mount.image.image:
        raise InvalidArgument("image volumes are not supported by this runtime")
    if not mount.container_path.startswith("/"):
        raise InvalidArgument(f"mount container path {mount.container_path!r} must be absolute")
    if not mount.host_path.startswith("/"):
        raise InvalidArgument(f"mount host path {mount.host_path!r} must be absolute")
    if mount.recursive_read_only:
        raise InvalidArgument("recursive read-only mounts are not supported by this runtime")
    if mount.uidMappings or mount.gidMappings:
        raise InvalidArgument("ID-mapped mounts need user namespaces, which this runtime does not support yet")
    return posixpath.normpath(mount.container_path)


def _unescape(field: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def _mount_of(path: str, mountinfo: str) -> tuple[str, list[str]]:
    """The mount point holding `path` and its optional (propagation) fields, from mountinfo text."""
    best: tuple[str, list[str]] = ("", [])
    for line in mountinfo.splitlines():
        fields = line.split()
        if "-" not in fields[6:]:
            continue
        point = _unescape(fields[4])
        if (path == point or path.startswith(point.rstrip("/") + "/")) and len(point) >= len(best[0]):
            best = (point, fields[6 : fields.index("-", 6)])
    return best


def _require_propagation(source: str, host: HostInfo, wanted: tuple[str, ...], what: str) -> None:
    """Bidirectional / host-to-container propagation only works if the host side propagates at all."""
    point, optional = _mount_of(source, host.mountinfo.read_text())
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


def _bind(destination: str, source: str, options: list[str]) -> dict[str, Any]:
    return {"destination": destination, "type": "bind", "source": source, "options": options}


def _depth(destination: str) -> int:
    return len([part for part in destination.split("/") if part])


def _container_mounts(
    requested: list[tuple[str, pb.Mount]], sc: pb.LinuxContainerSecurityContext, pod_files: PodFiles, host: HostInfo
) -> tuple[list[dict[str, Any]], str | None]:
    """Default mounts, the pod's files, then the CRI mounts (which win), ordered parents first.

    Returns the mounts and the rootfs propagation the CRI mounts need: a
    bidirectional mount only propagates back if the container's root is
    rshared, a host-to-container one needs at least rslave.
    """
    binds = []
    propagation = None
    for destination, mount in requested:
        source, mode = _host_source(mount, host)
        binds.append(_bind(destination, source, ["rbind", mode, "ro" if mount.readonly else "rw"]))
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
        for m in _kernel_mounts(sc.privileged)
        if m["destination"] not in bound and not ("/dev" in bound and m["destination"].startswith("/dev/"))
    ]
    return sorted([*defaults, *binds], key=lambda m: _depth(m["destination"])), propagation


# ---------------------------------------------------------------- devices


def _device_rule(kind: str, major: int | None, minor: int | None, access: str) -> dict[str, Any]:
    rule: dict[str, Any] = {"allow": True, "type": kind}
    if major is not None:
        rule["major"] = major
    if minor is not None:
        rule["minor"] = minor
    rule["access"] = access
    return rule


def _default_device_rules() -> list[dict[str, Any]]:
    standard = (_device_rule(kind, major, minor, "rwm") for kind, major, minor in _STANDARD_DEVICES)
    return [{"allow": False, "access": "rwm"}, *standard]


def _device(path: str, container_path: str) -> dict[str, Any] | None:
    st = os.lstat(path)
    if stat.S_ISCHR(st.st_mode):
        kind = "c"
    elif stat.S_ISBLK(st.st_mode):
        kind = "b"
    else:
        return None
    return {
        "path": container_path,
        "type": kind,
        "major": os.major(st.st_rdev),
        "minor": os.minor(st.st_rdev),
        "fileMode": stat.S_IMODE(st.st_mode),
        "uid": st.st_uid,
        "gid": st.st_gid,
    }


def _devices_under(directory: str, container_dir: str) -> list[dict[str, Any]]:
    """Every device below `directory`, as seen at `container_dir`; subdirectories are walked, links are not."""
    found = []
    for entry in sorted(os.scandir(directory), key=lambda e: e.name):
        target = posixpath.join(container_dir, entry.name)
        if entry.is_dir(follow_symlinks=False):
            if entry.name not in _SKIPPED_DEV_DIRS:
                found += _devices_under(entry.path, target)
        elif entry.name != "console":
            try:
                device = _device(entry.path, target)
            except (FileNotFoundError, PermissionError):
                continue  # vanished or unreadable while we walked
            if device is not None:
                found.append(device)
    return found


def _container_devices(config: pb.ContainerConfig, host: HostInfo) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """`linux.devices` and the device cgroup rules: deny all, the standard set, then what was asked for.

    A privileged container sees every host device and may use any device.
    """
    devices: dict[str, dict[str, Any]] = {}
    rules = _default_device_rules()
    for request in config.devices:
        if not request.container_path.startswith("/") or not request.host_path.startswith("/"):
            raise InvalidArgument(f"device paths must be absolute: {request.host_path!r} -> {request.container_path!r}")
        access = request.permissions or "rwm"
        if not set(access) <= set("rwm"):
            raise InvalidArgument(f"device permissions {access!r} must combine r, w and m")
        source = os.path.realpath(request.host_path)
        if not os.path.exists(source):
            raise NotFound(f"device {request.host_path} does not exist on the host")
        if os.path.isdir(source):
            found = _devices_under(source, request.container_path)
        else:
            device = _device(source, request.container_path)
            if device is None:
                raise InvalidArgument(f"{request.host_path} is not a device")
            found = [device]
        for device in found:
            devices.setdefault(device["path"], device)
            rules.append(_device_rule(device["type"], device["major"], device["minor"], access))
    if config.linux.security_context.privileged:
        for device in _devices_under(str(host.dev_dir), "/dev"):
            devices.setdefault(device["path"], device)
        rules = [{"allow": True, "access": "rwm"}]
    return list(devices.values()), rules


# ---------------------------------------------------------------- resources


def _resources(linux: pb.LinuxContainerConfig, host: HostInfo) -> dict[str, Any]:
    """CPU, memory and hugepage limits; swap equals the memory limit unless set (no swapping by default)."""
    if not linux.HasField("resources"):
        return {}
    r = linux.resources
    if r.cpu_period < 0 or r.cpu_shares < 0:
        raise InvalidArgument("cpu period and shares cannot be negative")
    cpu: dict[str, Any] = {}
    for key, value in (
        ("shares", r.cpu_shares),
        ("quota", r.cpu_quota),
        ("period", r.cpu_period),
        ("cpus", r.cpuset_cpus),
        ("mems", r.cpuset_mems),
    ):
        if value:
            cpu[key] = value
    memory: dict[str, Any] = {}
    if r.memory_limit_in_bytes:
        memory["limit"] = r.memory_limit_in_bytes
    swap = r.memory_swap_limit_in_bytes or r.memory_limit_in_bytes
    if swap and host.swap_accounting:
        memory["swap"] = swap
    out: dict[str, Any] = {}
    if cpu:
        out["cpu"] = cpu
    if memory:
        out["memory"] = memory
    if r.hugepage_limits and host.hugetlb:  # kubelet sends limits for every page size; no controller, no limits
        out["hugepageLimits"] = [{"pageSize": h.page_size, "limit": h.limit} for h in r.hugepage_limits]
    if r.unified and host.cgroup_mode == "v2":  # runc refuses v2 keys on a v1 or hybrid host
        out["unified"] = dict(sorted(r.unified.items()))
    return out


def linux_resources(resources: pb.LinuxContainerResources, host: HostInfo | None = None) -> dict[str, Any]:
    """The OCI `linux.resources` for UpdateContainerResources, by the same rules as at creation."""
    return _resources(pb.LinuxContainerConfig(resources=resources), host or detect_host())
