"""A VM pod's share namespace without a VM: what it holds, what attach and detach do, and what they refuse.

The guest's part is played by a shell inside the namespace (`nsenter --mount=<share.ns>`): it reaches the share
as virtiofsd does for the guest, on the same filesystem, and can do whatever a guest can do there and more.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from core import mounts
from core.errors import FailedPrecondition, ResourceExhausted
from vm_backend.rundir import make_run_dir, remove_run_dir
from vm_backend.share import PodShare, ShareMount

pytestmark = pytest.mark.integration


@pytest.fixture
def run_dir() -> Iterator[Path]:
    """A pod run dir on a private mount of its own, as the backend's are."""
    path = Path(tempfile.mkdtemp(prefix="tvs-"))
    mounts.make_private(path)
    yield path
    mounts.detach_below(path)
    mounts.unmount(path)
    subprocess.run(["rm", "-rf", "--one-file-system", str(path)], check=False)


@pytest.fixture
async def share(run_dir: Path) -> AsyncIterator[PodShare]:
    pod_share = PodShare(run_dir)
    await pod_share.create()
    yield pod_share
    pod_share.unpin()


def guest(share: PodShare, script: str) -> subprocess.CompletedProcess[str]:
    """Run a shell script inside the share's namespace, as root, with $S the share: the guest's side and more."""
    script = f"S={share_dir(share)}; {script}"
    return subprocess.run(
        ["nsenter", f"--mount={share.ns_file}", "--", "/bin/sh", "-c", script], capture_output=True, text=True
    )


def share_dir(share: PodShare) -> str:
    """Where the share is inside its namespace (the run dir's path + /share; nothing is there on the host)."""
    return str(share.run_dir / "share")


def base(share: PodShare) -> set[str]:
    """The namespace's own mounts: its root, /usr, /proc and the share."""
    return {"/", "/usr", "/proc", share_dir(share)}


def inside(share: PodShare) -> list[mounts.Mount]:
    return mounts.mountinfo(guest(share, "cat /proc/self/mountinfo").stdout)


def host_table(run_dir: Path) -> set[tuple[int, str]]:
    """The host's mounts this test answers for: the system's own and those in its run dir (other tests on this
    machine mount and unmount under /tmp, /var/tmp and /run at any moment)."""
    others = ("/tmp/", "/var/tmp/", "/run/")
    mine = f"{run_dir}/"
    return {
        (m.mount_id, m.mount_point)
        for m in mounts.mountinfo()
        if f"{m.mount_point}/".startswith(mine) or not m.mount_point.startswith(others)
    }


def mount_tmpfs(path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True)
    mounts.sys_mount("test", path, "tmpfs", 0, "size=1m")


@pytest.fixture
def sentinel(run_dir: Path) -> Iterator[Path]:
    """A directory with a file and a tmpfs mounted on it, outside the share: nothing may touch either."""
    path = run_dir / "sentinel"
    mount_tmpfs(path)
    (path / "file").write_text("sentinel\n")
    yield path
    assert (path / "file").read_text() == "sentinel\n"
    assert mounts.is_mounted(path)


async def test_the_namespace_holds_the_share_and_nothing_of_the_host(share):
    table = {m.mount_point: m for m in inside(share)}
    assert set(table) == base(share)
    shared = table[share_dir(share)]
    assert table["/"].options.startswith("ro,") and table["/usr"].options.startswith("ro,")
    assert table["/proc"].options.startswith("ro,")
    assert (
        shared.fstype == "tmpfs" and "size=1024k" in shared.super_options and "nr_inodes=4096" in shared.super_options
    )
    assert any(f.startswith("shared:") for f in shared.optional)  # what is attached there reaches virtiofsd
    assert not os.path.exists(share_dir(share))  # on the host, nothing is there
    assert share.pinned()
    pinned = mounts.top_mount(share.ns_file)
    assert pinned is not None and pinned.fstype == "nsfs"
    await share.create()  # pinned already: nothing new
    assert [m.mount_point for m in mounts.mountinfo()].count(str(share.ns_file)) == 1


