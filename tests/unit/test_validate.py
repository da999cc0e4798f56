"""cri/validate.py, rule by rule: what kubelet, critest and crictl send passes; the rest is refused by field."""

from __future__ import annotations

import uuid
from collections.abc import Callable

import pytest

from core.errors import InvalidArgument
from cri import validate
from protos import cri_pb2 as pb

UUID = str(uuid.UUID(int=0x1234))


def kubelet_pod() -> pb.PodSandboxConfig:
    """A RunPodSandbox config the way kubelet builds one (cgroupfs driver, ClusterFirst DNS)."""
    name = "web-7d9f8c6b5d-x2x9k"
    return pb.PodSandboxConfig(
        metadata=pb.PodSandboxMetadata(name=name, namespace="default", uid=UUID, attempt=0),
        hostname=name,
        log_directory=f"/var/log/pods/default_{name}_{UUID}",
        dns_config=pb.DNSConfig(
            servers=["10.96.0.10", "fd00::10"],
            searches=["default.svc.cluster.local", "svc.cluster.local", "cluster.local", "Corp.Example_Net"],
            options=["ndots:5", "single-request-reopen", "timeout:2"],
        ),
        port_mappings=[
            pb.PortMapping(protocol=pb.TCP, container_port=8080, host_port=0),
            pb.PortMapping(protocol=pb.UDP, container_port=53, host_port=5353, host_ip="0.0.0.0"),
            pb.PortMapping(protocol=pb.SCTP, container_port=9000, host_port=9000, host_ip="::"),
        ],
        labels={
            "app": "web",
            "pod-template-hash": "7d9f8c6b5d",
            "io.kubernetes.pod.name": name,
            "io.kubernetes.pod.namespace": "default",
            "io.kubernetes.pod.uid": UUID,
        },
        annotations={
            "kubernetes.io/config.seen": "2024-01-01T00:00:00.000000000Z",
            "kubernetes.io/config.source": "api",
            "kubectl.kubernetes.io/last-applied-configuration": '{"apiVersion":"v1",\n"kind":"Pod"}',
            "io.kubernetes.cri-o.TrustedSandbox": "false",
            "tandem.dev/trust": "untrusted",
        },
        linux=pb.LinuxPodSandboxConfig(
            cgroup_parent=f"/kubepods/burstable/pod{UUID}",
            sysctls={"net.ipv4.ip_unprivileged_port_start": "0", "kernel.shm_rmid_forced": "1"},
            security_context=pb.LinuxSandboxSecurityContext(
                run_as_user=pb.Int64Value(value=1000),
                supplemental_groups=[2000, 2**31 - 1],
                seccomp=pb.SecurityProfile(profile_type=pb.SecurityProfile.RuntimeDefault),
                selinux_options=pb.SELinuxOption(level="s0:c1,c2"),
            ),
            resources=pb.LinuxContainerResources(cpu_shares=102, memory_limit_in_bytes=2**30),
        ),
    )


