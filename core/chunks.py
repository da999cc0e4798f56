"""A queue of byte chunks with an end: how a reader task hands a byte stream to its one consumer.

Bounded, so a slow consumer stops the reader and the sender feels it (TCP
push-back) instead of Tandem buffering without limit; with an end that the
producer can mark without waiting, even when the queue is full. Unbounded
(depth 0) only where the producer must never wait, and something upstream
bounds what it can produce.
"""

from __future__ import annotations

import asyncio
import contextlib


class ChunkQueue:
    def __init__(self, depth: int = 16) -> None:
        self._queue: asyncio.Queue[bytes] = asyncio.Queue(maxsize=depth)
        self.ended = False
        self.size = 0  # bytes queued: what a caller bounding the queue by bytes looks at

    async def put(self, data: bytes) -> None:
        """Queue `data`, waiting while the queue is full; empty chunks and chunks after the end are dropped."""
        if data and not self.ended:
            await self._queue.put(data)
            self.size += len(data)

    def put_nowait(self, data: bytes) -> None:
        """Queue `data` at once (`asyncio.QueueFull` if a bounded queue is full); as `put` otherwise."""
        if data and not self.ended:
            self._queue.put_nowait(data)
            self.size += len(data)

    def end(self) -> None:
        """No more data: the consumer gets what is queued, then b""."""
        if not self.ended:
            self.ended = True
            with contextlib.suppress(asyncio.QueueFull):  # wakes a waiting consumer; a full queue has none
                self._queue.put_nowait(b"")

    async def get(self) -> bytes:
        """The next chunk; b"" once the end is reached."""
        if self.ended and self._queue.empty():
            return b""
        data = await self._queue.get()
        self.size -= len(data)
        return data
