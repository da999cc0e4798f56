"""What runc's containers' cgroups tell: the oom_score_adj floor, and their usage as CRI figures.

Paths, creation and removal are `core.cgroups` (shared with the VM backend).
Usage is read straight from the container's cgroup files, v1 or v2 per controller
as this host binds it (a hybrid host has both), not by starting `runc events
--stats` per container: a stats call over hundreds of containers is a few file
reads each.
"""

from __future__ import annotations

import os
from pathlib import Path

from sandbox.backend import ContainerUsage

# A memory limit at or above this means none: v1 reports PAGE_COUNTER_MAX pages, v2 says "max".
_UNLIMITED = 1 << 62


def oom_score_adj_floor() -> int:
    """The lowest `oom_score_adj` runc can give a container here.

    Without CAP_SYS_RESOURCE a process may not go below the score it has, and
    runc (under conmon) inherits this process's score: a spec asking for less
    fails `runc create`, so specs must be clamped to this floor.
    """
    return int(Path("/proc/self/oom_score_adj").read_text().strip())


def _read(path: str) -> bytes | None:
    """A cgroup file's content (a few hundred bytes at most), None when it cannot be read. Plain
    os calls: a stats call reads five files per container, for hundreds of containers."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        return os.read(fd, 65536)
    except OSError:
        return None
    finally:
        os.close(fd)


def _number(path: str) -> int | None:
    data = _read(path)
    if data is None:
        return None
    data = data.strip()
    if data == b"max":
        return 1 << 63
    return int(data) if data.isdigit() else None


def _keyed(path: str) -> dict[bytes, int]:
    """A `key value` file (memory.stat, cpu.stat); empty when absent."""
    values = {}
    for line in (_read(path) or b"").splitlines():
        key, _, value = line.partition(b" ")
        if value.isdigit():
            values[key] = int(value)
    return values


class CgroupStats:
    """Reads containers' usage from their cgroups, given where each controller is mounted.

    `roots` is `core.cgroups.controller_roots()`: controller -> (its hierarchy's root, cgroup version).
    """

    def __init__(self, roots: dict[str, tuple[Path, int]]) -> None:
        memory, pids, cpu = roots.get("memory"), roots.get("pids"), roots.get("cpu")
        if cpu is None or cpu[1] != 2:
            cpu = roots.get("cpuacct")
        self._memory = None if memory is None else (f"{memory[0]}/", memory[1] == 1)  # (root/, is v1)
        self._pids = None if pids is None else f"{pids[0]}/"
        self._cpu = None if cpu is None else (f"{cpu[0]}/", cpu[1] == 1)

    def usage(self, path: str, timestamp: int) -> ContainerUsage:
        """The figures of the cgroup `path` (as runc was given it), sampled at `timestamp`; None where a file is
        missing (the container is gone, or this host lacks the controller).

        The working set is usage minus inactive file pages (clamped at zero), as cAdvisor and containerd
        compute it: that is what the kubelet evicts on.
        """
        rel = path.strip("/")
        cpu_ns = None
        if self._cpu is not None:
            root, v1 = self._cpu
            if v1:
                cpu_ns = _number(f"{root}{rel}/cpuacct.usage")
            else:
                usec = _keyed(f"{root}{rel}/cpu.stat").get(b"usage_usec")
                cpu_ns = None if usec is None else usec * 1000
        usage = limit = None
        stat: dict[bytes, int] = {}
        v1 = True
        if self._memory is not None:
            root, v1 = self._memory
            directory = f"{root}{rel}/"
            usage = _number(directory + ("memory.usage_in_bytes" if v1 else "memory.current"))
            limit = _number(directory + ("memory.limit_in_bytes" if v1 else "memory.max"))
            stat = _keyed(directory + "memory.stat")
        prefix = b"total_" if v1 else b""  # v1's hierarchical figures (the container's cgroup and below)
        inactive_file = stat.get(prefix + b"inactive_file", 0)
        working_set = None if usage is None else max(0, usage - inactive_file)
        available = None
        if working_set is not None and limit is not None and 0 < limit < _UNLIMITED:
            available = max(0, limit - working_set)
        return ContainerUsage(
            timestamp=timestamp,
            cpu_usage_ns=cpu_ns,
            memory_usage_bytes=usage,
            memory_working_set_bytes=working_set,
            memory_available_bytes=available,
            memory_rss_bytes=stat.get(prefix + b"rss" if v1 else b"anon"),
            page_faults=stat.get(prefix + b"pgfault"),
            major_page_faults=stat.get(prefix + b"pgmajfault"),
            pids=None if self._pids is None else _number(f"{self._pids}{rel}/pids.current"),
        )
