"""SPDY/3.1 frames: their types, and the encoder and decoder with the header blocks' zlib contexts.

Every Kubernetes client (kubectl, crictl, critest, client-go) speaks SPDY through
moby/spdystream, so that is the peer this is written against: header blocks
share one zlib context per direction, seeded with the SPDY/3 dictionary. The
decoder takes untrusted bytes: every length is checked before it is used, and a
header block may not inflate past MAX_CONTROL_PAYLOAD.
"""

from __future__ import annotations

import enum
import struct
import zlib
from dataclasses import dataclass

VERSION = 3
FLAG_FIN = 0x01
FLAG_UNIDIRECTIONAL = 0x02
SETTINGS_INITIAL_WINDOW_SIZE = 7
DEFAULT_WINDOW = 64 * 1024
MAX_WINDOW = 2**31 - 1
MAX_STREAM_ID = 2**31 - 1
MAX_FRAME_PAYLOAD = 2**24 - 1
MAX_CONTROL_PAYLOAD = 256 * 1024
"""Largest control frame accepted; its header block must also decompress to at most this."""
MAX_HEADERS = 1000

_SYN_STREAM, _SYN_REPLY, _RST_STREAM, _SETTINGS, _PING, _GOAWAY, _HEADERS, _WINDOW_UPDATE = 1, 2, 3, 4, 6, 7, 8, 9

# The SPDY/3 header compression dictionary (draft-mbelshe-httpbis-spdy-00 §2.6.10.1):
# length-prefixed header names and values, then a run of common text. Its Adler-32 is 0xE3C6A7C2.
_DICTIONARY_WORDS = [
    *(
        "options head post put delete trace accept accept-charset accept-encoding accept-language accept-ranges age "
        "allow authorization cache-control connection content-base content-encoding content-language content-length "
        "content-location content-md5 content-range content-type date etag expect expires from host if-match "
        "if-modified-since if-none-match if-range if-unmodified-since last-modified location max-forwards pragma "
        "proxy-authenticate proxy-authorization range referer retry-after server te trailer transfer-encoding "
        "upgrade user-agent vary via warning www-authenticate method get status"
    ).split(),
    *("200 OK", "version", "HTTP/1.1", "url", "public", "set-cookie", "keep-alive", "origin"),
]
_DICTIONARY_TAIL = (
    b"100101201202205206300302303304305306307402405406407408409410411412413414415416417502504505"
    b"203 Non-Authoritative Information204 No Content301 Moved Permanently400 Bad Request401 Unauthorized"
    b"403 Forbidden404 Not Found500 Internal Server Error501 Not Implemented503 Service Unavailable"
    b"Jan Feb Mar Apr May Jun Jul Aug Sept Oct Nov Dec 00:00:00 Mon, Tue, Wed, Thu, Fri, Sat, Sun, GMT"
    b"chunked,text/html,image/png,image/jpg,image/gif,application/xml,application/xhtml+xml,text/plain,"
    b"text/javascript,publicprivatemax-age=gzip,deflate,sdchcharset=utf-8charset=iso-8859-1,utf-,*,enq=0."
)
DICTIONARY = b"".join(len(w).to_bytes(4, "big") + w.encode() for w in _DICTIONARY_WORDS) + _DICTIONARY_TAIL


class RstStatus(enum.IntEnum):
    PROTOCOL_ERROR = 1
    INVALID_STREAM = 2
    REFUSED_STREAM = 3
    UNSUPPORTED_VERSION = 4
    CANCEL = 5
    INTERNAL_ERROR = 6
    FLOW_CONTROL_ERROR = 7
    STREAM_IN_USE = 8
    STREAM_ALREADY_CLOSED = 9
    FRAME_TOO_LARGE = 11


class GoAwayStatus(enum.IntEnum):
    OK = 0
    PROTOCOL_ERROR = 1
    INTERNAL_ERROR = 2


Headers = dict[str, list[str]]
"""Header names (lower case) to their values; SPDY joins several values of one name with NULs."""


@dataclass(frozen=True)
class SynStream:
    stream_id: int
    headers: Headers
    flags: int = 0
    associated_id: int = 0
    priority: int = 0


@dataclass(frozen=True)
class SynReply:
    stream_id: int
    headers: Headers
    flags: int = 0


@dataclass(frozen=True)
class RstStream:
    stream_id: int
    status: int


@dataclass(frozen=True)
class Settings:
    entries: tuple[tuple[int, int, int], ...]  # (flags, id, value)
    flags: int = 0


@dataclass(frozen=True)
class Ping:
    ping_id: int


@dataclass(frozen=True)
class GoAway:
    last_good_stream_id: int
    status: int = GoAwayStatus.OK


