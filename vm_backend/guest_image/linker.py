"""The shared libraries a guest binary needs, found as the dynamic loader would, in the unpacked packages.

The walk reads each ELF's DT_NEEDED and PT_INTERP and looks the sonames up in
the guest's library directories of the unpacked tree (never the host's), so the
initramfs holds exactly what its binaries load.
"""

from __future__ import annotations

import os
from pathlib import Path

from core.errors import FailedPrecondition
from vm_backend.guest_image.cpio import Tree
from vm_backend.guest_image.elf import read_elf

LIB_DIRS = ("lib/x86_64-linux-gnu", "usr/lib/x86_64-linux-gnu")


def resolve(root: Path, rel: str) -> str:
    """Follow symlinks of an unpacked package tree inside that tree (absolute targets are relative to it)."""
    for _ in range(40):
        path = root / rel
        if not path.is_symlink():
            return rel
        target = os.readlink(path)
        joined = target if target.startswith("/") else f"{os.path.dirname(rel)}/{target}"
        rel = os.path.normpath(joined).lstrip("/")
    raise FailedPrecondition(f"guest packages: symlink loop at {rel}")


class Linker:
    """Finds the shared libraries (and the loader) a binary needs inside the unpacked packages."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.libs: dict[str, str] = {}  # soname -> unpacked path holding it
        self.interpreters: dict[str, str] = {}  # PT_INTERP path -> unpacked path

    def _find(self, soname: str) -> str | None:
        for directory in LIB_DIRS:
            if os.path.lexists(self.root / directory / soname):
                return resolve(self.root, f"{directory}/{soname}")
        return None

    def add(self, rel: str) -> list[str]:
        """Record everything `rel` needs; return the sonames that no package provides (nothing recorded then)."""
        libs: dict[str, str] = {}
        interpreters: dict[str, str] = {}
        missing: list[str] = []
        todo = [rel]
        while todo:
            elf = read_elf((self.root / todo.pop()).read_bytes())
            if elf.interpreter:
                interpreters[elf.interpreter] = resolve(self.root, elf.interpreter.lstrip("/"))
            for soname in elf.needed:
                if soname in libs or soname in self.libs:
                    continue
                found = self._find(soname)
                if found is None:
                    missing.append(soname)
                else:
                    libs[soname] = found
                    todo.append(found)
        if not missing:
            self.libs |= libs
            self.interpreters |= interpreters
        return missing

    def install(self, tree: Tree) -> None:
        """Copy every library recorded so far, and the loader, into the guest's tree."""
        for soname, rel in sorted(self.libs.items()):
            tree.copy(f"{LIB_DIRS[0]}/{soname}", self.root / rel, 0o755)
        for interpreter, rel in sorted(self.interpreters.items()):
            tree.copy(interpreter, self.root / rel, 0o755)