async def test_attach_clones_private_read_only_trees_and_detach_takes_them_back(share, run_dir, sentinel):
    rootfs = run_dir / "c" / "c1" / "rootfs"
    mount_tmpfs(rootfs)
    (rootfs / "marker").write_text("rootfs\n")
    volume = run_dir / "volume"
    mount_tmpfs(volume / "sub")
    (run_dir / "file").write_text("a file volume\n")
    before = host_table(run_dir)

    attached = await share.attach(
        "c1",
        rootfs,
        [
            ShareMount(str(volume), readonly=True),
            ShareMount(str(volume), readonly=True, recursive_readonly=True),
            ShareMount(str(volume)),
            ShareMount(str(run_dir / "file")),
        ],
    )
    assert host_table(run_dir) == before  # nothing of it in the host's namespace
    assert attached[0].dev == os.stat(rootfs).st_dev and attached[1].ino == os.stat(volume).st_ino
    table = {m.mount_point: m for m in inside(share)}
    for point in ("c1/rootfs", "c1/mounts/0", "c1/mounts/0/sub", "c1/mounts/1/sub", "c1/mounts/2", "c1/mounts/3"):
        assert f"{share_dir(share)}/{point}" in table, point
        assert {"nosuid", "nodev", "noexec"} <= set(table[f"{share_dir(share)}/{point}"].options.split(","))
    ids = {table[f"{share_dir(share)}/c1/{p}"].mount_id for p in ("rootfs", *_mounts(4))}
    assert {a.mount_id for a in attached} == ids

    writes = guest(
        share,
        "cd $S/c1; cat rootfs/marker mounts/3; touch rootfs/new mounts/0/sub/new mounts/2/new && echo writable; "
        "touch mounts/0/top 2>&1; touch mounts/1/sub/deep 2>&1; true",
    )
    assert writes.stdout.splitlines()[:3] == ["rootfs", "a file volume", "writable"], writes
    assert writes.stdout.count("Read-only file system") == 2  # ro on top only; rro all the way down

    mount_tmpfs(volume / "later")  # private: a mount the host makes afterwards stays the host's
    assert f"{share_dir(share)}/c1/mounts/2/later" not in {m.mount_point for m in inside(share)}
    mounts.unmount(volume / "later")
    # The host can take a volume apart while it is attached (critest's read-only mount cleanup: EBUSY before)
    sub = mounts.top_mount(volume / "sub")
    mounts.sys_umount(volume / "sub", mounts.MNT_DETACH)
    (volume / "sub").rmdir()

    await share.detach("c1", attached)
    assert {m.mount_point for m in inside(share)} == base(share)
    assert host_table(run_dir) == before - {(sub.mount_id, sub.mount_point)}
    assert guest(share, "ls -A $S").stdout == ""  # the container's directory went too: its inodes are free


async def test_removing_a_containers_directory_stays_on_the_share(share):
    junk = guest(
        share,
        "mkdir -p $S/c1/a/b/c $S/c1/kept && mount -t tmpfs kept $S/c1/kept && echo keep > $S/c1/kept/f"
        " && mkfifo $S/c1/a/fifo && ln -s / $S/c1/a/root && ln -s $S $S/c1/b && touch $S/c1/a/b/c/f"
        " && d=$S/c1/deep; for i in $(seq 40); do d=$d/d; done; mkdir -p $d",
    )
    assert junk.returncode == 0, junk.stderr
    await share.detach("c1", [])
    left = guest(share, "cd $S && find . | sort; cat c1/kept/f").stdout.split()
    assert left[-1] == "keep"  # a mount in the way is neither crossed nor removed
    assert "./c1/kept" in left and "./c1/a" not in left and "./c1/b" not in left
    assert "./c1/deep" + "/d" * 40 in left  # nesting past 32 levels is not walked: it stays
    guest(share, "umount $S/c1/kept")
    await share.detach("c1", [])
    assert guest(share, "ls -A $S").stdout.strip() in ("", "c1")


def _mounts(count: int) -> list[str]:
    return [f"mounts/{i}" for i in range(count)]


@pytest.mark.parametrize(
    "planted",
    [
        "ln -s / $S/c1",  # the container's directory, a symlink to / (the guest's; the host's if followed)
        "ln -s {sentinel} $S/c1",  # ... or to a host directory
        "mkdir $S/c1 && ln -s / $S/c1/rootfs",
        "mkdir $S/c1 && ln -s {sentinel} $S/c1/mounts",  # where the next mount target will be created
        "mkdir -p $S/c1/mounts && ln -s {sentinel} $S/c1/mounts/0",
        "mkdir -p $S/c1/mounts && mkfifo $S/c1/mounts/0",  # a FIFO where a directory belongs
        "mkdir -p $S/c1 && touch $S/c1/rootfs",  # a file where a directory belongs
        "mkdir -p $S/c1/mounts/1",  # a directory where a file mount belongs
        "mkdir -p $S/c1/mounts && mkfifo $S/c1/mounts/1",  # a FIFO where a file mount belongs
        "mkdir -p $S/c1/mounts && mount -t tmpfs x $S/c1/mounts",  # a mount in the way: not the share
    ],
)
async def test_attach_refuses_what_the_guest_put_in_the_way(share, run_dir, sentinel, planted):
    rootfs = run_dir / "c" / "c1" / "rootfs"
    mount_tmpfs(rootfs)
    (run_dir / "file").write_text("file\n")
    volume = run_dir / "volume"
    volume.mkdir()
    assert guest(share, planted.format(sentinel=sentinel)).returncode == 0
    base = {m.mount_point for m in inside(share)}
    before = host_table(run_dir)
    with pytest.raises(FailedPrecondition, match="tampered with"):
        await share.attach("c1", rootfs, [ShareMount(str(volume)), ShareMount(str(run_dir / "file"))])
    assert {m.mount_point for m in inside(share)} == base  # all or nothing: what went in first came out again
    assert host_table(run_dir) == before
    assert list(sentinel.iterdir()) == [sentinel / "file"]


