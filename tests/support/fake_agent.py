"""A stand-in for a pod VM's guest agent: speaks protos/agent.proto on the pod's agent socket, where QEMU's
chardev would listen, so the host's real code (VmBackend's pod handle, its event router, AgentClient) runs
against it without a VM.

It answers Hello (unless `silent`) and Acks (unless `ignore_acks`), answers every other request with OK (or
what `respond` says), and sends whatever the test tells it, well-formed or not: events of its own choosing,
raw bytes, half a frame. A "QEMU" for the pod is any process whose identity is saved as the pod's pidfile
(`stand_in_qemu`).
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
import subprocess
from collections.abc import Callable
from pathlib import Path

from core.proc import ProcessIdentity
from protos import agent_pb2 as pb
from tests.support.wait import eventually
from vm_backend.agent.framing import Decoder, FramingError, encode


def stand_in_qemu(pidfile: Path) -> subprocess.Popen[bytes]:
    """A process that QEMU's pidfile names, so the host sees the pod's VM alive (stop it to "kill the VM")."""
    process = subprocess.Popen(["sleep", "3600"])
    identity = ProcessIdentity.of(process.pid)
    assert identity is not None
    pidfile.parent.mkdir(parents=True, exist_ok=True)
    identity.save(pidfile)
    return process


class FakeAgent:
    def __init__(
        self,
        path: Path,
        *,
        silent: bool = False,
        ignore_acks: bool = False,
        respond: Callable[[pb.Request], pb.Response | None] | None = None,
    ) -> None:
        self.path = path
        self.silent = silent
        self.ignore_acks = ignore_acks
        self.respond = respond
        self.requests: list[pb.Request] = []
        self.acks: list[int] = []
        self.connections = 0
        self.greeted = asyncio.Event()  # a host said Hello and (unless silent) was answered
        self.hellos = 0
        self._seq = 0
        self._unanswered: list[tuple[asyncio.StreamWriter, int]] = []  # Hellos kept waiting while silent
        self._writer: asyncio.StreamWriter | None = None
        self._server: asyncio.AbstractServer | None = None

    async def __aenter__(self) -> FakeAgent:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._server = await asyncio.start_unix_server(self._serve, str(self.path))
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        self.disconnect()

    # ---- what the test sends ----------------------------------------------------------------

    def event(self, seq: int | None = None, **kind: object) -> pb.Frame:
        """An event frame, numbered after the last unless `seq` is given."""
        if seq is None:
            self._seq += 1
            seq = self._seq
        return pb.Frame(event=pb.Event(seq=seq, **kind))

    async def send(self, *frames: pb.Frame) -> None:
        await self.send_raw(b"".join(encode(frame) for frame in frames))

    async def send_raw(self, data: bytes) -> None:
        """Write bytes as they are; returns once the host's side took them (or its socket buffer did)."""
        writer = await self.writer()
        writer.write(data)
        await writer.drain()

    def try_send_raw(self, data: bytes) -> bool:
        """Write without waiting: False if the host has stopped reading (the socket buffer is full)."""
        assert self._writer is not None
        self._writer.write(data)
        transport = self._writer.transport
        return transport.get_write_buffer_size() == 0

    @property
    def unsent(self) -> int:
        """Bytes written that the host has not taken yet (waiting in this side's buffer)."""
        return 0 if self._writer is None else self._writer.transport.get_write_buffer_size()

    async def writer(self) -> asyncio.StreamWriter:
        await self.greeted.wait()
        assert self._writer is not None
        return self._writer

    def speak(self) -> None:
        """Stop being silent: the Hellos kept waiting are answered now (on connections still open)."""
        self.silent = False
        for writer, request_id in self._unanswered:
            if not writer.is_closing():
                writer.write(encode(pb.Frame(id=request_id, response=self._hello())))
                if writer is self._writer:
                    self.greeted.set()
        self._unanswered.clear()

    @staticmethod
    def _hello() -> pb.Response:
        return pb.Response(hello=pb.HelloResult(agent_version="fake", instance_id="fake-agent"))

    def disconnect(self) -> None:
        """Drop the host's connection (it reconnects)."""
        if self._writer is not None:
            self._writer.transport.abort()
            self._writer = None
        self.greeted.clear()

    @staticmethod
    async def wait_for(check: Callable[[], object], timeout: float = 30.0) -> None:
        await eventually(check, timeout)

    @staticmethod
    def length_header(length: int) -> bytes:
        return struct.pack(">I", length)

    # ---- the connection -----------------------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.disconnect()  # one host at a time, as the agent
        self._writer = writer
        self.connections += 1
        decoder = Decoder()
        with contextlib.suppress(OSError, FramingError):
            while data := await reader.read(65536):
                for frame in decoder.feed(data):
                    self._request(writer, frame)
        if self._writer is writer:
            self._writer = None
            self.greeted.clear()

    def _request(self, writer: asyncio.StreamWriter, frame: pb.Frame) -> None:
        request = frame.request
        kind = request.WhichOneof("kind")
        self.requests.append(request)
        response: pb.Response | None = pb.Response()
        if kind == "hello":
            self.hellos += 1
            if self.silent:
                self._unanswered.append((writer, frame.id))
                response = None
            else:
                response = self._hello()
        elif kind == "ack":
            self.acks.append(request.ack.seq)
            if self.ignore_acks:
                response = None
        elif self.respond is not None:
            response = self.respond(request)
        if response is not None and not writer.is_closing():
            writer.write(encode(pb.Frame(id=frame.id, response=response)))
        if kind == "hello" and not self.silent:
            self.greeted.set()
