"""Hostile CRI requests against a real daemon: each is refused with INVALID_ARGUMENT naming the field,
before anything runs; the daemon stays up and keeps nothing of them (no record, netns or mount).

The requests go to a daemon that runs one ordinary pod with one running container (named the way
critest names them), so the container, exec and update requests reach a real target. A request
that is wrongly accepted is undone at once (its pod or container removed) before the test fails.
"""

from __future__ import annotations

import base64
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from protos import cri_pb2 as pb
from tests.support.daemon import TandemDaemon
from tests.support.network import write_bridge_network
from tests.support.pods import container_config, pod_config, pod_leftovers, remove_pods_and_stop

pytestmark = pytest.mark.integration

MiB = 2**20
MAX_STATUS_MESSAGE = 4096


@dataclass
class Target:
    daemon: TandemDaemon
    image: str
    logs: Path
    pod_id: str
    pod: pb.PodSandboxConfig
    container_id: str


def _mounts() -> set[str]:
    return {line.split()[4] for line in open("/proc/self/mountinfo")}


@pytest.fixture(scope="module")
def target(tmp_path_factory, busybox_ref):
    tmp = tmp_path_factory.mktemp("hostile")
    bridge = write_bridge_network(tmp / "net.d").bridge
    daemon = TandemDaemon.isolated(tmp).start()
    daemon.images.PullImage(pb.PullImageRequest(image=pb.ImageSpec(image=busybox_ref)))
    uuid = secrets.token_hex(16)
    pod = pod_config(f"PodSandbox-with-attributes-{uuid}", tmp / "logs")  # critest's upper case
    pod.annotations["kubernetes.io/config.source"] = "api"
    pod.labels["io.kubernetes.pod.name"] = pod.metadata.name
    pod_id = daemon.runtime.RunPodSandbox(pb.RunPodSandboxRequest(config=pod)).pod_sandbox_id
    name = f"container-with-SupplementalGroupsPolicyMerge-{uuid}"  # critest's: 77 characters
    config = container_config(name, busybox_ref, "sleep", "3600")
    config.log_path = f"{name}/0.log"  # kubelet's form: <container>/<restarts>.log
    (tmp / "logs" / name).mkdir(parents=True)
    config.annotations["io.kubernetes.container.hash"] = "1234abcd"
    request = pb.CreateContainerRequest(pod_sandbox_id=pod_id, config=config, sandbox_config=pod)
    container_id = daemon.runtime.CreateContainer(request).container_id
    daemon.runtime.StartContainer(pb.StartContainerRequest(container_id=container_id))
    target = Target(daemon, busybox_ref, tmp / "logs", pod_id, pod, container_id)
    before = _mounts()
    try:
        yield target
        left = _mounts() - before
    finally:
        remove_pods_and_stop(daemon, tmp, bridge)
    assert not left, f"hostile requests left mounts behind: {sorted(left)}"
    assert pod_leftovers(daemon, ("conmon",), (str(daemon.state_dir), str(daemon.socket.parent))) == []


def _code(call: Callable[[], object]) -> tuple[grpc.StatusCode, str, object]:
    try:
        return grpc.StatusCode.OK, "", call()
    except grpc.RpcError as e:
        return e.code(), e.details() or "", None


# ---- the requests ----------------------------------------------------------------------------------


def run_pod(mutate: Callable[[pb.PodSandboxConfig], None], handler: str = "") -> Callable[[Target], tuple]:
    def attempt(t: Target) -> tuple[grpc.StatusCode, str]:
        config = pod_config(f"hostile-{secrets.token_hex(4)}", t.logs)
        mutate(config)
        request = pb.RunPodSandboxRequest(config=config, runtime_handler=handler)
        code, details, response = _code(lambda: t.daemon.runtime.RunPodSandbox(request))
        if response is not None:  # wrongly accepted: undo it
            t.daemon.runtime.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=response.pod_sandbox_id))
            t.daemon.runtime.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=response.pod_sandbox_id))
        return code, details

    return attempt


def create_container(mutate: Callable[[pb.ContainerConfig], None]) -> Callable[[Target], tuple]:
    def attempt(t: Target) -> tuple[grpc.StatusCode, str]:
        config = container_config(f"hostile-{secrets.token_hex(4)}", t.image, "sleep", "3600")
        mutate(config)
        request = pb.CreateContainerRequest(pod_sandbox_id=t.pod_id, config=config, sandbox_config=t.pod)
        code, details, response = _code(lambda: t.daemon.runtime.CreateContainer(request))
        if response is not None:
            t.daemon.runtime.RemoveContainer(pb.RemoveContainerRequest(container_id=response.container_id))
        return code, details

    return attempt


