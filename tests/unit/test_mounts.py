"""core.mounts: the one mountinfo parser and the lookups built on it; the openat2 and statx wrappers on real files."""

import errno
import os

import pytest

from core.mounts import fd_mount_id, is_mounted, mount_holding, mountinfo, open_beneath, open_mount_root, top_mount

MOUNTINFO = """\
22 1 0:21 / / rw,relatime shared:1 - ext4 /dev/root rw
25 22 0:23 / /run rw,nosuid shared:5 - tmpfs tmpfs rw
30 25 0:23 /tandem /run/tandem rw master:5 - tmpfs tmpfs rw
31 30 0:4 net:[4026532] /run/tandem/netns/pod\\040one rw - nsfs nsfs rw
32 30 0:30 / /run/tandem/x rw - overlay overlay rw,lowerdir=l/0
33 32 0:31 / /run/tandem/x rw shared:9 propagate_from:1 - tmpfs none rw
"""


def test_fields_and_escapes():
    entries = mountinfo(MOUNTINFO)
    assert [m.mount_point for m in entries] == [
        "/", "/run", "/run/tandem", "/run/tandem/netns/pod one", "/run/tandem/x", "/run/tandem/x",
    ]  # fmt: skip
    assert entries[2].optional == ("master:5",) and entries[2].root == "/tandem"
    assert entries[3].fstype == "nsfs" and entries[3].optional == ()
    assert entries[5].optional == ("shared:9", "propagate_from:1") and entries[5].source == "none"


def test_the_top_mount_at_a_point_is_the_last_one():
    top = top_mount("/run/tandem/x", MOUNTINFO)
    assert top is not None and top.fstype == "tmpfs"
    assert top_mount("/run/tandem/y", MOUNTINFO) is None


def test_the_mount_holding_a_path_is_the_deepest_above_it():
    assert mount_holding("/run/tandem/netns", MOUNTINFO).mount_point == "/run/tandem"
    assert mount_holding("/run/tandemx", MOUNTINFO).mount_point == "/run"
    assert mount_holding("/etc/passwd", MOUNTINFO).mount_point == "/"


def test_malformed_lines_are_skipped():
    assert mountinfo("garbage\n1 2 3 4 5 6 - \n") == []


def test_mount_points_named_by_a_guest_are_read_as_the_kernel_wrote_them(tmp_path, monkeypatch):
    # A VM guest names the directories of its share as it likes: bytes that are no UTF-8 and characters that
    # Python counts as whitespace (but mountinfo does not escape) must neither fail the read nor shift fields.
    share = b"/run/tandem/vm/p/share"
    table = tmp_path / "mountinfo"
    table.write_bytes(
        b"40 22 0:40 / " + share + b" rw shared:7 - tmpfs tandem-share rw\n"
        b"41 40 0:41 / " + share + b"/\xff/rootfs rw - overlay overlay rw\n"
        b"42 40 0:42 / " + share + b"/a\x0b-\x1cb\xc2\x85c/rootfs rw - overlay overlay rw\n"
    )
    monkeypatch.setattr("core.mounts.MOUNTINFO", table)
    entries = mountinfo()
    assert [(m.mount_id, os.fsencode(m.mount_point)) for m in entries] == [
        (40, share), (41, share + b"/\xff/rootfs"), (42, share + b"/a\x0b-\x1cb\xc2\x85c/rootfs"),
    ]  # fmt: skip
    assert [m.fstype for m in entries] == ["tmpfs", "overlay", "overlay"]


def test_mount_ids_parents_and_mount_options():
    entries = mountinfo(MOUNTINFO)
    assert [(m.mount_id, m.parent_id) for m in entries] == [(22, 1), (25, 22), (30, 25), (31, 30), (32, 30), (33, 32)]
    assert (entries[0].options, entries[1].options) == ("rw,relatime", "rw,nosuid")


# ---- openat2 and statx need no privileges: checked on real files ---------------------------------------


@pytest.fixture
def tree(tmp_path):
    """tmp_path with dir/file, a relative and an absolute symlink to dir, and a FIFO; yields an O_PATH fd of it."""
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "file").write_text("inside")
    (tmp_path / "link").symlink_to("dir")
    (tmp_path / "abs").symlink_to(tmp_path / "dir")
    os.mkfifo(tmp_path / "fifo")
    fd = os.open(tmp_path, os.O_PATH | os.O_DIRECTORY)
    yield fd
    os.close(fd)


def test_open_beneath_opens_what_is_beneath(tree):
    fd = open_beneath(tree, "dir/file", os.O_RDONLY)
    try:
        assert os.read(fd, 100) == b"inside"
    finally:
        os.close(fd)


@pytest.mark.parametrize(
    ("path", "error"),
    [
        ("link/file", errno.ELOOP),  # a symlink on the way
        ("abs/file", errno.ELOOP),
        ("link", errno.ELOOP),  # a symlink at the end
        ("../outside", errno.EXDEV),  # out of the directory
        ("dir/../../outside", errno.EXDEV),
        ("/etc/passwd", errno.EXDEV),  # absolute
    ],
)
def test_open_beneath_refuses_symlinks_and_escapes(tree, path, error):
    with pytest.raises(OSError) as caught:
        open_beneath(tree, path, os.O_PATH)
    assert caught.value.errno == error


def test_open_beneath_opens_a_fifo_only_as_a_path_and_never_as_a_directory(tree):
    os.close(open_beneath(tree, "fifo", os.O_PATH))  # O_PATH: no open of the FIFO itself, no blocking
    with pytest.raises(OSError) as caught:
        open_beneath(tree, "fifo", os.O_PATH | os.O_DIRECTORY)
    assert caught.value.errno == errno.ENOTDIR


def test_mounts_stop_open_beneath_but_not_open_mount_root():
    root = os.open("/", os.O_PATH | os.O_DIRECTORY)
    try:
        with pytest.raises(OSError) as caught:
            open_beneath(root, "proc/self", os.O_PATH)
        assert caught.value.errno == errno.EXDEV  # /proc is a mount of its own
        proc = open_mount_root(root, "proc")
        try:
            assert fd_mount_id(proc) == top_mount("/proc").mount_id  # statx's mount ID is mountinfo's
        finally:
            os.close(proc)
        with pytest.raises(OSError) as caught:
            open_mount_root(root, "proc/self/cwd")  # a magic link: never followed
        assert caught.value.errno == errno.ELOOP
    finally:
        os.close(root)


def test_is_mounted_agrees_with_mountinfo_for_every_mount_point_and_a_plain_directory(tmp_path):
    entries = mountinfo()
    points = sorted({m.mount_point for m in entries})[:100]  # a busy host has thousands

    def on_top(point: str) -> bool:  # not hidden by a later mount on a directory above it
        later = entries[max(i for i, m in enumerate(entries) if m.mount_point == point) + 1 :]
        return not any(point.startswith(m.mount_point.rstrip("/") + "/") for m in later)

    visible = [p for p in points if os.path.realpath(p) == p and on_top(p)]
    unseen = [p for p in visible if not is_mounted(p)]
    assert visible and not set(unseen) & {m.mount_point for m in mountinfo()}  # but those unmounted meanwhile
    assert not is_mounted(tmp_path)
    assert not is_mounted(tmp_path / "missing") and not is_mounted(tmp_path / "missing" / "deeper")
    (tmp_path / "file").write_text("")
    assert not is_mounted(tmp_path / "file") and not is_mounted(tmp_path / "file" / "below")
