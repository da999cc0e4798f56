"""The streaming server: one-time URLs in, SPDY or WebSocket sessions out, on the daemon's event loop.

Its paths are kubelet's: `/exec/<token>`, `/attach/<token>`, `/portforward/<token>`,
by GET or POST. An unknown, used or expired token is a 404. Nothing in the HTTP
request can change what runs: the token stands for the CRI request that minted
it, which says which container, which command and which streams.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from typing import Any, Protocol
from urllib.parse import parse_qs, urlsplit

import h11
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, RejectConnection, Request
from wsproto.utilities import RemoteProtocolError

from core.errors import Unavailable
from core.settings import StreamingSettings
from cri.streaming import portforward, remotecommand
from cri.streaming.spdy.session import SpdySession
from cri.streaming.tokens import StreamRequest, TokenCache
from cri.streaming.websocket import MessageStream, WebSocket
from protos import cri_pb2 as pb
from sandbox.backend import ByteChannel, Process

log = logging.getLogger("tandem.streaming")

HEAD_TIMEOUT = 30.0
"""Seconds a client has to send its request line and headers."""
MAX_HEAD = 16 * 1024
READ_SIZE = 64 * 1024
_KINDS: dict[str, type[StreamRequest]] = {
    "exec": pb.ExecRequest,
    "attach": pb.AttachRequest,
    "portforward": pb.PortForwardRequest,
}


class StreamRuntime(Protocol):
    """What sessions run: a backend's process for exec and attach, a TCP connection into the pod for port-forward."""

    async def exec(self, request: pb.ExecRequest, terminal_size: tuple[int, int] | None) -> Process: ...

    async def attach(self, request: pb.AttachRequest) -> Process: ...

    async def port_forward(self, sandbox_id: str, port: int) -> ByteChannel: ...


