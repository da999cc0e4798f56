"""VM pods (issue #4): pod start vs a bare QEMU boot, the jail's cost, host memory per idle VM pod, density.

    .venv/bin/python -m bench.vm [--samples N] [--idle-pods K] [--density-cap N] [--skip ...] [--keep]
                                 [--tcg-cache-mib M]

1. start: A = Tandem RunPodSandbox(handler "vm") + CreateContainer + StartContainer of
   a busybox `sleep 3600`, timed over gRPC as one number (stop/remove untimed);
   B = a bare QEMU boot of the same kernel + initramfs with the argv Tandem builds
   (vm_backend.qemu.build_argv, same accel/vcpus/memory), but without the tap NIC
   and without virtiofsd, timed until the guest's init runs (its first console
   line): the issue's baseline. The same boot is also timed until the agent
   answers Hello on its virtio-serial socket (H), which shows how much of A is
   the agent starting. Alternating A/B, the one going first alternates per
   sample; ratio A/B per pair, median (goal <= 2.0, issue #12; it was 1.15 before the warm pool), and A/H.
1a. warm pool: the same pod start on a third daemon with `[vm] warm_pool = 1` (W: the pod claims a
   booted VM), alternating with A and B in the same samples, the pool refilled (untimed) before
   each W; ratios W/B (goal <= 0.5: a pod starts faster than a VM boots) and W/A; under TCG, how
   much code QEMU translated during each W and how often its translation cache flushed
   (bench/tcgcache.py: the cache read before and after); then the PSS of one idle warm VM (what
   each warm VM costs the node).
1b. jail: the same pod start (A) on a second daemon whose `[vm] jail = false` (U: QEMU as root,
   no jailer, no cgroup, no uid), alternating A/U, the one going first alternating per sample;
   ratio A/U per pair, median (goal < 1.05): what the VMM's jail costs a pod start. Pod starts
   under TCG on a shared machine vary by a second or more, so the jail's fixed part is also timed
   alone: `qemu -version` through the jailer (as a VM's QEMU is jailed) vs bare, alternating, and
   making + removing a VM's cgroup with its limits.
2. memory: K idle VM pods with one sleeping container each; after an idle wait,
   the PSS (/proc/PID/smaps_rollup) of every host process of the pod's VM (whose
   command line names its run dir, or in its cgroup: QEMU, virtiofsd and its
   sandbox), per pod and mean, QEMU's split by kind of mapping (guest RAM, the
   kernel, initramfs and userland image, TCG's code, QEMU's own); the daemon's PSS
   apart; and the CPU those processes used during the idle wait (/proc/PID/stat),
   in millicores. All with KSM as found (off on these hosts), then, if it was off,
   again with KSM switched on for the measurement (bench/hostmem.py: after 3 full
   scans; every knob it wrote put back as found, also on failure or SIGTERM).
3. density: idle VM pods started one after another until the first failure or the
   cap (150); how many started, MemAvailable and the mean PSS per pod at the end,
   then the same with KSM on (as in 2); then all removed.

Every VM, the bare boots' too, has `--tcg-cache-mib` of translation cache (`[vm] tcg_cache_mib`, the
default's 24 unless given): the README's "Pod start or memory under TCG" compares the two sides of it.

Everything runs under one temp dir (isolated daemon, LocalRegistry, a CNI bridge)
and is removed on exit, also on failure or SIGTERM. The machine may be shared:
load averages are printed with the numbers.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import grpc

from bench.hostmem import ksm_available, ksm_is_on, ksm_on, ksm_settle, pss_by_kind, pss_kib
from bench.pods import (
    BenchError,
    _ignore_sigterm,
    _quietly,
    _remove_workdir,
    _sigterm,
    _stop_tandem,
    free_octets,
    write_network,
)
from bench.tcgcache import CacheReading, read_cache, translated_between
from core import cgroups
from core.settings import JAIL_UID_COUNT, JAIL_UID_FIRST, TCG_CACHE_MIB
from protos import cri_pb2 as pb
from tests.support.daemon import TandemDaemon
from tests.support.images import busybox_image, push
from tests.support.network import delete_bridge
from tests.support.pods import container_config, pod_config
from tests.support.registry import LocalRegistry
from vm_backend import resources
from vm_backend.channel import AgentClient
from vm_backend.guest_image import GuestAssets, assets_root, current_assets
from vm_backend.guest_image.inputs import resolve_inputs
from vm_backend.guest_image.store import load as load_assets
from vm_backend.jail import Jail, JailIds
from vm_backend.qemu import QemuVm, VmSpec

DEFAULT_STATE = Path("/var/lib/tandem")
RPC_TIMEOUT = 180.0
INIT_LINE = "tandem-init: init started"  # vm_backend/init.sh's first line, once /proc is mounted
VCPUS, MEMORY_MIB = 1, 256  # Tandem's defaults (core.settings VmSettings), used for the bare boot too


def load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f} {five:.2f} {fifteen:.2f}"


def mem_available_mib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (and its threads), from /proc/PID/stat."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def processes_naming(text: str) -> dict[int, str]:
    """pid -> command line of every process whose command line contains `text`."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline:
            found[int(entry.name)] = cmdline
    return found


