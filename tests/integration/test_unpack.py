"""Layer unpacking: a normal layer round-trips, and hostile layers cannot reach outside `dest`.

As root (layers carry owners, device whiteouts and trusted.* xattrs), on this host's filesystem.
"""

from __future__ import annotations

import errno
import gzip
import hashlib
import io
import os
import stat
import struct
import subprocess
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import zstandard

from core.errors import AlreadyExists, DataCorruption, InvalidArgument, ResourceExhausted
from images import unpack
from images.unpack import UnpackLimits, UnpackResult, unpack_layer

Entry = tuple[tarfile.TarInfo, bytes | None]

MTIME = 1_600_000_000
DEFAULT_LIMITS = UnpackLimits()
EMPTY_LAYER_DIFF_ID = "sha256:5f70bf18a086007016e948b04aed3b82103a36bea41755b6cddfaf10ace3c6ef"
# A v2 file capability (CAP_SETUID and CAP_NET_BIND_SERVICE, effective); the 0x80 byte is not UTF-8.
CAPABILITY = struct.pack("<IIIII", 0x02000001, (1 << 7) | (1 << 10), 0, 0, 0)

pytestmark = pytest.mark.integration


def _info(name: str, kind: bytes, *, mode: int, xattrs: dict[str, bytes] | None, **attrs: object) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = mode
    info.mtime = MTIME
    for key, value in attrs.items():
        setattr(info, key, value)
    for key, value in (xattrs or {}).items():
        info.pax_headers[f"SCHILY.xattr.{key}"] = value.decode("utf-8", "surrogateescape")
    return info


def reg(
    name: str, data: bytes = b"", *, mode: int = 0o644, xattrs: dict[str, bytes] | None = None, **attrs: object
) -> Entry:
    info = _info(name, tarfile.REGTYPE, mode=mode, xattrs=xattrs, size=len(data), **attrs)
    return info, data


def directory(name: str, *, mode: int = 0o755, xattrs: dict[str, bytes] | None = None, **attrs: object) -> Entry:
    return _info(name, tarfile.DIRTYPE, mode=mode, xattrs=xattrs, **attrs), None


def symlink(name: str, target: str, **attrs: object) -> Entry:
    return _info(name, tarfile.SYMTYPE, mode=0o777, xattrs=None, linkname=target, **attrs), None


def hardlink(name: str, target: str) -> Entry:
    return _info(name, tarfile.LNKTYPE, mode=0o644, xattrs=None, linkname=target), None


def node(name: str, kind: bytes, major: int = 0, minor: int = 0) -> Entry:
    return _info(name, kind, mode=0o620, xattrs=None, devmajor=major, devminor=minor), None


def build_tar(entries: list[Entry], fmt: int = tarfile.PAX_FORMAT) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt, encoding="utf-8") as tar:
        for info, data in entries:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def compress(raw: bytes, compression: str) -> bytes:
    if compression == "gzip":
        return gzip.compress(raw)
    if compression == "zstd":
        return zstandard.ZstdCompressor().compress(raw)
    return raw


def snapshot(top: Path) -> dict[str, tuple[object, ...]]:
    """Everything about a tree that an escaping unpack could change."""
    result: dict[str, tuple[object, ...]] = {}
    for path in [top, *sorted(top.rglob("*"))]:
        st = path.lstat()
        content = path.read_bytes() if path.is_file() and not path.is_symlink() else None
        target = os.readlink(path) if path.is_symlink() else None
        attrs = (st.st_mode, st.st_uid, st.st_gid, st.st_nlink, st.st_mtime_ns, content, target)
        result[str(path.relative_to(top))] = attrs
    return result


@dataclass
class Env:
    root: Path
    sentinel: Path  # outside the store: hostile layers aim here

    @property
    def store(self) -> Path:
        return self.root / "store"

    @property
    def dest(self) -> Path:
        return self.store / "layer"

    def blob(self, raw: bytes, compression: str = "none", name: str = "layer.blob") -> Path:
        path = self.root / "blobs" / name
        path.write_bytes(compress(raw, compression))
        return path

    def unpack(
        self,
        entries: list[Entry],
        compression: str = "none",
        *,
        expected_diff_id: str | None = None,
        limits: UnpackLimits = DEFAULT_LIMITS,
    ) -> UnpackResult:
        blob = self.blob(build_tar(entries), compression)
        return unpack_layer(blob, self.dest, expected_diff_id=expected_diff_id, limits=limits)

    def assert_contained(self, before: dict[str, tuple[object, ...]]) -> None:
        assert snapshot(self.sentinel) == before
        assert sorted(os.listdir(self.root)) == ["blobs", "sentinel", "store"]
        assert [name for name in os.listdir(self.store) if name != "layer"] == []


