"""Unpack one image layer into a directory that overlayfs can use as a lower layer.

A layer is an attacker-controlled tar stream, so everything here assumes hostile
input: names are normalized and checked, every path is resolved below an open
directory fd one component at a time without following symlinks, tar metadata
is bounded before tarfile would buffer it (`images.layer_tar` reads the stream),
and nothing appears at `dest` unless the whole layer unpacked (and hashed to its
expected diff_id).
"""

from __future__ import annotations

import contextlib
import ctypes
import decimal
import errno
import logging
import os
import secrets
import shutil
import stat
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, cast

from core.errors import AlreadyExists, DataCorruption, InvalidArgument, ResourceExhausted
from core.files import fsync_dir
from images.layer_tar import CHUNK, MAX_GLOBAL_METADATA, HashingReader, LayerTar, decompressed, show

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class UnpackLimits:
    max_bytes: int = 32 * 2**30  # total uncompressed bytes of file content
    max_entries: int = 500_000
    max_name_length: int = 4096
    allow_devices: bool = False  # create char/block device nodes; when False they are skipped


@dataclass(frozen=True)
class UnpackResult:
    diff_id: str  # "sha256:<hex>" of the whole uncompressed tar stream
    size: int  # bytes of file content written
    entries: int


# Allowance per entry for headers and padding when bounding the whole stream,
# which stops bombs hidden where file content is not counted (e.g. after the end blocks).
_STREAM_OVERHEAD_PER_ENTRY = 4096

_ENTRY_TYPES = frozenset(
    {
        tarfile.REGTYPE,
        tarfile.AREGTYPE,
        tarfile.CONTTYPE,
        tarfile.DIRTYPE,
        tarfile.SYMTYPE,
        tarfile.LNKTYPE,
        tarfile.FIFOTYPE,
        tarfile.CHRTYPE,
        tarfile.BLKTYPE,
    }
)

_WHITEOUT = ".wh."
_AUFS_META = ".wh..wh."
_OPAQUE = ".wh..wh..opq"
_XATTR_PAX_PREFIX = "SCHILY.xattr."
# Overlay metadata a layer must never forge (user.* is what overlay reads when mounted with userxattr).
_OVERLAY_XATTRS = ("trusted.overlay.", "user.overlay.")
_MAX_MTIME = 2**62 // 10**9  # seconds; keeps nanoseconds within a signed 64-bit time
_MAX_ID = 2**32 - 2  # 2**32 - 1 is (uid_t)-1, which chown reads as "leave unchanged"

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC

# Errors an entry's content causes (bad names, impossible links); anything else is the host's problem.
_CONTENT_ERRNOS = frozenset(
    {
        errno.ENAMETOOLONG,
        errno.EINVAL,
        errno.ENOENT,
        errno.EEXIST,
        errno.ENOTDIR,
        errno.EISDIR,
        errno.ELOOP,
        errno.EMLINK,
        errno.ERANGE,
        errno.E2BIG,
        errno.EILSEQ,
    }
)
_SPACE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})

_libc = ctypes.CDLL(None, use_errno=True)
_libc.renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
_libc.syncfs.argtypes = [ctypes.c_int]
_AT_FDCWD = -100
_RENAME_NOREPLACE = 1


def unpack_layer(
    blob: Path,
    dest: Path,
    *,
    expected_diff_id: str | None,
    limits: UnpackLimits = UnpackLimits(),
) -> UnpackResult:
    """Unpack the layer `blob` (gzip, zstd or plain tar) into the new directory `dest`.

    Work happens in a sibling temp dir that is renamed to `dest` only once the
    layer is complete, verified and flushed to disk, and removed on any
    failure. If `dest` appears meanwhile (a concurrent unpack of the same
    layer won), our copy is discarded and the result returned all the same.
    """
    if expected_diff_id is not None and not expected_diff_id.startswith("sha256:"):
        raise InvalidArgument(f"unsupported diff_id {expected_diff_id!r}: only sha256 is supported")
    if os.path.lexists(dest):
        raise AlreadyExists(f"layer directory {dest} already exists")
    tmp = dest.parent / f".unpack-{secrets.token_hex(8)}"
    os.mkdir(tmp, 0o700)
    try:
        result = _unpack(blob, tmp, limits)
        if expected_diff_id is not None and result.diff_id != expected_diff_id:
            raise DataCorruption(f"layer {blob.name} uncompresses to {result.diff_id}, expected {expected_diff_id}")
        _sync_filesystem(tmp)
        if _rename_noreplace(tmp, dest):
            fsync_dir(dest.parent)
        else:
            log.info("layer %s was unpacked concurrently; keeping the other copy", dest)
            _discard(tmp)
    except BaseException:
        _discard(tmp)
        raise
    return result


