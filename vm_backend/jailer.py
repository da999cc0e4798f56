"""The jailer: puts itself where a pod's VMM belongs, takes away everything it may not keep, then execs the VMM.

    python -m vm_backend.jailer [--cgroup DIR]... [--netns FILE] [--mountns FILE]
        [--root DIR --uid N --gid N [--ro PATH]... [--rw DIR]... [--dev NAME]... --nofile N] -- PROGRAM ARG...

The daemon starts it (as root, in its own session) instead of the VMM, as the
Firecracker jailer is started: a small program of its own, so nothing of this
happens between fork and exec of the multi-threaded daemon. In order:

1. joins each cgroup (`DIR/cgroup.procs`), so the VMM is charged from its first page;
2. enters the pod's network namespace (`--netns`), or a mount namespace (`--mountns`: the pod's
   share namespace, where virtiofsd runs; setns needs a single-threaded process, which this is);
3. with `--root`, builds the jail: a private mount namespace whose root is a
   tmpfs holding only the `--ro` paths (bound read-only), the `--rw` dirs, the
   `--dev` nodes and the merged-/usr symlinks, at the same paths as on the host
   so that the VMM's command line does not change; pivot_root into it. No /proc:
   QEMU 7.2 looks for /proc/self/exe, /proc/self/status, /proc/stat and /proc/mounts
   (strace) and does without each;
   then drops to `--uid`/`--gid` with no supplementary groups, no capabilities
   in any set, no_new_privs, RLIMIT_NOFILE `--nofile` and no core dumps;
4. execs PROGRAM (with an empty environment when jailed).

Without `--root` it only does 1, 2 and 4 (virtiofsd joins the VM's cgroup and the
share's mount namespace that way). A failure prints one line to stderr (the VMM's log) and exits 125.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import resource
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

from core.mounts import (
    MNT_DETACH,
    MS_BIND,
    MS_NODEV,
    MS_NOEXEC,
    MS_NOSUID,
    MS_PRIVATE,
    MS_RDONLY,
    MS_REC,
    MS_REMOUNT,
    sys_mount,
    sys_umount,
)

FAILED = 125
DEVICES = {"null": (1, 3), "zero": (1, 5), "random": (1, 8), "urandom": (1, 9), "kvm": (10, 232)}
USR_LINKS = ("bin", "sbin", "lib", "lib64")  # symlinks into /usr on a merged-/usr host (Debian 12)
JAIL_TMPFS = "mode=0755,size=64k,nr_inodes=256"  # directories, mount points and device nodes only

_CLONE_NEWNS = 0x00020000
_CLONE_NEWNET = 0x40000000
_PR_CAPBSET_DROP = 24
_PR_SET_NO_NEW_PRIVS = 38
_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL = 47, 4
_SYS_CAPSET = 126  # x86_64
_SYS_PIVOT_ROOT = 155  # x86_64
_CAPABILITY_VERSION_3 = 0x20080522

_libc = ctypes.CDLL(None, use_errno=True)


class JailError(Exception):
    """One step failed; the message says which."""


def _check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise JailError(f"{what}: {os.strerror(err)}")


def join_cgroups(directories: Sequence[str]) -> None:
    for directory in directories:
        try:
            with open(os.path.join(directory, "cgroup.procs"), "w") as f:
                f.write("0")
        except OSError as e:
            raise JailError(f"joining cgroup {directory}: {e.strerror}") from e


def enter_namespace(path: str, kind: int, what: str) -> None:
    """setns(2) into the namespace pinned at `path` (`kind`: a CLONE_NEW* flag); a mount namespace also
    moves this process's root and working directory to that namespace's root."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise JailError(f"opening {what} namespace {path}: {e.strerror}") from e
    try:
        _check(_libc.setns(fd, kind), f"entering {what} namespace {path}")
    finally:
        os.close(fd)


def _inside(root: str, path: str) -> str:
    return os.path.join(root, path.lstrip("/"))


def bind_same_path(root: str, source: str, flags: int) -> None:
    """Bind `source` at the same path under `root` (parents made), then remount it with `flags`."""
    target = _inside(root, source)
    os.makedirs(os.path.dirname(target), mode=0o755, exist_ok=True)
    if os.path.isdir(source):
        os.makedirs(target, mode=0o755, exist_ok=True)
    else:
        os.close(os.open(target, os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC, 0o444))
    try:
        sys_mount(source, target, None, MS_BIND)
        sys_mount(None, target, None, MS_BIND | MS_REMOUNT | flags)
    except OSError as e:
        raise JailError(f"binding {source} into the jail: {e.strerror}") from e


