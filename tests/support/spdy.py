"""Hand-built SPDY bytes for tests that play a broken or unusual peer, below what FrameEncoder would write."""

from __future__ import annotations

import struct
import zlib


def control(kind: int, payload: bytes, version: int = 3, flags: int = 0) -> bytes:
    return struct.pack(">HHI", 0x8000 | version, kind, flags << 24 | len(payload)) + payload


def raw_header_block(encoder_state: zlib._Compress, pairs: list[tuple[bytes, bytes]]) -> bytes:
    raw = struct.pack(">I", len(pairs)) + b"".join(
        struct.pack(">I", len(n)) + n + struct.pack(">I", len(v)) + v for n, v in pairs
    )
    return encoder_state.compress(raw) + encoder_state.flush(zlib.Z_SYNC_FLUSH)