@pytest.fixture
def env(tmp_path: Path) -> Env:
    (tmp_path / "store").mkdir()
    (tmp_path / "blobs").mkdir()
    sentinel = tmp_path / "sentinel"
    (sentinel / "dir").mkdir(parents=True)
    (sentinel / "file").write_bytes(b"secret")
    return Env(tmp_path, sentinel)


def xattr(path: Path, name: str) -> bytes | None:
    try:
        return os.getxattr(path, name, follow_symlinks=False)
    except OSError as e:
        if e.errno == errno.ENODATA:
            return None
        raise


# --- a normal layer ---------------------------------------------------------


@pytest.mark.parametrize("compression", ["none", "gzip", "zstd"])
def test_normal_layer_round_trips(env: Env, compression: str) -> None:
    entries = [
        directory(".", mode=0o755, mtime=MTIME - 1),
        directory("usr", mtime=MTIME + 1),
        directory("usr/bin", mode=0o751, mtime=MTIME + 2),
        reg(
            "usr/bin/tool",
            b"#!/bin/true\n",
            mode=0o4755,
            uid=1000,
            gid=1001,
            mtime=MTIME + 3,
            xattrs={"security.capability": CAPABILITY, "user.note": b"hello"},
        ),
        symlink("usr/bin/link", "tool", uid=1000, gid=1001, mtime=MTIME + 4),
        symlink("usr/lib64", "../lib"),
        hardlink("usr/bin/hard", "usr/bin/tool"),
        directory("ro", mode=0o555, mtime=MTIME + 5),
        reg("ro/inside", b"x", mode=0o444),
        directory("tmp", mode=0o1777),
        directory("shared", mode=0o2775, gid=50),
        reg("implicit/parent/file", b"deep"),
        reg("again", b"first"),
        reg("again", b"second"),
        directory("usr", mode=0o700, mtime=MTIME + 6),  # a later dir entry only updates metadata
    ]
    raw = build_tar(entries)
    blob = env.blob(raw, compression)

    result = unpack_layer(blob, env.dest, expected_diff_id=f"sha256:{hashlib.sha256(raw).hexdigest()}")

    layer = env.dest
    assert result == UnpackResult(
        diff_id=f"sha256:{hashlib.sha256(raw).hexdigest()}", size=12 + 1 + 4 + 5 + 6, entries=len(entries)
    )
    tool = (layer / "usr/bin/tool").lstat()
    assert stat.S_IMODE(tool.st_mode) == 0o4755
    assert (tool.st_uid, tool.st_gid, tool.st_mtime_ns) == (1000, 1001, (MTIME + 3) * 10**9)
    assert (layer / "usr/bin/tool").read_bytes() == b"#!/bin/true\n"
    assert xattr(layer / "usr/bin/tool", "security.capability") == CAPABILITY
    assert xattr(layer / "usr/bin/tool", "user.note") == b"hello"
    assert (layer / "usr/bin/hard").lstat().st_ino == tool.st_ino
    link = (layer / "usr/bin/link").lstat()
    assert os.readlink(layer / "usr/bin/link") == "tool"
    assert (link.st_uid, link.st_gid, link.st_mtime_ns) == (1000, 1001, (MTIME + 4) * 10**9)
    assert os.readlink(layer / "usr/lib64") == "../lib"
    assert stat.S_IMODE((layer / "usr").stat().st_mode) == 0o700
    assert (layer / "usr").stat().st_mtime_ns == (MTIME + 6) * 10**9
    assert (layer / "usr/bin").stat().st_mtime_ns == (MTIME + 2) * 10**9  # not bumped by its contents
    assert stat.S_IMODE((layer / "usr/bin").stat().st_mode) == 0o751
    assert stat.S_IMODE((layer / "ro").stat().st_mode) == 0o555
    assert (layer / "ro").stat().st_mtime_ns == (MTIME + 5) * 10**9
    assert (layer / "ro/inside").read_bytes() == b"x"
    assert stat.S_IMODE((layer / "tmp").stat().st_mode) == 0o1777
    shared = (layer / "shared").stat()
    assert (stat.S_IMODE(shared.st_mode), shared.st_gid) == (0o2775, 50)
    assert stat.S_IMODE((layer / "implicit/parent").stat().st_mode) == 0o755
    assert (layer / "again").read_bytes() == b"second"
    assert stat.S_IMODE(layer.stat().st_mode) == 0o755
    assert layer.stat().st_mtime_ns == (MTIME - 1) * 10**9
    assert os.listdir(env.store) == ["layer"]