def _unpack(blob: Path, root: Path, limits: UnpackLimits) -> UnpackResult:
    stream_limit = limits.max_bytes + limits.max_entries * _STREAM_OVERHEAD_PER_ENTRY + MAX_GLOBAL_METADATA
    with decompressed(blob) as (stream, compression):
        reader = HashingReader(stream, compression, stream_limit)
        # tarfile's stream mode ("r|") only ever calls read() on its file object; typeshed asks for a whole file.
        source = cast("tarfile._Fileobj", reader)
        root_fd = os.open(root, _DIR_FLAGS)
        try:
            unpacker = _Unpacker(root_fd, limits)
            try:
                with LayerTar.open(fileobj=source, mode="r|", encoding="utf-8", errors="surrogateescape") as archive:
                    while (member := archive.next()) is not None:
                        unpacker.add(member, archive)
                        # Stream mode still remembers every member; forgetting keeps memory flat.
                        archive.members.clear()
            except tarfile.TarError as e:
                raise InvalidArgument(f"layer is not a valid tar: {e}") from e
            unpacker.finish()
        finally:
            os.close(root_fd)
        reader.drain()
    return UnpackResult(diff_id=reader.diff_id, size=unpacker.size, entries=unpacker.entries)


class _Attrs(NamedTuple):
    """The ownership, mode and mtime a node gets from its tar header."""

    uid: int
    gid: int
    mode: int
    mtime_ns: int

    @classmethod
    def of(cls, member: tarfile.TarInfo) -> _Attrs:
        return cls(member.uid, member.gid, member.mode & 0o7777, _mtime_ns(member))


def _mtime_ns(member: tarfile.TarInfo) -> int:
    """The exact mtime: tarfile parses pax mtimes into floats, which lose the last digits."""
    try:
        seconds = decimal.Decimal(member.pax_headers["mtime"])
    except (KeyError, decimal.InvalidOperation):
        seconds = decimal.Decimal(member.mtime)
    if not (seconds.is_finite() and seconds.copy_abs() < _MAX_MTIME):
        raise InvalidArgument(f"layer entry {show(member.name)} has an impossible mtime")
    return int(seconds * 1_000_000_000)


