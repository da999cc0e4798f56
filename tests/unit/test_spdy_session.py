"""SPDY/3.1 sessions against a scripted peer: streams both ways, flow control, resets and GOAWAY."""

from __future__ import annotations

import asyncio
import struct

import pytest

from cri.streaming.spdy.codec import (
    FLAG_FIN,
    SETTINGS_INITIAL_WINDOW_SIZE,
    Data,
    FrameDecoder,
    FrameEncoder,
    GoAway,
    GoAwayStatus,
    Ping,
    RstStatus,
    RstStream,
    Settings,
    SynReply,
    SynStream,
    WindowUpdate,
)
from cri.streaming.spdy.session import SpdySession, StreamClosed
from tests.support.spdy import control, raw_header_block


class Wire:
    """An in-memory connection: the test plays the client through `send` and `frames`.

    `timeline` records, in order, each frame the test sent ("in"), each frame the session wrote ("out")
    and whatever else the test notes, so tests can assert what happened before what.
    """

    def __init__(self) -> None:
        self.inbound: asyncio.Queue[bytes] = asyncio.Queue()
        self.encoder, self.decoder = FrameEncoder(), FrameDecoder()
        self.received: list = []
        self.timeline: list[tuple[str, object]] = []
        self.arrived = asyncio.Event()
        self.closed = False

    # the session's side
    async def read(self) -> bytes:
        return await self.inbound.get()

    async def write(self, data: bytes) -> None:
        if self.closed:
            raise ConnectionResetError("closed")
        self.decoder.feed(data)
        while (frame := self.decoder.next_frame()) is not None:
            self.received.append(frame)
            self.timeline.append(("out", frame))
        self.arrived.set()

    async def close(self) -> None:
        self.closed = True
        self.inbound.put_nowait(b"")

    # the peer's side
    def send(self, *frames) -> None:
        for frame in frames:
            if not isinstance(frame, bytes):
                self.timeline.append(("in", frame))
            self.inbound.put_nowait(frame if isinstance(frame, bytes) else self.encoder.encode(frame))

    def flow(self, stream_id: int) -> list[tuple[str, int]]:
        """Data out of `stream_id` (its size) and window updates in for it or the connection (their delta)."""
        return [
            (way, frame.delta if isinstance(frame, WindowUpdate) else len(frame.data))
            for way, frame in self.timeline
            if (way == "out" and isinstance(frame, Data) and frame.stream_id == stream_id)
            or (way == "in" and isinstance(frame, WindowUpdate) and frame.stream_id in (0, stream_id))
        ]

    async def wait_for(self, predicate, timeout: float = 2.0):
        async with asyncio.timeout(timeout):
            while not (found := [f for f in self.received if predicate(f)]):
                self.arrived.clear()
                await self.arrived.wait()
        return found

    def data_for(self, stream_id: int) -> bytes:
        return b"".join(f.data for f in self.received if isinstance(f, Data) and f.stream_id == stream_id)


@pytest.fixture
async def wire():
    wire = Wire()
    session = SpdySession(wire)
    session.start()
    wire.session = session
    yield wire
    await session.close()


async def open_stream(wire: Wire, stream_id: int = 1, **headers: str):
    wire.send(SynStream(stream_id, {k: [v] for k, v in (headers or {"streamtype": "stdout"}).items()}))
    stream = await wire.session.accept()
    await stream.reply()
    return stream


async def test_a_stream_carries_data_both_ways_with_half_close(wire):
    stream = await open_stream(wire, 1, streamtype="stdin")
    assert stream.header("streamtype") == "stdin"
    assert await wire.wait_for(lambda f: f == SynReply(1, {}))
    wire.send(Data(1, b"in"), Data(1, b"put", flags=FLAG_FIN))
    assert [await stream.read(), await stream.read(), await stream.read()] == [b"in", b"put", b""]
    await stream.write(b"out")
    await stream.close()
    await wire.wait_for(lambda f: isinstance(f, Data) and f.flags & FLAG_FIN)
    assert wire.data_for(1) == b"out"
    with pytest.raises(StreamClosed):
        await stream.write(b"late")


async def test_the_sender_blocks_at_the_peers_window_and_resumes_on_window_update(wire):
    wire.send(Settings(((0, SETTINGS_INITIAL_WINDOW_SIZE, 10),)))
    stream = await open_stream(wire)
    writer = asyncio.create_task(stream.write(b"x" * 25))
    await wire.wait_for(lambda f: isinstance(f, Data))
    wire.send(WindowUpdate(1, 10))
    await wire.wait_for(lambda f: len(wire.data_for(1)) >= 20)
    wire.send(WindowUpdate(1, 100))
    await asyncio.wait_for(writer, 1)
    assert wire.data_for(1) == b"x" * 25
    # each update let out exactly what it allowed, and nothing went out before the update that allowed it
    assert wire.flow(1) == [("out", 10), ("in", 10), ("out", 10), ("in", 100), ("out", 5)]


async def test_the_connection_window_bounds_all_streams(wire):
    wire.send(WindowUpdate(1, 10**6))  # the peer does flow control; stream 1 may take a lot, the connection 64 KiB
    stream = await open_stream(wire)
    wire.send(WindowUpdate(1, 10**6))
    writer = asyncio.create_task(stream.write(b"y" * 100_000))
    await wire.wait_for(lambda f: len(wire.data_for(1)) >= 65536)
    wire.send(WindowUpdate(0, 50_000))
    await asyncio.wait_for(writer, 1)
    assert len(wire.data_for(1)) == 100_000
    flow = wire.flow(1)
    connection_update = flow.index(("in", 50_000))
    assert sum(n for way, n in flow[:connection_update] if way == "out") == 65536
    assert sum(n for way, n in flow[connection_update:] if way == "out") == 100_000 - 65536


