"""core.mounts: the one mountinfo parser and the lookups built on it."""

import os

from core.mounts import is_mounted, mount_holding, mountinfo, top_mount

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
