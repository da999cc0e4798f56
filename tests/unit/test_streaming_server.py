"""The streaming server end to end on loopback, with a scripted process behind it and hand-made clients."""

from __future__ import annotations

import asyncio
import json

import pytest
from wsproto import ConnectionState, ConnectionType, WSConnection
from wsproto.events import AcceptConnection, BytesMessage, CloseConnection, RejectConnection, Request, TextMessage

from core.chunks import ChunkQueue
from core.settings import StreamingSettings
from cri.streaming.server import StreamingServer
from cri.streaming.spdy.codec import FLAG_FIN, Data, FrameDecoder, FrameEncoder, GoAway, RstStream, SynReply, SynStream
from protos import cri_pb2 as pb
from sandbox.backend import ByteChannel, Process, StreamChannel
from tests.support.wait import eventually


class Script(Process):
    """Upper-cases its input to stdout, then exits with `code` once stdin ends."""

    def __init__(self, code: int) -> None:
        self.code = code
        self.out, self.err = ChunkQueue(100), ChunkQueue(100)
        self.sizes: list[tuple[int, int]] = []
        self.ended = asyncio.Event()
        self.killed = False

    async def read_stdout(self) -> bytes:
        return await self.out.get()

    async def read_stderr(self) -> bytes:
        return await self.err.get()

    async def write_stdin(self, data: bytes) -> None:
        await self.out.put(data.upper())

    async def close_stdin(self) -> None:
        await self.err.put(b"stdin closed\n")
        self._end()

    async def resize(self, width: int, height: int) -> None:
        self.sizes.append((width, height))

    async def wait(self) -> int:
        await self.ended.wait()
        return self.code

    async def kill(self) -> None:
        self.killed = True
        self._end()

    def _end(self) -> None:
        self.out.end()
        self.err.end()
        self.ended.set()


class Runtime:
    def __init__(self, echo_port: int) -> None:
        self.echo_port = echo_port
        self.processes: list[Script] = []
        self.sizes: list[tuple[int, int] | None] = []

    async def exec(self, request: pb.ExecRequest, terminal_size: tuple[int, int] | None) -> Process:
        self.sizes.append(terminal_size)
        self.processes.append(Script(int(request.cmd[0])))
        return self.processes[-1]

    async def attach(self, request: pb.AttachRequest) -> Process:
        self.processes.append(Script(0))
        return self.processes[-1]

    async def port_forward(self, sandbox_id: str, port: int) -> ByteChannel:
        if port != 80:
            raise ConnectionRefusedError(111, "Connection refused")
        return StreamChannel(*await asyncio.open_connection("127.0.0.1", self.echo_port))


@pytest.fixture
async def server():
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(1024):
            writer.write(data)
            await writer.drain()
        writer.close()

    echo_server = await asyncio.start_server(echo, "127.0.0.1", 0)
    runtime = Runtime(echo_server.sockets[0].getsockname()[1])
    streaming = StreamingServer(StreamingSettings(token_ttl_seconds=60), runtime)
    await streaming.start()
    streaming.runtime = runtime
    yield streaming
    await streaming.stop()
    echo_server.close()


def exec_request(code: int = 0, **streams: bool) -> pb.ExecRequest:
    return pb.ExecRequest(container_id="c" * 64, cmd=[str(code)], **(streams or {"stdout": True}))


async def http(url: str, method: str = "POST", headers: dict[str, str] | None = None):
    """Send a request head; the response's status, headers, and the open connection."""
    host, port = url.split("/")[2].split(":")
    path = "/" + url.split("/", 3)[3]
    reader, writer = await asyncio.open_connection(host, int(port))
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}:{port}"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    status_line, *fields = head.decode().split("\r\n")
    response_headers: dict[str, list[str]] = {}
    for field in filter(None, fields):
        name, _, value = field.partition(":")
        response_headers.setdefault(name.strip().lower(), []).append(value.strip())
    return int(status_line.split()[1]), response_headers, reader, writer


SPDY_UPGRADE = {"Connection": "Upgrade", "Upgrade": "SPDY/3.1"}


