"""Guest assets: the kernel and initramfs every pod VM boots, built here from Debian packages.

The kernel is Debian's cloud kernel, downloaded and unpacked (never installed on
the host). The initramfs holds busybox, the virtio modules, a trimmed Python
3.11 with protobuf's upb runtime, crun, the agent and `/init`.

Assets live in `<state_dir>/vm/assets/<digest>/` where the digest covers every
input (package versions, the agent's files, init.sh, the builder's own code), so
a changed input means a new directory, and `current` points at the last build.
"""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import json
import os
import py_compile
import re
import shutil
import sys
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import google.protobuf

import protos
from core import proc
from core.errors import CommandFailed, FailedPrecondition
from core.files import atomic_write_json, private_dir
from vm_backend import initramfs, kernel_image
from vm_backend.initramfs import Tree

KERNEL_PACKAGE = "linux-image-cloud-amd64"  # the metapackage; resolved to its versioned image package
GUEST_PACKAGES = (
    "busybox-static",
    "python3.11-minimal",
    "libpython3.11-minimal",
    "libpython3.11-stdlib",
    "libc6",  # the loader, libc, libm
    "zlib1g",
    "libexpat1",
    "libffi8",  # ctypes
    "libstdc++6",  # protobuf's upb extension
    "libgcc-s1",
    "crun",  # the guest's OCI runtime (vm_backend/agent/containers.py says why not runc)
    "libseccomp2",
    "libcap2",
    "libyajl2",
    "libsystemd0",
    "libgcrypt20",
    "libgpg-error0",
    "liblz4-1",
    "liblzma5",
    "libzstd1",
)
# Roots of the module set; their dependencies come from the modules themselves. button + evdev: the
# ACPI power button reaches busybox acpid, so QMP system_powerdown powers the guest off. bridge: a
# privileged container (or one with CAP_NET_ADMIN) may build bridges inside its VM, as on a node.
# virtio_balloon: free page reporting returns freed guest memory to the host.
GUEST_MODULES = (
    "virtio_mmio", "virtio_console", "virtio_net", "virtiofs", "overlay", "button", "evdev", "bridge", "virtio_balloon",
)  # fmt: skip
GUEST_PYTHON = "3.11"

KERNEL_FILE = "vmlinux"  # the ELF kernel, booted through its PVH entry (vm_backend/kernel_image.py)
BZIMAGE_FILE = "vmlinuz"  # the packaged bzImage, booted when no PVH-capable ELF comes out of it
INITRAMFS_FILE = "initramfs.cpio"
MANIFEST_FILE = "manifest.json"

_PACKAGE_DIR = Path(__file__).parent
_INIT_SCRIPT = _PACKAGE_DIR / "init.sh"
_AGENT_DIR = _PACKAGE_DIR / "agent"
_AGENT_PB2 = Path(protos.__file__).parent / "agent_pb2.py"
_PROTOBUF_DIR = Path(google.protobuf.__file__).parent
# protobuf's C runtime: under TCG it imports the agent's messages in about half the time of the
# pure-Python one, and parses each message faster.
_UPB_EXTENSION = _PROTOBUF_DIR.parent / "_upb" / "_message.abi3.so"
_BUILDER_FILES = (Path(__file__), Path(initramfs.__file__), Path(kernel_image.__file__))
_AGENT_ROOT = "opt/tandem/agent"
_STDLIB = f"usr/lib/python{GUEST_PYTHON}"
_LIB_DIRS = ("lib/x86_64-linux-gnu", "usr/lib/x86_64-linux-gnu")