@pytest.mark.parametrize("compression", ["none", "gzip"])
def test_empty_layer_has_the_well_known_diff_id(env: Env, compression: str) -> None:
    blob = env.blob(bytes(1024), compression)

    result = unpack_layer(blob, env.dest, expected_diff_id=EMPTY_LAYER_DIFF_ID)

    assert result == UnpackResult(diff_id=EMPTY_LAYER_DIFF_ID, size=0, entries=0)
    assert os.listdir(env.dest) == []
    assert stat.S_IMODE(env.dest.stat().st_mode) == 0o755


def test_diff_id_covers_data_after_the_end_blocks(env: Env) -> None:
    raw = build_tar([reg("f", b"x")]) + bytes(8192)

    result = unpack_layer(env.blob(raw, "gzip"), env.dest, expected_diff_id=None)

    assert result.diff_id == f"sha256:{hashlib.sha256(raw).hexdigest()}"


# --- hostile layers ---------------------------------------------------------


def _with_pax(entry: Entry, **records: str) -> list[Entry]:
    """`entry` with pax records that override its header, as a hostile writer could."""
    info, data = entry
    info.pax_headers.update(records)
    return [(info, data)]


def _layer_is(relpath: str, content: bytes) -> Callable[[Env], None]:
    def check(env: Env) -> None:
        path = env.dest / relpath
        assert not path.is_symlink()
        assert path.read_bytes() == content

    return check


def _overlay_xattrs_dropped(env: Env) -> None:
    for path in (env.dest / "d", env.dest / "f"):
        assert xattr(path, "trusted.overlay.opaque") is None
        assert xattr(path, "trusted.overlay.redirect") is None
        assert xattr(path, "user.overlay.opaque") is None
        assert xattr(path, "user.ok") == b"1"


def _is_symlink(relpath: str) -> Callable[[Env], None]:
    def check(env: Env) -> None:
        assert (env.dest / relpath).is_symlink()

    return check


def _dir_with_file(env: Env) -> None:
    assert not (env.dest / "d").is_symlink()
    assert (env.dest / "d/f").read_bytes() == b"mine"


def _hardlinked_symlink(env: Env) -> None:
    assert (env.dest / "x").is_symlink()
    assert (env.dest / "x").lstat().st_ino == (env.dest / "l").lstat().st_ino


OVERLAY_XATTRS = {"trusted.overlay.opaque": b"y", "user.overlay.opaque": b"y", "user.ok": b"1"}

