"""Kubernetes' remotecommand protocols (exec and attach) on top of a backend's `Process`.

Two framings carry the same five channels (stdin, stdout, stderr, error, resize):

- SPDY, one stream per channel named by its `streamtype` header, versions
  `channel.k8s.io` (v1) to `v4.channel.k8s.io`; v3 adds the resize stream.
- WebSocket, one channel byte in front of every message (0 stdin, 1 stdout,
  2 stderr, 3 error, 4 resize), `channel.k8s.io` to `v5.channel.k8s.io` and
  the base64 text variants; v5 lets the client close stdin with `[255, 0]`.

The error channel ends every session. From v4 on it carries a metav1.Status as
JSON, with a non-zero exit code as kubelet reports it (reason NonZeroExitCode,
the code in `details.causes[].message`); before v4 it carries only the text of
a failure. Resize messages are JSON `{"Width": w, "Height": h}`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from core.chunks import ChunkQueue
from core.errors import TandemError
from cri.streaming.spdy.session import SpdySession, SpdyStream, StreamClosed
from cri.streaming.websocket import WebSocket, join_channel, split_channel
from sandbox.backend import Process

log = logging.getLogger("tandem.streaming")

V1, V2, V3 = "channel.k8s.io", "v2.channel.k8s.io", "v3.channel.k8s.io"
V4, V5 = "v4.channel.k8s.io", "v5.channel.k8s.io"
SPDY_PROTOCOLS = (V4, V3, V2, V1)
"""What the SPDY handshake accepts, best first (kubelet's list; client-go's v5 over SPDY is v4)."""
V4_BASE64, V1_BASE64 = "v4.base64.channel.k8s.io", "base64.channel.k8s.io"
WEBSOCKET_PROTOCOLS = (V5, V4, V4_BASE64, V1, V1_BASE64, "")
"""WebSocket subprotocols accepted; "" (none asked for) behaves as channel.k8s.io."""

STREAM_CREATION_TIMEOUT = 30.0
"""Seconds a SPDY client has to open its streams (kubelet's default)."""
FIRST_SIZE_WAIT = 1.0
"""Seconds to wait for a terminal's first size before starting the process anyway (interactive clients send
it at once; without it the command starts on a 0x0 terminal, and `stty size` there fails)."""
STDIN, STDOUT, STDERR, ERROR, RESIZE, CLOSE = 0, 1, 2, 3, 4, 255


@dataclass(frozen=True)
class Options:
    """Which streams the CRI request asked for; tty merges stderr into stdout."""

    stdin: bool
    stdout: bool
    stderr: bool
    tty: bool


def success() -> dict[str, Any]:
    return {"metadata": {}, "status": "Success"}


def exited(code: int) -> dict[str, Any]:
    """kubelet's status for a command that exited non-zero (client-go turns it back into the exit code)."""
    return {
        "metadata": {},
        "status": "Failure",
        "message": f"command terminated with non-zero exit code: exit status {code}",
        "reason": "NonZeroExitCode",
        "details": {"causes": [{"reason": "ExitCode", "message": str(code)}]},
    }


def internal_error(message: str) -> dict[str, Any]:
    return {
        "metadata": {},
        "status": "Failure",
        "message": f"Internal error occurred: {message}",
        "reason": "InternalError",
        "details": {"causes": [{"message": message}]},
        "code": 500,
    }


def encode_status(status: dict[str, Any], json_status: bool) -> bytes:
    """The error channel's content: the Status as JSON (v4+), or before v4 a failure's message alone."""
    if json_status:
        return json.dumps(status, separators=(",", ":")).encode()
    return b"" if status["status"] == "Success" else status["message"].encode()


class ResizeDecoder:
    """Terminal sizes out of a stream of JSON objects (client-go's json.Encoder output, split anywhere)."""

    def __init__(self) -> None:
        self._text = ""

    def feed(self, data: bytes) -> list[tuple[int, int]]:
        self._text += data.decode("utf-8", "replace")
        sizes = []
        decoder = json.JSONDecoder()
        while self._text.strip():
            try:
                value, end = decoder.raw_decode(self._text.lstrip())
            except json.JSONDecodeError:
                if len(self._text) > 4096:  # not JSON and never going to be: drop it
                    self._text = ""
                break
            self._text = self._text.lstrip()[end:]
            if isinstance(value, dict):
                width, height = value.get("Width", value.get("width")), value.get("Height", value.get("height"))
                if isinstance(width, int) and isinstance(height, int) and 0 <= width < 2**16 and 0 <= height < 2**16:
                    sizes.append((width, height))
        return sizes


Start = Callable[[tuple[int, int] | None], Awaitable[Process]]
"""Starts the session's process, given the client's terminal size (width, height) if it sent one in time."""


class Client(ABC):
    """The client's end of one exec or attach session, whichever framing carries it."""

    gone: asyncio.Event
    """Set when the client hung up."""

    @abstractmethod
    async def read_stdin(self) -> bytes:
        """The client's next input; b"" once it closed stdin (or has none)."""

    @abstractmethod
    async def next_size(self) -> tuple[int, int] | None:
        """The next terminal size the client sent; None when it sends no more."""

    @abstractmethod
    async def write(self, channel: int, data: bytes) -> None:
        """Send output on STDOUT or STDERR; dropped when the client did not ask for it or is gone."""

    @abstractmethod
    async def finish(self, status: dict[str, Any]) -> None:
        """End the session: output streams closed, `status` on the error channel, connection closed."""


async def run(client: Client, options: Options, start: Start, *, exec_: bool) -> None:
    """Connect `client` to the process `start` gives, until the process ends or the client goes away."""
    size = None
    if options.tty:
        with contextlib.suppress(TimeoutError):
            size = await asyncio.wait_for(client.next_size(), FIRST_SIZE_WAIT)
    try:
        process = await start(size)
        if size is not None:
            await process.resize(*size)
    except Exception as e:
        if isinstance(e, TandemError):
            log.info("streaming session failed to start", extra={"error": str(e)})
        else:
            log.exception("streaming session failed to start")
        await client.finish(internal_error(str(e)))
        return
    outputs = [
        asyncio.create_task(_copy(process.read_stdout, client, STDOUT)),
        asyncio.create_task(_copy(process.read_stderr, client, STDERR)),
    ]
    helpers = list(outputs)
    if options.stdin:
        helpers.append(asyncio.create_task(_feed_stdin(client, process)))
    if options.tty:
        helpers.append(asyncio.create_task(_feed_sizes(client, process)))
    ended = asyncio.create_task(_ended(process, outputs))
    gone = asyncio.create_task(client.gone.wait())
    status = None
    try:
        await asyncio.wait({ended, gone}, return_when=asyncio.FIRST_COMPLETED)
        if ended.done():
            status = _final_status(ended, exec_)
        else:
            log.info("streaming client went away; ending its process")
            await process.kill()
    except asyncio.CancelledError:  # the daemon is stopping: nobody will relay this process any more
        await process.kill()
        raise
    finally:
        for task in [*helpers, ended, gone]:
            task.cancel()
        for result in await asyncio.gather(*helpers, ended, gone, return_exceptions=True):
            if isinstance(result, Exception):
                log.debug("streaming helper failed", extra={"error": repr(result)})
    if status is not None:
        await client.finish(status)


def _final_status(ended: asyncio.Task[int | None], exec_: bool) -> dict[str, Any]:
    if (error := ended.exception()) is not None:
        log.warning("streaming session failed", extra={"error": repr(error)})
        return internal_error(str(error))
    code = ended.result()
    return exited(code) if exec_ and code else success()


async def _copy(read: Callable[[], Awaitable[bytes]], client: Client, channel: int) -> None:
    while chunk := await read():
        await client.write(channel, chunk)


async def _ended(process: Process, outputs: list[asyncio.Task[None]]) -> int | None:
    """The exit code, once the process ended and all its output was passed on."""
    code = await process.wait()
    await asyncio.gather(*outputs)
    return None if code is None else min(max(code, 0), 255)


async def _feed_stdin(client: Client, process: Process) -> None:
    while data := await client.read_stdin():
        await process.write_stdin(data)
    await process.close_stdin()


async def _feed_sizes(client: Client, process: Process) -> None:
    while (size := await client.next_size()) is not None:
        await process.resize(*size)


# ---- SPDY ----------------------------------------------------------------------------------


async def serve_spdy(session: SpdySession, protocol: str, options: Options, start: Start, *, exec_: bool) -> None:
    """One exec or attach over an upgraded SPDY connection."""
    wanted = {"error"} | {name for name in ("stdin", "stdout", "stderr") if getattr(options, name)}
    if options.tty and protocol in (V3, V4):
        wanted.add("resize")
    try:
        streams = await _open_streams(session, wanted)
    except TimeoutError:
        log.info("streaming client did not open its streams in time", extra={"wanted": ",".join(sorted(wanted))})
        return
    if streams is not None:
        await run(_SpdyClient(session, streams, json_status=protocol == V4), options, start, exec_=exec_)


async def _open_streams(session: SpdySession, wanted: set[str]) -> dict[str, SpdyStream] | None:
    """Accept the client's streams until every wanted kind is there; None if the client gave up."""
    streams: dict[str, SpdyStream] = {}
    async with asyncio.timeout(STREAM_CREATION_TIMEOUT):
        while not wanted <= streams.keys():
            stream = await session.accept()
            if stream is None:
                return None
            await stream.reply()
            kind = stream.header("streamtype")
            if kind in ("error", "stdin", "stdout", "stderr", "resize"):
                streams.setdefault(kind, stream)
            else:
                log.info("unexpected stream type", extra={"streamtype": kind})
    return streams


class _SpdyClient(Client):
    def __init__(self, session: SpdySession, streams: dict[str, SpdyStream], json_status: bool) -> None:
        self._session = session
        self._streams = streams
        self._json_status = json_status
        self._sizes = ResizeDecoder()
        self._pending: list[tuple[int, int]] = []
        self.gone = session.closed

    async def read_stdin(self) -> bytes:
        stream = self._streams.get("stdin")
        return await stream.read() if stream is not None else b""

    async def next_size(self) -> tuple[int, int] | None:
        stream = self._streams.get("resize")
        while not self._pending:
            if stream is None or not (data := await stream.read()):
                return None
            self._pending = self._sizes.feed(data)
        return self._pending.pop(0)

    async def write(self, channel: int, data: bytes) -> None:
        stream = self._streams.get("stdout" if channel == STDOUT else "stderr")
        if stream is not None:
            with contextlib.suppress(StreamClosed):
                await stream.write(data)

    async def finish(self, status: dict[str, Any]) -> None:
        """The status first: a v1 client stops listening once its output streams end."""
        with contextlib.suppress(StreamClosed):
            if message := encode_status(status, self._json_status):
                await self._streams["error"].write(message)
        for stream in self._streams.values():
            await stream.close()
        await self._session.shutdown()


# ---- WebSocket -----------------------------------------------------------------------------


async def serve_websocket(socket: WebSocket, options: Options, start: Start, *, exec_: bool) -> None:
    """One exec or attach over an accepted WebSocket."""
    client = _WebSocketClient(socket, options)
    reader = asyncio.create_task(client.receive_loop())
    try:
        await client.announce()
        await run(client, options, start, exec_=exec_)
    finally:
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reader
        await socket.close()


class _WebSocketClient(Client):
    def __init__(self, socket: WebSocket, options: Options) -> None:
        self._socket = socket
        self._options = options
        self._base64 = socket.subprotocol in (V4_BASE64, V1_BASE64)
        self._json_status = socket.subprotocol in (V5, V4, V4_BASE64)
        self._stdin = ChunkQueue()
        self._sizes: asyncio.Queue[tuple[int, int] | None] = asyncio.Queue()
        self._decoder = ResizeDecoder()
        self.gone = socket.closed

    async def receive_loop(self) -> None:
        """Sort the client's messages into stdin and resizes until it closes the WebSocket."""
        try:
            while (message := await self._socket.receive()) is not None:
                channel, data = split_channel(message)
                if channel == CLOSE and self._socket.subprotocol == V5:
                    if data[:1] == bytes([STDIN]):
                        self._stdin.end()
                elif channel == STDIN and self._options.stdin:
                    await self._stdin.put(data)
                elif channel == RESIZE:
                    for size in self._decoder.feed(data):
                        self._sizes.put_nowait(size)
        except ValueError as e:
            log.info("malformed WebSocket message; closing", extra={"error": str(e)})
            await self._socket.close(1002)
        finally:
            self._sizes.put_nowait(None)
            self._stdin.end()

    async def announce(self) -> None:
        """kubelet's "connection established" signal: an empty message on the first channel it writes."""
        channel = STDOUT if self._options.stdout else STDERR if self._options.stderr else ERROR
        await self._send(channel, b"")

    async def read_stdin(self) -> bytes:
        return await self._stdin.get()

    async def next_size(self) -> tuple[int, int] | None:
        size = await self._sizes.get()
        if size is None:
            self._sizes.put_nowait(None)
        return size

    async def write(self, channel: int, data: bytes) -> None:
        if (self._options.stdout if channel == STDOUT else self._options.stderr) and data:
            await self._send(channel, data)

    async def _send(self, channel: int, data: bytes) -> None:
        with contextlib.suppress(ConnectionError):
            await self._socket.send(join_channel(channel, data, self._base64))

    async def finish(self, status: dict[str, Any]) -> None:
        if message := encode_status(status, self._json_status):
            await self._send(ERROR, message)
        await self._socket.close()