# ---- A: a Tandem VM pod -------------------------------------------------------------------------


class Pods:
    def __init__(self, daemon: TandemDaemon, image: str, log_root: Path) -> None:
        self.daemon, self.image, self.log_root = daemon, image, log_root
        self.count = 0
        self.last_steps: tuple[float, float, float] = (0.0, 0.0, 0.0)  # runp, create, start of the last start

    def start(self, retries: int = 0) -> tuple[str, float]:
        """RunPodSandbox(vm) + CreateContainer + StartContainer; the pod id and the wall time of the three.

        With `retries`, a failed start is reported and tried again (the density run takes none).
        """
        for _ in range(retries):
            try:
                return self._start()
            except grpc.RpcError as e:
                print(f"# a pod start failed, retrying: {e.code().name}: {e.details()}", flush=True)
        return self._start()

    def _start(self) -> tuple[str, float]:
        self.count += 1
        name = f"vm{self.count}"
        pod = pod_config(name, self.log_root / name)
        container = container_config("sleeper", self.image, "sleep", "3600")
        rt = self.daemon.runtime
        started = time.perf_counter()
        pod_id = rt.RunPodSandbox(pb.RunPodSandboxRequest(config=pod, runtime_handler="vm"), timeout=RPC_TIMEOUT)
        pod_id = pod_id.pod_sandbox_id
        ran = time.perf_counter()
        try:
            request = pb.CreateContainerRequest(pod_sandbox_id=pod_id, config=container, sandbox_config=pod)
            cid = rt.CreateContainer(request, timeout=RPC_TIMEOUT).container_id
            created = time.perf_counter()
            rt.StartContainer(pb.StartContainerRequest(container_id=cid), timeout=RPC_TIMEOUT)
        except BaseException:
            self.remove(pod_id)
            raise
        finished = time.perf_counter()
        elapsed = finished - started
        self.last_steps = (ran - started, created - ran, finished - created)
        state = rt.ContainerStatus(pb.ContainerStatusRequest(container_id=cid), timeout=30).status.state
        if state != pb.CONTAINER_RUNNING:
            self.remove(pod_id)
            raise BenchError(f"container {cid} is {pb.ContainerState.Name(state)} after start")
        return pod_id, elapsed

    def remove(self, pod_id: str) -> None:
        rt = self.daemon.runtime
        rt.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=pod_id), timeout=RPC_TIMEOUT)
        rt.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=pod_id), timeout=RPC_TIMEOUT)

    def remove_all(self) -> None:
        for sandbox in self.daemon.runtime.ListPodSandbox(pb.ListPodSandboxRequest(), timeout=30).items:
            self.remove(sandbox.id)

    def run_dir(self, pod_id: str) -> Path:
        return self.daemon.socket.parent / "vm" / pod_id[:16]  # vm_backend.backend: runtime_dir/vm/<id[:16]>


# ---- B: a bare QEMU boot ------------------------------------------------------------------------


async def _console_line(path: Path, text: str) -> float:
    """The perf_counter() at which `text` was seen in the console log (QEMU appends as the guest writes)."""
    while True:
        with contextlib.suppress(FileNotFoundError):
            if text.encode() in path.read_bytes():
                return time.perf_counter()
        await asyncio.sleep(0.005)


