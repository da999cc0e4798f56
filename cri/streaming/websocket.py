"""WebSocket connections (RFC 6455, via wsproto) for the streaming server: whole messages, pings, a clean close."""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib

from wsproto import ConnectionState, WSConnection
from wsproto.events import BytesMessage, CloseConnection, Event, Message, Ping, TextMessage

from cri.streaming.spdy.session import ByteChannel

MAX_MESSAGE = 17 * 2**20
"""Largest message accepted: a tunnelled SPDY DATA frame (16 MiB) and then some."""
CLOSE_GRACE = 2.0
"""Seconds a peer gets to answer our close frame before the connection is dropped."""


class WebSocket:
    """One accepted WebSocket on a byte channel. One task receives; any task may send."""

    def __init__(self, ws: WSConnection, channel: ByteChannel, subprotocol: str) -> None:
        self._ws = ws
        self._channel = channel
        self.subprotocol = subprotocol
        self._lock = asyncio.Lock()
        self._parts: list[bytes | str] = []
        self._size = 0
        self._receiving = False
        self.closed = asyncio.Event()
        """Set once the peer closed the WebSocket or the connection went away."""

    async def receive(self) -> bytes | str | None:
        """The next whole message (bytes if binary, str if text), or None once the WebSocket is closed."""
        self._receiving = True
        try:
            while not self.closed.is_set():
                for event in self._ws.events():
                    message = await self._on_event(event)
                    if message is not None:
                        return message
                if self.closed.is_set():
                    break
                try:
                    data = await self._channel.read()
                except (ConnectionError, OSError):
                    data = b""
                self._ws.receive_data(data or None)
                if not data:
                    self.closed.set()
            return None
        finally:
            self._receiving = False

    async def _on_event(self, event: Event) -> bytes | str | None:
        if isinstance(event, Message):
            self._parts.append(event.data)
            self._size += len(event.data)
            if self._size > MAX_MESSAGE:
                await self._send_event(CloseConnection(1009, "message too big"))
                self.closed.set()
                return None
            if not event.message_finished:
                return None
            parts, self._parts, self._size = self._parts, [], 0
            return "".join(parts) if isinstance(event, TextMessage) else b"".join(parts)  # type: ignore[arg-type]
        if isinstance(event, Ping):
            await self._send_event(event.response())
        elif isinstance(event, CloseConnection):
            if self._ws.state is ConnectionState.REMOTE_CLOSING:
                await self._send_event(event.response())
            self.closed.set()
        return None

    async def send(self, data: bytes | str) -> None:
        """Send one message (binary for bytes, text for str); raises ConnectionError once closed."""
        await self._send_event(TextMessage(data) if isinstance(data, str) else BytesMessage(data), message=True)

    async def _send_event(self, event: Event, message: bool = False) -> None:
        async with self._lock:
            if message and self._ws.state is not ConnectionState.OPEN:
                raise ConnectionError("the WebSocket is closed")
            try:
                await self._channel.write(self._ws.send(event))
            except OSError as e:
                if message:
                    raise ConnectionError(f"the connection is gone: {e}") from e

    async def close(self, code: int = 1000) -> None:
        """Send a close frame, wait briefly for the peer's, then drop the connection."""
        if self._ws.state is ConnectionState.OPEN:
            await self._send_event(CloseConnection(code))
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(CLOSE_GRACE):
                if self._receiving:
                    await self.closed.wait()
                else:
                    while await self.receive() is not None:
                        pass
        self.closed.set()
        await self._channel.close()


class MessageStream:
    """A WebSocket's binary messages read as one byte stream: how client-go tunnels SPDY through WebSocket."""

    def __init__(self, socket: WebSocket) -> None:
        self._socket = socket

    async def read(self) -> bytes:
        while True:
            message = await self._socket.receive()
            if message is None:
                return b""
            if isinstance(message, str):
                raise ConnectionError("text message in a SPDY tunnel")
            if message:
                return message

    async def write(self, data: bytes) -> None:
        await self._socket.send(data)

    async def close(self) -> None:
        await self._socket.close()


def split_channel(message: bytes | str) -> tuple[int, bytes]:
    """A channel-framed message's channel and payload: binary after one channel byte, or (text) an
    ASCII digit and base64. Raises ValueError for an empty or undecodable message."""
    if not message:
        raise ValueError("empty message")
    if isinstance(message, str):
        try:
            return ord(message[0]) - ord("0"), base64.b64decode(message[1:], validate=True)
        except binascii.Error as e:
            raise ValueError(f"bad base64 message: {e}") from None
    return message[0], message[1:]


def join_channel(channel: int, data: bytes, text: bool) -> bytes | str:
    """The message carrying `data` on `channel`: binary, or base64 text for the base64 subprotocols."""
    if text:
        return chr(ord("0") + channel) + base64.b64encode(data).decode()
    return bytes([channel]) + data
