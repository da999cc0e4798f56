"""Cgroups under the cgroupfs driver, on cgroup v1, hybrid (v1 + unified) and plain v2 hosts.

Both backends name cgroups by the same rules (a pod's cgroup is the kubelet's
`cgroup_parent`, else `/tandem/<sandbox id>`) and remove them the same way. runc
creates and joins its containers' cgroups itself; the VM backend creates one per
VM here, writes its limits and has the VM's processes join it.
"""

from __future__ import annotations

import contextlib
import errno
import os
import posixpath
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from core.errors import FailedPrecondition, InvalidArgument
from core.mounts import Mount, mountinfo

Mode = Literal["v1", "hybrid", "v2"]

CGROUP_ROOT = "/sys/fs/cgroup"
DEFAULT_PARENT = "/tandem"
LIMITED_CONTROLLERS = ("memory", "pids", "cpu")  # what `Limits` writes
_V1_OPTIONS = {"rw", "ro", "xattr", "noprefix", "clone_children", "cpuset_v2_mode", "favordynmods"}  # not controllers


def _cgroup_mounts(text: str | None) -> list[Mount]:
    """Every cgroup hierarchy mounted at or below the cgroup root, sorted by mount point."""
    found = {
        m.mount_point: m
        for m in mountinfo(text)
        if m.fstype in ("cgroup", "cgroup2")
        and (m.mount_point == CGROUP_ROOT or m.mount_point.startswith(CGROUP_ROOT + "/"))
    }
    return [found[point] for point in sorted(found)]


def detect_mode(text: str | None = None) -> Mode:
    """How this host mounts cgroups, decided the way runc decides it (what is mounted where)."""
    found = {m.mount_point: m.fstype for m in mountinfo(text) if m.fstype in ("cgroup", "cgroup2")}
    if found.get(CGROUP_ROOT) == "cgroup2":
        return "v2"
    if found.get(f"{CGROUP_ROOT}/unified") == "cgroup2":
        return "hybrid"
    return "v1"


def hierarchies(mountinfo: str | None = None) -> list[Path]:
    """The root directory of every mounted hierarchy (v1 controllers, named ones, unified)."""
    return [Path(m.mount_point) for m in _cgroup_mounts(mountinfo)]


def controller_roots(mountinfo: str | None = None) -> dict[str, tuple[Path, int]]:
    """Controller -> (root of the hierarchy it is bound to, cgroup version 1 or 2).

    A v1 hierarchy names its controllers in its mount options; a cgroup2 hierarchy
    offers those its root's `cgroup.controllers` lists (none on a hybrid host whose
    controllers are all bound to v1).
    """
    found: dict[str, tuple[Path, int]] = {}
    for entry in _cgroup_mounts(mountinfo):
        root = Path(entry.mount_point)
        if entry.fstype == "cgroup":
            for option in entry.super_options.split(","):
                if option not in _V1_OPTIONS and "=" not in option:
                    found.setdefault(option, (root, 1))
    for entry in _cgroup_mounts(mountinfo):
        if entry.fstype == "cgroup2":
            try:
                offered = (Path(entry.mount_point) / "cgroup.controllers").read_text().split()
            except OSError:
                offered = []
            for controller in offered:
                found.setdefault(controller, (Path(entry.mount_point), 2))
    return found


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


def _relative(path: str) -> str:
    rel = _clean(path, "cgroup path").lstrip("/")
    if not rel:
        raise InvalidArgument("refusing to touch the root cgroup")
    return rel


def directories(path: str, mountinfo: str | None = None) -> list[Path]:
    """The cgroup `path` in every hierarchy: the `cgroup.procs` files a process writes to join it."""
    rel = _relative(path)
    return [root / rel for root in hierarchies(mountinfo)]


