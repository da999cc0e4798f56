"""The guest's two trees, laid out from the unpacked packages and the local inputs.

The initramfs holds what mounting the userland image needs and nothing more:
`/init` (init.sh), busybox and the pmem modules. The userland image (ext4,
mapped read-only by every VM: vm_backend/guest_memory.py) is the guest's root:
`/init` and busybox again (the initramfs is gone once the root moves), the
mount points, /etc, the other modules in load order, Python with the agent,
crun, and the shared libraries those need. Nothing else: every file in the
initramfs costs every VM RAM and boot time.
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

# Roots of the module sets; their dependencies come from the modules themselves, and each set skips what an
# earlier one loaded. In the initramfs: what /dev/pmem0 (the userland image) needs. From the image, before the
# agent starts: its port (virtio_pci: the port is on PCI, qemu.py says why), the NIC and the share that SetupPod
# sets up right after Hello, and button + evdev (the
# ACPI power button reaches busybox acpid, so QMP system_powerdown powers the guest off from the first moment).
# In the background once the agent runs (init.sh loads them at the lowest priority, so they take the CPU only
# while the agent waits; StartContainer waits for them): overlay and bridge (a privileged container may mount
# overlays or build bridges inside its VM, as on a node), virtio_balloon (free page reporting returns freed
# guest memory to the host).
BOOT_MODULES = ("nd_e820", "nd_pmem")
AGENT_MODULES = ("virtio_mmio", "virtio_pci", "virtio_console", "virtio_net", "virtiofs", "button", "evdev")
LATER_MODULES = ("overlay", "bridge", "virtio_balloon")
_BINARIES = (f"usr/bin/python{python_bundle.GUEST_PYTHON}", "usr/bin/crun")


@dataclass(frozen=True)
class Layout:
    """What went into the trees, for the build's manifest and its report."""

    boot_modules: list[str]  # in load order, from the initramfs
    modules: list[str]  # in load order, from the image before the agent starts
    later_modules: list[str]  # in load order, from the image once the agent runs
    agent_files: int
    stdlib_modules: int
    dropped_extensions: list[str]  # "name (missing libraries)"


def _add_busybox(tree: Tree, root: Path, applets: list[str]) -> None:
    tree.copy("bin/busybox", root / "bin/busybox", 0o755)
    for applet in applets:
        if applet.strip("/") not in tree.nodes:  # the list names bin/busybox itself
            tree.symlink(applet, "/bin/busybox")


def _boot_tree(root: Path, applets: list[str], modules: list[tuple[str, Path]]) -> Tree:
    """The initramfs: /init, the console, busybox and the modules /dev/pmem0 needs (listed for init.sh)."""
    tree = Tree()
    for directory in ("proc", "dev", "newroot"):
        tree.dir(directory, 0o755)
    tree.chardev("dev/console", 5, 1)
    tree.file("init", INIT_SCRIPT.read_bytes(), 0o755)
    _add_busybox(tree, root, applets)
    for name, path in modules:
        tree.copy(f"lib/modules/{name}.ko", path, 0o644)
    tree.file("etc/tandem/boot-modules", "".join(f"{name}\n" for name, _ in modules).encode())
    return tree


# What init.sh mounts once the image is the root (`mount -a`, one process): the only writable places.
_FSTAB = """\
devpts /dev/pts devpts nosuid,noexec,ptmxmode=0666,mode=0620 0 0
tmpfs /dev/shm tmpfs nosuid,nodev,mode=1777 0 0
tmpfs /run tmpfs nosuid,nodev,mode=0755 0 0
tmpfs /tmp tmpfs nosuid,nodev,mode=1777 0 0
cgroup2 /sys/fs/cgroup cgroup2 nosuid,nodev,noexec,nsdelegate 0 0
"""


def _add_root(tree: Tree) -> None:
    """The root's skeleton: /init, the mount points, /etc (with the power button's action)."""
    tree.file("init", INIT_SCRIPT.read_bytes(), 0o755)
    for directory, mode in (("dev", 0o755), ("proc", 0o555), ("sys", 0o555), ("run", 0o755), ("tmp", 0o1777),
                            ("root", 0o700)):  # fmt: skip
        tree.dir(directory, mode)
    tree.file("etc/fstab", _FSTAB.encode())
    tree.file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n")
    tree.file("etc/group", b"root:x:0:\n")
    tree.file("etc/hosts", b"127.0.0.1 localhost\n::1 localhost\n")
    tree.file("etc/acpi/PWRF/00000080", b"#!/bin/sh\nsync\nexec poweroff -f\n", 0o755)


def _module_sets(root: Path, release: str) -> tuple[dict[str, Path], list[list[str]]]:
    """Every module file by name, and the load order of each set (BOOT, AGENT, LATER) after the ones before."""
    modules_dir = root / "lib/modules" / release
    index = {module_name(p): p for p in modules_dir.rglob("*.ko")}
    loaded = [module_name(line) for line in (modules_dir / "modules.builtin").read_text().split()]
    orders = []
    for wanted in (BOOT_MODULES, AGENT_MODULES, LATER_MODULES):
        order = load_order(module_deps(index, wanted), wanted, loaded)
        orders.append(order)
        loaded += order
    return index, orders


def assemble(root: Path, staging: Path, applets: list[str], release: str) -> tuple[Tree, Tree, Layout]:
    """The initramfs and the userland image's trees, from the packages unpacked in `root`.

    Bytecode is compiled into `staging`.
    """
    index, (boot, agent, later) = _module_sets(root, release)
    initramfs = _boot_tree(root, applets, [(name, index[name]) for name in boot])

    userland = Tree()
    _add_root(userland)
    _add_busybox(userland, root, applets)
    for name in agent + later:
        userland.copy(f"lib/modules/{name}.ko", index[name], 0o644)
    userland.file("etc/tandem/modules", "".join(f"{name}\n" for name in agent).encode())
    userland.file("etc/tandem/modules-later", "".join(f"{name}\n" for name in later).encode())

    linker = Linker(root)
    for binary in _BINARIES:
        missing = linker.add(binary)
        if missing:
            raise FailedPrecondition(f"{binary} needs {', '.join(missing)}: add its package to GUEST_PACKAGES")
        userland.copy(binary, root / binary, 0o755)
    userland.symlink("usr/bin/python3", f"python{python_bundle.GUEST_PYTHON}")
    stdlib_modules, dropped = python_bundle.add_stdlib(userland, root, staging, linker)
    python_bundle.add_protobuf(userland, root, staging, linker)
    linker.install(userland)
    agent_files = python_bundle.add_agent(userland, staging)
    return initramfs, userland, Layout(boot, agent, later, agent_files, stdlib_modules, dropped)
