"""A TCG VM's translation cache, read through QEMU's monitor: how much code a step made QEMU translate.

Under TCG every guest instruction runs as host code QEMU translated, kept in a
cache of `tb-size` MiB (vm_backend/qemu.py). When the cache is full QEMU empties
all of it and translates again whatever runs next, so a step whose code does not
fit in what is left pays for translating it, and once more after every flush.
`bench.vm` reads the cache before and after a warm pod start to show that cost.
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vm_backend.qemu import qmp

_USED = re.compile(r"^gen code size\s+(\d+)/(\d+)", re.MULTILINE)
_FLUSHES = re.compile(r"^TB flush count\s+(\d+)", re.MULTILINE)


@dataclass(frozen=True)
class CacheReading:
    """One `info jit`: bytes of translated code in the cache, its capacity, and the flushes since boot."""

    used: int
    capacity: int
    flushes: int

    @classmethod
    def parse(cls, text: str) -> CacheReading | None:
        """From `info jit`'s text; None if it has no cache (KVM: no translation)."""
        used, flushes = _USED.search(text), _FLUSHES.search(text)
        if used is None or flushes is None:
            return None
        return cls(used=int(used[1]), capacity=int(used[2]), flushes=int(flushes[1]))


def translated_between(before: CacheReading, after: CacheReading) -> int:
    """Bytes translated from `before` to `after`: each flush emptied a cache filled up to its capacity.

    A flush comes when the next block does not fit, so each one stands for slightly
    less than a full cache: an estimate from above, within a block per flush.
    """
    flushes = after.flushes - before.flushes
    if flushes < 0 or after.capacity != before.capacity:
        raise ValueError("the readings are not of one VM, in order")
    if flushes == 0:
        return after.used - before.used
    return (before.capacity - before.used) + (flushes - 1) * before.capacity + after.used


def read_cache(qmp_socket: Path) -> CacheReading | None:
    """The VM's translation cache now, through its QMP socket (HMP `info jit`)."""
    arguments: dict[str, Any] = {"command-line": "info jit"}
    text = asyncio.run(qmp(qmp_socket, "human-monitor-command", timeout=5.0, **arguments))
    return CacheReading.parse(str(text))
