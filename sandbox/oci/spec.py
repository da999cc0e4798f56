"""OCI runtime specs for a pod's infra process and for its containers: the CRI request converted once.

Where Kubernetes leaves a choice, Tandem does what containerd's CRI plugin does,
so a workload behaves the same after moving here: the same default
capabilities, mounts, device rules, environment, user resolution and seccomp
semantics. Each concern has its module beside this one; this one puts them
together. Everything is computed from the request, the image and what the
backend said about the platform (`ContainerPlatform`); the only side effects are
stat-ing devices and host paths and creating a missing host directory for a
mount, as containerd does. Both backends run what this builds: runc as it is,
the VM's guest after the VM backend moved its paths into the guest.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from core.errors import InvalidArgument
from protos import cri_pb2 as pb
from sandbox.oci import annotations as ann
from sandbox.oci.capabilities import capability_sets, container_capabilities
from sandbox.oci.devices import container_devices, default_device_rules
from sandbox.oci.model import Linux, Process, Resources, Spec
from sandbox.oci.mounts import (
    DEFAULT_MASKED_PATHS,
    DEFAULT_READONLY_PATHS,
    check_mount,
    container_mounts,
    kernel_mounts,
)
from sandbox.oci.namespaces import HOST, Namespaces, check_sysctls
from sandbox.oci.platform import ContainerPlatform
from sandbox.oci.process import (
    DEFAULT_PATH_ENV,
    environment,
    int64_id,
    merge_groups,
    process_args,
    user_string,
    working_dir,
)
from sandbox.oci.resources import container_resources
from sandbox.oci.seccomp import runtime_default_profile
from sandbox.oci.security import check_apparmor, seccomp_choice, seccomp_profile
from sandbox.oci.userns import check_container_user_namespace
from sandbox.oci.users import resolve_identity

OCI_VERSION = "1.0.2"
INFRA_ARGS = ("/catatonit", "-P")
SANDBOX_CPU_SHARES = 2  # containerd's: the infra process idles and should never win CPU


def infra_spec(
    config: pb.PodSandboxConfig, *, rootfs: Path, namespaces: Namespaces, cgroups_path: str, sandbox_id: str = ""
) -> Spec:
    """The spec of the pod's infra process: catatonit holding the pod's namespaces, with no privileges at all.

    `rootfs` holds only a static /catatonit and is mounted read-only. The pod's
    sysctls are applied here, inside the namespaces they belong to; the hostname
    too, unless the pod shares the host's UTS namespace. `sandbox_id` only
    labels the spec (annotation io.kubernetes.cri.sandbox-id). A pod with a user
    namespace of its own joins it (`namespaces.user`); its other namespaces are
    that one's.
    """
    sc = config.linux.security_context
    check_sysctls(config.linux.sysctls, namespaces)
    uid = int64_id(sc.run_as_user, "run_as_user") if sc.HasField("run_as_user") else 0
    if sc.HasField("run_as_group") and not sc.HasField("run_as_user"):
        raise InvalidArgument("run_as_group is set without run_as_user")
    gid = int64_id(sc.run_as_group, "run_as_group") if sc.HasField("run_as_group") else 0
    annotations = {
        ann.ANNOTATION_CONTAINER_TYPE: "sandbox",
        **ann.sandbox_annotations(config, sandbox_id),
        ann.ANNOTATION_SANDBOX_LOG_DIRECTORY: config.log_directory,
    }
    spec: Spec = {
        "ociVersion": OCI_VERSION,
        "process": {
            "terminal": False,
            "user": {"uid": uid, "gid": gid},
            "args": list(INFRA_ARGS),
            "env": [DEFAULT_PATH_ENV],
            "cwd": "/",
            "capabilities": capability_sets(set(), set()),
            "noNewPrivileges": True,
        },
        "root": {"path": str(rootfs), "readonly": True},
        "mounts": kernel_mounts(privileged=False)[:2],
        "annotations": annotations,
        "linux": {
            "namespaces": namespaces.entries(),
            **namespaces.id_mapping_entries(),
            "cgroupsPath": cgroups_path,
            "resources": {"devices": default_device_rules(), "cpu": {"shares": SANDBOX_CPU_SHARES}},
            "sysctl": dict(sorted(config.linux.sysctls.items())),
            "seccomp": runtime_default_profile(),
            "maskedPaths": list(DEFAULT_MASKED_PATHS),
            "readonlyPaths": list(DEFAULT_READONLY_PATHS),
        },
    }
    if namespaces.uts != HOST and config.hostname:
        spec["hostname"] = config.hostname
    return spec


def container_spec(
    config: pb.ContainerConfig,
    sandbox: pb.PodSandboxConfig,
    *,
    sandbox_id: str,
    image_config: dict[str, Any],
    platform: ContainerPlatform,
) -> Spec:
    """The spec of one container of a pod, on the platform its backend prepared.

    `platform.rootfs` is the container's mounted root (its /etc/passwd and
    /etc/group resolve user names); `image_config` the image's OCI config JSON.
    The request is validated completely before the one side effect, creating
    missing host directories for mounts.
    """
    host = platform.host
    image = image_config.get("config") or {}
    sc = config.linux.security_context
    privileged = sc.privileged
    if privileged and not sandbox.linux.security_context.privileged:
        raise InvalidArgument("a privileged container needs a privileged pod sandbox")
    check_container_user_namespace(sc.namespace_options, sandbox.linux.security_context.namespace_options)
    check_apparmor(sc)
    seccomp = seccomp_choice(sc)
    id_mappings = platform.namespaces.id_mappings
    requested_mounts = [(check_mount(m, id_mappings), m) for m in config.mounts]
    identity = resolve_identity(
        platform.rootfs,
        user_string(sc, image),
        supplemental_groups=tuple(sc.supplemental_groups),
        image_groups=merge_groups(sc),
    )
    capabilities = container_capabilities(sc, host)
    process: Process = {
        "terminal": config.tty,
        "user": {"uid": identity.uid, "gid": identity.gid, "additionalGids": list(identity.additional_gids)},
        "args": process_args(config, image),
        "env": environment(config, sandbox, image, host),
        "cwd": working_dir(config, image),
        "capabilities": capabilities,
        "noNewPrivileges": sc.no_new_privs,
    }
    if config.linux.HasField("resources"):
        process["oomScoreAdj"] = max(config.linux.resources.oom_score_adj, platform.oom_score_adj_floor)
    devices, device_rules = container_devices(config, host)
    resources: Resources = {"devices": device_rules}
    resources.update(container_resources(config.linux, host))
    profile = None if privileged else seccomp_profile(seccomp, capabilities["bounding"])
    mounts, rootfs_propagation = container_mounts(requested_mounts, sc, platform.pod_files, host)

    namespace_entries = platform.namespaces.entries()
    if host.cgroup_mode == "v2" and not privileged:
        namespace_entries.append({"type": "cgroup"})  # hides the host's cgroup tree; v2 only, as containerd
    linux: Linux = {
        "namespaces": namespace_entries,
        **platform.namespaces.id_mapping_entries(),
        "cgroupsPath": platform.cgroups_path,
        "resources": resources,
        "devices": devices,
        "maskedPaths": [] if privileged else list(sc.masked_paths),
        "readonlyPaths": [] if privileged else list(sc.readonly_paths),
    }
    if rootfs_propagation:
        linux["rootfsPropagation"] = rootfs_propagation
    if profile is not None:
        linux["seccomp"] = profile
    return {
        "ociVersion": OCI_VERSION,
        "process": process,
        "root": {"path": str(platform.rootfs), "readonly": sc.readonly_rootfs},
        "mounts": mounts,
        "annotations": {
            ann.ANNOTATION_CONTAINER_TYPE: "container",
            **ann.sandbox_annotations(sandbox, sandbox_id),
            ann.ANNOTATION_CONTAINER_NAME: config.metadata.name,
            ann.ANNOTATION_IMAGE_NAME: config.image.user_specified_image or config.image.image,
        },
        "linux": linux,
    }
