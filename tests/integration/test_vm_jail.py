"""The jail of a VM pod's QEMU, on a real daemon under TCG: who QEMU runs as, what it can see, what it may use.

Finding 5 of issue 9: QEMU ran as root with every capability in the host's mount
namespace and no cgroup of its own, and a pod could ask for a VM of any size.
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path

import grpc
import pytest

from core import cgroups, mounts
from core.settings import TCG_CACHE_MIB, Config
from protos import cri_pb2 as pb
from tests.support.daemon import TandemDaemon
from tests.support.pods import container_config, pod_config, pod_leftovers
from tests.support.wait import wait_for
from vm_backend import resources
from vm_backend.guest_image import assets_root
from vm_backend.virtiofs import virtiofsd_nofile

pytestmark = pytest.mark.integration

MAX_VCPUS, MAX_MEMORY_MIB = 2, 1024
CONFIG = f'[vm]\naccel = "tcg"\nmax_vcpus = {MAX_VCPUS}\nmax_memory_mib = {MAX_MEMORY_MIB}\n'


@pytest.fixture
def env(pod_env, guest_assets, tmp_path):
    root = assets_root(tmp_path / "state")
    root.mkdir(parents=True)
    (root / "current").symlink_to(guest_assets.dir)
    pods = pod_env(CONFIG)
    return pods.daemon, pods.image, tmp_path


def backend_state(daemon: TandemDaemon, pod_id: str) -> dict:
    status = daemon.runtime.PodSandboxStatus(pb.PodSandboxStatusRequest(pod_sandbox_id=pod_id, verbose=True))
    return json.loads(status.info["info"])["backendState"]


def run_pod(daemon: TandemDaemon, image: str, tmp: Path, name: str, cgroup_parent: str = "") -> tuple[str, str]:
    pod = pod_config(name, tmp / "logs")
    pod.linux.cgroup_parent = cgroup_parent
    pod_id = daemon.runtime.RunPodSandbox(pb.RunPodSandboxRequest(config=pod, runtime_handler="vm")).pod_sandbox_id
    request = pb.CreateContainerRequest(
        pod_sandbox_id=pod_id, config=container_config("sleeper", image, "sleep", "3600"), sandbox_config=pod
    )
    cid = daemon.runtime.CreateContainer(request).container_id
    daemon.runtime.StartContainer(pb.StartContainerRequest(container_id=cid))
    return pod_id, cid


def qemu_pid(daemon: TandemDaemon, pod_id: str) -> int:
    return int((daemon.socket.parent / "vm" / pod_id[:16] / "qemu.pid").read_text().split()[0])  # pid, start time


def status(pid: int) -> dict[str, str]:
    return dict(line.split(":\t", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":\t" in line)


def jail_contents(pid: int) -> set[str]:
    """Every path in QEMU's root, as QEMU sees it (not into /usr: bound read-only from the host whole)."""
    root = f"/proc/{pid}/root"
    found = set()
    for directory, dirs, files in os.walk(root):
        inside = directory[len(root) :] or "/"
        for name in dirs + files:
            found.add(os.path.join(inside, name))
        if inside == "/":
            dirs.remove("usr")
    return found


def parents(path: str) -> set[str]:
    parts = Path(path).parents
    return {str(p) for p in parts if str(p) != "/"}


def exec_ok(daemon: TandemDaemon, cid: str) -> None:
    result = daemon.runtime.ExecSync(pb.ExecSyncRequest(container_id=cid, cmd=["echo", "alive"], timeout=60))
    assert (result.exit_code, result.stdout) == (0, b"alive\n"), result.stderr


