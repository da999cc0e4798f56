"""Everything a guest image is built from, and the digest that names the build.

The digest covers every input: the Debian package versions apt would fetch now,
and the hash of every local file that goes into the image or builds it (init.sh,
the agent, protobuf, and each module of this package). A changed input means a
new build directory.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

from core.errors import FailedPrecondition
from vm_backend.guest_image import apt, python_bundle
from vm_backend.guest_image.initramfs import INIT_SCRIPT

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
_BUILDER_DIR = Path(__file__).parent


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


def input_files() -> dict[str, Path]:
    """Every local file that goes into (or builds) the initramfs, by a stable label."""
    files = {"init.sh": INIT_SCRIPT}
    files |= {f"builder/{p.name}": p for p in sorted(_BUILDER_DIR.glob("*.py"))}
    return files | python_bundle.sources()


def kernel_image_dependency(depends: str) -> tuple[str, str]:
    """`linux-image-6.1.0-56-cloud-amd64 (= 6.1.192-2)` -> (package, version), from the metapackage's Depends."""
    match = re.search(r"(linux-image-[\w.+-]+)\s*\(=\s*([^)\s]+)\)", depends)
    if match is None:
        raise FailedPrecondition(f"{KERNEL_PACKAGE}: no versioned kernel image in Depends: {depends!r}")
    return match.group(1), match.group(2)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


async def resolve_inputs(update: bool = False) -> AssetInputs:
    """The package versions apt would fetch now, and the hashes of the local inputs.

    With `update`, a failed lookup runs `apt-get update` once (a fresh host may have no lists).
    """
    records = await apt.show([KERNEL_PACKAGE, *GUEST_PACKAGES], update)
    missing = [p for p in (KERNEL_PACKAGE, *GUEST_PACKAGES) if p not in records]
    if missing:
        raise FailedPrecondition(f"apt knows no package {', '.join(missing)}; run `apt-get update`")
    kernel, kernel_version = kernel_image_dependency(records[KERNEL_PACKAGE].get("Depends", ""))
    packages = {kernel: kernel_version} | {p: records[p]["Version"] for p in GUEST_PACKAGES}
    files = await asyncio.to_thread(lambda: {label: _sha256(p) for label, p in sorted(input_files().items())})
    return AssetInputs(packages, files)