class TcpChannel:
    """The client's TCP connection as a byte channel, starting with what arrived after the HTTP request."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, pending: bytes) -> None:
        self._reader = reader
        self._writer = writer
        self._pending = pending

    async def read(self) -> bytes:
        if self._pending:
            data, self._pending = self._pending, b""
            return data
        return await self._reader.read(READ_SIZE)

    async def write(self, data: bytes) -> None:
        if self._writer.is_closing():
            raise ConnectionResetError("the connection is closed")
        self._writer.write(data)
        await self._writer.drain()

    async def close(self) -> None:
        self._writer.close()
        with contextlib.suppress(OSError):
            await self._writer.wait_closed()


class StreamingServer:
    """HTTP/1.1 (h11) on `settings.address:port`, upgraded to SPDY/3.1 or WebSocket (wsproto)."""

    def __init__(self, settings: StreamingSettings, runtime: StreamRuntime) -> None:
        self._settings = settings
        self._runtime = runtime
        self.tokens = TokenCache(settings.token_ttl_seconds)
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[Any]] = set()
        self.base_url = ""

    async def start(self) -> None:
        address, port = self._settings.address, self._settings.port
        try:
            self._server = await asyncio.start_server(self._serve, address, port)
        except OSError as e:
            raise Unavailable(f"the streaming server cannot listen on {address} port {port}: {e.strerror}") from e
        port = self._server.sockets[0].getsockname()[1]
        host = f"[{address}]" if ":" in address else address
        self.base_url = f"http://{host}:{port}"
        log.info("streaming server listening", extra={"url": self.base_url})

    async def stop(self) -> None:
        """Stop listening and end every open session."""
        if self._server is None:
            return
        self._server.close()
        for task in list(self._connections):
            task.cancel()
        await asyncio.gather(*self._connections, return_exceptions=True)
        await self._server.wait_closed()
        self._server = None

    def url(self, request: StreamRequest) -> str:
        """A one-time URL for `request`, valid for `token_ttl_seconds`."""
        kind = next(name for name, cls in _KINDS.items() if isinstance(request, cls))
        return f"{self.base_url}/{kind}/{self.tokens.insert(request)}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        try:
            await self._handle(reader, writer)
        except asyncio.CancelledError:
            pass  # stop() ends sessions so; asyncio (3.11) would log a cancelled connection task as an error
        except Exception:
            log.exception("streaming connection failed")
        finally:
            self._connections.discard(task)
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
        try:
            async with asyncio.timeout(HEAD_TIMEOUT):
                request = await _read_head(conn, reader)
        except TimeoutError:
            return
        except h11.RemoteProtocolError as e:
            _respond(conn, writer, e.error_status_hint, f"bad request: {e}")
            return
        if request is None:
            return
        split = urlsplit(request.target.decode("ascii", "replace"))
        parts = split.path.split("/")
        if request.method not in (b"GET", b"POST"):
            _respond(conn, writer, 405, "method not allowed", [("Allow", "GET, POST")])
            return
        cached = self.tokens.consume(parts[2]) if len(parts) == 3 and not parts[0] else None
        if cached is None or len(parts) != 3 or not isinstance(cached, _KINDS.get(parts[1], ())):
            _respond(conn, writer, 404, "404 page not found")
            return
        headers = _headers(request)
        pending = conn.trailing_data[0]
        if _has_token(headers, "upgrade", "websocket") and _has_token(headers, "connection", "upgrade"):
            await self._websocket(conn, request, reader, writer, pending, cached, parse_qs(split.query))
        else:
            await self._spdy(conn, headers, reader, writer, pending, cached)

    # ---- SPDY ------------------------------------------------------------------------------

    async def _spdy(
        self,
        conn: h11.Connection,
        headers: dict[str, list[str]],
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        pending: bytes,
        cached: StreamRequest,
    ) -> None:
        """kubelet's SPDY handshake: the first of the client's X-Stream-Protocol-Version values we speak."""
        forward = isinstance(cached, pb.PortForwardRequest)
        supported = (portforward.PROTOCOL,) if forward else remotecommand.SPDY_PROTOCOLS
        if not _has_token(headers, "connection", "upgrade") or not _has_token(headers, "upgrade", "spdy/3.1"):
            _respond(conn, writer, 400, "unable to upgrade: missing upgrade headers in request")
            return
        offered = [p.strip() for v in headers.get("x-stream-protocol-version", []) for p in v.split(",") if p.strip()]
        if not offered:
            _respond(conn, writer, 400, "unable to upgrade: no X-Stream-Protocol-Version header in the request")
            return
        protocol = next((p for p in offered if p in supported), None)
        if protocol is None:
            accepted = [("X-Accepted-Stream-Protocol-Versions", p) for p in supported]
            _respond(conn, writer, 403, f"unable to upgrade: no protocol in common with {offered}", accepted)
            return
        upgrade = [("Connection", "Upgrade"), ("Upgrade", "SPDY/3.1"), ("X-Stream-Protocol-Version", protocol)]
        switching = h11.InformationalResponse(status_code=101, headers=upgrade, reason=b"Switching Protocols")
        writer.write(conn.send(switching))
        session = SpdySession(TcpChannel(reader, writer, pending))
        session.start()
        log.info("streaming session", extra=_describe(cached, f"spdy {protocol}"))
        try:
            if isinstance(cached, pb.PortForwardRequest):
                dial = functools.partial(self._runtime.port_forward, cached.pod_sandbox_id)
                await portforward.serve_spdy(session, dial, cached.pod_sandbox_id)
            else:
                options, start, exec_ = self._remotecommand(cached)
                await remotecommand.serve_spdy(session, protocol, options, start, exec_=exec_)
        finally:
            await session.close()

    # ---- WebSocket -------------------------------------------------------------------------

    async def _websocket(
        self,
        conn: h11.Connection,
        request: h11.Request,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        pending: bytes,
        cached: StreamRequest,
        query: dict[str, list[str]],
    ) -> None:
        """The first of the client's subprotocols we speak; none offered means channel.k8s.io."""
        ws = WSConnection(ConnectionType.SERVER)
        try:
            ws.initiate_upgrade_connection(list(request.headers), request.target)
            event = next(ws.events())
        except (RemoteProtocolError, StopIteration) as e:
            _respond(conn, writer, 400, f"bad WebSocket request: {e}")
            return
        assert isinstance(event, Request)
        forward = isinstance(cached, pb.PortForwardRequest)
        supported = portforward.WEBSOCKET_PROTOCOLS if forward else remotecommand.WEBSOCKET_PROTOCOLS
        offered = event.subprotocols or [""]
        protocol = next((p for p in offered if p in supported), None)
        if protocol is None:
            writer.write(ws.send(RejectConnection(status_code=403)))
            return
        ports: list[int] = []
        if isinstance(cached, pb.PortForwardRequest) and protocol != portforward.TUNNEL_PROTOCOL:
            ports = _ports(cached, query)
            if not ports:
                writer.write(ws.send(RejectConnection(status_code=400)))
                return
        writer.write(ws.send(AcceptConnection(subprotocol=protocol or None)))
        socket = WebSocket(ws, TcpChannel(reader, writer, pending), protocol)
        log.info("streaming session", extra=_describe(cached, f"websocket {protocol or '(none)'}"))
        try:
            if isinstance(cached, pb.PortForwardRequest):
                dial = functools.partial(self._runtime.port_forward, cached.pod_sandbox_id)
                if protocol == portforward.TUNNEL_PROTOCOL:
                    session = SpdySession(MessageStream(socket))
                    session.start()
                    try:
                        await portforward.serve_spdy(session, dial, cached.pod_sandbox_id)
                    finally:
                        await session.close()
                else:
                    await portforward.serve_websocket(socket, ports, dial, cached.pod_sandbox_id)
            else:
                options, start, exec_ = self._remotecommand(cached)
                await remotecommand.serve_websocket(socket, options, start, exec_=exec_)
        finally:
            await socket.close()

    def _remotecommand(
        self, cached: pb.ExecRequest | pb.AttachRequest
    ) -> tuple[remotecommand.Options, remotecommand.Start, bool]:
        options = remotecommand.Options(
            stdin=cached.stdin, stdout=cached.stdout, stderr=cached.stderr and not cached.tty, tty=cached.tty
        )
        runtime = self._runtime

        async def start_exec(size: tuple[int, int] | None) -> Process:
            return await runtime.exec(cached, size)  # type: ignore[arg-type]

        async def start_attach(size: tuple[int, int] | None) -> Process:
            return await runtime.attach(cached)  # type: ignore[arg-type]

        if isinstance(cached, pb.ExecRequest):
            return options, start_exec, True
        return options, start_attach, False


