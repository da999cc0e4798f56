"""A container's root filesystem: an overlay of the image's unpacked layers under its own writable layer.

Both backends mount their containers' roots with this: runc's in the bundle,
the VM backend's on the host before it binds them into the pod's share.

The kernel takes mount options in one page (4 KiB), and 64-hex layer directory
names under a state directory run to ~100 bytes each, so about 40 layers would
not fit. Like Docker's overlay2, each layer gets a short symlink in a `l/`
directory next to the upper dir, and the options name layers relative to that
directory's parent: `/proc/self/fd/<fd>/l/7` for mount(2) called directly
(through an fd of the parent; ~20 bytes), or `l/7` (about 5 bytes) when that
would not fit, with the `mount` program run from the parent as its working
directory.

A container in a user namespace of its own gets its layers ID-mapped (Linux
5.19's overlayfs takes ID-mapped layers, containerd 2 does the same): `l/<i>`
is then a directory with an ID-mapped bind of the layer on it while the overlay
is mounted (the overlay keeps private clones of its layers, so the binds go at
once), and the upper dir belongs to the namespace's root. Files the image's
root owns are then the container root's, without copying or chowning a layer.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from core import mounts
from core.errors import FailedPrecondition, InvalidArgument, ResourceExhausted
from core.mounts import is_mounted, sys_mount
from core.proc import run

log = logging.getLogger("tandem.rootfs")

LINKS_DIR = "l"
"""Name of the directory of short layer symlinks created next to the upper dir."""

_EMPTY_LOWER = "empty"  # inside LINKS_DIR: the lower layer of an image without layers
_MAX_OPTIONS = 4095  # one page, less the terminating NUL


@dataclass(frozen=True)
class IdMappedLayers:
    """Mount the layers ID-mapped by the user namespace file `userns`, whose root is `root` (uid, gid) on the host."""

    userns: Path
    root: tuple[int, int]


def _link_layers(links: Path, layers: list[Path], id_mapped: IdMappedLayers | None) -> list[str]:
    """(Re)create `links/<i>` for layer i: a symlink to it, or a directory with its ID-mapped bind on it.

    Returns the lowerdir entries, topmost first, relative to links' parent.
    """
    for left in mounts.mounts_below(links):  # ID-mapped binds a crash left behind
        mounts.sys_umount(left, mounts.MNT_DETACH)
    if links.exists():
        shutil.rmtree(links)
    links.mkdir(mode=0o700)
    if not layers:
        (links / _EMPTY_LOWER).mkdir()
        return [f"{LINKS_DIR}/{_EMPTY_LOWER}"]
    for i, layer in enumerate(layers):
        if not layer.is_dir():
            raise FailedPrecondition(f"image layer {layer} is missing")
        if id_mapped is None:
            (links / str(i)).symlink_to(layer.resolve())
            continue
        (links / str(i)).mkdir()
        try:
            mounts.bind_idmapped(layer, links / str(i), id_mapped.userns)
        except OSError as e:
            raise FailedPrecondition(
                f"cannot ID-map image layer {layer} for the pod's user namespace (needs Linux 5.19 and a"
                f" filesystem with ID-mapped mounts): {e}"
            ) from e
    return [f"{LINKS_DIR}/{i}" for i in reversed(range(len(layers)))]


def _unbind_layers(links: Path) -> None:
    for bound in mounts.mounts_below(links):
        mounts.sys_umount(bound, mounts.MNT_DETACH)


def _prepare(layers: list[Path], upper: Path, work: Path, target: Path, id_mapped: IdMappedLayers | None) -> str:
    """Create the directories and layer links; return the overlay mount options (relative to upper's parent)."""
    base = upper.parent
    for d in (upper, work, target):
        d.mkdir(parents=True, exist_ok=True)
    # the container's / takes the upper dir's mode, and the daemon's umask (077) would make it root-only
    os.chmod(upper, 0o755)
    if id_mapped is not None:
        os.chown(upper, *id_mapped.root)
    lower = _link_layers(base / LINKS_DIR, layers, id_mapped)
    upper_rel, work_rel = os.path.relpath(upper, base), os.path.relpath(work, base)
    if any(c in p for p in (upper_rel, work_rel) for c in ",:\\"):
        raise InvalidArgument(f"overlay upper/work paths may not contain ',', ':' or '\\': {upper}, {work}")
    options = f"lowerdir={':'.join(lower)},upperdir={upper_rel},workdir={work_rel}"
    if len(options) > _MAX_OPTIONS:
        raise ResourceExhausted(f"{len(layers)} layers do not fit in one overlay mount")
    return options


async def mount_rootfs(
    layers: list[Path], upper: Path, work: Path, target: Path, id_mapped: IdMappedLayers | None = None
) -> None:
    """Mount `layers` (bottom first) under `upper` at `target`; already mounted there is success.

    `upper` and `work` must be on one filesystem; a `l/` directory of symlinks is
    made next to `upper` and belongs to the container (remove it with `upper`).
    With `id_mapped`, the layers appear ID-mapped into that user namespace.
    """
    if is_mounted(target):
        log.debug("rootfs already mounted", extra={"target": str(target)})
        return
    try:
        options = await asyncio.to_thread(_prepare, layers, upper, work, target, id_mapped)
        try:
            if await asyncio.to_thread(_mount_overlay, options, upper.parent, target):
                return
        except OSError as e:
            raise FailedPrecondition(f"cannot mount the container's rootfs: {e}") from e
        await run(["mount", "-t", "overlay", "overlay", "-o", options, str(target)], cwd=upper.parent)
    finally:
        if id_mapped is not None:
            await asyncio.to_thread(_unbind_layers, upper.parent / LINKS_DIR)


def _mount_overlay(options: str, base: Path, target: Path) -> bool:
    """The overlay mount, from `base` as working directory (the options name layers relative to it).

    The working directory is per process, so this opens `base` and names the
    layers through /proc/self/fd/<fd> instead of changing directory: the
    options grow by that prefix per entry; False when they would then not fit
    in a page (nothing was mounted).
    """
    fd = os.open(base, os.O_RDONLY | os.O_DIRECTORY)
    try:
        prefix = f"/proc/self/fd/{fd}/"
        parts = []
        for part in options.split(","):
            key, _, value = part.partition("=")
            parts.append(f"{key}={':'.join(prefix + v for v in value.split(':'))}")
        absolute = ",".join(parts)
        if len(absolute) > _MAX_OPTIONS:
            return False  # too long with the prefix: the caller mounts from `base` as working directory
        sys_mount("overlay", target, "overlay", 0, absolute)
        return True
    finally:
        os.close(fd)


async def unmount(target: Path) -> None:
    """Unmount a rootfs; not mounted is success, and a busy one is detached lazily instead."""
    await asyncio.to_thread(mounts.unmount, target)