def kubelet_container() -> pb.ContainerConfig:
    return pb.ContainerConfig(
        metadata=pb.ContainerMetadata(name="web", attempt=2),
        image=pb.ImageSpec(image="registry.k8s.io/nginx@sha256:" + "a" * 64),
        command=["/bin/sh", "-c"],
        args=["echo 'hello\nworld'; exec nginx -g 'daemon off;'", ""],
        working_dir="/usr/share/nginx",
        envs=[
            pb.KeyValue(key="KUBERNETES_SERVICE_HOST", value="10.96.0.1"),
            pb.KeyValue(key="MULTI_LINE", value="a\nb"),
            pb.KeyValue(key="EMPTY", value=""),
            pb.KeyValue(key="my.dotted-var", value="x=y"),
        ],
        mounts=[
            pb.Mount(container_path="/etc/hosts", host_path=f"/var/lib/kubelet/pods/{UUID}/etc-hosts"),
            pb.Mount(container_path="/data", host_path="/mnt/data", propagation=pb.PROPAGATION_HOST_TO_CONTAINER),
            pb.Mount(container_path="/models", image=pb.ImageSpec(image="example.com/models:1"), image_sub_path="v1"),
        ],
        devices=[pb.Device(container_path="/dev/fuse", host_path="/dev/fuse", permissions="rwm")],
        labels={"io.kubernetes.container.name": "web", "io.kubernetes.pod.name": "web-7d9f8c6b5d-x2x9k"},
        annotations={
            "io.kubernetes.container.hash": "c1a2b3",
            "io.kubernetes.container.ports": '[{"containerPort":8080,"protocol":"TCP"}]',
            "io.kubernetes.container.terminationMessagePath": "/dev/termination-log",
        },
        log_path="web/2.log",
        linux=pb.LinuxContainerConfig(
            resources=pb.LinuxContainerResources(
                cpu_period=100000,
                cpu_quota=50000,
                oom_score_adj=-997,
                cpuset_cpus="0-3,6",
                hugepage_limits=[pb.HugepageLimit(page_size="2MB", limit=0), pb.HugepageLimit(page_size="1GB")],
                unified={"memory.high": "max", "cpu.max": "50000 100000", "io.max": "8:16 rbps=1048576"},
            ),
            security_context=pb.LinuxContainerSecurityContext(
                capabilities=pb.Capability(add_capabilities=["NET_ADMIN", "CAP_SYS_TIME"], drop_capabilities=["ALL"]),
                run_as_user=pb.Int64Value(value=0),
                masked_paths=["/proc/kcore", "/sys/firmware"],
                readonly_paths=["/proc/sys"],
                seccomp=pb.SecurityProfile(
                    profile_type=pb.SecurityProfile.Localhost, localhost_ref="/var/lib/kubelet/seccomp/audit.json"
                ),
                apparmor=pb.SecurityProfile(
                    profile_type=pb.SecurityProfile.Localhost, localhost_ref="cri-validate-apparmor-test-deny-write"
                ),
                apparmor_profile="runtime/default",
            ),
        ),
        stop_signal=pb.SIGQUIT,
    )


def refused(check: Callable[[], None], field: str) -> str:
    with pytest.raises(InvalidArgument) as err:
        check()
    assert str(err.value).startswith(field) and str(err.value)[len(field)] in ":.[", str(err.value)
    return str(err.value)


def run_pod(mutate: Callable[[pb.PodSandboxConfig], None], handler: str = "") -> Callable[[], None]:
    config = kubelet_pod()
    mutate(config)
    return lambda: validate.run_pod_sandbox(pb.RunPodSandboxRequest(config=config, runtime_handler=handler))


def create(mutate: Callable[[pb.ContainerConfig], None]) -> Callable[[], None]:
    config = kubelet_container()
    mutate(config)
    return lambda: validate.create_container(pb.CreateContainerRequest(pod_sandbox_id="p", config=config))


# ---- what legitimate clients send -------------------------------------------------------------------


def test_what_kubelet_sends_passes():
    validate.run_pod_sandbox(pb.RunPodSandboxRequest(config=kubelet_pod(), runtime_handler="kata-fast"))
    validate.create_container(pb.CreateContainerRequest(config=kubelet_container(), sandbox_config=kubelet_pod()))


