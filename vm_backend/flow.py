"""The host's side of the agent channel's flow control: a window of credit per stream the guest sends on.

A streaming exec's stdout and stderr and a forwarded port's guest side each get
a window (`WINDOW` bytes). The host grants credit as a byte offset of the stream:
the window at first, moved on as the host's client consumes (`CreditedStream.read`),
so the agent stops reading the process's pipe or the guest's socket while the
client is slow. What the host buffers for a stream is at most the window: data
past the granted offset means the guest ignored its credit, and the caller closes
that stream (`receive` returns False) rather than buffer it.

Why `cat` of 100 MiB cannot deadlock (stdin and stdout streaming at once, the
client slow): the host's WriteStdin waits for the agent, which waits for cat to
read its stdin, which waits for room in its stdout pipe, which the agent does
not read without credit. Credit comes from the host's client reading stdout, a
task of its own that never waits for stdin; it travels as its own request,
which the agent handles as its own task, never behind the WriteStdin; and when
the host's event intake is full and it stops reading the socket (answers
included), the event callback, which waits on nothing, empties it again. Each
wait ends when its consumer moves on, and no consumer waits on its producer
(`tests/integration/test_agent.py` runs it, with the reader stalling).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from core.chunks import ChunkQueue
from core.errors import TandemError, Unavailable

log = logging.getLogger("tandem.vm")

WINDOW = 256 * 1024
"""Bytes a stream may have in flight: under TCG a window this size moves ~100 MiB through `cat` in well under a
minute, and a host with a hundred idle-but-slow clients holds at most 25 MiB for them."""


class CreditedStream:
    """Bytes from the guest waiting for one reader, never more than the credit granted for them."""

    def __init__(self, grant: Callable[[], None], window: int = WINDOW) -> None:
        self.window = window
        self.limit = window  # the offset granted so far (the first window goes with the request that opens)
        self.received = 0
        self._queue = ChunkQueue(0)
        self._consumed = 0
        self._grant = grant

    @property
    def buffered(self) -> int:
        """Bytes received and not yet read: at most the window."""
        return self._queue.size

    @property
    def ended(self) -> bool:
        return self._queue.ended

    def receive(self, data: bytes) -> bool:
        """Queue what the guest sent; False (and nothing queued) if it goes past the credit."""
        if self.received + len(data) > self.limit:
            return False
        self.received += len(data)
        self._queue.put_nowait(data)
        return True

    def end(self) -> None:
        self._queue.end()

    async def read(self) -> bytes:
        """The next chunk (b"" at the end); once half a window was read, the credit moves on."""
        data = await self._queue.get()
        self._consumed += len(data)
        if data and not self._queue.ended and self._consumed + self.window - self.limit >= self.window // 2:
            self.limit = self._consumed + self.window
            self._grant()
        return data


class CreditSender:
    """Sends a stream's latest credit to the agent, one request at a time, however often it is woken.

    Credit is an offset, so a request sent twice is harmless: one lost with a
    dropped connection is sent again once the client is connected anew.
    """

    def __init__(self, send: Callable[[], Awaitable[None]], closed: Callable[[], bool]) -> None:
        self._send = send
        self._closed = closed
        self._task: asyncio.Task[None] | None = None
        self._again = False

    def wake(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run())
        else:
            self._again = True

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()

    async def _run(self) -> None:
        while True:
            self._again = False
            try:
                await self._send()
            except Unavailable:
                if self._closed():
                    return
                self._again = True  # the connection dropped: the next one gets it
            except TandemError as e:  # the stream is gone on the agent's side: nothing left to credit
                log.debug("credit not granted: %s", e)
                return
            if not self._again:
                return
