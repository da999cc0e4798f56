"""Writable layers' disk usage for the stats calls, measured by walking them in the background, within a budget.

A stats call reports each container's writable layer: its bytes and inodes, a hard-linked
inode counted once, as `du` and containerd count. Walking the upper dir on every call
would cost as much as the layer has entries, and a container (a VM guest above all) can
make millions. So a layer's figure is kept and served until it is `max_age` seconds old;
it is then measured again by one background worker, in steps of at most `step_entries`
entries, each layer in turn, so that a huge layer neither stalls a call nor starves the
others; and a layer whose walk is costly is walked less often: a walk that took `t`
seconds is not begun again before `t / cost_share` seconds have passed. A layer never
measured gets one step at once, so a new container's first stats have a figure unless
its layer is too big to walk in one step.

What a hostile tree could make unbounded is bounded too: at most `MAX_PENDING`
directories wait to be walked (beyond that they are left out, the figure is a lower
bound) and at most `MAX_LINKED` hard-linked inodes are remembered (beyond that a link
counts again: an upper bound); the walk stays on the layer's filesystem and follows no
symlink.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

log = logging.getLogger("tandem.layers")

MAX_AGE = 10.0
STEP_ENTRIES = 20_000
COST_SHARE = 0.05
MAX_PENDING = 100_000
MAX_LINKED = 100_000


class _Entries(Protocol):
    """What `os.scandir` returns: directory entries, and a close that releases its descriptor."""

    def __next__(self) -> os.DirEntry[str]: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class LayerFigure:
    used_bytes: int
    inodes: int
    measured_at: int  # wall clock, ns: when the walk that found these figures ended


class LayerWalk:
    """One measurement of a tree, made in steps: what is left to walk and what was counted so far."""

    def __init__(self, root: Path) -> None:
        self.used = 0
        self.inodes = 0
        self.cost = 0.0  # seconds spent in steps
        self._pending: list[str] = []
        self._current: _Entries | None = None
        self._linked: set[int] = set()
        try:
            st = os.lstat(root)
        except OSError:
            self._device = -1
            return
        self._device = st.st_dev
        self._count(st)
        if stat.S_ISDIR(st.st_mode):
            self._pending.append(str(root))

    def step(self, budget: int) -> bool:
        """Walk up to `budget` more entries; whether the walk is complete."""
        began = time.perf_counter()
        try:
            while budget > 0:
                if self._current is None:
                    if not self._pending:
                        return True
                    try:
                        self._current = os.scandir(self._pending.pop())
                    except OSError:  # removed meanwhile, or not a directory any more
                        continue
                try:
                    entry = next(self._current)
                except StopIteration:
                    self.close()
                    continue
                budget -= 1
                try:
                    st = entry.stat(follow_symlinks=False)
                except OSError:
                    continue
                self._count(st)
                if stat.S_ISDIR(st.st_mode) and st.st_dev == self._device and len(self._pending) < MAX_PENDING:
                    self._pending.append(entry.path)
            return self._current is None and not self._pending
        finally:
            self.cost += time.perf_counter() - began

    def _count(self, st: os.stat_result) -> None:
        if st.st_nlink > 1 and not stat.S_ISDIR(st.st_mode):
            if st.st_ino in self._linked:
                return
            if len(self._linked) < MAX_LINKED:
                self._linked.add(st.st_ino)
        self.used += st.st_blocks * 512
        self.inodes += 1

    def close(self) -> None:
        if self._current is not None:
            self._current.close()
            self._current = None


def measure(root: Path) -> tuple[int, int]:
    """(bytes, inodes) of the tree at `root`, walked to the end at once."""
    walk = LayerWalk(root)
    while not walk.step(STEP_ENTRIES):
        pass
    return walk.used, walk.inodes


@dataclass
class _Layer:
    figure: LayerFigure | None = None
    walk: LayerWalk | None = None
    due: float = 0.0  # monotonic: when the figure may be measured again
    wanted: bool = False  # asked for since it became due


class LayerUsage:
    """The figures of the writable layers asked about, kept fresh by one background worker."""

    def __init__(
        self,
        *,
        max_age: float = MAX_AGE,
        step_entries: int = STEP_ENTRIES,
        cost_share: float = COST_SHARE,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._max_age, self._step_entries, self._cost_share, self._clock = max_age, step_entries, cost_share, clock
        self._layers: dict[Path, _Layer] = {}
        self._walking = threading.Lock()  # one thread steps walks at a time
        self._worker: asyncio.Task[None] | None = None

    async def figures(self, uppers: list[Path]) -> dict[Path, LayerFigure]:
        """The latest figure of each of `uppers` that has one; due ones are measured again in the background."""
        new = [upper for upper in uppers if upper not in self._layers]
        for upper in new:
            self._layers[upper] = _Layer(walk=LayerWalk(upper))
        if new:
            await asyncio.to_thread(self._steps, [(upper, self._layers[upper]) for upper in new])
        now = self._clock()
        for upper in uppers:
            layer = self._layers.get(upper)
            if layer is not None and layer.walk is None and now >= layer.due:
                layer.wanted = True
        if self._worker is None and any(layer.wanted or layer.walk is not None for layer in self._layers.values()):
            self._worker = asyncio.create_task(self._work(), name="writable layer usage")
        return {upper: figure for upper in uppers if (figure := self._figure(upper)) is not None}

    def _figure(self, upper: Path) -> LayerFigure | None:
        layer = self._layers.get(upper)
        return None if layer is None else layer.figure

    def forget(self, upper: Path) -> None:
        """The layer is being removed: stop measuring it (a walk under way is closed by its next step)."""
        self._layers.pop(upper, None)

    async def close(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
            self._worker = None

    async def _work(self) -> None:
        """Step every wanted layer's walk in turn until none is left."""
        try:
            while True:
                now = self._clock()
                turn = []
                for upper, layer in self._layers.items():
                    if layer.wanted and layer.walk is None and now >= layer.due:
                        layer.walk = LayerWalk(upper)
                    if layer.walk is not None:
                        turn.append((upper, layer))
                if not turn:
                    return
                await asyncio.to_thread(self._steps, turn)
        finally:
            self._worker = None

    def _steps(self, layers: list[tuple[Path, _Layer]]) -> None:
        """One step of each layer's walk (in a thread); a finished walk becomes the layer's figure."""
        with self._walking:
            for upper, layer in layers:
                walk = layer.walk
                if walk is None:
                    continue  # finished by another turn
                if self._layers.get(upper) is not layer:  # forgotten
                    walk.close()
                    continue
                if not walk.step(self._step_entries):
                    continue
                walk.close()
                layer.figure = LayerFigure(walk.used, walk.inodes, time.time_ns())
                layer.walk, layer.wanted = None, False
                layer.due = self._clock() + max(self._max_age, walk.cost / self._cost_share)
                if walk.cost > 1.0:
                    log.info("a writable layer is costly to measure", extra={"layer": str(upper), "s": walk.cost})
