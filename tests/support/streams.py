"""Streaming clients for Exec, Attach and PortForward URLs, needing nothing but what `make setup` installs.

Three transports, each a different client implementation against the same server:

- "spdy": Tandem's own SPDY/3.1 client (the frame codec of cri/streaming/spdy.py) on a raw HTTP upgrade;
  exec/attach as remotecommand v4, port-forward as portforward.k8s.io;
- "websocket": Tandem's own WebSocket client (wsproto); exec/attach as v5.channel.k8s.io, port-forward as
  SPDY tunnelled through the WebSocket (SPDY/3.1+portforward.k8s.io), as client-go sends it;
- "websockets": the independent `websockets` library; exec/attach as v5.channel.k8s.io, port-forward as
  port-prefixed channels (v4.channel.k8s.io).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from dataclasses import dataclass, field
from typing import Protocol

import websockets
from websockets.asyncio.client import connect as websockets_connect
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, BytesMessage, CloseConnection, RejectConnection, Request

from cri.streaming.spdy.codec import FLAG_FIN, Data, FrameDecoder, FrameEncoder, GoAway, RstStream, SynReply, SynStream

TRANSPORTS = ("spdy", "websocket", "websockets")
CHUNK = 32 * 1024
STDIN, STDOUT, STDERR, ERROR, RESIZE, CLOSE = 0, 1, 2, 3, 4, 255


class Link(Protocol):
    """A bidirectional byte pipe: a raw upgraded connection, or one WebSocket message per send/recv."""

    async def send(self, data: bytes) -> None: ...
    async def recv(self) -> bytes | None: ...  # None: the peer closed
    async def close(self) -> None: ...


def _split(url: str) -> tuple[str, int, str]:
    host, _, rest = url.removeprefix("http://").partition("/")
    name, _, port = host.partition(":")
    return name, int(port), "/" + rest


class RawLink:
    """The connection after an HTTP upgrade to SPDY/3.1."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def spdy(cls, url: str, protocol: str) -> RawLink:
        host, port, path = _split(url)
        reader, writer = await asyncio.open_connection(host, port)
        head = [f"POST {path} HTTP/1.1", f"Host: {host}:{port}", "Connection: Upgrade", "Upgrade: SPDY/3.1"]
        head.append(f"X-Stream-Protocol-Version: {protocol}")
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode())
        response = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        status = response.split(b"\r\n", 1)[0]
        if b" 101 " not in status:
            writer.close()
            raise ConnectionError(f"SPDY upgrade refused: {status.decode(errors='replace')}")
        return cls(reader, writer)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def recv(self) -> bytes | None:
        try:
            return await self.reader.read(65536) or None
        except ConnectionError:
            return None

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError):
            await self.writer.wait_closed()


