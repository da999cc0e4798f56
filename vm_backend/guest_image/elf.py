"""ELF reading for the guest image builder: what a binary needs, what a kernel module depends on.

Only 64-bit little-endian images are read (the guest is x86-64). Every input is a
file from a Debian package the builder just unpacked, or the kernel it extracts.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

_DT_NEEDED = 1
_PT_INTERP = 3


@dataclass(frozen=True)
class Elf:
    """The parts of a 64-bit little-endian ELF file the builder needs."""

    needed: tuple[str, ...]
    interpreter: str | None
    modinfo: Mapping[str, str]


def _sections(data: bytes) -> dict[str, tuple[int, int, int, int]]:
    """Section name -> (type, offset, size, link)."""
    shoff: int = struct.unpack_from("<Q", data, 0x28)[0]
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    raw: list[tuple[int, ...]] = [struct.unpack_from("<IIQQQQII", data, shoff + i * shentsize) for i in range(shnum)]
    strtab_off = raw[shstrndx][4]
    result = {}
    for name_off, sh_type, _flags, _addr, offset, size, link, _info in raw:
        end = data.index(b"\0", strtab_off + name_off)
        result[data[strtab_off + name_off : end].decode()] = (sh_type, offset, size, link)
    return result


def is_elf64(data: bytes) -> bool:
    """A 64-bit little-endian ELF image: the only kind the builder reads."""
    return data[:4] == b"\x7fELF" and len(data) > 5 and data[4] == 2 and data[5] == 1


def segments(data: bytes) -> Iterator[tuple[int, int, int]]:
    """(type, file offset, file size) of each program header of an ELF64 image."""
    phoff: int = struct.unpack_from("<Q", data, 0x20)[0]
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    for i in range(phnum):
        p_type, _flags, p_offset, _vaddr, _paddr, p_filesz = struct.unpack_from("<IIQQQQ", data, phoff + i * phentsize)
        yield p_type, p_offset, p_filesz


def read_elf(data: bytes) -> Elf:
    """Read DT_NEEDED, PT_INTERP and `.modinfo` from an ELF64 image (executable, library or module)."""
    if not is_elf64(data):
        raise ValueError("not a 64-bit little-endian ELF file")
    sections = _sections(data)
    needed: list[str] = []
    dynamic = sections.get(".dynamic")
    if dynamic is not None:
        _t, offset, size, link = dynamic
        strtab_off = list(sections.values())[link][1]
        for pos in range(offset, offset + size, 16):
            tag, value = struct.unpack_from("<qQ", data, pos)
            if tag == 0:
                break
            if tag == _DT_NEEDED:
                needed.append(data[strtab_off + value : data.index(b"\0", strtab_off + value)].decode())
    interpreter = None
    for p_type, p_offset, p_filesz in segments(data):
        if p_type == _PT_INTERP:
            interpreter = data[p_offset : p_offset + p_filesz].rstrip(b"\0").decode()
    modinfo: dict[str, str] = {}
    if ".modinfo" in sections:
        _t, offset, size, _link = sections[".modinfo"]
        for item in data[offset : offset + size].split(b"\0"):
            key, sep, value = item.decode(errors="replace").partition("=")
            if sep:
                modinfo.setdefault(key, value)
    return Elf(tuple(needed), interpreter, modinfo)
