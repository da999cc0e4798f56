"""Trusted pods end to end: a real daemon running real runc + conmon containers on a real CNI bridge."""

from __future__ import annotations

import secrets
import subprocess
from pathlib import Path

import grpc
import pytest

from protos import cri_pb2 as pb
from tests.support.pods import container_config, log_entries, next_event, pod_config, pod_leftovers
from tests.support.wait import wait_for

pytestmark = pytest.mark.integration


@pytest.fixture
def env(pod_env):
    e = pod_env()
    return e.daemon, e.image, e.tmp


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
    """A runc pod's remains: mounts, netns files, conmon processes naming the daemon's dirs."""
    return pod_leftovers(daemon, ("conmon",), (str(daemon.state_dir), str(daemon.socket.parent)))


def test_trusted_pod_lifecycle(pod_env):
    e = pod_env()
    daemon, image, tmp = e.daemon, e.image, e.tmp
    pod_id, pod = run_pod(daemon, "lifecycle", tmp / "logs")
    status = daemon.runtime.PodSandboxStatus(pb.PodSandboxStatusRequest(pod_sandbox_id=pod_id, verbose=True))
    assert status.status.state == pb.SANDBOX_READY
    assert e.network.holds(status.status.network.ip)
    assert '"backend": "runc"' in status.info["info"]

    cid = run_container(
        daemon, pod_id, pod, container_config("app", image, "sh", "-c", "echo hello; echo oops >&2; sleep 3600")
    )
    assert container_status(daemon, cid).state == pb.CONTAINER_RUNNING
    log_file = tmp / "logs" / "app.log"
    entries = wait_for(lambda: log_file.exists() and len(log_entries(log_file)) >= 2 and log_entries(log_file))
    parsed = [entry[1:] for entry in entries]
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
    events = daemon.runtime.GetContainerEvents(pb.GetEventsRequest(), timeout=60)
    pod_id, pod = run_pod(daemon, "exits", tmp / "logs")
    cid = run_container(daemon, pod_id, pod, container_config("fails", image, "sh", "-c", "exit 3"))
    # no status call before the event: the exit is pushed by the backend, not found by asking
    stopped = next_event(events, cid, pb.CONTAINER_STOPPED_EVENT)
    events.cancel()
    (reported,) = [c for c in stopped.containers_statuses if c.id == cid]
    assert (reported.state, reported.exit_code) == (pb.CONTAINER_EXITED, 3)
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


def with_pid(config, mode):
    config.linux.security_context.namespace_options.pid = mode
    return config


def exec_out(daemon, cid, *cmd) -> str:
    result = daemon.runtime.ExecSync(pb.ExecSyncRequest(container_id=cid, cmd=list(cmd), timeout=10))
    assert result.exit_code == 0, result.stderr
    return result.stdout.decode().strip()


def namespaces_of(daemon, cid) -> dict[str, str]:
    out = exec_out(daemon, cid, "sh", "-c", "for n in ipc uts net pid; do echo $n $(readlink /proc/self/ns/$n); done")
    return dict(line.split(" ", 1) for line in out.splitlines())


def test_pod_without_infra_pins_ipc_and_uts(env):
    """pid CONTAINER (kubelet's default): no infra process; both containers join the pinned IPC/UTS and the netns."""
    daemon, image, tmp = env
    config = with_pid(pod_config("pinned", tmp / "logs"), pb.CONTAINER)
    config.linux.sysctls.update({"kernel.shm_rmid_forced": "1", "net.ipv4.ping_group_range": "0 1234"})
    pod_id = daemon.runtime.RunPodSandbox(pb.RunPodSandboxRequest(config=config)).pod_sandbox_id
    status = daemon.runtime.PodSandboxStatus(pb.PodSandboxStatusRequest(pod_sandbox_id=pod_id, verbose=True))
    assert status.status.state == pb.SANDBOX_READY and '"mode": "pinned"' in status.info["info"]
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert not [p for p in ps.splitlines() if "conmon" in p and pod_id in p]

    sleeper = ("sh", "-c", "sleep 3600")
    a = run_container(daemon, pod_id, config, with_pid(container_config("a", image, *sleeper), pb.CONTAINER))
    b = run_container(daemon, pod_id, config, with_pid(container_config("b", image, *sleeper), pb.CONTAINER))
    ns_a, ns_b = namespaces_of(daemon, a), namespaces_of(daemon, b)
    host = {n: str(Path(f"/proc/self/ns/{n}").readlink()) for n in ("ipc", "uts", "net", "pid")}
    for kind in ("ipc", "uts", "net"):
        assert ns_a[kind] == ns_b[kind] != host[kind], kind
    assert ns_a["pid"] != ns_b["pid"] and host["pid"] not in (ns_a["pid"], ns_b["pid"])
    for cid in (a, b):
        assert exec_out(daemon, cid, "hostname") == "pinned"
        assert exec_out(daemon, cid, "cat", "/proc/sys/kernel/shm_rmid_forced") == "1"
        assert exec_out(daemon, cid, "cat", "/proc/sys/net/ipv4/ping_group_range").split() == ["0", "1234"]
        assert "sleep" in exec_out(daemon, cid, "cat", "/proc/1/cmdline")  # its own PID 1, no catatonit
    assert Path("/proc/sys/kernel/shm_rmid_forced").read_text().strip() == "0"

    # a daemon restart finds the pod alive through its pinned namespaces
    daemon.kill()
    daemon.start()
    status = daemon.runtime.PodSandboxStatus(pb.PodSandboxStatusRequest(pod_sandbox_id=pod_id))
    assert status.status.state == pb.SANDBOX_READY
    assert container_status(daemon, a).state == pb.CONTAINER_RUNNING

    daemon.runtime.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=pod_id))
    assert container_status(daemon, a).state == pb.CONTAINER_EXITED
    daemon.runtime.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=pod_id))
    assert leftovers(daemon) == []


