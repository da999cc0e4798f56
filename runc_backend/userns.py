"""A trusted pod's user namespace and the namespaces it owns, pinned as files (CRI-O's pinns -U, in effect).

A namespace belongs to the user namespace of the process that creates it, and
only that owner may mount /proc or /sys for it: a container whose root lives in
the pod's user namespace cannot mount sysfs for a network namespace the host
owns (runc fails with EPERM). So the pod's user, network, IPC and UTS
namespaces are created together by one `unshare` before CNI ADD (containerd 2
gets the same ownership by creating the netns from the sandbox's own process).

The holder process exec'd by `unshare` has no capabilities left in its new user
namespace (its host root is unmapped there), so everything else happens from
the daemon, which as the host's root may act in any namespace below it: it
writes the holder's uid_map and gid_map, bind-mounts the four nsfs files onto
the pod's files, brings `lo` up, and lets the holder go. The namespaces then
live on in the mounts. (util-linux's own `--user=FILE` cannot pin a user
namespace here: its helper's mount is refused.)
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterable
from pathlib import Path

from core import mounts, proc
from core.errors import FailedPrecondition
from sandbox.oci.userns import IdMappings

KINDS = ("user", "net", "ipc", "uts")
_READY = b"ready\n"


def _pin(pid: int, files: dict[str, Path], mappings: IdMappings) -> None:
    """Map the holder's user namespace and bind its namespaces onto `files` (blocking, quick)."""
    Path(f"/proc/{pid}/uid_map").write_text(mappings.uids.line())
    Path(f"/proc/{pid}/gid_map").write_text(mappings.gids.line())
    for kind, target in files.items():
        os.close(os.open(target, os.O_CREAT | os.O_RDONLY | os.O_CLOEXEC, 0o444))
        mounts.sys_mount(f"/proc/{pid}/ns/{kind}", target, None, mounts.MS_BIND)


async def create(files: dict[str, Path], mappings: IdMappings) -> None:
    """New user, network, IPC and UTS namespaces, the others owned by the first, pinned at `files[kind]`.

    `files` names a file for each of KINDS; the network namespace gets `lo` up.
    On failure nothing stays mounted.
    """
    holder = await proc.spawn(
        ["unshare", "--user", "--net", "--ipc", "--uts", "--", "sh", "-c", "echo ready && read -r _"],
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    assert holder.stdin is not None and holder.stdout is not None
    try:
        if await holder.stdout.readline() != _READY:
            raise FailedPrecondition("could not create the pod's user namespace (unshare failed)")
        try:
            await asyncio.to_thread(_pin, holder.pid, files, mappings)
        except OSError as e:
            raise FailedPrecondition(f"cannot set up the pod's user namespace: {e}") from e
        await proc.run(["nsenter", f"--net={files['net']}", "ip", "link", "set", "lo", "up"])
    except BaseException:
        await asyncio.to_thread(remove, files.values())
        raise
    finally:
        holder.stdin.close()  # the holder's `read` ends: it exits
        await holder.wait()


def check_traversable(path: Path) -> None:
    """Refuse a pod whose containers runc could not reach: their roots lie below `path`, and runc mounts them
    as the pod's root, a stranger to the host's directories, who needs o+x on each of them."""
    for directory in (path, *path.parents):
        if not directory.stat().st_mode & 0o001:
            raise FailedPrecondition(
                f"{directory} is not searchable by others (o+x), so a container in a user namespace cannot reach"
                f" its root below {path}: make it 0711 (or 0755)"
            )


def remove(files: Iterable[Path]) -> None:
    """Unpin (lazily) and delete namespace files; absent is success."""
    for path in files:
        mounts.sys_umount(path, mounts.MNT_DETACH)
        path.unlink(missing_ok=True)
