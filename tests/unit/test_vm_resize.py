"""vm_backend.resize's arithmetic and refusals (the balloon and the cgroup are tested on a real VM)."""

from __future__ import annotations

import pytest

from core.errors import FailedPrecondition
from vm_backend.resize import MIB, check_fits, target_for


def test_a_limit_is_added_to_the_vms_own_default_rounded_up_to_a_mib() -> None:
    assert target_for(256, 0) == 256
    assert target_for(256, 64 * MIB) == 320
    assert target_for(256, 64 * MIB + 1) == 321


def test_a_size_beyond_the_boot_ram_is_refused_saying_why() -> None:
    state = {"memory_mib": 448, "size_mib": 320}
    check_fits(state, 448, "a limit")
    with pytest.raises(FailedPrecondition) as refused:
        check_fits(state, 449, "container app's memory limit")
    message = str(refused.value)
    assert "needs the pod's VM to have 449 MiB of RAM, but it booted with 448 MiB (320 MiB for the pod" in message
    assert "no memory hotplug" in message and "memory_headroom_mib" in message