class _Unpacker:
    """Creates tar members below `root_fd`, never following a symlink on the way there."""

    def __init__(self, root_fd: int, limits: UnpackLimits) -> None:
        self._root = root_fd
        self._limits = limits
        # Directory attrs by normalized path ("" is the root), applied at the end so read-only
        # dirs and mtimes survive their contents. Paths, not headers: memory stays small.
        self._dirs: dict[str, _Attrs] = {}
        self._declared = 0
        self.size = 0
        self.entries = 0

    def add(self, member: tarfile.TarInfo, archive: tarfile.TarFile) -> None:
        self.entries += 1
        if self.entries > self._limits.max_entries:
            raise ResourceExhausted(f"layer has more than {self._limits.max_entries} entries")
        parts = self._check(member)
        if (member.ischr() or member.isblk()) and not self._limits.allow_devices:
            log.debug("skipping device node %s in layer", show(member.name))
            return
        with _blame(member.name):
            if not parts:
                self._update_root(member)
            elif _is_aufs_metadata(parts):
                log.debug("skipping aufs metadata %s in layer", show(member.name))
            elif parts[-1] == _OPAQUE:
                self._opaque(parts[:-1], member)
            elif parts[-1].startswith(_WHITEOUT):
                self._whiteout(parts, member)
            else:
                self._create(parts, member, archive)

    def finish(self) -> None:
        """Apply directory attrs, deepest first, now that nothing more is written inside them."""
        if "" not in self._dirs:
            os.fchmod(self._root, 0o755)
        for path in sorted(self._dirs, key=_depth, reverse=True):
            try:
                fd = self._open_dir(path.split("/") if path else [], path, create=False)
            except InvalidArgument:
                continue  # a later entry replaced it with something that is not a directory
            try:
                with _blame(path):
                    _set_attrs(fd, self._dirs[path])
            finally:
                os.close(fd)

    def _check(self, member: tarfile.TarInfo) -> list[str]:
        """Refuse entries no filesystem should see; returns the normalized name's components."""
        name = show(member.name)
        if member.type not in _ENTRY_TYPES:
            raise InvalidArgument(f"layer entry {name} has unsupported type {member.type!r}")
        if member.size < 0 or not (0 <= member.uid <= _MAX_ID and 0 <= member.gid <= _MAX_ID):
            raise InvalidArgument(f"layer entry {name} has an invalid size or owner")
        if member.isreg():
            self._declared += member.size
            if self._declared > self._limits.max_bytes:
                raise ResourceExhausted(f"layer content exceeds {self._limits.max_bytes} bytes")
        if member.issym():
            self._check_path(member.linkname, member.name)  # stored verbatim, never resolved
        return self._components(member.name, member.name)

    def _check_path(self, path: str, entry: str) -> None:
        if "\0" in path:
            raise InvalidArgument(f"layer entry {show(entry)} has a NUL byte in {show(path)}")
        if len(os.fsencode(path)) > self._limits.max_name_length:
            raise InvalidArgument(
                f"layer entry {show(entry)} has a path longer than {self._limits.max_name_length} bytes"
            )

    def _components(self, path: str, entry: str) -> list[str]:
        """Split a tar path into its components below the root, refusing any that climb out."""
        self._check_path(path, entry)
        parts = [part for part in path.split("/") if part not in ("", ".")]
        if ".." in parts:
            where = "" if path == entry else f" (via {show(path)})"
            raise InvalidArgument(f"layer entry {show(entry)}{where} escapes the layer")
        return parts

    def _open_dir(self, parts: Sequence[str], entry: str, *, create: bool = True) -> int:
        """Open the directory `parts` below the root one component at a time, refusing symlinks.

        Missing components are created (0755) when `create`; otherwise they are an error.
        """
        fd = os.open(".", _DIR_FLAGS, dir_fd=self._root)
        try:
            for depth, part in enumerate(parts, 1):
                where = show("/".join(parts[:depth]))
                try:
                    child = os.open(part, _DIR_FLAGS, dir_fd=fd)
                except FileNotFoundError:
                    if not create:
                        raise InvalidArgument(
                            f"layer entry {show(entry)} needs {where}, which is not in the layer"
                        ) from None
                    os.mkdir(part, 0o700, dir_fd=fd)
                    child = os.open(part, _DIR_FLAGS, dir_fd=fd)
                    os.fchmod(child, 0o755)
                except OSError as e:
                    if e.errno not in (errno.ENOTDIR, errno.ELOOP):
                        raise
                    if stat.S_ISLNK(os.stat(part, dir_fd=fd, follow_symlinks=False).st_mode):
                        raise InvalidArgument(f"layer entry {show(entry)} traverses a symlink at {where}") from None
                    raise InvalidArgument(f"layer entry {show(entry)} needs {where} to be a directory") from None
                os.close(fd)
                fd = child
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _update_root(self, member: tarfile.TarInfo) -> None:
        if not member.isdir():
            raise InvalidArgument(f"layer entry {show(member.name)} would replace the layer root")
        _set_xattrs(self._root, member)
        self._dirs[""] = _Attrs.of(member)

    def _opaque(self, parent: list[str], member: tarfile.TarInfo) -> None:
        """A tar opaque marker hides the lower layers' contents of its directory: overlayfs's opaque xattr."""
        dir_fd = self._open_dir(parent, member.name)
        try:
            os.setxattr(dir_fd, "trusted.overlay.opaque", b"y")
        finally:
            os.close(dir_fd)

    def _whiteout(self, parts: list[str], member: tarfile.TarInfo) -> None:
        """A tar whiteout `.wh.NAME` deletes NAME from lower layers: overlayfs's 0:0 char device."""
        *parent, leaf = parts
        hidden = leaf.removeprefix(_WHITEOUT)
        if hidden in ("", ".", ".."):
            raise InvalidArgument(f"layer entry {show(member.name)} is not a valid whiteout")
        dir_fd = self._open_dir(parent, member.name)
        try:
            _remove(dir_fd, hidden)
            os.mknod(hidden, stat.S_IFCHR, os.makedev(0, 0), dir_fd=dir_fd)
        finally:
            os.close(dir_fd)

    def _create(self, parts: list[str], member: tarfile.TarInfo, archive: tarfile.TarFile) -> None:
        *parent, leaf = parts
        dir_fd = self._open_dir(parent, member.name)
        try:
            if member.isdir():
                self._mkdir(dir_fd, parts, member)
            elif member.isreg():
                self._write(dir_fd, leaf, member, archive)
            elif member.islnk():
                self._link(dir_fd, parts, member)
            else:
                _remove(dir_fd, leaf)
                if member.issym():
                    os.symlink(member.linkname, leaf, dir_fd=dir_fd)
                elif member.isfifo():
                    os.mkfifo(leaf, 0o600, dir_fd=dir_fd)
                else:
                    kind = stat.S_IFCHR if member.ischr() else stat.S_IFBLK
                    os.mknod(leaf, kind | 0o600, os.makedev(member.devmajor, member.devminor), dir_fd=dir_fd)
                _set_metadata_at(dir_fd, leaf, member)
        finally:
            os.close(dir_fd)

    def _mkdir(self, dir_fd: int, parts: list[str], member: tarfile.TarInfo) -> None:
        """Create the directory unless it exists; its attrs wait for finish(), its xattrs do not."""
        attrs = _Attrs.of(member)
        leaf = parts[-1]
        if not _is_dir(dir_fd, leaf):
            _remove(dir_fd, leaf)
            os.mkdir(leaf, 0o700, dir_fd=dir_fd)
        fd = os.open(leaf, _DIR_FLAGS, dir_fd=dir_fd)
        try:
            _set_xattrs(fd, member)
        finally:
            os.close(fd)
        self._dirs["/".join(parts)] = attrs

    def _write(self, dir_fd: int, leaf: str, member: tarfile.TarInfo, archive: tarfile.TarFile) -> None:
        _remove(dir_fd, leaf)
        source = archive.extractfile(member)
        assert source is not None  # regular members always have content
        with os.fdopen(os.open(leaf, _FILE_FLAGS, 0o600, dir_fd=dir_fd), "wb") as out:
            shutil.copyfileobj(source, out, CHUNK)
            out.flush()
            _set_attrs(out.fileno(), _Attrs.of(member))
            _set_xattrs(out.fileno(), member)
        self.size += member.size

    def _link(self, dir_fd: int, parts: list[str], member: tarfile.TarInfo) -> None:
        """Hard-link to a non-directory already unpacked in this layer, found without following symlinks."""
        name = show(member.name)
        target = self._components(member.linkname, member.name)
        if not target:
            raise InvalidArgument(f"layer entry {name} is a hard link to the layer root")
        if target == parts:
            return  # a link to itself changes nothing
        *target_parent, target_leaf = target
        source_fd = self._open_dir(target_parent, member.name, create=False)
        try:
            try:
                target_mode = os.stat(target_leaf, dir_fd=source_fd, follow_symlinks=False).st_mode
            except FileNotFoundError:
                raise InvalidArgument(
                    f"layer entry {name} links to {show(member.linkname)}, which is not in the layer"
                ) from None
            if stat.S_ISDIR(target_mode):
                raise InvalidArgument(f"layer entry {name} is a hard link to a directory")
            _remove(dir_fd, parts[-1])
            os.link(target_leaf, parts[-1], src_dir_fd=source_fd, dst_dir_fd=dir_fd, follow_symlinks=False)
        finally:
            os.close(source_fd)


