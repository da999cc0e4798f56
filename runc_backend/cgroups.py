"""What runc's containers' cgroups tell: the oom_score_adj floor, and their usage as CRI figures.

Paths, creation and removal are `core.cgroups` (shared with the VM backend).
Usage is read straight from the container's cgroup files, v1 or v2 per controller
as this host binds it (a hybrid host has both), not by starting `runc events
--stats` per container: a stats call over hundreds of containers is a few file
reads each.
"""

from __future__ import annotations

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


def _read(path: Path) -> str | None:
    try:
        with open(path, "rb") as f:
            return f.read().decode()
    except (OSError, UnicodeDecodeError):
        return None


def _number(path: Path) -> int | None:
    text = _read(path)
    if text is None:
        return None
    text = text.strip()
    if text == "max":
        return 1 << 63
    return int(text) if text.isdigit() else None


def _keyed(path: Path) -> dict[str, int]:
    """A `key value` file (memory.stat, cpu.stat); empty when absent."""
    values = {}
    for line in (_read(path) or "").splitlines():
        key, _, value = line.partition(" ")
        if value.isdigit():
            values[key] = int(value)
    return values


class CgroupStats:
    """Reads containers' usage from their cgroups, given where each controller is mounted.

    `roots` is `core.cgroups.controller_roots()`: controller -> (its hierarchy's root, cgroup version).
    """

    def __init__(self, roots: dict[str, tuple[Path, int]]) -> None:
        self._memory = roots.get("memory")
        self._pids = roots.get("pids")
        cpu = roots.get("cpu")
        self._cpu: tuple[Path, int] | None = cpu if cpu is not None and cpu[1] == 2 else roots.get("cpuacct")

    def usage(self, path: str, timestamp: int) -> ContainerUsage:
        """The figures of the cgroup `path` (as runc was given it), sampled at `timestamp`; None where a file is
        missing (the container is gone, or this host lacks the controller).

        The working set is usage minus inactive file pages (clamped at zero), as cAdvisor and containerd
        compute it: that is what the kubelet evicts on.
        """
        rel = path.strip("/")
        cpu_ns = None
        if self._cpu is not None:
            root, version = self._cpu
            if version == 2:
                usec = _keyed(root / rel / "cpu.stat").get("usage_usec")
                cpu_ns = None if usec is None else usec * 1000
            else:
                cpu_ns = _number(root / rel / "cpuacct.usage")
        usage = limit = None
        stat: dict[str, int] = {}
        v1 = True
        if self._memory is not None:
            root, version = self._memory
            v1 = version == 1
            directory = root / rel
            usage = _number(directory / ("memory.usage_in_bytes" if v1 else "memory.current"))
            limit = _number(directory / ("memory.limit_in_bytes" if v1 else "memory.max"))
            stat = _keyed(directory / "memory.stat")
        prefix = "total_" if v1 else ""  # v1's hierarchical figures (the container's cgroup and below)
        inactive_file = stat.get(f"{prefix}inactive_file", 0)
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
            memory_rss_bytes=stat.get(f"{prefix}rss" if v1 else "anon"),
            page_faults=stat.get(f"{prefix}pgfault"),
            major_page_faults=stat.get(f"{prefix}pgmajfault"),
            pids=None if self._pids is None else _number(self._pids[0] / rel / "pids.current"),
        )