@pytest.mark.parametrize(
    ("pod_name", "container_name"),
    [
        (f"PodSandbox-with-attributes-{UUID}", f"container-with-attributes-{UUID}"),
        (
            f"create-Privileged-PodSandbox-for-container-{UUID}",
            f"container-with-RunAsGroup-without-RunAsUser-test-{UUID}",
        ),
        (f"create-PodSandbox-with-DNS-config{UUID}", f"container-with-SupplementalGroupsPolicyMerge-{UUID}"),
    ],
)
def test_what_critest_sends_passes(pod_name, container_name):
    """critest's names have upper case, and its container names run past the 63 of a DNS label."""
    pod = pb.PodSandboxConfig(
        metadata=pb.PodSandboxMetadata(name=pod_name, uid=f"cri-test-uid{UUID}", namespace=f"cri-test-namespace{UUID}"),
        hostname="test-hostname",
        log_directory=f"/tmp/podLogTest1234/{pod_name}",
        dns_config=pb.DNSConfig(servers=["10.10.10.10"], searches=["google.com"], options=["ndots:8"]),
        labels={"foo": "bar", "io.kubernetes.pod.name": pod_name[:63]},
        annotations={"abc": "def"},
    )
    validate.run_pod_sandbox(pb.RunPodSandboxRequest(config=pod, runtime_handler="vm"))
    container = pb.ContainerConfig(
        metadata=pb.ContainerMetadata(name=container_name),
        image=pb.ImageSpec(image="registry.k8s.io/e2e-test-images/busybox:1.29-2"),
        log_path=f"{container_name}.log",
        linux=pb.LinuxContainerConfig(
            security_context=pb.LinuxContainerSecurityContext(
                seccomp_profile_path="localhost//var/lib/kubelet/seccomp/profile.json", apparmor_profile="unconfined"
            )
        ),
    )
    validate.create_container(pb.CreateContainerRequest(config=container))


def test_the_sandbox_config_sent_with_a_container_is_not_checked():
    """Tandem uses the pod's record; a pod created before a rule existed must still get containers."""
    old = kubelet_pod()
    old.metadata.name = "made_before_validation"
    validate.create_container(pb.CreateContainerRequest(config=kubelet_container(), sandbox_config=old))


# ---- pod metadata, hostname, log directory ----------------------------------------------------------


def _set(path: str, value: object) -> Callable[[object], None]:
    def mutate(message: object) -> None:
        *parents, last = path.split(".")
        for name in parents:
            message = getattr(message, name)
        setattr(message, last, value)

    return mutate


@pytest.mark.parametrize(
    ("path", "good", "bad"),
    [
        ("metadata.name", ["a", "a" * 253, "web.v1-x", "Upper-Case"], ["", "a" * 254, "a/b", "a_b", "..", "a\0", "-a"]),
        ("metadata.namespace", ["kube-system", "n" * 63], ["", "n" * 64, "a.b", "ns/x", "a\nb"]),
        (
            "metadata.uid",
            [UUID, "0123456789abcdef0123456789abcdef", "cri-test-uid" + UUID, "hdishd83djaidwnduwk28bcsb"],
            ["", "a\nb", "a b", "u;K8S_POD_NAME=x", "a=b", "a/b", "u" * 129, "-x"],
        ),
        ("hostname", ["", "h" * 64, "web-0.web.default.svc.cluster.local"[:64]], ["h" * 65, "a/b", "a b", "a_b"]),
        (
            "log_directory",
            ["", "/var/log/pods/default_web_x", "/tmp/logs/", "/"],
            ["logs", "/var/log/../etc", "/var//log", "/var/./log", "/a\0b", "/" + "a" * 4096],
        ),
    ],
)
def test_pod_fields(path, good, bad):
    for value in good:
        run_pod(_set(path, value))()
    for value in bad:
        refused(run_pod(_set(path, value)), f"config.{path}")


def test_runtime_handler_is_a_dns_label():
    run_pod(lambda c: None, handler="kata-fast")()
    for handler in ("a" * 64, "a/b", "x\0"):
        refused(run_pod(lambda c: None, handler=handler), "runtime_handler")


def test_messages_do_not_echo_megabytes():
    message = refused(run_pod(_set("metadata.name", "a" * 2**20)), "config.metadata.name")
    assert len(message) < 200


# ---- DNS and ports ----------------------------------------------------------------------------------


def _dns(**fields: list[str]) -> Callable[[pb.PodSandboxConfig], None]:
    return lambda config: config.dns_config.CopyFrom(pb.DNSConfig(**fields))