def _set_attrs(fd: int, attrs: _Attrs) -> None:
    """Owner before mode: chown clears setuid/setgid."""
    os.fchown(fd, attrs.uid, attrs.gid)
    os.fchmod(fd, attrs.mode)
    os.utime(fd, ns=(attrs.mtime_ns, attrs.mtime_ns))


def _set_xattrs(fd: int, member: tarfile.TarInfo) -> None:
    """After chown, which clears security.capability."""
    for name, value in _xattrs(member):
        os.setxattr(fd, name, value)


def _set_metadata_at(dir_fd: int, leaf: str, member: tarfile.TarInfo) -> None:
    """Attrs and xattrs for nodes that cannot be opened (symlinks, fifos, devices) and were just created."""
    attrs = _Attrs.of(member)
    os.chown(leaf, attrs.uid, attrs.gid, dir_fd=dir_fd, follow_symlinks=False)
    if not member.issym():  # Linux has no lchmod; symlink modes mean nothing anyway
        os.chmod(leaf, attrs.mode, dir_fd=dir_fd)
    os.utime(leaf, ns=(attrs.mtime_ns, attrs.mtime_ns), dir_fd=dir_fd, follow_symlinks=False)
    for name, value in _xattrs(member):
        # setxattr has no dir_fd form; the /proc path pins the parent and the leaf is not followed.
        os.setxattr(f"/proc/self/fd/{dir_fd}/{leaf}", name, value, follow_symlinks=False)


