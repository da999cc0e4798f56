"""vm_backend without a VM: the guest's OCI spec, the refusals."""

from pathlib import Path

import pytest

from core.errors import DeadlineExceeded, Internal, InvalidArgument, Unavailable
from core.settings import Config
from cri.server import available_backends
from protos import agent_pb2
from protos import cri_pb2 as pb
from sandbox.backend import PodContainers
from sandbox.model import ContainerRecord, ContainerState, SandboxRecord
from sandbox.oci.capabilities import CAPABILITIES
from sandbox.oci.spec import container_spec
from vm_backend.backend import VM_DIED, VmBackend
from vm_backend.guest_image import GuestAssets
from vm_backend.guest_spec import check_vm_container, guest_platform, to_guest
from vm_backend.share import Attached, PodShare, mount_path, rootfs_path
from vm_backend.sharens import ShareError, parts_of
from vm_backend.stats import STATS_DEADLINE, pod_usage

CID = "c" * 64


def pod() -> pb.PodSandboxConfig:
    return pb.PodSandboxConfig(metadata=pb.PodSandboxMetadata(name="p", namespace="n", uid="u"), hostname="guest")


def container(**fields) -> pb.ContainerConfig:
    return pb.ContainerConfig(
        metadata=pb.ContainerMetadata(name="c"), image=pb.ImageSpec(image="busybox"), command=["sh"], **fields
    )