def test_dns_servers_are_at_most_three_ip_addresses():
    run_pod(_dns(servers=["10.0.0.1", "2001:db8::1", "fe80::1%eth0"]))()
    refused(run_pod(_dns(servers=["10.0.0.1"] * 4)), "config.dns_config.servers")
    for server in ("dns.example.com", "10.0.0.1\nnameserver 6.6.6.6", "fe80::1%eth0 x", ""):
        refused(run_pod(_dns(servers=[server])), "config.dns_config.servers[0]")


def test_dns_searches_follow_kubelets_limits():
    run_pod(_dns(searches=[f"s{i}.example.com" for i in range(32)]))()
    run_pod(_dns(searches=[".", "example.com.", "_msdcs.Example.COM", "a" * 63 + "." + "b" * 63]))()
    refused(run_pod(_dns(searches=[f"s{i}.local" for i in range(33)])), "config.dns_config.searches")
    long_names = ["x" * 250 + f".{i:02d}" for i in range(9)]  # 9 x 254 > 2048
    refused(run_pod(_dns(searches=long_names)), "config.dns_config.searches")
    for search in ("a" * 254, "svc\noptions debug", "a b", "a..b", "", "a" * 64 + ".com"):
        refused(run_pod(_dns(searches=[search])), "config.dns_config.searches[0]")


def test_dns_options_are_single_tokens():
    run_pod(_dns(options=["ndots:5", "use-vc", "edns0", "trust-ad", "attempts:3"]))()
    for option in ("ndots:5 debug", "", "a\nb", "o" * 257, "-x"):
        refused(run_pod(_dns(options=[option])), "config.dns_config.options[0]")


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"container_port": 0}, "container_port"),
        ({"container_port": 65536}, "container_port"),
        ({"container_port": -1}, "container_port"),
        ({"host_port": -1}, "host_port"),
        ({"host_port": 65536}, "host_port"),
        ({"protocol": 3}, "protocol"),
        ({"host_ip": "localhost"}, "host_ip"),
        ({"host_ip": "1.2.3.4 "}, "host_ip"),
    ],
)
def test_bad_port_mappings(fields, field):
    mapping = pb.PortMapping(**{"container_port": 80, **fields})
    refused(run_pod(lambda c: c.port_mappings.append(mapping)), f"config.port_mappings[3].{field}")


# ---- labels, annotations, Linux ---------------------------------------------------------------------


def test_labels_are_qualified_names_and_label_values():
    run_pod(lambda c: c.labels.update({"example.com/tier": "A.b_c-9", "empty": "", "long": "v" * 253}))()
    bad = [
        {"a/b/c": "v"},
        {"Example.com/x": "v"},
        {"/x": "v"},
        {"x" * 64: "v"},
        {"": "v"},
        {"k": "v" * 254},
        {"k": "-v"},
        {"k": "v\nw"},
        {"k": "a b"},
    ]
    for entry in bad:
        refused(run_pod(lambda c, entry=entry: c.labels.update(entry)), "config.labels")


def test_annotations_have_qualified_keys_and_a_total_size():
    run_pod(lambda c: c.annotations.update({"Example.COM/Key_1": "any\nvalue\0 at all"}))()
    for key in ("bad key", "a/b/c", "k" * 64, ""):
        refused(run_pod(lambda c, key=key: c.annotations.update({key: "v"})), "config.annotations")
    size = validate.MAX_ANNOTATIONS_BYTES

    def big(total: int) -> Callable[[pb.PodSandboxConfig], None]:
        def mutate(config: pb.PodSandboxConfig) -> None:
            config.annotations.clear()
            config.annotations["big"] = "x" * (total - 3)

        return mutate

    run_pod(big(size))()
    refused(run_pod(big(size + 1)), "config.annotations")


