"""A full node's steady load, Tandem vs containerd side by side in one run: kubelet's relist and stats calls.

    .venv/bin/python -m bench.node [--pods 500] [--calls 200] [--stats-calls 50] [--burst 50]
                                   [--burst-samples 3] [--vm-pods 30] [--skip trusted vm] [--keep]

Trusted part (issue #15): N pods with one busybox `sleep` container each, started on an
isolated Tandem and on a private containerd 1.6 (bench.containerd) running side by side,
each on its own /22 bridge (same plugins), with the same kubelet-like pod and container
configs (labels, annotations, a PID namespace per container), over gRPC. Then, with both
daemons holding N pods:
- ListPodSandbox, ListContainers (`--calls` each, no filter, as the PLEG relists),
  ListContainerStats and ListPodSandboxStats (`--stats-calls` each): client-side latency
  p50 / p99; calls alternate between the runtimes, which one goes first alternating too;
- the relist's CPU cost: the daemon process's CPU seconds (utime + stime, all threads)
  over 100 relists (ListPodSandbox + ListContainers), three rounds, the median;
- the daemon's RSS, and the per-pod helpers' PSS (Tandem: conmon, and catatonit where a
  pod has an infra container; containerd: the shim and the pause process) / N;
- `--burst` pods started at once (RunPodSandbox + CreateContainer + StartContainer each,
  in parallel): wall time until all run, `--burst-samples` times (removed again, untimed);
- teardown: every pod stopped and removed, 16 at a time, wall time.
Every figure gets its ratio Tandem / containerd.

VM part: `--vm-pods` idle VM pods (TCG) on a second Tandem daemon, the same list and
stats calls (goal: none over 50 ms p99), relist CPU, daemon RSS, and teardown; there is
no containerd counterpart.

Everything runs under one temp dir and is stopped, removed and unmounted on exit, also on
failure or SIGTERM. The machine may be shared: load averages are printed with the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import json
import os
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from bench.containerd import ContainerdInstance, installed
from bench.pods import (
    BenchError,
    _ignore_sigterm,
    _quietly,
    _reap_containerd,
    _reap_tandem,
    _remove_workdir,
    _sigterm,
    _stop_tandem,
    missing_tools,
    wait_network_ready,
)
from bench.vm import DEFAULT_STATE, _kill_leftovers, load, pss_kib
from core import cgroups
from protos import cri_pb2 as pb
from protos import cri_pb2_grpc
from sandbox.stats import STALE
from tests.support.daemon import TandemDaemon
from tests.support.images import busybox_image, push
from tests.support.network import PrivateNetwork, bridge_conflist, delete_bridge
from tests.support.registry import LocalRegistry
from vm_backend.guest_image import assets_root, ensure_assets

RPC_TIMEOUT = 300.0
POPULATE_WORKERS = 8
TEARDOWN_WORKERS = 16
RELISTS = 100
MIN_CALLS = 5
LIST_CALLS = ("ListPodSandbox", "ListContainers", "ListContainerStats", "ListPodSandboxStats")
_REQUESTS = {
    "ListPodSandbox": pb.ListPodSandboxRequest,
    "ListContainers": pb.ListContainersRequest,
    "ListContainerStats": pb.ListContainerStatsRequest,
    "ListPodSandboxStats": pb.ListPodSandboxStatsRequest,
}


# ---- one runtime under load -------------------------------------------------------------------


@dataclass
class Runtime:
    """A daemon as the kubelet drives it: gRPC, its process (for CPU and memory), and the pods it runs."""

    name: str
    runtime: cri_pb2_grpc.RuntimeServiceStub
    pid: int
    image: str
    log_root: Path
    cgroup_root: str = ""  # pods' cgroups go below it, as kubelet's go below /kubepods
    handler: str = ""
    helpers: Callable[[], list[int]] = list  # pids of the per-pod helper processes
    pods: list[str] = field(default_factory=list)
    count: int = 0
    ages: list[float] = field(default_factory=list)

    def start_pod(self) -> str:
        """RunPodSandbox + CreateContainer + StartContainer of one kubelet-like pod; its id."""
        self.count += 1
        name = f"node-{self.count}"
        uid = secrets.token_hex(16)
        config = pb.PodSandboxConfig(
            metadata=pb.PodSandboxMetadata(name=name, namespace="bench", uid=uid, attempt=0),
            hostname=name,
            log_directory=str(self.log_root / uid),
            dns_config=pb.DNSConfig(servers=["10.96.0.10"], searches=["bench.svc.cluster.local"], options=["ndots:5"]),
            labels={
                "app": "sleeper",
                "io.kubernetes.pod.name": name,
                "io.kubernetes.pod.namespace": "bench",
                "io.kubernetes.pod.uid": uid,
            },
            annotations={
                "kubernetes.io/config.seen": "2024-01-01T00:00:00.000000000Z",
                "kubernetes.io/config.source": "api",
            },
        )
        config.linux.security_context.namespace_options.pid = pb.CONTAINER
        config.linux.cgroup_parent = f"{self.cgroup_root}/pod{uid}"  # containerd's pod stats need one
        pod_id = self.runtime.RunPodSandbox(
            pb.RunPodSandboxRequest(config=config, runtime_handler=self.handler), timeout=RPC_TIMEOUT
        ).pod_sandbox_id
        container = pb.ContainerConfig(
            metadata=pb.ContainerMetadata(name="sleeper", attempt=0),
            image=pb.ImageSpec(image=self.image),
            command=["sleep", "3600"],
            log_path="sleeper/0.log",
            labels={
                "io.kubernetes.container.name": "sleeper",
                "io.kubernetes.pod.name": name,
                "io.kubernetes.pod.namespace": "bench",
                "io.kubernetes.pod.uid": uid,
            },
            annotations={"io.kubernetes.container.hash": "5a3f2a1c", "io.kubernetes.container.restartCount": "0"},
        )
        container.linux.security_context.namespace_options.pid = pb.CONTAINER
        cid = self.runtime.CreateContainer(
            pb.CreateContainerRequest(pod_sandbox_id=pod_id, config=container, sandbox_config=config),
            timeout=RPC_TIMEOUT,
        ).container_id
        self.runtime.StartContainer(pb.StartContainerRequest(container_id=cid), timeout=RPC_TIMEOUT)
        return pod_id

    def remove_pod(self, pod_id: str) -> None:
        self.runtime.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=pod_id), timeout=RPC_TIMEOUT)
        self.runtime.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=pod_id), timeout=RPC_TIMEOUT)

    def start_pods(self, count: int, workers: int) -> tuple[list[str], float]:
        """`count` pods started by `workers` threads at once; their ids and the wall time until all run."""
        began = time.perf_counter()
        with ThreadPoolExecutor(workers) as pool:
            started = list(pool.map(lambda _: self.start_pod(), range(count)))
        return started, time.perf_counter() - began

    def remove_pods(self, pod_ids: list[str], workers: int) -> float:
        began = time.perf_counter()
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(self.remove_pod, pod_ids))
        return time.perf_counter() - began

    def remove_everything(self) -> None:
        """Best effort, for cleanup: every pod the daemon lists."""
        with contextlib.suppress(grpc.RpcError):
            pods = self.runtime.ListPodSandbox(pb.ListPodSandboxRequest(), timeout=60).items
            self.remove_pods([p.id for p in pods], TEARDOWN_WORKERS)

    def call(self, method: str) -> float:
        """One list or stats call with no filter; its client-side latency in seconds.

        For a stats call, how old the figures it served were is added to `ages` (the median of its
        containers' CPU sample times, against the clock when the answer came).
        """
        request = _REQUESTS[method]()
        began = time.perf_counter()
        response = getattr(self.runtime, method)(request, timeout=RPC_TIMEOUT)
        elapsed = time.perf_counter() - began
        stamps = []
        if method == "ListContainerStats":
            stamps = [s.cpu.timestamp for s in response.stats]
        elif method == "ListPodSandboxStats":
            stamps = [c.cpu.timestamp for p in response.stats for c in p.linux.containers]
        if stamps:
            self.ages.append((time.time_ns() - statistics.median(stamps)) / 1e9)
        return elapsed

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime

    def rss_mib(self) -> float:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def helper_pss_mib(self) -> float:
        return sum(pss_kib(pid) for pid in self.helpers()) / 1024

    def relist_cpu(self, relists: int = RELISTS) -> float:
        """CPU seconds the daemon spent on `relists` relists (ListPodSandbox + ListContainers, as the PLEG)."""
        before = self.cpu_seconds()
        for _ in range(relists):
            self.call("ListPodSandbox")
            self.call("ListContainers")
        return self.cpu_seconds() - before


# ---- processes --------------------------------------------------------------------------------


def _process_table() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, command line with spaces) of every process."""
    table = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
            except OSError:
                continue
            table[int(entry.name)] = (int(stat.rsplit(")", 1)[1].split()[1]), cmdline)
    return table


def tandem_helpers(workdir: Path) -> Callable[[], list[int]]:
    """Tandem's per-pod helpers: conmon (one per container and infra container), and infra's catatonit."""

    def find() -> list[int]:
        table = _process_table()
        conmons = {
            p for p, (_, cmd) in table.items() if cmd.split(" ", 1)[0].endswith("conmon") and str(workdir) in cmd
        }
        infra = {p for p, (ppid, cmd) in table.items() if ppid in conmons and "catatonit" in cmd}
        return sorted(conmons | infra)

    return find


def containerd_helpers(socket: Path) -> Callable[[], list[int]]:
    """containerd's per-pod helpers: the runc shim (one per pod) and the pause process it holds."""

    def find() -> list[int]:
        table = _process_table()
        shims = {p for p, (_, cmd) in table.items() if "containerd-shim" in cmd and str(socket) in cmd}
        pauses = {p for p, (ppid, cmd) in table.items() if ppid in shims and cmd == "sleep infinity"}
        return sorted(shims | pauses)

    return find


def bench_cgroup(stack: contextlib.ExitStack) -> str:
    """A cgroup parent for this run's pods (kubelet's is /kubepods), removed on the way out, after the pods."""
    root = f"/tandem-bench-{secrets.token_hex(4)}"
    stack.callback(_quietly(f"removing the cgroups under {root}", lambda: cgroups.remove(root)))
    return root


# ---- networks ---------------------------------------------------------------------------------


def free_subnets(count: int, prefix: int = 22) -> list[ipaddress.IPv4Network]:
    """`count` 10.x.y.0/`prefix` networks that no address or route of this host overlaps."""
    out = subprocess.run(["ip", "-j", "-4", "route", "show", "table", "all"], capture_output=True, check=True).stdout
    used = [
        ipaddress.ip_network(r["dst"], strict=False)
        for r in json.loads(out or b"[]")
        if r.get("dst", "default") != "default"
    ]
    found: list[ipaddress.IPv4Network] = []
    for candidate in ipaddress.IPv4Network("10.128.0.0/9").subnets(new_prefix=prefix):
        if not any(candidate.overlaps(u) for u in used + found):
            found.append(candidate)
            if len(found) == count:
                return found
    raise BenchError(f"no {count} free /{prefix} networks under 10.128.0.0/9")


def write_network(conf_dir: Path, subnet: ipaddress.IPv4Network) -> str:
    """A bridge conflist on `subnet` in `conf_dir` (its leases beside it); the bridge's name."""
    network = PrivateNetwork(f"tdn{secrets.token_hex(3)}", subnet)
    conf_dir.mkdir(parents=True, exist_ok=True)
    (conf_dir / "10-node.conflist").write_text(json.dumps(bridge_conflist(network, conf_dir.parent / "ipam")))
    return network.bridge


# ---- measuring --------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def ms(value: float) -> str:
    return f"{value * 1000:.1f}"


def latencies(
    sides: Sequence[Runtime], method: str, calls: int, budget: float, pause: float = 0.0
) -> dict[str, list[float]]:
    """Up to `calls` timed calls per side after two untimed ones, alternating sides and which goes first,
    `pause` seconds between rounds; fewer (but at least MIN_CALLS) once a side's calls took more than
    `budget` seconds in all."""
    for side in sides:
        for _ in range(2):
            side.call(method)
        side.ages.clear()
    times: dict[str, list[float]] = {side.name: [] for side in sides}
    for n in range(calls):
        if n >= MIN_CALLS and any(sum(spent) > budget for spent in times.values()):
            break
        time.sleep(pause)
        for side in sides if n % 2 == 0 else sides[::-1]:
            times[side.name].append(side.call(method))
    return times


def latency_rows(sides: Sequence[Runtime], method: str, times: dict[str, list[float]], note: str = "") -> None:
    for q, label in ((0.5, "p50"), (0.99, "p99")):
        t = percentile(times[sides[0].name], q)
        c = percentile(times[sides[1].name], q) if len(sides) == 2 else None
        line = row(f"{method} {label}{note}", t * 1000, None if c is None else c * 1000, "ms")
        print(f"{line}  ({len(times[sides[0].name])} calls)", flush=True)
    if sides[0].ages:
        age = [statistics.median(side.ages) for side in sides]
        print(row("  age of the figures served, p50", age[0], age[1] if len(sides) == 2 else None, "s", "{:.2f}"))


def row(what: str, tandem: float, containerd: float | None, unit: str, fmt: str = "{:.1f}") -> str:
    t = fmt.format(tandem)
    if containerd is None:
        return f"{what:<34} {t:>10} {'':>10} {unit}"
    ratio = tandem / containerd if containerd else float("inf")
    return f"{what:<34} {t:>10} {fmt.format(containerd):>10} {unit:<4} {ratio:6.2f}"


def measure(sides: Sequence[Runtime], pods: int, args: argparse.Namespace) -> None:
    """Print latency, relist CPU and memory rows (with a containerd column when there are two sides)."""
    two = len(sides) == 2
    rss = [side.rss_mib() for side in sides]
    print(row("daemon RSS", rss[0], rss[1] if two else None, "MiB"), flush=True)
    pss = [side.helper_pss_mib() / pods for side in sides]
    if pss[0] or two:
        print(row("per-pod helper PSS", pss[0], pss[1] if two else None, "MiB", "{:.2f}"), flush=True)
    for method in LIST_CALLS[:2]:
        latency_rows(sides, method, latencies(sides, method, args.calls, args.budget))
    for method in LIST_CALLS[2:]:
        # each call as kubelet's every ~10 s: Tandem's last sample is too old, the call waits for a collection
        latency_rows(sides, method, latencies(sides, method, args.stats_calls, args.budget, args.stats_interval))
        # back to back (Tandem: served from the sample shared by the calls of the last second)
        latency_rows(sides[:1], method, latencies(sides[:1], method, args.calls, args.budget), " back-to-back")
    cpu = [statistics.median(side.relist_cpu() for _ in range(3)) for side in sides]
    print(row(f"relist CPU per {RELISTS} relists", cpu[0], cpu[1] if two else None, "s", "{:.2f}"), flush=True)


# ---- the two parts ----------------------------------------------------------------------------


def trusted(stack: contextlib.ExitStack, workdir: Path, registry: str, args: argparse.Namespace) -> None:
    image, pause = f"{registry}/bench/busybox:1.0", f"{registry}/bench/pause:1.0"
    tandem_net, containerd_net = free_subnets(2)
    cgroup_root = bench_cgroup(stack)
    tdir = workdir / "tandem"
    bridge = write_network(tdir / "net.d", tandem_net)
    stack.callback(_quietly("deleting tandem's bridge", lambda: delete_bridge(bridge)))
    daemon = TandemDaemon.isolated(tdir)
    stack.callback(_quietly("reaping tandem's pods", lambda: _reap_tandem(daemon, tdir)))
    stack.callback(_quietly("stopping tandem", lambda: _stop_tandem(daemon)))
    daemon.start(log_level="info")
    containerd = ContainerdInstance(workdir / "containerd", {registry: f"http://{registry}"}, sandbox_image=pause)
    cbridge = write_network(containerd.cni_dir, containerd_net)
    stack.callback(_quietly("deleting containerd's bridge", lambda: delete_bridge(cbridge)))
    stack.callback(_quietly("reaping containerd's pods", lambda: _reap_containerd(containerd)))
    stack.callback(_quietly("stopping containerd", containerd.stop))
    containerd.start()
    assert daemon.process is not None and containerd.process is not None
    sides = (
        Runtime(
            "tandem", daemon.runtime, daemon.process.pid, image, workdir / "logs-t",
            cgroup_root=f"{cgroup_root}/t", helpers=tandem_helpers(tdir),
        ),
        Runtime(
            "containerd", containerd.runtime, containerd.process.pid, image, workdir / "logs-c",
            cgroup_root=f"{cgroup_root}/c", helpers=containerd_helpers(containerd.socket),
        ),
    )  # fmt: skip
    for side in sides:
        stack.callback(_quietly(f"removing {side.name}'s pods", side.remove_everything))
    stack.callback(_ignore_sigterm)
    images = (daemon.images, containerd.images)
    for stub, ref in ((images[0], image), (images[1], image), (images[1], pause)):
        stub.PullImage(pb.PullImageRequest(image=pb.ImageSpec(image=ref)), timeout=RPC_TIMEOUT)
    for side in sides:
        wait_network_ready(side)  # type: ignore[arg-type]  # it needs .name and .runtime only

    print(f"# trusted: {args.pods} pods each, tandem on {tandem_net}, containerd on {containerd_net}; {load()}")
    for side in sides:
        side.pods, took = side.start_pods(args.pods, POPULATE_WORKERS)
        print(f"# {side.name}: {args.pods} pods started in {took:.0f} s ({POPULATE_WORKERS} at a time); {load()}")
    print(f"{'':<34} {'tandem':>10} {'containerd':>10} {'':<4} {'ratio':>6}")
    measure(sides, args.pods, args)
    bursts: dict[str, list[float]] = {side.name: [] for side in sides}
    for n in range(args.burst_samples):
        for side in sides if n % 2 == 0 else sides[::-1]:
            started, took = side.start_pods(args.burst, args.burst)
            bursts[side.name].append(took)
            side.remove_pods(started, TEARDOWN_WORKERS)
    t, c = statistics.median(bursts["tandem"]), statistics.median(bursts["containerd"])
    print(row(f"{args.burst} pods started at once", t, c, "s", "{:.2f}"), f"  (samples {bursts})")
    print(f"# before teardown: {load()}")
    teardown = {side.name: side.remove_pods(side.pods, TEARDOWN_WORKERS) for side in sides}
    print(row(f"teardown of {args.pods} pods", teardown["tandem"], teardown["containerd"], "s", "{:.1f}"))


def vm(stack: contextlib.ExitStack, workdir: Path, registry: str, args: argparse.Namespace) -> None:
    assets = asyncio.run(ensure_assets(DEFAULT_STATE))  # this checkout's guest (built if stale), not another's
    image = f"{registry}/bench/busybox:1.0"
    (subnet,) = free_subnets(1, 24)
    cgroup_root = bench_cgroup(stack)
    tdir = workdir / "vm"
    root = assets_root(tdir / "state")
    root.mkdir(parents=True)
    shutil.copytree(assets.dir, root / assets.dir.name, copy_function=os.link)  # kept if a newer build prunes it
    (root / "current").symlink_to(assets.dir.name)
    bridge = write_network(tdir / "net.d", subnet)
    stack.callback(_quietly("deleting the VM bridge", lambda: delete_bridge(bridge)))
    daemon = TandemDaemon.isolated(tdir, '[vm]\naccel = "tcg"\n')
    stack.callback(_quietly("unmounting", lambda: daemon.unmount_workdir(tdir)))
    stack.callback(_quietly("killing leftovers", lambda: _kill_leftovers(tdir)))
    stack.callback(_quietly("stopping the VM daemon", lambda: _stop_tandem(daemon)))
    daemon.start(log_level="info")
    assert daemon.process is not None
    side = Runtime(
        "tandem", daemon.runtime, daemon.process.pid, image, workdir / "logs-vm", cgroup_root=cgroup_root, handler="vm"
    )
    stack.callback(_quietly("removing the VM pods", side.remove_everything))
    daemon.images.PullImage(pb.PullImageRequest(image=pb.ImageSpec(image=image)), timeout=RPC_TIMEOUT)
    wait_network_ready(side)  # type: ignore[arg-type]
    print(f"\n# VM pods: {args.vm_pods} idle VM pods (TCG, one busybox sleep each) on {subnet}; {load()}")
    side.pods, took = side.start_pods(args.vm_pods, 2)
    print(f"# {args.vm_pods} VM pods started in {took:.0f} s (2 at a time); {load()}")
    print(f"{'':<34} {'tandem':>10}")
    measure([side], args.vm_pods, args)
    took_down = side.remove_pods(side.pods, TEARDOWN_WORKERS)
    print(row(f"teardown of {args.vm_pods} VM pods", took_down, None, "s"))


def main(argv: Sequence[str] | None = None) -> int:
    try:
        return _run(argv)
    except (BenchError, RuntimeError, grpc.RpcError, subprocess.TimeoutExpired) as e:
        print(f"bench.node: failed: {e}", file=sys.stderr)
        return 1


def _run(argv: Sequence[str] | None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.node", description=__doc__.split("\n")[0])
    parser.add_argument("--pods", type=int, default=500, help="trusted pods per runtime (default 500)")
    parser.add_argument("--calls", type=int, default=200, help="timed list calls per runtime (default 200)")
    parser.add_argument("--stats-calls", type=int, default=50, help="timed stats calls per runtime (default 50)")
    parser.add_argument(
        "--budget", type=float, default=120.0, help="seconds of calls per method and runtime, at most (default 120)"
    )
    parser.add_argument(
        "--stats-interval",
        type=float,
        default=STALE + 0.5,
        help=f"seconds between stats calls, so that each collects anew (default {STALE + 0.5:g})",
    )
    parser.add_argument("--burst", type=int, default=50, help="pods started at once (default 50)")
    parser.add_argument("--burst-samples", type=int, default=3, help="bursts per runtime (default 3)")
    parser.add_argument("--vm-pods", type=int, default=30, help="idle VM pods (default 30)")
    parser.add_argument("--skip", nargs="*", default=[], choices=["trusted", "vm"])
    parser.add_argument("--keep", action="store_true", help="keep the work dir")
    args = parser.parse_args(argv)
    if "trusted" not in args.skip and not installed():
        print("containerd is not installed; it is the reference: apt-get install containerd", file=sys.stderr)
        return 1
    if missing := missing_tools():
        print(f"bench.node needs: {'; '.join(missing)}", file=sys.stderr)
        return 1
    signal.signal(signal.SIGTERM, _sigterm)
    with contextlib.ExitStack() as stack:
        workdir = Path(tempfile.mkdtemp(prefix="tandem-bench-node-"))
        stack.callback(_remove_workdir, workdir, args.keep)
        registry = stack.enter_context(LocalRegistry())
        push(registry.host, "bench/busybox", "1.0", busybox_image())
        push(registry.host, "bench/pause", "1.0", busybox_image(cmd=("sleep", "infinity")))
        print(f"# {os.cpu_count()} CPUs; {load()}")
        if "trusted" not in args.skip:
            with contextlib.ExitStack() as part:
                trusted(part, workdir, registry.host, args)
        if "vm" not in args.skip:
            with contextlib.ExitStack() as part:
                vm(part, workdir, registry.host, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
