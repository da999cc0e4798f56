"""The pure parts of core.cgroups (path rules, mount detection) and runc_backend.cgroups (runc's stats for CRI)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from core import cgroups
from core.errors import InvalidArgument
from core.mounts import mountinfo
from runc_backend.cgroups import oom_score_adj_floor, usage_from_stats
from sandbox.backend import ContainerUsage

# `runc events --stats` data, captured from a busybox container on this project's Debian 12 hybrid host
# (cgroup v1 + unified) with a 64 MiB limit, after it wrote 8 MiB to its disk-backed /tmp and 2 MiB to tmpfs.
V1_STATS: dict[str, Any] = {
    "cpu": {
        "usage": {
            "total": 71910139,
            "percpu": [0, 71910139],
            "percpu_kernel": [0, 40000000],
            "percpu_user": [0, 60000000],
            "kernel": 20000000,
            "user": 40000000,
        },
        "throttling": {},
    },
    "cpuset": {
        "cpus": [0, 1],
        "cpu_exclusive": 0,
        "mems": [0],
        "mem_hardwall": 0,
        "mem_exclusive": 0,
        "memory_migrate": 0,
        "memory_spread_page": 0,
        "memory_spread_slab": 0,
        "memory_pressure": 0,
        "sched_load_balance": 1,
        "sched_relax_domain_level": -1,
    },
    "memory": {
        "cache": 10485760,
        "usage": {"limit": 67108864, "usage": 11374592, "max": 11423744, "failcnt": 0},
        "swap": {"limit": 9223372036854771712, "usage": 11374592, "max": 11423744, "failcnt": 0},
        "kernel": {"limit": 9223372036854771712, "usage": 548864, "max": 622592, "failcnt": 0},
        "kernelTCP": {"limit": 9223372036854771712, "failcnt": 0},
        "raw": {
            "active_anon": 4096,
            "active_file": 0,
            "cache": 10485760,
            "dirty": 0,
            "hierarchical_memory_limit": 67108864,
            "hierarchical_memsw_limit": 9223372036854771712,
            "inactive_anon": 2199552,
            "inactive_file": 8388608,
            "mapped_file": 0,
            "pgfault": 953,
            "pgmajfault": 0,
            "pgpgin": 3071,
            "pgpgout": 485,
            "rss": 106496,
            "rss_huge": 0,
            "shmem": 2097152,
            "swap": 0,
            "swapcached": 0,
            "total_active_anon": 4096,
            "total_active_file": 0,
            "total_cache": 10485760,
            "total_dirty": 0,
            "total_inactive_anon": 2199552,
            "total_inactive_file": 8388608,
            "total_mapped_file": 0,
            "total_pgfault": 953,
            "total_pgmajfault": 0,
            "total_pgpgin": 3071,
            "total_pgpgout": 485,
            "total_rss": 106496,
            "total_rss_huge": 0,
            "total_shmem": 2097152,
            "total_swap": 0,
            "total_swapcached": 0,
            "total_unevictable": 0,
            "total_workingset_refault_anon": 0,
            "total_workingset_refault_file": 0,
            "total_writeback": 0,
            "unevictable": 0,
            "workingset_refault_anon": 0,
            "workingset_refault_file": 0,
            "writeback": 0,
        },
    },
    "pids": {"current": 2},
    "blkio": {},
    "hugetlb": {},
    "intel_rdt": {},
    "network_interfaces": None,
}

# The same container's figures as runc reports them on a cgroup v2 host: usage from memory.current, an
# unlimited memory.max as 2**64 - 1, and raw holding v2 memory.stat keys (anon, file, inactive_file, ...).
V2_STATS: dict[str, Any] = {
    "cpu": {"usage": {"total": 71910139, "kernel": 40000000, "user": 30000000}, "throttling": {}},
    "memory": {
        "usage": {"limit": 2**64 - 1, "usage": 11374592},
        "swap": {"limit": 2**64 - 1, "usage": 0},
        "raw": {
            "anon": 106496,
            "file": 10485760,
            "active_file": 0,
            "inactive_file": 8388608,
            "shmem": 2097152,
            "pgfault": 953,
            "pgmajfault": 2,
        },
    },
    "pids": {"current": 2},
}


def test_v1_stats_map_to_cri_figures():
    assert usage_from_stats(V1_STATS, 7) == ContainerUsage(
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


def test_v2_stats_use_v2_key_names_and_unlimited_has_no_available_figure():
    usage = usage_from_stats(V2_STATS, 7)
    assert usage.memory_working_set_bytes == 11374592 - 8388608
    assert (usage.memory_rss_bytes, usage.page_faults, usage.major_page_faults) == (106496, 953, 2)
    assert usage.memory_available_bytes is None


def test_working_set_never_goes_negative_and_missing_figures_are_none():
    stats = {"memory": {"usage": {"usage": 100}, "raw": {"total_inactive_file": 4096}}}
    usage = usage_from_stats(stats, 7)
    assert usage.memory_working_set_bytes == 0
    assert usage.cpu_usage_ns is None and usage.pids is None and usage.memory_rss_bytes is None
    assert usage_from_stats({}, 7) == ContainerUsage(timestamp=7)  # every figure None


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
