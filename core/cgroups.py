"""Cgroups under the cgroupfs driver, on cgroup v1, hybrid (v1 + unified) and plain v2 hosts.

Both backends name cgroups by the same rules (a pod's cgroup is the kubelet's
`cgroup_parent`, else `/tandem/<sandbox id>`) and remove them the same way.
"""

from __future__ import annotations

import errno
import os
import posixpath
from pathlib import Path
from typing import Literal

from core.errors import FailedPrecondition, InvalidArgument
from core.mounts import MountEntry, mounts

Mode = Literal["v1", "hybrid", "v2"]

CGROUP_ROOT = "/sys/fs/cgroup"
DEFAULT_PARENT = "/tandem"


def _cgroup_mounts(mountinfo: str | None) -> list[MountEntry]:
    """Every cgroup hierarchy mounted at or below the cgroup root, sorted by mount point."""
    found = {
        m.mount_point: m
        for m in mounts(mountinfo)
        if m.fstype in ("cgroup", "cgroup2")
        and (m.mount_point == CGROUP_ROOT or m.mount_point.startswith(CGROUP_ROOT + "/"))
    }
    return [found[point] for point in sorted(found)]


def detect_mode(mountinfo: str | None = None) -> Mode:
    """How this host mounts cgroups, decided the way runc decides it (what is mounted where)."""
    found = {m.mount_point: m.fstype for m in mounts(mountinfo) if m.fstype in ("cgroup", "cgroup2")}
    if found.get(CGROUP_ROOT) == "cgroup2":
        return "v2"
    if found.get(f"{CGROUP_ROOT}/unified") == "cgroup2":
        return "hybrid"
    return "v1"


def hierarchies(mountinfo: str | None = None) -> list[Path]:
    """The root directory of every mounted hierarchy (v1 controllers, named ones, unified)."""
    return [Path(m.mount_point) for m in _cgroup_mounts(mountinfo)]


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
    """A child cgroup `<parent>/<cid>`, absolute so runc does not nest it below its own cgroup."""
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
