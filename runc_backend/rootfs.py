"""A container's root filesystem: an overlay of the image's unpacked layers under its own writable layer.

The kernel takes mount options in one page (4 KiB), and 64-hex layer directory
names under a state directory run to ~100 bytes each, so about 40 layers would
not fit. Like Docker's overlay2, each layer gets a short symlink in a `l/`
directory next to the upper dir, and `mount` runs with that directory's parent
as its working directory so the options name layers as `l/7` (about 5 bytes).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import stat
from pathlib import Path
from typing import NamedTuple

from core.errors import FailedPrecondition, InvalidArgument, ResourceExhausted
from core.proc import run

log = logging.getLogger("tandem.rootfs")

LINKS_DIR = "l"
"""Name of the directory of short layer symlinks created next to the upper dir."""

_EMPTY_LOWER = "empty"  # inside LINKS_DIR: the lower layer of an image without layers
_MAX_OPTIONS = 4095  # one page, less the terminating NUL


class MountEntry(NamedTuple):
    mount_point: str
    fstype: str


def _unescape(field: str) -> str:
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
            entries.append(MountEntry(_unescape(fields[4]), fields[sep + 1]))
    return entries


def is_mounted(target: Path) -> bool:
    """Whether something is mounted exactly at `target`."""
    path = os.path.realpath(target)
    return any(m.mount_point == path for m in mounts())


def _link_layers(links: Path, layers: list[Path]) -> list[str]:
    """(Re)create `links/<i>` -> layer i; return the lowerdir entries, topmost first, relative to links' parent."""
    if links.exists():
        shutil.rmtree(links)
    links.mkdir(mode=0o700)
    if not layers:
        (links / _EMPTY_LOWER).mkdir()
        return [f"{LINKS_DIR}/{_EMPTY_LOWER}"]
    for i, layer in enumerate(layers):
        if not layer.is_dir():
            raise FailedPrecondition(f"image layer {layer} is missing")
        (links / str(i)).symlink_to(layer.resolve())
    return [f"{LINKS_DIR}/{i}" for i in reversed(range(len(layers)))]


def _prepare(layers: list[Path], upper: Path, work: Path, target: Path) -> str:
    """Create the directories and layer links; return the overlay mount options (relative to upper's parent)."""
    base = upper.parent
    for d in (upper, work, target):
        d.mkdir(parents=True, exist_ok=True)
    # the container's / takes the upper dir's mode, and the daemon's umask (077) would make it root-only
    os.chmod(upper, 0o755)
    lower = _link_layers(base / LINKS_DIR, layers)
    upper_rel, work_rel = os.path.relpath(upper, base), os.path.relpath(work, base)
    if any(c in p for p in (upper_rel, work_rel) for c in ",:\\"):
        raise InvalidArgument(f"overlay upper/work paths may not contain ',', ':' or '\\': {upper}, {work}")
    options = f"lowerdir={':'.join(lower)},upperdir={upper_rel},workdir={work_rel}"
    if len(options) > _MAX_OPTIONS:
        raise ResourceExhausted(f"{len(layers)} layers do not fit in one overlay mount")
    return options


async def mount_rootfs(layers: list[Path], upper: Path, work: Path, target: Path) -> None:
    """Mount `layers` (bottom first) under `upper` at `target`; already mounted there is success.

    `upper` and `work` must be on one filesystem; a `l/` directory of symlinks is
    made next to `upper` and belongs to the container (remove it with `upper`).
    """
    if is_mounted(target):
        log.debug("rootfs already mounted", extra={"target": str(target)})
        return
    options = _prepare(layers, upper, work, target)
    await run(["mount", "-t", "overlay", "overlay", "-o", options, str(target)], cwd=upper.parent)


async def unmount(target: Path) -> None:
    """Unmount `target`; not mounted is success, and a busy mount is detached lazily instead."""
    if not is_mounted(target):
        return
    result = await run(["umount", str(target)], check=False)
    if result.returncode != 0 and is_mounted(target):
        log.warning(
            "rootfs busy, detaching lazily",
            extra={"target": str(target), "error": result.stderr.decode(errors="replace").strip()},
        )
        await run(["umount", "--lazy", str(target)])


def writable_layer_usage(upper: Path) -> tuple[int, int]:
    """(bytes, inodes) used by the writable layer, counting each inode once, as `du` and containerd do.

    Walks the whole tree: call it from a thread for big layers.
    """
    seen: set[int] = set()
    used = 0
    stack = [upper]
    while stack:
        path = stack.pop()
        try:
            st = path.lstat()
            if stat.S_ISDIR(st.st_mode):
                stack.extend(path.iterdir())
        except FileNotFoundError:
            continue  # removed while we walked
        if st.st_ino not in seen:
            seen.add(st.st_ino)
            used += st.st_blocks * 512
    return used, len(seen)