def build_root(root: str, program: str, ro: Sequence[str], rw: Sequence[str], devices: Sequence[str],
               uid: int, gid: int) -> None:  # fmt: skip
    """A private mount namespace with a tmpfs at `root` holding only what is named; `root` ends read-only.

    Nothing in it can be executed but `program` and what is in the directories bound read-only (/usr).
    """
    os.umask(0o022)  # the daemon's 077 would leave the jail's directories untraversable for the jailed uid
    _check(_libc.unshare(_CLONE_NEWNS), "unsharing the mount namespace")
    try:
        sys_mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing done here reaches the host's namespace
        os.makedirs(root, mode=0o700, exist_ok=True)
        sys_mount("tandem-jail", root, "tmpfs", MS_NOSUID | MS_NOEXEC, JAIL_TMPFS)
    except OSError as e:
        raise JailError(f"mounting the jail's root on {root}: {e}") from e
    for name in USR_LINKS:
        host = f"/{name}"
        if os.path.islink(host):
            os.symlink(os.readlink(host), _inside(root, host))
        elif name.startswith("lib") and os.path.isdir(host):  # not merged: the loader and libraries live here
            bind_same_path(root, host, MS_RDONLY | MS_NOSUID | MS_NODEV)
    for path in ro:
        exec_ok = 0 if path == program or os.path.isdir(path) else MS_NOEXEC
        bind_same_path(root, path, MS_RDONLY | MS_NOSUID | MS_NODEV | exec_ok)
    for path in rw:
        bind_same_path(root, path, MS_NOSUID | MS_NODEV | MS_NOEXEC)
    os.makedirs(_inside(root, "/dev"), mode=0o755, exist_ok=True)
    for name in devices:
        if name not in DEVICES:
            raise JailError(f"unknown device {name!r}")
        node = _inside(root, f"/dev/{name}")
        if name == "kvm":  # the host's /dev/kvm is root:kvm 0660; this node is the jailed uid's alone
            os.mknod(node, 0o600 | 0o020000, os.makedev(*DEVICES[name]))
            os.chown(node, uid, gid)
        else:
            os.mknod(node, 0o666 | 0o020000, os.makedev(*DEVICES[name]))
    try:
        sys_mount(None, root, None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NOEXEC, JAIL_TMPFS)
    except OSError as e:
        raise JailError(f"making the jail's root read-only: {e}") from e


def pivot_into(root: str) -> None:
    """Make `root` the root and detach the host's tree: from here on nothing else of the host can be named."""
    os.chdir(root)
    _check(_libc.syscall(_SYS_PIVOT_ROOT, b".", b"."), f"pivot_root into {root}")
    try:
        sys_umount(".", MNT_DETACH)  # the old root, stacked on top of the new one by pivot_root(".", ".")
    except OSError as e:
        raise JailError(f"detaching the host's root: {e}") from e
    os.chdir("/")


class _CapHeader(ctypes.Structure):
    _fields_ = (("version", ctypes.c_uint32), ("pid", ctypes.c_int))


class _CapData(ctypes.Structure):
    _fields_ = (("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32))


def drop_privileges(uid: int, gid: int, last_cap: int, nofile: int) -> None:
    """No groups, the given ids, no capabilities in any set, no_new_privs, bounded fds, no core dumps."""
    for cap in range(last_cap + 1):
        _check(_libc.prctl(_PR_CAPBSET_DROP, cap, 0, 0, 0), f"dropping capability {cap} from the bounding set")
    _check(_libc.prctl(_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0), "clearing the ambient capabilities")
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        os.setgroups([])
        os.setresgid(gid, gid, gid)
        os.setresuid(uid, uid, uid)  # clears the permitted and effective sets: every id is non-zero
    except (OSError, ValueError) as e:
        raise JailError(f"becoming {uid}:{gid}: {e}") from e
    header = _CapHeader(_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()  # all zero: the inheritable set too
    _check(_libc.syscall(_SYS_CAPSET, ctypes.byref(header), data), "clearing the capability sets")
    _check(_libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "setting no_new_privs")
    os.umask(0o077)


def parse(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m vm_backend.jailer", description=__doc__.split("\n")[0])
    parser.add_argument("--cgroup", action="append", default=[], help="a cgroup directory to join")
    parser.add_argument("--netns", help="a network namespace file to enter")
    parser.add_argument("--mountns", help="a mount namespace file to enter (not with --root)")
    parser.add_argument("--root", help="an empty directory for the jail's root (jails the program)")
    parser.add_argument("--uid", type=int)
    parser.add_argument("--gid", type=int)
    parser.add_argument("--ro", action="append", default=[], help="a path bound read-only")
    parser.add_argument("--rw", action="append", default=[], help="a directory bound read-write")
    parser.add_argument("--dev", action="append", default=[], choices=sorted(DEVICES))
    parser.add_argument("--nofile", type=int, default=1024)
    parser.add_argument("program", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    if args.program[:1] == ["--"]:
        args.program = args.program[1:]
    if not args.program:
        parser.error("no program to run")
    if args.root is not None and args.mountns is not None:
        parser.error("--mountns and --root exclude each other")
    if args.root is not None and (not args.uid or not args.gid):
        parser.error("a jail needs a non-zero --uid and --gid")
    for path in [args.root, *args.ro, *args.rw]:
        if path is not None and not os.path.isabs(path):
            parser.error(f"{path}: not an absolute path")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    try:
        join_cgroups(args.cgroup)
        if args.netns:
            enter_namespace(args.netns, _CLONE_NEWNET, "network")
        program = shutil.which(args.program[0]) or args.program[0]  # before the jail takes PATH away
        if args.mountns:
            enter_namespace(args.mountns, _CLONE_NEWNS, "mount")
        env = dict(os.environ)
        if args.root is not None:
            last_cap = int(Path("/proc/sys/kernel/cap_last_cap").read_text())
            build_root(args.root, program, args.ro, args.rw, args.dev, args.uid, args.gid)
            pivot_into(args.root)
            drop_privileges(args.uid, args.gid, last_cap, args.nofile)
            env = {}
        os.execve(program, args.program, env)
    except (JailError, OSError) as e:
        print(f"tandem-jailer: {e}", file=sys.stderr, flush=True)
    return FAILED


if __name__ == "__main__":
    sys.exit(main())