def test_qemu_runs_jailed_in_a_cgroup_of_its_own(env):
    daemon, image, tmp = env
    kubelet_parent = f"/tandem-test-{secrets.token_hex(4)}/pod1"  # what the kubelet's pod cgroup would be
    cgroups.create(kubelet_parent)
    try:
        pod_id, cid = run_pod(daemon, image, tmp, "jailed", cgroup_parent=kubelet_parent)
        state = backend_state(daemon, pod_id)
        pid = qemu_pid(daemon, pod_id)
        exec_ok(daemon, cid)

        # An unprivileged uid/gid of its own, nothing else.
        uid = state["jail_uid"]
        assert Config().vm.jail_uid_first <= uid < Config().vm.jail_uid_first + Config().vm.jail_uid_count
        fields = status(pid)
        assert fields["Uid"].split() == [str(uid)] * 4 and fields["Gid"].split() == [str(state["jail_gid"])] * 4
        assert fields["Groups"].strip() == ""
        for caps in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
            assert int(fields[caps], 16) == 0, caps
        assert (fields["NoNewPrivs"], fields["Seccomp"]) == ("1", "2")  # and QEMU's own seccomp filter on

        # Its own mount namespace, whose root holds only what it needs, at the host's paths.
        assert os.readlink(f"/proc/{pid}/ns/mnt") != os.readlink("/proc/self/ns/mnt")
        run_dir = str(daemon.socket.parent / "vm" / pod_id[:16])
        vmm = f"{run_dir}/vmm"
        expected = {"/bin", "/sbin", "/lib", "/lib64", "/usr", "/etc", "/etc/ld.so.cache", "/dev"}
        expected |= {f"/dev/{name}" for name in ("null", "zero", "random", "urandom")}
        for path in (state["kernel"], state["initramfs"], state["userland"], f"{run_dir}/virtiofsd.sock", vmm):
            expected |= {path} | parents(path)
        expected |= {f"{vmm}/{name}" for name in ("qmp.sock", "console.sock", "agent.sock", "console.log")}
        assert jail_contents(pid) == expected  # no /proc, no /dev/net/tun, no /dev/kvm (TCG), no share, no c/
        assert os.stat(vmm).st_uid == uid and os.stat(vmm).st_mode & 0o777 == 0o700

        # The tap arrived open: QEMU could not have opened it (no /dev/net/tun in its root).
        taps = [
            fd
            for fd in os.listdir(f"/proc/{pid}/fd")
            if os.readlink(f"/proc/{pid}/fd/{fd}") == "/dev/net/tun"
            and "iff:\ttap0" in Path(f"/proc/{pid}/fdinfo/{fd}").read_text()
        ]
        assert len(taps) == 1

        # One cgroup under the kubelet's pod cgroup, holding QEMU and virtiofsd, with the computed limits.
        cgroup = f"{kubelet_parent}/{pod_id}"
        assert state["cgroup"] == cgroup
        assert f":memory:{cgroup}" in Path(f"/proc/{pid}/cgroup").read_text()
        virtiofsd = int(Path(run_dir, "virtiofsd.pid").read_text().split()[0])  # pid, start time
        (sandboxed,) = cgroups.processes(cgroup) - {pid, virtiofsd}  # its sandbox: a child in new namespaces
        assert status(sandboxed)["PPid"].strip() == str(virtiofsd)
        limits = resources.vm_limits(
            state["vcpus"], state["memory_mib"], resources.vmm_overhead_mib("tcg", TCG_CACHE_MIB)
        )
        found = cgroups.read_limits(cgroup)
        assert found["pids.max"] == str(limits.pids)
        memory = found.get("memory.max") or found["memory.limit_in_bytes"]
        assert int(memory) == (256 + resources.vmm_overhead_mib("tcg", TCG_CACHE_MIB)) * 2**20
        cpu = found.get("cpu.max") or f"{found['cpu.cfs_quota_us']} {found['cpu.cfs_period_us']}"
        assert cpu == "200000 100000"  # one vCPU and one more for QEMU's main loop and virtiofsd

        # virtiofsd: started in the pod's share namespace, then sandboxed by itself inside it (mount, PID and network
        # namespaces of its own, pivoted into the share): only the share and what is attached to it are in view.
        for kind in ("mnt", "pid", "net"):
            assert os.readlink(f"/proc/{sandboxed}/ns/{kind}") != os.readlink(f"/proc/self/ns/{kind}"), kind
        table = mounts.mountinfo(Path(f"/proc/{sandboxed}/mountinfo").read_text())
        assert [m.source for m in table if m.mount_point == "/"] == ["tandem-share"]
        assert {m.mount_point for m in table} == {"/", f"/{cid}/rootfs"}
        assert (
            f"--rlimit-nofile={virtiofsd_nofile(state['memory_mib'])}" in Path(f"/proc/{virtiofsd}/cmdline").read_text()
        )
        assert "--socket-path" not in Path(f"/proc/{virtiofsd}/cmdline").read_text()  # a descriptor: no host path

        daemon.runtime.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=pod_id))
        daemon.runtime.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=pod_id))
        assert not [d for d in cgroups.directories(cgroup) if d.exists()]
        assert all(d.exists() for d in cgroups.directories(kubelet_parent))  # the kubelet's, left to the kubelet
    finally:
        cgroups.remove(kubelet_parent.rsplit("/", 1)[0])


