"""Flow control of a streaming exec's output: bytes go to the host only within the credit it granted.

The host grants credit as a byte offset (protos/agent.proto): the window it
named at StartExec, raised by ExecCredit as its client consumes. What a read
brings past the credit waits here (at most one read's worth) and the pipe is
not read again until more credit arrives, so a slow client holds the process
back through its full pipe, as a slow reader of a pipe would on any host.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable


class Gate:
    """One output stream's credit; `emit` sends a piece to the host."""

    def __init__(self, limit: int, emit: Callable[[bytes], None]) -> None:
        self.limit = limit
        self.sent = 0
        self.discarding = False
        self._emit = emit
        self._held = b""
        self._transport: asyncio.ReadTransport | None = None
        self._paused = False

    @property
    def waiting(self) -> bool:
        """Whether output is held back for want of credit (so the process may still be writing)."""
        return self._paused

    def attach(self, transport: asyncio.ReadTransport) -> None:
        """The reader of the pipe; reads that came before it was known are already accounted for."""
        self._transport = transport
        if self._paused:
            transport.pause_reading()

    def send(self, data: bytes) -> None:
        """A read from the pipe: emit what the credit allows, hold the rest and stop reading."""
        if self.discarding:
            return
        self._held += data
        self._flush()

    def grant(self, limit: int) -> None:
        """The host raised the credit (a lower offset than before changes nothing)."""
        if limit > self.limit:
            self.limit = limit
            self._flush()

    def discard(self) -> None:
        """The host wants no more: read on (the process must not block) and drop everything."""
        self.discarding = True
        self._held = b""
        self._resume()

    def _flush(self) -> None:
        room = self.limit - self.sent
        if self._held and room > 0:
            piece, self._held = self._held[:room], self._held[room:]
            self.sent += len(piece)
            self._emit(piece)
        if self._held or self.sent >= self.limit:
            if not self._paused:
                self._paused = True
                if self._transport is not None:
                    self._transport.pause_reading()
        else:
            self._resume()

    def _resume(self) -> None:
        if self._paused:
            self._paused = False
            if self._transport is not None and not self._transport.is_closing():
                self._transport.resume_reading()
