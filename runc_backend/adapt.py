"""The shared OCI layer's spec as Debian's runc 1.1.5 can run it: what runc cannot do, done before it runs.

Measured here (kernel 6.18; the same calls exist in Debian's 6.1): runc 1.1.5
applies `rro` itself (mount_setattr) and creates and joins user namespaces, but
has no ID-mapped mounts (runtime-spec 1.1's mount `uidMappings`, runc 1.2). The
backend makes each such bind itself, ID-mapped, under the bundle, and hands
runc that instead (`bind_id_mapped_sources`); runc's own bind of it keeps the
mapping. The binds go once the container exists (its mount namespace has its
own copies), so a host path stays removable as with any runc mount
(`unbind_id_mapped_sources`).
"""

from __future__ import annotations

import os
from pathlib import Path

from core import mounts
from core.errors import FailedPrecondition
from sandbox.oci.model import Spec

ID_MAPPED_DIR = "idmapped"  # in the bundle: mount i's ID-mapped bind at idmapped/<i>


def bind_id_mapped_sources(spec: Spec, bundle: Path, userns: Path | None) -> None:
    """Replace the source of each ID-mapped mount with an ID-mapped bind of it (blocking, quick).

    The shared layer only lets through mappings equal to the pod's user
    namespace, which `userns` (its pinned file) carries.
    """
    for index, mount in enumerate(spec.get("mounts", [])):
        if "uidMappings" not in mount and "gidMappings" not in mount:
            continue
        if userns is None:
            raise FailedPrecondition(f"mount {mount['destination']} is ID-mapped but the pod has no user namespace")
        target = bundle / ID_MAPPED_DIR / str(index)
        target.parent.mkdir(exist_ok=True)
        if os.path.isdir(mount["source"]):
            target.mkdir(exist_ok=True)
        else:  # kubelet's /etc/hosts and termination log are files: a file is bound onto a file
            target.touch(mode=0o600, exist_ok=True)
        if not mounts.is_mounted(target):
            try:
                mounts.bind_idmapped(mount["source"], target, userns)
            except OSError as e:
                raise FailedPrecondition(
                    f"cannot ID-map {mount['source']} for {mount['destination']} (its filesystem may not allow"
                    f" ID-mapped mounts: tmpfs needs Linux 6.3): {e}"
                ) from e
        mount["source"] = str(target)
        mount.pop("uidMappings", None)
        mount.pop("gidMappings", None)


def unbind_id_mapped_sources(bundle: Path) -> None:
    """Detach the ID-mapped binds made for a container (blocking); none is success."""
    directory = bundle / ID_MAPPED_DIR
    for bound in mounts.mounts_below(directory):
        mounts.sys_umount(bound, mounts.MNT_DETACH)
