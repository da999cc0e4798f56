"""Building the guest image: the steps in order, and the rebuild-only-when-an-input-changed decision.

The kernel is Debian's cloud kernel, downloaded and unpacked (never installed on
the host). The initramfs holds `/init`, busybox and the modules that mount the
userland image; the image holds busybox, the other modules, a trimmed Python
3.11 with protobuf's upb runtime, crun and the agent.
"""

from __future__ import annotations

import asyncio
import dataclasses
import tempfile
from dataclasses import dataclass
from pathlib import Path

from core import proc
from core.errors import CommandFailed, FailedPrecondition
from core.files import atomic_write_json
from vm_backend.guest_image import apt, inputs, python_bundle, store, userland
from vm_backend.guest_image.cpio import write_initramfs
from vm_backend.guest_image.initramfs import assemble
from vm_backend.guest_image.inputs import AssetInputs
from vm_backend.guest_image.kernel import install_kernel
from vm_backend.guest_image.store import (
    BZIMAGE_FILE,
    INITRAMFS_FILE,
    MANIFEST_FILE,
    USERLAND_FILE,
    GuestAssets,
    assets_root,
)


@dataclass(frozen=True)
class AssetStatus:
    current: GuestAssets | None
    inputs: AssetInputs

    @property
    def fresh(self) -> bool:
        return self.current is not None and self.current.digest == self.inputs.digest()


async def asset_status(state_dir: Path) -> AssetStatus:
    """Compare what is built with what would be built now (for `tandem doctor`)."""
    return AssetStatus(store.current_assets(state_dir), await inputs.resolve_inputs())


async def ensure_assets(state_dir: Path, *, force: bool = False, progress: apt.Progress = print) -> GuestAssets:
    """Return up-to-date assets, building them first if any input changed (or `force`).

    Older builds are removed once the new one is current.
    """
    wanted = await inputs.resolve_inputs(update=True)
    digest = wanted.digest()
    root = assets_root(state_dir)
    async with store.build_lock(root):
        assets = None if force else store.load(root / digest)
        if assets is None:
            progress(f"building guest assets {digest} in {root}")
            assets = await _build(state_dir, wanted, progress)
        store.make_current(root, digest)
        return assets


async def _build(state_dir: Path, wanted: AssetInputs, progress: apt.Progress) -> GuestAssets:
    python_bundle.require_host_python()
    debs = await apt.download(state_dir / "vm" / "debs", wanted.packages, progress)
    digest = wanted.digest()
    root_dir = assets_root(state_dir)
    with tempfile.TemporaryDirectory(prefix=".build-", dir=root_dir) as tmp:
        unpacked, staging, out = Path(tmp, "root"), Path(tmp, "pyc"), Path(tmp, "out")
        progress(f"unpacking {len(debs)} packages")
        await apt.unpack(debs, unpacked)
        release = wanted.kernel_package.removeprefix("linux-image-")
        try:
            applets = (await proc.run([str(unpacked / "bin/busybox"), "--list-full"])).stdout.decode().split()
        except CommandFailed as e:
            raise FailedPrecondition(f"the guest's busybox does not run here: {e}") from e
        progress(
            f"assembling the initramfs and the userland image (kernel {release}, "
            f"Python {python_bundle.GUEST_PYTHON} bytecode, crun, agent)"
        )
        tree, image_tree, layout = await asyncio.to_thread(assemble, unpacked, staging, applets, release)
        out.mkdir()
        kernel_file = await asyncio.to_thread(install_kernel, unpacked / "boot" / f"vmlinuz-{release}", out)
        if kernel_file == BZIMAGE_FILE:
            progress("the kernel yields no PVH-capable vmlinux: VMs boot the bzImage (slower under TCG)")
        payload = tree.payload_bytes()
        size = await asyncio.to_thread(write_initramfs, tree, out / INITRAMFS_FILE)
        image_size = await userland.make_image(image_tree, Path(tmp, "userland"), out / USERLAND_FILE, digest)
        manifest = {
            "digest": digest,
            "kernel_release": release,
            "kernel_file": kernel_file,
            "packages": wanted.packages,
            "files": wanted.files,
            "initramfs_bytes": size,
            "initramfs_entries": len(tree.nodes),
            "initramfs_payload_bytes": payload,
            "userland_bytes": image_size,
            "userland_entries": len(image_tree.nodes),
            "userland_payload_bytes": image_tree.payload_bytes(),
            **dataclasses.asdict(layout),
        }
        atomic_write_json(out / MANIFEST_FILE, manifest, mode=0o644)
        if layout.agent_files == 0:
            progress("warning: vm_backend/agent/ is empty: the guest will power off with 'the agent is missing'")
        if layout.dropped_extensions:
            progress(f"python extensions left out (libraries not shipped): {', '.join(layout.dropped_extensions)}")
        progress(
            f"modules: {' '.join(layout.boot_modules)} (initramfs); {' '.join(layout.modules)} (before the agent); "
            f"{' '.join(layout.later_modules)} (once the agent runs)\n"
            f"initramfs: {len(tree.nodes)} entries, {payload / 2**20:.1f} MiB of files, {size / 2**20:.1f} MiB\n"
            f"userland image: {len(image_tree.nodes)} entries, {image_tree.payload_bytes() / 2**20:.1f} MiB of files, "
            f"{image_size / 2**20:.1f} MiB"
        )
        store.publish(root_dir, digest, out)
    assets = store.load(root_dir / digest)
    if assets is None:
        raise FailedPrecondition(f"the guest image build {digest} in {root_dir} is incomplete")
    return assets
