"""In-place resize of a VM pod: limits change inside the guest, the VM grows or shrinks (balloon), its cgroup follows.

One VM (TCG, 1 vCPU) booted with [vm] memory_headroom_mib = 128 for a pod whose memory limit is 64 MiB:
the guest may hold 256 + 64 = 320 MiB now and 448 MiB at most.
"""

from __future__ import annotations

import grpc
import pytest

from core import cgroups
from core.settings import TCG_CACHE_MIB
from protos import cri_pb2 as pb
from tests.support.crictl import Crictl
from tests.support.pods import container_config, pod_config
from tests.support.wait import wait_for
from vm_backend import resources
from vm_backend.guest_image import assets_root

pytestmark = pytest.mark.integration

MIB = 2**20


@pytest.fixture
def vm(pod_env, guest_assets, tmp_path):
    root = assets_root(tmp_path / "state")
    root.mkdir(parents=True)
    (root / "current").symlink_to(guest_assets.dir)
    env = pod_env('[vm]\naccel = "tcg"\nmemory_headroom_mib = 128\n')
    config = pod_config("resize", env.tmp / "logs")
    config.linux.resources.memory_limit_in_bytes = 64 * MIB
    daemon = env.daemon
    pod_id = daemon.runtime.RunPodSandbox(pb.RunPodSandboxRequest(config=config, runtime_handler="vm")).pod_sandbox_id
    cid = daemon.runtime.CreateContainer(
        pb.CreateContainerRequest(
            pod_sandbox_id=pod_id, config=container_config("app", env.image, "sleep", "3600"), sandbox_config=config
        )
    ).container_id
    daemon.runtime.StartContainer(pb.StartContainerRequest(container_id=cid))
    return env, pod_id, cid


def in_guest(daemon, cid: str, *cmd: str) -> str:
    result = daemon.runtime.ExecSync(pb.ExecSyncRequest(container_id=cid, cmd=list(cmd), timeout=60))
    assert result.exit_code == 0, result.stderr
    return result.stdout.decode()


def guest_total_mib(daemon, cid: str) -> int:
    line = next(x for x in in_guest(daemon, cid, "cat", "/proc/meminfo").splitlines() if x.startswith("MemTotal:"))
    return int(line.split()[1]) // 1024


def vm_cgroup_limit_mib(pod_id: str) -> int:
    limits = cgroups.read_limits(resources.vm_cgroup("", pod_id))
    return int(limits.get("memory.max") or limits["memory.limit_in_bytes"]) // MIB


def update_memory(daemon, cid: str, mib: int) -> None:
    daemon.runtime.UpdateContainerResources(
        pb.UpdateContainerResourcesRequest(
            container_id=cid, linux=pb.LinuxContainerResources(memory_limit_in_bytes=mib * MIB)
        )
    )


def test_memory_limits_change_in_the_guest_and_the_vm_follows(vm):
    env, pod_id, cid = vm
    daemon = env.daemon
    overhead = resources.vmm_overhead_mib("tcg", TCG_CACHE_MIB)
    assert vm_cgroup_limit_mib(pod_id) == 320 + overhead  # the headroom is the balloon's, not the cgroup's
    booted_total = wait_for(lambda: (t := guest_total_mib(daemon, cid)) <= 330 and t, what="the balloon to inflate")

    update_memory(daemon, cid, 48)  # fits the VM as it is
    assert in_guest(daemon, cid, "cat", "/sys/fs/cgroup/memory.max") == f"{48 * MIB}\n"
    assert vm_cgroup_limit_mib(pod_id) == 320 + overhead

    update_memory(daemon, cid, 150)  # 256 + 150 = 406 MiB: the balloon lets go of 86 MiB, the cgroup first
    assert in_guest(daemon, cid, "cat", "/sys/fs/cgroup/memory.max") == f"{150 * MIB}\n"
    assert vm_cgroup_limit_mib(pod_id) == 406 + overhead
    assert wait_for(lambda: guest_total_mib(daemon, cid) >= booted_total + 80, what="the guest to grow")

    with pytest.raises(grpc.RpcError) as too_big:  # 256 + 300 > the 448 MiB it booted with
        update_memory(daemon, cid, 300)
    assert too_big.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "booted with 448 MiB" in too_big.value.details() and "no memory hotplug" in too_big.value.details()
    assert in_guest(daemon, cid, "cat", "/sys/fs/cgroup/memory.max") == f"{150 * MIB}\n"  # unchanged

    update_memory(daemon, cid, 16)
    resize = pb.UpdatePodSandboxResourcesRequest(
        pod_sandbox_id=pod_id, resources=pb.LinuxContainerResources(memory_limit_in_bytes=32 * MIB)
    )
    daemon.runtime.UpdatePodSandboxResources(resize)  # kubelet's order when shrinking: containers, then the pod
    assert vm_cgroup_limit_mib(pod_id) == 288 + overhead  # lowered once the guest gave the memory back
    assert guest_total_mib(daemon, cid) <= booted_total - 20

    cpu = pb.UpdatePodSandboxResourcesRequest(
        pod_sandbox_id=pod_id, resources=pb.LinuxContainerResources(cpu_quota=300_000, cpu_period=100_000)
    )
    with pytest.raises(grpc.RpcError) as no_cpus:
        daemon.runtime.UpdatePodSandboxResources(cpu)
    assert no_cpus.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "no CPU hotplug" in no_cpus.value.details()


@pytest.mark.crictl
def test_crictl_update_memory_reaches_the_guest(vm):
    env, pod_id, cid = vm
    crictl = Crictl(env.daemon, env.tmp)
    result = crictl.run("update", "--memory", str(100 * MIB), cid)
    assert result.returncode == 0, result.stderr
    assert in_guest(env.daemon, cid, "cat", "/sys/fs/cgroup/memory.max") == f"{100 * MIB}\n"
    assert vm_cgroup_limit_mib(pod_id) == 356 + resources.vmm_overhead_mib("tcg", TCG_CACHE_MIB)
