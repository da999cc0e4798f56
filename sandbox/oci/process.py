"""A container's process: command, environment, working directory and user, by Kubernetes' and containerd's rules."""

from __future__ import annotations

from typing import Any

from core.errors import InvalidArgument
from protos import cri_pb2 as pb
from sandbox.oci.platform import HostInfo

DEFAULT_PATH_ENV = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def process_args(config: pb.ContainerConfig, image: dict[str, Any]) -> list[str]:
    """Kubernetes' rules: command replaces the entrypoint, args replace the image's Cmd."""
    command, args = list(config.command), list(config.args)
    if not command:
        if not args:
            args = list(image.get("Cmd") or [])
        entrypoint = list(image.get("Entrypoint") or [])
        if entrypoint != [""]:
            command = entrypoint
    if not command and not args:
        raise InvalidArgument("no command specified")
    return command + args


def merge_env(entries: list[str]) -> list[str]:
    """Later entries replace earlier ones with the same name, in place; a bare `NAME` removes it."""
    merged: dict[str, str] = {}
    for entry in entries:
        name, sep, _ = entry.partition("=")
        if sep:
            merged[name] = entry
        else:
            merged.pop(name, None)
    return list(merged.values())


def environment(
    config: pb.ContainerConfig, sandbox: pb.PodSandboxConfig, image: dict[str, Any], host: HostInfo
) -> list[str]:
    base = [DEFAULT_PATH_ENV, *(["TERM=xterm"] if config.tty else []), f"HOSTNAME={sandbox.hostname or host.hostname}"]
    return merge_env([*base, *map(str, image.get("Env") or []), *(f"{e.key}={e.value}" for e in config.envs)])


def working_dir(config: pb.ContainerConfig, image: dict[str, Any]) -> str:
    cwd = config.working_dir or image.get("WorkingDir") or "/"
    if not cwd.startswith("/"):
        raise InvalidArgument(f"working directory {cwd!r} must be absolute")
    return cwd


def int64_id(value: pb.Int64Value, what: str) -> int:
    if not 0 <= value.value <= 2**31 - 1:
        raise InvalidArgument(f"{what} {value.value} is out of range")
    return value.value


def user_string(sc: pb.LinuxContainerSecurityContext, image: dict[str, Any]) -> str:
    """containerd's precedence: run_as_username, run_as_user, then the image's User."""
    user = sc.run_as_username or (str(int64_id(sc.run_as_user, "run_as_user")) if sc.HasField("run_as_user") else "")
    if sc.HasField("run_as_group"):
        if not user:
            raise InvalidArgument("run_as_group is set without run_as_user or run_as_username")
        return f"{user}:{int64_id(sc.run_as_group, 'run_as_group')}"
    return user or str(image.get("User") or "")


def merge_groups(sc: pb.LinuxContainerSecurityContext) -> bool:
    """Whether the image's /etc/group memberships join the supplementary groups (policy Merge, not Strict)."""
    if sc.supplemental_groups_policy not in (pb.Merge, pb.Strict):
        raise InvalidArgument(f"unknown supplemental groups policy {sc.supplemental_groups_policy}")
    return sc.supplemental_groups_policy == pb.Merge
