"""Containers' resource usage for the stats calls: collected pod by pod, one collection shared by every caller.

kubelet asks for the stats of every container every few seconds (summary API, eviction
manager), and more than one caller may ask at once. A pod's sample is served as it is
while it is younger than `fresh` seconds; an older one is still served, up to `stale`
seconds, while a new collection runs in the background; past that the caller waits
for the new collection, as long as the pod's backend allows (`Backend.usage_wait`: a
VM pod's figures are served at once, the new ones go to the next call), then serves the last figures; a pod with a
container not sampled yet, which has nothing to fall back on, waits to the end.
Only one collection per pod runs at a time, and the pods one call needs are collected
together, each backend in one go (one pass over the cgroup files; one agent round
trip per VM, with its own deadline). A container the backend could not measure this
time (a guest that did not answer) keeps its last figures, with their timestamp.

The CPU rate (nano cores) is derived here, from a container's successive samples.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from core.errors import TandemError
from sandbox.backend import Backend, ContainerUsage, PodContainers

log = logging.getLogger("tandem.stats")

FRESH = 1.0
STALE = 2.0


@dataclass
class _Sample:
    """One pod's last collection: when (monotonic), for which containers, and what it found."""

    taken: float
    asked: frozenset[str]
    usage: dict[str, ContainerUsage] = field(default_factory=dict)


class UsageCollector:
    def __init__(
        self,
        backends: Mapping[str, Backend[Any]],
        *,
        fresh: float = FRESH,
        stale: float = STALE,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._backends = backends
        self._fresh, self._stale, self._clock = fresh, stale, clock
        self._samples: dict[str, _Sample] = {}
        self._collecting: dict[str, asyncio.Task[None]] = {}  # sandbox id -> the collection it is part of
        self._gone: set[str] = set()  # pods forgotten while being collected

    async def usage(self, pods: list[PodContainers]) -> dict[str, ContainerUsage]:
        """The usage of each of these running containers (by container id); one with none yet is left out."""
        await self._wait(self._collect_due(pods))
        # a pod that joined a collection begun before its newest containers were asked about (not one
        # that has no sample at all after its collection: it was forgotten meanwhile)
        uncovered = [pod for pod in pods if pod.sandbox.id in self._samples and not self._covers(pod)]
        if uncovered:
            await self._wait(self._collect_due(uncovered))
        found: dict[str, ContainerUsage] = {}
        for pod in pods:
            sample = self._samples.get(pod.sandbox.id)
            if sample is not None:
                found.update((c.id, sample.usage[c.id]) for c in pod.containers if c.id in sample.usage)
        return found

    def _covers(self, pod: PodContainers) -> bool:
        sample = self._samples.get(pod.sandbox.id)
        return sample is not None and {c.id for c in pod.containers} <= sample.asked

    def _collect_due(self, pods: list[PodContainers]) -> dict[str, float | None]:
        """Start collecting the pods whose sample is not fresh (unless one is under way); how long to wait
        for each pod's collection (None: to its end)."""
        now = self._clock()
        batch: dict[str, list[PodContainers]] = {}
        must_wait: dict[str, float | None] = {}
        for pod in pods:
            sample = self._samples.get(pod.sandbox.id)
            covered = self._covers(pod)
            age = now - sample.taken if sample is not None else float("inf")
            if covered and age < self._fresh:
                continue
            if pod.sandbox.id not in self._collecting:
                batch.setdefault(pod.sandbox.backend, []).append(pod)
            if not covered:
                must_wait[pod.sandbox.id] = None
            elif age >= self._stale:
                backend = self._backends.get(pod.sandbox.backend)
                must_wait[pod.sandbox.id] = None if backend is None else backend.usage_wait
        for backend_name, backend_pods in batch.items():
            task = asyncio.create_task(self._collect(backend_name, backend_pods), name=f"stats of {backend_name}")
            for pod in backend_pods:
                self._collecting[pod.sandbox.id] = task
        return must_wait

    async def _wait(self, pods: dict[str, float | None]) -> None:
        """Wait for the collections of `pods`: to their end, or up to how long their backends allow when
        the pod has figures to fall back on. A caller that goes away cancels no collection."""
        patient: set[asyncio.Task[None]] = set()
        capped: dict[asyncio.Task[None], float] = {}
        for ident, wait in pods.items():
            task = self._collecting.get(ident)
            if task is None:
                continue
            if wait is None:
                patient.add(task)
            else:
                capped[task] = max(wait, capped.get(task, 0.0))
        if patient:
            await asyncio.wait(patient)
        capped = {task: wait for task, wait in capped.items() if task not in patient and not task.done()}
        if capped and max(capped.values()) > 0:  # a wait of 0 does not yield: the collection starts after the answer
            await asyncio.wait(capped, timeout=max(capped.values()))

    def forget(self, sandbox_id: str) -> None:
        """The pod is gone: its samples go with it."""
        self._samples.pop(sandbox_id, None)
        if sandbox_id in self._collecting:
            self._gone.add(sandbox_id)

    async def close(self) -> None:
        """Cancel the collections still running (the daemon is shutting down)."""
        tasks = set(self._collecting.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _collect(self, backend_name: str, pods: list[PodContainers]) -> None:
        try:
            backend = self._backends.get(backend_name)
            measured = {} if backend is None else await backend.usage(pods)
        except TandemError as e:
            log.warning("collecting stats failed", extra={"backend": backend_name, "error": str(e)})
            measured = {}
        finally:
            for pod in pods:
                self._collecting.pop(pod.sandbox.id, None)
        taken = self._clock()
        for pod in pods:
            if pod.sandbox.id in self._gone:
                self._gone.discard(pod.sandbox.id)
                continue
            previous = self._samples.get(pod.sandbox.id)
            old = previous.usage if previous is not None else {}
            sample = _Sample(taken, frozenset(c.id for c in pod.containers))
            for container in pod.containers:
                if container.id in measured:
                    sample.usage[container.id] = _with_rate(measured[container.id], old.get(container.id))
                elif container.id in old:
                    sample.usage[container.id] = old[container.id]
            self._samples[pod.sandbox.id] = sample


def _with_rate(usage: ContainerUsage, previous: ContainerUsage | None) -> ContainerUsage:
    """`usage` with its CPU rate over the time since `previous` (none without an earlier sample)."""
    if previous is None or usage.cpu_usage_ns is None or previous.cpu_usage_ns is None:
        return usage
    elapsed = usage.timestamp - previous.timestamp
    if elapsed <= 0:
        return dataclasses.replace(usage, cpu_nano_cores=previous.cpu_nano_cores)
    rate = max(0, usage.cpu_usage_ns - previous.cpu_usage_ns) * 10**9 // elapsed
    return dataclasses.replace(usage, cpu_nano_cores=rate)
