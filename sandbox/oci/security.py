"""The LSM and seccomp choices of a CRI security context, as this host can honour them."""

from __future__ import annotations

from core.errors import InvalidArgument
from protos import cri_pb2 as pb
from sandbox.oci.model import SeccompProfile
from sandbox.oci.seccomp import load_localhost_profile, runtime_default_profile


def check_apparmor(sc: pb.LinuxContainerSecurityContext) -> None:
    """This host has no AppArmor: "runtime default" and unconfined both mean no profile; a named one cannot work."""
    if sc.HasField("apparmor"):
        named = sc.apparmor.profile_type == pb.SecurityProfile.Localhost
    else:
        name = sc.apparmor_profile
        if name not in ("", "runtime/default", "docker/default", "unconfined") and not name.startswith("localhost/"):
            raise InvalidArgument(f"invalid apparmor profile {name!r}")
        named = name.startswith("localhost/")
    if named:
        raise InvalidArgument("apparmor is not enabled on this host")


def seccomp_choice(sc: pb.LinuxContainerSecurityContext) -> pb.SecurityProfile | None:
    """The structured `seccomp` field wins over the deprecated path string; neither set means unconfined."""
    if sc.HasField("seccomp"):
        if sc.seccomp.profile_type != pb.SecurityProfile.Localhost and sc.seccomp.localhost_ref:
            raise InvalidArgument("seccomp localhost_ref is only valid with profile type Localhost")
        return sc.seccomp
    path = sc.seccomp_profile_path
    if not path:
        return None
    if path in ("runtime/default", "docker/default"):
        return pb.SecurityProfile(profile_type=pb.SecurityProfile.RuntimeDefault)
    if path == "unconfined":
        return pb.SecurityProfile(profile_type=pb.SecurityProfile.Unconfined)
    if path.startswith("localhost/"):
        return pb.SecurityProfile(profile_type=pb.SecurityProfile.Localhost, localhost_ref=path)
    raise InvalidArgument(f"invalid seccomp profile {path!r}")


def seccomp_profile(choice: pb.SecurityProfile | None, bounding: list[str]) -> SeccompProfile | None:
    if choice is None or choice.profile_type == pb.SecurityProfile.Unconfined:
        return None
    if choice.profile_type == pb.SecurityProfile.RuntimeDefault:
        return runtime_default_profile(bounding)
    if choice.profile_type == pb.SecurityProfile.Localhost:
        return load_localhost_profile(choice.localhost_ref.removeprefix("localhost/"))
    raise InvalidArgument(f"unknown seccomp profile type {choice.profile_type}")
