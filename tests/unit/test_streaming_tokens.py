"""One-time streaming tokens: each works once, for a limited time, and there are never too many."""

from __future__ import annotations

import pytest

from core.errors import ResourceExhausted
from cri.streaming import tokens
from cri.streaming.tokens import TokenCache
from protos import cri_pb2 as pb


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_token_gives_back_its_request_once():
    cache = TokenCache(60)
    request = pb.ExecRequest(container_id="c1", cmd=["ls"], stdout=True)
    token = cache.insert(request)
    assert cache.consume(token) == request
    assert cache.consume(token) is None


def test_tokens_are_unguessable_and_distinct():
    cache = TokenCache(60)
    minted = {cache.insert(pb.AttachRequest(container_id="c")) for _ in range(200)}
    assert len(minted) == 200
    assert all(len(token) >= 32 and token.replace("-", "").replace("_", "").isalnum() for token in minted)
    assert cache.consume("not-a-token") is None


def test_tokens_expire_after_their_ttl():
    clock = Clock()
    cache = TokenCache(60, clock=clock)
    early = cache.insert(pb.PortForwardRequest(pod_sandbox_id="p"))
    clock.now += 30
    late = cache.insert(pb.PortForwardRequest(pod_sandbox_id="q"))
    clock.now += 30
    assert cache.consume(early) is None  # 60 s old
    assert cache.consume(late) == pb.PortForwardRequest(pod_sandbox_id="q")  # 30 s old


def test_unused_tokens_are_capped_and_expired_ones_free_their_place(monkeypatch):
    monkeypatch.setattr(tokens, "MAX_IN_FLIGHT", 3)
    clock = Clock()
    cache = TokenCache(60, clock=clock)
    for _ in range(3):
        cache.insert(pb.ExecRequest(container_id="c"))
    with pytest.raises(ResourceExhausted):
        cache.insert(pb.ExecRequest(container_id="c"))
    clock.now += 61
    assert cache.insert(pb.ExecRequest(container_id="c"))
