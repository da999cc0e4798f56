"""vm_backend without a VM: the guest's OCI spec, the refusals."""

from pathlib import Path

import pytest

from core.errors import InvalidArgument, Unavailable
from core.settings import Config
from cri.server import available_backends
from protos import cri_pb2 as pb
from sandbox.model import ContainerRecord, ContainerState, SandboxRecord
from sandbox.oci.capabilities import CAPABILITIES
from sandbox.oci.spec import container_spec
from vm_backend.backend import VM_DIED, VmBackend
from vm_backend.guest_image import GuestAssets
from vm_backend.guest_spec import check_vm_container, guest_platform, to_guest

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


async def test_a_container_whose_vm_is_gone_exited_with_vm_died(tmp_path):
    config = Config(state_dir=tmp_path / "state", runtime_dir=tmp_path / "run")
    assets = GuestAssets(
        tmp_path, "d", tmp_path / "vmlinuz", tmp_path / "initrd", tmp_path / "userland.img", 2**21, "6.1", {}
    )
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
