"""SPDY/3.1 frames: the codec, header compression across frames, and malformed input."""

from __future__ import annotations

import struct
import zlib

import pytest

from cri.streaming.spdy.codec import (
    DICTIONARY,
    FLAG_FIN,
    SETTINGS_INITIAL_WINDOW_SIZE,
    Data,
    FrameDecoder,
    FrameEncoder,
    GoAway,
    GoAwayStatus,
    HeadersFrame,
    Ping,
    ProtocolError,
    RstStatus,
    RstStream,
    Settings,
    StreamError,
    SynReply,
    SynStream,
    WindowUpdate,
)
from tests.support.spdy import control, raw_header_block


def test_the_dictionary_is_spdy3s():
    assert zlib.adler32(DICTIONARY) == 0xE3C6A7C2
    assert len(DICTIONARY) == 1423


ALL_FRAMES = [
    SynStream(1, {"streamtype": ["stdout"], "port": ["80"]}, flags=FLAG_FIN, associated_id=0, priority=3),
    SynReply(1, {}),
    SynReply(3, {"a": ["1", "2"]}, flags=FLAG_FIN),
    HeadersFrame(5, {"x-more": ["yes"]}),
    RstStream(7, RstStatus.CANCEL),
    Settings(((0, SETTINGS_INITIAL_WINDOW_SIZE, 1000), (1, 4, 100))),
    Ping(9),
    GoAway(11, GoAwayStatus.PROTOCOL_ERROR),
    WindowUpdate(0, 65536),
    WindowUpdate(13, 1),
    Data(15, b"hello", flags=FLAG_FIN),
    Data(17, b""),
    Data(19, bytes(range(256)) * 100),
]


def test_every_frame_round_trips_through_one_encoder_and_decoder():
    encoder, decoder = FrameEncoder(), FrameDecoder()
    decoder.feed(b"".join(encoder.encode(frame) for frame in ALL_FRAMES))
    assert [decoder.next_frame() for _ in ALL_FRAMES] == ALL_FRAMES
    assert decoder.next_frame() is None


def test_frames_decode_from_any_split():
    encoder = FrameEncoder()
    wire = b"".join(encoder.encode(frame) for frame in ALL_FRAMES)
    decoder, decoded = FrameDecoder(), []
    for byte in wire:
        decoder.feed(bytes([byte]))
        while (frame := decoder.next_frame()) is not None:
            decoded.append(frame)
    assert decoded == ALL_FRAMES


def test_header_blocks_share_one_compression_context_per_direction():
    headers = {"streamtype": ["error"], "port": ["8080"], "requestid": ["0"]}
    encoder = FrameEncoder()
    first, second = encoder.encode(SynStream(1, headers)), encoder.encode(SynStream(3, headers))
    assert len(second) < len(first)  # the second block refers back to the first
    decoder = FrameDecoder()
    decoder.feed(first + second)
    assert [decoder.next_frame(), decoder.next_frame()] == [SynStream(1, headers), SynStream(3, headers)]
    alone = FrameDecoder()
    alone.feed(second)
    with pytest.raises(ProtocolError):  # without the first block's state the second cannot be read
        alone.next_frame()


def test_header_blocks_are_zlib_with_the_spdy_dictionary():
    """What a Go peer (compress/zlib with the dictionary) reads: a zlib stream flushed at every block."""
    frame = FrameEncoder().encode(SynReply(1, {"status": ["200"]}))
    block = frame[12:]
    inflate = zlib.decompressobj(zdict=DICTIONARY)
    raw = inflate.decompress(block)
    assert raw == struct.pack(">II", 1, 6) + b"status" + struct.pack(">I", 3) + b"200"
    assert block.endswith(b"\x00\x00\xff\xff")  # sync flush: the peer can decode the block at once


@pytest.mark.parametrize(
    ("pairs", "reason"),
    [
        ([(b"StreamType", b"stdout")], "lower case"),
        ([(b"a", b"1"), (b"a", b"2")], "twice"),
        ([(b"", b"x")], "empty"),
    ],
)
def test_a_malformed_header_block_fails_its_stream_only(pairs, reason):
    deflate = zlib.compressobj(zdict=DICTIONARY)
    bad = control(1, struct.pack(">IIBB", 1, 0, 0, 0) + raw_header_block(deflate, pairs))
    good = control(1, struct.pack(">IIBB", 3, 0, 0, 0) + raw_header_block(deflate, [(b"streamtype", b"error")]))
    decoder = FrameDecoder()
    decoder.feed(bad + good)
    with pytest.raises(StreamError, match=reason) as err:
        decoder.next_frame()
    assert (err.value.stream_id, err.value.status) == (1, RstStatus.PROTOCOL_ERROR)
    assert decoder.next_frame() == SynStream(3, {"streamtype": ["error"]})  # compression state stayed in step


def test_a_truncated_header_block_fails_its_stream():
    deflate = zlib.compressobj(zdict=DICTIONARY)
    block = deflate.compress(struct.pack(">II", 1, 10) + b"abc") + deflate.flush(zlib.Z_SYNC_FLUSH)
    decoder = FrameDecoder()
    decoder.feed(control(2, struct.pack(">I", 5) + block))
    with pytest.raises(StreamError, match="truncated"):
        decoder.next_frame()


@pytest.mark.parametrize(
    ("wire", "reason"),
    [
        (control(6, struct.pack(">I", 1), version=2), "version 2"),
        (control(3, struct.pack(">I", 1)), "RST_STREAM must be 8 bytes"),
        (control(3, struct.pack(">II", 1, 0)), "status 0"),
        (control(6, b"\x00\x00"), "PING must be 4 bytes"),
        (control(7, struct.pack(">I", 1)), "GOAWAY must be 8 bytes"),
        (control(9, struct.pack(">III", 1, 1, 1)), "WINDOW_UPDATE must be 8 bytes"),
        (control(4, struct.pack(">III", 2, 7, 1)), "entry count"),
        (control(1, struct.pack(">IIBB", 1, 0, 0, 0) + b"not zlib at all"), "does not decompress"),
        (control(1, struct.pack(">IIBB", 0, 0, 0, 0) + b"x"), "stream ID 0"),
        (struct.pack(">II", 0, 3) + b"abc", "stream 0"),
        (struct.pack(">HHI", 0x8003, 1, 2**20), "too large"),
    ],
)
def test_broken_frames_are_protocol_errors(wire, reason):
    decoder = FrameDecoder()
    decoder.feed(wire)
    with pytest.raises(ProtocolError, match=reason):
        decoder.next_frame()


def test_a_header_block_that_inflates_too_far_is_refused():
    deflate = zlib.compressobj(zdict=DICTIONARY)
    pairs = [(b"big", b"a" * 300_000)]
    decoder = FrameDecoder()
    decoder.feed(control(2, struct.pack(">I", 1) + raw_header_block(deflate, pairs)))
    with pytest.raises(ProtocolError, match="too large"):
        decoder.next_frame()


def test_unknown_control_frames_are_skipped():
    decoder = FrameDecoder()
    decoder.feed(control(0x55, b"whatever") + FrameEncoder().encode(Ping(1)))
    assert decoder.next_frame() == Ping(1)