@dataclass(frozen=True)
class HeadersFrame:
    stream_id: int
    headers: Headers
    flags: int = 0


@dataclass(frozen=True)
class WindowUpdate:
    stream_id: int
    delta: int


@dataclass(frozen=True)
class Data:
    stream_id: int
    data: bytes
    flags: int = 0


Frame = SynStream | SynReply | RstStream | Settings | Ping | GoAway | HeadersFrame | WindowUpdate | Data


class ProtocolError(Exception):
    """The connection is beyond repair (a broken frame, a corrupt header compression stream)."""


class StreamError(Exception):
    """One stream is at fault; the frame was consumed and the connection goes on after a RST_STREAM."""

    def __init__(self, stream_id: int, status: RstStatus, message: str) -> None:
        super().__init__(message)
        self.stream_id = stream_id
        self.status = status


def header_value(headers: Headers, name: str) -> str:
    """The first value of header `name`, or "" without one."""
    values = headers.get(name)
    return values[0] if values else ""


class FrameEncoder:
    """Frames to bytes; one per connection direction, since header compression state carries over."""

    def __init__(self) -> None:
        self._deflate = zlib.compressobj(zdict=DICTIONARY)

    def encode(self, frame: Frame) -> bytes:
        match frame:
            case Data(stream_id=sid, data=data, flags=flags):
                if not 0 < sid <= MAX_STREAM_ID or len(data) > MAX_FRAME_PAYLOAD:
                    raise ValueError(f"bad DATA frame for stream {sid} ({len(data)} bytes)")
                return struct.pack(">II", sid, flags << 24 | len(data)) + data
            case SynStream():
                body = struct.pack(">IIBB", frame.stream_id, frame.associated_id, frame.priority << 5, 0)
                return self._control(_SYN_STREAM, frame.flags, body + self._header_block(frame.headers))
            case SynReply():
                body = struct.pack(">I", frame.stream_id) + self._header_block(frame.headers)
                return self._control(_SYN_REPLY, frame.flags, body)
            case HeadersFrame():
                body = struct.pack(">I", frame.stream_id) + self._header_block(frame.headers)
                return self._control(_HEADERS, frame.flags, body)
            case RstStream():
                return self._control(_RST_STREAM, 0, struct.pack(">II", frame.stream_id, frame.status))
            case Settings():
                body = struct.pack(">I", len(frame.entries)) + b"".join(
                    struct.pack(">II", flags << 24 | ident, value) for flags, ident, value in frame.entries
                )
                return self._control(_SETTINGS, frame.flags, body)
            case Ping():
                return self._control(_PING, 0, struct.pack(">I", frame.ping_id))
            case GoAway():
                return self._control(_GOAWAY, 0, struct.pack(">II", frame.last_good_stream_id, frame.status))
            case WindowUpdate():
                return self._control(_WINDOW_UPDATE, 0, struct.pack(">II", frame.stream_id, frame.delta))
        raise TypeError(f"not a SPDY frame: {frame!r}")

    @staticmethod
    def _control(kind: int, flags: int, payload: bytes) -> bytes:
        return struct.pack(">HHI", 0x8000 | VERSION, kind, flags << 24 | len(payload)) + payload

    def _header_block(self, headers: Headers) -> bytes:
        raw = [struct.pack(">I", len(headers))]
        for name, values in headers.items():
            key, value = name.lower().encode(), "\0".join(values).encode()
            raw += [struct.pack(">I", len(key)), key, struct.pack(">I", len(value)), value]
        return self._deflate.compress(b"".join(raw)) + self._deflate.flush(zlib.Z_SYNC_FLUSH)


