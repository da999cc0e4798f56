"""This node as the platform of trusted pods' containers: the host facts their specs depend on."""

from __future__ import annotations

import functools
import os
from pathlib import Path

from core import cgroups
from sandbox.oci.capabilities import capabilities_from_status
from sandbox.oci.platform import HostInfo


@functools.cache
def detect_host() -> HostInfo:
    """This node's HostInfo, read from /proc and /sys once per process."""
    mode = cgroups.detect_mode()
    root = Path(cgroups.CGROUP_ROOT)
    if mode == "v2":
        own = Path("/proc/self/cgroup").read_text().splitlines()[0].partition("::")[2]
        swap = (root / own.lstrip("/") / "memory.swap.max").exists()
        controllers = root / "cgroup.controllers"
        hugetlb = "hugetlb" in controllers.read_text().split() if controllers.exists() else False
    else:
        swap = (root / "memory" / "memory.memsw.limit_in_bytes").exists()
        hugetlb = (root / "hugetlb").is_dir()
    return HostInfo(
        capabilities=capabilities_from_status(Path("/proc/self/status").read_text()),
        cgroup_mode=mode,
        swap_accounting=swap,
        hugetlb=hugetlb,
        hostname=os.uname().nodename,
    )