async def _bare_boot(run_dir: Path, assets: GuestAssets, cache_mib: int) -> tuple[float, float]:
    """(seconds to init's first line, seconds to the agent's Hello) of one boot."""
    spec = VmSpec(
        name=run_dir.name, run_dir=run_dir, kernel=assets.kernel, initramfs=assets.initramfs,
        userland=assets.userland, userland_bytes=assets.userland_bytes,
        accel="tcg", tcg_cache_mib=cache_mib, vcpus=VCPUS, memory_mib=MEMORY_MIB,
    )  # fmt: skip
    vm = QemuVm(spec)
    clients: list[AgentClient] = []

    async def agent_hello(vm: QemuVm) -> None:
        client = AgentClient(vm.spec.agent_socket, lambda event: None)
        clients.append(client)
        await client.start(timeout=60)

    started = time.perf_counter()
    init_seen = asyncio.create_task(_console_line(spec.console_log, INIT_LINE))
    try:
        await vm.start(ready=agent_hello, boot_timeout=60, retries=0)
        hello = time.perf_counter() - started
        to_init = await asyncio.wait_for(init_seen, 5) - started  # printed before the agent starts
    finally:
        init_seen.cancel()
        for client in clients:
            await client.close()
        await vm.kill()
    return to_init, hello


def bare_boot(run_dir: Path, assets: GuestAssets, cache_mib: int) -> tuple[float, float]:
    return asyncio.run(_bare_boot(run_dir, assets, cache_mib))


# ---- the three measurements ---------------------------------------------------------------------


def pool_ready(daemon: TandemDaemon) -> int:
    info = daemon.runtime.Status(pb.StatusRequest(verbose=True), timeout=30).info
    return int(json.loads(info["backends"])["vm"]["warmPool"]["ready"])


def warm_qmp_socket(daemon: TandemDaemon) -> Path:
    """The QMP socket of the one warm VM a `warm_pool = 1` daemon holds when its pool is full."""
    (socket,) = (daemon.socket.parent / "vm").glob("warm-*/vmm/qmp.sock")
    return socket


