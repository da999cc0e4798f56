"""Devices in specs: the device cgroup rules and the device nodes a container is given."""

from __future__ import annotations

import os
import posixpath
import stat
from typing import Literal

from core.errors import InvalidArgument, NotFound
from protos import cri_pb2 as pb
from sandbox.oci.model import Device, DeviceRule
from sandbox.oci.platform import HostInfo

# Devices every container may use: null, zero, full, random, urandom, tty,
# console, ptmx and the pty slaves (runc appends the same list on its own).
_STANDARD_DEVICES = (
    ("c", 1, 3),
    ("c", 1, 5),
    ("c", 1, 7),
    ("c", 1, 8),
    ("c", 1, 9),
    ("c", 5, 0),
    ("c", 5, 1),
    ("c", 5, 2),
    ("c", 136, None),
)
# Not walked when a whole /dev is handed to a privileged container (containerd's list).
_SKIPPED_DEV_DIRS = frozenset({"pts", "shm", "fd", "mqueue", ".lxc", ".lxd-mounts", ".udev"})


def _device_rule(kind: str, major: int | None, minor: int | None, access: str) -> DeviceRule:
    rule: DeviceRule = {"allow": True, "type": kind}
    if major is not None:
        rule["major"] = major
    if minor is not None:
        rule["minor"] = minor
    rule["access"] = access
    return rule


def default_device_rules() -> list[DeviceRule]:
    standard = (_device_rule(kind, major, minor, "rwm") for kind, major, minor in _STANDARD_DEVICES)
    return [{"allow": False, "access": "rwm"}, *standard]


def _device(path: str, container_path: str) -> Device | None:
    st = os.lstat(path)
    kind: Literal["c", "b"]
    if stat.S_ISCHR(st.st_mode):
        kind = "c"
    elif stat.S_ISBLK(st.st_mode):
        kind = "b"
    else:
        return None
    return {
        "path": container_path,
        "type": kind,
        "major": os.major(st.st_rdev),
        "minor": os.minor(st.st_rdev),
        "fileMode": stat.S_IMODE(st.st_mode),
        "uid": st.st_uid,
        "gid": st.st_gid,
    }


def _devices_under(directory: str, container_dir: str) -> list[Device]:
    """Every device below `directory`, as seen at `container_dir`; subdirectories are walked, links are not."""
    found: list[Device] = []
    for entry in sorted(os.scandir(directory), key=lambda e: e.name):
        target = posixpath.join(container_dir, entry.name)
        if entry.is_dir(follow_symlinks=False):
            if entry.name not in _SKIPPED_DEV_DIRS:
                found += _devices_under(entry.path, target)
        elif entry.name != "console":
            try:
                device = _device(entry.path, target)
            except (FileNotFoundError, PermissionError):
                continue  # vanished or unreadable while we walked
            if device is not None:
                found.append(device)
    return found


def container_devices(config: pb.ContainerConfig, host: HostInfo) -> tuple[list[Device], list[DeviceRule]]:
    """`linux.devices` and the device cgroup rules: deny all, the standard set, then what was asked for.

    A privileged container sees every host device and may use any device.
    """
    devices: dict[str, Device] = {}
    rules = default_device_rules()
    for request in config.devices:
        if not request.container_path.startswith("/") or not request.host_path.startswith("/"):
            raise InvalidArgument(f"device paths must be absolute: {request.host_path!r} -> {request.container_path!r}")
        access = request.permissions or "rwm"
        if not set(access) <= set("rwm"):
            raise InvalidArgument(f"device permissions {access!r} must combine r, w and m")
        source = os.path.realpath(request.host_path)
        if not os.path.exists(source):
            raise NotFound(f"device {request.host_path} does not exist on the host")
        if os.path.isdir(source):
            found = _devices_under(source, request.container_path)
        else:
            device = _device(source, request.container_path)
            if device is None:
                raise InvalidArgument(f"{request.host_path} is not a device")
            found = [device]
        for device in found:
            devices.setdefault(device["path"], device)
            rules.append(_device_rule(device["type"], device["major"], device["minor"], access))
    if config.linux.security_context.privileged:
        for device in _devices_under(str(host.dev_dir), "/dev"):
            devices.setdefault(device["path"], device)
        rules = [{"allow": True, "access": "rwm"}]
    return list(devices.values()), rules
