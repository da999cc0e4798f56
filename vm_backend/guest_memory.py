"""The guest's physical memory: its RAM, and the shared userland image mapped read-only between two parts of it.

Every pod VM maps the one userland image (vm_backend/guest_image/userland.py)
straight from the host's page cache, so its pages are shared by all VMs instead
of copied into each guest's RAM (as Kata maps its rootfs image). QEMU's microvm
cannot carry the usual devices for that: virtio-pmem and nvdimm are memory
devices, and microvm has no memory-device hotplug handler (a virtio-pmem-pci
device is accepted but never plugged: the guest sees its region at address 0)
nor an NFIT for nvdimm. What microvm can do is build guest RAM from NUMA memory
backends, one after the other, so the image becomes a range of guest-physical
memory, backed by the file, read-only: QEMU drops the guest's writes to it (the
file is opened O_RDONLY and, in the jail, bound read-only). The kernel command
line's `memmap=SIZE!START` makes that range legacy persistent memory, which the
guest's nd_e820 + nd_pmem drivers expose as /dev/pmem0 with DAX: ext4 mounted
with `-o dax` maps the files' pages, which are the host's page cache.

    0 ......... RAM (low) ......... | image (read-only, DAX) | RAM (tail) ...

QEMU loads the initramfs at the top of the guest's memory below 4 GiB, which
must be RAM: the tail holds it. microvm has no more than 3 GiB below 4 GiB;
beyond that RAM continues above 4 GiB (still the tail's backend).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from core.errors import InvalidArgument

MIB = 2**20
BELOW_4G_MIB = 3072  # microvm's RAM below 4 GiB, at most (QEMU 7.2 hw/i386/microvm.c)
TAIL_MIB = 32  # RAM above the image, below 4 GiB: where QEMU loads the initramfs (a few MiB)
ALIGN_MIB = 2  # memory hotplug's subsection: the kernel maps pmem's struct pages in 2 MiB units
MIN_LOW_MIB = 64  # the kernel loads at 16 MiB and needs its ~35 MiB below the image
MEMORY_ID, IMAGE_ID, TAIL_ID = "mem", "userland", "mem-tail"


@dataclass(frozen=True)
class GuestMemory:
    """Where RAM and the image sit in guest-physical memory, in MiB."""

    ram_mib: int  # guest RAM, low + tail
    image_mib: int  # the userland image's size (a multiple of ALIGN_MIB)
    low_mib: int  # RAM below the image; the image starts here

    @property
    def tail_mib(self) -> int:
        return self.ram_mib - self.low_mib

    @property
    def total_mib(self) -> int:
        return self.ram_mib + self.image_mib

    def kernel_arg(self) -> str:
        """The range the guest's kernel treats as legacy persistent memory (e820 type 12)."""
        return f"memmap={self.image_mib}M!{self.low_mib}M"

    def qemu_args(self, image: Path) -> list[str]:
        """`-m`, the three memory backends and the NUMA nodes that place them in this order.

        RAM is a memfd shared with virtiofsd (vhost-user-fs maps guest memory); the
        image is the file, private and read-only: nothing a guest does reaches it.
        """
        path = str(image)
        if "," in path:
            raise InvalidArgument(f"QEMU cannot take a path with a comma: {path}")
        return [
            "-m", f"{self.total_mib}M",
            "-object", f"memory-backend-memfd,id={MEMORY_ID},size={self.low_mib}M,share=on",
            "-object", f"memory-backend-file,id={IMAGE_ID},mem-path={path},size={self.image_mib}M,"
            "share=off,readonly=on",
            "-object", f"memory-backend-memfd,id={TAIL_ID},size={self.tail_mib}M,share=on",
            "-numa", f"node,memdev={MEMORY_ID}",
            "-numa", f"node,memdev={IMAGE_ID}",
            "-numa", f"node,memdev={TAIL_ID}",
        ]  # fmt: skip


def layout(ram_mib: int, image_bytes: int) -> GuestMemory:
    """Put the image right below the tail, under microvm's 4 GiB hole; refuse what cannot hold the kernel."""
    if image_bytes <= 0 or image_bytes % (ALIGN_MIB * MIB):
        raise InvalidArgument(f"the userland image must be a multiple of {ALIGN_MIB} MiB, not {image_bytes} bytes")
    image_mib = image_bytes // MIB
    below_4g = min(ram_mib + image_mib, BELOW_4G_MIB)
    low = (below_4g - TAIL_MIB - image_mib) // ALIGN_MIB * ALIGN_MIB
    if low < MIN_LOW_MIB:
        raise InvalidArgument(
            f"a VM of {ram_mib} MiB cannot map the {image_mib} MiB userland image below 4 GiB "
            f"with {MIN_LOW_MIB} MiB of RAM under it and {TAIL_MIB} MiB above"
        )
    return GuestMemory(ram_mib, image_mib, low)
