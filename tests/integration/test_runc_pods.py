"""Trusted pods end to end: a real daemon running real runc + conmon containers on a real CNI bridge."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import grpc
import pytest

from protos import cri_pb2 as pb
from tests.support.daemon import TandemDaemon
from tests.support.images import busybox_image, push
from tests.support.pods import container_config, delete_bridge, pod_config, wait_for, write_bridge_network
from tests.support.registry import LocalRegistry

pytestmark = pytest.mark.integration

CRI_LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d+(Z|[+-]\d\d:\d\d) (stdout|stderr) (P|F) (.*)$")


@pytest.fixture(scope="module")
def pods_registry():
    with LocalRegistry() as registry:
        push(registry.host, "test/busybox", "1.0", busybox_image())
        yield registry


@pytest.fixture
def env(tmp_path, pods_registry):
    bridge = write_bridge_network(tmp_path / "net.d", 201)
    daemon = TandemDaemon.isolated(tmp_path).start()
    image = f"{pods_registry.host}/test/busybox:1.0"
    daemon.images.PullImage(pb.PullImageRequest(image=pb.ImageSpec(image=image)))
    yield daemon, image, tmp_path
    for sandbox in daemon.runtime.ListPodSandbox(pb.ListPodSandboxRequest()).items:
        daemon.runtime.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=sandbox.id))
        daemon.runtime.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=sandbox.id))
    daemon.stop()
    daemon.unmount_workdir(tmp_path)
    delete_bridge(bridge)


def run_pod(daemon, name, log_dir, handler="", **annotations):
    request = pb.RunPodSandboxRequest(config=pod_config(name, log_dir, **annotations), runtime_handler=handler)
    return daemon.runtime.RunPodSandbox(request).pod_sandbox_id, request.config


def run_container(daemon, pod_id, pod, config):
    cid = daemon.runtime.CreateContainer(
        pb.CreateContainerRequest(pod_sandbox_id=pod_id, config=config, sandbox_config=pod)
    ).container_id
    daemon.runtime.StartContainer(pb.StartContainerRequest(container_id=cid))
    return cid


def container_status(daemon, cid):
    return daemon.runtime.ContainerStatus(pb.ContainerStatusRequest(container_id=cid)).status


def leftovers(daemon) -> list[str]:
    """Anything of a pod's still on the host: mounts, conmon processes, netns files.

    The netns directory's own private bind mount stays: it is the daemon's, made once, not a pod's.
    """
    found = []
    state, run = str(daemon.state_dir), str(daemon.socket.parent)
    for line in open("/proc/self/mountinfo"):
        mount_point = line.split()[4]
        if (mount_point.startswith(state) or mount_point.startswith(f"{run}/")) and mount_point != f"{run}/netns":
            found.append(f"mount: {mount_point}")
    found += [f"netns: {p.name}" for p in (daemon.socket.parent / "netns").iterdir()]
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    found += [
        f"process: {p}" for p in ps.splitlines() if ("conmon" in p and state in p) or ("conmon" in p and run in p)
    ]
    return found


def test_trusted_pod_lifecycle(env):
    daemon, image, tmp = env
    pod_id, pod = run_pod(daemon, "lifecycle", tmp / "logs")
    status = daemon.runtime.PodSandboxStatus(pb.PodSandboxStatusRequest(pod_sandbox_id=pod_id, verbose=True))
    assert status.status.state == pb.SANDBOX_READY
    assert status.status.network.ip.startswith("10.201.0.")
    assert '"backend": "runc"' in status.info["info"]

    cid = run_container(
        daemon, pod_id, pod, container_config("app", image, "sh", "-c", "echo hello; echo oops >&2; sleep 3600")
    )
    assert container_status(daemon, cid).state == pb.CONTAINER_RUNNING
    log_file = tmp / "logs" / "app.log"
    lines = wait_for(
        lambda: log_file.exists() and len(log_file.read_text().splitlines()) >= 2 and log_file.read_text().splitlines(),
        what="two log lines",
    )
    parsed = [CRI_LOG_LINE.match(line).groups()[1:] for line in lines]
    assert ("stdout", "F", "hello") in parsed and ("stderr", "F", "oops") in parsed

    result = daemon.runtime.ExecSync(
        pb.ExecSyncRequest(container_id=cid, cmd=["sh", "-c", "hostname; exit 7"], timeout=10)
    )
    assert (result.stdout, result.exit_code) == (b"lifecycle\n", 7)
    resolv = daemon.runtime.ExecSync(pb.ExecSyncRequest(container_id=cid, cmd=["cat", "/etc/resolv.conf"], timeout=10))
    assert b"nameserver 10.0.0.10" in resolv.stdout and b"ndots:5" in resolv.stdout

    ping = subprocess.run(["ping", "-c1", "-W2", status.status.network.ip], capture_output=True)
    assert ping.returncode == 0, ping.stdout

    daemon.runtime.StopContainer(pb.StopContainerRequest(container_id=cid, timeout=2))
    stopped = container_status(daemon, cid)
    assert stopped.state == pb.CONTAINER_EXITED and stopped.exit_code in (137, 143)
    daemon.runtime.RemoveContainer(pb.RemoveContainerRequest(container_id=cid))
    daemon.runtime.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=pod_id))
    daemon.runtime.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=pod_id))
    assert daemon.runtime.ListPodSandbox(pb.ListPodSandboxRequest()).items == []
    assert leftovers(daemon) == []


def test_exit_codes_and_events(env):
    daemon, image, tmp = env
    pod_id, pod = run_pod(daemon, "exits", tmp / "logs")
    cid = run_container(daemon, pod_id, pod, container_config("fails", image, "sh", "-c", "exit 3"))
    exited = wait_for(lambda: (s := container_status(daemon, cid)).state == pb.CONTAINER_EXITED and s, what="exit")
    assert (exited.exit_code, exited.reason) == (3, "Error")
    assert exited.finished_at >= exited.started_at > 0
    listed = daemon.runtime.ListContainers(pb.ListContainersRequest()).containers
    assert [(c.id, c.state, c.image_id) for c in listed] == [(cid, pb.CONTAINER_EXITED, exited.image_id)]


def test_stop_and_remove_are_idempotent(env):
    daemon, _, _ = env
    for call, request in [
        (daemon.runtime.StopPodSandbox, pb.StopPodSandboxRequest(pod_sandbox_id="f" * 64)),
        (daemon.runtime.RemovePodSandbox, pb.RemovePodSandboxRequest(pod_sandbox_id="f" * 64)),
        (daemon.runtime.StopContainer, pb.StopContainerRequest(container_id="f" * 64)),
        (daemon.runtime.RemoveContainer, pb.RemoveContainerRequest(container_id="f" * 64)),
    ]:
        call(request)
        call(request)
    with pytest.raises(grpc.RpcError) as err:
        daemon.runtime.PodSandboxStatus(pb.PodSandboxStatusRequest(pod_sandbox_id="f" * 64))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_dispatch_refusals_leave_no_pod(env):
    daemon, _, tmp = env
    with pytest.raises(grpc.RpcError) as err:
        run_pod(daemon, "unknown-handler", tmp / "logs", handler="gvisor")
    assert err.value.code() == grpc.StatusCode.NOT_FOUND and "gvisor" in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        run_pod(daemon, "same-name", tmp / "logs")
        request = pb.RunPodSandboxRequest(config=pod_config("same-name", tmp / "logs"))
        request.config.metadata.uid = daemon.runtime.ListPodSandbox(pb.ListPodSandboxRequest()).items[0].metadata.uid
        daemon.runtime.RunPodSandbox(request)
    assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert len(daemon.runtime.ListPodSandbox(pb.ListPodSandboxRequest()).items) == 1


def test_recovery_after_kill_9(env):
    """Ten pods, the daemon killed with SIGKILL, two containers exiting while it is down."""
    daemon, image, tmp = env
    containers = {}
    for i in range(10):
        pod_id, pod = run_pod(daemon, f"survivor-{i}", tmp / "logs")
        command = f"sleep 2; exit {i + 4}" if i < 2 else "sleep 3600"
        containers[f"c{i}"] = (
            pod_id,
            run_container(daemon, pod_id, pod, container_config(f"c{i}", image, "sh", "-c", command)),
        )
    daemon.kill()
    wait_for(
        lambda: all((tmp / "run" / "runc" / "exits" / containers[f"c{i}"][1]).exists() for i in range(2)),
        what="the two short-lived containers to exit while the daemon is down",
    )
    daemon.start()

    pods = daemon.runtime.ListPodSandbox(pb.ListPodSandboxRequest()).items
    assert len(pods) == 10 and all(p.state == pb.SANDBOX_READY for p in pods)
    for i in range(10):
        status = container_status(daemon, containers[f"c{i}"][1])
        if i < 2:
            assert (status.state, status.exit_code) == (pb.CONTAINER_EXITED, i + 4)
        else:
            assert status.state == pb.CONTAINER_RUNNING
    running = containers["c5"][1]
    assert daemon.runtime.ExecSync(pb.ExecSyncRequest(container_id=running, cmd=["true"], timeout=10)).exit_code == 0

    for pod_id, _ in containers.values():
        daemon.runtime.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=pod_id))
        daemon.runtime.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=pod_id))
    assert leftovers(daemon) == []
    cgroup_dirs = [
        p for p in Path("/sys/fs/cgroup").glob("*/tandem/*") if p.name in {c[0] for c in containers.values()}
    ]
    assert cgroup_dirs == []


def test_non_root_user_can_use_the_rootfs(env):
    daemon, image, tmp = env
    pod_id, pod = run_pod(daemon, "non-root", tmp / "logs")
    config = container_config("user", image, "sh", "-c", "sleep 3600")
    config.linux.security_context.run_as_user.value = 1001
    config.linux.security_context.supplemental_groups.append(1234)
    cid = run_container(daemon, pod_id, pod, config)
    user = container_status(daemon, cid).user.linux
    assert (user.uid, user.gid, list(user.supplemental_groups)) == (1001, 0, [0, 1234])
    result = daemon.runtime.ExecSync(
        pb.ExecSyncRequest(container_id=cid, cmd=["sh", "-c", "id -u; cat /etc/hostname; ls /"], timeout=10)
    )
    assert result.exit_code == 0, result.stderr
    assert result.stdout.startswith(b"1001\nnon-root\n")


def test_stats_metrics_and_events(env):
    daemon, image, tmp = env
    events = daemon.runtime.GetContainerEvents(pb.GetEventsRequest())
    pod_id, pod = run_pod(daemon, "observed", tmp / "logs")
    cid = run_container(daemon, pod_id, pod, container_config("busy", image, "sh", "-c", "echo x > /big; sleep 3600"))

    seen = []
    for event in events:
        seen.append((event.container_id, event.container_event_type))
        if event.container_event_type == pb.CONTAINER_STARTED_EVENT:
            assert event.pod_sandbox_status.id == pod_id
            break
    events.cancel()
    assert seen == [(cid, pb.CONTAINER_CREATED_EVENT), (cid, pb.CONTAINER_STARTED_EVENT)]

    stats = daemon.runtime.ContainerStats(pb.ContainerStatsRequest(container_id=cid)).stats
    assert stats.attributes.id == cid
    assert stats.memory.working_set_bytes.value > 0 and stats.cpu.usage_core_nano_seconds.value > 0
    assert stats.writable_layer.used_bytes.value > 0
    (pod_stats,) = daemon.runtime.ListPodSandboxStats(pb.ListPodSandboxStatsRequest()).stats
    assert pod_stats.attributes.id == pod_id and [c.attributes.id for c in pod_stats.linux.containers] == [cid]

    names = {d.name for d in daemon.runtime.ListMetricDescriptors(pb.ListMetricDescriptorsRequest()).descriptors}
    assert "container_memory_working_set_bytes" in names
    (pod_metrics,) = daemon.runtime.ListPodSandboxMetrics(pb.ListPodSandboxMetricsRequest()).pod_metrics
    (container_metrics,) = pod_metrics.container_metrics
    values = {m.name: m for m in container_metrics.metrics}
    assert values["container_processes"].value.value >= 1
    assert list(values["container_processes"].label_values) == [cid, "busy", image]


def test_pods_for_the_vm_backend_are_refused_until_it_exists(env):
    daemon, _, tmp = env
    with pytest.raises(grpc.RpcError) as err:
        run_pod(daemon, "untrusted", tmp / "logs", handler="vm")
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "vm backend not available" in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        run_pod(daemon, "untrusted-annotated", tmp / "logs", **{"io.kubernetes.cri.untrusted-workload": "true"})
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert daemon.runtime.ListPodSandbox(pb.ListPodSandboxRequest()).items == []
