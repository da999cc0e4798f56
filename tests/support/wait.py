"""Waiting for a condition with a deadline: the test suite's one poll loop, for plain and asyncio code.

Tests wait for what they need to be true, never for a length of time: the poll interval below only
bounds how often the condition is checked, and the deadline only bounds how long a broken run hangs.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

POLL_SECONDS = 0.05


def wait_for(predicate: Callable[[], T], timeout: float = 20.0, what: str = "condition") -> T:
    """Call `predicate` until it returns something truthy, and return that; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(POLL_SECONDS)  # the poll interval of this deadline wait, not a synchronization


async def eventually(predicate: Callable[[], T], timeout: float = 20.0, what: str = "condition") -> T:
    """`wait_for` for asyncio code: the event loop runs on between checks."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        await asyncio.sleep(POLL_SECONDS)  # the poll interval of this deadline wait, not a synchronization