def _xattrs(member: tarfile.TarInfo) -> Iterator[tuple[str, bytes]]:
    """The entry's pax xattrs, minus overlay ones: those would forge overlay metadata."""
    for key, value in member.pax_headers.items():
        if not key.startswith(_XATTR_PAX_PREFIX):
            continue
        name = key.removeprefix(_XATTR_PAX_PREFIX)
        if name.startswith(_OVERLAY_XATTRS):
            log.warning("layer entry %s: ignoring xattr %s", show(member.name), name)
            continue
        yield name, value.encode("utf-8", "surrogateescape")


def _is_aufs_metadata(parts: list[str]) -> bool:
    """aufs bookkeeping (`.wh..wh.plnk/`, `.wh..wh.aufs`) that overlayfs has no use for."""
    *parent, leaf = parts
    return any(part.startswith(_AUFS_META) for part in parent) or (leaf.startswith(_AUFS_META) and leaf != _OPAQUE)


def _depth(path: str) -> int:
    return path.count("/") + bool(path)


def _is_dir(dir_fd: int, name: str) -> bool:
    try:
        return stat.S_ISDIR(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode)
    except FileNotFoundError:
        return False


def _remove(dir_fd: int, name: str) -> None:
    """Remove `name` in `dir_fd`, whatever it is, without following symlinks (later entries win)."""
    if _is_dir(dir_fd, name):
        shutil.rmtree(name, dir_fd=dir_fd)
    else:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name, dir_fd=dir_fd)


@contextlib.contextmanager
def _blame(name: str) -> Iterator[None]:
    """Report failures the entry's content caused as the layer's fault, naming the entry."""
    try:
        yield
    except OSError as e:
        if e.errno in _SPACE_ERRNOS:
            raise ResourceExhausted(f"no space left to unpack layer entry {show(name)}") from e
        if e.errno in _CONTENT_ERRNOS:
            raise InvalidArgument(f"layer entry {show(name)} cannot be created: {e.strerror}") from e
        raise
    except (ValueError, OverflowError) as e:  # e.g. NUL in an xattr name, absurd mtime or device number
        raise InvalidArgument(f"layer entry {show(name)} is malformed: {e}") from e


def _sync_filesystem(path: Path) -> None:
    """Flush the unpacked files before the rename publishes them: after a crash, a layer that
    exists must be whole, not a tree of empty files."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        if _libc.syncfs(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), str(path))
    finally:
        os.close(fd)


def _rename_noreplace(src: Path, dst: Path) -> bool:
    """Rename `src` to `dst` unless `dst` exists; False if it did.

    Plain rename would silently replace an empty directory someone else just published.
    """
    if _libc.renameat2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), _RENAME_NOREPLACE) == 0:
        return True
    err = ctypes.get_errno()
    if err == errno.EEXIST:
        return False
    raise OSError(err, os.strerror(err), str(src), None, str(dst))


def _discard(tmp: Path) -> None:
    """Remove a temp dir; failing to must not hide the error that brought us here."""
    try:
        shutil.rmtree(tmp)
    except FileNotFoundError:
        pass
    except OSError:
        log.exception("could not remove %s", tmp)
