"""Helpers for tests that run pods: CRI request builders, the CRI log format, leftovers, teardown."""

from __future__ import annotations

import re
import secrets
import subprocess
from collections.abc import Iterator
from pathlib import Path

from protos import cri_pb2 as pb
from tests.support.daemon import TandemDaemon
from tests.support.network import delete_bridge

CRI_LOG_LINE = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{9}(?:Z|[+-]\d\d:\d\d)) (stdout|stderr) ([PF]) (.*)$")
"""One line of a CRI container log: RFC 3339 time with nanoseconds, stream, Partial or Full, text."""


def log_entries(path: Path) -> list[tuple[str, str, str, str]]:
    """A CRI log file as (time, stream, tag, text) tuples; a line that does not match fails the test."""
    entries = []
    for line in path.read_text().splitlines():
        match = CRI_LOG_LINE.match(line)
        assert match is not None, f"not a CRI log line: {line!r}"
        entries.append(match.groups())
    return entries


def pod_config(name: str, log_dir: Path, **annotations: str) -> pb.PodSandboxConfig:
    return pb.PodSandboxConfig(
        metadata=pb.PodSandboxMetadata(name=name, namespace="tests", uid=secrets.token_hex(8), attempt=0),
        hostname=name,
        log_directory=str(log_dir),
        annotations=annotations,
        dns_config=pb.DNSConfig(servers=["10.0.0.10"], searches=["tests.svc.cluster.local"], options=["ndots:5"]),
    )


def container_config(name: str, image: str, *command: str, tty: bool = False) -> pb.ContainerConfig:
    return pb.ContainerConfig(
        metadata=pb.ContainerMetadata(name=name, attempt=0),
        image=pb.ImageSpec(image=image),
        command=list(command),
        log_path=f"{name}.log",
        tty=tty,
    )


def next_event(events: Iterator[pb.ContainerEventResponse], container_id: str, kind: int) -> pb.ContainerEventResponse:
    """The next event of `kind` for `container_id` on a GetContainerEvents stream (opened with a deadline)."""
    for event in events:
        if event.container_id == container_id and event.container_event_type == kind:
            return event
    raise AssertionError(f"the event stream ended before a {pb.ContainerEventType.Name(kind)} for {container_id}")


def pod_leftovers(daemon: TandemDaemon, processes: tuple[str, ...], roots: tuple[str, ...]) -> list[str]:
    """Anything of a pod's still on the host: mounts under the daemon's dirs, netns files, and per-pod
    processes (`processes` names, e.g. conmon or qemu) whose command line names one of `roots`.

    The netns directory's, the runc pod directories' and the VM run dirs' own private bind mounts stay:
    they are the daemon's, made once, not a pod's.
    """
    found = []
    state, run = str(daemon.state_dir), str(daemon.socket.parent)
    daemons = (f"{run}/netns", f"{run}/runc/pods", f"{run}/vm")
    for line in open("/proc/self/mountinfo"):
        mount_point = line.split()[4]
        if (mount_point.startswith(state) or mount_point.startswith(f"{run}/")) and mount_point not in daemons:
            found.append(f"mount: {mount_point}")
    found += [f"netns: {p.name}" for p in (daemon.socket.parent / "netns").iterdir()]
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    found += [
        f"process: {p}"
        for p in ps.splitlines()
        if any(name in p for name in processes) and any(root in p for root in roots)
    ]
    return found


def remove_pods_and_stop(daemon: TandemDaemon, workdir: Path, bridge: str) -> None:
    """A pod test's teardown: every pod stopped and removed, the daemon stopped, its mounts and bridges gone;
    the daemon, mounts and bridges go even when removing a pod fails (the failure is still raised)."""
    try:
        for sandbox in daemon.runtime.ListPodSandbox(pb.ListPodSandboxRequest()).items:
            daemon.runtime.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=sandbox.id))
            daemon.runtime.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=sandbox.id))
    finally:
        daemon.stop()
        daemon.unmount_workdir(workdir)
        delete_bridge(bridge)
        if daemon.default_network is not None:
            delete_bridge(daemon.default_network.bridge)
