"""Mounts: the one mountinfo parser, mount(2)/umount2(2) without the mount program, make-private,
and ID-mapped binds (open_tree, mount_setattr, move_mount).

Everything that asks "what is mounted where" reads /proc/self/mountinfo through
`mountinfo()`; everything that mounts or unmounts directly calls `sys_mount` or
`sys_umount`. A call into the mount program still goes through `core.proc`.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import re
import threading
from pathlib import Path
from typing import NamedTuple

log = logging.getLogger("tandem.mounts")

MOUNTINFO = Path("/proc/self/mountinfo")

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 32, 4096, 16384, 1 << 18
MNT_DETACH = 2

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = (ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p)
_libc.umount2.argtypes = (ctypes.c_char_p, ctypes.c_int)
_libc.syscall.restype = ctypes.c_long

# The new mount API (linux/mount.h); one syscall number on every architecture since 5.x.
_SYS_OPEN_TREE, _SYS_MOVE_MOUNT, _SYS_MOUNT_SETATTR = 428, 429, 442
_AT_FDCWD = -100
_AT_EMPTY_PATH, _AT_RECURSIVE = 0x1000, 0x8000
_OPEN_TREE_CLONE = 1
_MOVE_MOUNT_F_EMPTY_PATH = 4
_MOUNT_ATTR_IDMAP = 0x00100000
_private_lock = threading.Lock()


class Mount(NamedTuple):
    """One line of mountinfo (proc(5)), with its octal escapes undone."""

    mount_point: str
    fstype: str
    optional: tuple[str, ...]  # shared:N, master:N, propagate_from:N, unbindable
    root: str = "/"  # the directory of the source filesystem that is mounted here
    source: str = ""
    super_options: str = ""  # the filesystem's options: a cgroup v1 hierarchy's controllers are named here


def _unescape(field: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as octal (`\\040`)."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def mountinfo(text: str | None = None) -> list[Mount]:
    """This process's mounts from /proc/self/mountinfo (or the given text), in mount order."""
    if text is None:
        text = MOUNTINFO.read_text()
    entries = []
    for line in text.splitlines():
        fields = line.split()
        if "-" not in fields[6:]:
            continue
        sep = fields.index("-", 6)
        if len(fields) <= sep + 1:
            continue
        source = _unescape(fields[sep + 2]) if len(fields) > sep + 2 else ""
        options = fields[sep + 3] if len(fields) > sep + 3 else ""
        optional = tuple(fields[6:sep])
        entries.append(Mount(_unescape(fields[4]), fields[sep + 1], optional, _unescape(fields[3]), source, options))
    return entries


def top_mount(mount_point: str | os.PathLike[str], text: str | None = None) -> Mount | None:
    """The mount on top at exactly `mount_point` (a real path, as mountinfo spells it), None if it is no mount point."""
    point = os.fspath(mount_point)
    found = None
    for mount in mountinfo(text):
        if mount.mount_point == point:
            found = mount
    return found


def is_mounted(target: str | os.PathLike[str]) -> bool:
    """Whether something is mounted exactly at `target` (symlinks in it resolved)."""
    return top_mount(os.path.realpath(target)) is not None


def mount_holding(path: str, text: str | None = None) -> Mount | None:
    """The mount whose tree holds `path` (the deepest, latest mount point that is `path` or above it)."""
    best: Mount | None = None
    for mount in mountinfo(text):
        point = mount.mount_point
        holds = path == point or path.startswith(point.rstrip("/") + "/")
        if holds and (best is None or len(point) >= len(best.mount_point)):
            best = mount
    return best


def mounts_below(directory: str | os.PathLike[str]) -> list[str]:
    """Every mount point strictly below `directory`, deepest first (the order to unmount them in)."""
    prefix = os.fspath(directory).rstrip("/") + "/"
    points = {m.mount_point for m in mountinfo() if m.mount_point.startswith(prefix)}
    return sorted(points, key=len, reverse=True)


def _b(value: str | os.PathLike[str] | None) -> bytes | None:
    return None if value is None else os.fsencode(value)


