"""Mounts: the one mountinfo parser, mount(2)/umount2(2) without the mount program, make-private, the
descriptor-based mount API (openat2, open_tree, move_mount, mount_setattr, statx's mount ID) and ID-mapped binds.

Everything that asks "what is mounted where" reads /proc/self/mountinfo through
`mountinfo()`; everything that mounts or unmounts directly calls `sys_mount` or
`sys_umount`. A call into the mount program still goes through `core.proc`.

Where a directory is writable by someone less trusted (a VM pod's share), paths
are not enough: a component can become a symlink between a check and a use. There
the work is done on file descriptors: `open_beneath` opens a path with openat2's
RESOLVE_BENEATH | NO_SYMLINKS | NO_MAGICLINKS | NO_XDEV (it fails rather than leave
the directory, follow a link or cross a mount), `clone_tree` takes a detached copy
of a mount tree, `set_tree_attributes` makes it read-only or private, `attach_tree`
mounts it onto an open directory or file, `fd_mount_id` says which mount a
descriptor is on. All need Linux >= 5.12 (Debian 12 has 6.1).
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
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE, MS_SLAVE, MS_SHARED = 32, 4096, 16384, 1 << 18, 1 << 19, 1 << 20
MNT_DETACH, UMOUNT_NOFOLLOW = 2, 8

# openat2(2)'s resolve flags
RESOLVE_NO_XDEV, RESOLVE_NO_MAGICLINKS, RESOLVE_NO_SYMLINKS, RESOLVE_BENEATH, RESOLVE_IN_ROOT = 1, 2, 4, 8, 16
RESOLVE_STRICTLY_BENEATH = RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS | RESOLVE_NO_XDEV
AT_FDCWD, AT_SYMLINK_NOFOLLOW, AT_EMPTY_PATH, AT_RECURSIVE = -100, 0x100, 0x1000, 0x8000
OPEN_TREE_CLONE = 1
MOVE_MOUNT_F_EMPTY_PATH, MOVE_MOUNT_T_EMPTY_PATH = 0x04, 0x40
MOUNT_ATTR_RDONLY, MOUNT_ATTR_NOSUID, MOUNT_ATTR_NODEV, MOUNT_ATTR_NOEXEC = 0x1, 0x2, 0x4, 0x8
MOUNT_ATTR_IDMAP = 0x00100000
_STATX_MNT_ID = 0x1000
_SYS_STATX, _SYS_OPEN_TREE, _SYS_MOVE_MOUNT, _SYS_OPENAT2, _SYS_MOUNT_SETATTR = 332, 428, 429, 437, 442  # x86_64

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = (ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p)
_libc.umount2.argtypes = (ctypes.c_char_p, ctypes.c_int)
_libc.syscall.restype = ctypes.c_long
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
    mount_id: int = 0  # unique among the mounts that exist now (an ID is reused once its mount is gone)
    parent_id: int = 0  # the mount this one is mounted on
    options: str = ""  # the mount's own options (ro or rw, nosuid, ...)


def _unescape(field: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as octal (`\\040`)."""
    if "\\" not in field:
        return field
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def mountinfo(text: str | None = None) -> list[Mount]:
    """This process's mounts from /proc/self/mountinfo (or the given text), in mount order.

    A VM guest names the directories of its share (and so mount points in the share's namespace) as it
    likes: the table is decoded as file names are (bytes that are no UTF-8 survive) and split only where
    the kernel separates, on newlines and single spaces (it escapes those in names; not what Python
    also counts as line ends or whitespace).
    """
    if text is None:
        text = os.fsdecode(MOUNTINFO.read_bytes())
    entries = []
    for line in text.split("\n"):
        fields = line.split(" ")
        if "-" not in fields[6:]:
            continue
        sep = fields.index("-", 6)
        if len(fields) <= sep + 1 or not fields[sep + 1]:
            continue
        source = _unescape(fields[sep + 2]) if len(fields) > sep + 2 else ""
        options = fields[sep + 3] if len(fields) > sep + 3 else ""
        optional = tuple(fields[6:sep])
        if not (fields[0].isdigit() and fields[1].isdigit()):
            continue
        entries.append(
            Mount(
                _unescape(fields[4]),
                fields[sep + 1],
                optional,
                _unescape(fields[3]),
                source,
                options,
                int(fields[0]),
                int(fields[1]),
                fields[5],
            )
        )
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
    """Unmount `target`; not mounted is success, and a busy mount is detached lazily instead.

    A symlink as the last component is never followed (UMOUNT_NOFOLLOW): it is "not mounted".
    """
    try:
        sys_umount(target, UMOUNT_NOFOLLOW)
    except OSError as e:
        if not is_mounted(target):
            return
        log.warning("mount busy, detaching lazily", extra={"target": os.fspath(target), "error": str(e)})
        sys_umount(target, MNT_DETACH | UMOUNT_NOFOLLOW)


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


