"""The warm pool with real VMs (TCG): a pod claims a booted VM, runs a container on its IP, and the pool refills;
a pod that does not fit boots cold; kill -9 of the daemon, then a restart, leaves nothing of the pool behind."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from core import cgroups
from protos import cri_pb2 as pb
from tests.support.pods import container_config, pod_config, pod_leftovers, warm_pool
from tests.support.wait import wait_for
from vm_backend.warm import warm_cgroup_parent

pytestmark = pytest.mark.integration


def status(daemon, pod_id: str) -> tuple[pb.PodSandboxStatus, dict]:
    answer = daemon.runtime.PodSandboxStatus(pb.PodSandboxStatusRequest(pod_sandbox_id=pod_id, verbose=True))
    return answer.status, json.loads(answer.info["info"])


def warm_ids(tmp: Path) -> list[str]:
    """The warm VMs the pool has recorded."""
    return sorted(p.stem for p in (tmp / "run" / "vm" / "pool").glob("warm-*.json"))


def warm_leftovers(tmp: Path, ids: list[str]) -> list[str]:
    """What of these warm VMs is still on the host: run dirs, netns files, cgroups, jail uids, QEMU, virtiofsd."""
    vm = tmp / "run" / "vm"
    found = [f"path: {p}" for i in ids for p in (vm / i, vm / "netns-warm" / i) if p.exists()]
    parent = warm_cgroup_parent(vm)
    found += [f"cgroup: {d}" for i in ids for d in cgroups.directories(f"{parent}/{i}") if d.exists()]
    links = (vm / "jail-ids").glob("*")
    found += [f"jail uid held by {o}" for o in links if o.is_symlink() and o.readlink().name in ids]
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    found += [f"process: {line}" for line in ps.splitlines() if any(f"{vm}/{i}" in line for i in ids)]
    return found


def test_a_pod_from_the_pool_runs_on_its_ip_and_the_pool_refills(vm_pool_env):
    daemon, image, tmp = vm_pool_env.daemon, vm_pool_env.image, vm_pool_env.tmp
    (warm,) = warm_ids(tmp)
    pod = pod_config("warm", tmp / "logs")
    pod.hostname = "warm-pod"
    pod.linux.sysctls["net.ipv4.ip_unprivileged_port_start"] = "80"
    pod_id = daemon.runtime.RunPodSandbox(pb.RunPodSandboxRequest(config=pod, runtime_handler="vm")).pod_sandbox_id
    sandbox, info = status(daemon, pod_id)
    assert sandbox.state == pb.SANDBOX_READY and info["backendState"]["warm"] == warm
    assert info["backendState"]["run_dir"] == str(tmp / "run" / "vm" / warm)
    ip = sandbox.network.ip
    assert vm_pool_env.network.holds(ip)
    # The VM is the pod's: its QEMU in the pod's VM cgroup, the pool's cgroup gone.
    qemu = int(info["backendState"]["qemu_pid"])
    assert qemu in cgroups.processes(f"/tandem/{pod_id}/{pod_id}")
    assert not [d for d in cgroups.directories(f"{warm_cgroup_parent(tmp / 'run' / 'vm')}/{warm}") if d.exists()]

    config = container_config("app", image, "sh", "-c", "echo started; sleep 3600")
    cid = daemon.runtime.CreateContainer(
        pb.CreateContainerRequest(pod_sandbox_id=pod_id, config=config, sandbox_config=pod)
    ).container_id
    daemon.runtime.StartContainer(pb.StartContainerRequest(container_id=cid))
    script = (
        "hostname; ip -4 addr show eth0; cat /sys/class/net/eth0/address; sysctl net.ipv4.ip_unprivileged_port_start"
    )
    shown = daemon.runtime.ExecSync(pb.ExecSyncRequest(container_id=cid, cmd=["sh", "-c", script], timeout=60))
    assert shown.exit_code == 0, shown.stderr
    out = shown.stdout.decode()
    assert out.startswith("warm-pod\n") and f"inet {ip}/" in out and out.endswith(" = 80\n")
    assert info["backendState"]["warm_mac"] not in out  # the guest NIC took over the veth's MAC
    ping = subprocess.run(["ping", "-c1", "-W5", ip], capture_output=True)
    assert ping.returncode == 0, ping.stdout

    # The pool refills with a new VM, never the claimed one.
    wait_for(lambda: warm_pool(daemon)["ready"] == 1, 180, "the pool to refill")
    (refill,) = warm_ids(tmp)
    assert refill != warm and warm_pool(daemon)["claimed"] == 1

    daemon.runtime.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=pod_id))
    daemon.runtime.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=pod_id))
    assert warm_leftovers(tmp, [warm]) == []
    assert not [d for d in cgroups.directories(f"/tandem/{pod_id}") if d.exists()]


def test_a_pod_too_big_for_the_pool_boots_cold(vm_pool_env):
    daemon, tmp = vm_pool_env.daemon, vm_pool_env.tmp
    (warm,) = warm_ids(tmp)
    pod = pod_config("big", tmp / "logs")
    pod.linux.resources.memory_limit_in_bytes = 64 << 20
    pod_id = daemon.runtime.RunPodSandbox(pb.RunPodSandboxRequest(config=pod, runtime_handler="vm")).pod_sandbox_id
    sandbox, info = status(daemon, pod_id)
    assert sandbox.state == pb.SANDBOX_READY and "warm" not in info["backendState"]
    assert info["backendState"]["memory_mib"] == 256 + 64
    assert warm_ids(tmp) == [warm] and warm_pool(daemon)["ready"] == 1  # untouched


def test_kill_9_then_restart_reaps_the_pool_and_keeps_claimed_pods(vm_pool_env):
    daemon, image, tmp = vm_pool_env.daemon, vm_pool_env.image, vm_pool_env.tmp
    (claimed,) = warm_ids(tmp)
    pod = pod_config("kept", tmp / "logs")
    pod_id = daemon.runtime.RunPodSandbox(pb.RunPodSandboxRequest(config=pod, runtime_handler="vm")).pod_sandbox_id
    config = container_config("app", image, "sleep", "3600")
    cid = daemon.runtime.CreateContainer(
        pb.CreateContainerRequest(pod_sandbox_id=pod_id, config=config, sandbox_config=pod)
    ).container_id
    daemon.runtime.StartContainer(pb.StartContainerRequest(container_id=cid))
    wait_for(lambda: warm_pool(daemon)["ready"] == 1, 180, "the pool to refill")
    (unclaimed,) = warm_ids(tmp)

    daemon.kill()
    daemon.start()
    # The unclaimed VM is reaped whole; the claimed one is the pod's and runs on.
    wait_for(lambda: warm_leftovers(tmp, [unclaimed]) == [], 60, "the unclaimed warm VM to be reaped")
    sandbox, info = status(daemon, pod_id)
    assert sandbox.state == pb.SANDBOX_READY and info["backendState"]["warm"] == claimed
    ran = daemon.runtime.ExecSync(pb.ExecSyncRequest(container_id=cid, cmd=["echo", "alive"], timeout=60))
    assert ran.stdout == b"alive\n"
    wait_for(lambda: warm_pool(daemon)["ready"] == 1, 180, "a new warm VM")
    (fresh,) = warm_ids(tmp)
    assert fresh not in (claimed, unclaimed)

    # Once more, the pod gone: at the next start every warm VM the killed daemon had goes.
    daemon.runtime.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=pod_id))
    daemon.runtime.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=pod_id))
    daemon.kill()
    daemon.start()
    wait_for(lambda: warm_leftovers(tmp, [claimed, unclaimed, fresh]) == [], 60, "the old warm VMs to be reaped")

    # A clean shutdown takes the pool with it: nothing of any warm VM, nor of the pod, remains.
    daemon.stop()
    assert pod_leftovers(daemon, ("qemu", "virtiofsd"), (str(tmp),)) == []
    assert warm_ids(tmp) == [] and not [p for p in (tmp / "run" / "vm").glob("warm-*")]
    parent = warm_cgroup_parent(tmp / "run" / "vm")  # this daemon's: another's warm VMs are none of its business
    assert not [c for d in cgroups.directories(parent) if d.exists() for c in d.iterdir() if c.is_dir()]
