"""Shared fixtures: one docker-registry per session, busybox pushed into it once, auth proxies."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.support.authproxy import AuthProxy, Mode
from tests.support.images import busybox_image, push
from tests.support.registry import LocalRegistry


@pytest.fixture(scope="session")
def registry() -> Iterator[LocalRegistry]:
    """A docker-registry on loopback for the whole session (tests must not rely on it being empty)."""
    with LocalRegistry() as reg:
        yield reg


@pytest.fixture(scope="session")
def busybox_ref(registry: LocalRegistry) -> str:
    """`<host>/test/busybox:latest`, an OCI busybox image pushed once per session."""
    push(registry.host, "test/busybox", "latest", busybox_image())
    return f"{registry.host}/test/busybox:latest"


@pytest.fixture
def authproxy(registry: LocalRegistry) -> Iterator[Callable[..., AuthProxy]]:
    """Factory: `authproxy("bearer", **options)` starts a proxy in front of `registry`.

    Pass `upstream="host:port"` to put it in front of something else.
    """
    started: list[AuthProxy] = []

    def make(mode: Mode = "none", upstream: str | None = None, **options: Any) -> AuthProxy:
        proxy = AuthProxy(upstream or registry.host, mode, **options)
        started.append(proxy)
        return proxy

    yield make
    for proxy in started:
        proxy.stop()
