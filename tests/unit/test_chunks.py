import asyncio
import sys

import pytest

from core.chunks import ChunkQueue


def held_bytes(queue: ChunkQueue) -> int:
    """What the queue's chunks cost in memory, object headers included."""
    return sum(sys.getsizeof(chunk) for chunk in queue._chunks)


def test_tiny_chunks_cost_about_what_they_carry():
    """A guest that sends 2-byte chunks must not multiply what a byte-counted bound allows (20x before)."""
    queue = ChunkQueue(0)
    for _ in range(2**17):
        queue.put_nowait(b"ab")
    assert queue.size == 2**18
    assert held_bytes(queue) < 1.1 * queue.size


async def test_what_goes_in_comes_out_in_order_then_the_end():
    queue = ChunkQueue(0)
    sent = [b"x" * n for n in (1, 5000, 3, 3, 9000, 1)]
    for chunk in sent:
        queue.put_nowait(chunk)
    queue.end()
    queue.put_nowait(b"late")  # after the end: dropped
    received = b""
    while chunk := await queue.get():
        received += chunk
    assert received == b"".join(sent) and queue.size == 0
    assert await queue.get() == b""


async def test_a_bounded_queue_makes_the_producer_wait_and_the_end_releases_it():
    queue = ChunkQueue(2)
    big = b"y" * 8192  # chunks too big to be merged
    await queue.put(big)
    await queue.put(big)
    with pytest.raises(asyncio.QueueFull):
        queue.put_nowait(big)
    waiting = asyncio.create_task(queue.put(big))
    await asyncio.sleep(0)
    assert not waiting.done()
    assert await queue.get() == big
    await asyncio.wait_for(waiting, 5)
    blocked = asyncio.create_task(queue.put(big))
    await asyncio.sleep(0)
    queue.end()
    await asyncio.wait_for(blocked, 5)  # released; its chunk dropped
    assert [await queue.get(), await queue.get(), await queue.get()] == [big, big, b""]


async def test_a_waiting_consumer_is_woken_by_data_and_by_the_end():
    queue = ChunkQueue()
    getter = asyncio.create_task(queue.get())
    await asyncio.sleep(0)
    queue.put_nowait(b"hi")
    assert await asyncio.wait_for(getter, 5) == b"hi"
    getter = asyncio.create_task(queue.get())
    await asyncio.sleep(0)
    queue.end()
    assert await asyncio.wait_for(getter, 5) == b""


async def test_a_cancelled_consumer_leaves_the_queue_usable():
    queue = ChunkQueue()
    getter = asyncio.create_task(queue.get())
    await asyncio.sleep(0)
    getter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await getter
    queue.put_nowait(b"still")
    assert await queue.get() == b"still"