def test_pod_level_pid_keeps_an_infra_process(env):
    daemon, image, tmp = env
    pod_id, pod = run_pod(daemon, "shared-pid", tmp / "logs")
    status = daemon.runtime.PodSandboxStatus(pb.PodSandboxStatusRequest(pod_sandbox_id=pod_id, verbose=True))
    assert '"mode": "infra"' in status.info["info"]
    a = run_container(daemon, pod_id, pod, container_config("a", image, "sleep", "3600"))
    b = run_container(daemon, pod_id, pod, container_config("b", image, "sleep", "3600"))
    assert namespaces_of(daemon, a) == namespaces_of(daemon, b)
    assert "catatonit" in exec_out(daemon, a, "cat", "/proc/1/cmdline")
    daemon.runtime.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=pod_id))
    assert container_status(daemon, b).state == pb.CONTAINER_EXITED
    daemon.runtime.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=pod_id))
    assert leftovers(daemon) == []


@pytest.mark.parametrize(
    ("pid_mode", "timeout", "code"),
    [
        (pb.CONTAINER, 0, 137),  # SIGKILL straight away, to the container's PID 1
        (pb.CONTAINER, 1, 137),  # PID 1 ignores SIGTERM: SIGKILL after the timeout
        (pb.POD, 5, 143),  # not PID 1 (catatonit is): SIGTERM kills it
        (pb.POD, 0, 137),  # shared PID namespace: runc kill --all
    ],
)
def test_stop_exit_codes(env, pid_mode, timeout, code):
    daemon, image, tmp = env
    pod = with_pid(pod_config("stops", tmp / "logs"), pid_mode)
    pod_id = daemon.runtime.RunPodSandbox(pb.RunPodSandboxRequest(config=pod)).pod_sandbox_id
    cid = run_container(daemon, pod_id, pod, with_pid(container_config("s", image, "sleep", "3600"), pid_mode))
    daemon.runtime.StopContainer(pb.StopContainerRequest(container_id=cid, timeout=timeout))
    assert container_status(daemon, cid).exit_code == code  # 143: SIGTERM did it, no SIGKILL after the timeout
    daemon.runtime.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=pod_id))
    daemon.runtime.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=pod_id))
    assert leftovers(daemon) == []


@pytest.mark.parametrize("pid_mode", [pb.POD, pb.CONTAINER])
def test_stop_kills_every_process_of_the_container(env, pid_mode):
    daemon, image, tmp = env
    pod = with_pid(pod_config("stop-all", tmp / "logs"), pid_mode)
    pod_id = daemon.runtime.RunPodSandbox(pb.RunPodSandboxRequest(config=pod)).pod_sandbox_id
    marker = f"{3000 + pid_mode}{secrets.randbelow(1000)}"
    config = with_pid(container_config("bg", image, "sh", "-c", f"sleep {marker}1 & sleep {marker}2"), pid_mode)
    cid = run_container(daemon, pod_id, pod, config)
    wait_for(lambda: subprocess.run(["pgrep", "-f", f"sleep {marker}1"]).returncode == 0, what="background sleep")
    daemon.runtime.StopContainer(pb.StopContainerRequest(container_id=cid, timeout=0))
    assert container_status(daemon, cid).exit_code == 137
    wait_for(lambda: subprocess.run(["pgrep", "-f", f"sleep {marker}[12]"]).returncode == 1, 5, "no sleep left")
    daemon.runtime.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=pod_id))
    daemon.runtime.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=pod_id))
    assert leftovers(daemon) == []
