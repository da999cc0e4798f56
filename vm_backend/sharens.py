"""The share helper: a VM pod's share namespace, and container trees mounted into it and out of it by descriptor.

    python -m vm_backend.sharens create NSFILE
    python -m vm_backend.sharens attach NSFILE FD:PATH...
    python -m vm_backend.sharens detach NSFILE NAME MOUNT_ID:DEV:INO...

The daemon runs it as root (through `core.proc`, from `vm_backend/share.py`), a program
of its own because joining a mount namespace (setns) needs a single-threaded process.
The guest can write the share at any moment (virtiofsd serves it): every path under
it is walked on descriptors, strictly beneath the share (openat2 RESOLVE_BENEATH |
NO_SYMLINKS | NO_MAGICLINKS | NO_XDEV), so a component swapped for a symlink, a FIFO
or a file fails the walk instead of sending a mount elsewhere.

create: a child unshares a mount namespace, makes every mount in it private and builds
    its root: a read-only tmpfs with /usr bound read-only (virtiofsd runs from there),
    the merged-/usr symlinks, /proc (a read-only procfs: virtiofsd 7.2 reads
    /proc/sys/fs/file-max before it sandboxes itself, and `detach` reads
    /proc/self/mountinfo) and the share, a size- and inode-limited tmpfs mounted shared,
    so that what is attached there reaches virtiofsd's own namespace (a slave of this
    one). The share sits at `<run dir>/share` (the run dir being NSFILE's directory;
    on the host nothing is there), so that virtiofsd's command line names the pod it
    serves. It pivots into that root and detaches the host's tree: no copy of a host
    mount stays. The parent, still in the host's namespace, bind-mounts the child's
    /proc/<pid>/ns/mnt onto NSFILE: that mount alone keeps the namespace alive.
attach: joins the namespace; for each FD:PATH (FD a detached tree from open_tree,
    inherited) creates PATH's missing directories beneath the share with mkdirat, the
    last component as a directory or an empty file (the tree's kind), and
    move_mounts the tree onto that descriptor. Prints a JSON list of each mount's
    ID and its root's device and inode, in order. On a failure nothing it attached stays.
detach: joins the namespace; for each recorded mount finds its current mount point in
    mountinfo; only a mount the share's own mount holds directly counts. Opens that
    point beneath /share (no symlink, no magic link, no escape), checks the mount ID
    and the root's device and inode, and detaches the mount through that descriptor.
    Prints a JSON list of results: detached, gone (no such mount any more), or
    unreachable (the guest moved it out of reach or it is not ours: left for the
    namespace's end, at pod removal). Then removes the container's directory NAME
    and whatever is in it on the share's own filesystem (never crossing into a mount
    or following a link), so the share's inodes go back for the next containers.

Exit status: 0; REFUSED (3) when the share is not what the host made (a symlink, a
file where a directory belongs, a mount in the way); FULL (4) when the share is out of
space or inodes; 1 for anything else. One line on stderr says why.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import stat
import sys
from collections.abc import Sequence

from core.mounts import (
    MS_BIND,
    MS_NODEV,
    MS_NOEXEC,
    MS_NOSUID,
    MS_PRIVATE,
    MS_RDONLY,
    MS_REC,
    MS_REMOUNT,
    MS_SHARED,
    Mount,
    attach_tree,
    detach_open_mount,
    fd_mount_id,
    mountinfo,
    open_beneath,
    open_mount_root,
    sys_mount,
    top_mount,
)
from vm_backend.jailer import USR_LINKS, JailError, bind_same_path, pivot_into

SHARE_DIR = "share"  # in the run dir's path, inside the namespace only: virtiofsd's source
# The namespace's root holds the directories down to the share, /usr, /proc and the /usr symlinks, nothing else.
ROOT_OPTIONS = "mode=0755,size=64k,nr_inodes=128"
# The share holds only what the host makes for each container (`<id>/`, `<id>/rootfs`, `<id>/mounts/`, one
# directory or empty file per CRI mount) and uses no data blocks; everything a container writes lands in its
# own layer or volume, on the trees mounted there. The size bounds what a guest can write into the share
# itself (1 MiB, charged to virtiofsd, in the VM's cgroup), the inodes what it can create: 4096 is room for
# ~200 containers with a dozen mounts each, and bounds the kernel memory (~1 KiB an inode with its dentry).
SHARE_OPTIONS = "mode=0755,size=1m,nr_inodes=4096"
REFUSED, FULL, FAILED = 3, 4, 1
_REFUSALS = (errno.ELOOP, errno.EXDEV, errno.ENOTDIR, errno.EISDIR, errno.ENOENT, errno.EEXIST)
_CLONE_NEWNS = 0x00020000
_NAME_MAX = 255
_MAX_DEPTH = 32  # a directory nested deeper in a removed container's directory stays for the namespace's end

_libc = ctypes.CDLL(None, use_errno=True)


class ShareError(Exception):
    """A step failed; `code` is the exit status that tells the daemon what kind of failure."""

    def __init__(self, message: str, code: int = FAILED) -> None:
        super().__init__(message)
        self.code = code


def _classify(e: OSError, what: str) -> ShareError:
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return ShareError(f"{what}: the share is full ({e.strerror})", FULL)
    if e.errno in _REFUSALS:
        return ShareError(f"{what}: not what the host made there ({e.strerror})", REFUSED)
    return ShareError(f"{what}: {e.strerror or e}")


# ---- create ----------------------------------------------------------------------------------


def share_path(ns_file: str) -> str:
    """Where the share is inside the namespace pinned at `ns_file`."""
    return os.path.join(os.path.dirname(ns_file), SHARE_DIR)


def build_namespace(run_dir: str) -> None:
    """In this (forked, single-threaded) process: a new mount namespace whose root is the share's minimal root."""
    if _libc.unshare(_CLONE_NEWNS) != 0:
        raise ShareError(f"unsharing the mount namespace: {os.strerror(ctypes.get_errno())}")
    root = run_dir  # any directory will do as the new root's mount point: mounted on in this namespace only
    flags = MS_NOSUID | MS_NODEV | MS_NOEXEC
    try:
        sys_mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing done here reaches the host's namespace
        sys_mount("tandem-share-root", root, "tmpfs", flags, ROOT_OPTIONS)
        for name in USR_LINKS:
            host = f"/{name}"
            if os.path.islink(host):
                os.symlink(os.readlink(host), os.path.join(root, name))
            elif name.startswith("lib") and os.path.isdir(host):  # not merged: the loader and libraries live here
                bind_same_path(root, host, MS_RDONLY | MS_NOSUID | MS_NODEV)
        bind_same_path(root, "/usr", MS_RDONLY | MS_NOSUID | MS_NODEV)
        os.mkdir(os.path.join(root, "proc"), 0o555)
        sys_mount("proc", os.path.join(root, "proc"), "proc", flags | MS_RDONLY)
        share = os.path.join(root, run_dir.lstrip("/"), SHARE_DIR)
        os.makedirs(share, 0o755)
        sys_mount("tandem-share", share, "tmpfs", flags, SHARE_OPTIONS)
        sys_mount(None, share, None, MS_SHARED)
        sys_mount(None, root, None, MS_REMOUNT | MS_RDONLY | flags, ROOT_OPTIONS)
    except OSError as e:
        raise ShareError(f"building the share namespace on {root}: {e}") from e
    try:
        pivot_into(root)
    except JailError as e:
        raise ShareError(str(e)) from e


