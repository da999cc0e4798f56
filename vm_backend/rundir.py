"""A pod VM's run dir: a size-limited tmpfs of its own, with another one for the VMM's files inside.

Everything QEMU, virtiofsd and the guest can make grow lands in the run dir (the
console log, QEMU's and virtiofsd's output) and the guest can write as much as it
likes: as tmpfs mounts of their own they fill up without touching `/run` or any other
pod, and their pages are charged to whoever wrote them (QEMU and virtiofsd: the VM's
cgroup). The VMM's directory (`vmm/`: the console log and QEMU's sockets) is a second
tmpfs inside, so a guest printing without end fills its console log and nothing
else: the host's own files of the pod (pidfiles, process specs, the pinned share
namespace, the mount points of the containers' roots) stay writable.

Sizes (usage measured here: ~30 KiB of console, <10 KiB of QEMU's and virtiofsd's logs
and a few KiB per container's process spec for a pod's whole life):
- the run dir, 16 MiB and 4096 inodes: the host writes a process spec per container
  (argv and environment are capped at 2 MiB by CRI validation, typical ones are a few
  KiB) and QEMU's and virtiofsd's error output goes here; tmpfs takes no memory it
  does not use.
- `vmm/`, 4 MiB and 64 inodes: the boot log is ~30 KiB, and a console that outgrows
  the rest simply stops being logged (QEMU drops log writes that fail).
Mount points below the run dir are private (its parent is a private mount), so nothing
mounted here reaches another mount namespace.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from core import mounts
from core.errors import FailedPrecondition
from core.files import private_dir

log = logging.getLogger("tandem.vm")

RUN_DIR_OPTIONS = "mode=0700,size=16m,nr_inodes=4096"
VMM_DIR_OPTIONS = "mode=0700,size=4m,nr_inodes=64"
_FLAGS = mounts.MS_NOSUID | mounts.MS_NODEV | mounts.MS_NOEXEC


def _mount_tmpfs(path: Path, source: str, options: str) -> None:
    private_dir(path)
    if not mounts.is_mounted(path):
        mounts.sys_mount(source, path, "tmpfs", _FLAGS, options)


def make_run_dir(run_dir: Path, vmm_dir: Path) -> None:
    """Mount the run dir's tmpfs (and `vmm_dir`'s inside it) unless they are mounted already. Blocking, quick."""
    _mount_tmpfs(run_dir, "tandem-vm", RUN_DIR_OPTIONS)
    _mount_tmpfs(vmm_dir, "tandem-vmm", VMM_DIR_OPTIONS)


def remove_run_dir(run_dir: Path) -> None:
    """Detach everything mounted in the run dir and the run dir's own tmpfs, then remove the directory.

    Mounts are found in mountinfo and detached through descriptors opened without following a
    symlink (`mounts.detach_below`); the tree is then removed without following one either.
    A mount that will not go is an error: rmtree would walk into it.
    """
    if not run_dir.is_dir():
        return
    left = mounts.detach_below(run_dir)
    if left:
        raise FailedPrecondition(f"{run_dir} still has mounts inside: {', '.join(left)}")
    mounts.unmount(run_dir)
    if mounts.is_mounted(run_dir):
        raise FailedPrecondition(f"{run_dir} is still mounted")
    shutil.rmtree(run_dir)  # rmtree never follows a symlink: it removes the link