def wait_pool(daemon: TandemDaemon, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while pool_ready(daemon) < 1:
        if time.monotonic() > deadline:
            raise BenchError(f"the warm pool did not fill within {timeout:g} s")
        time.sleep(0.2)  # the poll interval of a deadline wait


def measure_pool(warm: Pods, cold: Pods, assets: GuestAssets, workdir: Path, samples: int, cache_mib: int) -> None:
    print(f"\n## 1a. VM pod start from the warm pool (W) vs cold (A) vs bare boot to init (B), {samples} samples")
    print("#  W: [vm] warm_pool = 1, the pool refilled (untimed) before each; the three alternate, first rotating")
    print(
        f"{'sample':>7} {'first':>6} {'W pool':>9} {'A cold':>9} {'B init':>9} {'W/B':>6} {'W/A':>6} {'A/B':>6}  load"
    )
    rows: list[tuple[float, float, float]] = []
    steps: list[tuple[float, float, float]] = []
    caches: list[tuple[CacheReading, CacheReading]] = []  # per W: the warm VM's cache before and after
    for n in range(samples):
        times: dict[str, float] = {}
        order = [("W", "A", "B"), ("A", "B", "W"), ("B", "W", "A")][n % 3]
        for side in order:
            if side == "W":
                wait_pool(warm.daemon)
                qmp_socket = warm_qmp_socket(warm.daemon)
                before = read_cache(qmp_socket)
                pod_id, times["W"] = warm.start(retries=1)
                after = read_cache(qmp_socket)
                steps.append(warm.last_steps)
                if before is not None and after is not None:
                    caches.append((before, after))
                warm.remove(pod_id)
            elif side == "A":
                pod_id, times["A"] = cold.start(retries=1)
                cold.remove(pod_id)
            else:
                times["B"], _ = bare_boot(workdir / "bare" / f"p{n + 1}", assets, cache_mib)
        w, a, b = times["W"], times["A"], times["B"]
        rows.append((w, a, b))
        print(f"{n + 1:>7} {order[0]:>6} {w:>8.3f}s {a:>8.3f}s {b:>8.3f}s {w / b:>6.2f} {w / a:>6.2f} {a / b:>6.2f}  "
              f"{os.getloadavg()[0]:.2f}", flush=True)  # fmt: skip
    wb, wa, ab = ([r[0] / r[2] for r in rows], [r[0] / r[1] for r in rows], [r[1] / r[2] for r in rows])
    print(
        f"pool: W median {statistics.median(r[0] for r in rows):.3f} s, "
        f"A median {statistics.median(r[1] for r in rows):.3f} s, "
        f"B median {statistics.median(r[2] for r in rows):.3f} s\n"
        f"pool: ratio W/B median {statistics.median(wb):.2f} ({min(wb):.2f} .. {max(wb):.2f}); goal <= 0.5\n"
        f"pool: ratio W/A median {statistics.median(wa):.2f}; cold A/B median {statistics.median(ab):.2f} (goal <= 2.0)"
    )
    runp, create, start = (statistics.median(step[i] for step in steps) for i in range(3))
    print(f"pool: W's steps, medians: RunPodSandbox {runp:.3f} s, CreateContainer {create:.3f} s, "
          f"StartContainer {start:.3f} s")  # fmt: skip
    if caches:
        capacity = caches[0][0].capacity / resources.MIB
        in_use = statistics.median(before.used for before, _ in caches) / resources.MIB
        translated = statistics.median(translated_between(before, after) for before, after in caches) / resources.MIB
        flushes = [after.flushes - before.flushes for before, after in caches]
        print(
            f"pool: the warm VM's translation cache ({capacity:.0f} MiB) during W, medians: {in_use:.1f} MiB in use "
            f"before, {translated:.1f} MiB of code translated, {statistics.median(flushes):g} flushes "
            f"(per sample: {flushes})"
        )
    wait_pool(warm.daemon)
    time.sleep(10)  # let the warm VM settle (free page reporting) before its PSS: a measurement, not a sync
    procs = processes_naming(str(warm.daemon.socket.parent / "vm" / "warm-"))
    parts = [f"{Path(cmd.split()[0]).name}[{pid}] {pss_kib(pid) / 1024:.1f}" for pid, cmd in sorted(procs.items())]
    total = sum(pss_kib(pid) for pid in procs)
    print(f"pool: PSS of one idle warm VM {total / 1024:.1f} MiB ({', '.join(parts) or 'no processes found'})")
    print(f"# {load()}")


def measure_start(pods: Pods, assets: GuestAssets, workdir: Path, samples: int, cache_mib: int) -> None:
    print(f"\n## 1. VM pod start (A) vs bare QEMU boot to init (B), {samples} samples, alternating")
    print("#  B: same kernel, initramfs and QEMU argv builder as Tandem, no tap NIC, no virtiofsd, until init's")
    print("#  first console line; H: the same boot until the agent answers Hello")
    print(f"{'sample':>7} {'first':>6} {'A pod':>9} {'B init':>9} {'H hello':>9} {'A/B':>6} {'A/H':>6}  load")
    samples_: list[tuple[float, float, float]] = []
    steps: list[tuple[float, float, float]] = []
    for n in range(samples):
        a = b = h = 0.0
        order = ("A", "B") if n % 2 == 0 else ("B", "A")
        for side in order:
            if side == "A":
                pod_id, a = pods.start(retries=1)
                steps.append(pods.last_steps)
                pods.remove(pod_id)
            else:
                b, h = bare_boot(workdir / "bare" / f"b{n + 1}", assets, cache_mib)
        samples_.append((a, b, h))
        print(f"{n + 1:>7} {order[0]:>6} {a:>8.3f}s {b:>8.3f}s {h:>8.3f}s {a / b:>6.2f} {a / h:>6.2f}  "
              f"{os.getloadavg()[0]:.2f}", flush=True)  # fmt: skip
    to_init = [a / b for a, b, _ in samples_]
    to_hello = [a / h for a, _, h in samples_]
    print(
        f"start: A median {statistics.median(a for a, _, _ in samples_):.3f} s, "
        f"B median {statistics.median(b for _, b, _ in samples_):.3f} s, "
        f"H median {statistics.median(h for _, _, h in samples_):.3f} s\n"
        f"start: ratio A/B median {statistics.median(to_init):.2f} ({min(to_init):.2f} .. {max(to_init):.2f}); "
        f"goal <= 2.0\n"
        f"start: ratio A/H median {statistics.median(to_hello):.2f} ({min(to_hello):.2f} .. {max(to_hello):.2f}) "
        "(what the pod adds once the agent is up)"
    )
    runp, create, start = (statistics.median(step[i] for step in steps) for i in range(3))
    print(f"start: A's steps, medians: RunPodSandbox {runp:.3f} s, CreateContainer {create:.3f} s, "
          f"StartContainer {start:.3f} s")  # fmt: skip
    print(f"# {load()}")


def measure_jail(jailed: Pods, unjailed: Pods, samples: int) -> None:
    print(f"\n## 1b. the jail's cost: VM pod start jailed (A) vs [vm] jail = false (U), {samples} samples, alternating")
    print(f"{'sample':>7} {'first':>6} {'A jailed':>9} {'U':>9} {'A/U':>6}  load")
    pairs: list[tuple[float, float]] = []
    for n in range(samples):
        times = {}
        order = ("A", "U") if n % 2 == 0 else ("U", "A")
        for side in order:
            pods = jailed if side == "A" else unjailed
            pod_id, times[side] = pods.start(retries=1)
            pods.remove(pod_id)
        pairs.append((times["A"], times["U"]))
        print(f"{n + 1:>7} {order[0]:>6} {times['A']:>8.3f}s {times['U']:>8.3f}s {times['A'] / times['U']:>6.3f}  "
              f"{os.getloadavg()[0]:.2f}", flush=True)  # fmt: skip
    ratios = [a / u for a, u in pairs]
    print(
        f"jail: A median {statistics.median(a for a, _ in pairs):.3f} s, "
        f"U median {statistics.median(u for _, u in pairs):.3f} s\n"
        f"jail: ratio A/U median {statistics.median(ratios):.3f} ({min(ratios):.3f} .. {max(ratios):.3f}); goal < 1.05"
    )
    jailer, cgroup = jail_fixed_cost(jailed.daemon.socket.parent / "vm" / "jail-ids")
    start = statistics.median(u for _, u in pairs)
    share = (jailer * 2 + cgroup) / start  # QEMU and virtiofsd both start through the jailer (virtiofsd unjailed)
    print(f"jail: fixed cost, medians of 20: the jailer {jailer * 1000:.1f} ms, the VM's cgroup {cgroup * 1000:.1f} ms;"
          f" at most {share:.2%} of U's median start")  # fmt: skip
    print(f"# {load()}")


def jail_fixed_cost(ids_dir: Path, samples: int = 20) -> tuple[float, float]:
    """(jailed - bare `qemu -version`, cgroup create + limits + remove), seconds, medians."""
    ids = JailIds(ids_dir, JAIL_UID_FIRST, JAIL_UID_COUNT)
    owner = f"bench-{os.getpid()}"
    uid = ids.allocate(owner)
    work = Path(tempfile.mkdtemp(prefix="jail-", dir=ids_dir.parent))
    qemu = ["/usr/bin/qemu-system-x86_64", "-version"]
    ro = [Path("/usr"), Path("/etc/ld.so.cache")]  # as for a VM
    jailed = Jail(uid, uid).qemu_prefix(root=work / "jail", netns=None, ro=ro, rw=[], devices=["null"])
    differences, cgroup_times = [], []
    try:
        for n in range(samples):
            times = {}
            for side in ("jailed", "bare") if n % 2 == 0 else ("bare", "jailed"):
                began = time.perf_counter()
                subprocess.run([*jailed, *qemu] if side == "jailed" else qemu, check=True, capture_output=True)
                times[side] = time.perf_counter() - began
            differences.append(times["jailed"] - times["bare"])
            path = f"/tandem-bench/{owner}-{n}"
            began = time.perf_counter()
            resources.create_cgroup(
                path, resources.vm_limits(VCPUS, MEMORY_MIB, resources.vmm_overhead_mib("tcg", TCG_CACHE_MIB))
            )
            cgroups.remove("/tandem-bench")
            cgroup_times.append(time.perf_counter() - began)
    finally:
        ids.release(owner)
        shutil.rmtree(work, ignore_errors=True)
    return statistics.median(differences), statistics.median(cgroup_times)


def measure_memory(pods: Pods, count: int, idle: float) -> None:
    print(f"\n## 2. host memory per idle VM pod: {count} pods, one `sleep 3600` container each, {idle:g} s idle")
    started = [pods.start(retries=1)[0] for _ in range(count)]
    processes = [processes_naming(str(pods.run_dir(pod_id))) for pod_id in started]
    cpu_before = [sum(cpu_seconds(pid) for pid in procs) for procs in processes]
    time.sleep(idle)
    cpu_after = [sum(cpu_seconds(pid) for pid in procs) for procs in processes]
    millicores = [(after - before) / idle * 1000 for before, after in zip(cpu_before, cpu_after, strict=True)]
    print(f"cpu: idle VM pod's QEMU + virtiofsd over {idle:g} s: mean {statistics.mean(millicores):.0f} millicores "
          f"(min {min(millicores):.0f}, max {max(millicores):.0f})")  # fmt: skip
    report_pss(pods, started, "KSM off" if not ksm_is_on() else "KSM on (found on: no figures without it)")
    if ksm_available() and not ksm_is_on():
        with ksm_on() as ksm:
            print(f"# {ksm.log[0]}")
            print(f"# {ksm_settle()}; {ksm.merged()}")
            report_pss(pods, started, "KSM on")
        print(f"# {ksm.log[-1]}")
    assert pods.daemon.process is not None
    print(f"memory: daemon PSS {pss_kib(pods.daemon.process.pid) / 1024:.1f} MiB (with {count} VM pods)")
    print(f"# {load()}; MemAvailable {mem_available_mib():.0f} MiB")
    for pod_id in started:
        pods.remove(pod_id)


def measure_density(pods: Pods, cap: int) -> None:
    print(f"\n## 3. density: idle VM pods one after another until the first failure or the cap of {cap}")
    print(f"# MemAvailable before {mem_available_mib():.0f} MiB; {load()}")
    started: list[str] = []
    failure = ""
    try:
        for n in range(cap):
            try:
                pod_id, elapsed = pods.start()
            except (grpc.RpcError, BenchError) as e:
                detail = f"{e.code().name}: {e.details()}" if isinstance(e, grpc.RpcError) else str(e)
                failure = f"pod {n + 1} failed: {detail}"
                break
            started.append(pod_id)
            print(f"  pod {n + 1:>3} started in {elapsed:.2f} s, MemAvailable {mem_available_mib():.0f} MiB, "
                  f"load {os.getloadavg()[0]:.2f}", flush=True)  # fmt: skip
        end = "" if failure else " (cap reached, no failure)"
        print(f"density: {len(started)} VM pods running{end}; MemAvailable at the end {mem_available_mib():.0f} MiB")
        if failure:
            print(f"density: {failure}")
        print(f"# {load()}")
        if started:
            density_memory(pods, started)
    finally:
        removing = time.perf_counter()
        for pod_id in started:
            pods.remove(pod_id)
        print(f"# removed {len(started)} pods in {time.perf_counter() - removing:.1f} s")


def pod_pss(pods: Pods, pod_id: str) -> tuple[int, dict[str, int], list[str]]:
    """PSS (KiB) of every process of the pod's VM (its cgroup's and any naming its run dir), QEMU's by kind."""
    run_dir = pods.run_dir(pod_id)
    procs = processes_naming(str(run_dir))
    procs |= {pid: "" for pid in cgroups.processes(resources.vm_cgroup("", pod_id)) if pid not in procs}
    state = pods.daemon.socket.parent.parent / "state"
    total = 0
    kinds: dict[str, int] = {}
    parts: list[str] = []
    for pid, cmdline in sorted(procs.items()):
        kib = pss_kib(pid)
        total += kib
        name = Path(cmdline.split()[0]).name if cmdline else f"pid {pid}"
        parts.append(f"{name}[{pid}] {kib / 1024:.1f}")
        if "qemu" in name:
            files = {str(path): kind for path, kind in guest_files(state).items()}
            kinds = pss_by_kind(pid, files)
    return total, kinds, parts


def guest_files(state: Path) -> dict[Path, str]:
    """The guest's files QEMU maps, by what they are (the assets `current` names in the daemon's state)."""
    assets = current_assets(state)
    if assets is None:
        return {}
    return {
        path.resolve(): kind
        for path, kind in (
            (assets.kernel, "kernel"),
            (assets.initramfs, "initramfs"),
            (assets.userland, "userland image"),
        )
    }


def report_pss(pods: Pods, started: list[str], label: str, each: bool = True) -> list[int]:
    """Every pod's PSS (each on a line, if `each`), then the mean and QEMU's by kind of mapping; the totals."""
    totals: list[int] = []
    kinds_sum: dict[str, int] = {}
    for pod_id in started:
        total, kinds, parts = pod_pss(pods, pod_id)
        totals.append(total)
        for kind, kib in kinds.items():
            kinds_sum[kind] = kinds_sum.get(kind, 0) + kib
        if each:
            print(f"pod {pod_id[:12]}: PSS {total / 1024:.1f} MiB  ({', '.join(parts) or 'no processes found'})")
    by_kind = ", ".join(f"{kind} {kib / len(started) / 1024:.1f}" for kind, kib in sorted(kinds_sum.items()))
    print(f"memory ({label}): mean PSS per idle VM pod {statistics.mean(totals) / 1024:.1f} MiB "
          f"(min {min(totals) / 1024:.1f}, max {max(totals) / 1024:.1f}); QEMU's, MiB: {by_kind}")  # fmt: skip
    return totals


def density_memory(pods: Pods, started: list[str]) -> None:
    """At the density reached: mean PSS per pod and MemAvailable with KSM as found, then with KSM on."""
    label = "KSM on, found on" if ksm_is_on() else "KSM off"
    report_pss(pods, started, f"{len(started)} pods, {label}", each=False)
    if ksm_available() and not ksm_is_on():
        before = mem_available_mib()
        with ksm_on() as ksm:
            print(f"# {ksm.log[0]}")
            print(f"# {ksm_settle()}; {ksm.merged()}")
            report_pss(pods, started, f"{len(started)} pods, KSM on", each=False)
            print(f"density: MemAvailable {before:.0f} MiB with KSM off, {mem_available_mib():.0f} MiB with KSM on")
        print(f"# {ksm.log[-1]}")


# ---- setting up and tearing down ----------------------------------------------------------------


def _wait_network_ready(daemon: TandemDaemon, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        status = daemon.runtime.Status(pb.StatusRequest(), timeout=10).status
        if any(c.type == "NetworkReady" and c.status for c in status.conditions):
            return
        if time.monotonic() > deadline:
            raise BenchError(f"tandem: network not ready after {timeout:g}s")
        time.sleep(0.2)


def _kill_leftovers(workdir: Path) -> None:
    """QEMU or virtiofsd processes still naming our work dir (a failed run): SIGKILL them, by pid."""
    for pid, cmdline in processes_naming(str(workdir)).items():
        if pid == os.getpid():
            continue
        print(f"# cleanup: killing leftover {pid}: {cmdline[:120]}", file=sys.stderr)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def start_tandem(
    stack: contextlib.ExitStack, tdir: Path, assets: GuestAssets, octet: int, vm_config: str
) -> TandemDaemon:
    """An isolated daemon under `tdir` on its own bridge, booting `assets` under TCG; torn down by `stack`."""
    root = assets_root(tdir / "state")
    root.mkdir(parents=True)
    (root / "current").symlink_to(assets.dir)
    bridge = write_network(tdir / "net.d", octet)
    stack.callback(_quietly("deleting the bridge", lambda: delete_bridge(bridge)))
    daemon = TandemDaemon.isolated(tdir, f'[vm]\naccel = "tcg"\n{vm_config}')
    stack.callback(_quietly("unmounting", lambda: daemon.unmount_workdir(tdir)))
    stack.callback(_quietly("killing leftovers", lambda: _kill_leftovers(tdir)))
    stack.callback(_quietly("stopping tandem", lambda: _stop_tandem(daemon)))
    daemon.start()
    return daemon


def start_unjailed(
    stack: contextlib.ExitStack, workdir: Path, assets: GuestAssets, image: str, octet: int, vm_config: str
) -> Pods:
    """A second daemon, the same but for `[vm] jail = false`."""
    daemon = start_tandem(stack, workdir / "unjailed", assets, octet, vm_config + "jail = false\n")
    pods = Pods(daemon, image, workdir / "logs-unjailed")
    stack.callback(_quietly("removing pods", pods.remove_all))
    daemon.images.PullImage(pb.PullImageRequest(image=pb.ImageSpec(image=image)), timeout=300)
    _wait_network_ready(daemon)
    return pods


def main(argv: Sequence[str] | None = None) -> int:
    try:
        return _run(argv)
    except (BenchError, RuntimeError, grpc.RpcError, subprocess.TimeoutExpired) as e:
        print(f"bench.vm: failed: {e}", file=sys.stderr)
        return 1


def _run(argv: Sequence[str] | None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.vm", description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=5, help="start samples per side (default 5)")
    parser.add_argument("--idle-pods", type=int, default=3, help="pods for the memory measurement (default 3)")
    parser.add_argument("--idle-seconds", type=float, default=10.0, help="idle wait before PSS (default 10)")
    parser.add_argument("--density-cap", type=int, default=150, help="most pods in the density run (default 150)")
    parser.add_argument("--skip", nargs="*", default=[], choices=["start", "pool", "jail", "memory", "density"])
    parser.add_argument("--keep", action="store_true", help="keep the work dir")
    parser.add_argument(
        "--tcg-cache-mib",
        type=int,
        default=TCG_CACHE_MIB,
        help=f"[vm] tcg_cache_mib of every VM (default {TCG_CACHE_MIB})",
    )
    args = parser.parse_args(argv)
    digest = asyncio.run(resolve_inputs()).digest()  # this checkout's guest: another checkout may own `current`
    assets = load_assets(assets_root(DEFAULT_STATE) / digest)
    if assets is None:
        print(f"no guest assets {digest} under {DEFAULT_STATE} (run `make setup`)", file=sys.stderr)
        return 1
    signal.signal(signal.SIGTERM, _sigterm)

    with contextlib.ExitStack() as stack:
        workdir = Path(tempfile.mkdtemp(prefix="tandem-bench-vm-"))
        stack.callback(_remove_workdir, workdir, args.keep)
        registry = stack.enter_context(LocalRegistry())
        image = f"{registry.host}/bench/busybox:1.0"
        push(registry.host, "bench/busybox", "1.0", busybox_image())
        octet, unjailed_octet, pool_octet = free_octets(3)

        stack.callback(_quietly("killing leftovers", lambda: _kill_leftovers(workdir)))  # the bare boots' too
        vm_config = f"tcg_cache_mib = {args.tcg_cache_mib}\n"  # every daemon's VMs, as the bare boots'
        daemon = start_tandem(stack, workdir / "tandem", assets, octet, vm_config)
        pods = Pods(daemon, image, workdir / "logs")
        stack.callback(_quietly("removing pods", pods.remove_all))
        stack.callback(_ignore_sigterm)
        daemon.images.PullImage(pb.PullImageRequest(image=pb.ImageSpec(image=image)), timeout=300)
        _wait_network_ready(daemon)

        v = daemon.runtime.Version(pb.VersionRequest(), timeout=10)
        print(f"# {v.runtime_name} {v.runtime_version}; guest assets {assets.digest} (kernel {assets.kernel_release}); "
              f"accel tcg, {VCPUS} vCPU, {MEMORY_MIB} MiB per VM, TCG cache {args.tcg_cache_mib} MiB")  # fmt: skip
        print(
            f"# {os.cpu_count()} CPUs, {load()}, MemAvailable {mem_available_mib():.0f} MiB; "
            "the machine is shared (other VM daemons may run)"
        )
        pod_id, elapsed = pods.start(retries=1)  # warm-up: imports, the accel choice, page cache
        pods.remove(pod_id)
        to_init, hello = bare_boot(workdir / "bare" / "w", assets, args.tcg_cache_mib)
        print(f"# warm-up (untimed): A {elapsed:.3f} s, B {to_init:.3f} s, H {hello:.3f} s")
        if "start" not in args.skip:
            measure_start(pods, assets, workdir, args.samples, args.tcg_cache_mib)
        if "pool" not in args.skip:
            daemon_w = start_tandem(stack, workdir / "pool", assets, pool_octet, vm_config + "warm_pool = 1\n")
            warm = Pods(daemon_w, image, workdir / "logs-pool")
            stack.callback(_quietly("removing pods", lambda: warm.remove_all() if daemon_w.process else None))
            daemon_w.images.PullImage(pb.PullImageRequest(image=pb.ImageSpec(image=image)), timeout=300)
            _wait_network_ready(daemon_w)
            wait_pool(daemon_w)
            pod_id, _ = warm.start(retries=1)  # warm-up, as for A
            warm.remove(pod_id)
            measure_pool(warm, pods, assets, workdir, args.samples, args.tcg_cache_mib)
            warm.remove_all()
            _stop_tandem(daemon_w)  # its refills must not load what is measured next
        if "jail" not in args.skip:
            unjailed = start_unjailed(stack, workdir, assets, image, unjailed_octet, vm_config)
            pod_id, elapsed = unjailed.start(retries=1)  # warm-up, as for A
            unjailed.remove(pod_id)
            measure_jail(pods, unjailed, args.samples)
        if "memory" not in args.skip:
            measure_memory(pods, args.idle_pods, args.idle_seconds)
        if "density" not in args.skip:
            measure_density(pods, args.density_cap)
    return 0


if __name__ == "__main__":
    sys.exit(main())