def create(ns_file: str) -> None:
    """Build the namespace in a child and pin it at `ns_file` (which must not be pinned yet)."""
    ready_r, ready_w = os.pipe()
    hold_r, hold_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(ready_r)
        os.close(hold_w)
        try:
            build_namespace(os.path.dirname(ns_file))
        except ShareError as e:
            print(f"tandem-sharens: {e}", file=sys.stderr, flush=True)
            os._exit(e.code)
        os.write(ready_w, b"1")
        os.read(hold_r, 1)  # until the parent has pinned the namespace (or gave up: EOF)
        os._exit(0)
    os.close(ready_w)
    os.close(hold_r)
    try:
        if os.read(ready_r, 1) != b"1":
            raise ShareError("the share namespace was not built")  # the child said why
        fd = os.open(ns_file, os.O_CREAT | os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, 0o444)
        os.close(fd)
        try:
            sys_mount(f"/proc/{pid}/ns/mnt", ns_file, None, MS_BIND)  # our unreaped child: its pid is its own
        except OSError as e:
            raise ShareError(f"pinning the share namespace at {ns_file}: {e}") from e
    finally:
        os.close(hold_w)
        os.close(ready_r)
        os.waitpid(pid, 0)


# ---- attach and detach -----------------------------------------------------------------------


