"""A hostile guest, for real: a privileged container of a VM pod attacks the pod's share with busybox alone.

The attacker shares the guest's PID namespace, so it reaches the share through the agent's own virtio-fs
mount (`/proc/1/root/run/tandem/share`). It swaps directories for symlinks (to `/` and to a host path),
renames container directories, plants symlinks and FIFOs where the next mount targets will be made, fills
the share and writes to the console: before and during CreateContainer and RemoveContainer of other
containers and of itself. Whoever wins each race, the host outside the pod stays as it was (sentinel files
and a sentinel mount, the system's mounts, nothing of the pod in the host's mount namespace but its own
run dir), and the pod is removed completely: no mounts, directories, processes or cgroup left. It runs twice:
on a VM booted for the pod, and on one from the warm pool, after which the next pod's warm VM holds nothing of it.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import grpc
import pytest

from core import cgroups, mounts
from protos import cri_pb2 as pb
from tests.support.pods import container_config, pod_config, pod_leftovers, warm_pool
from tests.support.wait import wait_for

pytestmark = pytest.mark.integration

SHARE = "/proc/1/root/run/tandem/share"  # the agent's mount of the share, seen from a container in its PID namespace
MARKER = "attacker-marker"  # in the attacker's own root: how it tells its own directory in the share

# One round of the race, run in a loop by the attacker until /tmp/stop-race exists: in every container directory
# that appears in the share, plant what would send a host that followed paths elsewhere (where the mount targets
# are about to be made), then take the directory away and leave a symlink to / in its place.
RACE = r"""
S=%(share)s
touch /%(marker)s
ls $S > /tmp/known
while [ ! -e /tmp/stop-race ]; do
  for d in $S/*; do
    n=${d##*/}
    case "$n" in *.gone) continue;; esac
    grep -qx "$n" /tmp/known && continue
    [ -d "$d" ] && [ ! -L "$d" ] || continue
    ln -s / "$d/mounts" 2>/dev/null
    ln -s %(sentinel)s "$d/mounts/0" 2>/dev/null
    mkfifo "$d/mounts/1" 2>/dev/null
    ln -s %(sentinel)s "$d/rootfs" 2>/dev/null
    mv "$d" "$d.gone" 2>/dev/null && ln -s / "$d" && echo "$n" >> /tmp/won
  done
done
touch /tmp/race-stopped
exec sleep 3600
"""


def exec_sync(daemon, cid: str, script: str, timeout: int = 300) -> pb.ExecSyncResponse:
    return daemon.runtime.ExecSync(pb.ExecSyncRequest(container_id=cid, cmd=["sh", "-c", script], timeout=timeout))


def host_table(tmp: Path) -> set[tuple[int, str]]:
    """The host's mounts this test answers for: the system's own and those under its directory (other tests on
    this machine mount and unmount under /tmp, /var/tmp and /run at any moment), but for the daemon's own
    private binds of its netns and VM directories (made at its first pod, kept)."""
    others = ("/tmp/", "/var/tmp/", "/run/")
    daemons = (str(tmp / "run" / "netns"), str(tmp / "run" / "vm"))
    return {
        (m.mount_id, m.mount_point)
        for m in mounts.mountinfo()
        if (m.mount_point.startswith(f"{tmp}/") or not m.mount_point.startswith(others))
        and m.mount_point not in daemons
        and not is_warm(tmp, m.mount_point)
    }


def is_warm(tmp: Path, point: str) -> bool:
    """A mount of the warm pool's VMs (they come and go with refills) or of the pool's netns directory."""
    vm = tmp / "run" / "vm"
    if not point.startswith(f"{vm}/"):
        return False
    top = Path(point).relative_to(vm).parts[0]
    return top.startswith("warm-") or top == "netns-warm"


def run_dir_of(daemon, pod_id: str) -> Path:
    """The pod's VM run dir, as its record says (a warm VM keeps its own name)."""
    answer = daemon.runtime.PodSandboxStatus(pb.PodSandboxStatusRequest(pod_sandbox_id=pod_id, verbose=True))
    return Path(json.loads(answer.info["info"])["backendState"]["run_dir"])


