"""Where built guest images live: one directory per input digest, `current` pointing at the last build.

    <state_dir>/vm/guest/<digest>/   vmlinux (or vmlinuz), initramfs.cpio, userland.img, manifest.json
    <state_dir>/vm/guest/current     -> <digest>
    <state_dir>/vm/guest/.lock       held by the one builder at a time

A build is assembled elsewhere and moved in whole, so a digest directory with a
manifest is a complete build; a pod boots whatever `current` names.

(Builds without a userland image lived in <state_dir>/vm/assets/: code of that
time boots an initramfs that holds everything, and must never find a build of
this kind, nor this code one of those. Nothing here reads or removes them.)
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import shutil
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.files import private_dir

KERNEL_FILE = "vmlinux"  # the ELF kernel, booted through its PVH entry (vm_backend/guest_image/kernel.py)
BZIMAGE_FILE = "vmlinuz"  # the packaged bzImage, booted when no PVH-capable ELF comes out of it
INITRAMFS_FILE = "initramfs.cpio"
USERLAND_FILE = "userland.img"  # the ext4 image every VM maps read-only (vm_backend/guest_image/userland.py)
MANIFEST_FILE = "manifest.json"
_CURRENT = "current"


@dataclass(frozen=True)
class GuestAssets:
    """A built kernel, initramfs and userland image, and what they were built from."""

    dir: Path
    digest: str
    kernel: Path
    initramfs: Path
    userland: Path
    userland_bytes: int  # QEMU maps exactly this much of it
    kernel_release: str
    manifest: dict[str, Any]  # manifest.json as written by the build

    def boot_state(self) -> dict[str, Any]:
        """What a pod's record keeps of the files its VM booted (backend_state), so that the VM is described
        and stopped with those very files after `current` moved on: one place for a cold boot and a warm claim."""
        return {
            "kernel": str(self.kernel),
            "initramfs": str(self.initramfs),
            "userland": str(self.userland),
            "userland_bytes": self.userland_bytes,
        }


def assets_root(state_dir: Path) -> Path:
    return state_dir / "vm" / "guest"


def load(directory: Path) -> GuestAssets | None:
    """The build in `directory`, or None if it is not a complete one."""
    try:
        manifest = json.loads((directory / MANIFEST_FILE).read_text())
    except (OSError, ValueError):
        return None
    kernel = directory / manifest.get("kernel_file", BZIMAGE_FILE)
    initramfs, userland = directory / INITRAMFS_FILE, directory / USERLAND_FILE
    if not (kernel.is_file() and initramfs.is_file() and userland.is_file()):
        return None
    size = userland.stat().st_size
    release = manifest["kernel_release"]
    return GuestAssets(directory, manifest["digest"], kernel, initramfs, userland, size, release, manifest)


def current_assets(state_dir: Path) -> GuestAssets | None:
    """The last built assets (no freshness check, no apt): what a pod boots."""
    return load((assets_root(state_dir) / _CURRENT).resolve())


@asynccontextmanager
async def build_lock(root: Path) -> AsyncIterator[None]:
    """One builder at a time (`make setup` and a test session may race): flock a file beside the assets."""
    fd = os.open(private_dir(root) / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        await asyncio.to_thread(fcntl.flock, fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def publish(root: Path, digest: str, built: Path) -> None:
    """Move a finished build into its digest directory, replacing a broken one of the same digest."""
    shutil.rmtree(root / digest, ignore_errors=True)
    built.rename(root / digest)


KEPT_BUILDS = 3


def make_current(root: Path, digest: str) -> None:
    """Point `current` at `digest`, then remove older builds but the `KEPT_BUILDS` most recent.

    QEMU reads the kernel and initramfs at launch and keeps the userland image
    open, so running VMs keep an older build's files (an unlinked file lives on
    while it is mapped); but a pod whose launch raced the switch (or a second
    checkout of Tandem on a development machine) may still be opening them.
    """
    tmp = root / f".current.{os.getpid()}"
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(digest)
    os.replace(tmp, root / _CURRENT)
    older = [p for p in root.iterdir() if p.name not in (digest, _CURRENT) and not p.name.startswith(".")]
    older.sort(key=lambda p: p.lstat().st_mtime, reverse=True)
    for old in older[KEPT_BUILDS:]:
        shutil.rmtree(old, ignore_errors=True)
