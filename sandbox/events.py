"""Container lifecycle events fanned out to every GetContainerEvents subscriber."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
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

    async def subscribe(self) -> AsyncIterator[ContainerEvent]:
        queue: asyncio.Queue[ContainerEvent | None] = asyncio.Queue(self._queue_size + 1)
        self._subscribers.add(queue)
        try:
            while (event := await queue.get()) is not None:
                yield event
        finally:
            self._subscribers.discard(queue)
