"""Reading an image layer's tar stream when the stream is hostile: decompression, hashing, bounded headers.

A layer arrives gzip, zstd or plain; its format comes from its magic bytes. The
uncompressed stream is hashed as it is read (the diff_id covers all of it) and
bounded in size. tarfile is used for the headers, with its unsafe habits taken
away: corrupt headers mid-stream, unbounded metadata headers, regex-parsed pax
records, sparse files (see LayerTarInfo).
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import tarfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol, Self, cast

import zstandard

from core.errors import InvalidArgument, ResourceExhausted

_GZIP_MAGIC = b"\x1f\x8b"
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
CHUNK = 1 << 20  # how much is read (and copied out) at a time

# Bounds on tar metadata headers (pax, GNU long names). Real layers use a few
# hundred bytes and at most three headers per entry; tarfile reads each header
# whole into memory and recurses once per header, so both need a cap.
_MAX_ENTRY_METADATA = 1 << 20
_MAX_ENTRY_HEADERS = 8
MAX_GLOBAL_METADATA = 1 << 20

_METADATA_TYPES = frozenset(
    {
        tarfile.XHDTYPE,
        tarfile.XGLTYPE,
        tarfile.SOLARIS_XHDTYPE,
        tarfile.GNUTYPE_LONGNAME,
        tarfile.GNUTYPE_LONGLINK,
    }
)


class Readable(Protocol):
    """What the layer is read through: a binary stream, read forwards only."""

    def read(self, size: int, /) -> bytes: ...


@contextlib.contextmanager
def decompressed(blob: Path) -> Iterator[tuple[Readable, str]]:
    """Open `blob` as an uncompressed stream; the format comes from its magic bytes, not a media type."""
    with open(blob, "rb") as raw:
        magic = raw.read(len(_ZSTD_MAGIC))
        raw.seek(0)
        if magic.startswith(_GZIP_MAGIC):
            with gzip.GzipFile(fileobj=raw, mode="rb") as stream:
                yield stream, "gzip"
        elif magic == _ZSTD_MAGIC:
            decompressor = zstandard.ZstdDecompressor()
            with decompressor.stream_reader(raw, read_across_frames=True, closefd=False) as stream:
                yield stream, "zstd"
        else:
            yield raw, "tar"


class HashingReader:
    """The uncompressed stream as tarfile reads it: hashed for the diff_id and bounded in size."""

    def __init__(self, stream: Readable, compression: str, limit: int) -> None:
        self._stream = stream
        self._compression = compression
        self._limit = limit
        self._total = 0
        self._sha = hashlib.sha256()

    def read(self, size: int) -> bytes:
        try:
            data = self._stream.read(size)
        except (EOFError, zlib.error, gzip.BadGzipFile, zstandard.ZstdError) as e:
            raise InvalidArgument(f"layer is not valid {self._compression}: {e}") from e
        self._total += len(data)
        if self._total > self._limit:
            raise ResourceExhausted(f"layer uncompresses to more than {self._limit} bytes")
        self._sha.update(data)
        return data

    def drain(self) -> None:
        """Hash what follows the tar end blocks: the diff_id covers the whole stream."""
        while self.read(CHUNK):
            pass

    @property
    def diff_id(self) -> str:
        return f"sha256:{self._sha.hexdigest()}"


def _header_error(name: str) -> type[tarfile.HeaderError]:
    """One of tarfile's HeaderError subclasses, by name: typeshed declares only their base class."""
    error = getattr(tarfile, name)
    if not (isinstance(error, type) and issubclass(error, tarfile.HeaderError)):
        raise ImportError(f"tarfile.{name} is not a tarfile.HeaderError")
    return error


_CORRUPT_HEADER_ERRORS = (_header_error("InvalidHeaderError"), _header_error("TruncatedHeaderError"))
_SUBSEQUENT_HEADER_ERROR = _header_error("SubsequentHeaderError")


class _TarInfoInternals(Protocol):
    """The private TarInfo methods tarfile calls while it reads headers, which LayerTarInfo overrides or calls.

    typeshed leaves them out. They are tarfile's own header-reading steps in
    Lib/tarfile.py; test_unpack drives every path through them, so a Python
    that changes them fails there first.
    """

    def _proc_member(self, tarfile: tarfile.TarFile) -> tarfile.TarInfo: ...

    def _block(self, count: int) -> int: ...

    def _apply_pax_info(self, pax_headers: dict[str, str], encoding: str, errors: str) -> None: ...


def _internals(info: object) -> _TarInfoInternals:
    """`info` (a TarInfo, or super() inside one) seen with its private methods (see _TarInfoInternals)."""
    return cast(_TarInfoInternals, info)