def share_mounts(run_dir: Path) -> list[str]:
    """The mount points in the pod's share namespace (seen from the host, through its pinned file)."""
    table = subprocess.run(
        ["nsenter", f"--mount={run_dir / 'share.ns'}", "--", "/bin/cat", "/proc/self/mountinfo"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return [m.mount_point for m in mounts.mountinfo(table)]


def pod_mounts_are_only_the_run_dirs(tmp: Path, run_dir: Path) -> None:
    """In the host's namespace the pod has its run dir's tmpfs mounts, the pinned namespaces and the containers'
    roots at host-only paths: nothing of the share."""
    run = tmp / "run"
    for point in (m.mount_point for m in mounts.mountinfo() if m.mount_point.startswith(f"{run}/")):
        relative = Path(point).relative_to(run)
        other_warm = is_warm(tmp, point) and not point.startswith(f"{run_dir}/") and point != str(run_dir)
        allowed = (
            relative.parts[:1] == ("netns",)
            or other_warm
            or relative == Path("vm")
            or point in (str(run_dir), str(run_dir / "vmm"), str(run_dir / "share.ns"))
            or (relative.parts[2:3] == ("c",) and relative.name == "rootfs" and len(relative.parts) == 5)
        )
        assert allowed, f"a mount of the pod in the host's namespace: {point}"


def test_a_hostile_guest_cannot_reach_past_its_share(vm_either_env):
    daemon, image, tmp = vm_either_env.daemon, vm_either_env.image, vm_either_env.tmp
    pooled = "warm_pool = 1" in vm_either_env.daemon.config_path.read_text()
    sentinel = tmp / "sentinel"
    sentinel.mkdir()
    (sentinel / "file").write_text("sentinel\n")
    (sentinel / "mnt").mkdir()
    mounts.sys_mount("sentinel", sentinel / "mnt", "tmpfs", 0, "size=1m")
    (sentinel / "mnt" / "file").write_text("on the sentinel mount\n")
    sentinel_mount = mounts.top_mount(sentinel / "mnt")
    volume = tmp / "volume"
    volume.mkdir()
    (volume / "data").write_text("volume data\n")
    (tmp / "file-volume").write_text("file volume\n")
    before = host_table(tmp)

    pod = pod_config("hostile", tmp / "logs")
    pod.linux.security_context.privileged = True
    pod_id = daemon.runtime.RunPodSandbox(pb.RunPodSandboxRequest(config=pod, runtime_handler="vm")).pod_sandbox_id
    run_dir = run_dir_of(daemon, pod_id)
    assert run_dir.name.startswith("warm-") == pooled

    def create(name: str, *command: str, privileged: bool = False) -> str:
        config = container_config(name, image, *command)
        config.linux.security_context.privileged = privileged
        config.mounts.extend(
            [
                pb.Mount(container_path="/data", host_path=str(volume), readonly=True),
                pb.Mount(container_path="/file", host_path=str(tmp / "file-volume")),
            ]
        )
        request = pb.CreateContainerRequest(pod_sandbox_id=pod_id, config=config, sandbox_config=pod)
        return daemon.runtime.CreateContainer(request).container_id

    def start(cid: str) -> None:
        daemon.runtime.StartContainer(pb.StartContainerRequest(container_id=cid))

    def remove(cid: str) -> None:
        daemon.runtime.StopContainer(pb.StopContainerRequest(container_id=cid, timeout=0))
        daemon.runtime.RemoveContainer(pb.RemoveContainerRequest(container_id=cid))
        assert not [p for p in share_mounts(run_dir) if cid in p], f"mounts of {cid} left in the share"

    # A victim made before the attack, then the attacker, whose loop races every CreateContainer that follows.
    victim = create("victim", "sleep", "3600")
    start(victim)
    script = RACE % {"share": SHARE, "marker": MARKER, "sentinel": sentinel}
    attacker = create("attacker", "sh", "-c", script, privileged=True)
    start(attacker)
    wait_for(lambda: exec_sync(daemon, attacker, "test -e /tmp/known").exit_code == 0, 120, "the race to begin")

    outcomes, started = [], []
    for i in range(4):  # CreateContainer while the attacker swaps what it sees appear
        try:
            raced = create(f"raced-{i}", "sh", "-c", "cat /data/data /file; sleep 3600")
        except grpc.RpcError as e:
            outcomes.append(e.code())
            continue
        outcomes.append(grpc.StatusCode.OK)
        try:
            start(raced)
            started.append("started")
        except grpc.RpcError as e:
            started.append(e.code().name)  # the guest took the rootfs away from its own container
        pod_mounts_are_only_the_run_dirs(tmp, run_dir)
        remove(raced)
    # OK; FAILED_PRECONDITION: the host found the share tampered with; INTERNAL: the guest's agent could not create
    # the container whose directory the guest took away after the host attached it (the guest's own loss)
    expected = (grpc.StatusCode.OK, grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.INTERNAL)
    assert all(code in expected for code in outcomes), outcomes
    won = exec_sync(daemon, attacker, "touch /tmp/stop-race; cat /tmp/won 2>/dev/null; true").stdout.decode()
    print(f"races: CreateContainer {[c.name for c in outcomes]}, StartContainer {started}; swapped {len(won.split())}")
    wait_for(lambda: exec_sync(daemon, attacker, "test -e /tmp/race-stopped").exit_code == 0, 120, "the race to end")

    # RemoveContainer of another container whose directory the attacker moved, replaced and filled with traps.
    tamper = f"""cd {SHARE} && mv {victim} {victim}.moved && ln -s / {victim} && mkdir -p deep/er &&
        mv {victim}.moved deep/er/ && ln -s {sentinel} deep/er/{victim}.moved/mounts/escape &&
        mkfifo deep/er/{victim}.moved/fifo && ln -s {sentinel} {victim}.moved"""
    tampered = exec_sync(daemon, attacker, tamper)
    assert tampered.exit_code == 0, tampered.stderr
    assert f"{run_dir}/share/deep/er/{victim}.moved/rootfs" in share_mounts(run_dir)
    remove(victim)

    # A full share: the next CreateContainer is refused, nothing outside the pod fills up; emptied, it works again.
    fill_up = f"yes 2>/dev/null >{SHARE}/fill; i=0; while :>{SHARE}/fill-$i; do i=$((i+1)); done"
    fill = exec_sync(daemon, attacker, fill_up)
    assert b"No space left on device" in fill.stderr, fill.stderr
    with pytest.raises(grpc.RpcError) as full:
        create("after-fill", "sleep", "3600")
    assert full.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "share is full" in full.value.details()
    assert exec_sync(daemon, attacker, f"rm -f {SHARE}/fill {SHARE}/fill-*").exit_code == 0  # no container ID matches
    fresh = create("after-fill", "sh", "-c", "cat /data/data /file; sleep 3600")
    start(fresh)
    assert exec_sync(daemon, fresh, "cat /data/data /file").stdout == b"volume data\nfile volume\n"

    # The console: what the guest prints lands in the VMM's own bounded tmpfs, never on the host's filesystems.
    console = run_dir / "vmm" / "console.log"
    logged = console.stat().st_size
    flood = exec_sync(daemon, attacker, "mknod /tmp/ttyS0 c 4 64 && dd if=/dev/zero of=/tmp/ttyS0 bs=4k count=64")
    assert flood.exit_code == 0, flood.stderr
    wait_for(lambda: console.stat().st_size >= logged + 256 * 1024, 60, "the flood to reach the console log")
    vmm = os.statvfs(console.parent)
    assert vmm.f_blocks * vmm.f_frsize == 4 << 20 and os.stat(console.parent).st_dev != os.stat(run_dir).st_dev

    # The attacker's own RemoveContainer, after it moved its own directory and left traps in its place.
    own = f"""for d in {SHARE}/*; do [ -e "$d/rootfs/{MARKER}" ] && o="$d"; done; [ -n "$o" ] &&
        mv "$o" "$o.self" && ln -s / "$o" && ln -s {sentinel} "$o.self/mounts/escape" && mkfifo "$o.self/pipe" """
    assert exec_sync(daemon, attacker, own).exit_code == 0
    remove(attacker)
    remove(fresh)

    daemon.runtime.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=pod_id))
    daemon.runtime.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=pod_id))
    if pooled:  # the next pod's warm VM is another one, and holds nothing of the last pod's
        wait_for(lambda: warm_pool(daemon)["ready"] == 1, 180, "the pool to refill")
        request = pb.RunPodSandboxRequest(config=pod_config("next", tmp / "logs"), runtime_handler="vm")
        next_id = daemon.runtime.RunPodSandbox(request).pod_sandbox_id
        next_dir = run_dir_of(daemon, next_id)
        assert next_dir.name.startswith("warm-") and next_dir != run_dir
        share = subprocess.run(
            ["nsenter", f"--mount={next_dir / 'share.ns'}", "--", "/bin/ls", "-A", str(next_dir / "share")],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        assert share == "" and not [p for p in share_mounts(next_dir) if p.startswith(f"{next_dir}/share/")]
        daemon.runtime.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=next_id))
        daemon.runtime.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=next_id))
        daemon.stop()  # and the unclaimed warm VM goes with the daemon
    assert pod_leftovers(daemon, ("qemu", "virtiofsd"), (str(tmp),)) == []
    assert not run_dir.exists() and not list((tmp / "state" / "vm" / "layers").iterdir())
    assert not [d for d in cgroups.directories(f"/tandem/{pod_id}") if d.exists()]
    assert host_table(tmp) == before
    assert sorted(p.name for p in sentinel.iterdir()) == ["file", "mnt"]
    assert (sentinel / "file").read_text() == "sentinel\n"
    assert mounts.top_mount(sentinel / "mnt") == sentinel_mount
    assert (sentinel / "mnt" / "file").read_text() == "on the sentinel mount\n"
    mounts.unmount(sentinel / "mnt")
