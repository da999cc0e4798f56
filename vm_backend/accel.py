"""Which accelerator pod VMs use: KVM when the real guest boots on it, TCG otherwise.

`/dev/kvm` existing proves little: on these hosts it is PVM, which runs a stock
guest kernel for minutes before failing. So the answer comes from booting the
real kernel and initramfs under KVM with a short deadline, once; it is cached in
the state dir, keyed by everything that could change it.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core import proc
from core.errors import TandemError
from core.files import atomic_write_json, private_dir
from vm_backend.guest_image import GuestAssets
from vm_backend.qemu import PROBE_MARKER, QemuVm, VmSpec, console_marker

log = logging.getLogger("tandem.vm.accel")

PROBE_DEADLINE = 10.0
KVM_DEVICE = Path("/dev/kvm")


@dataclass(frozen=True)
class AccelChoice:
    accel: str  # "kvm" or "tcg"
    reason: str


def cache_path(state_dir: Path) -> Path:
    return state_dir / "vm" / "accel.json"


async def probe_key(qemu: Path, assets: GuestAssets) -> dict[str, Any]:
    """What the probe's answer depends on: host kernel, QEMU build, /dev/kvm, guest kernel."""
    version = await proc.run([qemu, "--version"], timeout=10)
    return {
        "host_kernel": os.uname().release,
        "qemu": version.stdout.decode().splitlines()[0] if version.stdout else "",
        "kvm_device": KVM_DEVICE.exists(),
        "guest_kernel": assets.kernel_release,
    }


def cached_choice(state_dir: Path, key: dict[str, Any] | None = None) -> AccelChoice | None:
    """The cached probe result (for `key`, when given: a stale key means no answer)."""
    try:
        record = json.loads(cache_path(state_dir).read_text())
        if key is not None and record["key"] != key:
            return None
        return AccelChoice(record["accel"], record["reason"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


async def probe_kvm(qemu: Path, assets: GuestAssets, work_dir: Path) -> tuple[bool, str]:
    """Boot the guest under KVM with `tandem.probe=1`; did it reach /init within the deadline?"""
    run_dir = Path(tempfile.mkdtemp(prefix="probe-", dir=private_dir(work_dir)))
    spec = VmSpec(
        name="accel-probe",
        run_dir=run_dir,
        kernel=assets.kernel,
        initramfs=assets.initramfs,
        userland=assets.userland,
        userland_bytes=assets.userland_bytes,
        accel="kvm",
        kernel_args=("tandem.probe=1",),
        qemu=str(qemu),
    )
    vm = QemuVm(spec)
    try:
        await vm.start(ready=console_marker(PROBE_MARKER), boot_timeout=PROBE_DEADLINE, retries=0)
        return True, f"a guest booted under KVM within {PROBE_DEADLINE:g}s"
    except TandemError as e:
        return False, str(e)
    finally:
        await vm.kill()
        shutil.rmtree(run_dir, ignore_errors=True)


async def choose_accel(setting: str, state_dir: Path, assets: GuestAssets, qemu: Path) -> AccelChoice:
    """`[vm] accel`: "kvm" or "tcg" are taken as given; "auto" probes once and caches the answer."""
    if setting in ("kvm", "tcg"):
        return AccelChoice(setting, "set by [vm] accel in the config")
    key = await probe_key(qemu, assets)
    choice = cached_choice(state_dir, key)
    if choice is not None:
        return choice
    if not key["kvm_device"]:
        choice = AccelChoice("tcg", f"no {KVM_DEVICE}")
    else:
        log.info("probing KVM: booting the guest with a %gs deadline", PROBE_DEADLINE)
        booted, detail = await probe_kvm(qemu, assets, state_dir / "vm")
        choice = AccelChoice("kvm", detail) if booted else AccelChoice("tcg", f"KVM probe failed: {detail}")
    if choice.accel == "tcg":
        log.warning("pod VMs will run under TCG (emulation, slow): %s", choice.reason)
    atomic_write_json(cache_path(state_dir), {"key": key, "accel": choice.accel, "reason": choice.reason})
    return choice
