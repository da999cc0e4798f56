"""Trusted pod start and full pod cycle time, Tandem vs containerd, side by side in one run.

    .venv/bin/python -m bench.pods [--samples N] [--warmup N] [--keep]

As issue #3 asks, an operator's view: every step is one `crictl` process, and
what is timed is the sum of those processes' wall times.
- pod-start = `crictl runp` + `crictl create` + `crictl start` of one busybox
  container (`sleep 3600`) in one pod;
- pod-cycle = pod-start + `crictl stopp` + `crictl rmp`, the same five
  invocations of the same run (a cycle's first three steps are a pod start).
Prints one row per sample, then per step medians, then for each measure the
median Tandem and containerd times and the median of per-sample ratios
Tandem/containerd with their min and max (goal: ratio <= 0.8).

What keeps the comparison fair:
- everything is started here, under one temp dir on one filesystem: a
  LocalRegistry, an isolated Tandem and a private containerd 1.6
  (bench.containerd: cgroupfs, `restrict_oom_score_adj`, netns and runc state
  in its work dir as Tandem keeps them in its own); all of it is stopped and
  unmounted again, also on failure or SIGTERM;
- both get the same pod.json and container.json (a new pod name per sample),
  the same busybox image from that registry, pulled untimed beforehand, and a
  CNI bridge each (same plugins, different subnets); containerd's pause image
  is a busybox `sleep infinity` from the same registry, pulled untimed too;
- the same crictl binary with the same config shape drives both;
- runs alternate, and which side goes first alternates per sample, so drift in
  machine load and any first-mover cost hit both alike; ratios are per pair;
- before each timed run: nothing left of earlier pods (`crictl pods -q` and
  `crictl ps -aq` empty), the pod's log dir absent, and a sync();
- every run is checked, untimed, between start and stopp: pod READY with an
  address on its bridge, container RUNNING.
"""

from __future__ import annotations

import argparse
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
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

import grpc

from bench.containerd import ContainerdInstance, installed
from protos import cri_pb2 as pb
from protos import cri_pb2_grpc
from tests.support.daemon import TandemDaemon
from tests.support.images import busybox_image, push
from tests.support.network import PrivateNetwork, bridge_conflist, delete_bridge
from tests.support.registry import REGISTRY_BIN, LocalRegistry

STEPS = ("runp", "create", "start", "stopp", "rmp")
START_STEPS = STEPS[:3]
CRICTL_TIMEOUT = 120.0
CLEANUP_TIMEOUT = 60.0
NEEDED = {
    "runc": "apt-get install runc",
    "conmon": "apt-get install conmon",
    "containerd-shim-runc-v2": "apt-get install containerd",
    "/usr/lib/cni/bridge": "apt-get install containernetworking-plugins",
    "/usr/lib/cni/host-local": "apt-get install containernetworking-plugins",
    "/usr/lib/cni/portmap": "apt-get install containernetworking-plugins",
    str(REGISTRY_BIN): "apt-get install docker-registry",
}


class BenchError(RuntimeError):
    pass


# ---- crictl -----------------------------------------------------------------------------------


def find_crictl() -> str | None:
    return shutil.which("crictl")