class LayerTarInfo(tarfile.TarInfo):
    """TarInfo that refuses what stock tarfile would accept unsafely.

    Stock tarfile treats a corrupt header mid-stream as the end of the archive,
    buffers and recurses on any number of metadata headers, and parses pax
    records with regexes that go quadratic on crafted input (CVE-2024-6232 in
    Python < 3.11.10). Sparse files are refused: their maps are unbounded and
    no image builder writes them.
    """

    @classmethod
    def frombuf(cls, buf: bytes | bytearray, encoding: str, errors: str) -> Self:
        try:
            return super().frombuf(buf, encoding, errors)
        except _CORRUPT_HEADER_ERRORS as e:
            raise InvalidArgument(f"layer has a corrupt tar header: {e}") from None

    def _proc_member(self, archive: LayerTar) -> tarfile.TarInfo:
        if self.type == tarfile.GNUTYPE_SPARSE:
            raise InvalidArgument(f"layer entry {show(self.name)} is a sparse file, which is not supported")
        if self.type in _METADATA_TYPES:
            archive.count_metadata(self)
        else:
            archive.entry_started()
        return _internals(super())._proc_member(archive)

    def _proc_pax(self, archive: LayerTar) -> tarfile.TarInfo:
        """Do what tarfile does with a pax header, but parse it with _parse_pax."""
        buf = archive.fileobj.read(_internals(self)._block(self.size))
        if len(buf) < self.size:
            raise InvalidArgument("layer ends inside a pax header")
        records = _parse_pax(buf[: self.size])
        if any(key.startswith("GNU.sparse.") for key in records):
            raise InvalidArgument("layer contains a sparse file, which is not supported")
        if self.type == tarfile.XGLTYPE:
            archive.pax_headers.update(records)
        try:
            member = self.fromtarfile(archive)
        except tarfile.HeaderError as e:
            raise _SUBSEQUENT_HEADER_ERROR(str(e)) from None
        if self.type != tarfile.XGLTYPE:
            pax_headers = {**archive.pax_headers, **records}
            _internals(member)._apply_pax_info(pax_headers, archive.encoding, archive.errors)
            member.offset = self.offset
            if "size" in pax_headers and member.isreg():
                archive.offset = member.offset_data + _internals(member)._block(member.size)
        return member


class LayerTar(tarfile.TarFile):
    """A TarFile that counts the metadata headers in front of each entry (see LayerTarInfo)."""

    tarinfo = LayerTarInfo
    # What tarfile keeps and typeshed leaves out or types loosely: the global pax headers (a dict,
    # which _proc_pax updates) and the members read so far (which the unpacker clears).
    pax_headers: dict[str, str]
    members: list[tarfile.TarInfo]
    # Class-level zeros: tarfile reads the first header inside __init__, before any of ours could run.
    pending_bytes = 0
    pending_headers = 0
    global_bytes = 0

    def count_metadata(self, header: tarfile.TarInfo) -> None:
        self.pending_headers += 1
        self.pending_bytes += header.size
        if header.type == tarfile.XGLTYPE:
            self.global_bytes += header.size
        if (
            header.size < 0
            or self.pending_headers > _MAX_ENTRY_HEADERS
            or self.pending_bytes > _MAX_ENTRY_METADATA
            or self.global_bytes > MAX_GLOBAL_METADATA
        ):
            raise InvalidArgument("layer has implausibly large or many tar metadata headers")

    def entry_started(self) -> None:
        self.pending_bytes = self.pending_headers = 0


def _parse_pax(buf: bytes) -> dict[str, str]:
    """Parse pax records ("<length> <key>=<value>\\n") in one linear pass, refusing anything malformed."""
    records: dict[str, str] = {}
    pos = 0
    while pos < len(buf):
        space = buf.find(b" ", pos, pos + 20)
        if space <= pos or not buf[pos:space].isdigit():
            raise InvalidArgument("layer has a malformed pax header")
        end = pos + int(buf[pos:space])
        if end > len(buf) or end <= space + 1 or buf[end - 1] != ord("\n"):
            raise InvalidArgument("layer has a malformed pax header")
        key, equals, value = buf[space + 1 : end - 1].partition(b"=")
        if not key or not equals:
            raise InvalidArgument("layer has a malformed pax header")
        records[key.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
        pos = end
    return records


def show(name: str) -> str:
    """Quote an attacker-chosen name for a message, cut short so it cannot flood logs."""
    return repr(name if len(name) <= 200 else name[:200] + "...")
