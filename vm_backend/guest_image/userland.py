"""The userland image: the guest's programs and libraries as one ext4 file system that every VM maps.

Each VM maps the image read-only as legacy persistent memory and mounts it with
`-o dax` (vm_backend/guest_memory.py says how), so its files are read straight
from the host's page cache, one copy for all VMs, and never copied into a
guest's RAM. ext4, not erofs: ext4 (with DAX) is built into Debian's cloud
kernel, erofs is a module the initramfs would have to carry and load, and
`mkfs.ext4 -d` (e2fsprogs) builds the image from a directory without root.

DAX needs the file system's block size to be the page size (4 KiB). The image
has no journal (it is never written) and is a multiple of 2 MiB (the kernel maps
persistent memory in 2 MiB sections).
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

from core import proc
from core.errors import CommandFailed, FailedPrecondition
from vm_backend.guest_image.cpio import Tree

MKFS = "mkfs.ext4"
BLOCK = 4096
INODE_SIZE = 256
ALIGN = 2 * 2**20
SLACK = 1.10  # bitmaps, group descriptors and directory blocks beyond the estimate below, with room to spare
LABEL = "tandem-userland"


def materialize(tree: Tree, directory: Path) -> None:
    """Write `tree` out as files under `directory` (no device nodes: the guest's /dev is a devtmpfs)."""
    for name in sorted(tree.nodes):
        node = tree.nodes[name]
        path = directory / name
        if node.kind == "dir":
            path.mkdir(mode=0o755, exist_ok=True)
        elif node.kind == "symlink":
            path.symlink_to(node.target)
        elif node.kind == "file":
            if node.source is not None:
                shutil.copyfile(node.source, path)
            else:
                path.write_bytes(node.data)
        else:
            raise FailedPrecondition(f"userland image: {name} is a {node.kind}; only the initramfs has those")
        if node.kind != "symlink":
            path.chmod(node.mode)


def image_size(tree: Tree) -> tuple[int, int]:
    """(bytes, inodes) an image of `tree` gets: every file and directory in whole blocks, the inode tables, slack."""
    blocks = 0
    for node in tree.nodes.values():
        if node.kind == "file":
            size = len(node.data) if node.source is None else os.stat(node.source).st_size
            blocks += -(-size // BLOCK)
        elif node.kind == "dir":
            blocks += 1
    inodes = len(tree.nodes) + 64  # lost+found and the reserved inodes
    total = int((blocks * BLOCK + inodes * INODE_SIZE) * SLACK) + 4 * 2**20
    return -(-total // ALIGN) * ALIGN, inodes


async def make_image(tree: Tree, staging: Path, out: Path, digest: str) -> int:
    """Build the ext4 image of `tree` at `out` (the tree is written out under `staging` first); return its size.

    Files keep their modes and the builder's ownership (root: `tandem assets` runs as root). The file system's
    UUID is derived from the build's digest: it names the build.
    """
    if shutil.which(MKFS) is None:
        raise FailedPrecondition(f"{MKFS} is missing: apt-get install e2fsprogs (make setup does)")
    staging.mkdir(parents=True)
    materialize(tree, staging)
    size, inodes = image_size(tree)
    fs_uuid = str(uuid.uuid5(uuid.NAMESPACE_URL, f"tandem-userland:{digest}"))
    argv = [
        MKFS, "-q", "-F", "-t", "ext4", "-b", str(BLOCK), "-I", str(INODE_SIZE), "-N", str(inodes),
        "-m", "0", "-L", LABEL, "-U", fs_uuid, "-O", "^has_journal,^resize_inode",
        "-E", f"root_owner=0:0,hash_seed={fs_uuid}", "-d", str(staging), str(out), f"{size // 1024}k",
    ]  # fmt: skip
    try:
        await proc.run(argv)
    except CommandFailed as e:
        raise FailedPrecondition(f"building the userland image failed: {e}") from e
    return out.stat().st_size
