"""Frames on the agent channel: a 4-byte big-endian length, then a serialized `Frame` of at most 4 MiB.

Shared by the guest agent and the host's client so both sides agree byte for
byte; it imports nothing but the standard library and the generated messages.
"""

from __future__ import annotations

import struct

from protos import agent_pb2

MAX_FRAME = 4 * 2**20
EXEC_OUTPUT_LIMIT = (MAX_FRAME - 64 * 1024) // 2
"""Bytes of each of stdout and stderr an ExecSync returns: both must fit one response frame (the host checks
a response against it too)."""
_HEADER = struct.Struct(">I")


class FramingError(Exception):
    """The byte stream is not a valid sequence of frames: nothing after this point can be trusted."""


def encode(frame: agent_pb2.Frame) -> bytes:
    """The frame as it goes on the wire; refuses frames over the limit rather than sending what the peer rejects."""
    body = frame.SerializeToString()
    if len(body) > MAX_FRAME:
        raise FramingError(f"frame of {len(body)} bytes exceeds the {MAX_FRAME}-byte limit")
    return _HEADER.pack(len(body)) + body


def _parse(body: bytes) -> agent_pb2.Frame:
    frame = agent_pb2.Frame()
    try:
        frame.ParseFromString(body)
    except Exception as e:  # the pure-Python parser raises more than DecodeError on garbage
        raise FramingError(f"undecodable frame: {e}") from None
    if frame.WhichOneof("body") is None:
        raise FramingError("frame carries no request, response or event")
    return frame


class Decoder:
    """Turns the bytes of one connection, arriving in pieces of any size, into frames."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[agent_pb2.Frame]:
        """Every frame completed by `data`; raises `FramingError` on an oversized or undecodable one."""
        buffer = self._buffer
        buffer += data
        frames = []
        offset = 0
        while len(buffer) - offset >= _HEADER.size:
            (length,) = _HEADER.unpack_from(buffer, offset)
            if length > MAX_FRAME:
                raise FramingError(f"frame of {length} bytes announced; the limit is {MAX_FRAME}")
            end = offset + _HEADER.size + length
            if len(buffer) < end:
                break
            frames.append(_parse(bytes(buffer[offset + _HEADER.size : end])))
            offset = end
        del buffer[:offset]
        return frames
