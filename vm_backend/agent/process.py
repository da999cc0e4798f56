"""A process the agent runs in a container (its init, or an exec), from the moment the runtime reported it
started: its pid and exit, the agent's ends of its stdio, and the flow control of a streaming exec's output."""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass, field

from .flow import Gate

EXIT_DRAIN_GRACE = 2.0
"""Seconds output may still arrive after a process exited (not counting time spent waiting for the host's
credit); then whoever still holds its stdout loses it."""


@dataclass(eq=False)
class Process:
    """A container's init or an exec, from the moment the runtime reported it started."""

    container_id: str
    process_id: str
    pid: int
    exited: asyncio.Future[int]
    pipes: frozenset[str]  # its output pipes as /proc names, to find who holds them
    readers: list[tuple[asyncio.ReadTransport, asyncio.Future[None]]] = field(default_factory=list)
    transports: dict[int, asyncio.ReadTransport] = field(default_factory=dict)  # the readers, by OutputStream
    stdin_fd: int | None = None  # our end of its stdin (a pipe, or a dup of the pty master)
    console_fd: int | None = None  # a dup of the pty master, for resizing
    stdin_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    monitor: asyncio.Task[None] | None = None
    gates: dict[int, Gate] = field(default_factory=dict)  # a streaming exec's, by OutputStream

    async def drain(self) -> None:
        """Wait for EOF on its output, then stop reading: EXIT_DRAIN_GRACE at most, but without limit while
        output waits for the host's credit (the host reads it all, or discards it, or goes)."""
        eofs = [eof for _, eof in self.readers]
        while eofs:
            _, pending = await asyncio.wait(eofs, timeout=EXIT_DRAIN_GRACE)
            if not pending or not any(gate.waiting for gate in self.gates.values()):
                break
        for transport, _ in self.readers:
            transport.close()

    def abandon(self) -> None:
        """Its host is gone: stdin closed, output read and dropped, as when a host's pipes close."""
        for gate in self.gates.values():
            gate.discard()
        if self.stdin_fd is not None and self.stdin_fd != self.console_fd:
            os.close(self.stdin_fd)
        self.stdin_fd = None

    def close(self) -> None:
        for transport, _ in self.readers:
            transport.close()
        for fd in {self.stdin_fd, self.console_fd}:
            if fd is not None:
                os.close(fd)
        self.stdin_fd = self.console_fd = None
