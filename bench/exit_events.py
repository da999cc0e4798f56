"""How soon a container's exit reaches GetContainerEvents, on both paths (issue #11).

    .venv/bin/python -m bench.exit_events [--samples N] [--skip runc|vm]

For each sample a busybox `true` (it exits at once) is created and started in a
pod of the path measured; the number is the time from StartContainer returning
to the CONTAINER_STOPPED_EVENT of that container on a GetContainerEvents stream
opened before (what kubelet's evented PLEG waits for). Medians per path; goal
<= 0.2 s. Everything talks gRPC to an isolated daemon under one temp dir (its
own registry, CNI bridge and state), removed on exit.
"""

from __future__ import annotations

import argparse
import contextlib
import queue
import signal
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import grpc

from bench.pods import BenchError, _quietly, _remove_workdir, _sigterm, _stop_tandem
from protos import cri_pb2 as pb
from tests.support.daemon import TandemDaemon
from tests.support.images import busybox_image, push
from tests.support.network import delete_bridge, write_bridge_network
from tests.support.pods import container_config, pod_config
from tests.support.registry import LocalRegistry
from vm_backend.guest_image import assets_root, current_assets

DEFAULT_STATE = Path("/var/lib/tandem")
RPC_TIMEOUT = 180.0
EVENT_TIMEOUT = 30.0


class StoppedEvents:
    """A GetContainerEvents stream read by a thread: (monotonic arrival, container id) of each stop."""

    def __init__(self, daemon: TandemDaemon) -> None:
        self.arrivals: queue.Queue[tuple[float, str]] = queue.Queue()
        self._stream = daemon.runtime.GetContainerEvents(pb.GetEventsRequest())
        self._thread = threading.Thread(target=self._read, name="events", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        with contextlib.suppress(grpc.RpcError):
            for event in self._stream:
                if event.container_event_type == pb.CONTAINER_STOPPED_EVENT:
                    self.arrivals.put((time.monotonic(), event.container_id))

    def wait(self, container_id: str) -> float:
        """When the stop event of `container_id` arrived (others are dropped)."""
        deadline = time.monotonic() + EVENT_TIMEOUT
        while True:
            try:
                at, cid = self.arrivals.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise BenchError(f"no CONTAINER_STOPPED_EVENT for {container_id} within {EVENT_TIMEOUT:g}s") from None
            if cid == container_id:
                return at

    def close(self) -> None:
        self._stream.cancel()
        self._thread.join(5)


def measure(daemon: TandemDaemon, events: StoppedEvents, handler: str, image: str, logs: Path, samples: int) -> float:
    rt = daemon.runtime
    pod = pod_config(f"exits-{handler}", logs / handler)
    pod_id = rt.RunPodSandbox(pb.RunPodSandboxRequest(config=pod, runtime_handler=handler), timeout=RPC_TIMEOUT)
    pod_id = pod_id.pod_sandbox_id
    latencies = []
    try:
        for n in range(samples + 1):  # the first one warms up, untimed
            config = container_config(f"true{n}", image, "true")
            request = pb.CreateContainerRequest(pod_sandbox_id=pod_id, config=config, sandbox_config=pod)
            cid = rt.CreateContainer(request, timeout=RPC_TIMEOUT).container_id
            rt.StartContainer(pb.StartContainerRequest(container_id=cid), timeout=RPC_TIMEOUT)
            started = time.monotonic()
            latency = events.wait(cid) - started
            if n:
                latencies.append(latency)
                print(f"  {handler} sample {n}: {latency * 1000:.0f} ms", flush=True)
            rt.RemoveContainer(pb.RemoveContainerRequest(container_id=cid), timeout=RPC_TIMEOUT)
    finally:
        rt.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=pod_id), timeout=RPC_TIMEOUT)
        rt.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=pod_id), timeout=RPC_TIMEOUT)
    median = statistics.median(latencies)
    spread = f"{min(latencies) * 1000:.0f} .. {max(latencies) * 1000:.0f}"
    print(f"{handler}: StartContainer -> CONTAINER_STOPPED_EVENT median {median * 1000:.0f} ms ({spread}, "
          f"{samples} samples); goal <= 200 ms")  # fmt: skip
    return median


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.exit_events", description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=7, help="timed samples per path (default 7)")
    parser.add_argument("--skip", nargs="*", default=[], choices=["runc", "vm"])
    parser.add_argument("--keep", action="store_true", help="keep the work dir")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, _sigterm)
    try:
        with contextlib.ExitStack() as stack:
            workdir = Path(tempfile.mkdtemp(prefix="tandem-bench-exits-"))
            stack.callback(_remove_workdir, workdir, args.keep)
            registry = stack.enter_context(LocalRegistry())
            image = f"{registry.host}/bench/busybox:1.0"
            push(registry.host, "bench/busybox", "1.0", busybox_image())
            tdir = workdir / "tandem"
            assets = current_assets(DEFAULT_STATE)
            if assets is not None:
                root = assets_root(tdir / "state")
                root.mkdir(parents=True)
                (root / "current").symlink_to(assets.dir)
            elif "vm" not in args.skip:
                raise BenchError(f"no guest assets under {DEFAULT_STATE} (run `make setup`) or --skip vm")
            bridge = write_bridge_network(tdir / "net.d").bridge
            stack.callback(_quietly("deleting the bridge", lambda: delete_bridge(bridge)))
            daemon = TandemDaemon.isolated(tdir, '[vm]\naccel = "tcg"\n')
            stack.callback(_quietly("unmounting", lambda: daemon.unmount_workdir(workdir)))
            stack.callback(_quietly("stopping tandem", lambda: _stop_tandem(daemon)))
            daemon.start()
            daemon.images.PullImage(pb.PullImageRequest(image=pb.ImageSpec(image=image)), timeout=300)
            events = StoppedEvents(daemon)
            stack.callback(events.close)
            for handler in ("runc", "vm"):
                if handler not in args.skip:
                    measure(daemon, events, handler, image, workdir / "logs", args.samples)
    except (BenchError, RuntimeError, grpc.RpcError) as e:
        print(f"bench.exit_events: failed: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
