"""Real TCG boots of the guest assets: what the guest sees of the host, and that stopping leaves nothing behind.

Each boot costs ~2-3 s of TCG on two shared cores, so there are only three (one is a relaunch).
"""

import asyncio
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from core import proc
from core.errors import DeadlineExceeded
from vm_backend.guest_image import GuestAssets
from vm_backend.guest_image.store import load
from vm_backend.qemu import QemuVm, VmSpec, console_marker
from vm_backend.share import PodShare, ShareMount
from vm_backend.virtiofs import Virtiofsd

pytestmark = pytest.mark.integration


@pytest.fixture
def run_dir() -> Iterator[Path]:
    """A short path: unix socket paths must fit in 107 bytes."""
    path = Path(tempfile.mkdtemp(prefix="tvm-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def vm_spec(assets: GuestAssets, run_dir: Path, debug: str) -> VmSpec:
    return VmSpec(
        name=f"test-{debug}",
        run_dir=run_dir,
        kernel=assets.kernel,
        initramfs=assets.initramfs,
        userland=assets.userland,
        userland_bytes=assets.userland_bytes,
        accel="tcg",
        kernel_args=(f"tandem.debug={debug}",),
    )


def leftovers(run_dir: Path) -> list[str]:
    return sorted(p.name for p in run_dir.iterdir() if p.name.endswith((".sock", ".pid")))


async def test_the_guest_sees_its_share_and_nothing_else(guest_assets, run_dir):
    share = PodShare(run_dir)
    await share.create()
    assert share.pinned()
    secret = run_dir / "secret.txt"  # beside the rootfs and the volume, on the host
    secret.write_text("host secret\n")
    rootfs = run_dir / "prepared-rootfs"
    rootfs.mkdir()
    await proc.run(["mount", "-t", "tmpfs", "rootfs", rootfs])  # a container's root is a mount of its own
    (rootfs / "marker.txt").write_text("container rootfs\n")
    volume = run_dir / "volume"
    volume.mkdir()
    (volume / "hello.txt").write_text("hello from the host\n")
    (volume / "escape.txt").symlink_to("../secret.txt")
    (volume / "absolute.txt").symlink_to(secret)
    attached = await share.attach("c1", rootfs, [ShareMount(str(volume), readonly=True)])
    assert len(attached) == 2

    vm = QemuVm(vm_spec(guest_assets, run_dir, "share"), Virtiofsd(run_dir, share.ns_file))
    try:
        await vm.start(ready=console_marker("tandem-init: share end"), boot_timeout=60)
        await asyncio.wait_for(vm.wait(), 30)  # /init powers off after listing
        console = vm.console_since_launch()
    finally:
        await vm.stop(timeout=5)
        await share.detach("c1", attached)
        share.unpin()
        await proc.run(["umount", rootfs])

    assert "hello from the host" in console and "/run/tandem/share/c1/mounts/0/hello.txt" in console
    assert "/run/tandem/share/c1/rootfs/marker.txt" in console and "container rootfs" in console
    assert "host secret" not in console  # symlinks resolve in the guest, never on the host
    assert "tandem-init: root is ext4" in console  # the userland image, not the initramfs rootfs: crun can pivot_root
    assert not vm.alive() and not vm.virtiofsd.alive()
    assert leftovers(run_dir) == [] and not share.pinned()


def boot_idle_and_exit(run_dir: str, assets_dir: str) -> None:
    """Run as a separate "daemon" process: start an idle VM (its first boot made to look hung), then exit."""
    assets = load(Path(assets_dir))
    assert assets is not None
    share = PodShare(Path(run_dir))
    vm = QemuVm(vm_spec(assets, Path(run_dir), "idle"), Virtiofsd(Path(run_dir), share.ns_file))
    attempts = 0

    async def hangs_once(booting: QemuVm) -> None:
        nonlocal attempts
        attempts += 1
        if attempts == 1:
            raise DeadlineExceeded("simulated hung boot")
        await console_marker("tandem-init: idle")(booting)

    async def start() -> None:
        await share.create()
        await vm.start(ready=hangs_once, boot_timeout=60)

    asyncio.run(start())
    print(f"attempts={attempts} pid={vm.pid()}")


async def test_a_vm_outlives_its_daemon_and_stops_cleanly(guest_assets, run_dir):
    code = "import sys; from tests.integration.test_vm_boot import boot_idle_and_exit as b; b(*sys.argv[1:])"
    daemon = await asyncio.create_subprocess_exec(
        sys.executable, "-c", code, str(run_dir), str(guest_assets.dir),
        cwd=Path(__file__).parents[2], stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, _ = await daemon.communicate()
    assert daemon.returncode == 0
    assert out.decode().startswith("attempts=2 ")  # the "hung" boot was killed and relaunched

    share = PodShare(run_dir)
    restarted = QemuVm(vm_spec(guest_assets, run_dir, "idle"), Virtiofsd(run_dir, share.ns_file))  # from records
    try:
        assert f"pid={restarted.pid()}" in out.decode()
        assert restarted.virtiofsd is not None and restarted.virtiofsd.alive()
        assert await restarted.status() == "running"
        await restarted.stop(timeout=20)
        # the guest powered off on the ACPI button (QMP quit or SIGKILL would leave no such line)
        assert "reboot: Power down" in restarted.spec.console_log.read_text(errors="replace")
    finally:
        await restarted.kill()
        share.unpin()
    assert not restarted.alive() and not restarted.virtiofsd.alive() and not share.pinned()
    assert leftovers(run_dir) == []