# ---- the descriptor-based mount API --------------------------------------------------------


class _OpenHow(ctypes.Structure):
    _fields_ = (("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64))


class _MountAttr(ctypes.Structure):
    _fields_ = (
        ("attr_set", ctypes.c_uint64),
        ("attr_clr", ctypes.c_uint64),
        ("propagation", ctypes.c_uint64),
        ("userns_fd", ctypes.c_uint64),
    )


def _syscall(number: int, what: str, *args: object) -> int:
    result = int(_libc.syscall(number, *args))
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return result


def openat2(dir_fd: int, path: str, flags: int, resolve: int, mode: int = 0) -> int:
    """openat2(2): open `path` relative to `dir_fd` under the `resolve` restrictions; returns the descriptor.

    O_CLOEXEC is always added. ELOOP for a symlink RESOLVE_NO_SYMLINKS forbids, EXDEV for an escape
    (RESOLVE_BENEATH) or a mount crossed (RESOLVE_NO_XDEV).
    """
    how = _OpenHow(flags | os.O_CLOEXEC, mode, resolve)
    return _syscall(
        _SYS_OPENAT2,
        f"openat2 {path!r}",
        ctypes.c_int(dir_fd),
        os.fsencode(path),
        ctypes.byref(how),
        ctypes.c_size_t(ctypes.sizeof(how)),
    )


def open_beneath(dir_fd: int, path: str, flags: int = os.O_PATH, mode: int = 0) -> int:
    """Open `path` strictly beneath `dir_fd`: no `..` out of it, no symlink, no magic link, no mount crossed."""
    return openat2(dir_fd, path, flags, RESOLVE_STRICTLY_BENEATH, mode)


def open_tree(dir_fd: int, path: str, flags: int) -> int:
    """open_tree(2): a descriptor of the mount at `path`; with OPEN_TREE_CLONE a detached copy of it."""
    return _syscall(
        _SYS_OPEN_TREE,
        f"open_tree {path!r}",
        ctypes.c_int(dir_fd),
        os.fsencode(path),
        ctypes.c_uint(flags | os.O_CLOEXEC),
    )


def clone_tree(path: str | os.PathLike[str], recursive: bool) -> int:
    """A detached copy of the mount at `path` (with the mounts below it if `recursive`), as a descriptor.

    Nothing is mounted anywhere until `attach_tree`; closing the descriptor of a tree never attached
    unmounts the copy. A symlink as the last component is not followed. Needs CAP_SYS_ADMIN.
    """
    flags = OPEN_TREE_CLONE | AT_SYMLINK_NOFOLLOW | (AT_RECURSIVE if recursive else 0)
    return open_tree(AT_FDCWD, os.fspath(path), flags)


def move_mount(from_fd: int, from_path: str, to_fd: int, to_path: str, flags: int) -> None:
    """move_mount(2)."""
    _syscall(
        _SYS_MOVE_MOUNT,
        "move_mount",
        ctypes.c_int(from_fd),
        os.fsencode(from_path),
        ctypes.c_int(to_fd),
        os.fsencode(to_path),
        ctypes.c_uint(flags),
    )


def attach_tree(tree_fd: int, target_fd: int) -> None:
    """Mount the tree `tree_fd` (from `clone_tree`) onto the directory or file `target_fd` is open on.

    The target is the very inode the descriptor holds, wherever its name has gone since it was opened.
    """
    move_mount(tree_fd, "", target_fd, "", MOVE_MOUNT_F_EMPTY_PATH | MOVE_MOUNT_T_EMPTY_PATH)


def set_tree_attributes(
    tree_fd: int, *, recursive: bool, attr_set: int = 0, attr_clr: int = 0, propagation: int = 0, userns_fd: int = 0
) -> None:
    """mount_setattr(2) on the mount `tree_fd` is (and every mount below it if `recursive`).

    `attr_set`/`attr_clr` are MOUNT_ATTR_* flags; `propagation` one of MS_PRIVATE, MS_SLAVE, MS_SHARED or 0;
    `userns_fd` the user namespace of MOUNT_ATTR_IDMAP.
    """
    attr = _MountAttr(attr_set, attr_clr, propagation, userns_fd)
    _syscall(
        _SYS_MOUNT_SETATTR,
        "mount_setattr",
        ctypes.c_int(tree_fd),
        b"",
        ctypes.c_uint(AT_EMPTY_PATH | (AT_RECURSIVE if recursive else 0)),
        ctypes.byref(attr),
        ctypes.c_size_t(ctypes.sizeof(attr)),
    )


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
    tree = open_tree(AT_FDCWD, os.fspath(source), OPEN_TREE_CLONE | AT_RECURSIVE)
    try:
        ns = os.open(userns, os.O_RDONLY | os.O_CLOEXEC)
        try:
            set_tree_attributes(tree, recursive=True, attr_set=MOUNT_ATTR_IDMAP, userns_fd=ns)
        finally:
            os.close(ns)
        move_mount(tree, "", AT_FDCWD, os.fspath(target), MOVE_MOUNT_F_EMPTY_PATH)
    finally:
        os.close(tree)


def fd_mount_id(fd: int) -> int:
    """The ID of the mount `fd` is on (mountinfo's first field), from statx(STATX_MNT_ID)."""
    buffer = ctypes.create_string_buffer(256)
    _syscall(
        _SYS_STATX,
        "statx",
        ctypes.c_int(fd),
        b"",
        ctypes.c_int(AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW),
        ctypes.c_uint(_STATX_MNT_ID),
        buffer,
    )
    mask = int.from_bytes(buffer.raw[0:4], "little")
    if not mask & _STATX_MNT_ID:
        raise OSError(errno.ENOSYS, "statx: this kernel reports no mount IDs")
    return int.from_bytes(buffer.raw[144:152], "little")


def open_mount_root(dir_fd: int, path: str) -> int:
    """An O_PATH descriptor of what `path` beneath `dir_fd` names now, crossing onto a mount at its end.

    No `..` out of `dir_fd`, no symlink and no magic link anywhere in `path` (openat2); unlike
    `open_beneath` it may cross mounts, which is how one reaches the root of a mount to detach it.
    """
    return openat2(dir_fd, path, os.O_PATH, RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS)


def detach_open_mount(fd: int) -> None:
    """Lazily detach the mount whose root `fd` is open on, and everything mounted below it.

    umount2 through /proc/self/fd/N: the magic link names exactly that mount, whatever
    its path has become. OSError (EINVAL) if `fd` is not at the root of a mount.
    """
    target = f"/proc/self/fd/{fd}".encode()
    if _libc.umount2(target, MNT_DETACH) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"detaching the mount of descriptor {fd}: {os.strerror(err)}")


def detach_below(directory: str | os.PathLike[str]) -> list[str]:
    """Detach every mount strictly below `directory`, deepest first, without following a symlink on the way.

    Each mount point mountinfo lists is opened beneath `directory` (`open_mount_root`) and
    detached through that descriptor only if it is that very mount (its ID): a path someone
    swapped for a symlink since, or a mount that went away, is skipped. Returns what is still
    mounted below `directory` afterwards (empty when all went).
    """
    root = os.path.realpath(directory)
    prefix = root.rstrip("/") + "/"
    root_fd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        for _ in range(_DETACH_PASSES):  # a mount stacked on another at one point goes first, the one below next
            below = [m for m in reversed(mountinfo()) if m.mount_point.startswith(prefix)]
            detached = [_detach_listed(root_fd, m, prefix) for m in sorted(below, key=_depth, reverse=True)]
            if not any(detached):
                break
    finally:
        os.close(root_fd)
    return mounts_below(root)


_DETACH_PASSES = 4


def _depth(mount: Mount) -> int:
    return mount.mount_point.count("/")


def _detach_listed(root_fd: int, mount: Mount, prefix: str) -> bool:
    """Detach `mount` if its mount point beneath `root_fd` (whose path is `prefix`) is still that very mount."""
    try:
        fd = open_mount_root(root_fd, mount.mount_point[len(prefix) :])
    except OSError:
        return False  # gone with a mount above it, or not reachable without a symlink
    try:
        if fd_mount_id(fd) != mount.mount_id:
            return False
        detach_open_mount(fd)
        return True
    except OSError as e:
        log.warning("cannot detach %s: %s", mount.mount_point, e)
        return False
    finally:
        os.close(fd)
