"""The guest image builder: the kernel, initramfs and userland image every pod VM boots, from Debian packages.

Kept apart from the VM launcher (as Kata keeps tools/osbuilder apart from its
runtime): the launcher only needs `current_assets` and `GuestAssets`; building
happens in `tandem assets`. One module per job:

    apt            the guest's Debian packages: versions, downloads, unpacking
    inputs         everything a build depends on, and the digest naming it
    store          built images by digest, `current`, the build lock
    elf, linker    ELF reading; the shared libraries a binary needs
    modules        the kernel modules a wanted set pulls in, in load order
    python_bundle  the trimmed Python, protobuf and the agent
    initramfs      the initramfs's and the userland image's trees laid out; cpio writes the initramfs
    userland       the userland image (ext4) every VM maps read-only
    kernel         the PVH-bootable vmlinux out of Debian's bzImage
    build          the steps in order, and the rebuild decision
"""

from vm_backend.guest_image.build import AssetStatus, asset_status, ensure_assets
from vm_backend.guest_image.inputs import AssetInputs
from vm_backend.guest_image.store import GuestAssets, assets_root, current_assets

__all__ = [
    "AssetInputs",
    "AssetStatus",
    "GuestAssets",
    "asset_status",
    "assets_root",
    "current_assets",
    "ensure_assets",
]