def sys_mount(
    source: str | os.PathLike[str] | None,
    target: str | os.PathLike[str],
    fstype: str | None,
    flags: int = 0,
    data: str | None = None,
) -> None:
    """mount(2), without running the mount program; OSError on failure."""
    if _libc.mount(_b(source), _b(target), _b(fstype), flags, _b(data)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {fstype or ''} on {os.fspath(target)}: {os.strerror(err)}")


def sys_umount(target: str | os.PathLike[str], flags: int = 0) -> None:
    """umount2(2); not mounted (EINVAL) and absent (ENOENT) are success."""
    if _libc.umount2(_b(target), flags) != 0:
        err = ctypes.get_errno()
        if err not in (errno.EINVAL, errno.ENOENT):
            raise OSError(err, f"umount {os.fspath(target)}: {os.strerror(err)}")


def unmount(target: str | os.PathLike[str]) -> None:
    """Unmount `target`; not mounted is success, and a busy mount is detached lazily instead."""
    try:
        sys_umount(target)
    except OSError as e:
        if not is_mounted(target):
            return
        log.warning("mount busy, detaching lazily", extra={"target": os.fspath(target), "error": str(e)})
        sys_umount(target, MNT_DETACH)


class _MountAttr(ctypes.Structure):
    _fields_ = (
        ("attr_set", ctypes.c_uint64),
        ("attr_clr", ctypes.c_uint64),
        ("propagation", ctypes.c_uint64),
        ("userns_fd", ctypes.c_uint64),
    )


def _syscall(what: str, number: int, *args: object) -> int:
    result = _libc.syscall(number, *args)
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return int(result)


def bind_idmapped(
    source: str | os.PathLike[str], target: str | os.PathLike[str], userns: str | os.PathLike[str]
) -> None:
    """Bind `source` and every mount below it onto `target`, ID-mapped by the user namespace file `userns`.

    Through the new mount an owner ID on disk appears mapped as that namespace
    maps it (on-disk 0 is the namespace's root), so a container in it owns what
    the host's root owns there, without a chown. The tree is cloned, mapped
    while still detached and only then attached: nothing unmapped is ever
    visible at `target`. Needs Linux 5.12 and a filesystem that allows ID-mapped
    mounts (ext4, xfs, btrfs since 5.12, overlayfs layers since 5.19, tmpfs
    since 6.3): OSError (EINVAL) otherwise.
    """
    tree = _syscall(
        f"open_tree {os.fspath(source)}",
        _SYS_OPEN_TREE,
        _AT_FDCWD,
        _b(source),
        _OPEN_TREE_CLONE | os.O_CLOEXEC | _AT_RECURSIVE,
    )
    try:
        ns = os.open(userns, os.O_RDONLY | os.O_CLOEXEC)
        try:
            attr = _MountAttr(attr_set=_MOUNT_ATTR_IDMAP, userns_fd=ns)
            _syscall(
                f"ID-mapping {os.fspath(source)}",
                _SYS_MOUNT_SETATTR,
                tree,
                b"",
                _AT_EMPTY_PATH | _AT_RECURSIVE,
                ctypes.byref(attr),
                ctypes.c_size_t(ctypes.sizeof(attr)),
            )
        finally:
            os.close(ns)
        _syscall(
            f"move_mount onto {os.fspath(target)}",
            _SYS_MOVE_MOUNT,
            tree,
            b"",
            _AT_FDCWD,
            _b(target),
            _MOVE_MOUNT_F_EMPTY_PATH,
        )
    finally:
        os.close(tree)


def make_private(root: str | os.PathLike[str]) -> None:
    """Make `root` a private mount of its own (binding it onto itself first if it is no mount point).

    Mounts made below it then neither propagate to other mount namespaces nor
    arrive from them. Blocking and quick; safe from several threads at once.
    """
    with _private_lock:
        mount_point = os.path.realpath(root)
        top = top_mount(mount_point)
        if top is None:
            sys_mount(mount_point, mount_point, None, MS_BIND)
            top = top_mount(mount_point)
        if top is None or any(f.startswith(("shared:", "master:")) for f in top.optional):
            sys_mount(None, mount_point, None, MS_PRIVATE)