class WsprotoLink:
    """Tandem's own WebSocket client: wsproto's state machine over an asyncio connection."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, ws: WSConnection) -> None:
        self.reader, self.writer, self.ws = reader, writer, ws
        self.pending: list[bytes] = []
        self.parts: list[bytes] = []
        self.closed = False

    @classmethod
    async def open(cls, url: str, subprotocol: str) -> WsprotoLink:
        host, port, path = _split(url)
        reader, writer = await asyncio.open_connection(host, port)
        ws = WSConnection(ConnectionType.CLIENT)
        writer.write(ws.send(Request(host=f"{host}:{port}", target=path, subprotocols=[subprotocol])))
        link = cls(reader, writer, ws)
        while True:
            data = await asyncio.wait_for(reader.read(65536), 10)
            ws.receive_data(data or None)
            for event in ws.events():
                if isinstance(event, AcceptConnection):
                    assert event.subprotocol == subprotocol, event.subprotocol
                    link._take(ws.events())  # messages that came with the handshake
                    return link
                if isinstance(event, RejectConnection):
                    writer.close()
                    raise ConnectionError(f"WebSocket refused with HTTP {event.status_code}")
            if not data:
                raise ConnectionError("connection closed during the WebSocket handshake")

    def _take(self, events) -> None:
        for event in events:
            if isinstance(event, BytesMessage):
                self.parts.append(bytes(event.data))
                if event.message_finished:
                    self.pending.append(b"".join(self.parts))
                    self.parts = []
            elif isinstance(event, CloseConnection):
                with contextlib.suppress(Exception):
                    self.writer.write(self.ws.send(event.response()))
                self.closed = True

    async def send(self, data: bytes) -> None:
        self.writer.write(self.ws.send(BytesMessage(data)))
        await self.writer.drain()

    async def recv(self) -> bytes | None:
        while not self.pending:
            if self.closed:
                return None
            try:
                data = await self.reader.read(65536)
            except ConnectionError:
                data = b""
            self.ws.receive_data(data or None)
            self._take(self.ws.events())
            if not data:
                self.closed = True
        return self.pending.pop(0)

    async def close(self) -> None:
        if not self.closed:
            with contextlib.suppress(Exception):
                self.writer.write(self.ws.send(CloseConnection(1000)))
        self.writer.close()
        with contextlib.suppress(ConnectionError):
            await self.writer.wait_closed()


class WebsocketsLink:
    """The independent client: the `websockets` library."""

    def __init__(self, ws: websockets.asyncio.client.ClientConnection) -> None:
        self.ws = ws

    @classmethod
    async def open(cls, url: str, subprotocol: str) -> WebsocketsLink:
        ws = await websockets_connect(
            "ws://" + url.removeprefix("http://"), subprotocols=[subprotocol], max_size=None, open_timeout=10
        )
        assert ws.subprotocol == subprotocol, ws.subprotocol
        return cls(ws)

    async def send(self, data: bytes) -> None:
        await self.ws.send(data)

    async def recv(self) -> bytes | None:
        try:
            message = await self.ws.recv()
        except websockets.ConnectionClosed:
            return None
        return message if isinstance(message, bytes) else message.encode()

    async def close(self) -> None:
        await self.ws.close()


# ---- SPDY ----------------------------------------------------------------------------------------


@dataclass
class SpdyInbound:
    data: bytearray = field(default_factory=bytearray)
    fin: bool = False
    reset: bool = False
    replied: bool = False


class SpdyClient:
    """The client's side of a SPDY session over a link: opens streams, sends data, collects what comes back."""

    def __init__(self, link: Link) -> None:
        self.link = link
        self.encoder, self.decoder = FrameEncoder(), FrameDecoder()
        self.streams: dict[int, SpdyInbound] = {}
        self.next_id = 1
        self.goaway = False
        self.ended = False
        self.changed = asyncio.Event()
        self._reader = asyncio.create_task(self._read_loop())

    async def open(self, headers: dict[str, str], fin: bool = False) -> int:
        sid, self.next_id = self.next_id, self.next_id + 2
        self.streams[sid] = SpdyInbound()
        frame = SynStream(sid, {k: [v] for k, v in headers.items()}, flags=FLAG_FIN if fin else 0)
        await self.link.send(self.encoder.encode(frame))
        return sid

    async def send(self, sid: int, data: bytes, fin: bool = False) -> None:
        view = memoryview(data)
        while True:
            chunk, view = bytes(view[:CHUNK]), view[CHUNK:]
            last = not view
            await self.link.send(self.encoder.encode(Data(sid, chunk, FLAG_FIN if fin and last else 0)))
            if last:
                return

    async def until(self, predicate, timeout: float = 30.0) -> None:
        async with asyncio.timeout(timeout):
            while not predicate():
                if self.ended:
                    raise ConnectionError("the SPDY connection ended first")
                self.changed.clear()
                await self.changed.wait()

    async def _read_loop(self) -> None:
        try:
            while (data := await self.link.recv()) is not None:
                self.decoder.feed(data)
                while (frame := self.decoder.next_frame()) is not None:
                    self._on(frame)
                self._notify()
        finally:
            self.ended = True
            self._notify()

    def _on(self, frame) -> None:
        stream = self.streams.get(getattr(frame, "stream_id", 0))
        match frame:
            case Data() if stream is not None:
                stream.data += frame.data
                stream.fin = stream.fin or bool(frame.flags & FLAG_FIN)
            case SynReply() if stream is not None:
                stream.replied = True
                stream.fin = stream.fin or bool(frame.flags & FLAG_FIN)
            case RstStream() if stream is not None:
                stream.reset = stream.fin = True
            case GoAway():
                self.goaway = True

    def _notify(self) -> None:
        self.changed.set()

    async def close(self) -> None:
        await self.link.close()
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader


# ---- exec and attach -----------------------------------------------------------------------------


@dataclass
class Outcome:
    stdout: bytes
    stderr: bytes
    status: dict | None

    @property
    def exit_code(self) -> int | None:
        """0 on Success, the code of a NonZeroExitCode failure, None for anything else."""
        if self.status is None:
            return None
        if self.status.get("status") == "Success":
            return 0
        for cause in (self.status.get("details") or {}).get("causes") or []:
            if cause.get("reason") == "ExitCode":
                return int(cause["message"])
        return None


class Command(Protocol):
    stdout: bytearray

    async def write(self, data: bytes) -> None: ...
    async def close_stdin(self) -> None: ...
    async def resize(self, width: int, height: int) -> None: ...
    async def read_until(self, token: bytes, timeout: float = 30.0) -> bytes: ...
    async def wait(self, timeout: float = 60.0) -> Outcome: ...