def exec_sync(*cmd: str) -> Callable[[Target], tuple]:
    def attempt(t: Target) -> tuple[grpc.StatusCode, str]:
        request = pb.ExecSyncRequest(container_id=t.container_id, cmd=list(cmd), timeout=10)
        return _code(lambda: t.daemon.runtime.ExecSync(request))[:2]

    return attempt


def exec_url(*cmd: str) -> Callable[[Target], tuple]:
    def attempt(t: Target) -> tuple[grpc.StatusCode, str]:
        request = pb.ExecRequest(container_id=t.container_id, cmd=list(cmd), stdout=True)
        return _code(lambda: t.daemon.runtime.Exec(request))[:2]

    return attempt


def update(mutate: Callable[[pb.LinuxContainerResources], None]) -> Callable[[Target], tuple]:
    def attempt(t: Target) -> tuple[grpc.StatusCode, str]:
        resources = pb.LinuxContainerResources()
        mutate(resources)
        request = pb.UpdateContainerResourcesRequest(container_id=t.container_id, linux=resources)
        return _code(lambda: t.daemon.runtime.UpdateContainerResources(request))[:2]

    return attempt


def pull(image: str, **auth: str) -> Callable[[Target], tuple]:
    def attempt(t: Target) -> tuple[grpc.StatusCode, str]:
        request = pb.PullImageRequest(image=pb.ImageSpec(image=image), auth=pb.AuthConfig(**auth))
        return _code(lambda: t.daemon.images.PullImage(request))[:2]

    return attempt


def image_status(image: str) -> Callable[[Target], tuple]:
    def attempt(t: Target) -> tuple[grpc.StatusCode, str]:
        return _code(lambda: t.daemon.images.ImageStatus(pb.ImageStatusRequest(image=pb.ImageSpec(image=image))))[:2]

    return attempt


def remove_image(image: str) -> Callable[[Target], tuple]:
    def attempt(t: Target) -> tuple[grpc.StatusCode, str]:
        return _code(lambda: t.daemon.images.RemoveImage(pb.RemoveImageRequest(image=pb.ImageSpec(image=image))))[:2]

    return attempt


def pulled_image_with_auth(**auth: str) -> Callable[[Target], tuple]:
    def attempt(t: Target) -> tuple[grpc.StatusCode, str]:
        return pull(t.image, **auth)(t)

    return attempt


def _set(path: str, value: object) -> Callable[[object], None]:
    """A mutator: `path` is dotted attributes of the message; the last one is assigned `value`."""

    def mutate(message: object) -> None:
        *parents, last = path.split(".")
        for name in parents:
            message = getattr(message, name)
        setattr(message, last, value)

    return mutate


def _update(path: str, entries: dict) -> Callable[[object], None]:
    """A mutator that adds `entries` to the map or repeated field at `path`."""

    def mutate(message: object) -> None:
        for name in path.split("."):
            message = getattr(message, name)
        if isinstance(entries, dict):
            message.update(entries)  # type: ignore[attr-defined]
        else:
            message.extend(entries)  # type: ignore[attr-defined]

    return mutate


def _dns(servers=(), searches=(), options=()) -> Callable[[pb.PodSandboxConfig], None]:
    def mutate(config: pb.PodSandboxConfig) -> None:
        config.dns_config.CopyFrom(pb.DNSConfig(servers=list(servers), searches=list(searches), options=list(options)))

    return mutate


def _port(**fields: object) -> Callable[[pb.PodSandboxConfig], None]:
    def mutate(config: pb.PodSandboxConfig) -> None:
        config.port_mappings.append(pb.PortMapping(**{"container_port": 80, "host_port": 18080, **fields}))

    return mutate


def _seccomp(where: str, profile_type: int, ref: str) -> Callable[[object], None]:
    def mutate(message: object) -> None:
        for name in where.split("."):
            message = getattr(message, name)
        message.seccomp.CopyFrom(pb.SecurityProfile(profile_type=profile_type, localhost_ref=ref))  # type: ignore

    return mutate