class SpdyClient:
    """A client's side of SPDY: frames out through one compression context, frames in through another."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.encoder, self.decoder = FrameEncoder(), FrameDecoder()
        self.frames: list = []

    def send(self, *frames) -> None:
        for frame in frames:
            self.writer.write(self.encoder.encode(frame))

    async def until(self, predicate, timeout: float = 5.0) -> list:
        async with asyncio.timeout(timeout):
            while not any(predicate(f) for f in self.frames):
                data = await self.reader.read(65536)
                if not data:
                    break
                self.decoder.feed(data)
                while (frame := self.decoder.next_frame()) is not None:
                    self.frames.append(frame)
        return self.frames

    def data(self, stream_id: int) -> bytes:
        return b"".join(f.data for f in self.frames if isinstance(f, Data) and f.stream_id == stream_id)


async def spdy(url: str, *protocols: str, expect: str = "") -> SpdyClient:
    headers = {**SPDY_UPGRADE, "X-Stream-Protocol-Version": ", ".join(protocols)}
    status, response, reader, writer = await http(url, headers=headers)
    assert status == 101
    assert response["x-stream-protocol-version"] == [expect or protocols[0]]
    return SpdyClient(reader, writer)


class WsClient:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, ws: WSConnection) -> None:
        self.reader, self.writer, self.ws = reader, writer, ws
        self.messages: list[bytes] = []
        self.closed: CloseConnection | None = None

    def send(self, data: bytes) -> None:
        self.writer.write(self.ws.send(BytesMessage(data)))

    async def until_closed(self, timeout: float = 5.0) -> list[bytes]:
        async with asyncio.timeout(timeout):
            while self.closed is None and (data := await self.reader.read(65536)):
                self.ws.receive_data(data)
                for event in self.ws.events():
                    if isinstance(event, BytesMessage):
                        self.messages.append(bytes(event.data))
                    elif isinstance(event, CloseConnection):
                        self.closed = event
                        if self.ws.state is ConnectionState.REMOTE_CLOSING:
                            self.writer.write(self.ws.send(event.response()))
        return self.messages

    async def until(self, predicate, timeout: float = 5.0) -> list[bytes]:
        async with asyncio.timeout(timeout):
            while not any(predicate(m) for m in self.messages):
                self.ws.receive_data(await self.reader.read(65536))
                self.messages += [bytes(e.data) for e in self.ws.events() if isinstance(e, BytesMessage)]
        return self.messages


async def websocket(url: str, *protocols: str) -> WsClient | int:
    """A WebSocket to `url`, or the HTTP status it was refused with."""
    host = url.split("/")[2]
    reader, writer = await asyncio.open_connection(*host.split(":"))
    ws = WSConnection(ConnectionType.CLIENT)
    writer.write(ws.send(Request(host=host, target="/" + url.split("/", 3)[3], subprotocols=list(protocols))))
    client = None
    while client is None:
        ws.receive_data(await reader.read(65536))
        for event in ws.events():
            if isinstance(event, AcceptConnection):
                assert event.subprotocol == (protocols[0] if protocols else None)
                client = WsClient(reader, writer, ws)
            elif isinstance(event, RejectConnection):
                writer.close()
                return event.status_code
            elif isinstance(event, BytesMessage) and client is not None:  # arrived with the handshake
                client.messages.append(bytes(event.data))
    return client


# ---- HTTP ----------------------------------------------------------------------------------


async def test_tokens_work_once_and_only_for_their_kind(server):
    url = server.url(exec_request())
    assert url.startswith(server.base_url + "/exec/")
    status, _, _, writer = await http(url)  # no upgrade: the token is spent all the same
    assert status == 400
    writer.close()
    for target in (url, url.replace("/exec/", "/attach/"), server.base_url + "/exec/nonsense", server.base_url + "/"):
        status, _, _, writer = await http(target, headers=SPDY_UPGRADE)
        assert status == 404
        writer.close()
    status, _, _, writer = await http(server.url(exec_request()).replace("/exec/", "/attach/"), headers=SPDY_UPGRADE)
    assert status == 404
    writer.close()


async def test_other_methods_are_refused(server):
    status, headers, _, writer = await http(server.url(exec_request()), method="PUT")
    assert (status, headers["allow"]) == (405, ["GET, POST"])
    writer.close()


async def test_spdy_protocol_negotiation(server):
    headers = {**SPDY_UPGRADE, "X-Stream-Protocol-Version": "v9.channel.k8s.io"}
    status, response, _, writer = await http(server.url(exec_request()), headers=headers)
    assert status == 403
    assert response["x-accepted-stream-protocol-versions"] == [
        "v4.channel.k8s.io",
        "v3.channel.k8s.io",
        "v2.channel.k8s.io",
        "channel.k8s.io",
    ]
    writer.close()
    # client-go offers v5 first; over SPDY it is v4 on the wire, so kubelet (and Tandem) answer v4
    client = await spdy(
        server.url(exec_request()), "v5.channel.k8s.io", "v4.channel.k8s.io", expect="v4.channel.k8s.io"
    )
    client.writer.close()


async def test_a_garbage_request_is_a_400(server):
    reader, writer = await asyncio.open_connection(*server.base_url.split("/")[2].split(":"))
    writer.write(b"NOT HTTP\r\n\r\n")
    assert (await reader.read(100)).startswith(b"HTTP/1.1 400")
    writer.close()


# ---- exec and attach over SPDY -------------------------------------------------------------


async def test_spdy_v4_exec_streams_and_reports_the_exit_code(server):
    client = await spdy(server.url(exec_request(3, stdin=True, stdout=True, stderr=True)), "v4.channel.k8s.io")
    client.send(
        *(SynStream(i, {"streamtype": [t]}) for i, t in ((1, "error"), (3, "stdin"), (5, "stdout"), (7, "stderr")))
    )
    await client.until(lambda f: f == SynReply(7, {}))
    client.send(Data(3, b"hello "), Data(3, b"world", flags=FLAG_FIN))
    frames = await client.until(lambda f: isinstance(f, GoAway))
    assert client.data(5) == b"HELLO WORLD"
    assert client.data(7) == b"stdin closed\n"
    assert json.loads(client.data(1)) == {
        "metadata": {},
        "status": "Failure",
        "message": "command terminated with non-zero exit code: exit status 3",
        "reason": "NonZeroExitCode",
        "details": {"causes": [{"reason": "ExitCode", "message": "3"}]},
    }
    fins = {f.stream_id for f in frames if isinstance(f, Data) and f.flags & FLAG_FIN}
    assert fins == {1, 3, 5, 7}
    assert not [f for f in frames if isinstance(f, RstStream)]


async def test_spdy_v4_success_and_v2_failure_texts(server):
    client = await spdy(server.url(exec_request(0, stdin=True, stdout=True)), "v4.channel.k8s.io")
    client.send(SynStream(1, {"streamtype": ["error"]}), SynStream(3, {"streamtype": ["stdin"]}))
    client.send(SynStream(5, {"streamtype": ["stdout"]}), Data(3, b"", flags=FLAG_FIN))
    await client.until(lambda f: isinstance(f, GoAway))
    assert json.loads(client.data(1)) == {"metadata": {}, "status": "Success"}

    client = await spdy(server.url(exec_request(7, stdin=True, stdout=True)), "v2.channel.k8s.io")
    client.send(SynStream(1, {"streamtype": ["error"]}), SynStream(3, {"streamtype": ["stdin"]}))
    client.send(SynStream(5, {"streamtype": ["stdout"]}), Data(3, b"", flags=FLAG_FIN))
    await client.until(lambda f: isinstance(f, GoAway))
    assert client.data(1) == b"command terminated with non-zero exit code: exit status 7"


async def test_a_tty_starts_at_the_clients_size_and_follows_resizes(server):
    request = pb.ExecRequest(container_id="c", cmd=["0"], stdin=True, stdout=True, tty=True)
    client = await spdy(server.url(request), "v4.channel.k8s.io")
    client.send(*(SynStream(i, {"streamtype": [t]}) for i, t in ((1, "error"), (3, "stdin"), (5, "stdout"))))
    client.send(SynStream(7, {"streamtype": ["resize"]}), Data(7, b'{"Width":100,"Height":40}\n{"Width":1'))
    await client.until(lambda f: f == SynReply(7, {}))
    client.send(Data(7, b'20,"Height":50}\n'))
    processes = server.runtime.processes
    await eventually(lambda: processes and processes[0].sizes == [(100, 40), (120, 50)], 5, "the resize")
    client.send(Data(3, b"", flags=FLAG_FIN))
    await client.until(lambda f: isinstance(f, GoAway))
    assert server.runtime.sizes == [(100, 40)]
    assert server.runtime.processes[0].sizes == [(100, 40), (120, 50)]


async def test_a_client_that_hangs_up_gets_its_process_killed(server):
    client = await spdy(server.url(exec_request(0, stdin=True, stdout=True)), "v4.channel.k8s.io")
    client.send(*(SynStream(i, {"streamtype": [t]}) for i, t in ((1, "error"), (3, "stdin"), (5, "stdout"))))
    await client.until(lambda f: f == SynReply(5, {}))
    client.writer.close()
    await asyncio.wait_for(server.runtime.processes[0].ended.wait(), 2)
    assert server.runtime.processes[0].killed


async def test_a_client_that_opens_no_streams_is_dropped(server, monkeypatch):
    monkeypatch.setattr("cri.streaming.remotecommand.STREAM_CREATION_TIMEOUT", 0.2)
    client = await spdy(server.url(exec_request()), "v4.channel.k8s.io")
    async with asyncio.timeout(2):  # a GOAWAY, then the connection closes
        while await client.reader.read(65536):
            pass
    assert server.runtime.processes == []


# ---- exec and attach over WebSocket --------------------------------------------------------


async def test_websocket_v5_exec_with_stdin_close(server):
    client = await websocket(server.url(exec_request(4, stdin=True, stdout=True)), "v5.channel.k8s.io")
    await client.until(lambda m: m == b"\x01")  # kubelet's "connection established"
    client.send(b"\x00ping")
    await client.until(lambda m: m == b"\x01PING")
    client.send(b"\x04" + b'{"Width":80,"Height":24}')
    client.send(b"\xff\x00")  # v5: the client closes stdin
    messages = await client.until_closed()
    status = json.loads(next(m for m in messages if m[0] == 3)[1:])
    assert status["details"]["causes"] == [{"reason": "ExitCode", "message": "4"}]
    assert client.closed.code == 1000


async def test_websocket_base64_attach(server):
    request = pb.AttachRequest(container_id="c", stdin=True, stdout=True, stderr=True)
    host = server.base_url.split("/")[2]
    reader, writer = await asyncio.open_connection(*host.split(":"))
    ws = WSConnection(ConnectionType.CLIENT)
    writer.write(
        ws.send(Request(host=host, target=server.url(request).split(host)[1], subprotocols=["base64.channel.k8s.io"]))
    )
    texts: list[str] = []
    accepted = False
    async with asyncio.timeout(5):
        while "1SEk=" not in texts:
            ws.receive_data(await reader.read(65536))
            for event in ws.events():
                if isinstance(event, AcceptConnection):
                    accepted = True
                    writer.write(ws.send(TextMessage("0" + "aGk=")))  # "hi" on stdin
                elif isinstance(event, TextMessage):
                    texts.append(event.data)
    assert accepted  # and "HI" came back on stdout ("1", then base64)
    writer.close()


async def test_websocket_subprotocols_are_negotiated(server):
    assert await websocket(server.url(exec_request()), "v9.channel.k8s.io") == 403
    client = await websocket(server.url(exec_request()))  # none asked for: channel.k8s.io
    assert isinstance(client, WsClient)
    client.writer.close()


# ---- port-forward --------------------------------------------------------------------------


async def test_spdy_port_forward_pairs_streams_by_request_id(server):
    client = await spdy(server.url(pb.PortForwardRequest(pod_sandbox_id="p")), "portforward.k8s.io")
    pair = {"port": ["80"], "requestid": ["0"]}
    client.send(SynStream(1, {**pair, "streamtype": ["error"]}, flags=FLAG_FIN))
    client.send(SynStream(3, {**pair, "streamtype": ["data"]}), Data(3, b"over spdy"))
    await client.until(lambda f: client.data(3) == b"over spdy")
    client.send(SynStream(5, {"port": ["81"], "requestid": ["1"], "streamtype": ["error"]}))
    client.send(SynStream(7, {"port": ["81"], "requestid": ["1"], "streamtype": ["data"]}))
    await client.until(lambda f: b"error forwarding port 81" in client.data(5))
    client.send(SynStream(9, {"port": ["0"], "streamtype": ["data"]}))
    await client.until(lambda f: isinstance(f, RstStream) and f.stream_id == 9)
    client.send(Data(3, b"", flags=FLAG_FIN))  # half-close: the echo server ends, so does the pair
    await client.until(lambda f: isinstance(f, Data) and f.stream_id == 3 and f.flags & FLAG_FIN)


async def test_port_forward_tunnelled_through_websocket(server):
    client = await websocket(server.url(pb.PortForwardRequest(pod_sandbox_id="p")), "SPDY/3.1+portforward.k8s.io")
    encoder, decoder = FrameEncoder(), FrameDecoder()
    pair = {"port": ["80"], "requestid": ["0"]}
    for frame in (
        SynStream(1, {**pair, "streamtype": ["error"]}),
        SynStream(3, {**pair, "streamtype": ["data"]}),
        Data(3, b"tunnelled"),
    ):
        client.send(encoder.encode(frame))
    received = b""
    async with asyncio.timeout(5):
        while b"tunnelled" not in received:
            client.ws.receive_data(await client.reader.read(65536))
            for event in client.ws.events():
                if isinstance(event, BytesMessage):
                    decoder.feed(bytes(event.data))
            while (frame := decoder.next_frame()) is not None:
                if isinstance(frame, Data) and frame.stream_id == 3:
                    received += frame.data
    client.writer.close()


async def test_websocket_port_forward_channels_with_port_prefixes(server):
    client = await websocket(server.url(pb.PortForwardRequest(pod_sandbox_id="p", port=[80, 81])), "v4.channel.k8s.io")
    prefix_80, prefix_81 = (80).to_bytes(2, "little"), (81).to_bytes(2, "little")
    await client.until(lambda m: m == b"\x03" + prefix_81)
    assert client.messages[:4] == [b"\x00" + prefix_80, b"\x01" + prefix_80, b"\x02" + prefix_81, b"\x03" + prefix_81]
    client.send(b"\x00over channels")
    await client.until(lambda m: m == b"\x00over channels")
    await client.until(lambda m: m.startswith(b"\x03error forwarding port 81"))
    client.writer.write(client.ws.send(CloseConnection(1000)))
    await client.until_closed()