# What the agent never imports: dropped to keep the initramfs (and its unpacking under TCG) small.
_STDLIB_DROP = {
    "test", "idlelib", "tkinter", "turtledemo", "ensurepip", "lib2to3", "pydoc_data", "distutils",
    "venv", "unittest", "sqlite3", "curses", "dbm", "xmlrpc", "wsgiref", "site-packages",
    "dist-packages", "pydoc.py", "doctest.py", "turtle.py", "antigravity.py", "this.py",
    "__hello__.py", "__phello__", "_pydecimal.py", "LICENSE.txt", "EXTERNALLY-MANAGED",
    "sitecustomize.py",  # a symlink into the host's /etc; `python3 -S` never imports it anyway
}  # fmt: skip
_ENCODINGS_KEEP = {
    "__init__", "aliases", "ascii", "latin_1", "utf_8", "utf_8_sig", "utf_16", "utf_16_le", "utf_16_be",
    "utf_32", "utf_32_le", "utf_32_be", "idna", "punycode", "raw_unicode_escape", "unicode_escape",
}  # fmt: skip
# CJK codecs: their encodings modules are not shipped either.
_EXTENSION_DROP = re.compile(r"^(_test|_xx|xx|_ctypes_test|audioop|ossaudiodev|_codecs_|_multibytecodec)")
_PROTOBUF_DROP = frozenset(
    {
        "testdata",
        "__pycache__",
        "json_format_benchmark.py",
        "message_benchmark.py",
        "testing_refleaks.py",
    }
)

Progress = Callable[[str], None]


@dataclass(frozen=True)
class AssetInputs:
    """Everything a build depends on; its digest names the asset directory."""

    packages: dict[str, str]  # Debian package -> version (the kernel as its versioned image package)
    files: dict[str, str]  # input file label -> sha256

    @property
    def kernel_package(self) -> str:
        return next(p for p in self.packages if p.startswith("linux-image-"))

    def digest(self) -> str:
        blob = json.dumps({"packages": self.packages, "files": self.files}, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


@dataclass(frozen=True)
class GuestAssets:
    """A built kernel + initramfs pair and what it was built from."""

    dir: Path
    digest: str
    kernel: Path
    initramfs: Path
    kernel_release: str
    manifest: dict[str, Any]


def assets_root(state_dir: Path) -> Path:
    return state_dir / "vm" / "assets"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _tree_files(top: Path, drop: frozenset[str] = frozenset({"__pycache__"})) -> Iterator[Path]:
    """Regular files under `top`, sorted, skipping any path component in `drop` and compiled extensions."""
    for path in sorted(top.rglob("*")):
        rel = path.relative_to(top)
        if path.is_file() and not drop.intersection(rel.parts) and path.suffix not in (".pyc", ".so"):
            yield path


def input_files() -> dict[str, Path]:
    """Every local file that goes into (or builds) the initramfs, by a stable label."""
    files = {"init.sh": _INIT_SCRIPT, "protos/agent_pb2.py": _AGENT_PB2}
    files |= {f"builder/{p.name}": p for p in _BUILDER_FILES}
    if _AGENT_DIR.is_dir():
        files |= {f"agent/{p.relative_to(_AGENT_DIR)}": p for p in _tree_files(_AGENT_DIR)}
    files |= {f"protobuf/{p.relative_to(_PROTOBUF_DIR)}": p for p in _tree_files(_PROTOBUF_DIR, _PROTOBUF_DROP)}
    files["protobuf/_upb/_message.abi3.so"] = _UPB_EXTENSION
    return files


def _parse_apt_records(text: str) -> dict[str, dict[str, str]]:
    """`apt-cache show` output -> {package: {field: value}} (first record of each package wins)."""
    records: dict[str, dict[str, str]] = {}
    for block in text.split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line and not line.startswith(" "))
        if "Package" in fields:
            records.setdefault(fields["Package"], fields)
    return records


def kernel_image_dependency(depends: str) -> tuple[str, str]:
    """`linux-image-6.1.0-56-cloud-amd64 (= 6.1.192-2)` -> (package, version), from the metapackage's Depends."""
    match = re.search(r"(linux-image-[\w.+-]+)\s*\(=\s*([^)\s]+)\)", depends)
    if match is None:
        raise FailedPrecondition(f"{KERNEL_PACKAGE}: no versioned kernel image in Depends: {depends!r}")
    return match.group(1), match.group(2)