async def test_detach_finds_moved_mounts_and_never_leaves_the_share(share, run_dir, sentinel):
    rootfs = run_dir / "c" / "c1" / "rootfs"
    mount_tmpfs(rootfs)
    volume = run_dir / "volume"
    volume.mkdir()
    attached = await share.attach("c1", rootfs, [ShareMount(str(volume))])
    moved = guest(
        share,
        f"cd $S && mv c1 moved && ln -s / c1 && mkdir -p deep/er && mv moved deep/er/ && ln -s {sentinel} deep/x",
    )
    assert moved.returncode == 0, moved.stderr
    before = host_table(run_dir)
    share_root = next(m for m in inside(share) if m.mount_point == share_dir(share))
    strangers = [  # records that are not the share's children, or not what was attached there
        type(attached[0])(share_root.mount_id, attached[0].dev, attached[0].ino),
        type(attached[0])(attached[0].mount_id, attached[0].dev, attached[0].ino + 1),
    ]
    await share.detach("c1", strangers)
    assert f"{share_dir(share)}/deep/er/moved/rootfs" in {m.mount_point for m in inside(share)}
    await share.detach("c1", attached)
    assert {m.mount_point for m in inside(share)} == base(share)
    assert host_table(run_dir) == before


async def test_detach_finds_mounts_the_guest_moved_under_names_that_are_no_text(share, run_dir):
    # Bytes that are no UTF-8, and characters Python splits on that mountinfo does not escape: the share's
    # mount table must still be read, or no container of the pod (and so not the pod) could ever be removed.
    rootfs = run_dir / "c" / "c1" / "rootfs"
    mount_tmpfs(rootfs)
    volume = run_dir / "volume"
    volume.mkdir()
    attached = await share.attach("c1", rootfs, [ShareMount(str(volume))])
    moved = guest(share, "cd $S && mv c1 \"$(printf 'a\\377\\013-\\034b\\302\\205c')\"")
    assert moved.returncode == 0, moved.stderr
    await share.detach("c1", attached)
    assert {m.mount_point for m in inside(share)} == base(share)


async def test_a_full_share_refuses_new_containers_and_fills_nothing_else(share, run_dir):
    rootfs = run_dir / "c" / "c1" / "rootfs"
    mount_tmpfs(rootfs)
    fill = guest(share, "yes 2>&1 >$S/fill; i=0; while :>$S/f$i; do i=$((i+1)); done")
    assert "No space left on device" in fill.stdout and "No space left on device" in fill.stderr
    used = guest(share, "du -sk $S; ls $S | wc -l").stdout.split()
    assert int(used[0]) <= 1024 and 4000 < int(used[2]) <= 4096
    with pytest.raises(ResourceExhausted, match="share is full"):
        await share.attach("c1", rootfs, [])
    assert guest(share, "rm -f $S/f* $S/fill").returncode == 0
    await share.detach("c1", await share.attach("c1", rootfs, []))


def fill(path: Path, mib: int) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["dd", "if=/dev/zero", f"of={path}", "bs=1M", f"count={mib}"], capture_output=True, text=True)


async def test_the_run_dir_is_bounded_and_removed_without_following_links(run_dir, sentinel):
    pod = run_dir / "pod"
    make_run_dir(pod, pod / "vmm")
    make_run_dir(pod, pod / "vmm")  # mounted already: nothing new
    points = [m.mount_point for m in mounts.mountinfo()]
    assert points.count(str(pod)) == 1 and points.count(str(pod / "vmm")) == 1
    console = await asyncio.to_thread(fill, pod / "vmm" / "console.log", 8)
    assert "No space left on device" in console.stderr and (pod / "vmm" / "console.log").stat().st_size <= 4 << 20
    (pod / "process.json").write_text("{}")  # the console filled its own tmpfs, not the host's files
    full = await asyncio.to_thread(fill, pod / "qemu.log", 32)
    assert "No space left on device" in full.stderr and (pod / "qemu.log").stat().st_size <= 16 << 20
    (pod / "qemu.log").unlink()

    mount_tmpfs(pod / "c" / "c1" / "rootfs")
    share = PodShare(pod)
    await share.create()
    (pod / "vmm" / "link").symlink_to(sentinel)  # what a compromised QEMU could plant where it can write
    await asyncio.to_thread(remove_run_dir, pod)
    assert not pod.exists() and not [p for p in mounts.mountinfo() if p.mount_point.startswith(f"{pod}/")]
