"""sandbox.stats: one collection shared by concurrent stats calls, samples served while fresh, rates, silent pods."""

from __future__ import annotations

import asyncio

import pytest

from protos import cri_pb2 as pb
from sandbox.backend import ContainerUsage, PodContainers
from sandbox.model import ContainerRecord, ContainerState, SandboxRecord
from sandbox.stats import UsageCollector


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class CountingBackend:
    """Answers `usage` with a CPU time that grows 1 s per collection; a test can hold a collection open."""

    def __init__(self) -> None:
        self.usage_wait: float | None = None
        self.collections: list[list[str]] = []
        self.gate: asyncio.Event | None = None
        self.silent: set[str] = set()  # container ids left out, as a guest that does not answer

    async def usage(self, pods: list[PodContainers]) -> dict[str, ContainerUsage]:
        self.collections.append([p.sandbox.id for p in pods])
        if self.gate is not None:
            await self.gate.wait()
        n = len(self.collections)
        return {
            c.id: ContainerUsage(timestamp=n * 10**9, cpu_usage_ns=n * 10**9 // 2)
            for p in pods
            for c in p.containers
            if c.id not in self.silent
        }


def pod(ident: str, *containers: str) -> PodContainers:
    sandbox = SandboxRecord(id=ident, config=pb.PodSandboxConfig(), runtime_handler="", backend="b", trust_reason="")
    return PodContainers(
        sandbox,
        [
            ContainerRecord(
                id=c,
                sandbox_id=ident,
                config=pb.ContainerConfig(),
                image_id="",
                image_ref="",
                log_path="",
                state=ContainerState.RUNNING,
            )
            for c in containers
        ],
    )


@pytest.fixture
def collector():
    backend, clock = CountingBackend(), Clock()
    return UsageCollector({"b": backend}, fresh=1.0, stale=2.0, clock=clock), backend, clock  # type: ignore[dict-item]


async def test_a_fresh_sample_is_served_without_collecting_again(collector):
    stats, backend, clock = collector
    first = await stats.usage([pod("p", "c1", "c2")])
    assert set(first) == {"c1", "c2"} and len(backend.collections) == 1
    clock.now += 0.5
    assert await stats.usage([pod("p", "c1", "c2")]) == first
    assert len(backend.collections) == 1


async def test_concurrent_calls_share_one_collection(collector):
    stats, backend, _ = collector
    backend.gate = asyncio.Event()
    calls = [asyncio.create_task(stats.usage([pod("p", "c1")])) for _ in range(5)]
    await asyncio.sleep(0)  # every call has asked (a step, not a wait for something)
    backend.gate.set()
    answers = await asyncio.gather(*calls)
    assert backend.collections == [["p"]]
    assert all(answer == answers[0] for answer in answers)


async def test_an_older_sample_is_served_while_a_new_one_is_collected(collector):
    stats, backend, clock = collector
    first = await stats.usage([pod("p", "c1")])
    clock.now += 1.5  # older than fresh, younger than stale
    backend.gate = asyncio.Event()
    assert await stats.usage([pod("p", "c1")]) == first  # served at once: the gated collection runs on
    (collecting,) = set(stats._collecting.values())
    backend.gate.set()
    await collecting
    assert len(backend.collections) == 2
    newer = await stats.usage([pod("p", "c1")])  # the background collection's sample, fresh
    assert newer["c1"].timestamp > first["c1"].timestamp and len(backend.collections) == 2


async def test_a_sample_too_old_or_missing_a_container_is_waited_for(collector):
    stats, backend, clock = collector
    await stats.usage([pod("p", "c1")])
    clock.now += 0.1
    with_new = await stats.usage([pod("p", "c1", "c2")])  # c2 started since: the sample does not cover it
    assert set(with_new) == {"c1", "c2"} and len(backend.collections) == 2
    clock.now += 5
    later = await stats.usage([pod("p", "c1", "c2")])
    assert later["c1"].timestamp > with_new["c1"].timestamp and len(backend.collections) == 3


async def test_pods_are_collected_together_and_only_the_ones_due(collector):
    stats, backend, clock = collector
    await stats.usage([pod("p1", "a")])
    clock.now += 0.5
    await stats.usage([pod("p1", "a"), pod("p2", "b"), pod("p3", "c")])
    assert backend.collections == [["p1"], ["p2", "p3"]]


async def test_the_cpu_rate_comes_from_successive_samples(collector):
    stats, _, clock = collector
    first = await stats.usage([pod("p", "c1")])
    assert first["c1"].cpu_nano_cores is None  # no earlier sample
    clock.now += 5
    second = await stats.usage([pod("p", "c1")])
    assert second["c1"].cpu_nano_cores == 5 * 10**8  # half a second of CPU per second


async def test_a_container_left_out_keeps_its_last_figures(collector):
    stats, backend, clock = collector
    first = await stats.usage([pod("p", "c1")])
    backend.silent.add("c1")
    clock.now += 5
    assert await stats.usage([pod("p", "c1")]) == first  # the same figures, with their own timestamp
    backend.silent.add("c2")
    assert "c2" not in await stats.usage([pod("p", "c1", "c2")])  # none yet: left out


async def test_a_forgotten_pod_leaves_no_sample_behind(collector):
    stats, backend, _ = collector
    backend.gate = asyncio.Event()
    call = asyncio.create_task(stats.usage([pod("p", "c1")]))
    await asyncio.sleep(0)
    stats.forget("p")  # removed while being collected
    backend.gate.set()
    await call
    assert stats._samples == {}
    await stats.close()


async def test_a_slow_backend_is_waited_for_no_longer_than_it_allows_when_there_are_figures_to_serve(collector):
    stats, backend, clock = collector
    backend.usage_wait = 0.01
    first = await stats.usage([pod("p", "c1")])
    clock.now += 5  # too old: this call collects
    backend.gate = asyncio.Event()  # and the collection does not end
    assert await stats.usage([pod("p", "c1")]) == first  # the last figures, after at most 0.01 s
    new_container = asyncio.create_task(stats.usage([pod("p", "c1", "c2")]))
    await asyncio.sleep(0.05)
    assert not new_container.done()  # nothing to fall back on for c2: it waits for the collection
    backend.gate.set()
    assert set(await new_container) == {"c1", "c2"}


async def test_with_no_wait_allowed_the_last_figures_are_served_before_the_collection_starts(collector):
    stats, backend, clock = collector
    backend.usage_wait = 0.0
    first = await stats.usage([pod("p", "c1")])
    assert len(backend.collections) == 1
    clock.now += 5  # too old: this call starts a collection, but serves the last figures without yielding to it
    assert await stats.usage([pod("p", "c1")]) == first
    assert len(backend.collections) == 1  # not started yet: its work cannot delay the answer
    await asyncio.sleep(0)
    assert len(backend.collections) == 2
    assert (await stats.usage([pod("p", "c1")]))["c1"].cpu_usage_ns == 10**9  # the next call: the new figures
    await stats.close()