def enter(ns_file: str) -> int:
    """Join the pod's share namespace; return a descriptor of its share."""
    fd = os.open(ns_file, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        if _libc.setns(fd, _CLONE_NEWNS) != 0:
            raise ShareError(f"entering the share namespace {ns_file}: {os.strerror(ctypes.get_errno())}")
    finally:
        os.close(fd)
    return os.open(share_path(ns_file), os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)


def parts_of(path: str) -> list[str]:
    """The components of a path relative to the share; refused unless each is a plain name."""
    parts = path.split("/")
    for part in parts:
        if part in ("", ".", "..") or "\0" in part or len(os.fsencode(part)) > _NAME_MAX:
            raise ShareError(f"{path!r} is not a plain relative path")
    return parts


def make_target(share: int, path: str, directory: bool) -> int:
    """An O_PATH descriptor of `path` beneath the share, made if missing: a directory, or an empty regular file.

    Each component is created relative to its parent's descriptor and opened strictly beneath
    it; what the guest put in the way (a symlink, a FIFO, a file where a directory belongs,
    a mount) fails the walk with a REFUSED ShareError.
    """
    parts = parts_of(path)
    parent = open_beneath(share, ".", os.O_PATH | os.O_DIRECTORY)
    try:
        for part in parts[:-1]:
            try:
                os.mkdir(part, 0o755, dir_fd=parent)
            except FileExistsError:
                pass
            child = open_beneath(parent, part, os.O_PATH | os.O_DIRECTORY)
            os.close(parent)
            parent = child
        last = parts[-1]
        try:
            if directory:
                os.mkdir(last, 0o755, dir_fd=parent)
            else:
                os.mknod(last, stat.S_IFREG | 0o644, dir_fd=parent)
        except FileExistsError:
            pass
        target = open_beneath(parent, last, os.O_PATH | (os.O_DIRECTORY if directory else 0))
    except OSError as e:
        raise _classify(e, f"making {path} in the share") from e
    finally:
        os.close(parent)
    mode = os.fstat(target).st_mode
    if not (stat.S_ISDIR(mode) if directory else stat.S_ISREG(mode)):
        os.close(target)
        raise ShareError(f"making {path} in the share: not what the host made there (mode {mode:o})", REFUSED)
    return target


def attach(ns_file: str, trees: Sequence[tuple[int, str]]) -> list[dict[str, int]]:
    """Mount each detached tree at its path beneath the share; all or nothing."""
    share = enter(ns_file)
    done: list[int] = []
    records = []
    try:
        for tree, path in trees:
            st = os.fstat(tree)
            target = make_target(share, path, stat.S_ISDIR(st.st_mode))
            try:
                attach_tree(tree, target)
            except OSError as e:
                raise _classify(e, f"mounting onto {path} in the share") from e
            finally:
                os.close(target)
            done.append(tree)
            records.append({"mount_id": fd_mount_id(tree), "dev": st.st_dev, "ino": st.st_ino})
    except BaseException:
        for tree in done:
            try:
                detach_open_mount(tree)
            except OSError as e:
                print(f"tandem-sharens: undoing a mount: {e}", file=sys.stderr)
        raise
    finally:
        os.close(share)
    return records


def detach_one(share: int, share_mount: Mount, mount_id: int, dev: int, ino: int) -> str:
    """Detach one recorded mount if it is still where the share's own mount holds it; what happened."""
    table = mountinfo()
    entry = next((m for m in table if m.mount_id == mount_id), None)
    if entry is None:
        return "gone"
    prefix = share_mount.mount_point + "/"
    if entry.parent_id != share_mount.mount_id or not entry.mount_point.startswith(prefix):
        return "unreachable"  # an ID now someone else's: the mount we made is gone
    try:
        fd = open_mount_root(share, entry.mount_point[len(prefix) :])
    except OSError:
        return "unreachable"
    try:
        st = os.fstat(fd)
        if fd_mount_id(fd) != mount_id or (st.st_dev, st.st_ino) != (dev, ino):
            return "unreachable"
        detach_open_mount(fd)
    finally:
        os.close(fd)
    return "detached"


def _empty(dir_fd: int, depth: int) -> None:
    """Remove what is in the directory `dir_fd`, on its own filesystem only; what will not go stays."""
    with os.scandir(dir_fd) as entries:
        names = [(entry.name, entry.is_dir(follow_symlinks=False)) for entry in entries]
    for name, is_dir in names:
        if not is_dir:
            with contextlib.suppress(OSError):
                os.unlink(name, dir_fd=dir_fd)  # a symlink goes itself; what it names is never looked at
            continue
        if depth < _MAX_DEPTH:
            try:
                child = open_beneath(dir_fd, name, os.O_RDONLY | os.O_DIRECTORY)  # a mount there: EXDEV, kept
            except OSError:
                continue
            try:
                _empty(child, depth + 1)
            finally:
                os.close(child)
        with contextlib.suppress(OSError):
            os.rmdir(name, dir_fd=dir_fd)


def remove_tree(share: int, name: str) -> None:
    """Remove `name` beneath the share and everything in it on the share's filesystem (a container's directory)."""
    (name,) = parts_of(name)
    try:
        top = open_beneath(share, name, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENOTDIR):  # the guest put a symlink or a file in its place
            with contextlib.suppress(OSError):
                os.unlink(name, dir_fd=share)
        return
    try:
        _empty(top, 1)
    finally:
        os.close(top)
    with contextlib.suppress(OSError):
        os.rmdir(name, dir_fd=share)


def detach(ns_file: str, name: str, records: Sequence[tuple[int, int, int]]) -> list[str]:
    """Detach a container's recorded mounts, then remove its directory from the share."""
    share = enter(ns_file)
    try:
        share_mount = top_mount(share_path(ns_file))
        if share_mount is None:
            raise ShareError(f"the share is not mounted in {ns_file}")
        results = [detach_one(share, share_mount, *record) for record in records]
        remove_tree(share, name)
        return results
    finally:
        os.close(share)


# ---- the command line ------------------------------------------------------------------------


def _tree_arg(arg: str) -> tuple[int, str]:
    fd, _, path = arg.partition(":")
    if not fd.isdigit() or not path:
        raise ShareError(f"malformed tree argument {arg!r}: want FD:PATH")
    return int(fd), path


def _record_arg(arg: str) -> tuple[int, int, int]:
    fields = arg.split(":")
    if len(fields) != 3 or not all(f.isdigit() for f in fields):
        raise ShareError(f"malformed mount record {arg!r}: want MOUNT_ID:DEV:INO")
    return int(fields[0]), int(fields[1]), int(fields[2])


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    usage = "usage: python -m vm_backend.sharens create|attach|detach NSFILE [ARG...]"
    if len(args) < 2 or args[0] not in ("create", "attach", "detach"):
        print(usage, file=sys.stderr)
        return 2
    command, ns_file, rest = args[0], args[1], args[2:]
    os.umask(0o022)  # the modes given here are the modes made (the daemon's umask is 077)
    if not os.path.isabs(ns_file):
        print(f"{usage}: NSFILE must be absolute", file=sys.stderr)
        return 2
    try:
        if command == "create":
            create(ns_file)
        elif command == "attach":
            print(json.dumps(attach(ns_file, [_tree_arg(arg) for arg in rest])))
        elif rest:
            print(json.dumps(detach(ns_file, rest[0], [_record_arg(arg) for arg in rest[1:]])))
        else:
            raise ShareError("detach needs the container's directory name")
    except ShareError as e:
        print(f"tandem-sharens: {e}", file=sys.stderr, flush=True)
        return e.code
    except OSError as e:
        print(f"tandem-sharens: {e}", file=sys.stderr, flush=True)
        return FAILED
    return 0


if __name__ == "__main__":
    sys.exit(main())
