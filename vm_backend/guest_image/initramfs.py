"""The guest's root filesystem, laid out from the unpacked packages and the local inputs.

What a pod VM holds: `/init` (init.sh), busybox and its applets, the virtio
modules in load order, Python with the agent, crun, and the shared libraries
those need. Nothing else: every file costs boot time under TCG.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from core.errors import FailedPrecondition
from vm_backend.guest_image import python_bundle
from vm_backend.guest_image.cpio import Tree
from vm_backend.guest_image.linker import Linker
from vm_backend.guest_image.modules import load_order, module_deps, module_name

INIT_SCRIPT = Path(__file__).parent / "init.sh"

# Roots of the module set; their dependencies come from the modules themselves. button + evdev: the
# ACPI power button reaches busybox acpid, so QMP system_powerdown powers the guest off. bridge: a
# privileged container (or one with CAP_NET_ADMIN) may build bridges inside its VM, as on a node.
# virtio_balloon: free page reporting returns freed guest memory to the host.
GUEST_MODULES = (
    "virtio_mmio", "virtio_console", "virtio_net", "virtiofs", "overlay", "button", "evdev", "bridge", "virtio_balloon",
)  # fmt: skip
_BINARIES = (f"usr/bin/python{python_bundle.GUEST_PYTHON}", "usr/bin/crun")


@dataclass(frozen=True)
class Layout:
    """What went into the tree, for the build's manifest and its report."""

    modules: list[str]  # in load order
    agent_files: int
    stdlib_modules: int
    dropped_extensions: list[str]  # "name (missing libraries)"


def _add_base(tree: Tree, root: Path, applets: list[str]) -> None:
    """The skeleton a busybox system boots with: directories, device nodes, /etc files, /init, applets."""
    for directory, mode in (("proc", 0o555), ("sys", 0o555), ("run", 0o755), ("tmp", 0o1777), ("root", 0o700)):
        tree.dir(directory, mode)
    tree.chardev("dev/console", 5, 1)
    tree.chardev("dev/null", 1, 3, 0o666)
    tree.file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n")
    tree.file("etc/group", b"root:x:0:\n")
    tree.file("etc/hosts", b"127.0.0.1 localhost\n::1 localhost\n")
    tree.file("init", INIT_SCRIPT.read_bytes(), 0o755)
    tree.file("etc/acpi/PWRF/00000080", b"#!/bin/sh\nsync\nexec poweroff -f\n", 0o755)

    tree.copy("bin/busybox", root / "bin/busybox", 0o755)
    for applet in applets:
        if applet.strip("/") not in tree.nodes:  # the list names bin/busybox itself
            tree.symlink(applet, "/bin/busybox")


def _add_modules(tree: Tree, root: Path, release: str) -> list[str]:
    """GUEST_MODULES and their dependencies, with /etc/tandem/modules listing them for init.sh's insmod."""
    modules_dir = root / "lib/modules" / release
    index = {module_name(p): p for p in modules_dir.rglob("*.ko")}
    builtin = [module_name(line) for line in (modules_dir / "modules.builtin").read_text().split()]
    order = load_order(module_deps(index, GUEST_MODULES), GUEST_MODULES, builtin)
    for name in order:
        tree.copy(f"lib/modules/{name}.ko", index[name], 0o644)
    tree.file("etc/tandem/modules", "".join(f"{name}\n" for name in order).encode())
    return order


def assemble(root: Path, staging: Path, applets: list[str], release: str) -> tuple[Tree, Layout]:
    """Lay out the guest filesystem from the packages unpacked in `root`; bytecode is compiled into `staging`."""
    tree = Tree()
    _add_base(tree, root, applets)
    order = _add_modules(tree, root, release)

    linker = Linker(root)
    for binary in _BINARIES:
        missing = linker.add(binary)
        if missing:
            raise FailedPrecondition(f"{binary} needs {', '.join(missing)}: add its package to GUEST_PACKAGES")
        tree.copy(binary, root / binary, 0o755)
    tree.symlink("usr/bin/python3", f"python{python_bundle.GUEST_PYTHON}")
    stdlib_modules, dropped = python_bundle.add_stdlib(tree, root, staging, linker)
    python_bundle.add_protobuf(tree, root, staging, linker)
    linker.install(tree)
    agent_files = python_bundle.add_agent(tree, staging)
    return tree, Layout(order, agent_files, stdlib_modules, dropped)
