"""Container lifecycle events fanned out to every GetContainerEvents subscriber."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass

log = logging.getLogger("tandem.events")


@dataclass(frozen=True)
class ContainerEvent:
    container_id: str
    sandbox_id: str
    kind: str  # "created", "started", "stopped", "deleted"
    at: int


class EventHub:
    """Each subscriber gets its own bounded queue; a subscriber too slow to keep up is dropped, not waited for."""

    def __init__(self, queue_size: int = 1000) -> None:
        self._queue_size = queue_size
        self._subscribers: set[asyncio.Queue[ContainerEvent | None]] = set()

    def publish(self, event: ContainerEvent) -> None:
        for queue in list(self._subscribers):
            try:
                queue.put_nowait(event)
            except asyncio.QueueFull:
                log.warning("dropping a container-event subscriber that fell behind")
                self._subscribers.discard(queue)
                with contextlib.suppress(asyncio.QueueFull):
                    queue.put_nowait(None)

    def subscribe(self) -> Subscription:
        """Every event published from now on, until the subscription is closed (or falls behind)."""
        queue: asyncio.Queue[ContainerEvent | None] = asyncio.Queue(self._queue_size + 1)
        self._subscribers.add(queue)
        return Subscription(self._subscribers, queue)


class Subscription:
    """One subscriber's events, as an async iterator; registered from its creation on, so none is missed."""

    def __init__(
        self, subscribers: set[asyncio.Queue[ContainerEvent | None]], queue: asyncio.Queue[ContainerEvent | None]
    ) -> None:
        self._subscribers = subscribers
        self._queue = queue

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> ContainerEvent:
        event = await self._queue.get()
        if event is None:
            self.close()
            raise StopAsyncIteration
        return event

    def close(self) -> None:
        self._subscribers.discard(self._queue)