def test_sysctls_and_cgroup_parent():
    run_pod(lambda c: c.linux.sysctls.update({"net/ipv4/conf/eth0/forwarding": "1", "fs.mqueue.msg_max": "10"}))()
    for name in ("../x", "Net.ipv4.x", "net..x", "net.ipv4.x.", "a" * 254):
        refused(run_pod(lambda c, name=name: c.linux.sysctls.update({name: "1"})), "config.linux.sysctls")
    refused(run_pod(lambda c: c.linux.sysctls.update({"kernel.shm_rmid_forced": "1\0"})), "config.linux.sysctls")
    for parent in ("kubepods", "/kubepods/", "kubepods-burstable.slice"):
        run_pod(_set("linux.cgroup_parent", parent))()
    for parent in ("/a/../b", "/a//b", "/a/./b", "/a\0", "/a\nb"):
        refused(run_pod(_set("linux.cgroup_parent", parent)), "config.linux.cgroup_parent")


def test_pod_security_context():
    context = "config.linux.security_context"
    for value, ok in ((0, True), (2**31 - 1, True), (-1, False), (2**31, False)):
        check = run_pod(_set("linux.security_context.run_as_group.value", value))
        check() if ok else refused(check, f"{context}.run_as_group")
    negative = run_pod(lambda c: c.linux.security_context.supplemental_groups.append(-5))
    refused(negative, f"{context}.supplemental_groups")
    refused(run_pod(_set("linux.security_context.supplemental_groups_policy", 2)), context)
    refused(run_pod(_set("linux.security_context.namespace_options.network", 4)), f"{context}.namespace_options")
    refused(run_pod(_set("linux.security_context.selinux_options.level", "s0\n")), f"{context}.selinux_options")


@pytest.mark.parametrize(
    ("profile_type", "ref", "ok"),
    [
        (pb.SecurityProfile.Localhost, "/var/lib/kubelet/seccomp/p.json", True),
        (pb.SecurityProfile.Localhost, "localhost//var/lib/kubelet/seccomp/p.json", True),
        (pb.SecurityProfile.Localhost, "", False),
        (pb.SecurityProfile.Localhost, "profiles/p.json", False),
        (pb.SecurityProfile.Localhost, "/var/lib/kubelet/seccomp/../../../etc/shadow", False),
        (pb.SecurityProfile.Localhost, "/p\0.json", False),
        (pb.SecurityProfile.RuntimeDefault, "", True),
        (7, "", False),
    ],
)
def test_seccomp_profiles(profile_type, ref, ok):
    profile = pb.SecurityProfile(profile_type=profile_type, localhost_ref=ref)
    check = run_pod(lambda c: c.linux.security_context.seccomp.CopyFrom(profile))
    check() if ok else refused(check, "config.linux.security_context.seccomp")


def test_deprecated_seccomp_path():
    for path in ("runtime/default", "unconfined", "localhost//opt/p.json"):
        run_pod(_set("linux.security_context.seccomp_profile_path", path))()
    for path in ("localhost/relative.json", "localhost//opt/../etc/p", "x\0"):
        refused(run_pod(_set("linux.security_context.seccomp_profile_path", path)), "config.linux.security_context")


# ---- containers -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "good", "bad"),
    [
        ("metadata.name", ["c", "C" * 253, "container-with-x"], ["", "a/b", "a.b", "a_b", "c" * 254, "a\0"]),
        ("image.image", ["busybox", "sha256:" + "f" * 64, "a" * 4096], ["", "a b", "a\nb", "a" * 4097, "é"]),
        ("working_dir", ["", "/", "/usr/src/app"], ["tmp", "/tmp\0", "/" + "a" * 4096]),
        ("log_path", ["", "c.log", "c/0.log", "..c.log"], ["/etc/passwd", "../x", "a/../../x", "./x", "a//b", "a\0"]),
        ("stop_signal", [pb.SIGTERM, pb.RUNTIME_DEFAULT, pb.SIGRTMAX], [999, -1]),
    ],
)
def test_container_fields(path, good, bad):
    for value in good:
        create(_set(path, value))()
    for value in bad:
        refused(create(_set(path, value)), f"config.{path}")


