"""The server side of a SPDY/3.1 connection: the streams the peer opens, multiplexed over one byte channel.

Only the client opens streams (as moby/spdystream, the peer of every Kubernetes
client, does). Flow control has to live with a peer that does none: spdystream
sends neither SETTINGS nor WINDOW_UPDATE and ignores ours. Inbound, a stream's
window is what the application has not read yet; WINDOW_UPDATEs go out as it
reads, and a peer that overruns the window is slowed by TCP (the read loop waits
for the application) instead of being reset. Outbound, the peer's windows are
counted from the first byte but enforced only once the peer shows that it does
flow control, with a SETTINGS or WINDOW_UPDATE frame: holding spdystream to the
default 64 KiB window would stall every exec after 64 KiB of output.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from dataclasses import dataclass, field
from typing import Protocol

from cri.streaming.spdy.codec import (
    DEFAULT_WINDOW,
    FLAG_FIN,
    FLAG_UNIDIRECTIONAL,
    MAX_WINDOW,
    SETTINGS_INITIAL_WINDOW_SIZE,
    Data,
    Frame,
    FrameDecoder,
    FrameEncoder,
    GoAway,
    GoAwayStatus,
    Headers,
    HeadersFrame,
    Ping,
    ProtocolError,
    RstStatus,
    RstStream,
    Settings,
    StreamError,
    SynReply,
    SynStream,
    WindowUpdate,
    header_value,
)

log = logging.getLogger("tandem.streaming")

DATA_CHUNK = 32 * 1024
"""Largest DATA frame sent: small enough to interleave streams, big enough to stay cheap."""


class StreamClosed(ConnectionError):
    """Writing to a stream that we closed, that the peer reset, or whose connection is gone."""


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
