"""SPDY/3.1 as Kubernetes' streaming clients speak it: the frame codec and a server-side session.

Every Kubernetes client (kubectl, crictl, critest, client-go) speaks SPDY through
moby/spdystream, so that is the peer this is written against: only the client
opens streams, and header blocks share one zlib context per direction, seeded
with the SPDY/3 dictionary.

Flow control has to live with a peer that does none: spdystream sends neither
SETTINGS nor WINDOW_UPDATE and ignores ours. Inbound, a stream's window is what
the application has not read yet; WINDOW_UPDATEs go out as it reads, and a
peer that overruns the window is slowed by TCP (the read loop waits for the
application) instead of being reset. Outbound, the peer's windows are counted
from the first byte but enforced only once the peer shows that it does flow
control, with a SETTINGS or WINDOW_UPDATE frame: holding spdystream to the
default 64 KiB window would stall every exec after 64 KiB of output.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import struct
import zlib
from collections import deque
from dataclasses import dataclass, field
from typing import Protocol

log = logging.getLogger("tandem.streaming")

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
DATA_CHUNK = 32 * 1024
"""Largest DATA frame sent: small enough to interleave streams, big enough to stay cheap."""

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


class StreamClosed(ConnectionError):
    """Writing to a stream that we closed, that the peer reset, or whose connection is gone."""


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


class ByteChannel(Protocol):
    """A reliable byte stream a session runs over: a TCP connection, or a WebSocket tunnelling it."""

    async def read(self) -> bytes:
        """Some bytes; b"" at end of stream."""
        ...

    async def write(self, data: bytes) -> None: ...

    async def close(self) -> None: ...


@dataclass(eq=False)
class SpdyStream:
    """One stream the peer opened: its headers, inbound data, and our half of it."""

    session: SpdySession
    id: int
    headers: Headers
    send_window: int
    remote_closed: bool = False  # the peer sent FIN or RST, or the connection ended
    local_closed: bool = False  # we sent FIN or RST; nothing more may be written
    reset_by_peer: bool = False
    replied: bool = False
    _chunks: deque[bytes] = field(default_factory=deque)
    _buffered: int = 0  # received, not yet read
    _unacked: int = 0  # read, not yet acknowledged with WINDOW_UPDATE
    _arrived: asyncio.Event = field(default_factory=asyncio.Event)
    _drained: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        self._drained.set()

    def header(self, name: str) -> str:
        return header_value(self.headers, name)

    async def read(self) -> bytes:
        """The next chunk the peer sent; b"" once it finished or reset the stream."""
        while not self._chunks:
            if self.remote_closed:
                return b""
            self._arrived.clear()
            await self._arrived.wait()
        chunk = self._chunks.popleft()
        self._buffered -= len(chunk)
        if self._buffered <= self.session.receive_window:
            self._drained.set()
        await self.session._consumed(self, len(chunk))
        return chunk

    async def write(self, data: bytes) -> None:
        """Send `data`, within the peer's flow control windows; raises `StreamClosed` if it cannot."""
        await self.session._send_data(self, data, fin=False)

    async def close(self) -> None:
        """Half-close: tell the peer we will send nothing more (FIN). Closing twice is harmless."""
        if not self.local_closed:
            with contextlib.suppress(StreamClosed):
                await self.session._send_data(self, b"", fin=True)

    async def reply(self) -> None:
        """Accept the stream (SYN_REPLY); the peer waits for this before using it."""
        if not self.replied and not self.local_closed:
            self.replied = True
            await self.session._send(SynReply(self.id, {}))

    async def reset(self, status: RstStatus = RstStatus.CANCEL) -> None:
        """Abort the stream in both directions (RST_STREAM)."""
        if self.local_closed and self.remote_closed:
            return
        self._abort()
        with contextlib.suppress(StreamClosed):
            await self.session._send(RstStream(self.id, status))

    def _receive(self, data: bytes, fin: bool) -> None:
        if data:
            self._chunks.append(data)
            self._buffered += len(data)
            if self._buffered > self.session.receive_window:
                self._drained.clear()
        if fin:
            self.remote_closed = True
        self._arrived.set()

    def _abort(self) -> None:
        """Both halves closed at once: by a reset, or because the connection went away."""
        self.local_closed = self.remote_closed = True
        self._drained.set()
        self._arrived.set()
        self.session._forget(self)


