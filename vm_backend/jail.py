"""A pod VM's jail, on the daemon's side: whose uid it runs as, and the jailer's command line.

QEMU of each pod runs as a uid/gid of its own from `[vm] jail_uid_first` on
(`JailIds`), so two VMMs can neither signal nor ptrace each other, and inside a
mount namespace that holds only what it needs (`vm_backend/jailer.py` builds it).
virtiofsd stays root (its own sandboxing is separate) but joins the VM's cgroup
and the pod's share namespace through the same program (`join_prefix`).
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from core.errors import ResourceExhausted

# RLIMIT_NOFILE of a jailed QEMU. Measured: a pod VM's QEMU holds 26 descriptors (the guest RAM's memfd, the tap,
# eventfds for the virtqueues, the chardev sockets and a client on each); 1024 is the soft limit it would have had
# anyway and leaves room for its sockets' clients, but not for a compromised QEMU to hoard the host's descriptors.
QEMU_NOFILE = 1024
JAILER = "vm_backend.jailer"


@dataclass(frozen=True)
class Jail:
    """Who a VM's QEMU runs as and which cgroup directories its processes join."""

    uid: int
    gid: int
    cgroup_dirs: tuple[Path, ...] = ()

    def _jailer(self) -> list[str]:
        return jailer_argv(self.cgroup_dirs)

    def join_prefix(self, mountns: Path | None = None) -> list[str]:
        """Run a program in the VM's cgroup (and the mount namespace pinned at `mountns`), nothing more."""
        return join_prefix(self.cgroup_dirs, mountns)

    def qemu_prefix(
        self, *, root: Path, netns: Path | None, ro: Iterable[Path], rw: Iterable[Path], devices: Iterable[str]
    ) -> list[str]:
        """Run QEMU jailed: cgroup, netns, a root of only `ro` + `rw` + `devices`, this uid/gid, no privileges."""
        argv = self._jailer()
        if netns is not None:
            argv += ["--netns", str(netns)]
        argv += ["--root", str(root), "--uid", str(self.uid), "--gid", str(self.gid), "--nofile", str(QEMU_NOFILE)]
        for path in ro:
            argv += ["--ro", str(path)]
        for path in rw:
            argv += ["--rw", str(path)]
        for name in devices:
            argv += ["--dev", name]
        return [*argv, "--"]


def jailer_argv(cgroup_dirs: Iterable[Path] = ()) -> list[str]:
    argv = [sys.executable, "-m", JAILER]
    for directory in cgroup_dirs:
        argv += ["--cgroup", str(directory)]
    return argv


def join_prefix(cgroup_dirs: Iterable[Path], mountns: Path | None) -> list[str]:
    """The jailer's command line that only joins `cgroup_dirs` and the mount namespace `mountns`, then execs."""
    argv = jailer_argv(cgroup_dirs)
    if mountns is not None:
        argv += ["--mountns", str(mountns)]
    return [*argv, "--"]


class JailIds:
    """Jail uids, one per pod, from `[first, first + count)`; the gid is the same number.

    A symlink `<directory>/<uid>` -> the pod's ID holds one. symlink() is atomic and
    fails when the name exists, so concurrent starts never share a uid; the links
    live in the runtime dir, which lasts exactly as long as the VMs can (until reboot),
    and a daemon killed with SIGKILL finds them again.
    """

    def __init__(self, directory: Path, first: int, count: int) -> None:
        self.directory = directory
        self.first = first
        self.count = count

    def holders(self) -> dict[int, str]:
        """uid -> the pod holding it."""
        found = {}
        with contextlib.suppress(FileNotFoundError):
            for entry in os.scandir(self.directory):
                if entry.name.isdigit():
                    with contextlib.suppress(OSError):
                        found[int(entry.name)] = os.readlink(entry.path)
        return found

    def allocate(self, owner: str) -> int:
        """A uid for `owner` (the one it holds already, after a retried start)."""
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        held = self.holders()
        for uid, holder in held.items():
            if holder == owner:
                return uid
        for uid in range(self.first, self.first + self.count):
            if uid in held:
                continue
            try:
                os.symlink(owner, self.directory / str(uid))
            except FileExistsError:
                continue  # taken since the listing
            return uid
        raise ResourceExhausted(
            f"all {self.count} jail uids from {self.first} are in use ([vm] jail_uid_first, jail_uid_count)"
        )

    def release(self, owner: str) -> None:
        """Free every uid `owner` holds; holding none is fine."""
        for uid, holder in self.holders().items():
            if holder == owner:
                (self.directory / str(uid)).unlink(missing_ok=True)
