"""One-time tokens: the only thing that makes a streaming URL work, so they are random, short-lived and used once.

As in kubelet's streaming server: the token stands for the CRI request that
minted it (which container, which command, which streams); the HTTP request
that presents it cannot change any of that.
"""

from __future__ import annotations

import secrets
import time
from collections import OrderedDict
from collections.abc import Callable

from core.errors import ResourceExhausted
from protos import cri_pb2 as pb

StreamRequest = pb.ExecRequest | pb.AttachRequest | pb.PortForwardRequest

MAX_IN_FLIGHT = 1000
"""Unused tokens kept at once (kubelet's limit): a client minting URLs it never uses cannot grow this."""


class TokenCache:
    """Requests waiting for their streaming connection, each behind a token that expires after `ttl` seconds."""

    def __init__(self, ttl: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._ttl = ttl
        self._clock = clock
        self._entries: OrderedDict[str, tuple[float, StreamRequest]] = OrderedDict()

    def insert(self, request: StreamRequest) -> str:
        self._expire()
        if len(self._entries) >= MAX_IN_FLIGHT:
            raise ResourceExhausted(f"{MAX_IN_FLIGHT} streaming requests are waiting for their connection already")
        token = secrets.token_urlsafe(24)
        self._entries[token] = (self._clock() + self._ttl, request)
        return token

    def consume(self, token: str) -> StreamRequest | None:
        """The request behind `token`, which stops working; None if it is unknown, used or expired."""
        self._expire()
        entry = self._entries.pop(token, None)
        return None if entry is None else entry[1]

    def _expire(self) -> None:
        """Drop expired tokens; they are in expiry order since every one lives `ttl`."""
        now = self._clock()
        while self._entries:
            token, (deadline, _) = next(iter(self._entries.items()))
            if deadline > now:
                break
            del self._entries[token]
