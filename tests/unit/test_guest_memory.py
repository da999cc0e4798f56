"""Where the userland image sits in a VM's guest-physical memory (vm_backend/guest_memory.py)."""

import pytest

from core.errors import InvalidArgument
from vm_backend.guest_memory import BELOW_4G_MIB, TAIL_MIB, layout

MIB = 2**20


def test_the_image_sits_between_the_ram_and_a_tail_that_holds_the_initramfs():
    memory = layout(256, 40 * MIB)
    assert (memory.low_mib, memory.image_mib, memory.tail_mib) == (224, 40, TAIL_MIB)
    assert memory.total_mib == 296 and memory.ram_mib == 256  # the guest keeps all its RAM
    assert memory.kernel_arg() == "memmap=40M!224M"


def test_the_image_starts_on_a_2_mib_boundary_whatever_the_ram():
    memory = layout(257, 40 * MIB)  # a pod's memory limit need not be even
    assert memory.low_mib % 2 == 0 and memory.low_mib + memory.tail_mib == 257
    assert memory.tail_mib >= TAIL_MIB


def test_a_big_vm_keeps_the_image_below_4_gib_and_the_rest_of_its_ram_above():
    memory = layout(8192, 40 * MIB)
    assert memory.low_mib + memory.image_mib + TAIL_MIB == BELOW_4G_MIB
    assert memory.low_mib + memory.tail_mib == 8192


def test_layouts_that_cannot_work_are_refused():
    with pytest.raises(InvalidArgument, match="multiple of 2 MiB"):
        layout(256, 40 * MIB + 4096)
    with pytest.raises(InvalidArgument, match="multiple of 2 MiB"):
        layout(256, 0)
    with pytest.raises(InvalidArgument, match="cannot map"):
        layout(80, 40 * MIB)  # the kernel would have no room below the image
    with pytest.raises(InvalidArgument, match="cannot map"):
        layout(4096, 3000 * MIB)  # nor below 4 GiB
