"""The agent's side of the channel: one host connection at a time, requests in, responses and events out.

Each request runs as its own task and is answered when done, in any order.
Hello and Ack are handled inline, in arrival order, because they move the event
cursor: after a Hello the writer sends the Hello response, then every unacked
event from the oldest, then new events as they come. A Hello from another host
instance than the last (a daemon restart) abandons the streaming execs the last
one started. A malformed frame ends the connection; the agent then waits for
the host to connect again.

Links: `StreamLink` is a unix-socket connection (`--socket`, for tests);
`PortLink` is the virtio-serial port, which stays open across host
connections: while no host is connected a read returns 0 at once (and poll
says readable), so `wait_for_host` polls until a read would block or brings
data.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from protos import agent_pb2

from .containers import Containers
from .errors import Fail
from .events import OUTPUT_LIMIT, EventLog
from .framing import Decoder, FramingError, encode
from .pod import PodSetup, System
from .ports import Ports
from .procs import Reaper, wait_fd, write_all

log = logging.getLogger("tandem.agent")

AGENT_VERSION = "1"
_READ = 256 * 1024
_BATCH = 256 * 1024  # bytes of frames gathered into one write
_MAX_ERROR = 64 * 1024
_HOST_POLL = 0.1  # seconds between looks at a virtio-serial port with no host


class Link(Protocol):
    """One host connection."""

    async def read(self) -> bytes:
        """Some bytes from the host; b"" once it is gone."""
        ...

    async def write(self, data: bytes) -> None: ...

    def close(self) -> None: ...


class StreamLink:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer

    async def read(self) -> bytes:
        try:
            return await self._reader.read(_READ)
        except ConnectionError:
            return b""

    async def write(self, data: bytes) -> None:
        self._writer.write(data)
        await self._writer.drain()

    def close(self) -> None:
        self._writer.close()


class PortLink:
    """The virtio-serial port while one host is connected; closing it leaves the fd open for the next host."""

    def __init__(self, fd: int, first: bytes) -> None:
        self._fd = fd
        self._pending = first

    async def read(self) -> bytes:
        if self._pending:
            data, self._pending = self._pending, b""
            return data
        while True:
            try:
                return os.read(self._fd, _READ)
            except BlockingIOError:
                await wait_fd(self._fd)

    async def write(self, data: bytes) -> None:
        await write_all(self._fd, data)

    def close(self) -> None:
        pass


def find_port(name: str, sys_dir: Path = Path("/sys/class/virtio-ports")) -> Path:
    """The device of the virtio-serial port QEMU named `name` (no udev in the guest, so no /dev/virtio-ports)."""
    for port in sorted(sys_dir.iterdir()) if sys_dir.is_dir() else []:
        try:
            if (port / "name").read_text().strip() == name:
                return Path("/dev") / port.name
        except OSError:
            continue
    raise FileNotFoundError(f"no virtio-serial port named {name!r} under {sys_dir}")


async def wait_for_host(fd: int) -> bytes:
    """Wait until a host is connected to the port; return what it sent already, if anything."""
    while True:
        try:
            data = os.read(fd, _READ)
        except BlockingIOError:
            return b""  # connected, nothing sent yet
        if data:
            return data
        await asyncio.sleep(_HOST_POLL)


@dataclass(eq=False)
class _Session:
    link: Link
    live: bool = True
    greeted: bool = False  # events flow only after Hello
    cursor: int = 0  # next event seq to send
    responses: collections.deque[bytes] = field(default_factory=collections.deque)
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    idle: asyncio.Event = field(default_factory=asyncio.Event)

    def respond(self, request_id: int, response: agent_pb2.Response) -> None:
        if self.live:
            self.responses.append(encode(agent_pb2.Frame(id=request_id, response=response)))
            self.idle.clear()
            self.wake.set()


class Agent:
    def __init__(
        self, *, run_dir: Path, runtime: str, system: System, reaper: Reaper, output_limit: int = OUTPUT_LIMIT
    ) -> None:
        self.events = EventLog(output_limit)
        self.events.on_append = self._wake
        self.containers = Containers(run_dir=run_dir, runtime=runtime, reaper=reaper, events=self.events)
        self.ports = Ports(self.events)
        self.pod = PodSetup(system, run_dir / "pod", run_dir / "share")
        self.instance_id = os.urandom(8).hex()
        self._host_instance: str | None = None
        self.stopped = asyncio.Event()
        self._session: _Session | None = None
        self._serving: asyncio.Task[Any] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        c = self.containers
        self._handlers: dict[str, Callable[[Any], Awaitable[agent_pb2.Response | None]]] = {
            "setup_pod": self.pod.apply,
            "create_container": c.create,
            "start_container": lambda r: c.start(r.container_id),
            "signal_process": c.signal,
            "remove_container": lambda r: c.remove(r.container_id),
            "exec_sync": self._exec_sync,
            "start_exec": c.start_exec,
            "write_stdin": c.write_stdin,
            "resize_terminal": _now(c.resize),
            "get_pod_stats": self._pod_stats,
            "update_resources": c.update,
            "open_port": self.ports.open,
            "write_port": self.ports.write,
            "close_port": _now(lambda r: self.ports.close(r.stream_id)),
            "exec_credit": _now(c.credit),
            "port_credit": _now(self.ports.credit),
            "shutdown": self._shutdown,
        }

    async def serve(self, link: Link) -> None:
        """Serve one host connection until it ends; a newer connection replaces this one."""
        if self._session is not None:
            self._end(self._session)
        session = self._session = _Session(link)
        self._serving = asyncio.current_task()
        writer = asyncio.create_task(self._write_loop(session))
        decoder = Decoder()
        try:
            while data := await link.read():
                for frame in decoder.feed(data):
                    self._dispatch(session, frame)
        except FramingError as e:
            log.warning("malformed frame from the host, closing the connection: %s", e)
        except OSError as e:
            log.warning("host connection failed: %s", e)
        finally:
            writer.cancel()
            if self._session is session:
                self._end(session)
            link.close()

    async def flush(self, timeout: float) -> None:
        """Wait (bounded) until everything queued for the host was written: before powering off."""
        session = self._session
        if session is not None:
            try:
                await asyncio.wait_for(session.idle.wait(), timeout)
            except TimeoutError:
                log.warning("could not flush the last responses to the host")

    async def disconnect(self, timeout: float = 2.0) -> None:
        """End the host connection, if any, and let its task finish rather than be cancelled at exit."""
        serving = self._serving
        if self._session is not None:
            self._end(self._session)
        if serving is not None and serving is not asyncio.current_task():
            await asyncio.wait([serving], timeout=timeout)

    def _end(self, session: _Session) -> None:
        session.live = False
        self._session = None
        self.ports.close_all()
        session.link.close()

    def _wake(self) -> None:
        if self._session is not None and self._session.greeted:
            self._session.wake.set()

    def _dispatch(self, session: _Session, frame: agent_pb2.Frame) -> None:
        if frame.WhichOneof("body") != "request":
            raise FramingError(f"the host sent a {frame.WhichOneof('body')} frame")
        request = frame.request
        kind = request.WhichOneof("kind")
        if kind == "hello":
            result = agent_pb2.HelloResult(
                agent_version=AGENT_VERSION, kernel_release=os.uname().release, instance_id=self.instance_id
            )
            session.respond(frame.id, agent_pb2.Response(hello=result))
            session.greeted, session.cursor = True, 0  # resend every unacked event
            host = request.hello.host_instance
            if self._host_instance is not None and host != self._host_instance:
                log.info("a new host instance: abandoning the streaming execs of the last one")
                self.containers.abandon_execs()
            self._host_instance = host
        elif kind == "ack":
            self.events.ack(request.ack.seq)
            session.respond(frame.id, agent_pb2.Response())
        elif kind is None:
            session.respond(frame.id, agent_pb2.Response(code=agent_pb2.INVALID_ARGUMENT, error="empty request"))
        else:
            task = asyncio.create_task(self._handle(session, frame.id, kind, getattr(request, kind)))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _handle(self, session: _Session, request_id: int, kind: str, message: Any) -> None:
        try:
            response = await self._handlers[kind](message) or agent_pb2.Response()
        except Fail as e:
            log.info("%s failed: %s", kind, e.message)
            response = agent_pb2.Response(code=e.code, error=e.message[:_MAX_ERROR])
        except Exception as e:
            log.exception("%s crashed", kind)
            response = agent_pb2.Response(code=agent_pb2.INTERNAL, error=f"{type(e).__name__}: {e}"[:_MAX_ERROR])
        session.respond(request_id, response)

    async def _write_loop(self, session: _Session) -> None:
        """Responses first, then events from the cursor, gathered into writes of up to _BATCH bytes."""
        while True:
            batch = bytearray()
            while session.responses and len(batch) < _BATCH:
                batch += session.responses.popleft()
            while session.greeted and len(batch) < _BATCH:
                entry = self.events.first_from(session.cursor)
                if entry is None:
                    break
                batch += entry.frame
                session.cursor = entry.seq + 1
            if batch:
                try:
                    await session.link.write(bytes(batch))
                except OSError as e:
                    log.warning("cannot write to the host: %s", e)
                    session.link.close()  # the reader sees the end and the session closes
                    return
                continue
            session.wake.clear()
            session.idle.set()
            await session.wake.wait()

    async def _exec_sync(self, request: agent_pb2.ExecSync) -> agent_pb2.Response:
        return agent_pb2.Response(exec_sync=await self.containers.exec_sync(request))

    async def _pod_stats(self, request: agent_pb2.GetPodStats) -> agent_pb2.Response:
        return agent_pb2.Response(pod_stats=self.containers.pod_stats())

    async def _shutdown(self, _: agent_pb2.Shutdown) -> None:
        """Stop every container and port; the caller then flushes, syncs and powers off (or exits)."""
        self.ports.close_all()
        await self.containers.remove_all()
        asyncio.get_running_loop().call_soon(self.stopped.set)


def _now(handler: Callable[[Any], None]) -> Callable[[Any], Awaitable[None]]:
    """An async handler for a synchronous one."""

    async def run(message: Any) -> None:
        handler(message)

    return run


async def serve_socket(agent: Agent, path: Path) -> asyncio.AbstractServer:
    """Listen on a unix socket instead of the port (tests; the host side runs unchanged against it)."""
    path.unlink(missing_ok=True)
    server = await asyncio.start_unix_server(lambda r, w: agent.serve(StreamLink(r, w)), str(path))
    os.chmod(path, 0o600)
    return server


async def serve_port(agent: Agent, path: Path) -> None:
    """Serve the virtio-serial port forever: it is opened once (exclusive) and outlives host connections."""
    fd = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        while True:
            first = await wait_for_host(fd)
            log.info("host connected")
            await agent.serve(PortLink(fd, first))
            log.info("host disconnected")
    finally:
        os.close(fd)
