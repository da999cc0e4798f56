"""The agent's event log: every event is numbered and kept until the host acks it.

The host may be away (restarting) or slow, and containers must never block on a
full stdout pipe because of it, so a container's output is bounded: past `limit`
bytes the oldest of it gives way to one marker line per container saying how
many bytes were lost. Exits are never dropped; a streaming exec's output and port
data are bounded by the host's credit instead, and port streams, which cannot lose
data, also wait for room (`wait_for_room`).
"""

from __future__ import annotations

import asyncio
import bisect
from collections.abc import Callable
from dataclasses import dataclass

from protos import agent_pb2

from .framing import encode

OUTPUT_LIMIT = 16 * 2**20
_OVERHEAD = 64  # bytes charged per event on top of its frame, so that tiny events count too


@dataclass(slots=True)
class Entry:
    seq: int
    frame: bytes  # the encoded Frame, ready for the wire
    size: int  # what it counts against the limit
    source: tuple[str, str] | None = None  # (container_id, "") of a container's output event, which may be dropped
    lost: int = 0  # output bytes that dropping this entry loses: its data, or a marker's count
    timestamp: int = 0


def _seq(entry: Entry) -> int:
    return entry.seq


def _marker(last: Entry, lost: int) -> Entry:
    """An output line standing in for dropped output; it takes the seq of the last event it replaces."""
    assert last.source is not None
    container_id, process_id = last.source
    text = f"[tandem agent: output buffer full, {lost} bytes of output dropped]\n"
    output = agent_pb2.Output(
        container_id=container_id,
        process_id=process_id,
        stream=agent_pb2.STDERR,
        data=text.encode(),
        timestamp_unix_ns=last.timestamp,
    )
    frame = encode(agent_pb2.Frame(event=agent_pb2.Event(seq=last.seq, output=output)))
    return Entry(last.seq, frame, len(frame) + _OVERHEAD, last.source, lost, last.timestamp)


class EventLog:
    """Unacked events in seq order; `on_append` is told of every new one (the connection's writer)."""

    def __init__(self, limit: int = OUTPUT_LIMIT) -> None:
        self.limit = limit
        self.size = 0
        self.on_append: Callable[[], None] | None = None
        self._entries: list[Entry] = []
        self._next_seq = 1
        self._room = asyncio.Event()

    def append(self, event: agent_pb2.Event) -> int:
        """Number `event`, keep it until acked, and return its seq."""
        event.seq = seq = self._next_seq
        self._next_seq += 1
        frame = encode(agent_pb2.Frame(event=event))
        entry = Entry(seq, frame, len(frame) + _OVERHEAD)
        if event.WhichOneof("kind") == "output" and not event.output.process_id:
            output = event.output
            entry.source = (output.container_id, output.process_id)
            entry.lost, entry.timestamp = len(output.data), output.timestamp_unix_ns
        self._entries.append(entry)
        self.size += entry.size
        if self.size > self.limit:
            self._trim()
        if self.on_append is not None:
            self.on_append()
        return seq

    def ack(self, seq: int) -> None:
        """The host has handled every event up to `seq`: forget them."""
        end = bisect.bisect_right(self._entries, seq, key=_seq)
        if end:
            self.size -= sum(e.size for e in self._entries[:end])
            del self._entries[:end]
            if self.size <= self.limit // 2:
                self._room.set()

    def first_from(self, seq: int) -> Entry | None:
        """The oldest kept event numbered `seq` or later."""
        i = bisect.bisect_left(self._entries, seq, key=_seq)
        return self._entries[i] if i < len(self._entries) else None

    def __len__(self) -> int:
        return len(self._entries)

    async def wait_for_room(self) -> None:
        """Return once the log is at most half full: for producers that must not lose data."""
        while self.size > self.limit // 2:
            self._room.clear()
            await self._room.wait()

    def _trim(self) -> None:
        """Drop the oldest output down to 3/4 of the limit (so trimming stays rare), leaving markers behind."""
        target = self.limit * 3 // 4
        entries = self._entries
        kept: list[Entry] = []
        lost: dict[tuple[str, str], int] = {}
        last: dict[tuple[str, str], Entry] = {}
        i = 0
        while i < len(entries) and self.size > target:
            entry = entries[i]
            i += 1
            if entry.source is None:
                kept.append(entry)
                continue
            self.size -= entry.size
            lost[entry.source] = lost.get(entry.source, 0) + entry.lost
            last[entry.source] = entry
        markers = [_marker(last[source], lost[source]) for source in last]
        self.size += sum(m.size for m in markers)
        self._entries = sorted(kept + markers, key=_seq) + entries[i:]
