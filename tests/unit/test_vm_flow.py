"""Flow control on both sides of the agent channel, without a channel: the agent's Gate, the host's credited
streams and attach buffers."""

from __future__ import annotations

import asyncio

from protos import agent_pb2 as pb
from vm_backend.agent.flow import Gate
from vm_backend.flow import CreditedStream
from vm_backend.processes import ATTACH_BUFFER, VmAttach


class Transport:
    """What a Gate pauses and resumes: the reader of a pipe."""

    def __init__(self) -> None:
        self.paused = False

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False

    def is_closing(self) -> bool:
        return False


def test_the_agent_sends_no_more_than_its_credit_and_stops_reading() -> None:
    sent: list[bytes] = []
    gate = Gate(10, sent.append)
    gate.send(b"abc")  # before the reader is known: accounted for all the same
    transport = Transport()
    gate.attach(transport)  # type: ignore[arg-type]
    assert not transport.paused
    gate.send(b"defghijklmnop")
    assert b"".join(sent) == b"abcdefghij" and transport.paused and gate.waiting  # 6 bytes held, reading stops
    gate.grant(5)  # lower than before: no change
    assert b"".join(sent) == b"abcdefghij"
    gate.grant(12)
    assert b"".join(sent) == b"abcdefghijkl" and transport.paused  # 4 bytes still held
    gate.grant(100)
    assert b"".join(sent) == b"abcdefghijklmnop" and not transport.paused and not gate.waiting
    gate.send(b"x" * 84)
    assert gate.sent == 100 and transport.paused  # exactly used up: nothing held, but no more reads
    gate.discard()  # the host wants no more: read on, drop everything
    gate.send(b"dropped")
    assert not transport.paused and gate.sent == 100


def test_a_window_of_nothing_sends_nothing() -> None:
    sent: list[bytes] = []
    gate = Gate(0, sent.append)
    transport = Transport()
    gate.attach(transport)  # type: ignore[arg-type]
    gate.send(b"data")
    assert sent == [] and transport.paused


async def test_the_host_buffers_at_most_its_window_and_grants_as_it_reads() -> None:
    grants: list[int] = []
    stream = CreditedStream(lambda: grants.append(stream.limit), window=10_000)
    assert stream.receive(b"a" * 6000) and stream.receive(b"b" * 4000)
    assert not stream.receive(b"c")  # past the credit: refused, not queued
    assert stream.buffered == 10_000
    assert await stream.read() == b"a" * 6000
    assert grants == [16_000]  # more than half a window read: the credit moves on
    assert await stream.read() == b"b" * 4000
    assert grants == [16_000]  # 4000 more is less than half a window: no request for it
    assert stream.receive(b"d" * 6000) and not stream.receive(b"e")
    stream.end()
    assert await stream.read() == b"d" * 6000 and await stream.read() == b""
    assert grants == [16_000]  # after the end, no more credit


async def test_tiny_chunks_are_read_merged() -> None:
    stream = CreditedStream(lambda: None, window=100)
    assert all(stream.receive(b"xy") for _ in range(50)) and not stream.receive(b"z")
    assert await stream.read() == b"xy" * 50


async def test_an_attach_client_that_falls_behind_is_detached() -> None:
    detached: list[VmAttach] = []
    attach = VmAttach(
        lambda: None,  # type: ignore[arg-type,return-value]
        "c" * 64,
        tty=False,
        stdin=False,
        stdin_once=False,
        detach_on_eof=False,
        on_detach=detached.append,
    )
    chunk = b"x" * 65536
    for _ in range(ATTACH_BUFFER // len(chunk)):
        attach.output(pb.STDOUT, chunk)
    assert attach.buffered == ATTACH_BUFFER and not detached
    attach.output(pb.STDERR, b"one byte too many")
    assert detached == [attach] and attach.done.is_set()
    attach.output(pb.STDOUT, chunk)  # nothing more is queued
    assert attach.buffered == ATTACH_BUFFER
    received = 0
    while data := await asyncio.wait_for(attach.read_stdout(), 5):
        received += len(data)
    assert received == ATTACH_BUFFER  # what it had is still delivered, then the end
