"""Port forwarding: TCP connections from inside the guest to 127.0.0.1:<port>, relayed over the channel.

A stream belongs to the host connection that opened it: when that connection
goes, its streams are closed (the host's streaming clients are gone with it).
Data from the guest side is read only within the host's credit (a byte offset
the host raises as its client consumes) and waits for room in the event log
rather than being dropped. Each direction ends on its own: the guest side's end
of file is a PortData with `eof`, the host's a WritePort with `eof` (the guest
side reads end of file); PortClosed follows once both ended, or on an error.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field

from protos import agent_pb2

from .errors import Fail
from .events import EventLog

CONNECT_TIMEOUT = 10.0
_CHUNK = 64 * 1024


@dataclass(eq=False)
class _Stream:
    writer: asyncio.StreamWriter
    limit: int  # the host's credit: bytes of guest data it takes, counted from the start
    pump: asyncio.Task[None] | None = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    credit: asyncio.Event = field(default_factory=asyncio.Event)
    host_eof: bool = False  # the host sends no more
    guest_eof: bool = False  # the guest side sends no more


class Ports:
    def __init__(self, events: EventLog) -> None:
        self.events = events
        self._streams: dict[str, _Stream] = {}

    async def open(self, request: agent_pb2.OpenPort) -> None:
        sid = request.stream_id
        if not sid:
            raise Fail(agent_pb2.INVALID_ARGUMENT, "empty stream id")
        if not 0 < request.port < 65536:
            raise Fail(agent_pb2.INVALID_ARGUMENT, f"invalid port {request.port}")
        if sid in self._streams:
            raise Fail(agent_pb2.ALREADY_EXISTS, f"stream {sid} is open already")
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", request.port), CONNECT_TIMEOUT)
        except (OSError, TimeoutError) as e:
            raise Fail(agent_pb2.FAILED_PRECONDITION, f"cannot connect to port {request.port}: {e}") from None
        if sid in self._streams:  # opened twice concurrently
            writer.close()
            raise Fail(agent_pb2.ALREADY_EXISTS, f"stream {sid} is open already")
        stream = self._streams[sid] = _Stream(writer, request.window)
        stream.pump = asyncio.create_task(self._pump(sid, stream, reader))

    async def write(self, request: agent_pb2.WritePort) -> None:
        stream = self._streams.get(request.stream_id)
        if stream is None:
            raise Fail(agent_pb2.NOT_FOUND, f"no stream {request.stream_id!r}")
        async with stream.lock:
            if stream.host_eof:
                raise Fail(agent_pb2.FAILED_PRECONDITION, f"stream {request.stream_id} was closed for writing")
            try:
                stream.writer.write(request.data)
                await stream.writer.drain()
                if request.eof:
                    stream.host_eof = True
                    if stream.writer.can_write_eof():
                        stream.writer.write_eof()
            except OSError as e:
                raise Fail(agent_pb2.FAILED_PRECONDITION, f"stream {request.stream_id} is closed: {e}") from None
        if stream.host_eof and stream.guest_eof:
            self._finish(request.stream_id, stream, "")

    def credit(self, request: agent_pb2.PortCredit) -> None:
        """The host takes guest data up to `limit` bytes (a lower value than before is no change)."""
        stream = self._streams.get(request.stream_id)
        if stream is None:
            raise Fail(agent_pb2.NOT_FOUND, f"no stream {request.stream_id!r}")
        if request.limit > stream.limit:
            stream.limit = request.limit
            stream.credit.set()

    def close(self, stream_id: str) -> None:
        """Close a stream at the host's request (no PortClosed follows); an unknown id is success."""
        stream = self._streams.pop(stream_id, None)
        if stream is not None:
            if stream.pump is not None:
                stream.pump.cancel()
            stream.writer.close()

    def close_all(self) -> None:
        for sid in list(self._streams):
            self.close(sid)

    async def _pump(self, sid: str, stream: _Stream, reader: asyncio.StreamReader) -> None:
        """Guest -> host within the credit, until the guest side ends it; a failure closes the stream."""
        sent = 0
        try:
            while True:
                while sent >= stream.limit:
                    stream.credit.clear()
                    await stream.credit.wait()
                data = await reader.read(min(_CHUNK, stream.limit - sent))
                await self.events.wait_for_room()
                sent += len(data)
                port_data = agent_pb2.PortData(stream_id=sid, data=data, eof=not data)
                self.events.append(agent_pb2.Event(port_data=port_data))
                if not data:
                    break
        except OSError as e:
            self._finish(sid, stream, str(e) or type(e).__name__)
            return
        stream.guest_eof = True
        if stream.host_eof:
            self._finish(sid, stream, "")

    def _finish(self, sid: str, stream: _Stream, error: str) -> None:
        """Both directions ended (or one failed): forget the stream and tell the host."""
        if self._streams.get(sid) is not stream:
            return
        del self._streams[sid]
        with contextlib.suppress(OSError):
            stream.writer.close()
        self.events.append(agent_pb2.Event(port_closed=agent_pb2.PortClosed(stream_id=sid, error=error)))