def test_command_args_and_env_never_carry_a_nul_or_more_than_execve_takes():
    create(lambda c: c.args.append("x" * (validate.MAX_ARG_STRLEN - 1)))()
    refused(create(lambda c: c.command.append("a\0b")), "config.command[2]")
    refused(create(lambda c: c.args.append("x" * validate.MAX_ARG_STRLEN)), "config.args[2]")
    refused(create(lambda c: c.args.extend(["x" * 120_000] * 20)), "config")
    envs = "config.envs[4]"
    refused(create(lambda c: c.envs.append(pb.KeyValue(key="A", value="a\0b"))), f"{envs}.value")
    for key in ("", "A=B", "é", "a\nb"):
        refused(create(lambda c, key=key: c.envs.append(pb.KeyValue(key=key, value="v"))), f"{envs}.key")
    create(lambda c: c.envs.append(pb.KeyValue(key="WITH SPACE", value="v")))()
    too_long = pb.KeyValue(key="A", value="x" * (validate.MAX_ARG_STRLEN - 2))
    refused(create(lambda c: c.envs.append(too_long)), envs)


def test_mounts_and_devices():
    mounts = "config.mounts[3]"
    for mount, field in (
        (pb.Mount(container_path="data", host_path="/d"), "container_path"),
        (pb.Mount(container_path="", host_path="/d"), "container_path"),
        (pb.Mount(container_path="/data", host_path="d"), "host_path"),
        (pb.Mount(container_path="/data", host_path=""), "host_path"),
        (pb.Mount(container_path="/data", host_path="/a\0b"), "host_path"),
        (pb.Mount(container_path="/data", host_path="/d", propagation=3), "propagation"),
        (pb.Mount(container_path="/m", image=pb.ImageSpec(image="m:1"), image_sub_path="../x"), "image_sub_path"),
    ):
        refused(create(lambda c, mount=mount: c.mounts.append(mount)), f"{mounts}.{field}")
    create(lambda c: c.devices.append(pb.Device(container_path="/dev/n", host_path="/dev/null")))()
    for device, field in (
        (pb.Device(container_path="/dev/x", host_path="dev/null", permissions="rw"), "host_path"),
        (pb.Device(container_path="x", host_path="/dev/null", permissions="rw"), "container_path"),
        (pb.Device(container_path="/dev/x", host_path="/dev/null", permissions="rwx"), "permissions"),
        (pb.Device(container_path="/dev/x", host_path="/dev/null", permissions="rwmr"), "permissions"),
    ):
        refused(create(lambda c, device=device: c.devices.append(device)), f"config.devices[1].{field}")


def test_container_security_context():
    context = "config.linux.security_context"
    for name in ("NET ADMIN", "", "CAP_\0", "x" * 65):
        refused(
            create(lambda c, name=name: c.linux.security_context.capabilities.add_capabilities.append(name)),
            f"{context}.capabilities.add_capabilities[2]",
        )
    refused(create(lambda c: c.linux.security_context.masked_paths.append("proc/x")), f"{context}.masked_paths[2]")
    refused(create(_set("linux.security_context.run_as_user.value", 2**40)), f"{context}.run_as_user")
    refused(create(_set("linux.security_context.run_as_username", "a\nb")), f"{context}.run_as_username")
    empty_ref = pb.SecurityProfile(profile_type=pb.SecurityProfile.Localhost)
    refused(create(lambda c: c.linux.security_context.apparmor.CopyFrom(empty_ref)), f"{context}.apparmor")
    nul_ref = pb.SecurityProfile(profile_type=pb.SecurityProfile.Localhost, localhost_ref="p\0")
    refused(create(lambda c: c.linux.security_context.apparmor.CopyFrom(nul_ref)), f"{context}.apparmor")


