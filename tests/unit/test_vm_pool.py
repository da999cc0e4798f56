"""The warm pool's logic over a double of its VMs: fill, claim and fit, refills one at a time and after pod starts,
back-off on failures, and settling what a previous daemon left."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path

import pytest

from core.errors import Unavailable
from tests.support.wait import eventually
from vm_backend.pool import BACKOFF_FIRST, BACKOFF_MAX, WarmPool, WarmRecord, is_warm_id
from vm_backend.warm import warm_cgroup_parent

SIZE = (1, 256, 256)


class FakeVms:
    """Boots instantly (or when `gate` is set), or fails with `fail`; records what happened."""

    def __init__(self) -> None:
        self.booted: list[str] = []
        self.destroyed: list[str] = []
        self.ends: dict[str, Callable[[], None]] = {}
        self.gate: asyncio.Event | None = None
        self.fail: Exception | None = None
        self.fail_destroy = False
        self.booting = 0
        self.most_at_once = 0
        self.stray_ids: list[str] = []

    def size(self) -> tuple[int, int, int]:
        return SIZE

    async def boot(self, record: WarmRecord, save: Callable[[], None], on_end: Callable[[], None]) -> str:
        self.booting += 1
        self.most_at_once = max(self.most_at_once, self.booting)
        try:
            record.qemu = {"pid": 4242, "start_time": 1}
            save()
            if self.gate is not None:
                await self.gate.wait()
            self.booted.append(record.id)
            if self.fail is not None:
                raise self.fail
            self.ends[record.id] = on_end
            return f"handle-{record.id}"
        finally:
            self.booting -= 1

    async def destroy(self, record: WarmRecord, handle: str | None) -> None:
        self.destroyed.append(record.id)
        if self.fail_destroy:
            raise Unavailable("cannot remove it")

    def strays(self, known: set[str]) -> list[WarmRecord]:
        return [WarmRecord(i, 0, 0, 0) for i in self.stray_ids if i not in known]


def on_disk(directory: Path) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in directory.glob("warm-*.json")}


async def test_fills_one_boot_at_a_time(tmp_path: Path) -> None:
    vms = FakeVms()
    pool = WarmPool(3, vms, tmp_path)
    await pool.start({})
    await eventually(lambda: len(pool.ready) == 3)
    assert vms.most_at_once == 1 and len(vms.booted) == 3
    assert all(record["ready"] and record["qemu"]["pid"] == 4242 for record in on_disk(tmp_path).values())
    assert pool.describe() | {"claimed": 0} == {
        "size": 3, "ready": 3, "booting": False, "vcpus": 1, "memoryMiB": 256, "bootMemoryMiB": 256,
        "claimed": 0, "failuresInARow": 0,
    }  # fmt: skip
    await pool.close()


async def test_a_record_is_written_before_the_vm_is_made(tmp_path: Path) -> None:
    vms = FakeVms()
    vms.gate = asyncio.Event()
    pool = WarmPool(1, vms, tmp_path)
    await pool.start({})
    await eventually(lambda: vms.booting == 1)
    (record,) = on_disk(tmp_path).values()
    assert not record["ready"] and record["id"].startswith("warm-")  # a crash now leaves it to reap
    await pool.close()
    assert vms.destroyed == [record["id"]] and on_disk(tmp_path) == {}  # the cancelled boot is undone


async def test_claim_takes_only_a_vm_of_the_pods_size_and_the_pool_refills(tmp_path: Path) -> None:
    vms = FakeVms()
    pool = WarmPool(1, vms, tmp_path)
    await pool.start({})
    await eventually(lambda: len(pool.ready) == 1)
    assert pool.claim("pod-a", 2, 256, 256, "/run/netns/a") is None  # more vCPUs: boots cold
    assert pool.claim("pod-a", 1, 512, 512, "/run/netns/a") is None  # more memory: boots cold
    entry = pool.claim("pod-a", *SIZE, "/run/netns/a")
    assert entry is not None and entry.handle == f"handle-{entry.record.id}"
    saved = on_disk(tmp_path)[entry.record.id]
    assert saved["claimed_by"] == "pod-a" and saved["pod_netns"] == "/run/netns/a"
    assert pool.claim("pod-b", *SIZE, "/run/netns/b") is None  # never the same VM twice
    await eventually(lambda: len(pool.ready) == 1)
    assert len(vms.booted) == 2 and pool.describe()["claimed"] == 1
    pool.forget(entry.record.id)  # the pod's record names it all now
    assert entry.record.id not in on_disk(tmp_path)
    await pool.close()


async def test_refills_wait_while_a_pod_starts(tmp_path: Path) -> None:
    vms = FakeVms()
    pool = WarmPool(1, vms, tmp_path)
    pool.starting("pod-a")
    pool.starting("pod-b")
    await pool.start({})
    pool.started("pod-a")
    pool.started("pod-a")  # said twice (its removal says it again): pod-b still starts
    for _ in range(100):
        await asyncio.sleep(0)
    assert vms.booted == [] and vms.booting == 0
    pool.started("pod-b")
    await eventually(lambda: len(pool.ready) == 1)
    await pool.close()


@pytest.mark.parametrize(
    "error", [Unavailable("QEMU exited during boot"), OSError(28, "No space left on device: QEMU exited during boot")]
)
async def test_failed_boots_back_off(tmp_path: Path, error: Exception) -> None:
    vms = FakeVms()
    vms.fail = error
    pool = WarmPool(1, vms, tmp_path, backoff_first=3600.0, backoff_max=7200.0)
    await pool.start({})
    await eventually(lambda: "nextBootInSeconds" in pool.describe())
    for _ in range(100):
        await asyncio.sleep(0)
    info = pool.describe()
    assert len(vms.booted) == 1 and info["failuresInARow"] == 1 and info["nextBootInSeconds"] > 3000
    assert "QEMU exited during boot" in info["lastError"]
    assert vms.destroyed == vms.booted and on_disk(tmp_path) == {}  # what the failed boot made is gone
    await pool.close()


def test_backoff_doubles_up_to_its_cap(tmp_path: Path) -> None:
    pool = WarmPool(1, FakeVms(), tmp_path)
    waits = []
    for failures in range(12):
        pool.failures = failures
        waits.append(pool._backoff())
    assert waits[:4] == [0.0, BACKOFF_FIRST, 2 * BACKOFF_FIRST, 4 * BACKOFF_FIRST]
    assert max(waits) == BACKOFF_MAX and waits[-1] == BACKOFF_MAX


async def test_a_claim_lifts_the_back_off(tmp_path: Path) -> None:
    vms = FakeVms()
    pool = WarmPool(2, vms, tmp_path, backoff_first=3600.0, backoff_max=7200.0)
    await pool.start({})
    await eventually(lambda: len(pool.ready) == 2)
    ended = next(iter(pool.ready))
    vms.ends[ended]()  # a warm VM died unclaimed: destroyed, a failure
    await eventually(lambda: vms.destroyed == [ended])
    assert pool.failures == 1 and len(pool.ready) == 1 and "nextBootInSeconds" in pool.describe()
    assert pool.claim("pod-a", *SIZE, "/n") is not None  # the pool works after all
    await eventually(lambda: len(pool.ready) == 2)
    assert pool.failures == 0
    await pool.close()


async def test_restart_keeps_claims_pods_recorded_and_reaps_the_rest(tmp_path: Path) -> None:
    vms = FakeVms()
    pool = WarmPool(0, vms, tmp_path)
    owned = WarmRecord("warm-00000001", *SIZE, ready=True, claimed_by="pod-a")
    half_claimed = WarmRecord("warm-00000002", *SIZE, ready=True, claimed_by="pod-b")  # pod-b never recorded it
    unclaimed = WarmRecord("warm-00000003", *SIZE, ready=True)
    booting = WarmRecord("warm-00000004", *SIZE)
    for record in (owned, half_claimed, unclaimed, booting):
        pool.save(record)
    (tmp_path / "warm-00000005.json").write_text("{not json")
    vms.stray_ids = ["warm-00000005", "warm-00000006", "warm-00000001"]
    await pool.start({"warm-00000001": "pod-a", "warm-00000009": "pod-c"})
    assert sorted(vms.destroyed) == [
        "warm-00000002",
        "warm-00000003",
        "warm-00000004",
        "warm-00000005",
        "warm-00000006",
    ]
    assert on_disk(tmp_path) == {} and vms.booted == []  # warm-00000001 is pod-a's now: only its record went
    await pool.close()


async def test_a_vm_that_cannot_be_removed_keeps_its_record(tmp_path: Path) -> None:
    vms = FakeVms()
    vms.fail_destroy = True
    pool = WarmPool(0, vms, tmp_path)
    pool.save(WarmRecord("warm-00000001", *SIZE))
    await pool.start({})
    assert vms.destroyed == ["warm-00000001"] and list(on_disk(tmp_path)) == ["warm-00000001"]  # tried again next start
    await pool.close()


async def test_close_destroys_what_is_unclaimed(tmp_path: Path) -> None:
    vms = FakeVms()
    pool = WarmPool(2, vms, tmp_path)
    await pool.start({})
    await eventually(lambda: len(pool.ready) == 2)
    claimed = pool.claim("pod-a", *SIZE, "/n")
    assert claimed is not None
    await eventually(lambda: len(pool.ready) == 2)
    await pool.close()
    assert claimed.record.id not in vms.destroyed and len(vms.destroyed) == 2
    assert list(on_disk(tmp_path)) == [claimed.record.id]  # the pod's start removes it
    vms.ends[claimed.record.id]()  # the pool no longer cares
    assert pool.failures == 0


async def test_off_boots_nothing_and_still_reaps(tmp_path: Path) -> None:
    vms = FakeVms()
    pool = WarmPool(0, vms, tmp_path)
    pool.save(WarmRecord("warm-00000001", *SIZE, ready=True))
    await pool.start({})
    assert vms.destroyed == ["warm-00000001"] and vms.booted == [] and pool._refill is None
    await pool.close()


def test_record_round_trip_and_ids() -> None:
    record = WarmRecord.new(*SIZE)
    record.claimed_by, record.pod_cgroup, record.qemu = "pod", "/kubepods/pod1/abc", {"pid": 1, "start_time": 2}
    record.tcg_cache_mib = 64
    assert WarmRecord.from_dict(json.loads(json.dumps(record.__dict__))) == record
    older = {k: v for k, v in record.__dict__.items() if k != "tcg_cache_mib"}  # from before the setting
    assert WarmRecord.from_dict(older).tcg_cache_mib == 24
    assert record.id.startswith("warm-") and WarmRecord.new(*SIZE).id != record.id
    with pytest.raises(ValueError):
        WarmPool(1, FakeVms(), Path("/tmp")).forget("../etc/passwd")
    assert not is_warm_id("warm-netns") and not is_warm_id("warm-0000000g") and is_warm_id(record.id)


def test_each_daemon_scans_only_its_own_warm_cgroups_for_leftovers():
    """A second daemon on the host (a test's, a benchmark's) must never reap the first one's warm VMs."""
    assert warm_cgroup_parent(Path("/run/tandem/vm")) == "/tandem/warm"  # the node's one daemon: a readable name
    one, other = warm_cgroup_parent(Path("/tmp/a/run/vm")), warm_cgroup_parent(Path("/tmp/b/run/vm"))
    assert one != other and "/tandem/warm" not in (one, other)
    assert one == warm_cgroup_parent(Path("/tmp/a/run/vm")) and one.startswith("/tandem/warm-")