async def _read_head(conn: h11.Connection, reader: asyncio.StreamReader) -> h11.Request | None:
    """The request line and headers (a body, which streaming requests have none of, is skipped)."""
    request = None
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(await reader.read(READ_SIZE))
        elif isinstance(event, h11.Request):
            request = event
        elif isinstance(event, h11.EndOfMessage) or event is h11.PAUSED:
            return request
        elif isinstance(event, h11.ConnectionClosed):
            return None


def _ports(request: pb.PortForwardRequest, query: dict[str, list[str]]) -> list[int]:
    """The ports of a WebSocket port-forward: the CRI request's, else the URL's `port` parameters (as kubelet)."""
    try:
        if request.port:
            return [portforward.parse_port(str(p)) for p in request.port]
        return [portforward.parse_port(p) for value in query.get("port", []) for p in value.split(",")]
    except ValueError:
        return []


def _headers(request: h11.Request) -> dict[str, list[str]]:
    headers: dict[str, list[str]] = {}
    for name, value in request.headers:
        headers.setdefault(name.decode("latin-1"), []).append(value.decode("latin-1"))
    return headers


def _has_token(headers: dict[str, list[str]], name: str, token: str) -> bool:
    """Whether the comma-separated header `name` lists `token` (case-insensitively)."""
    return any(token == part.strip().lower() for value in headers.get(name, []) for part in value.split(","))


def _respond(
    conn: h11.Connection,
    writer: asyncio.StreamWriter,
    status: int,
    text: str,
    headers: list[tuple[str, str]] | None = None,
) -> None:
    body = f"{text}\n".encode()
    fields = [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(body)))]
    fields.append(("Connection", "close"))
    try:
        data = conn.send(h11.Response(status_code=status, headers=fields + (headers or [])))
        data += conn.send(h11.Data(data=body)) + conn.send(h11.EndOfMessage())
    except h11.LocalProtocolError:
        return
    writer.write(data)


def _describe(request: StreamRequest, transport: str) -> dict[str, str]:
    if isinstance(request, pb.PortForwardRequest):
        return {"kind": "portforward", "pod": request.pod_sandbox_id[:12], "transport": transport}
    kind = "exec" if isinstance(request, pb.ExecRequest) else "attach"
    return {"kind": kind, "container": request.container_id[:12], "transport": transport, "tty": str(request.tty)}
