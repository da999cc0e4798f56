"""What a VM pod's streaming sessions connect to: exec'd processes, attachments and forwarded ports.

Each is fed by the pod's agent events (`vm_backend.events` routes them here) and
talks back through the pod's agent connection. Output is queued as the events
arrive: they must never wait, as they also carry the pod's logs and exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Callable

from core.chunks import ChunkQueue
from core.errors import TandemError
from protos import agent_pb2
from sandbox.backend import ByteChannel, Process
from vm_backend.channel import AgentClient


class VmExec(Process):
    """A command the agent runs in a container (`StartExec`); its output and exit arrive as events."""

    def __init__(self, client: AgentClient, container_id: str, exec_id: str, tty: bool) -> None:
        self.client, self.container_id, self.exec_id, self.tty = client, container_id, exec_id, tty
        self.stdout, self.stderr = ChunkQueue(0), ChunkQueue(0)
        self.exited: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        if tty:
            self.stderr.end()

    def output(self, stream: int, data: bytes) -> None:
        (self.stderr if stream == agent_pb2.STDERR and not self.tty else self.stdout).put_nowait(data)

    def finished(self, code: int) -> None:
        self.stdout.end()
        self.stderr.end()
        if not self.exited.done():
            self.exited.set_result(code)

    async def read_stdout(self) -> bytes:
        return await self.stdout.get()

    async def read_stderr(self) -> bytes:
        return await self.stderr.get()

    async def write_stdin(self, data: bytes) -> None:
        with contextlib.suppress(TandemError):
            await self.client.write_stdin(self.container_id, self.exec_id, data)

    async def close_stdin(self) -> None:
        with contextlib.suppress(TandemError):
            await self.client.write_stdin(self.container_id, self.exec_id, b"", close=True)

    async def resize(self, width: int, height: int) -> None:
        if self.tty:
            with contextlib.suppress(TandemError):
                await self.client.resize_terminal(self.container_id, self.exec_id, width, height)

    async def wait(self) -> int:
        return await asyncio.shield(self.exited)

    async def kill(self) -> None:
        if not self.exited.done():
            with contextlib.suppress(TandemError):
                await self.client.signal(self.container_id, signal.SIGKILL, process_id=self.exec_id)


class VmAttach(Process):
    """A client attached to a container's own stdio: its output as the agent reports it, stdin through the agent."""

    def __init__(
        self,
        client: Callable[[], AgentClient],
        container_id: str,
        *,
        tty: bool,
        stdin: bool,
        stdin_once: bool,
        detach_on_eof: bool,
        on_detach: Callable[[VmAttach], None],
    ) -> None:
        self.client, self.container_id, self.tty = client, container_id, tty
        self.stdin, self.stdin_once, self.detach_on_eof = stdin, stdin_once, detach_on_eof
        self._on_detach = on_detach
        self.stdout, self.stderr = ChunkQueue(0), ChunkQueue(0)
        self.done = asyncio.Event()
        if tty:
            self.stderr.end()

    def output(self, stream: int, data: bytes) -> None:
        (self.stderr if stream == agent_pb2.STDERR and not self.tty else self.stdout).put_nowait(data)

    def finished(self) -> None:
        self.stdout.end()
        self.stderr.end()
        self.done.set()

    async def read_stdout(self) -> bytes:
        return await self.stdout.get()

    async def read_stderr(self) -> bytes:
        return await self.stderr.get()

    async def write_stdin(self, data: bytes) -> None:
        if self.stdin and not self.done.is_set():
            with contextlib.suppress(TandemError):
                await self.client().write_stdin(self.container_id, "", data)

    async def close_stdin(self) -> None:
        if self.detach_on_eof:
            await self.kill()
        elif self.stdin and self.stdin_once:
            with contextlib.suppress(TandemError):
                await self.client().write_stdin(self.container_id, "", b"", close=True)

    async def resize(self, width: int, height: int) -> None:
        if self.tty:
            with contextlib.suppress(TandemError):
                await self.client().resize_terminal(self.container_id, "", width, height)

    async def wait(self) -> None:
        await self.done.wait()

    async def kill(self) -> None:
        self._on_detach(self)
        self.finished()


class VmPort(ByteChannel):
    """A forwarded connection: WritePort requests out, PortData events in, ClosePort at the end.

    What the guest sends is queued as the events arrive; the agent bounds it, as it
    stops reading the guest's side while its event log is full. The protocol has no
    half-close.
    """

    def __init__(self, client: AgentClient, stream_id: str, on_close: Callable[[str], object]) -> None:
        self.client, self.stream_id, self._on_close = client, stream_id, on_close
        self._inbox = ChunkQueue(0)
        self._closed = False

    def received(self, data: bytes) -> None:
        self._inbox.put_nowait(data)

    def ended(self) -> None:
        self._inbox.end()

    async def read(self) -> bytes:
        return await self._inbox.get()

    async def write(self, data: bytes) -> None:
        if self._closed or self._inbox.ended:
            raise ConnectionResetError(f"port stream {self.stream_id} is closed")
        try:
            await self.client.write_port(self.stream_id, data)
        except TandemError as e:
            raise ConnectionResetError(f"port stream {self.stream_id}: {e}") from e

    async def write_eof(self) -> None:
        """The agent protocol cannot half-close: the guest's side sees the end when the channel closes."""

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._on_close(self.stream_id)
        self._inbox.end()
        with contextlib.suppress(TandemError):
            await self.client.close_port(self.stream_id)