class SpdySession:
    """The server side of one SPDY connection: accepts the peer's streams and multiplexes their data."""

    receive_window = DEFAULT_WINDOW

    def __init__(self, channel: ByteChannel, *, max_streams: int = 256) -> None:
        self._channel = channel
        self._max_streams = max_streams
        self._encoder = FrameEncoder()
        self._decoder = FrameDecoder()
        self._write_lock = asyncio.Lock()
        self._streams: dict[int, SpdyStream] = {}
        self._incoming: asyncio.Queue[SpdyStream | None] = asyncio.Queue()
        self._last_stream_id = 0
        self._peer_initial_window = DEFAULT_WINDOW
        self._send_window = DEFAULT_WINDOW
        self._unacked = 0
        self._peer_does_flow_control = False
        self._window_changed = asyncio.Event()
        self._goaway_sent = False
        self._reader: asyncio.Task[None] | None = None
        self.closed = asyncio.Event()
        """Set once the connection is gone: the peer hung up or we closed it."""

    def start(self) -> None:
        self._reader = asyncio.create_task(self._read_loop(), name="spdy reader")

    async def accept(self) -> SpdyStream | None:
        """The next stream the peer opens, or None once it can open no more (GOAWAY, or gone)."""
        stream = await self._incoming.get()
        if stream is None:
            self._incoming.put_nowait(None)
        return stream

    async def shutdown(self, grace: float = 5.0) -> None:
        """GOAWAY, give the peer `grace` seconds to hang up itself (it has what it needs), then close."""
        await self._goaway(GoAwayStatus.OK)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.closed.wait(), grace)
        await self.close()

    async def close(self) -> None:
        """Drop the connection (after a GOAWAY, if none was sent yet and the peer still takes data)."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._goaway(GoAwayStatus.OK), 1.0)
        if self._reader is not None and self._reader is not asyncio.current_task():
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        await self._channel.close()
        self._end()

    # ---- inbound ---------------------------------------------------------------------------

    async def _read_loop(self) -> None:
        try:
            while data := await self._channel.read():
                self._decoder.feed(data)
                while True:
                    try:
                        frame = self._decoder.next_frame()
                    except StreamError as e:
                        log.debug("spdy stream error", extra={"stream": e.stream_id, "error": str(e)})
                        await self._send_rst(e.stream_id, e.status)
                        continue
                    if frame is None:
                        break
                    await self._handle(frame)
        except ProtocolError as e:
            log.info("spdy protocol error, closing the connection", extra={"error": str(e)})
            await self._goaway(GoAwayStatus.PROTOCOL_ERROR)
        except (ConnectionError, OSError):
            pass
        finally:
            self._end()

    async def _handle(self, frame: Frame) -> None:
        match frame:
            case Data():
                await self._on_data(frame)
            case SynStream():
                await self._on_syn_stream(frame)
            case RstStream():
                if (stream := self._streams.get(frame.stream_id)) is not None:
                    stream.reset_by_peer = True
                    stream._abort()
                    self._notify_window()
            case WindowUpdate():
                await self._on_window_update(frame)
            case Settings():
                self._on_settings(frame)
            case Ping():
                if frame.ping_id % 2 == 1:  # the client's ping (ours would be even): answer it
                    await self._send(frame)
            case GoAway():
                self._incoming.put_nowait(None)
            case HeadersFrame():
                if (stream := self._streams.get(frame.stream_id)) is None or stream.remote_closed:
                    await self._send_rst(frame.stream_id, RstStatus.INVALID_STREAM)
                else:
                    stream.headers.update(frame.headers)
                    stream._receive(b"", fin=bool(frame.flags & FLAG_FIN))
            case SynReply():  # we open no streams, so there is nothing to reply to
                await self._send_rst(frame.stream_id, RstStatus.PROTOCOL_ERROR)

    async def _on_syn_stream(self, frame: SynStream) -> None:
        sid = frame.stream_id
        if sid % 2 == 0 or sid <= self._last_stream_id:
            await self._send_rst(sid, RstStatus.PROTOCOL_ERROR)
            return
        self._last_stream_id = sid
        if self._goaway_sent or len(self._streams) >= self._max_streams:
            await self._send_rst(sid, RstStatus.REFUSED_STREAM)
            return
        stream = SpdyStream(self, sid, frame.headers, self._peer_initial_window)
        stream.remote_closed = bool(frame.flags & FLAG_FIN)
        stream.local_closed = bool(frame.flags & FLAG_UNIDIRECTIONAL)
        self._streams[sid] = stream
        self._incoming.put_nowait(stream)

    async def _on_data(self, frame: Data) -> None:
        stream = self._streams.get(frame.stream_id)
        if stream is None:
            if frame.stream_id > self._last_stream_id:  # never opened; data for a closed stream is dropped
                await self._send_rst(frame.stream_id, RstStatus.INVALID_STREAM)
            return
        if stream.remote_closed:
            await stream.reset(RstStatus.STREAM_ALREADY_CLOSED)
            return
        stream._receive(frame.data, fin=bool(frame.flags & FLAG_FIN))
        # A peer that ignores our window is held back by TCP: read nothing more until the application catches up.
        await stream._drained.wait()

    async def _on_window_update(self, frame: WindowUpdate) -> None:
        self._peer_does_flow_control = True
        if frame.delta == 0:
            if frame.stream_id == 0:
                raise ProtocolError("WINDOW_UPDATE of 0 for the connection")
            await self._send_rst(frame.stream_id, RstStatus.PROTOCOL_ERROR)
            return
        if frame.stream_id == 0:
            self._send_window += frame.delta
            if self._send_window > MAX_WINDOW:
                raise ProtocolError("connection flow control window overflow")
        elif (stream := self._streams.get(frame.stream_id)) is not None:
            stream.send_window += frame.delta
            if stream.send_window > MAX_WINDOW:
                await stream.reset(RstStatus.FLOW_CONTROL_ERROR)
        self._notify_window()

    def _on_settings(self, frame: Settings) -> None:
        self._peer_does_flow_control = True
        for _flags, ident, value in frame.entries:
            if ident == SETTINGS_INITIAL_WINDOW_SIZE:
                if value > MAX_WINDOW:
                    raise ProtocolError(f"initial window size {value} is too large")
                delta, self._peer_initial_window = value - self._peer_initial_window, value
                for stream in self._streams.values():
                    stream.send_window += delta
        self._notify_window()

    async def _consumed(self, stream: SpdyStream, count: int) -> None:
        """The application read `count` bytes: give the peer that much window back, in batches."""
        stream._unacked += count
        self._unacked += count
        threshold = self.receive_window // 2
        if stream._unacked >= threshold and not stream.remote_closed:
            delta, stream._unacked = stream._unacked, 0
            await self._send_quietly(WindowUpdate(stream.id, delta))
        if self._unacked >= threshold:
            delta, self._unacked = self._unacked, 0
            await self._send_quietly(WindowUpdate(0, delta))

    # ---- outbound --------------------------------------------------------------------------

    async def _send_data(self, stream: SpdyStream, data: bytes, fin: bool) -> None:
        if stream.local_closed:
            raise StreamClosed(f"stream {stream.id} is closed")
        await stream.reply()
        view = memoryview(data)
        while True:
            if view:
                await self._wait_for_window(stream)
            if stream.local_closed:
                raise StreamClosed(f"stream {stream.id} is closed")
            size = min(len(view), DATA_CHUNK)
            if self._peer_does_flow_control:
                size = min(size, stream.send_window, self._send_window)
            chunk, view = bytes(view[:size]), view[size:]
            stream.send_window -= size
            self._send_window -= size
            last = not view
            await self._send(Data(stream.id, chunk, FLAG_FIN if fin and last else 0))
            if last:
                break
        if fin:
            stream.local_closed = True
            if stream.remote_closed:
                self._forget(stream)

    async def _wait_for_window(self, stream: SpdyStream) -> None:
        def ready() -> bool:
            if stream.local_closed or not self._peer_does_flow_control:
                return True
            return stream.send_window > 0 and self._send_window > 0

        while not ready():
            changed = self._window_changed
            await changed.wait()

    def _notify_window(self) -> None:
        self._window_changed.set()
        self._window_changed = asyncio.Event()

    async def _send(self, frame: Frame) -> None:
        """Encode and write one frame; frames go out whole and in the order their headers were compressed."""
        async with self._write_lock:
            if self.closed.is_set():
                raise StreamClosed("the connection is closed")
            data = self._encoder.encode(frame)
            try:
                await self._channel.write(data)
            except (ConnectionError, OSError) as e:
                self._end()
                raise StreamClosed(f"the connection is gone: {e}") from e

    async def _send_quietly(self, frame: Frame) -> None:
        with contextlib.suppress(StreamClosed):
            await self._send(frame)

    async def _send_rst(self, stream_id: int, status: RstStatus) -> None:
        await self._send_quietly(RstStream(stream_id, status))

    async def _goaway(self, status: GoAwayStatus) -> None:
        if not self._goaway_sent:
            self._goaway_sent = True
            await self._send_quietly(GoAway(self._last_stream_id, status))

    def _forget(self, stream: SpdyStream) -> None:
        self._streams.pop(stream.id, None)

    def _end(self) -> None:
        """The connection is gone: every stream ends, every waiter wakes."""
        if self.closed.is_set():
            return
        self.closed.set()
        for stream in list(self._streams.values()):
            stream._abort()
        self._incoming.put_nowait(None)
        self._notify_window()
