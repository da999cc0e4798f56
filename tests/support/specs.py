"""Builders for OCI spec tests: a fake host (mountinfo, a /dev of its own), an image rootfs, pod files,
and CRI configs; plain functions, so unit and integration tests build their specs alike."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from protos import cri_pb2 as pb
from sandbox.oci.capabilities import CAPABILITIES
from sandbox.oci.namespaces import NEW, Namespaces
from sandbox.oci.platform import ContainerPlatform, HostInfo, PodFiles
from sandbox.oci.spec import container_spec

HOST_CAPS = frozenset(CAPABILITIES) - {"CAP_SYS_RESOURCE"}
INFRA_NS = Namespaces(network="/run/netns/pod", ipc=NEW, uts=NEW, pid=NEW)
POD_NS = Namespaces(network="/proc/7/ns/net", ipc="/proc/7/ns/ipc", uts="/proc/7/ns/uts", pid=NEW)
IMAGE = {
    "config": {
        "Env": ["PATH=/bin:/usr/bin", "LANG=C"],
        "Entrypoint": ["/entry"],
        "Cmd": ["--serve"],
        "WorkingDir": "/srv",
        "User": "",
    }
}
SC = pb.LinuxContainerSecurityContext
DEV_NULL = os.path.realpath("/dev/null")


def fake_rootfs(tmp_path: Path) -> Path:
    root = tmp_path / "rootfs"
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "passwd").write_text(
        "root:x:0:0::/root:/bin/sh\nnobody:x:65534:65534::/:/bin/false\napp:x:1000:1000::/home/app:/bin/sh\n"
    )
    (root / "etc" / "group").write_text("root:x:0:\nwheel:x:10:root\napp:x:1000:\nextra:x:50000:app\n")
    return root


def fake_mountinfo(tmp_path: Path) -> Path:
    path = tmp_path / "mountinfo"
    path.write_text(
        f"1 0 8:1 / / rw - ext4 /dev/vda rw\n2 1 0:5 / {tmp_path}/shared rw shared:7 - tmpfs t rw\n"
        f"3 1 0:6 / {tmp_path}/slave rw master:7 - tmpfs t rw\n"
    )
    for name in ("shared", "slave", "private"):
        (tmp_path / name).mkdir()
    return path


def fake_host(tmp_path: Path, mountinfo: Path) -> HostInfo:
    """A hybrid-cgroup host with every capability but CAP_SYS_RESOURCE and an empty /dev of its own."""
    dev = tmp_path / "devroot"
    dev.mkdir()
    return HostInfo(
        capabilities=HOST_CAPS,
        cgroup_mode="hybrid",
        swap_accounting=True,
        hugetlb=False,
        hostname="node-1",
        dev_dir=dev,
        mountinfo=mountinfo,
    )


def fake_pod_files(tmp_path: Path) -> PodFiles:
    return PodFiles(
        hostname=tmp_path / "hostname",
        resolv_conf=tmp_path / "resolv.conf",
        hosts=tmp_path / "hosts",
        shm=tmp_path / "shm",
    )


def sandbox_config(privileged: bool = False, **kwargs: Any) -> pb.PodSandboxConfig:
    return pb.PodSandboxConfig(
        metadata=pb.PodSandboxMetadata(name="web", uid="uid-1", namespace="default"),
        hostname="web-0",
        log_directory="/var/log/pods/x",
        linux=pb.LinuxPodSandboxConfig(security_context=pb.LinuxSandboxSecurityContext(privileged=privileged)),
        **kwargs,
    )


def config(sc: Any = None, resources: Any = None, **kwargs: Any) -> pb.ContainerConfig:
    linux = pb.LinuxContainerConfig(security_context=sc or SC())
    if resources is not None:
        linux.resources.CopyFrom(resources)
    kwargs.setdefault("command", ["sh", "-c", "sleep 1"])
    return pb.ContainerConfig(
        metadata=pb.ContainerMetadata(name="app"),
        image=pb.ImageSpec(image="sha256:abc", user_specified_image="busybox:1"),
        linux=linux,
        **kwargs,
    )


def spec_maker(rootfs: Path, host: HostInfo, pod_files: PodFiles) -> Callable[..., Any]:
    """`make(cfg, sandbox=..., ...)`: a container spec with everything but what the test varies defaulted."""

    def make(cfg=None, sandbox=None, image=IMAGE, namespaces=POD_NS, files=pod_files, host=host, floor=-999):
        platform = ContainerPlatform(
            rootfs=rootfs,
            host=host,
            namespaces=namespaces,
            cgroups_path="/tandem/sb1/c1",
            pod_files=files,
            oom_score_adj_floor=floor,
        )
        return container_spec(
            cfg or config(), sandbox or sandbox_config(), sandbox_id="sb1", image_config=image, platform=platform
        )

    return make


def mount_at(spec: dict[str, Any], destination: str) -> dict[str, Any] | None:
    found = [m for m in spec["mounts"] if m["destination"] == destination]
    assert len(found) <= 1
    return found[0] if found else None


def caps_of(spec: dict[str, Any]) -> set[str]:
    return set(spec["process"]["capabilities"]["bounding"])
