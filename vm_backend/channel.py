"""The host's end of the agent channel (protos/agent.proto): one `AgentClient` per pod VM.

It connects to the unix socket of QEMU's chardev behind the VM's virtio-serial
port (or to an agent run with `--socket`), greets the agent with Hello, matches
responses to requests by id, and hands events to a callback one at a time in
seq order, acking them (in batches) once the callback returned. When the socket
drops it reconnects with backoff; the agent then resends every unacked event
and the ones this client already delivered are skipped, so within one client
each event reaches the callback once. A new client (a daemon restart) gets
every event not acked before again: at least once, as the contract says.

On virtio-serial a dropped connection can leave part of a frame in flight;
a Hello unanswered within `hello_timeout` makes the client reconnect, and the
agent starts over with a clean stream when it sees the host go away.

Everything the agent sends is hostile input with bounded cost: a frame is at
most 4 MiB (refused from its length, before it is read), a response text is cut
(`guest_text`), an ExecSync's output is checked against the agent's own limit,
and events wait for the callback in a bounded intake (`INTAKE_EVENTS`,
`INTAKE_BYTES`): while it is full this client stops reading the socket, so a
flood backs up into QEMU and the guest. The callback may be a coroutine, but it
must never wait for the agent: the answer would come through the socket that is
not read while the intake is full.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import inspect
import itertools
import json
import logging
import os
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core import errors
from core.files import socket_nofollow
from protos import agent_pb2
from vm_backend.agent.framing import EXEC_OUTPUT_LIMIT, Decoder, FramingError, encode

log = logging.getLogger("tandem.vm.channel")

CALL_TIMEOUT = 60.0
CREATE_TIMEOUT = 300.0  # crun create in a TCG guest takes half a second, more under load; the agent allows 240
EXEC_MARGIN = 30.0  # on top of an exec's own timeout: crun exec and the round trip
HELLO_TIMEOUT = 10.0
ACK_DELAY = 0.02  # seconds to gather events into one ack
WRITE_CHUNK = 1 * 2**20  # stdin and port data are sent in pieces well below the frame limit
_BACKOFF_MIN, _BACKOFF_MAX = 0.05, 2.0
_STEADY = 10.0  # seconds a connection must last for the next one to be made without backoff
_READ = 256 * 1024
MAX_GUEST_TEXT = 1024  # characters of guest-written text that may reach a status message or a log line
INTAKE_EVENTS = 1024  # events read and not yet delivered, at most...
INTAKE_BYTES = 4 * 2**20  # ...and their encoded bytes (one event of any size always fits)

EventCallback = Callable[[agent_pb2.Event], Awaitable[None] | None]


class AgentError(errors.Internal):
    """The agent failed internally (code INTERNAL, or one this host does not know)."""


_ERRORS: dict[int, type[errors.TandemError]] = {
    agent_pb2.INVALID_ARGUMENT: errors.InvalidArgument,
    agent_pb2.NOT_FOUND: errors.NotFound,
    agent_pb2.ALREADY_EXISTS: errors.AlreadyExists,
    agent_pb2.FAILED_PRECONDITION: errors.FailedPrecondition,
    agent_pb2.DEADLINE_EXCEEDED: errors.DeadlineExceeded,
}


def guest_text(text: str, limit: int = MAX_GUEST_TEXT) -> str:
    """Text the guest wrote, made safe to show: control and other unprintable characters escaped (no
    terminal escapes or forged lines in a log or a kubectl event), then cut to `limit` characters."""
    shown = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text[: limit + 1])
    if len(text) <= limit and len(shown) <= limit:
        return shown
    return f"{shown[:limit]}... (cut; {len(text)} characters in all)"


def error_for(response: agent_pb2.Response) -> errors.TandemError:
    """The domain error a failed Response stands for, its text bounded: it ends up in a gRPC status."""
    return _ERRORS.get(response.code, AgentError)(f"agent: {guest_text(response.error)}")


class _Intake:
    """Events read from the socket and not yet delivered, in order: bounded in count and bytes."""

    def __init__(self, max_events: int, max_bytes: int) -> None:
        self.max_events, self.max_bytes = max_events, max_bytes
        self.bytes = 0
        self.peak_bytes = 0  # the most it ever held (shown in a VM pod's verbose info)
        self._items: collections.deque[tuple[int, agent_pb2.Event, int]] = collections.deque()
        self._changed = asyncio.Event()

    def __len__(self) -> int:
        return len(self._items)

    async def put(self, generation: int, event: agent_pb2.Event, size: int) -> None:
        """Queue an event, first waiting while the intake is full."""
        while self._items and (len(self._items) >= self.max_events or self.bytes + size > self.max_bytes):
            self._changed.clear()
            await self._changed.wait()
        self._items.append((generation, event, size))
        self.bytes += size
        self.peak_bytes = max(self.peak_bytes, self.bytes)
        self._changed.set()

    async def get(self) -> tuple[int, agent_pb2.Event]:
        while not self._items:
            self._changed.clear()
            await self._changed.wait()
        generation, event, size = self._items.popleft()
        self.bytes -= size
        self._changed.set()
        return generation, event


@dataclass(eq=False)
class _Connection:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    pending: dict[int, asyncio.Future[agent_pb2.Response]] = field(default_factory=dict)
    hello_id: int = 0
    greeted: bool = False
    generation: int = 0  # which agent incarnation answered the Hello
    acked: int = 0  # highest seq acked on this connection
    closed: bool = False
    reading: asyncio.Task[None] | None = None


class AgentClient:
    """A connection to one agent that survives drops; requests wait for it to be up."""

    def __init__(
        self,
        socket_path: str | Path,
        on_event: EventCallback,
        *,
        host_version: str = "tandem",
        hello_timeout: float = HELLO_TIMEOUT,
        ack_delay: float = ACK_DELAY,
    ) -> None:
        self.socket_path = str(socket_path)
        self.hello: agent_pb2.HelloResult | None = None
        self._on_event = on_event
        self._host_version = host_version
        self._hello_timeout = hello_timeout
        self._ack_delay = ack_delay
        self._ids = itertools.count(1)
        self._conn: _Connection | None = None
        self._connected = asyncio.Event()
        self._closed = False
        self._host_instance = os.urandom(8).hex()  # the agent abandons the streaming execs of another
        self.intake = _Intake(INTAKE_EVENTS, INTAKE_BYTES)
        self._instance: str | None = None
        self._generation = 0
        self._delivered = 0  # highest seq handed to the callback, in `_delivered_generation`
        self._delivered_generation = 0
        self._ack_wanted = asyncio.Event()
        self._running: asyncio.Task[None] | None = None
        self._delivering: asyncio.Task[None] | None = None
        self._acking: asyncio.Task[None] | None = None

    # ------------------------------------------------------------------ lifecycle

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def connected(self) -> bool:
        return self._conn is not None

    def open(self) -> None:
        """Start connecting (and reconnecting, with backoff, for as long as the client is open), without waiting."""
        if self._running is None:
            self._running = asyncio.create_task(self._run())
            self._delivering = asyncio.create_task(self._deliver())
            self._acking = asyncio.create_task(self._ack_loop())

    async def wait_connected(self, timeout: float) -> None:
        """Wait until the agent answered a Hello; Unavailable after `timeout` (the client goes on trying)."""
        try:
            async with asyncio.timeout(timeout):
                await self._connection()
        except TimeoutError:
            raise errors.Unavailable(f"no agent answered on {self.socket_path} within {timeout:g}s") from None

    async def start(self, timeout: float = 60.0) -> agent_pb2.HelloResult:
        """Connect (retrying until `timeout`: the VM may still be booting) and return the agent's Hello."""
        self.open()
        try:
            await self.wait_connected(timeout)
        except errors.Unavailable:
            await self.close()
            raise
        assert self.hello is not None
        return self.hello

    async def close(self, flush_timeout: float = 2.0) -> None:
        """Stop delivering, ack what the callback handled, disconnect; pending calls fail with Unavailable."""
        if self._closed:
            return
        self._closed = True
        if self._delivering is not None:
            self._delivering.cancel()
            await asyncio.gather(self._delivering, return_exceptions=True)
        conn = self._conn
        if conn is not None and self._ackable(conn) > conn.acked:
            with contextlib.suppress(errors.TandemError, TimeoutError):
                await asyncio.wait_for(self._send(conn, self._ack_request(conn)), flush_timeout)
        tasks = [t for t in (self._running, self._acking) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if conn is not None:
            self._drop(conn)
        self._connected.set()  # wake callers waiting for a connection: they see the client closed

    # ------------------------------------------------------------------ requests

    async def call(self, request: agent_pb2.Request, timeout: float | None = CALL_TIMEOUT) -> agent_pb2.Response:
        """Send `request` (waiting for a connection if there is none) and return its successful Response.

        A failed Response raises the matching `core.errors` exception. A lost
        connection raises Unavailable: the agent may or may not have acted.
        """
        kind = request.WhichOneof("kind")
        try:
            async with asyncio.timeout(timeout):
                response = await self._send(await self._connection(), request)
        except TimeoutError:
            raise errors.DeadlineExceeded(f"the agent did not answer {kind} within {timeout:g}s") from None
        if response.code != agent_pb2.OK:
            raise error_for(response)
        return response

    async def _connection(self) -> _Connection:
        while self._conn is None:
            if self._closed:
                raise errors.Unavailable("the agent client is closed")
            await self._connected.wait()
        return self._conn

    async def _send(self, conn: _Connection, request: agent_pb2.Request) -> agent_pb2.Response:
        if conn.closed:
            raise errors.Unavailable("lost the connection to the agent")
        request_id = next(self._ids)
        try:
            data = encode(agent_pb2.Frame(id=request_id, request=request))
        except FramingError as e:
            raise errors.InvalidArgument(str(e)) from None
        future: asyncio.Future[agent_pb2.Response] = asyncio.get_running_loop().create_future()
        conn.pending[request_id] = future
        if request.HasField("hello"):
            conn.hello_id = request_id
        try:
            conn.writer.write(data)
            await conn.writer.drain()
            return await future
        except OSError as e:
            raise errors.Unavailable(f"lost the connection to the agent: {e}") from None
        finally:
            conn.pending.pop(request_id, None)

    # ------------------------------------------------------------------ connection

    async def _run(self) -> None:
        """Connect, serve the connection until it drops, reconnect with backoff; forever."""
        delay = _BACKOFF_MIN
        while True:
            try:
                conn = await self._connect()
            except (OSError, TimeoutError, errors.TandemError) as e:
                log.debug("agent at %s not reachable: %s", self.socket_path, e)
                await asyncio.sleep(delay)
                delay = min(delay * 2, _BACKOFF_MAX)
                continue
            began = time.monotonic()
            assert conn.reading is not None
            await conn.reading
            if time.monotonic() - began >= _STEADY:
                delay = _BACKOFF_MIN
            else:  # greeted, then dropped at once (garbage after the Hello, say): no reconnection storm
                await asyncio.sleep(delay)
                delay = min(delay * 2, _BACKOFF_MAX)

    async def _connect(self) -> _Connection:
        with socket_nofollow(Path(self.socket_path)) as path:  # a jailed QEMU owns the socket's directory
            reader, writer = await asyncio.open_unix_connection(path)
        conn = _Connection(reader, writer)
        conn.reading = asyncio.create_task(self._read(conn))
        try:
            hello = agent_pb2.Request(
                hello=agent_pb2.Hello(host_version=self._host_version, host_instance=self._host_instance)
            )
            # asyncio.timeout, not wait_for, in these loops: Python 3.11's wait_for returns the result
            # when a cancellation races it (gh-86296), and a loop that swallows close()'s cancel runs on.
            async with asyncio.timeout(self._hello_timeout):
                await self._send(conn, hello)
        except BaseException:
            self._drop(conn)
            raise
        if conn.closed:  # dropped right after answering
            raise errors.Unavailable("lost the connection to the agent")
        self._conn = conn
        self._connected.set()
        self._ack_wanted.set()  # re-ack what was delivered: the last ack may have been lost with the old connection
        log.debug("connected to agent %s at %s", guest_text(self._instance or "", 64), self.socket_path)
        return conn

    def _drop(self, conn: _Connection) -> None:
        conn.closed = True
        if self._conn is conn:
            self._conn = None
            self._connected.clear()
        if conn.reading is not None and conn.reading is not asyncio.current_task():
            conn.reading.cancel()
        for future in conn.pending.values():
            if not future.done():
                future.set_exception(errors.Unavailable("lost the connection to the agent"))
        conn.writer.close()

    async def _read(self, conn: _Connection) -> None:
        """Handle frames until the connection ends, then drop it (which fails its pending calls)."""
        decoder = Decoder()
        try:
            while data := await conn.reader.read(_READ):
                for frame in decoder.feed(data):
                    if (event := self._on_frame(conn, frame)) is not None:
                        await self.intake.put(conn.generation, event, frame.ByteSize())
            log.info("the agent at %s closed the connection", self.socket_path)
        except (OSError, FramingError) as e:
            log.warning("connection to the agent at %s failed: %s", self.socket_path, e)
        finally:
            self._drop(conn)

    def _on_frame(self, conn: _Connection, frame: agent_pb2.Frame) -> agent_pb2.Event | None:
        """Settle a response; return an event to deliver."""
        body = frame.WhichOneof("body")
        if body == "response":
            if frame.id == conn.hello_id and frame.response.code == agent_pb2.OK:
                self._greeted(conn, frame.response.hello)
            future = conn.pending.get(frame.id)
            if future is not None and not future.done():
                future.set_result(frame.response)
        elif body == "event":
            if conn.greeted:  # anything before the Hello answer is a leftover of an older stream
                return frame.event
        else:
            raise FramingError(f"the agent sent a {body} frame")
        return None

    def _greeted(self, conn: _Connection, hello: agent_pb2.HelloResult) -> None:
        """Runs before any event that follows the Hello answer is queued, so those get the right generation."""
        if self._instance is not None and hello.instance_id != self._instance:
            log.warning("the agent at %s restarted: its event numbering starts over", self.socket_path)
            self._generation += 1
        self._instance = hello.instance_id
        self.hello = hello
        conn.generation = self._generation
        conn.greeted = True

    # ------------------------------------------------------------------ events

    async def _deliver(self) -> None:
        while True:
            generation, event = await self.intake.get()
            if generation != self._delivered_generation:
                self._delivered_generation, self._delivered = generation, 0
            if event.seq > self._delivered:
                try:
                    result = self._on_event(event)
                    if inspect.isawaitable(result):
                        await result
                except Exception:  # a failing event must not block every later one: log it and go on
                    log.exception("event callback failed on event %d", event.seq)
                self._delivered = event.seq
            self._ack_wanted.set()

    def _ackable(self, conn: _Connection) -> int:
        """The seq this connection's agent may forget up to."""
        return self._delivered if self._delivered_generation == conn.generation else 0

    def _ack_request(self, conn: _Connection) -> agent_pb2.Request:
        return agent_pb2.Request(ack=agent_pb2.Ack(seq=self._ackable(conn)))

    async def _ack_loop(self) -> None:
        while True:
            await self._ack_wanted.wait()
            await asyncio.sleep(self._ack_delay)
            self._ack_wanted.clear()
            conn = self._conn
            if conn is None or (seq := self._ackable(conn)) <= conn.acked:
                continue
            try:
                async with asyncio.timeout(CALL_TIMEOUT):  # not wait_for: see _connect
                    await self._send(conn, self._ack_request(conn))
            except (errors.TandemError, TimeoutError) as e:
                log.debug("ack %d not delivered (the next connection acks again): %s", seq, e)
                continue
            conn.acked = max(conn.acked, seq)

    # ------------------------------------------------------------------ typed requests

    async def setup_pod(self, setup: agent_pb2.SetupPod) -> None:
        await self.call(agent_pb2.Request(setup_pod=setup))

    async def create_container(
        self,
        container_id: str,
        spec: Mapping[str, Any],
        rootfs: str,
        *,
        terminal: bool = False,
        stdin: bool = False,
        stdin_once: bool = False,
    ) -> None:
        """Create (not start) a container from an OCI spec with guest paths; `rootfs` is relative to the share."""
        create = agent_pb2.CreateContainer(
            container_id=container_id,
            oci_spec_json=json.dumps(spec).encode(),
            rootfs=rootfs,
            terminal=terminal,
            stdin=stdin,
            stdin_once=stdin_once,
        )
        await self.call(agent_pb2.Request(create_container=create), timeout=CREATE_TIMEOUT)

    async def start_container(self, container_id: str) -> None:
        await self.call(agent_pb2.Request(start_container=agent_pb2.StartContainer(container_id=container_id)))

    async def signal(
        self, container_id: str, signal: int, *, process_id: str = "", all_processes: bool = False
    ) -> None:
        message = agent_pb2.SignalProcess(
            container_id=container_id, process_id=process_id, signal=int(signal), all_processes=all_processes
        )
        await self.call(agent_pb2.Request(signal_process=message))

    async def remove_container(self, container_id: str) -> None:
        """Kill if running and forget; removing an unknown container succeeds."""
        await self.call(agent_pb2.Request(remove_container=agent_pb2.RemoveContainer(container_id=container_id)))

    async def exec_sync(
        self, container_id: str, process: Mapping[str, Any], timeout: float
    ) -> agent_pb2.ExecSyncResult:
        """Run an OCI process object to completion (`timeout` <= 0: none); past it, DeadlineExceeded."""
        message = agent_pb2.ExecSync(
            container_id=container_id,
            process_json=json.dumps(process).encode(),
            timeout_ms=max(int(timeout * 1000), 0),
        )
        response = await self.call(
            agent_pb2.Request(exec_sync=message), timeout=timeout + EXEC_MARGIN if timeout > 0 else None
        )
        result = response.exec_sync
        if max(len(result.stdout), len(result.stderr)) > EXEC_OUTPUT_LIMIT:
            raise AgentError(f"the agent sent more ExecSync output than its limit of {EXEC_OUTPUT_LIMIT} bytes")
        return result

    async def start_exec(
        self,
        container_id: str,
        exec_id: str,
        process: Mapping[str, Any],
        *,
        terminal: bool = False,
        stdin: bool = False,
        window: int,
    ) -> None:
        """Start a streaming exec: Output events and then ProcessExited follow, with process_id = exec_id; at
        most `window` bytes of each of stdout and stderr until `exec_credit` grants more."""
        message = agent_pb2.StartExec(
            container_id=container_id,
            exec_id=exec_id,
            process_json=json.dumps(process).encode(),
            terminal=terminal,
            stdin=stdin,
            window=window,
        )
        await self.call(agent_pb2.Request(start_exec=message))

    async def exec_credit(
        self, container_id: str, exec_id: str, stdout_limit: int, stderr_limit: int, *, discard: bool = False
    ) -> None:
        """Let a streaming exec send output up to these offsets of each stream (or none, and read on: `discard`)."""
        message = agent_pb2.ExecCredit(
            container_id=container_id,
            exec_id=exec_id,
            stdout_limit=stdout_limit,
            stderr_limit=stderr_limit,
            discard=discard,
        )
        await self.call(agent_pb2.Request(exec_credit=message))

    async def write_stdin(self, container_id: str, process_id: str, data: bytes, *, close: bool = False) -> None:
        """Write to a process's stdin (process_id "" is the container's), in frame-sized pieces; then maybe close it."""
        pieces = [data[i : i + WRITE_CHUNK] for i in range(0, len(data), WRITE_CHUNK)] or [b""]
        for i, piece in enumerate(pieces):
            message = agent_pb2.WriteStdin(
                container_id=container_id, process_id=process_id, data=piece, close=close and i == len(pieces) - 1
            )
            await self.call(agent_pb2.Request(write_stdin=message))

    async def resize_terminal(self, container_id: str, process_id: str, width: int, height: int) -> None:
        message = agent_pb2.ResizeTerminal(container_id=container_id, process_id=process_id, width=width, height=height)
        await self.call(agent_pb2.Request(resize_terminal=message))

    async def pod_stats(self, timeout: float) -> dict[str, agent_pb2.Stats]:
        """Every container's usage in one round trip, by container id; DeadlineExceeded past `timeout`."""
        response = await self.call(agent_pb2.Request(get_pod_stats=agent_pb2.GetPodStats()), timeout=timeout)
        return dict(response.pod_stats.containers)

    async def update_resources(self, container_id: str, resources: Mapping[str, Any]) -> None:
        """Apply an OCI linux.resources object to a running container."""
        message = agent_pb2.UpdateResources(container_id=container_id, resources_json=json.dumps(resources).encode())
        await self.call(agent_pb2.Request(update_resources=message))

    async def open_port(self, stream_id: str, port: int, *, window: int) -> None:
        """Connect to 127.0.0.1:`port` in the guest; data comes back as PortData events (at most `window` bytes
        until `port_credit` grants more), the end as PortClosed."""
        message = agent_pb2.OpenPort(stream_id=stream_id, port=port, window=window)
        await self.call(agent_pb2.Request(open_port=message))

    async def write_port(self, stream_id: str, data: bytes, *, eof: bool = False) -> None:
        """Send `data` to the guest side, in frame-sized pieces; with `eof`, then end this direction."""
        pieces = [data[i : i + WRITE_CHUNK] for i in range(0, len(data), WRITE_CHUNK)] or [b""]
        for i, piece in enumerate(pieces):
            message = agent_pb2.WritePort(stream_id=stream_id, data=piece, eof=eof and i == len(pieces) - 1)
            await self.call(agent_pb2.Request(write_port=message))

    async def port_credit(self, stream_id: str, limit: int) -> None:
        """Let the guest side of a port stream send up to `limit` bytes in all."""
        await self.call(agent_pb2.Request(port_credit=agent_pb2.PortCredit(stream_id=stream_id, limit=limit)))

    async def close_port(self, stream_id: str) -> None:
        await self.call(agent_pb2.Request(close_port=agent_pb2.ClosePort(stream_id=stream_id)))

    async def shutdown(self) -> None:
        """Stop every container; then the agent powers the VM off (or, not being PID 1, exits)."""
        await self.call(agent_pb2.Request(shutdown=agent_pb2.Shutdown()))