@pytest.mark.parametrize(
    ("path", "good", "bad"),
    [
        ("oom_score_adj", [-1000, 1000, 0], [-1001, 1001]),
        ("cpuset_cpus", ["", "0", "0-3,6,8-9"], ["0-1\n", "a", "0,", "0-3;rm"]),
        ("cpuset_mems", ["0-1"], ["0 1"]),
    ],
)
def test_resources(path, good, bad):
    for value in good:
        create(_set(f"linux.resources.{path}", value))()
        validate.update_container_resources(
            pb.UpdateContainerResourcesRequest(linux=pb.LinuxContainerResources(**{path: value}))
        )
    for value in bad:
        refused(create(_set(f"linux.resources.{path}", value)), f"config.linux.resources.{path}")
        request = pb.UpdateContainerResourcesRequest(linux=pb.LinuxContainerResources(**{path: value}))
        refused(lambda request=request: validate.update_container_resources(request), f"linux.{path}")


def test_unified_keys_are_file_names_and_hugepage_sizes_are_sizes():
    resources = "config.linux.resources"
    for key in ("../cgroup.procs", "a/b", ".hidden", ""):
        refused(create(lambda c, key=key: c.linux.resources.unified.update({key: "1"})), f"{resources}.unified")
    refused(create(lambda c: c.linux.resources.unified.update({"memory.max": "1\0"})), f"{resources}.unified")
    for size in ("2MB/../x", "MB", "2 MB"):
        limit = pb.HugepageLimit(page_size=size)
        refused(
            create(lambda c, limit=limit: c.linux.resources.hugepage_limits.append(limit)),
            f"{resources}.hugepage_limits[2].page_size",
        )


def test_exec_commands():
    validate.exec_sync(pb.ExecSyncRequest(cmd=["sh", "-c", "echo\nhi", ""]))
    validate.exec_request(pb.ExecRequest(cmd=["sh"]))
    refused(lambda: validate.exec_sync(pb.ExecSyncRequest()), "cmd")
    refused(lambda: validate.exec_sync(pb.ExecSyncRequest(cmd=["sh\0"])), "cmd[0]")
    refused(lambda: validate.exec_request(pb.ExecRequest(cmd=["echo", "x" * validate.MAX_ARG_STRLEN])), "cmd[1]")


# ---- images -----------------------------------------------------------------------------------------


def pull(image: str = "busybox", **auth: str) -> Callable[[], None]:
    request = pb.PullImageRequest(image=pb.ImageSpec(image=image), auth=pb.AuthConfig(**auth))
    return lambda: validate.pull_image(request)


def test_pull_credentials_as_registries_issue_them():
    json_key = '{\n  "type": "service_account",\n  "private_key": "-----BEGIN PRIVATE KEY-----\\n..."\n}'
    pull(username="_json_key", password=json_key, server_address="https://gcr.io")()
    pull(auth="dXNlcjpwYXNz", server_address="index.docker.io")()
    pull(identity_token="eyJhbGciOi.eyJzdWIiOi.sig-_", registry_token="ya29.a0Af_~+/=")()


@pytest.mark.parametrize(
    ("auth", "field"),
    [
        ({"username": "u:v"}, "auth.username"),
        ({"username": "u\nv"}, "auth.username"),
        ({"password": "p\0"}, "auth.password"),
        ({"password": "p" * (64 * 1024 + 1)}, "auth.password"),
        ({"auth": "dXNlcjpwYXNz!"}, "auth.auth"),
        ({"auth": "A" * (64 * 1024 + 4)}, "auth.auth"),
        ({"registry_token": "secret-token\r\nX-Injected: 1"}, "auth.registry_token"),
        ({"identity_token": "secret token"}, "auth.identity_token"),
        ({"server_address": "https://a b"}, "auth.server_address"),
    ],
)
def test_bad_pull_credentials_are_refused_without_echoing_secrets(auth, field):
    message = refused(pull(**auth), field)
    assert "secret" not in message and "dXNlcjpwYXNz" not in message


def test_image_references_are_bounded():
    for check in (pull("a" * 4097), pull("busybox\n:latest"), pull("")):
        refused(check, "image.image")
    refused(lambda: validate.image_spec(pb.ImageSpec(image="busybox\0"), "image"), "image.image")
