"""The OCI runtime spec (config.json, runtime-spec v1.0.2, plus 1.1's ID-mapped mounts) as typed dictionaries.

TypedDicts rather than classes: a spec is JSON that runc, crun and the guest
agent read as it is, and a TypedDict is that JSON, checked by the type checker.
Only the parts Tandem writes are modelled; `total=False` marks the optional keys.
"""

from __future__ import annotations

from typing import Any, Literal, TypedDict

SeccompProfile = dict[str, Any]
"""An OCI `linux.seccomp` object: built by `sandbox.oci.seccomp` or read from a Localhost profile file."""


class User(TypedDict, total=False):
    uid: int
    gid: int
    additionalGids: list[int]


class Capabilities(TypedDict):
    bounding: list[str]
    effective: list[str]
    permitted: list[str]
    inheritable: list[str]
    ambient: list[str]


class ConsoleSize(TypedDict):
    width: int
    height: int


class Process(TypedDict, total=False):
    terminal: bool
    consoleSize: ConsoleSize
    user: User
    args: list[str]
    env: list[str]
    cwd: str
    capabilities: Capabilities
    noNewPrivileges: bool
    oomScoreAdj: int


class Root(TypedDict):
    path: str
    readonly: bool


class IDMapping(TypedDict):
    containerID: int
    hostID: int
    size: int


class _MountRequired(TypedDict):
    destination: str
    type: str
    source: str
    options: list[str]


class Mount(_MountRequired, total=False):
    # An ID-mapped bind (runtime-spec 1.1): runc 1.1 cannot make one, so the runc backend does it
    # before runc sees the spec (runc_backend/idmap.py).
    uidMappings: list[IDMapping]
    gidMappings: list[IDMapping]


class Namespace(TypedDict, total=False):
    type: str  # pid, network, ipc, uts, mount, cgroup, user
    path: str  # join this one; without it, a new namespace


class DeviceRule(TypedDict, total=False):
    allow: bool
    type: str  # "c", "b", or absent for all
    major: int
    minor: int
    access: str


class Device(TypedDict):
    path: str
    type: Literal["c", "b"]
    major: int
    minor: int
    fileMode: int
    uid: int
    gid: int


class CpuResources(TypedDict, total=False):
    shares: int
    quota: int
    period: int
    cpus: str
    mems: str


class MemoryResources(TypedDict, total=False):
    limit: int
    swap: int


class HugepageLimit(TypedDict):
    pageSize: str
    limit: int


class Resources(TypedDict, total=False):
    """`linux.resources`: what UpdateContainerResources changes too."""

    devices: list[DeviceRule]
    cpu: CpuResources
    memory: MemoryResources
    hugepageLimits: list[HugepageLimit]
    unified: dict[str, str]


class Linux(TypedDict, total=False):
    namespaces: list[Namespace]
    uidMappings: list[IDMapping]
    gidMappings: list[IDMapping]
    cgroupsPath: str
    resources: Resources
    devices: list[Device]
    sysctl: dict[str, str]
    seccomp: SeccompProfile
    maskedPaths: list[str]
    readonlyPaths: list[str]
    rootfsPropagation: str


class Spec(TypedDict, total=False):
    ociVersion: str
    process: Process
    root: Root
    hostname: str
    mounts: list[Mount]
    annotations: dict[str, str]
    linux: Linux
