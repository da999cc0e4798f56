"""Kubernetes' portforward protocols: TCP connections into a pod, carried by SPDY or WebSocket.

- SPDY (`portforward.k8s.io`): for each connection it forwards, the client opens
  an error and a data stream, both with a `port` header and a shared
  `requestid`; the data stream carries the bytes both ways, the error stream
  the text of a failure.
- The same SPDY tunnelled through WebSocket binary messages
  (`SPDY/3.1+portforward.k8s.io`): what client-go sends for port-forward over
  WebSocket (crictl and critest `--transport websocket`, kubectl 1.31+).
- WebSocket channels (`v4.channel.k8s.io`): the ports are fixed up front; port i
  gets data channel 2i and error channel 2i+1, and the first message on each is
  the port as a little-endian uint16 (what kubelet sends).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from core.chunks import ChunkQueue
from core.errors import TandemError
from cri.streaming.spdy.session import SpdySession, SpdyStream, StreamClosed
from cri.streaming.websocket import WebSocket, join_channel, split_channel
from sandbox.backend import ByteChannel

log = logging.getLogger("tandem.streaming")

PROTOCOL = "portforward.k8s.io"
TUNNEL_PROTOCOL = "SPDY/3.1+portforward.k8s.io"
V4, V4_BASE64 = "v4.channel.k8s.io", "v4.base64.channel.k8s.io"
WEBSOCKET_PROTOCOLS = (TUNNEL_PROTOCOL, V4, V4_BASE64, "")
STREAM_CREATION_TIMEOUT = 30.0
"""Seconds between a connection's first stream and its second (kubelet's default)."""

Dial = Callable[[int], Awaitable[ByteChannel]]
"""Connect to a port inside the pod."""


def parse_port(text: str) -> int:
    """A port number from a header or query parameter; ValueError unless it is 1-65535."""
    port = int(text)
    if not 0 < port < 65536:
        raise ValueError(f"port {text!r} is out of range")
    return port


# ---- SPDY ----------------------------------------------------------------------------------


@dataclass(eq=False)
class _Pair:
    """The error and data streams of one forwarded connection."""

    error: SpdyStream | None = None
    data: SpdyStream | None = None
    expiry: asyncio.Task[None] | None = field(default=None, repr=False)

    def add(self, stream: SpdyStream) -> bool:
        """Take `stream` as this pair's error or data stream; False if that place is taken."""
        kind = stream.header("streamtype")
        if getattr(self, kind) is not None:
            return False
        setattr(self, kind, stream)
        return True

    async def fail(self, message: str) -> None:
        log.info("port-forward failed", extra={"error": message})
        if self.error is not None:
            with contextlib.suppress(StreamClosed):
                await self.error.write(message.encode())

    async def close(self) -> None:
        for stream in (self.data, self.error):
            if stream is not None:
                await stream.close()


def _refusal(stream: SpdyStream) -> str:
    """Why a stream cannot be part of a port-forward, or "" if it can."""
    try:
        parse_port(stream.header("port"))
    except ValueError:
        return f"bad or missing port header {stream.header('port')!r}"
    if stream.header("streamtype") not in ("error", "data"):
        return f"bad stream type {stream.header('streamtype')!r}"
    return ""


def _request_id(stream: SpdyStream) -> str:
    """The pair a stream belongs to; clients too old to send `requestid` open error then data with IDs 2 apart."""
    if request_id := stream.header("requestid"):
        return request_id
    return str(stream.id if stream.header("streamtype") == "error" else stream.id - 2)


