"""A queue of byte chunks with an end: how a reader task hands a byte stream to its one consumer.

Bounded, so a slow consumer stops the reader and the sender feels it (TCP
push-back) instead of Tandem buffering without limit; with an end that the
producer can mark without waiting, even when the queue is full. Unbounded
(depth 0) only where the producer must never wait, and something upstream
bounds what it can produce (in bytes: `size`).

Chunks below `MERGE_BELOW` are merged into the last queued one while it is
small too: what a byte count bounds then costs about those bytes in memory,
however finely a sender (a hostile guest) cuts its stream. Chunk boundaries
carry no meaning here: every user reads a byte stream.
"""

from __future__ import annotations

import asyncio
import collections

MERGE_BELOW = 4096


class ChunkQueue:
    def __init__(self, depth: int = 16) -> None:
        self._depth = depth  # in chunks; 0: unbounded
        self._chunks: collections.deque[bytes | bytearray] = collections.deque()
        self._getters: list[asyncio.Future[None]] = []
        self._putters: list[asyncio.Future[None]] = []
        self.ended = False
        self.size = 0  # bytes queued: what a caller bounding the queue by bytes looks at

    def _full(self) -> bool:
        return bool(self._depth) and len(self._chunks) >= self._depth

    @staticmethod
    def _wake(waiters: list[asyncio.Future[None]]) -> None:
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)
        waiters.clear()

    async def _wait(self, waiters: list[asyncio.Future[None]]) -> None:
        waiter = asyncio.get_running_loop().create_future()
        waiters.append(waiter)
        try:
            await waiter
        finally:
            if waiter in waiters:
                waiters.remove(waiter)

    async def put(self, data: bytes) -> None:
        """Queue `data`, waiting while the queue is full; empty chunks and chunks after the end are dropped."""
        while self._full() and not self.ended and not self._mergeable(data):
            await self._wait(self._putters)
        self.put_nowait(data)

    def _mergeable(self, data: bytes) -> bool:
        return bool(self._chunks) and len(data) < MERGE_BELOW and len(self._chunks[-1]) < MERGE_BELOW

    def put_nowait(self, data: bytes) -> None:
        """Queue `data` at once (`asyncio.QueueFull` if a bounded queue is full); as `put` otherwise."""
        if not data or self.ended:
            return
        if self._mergeable(data):
            last = self._chunks[-1]
            if not isinstance(last, bytearray):
                last = self._chunks[-1] = bytearray(last)
            last += data
        elif self._full():
            raise asyncio.QueueFull
        else:
            self._chunks.append(data)
        self.size += len(data)
        self._wake(self._getters)

    def end(self) -> None:
        """No more data: the consumer gets what is queued, then b""; a producer waiting for room is let go."""
        self.ended = True
        self._wake(self._getters)
        self._wake(self._putters)

    async def get(self) -> bytes:
        """The next chunk; b"" once the end is reached."""
        while not self._chunks:
            if self.ended:
                return b""
            await self._wait(self._getters)
        data = self._chunks.popleft()
        self.size -= len(data)
        self._wake(self._putters)
        return bytes(data)