# (entries given the sentinel's absolute path, then an error message fragment or a check of the safe result)
HOSTILE: list[object] = [
    pytest.param(lambda s: [reg("../escape", b"x")], "'../escape' escapes the layer", id="dotdot"),
    pytest.param(lambda s: [reg("a/../../escape", b"x")], "escapes the layer", id="dotdot-inner"),
    pytest.param(lambda s: [reg("/etc/x", b"x")], _layer_is("etc/x", b"x"), id="absolute"),
    pytest.param(lambda s: [symlink("evil", s), reg("evil/pwned", b"x")], "traverses a symlink", id="symlink-parent"),
    pytest.param(lambda s: [symlink("evil", ".."), reg("evil/x", b"x")], "traverses a symlink", id="symlink-dotdot"),
    pytest.param(
        lambda s: [symlink("evil", f"{s}/file"), reg("evil", b"mine")],
        _layer_is("evil", b"mine"),
        id="file-replaces-symlink",
    ),
    pytest.param(
        lambda s: [symlink("d", s), directory("d"), reg("d/f", b"mine")],
        _dir_with_file,
        id="dir-replaces-symlink",
    ),
    pytest.param(
        lambda s: [directory("d", mode=0o777, mtime=1), symlink("d", s)],
        _is_symlink("d"),
        id="dir-metadata-not-applied-through-later-symlink",
    ),
    pytest.param(lambda s: [hardlink("x", "../../etc/passwd")], "escapes the layer", id="hardlink-escape"),
    pytest.param(lambda s: [hardlink("x", "missing")], "not in the layer", id="hardlink-missing"),
    pytest.param(
        lambda s: [symlink("d", s), hardlink("x", "d/file")], "traverses a symlink", id="hardlink-through-symlink"
    ),
    pytest.param(
        lambda s: [symlink("l", f"{s}/file"), hardlink("x", "l")], _hardlinked_symlink, id="hardlink-to-symlink"
    ),
    pytest.param(lambda s: [directory("usr"), hardlink("x", "usr")], "hard link to a directory", id="hardlink-to-dir"),
    pytest.param(
        lambda s: [
            directory("d", xattrs=OVERLAY_XATTRS),
            reg("f", xattrs={**OVERLAY_XATTRS, "trusted.overlay.redirect": b"/x"}),
        ],
        _overlay_xattrs_dropped,
        id="overlay-xattrs",
    ),
    pytest.param(lambda s: _with_pax(reg("placeholder"), path="a\0b"), "NUL byte", id="nul-name"),
    pytest.param(lambda s: [reg("f", xattrs={"user.a\0b": b"1"})], "malformed", id="nul-xattr-name"),
    pytest.param(lambda s: _with_pax(reg("f"), mtime="nan"), "impossible mtime", id="mtime-nan"),
    pytest.param(lambda s: _with_pax(directory("d"), mtime="1e999999999"), "impossible mtime", id="mtime-huge"),
    pytest.param(lambda s: [reg("a" * 4097)], "longer than 4096 bytes", id="name-too-long"),
    pytest.param(lambda s: [symlink("l", "x" * 4097)], "longer than 4096 bytes", id="symlink-target-too-long"),
    pytest.param(
        lambda s: [symlink("evil", s), reg("evil/.wh.file")], "traverses a symlink", id="whiteout-through-symlink"
    ),
    pytest.param(
        lambda s: [symlink("evil", s), reg("evil/.wh..wh..opq")], "traverses a symlink", id="opaque-through-symlink"
    ),
    pytest.param(lambda s: [reg(".wh...")], "not a valid whiteout", id="whiteout-dotdot"),
    pytest.param(lambda s: [reg("f", b"x"), reg("f/g", b"x")], "to be a directory", id="file-as-parent"),
    pytest.param(lambda s: [symlink(".", s)], "would replace the layer root", id="root-replaced"),
    pytest.param(lambda s: [node("v", b"V")], "unsupported type", id="unknown-type"),
    pytest.param(lambda s: [reg("f", uid=-5)], "invalid size or owner", id="negative-uid"),
]


@pytest.mark.parametrize(("make", "expect"), HOSTILE)
def test_hostile_layer_stays_inside(env: Env, make: Callable[[str], list[Entry]], expect: object) -> None:
    before = snapshot(env.sentinel)
    entries = make(str(env.sentinel))

    if isinstance(expect, str):
        with pytest.raises(InvalidArgument, match=expect):
            env.unpack(entries)
        assert not env.dest.exists()
    else:
        env.unpack(entries)
        assert callable(expect)
        expect(env)

    env.assert_contained(before)


def _corrupt_second_header(raw: bytes) -> bytes:
    first_size = 512 + 512  # header + one data block
    header = bytearray(raw[first_size : first_size + 512])
    header[0:1] = b"Z"  # the checksum no longer matches
    return raw[:first_size] + bytes(header) + raw[first_size + 512 :]


