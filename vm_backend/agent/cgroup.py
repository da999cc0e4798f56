"""Containers' cgroups in the guest (cgroup v2): where the hierarchy is, and what its files say."""

from __future__ import annotations

from pathlib import Path

from protos import agent_pb2


def keyed(path: Path) -> dict[str, int]:
    """A cgroup `key value` file (cpu.stat, memory.stat, memory.events); empty when absent."""
    try:
        text = path.read_text()
    except OSError:
        return {}
    values = {}
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        if value.strip().isdigit():
            values[key] = int(value)
    return values


def single(path: Path) -> int:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return 0


def cgroup2_root(mountinfo: str = "/proc/self/mountinfo") -> Path | None:
    """Where the cgroup v2 hierarchy is mounted: /sys/fs/cgroup in the guest, /sys/fs/cgroup/unified on hybrid hosts."""
    with open(mountinfo) as f:
        for line in f:
            fields = line.split()
            sep = fields.index("-")
            if fields[sep + 1] == "cgroup2":
                return Path(fields[4].replace("\\040", " "))
    return None


def container_stats(directory: Path) -> agent_pb2.Stats:
    """A container's usage from its cgroup v2 files; figures its cgroup lacks stay 0."""
    memory = keyed(directory / "memory.stat")
    usage = single(directory / "memory.current")
    return agent_pb2.Stats(
        cpu_usage_ns=keyed(directory / "cpu.stat").get("usage_usec", 0) * 1000,
        memory_usage_bytes=usage,
        memory_working_set_bytes=max(usage - memory.get("inactive_file", 0), 0),
        memory_rss_bytes=memory.get("anon", 0),
        page_faults=memory.get("pgfault", 0),
        major_page_faults=memory.get("pgmajfault", 0),
        pids=single(directory / "pids.current"),
    )


def oom_killed(directory: Path) -> bool:
    """Whether the kernel's OOM killer struck in the cgroup."""
    return keyed(directory / "memory.events").get("oom_kill", 0) > 0