def test_a_vms_translation_cache_is_the_configured_one_and_its_cgroup_holds_it(pod_env, guest_assets, tmp_path):
    root = assets_root(tmp_path / "state")
    root.mkdir(parents=True)
    (root / "current").symlink_to(guest_assets.dir)
    pods = pod_env(CONFIG + "tcg_cache_mib = 40\n")
    pod_id, cid = run_pod(pods.daemon, pods.image, tmp_path, "cache")
    exec_ok(pods.daemon, cid)
    state = backend_state(pods.daemon, pod_id)
    assert state["tcg_cache_mib"] == 40  # recorded: a restart or a resize of this pod counts this one
    argv = Path(f"/proc/{qemu_pid(pods.daemon, pod_id)}/cmdline").read_bytes().split(b"\0")
    assert argv[argv.index(b"-accel") + 1] == b"tcg,tb-size=40"
    found = cgroups.read_limits(state["cgroup"])
    memory = found.get("memory.max") or found["memory.limit_in_bytes"]
    assert int(memory) == (256 + 146 + 40 + 4) * 2**20  # guest RAM, QEMU and virtiofsd, the cache, its records


def test_a_pod_asking_for_more_than_the_caps_is_refused(env):
    daemon, _, tmp = env
    for field, value, numbers in (
        ("cpu_quota", 300_000, "4 vCPUs (1 + 3 for its CPU limit of 300000/100000); at most 2"),
        ("memory_limit_in_bytes", 2**40, "1048832 MiB (256 + 1048576 for its memory limit"),  # limits.memory: 1Ti
    ):
        pod = pod_config("greedy", tmp / "logs")
        setattr(pod.linux.resources, field, value)
        pod.linux.resources.cpu_period = 100_000
        with pytest.raises(grpc.RpcError) as err:
            daemon.runtime.RunPodSandbox(pb.RunPodSandboxRequest(config=pod, runtime_handler="vm"))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert numbers in err.value.details()
    assert daemon.runtime.ListPodSandbox(pb.ListPodSandboxRequest()).items == []
    assert not list((daemon.socket.parent / "vm" / "jail-ids").glob("*"))


def test_vm_pods_get_distinct_uids_and_are_removed_completely_after_a_daemon_kill(env):
    daemon, image, tmp = env
    pods = dict(run_pod(daemon, image, tmp, f"twin-{i}") for i in range(2))
    uids = {status(qemu_pid(daemon, pod_id))["Uid"].split()[0] for pod_id in pods}
    assert len(uids) == 2  # neither QEMU can signal or ptrace the other
    cgroup_paths = {pod_id: backend_state(daemon, pod_id)["cgroup"] for pod_id in pods}
    assert cgroup_paths == {pod_id: f"/tandem/{pod_id}/{pod_id}" for pod_id in pods}  # no kubelet parent

    daemon.kill()
    daemon.start()
    for pod_id, cid in pods.items():
        exec_ok(daemon, cid)
        daemon.runtime.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=pod_id))
        daemon.runtime.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=pod_id))
        assert not [d for d in cgroups.directories(f"/tandem/{pod_id}") if d.exists()]
    assert not list((daemon.socket.parent / "vm" / "jail-ids").glob("*"))  # the uids are free again
    wait_for(lambda: pod_leftovers(daemon, ("qemu", "virtiofsd"), (str(tmp),)) == [], what="no QEMU or virtiofsd left")