async def serve_spdy(session: SpdySession, dial: Dial, pod: str) -> None:
    """Forward every connection the client opens on this SPDY session until it hangs up."""
    pairs: dict[str, _Pair] = {}
    tasks: set[asyncio.Task[None]] = set()

    def spawn(coroutine: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.create_task(coroutine)
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        return task

    try:
        while (stream := await session.accept()) is not None:
            if problem := _refusal(stream):
                log.info("port-forward stream refused", extra={"pod": pod[:12], "error": problem})
                await stream.reset()
                continue
            await stream.reply()
            key = _request_id(stream)
            if (pair := pairs.get(key)) is None:
                pair = pairs[key] = _Pair()
                pair.expiry = spawn(_expire(pairs, key, pair))
            if not pair.add(stream):
                await pair.fail(f"error processing stream for request {key}: duplicate {stream.header('streamtype')}")
                await stream.reset()
            elif pair.error is not None and pair.data is not None:
                del pairs[key]
                if pair.expiry is not None:
                    pair.expiry.cancel()
                spawn(_forward(pair.data, pair, dial, pod))
    finally:
        for task in list(tasks):
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _expire(pairs: dict[str, _Pair], key: str, pair: _Pair) -> None:
    await asyncio.sleep(STREAM_CREATION_TIMEOUT)
    if pairs.get(key) is pair:
        del pairs[key]
        await pair.fail(f"timed out waiting for the streams of request {key}")
        await pair.close()


async def _forward(data: SpdyStream, pair: _Pair, dial: Dial, pod: str) -> None:
    port = parse_port(data.header("port"))
    try:
        try:
            channel = await dial(port)
        except (TandemError, OSError) as e:
            await pair.fail(f"error forwarding port {port} to pod {pod}: {e}")
            return
        try:
            await _splice(data, channel)
        finally:
            await channel.close()
    finally:
        await pair.close()


async def _splice(stream: SpdyStream, channel: ByteChannel) -> None:
    """Copy both ways until the pod's side ends or the client resets the stream.

    A client's FIN only half-closes: the pod gets end of file and may still answer.
    """

    async def to_pod() -> None:
        while data := await stream.read():
            await channel.write(data)
        if not stream.reset_by_peer:
            await channel.write_eof()

    async def to_client() -> None:
        while data := await channel.read():
            await stream.write(data)

    up, down = asyncio.create_task(to_pod()), asyncio.create_task(to_client())
    try:
        await asyncio.wait({up, down}, return_when=asyncio.FIRST_COMPLETED)
        if not down.done() and up.exception() is None and not stream.reset_by_peer:
            await asyncio.wait({down})
    finally:
        for task in (up, down):
            task.cancel()
        await asyncio.gather(up, down, return_exceptions=True)


# ---- WebSocket channels --------------------------------------------------------------------


async def serve_websocket(socket: WebSocket, ports: list[int], dial: Dial, pod: str) -> None:
    """Forward one connection to each of `ports` over channel pairs, until all of them end."""
    text = socket.subprotocol == V4_BASE64
    inboxes = [ChunkQueue() for _ in ports]

    async def send(channel: int, data: bytes) -> None:
        with contextlib.suppress(ConnectionError):
            await socket.send(join_channel(channel, data, text))

    async def receive() -> None:
        try:
            while (message := await socket.receive()) is not None:
                channel, data = split_channel(message)
                if channel % 2 == 0 and channel // 2 < len(inboxes):
                    await inboxes[channel // 2].put(data)
        except ValueError as e:
            log.info("malformed WebSocket message; closing", extra={"error": str(e)})
            await socket.close(1002)
        finally:
            for inbox in inboxes:
                inbox.end()

    async def forward(index: int, port: int) -> None:
        try:
            channel = await dial(port)
        except (TandemError, OSError) as e:
            await send(2 * index + 1, f"error forwarding port {port} to pod {pod}: {e}".encode())
            return

        async def to_pod() -> None:
            while data := await inboxes[index].get():
                await channel.write(data)

        async def to_client() -> None:
            while data := await channel.read():
                await send(2 * index, data)

        copies = [asyncio.create_task(to_pod()), asyncio.create_task(to_client())]
        try:
            await asyncio.wait(copies, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in copies:
                task.cancel()
            await asyncio.gather(*copies, return_exceptions=True)
            await channel.close()

    receiver = asyncio.create_task(receive())
    try:
        for index, port in enumerate(ports):
            prefix = port.to_bytes(2, "little")
            await send(2 * index, prefix)
            await send(2 * index + 1, prefix)
        await asyncio.gather(*(forward(i, port) for i, port in enumerate(ports)))
    finally:
        receiver.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await receiver
        await socket.close()