@dataclass
class Side:
    """One runtime as an operator drives it: crictl with its own config file, plus gRPC for untimed checks."""

    name: str
    crictl: str
    config: Path  # crictl.yaml naming this runtime's socket
    runtime: cri_pb2_grpc.RuntimeServiceStub
    octet: int  # its pods get 10.<octet>.0.0/24
    times: dict[str, list[float]] = field(default_factory=lambda: {step: [] for step in STEPS})

    @classmethod
    def create(
        cls, name: str, crictl: str, socket: Path, runtime: cri_pb2_grpc.RuntimeServiceStub, octet: int, workdir: Path
    ) -> Side:
        config = workdir / f"crictl-{name}.yaml"
        endpoint = f"unix://{socket}"
        config.write_text(
            f"runtime-endpoint: {endpoint}\nimage-endpoint: {endpoint}\ntimeout: 60\ndebug: false\n"
            "pull-image-on-create: false\ndisable-pull-on-run: true\n"
        )
        return cls(name, crictl, config, runtime, octet)

    def run(self, *args: str, timeout: float = CRICTL_TIMEOUT) -> tuple[str, float]:
        """One crictl process; its stdout and wall time. A failure is a BenchError with crictl's stderr."""
        argv = [self.crictl, "--config", str(self.config), *args]
        started = time.perf_counter()
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
        elapsed = time.perf_counter() - started
        if done.returncode != 0:
            raise BenchError(f"{self.name}: crictl {' '.join(args)} failed ({done.returncode}): {done.stderr.strip()}")
        return done.stdout.strip(), elapsed

    def leftovers(self) -> list[str]:
        pods, _ = self.run("pods", "-q")
        containers, _ = self.run("ps", "-aq")
        return [f"pod {p}" for p in pods.split()] + [f"container {c}" for c in containers.split()]

    def remove_everything(self) -> None:
        """Best effort, for cleanup: stop and remove every pod (and so every container)."""
        with contextlib.suppress(BenchError, subprocess.TimeoutExpired):
            self.run("rmp", "--all", "--force", timeout=CLEANUP_TIMEOUT)


# ---- one sample -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sample:
    label: str
    pod_json: Path
    container_json: Path
    log_dir: Path


def write_sample(directory: Path, label: str, image: str) -> Sample:
    """pod.json and container.json as kubelet would send them; both runtimes get these very files.

    kubelet asks for a PID namespace per container (namespace mode CONTAINER) unless the pod sets
    shareProcessNamespace; a bare crictl pod.json would mean the rarer shared one (mode POD).
    """
    name = f"bench-{label}"
    log_dir = directory / "logs" / label
    per_container_pid = {"security_context": {"namespace_options": {"pid": 1}}}  # 1 = CONTAINER
    pod = {
        "metadata": {"name": name, "namespace": "bench", "uid": secrets.token_hex(16), "attempt": 0},
        "hostname": name,
        "log_directory": str(log_dir),
        "linux": per_container_pid,
    }
    container = {
        "metadata": {"name": "sleeper", "attempt": 0},
        "image": {"image": image},
        "command": ["sleep", "3600"],
        "log_path": "sleeper.log",
        "linux": per_container_pid,
    }
    pod_json, container_json = directory / f"pod-{label}.json", directory / f"container-{label}.json"
    pod_json.write_text(json.dumps(pod, indent=2))
    container_json.write_text(json.dumps(container, indent=2))
    return Sample(label, pod_json, container_json, log_dir)


def timed_cycle(side: Side, sample: Sample) -> dict[str, float]:
    """runp, create, start, (untimed check), stopp, rmp; the wall time of each crictl process."""
    left = side.leftovers()
    if left:
        raise BenchError(f"{side.name}: left over from an earlier run: {', '.join(left)}")
    shutil.rmtree(sample.log_dir, ignore_errors=True)  # each side creates the pod's log dir itself
    os.sync()
    times: dict[str, float] = {}
    pod_id, times["runp"] = side.run("runp", str(sample.pod_json))
    cid, times["create"] = side.run("create", pod_id, str(sample.container_json), str(sample.pod_json))
    _, times["start"] = side.run("start", cid)
    check_running(side, pod_id, cid)
    _, times["stopp"] = side.run("stopp", pod_id)
    _, times["rmp"] = side.run("rmp", pod_id)
    left = side.leftovers()
    if left:
        raise BenchError(f"{side.name}: still there after rmp: {', '.join(left)}")
    return times


def check_running(side: Side, pod_id: str, cid: str) -> None:
    """Untimed: the pod is READY on its own bridge subnet and the container RUNNING."""
    pod = side.runtime.PodSandboxStatus(pb.PodSandboxStatusRequest(pod_sandbox_id=pod_id), timeout=30).status
    if pod.state != pb.SANDBOX_READY:
        raise BenchError(f"{side.name}: pod {pod_id} is {pb.PodSandboxState.Name(pod.state)} after start")
    if not pod.network.ip.startswith(f"10.{side.octet}.0."):
        raise BenchError(f"{side.name}: pod {pod_id} has IP {pod.network.ip!r}, not one on 10.{side.octet}.0.0/24")
    state = side.runtime.ContainerStatus(pb.ContainerStatusRequest(container_id=cid), timeout=30).status.state
    if state != pb.CONTAINER_RUNNING:
        raise BenchError(f"{side.name}: container {cid} is {pb.ContainerState.Name(state)} after start")