def _apparmor_ref(ref: str) -> Callable[[pb.ContainerConfig], None]:
    def mutate(config: pb.ContainerConfig) -> None:
        profile = pb.SecurityProfile(profile_type=pb.SecurityProfile.Localhost, localhost_ref=ref)
        config.linux.security_context.apparmor.CopyFrom(profile)

    return mutate


def _env(key: str, value: str) -> Callable[[pb.ContainerConfig], None]:
    return lambda config: config.envs.append(pb.KeyValue(key=key, value=value))


def _mount(container_path: str, host_path: str) -> Callable[[pb.ContainerConfig], None]:
    return lambda config: config.mounts.append(pb.Mount(container_path=container_path, host_path=host_path))


def _device(container_path: str, host_path: str, permissions: str) -> Callable[[pb.ContainerConfig], None]:
    device = pb.Device(container_path=container_path, host_path=host_path, permissions=permissions)
    return lambda config: config.devices.append(device)


def _hugepage(size: str) -> Callable[[pb.LinuxContainerResources], None]:
    return lambda resources: resources.hugepage_limits.append(pb.HugepageLimit(page_size=size, limit=2 * MiB))


HUGE = "a" * MiB
SC = pb.SecurityProfile
CASES: dict[str, tuple[Callable[[Target], tuple], str]] = {
    # RunPodSandbox: metadata
    "pod name of 1 MiB": (run_pod(_set("metadata.name", HUGE)), "config.metadata.name"),
    "pod name with /": (run_pod(_set("metadata.name", "a/b")), "config.metadata.name"),
    "pod name ..": (run_pod(_set("metadata.name", "..")), "config.metadata.name"),
    "pod name with NUL": (run_pod(_set("metadata.name", "a\0b")), "config.metadata.name"),
    "pod name with newline": (run_pod(_set("metadata.name", "a\nb")), "config.metadata.name"),
    "pod name empty": (run_pod(_set("metadata.name", "")), "config.metadata.name"),
    "namespace with /": (run_pod(_set("metadata.namespace", "ns/x")), "config.metadata.namespace"),
    "namespace of 64 characters": (run_pod(_set("metadata.namespace", "n" * 64)), "config.metadata.namespace"),
    "namespace with NUL": (run_pod(_set("metadata.namespace", "n\0")), "config.metadata.namespace"),
    "uid with newline": (run_pod(_set("metadata.uid", "abc\ndef")), "config.metadata.uid"),
    "uid rewriting CNI_ARGS": (run_pod(_set("metadata.uid", "u;K8S_POD_NAME=other")), "config.metadata.uid"),
    "uid of 1 MiB": (run_pod(_set("metadata.uid", HUGE)), "config.metadata.uid"),
    # RunPodSandbox: hostname, log directory, DNS, ports
    "hostname with /": (run_pod(_set("hostname", "host/name")), "config.hostname"),
    "hostname of 65 characters": (run_pod(_set("hostname", "h" * 65)), "config.hostname"),
    "hostname with a space": (run_pod(_set("hostname", "a b")), "config.hostname"),
    "relative log directory": (run_pod(_set("log_directory", "logs/x")), "config.log_directory"),
    "log directory with ..": (run_pod(_set("log_directory", "/var/log/pods/../../etc")), "config.log_directory"),
    "log directory with NUL": (run_pod(_set("log_directory", "/tmp/a\0b")), "config.log_directory"),
    "DNS server not an IP": (run_pod(_dns(servers=["dns.example.com"])), "config.dns_config.servers[0]"),
    "DNS server injecting a line": (
        run_pod(_dns(servers=["10.0.0.10\nnameserver 6.6.6.6"])),
        "config.dns_config.servers[0]",
    ),
    "four DNS servers": (run_pod(_dns(servers=["10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.4"])), "config.dns_config"),
    "DNS search injecting a line": (
        run_pod(_dns(searches=["svc.local\noptions debug"])),
        "config.dns_config.searches[0]",
    ),
    "33 DNS searches": (run_pod(_dns(searches=[f"s{i}.local" for i in range(33)])), "config.dns_config.searches"),
    "DNS search of 254 characters": (
        run_pod(_dns(searches=[".".join(["a" * 63] * 4)[:254]])),
        "config.dns_config.searches[0]",
    ),
    "DNS option with a space": (run_pod(_dns(options=["ndots:5 debug"])), "config.dns_config.options[0]"),
    "container port 0": (run_pod(_port(container_port=0)), "config.port_mappings[0].container_port"),
    "host port 70000": (run_pod(_port(host_port=70000)), "config.port_mappings[0].host_port"),
    "protocol 7": (run_pod(_port(protocol=7)), "config.port_mappings[0].protocol"),
    "host IP not an IP": (run_pod(_port(host_ip="not-an-ip")), "config.port_mappings[0].host_ip"),
    # RunPodSandbox: labels, annotations, Linux
    "label key a/b/c": (run_pod(_update("labels", {"a/b/c": "v"})), "config.labels"),
    "label value with newline": (run_pod(_update("labels", {"app": "v\nw"})), "config.labels"),
    "annotation key with a space": (run_pod(_update("annotations", {"bad key": "v"})), "config.annotations"),
    "annotations of 600 KiB": (run_pod(_update("annotations", {"big": "x" * 600 * 1024})), "config.annotations"),
    "sysctl name traversing": (
        run_pod(_update("linux.sysctls", {"../../../proc/sysrq-trigger": "b"})),
        "config.linux.sysctls",
    ),
    "sysctl value with NUL": (run_pod(_update("linux.sysctls", {"kernel.shm_rmid_forced": "1\0"})), "config.linux"),
    "cgroup parent with ..": (run_pod(_set("linux.cgroup_parent", "/kubepods/../../..")), "config.linux.cgroup_parent"),
    "cgroup parent with NUL": (run_pod(_set("linux.cgroup_parent", "/kubepods/a\0")), "config.linux.cgroup_parent"),
    "runtime handler of 1 MiB": (run_pod(lambda config: None, handler=HUGE), "runtime_handler"),
    "pod run_as_user -1": (
        run_pod(_set("linux.security_context.run_as_user.value", -1)),
        "config.linux.security_context.run_as_user",
    ),
    "pod supplemental group 2^40": (
        run_pod(_update("linux.security_context.supplemental_groups", [2**40])),
        "config.linux.security_context.supplemental_groups[0]",
    ),
    "pod seccomp profile relative": (
        run_pod(_seccomp("linux.security_context", SC.Localhost, "profiles/x.json")),
        "config.linux.security_context.seccomp.localhost_ref",
    ),
    # CreateContainer
    "container name with /": (create_container(_set("metadata.name", "a/b")), "config.metadata.name"),
    "container name of 1 MiB": (create_container(_set("metadata.name", HUGE)), "config.metadata.name"),
    "container name empty": (create_container(_set("metadata.name", "")), "config.metadata.name"),
    "env value with NUL": (create_container(_env("A", "b\0c")), "config.envs[0].value"),
    "env key with =": (create_container(_env("A=B", "c")), "config.envs[0].key"),
    "env key empty": (create_container(_env("", "c")), "config.envs[0].key"),
    "env entry of 200 KiB": (create_container(_env("A", "x" * 200 * 1024)), "config.envs[0]"),
    "command with NUL": (create_container(_update("command", ["sh\0"])), "config.command[2]"),
    "args with NUL": (create_container(_update("args", ["a\0b"])), "config.args[0]"),
    "relative working dir": (create_container(_set("working_dir", "tmp")), "config.working_dir"),
    "working dir with NUL": (create_container(_set("working_dir", "/tmp\0")), "config.working_dir"),
    "mount container path relative": (
        create_container(_mount("data", "/tmp")),
        "config.mounts[0].container_path",
    ),
    "mount host path relative": (create_container(_mount("/data", "tmp")), "config.mounts[0].host_path"),
    "mount host path with NUL": (create_container(_mount("/data", "/tmp/a\0b")), "config.mounts[0].host_path"),
    "log path absolute": (create_container(_set("log_path", "/etc/passwd")), "config.log_path"),
    "log path escaping": (create_container(_set("log_path", "../../x.log")), "config.log_path"),
    "log path with NUL": (create_container(_set("log_path", "a\0.log")), "config.log_path"),
    "device host path relative": (
        create_container(_device("/dev/x", "dev/null", "rw")),
        "config.devices[0].host_path",
    ),
    "device permissions rwx": (
        create_container(_device("/dev/x", "/dev/null", "rwx")),
        "config.devices[0].permissions",
    ),
    "run_as_user 2^40": (
        create_container(_set("linux.security_context.run_as_user.value", 2**40)),
        "config.linux.security_context.run_as_user",
    ),
    "supplemental group -5": (
        create_container(_update("linux.security_context.supplemental_groups", [-5])),
        "config.linux.security_context.supplemental_groups[0]",
    ),
    "unified key traversing": (
        create_container(_update("linux.resources.unified", {"../../cgroup.procs": "1"})),
        "config.linux.resources.unified",
    ),
    "oom_score_adj 5000": (
        create_container(_set("linux.resources.oom_score_adj", 5000)),
        "config.linux.resources.oom_score_adj",
    ),
    "masked path relative": (
        create_container(_update("linux.security_context.masked_paths", ["proc/kcore"])),
        "config.linux.security_context.masked_paths[0]",
    ),
    "image of 1 MiB": (create_container(_set("image.image", HUGE)), "config.image.image"),
    "stop signal 999": (create_container(_set("stop_signal", 999)), "config.stop_signal"),
    "seccomp profile with ..": (
        create_container(_seccomp("linux.security_context", SC.Localhost, "/var/lib/kubelet/seccomp/../../../etc/x")),
        "config.linux.security_context.seccomp.localhost_ref",
    ),
    "apparmor profile with NUL": (
        create_container(_apparmor_ref("localhost/a\0")),
        "config.linux.security_context.apparmor.localhost_ref",
    ),
    "cpuset with newline": (
        create_container(_set("linux.resources.cpuset_cpus", "0-1\n")),
        "config.linux.resources.cpuset_cpus",
    ),
    "hugepage size with /": (
        create_container(lambda config: _hugepage("2MB/../x")(config.linux.resources)),
        "config.linux.resources.hugepage_limits[0].page_size",
    ),
    "capability with NUL": (
        create_container(_update("linux.security_context.capabilities.add_capabilities", ["NET_ADMIN\0"])),
        "config.linux.security_context.capabilities.add_capabilities[0]",
    ),
    # ExecSync, Exec, UpdateContainerResources
    "exec command with NUL": (exec_sync("sh\0", "-c", "true"), "cmd[0]"),
    "exec argument of 200 KiB": (exec_sync("echo", "x" * 200 * 1024), "cmd[1]"),
    "streaming exec with NUL": (exec_url("sh", "-c\0"), "cmd[1]"),
    "update unified key traversing": (
        update(_update("unified", {"../cgroup.procs": "1"})),
        "linux.unified",
    ),
    "update cpuset garbage": (update(_set("cpuset_cpus", "0-1;rm")), "linux.cpuset_cpus"),
    # ImageService
    "pull reference of 1 MiB": (pull(HUGE), "image.image"),
    "pull reference with newline": (pull("busybox\n:latest"), "image.image"),
    "pull registry token with CRLF": (
        pulled_image_with_auth(registry_token="t\r\nX-Injected: 1"),
        "auth.registry_token",
    ),
    "pull username with newline": (
        pulled_image_with_auth(username="u\nv", password="p"),
        "auth.username",
    ),
    "pull auth of 1 MiB": (
        pulled_image_with_auth(auth=base64.b64encode(b"u:" + b"p" * MiB).decode()),
        "auth.auth",
    ),
    "image status reference of 1 MiB": (image_status(HUGE), "image.image"),
    "remove image reference with NUL": (remove_image("busybox\0"), "image.image"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_hostile_request_is_refused_naming_the_field(target, case):
    attempt, field = CASES[case]
    code, details = attempt(target)
    assert code == grpc.StatusCode.INVALID_ARGUMENT, details[:300]
    assert details.startswith(f"{field}"), details[:300]
    assert len(details) <= MAX_STATUS_MESSAGE


def test_the_daemon_is_up_and_kept_nothing_of_them(target):
    daemon = target.daemon
    assert daemon.process is not None and daemon.process.poll() is None
    assert daemon.runtime.Version(pb.VersionRequest()).runtime_name == "tandem"
    assert [p.id for p in daemon.runtime.ListPodSandbox(pb.ListPodSandboxRequest()).items] == [target.pod_id]
    containers = daemon.runtime.ListContainers(pb.ListContainersRequest()).containers
    assert [c.id for c in containers] == [target.container_id] and containers[0].state == pb.CONTAINER_RUNNING
    assert sorted(p.name for p in (daemon.state_dir / "sandboxes").iterdir()) == [f"{target.pod_id}.json"]
    assert sorted(p.name for p in (daemon.state_dir / "containers").iterdir()) == [f"{target.container_id}.json"]
    assert [p.name for p in (daemon.socket.parent / "netns").iterdir()] == [target.pod_id]
