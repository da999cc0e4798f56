"""What runc's containers' cgroups tell: the oom_score_adj floor, and runc's stats as CRI usage figures.

Paths, creation and removal are `core.cgroups` (shared with the VM backend).
Statistics come from `runc events --stats`, which reports v1 and v2 in one JSON
shape but with each version's own `memory.stat` keys.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sandbox.backend import ContainerUsage

# A memory limit at or above this means none: v1 reports PAGE_COUNTER_MAX pages, runc on v2 reports 2**64 - 1.
_UNLIMITED = 1 << 62


def oom_score_adj_floor() -> int:
    """The lowest `oom_score_adj` runc can give a container here.

    Without CAP_SYS_RESOURCE a process may not go below the score it has, and
    runc (under conmon) inherits this process's score: a spec asking for less
    fails `runc create`, so specs must be clamped to this floor.
    """
    return int(Path("/proc/self/oom_score_adj").read_text().strip())


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _first(raw: dict[str, Any], *keys: str) -> int | None:
    """The first key present: v1 `total_*` (hierarchical) names, then v2's plain `memory.stat` names."""
    for key in keys:
        if (value := _int(raw.get(key))) is not None:
            return value
    return None


def usage_from_stats(stats: dict[str, Any], timestamp: int) -> ContainerUsage:
    """Map the `data` of `runc events --stats` (sampled at `timestamp`) to CRI usage figures.

    The working set is usage minus inactive file pages (clamped at zero), as
    cAdvisor and containerd compute it: that is what the kubelet evicts on.
    """
    cpu = stats.get("cpu") or {}
    memory = stats.get("memory") or {}
    raw = memory.get("raw") or {}
    usage = _int((memory.get("usage") or {}).get("usage"))
    limit = _int((memory.get("usage") or {}).get("limit"))
    inactive_file = _first(raw, "total_inactive_file", "inactive_file")
    working_set = None if usage is None else max(0, usage - (inactive_file or 0))
    available = None
    if working_set is not None and limit is not None and 0 < limit < _UNLIMITED:
        available = max(0, limit - working_set)
    return ContainerUsage(
        timestamp=timestamp,
        cpu_usage_ns=_int((cpu.get("usage") or {}).get("total")),
        memory_usage_bytes=usage,
        memory_working_set_bytes=working_set,
        memory_available_bytes=available,
        memory_rss_bytes=_first(raw, "total_rss", "anon"),
        page_faults=_first(raw, "total_pgfault", "pgfault"),
        major_page_faults=_first(raw, "total_pgmajfault", "pgmajfault"),
        pids=_int((stats.get("pids") or {}).get("current")),
    )