class SpdyCommand:
    """remotecommand v4 over SPDY: one stream per channel, opened the way client-go opens them."""

    def __init__(self, client: SpdyClient, ids: dict[str, int]) -> None:
        self.client, self.ids = client, ids

    @classmethod
    async def open(cls, url: str, *, stdin: bool, stdout: bool, stderr: bool, tty: bool) -> SpdyCommand:
        client = SpdyClient(await RawLink.spdy(url, "v4.channel.k8s.io"))
        ids = {"error": await client.open({"streamtype": "error"})}
        for kind, wanted in (("stdin", stdin), ("stdout", stdout), ("stderr", stderr and not tty), ("resize", tty)):
            if wanted:
                ids[kind] = await client.open({"streamtype": kind})
        return cls(client, ids)

    @property
    def stdout(self) -> bytearray:
        return self.client.streams[self.ids["stdout"]].data if "stdout" in self.ids else bytearray()

    async def write(self, data: bytes) -> None:
        await self.client.send(self.ids["stdin"], data)

    async def close_stdin(self) -> None:
        await self.client.send(self.ids["stdin"], b"", fin=True)

    async def resize(self, width: int, height: int) -> None:
        await self.client.send(self.ids["resize"], json.dumps({"Width": width, "Height": height}).encode())

    async def read_until(self, token: bytes, timeout: float = 30.0) -> bytes:
        await self.client.until(lambda: token in self.stdout, timeout)
        return bytes(self.stdout)

    async def wait(self, timeout: float = 60.0) -> Outcome:
        error = self.client.streams[self.ids["error"]]
        try:
            await self.client.until(lambda: error.fin or self.client.goaway, timeout)
            await self.client.until(lambda: self.client.goaway, timeout)
        except ConnectionError:
            pass  # the server hung up: everything it sent has arrived
        finally:
            await self.client.close()
        stderr = self.client.streams[self.ids["stderr"]].data if "stderr" in self.ids else b""
        return Outcome(bytes(self.stdout), bytes(stderr), json.loads(error.data) if error.data else None)


class ChannelCommand:
    """remotecommand v5.channel.k8s.io over WebSocket: one channel byte in front of every message."""

    def __init__(self, link: Link) -> None:
        self.link = link
        self.stdout, self.stderr = bytearray(), bytearray()
        self.status: dict | None = None
        self.changed = asyncio.Event()
        self.ended = False
        self._reader = asyncio.create_task(self._read_loop())

    @classmethod
    async def open(cls, transport: str, url: str) -> ChannelCommand:
        opener = WsprotoLink if transport == "websocket" else WebsocketsLink
        return cls(await opener.open(url, "v5.channel.k8s.io"))

    async def _read_loop(self) -> None:
        try:
            while (message := await self.link.recv()) is not None:
                if message:
                    channel, data = message[0], message[1:]
                    if channel == STDOUT:
                        self.stdout += data
                    elif channel == STDERR:
                        self.stderr += data
                    elif channel == ERROR and data:
                        self.status = json.loads(data)
                self.changed.set()
        finally:
            self.ended = True
            self.changed.set()

    async def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            chunk, view = bytes(view[:CHUNK]), view[CHUNK:]
            await self.link.send(bytes([STDIN]) + chunk)

    async def close_stdin(self) -> None:
        await self.link.send(bytes([CLOSE, STDIN]))

    async def resize(self, width: int, height: int) -> None:
        await self.link.send(bytes([RESIZE]) + json.dumps({"Width": width, "Height": height}).encode())

    async def read_until(self, token: bytes, timeout: float = 30.0) -> bytes:
        async with asyncio.timeout(timeout):
            while token not in self.stdout:
                if self.ended:
                    raise ConnectionError(f"closed before {token!r}; stdout was {bytes(self.stdout)!r}")
                self.changed.clear()
                await self.changed.wait()
        return bytes(self.stdout)

    async def wait(self, timeout: float = 60.0) -> Outcome:
        try:
            async with asyncio.timeout(timeout):
                while not self.ended:
                    self.changed.clear()
                    await self.changed.wait()
        finally:
            await self.link.close()
        return Outcome(bytes(self.stdout), bytes(self.stderr), self.status)


async def open_command(transport: str, url: str, *, stdin: bool, stdout: bool, stderr: bool, tty: bool) -> Command:
    """A session on an Exec or Attach URL; the flags must be the CRI request's."""
    if transport == "spdy":
        return await SpdyCommand.open(url, stdin=stdin, stdout=stdout, stderr=stderr, tty=tty)
    return await ChannelCommand.open(transport, url)


