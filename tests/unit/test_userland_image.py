"""The userland image builder: an ext4 image that DAX can map, holding exactly the tree."""

import asyncio
import subprocess
from pathlib import Path

from vm_backend.guest_image import userland
from vm_backend.guest_image.cpio import Tree


def debugfs(image: Path, command: str) -> str:
    return subprocess.run(["debugfs", "-R", command, str(image)], capture_output=True, text=True, check=True).stdout


def sample(tmp_path: Path) -> Tree:
    tool = tmp_path / "tool"
    tool.write_bytes(b"\x7fELF" + b"x" * 10000)
    tree = Tree()
    tree.copy("usr/bin/tool", tool, 0o755)
    tree.file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n")
    tree.symlink("bin/sh", "/bin/busybox")
    tree.dir("tmp", 0o1777)
    return tree


def test_the_image_holds_the_tree_in_page_sized_blocks_without_a_journal(tmp_path):
    out = tmp_path / "userland.img"
    size = asyncio.run(userland.make_image(sample(tmp_path), tmp_path / "staging", out, "digest1"))
    assert size == out.stat().st_size and size % (2 * 2**20) == 0  # mapped in 2 MiB sections
    header = subprocess.run(["dumpe2fs", "-h", str(out)], capture_output=True, text=True, check=True).stdout
    assert "Block size:               4096" in header  # DAX needs the page size
    assert "has_journal" not in header
    listing = debugfs(out, "ls -l /usr/bin")
    assert "100755" in listing and "10004" in listing  # mode and size of usr/bin/tool
    assert debugfs(out, "cat /etc/passwd") == "root:x:0:0:root:/root:/bin/sh\n"
    assert "/bin/busybox" in debugfs(out, "stat /bin/sh")
    assert "41777" in debugfs(out, "ls -l /")  # tmp keeps its sticky bit


def test_a_device_node_has_no_place_in_the_image(tmp_path):
    tree = Tree()
    tree.chardev("dev/console", 5, 1)
    try:
        userland.materialize(tree, tmp_path)
    except Exception as e:
        assert "only the initramfs" in str(e)
    else:
        raise AssertionError("a device node was written into the userland image")
