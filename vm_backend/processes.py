"""What a VM pod's streaming sessions connect to: exec'd processes, attachments and forwarded ports.

Each is fed by the pod's agent events (`vm_backend.events` routes them here) and
talks back through the pod's agent connection. Output is queued as the events
arrive: they must never wait, as they also carry the pod's logs and exits. So
every queue is bounded another way: an exec's output and a port's data by the
credit the host grants (`vm_backend.flow`), an attacher's by `ATTACH_BUFFER`
(a client that falls that far behind is detached, as conmon does; the container
never waits for it).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Callable

from core.chunks import ChunkQueue
from core.errors import FailedPrecondition, TandemError
from protos import agent_pb2
from sandbox.backend import ByteChannel, Process
from vm_backend.channel import AgentClient
from vm_backend.flow import WINDOW, CreditedStream, CreditSender

log = logging.getLogger("tandem.vm")

ATTACH_BUFFER = 1 * 2**20
"""Bytes of a container's output an attached client may lag behind before it is detached."""


class VmExec(Process):
    """A command the agent runs in a container (`StartExec`); its output and exit arrive as events."""

    def __init__(
        self,
        client: AgentClient,
        container_id: str,
        exec_id: str,
        tty: bool,
        on_close: Callable[[str], object] | None = None,
    ) -> None:
        self.client, self.container_id, self.exec_id, self.tty = client, container_id, exec_id, tty
        self._on_close = on_close  # the event router forgets the stream (`PodEvents.end_stream`)
        self._credit = CreditSender(self._send_credit, lambda: client.closed)
        self.stdout, self.stderr = CreditedStream(self._credit.wake), CreditedStream(self._credit.wake)
        self.exited: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self.exited.add_done_callback(lambda f: f.cancelled() or f.exception())  # an overrun nobody waits for
        if tty:
            self.stderr.end()

    window = WINDOW  # what StartExec grants each stream at first

    def output(self, stream: int, data: bytes) -> bool:
        """Queue output; False if the guest sent it past the stream's credit."""
        return (self.stderr if stream == agent_pb2.STDERR and not self.tty else self.stdout).receive(data)

    def finished(self, code: int) -> None:
        self.stdout.end()
        self.stderr.end()
        self._credit.stop()
        if not self.exited.done():
            self.exited.set_result(code)

    def overrun(self) -> None:
        """The guest ignored the credit: the stream is closed, the command killed and its output discarded."""
        self.stdout.end()
        self.stderr.end()
        self._credit.stop()
        if not self.exited.done():
            self.exited.set_exception(FailedPrecondition("the guest sent exec output past its credit"))
        task = asyncio.create_task(self._abandon())
        task.add_done_callback(lambda t: t.cancelled() or t.exception())

    async def _abandon(self) -> None:
        with contextlib.suppress(TandemError):
            await self.client.exec_credit(self.container_id, self.exec_id, 0, 0, discard=True)
        with contextlib.suppress(TandemError):
            await self.client.signal(self.container_id, signal.SIGKILL, process_id=self.exec_id)

    async def _send_credit(self) -> None:
        await self.client.exec_credit(self.container_id, self.exec_id, self.stdout.limit, self.stderr.limit)

    async def read_stdout(self) -> bytes:
        return await self.stdout.read()

    async def read_stderr(self) -> bytes:
        return await self.stderr.read()

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
        """The client went away: the command is killed, and what it still writes is not wanted. The host lets go
        of the stream now, not at an exit the guest may never report."""
        if self._on_close is not None:
            self._on_close(self.exec_id)
        self._credit.stop()
        if not self.exited.done():
            await self._abandon()


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

    @property
    def buffered(self) -> int:
        return self.stdout.size + self.stderr.size

    def output(self, stream: int, data: bytes) -> None:
        """Queue output for the client; one more than ATTACH_BUFFER behind is detached instead."""
        if self.done.is_set():
            return
        if self.buffered + len(data) > ATTACH_BUFFER:
            log.warning("detaching an attach client of %s that fell %d bytes behind", self.container_id[:12],
                        self.buffered)  # fmt: skip
            self._on_detach(self)
            self.finished()
            return
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
    """A forwarded connection: WritePort requests out, PortData events in (within credit), ClosePort at the end.

    Each direction ends on its own (`write_eof`, and PortData's `eof`), as a TCP
    connection's do; PortClosed means the agent is done with the stream.
    """

    window = WINDOW  # what OpenPort grants at first

    def __init__(self, client: AgentClient, stream_id: str, on_close: Callable[[str], object]) -> None:
        self.client, self.stream_id, self._on_close = client, stream_id, on_close
        self._credit = CreditSender(self._send_credit, lambda: client.closed)
        self.inbox = CreditedStream(self._credit.wake)
        self._closed = False  # by the host
        self._gone = False  # on the agent's side

    def received(self, data: bytes, eof: bool) -> bool:
        """Queue what the guest side sent; False if past the credit (the caller closes the stream)."""
        if not self.inbox.receive(data):
            return False
        if eof:
            self.inbox.end()
            self._credit.stop()
        return True

    def ended(self) -> None:
        """The agent closed the stream: no more data either way."""
        self._gone = True
        self.inbox.end()
        self._credit.stop()

    async def _send_credit(self) -> None:
        await self.client.port_credit(self.stream_id, self.inbox.limit)

    async def read(self) -> bytes:
        return await self.inbox.read()

    async def write(self, data: bytes) -> None:
        if self._closed or self._gone:
            raise ConnectionResetError(f"port stream {self.stream_id} is closed")
        try:
            await self.client.write_port(self.stream_id, data)
        except TandemError as e:
            raise ConnectionResetError(f"port stream {self.stream_id}: {e}") from e

    async def write_eof(self) -> None:
        """The guest's side reads end of file; its answer may still come."""
        if not self._closed and not self._gone:
            with contextlib.suppress(TandemError):
                await self.client.write_port(self.stream_id, b"", eof=True)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._on_close(self.stream_id)
        self.inbox.end()
        self._credit.stop()
        if not self._gone:
            with contextlib.suppress(TandemError):
                await self.client.close_port(self.stream_id)