async def communicate(command: Command, data: bytes | None, timeout: float = 120.0) -> Outcome:
    """Send `data` to stdin and close it (None: leave stdin alone), while collecting the output."""

    async def feed() -> None:
        if data is not None:
            await command.write(data)
            await command.close_stdin()

    feeding = asyncio.create_task(feed())
    outcome = await command.wait(timeout)
    await feeding
    return outcome


# ---- port-forward --------------------------------------------------------------------------------


class PortForward(Protocol):
    async def roundtrip(self, port: int, data: bytes, timeout: float = 30.0) -> bytes: ...
    async def refused(self, port: int, timeout: float = 30.0) -> str: ...
    async def close(self) -> None: ...


class SpdyPortForward:
    """portforward.k8s.io: per connection, an error stream and a data stream sharing a request ID."""

    def __init__(self, client: SpdyClient) -> None:
        self.client = client
        self.request = 0

    @classmethod
    async def open(cls, transport: str, url: str) -> SpdyPortForward:
        if transport == "spdy":
            return cls(SpdyClient(await RawLink.spdy(url, "portforward.k8s.io")))
        return cls(SpdyClient(await WsprotoLink.open(url, "SPDY/3.1+portforward.k8s.io")))

    async def _pair(self, port: int) -> tuple[int, int]:
        headers = {"port": str(port), "requestid": str(self.request)}
        self.request += 1
        error = await self.client.open({**headers, "streamtype": "error"}, fin=True)  # client-go only reads it
        return error, await self.client.open({**headers, "streamtype": "data"})

    async def roundtrip(self, port: int, data: bytes, timeout: float = 30.0) -> bytes:
        _, sid = await self._pair(port)
        await self.client.send(sid, data)
        inbound = self.client.streams[sid]
        await self.client.until(lambda: len(inbound.data) >= len(data) or inbound.fin, timeout)
        await self.client.send(sid, b"", fin=True)
        return bytes(inbound.data)

    async def refused(self, port: int, timeout: float = 30.0) -> str:
        error, _ = await self._pair(port)
        inbound = self.client.streams[error]
        await self.client.until(lambda: inbound.fin and inbound.data, timeout)
        return inbound.data.decode()

    async def close(self) -> None:
        await self.client.close()


class ChannelPortForward:
    """v4.channel.k8s.io port-forward: channels 2i (data) and 2i+1 (error) for the request's i-th port."""

    def __init__(self, link: Link, ports: list[int]) -> None:
        self.link, self.ports = link, ports
        self.data = {p: bytearray() for p in ports}
        self.errors = {p: bytearray() for p in ports}
        self.seen_prefix: set[int] = set()
        self.changed = asyncio.Event()
        self.ended = False
        self._reader = asyncio.create_task(self._read_loop())

    @classmethod
    async def open(cls, url: str, ports: list[int]) -> ChannelPortForward:
        return cls(await WebsocketsLink.open(url, "v4.channel.k8s.io"), ports)

    async def _read_loop(self) -> None:
        try:
            while (message := await self.link.recv()) is not None:
                channel, data = message[0], message[1:]
                if channel not in self.seen_prefix:  # every channel opens with its port, 2 bytes little-endian
                    self.seen_prefix.add(channel)
                    assert int.from_bytes(data[:2], "little") == self.ports[channel // 2], message
                    data = data[2:]
                port = self.ports[channel // 2]
                (self.errors if channel % 2 else self.data)[port].extend(data)
                self.changed.set()
        finally:
            self.ended = True
            self.changed.set()

    async def _until(self, predicate, timeout: float) -> None:
        async with asyncio.timeout(timeout):
            while not predicate():
                if self.ended:
                    raise ConnectionError("the WebSocket closed first")
                self.changed.clear()
                await self.changed.wait()

    async def roundtrip(self, port: int, data: bytes, timeout: float = 30.0) -> bytes:
        received = self.data[port]
        start = len(received)
        await self.link.send(bytes([2 * self.ports.index(port)]) + data)
        await self._until(lambda: len(received) - start >= len(data), timeout)
        return bytes(received[start:])

    async def refused(self, port: int, timeout: float = 30.0) -> str:
        await self._until(lambda: bool(self.errors[port]), timeout)
        return self.errors[port].decode()

    async def close(self) -> None:
        await self.link.close()
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader


async def open_port_forward(transport: str, url: str, ports: list[int]) -> PortForward:
    """A port-forward session on a PortForward URL; `ports` are the CRI request's (channel transports need them)."""
    if transport == "websockets":
        return await ChannelPortForward.open(url, ports)
    return await SpdyPortForward.open(transport, url)
