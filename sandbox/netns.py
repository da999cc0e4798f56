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
import re
import weakref
from pathlib import Path

from core import proc
from core.errors import AlreadyExists, CommandFailed, InvalidArgument

# ioctl(2) on an nsfs file: which kind of namespace it is (linux/nsfs.h).
_NS_GET_NSTYPE = 0xB703
_CLONE_NEWNET = 0x40000000

# One lock per event loop: asyncio locks may not be shared between loops, and
# preparing the root twice at once would stack two bind mounts on it.
_root_locks: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Lock] = weakref.WeakKeyDictionary()


def _unescape(field: str) -> str:
    """Undo mountinfo's octal escapes (space, tab, newline, backslash)."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), field)


def _propagation(mount_point: str) -> list[str] | None:
    """Optional fields (shared:N, master:N, ...) of the top mount at `mount_point`, None if it is no mount point."""
    found: list[str] | None = None
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if _unescape(fields[4]) == mount_point:
                found = fields[6 : fields.index("-")]
    return found


def _ensure_dir(root: Path) -> str:
    """Create `root` if needed; its real path, as mountinfo spells it."""
    root.mkdir(mode=0o755, parents=True, exist_ok=True)
    return os.path.realpath(root)


async def _prepare_root(root: Path) -> None:
    """Make `root` a private mount of its own, so netns mounts neither leak into nor arrive from other namespaces."""
    mount_point = _ensure_dir(root)
    lock = _root_locks.setdefault(asyncio.get_running_loop(), asyncio.Lock())
    async with lock:
        fields = _propagation(mount_point)
        if fields is None:
            await proc.run(["mount", "--bind", mount_point, mount_point])
            fields = _propagation(mount_point) or []
        if any(f.startswith(("shared:", "master:")) for f in fields):
            await proc.run(["mount", "--make-private", mount_point])


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


async def create(root: Path, name: str) -> Path:
    """A new network namespace with `lo` up, pinned at `root/name`."""
    if not name or "/" in name or name in (".", ".."):
        raise InvalidArgument(f"invalid netns name {name!r}")
    await _prepare_root(root)
    path = root / name
    if exists(path):
        raise AlreadyExists(f"network namespace {path} exists already")
    # unshare bind-mounts onto an existing file only; a stale plain file from a crash is reused.
    os.close(os.open(path, os.O_CREAT | os.O_RDONLY | os.O_CLOEXEC, 0o444))
    try:
        await proc.run(["unshare", f"--net={path}", "ip", "link", "set", "lo", "up"])
    except BaseException:
        await remove(path)
        raise
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
