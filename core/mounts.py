"""Mounts: the one mountinfo parser, and mount(2)/umount2(2) without running the mount program."""

from __future__ import annotations

import ctypes
import errno
import os
import re
from pathlib import Path
from typing import NamedTuple

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 32, 4096, 16384, 1 << 18
MNT_DETACH = 2

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = (ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p)
_libc.umount2.argtypes = (ctypes.c_char_p, ctypes.c_int)


def _b(value: str | os.PathLike[str] | None) -> bytes | None:
    return None if value is None else os.fsencode(value)


def sys_mount(source: str | None, target: str | os.PathLike[str], fstype: str | None, flags: int = 0,
              data: str | None = None) -> None:  # fmt: skip
    """mount(2), without running the mount program; OSError on failure."""
    if _libc.mount(_b(source), _b(target), _b(fstype), flags, _b(data)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {fstype or ''} on {target}: {os.strerror(err)}")


def sys_umount(target: str | os.PathLike[str], flags: int = 0) -> None:
    """umount2(2); not mounted (EINVAL) and absent (ENOENT) are success."""
    if _libc.umount2(_b(target), flags) != 0:
        err = ctypes.get_errno()
        if err not in (errno.EINVAL, errno.ENOENT):
            raise OSError(err, f"umount {target}: {os.strerror(err)}")


class MountEntry(NamedTuple):
    mount_point: str
    fstype: str
    super_options: str = ""  # the filesystem's options: a cgroup v1 hierarchy's controllers are named here


def unescape(field: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as octal (`\\040`)."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def mounts(mountinfo: str | None = None) -> list[MountEntry]:
    """This process's mounts from /proc/self/mountinfo (or the given text), in mount order."""
    if mountinfo is None:
        mountinfo = Path("/proc/self/mountinfo").read_text()
    entries = []
    for line in mountinfo.splitlines():
        fields = line.split()
        if "-" not in fields[6:]:
            continue
        sep = fields.index("-", 6)
        if len(fields) > sep + 1:
            options = fields[sep + 3] if len(fields) > sep + 3 else ""
            entries.append(MountEntry(unescape(fields[4]), fields[sep + 1], options))
    return entries


def is_mounted(target: Path) -> bool:
    """Whether something is mounted exactly at `target`."""
    path = os.path.realpath(target)
    return any(m.mount_point == path for m in mounts())
