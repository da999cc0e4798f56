"""Trusted pods in user namespaces of their own, and recursive read-only mounts, with real runc containers."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import grpc
import pytest

from protos import cri_pb2 as pb
from tests.support.pods import container_config, pod_config, pod_leftovers

pytestmark = pytest.mark.integration

HOST_ID = 200000  # the pod's root on the host (kubelet picks multiples of 65536; any free range will do)
SIZE = 65536
MAPPING = [pb.IDMapping(container_id=0, host_id=HOST_ID, length=SIZE)]


@pytest.fixture
def env(pod_env, tmp_path):
    # runc, as the pod's root, walks down to each container's root: pytest's 0700 temp dirs must let it
    for directory in (tmp_path, *tmp_path.parents):
        if not directory.stat().st_mode & stat.S_IXOTH:
            directory.chmod(stat.S_IMODE(directory.stat().st_mode) | stat.S_IXOTH)
    e = pod_env()
    return e.daemon, e.image, e.tmp


def userns_pod(name: str, log_dir: Path, mode: int = pb.POD) -> pb.PodSandboxConfig:
    pod = pod_config(name, log_dir)
    userns = pb.UserNamespace(mode=mode, uids=MAPPING, gids=MAPPING) if mode == pb.POD else pb.UserNamespace(mode=mode)
    pod.linux.security_context.namespace_options.userns_options.CopyFrom(userns)
    pod.linux.sysctls["net.ipv4.ip_unprivileged_port_start"] = "80"
    return pod


def create(daemon, pod_id: str, pod: pb.PodSandboxConfig, config: pb.ContainerConfig) -> str:
    config.linux.security_context.namespace_options.CopyFrom(pod.linux.security_context.namespace_options)
    request = pb.CreateContainerRequest(pod_sandbox_id=pod_id, config=config, sandbox_config=pod)
    return daemon.runtime.CreateContainer(request).container_id


def run(daemon, pod_id: str, pod: pb.PodSandboxConfig, config: pb.ContainerConfig) -> str:
    cid = create(daemon, pod_id, pod, config)
    daemon.runtime.StartContainer(pb.StartContainerRequest(container_id=cid))
    return cid


def sh(daemon, cid: str, script: str) -> tuple[int, str]:
    result = daemon.runtime.ExecSync(pb.ExecSyncRequest(container_id=cid, cmd=["sh", "-c", script], timeout=20))
    return result.exit_code, (result.stdout + result.stderr).decode()


def test_a_pod_in_its_own_user_namespace(env, tmp_path):
    daemon, image, tmp = env
    volume = tmp_path / "volume"
    volume.mkdir()
    (volume / "owned-by-host-root").write_text("data\n")
    os.chmod(volume / "owned-by-host-root", 0o600)
    status = daemon.runtime.Status(pb.StatusRequest())
    assert all(h.features.user_namespaces for h in status.runtime_handlers if h.name in ("", "runc"))

    for pid_mode in (pb.POD, pb.CONTAINER):  # with an infra container, and with pinned namespaces
        pod = userns_pod(f"userns-{pid_mode}", tmp / "logs")
        pod.linux.security_context.namespace_options.pid = pid_mode
        pod_id = daemon.runtime.RunPodSandbox(pb.RunPodSandboxRequest(config=pod)).pod_sandbox_id
        config = container_config("app", image, "sleep", "3600")
        config.mounts.extend(
            [
                pb.Mount(container_path="/data", host_path=str(volume), uidMappings=MAPPING, gidMappings=MAPPING),
                pb.Mount(container_path="/plain", host_path=str(volume)),
                pb.Mount(  # kubelet mounts files too (/etc/hosts, the termination log), mapped as well
                    container_path="/etc/motd",
                    host_path=str(volume / "owned-by-host-root"),
                    uidMappings=MAPPING,
                    gidMappings=MAPPING,
                ),
            ]
        )
        cid = run(daemon, pod_id, pod, config)

        line = f"{'0':>10} {HOST_ID:>10} {SIZE:>10}\n"
        assert sh(daemon, cid, "cat /proc/self/uid_map /proc/self/gid_map") == (0, line * 2)
        init = int((daemon.state_dir.parent / "run" / "runc" / "bundles" / cid / "persist" / "pidfile").read_text())
        host_ids = [line.split()[1] for line in Path(f"/proc/{init}/status").read_text().splitlines()
                    if line.startswith(("Uid:", "Gid:"))]  # fmt: skip
        assert host_ids == [str(HOST_ID)] * 2
        # the image's files are the container root's (ID-mapped layers), and so is what it writes
        assert sh(daemon, cid, "stat -c '%u:%g' / /bin/busybox /etc/hosts /etc/hostname /dev/shm") == (
            0,
            "0:0\n" * 5,
        )
        assert sh(daemon, cid, "echo written > /new-file && mkdir -p /etc/more && echo ok")[0] == 0
        upper = daemon.state_dir / "runc" / "layers" / cid / "upper"
        assert (upper / "new-file").stat().st_uid == HOST_ID  # on the host: the pod's root, not the host's
        # the volume is ID-mapped: the host root's file is the container root's, and its files the host root's
        assert sh(daemon, cid, "cat /data/owned-by-host-root && stat -c '%u' /data/owned-by-host-root") == (
            0,
            "data\n0\n",
        )
        assert sh(daemon, cid, "stat -c '%u' /etc/motd && cat /etc/motd") == (0, "0\ndata\n")
        assert sh(daemon, cid, "echo new > /data/from-container")[0] == 0
        assert (volume / "from-container").stat().st_uid == 0
        # the pod's namespaces belong to its user namespace: sysfs and net sysctls work, the host stays out
        assert sh(daemon, cid, "ls /sys/class/net && cat /proc/sys/net/ipv4/ip_unprivileged_port_start")[1].split() == [
            "eth0",
            "lo",
            "80",
        ]
        assert sh(daemon, cid, "hostname")[1] == f"userns-{pid_mode}\n"
        # without the mapping the host's root is nobody here, and the container's root no root of the host's
        assert sh(daemon, cid, "stat -c '%u' /plain/owned-by-host-root; cat /plain/owned-by-host-root") == (
            1,
            "65534\ncat: can't open '/plain/owned-by-host-root': Permission denied\n",
        )
        daemon.runtime.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=pod_id))
    leftovers = pod_leftovers(daemon, ("conmon",), (str(daemon.state_dir), str(daemon.socket.parent)))
    assert leftovers == []


def test_user_namespace_options_are_checked(env, tmp_path):
    daemon, image, tmp = env
    node = userns_pod("userns-node", tmp / "logs", mode=pb.NODE)
    pod_id = daemon.runtime.RunPodSandbox(pb.RunPodSandboxRequest(config=node)).pod_sandbox_id
    cid = run(daemon, pod_id, node, container_config("app", image, "sleep", "3600"))
    assert sh(daemon, cid, "cat /proc/self/uid_map")[1] == Path("/proc/self/uid_map").read_text()
    daemon.runtime.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=pod_id))

    two = [*MAPPING, pb.IDMapping(container_id=0, host_id=400000, length=SIZE)]
    unmapped_root = [pb.IDMapping(container_id=1, host_id=HOST_ID, length=SIZE)]
    jail = [pb.IDMapping(container_id=0, host_id=0x70000000, length=SIZE)]
    for uids in (two, unmapped_root, jail):
        pod = userns_pod("refused", tmp / "logs")
        userns = pod.linux.security_context.namespace_options.userns_options
        del userns.uids[:]
        userns.uids.extend(uids)
        with pytest.raises(grpc.RpcError) as refused:
            daemon.runtime.RunPodSandbox(pb.RunPodSandboxRequest(config=pod))
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    for mode in (pb.CONTAINER, pb.TARGET):
        with pytest.raises(grpc.RpcError) as refused:
            daemon.runtime.RunPodSandbox(pb.RunPodSandboxRequest(config=userns_pod("refused", tmp / "logs", mode)))
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert daemon.runtime.ListPodSandbox(pb.ListPodSandboxRequest()).items == []
    assert not list((daemon.socket.parent / "netns").iterdir())


def test_recursive_read_only_mounts(env, tmp_path):
    daemon, image, tmp = env
    host = tmp_path / "tree"
    (host / "tmpfs").mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "none", str(host / "tmpfs")], check=True)
    try:
        pod = pod_config("rro", tmp / "logs")
        pod_id = daemon.runtime.RunPodSandbox(pb.RunPodSandboxRequest(config=pod)).pod_sandbox_id
        config = container_config("app", image, "sleep", "3600")
        config.mounts.extend(
            [
                pb.Mount(container_path="/rro", host_path=str(host), readonly=True, recursive_read_only=True),
                pb.Mount(container_path="/ro", host_path=str(host), readonly=True),
            ]
        )
        cid = run(daemon, pod_id, pod, config)
        for path in ("/rro/file", "/rro/tmpfs/file", "/ro/file"):
            assert sh(daemon, cid, f"touch {path}") == (1, f"touch: {path}: Read-only file system\n")
        assert sh(daemon, cid, "touch /ro/tmpfs/file") == (0, "")  # only the top of a plain read-only mount
        mounts = daemon.runtime.ContainerStatus(pb.ContainerStatusRequest(container_id=cid)).status.mounts
        assert [m.recursive_read_only for m in mounts] == [True, False]

        rw = container_config("rw", image, "true")
        rw.mounts.append(pb.Mount(container_path="/rro", host_path=str(host), recursive_read_only=True))
        shared = container_config("shared", image, "true")
        shared.mounts.append(
            pb.Mount(
                container_path="/rro",
                host_path=str(host),
                readonly=True,
                recursive_read_only=True,
                propagation=pb.PROPAGATION_HOST_TO_CONTAINER,
            )
        )
        for refused in (rw, shared):
            with pytest.raises(grpc.RpcError) as error:
                create(daemon, pod_id, pod, refused)
            assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        daemon.runtime.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=pod_id))
        subprocess.run(["umount", str(host / "tmpfs")], check=True)  # nothing of the pod holds it
    finally:
        subprocess.run(["umount", "-l", str(host / "tmpfs")], capture_output=True)
