import os

import pytest

from core.errors import InvalidArgument
from sandbox.oci.users import (
    GroupEntry,
    Identity,
    PasswdEntry,
    parse_group,
    parse_passwd,
    read_in_root,
    resolve_identity,
)

PASSWD = """\
root:x:0:0:root:/root:/bin/sh
# a comment
daemon:x:1:1::/:/bin/false
app:x:1000:1000:App:/home/app:/bin/sh
nobody:x:65534:65534:nobody:/:/bin/false
"""
GROUP = """\
root:x:0:
wheel:x:10:root,app
app:x:1000:app
extra:x:50000:app, daemon
nobody:x:65534:
"""


@pytest.fixture
def rootfs(tmp_path):
    root = tmp_path / "rootfs"
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "passwd").write_text(PASSWD)
    (root / "etc" / "group").write_text(GROUP)
    return root


def test_parse_passwd_skips_malformed_lines():
    text = "\n".join(
        [
            "good:x:5:6:g:/:/bin/sh",
            "short:x:7",
            "baduid:x:abc:1::/:",
            "neg:x:-1:1::/:",
            "huge:x:4294967296:1::/:",
            "+nis:x:0:0::/:",
            ":x:8:8::/:",
            "",
            "min:x:9:9",
        ]
    )
    assert parse_passwd(text) == [PasswdEntry("good", 5, 6), PasswdEntry("min", 9, 9)]


def test_parse_group_members_and_malformed_lines():
    text = "a:x:1:\nb:x:2:u1, u2,,\nc:x:3\nbad:x:z:u1\nshort:x\n"
    assert parse_group(text) == [GroupEntry("a", 1, ()), GroupEntry("b", 2, ("u1", "u2")), GroupEntry("c", 3, ())]


def test_read_in_root_reads_plain_and_relative_links(rootfs):
    assert read_in_root(rootfs, "/etc/passwd") == PASSWD
    (rootfs / "usr" / "lib").mkdir(parents=True)
    (rootfs / "usr" / "lib" / "group").write_text("g:x:1:\n")
    (rootfs / "etc" / "group").unlink()
    (rootfs / "etc" / "group").symlink_to("../usr/lib/group")
    assert read_in_root(rootfs, "etc/group") == "g:x:1:\n"


@pytest.mark.parametrize("prefix", ["/", "../../../../../../../../", "/../../", "/proc/self/root/", "/proc/1/cwd/"])
def test_symlinks_never_leave_the_rootfs(rootfs, tmp_path, prefix):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "passwd").write_text("evil:x:0:4242::/:\n")
    (rootfs / "etc" / "passwd").unlink()
    (rootfs / "etc" / "passwd").symlink_to(prefix + str(outside / "passwd").lstrip("/"))
    assert read_in_root(rootfs, "/etc/passwd") is None
    assert resolve_identity(rootfs, "0") == Identity(0, 0, (0,))  # no passwd entry, so no image groups either


def test_absolute_links_resolve_inside_the_rootfs(rootfs):
    (rootfs / "data").mkdir()
    (rootfs / "data" / "passwd").write_text("inside:x:3:3::/:\n")
    (rootfs / "etc" / "passwd").unlink()
    (rootfs / "etc" / "passwd").symlink_to("/data/passwd")
    assert read_in_root(rootfs, "/etc/passwd") == "inside:x:3:3::/:\n"
    (rootfs / "real").mkdir()
    (rootfs / "real" / "group").write_text("x:x:4:\n")
    (rootfs / "etc" / "group").unlink()
    (rootfs / "etc" / "sub").symlink_to("/real")
    assert read_in_root(rootfs, "/etc/sub/group") == "x:x:4:\n"


def test_missing_loops_and_non_files_read_as_none(rootfs):
    assert read_in_root(rootfs, "/etc/shadow") is None
    assert read_in_root(rootfs, "/nope/passwd") is None
    assert read_in_root(rootfs, "/etc/passwd/x") is None
    (rootfs / "etc" / "loop").symlink_to("loop")
    assert read_in_root(rootfs, "/etc/loop") is None
    (rootfs / "etc" / "dir").mkdir()
    assert read_in_root(rootfs, "/etc/dir") is None
    os.mkfifo(rootfs / "etc" / "fifo")
    assert read_in_root(rootfs, "/etc/fifo") is None


@pytest.mark.parametrize(
    ("user", "kwargs", "expected"),
    [
        ("", {}, Identity(0, 0, (0, 10))),
        ("0", {}, Identity(0, 0, (0, 10))),
        ("app", {}, Identity(1000, 1000, (10, 1000, 50000))),
        ("1000", {"supplemental_groups": (1234,)}, Identity(1000, 1000, (10, 1000, 1234, 50000))),
        ("1000", {"supplemental_groups": (1234,), "image_groups": False}, Identity(1000, 1000, (1000, 1234))),
        ("1001", {}, Identity(1001, 0, (0,))),
        ("1001:1002", {}, Identity(1001, 1002, (1002,))),
        ("app:wheel", {}, Identity(1000, 10, (10, 50000))),
        ("nobody", {}, Identity(65534, 65534, (65534,))),
        ("app:7", {"image_groups": False}, Identity(1000, 7, (7,))),
    ],
)
def test_resolve_identity(rootfs, user, kwargs, expected):
    assert resolve_identity(rootfs, user, **kwargs) == expected


@pytest.mark.parametrize(
    ("user", "message"),
    [
        ("ghost", "'ghost' is not in the image's /etc/passwd"),
        ("app:ghosts", "'ghosts' is not in the image's /etc/group"),
        ("1:2:3", "invalid user"),
        (":5", "invalid user"),
        ("2147483648", "uid out of range"),
        ("1:2147483648", "gid out of range"),
    ],
)
def test_resolve_identity_errors(rootfs, user, message):
    with pytest.raises(InvalidArgument, match=message):
        resolve_identity(rootfs, user)


def test_numeric_user_without_passwd_file(tmp_path):
    assert resolve_identity(tmp_path, "42", supplemental_groups=(7,)) == Identity(42, 0, (0, 7))
    with pytest.raises(InvalidArgument):
        resolve_identity(tmp_path, "app")