def _write(path: Path, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


def _inherit_cpuset(directory: Path) -> None:
    """A new v1 cpuset cgroup starts with no CPUs and no memory nodes (nothing could join it): copy the parent's."""
    for name in ("cpuset.cpus", "cpuset.mems"):
        if not (directory / name).read_text().strip():
            _write(directory / name, (directory.parent / name).read_text().strip())


def _enable_controllers(root: Path, rel: str, controllers: list[str]) -> None:
    """On cgroup2, a controller's files exist in a cgroup only once every ancestor delegates it."""
    current = root
    for part in ["", *rel.split("/")[:-1]]:
        current = current / part if part else current
        enabled = (current / "cgroup.subtree_control").read_text().split()
        missing = [c for c in controllers if c not in enabled]
        if missing:
            _write(current / "cgroup.subtree_control", " ".join(f"+{c}" for c in missing))


def create(path: str, mountinfo: str | None = None, searchable: bool = False) -> None:
    """Create the cgroup `path` (and its missing parents) in every hierarchy; existing is fine.

    `searchable` adds o+x to each directory on the way (the daemon's umask makes
    them 0700): runc inside a pod's user namespace, a stranger to the host, must
    reach the container's cgroup to bind it into a cgroup v1 container.
    """
    rel = _relative(path)
    roots = controller_roots(mountinfo)
    v2_wanted: dict[Path, list[str]] = {}
    for controller in LIMITED_CONTROLLERS:
        if controller in roots and roots[controller][1] == 2:
            v2_wanted.setdefault(roots[controller][0], []).append(controller)
    cpuset = roots.get("cpuset")
    for root in hierarchies(mountinfo):
        if root in v2_wanted:
            _enable_controllers(root, rel, v2_wanted[root])
        current = root
        for part in rel.split("/"):
            current = current / part
            with contextlib.suppress(FileExistsError):
                current.mkdir()
            if cpuset is not None and cpuset == (root, 1):
                # also where the directory was there already: another may have made it and not filled it in yet
                # (kubelet, or a concurrent pod start); left empty, nothing below it could be joined (ENOSPC)
                _inherit_cpuset(current)
            if searchable:
                current.chmod(current.stat().st_mode & 0o7777 | 0o011)


@dataclass(frozen=True)
class Limits:
    """What a cgroup may use: bytes of memory (swap: none), tasks (threads count), CPU time per period."""

    memory_bytes: int
    pids: int
    cpu_quota_us: int
    cpu_period_us: int = 100_000


def limit_files(limits: Limits) -> dict[str, dict[int, list[tuple[str, str]]]]:
    """Controller -> cgroup version -> the (file, value) pairs to write, in order."""
    memory = str(limits.memory_bytes)
    return {
        "memory": {
            # memsw (memory + swap) must not be below the memory limit: written second, equal, so no swap
            1: [("memory.limit_in_bytes", memory), ("memory.memsw.limit_in_bytes", memory)],
            2: [("memory.max", memory), ("memory.swap.max", "0")],
        },
        "pids": {1: [("pids.max", str(limits.pids))], 2: [("pids.max", str(limits.pids))]},
        "cpu": {
            1: [("cpu.cfs_period_us", str(limits.cpu_period_us)), ("cpu.cfs_quota_us", str(limits.cpu_quota_us))],
            2: [("cpu.max", f"{limits.cpu_quota_us} {limits.cpu_period_us}")],
        },
    }


def set_limits(path: str, limits: Limits, mountinfo: str | None = None) -> None:
    """Write `limits` into the cgroup `path` (created first); a controller this host lacks is a FailedPrecondition.

    A swap file that does not exist (no swap accounting) is skipped: without it there is no swap to limit.
    """
    rel = _relative(path)
    roots = controller_roots(mountinfo)
    for controller, by_version in limit_files(limits).items():
        if controller not in roots:
            raise FailedPrecondition(f"the {controller} cgroup controller is not available on this host")
        root, version = roots[controller]
        for name, value in by_version[version]:
            target = root / rel / name
            if name in ("memory.memsw.limit_in_bytes", "memory.swap.max") and not target.exists():
                continue
            _write(target, value)


def set_memory_limit(path: str, memory_bytes: int, mountinfo: str | None = None) -> None:
    """Change only the memory limit of an existing cgroup (swap stays none). On v1 memsw may never be below the
    memory limit, so a raise writes it first and a cut second."""
    rel = _relative(path)
    roots = controller_roots(mountinfo)
    if "memory" not in roots:
        raise FailedPrecondition("the memory cgroup controller is not available on this host")
    root, version = roots["memory"]
    if version == 2:
        _write(root / rel / "memory.max", str(memory_bytes))
        return
    memory, memsw = root / rel / "memory.limit_in_bytes", root / rel / "memory.memsw.limit_in_bytes"
    order = [memory, memsw] if memory_bytes < int(memory.read_text()) else [memsw, memory]
    for target in order:
        if target.exists():
            _write(target, str(memory_bytes))


def read_limits(path: str, mountinfo: str | None = None) -> dict[str, str]:
    """The limit files `set_limits` writes, as they read now (file name -> stripped content)."""
    rel = _relative(path)
    roots = controller_roots(mountinfo)
    found = {}
    for controller, by_version in limit_files(Limits(0, 0, 0)).items():
        if controller in roots:
            root, version = roots[controller]
            for name, _ in by_version[version]:
                with_root = root / rel / name
                if with_root.exists():
                    found[name] = with_root.read_text().strip()
    return found


def join(directories_: list[Path], pid: int = 0) -> None:
    """Move process `pid` (0: the caller) with all its threads into each of `directories_`."""
    for directory in directories_:
        _write(directory / "cgroup.procs", str(pid))


def move_processes(source: str, target: str, mountinfo: str | None = None) -> set[int]:
    """Move every process of the cgroup `source` (not below it) into `target`, in every hierarchy; returns them.

    Memory already charged stays where it was on cgroup v2 (the kernel never moves
    charges there). On a v1 memory hierarchy `target` is asked to take the charges
    of its immigrants' pages along (`memory.move_charge_at_immigrate`: anonymous and
    file pages, shared memory included), which kernels since 6.x refuse (EINVAL, the
    feature is gone; measured on 6.18): there, too, the charges stay.
    """
    roots = controller_roots(mountinfo)
    memory = roots.get("memory")
    source_rel, target_rel = _relative(source), _relative(target)
    if memory is not None and memory[1] == 1:
        immigrate = memory[0] / target_rel / "memory.move_charge_at_immigrate"
        try:
            _write(immigrate, "3")
        except OSError as e:
            if e.errno not in (errno.EINVAL, errno.ENOENT):
                raise
    moved: set[int] = set()
    for root in hierarchies(mountinfo):
        try:
            pids = [int(line) for line in (root / source_rel / "cgroup.procs").read_text().split()]
        except FileNotFoundError:
            continue
        for pid in pids:
            try:
                _write(root / target_rel / "cgroup.procs", str(pid))
            except ProcessLookupError:
                continue  # it ended meanwhile
            moved.add(pid)
    return moved


def processes(path: str, mountinfo: str | None = None) -> set[int]:
    """Every process in the cgroup `path` or below it, in any hierarchy."""
    found: set[int] = set()
    for directory in directories(path, mountinfo):
        for d, _, files in os.walk(directory):
            if "cgroup.procs" in files:
                try:
                    found.update(int(line) for line in Path(d, "cgroup.procs").read_text().split())
                except OSError:
                    continue
    return found


def remove(path: str, mountinfo: str | None = None) -> None:
    """Remove the cgroup `path` and everything below it from every hierarchy, deepest first.

    Missing directories are fine (runc already removed the leaf, or a hierarchy
    never had it); a cgroup that still holds processes is a `FailedPrecondition`.
    """
    busy: list[str] = []
    for top in directories(path, mountinfo):
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