def make(tmp_path: Path, config: pb.ContainerConfig, sandbox: pb.PodSandboxConfig | None = None) -> dict:
    rootfs = tmp_path / "rootfs"
    (rootfs / "etc").mkdir(parents=True, exist_ok=True)
    (rootfs / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (rootfs / "etc" / "group").write_text("root:x:0:\n")
    empty = tmp_path / "empty-dev"
    empty.mkdir(exist_ok=True)
    sandbox = sandbox or pod()
    platform = guest_platform(config, sandbox, container_id=CID, host_rootfs=rootfs, empty_dev=empty)
    return to_guest(
        container_spec(config, sandbox, sandbox_id="s" * 64, image_config={}, platform=platform), config, CID
    )


def test_the_guest_is_the_pod(tmp_path):
    config = container()
    config.linux.security_context.namespace_options.pid = pb.CONTAINER
    result = make(tmp_path, config)
    types = [n["type"] for n in result["linux"]["namespaces"]]
    assert "network" not in types and "ipc" not in types and "uts" not in types
    assert {"type": "pid"} in result["linux"]["namespaces"] and {"type": "cgroup"} in result["linux"]["namespaces"]
    assert result["linux"]["cgroupsPath"] == "/tandem/" + "c" * 64
    assert result["root"]["path"] == "rootfs"
    sources = {m["destination"]: m["source"] for m in result["mounts"]}
    assert sources["/etc/hosts"] == "/run/tandem/pod/hosts"
    assert sources["/etc/resolv.conf"] == "/run/tandem/pod/resolv.conf"
    assert sources["/etc/hostname"] == "/run/tandem/pod/hostname"
    assert sources["/dev/shm"] == "/run/tandem/pod/shm"
    assert "HOSTNAME=guest" in result["process"]["env"]


def test_pod_pid_mode_shares_the_guests_pid_namespace(tmp_path):
    config = container()  # POD is the enum's default
    types = [n["type"] for n in make(tmp_path, config)["linux"]["namespaces"]]
    assert "pid" not in types


def test_mounts_come_from_the_share(tmp_path):
    config = container(
        mounts=[
            pb.Mount(container_path="/data", host_path=str(tmp_path / "data")),
            pb.Mount(container_path="/conf", host_path=str(tmp_path / "conf"), readonly=True),
        ]
    )
    mounts = {m["destination"]: m for m in make(tmp_path, config)["mounts"]}
    assert mounts["/data"]["source"] == f"/run/tandem/share/{CID}/mounts/0"
    assert mounts["/conf"]["source"] == f"/run/tandem/share/{CID}/mounts/1"
    assert "rw" in mounts["/conf"]["options"]  # read-only is the host bind's: the guest's share is one mount
    assert (tmp_path / "data").is_dir()  # a missing host directory is created, as on a node


def test_recursive_read_only_mounts_are_the_hosts_to_make(tmp_path):
    config = container(
        mounts=[
            pb.Mount(container_path="/rro", host_path=str(tmp_path / "v"), readonly=True, recursive_read_only=True),
        ]
    )
    (rro,) = [m for m in make(tmp_path, config)["mounts"] if m["destination"] == "/rro"]
    assert rro["source"] == f"/run/tandem/share/{CID}/mounts/0"
    assert "rro" not in rro["options"] and "ro" not in rro["options"]  # the share's side is read-only already


@pytest.mark.parametrize(
    ("mount", "message"),
    [
        (pb.Mount(container_path="/m", host_path="/tmp", recursive_read_only=True), "must be read-only"),
        (
            pb.Mount(
                container_path="/m",
                host_path="/tmp",
                readonly=True,
                recursive_read_only=True,
                propagation=pb.PROPAGATION_HOST_TO_CONTAINER,
            ),
            "needs private propagation",
        ),
    ],
)
def test_recursive_read_only_needs_a_private_read_only_mount(tmp_path, mount, message):
    with pytest.raises(InvalidArgument, match=message):
        make(tmp_path, container(mounts=[mount]))


def test_the_vm_backend_advertises_recursive_read_only_mounts():
    assert VmBackend.features.recursive_read_only_mounts and not VmBackend.features.user_namespaces


def test_share_paths_and_records():
    assert (rootfs_path(CID), mount_path(CID, 3)) == (f"{CID}/rootfs", f"{CID}/mounts/3")
    assert Attached.from_list([7, 2049, 12]) == Attached(7, 2049, 12)
    assert Attached.from_list(Attached(7, 2049, 12).to_list()) == Attached(7, 2049, 12)
    for bad in (None, [7, 2049], [7, 2049, -1], [True, 1, 2], ["7", 1, 2], {"mount_id": 7}):
        assert Attached.from_list(bad) is None


@pytest.mark.parametrize("path", ["", "/abs", "a//b", "a/./b", "../x", "a/..", "a/\0", "x" * 256])
def test_the_share_helper_takes_plain_relative_paths_only(path):
    with pytest.raises(ShareError):
        parts_of(path.replace("\\0", "\0"))
    assert parts_of(f"{CID}/mounts/0") == [CID, "mounts", "0"]


def test_privileged_is_privileged_in_the_guest_without_host_devices(tmp_path):
    sandbox = pod()
    sandbox.linux.security_context.privileged = True
    config = container()
    config.linux.security_context.privileged = True
    result = make(tmp_path, config, sandbox)
    assert result["linux"]["devices"] == []
    assert len(result["process"]["capabilities"]["bounding"]) == len(CAPABILITIES)


@pytest.mark.parametrize(
    "config",
    [
        container(devices=[pb.Device(container_path="/dev/x", host_path="/dev/null", permissions="rwm")]),
        container(
            linux=pb.LinuxContainerConfig(
                security_context=pb.LinuxContainerSecurityContext(namespace_options=pb.NamespaceOption(pid=pb.NODE))
            )
        ),
        container(
            linux=pb.LinuxContainerConfig(
                security_context=pb.LinuxContainerSecurityContext(
                    namespace_options=pb.NamespaceOption(pid=pb.TARGET, target_id="x")
                )
            )
        ),
        container(mounts=[pb.Mount(container_path="/m", host_path="/tmp", propagation=pb.PROPAGATION_BIDIRECTIONAL)]),
    ],
)
def test_refusals(config):
    with pytest.raises(InvalidArgument):
        check_vm_container(config)


def test_without_guest_assets_the_backend_is_unavailable(tmp_path):
    config = Config(state_dir=tmp_path / "state", runtime_dir=tmp_path / "run")
    with pytest.raises(Unavailable, match="guest assets"):
        VmBackend.create(config.vm_backend())
    assert "vm" not in available_backends(config)


def fake_assets(tmp_path: Path) -> GuestAssets:
    """Assets whose files nothing reads: no QEMU runs in these tests."""
    return GuestAssets(
        tmp_path, "d", tmp_path / "vmlinuz", tmp_path / "initrd", tmp_path / "userland.img", 2**21, "6.1", {}
    )


async def test_a_container_whose_vm_is_gone_exited_with_vm_died(tmp_path):
    config = Config(state_dir=tmp_path / "state", runtime_dir=tmp_path / "run")
    assets = fake_assets(tmp_path)
    backend = VmBackend(config.vm_backend(), assets)
    sandbox = SandboxRecord(id="a" * 64, config=pod(), runtime_handler="vm", backend="vm", trust_reason="test")
    sandbox.backend_state["run_dir"] = str(tmp_path / "run" / "vm" / ("a" * 16))  # no pidfile: no QEMU
    record = ContainerRecord(
        id="c" * 64, sandbox_id=sandbox.id, config=container(), image_id="i", image_ref="busybox", log_path="",
        state=ContainerState.RUNNING,
    )  # fmt: skip
    exited = await backend.container_exit(sandbox, record)
    assert exited is not None
    assert (exited.exit_code, exited.reason) == (255, VM_DIED)
    assert f"tandem-{'a' * 12}" in exited.message


async def test_a_share_the_guest_broke_keeps_no_container_of_a_dead_vm_from_going(tmp_path, monkeypatch):
    config = Config(state_dir=tmp_path / "state", runtime_dir=tmp_path / "run")
    assets = fake_assets(tmp_path)
    backend = VmBackend(config.vm_backend(), assets)
    sandbox = SandboxRecord(id="a" * 64, config=pod(), runtime_handler="vm", backend="vm", trust_reason="test")
    sandbox.backend_state["run_dir"] = str(tmp_path / "run" / "vm" / ("a" * 16))  # no pidfile: no QEMU
    record = ContainerRecord(
        id="c" * 64, sandbox_id=sandbox.id, config=container(), image_id="i", image_ref="busybox", log_path=""
    )

    async def broken(self, container_id, attached):
        raise Internal("share helper detach failed (1): what the guest did")

    monkeypatch.setattr(PodShare, "detach", broken)
    await backend.remove_container(sandbox, record)  # the VM is gone: logged, and the pod's removal takes the rest
    monkeypatch.setattr(type(backend._pod(sandbox).vm), "alive", lambda self: True)
    with pytest.raises(Internal):  # while the guest runs, the failure is the caller's to see
        await backend._release_container(sandbox, record)


class StatsClient:
    """An agent connection whose GetPodStats answer (or failure) a test chooses."""

    def __init__(self, answer: dict[str, agent_pb2.Stats] | Exception) -> None:
        self.answer = answer
        self.timeouts: list[float] = []

    async def pod_stats(self, timeout: float) -> dict[str, agent_pb2.Stats]:
        self.timeouts.append(timeout)
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer


def stats_pod(*ids: str) -> PodContainers:
    sandbox = SandboxRecord(id="p" * 64, config=pod(), runtime_handler="vm", backend="vm", trust_reason="")
    return PodContainers(
        sandbox,
        [
            ContainerRecord(id=i, sandbox_id=sandbox.id, config=container(), image_id="", image_ref="", log_path="")
            for i in ids
        ],
    )


async def test_a_pods_stats_are_one_round_trip_with_a_short_deadline_and_only_its_own_containers():
    client = StatsClient({"a": agent_pb2.Stats(cpu_usage_ns=5, pids=2), "forged": agent_pb2.Stats(pids=99)})
    usage = await pod_usage(client, stats_pod("a", "b"))  # type: ignore[arg-type]
    assert list(usage) == ["a"] and (usage["a"].cpu_usage_ns, usage["a"].pids) == (5, 2)
    assert client.timeouts == [STATS_DEADLINE] and STATS_DEADLINE <= 1


async def test_a_silent_or_unconnected_guest_gives_no_stats_and_no_error():
    silent = StatsClient(DeadlineExceeded("the agent did not answer get_pod_stats within 0.5s"))
    assert await pod_usage(silent, stats_pod("a")) == {}  # type: ignore[arg-type]
    assert await pod_usage(None, stats_pod("a")) == {}
