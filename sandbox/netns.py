"""Persistent network namespaces for pods, like `ip netns` but under Tandem's own runtime dir.

A pod's netns must outlive every process in it (CNI DEL runs after the pod's
processes have exited, a VM may be restarted into it), so it is pinned by a
bind mount of the nsfs file onto `root/<name>`. The namespace is created by
`unshare --net=FILE` in a child program, never by moving a thread of the
asyncio process into it.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
from pathlib import Path

from core import mounts, proc
from core.errors import AlreadyExists, CommandFailed, InvalidArgument

# ioctl(2) on an nsfs file: which kind of namespace it is (linux/nsfs.h).
_NS_GET_NSTYPE = 0xB703
_CLONE_NEWNET = 0x40000000


def _prepare_root(root: Path) -> None:
    """Make `root` a private mount of its own, so netns mounts neither leak into nor arrive from other namespaces."""
    root.mkdir(mode=0o755, parents=True, exist_ok=True)
    mounts.make_private(root)


def exists(path: Path) -> bool:
    """Whether a network namespace is mounted at `path` (a leftover plain file is not one)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        return fcntl.ioctl(fd, _NS_GET_NSTYPE) == _CLONE_NEWNET
    except OSError:
        return False
    finally:
        os.close(fd)


async def reserve(root: Path, name: str) -> Path:
    """The path of a new namespace called `name` under `root` (a private mount), with a file to pin it on."""
    if not name or "/" in name or name in (".", ".."):
        raise InvalidArgument(f"invalid netns name {name!r}")
    await asyncio.to_thread(_prepare_root, root)
    path = root / name
    if exists(path):
        raise AlreadyExists(f"network namespace {path} exists already")
    # namespaces are bind-mounted onto an existing file only; a stale plain file from a crash is reused.
    os.close(os.open(path, os.O_CREAT | os.O_RDONLY | os.O_CLOEXEC, 0o444))
    return path


async def create_at(path: Path) -> None:
    """A new network namespace with `lo` up, owned by the host's user namespace, pinned at `path` (from `reserve`)."""
    try:
        await proc.run(["unshare", f"--net={path}", "ip", "link", "set", "lo", "up"])
    except BaseException:
        await remove(path)
        raise


async def create(root: Path, name: str) -> Path:
    """A new network namespace with `lo` up, pinned at `root/name`."""
    path = await reserve(root, name)
    await create_at(path)
    return path


async def remove(path: Path) -> None:
    """Unpin and delete a netns file; nothing happens if it is gone already.

    The namespace itself lives on until the last process in it exits.
    """
    if exists(path):
        # --lazy, as `ip netns delete` does: a busy mount must not keep the pod from going away.
        done = await proc.run(["umount", "--lazy", str(path)], check=False)
        if done.returncode != 0 and exists(path):  # a concurrent remove() may have won the race
            raise CommandFailed(done.argv, done.returncode, done.stderr.decode(errors="replace"))
    path.unlink(missing_ok=True)
