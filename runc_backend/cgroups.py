"""Container cgroups under the cgroupfs driver, on cgroup v1, hybrid (v1 + unified) and plain v2 hosts.

runc creates a container's cgroup in every hierarchy from the spec's `cgroupsPath`
and removes the leaf on `runc delete`; the parents it created on the way (the pod's
cgroup) are Tandem's to remove. Statistics come from `runc events --stats`, which
reports v1 and v2 in one JSON shape but with each version's own `memory.stat` keys.
"""

from __future__ import annotations

import errno
import os
import posixpath
from pathlib import Path
from typing import Any, Literal

from core import mounts
from core.errors import FailedPrecondition, InvalidArgument
from sandbox.backend import ContainerUsage

Mode = Literal["v1", "hybrid", "v2"]

CGROUP_ROOT = "/sys/fs/cgroup"
DEFAULT_PARENT = "/tandem"

# A memory limit at or above this means none: v1 reports PAGE_COUNTER_MAX pages, runc on v2 reports 2**64 - 1.
_UNLIMITED = 1 << 62


def _cgroup_mounts(mountinfo: str | None) -> dict[str, str]:
    """Mount point -> filesystem type ("cgroup" or "cgroup2") of every cgroup hierarchy."""
    return {m.mount_point: m.fstype for m in mounts.mountinfo(mountinfo) if m.fstype in ("cgroup", "cgroup2")}


def detect_mode(mountinfo: str | None = None) -> Mode:
    """How this host mounts cgroups, decided the way runc decides it (what is mounted where)."""
    found = _cgroup_mounts(mountinfo)
    if found.get(CGROUP_ROOT) == "cgroup2":
        return "v2"
    if found.get(f"{CGROUP_ROOT}/unified") == "cgroup2":
        return "hybrid"
    return "v1"


def hierarchies(mountinfo: str | None = None) -> list[Path]:
    """The root directory of every mounted hierarchy (v1 controllers, named ones, unified)."""
    return [Path(m) for m in sorted(_cgroup_mounts(mountinfo)) if m == CGROUP_ROOT or m.startswith(CGROUP_ROOT + "/")]


def _clean(path: str, what: str) -> str:
    """`path` made absolute and normal; `..`, `.` and empty components are refused, not resolved."""
    parts = path.strip("/").split("/")
    if path.strip("/") and any(p in ("", ".", "..") for p in parts):
        raise InvalidArgument(f"{what} {path!r} is not a clean cgroup path")
    return posixpath.join("/", *parts)


def pod_parent(cgroup_parent: str, sandbox_id: str) -> str:
    """The pod's cgroup: the kubelet's `cgroup_parent` when it sent one, else `/tandem/<sandbox_id>`.

    Only the cgroupfs driver exists here, so a systemd slice name is refused
    rather than silently turned into a directory called `kubepods.slice`.
    """
    if not cgroup_parent:
        return cgroups_path(DEFAULT_PARENT, sandbox_id)
    if cgroup_parent.endswith(".slice"):
        raise InvalidArgument(
            f"cgroup parent {cgroup_parent!r} is a systemd slice; Tandem uses the cgroupfs driver "
            "(set the kubelet's cgroupDriver to cgroupfs)"
        )
    return _clean(cgroup_parent, "cgroup parent")


def cgroups_path(parent: str, cid: str) -> str:
    """A container's `linux.cgroupsPath`: `<parent>/<cid>`, absolute so runc does not nest it below its own cgroup."""
    if not cid or "/" in cid or cid in (".", ".."):
        raise InvalidArgument(f"invalid id {cid!r} for a cgroup name")
    return posixpath.join(_clean(parent, "cgroup parent"), cid)


def remove(path: str, mountinfo: str | None = None) -> None:
    """Remove the cgroup `path` and everything below it from every hierarchy, deepest first.

    Missing directories are fine (runc already removed the leaf, or a hierarchy
    never had it); a cgroup that still holds processes is a `FailedPrecondition`.
    """
    rel = _clean(path, "cgroup path").lstrip("/")
    if not rel:
        raise InvalidArgument("refusing to remove the root cgroup")
    busy: list[str] = []
    for root in hierarchies(mountinfo):
        top = root / rel
        if not top.is_dir():
            continue
        for d, _, _ in os.walk(top, topdown=False):
            try:
                os.rmdir(d)
            except FileNotFoundError:
                pass
            except OSError as e:
                if e.errno != errno.EBUSY:
                    raise
                busy.append(d)
    if busy:
        raise FailedPrecondition(f"cgroup {path} still has processes in {', '.join(busy)}")


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
