"""The jail's logic without a VM: uid allocation, the jailer's command line, the VM's size, caps and cgroup limits."""

import os
from pathlib import Path

import pytest

from core import cgroups
from core.errors import InvalidArgument, ResourceExhausted
from core.settings import TCG_CACHE_MIB
from protos import cri_pb2 as pb
from vm_backend import jailer, resources
from vm_backend.jail import Jail, JailIds, join_prefix
from vm_backend.qemu import TapNic, VmSpec, build_argv, launch_argv

MIB = 2**20


def pod(cpu_quota: int = 0, memory: int = 0, cgroup_parent: str = "") -> pb.PodSandboxConfig:
    config = pb.PodSandboxConfig(metadata=pb.PodSandboxMetadata(name="p", namespace="n", uid="u"))
    config.linux.cgroup_parent = cgroup_parent
    config.linux.resources.cpu_quota, config.linux.resources.cpu_period = cpu_quota, 100_000 if cpu_quota else 0
    config.linux.resources.memory_limit_in_bytes = memory
    return config


def test_jail_ids_are_distinct_per_pod_and_come_back_when_released(tmp_path):
    ids = JailIds(tmp_path / "ids", 5000, 3)
    a, b = ids.allocate("pod-a"), ids.allocate("pod-b")
    assert (a, b) == (5000, 5001)
    assert ids.allocate("pod-a") == a  # a retried start keeps its uid
    assert ids.holders() == {5000: "pod-a", 5001: "pod-b"}
    ids.release("pod-a")
    assert ids.allocate("pod-c") == 5000
    assert ids.allocate("pod-d") == 5002
    with pytest.raises(ResourceExhausted, match="jail_uid_count"):
        ids.allocate("pod-e")
    ids.release("pod-e")  # holding nothing is fine
    assert JailIds(tmp_path / "ids", 5000, 3).holders() == {5000: "pod-c", 5001: "pod-b", 5002: "pod-d"}  # a restart


def test_a_uid_taken_by_a_concurrent_start_is_skipped(tmp_path):
    ids = JailIds(tmp_path / "ids", 7000, 2)
    (tmp_path / "ids").mkdir()
    os.symlink("other", tmp_path / "ids" / "7000")
    assert ids.allocate("mine") == 7001


def spec(tmp_path: Path, jail: Jail | None, accel: str = "tcg") -> VmSpec:
    return VmSpec(
        name="p1", run_dir=tmp_path / "run", kernel=Path("/assets/vmlinux"), initramfs=Path("/assets/initrd"),
        userland=Path("/assets/userland.img"), userland_bytes=2**21, accel=accel,
        tap=TapNic("tap0", "02:00:00:00:00:01"), netns=Path("/run/netns/p1"),
        qemu="/usr/bin/qemu-system-x86_64", jail=jail,
    )  # fmt: skip


def test_qemu_gets_the_tap_as_a_descriptor_and_the_same_argv_jailed_or_not(tmp_path):
    jail = Jail(7000, 7000, (Path("/sys/fs/cgroup/memory/p/x"), Path("/sys/fs/cgroup/pids/p/x")))
    jailed, free = spec(tmp_path, jail), spec(tmp_path, None)
    share = tmp_path / "run" / "virtiofsd.sock"
    qemu = build_argv(jailed, share, tap_fd=9)
    assert qemu == build_argv(free, share, tap_fd=9)
    assert "tap,id=n0,fd=9" in qemu and not any("ifname" in a for a in qemu)
    assert "-pidfile" not in qemu  # the daemon writes it: QEMU could not be trusted to
    with pytest.raises(InvalidArgument, match="file descriptor"):
        build_argv(jailed)

    assert launch_argv(free, qemu, share) == ["nsenter", "--net=/run/netns/p1", "--", *qemu]
    argv = launch_argv(jailed, qemu, share)
    prefix, program = argv[: argv.index("--")], argv[argv.index("--") + 1 :]
    assert program == qemu
    args = jailer.parse([*prefix[3:], "--", *program])
    assert args.cgroup == ["/sys/fs/cgroup/memory/p/x", "/sys/fs/cgroup/pids/p/x"]
    assert (args.netns, args.root, args.uid, args.gid) == ("/run/netns/p1", str(tmp_path / "run" / "jail"), 7000, 7000)
    shared = {"/usr", "/assets/vmlinux", "/assets/initrd", "/assets/userland.img"}  # the image read-only, like the rest
    assert shared | {str(tmp_path / "run" / "virtiofsd.sock")} <= set(args.ro)
    assert args.rw == [str(tmp_path / "run" / "vmm")]  # the one writable place: not the run dir with the share
    assert sorted(args.dev) == ["null", "random", "urandom", "zero"]
    assert "kvm" in jailer.parse(launch_argv(spec(tmp_path, jail, "kvm"), qemu, share)[3:]).dev
    assert args.program == qemu