async def _apt_show(packages: list[str], update: bool) -> dict[str, dict[str, str]]:
    argv = ["apt-cache", "show", "--no-all-versions", *packages]
    result = await proc.run(argv, check=False, timeout=120)
    if result.returncode != 0 and update:
        await proc.run(["apt-get", "update", "-q"], timeout=600)
        result = await proc.run(argv, check=False, timeout=120)
    if result.returncode != 0:
        raise FailedPrecondition(
            f"apt-cache cannot find the guest packages ({result.stderr.decode(errors='replace').strip()}); "
            "run `apt-get update`"
        )
    return _parse_apt_records(result.stdout.decode())


async def resolve_inputs(update: bool = False) -> AssetInputs:
    """The package versions apt would fetch now, and the hashes of the local inputs.

    With `update`, a failed lookup runs `apt-get update` once (a fresh host may have no lists).
    """
    records = await _apt_show([KERNEL_PACKAGE, *GUEST_PACKAGES], update)
    missing = [p for p in (KERNEL_PACKAGE, *GUEST_PACKAGES) if p not in records]
    if missing:
        raise FailedPrecondition(f"apt knows no package {', '.join(missing)}; run `apt-get update`")
    kernel, kernel_version = kernel_image_dependency(records[KERNEL_PACKAGE].get("Depends", ""))
    packages = {kernel: kernel_version} | {p: records[p]["Version"] for p in GUEST_PACKAGES}
    files = await asyncio.to_thread(lambda: {label: _sha256(p) for label, p in sorted(input_files().items())})
    return AssetInputs(packages, files)


def _load(directory: Path) -> GuestAssets | None:
    try:
        manifest = json.loads((directory / MANIFEST_FILE).read_text())
    except (OSError, ValueError):
        return None
    kernel, image = directory / manifest.get("kernel_file", BZIMAGE_FILE), directory / INITRAMFS_FILE
    if not (kernel.is_file() and image.is_file()):
        return None
    return GuestAssets(directory, manifest["digest"], kernel, image, manifest["kernel_release"], manifest)


def current_assets(state_dir: Path) -> GuestAssets | None:
    """The last built assets (no freshness check, no apt): what a pod boots."""
    return _load((assets_root(state_dir) / "current").resolve())


@dataclass(frozen=True)
class AssetStatus:
    current: GuestAssets | None
    inputs: AssetInputs

    @property
    def fresh(self) -> bool:
        return self.current is not None and self.current.digest == self.inputs.digest()


async def asset_status(state_dir: Path) -> AssetStatus:
    """Compare what is built with what would be built now (for `tandem doctor`)."""
    return AssetStatus(current_assets(state_dir), await resolve_inputs())