# ---- reporting --------------------------------------------------------------------------------


def start_time(times: dict[str, float]) -> float:
    return sum(times[step] for step in START_STEPS)


def cycle_time(times: dict[str, float]) -> float:
    return sum(times[step] for step in STEPS)


def row(label: str, first: str, tandem: dict[str, float], containerd: dict[str, float]) -> str:
    ts, cs, tc, cc = start_time(tandem), start_time(containerd), cycle_time(tandem), cycle_time(containerd)
    return f"{label:>7} {first:>10} {ts:>9.3f}s {cs:>9.3f}s {ts / cs:>6.2f} {tc:>9.3f}s {cc:>9.3f}s {tc / cc:>6.2f}"


def summary(name: str, pairs: Sequence[tuple[float, float]]) -> str:
    ratios = [t / c for t, c in pairs]
    return (
        f"{name}: tandem {statistics.median(t for t, _ in pairs):.3f} s "
        f"containerd {statistics.median(c for _, c in pairs):.3f} s "
        f"ratio {statistics.median(ratios):.2f} ({min(ratios):.2f} .. {max(ratios):.2f})"
    )


def step_medians(tandem: Side, containerd: Side) -> str:
    ms = {
        side.name: {step: statistics.median(side.times[step]) * 1000 for step in STEPS} for side in (tandem, containerd)
    }
    parts = [f"{step} {ms['tandem'][step]:.0f}/{ms['containerd'][step]:.0f}" for step in STEPS]
    return "# per step, median ms tandem/containerd: " + ", ".join(parts)


# ---- setting up and tearing down --------------------------------------------------------------


def free_octets(count: int) -> list[int]:
    """`count` values X for 10.X.0.0/24 subnets that no local address or route overlaps."""
    used = []
    for cmd in (["ip", "-4", "-o", "addr"], ["ip", "-4", "route"]):
        out = subprocess.run(cmd, capture_output=True, text=True, check=False).stdout
        for word in out.split():
            with contextlib.suppress(ValueError):
                if word[0].isdigit() and "." in word:
                    used.append(ipaddress.ip_network(word, strict=False))
    found = [
        x for x in range(250, 200, -1) if not any(ipaddress.ip_network(f"10.{x}.0.0/24").overlaps(net) for net in used)
    ]
    if len(found) < count:
        raise BenchError("no free 10.X.0.0/24 subnets for the pod bridges")
    return found[:count]


def write_network(conf_dir: Path, octet: int) -> str:
    """A private bridge network on 10.<octet>.0.0/24 written into `conf_dir`; returns the bridge's name."""
    network = PrivateNetwork(f"tdt{secrets.token_hex(3)}", ipaddress.IPv4Network(f"10.{octet}.0.0/24"))
    conf_dir.mkdir(parents=True, exist_ok=True)
    (conf_dir / "10-test.conflist").write_text(json.dumps(bridge_conflist(network, conf_dir.parent / "ipam")))
    return network.bridge


def wait_network_ready(side: Side, timeout: float = 20.0) -> None:
    """Both runtimes must report NetworkReady (a loaded CNI config) before the first pod."""
    deadline = time.monotonic() + timeout
    while True:
        status = side.runtime.Status(pb.StatusRequest(), timeout=10).status
        network = [c for c in status.conditions if c.type == "NetworkReady"]
        if network and network[0].status:
            return
        if time.monotonic() > deadline:
            detail = f"{network[0].reason}: {network[0].message}" if network else "no NetworkReady condition"
            raise BenchError(f"{side.name}: network not ready after {timeout:g}s ({detail})")
        time.sleep(0.2)


def missing_tools() -> list[str]:
    missing = []
    for tool, fix in NEEDED.items():
        if (shutil.which(tool) if "/" not in tool else (tool if Path(tool).exists() else None)) is None:
            missing.append(f"{tool} ({fix})")
    return missing


