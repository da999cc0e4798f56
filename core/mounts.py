"""Mounts: the one mountinfo parser, mount(2)/umount2(2) without the mount program, and make-private.

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
_libc.statx.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_uint, ctypes.c_void_p)
AT_FDCWD = -100
STATX_ATTR_MOUNT_ROOT = 0x2000
_STATX_SIZE = 256
_STATX_ATTRIBUTES, _STATX_ATTRIBUTES_MASK = 8, 56  # offsets of stx_attributes and stx_attributes_mask
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
    if "\\" not in field:
        return field
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
    """Whether something is mounted exactly at `target` (symlinks in it resolved).

    Asked of statx(2) (STATX_ATTR_MOUNT_ROOT, Linux 5.8): one system call, where reading mountinfo
    costs as much as the host has mounts (five per pod on a busy node); mountinfo where the kernel
    cannot tell.
    """
    buffer = ctypes.create_string_buffer(_STATX_SIZE)
    if _libc.statx(AT_FDCWD, os.fsencode(target), 0, 0, buffer) != 0:
        if ctypes.get_errno() in (errno.ENOENT, errno.ENOTDIR):
            return False
        return top_mount(os.path.realpath(target)) is not None
    attributes, known = (
        int.from_bytes(buffer.raw[o : o + 8], "little") for o in (_STATX_ATTRIBUTES, _STATX_ATTRIBUTES_MASK)
    )
    if not known & STATX_ATTR_MOUNT_ROOT:
        return top_mount(os.path.realpath(target)) is not None
    return bool(attributes & STATX_ATTR_MOUNT_ROOT)


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
