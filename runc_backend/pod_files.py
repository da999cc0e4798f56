"""A trusted pod's own files on the host: its hostname, resolv.conf and hosts, and its /dev/shm.

They live in the pod's directory and are bound into every container of the pod (`sandbox.oci.mounts`);
in a pod with a user namespace the pod's root owns them, as it would through containerd's ID-mapped binds.
"""

from __future__ import annotations

import os
from pathlib import Path

from core import mounts
from core.errors import FailedPrecondition
from core.files import atomic_write_bytes
from protos import cri_pb2 as pb
from runc_backend.host import detect_host
from sandbox import podfiles
from sandbox.model import SandboxRecord
from sandbox.oci.platform import PodFiles

SHM_SIZE = 64 * 2**20  # a pod's /dev/shm, as kubelet and containerd size it


def paths(pod_dir: Path, sandbox: SandboxRecord) -> PodFiles:
    """Where the pod's files are (a pod in the host's IPC namespace has no /dev/shm of its own)."""
    host_ipc = sandbox.config.linux.security_context.namespace_options.ipc == pb.NODE
    return PodFiles(
        hostname=pod_dir / "hostname",
        resolv_conf=pod_dir / "resolv.conf",
        hosts=pod_dir / "hosts",
        shm=None if host_ipc else pod_dir / "shm",
    )


async def write(pod_dir: Path, sandbox: SandboxRecord, owner: tuple[int, int]) -> PodFiles:
    """Write the files (again: a retried start rewrites them) and mount /dev/shm, owned by `owner`."""
    config = sandbox.config
    os.chmod(pod_dir, 0o755)
    hostname = detect_host().hostname if sandbox.host_network else podfiles.hostname(config)
    files = paths(pod_dir, sandbox)
    atomic_write_bytes(files.hostname, f"{hostname}\n".encode(), mode=0o644, durable=False)
    atomic_write_bytes(files.resolv_conf, podfiles.resolv_conf(config.dns_config), mode=0o644, durable=False)
    hosts = Path("/etc/hosts").read_bytes() if sandbox.host_network else podfiles.hosts(hostname, sandbox.ips)
    atomic_write_bytes(files.hosts, hosts, mode=0o644, durable=False)
    for file in (files.hostname, files.resolv_conf, files.hosts):
        os.chown(file, *owner)
    if files.shm is not None and not mounts.is_mounted(files.shm):
        files.shm.mkdir(exist_ok=True)
        _mount_shm(files.shm, owner)
    return files


def _mount_shm(target: Path, owner: tuple[int, int]) -> None:
    options = f"mode=1777,size={SHM_SIZE},uid={owner[0]},gid={owner[1]}"
    flags = mounts.MS_NOSUID | mounts.MS_NODEV | mounts.MS_NOEXEC
    try:
        mounts.sys_mount("shm", target, "tmpfs", flags, options)
    except OSError as e:
        raise FailedPrecondition(f"cannot mount the pod's /dev/shm: {e}") from e