def _quietly(what: str, fn: Callable[[], object]) -> Callable[[], None]:
    """A cleanup step that reports its failure and lets the next steps run."""

    def step() -> None:
        try:
            fn()
        except Exception as e:
            print(f"# cleanup: {what} failed: {e}", file=sys.stderr)

    return step


def _sigterm(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)  # unwinds the ExitStack: everything started gets stopped


def _ignore_sigterm() -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # cleanup has begun: let it finish


def _stop_tandem(daemon: TandemDaemon) -> None:
    try:
        daemon.stop()
    except subprocess.TimeoutExpired:
        daemon.kill()


def _reap_tandem(daemon: TandemDaemon, workdir: Path) -> None:
    """After the daemon stopped: kill any container its pods left (conmon follows), unmount its dir.

    A pod's infra container has the pod's ID, which also names the pod cgroup Tandem would have removed.
    """
    runc_root = workdir / "run" / "runc" / "root"
    left = []
    if runc_root.is_dir():
        listed = subprocess.run(["runc", "--root", str(runc_root), "list", "-q"], capture_output=True, text=True)
        left = listed.stdout.split()
    for cid in left:
        print(f"# cleanup: tandem left runc container {cid}", file=sys.stderr)
        subprocess.run(["runc", "--root", str(runc_root), "delete", "--force", cid], capture_output=True)
    for cid in left:  # v1 and hybrid hierarchies, then plain v2
        for cgroup in [*Path("/sys/fs/cgroup").glob(f"*/tandem/{cid}"), Path("/sys/fs/cgroup/tandem", cid)]:
            with contextlib.suppress(OSError):
                cgroup.rmdir()
    daemon.unmount_workdir(workdir)


def _reap_containerd(containerd: ContainerdInstance) -> None:
    for thing in containerd.reap():
        if not thing.startswith("mount "):
            print(f"# cleanup: containerd left {thing}", file=sys.stderr)