def test_the_jailer_refuses_a_jail_for_root_and_relative_paths():
    with pytest.raises(SystemExit):
        jailer.parse(["--root", "/r", "--uid", "0", "--gid", "5", "--", "/bin/true"])
    with pytest.raises(SystemExit):
        jailer.parse(["--root", "/r", "--uid", "5", "--gid", "5", "--ro", "usr", "--", "/bin/true"])
    assert jailer.parse(["--cgroup", "/sys/fs/cgroup/x", "--", "/bin/true"]).root is None  # join only
    with pytest.raises(SystemExit):  # a jail builds its own mount namespace
        jailer.parse(["--root", "/r", "--uid", "5", "--gid", "5", "--mountns", "/ns", "--", "/bin/true"])


def test_virtiofsd_joins_the_vm_cgroup_and_the_share_namespace_and_nothing_else():
    jail = Jail(7000, 7000, (Path("/sys/fs/cgroup/pids/p/x"),))
    prefix = jail.join_prefix(Path("/run/tandem/vm/p/share.ns"))
    args = jailer.parse([*prefix[3:], "/usr/lib/qemu/virtiofsd"])
    assert (args.cgroup, args.mountns, args.root, args.netns) == (
        ["/sys/fs/cgroup/pids/p/x"],
        "/run/tandem/vm/p/share.ns",
        None,
        None,
    )
    unjailed = jailer.parse([*join_prefix((), Path("/ns"))[3:], "/usr/lib/qemu/virtiofsd"])
    assert (unjailed.cgroup, unjailed.mountns) == ([], "/ns")


def test_vm_size_adds_the_pods_resources_to_the_defaults():
    assert resources.vm_size(pod(), 1, 256, 4, 4096) == (1, 256)
    assert resources.vm_size(pod(cpu_quota=50_000, memory=100 * MIB + 1), 1, 256, 4, 4096) == (2, 357)


def test_a_pod_asking_for_more_than_the_caps_is_refused_with_the_numbers():
    with pytest.raises(InvalidArgument, match=r"3 vCPUs \(1 \+ 2 for its CPU limit of 200000/100000\); at most 2"):
        resources.vm_size(pod(cpu_quota=200_000), 1, 256, 2, 4096)
    with pytest.raises(InvalidArgument, match=r"1048832 MiB .*1099511627776 bytes\); at most 4096 MiB"):
        resources.vm_size(pod(memory=2**40), 1, 256, 2, 4096)  # limits.memory: 1Ti


def test_the_caps_default_to_the_node():
    assert resources.default_max_vcpus() == os.cpu_count()
    assert 0 < resources.default_max_memory_mib() < resources.node_memory_mib()


def test_the_vm_cgroup_sits_in_the_pods_and_holds_the_guest_plus_the_vmm():
    assert resources.vm_cgroup("/kubepods/burstable/pod9", "s1") == "/kubepods/burstable/pod9/s1"
    assert resources.vm_cgroup("", "s1") == "/tandem/s1/s1"
    with pytest.raises(InvalidArgument):
        resources.vm_cgroup("kubepods.slice", "s1")
    limits = resources.vm_limits(2, 512, resources.vmm_overhead_mib("tcg", TCG_CACHE_MIB))
    assert limits.memory_bytes == (512 + resources.vmm_overhead_mib("tcg", TCG_CACHE_MIB)) * MIB
    assert limits.pids == resources.PIDS_BASE + 2
    assert (limits.cpu_quota_us, limits.cpu_period_us) == (300_000, 100_000)
    files = cgroups.limit_files(limits)
    assert files["cpu"][2] == [("cpu.max", "300000 100000")]
    assert files["memory"][1][0] == ("memory.limit_in_bytes", str(limits.memory_bytes))
