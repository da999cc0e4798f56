"""Finding the PVH-bootable ELF kernel inside a bzImage (vm_backend/guest_image/kernel.py)."""

from __future__ import annotations

import gzip
import lzma
import struct
import subprocess

import pytest

from vm_backend.guest_image.kernel import extract_vmlinux, has_pvh_entry


def elf_with_note(name: bytes, note_type: int) -> bytes:
    """A minimal ELF64 with one PT_NOTE segment holding one note."""
    padded = name + b"\0" * (-len(name) % 4)
    note = struct.pack("<III", len(name), 4, note_type) + padded + struct.pack("<I", 0x1000000)
    header = bytearray(64)
    header[:6] = b"\x7fELF\x02\x01"
    struct.pack_into("<Q", header, 0x20, 64)  # e_phoff
    struct.pack_into("<HH", header, 0x36, 56, 1)  # e_phentsize, e_phnum
    phdr = struct.pack("<IIQQQQQQ", 4, 0, 64 + 56, 0, 0, len(note), len(note), 4)
    return bytes(header) + phdr + note + b"kernel text" * 100


PVH = elf_with_note(b"Xen\0", 18)


def test_pvh_note_is_recognised() -> None:
    assert has_pvh_entry(PVH)
    assert not has_pvh_entry(elf_with_note(b"Xen\0", 17))  # another Xen note
    assert not has_pvh_entry(elf_with_note(b"GNU\0", 18))
    assert not has_pvh_entry(b"MZ not an elf at all")


@pytest.mark.parametrize("compress", [gzip.compress, lambda data: lzma.compress(data, format=lzma.FORMAT_XZ)])
def test_extracts_the_kernel_behind_the_decompressor(compress) -> None:
    bzimage = b"\xeb\x3c setup code and a decompressor " * 50 + compress(PVH) + b"\0" * 64
    assert extract_vmlinux(bzimage) == PVH


def test_extracts_an_lz4_kernel_as_debian_builds_it() -> None:
    """With the lz4 tool `make setup` installs (Debian's kernels are LZ4-compressed)."""
    payload = subprocess.run(["lz4", "-l", "-c"], input=PVH, capture_output=True, check=True).stdout
    assert extract_vmlinux(b"setup" * 100 + payload + b"trailer") == PVH


def test_no_pvh_kernel_means_none() -> None:
    assert extract_vmlinux(b"setup" * 100 + gzip.compress(elf_with_note(b"GNU\0", 3))) is None
    assert extract_vmlinux(b"no compressed payload here") is None