def _pax_header(payload: bytes) -> bytes:
    """A raw pax extended header with `payload`, followed by a small file."""
    header = tarfile.TarInfo("PaxHeader")
    header.type = tarfile.XHDTYPE
    header.size = len(payload)
    return build_tar([(header, payload), reg("f", b"x")], fmt=tarfile.USTAR_FORMAT)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        pytest.param(b"this is not a tar" * 100, "corrupt tar header", id="not-a-tar"),
        pytest.param(
            _corrupt_second_header(build_tar([reg("a", b"x"), reg("b", b"y")], fmt=tarfile.USTAR_FORMAT)),
            "corrupt tar header",
            id="corrupt-header-mid-stream",
        ),
        pytest.param(build_tar([reg("f", b"x" * 2048)])[:1536], "not a valid tar", id="truncated-content"),
        pytest.param(_pax_header(b"2 2 " * 65536 + b"=\n"), "malformed pax header", id="pax-quadratic"),
        pytest.param(_pax_header(b"1" * 262144), "malformed pax header", id="pax-digit-run"),
        pytest.param(_pax_header(b"8 path=x\n"), "malformed pax header", id="pax-bad-length"),
        pytest.param(_pax_header(b"x" * (2 << 20)), "implausibly large or many tar metadata headers", id="pax-huge"),
        pytest.param(_pax_header(b"22 GNU.sparse.major=1\n"), "sparse file", id="pax-sparse"),
    ],
)
def test_malformed_tar_is_invalid(env: Env, raw: bytes, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        unpack_layer(env.blob(raw), env.dest, expected_diff_id=None)
    assert os.listdir(env.store) == []


@pytest.mark.parametrize(
    "blob",
    [
        pytest.param(b"\x1f\x8b" + b"garbage" * 10, id="bad-gzip"),
        pytest.param(gzip.compress(build_tar([reg("f", b"x")]))[:-12], id="truncated-gzip"),
        pytest.param(b"\x28\xb5\x2f\xfd" + b"garbage" * 10, id="bad-zstd"),
    ],
)
def test_corrupt_compression_is_invalid(env: Env, blob: bytes) -> None:
    path = env.root / "blobs" / "bad"
    path.write_bytes(blob)

    with pytest.raises(InvalidArgument, match=r"not valid|not a valid tar"):
        unpack_layer(path, env.dest, expected_diff_id=None)

    assert os.listdir(env.store) == []


# --- limits -----------------------------------------------------------------


def test_too_many_entries(env: Env) -> None:
    before = snapshot(env.sentinel)
    with pytest.raises(ResourceExhausted, match="more than 3 entries"):
        env.unpack([reg(f"f{i}", b"x") for i in range(5)], limits=UnpackLimits(max_entries=3))
    assert not env.dest.exists()
    env.assert_contained(before)


def test_too_many_bytes(env: Env) -> None:
    before = snapshot(env.sentinel)
    with pytest.raises(ResourceExhausted, match="exceeds 1000 bytes"):
        env.unpack([reg("a", b"x" * 600), reg("b", b"x" * 600)], limits=UnpackLimits(max_bytes=1000))
    assert not env.dest.exists()
    env.assert_contained(before)


class Zeros(io.RawIOBase):
    def __init__(self, size: int) -> None:
        self.left = size

    def readable(self) -> bool:
        return True

    def readinto(self, buf: memoryview) -> int:
        n = min(len(buf), self.left)
        buf[:n] = bytes(n)
        self.left -= n
        return n


BOMB = 64 << 20


def _gzip_bomb(path: Path, *, in_file: bool) -> None:
    """A small gzip that inflates to BOMB zeros, either as one file's content or after the end blocks."""
    with gzip.open(path, "wb", compresslevel=1) as gz:
        with tarfile.open(fileobj=gz, mode="w|", format=tarfile.PAX_FORMAT) as tar:
            info = tarfile.TarInfo("zeros")
            info.size = BOMB if in_file else 1
            tar.addfile(info, io.BufferedReader(Zeros(info.size)))
        if not in_file:
            chunk = bytes(1 << 20)
            for _ in range(BOMB >> 20):
                gz.write(chunk)


@pytest.mark.parametrize("in_file", [True, False], ids=["content", "after-end"])
def test_gzip_bomb_stops_at_the_limit(env: Env, in_file: bool) -> None:
    blob = env.root / "blobs" / "bomb.gz"
    _gzip_bomb(blob, in_file=in_file)
    assert blob.stat().st_size < BOMB // 100
    limits = UnpackLimits(max_bytes=1 << 20, max_entries=16)

    with pytest.raises(ResourceExhausted):
        unpack_layer(blob, env.dest, expected_diff_id=None, limits=limits)

    assert os.listdir(env.store) == []


# --- whiteouts ----------------------------------------------------------------


def test_whiteouts_become_overlay_markers(env: Env) -> None:
    env.unpack(
        [
            directory("a"),
            reg("a/.wh.gone"),
            directory("o"),
            reg("o/.wh..wh..opq"),
            reg("o/new", b"n"),
            directory(".wh..wh.plnk"),
            reg(".wh..wh.plnk/1234.5678", b"aufs"),
        ]
    )

    gone = (env.dest / "a/gone").lstat()
    assert stat.S_ISCHR(gone.st_mode) and gone.st_rdev == os.makedev(0, 0)
    assert (gone.st_uid, gone.st_gid) == (0, 0)
    assert xattr(env.dest / "o", "trusted.overlay.opaque") == b"y"
    assert sorted(os.listdir(env.dest)) == ["a", "o"]
    assert os.listdir(env.dest / "a") == ["gone"]
    assert os.listdir(env.dest / "o") == ["new"]


def test_whiteouts_work_in_a_real_overlay_mount(env: Env) -> None:
    layer1 = env.store / "layer1"
    layer2 = env.store / "layer2"
    unpack_layer(
        env.blob(build_tar([reg("a/keep", b"k"), reg("a/gone", b"g"), reg("o/old", b"o")]), name="l1"),
        layer1,
        expected_diff_id=None,
    )
    unpack_layer(
        env.blob(build_tar([reg("a/.wh.gone"), reg("o/.wh..wh..opq"), reg("o/new", b"n")]), name="l2"),
        layer2,
        expected_diff_id=None,
    )
    merged = env.root / "merged"
    merged.mkdir()

    subprocess.run(["mount", "-t", "overlay", "overlay", "-o", f"lowerdir={layer2}:{layer1}", str(merged)], check=True)
    try:
        assert sorted(os.listdir(merged / "a")) == ["keep"]
        assert sorted(os.listdir(merged / "o")) == ["new"]
    finally:
        subprocess.run(["umount", str(merged)], check=True)


# --- device nodes -------------------------------------------------------------


DEVICES = [
    node("dev/null", tarfile.CHRTYPE, 1, 3),
    node("dev/loop0", tarfile.BLKTYPE, 7, 0),
    node("pipe", tarfile.FIFOTYPE),
]


def test_devices_are_skipped_unless_allowed(env: Env) -> None:
    result = env.unpack(DEVICES)

    assert result.entries == 3
    assert os.listdir(env.dest) == ["pipe"]
    pipe = (env.dest / "pipe").lstat()
    assert stat.S_ISFIFO(pipe.st_mode) and stat.S_IMODE(pipe.st_mode) == 0o620


def test_devices_are_created_when_allowed(env: Env) -> None:
    env.unpack(DEVICES, limits=UnpackLimits(allow_devices=True))

    null = (env.dest / "dev/null").lstat()
    loop = (env.dest / "dev/loop0").lstat()
    assert stat.S_ISCHR(null.st_mode) and null.st_rdev == os.makedev(1, 3)
    assert stat.S_ISBLK(loop.st_mode) and loop.st_rdev == os.makedev(7, 0)
    assert stat.S_IMODE(null.st_mode) == 0o620
    assert stat.S_ISFIFO((env.dest / "pipe").lstat().st_mode)


# --- publishing ---------------------------------------------------------------


def test_diff_id_mismatch_is_corruption(env: Env) -> None:
    with pytest.raises(DataCorruption, match="expected sha256:0000"):
        env.unpack([reg("f", b"x")], "gzip", expected_diff_id="sha256:" + "0" * 64)

    assert os.listdir(env.store) == []


def test_dest_created_concurrently_keeps_the_other_copy(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    sync = unpack._sync_filesystem
    theirs: list[int] = []

    def other_unpacker_wins(path: Path) -> None:
        env.dest.mkdir()  # empty, as from an empty layer: a plain rename() would replace it
        theirs.append(env.dest.stat().st_ino)
        sync(path)

    monkeypatch.setattr(unpack, "_sync_filesystem", other_unpacker_wins)
    raw = build_tar([reg("ours", b"x")])

    result = unpack_layer(env.blob(raw), env.dest, expected_diff_id=None)

    assert result.diff_id == f"sha256:{hashlib.sha256(raw).hexdigest()}"
    assert [env.dest.stat().st_ino] == theirs
    assert os.listdir(env.dest) == []
    assert os.listdir(env.store) == ["layer"]


def test_existing_dest_is_refused(env: Env) -> None:
    env.dest.mkdir()

    with pytest.raises(AlreadyExists):
        env.unpack([reg("f", b"x")])

    assert os.listdir(env.store) == ["layer"]
