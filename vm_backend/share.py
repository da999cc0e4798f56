"""A VM pod's share: what virtio-fs exports into its VM, in a mount namespace of the pod's own.

The guest writes the share whenever it likes (a privileged container can mount it), so
the host never derives a host path from it: the share lives in a mount namespace that
holds nothing of the host (`vm_backend/sharens.py` builds it; pinned as `share.ns` in
the pod's run dir), virtiofsd serves it from inside that namespace, and each
container's trees are cloned on the host (`open_tree`: the overlay rootfs, mounted at a
host-only path, and the host path of each CRI mount), made private (read-only on top,
or all the way down for `recursive_read_only`), and attached inside the namespace by
descriptor, beneath the share only. Each attached mount is recorded as its mount ID
and its root's device and inode; RemoveContainer detaches exactly those. Nothing of
this is mounted in the host's namespace, so host paths stay removable while the
container runs, and unpinning the namespace at pod removal takes every mount in it along.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from core import mounts, proc
from core.errors import FailedPrecondition, Internal, ResourceExhausted

log = logging.getLogger("tandem.vm.share")

NS_FILE = "share.ns"  # in the pod's run dir
HELPER = "vm_backend.sharens"
_REFUSED, _FULL = 3, 4  # sharens' exit statuses
_TREE_ATTRIBUTES = mounts.MOUNT_ATTR_NOSUID | mounts.MOUNT_ATTR_NODEV | mounts.MOUNT_ATTR_NOEXEC


@dataclass(frozen=True)
class ShareMount:
    """A CRI mount as the share carries it: a host path, read-only on top, or all the way down."""

    source: str
    readonly: bool = False
    recursive_readonly: bool = False


@dataclass(frozen=True)
class Attached:
    """One mount attached beneath the share: its mount ID, and its root's device and inode (what it is)."""

    mount_id: int
    dev: int
    ino: int

    def to_list(self) -> list[int]:
        return [self.mount_id, self.dev, self.ino]

    @classmethod
    def from_list(cls, value: object) -> Attached | None:
        if isinstance(value, list) and len(value) == 3 and all(type(v) is int and v >= 0 for v in value):
            return cls(value[0], value[1], value[2])
        return None


def rootfs_path(container_id: str) -> str:
    """Where the container's rootfs is attached, relative to the share (the agent's CreateContainer.rootfs)."""
    return f"{container_id}/rootfs"


def mount_path(container_id: str, index: int) -> str:
    """Where the host path of the container's `index`-th CRI mount is attached, relative to the share."""
    return f"{container_id}/mounts/{index}"


def _clone(path: str | os.PathLike[str], recursive: bool, readonly: bool, recursive_readonly: bool) -> int:
    """A detached, private copy of the mount tree at `path`: nosuid, nodev, noexec for the host, maybe read-only."""
    tree = mounts.clone_tree(path, recursive)
    try:
        mounts.set_tree_attributes(tree, recursive=True, attr_set=_TREE_ATTRIBUTES, propagation=mounts.MS_PRIVATE)
        if readonly or recursive_readonly:
            mounts.set_tree_attributes(tree, recursive=recursive_readonly, attr_set=mounts.MOUNT_ATTR_RDONLY)
    except BaseException:
        os.close(tree)
        raise
    return tree


def clone_trees(rootfs: Path, share_mounts: list[ShareMount]) -> list[int]:
    """The detached trees of one container: its rootfs (the overlay alone), then each CRI mount's host path."""
    if not mounts.is_mounted(rootfs):
        raise FailedPrecondition(f"the container's rootfs is not mounted at {rootfs}")
    trees: list[int] = []
    try:
        trees.append(_clone(rootfs, False, False, False))
        for mount in share_mounts:
            trees.append(_clone(mount.source, True, mount.readonly, mount.recursive_readonly))
    except OSError as e:
        for tree in trees:
            os.close(tree)
        raise FailedPrecondition(f"cannot clone a mount for the pod's share: {e}") from e
    except BaseException:
        for tree in trees:
            os.close(tree)
        raise
    return trees


class PodShare:
    """One pod's share namespace, pinned at `<run_dir>/share.ns`."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.ns_file = run_dir / NS_FILE

    def pinned(self) -> bool:
        """Whether the namespace is pinned (an nsfs mount, not the empty placeholder)."""
        try:
            return os.stat(self.ns_file).st_dev != os.stat(self.run_dir).st_dev
        except FileNotFoundError:
            return False

    async def _helper(self, command: str, *args: str, pass_fds: tuple[int, ...] = ()) -> str:
        argv = [sys.executable, "-m", HELPER, command, str(self.ns_file), *args]
        done = await proc.run(argv, pass_fds=pass_fds, check=False)
        if done.returncode == 0:
            return done.stdout.decode()
        why = done.stderr.decode(errors="replace").strip().removeprefix("tandem-sharens: ")[:500]
        if done.returncode == _REFUSED:
            raise FailedPrecondition(f"the pod's share was tampered with: {why}")
        if done.returncode == _FULL:
            raise ResourceExhausted(f"the pod's share is full: {why}")
        raise Internal(f"share helper {command} failed ({done.returncode}): {why}")

    async def create(self) -> None:
        """Build and pin the namespace; pinned already is success."""
        if not self.pinned():
            await self._helper("create")

    async def attach(self, container_id: str, rootfs: Path, share_mounts: list[ShareMount]) -> list[Attached]:
        """Attach a container's rootfs and its CRI mounts beneath the share; all or nothing."""
        paths = [rootfs_path(container_id)] + [mount_path(container_id, i) for i in range(len(share_mounts))]
        trees = await asyncio.to_thread(clone_trees, rootfs, share_mounts)
        try:
            out = await self._helper(
                "attach", *(f"{tree}:{path}" for tree, path in zip(trees, paths, strict=True)), pass_fds=tuple(trees)
            )
        finally:
            for tree in trees:  # attached trees live on in the namespace; the others go
                os.close(tree)
        try:
            records = [Attached.from_list([r["mount_id"], r["dev"], r["ino"]]) for r in json.loads(out)]
        except (ValueError, KeyError, TypeError) as e:
            raise Internal(f"share helper attach answered {out[:200]!r}") from e
        if len(records) != len(paths) or any(r is None for r in records):
            raise Internal(f"share helper attach answered {out[:200]!r}")
        return [r for r in records if r is not None]

    async def detach(self, container_id: str, attached: list[Attached]) -> None:
        """Detach what `attach` recorded and remove the container's directory from the share.

        A mount the guest moved out of reach stays until the namespace ends.
        """
        if not self.pinned():
            return
        out = await self._helper("detach", container_id, *(":".join(map(str, a.to_list())) for a in attached))
        with contextlib.suppress(ValueError):
            results = json.loads(out)
            if any(r == "unreachable" for r in results):
                log.warning("pod share %s: mounts left for the pod's removal: %s", self.ns_file, results)

    def unpin(self) -> None:
        """Let the namespace go (every mount in it goes along once virtiofsd is gone) and remove the file."""
        mounts.sys_umount(self.ns_file, mounts.MNT_DETACH | mounts.UMOUNT_NOFOLLOW)
        with contextlib.suppress(FileNotFoundError):
            self.ns_file.unlink()