def _remove_workdir(workdir: Path, keep: bool) -> None:
    with open("/proc/self/mountinfo") as f:
        mounted = [line.split()[4] for line in f if line.split()[4].startswith(f"{workdir}/")]
    if mounted:
        print(f"# cleanup: still mounted, {workdir} kept: {', '.join(mounted)}", file=sys.stderr)
    elif keep:
        print(f"# work dir kept: {workdir}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)


def _version(runtime: cri_pb2_grpc.RuntimeServiceStub) -> str:
    v = runtime.Version(pb.VersionRequest(), timeout=10)
    return f"{v.runtime_name} {v.runtime_version}"


# ---- main -------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    try:
        return _run(argv)
    except (BenchError, RuntimeError, grpc.RpcError, subprocess.TimeoutExpired) as e:  # all stopped by now
        print(f"bench.pods: failed: {e}", file=sys.stderr)
        return 1


def _run(argv: Sequence[str] | None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.pods", description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=20, help="timed samples (default 20)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed samples first (default 1)")
    parser.add_argument("--keep", action="store_true", help="keep the work dir (daemon logs, configs, pod json)")
    args = parser.parse_args(argv)
    if args.samples < 1 or args.warmup < 0:
        parser.error("--samples must be >= 1 and --warmup >= 0")
    crictl = find_crictl()
    if crictl is None:
        print(
            "bench.pods needs crictl (cri-tools v1.36) on PATH, and none was found: it times crictl runp/create/"
            "start/stopp/rmp as an operator runs them. README.md, 'Getting crictl and critest', says where to "
            "get it.",
            file=sys.stderr,
        )
        return 1
    if not installed():
        print("containerd is not installed; it is the reference: apt-get install containerd", file=sys.stderr)
        return 1
    if missing := missing_tools():
        print(f"bench.pods needs: {'; '.join(missing)}", file=sys.stderr)
        return 1
    signal.signal(signal.SIGTERM, _sigterm)

    with contextlib.ExitStack() as stack:
        workdir = Path(tempfile.mkdtemp(prefix="tandem-bench-pods-"))
        stack.callback(_remove_workdir, workdir, args.keep)
        registry = stack.enter_context(LocalRegistry())
        image = f"{registry.host}/bench/busybox:1.0"
        pause = f"{registry.host}/bench/pause:1.0"
        push(registry.host, "bench/busybox", "1.0", busybox_image())
        push(registry.host, "bench/pause", "1.0", busybox_image(cmd=("sleep", "infinity")))
        tandem_octet, containerd_octet = free_octets(2)

        (workdir / "tandem").mkdir()
        tandem_network = PrivateNetwork(
            f"tdt{secrets.token_hex(3)}", ipaddress.IPv4Network(f"10.{tandem_octet}.0.0/24")
        )
        tandem_conf = workdir / "tandem" / "net.d"
        tandem_conf.mkdir()
        tandem_conflist = bridge_conflist(tandem_network, tandem_conf.parent / "ipam")
        (tandem_conf / "10-test.conflist").write_text(json.dumps(tandem_conflist))
        tandem_bridge = tandem_network.bridge
        stack.callback(_quietly("deleting tandem's bridge", lambda: delete_bridge(tandem_bridge)))
        tandem = TandemDaemon.isolated(workdir / "tandem")
        stack.callback(_quietly("reaping tandem's pods", lambda: _reap_tandem(tandem, workdir / "tandem")))
        stack.callback(_quietly("stopping tandem", lambda: _stop_tandem(tandem)))
        tandem.start()

        containerd = ContainerdInstance(
            workdir / "containerd", {registry.host: f"http://{registry.host}"}, sandbox_image=pause
        )
        containerd_bridge = write_network(containerd.cni_dir, containerd_octet)
        stack.callback(_quietly("deleting containerd's bridge", lambda: delete_bridge(containerd_bridge)))
        stack.callback(_quietly("reaping containerd's pods", lambda: _reap_containerd(containerd)))
        stack.callback(_quietly("stopping containerd", containerd.stop))
        containerd.start()

        sides = (
            Side.create("tandem", crictl, tandem.socket, tandem.runtime, tandem_octet, workdir),
            Side.create("containerd", crictl, containerd.socket, containerd.runtime, containerd_octet, workdir),
        )
        for side in sides:  # runs first on the way out: pods go through CRI while the daemons still run
            stack.callback(_quietly(f"removing {side.name}'s pods", side.remove_everything))
        stack.callback(_ignore_sigterm)

        for side in sides:
            side.run("pull", image, timeout=300)
            wait_network_ready(side)
        sides[1].run("pull", pause, timeout=300)

        crictl_version, _ = sides[0].run("--version")
        print(f"# {_version(tandem.runtime)} vs {_version(containerd.runtime)}; {crictl_version}")
        print(f"# {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}; pods on 10.{tandem_octet}.0.0/24 "
              f"(tandem) and 10.{containerd_octet}.0.0/24 (containerd)")  # fmt: skip
        print(f"# {args.samples} samples after {args.warmup} warm-up; the side that goes first alternates")
        print(f"{'sample':>7} {'first':>10} {'start: T':>10} {'C':>10} {'ratio':>6} {'cycle: T':>10} {'C':>10} "
              f"{'ratio':>6}")  # fmt: skip

        start_pairs: list[tuple[float, float]] = []
        cycle_pairs: list[tuple[float, float]] = []
        for n in range(-args.warmup, args.samples):
            label = f"w{n + args.warmup + 1}" if n < 0 else f"s{n + 1}"
            sample = write_sample(workdir, label, image)
            order = sides if n % 2 == 0 else sides[::-1]
            result = {side.name: timed_cycle(side, sample) for side in order}
            t, c = result["tandem"], result["containerd"]
            print(row("warm-up" if n < 0 else str(n + 1), order[0].name, t, c), flush=True)
            if n < 0:
                continue
            for side in sides:
                for step in STEPS:
                    side.times[step].append(result[side.name][step])
            start_pairs.append((start_time(t), start_time(c)))
            cycle_pairs.append((cycle_time(t), cycle_time(c)))

        print()
        print(step_medians(*sides))
        print(summary("pod-start", start_pairs))
        print(summary("pod-cycle", cycle_pairs))
        print("# goal: ratio <= 0.8 for both")
    return 0


if __name__ == "__main__":
    sys.exit(main())
