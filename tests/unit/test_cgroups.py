"""The pure parts of core.cgroups (path rules, mount detection) and runc_backend.cgroups (cgroup files as CRI stats)."""

from __future__ import annotations

from pathlib import Path

import pytest

from core import cgroups
from core.errors import InvalidArgument
from core.mounts import mountinfo
from runc_backend.cgroups import CgroupStats, oom_score_adj_floor
from sandbox.backend import ContainerUsage

V1_MEMORY_STAT = """cache 10485760
rss 106496
pgfault 953
pgmajfault 0
inactive_file 8388608
total_cache 10485760
total_rss 106496
total_pgfault 953
total_pgmajfault 0
total_inactive_file 8388608
"""

V2_MEMORY_STAT = """anon 106496
file 10485760
inactive_file 8388608
pgfault 953
pgmajfault 2
"""


def write_files(directory: Path, files: dict[str, str]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (directory / name).write_text(text)


def test_v1_figures_come_from_each_controllers_hierarchy(tmp_path):
    """A busybox container with a 64 MiB limit, after it wrote 8 MiB to its disk-backed /tmp, as v1 shows it."""
    rel = "tandem/pod/ctr"
    write_files(tmp_path / "cpuacct" / rel, {"cpuacct.usage": "71910139\n"})
    write_files(
        tmp_path / "memory" / rel,
        {"memory.usage_in_bytes": "11374592\n", "memory.limit_in_bytes": "67108864\n", "memory.stat": V1_MEMORY_STAT},
    )
    write_files(tmp_path / "pids" / rel, {"pids.current": "2\n"})
    roots = {c: (tmp_path / c, 1) for c in ("cpu", "cpuacct", "memory", "pids")}
    assert CgroupStats(roots).usage(f"/{rel}", 7) == ContainerUsage(
        timestamp=7,
        cpu_usage_ns=71910139,
        memory_usage_bytes=11374592,
        memory_working_set_bytes=11374592 - 8388608,  # usage less total_inactive_file
        memory_available_bytes=64 * 2**20 - (11374592 - 8388608),
        memory_rss_bytes=106496,
        page_faults=953,
        major_page_faults=0,
        pids=2,
    )


def test_v2_figures_use_v2_files_and_unlimited_has_no_available_figure(tmp_path):
    rel = "tandem/pod/ctr"
    write_files(
        tmp_path / rel,
        {
            "cpu.stat": "usage_usec 71910\nuser_usec 40000\nsystem_usec 31910\n",
            "memory.current": "11374592\n",
            "memory.max": "max\n",
            "memory.stat": V2_MEMORY_STAT,
            "pids.current": "2\n",
        },
    )
    roots = {c: (tmp_path, 2) for c in ("cpu", "memory", "pids")}
    usage = CgroupStats(roots).usage(f"/{rel}", 7)
    assert usage.cpu_usage_ns == 71910000 and usage.memory_working_set_bytes == 11374592 - 8388608
    assert (usage.memory_rss_bytes, usage.page_faults, usage.major_page_faults, usage.pids) == (106496, 953, 2, 2)
    assert usage.memory_available_bytes is None


def test_a_hybrid_host_reads_memory_from_v1_and_cpu_from_cpuacct(tmp_path):
    rel = "p/c"
    write_files(tmp_path / "cpuacct" / rel, {"cpuacct.usage": "5\n"})
    write_files(tmp_path / "memory" / rel, {"memory.usage_in_bytes": "100\n", "memory.stat": V1_MEMORY_STAT})
    roots = {"cpuacct": (tmp_path / "cpuacct", 1), "memory": (tmp_path / "memory", 1), "misc": (tmp_path, 2)}
    usage = CgroupStats(roots).usage(rel, 7)
    assert (usage.cpu_usage_ns, usage.memory_usage_bytes, usage.pids) == (5, 100, None)


def test_working_set_never_goes_negative_and_missing_figures_are_none(tmp_path):
    write_files(tmp_path / "memory" / "c", {"memory.usage_in_bytes": "100\n", "memory.stat": V1_MEMORY_STAT})
    roots = {c: (tmp_path / c, 1) for c in ("cpuacct", "memory", "pids")}
    usage = CgroupStats(roots).usage("/c", 7)
    assert usage.memory_working_set_bytes == 0
    assert usage.cpu_usage_ns is None and usage.pids is None and usage.memory_available_bytes is None
    assert CgroupStats(roots).usage("/gone", 7) == ContainerUsage(timestamp=7)  # every figure None
    assert CgroupStats({}).usage("/c", 7) == ContainerUsage(timestamp=7)  # no controllers at all


@pytest.mark.parametrize(
    ("parent", "cid", "expected"),
    [
        ("/kubepods/burstable/pod1234", "abc", "/kubepods/burstable/pod1234/abc"),
        ("/kubepods/besteffort/pod1234/", "abc", "/kubepods/besteffort/pod1234/abc"),
        ("kubepods/pod1", "abc", "/kubepods/pod1/abc"),  # relative would nest below runc's own cgroup
        ("/", "abc", "/abc"),
    ],
)
def test_container_cgroups_path(parent: str, cid: str, expected: str):
    assert cgroups.cgroups_path(parent, cid) == expected


@pytest.mark.parametrize(
    ("parent", "cid"), [("/kubepods/../etc", "abc"), ("/a/./b", "abc"), ("/a//b", "abc"), ("/p", "x/y"), ("/p", "..")]
)
def test_unclean_paths_are_refused(parent: str, cid: str):
    with pytest.raises(InvalidArgument):
        cgroups.cgroups_path(parent, cid)


def test_pod_parent_defaults_to_tandem_and_refuses_systemd_slices():
    assert cgroups.pod_parent("", "sb1") == "/tandem/sb1"
    assert cgroups.pod_parent("/kubepods/burstable/pod9/", "sb1") == "/kubepods/burstable/pod9"
    with pytest.raises(InvalidArgument, match="cgroupfs"):
        cgroups.pod_parent("kubepods-burstable-pod9.slice", "sb1")


def test_remove_refuses_the_root():
    with pytest.raises(InvalidArgument):
        cgroups.remove("/")


HYBRID = """\
24 30 0:22 / /sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw
25 24 0:21 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
26 25 0:23 / /sys/fs/cgroup/unified rw,relatime shared:9 - cgroup2 cgroup2 rw
27 25 0:24 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,xattr,name=systemd
28 25 0:25 / /sys/fs/cgroup/cpu,cpuacct rw,relatime - cgroup cgroup rw,cpu,cpuacct
29 25 0:26 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
40 30 0:40 / /mnt/odd\\040name rw,relatime - cgroup cgroup rw,pids
"""
V1_ONLY = "\n".join(line for line in HYBRID.splitlines() if "cgroup2" not in line)
V2_ONLY = "30 1 0:27 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:4 - cgroup2 cgroup2 rw,nsdelegate\n"


def test_detect_mode_from_mountinfo():
    assert cgroups.detect_mode(HYBRID) == "hybrid"
    assert cgroups.detect_mode(V1_ONLY) == "v1"
    assert cgroups.detect_mode(V2_ONLY) == "v2"
    assert cgroups.detect_mode() in ("v1", "hybrid", "v2")


def test_hierarchies_are_the_cgroup_mounts_below_the_cgroup_root():
    assert cgroups.hierarchies(HYBRID) == [
        Path("/sys/fs/cgroup/cpu,cpuacct"),
        Path("/sys/fs/cgroup/memory"),
        Path("/sys/fs/cgroup/systemd"),
        Path("/sys/fs/cgroup/unified"),
    ]
    assert cgroups.hierarchies(V2_ONLY) == [Path("/sys/fs/cgroup")]
    entries = [(m.mount_point, m.fstype, m.super_options) for m in mountinfo(HYBRID)]
    assert ("/mnt/odd name", "cgroup", "rw,pids") in entries  # mountinfo's octal escapes undone


def test_controllers_are_found_in_the_v1_mount_options():
    roots = cgroups.controller_roots(HYBRID)
    assert roots["memory"] == (Path("/sys/fs/cgroup/memory"), 1)
    assert roots["cpu"] == roots["cpuacct"] == (Path("/sys/fs/cgroup/cpu,cpuacct"), 1)
    assert "xattr" not in roots and "systemd" not in roots
    assert "pids" not in roots  # mounted outside the cgroup root: not a hierarchy of ours


def test_directories_name_the_cgroup_in_every_hierarchy_and_never_the_root():
    assert cgroups.directories("/tandem/p/p", V2_ONLY) == [Path("/sys/fs/cgroup/tandem/p/p")]
    assert Path("/sys/fs/cgroup/memory/tandem/p/p") in cgroups.directories("/tandem/p/p", HYBRID)
    with pytest.raises(InvalidArgument):
        cgroups.directories("/", HYBRID)
    with pytest.raises(InvalidArgument):
        cgroups.directories("/a/../b", HYBRID)


def test_limits_are_written_per_cgroup_version():
    files = cgroups.limit_files(cgroups.Limits(memory_bytes=300 * 2**20, pids=170, cpu_quota_us=200_000))
    assert files["memory"][1] == [
        ("memory.limit_in_bytes", "314572800"),
        ("memory.memsw.limit_in_bytes", "314572800"),  # no swap
    ]
    assert files["memory"][2] == [("memory.max", "314572800"), ("memory.swap.max", "0")]
    assert files["pids"][1] == files["pids"][2] == [("pids.max", "170")]
    assert files["cpu"][1] == [("cpu.cfs_period_us", "100000"), ("cpu.cfs_quota_us", "200000")]
    assert files["cpu"][2] == [("cpu.max", "200000 100000")]


def test_oom_score_adj_floor_is_this_process_score():
    assert oom_score_adj_floor() == int(Path("/proc/self/oom_score_adj").read_text())