class FrameDecoder:
    """Bytes to frames, incrementally; one per connection direction (header decompression state)."""

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._inflate = zlib.decompressobj(zdict=DICTIONARY)

    def feed(self, data: bytes) -> None:
        self._buffer += data

    def next_frame(self) -> Frame | None:
        """The next complete frame, or None until more bytes arrive.

        Raises `StreamError` for a frame that is wrong about one stream (it is
        consumed; decoding can go on) and `ProtocolError` when it cannot.
        Control frames of unknown types are skipped, as SPDY asks.
        """
        while len(self._buffer) >= 8:
            first, second = struct.unpack_from(">II", self._buffer)
            flags, length = second >> 24, second & 0xFFFFFF
            control = bool(first & 0x80000000)
            if control and length > MAX_CONTROL_PAYLOAD:
                raise ProtocolError(f"control frame of {length} bytes is too large")
            if len(self._buffer) < 8 + length:
                return None
            payload = bytes(self._buffer[8 : 8 + length])
            del self._buffer[: 8 + length]
            if not control:
                if first == 0:
                    raise ProtocolError("DATA frame on stream 0")
                return Data(first, payload, flags)
            version, kind = (first >> 16) & 0x7FFF, first & 0xFFFF
            if version != VERSION:
                raise ProtocolError(f"SPDY version {version} is not supported")
            frame = self._control(kind, flags, payload)
            if frame is not None:
                return frame
        return None

    def _control(self, kind: int, flags: int, payload: bytes) -> Frame | None:
        size = len(payload)
        if kind == _SYN_STREAM:
            _require(size >= 10, "short SYN_STREAM")
            sid, associated = struct.unpack_from(">II", payload)
            sid, associated = _stream_id(sid), associated & MAX_STREAM_ID
            return SynStream(sid, self._headers(payload[10:], sid), flags, associated, payload[8] >> 5)
        if kind in (_SYN_REPLY, _HEADERS):
            _require(size >= 4, "short SYN_REPLY or HEADERS")
            sid = _stream_id(struct.unpack_from(">I", payload)[0])
            headers = self._headers(payload[4:], sid)
            return SynReply(sid, headers, flags) if kind == _SYN_REPLY else HeadersFrame(sid, headers, flags)
        if kind == _RST_STREAM:
            _require(size == 8, "RST_STREAM must be 8 bytes")
            sid, status = struct.unpack(">II", payload)
            _require(status != 0, "RST_STREAM with status 0")
            return RstStream(_stream_id(sid), status)
        if kind == _SETTINGS:
            _require(size >= 4, "short SETTINGS")
            (count,) = struct.unpack_from(">I", payload)
            _require(size == 4 + 8 * count, "SETTINGS length does not match its entry count")
            entries = []
            for offset in range(4, size, 8):
                word, value = struct.unpack_from(">II", payload, offset)
                entries.append((word >> 24, word & 0xFFFFFF, value))
            return Settings(tuple(entries), flags)
        if kind == _PING:
            _require(size == 4, "PING must be 4 bytes")
            return Ping(struct.unpack(">I", payload)[0])
        if kind == _GOAWAY:
            _require(size == 8, "GOAWAY must be 8 bytes")
            last, status = struct.unpack(">II", payload)
            return GoAway(last & MAX_STREAM_ID, status)
        if kind == _WINDOW_UPDATE:
            _require(size == 8, "WINDOW_UPDATE must be 8 bytes")
            sid, delta = struct.unpack(">II", payload)
            return WindowUpdate(sid & MAX_STREAM_ID, delta & MAX_WINDOW)
        return None

    def _headers(self, block: bytes, sid: int) -> Headers:
        """Decompress and parse one header block; the zlib context stays in step even when it is malformed."""
        try:
            raw = self._inflate.decompress(block, MAX_CONTROL_PAYLOAD + 1)
        except zlib.error as e:
            raise ProtocolError(f"header block does not decompress: {e}") from None
        if self._inflate.unconsumed_tail or len(raw) > MAX_CONTROL_PAYLOAD:
            raise ProtocolError("header block is too large")
        if self._inflate.eof:
            raise ProtocolError("header compression stream ended")
        return _parse_header_block(raw, sid)


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ProtocolError(message)


def _stream_id(word: int) -> int:
    sid = word & MAX_STREAM_ID
    _require(sid != 0, "stream ID 0 in a stream frame")
    return sid


def _parse_header_block(raw: bytes, sid: int) -> Headers:
    def fail(message: str) -> StreamError:
        return StreamError(sid, RstStatus.PROTOCOL_ERROR, message)

    def chunk(offset: int) -> tuple[bytes, int]:
        if offset + 4 > len(raw):
            raise fail("truncated header block")
        (length,) = struct.unpack_from(">I", raw, offset)
        end = offset + 4 + length
        if end > len(raw):
            raise fail("truncated header block")
        return raw[offset + 4 : end], end

    if len(raw) < 4:
        raise fail("truncated header block")
    (count,) = struct.unpack_from(">I", raw)
    if count > MAX_HEADERS:
        raise fail(f"{count} headers are too many")
    headers: Headers = {}
    offset = 4
    for _ in range(count):
        name_bytes, offset = chunk(offset)
        value, offset = chunk(offset)
        name = name_bytes.decode("latin-1")
        if not name or name != name.lower():
            raise fail(f"header name {name!r} is empty or not lower case")
        if name in headers:
            raise fail(f"header {name!r} appears twice")
        headers[name] = value.decode("utf-8", "replace").split("\0")
    if offset != len(raw):
        raise fail("trailing bytes after the header block")
    return headers
