"""Shared fixtures (one docker-registry per session, busybox pushed into it once, auth proxies) and the
suite's skip policy: only crictl's second opinions may be skipped, and the run ends saying how many were."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.support.authproxy import AuthProxy, Mode
from tests.support.images import busybox_image, push
from tests.support.registry import LocalRegistry

CRICTL_ABSENT = "crictl is not on PATH"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "crictl: a second opinion from the real client (cri-tools' crictl); skipped where crictl is not on PATH. "
        "Every path such a test covers is covered by another test that needs only what `make setup` installs.",
    )


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("crictl") is not None and shutil.which("crictl") is None:
        pytest.skip(CRICTL_ABSENT)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    """Any skip but crictl's is a failure: a missing tool, image or asset must not pass for a green run."""
    report = yield
    if report.skipped and not hasattr(report, "wasxfail") and _skip_reason(report) != CRICTL_ABSENT:
        report.outcome = "failed"
        report.longrepr = f"skipped, which only crictl tests may be: {_skip_reason(report)}"
    return report


def _skip_reason(report: pytest.TestReport) -> str:
    longrepr = report.longrepr
    reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
    return reason.removeprefix("Skipped: ")


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    """One line: how many crictl tests were skipped and why, or that all of them ran."""
    skipped = [r for r in terminalreporter.stats.get("skipped", []) if _skip_reason(r) == CRICTL_ABSENT]
    ran = [
        r
        for key in ("passed", "failed")
        for r in terminalreporter.stats.get(key, [])
        if r.when == "call" and "crictl" in r.keywords
    ]
    if skipped:
        terminalreporter.write_line(
            f"crictl: {len(skipped)} second-opinion tests skipped: {CRICTL_ABSENT} (README.md, 'Getting crictl "
            "and critest', says where to get it); every path they cover is also tested without it"
        )
    elif ran:
        terminalreporter.write_line(f"crictl: all {len(ran)} second-opinion tests ran, none skipped")


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
