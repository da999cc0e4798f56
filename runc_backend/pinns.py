"""A pod's IPC and UTS namespaces pinned as files, instead of held by an infra process (CRI-O's pinns).

A short-lived thread unshares the namespaces, sets the hostname and the pod's
sysctls inside them (and inside the pod's network namespace), and bind-mounts
its `/proc/<tid>/ns/{ipc,uts}` onto `<pod_dir>/ipc` and `<pod_dir>/uts`; the
thread then ends and the mounts alone keep the namespaces alive. Containers
join them by path. The directory holding pod dirs is made a private mount
first, so these mounts neither propagate elsewhere nor get copied into peers.

Namespaces are per thread for IPC, UTS and network, so none of this touches
the daemon's other threads; the mounts are in the daemon's mount namespace.

A pod with a user namespace of its own has its IPC and UTS namespaces pinned
already, created inside that one (runc_backend/userns.py): `configure` then
only enters them to set the hostname and sysctls.
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import threading
from collections.abc import Mapping
from pathlib import Path

from core import mounts

CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWNET = 0x40000000

_libc = ctypes.CDLL(None, use_errno=True)


def _check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _sysctl_path(name: str) -> str:
    return "/proc/sys/" + (name if "/" in name else name.replace(".", "/"))


def _write_sysctls(sysctls: Mapping[str, str]) -> None:
    for name, value in sysctls.items():
        with open(_sysctl_path(name), "w") as f:
            f.write(value)


def is_net_sysctl(name: str) -> bool:
    return name.startswith("net.") or name.startswith("net/")


def _setns(path: str | Path, kind: int) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        _check(_libc.setns(fd, kind), "setns")
    finally:
        os.close(fd)


def _configure(uts: bool, hostname: str | None, netns: str | None, sysctls: Mapping[str, str]) -> None:
    """In this thread's IPC and UTS namespaces: the hostname and sysctls; then the network ones in `netns`."""
    if uts and hostname:
        name = hostname.encode()
        _check(_libc.sethostname(name, len(name)), "sethostname")
    _write_sysctls({k: v for k, v in sysctls.items() if not is_net_sysctl(k)})
    net = {k: v for k, v in sysctls.items() if is_net_sysctl(k)}
    if net and netns:
        _setns(netns, CLONE_NEWNET)
        _write_sysctls(net)


def _pin(
    pod_dir: Path, ipc: bool, uts: bool, hostname: str | None, netns: str | None, sysctls: Mapping[str, str]
) -> None:
    """In this (throwaway) thread: unshare, configure, bind-mount the namespaces."""
    flags = (CLONE_NEWIPC if ipc else 0) | (CLONE_NEWUTS if uts else 0)
    if flags:
        _check(_libc.unshare(flags), "unshare")
    tid = threading.get_native_id()
    for kind, wanted in (("ipc", ipc), ("uts", uts)):
        if wanted:
            target = pod_dir / kind
            os.close(os.open(target, os.O_CREAT | os.O_RDONLY, 0o444))
            mounts.sys_mount(f"/proc/self/task/{tid}/ns/{kind}", target, None, mounts.MS_BIND)
    _configure(uts, hostname, netns, sysctls)


def _enter_and_configure(pod_dir: Path, hostname: str | None, netns: str | None, sysctls: Mapping[str, str]) -> None:
    """In this (throwaway) thread: join the pinned IPC and UTS namespaces, configure them."""
    _setns(pod_dir / "ipc", CLONE_NEWIPC)
    _setns(pod_dir / "uts", CLONE_NEWUTS)
    _configure(True, hostname, netns, sysctls)


def _in_thread(fn, *args) -> None:  # type: ignore[no-untyped-def]
    """Run `fn` in a thread of its own that ends with it (its namespaces die with it)."""
    errors: list[BaseException] = []

    def target() -> None:
        try:
            fn(*args)
        except BaseException as e:  # handed to the caller
            errors.append(e)

    thread = threading.Thread(target=target, name="tandem-pinns", daemon=True)
    thread.start()
    thread.join()
    if errors:
        raise errors[0]


async def pin(
    pod_dir: Path,
    *,
    ipc: bool,
    uts: bool,
    hostname: str | None,
    netns: str | None,
    sysctls: Mapping[str, str],
) -> None:
    """Pin new IPC/UTS namespaces at `<pod_dir>/ipc` and `<pod_dir>/uts`; on failure, nothing stays mounted."""
    try:
        await asyncio.to_thread(_in_thread, _pin, pod_dir, ipc, uts, hostname, netns, dict(sysctls))
    except BaseException:
        unpin(pod_dir)
        raise


async def configure(pod_dir: Path, *, hostname: str | None, netns: str | None, sysctls: Mapping[str, str]) -> None:
    """Set the hostname and sysctls in IPC and UTS namespaces pinned at `<pod_dir>/ipc` and `<pod_dir>/uts`."""
    await asyncio.to_thread(_in_thread, _enter_and_configure, pod_dir, hostname, netns, dict(sysctls))


def unpin(pod_dir: Path) -> None:
    """Unmount (lazily) and remove the pinned namespace files; absent is success."""
    for kind in ("ipc", "uts"):
        path = pod_dir / kind
        mounts.sys_umount(path, mounts.MNT_DETACH)
        try:
            path.unlink()
        except FileNotFoundError:
            pass


def pinned(pod_dir: Path, kind: str) -> bool:
    """Whether a namespace is still mounted at `<pod_dir>/<kind>` (an nsfs file, not the plain placeholder)."""
    try:
        return os.stat(pod_dir / kind).st_dev != os.stat(pod_dir).st_dev
    except FileNotFoundError:
        return False
