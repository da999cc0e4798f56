"""vm_backend.backend without a VM: the guest's OCI spec, the refusals."""

from pathlib import Path

import pytest

from core.errors import InvalidArgument, Unavailable
from cri.config import Config
from protos import cri_pb2 as pb
from runc_backend import spec
from sandbox.backends import available_backends
from sandbox.model import ContainerRecord, ContainerState, SandboxRecord
from vm_backend.assets import GuestAssets
from vm_backend.backend import VM_DIED, VmBackend, check_vm_container, guest_container_spec


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
    return guest_container_spec(
        config,
        sandbox or pod(),
        sandbox_id="s" * 64,
        container_id="c" * 64,
        host_rootfs=rootfs,
        image_config={},
        share=tmp_path / "share",
        empty_dev=empty,
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
        mounts=[pb.Mount(container_path="/data", host_path=str(tmp_path / "share" / "c" / "mounts" / "0"))]
    )
    (tmp_path / "share" / "c" / "mounts" / "0").mkdir(parents=True)
    (mount,) = [m for m in make(tmp_path, config)["mounts"] if m["destination"] == "/data"]
    assert mount["source"] == "/run/tandem/share/c/mounts/0"


def test_privileged_is_privileged_in_the_guest_without_host_devices(tmp_path):
    sandbox = pod()
    sandbox.linux.security_context.privileged = True
    config = container()
    config.linux.security_context.privileged = True
    result = make(tmp_path, config, sandbox)
    assert result["linux"]["devices"] == []
    assert len(result["process"]["capabilities"]["bounding"]) == len(spec.CAPABILITIES)


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
        VmBackend.create(config)
    assert "vm" not in available_backends(config)


async def test_a_container_whose_vm_is_gone_exited_with_vm_died(tmp_path):
    config = Config(state_dir=tmp_path / "state", runtime_dir=tmp_path / "run")
    assets = GuestAssets(tmp_path, "d", tmp_path / "vmlinuz", tmp_path / "initrd", "6.1", {})
    backend = VmBackend(config, assets)
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
