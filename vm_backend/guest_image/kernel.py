"""The guest kernel as an ELF `vmlinux` that QEMU boots through its PVH entry point.

Debian ships the kernel as a bzImage: a compressed vmlinux behind a small
decompressor. Under TCG that decompressor costs about 0.4 s of every VM boot
(measured here: a probe boot took 2.10 s from a bzImage, 1.67 s from the
vmlinux). A kernel built with CONFIG_PVH carries a Xen PHYS32_ENTRY note, and
QEMU's microvm enters an ELF kernel there, uncompressed, as Firecracker and
Cloud Hypervisor do. Which compressor a kernel uses is a build choice, so each
known one is tried, as the kernel's own scripts/extract-vmlinux does; a kernel
that yields no PVH-capable ELF is booted as a bzImage.
"""

from __future__ import annotations

import lzma
import shutil
import struct
import zlib
from collections.abc import Callable
from pathlib import Path

from core import proc
from core.errors import DeadlineExceeded
from vm_backend.guest_image.elf import is_elf64, segments
from vm_backend.guest_image.store import BZIMAGE_FILE, KERNEL_FILE

_PT_NOTE = 4
_XEN_ELFNOTE_PHYS32_ENTRY = 18
_TOOL_TIMEOUT = 120


def _zlib(payload: bytes) -> bytes:
    return zlib.decompressobj(wbits=31).decompress(payload)  # gzip framing; trailing bytes are ignored


def _xz(payload: bytes) -> bytes:
    return lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(payload)


def _tool(*argv: str) -> Callable[[bytes], bytes]:
    """Decompress with a command-line tool reading stdin (lz4 and zstd have no stdlib module)."""

    def run(payload: bytes) -> bytes:
        if shutil.which(argv[0]) is None:
            return b""
        result = proc.run_blocking(argv, input=payload, timeout=_TOOL_TIMEOUT)
        return result.stdout  # a trailing-garbage warning still leaves the kernel on stdout

    return run


# Payload magic -> decompressor, the compressors Debian's and upstream's x86 configs choose from.
_COMPRESSORS: tuple[tuple[bytes, Callable[[bytes], bytes]], ...] = (
    (b"\x02\x21\x4c\x18", _tool("lz4", "-dc")),  # LZ4 legacy frame (Debian's cloud kernel)
    (b"\x28\xb5\x2f\xfd", _tool("zstd", "-dcq")),
    (b"\xfd7zXZ\x00", _xz),
    (b"\x1f\x8b\x08", _zlib),
)


def has_pvh_entry(elf: bytes) -> bool:
    """Whether this ELF64 kernel carries the Xen PHYS32_ENTRY note that PVH boot starts from."""
    if not is_elf64(elf):
        return False
    for p_type, offset, size in segments(elf):
        if p_type != _PT_NOTE:
            continue
        pos, end = offset, offset + size
        while pos + 12 <= end:
            namesz, descsz, note_type = struct.unpack_from("<III", elf, pos)
            name = elf[pos + 12 : pos + 12 + namesz].rstrip(b"\0")
            if name == b"Xen" and note_type == _XEN_ELFNOTE_PHYS32_ENTRY:
                return True
            pos += 12 + (namesz + 3) // 4 * 4 + (descsz + 3) // 4 * 4
    return False


def extract_vmlinux(bzimage: bytes) -> bytes | None:
    """The ELF kernel inside a bzImage, if a known compressor yields one with a PVH entry; else None."""
    for magic, decompress in _COMPRESSORS:
        start = bzimage.find(magic)
        while start != -1:
            try:
                elf = decompress(bzimage[start:])
            except (lzma.LZMAError, zlib.error, DeadlineExceeded):
                elf = b""
            if has_pvh_entry(elf):
                return elf
            start = bzimage.find(magic, start + 1)
    return None


def install_kernel(bzimage: Path, out: Path) -> str:
    """Write the kernel VMs boot into `out`: the PVH vmlinux when one can be had, else the bzImage."""
    vmlinux = extract_vmlinux(bzimage.read_bytes())
    if vmlinux is None:
        shutil.copyfile(bzimage, out / BZIMAGE_FILE)
        return BZIMAGE_FILE
    (out / KERNEL_FILE).write_bytes(vmlinux)
    return KERNEL_FILE