async def test_a_window_shrunk_by_settings_goes_negative_and_must_be_refilled(wire):
    stream = await open_stream(wire)
    await stream.write(b"z" * 100)  # the peer has shown no flow control yet: nothing blocks
    wire.send(Settings(((0, SETTINGS_INITIAL_WINDOW_SIZE, 50),)), Ping(1))  # window now 50 - 100 = -50
    await wire.wait_for(lambda f: f == Ping(1))  # frames are handled in order: the settings apply by now
    writer = asyncio.create_task(stream.write(b"z"))
    wire.send(WindowUpdate(1, 50), Ping(3))
    await wire.wait_for(lambda f: f == Ping(3))  # back to 0: still nothing may be sent
    wire.send(WindowUpdate(1, 1))
    await asyncio.wait_for(writer, 1)
    assert wire.flow(1) == [("out", 100), ("in", 50), ("in", 1), ("out", 1)]


async def test_a_peer_without_flow_control_is_never_stalled(wire):
    """moby/spdystream sends no WINDOW_UPDATE: writes go through past the default 64 KiB window."""
    stream = await open_stream(wire)
    await asyncio.wait_for(stream.write(b"w" * 300_000), 2)
    assert len(wire.data_for(1)) == 300_000
    assert max(len(f.data) for f in wire.received if isinstance(f, Data)) <= 32 * 1024


async def test_reading_gives_window_back(wire):
    stream = await open_stream(wire)
    for _ in range(5):
        wire.send(Data(1, b"r" * 16 * 1024))
    for _ in range(5):
        await stream.read()
    updates = await wire.wait_for(lambda f: isinstance(f, WindowUpdate))
    assert sum(u.delta for u in updates if u.stream_id == 1) == 64 * 1024
    assert sum(u.delta for u in updates if u.stream_id == 0) == 64 * 1024


async def test_a_peer_overrunning_our_window_is_held_back_not_reset(wire):
    stream = await open_stream(wire, 1)
    wire.send(*[Data(1, b"o" * 32 * 1024) for _ in range(4)], Ping(1))  # 128 KiB into a 64 KiB window
    received = b""
    while len(received) < 128 * 1024:
        received += await stream.read()
        wire.timeline.append(("read", len(received)))
    assert await wire.wait_for(lambda f: f == Ping(1))
    # the read loop waited for the application to read before it got to the ping behind the data
    assert wire.timeline.index(("out", Ping(1))) > wire.timeline.index(("read", 32 * 1024))
    assert not [f for f in wire.received if isinstance(f, RstStream)]


async def test_bad_stream_ids_are_reset_and_the_session_goes_on(wire):
    await open_stream(wire, 5)
    wire.send(SynStream(4, {}), SynStream(3, {}), Data(99, b"x"))
    await wire.wait_for(lambda f: f == RstStream(99, RstStatus.INVALID_STREAM))
    assert [f for f in wire.received if isinstance(f, RstStream)] == [
        RstStream(4, RstStatus.PROTOCOL_ERROR),
        RstStream(3, RstStatus.PROTOCOL_ERROR),
        RstStream(99, RstStatus.INVALID_STREAM),
    ]
    assert (await open_stream(wire, 7)).id == 7


async def test_a_malformed_header_block_resets_one_stream(wire):
    deflate = wire.encoder._deflate  # the peer's own compression context, kept in step
    wire.send(control(1, struct.pack(">IIBB", 1, 0, 0, 0) + raw_header_block(deflate, [(b"Upper", b"x")])))
    await wire.wait_for(lambda f: f == RstStream(1, RstStatus.PROTOCOL_ERROR))
    assert (await open_stream(wire, 3, streamtype="error")).header("streamtype") == "error"


async def test_a_broken_frame_ends_the_session_with_goaway(wire):
    wire.send(control(6, struct.pack(">I", 1), version=2))
    await wire.wait_for(lambda f: isinstance(f, GoAway))
    assert [f for f in wire.received if isinstance(f, GoAway)] == [GoAway(0, GoAwayStatus.PROTOCOL_ERROR)]
    await asyncio.wait_for(wire.session.closed.wait(), 1)
    assert await wire.session.accept() is None


async def test_pings_from_the_client_are_answered(wire):
    wire.send(Ping(7), Ping(8), Ping(9))
    await wire.wait_for(lambda f: f == Ping(9))  # frames are handled in order: Ping(8) was handled before
    assert [f for f in wire.received if isinstance(f, Ping)] == [Ping(7), Ping(9)]  # even: an answer to ours


async def test_a_reset_from_the_peer_ends_the_stream(wire):
    stream = await open_stream(wire)
    wire.send(RstStream(1, RstStatus.CANCEL))
    assert await stream.read() == b""
    assert stream.reset_by_peer
    with pytest.raises(StreamClosed):
        await stream.write(b"x")


async def test_data_after_fin_is_a_stream_error(wire):
    await open_stream(wire)
    wire.send(Data(1, b"a", flags=FLAG_FIN), Data(1, b"b"))
    assert await wire.wait_for(lambda f: f == RstStream(1, RstStatus.STREAM_ALREADY_CLOSED))


async def test_goaway_from_the_peer_stops_new_streams(wire):
    wire.send(GoAway(0))
    assert await wire.session.accept() is None


async def test_closing_says_goaway_with_the_last_stream(wire):
    await open_stream(wire, 9)
    await wire.session.close()
    assert wire.received[-1] == GoAway(9, GoAwayStatus.OK)
    assert wire.closed