@asynccontextmanager
async def _build_lock(root: Path) -> AsyncIterator[None]:
    """One builder at a time (`make setup` and a test session may race): flock a file beside the assets."""
    fd = os.open(private_dir(root) / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        await asyncio.to_thread(fcntl.flock, fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _point_current(root: Path, digest: str) -> None:
    tmp = root / f".current.{os.getpid()}"
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(digest)
    os.replace(tmp, root / "current")


async def ensure_assets(state_dir: Path, *, force: bool = False, progress: Progress = print) -> GuestAssets:
    """Return up-to-date assets, building them first if any input changed (or `force`).

    Older builds are removed once the new one is current: QEMU reads the kernel and
    initramfs at launch, so running VMs do not need their files any more.
    """
    inputs = await resolve_inputs(update=True)
    digest = inputs.digest()
    root = assets_root(state_dir)
    async with _build_lock(root):
        assets = None if force else _load(root / digest)
        if assets is None:
            progress(f"building guest assets {digest} in {root}")
            assets = await _build(state_dir, inputs, progress)
        _point_current(root, digest)
        for old in root.iterdir():
            if old.name not in (digest, "current") and not old.name.startswith("."):
                shutil.rmtree(old, ignore_errors=True)
        return assets


def _deb_prefix(package: str, version: str) -> str:
    """The file name `apt-get download` gives a package, up to the architecture."""
    return f"{package}_{version.replace(':', '%3a')}_"


async def _download(cache: Path, packages: dict[str, str], progress: Progress) -> list[Path]:
    """The packages' .deb files, from the cache or `apt-get download`; stale cached .debs are removed."""
    private_dir(cache)

    def cached(package: str, version: str) -> Path | None:
        return next(iter(sorted(cache.glob(f"{_deb_prefix(package, version)}*.deb"))), None)

    missing = [f"{p}={v}" for p, v in packages.items() if cached(p, v) is None]
    if missing:
        progress(f"downloading {len(missing)} Debian packages: {' '.join(missing)}")
        await proc.run(["apt-get", "download", "-q", "-o", "APT::Sandbox::User=root", *missing], cwd=cache, timeout=900)
    debs = []
    for package, version in packages.items():
        deb = cached(package, version)
        if deb is None:
            raise FailedPrecondition(f"apt-get download left no .deb for {package}={version} in {cache}")
        debs.append(deb)
    for stale in set(cache.glob("*.deb")) - set(debs):
        stale.unlink()
    return debs


def _resolve(root: Path, rel: str) -> str:
    """Follow symlinks of an unpacked package tree inside that tree (absolute targets are relative to it)."""
    for _ in range(40):
        path = root / rel
        if not path.is_symlink():
            return rel
        target = os.readlink(path)
        joined = target if target.startswith("/") else f"{os.path.dirname(rel)}/{target}"
        rel = os.path.normpath(joined).lstrip("/")
    raise FailedPrecondition(f"guest packages: symlink loop at {rel}")


class _Linker:
    """Finds the shared libraries (and the loader) a binary needs inside the unpacked packages."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.libs: dict[str, str] = {}  # soname -> unpacked path holding it
        self.interpreters: dict[str, str] = {}  # PT_INTERP path -> unpacked path

    def _find(self, soname: str) -> str | None:
        for directory in _LIB_DIRS:
            if os.path.lexists(self.root / directory / soname):
                return _resolve(self.root, f"{directory}/{soname}")
        return None

    def add(self, rel: str) -> list[str]:
        """Record everything `rel` needs; return the sonames that no package provides (nothing recorded then)."""
        libs: dict[str, str] = {}
        interpreters: dict[str, str] = {}
        missing: list[str] = []
        todo = [rel]
        while todo:
            elf = initramfs.read_elf((self.root / todo.pop()).read_bytes())
            if elf.interpreter:
                interpreters[elf.interpreter] = _resolve(self.root, elf.interpreter.lstrip("/"))
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
        for soname, rel in sorted(self.libs.items()):
            tree.copy(f"{_LIB_DIRS[0]}/{soname}", self.root / rel, 0o755)
        for interpreter, rel in sorted(self.interpreters.items()):
            tree.copy(interpreter, self.root / rel, 0o755)


def _compile(source: Path, staging: Path, guest: str, optimize: int) -> Path:
    """Bytecode that is never checked against a source (hash-based, unchecked): import is one read under TCG."""
    out = staging / guest
    out.parent.mkdir(parents=True, exist_ok=True)
    py_compile.compile(
        str(source),
        cfile=str(out),
        dfile=f"/{guest}",
        doraise=True,
        optimize=optimize,
        invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH,
    )
    return out


def _add_sourceless(tree: Tree, staging: Path, source: Path, guest_py: str, optimize: int = 2) -> None:
    """`x.py` becomes `x.pyc` in its place (legacy layout): no source shipped, docstrings and asserts gone."""
    guest = guest_py.removesuffix(".py") + ".pyc"
    tree.copy(guest, _compile(source, staging, guest, optimize), 0o644)


def _add_stdlib(tree: Tree, root: Path, staging: Path, linker: _Linker) -> dict[str, Any]:
    stdlib = root / _STDLIB
    modules = 0
    dropped: list[str] = []
    for path in sorted(stdlib.rglob("*.py")):
        rel = path.relative_to(stdlib)
        if _STDLIB_DROP.intersection(rel.parts):
            continue
        if rel.parts[0] == "encodings" and path.stem not in _ENCODINGS_KEEP:
            continue
        real = root / _resolve(root, str(path.relative_to(root)))
        _add_sourceless(tree, staging, real, f"{_STDLIB}/{rel}")
        modules += 1
    for path in sorted((stdlib / "lib-dynload").glob("*.so")):
        rel = str(path.relative_to(root))
        if _EXTENSION_DROP.match(path.name):
            continue
        missing = linker.add(rel)
        if missing:
            dropped.append(f"{path.name.split('.')[0]} ({', '.join(missing)})")
        else:
            tree.copy(rel, path, 0o644)
    return {"stdlib_modules": modules, "dropped_extensions": dropped}


def _add_agent(tree: Tree, staging: Path) -> int:
    """The agent keeps its sources (readable tracebacks) next to unchecked .pyc files in __pycache__."""
    agent_files = list(_tree_files(_AGENT_DIR)) if _AGENT_DIR.is_dir() else []
    sources = [(p, f"{_AGENT_ROOT}/vm_backend/agent/{p.relative_to(_AGENT_DIR)}") for p in agent_files]
    sources.append((_AGENT_PB2, f"{_AGENT_ROOT}/protos/agent_pb2.py"))
    for package in ("vm_backend", "protos"):
        tree.file(f"{_AGENT_ROOT}/{package}/__init__.py", b"")
    for source, guest in sources:
        tree.copy(guest, source, 0o644)
        if source.suffix == ".py":
            cached = Path(guest).parent / "__pycache__" / f"{source.stem}.cpython-{GUEST_PYTHON.replace('.', '')}.pyc"
            tree.copy(str(cached), _compile(source, staging, str(cached), 0), 0o644)
    return len(agent_files)


def _add_protobuf(tree: Tree, root: Path, staging: Path, linker: _Linker) -> None:
    for path in _tree_files(_PROTOBUF_DIR, _PROTOBUF_DROP):
        guest = f"{_AGENT_ROOT}/google/protobuf/{path.relative_to(_PROTOBUF_DIR)}"
        if path.suffix == ".py":
            _add_sourceless(tree, staging, path, guest)
    upb = f"{_AGENT_ROOT}/google/_upb/{_UPB_EXTENSION.name}"
    (root / upb).parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(_UPB_EXTENSION, root / upb)  # where the linker looks for what it needs
    missing = linker.add(upb)
    if missing:
        raise FailedPrecondition(f"protobuf's upb extension needs {', '.join(missing)}: add its package")
    tree.copy(upb, root / upb, 0o755)


def _assemble(root: Path, staging: Path, applets: list[str], release: str) -> tuple[Tree, dict[str, Any]]:
    """Lay out the guest filesystem from the unpacked packages and the local inputs."""
    tree = Tree()
    for directory, mode in (("proc", 0o555), ("sys", 0o555), ("run", 0o755), ("tmp", 0o1777), ("root", 0o700)):
        tree.dir(directory, mode)
    tree.chardev("dev/console", 5, 1)
    tree.chardev("dev/null", 1, 3, 0o666)
    tree.file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n")
    tree.file("etc/group", b"root:x:0:\n")
    tree.file("etc/hosts", b"127.0.0.1 localhost\n::1 localhost\n")
    tree.file("init", _INIT_SCRIPT.read_bytes(), 0o755)
    tree.file("etc/acpi/PWRF/00000080", b"#!/bin/sh\nsync\nexec poweroff -f\n", 0o755)

    tree.copy("bin/busybox", root / "bin/busybox", 0o755)
    for applet in applets:
        if applet.strip("/") not in tree.nodes:  # the list names bin/busybox itself
            tree.symlink(applet, "/bin/busybox")

    modules_dir = root / "lib/modules" / release
    index = {initramfs.module_name(p): p for p in modules_dir.rglob("*.ko")}
    builtin = [initramfs.module_name(line) for line in (modules_dir / "modules.builtin").read_text().split()]
    order = initramfs.load_order(initramfs.module_deps(index, GUEST_MODULES), GUEST_MODULES, builtin)
    for name in order:
        tree.copy(f"lib/modules/{name}.ko", index[name], 0o644)
    tree.file("etc/tandem/modules", "".join(f"{name}\n" for name in order).encode())

    linker = _Linker(root)
    for binary in (f"usr/bin/python{GUEST_PYTHON}", "usr/bin/crun"):
        missing = linker.add(binary)
        if missing:
            raise FailedPrecondition(f"{binary} needs {', '.join(missing)}: add its package to GUEST_PACKAGES")
        tree.copy(binary, root / binary, 0o755)
    tree.symlink("usr/bin/python3", f"python{GUEST_PYTHON}")
    python = _add_stdlib(tree, root, staging, linker)
    _add_protobuf(tree, root, staging, linker)
    linker.install(tree)
    agent_files = _add_agent(tree, staging)
    return tree, {"modules": order, "agent_files": agent_files, **python}


def _install_kernel(bzimage: Path, out: Path) -> str:
    """Write the kernel VMs boot into `out`: the PVH vmlinux when one can be had, else the bzImage."""
    vmlinux = kernel_image.extract_vmlinux(bzimage.read_bytes())
    if vmlinux is None:
        shutil.copyfile(bzimage, out / BZIMAGE_FILE)
        return BZIMAGE_FILE
    (out / KERNEL_FILE).write_bytes(vmlinux)
    return KERNEL_FILE


async def _build(state_dir: Path, inputs: AssetInputs, progress: Progress) -> GuestAssets:
    if f"{sys.version_info.major}.{sys.version_info.minor}" != GUEST_PYTHON:
        raise FailedPrecondition(f"the guest's bytecode is compiled here: run Tandem with Python {GUEST_PYTHON}")
    vm_dir = state_dir / "vm"
    debs = await _download(vm_dir / "debs", inputs.packages, progress)
    digest = inputs.digest()
    root_dir = assets_root(state_dir)
    with tempfile.TemporaryDirectory(prefix=".build-", dir=root_dir) as tmp:
        unpacked, staging, out = Path(tmp, "root"), Path(tmp, "pyc"), Path(tmp, "out")
        progress(f"unpacking {len(debs)} packages")
        for deb in debs:
            await proc.run(["dpkg-deb", "-x", deb, unpacked], timeout=300)
        release = inputs.kernel_package.removeprefix("linux-image-")
        try:
            applets = (await proc.run([unpacked / "bin/busybox", "--list-full"])).stdout.decode().split()
        except CommandFailed as e:
            raise FailedPrecondition(f"the guest's busybox does not run here: {e}") from e
        progress(f"assembling the initramfs (kernel {release}, Python {GUEST_PYTHON} bytecode, crun, agent)")
        tree, details = await asyncio.to_thread(_assemble, unpacked, staging, applets, release)
        out.mkdir()
        kernel_file = await asyncio.to_thread(_install_kernel, unpacked / "boot" / f"vmlinuz-{release}", out)
        if kernel_file == BZIMAGE_FILE:
            progress("the kernel yields no PVH-capable vmlinux: VMs boot the bzImage (slower under TCG)")
        payload = tree.payload_bytes()
        size = await asyncio.to_thread(initramfs.write_initramfs, tree, out / INITRAMFS_FILE)
        manifest = {
            "digest": digest,
            "kernel_release": release,
            "kernel_file": kernel_file,
            "packages": inputs.packages,
            "files": inputs.files,
            "initramfs_bytes": size,
            "initramfs_entries": len(tree.nodes),
            "initramfs_payload_bytes": payload,
            **details,
        }
        atomic_write_json(out / MANIFEST_FILE, manifest, mode=0o644)
        if details["agent_files"] == 0:
            progress("warning: vm_backend/agent/ is empty: the guest will power off with 'the agent is missing'")
        if details["dropped_extensions"]:
            progress(f"python extensions left out (libraries not shipped): {', '.join(details['dropped_extensions'])}")
        progress(
            f"modules: {' '.join(details['modules'])}\n"
            f"initramfs: {len(tree.nodes)} entries, {payload / 2**20:.1f} MiB of files, {size / 2**20:.1f} MiB"
        )
        shutil.rmtree(root_dir / digest, ignore_errors=True)
        out.rename(root_dir / digest)
    assets = _load(root_dir / digest)
    assert assets is not None
    return assets
