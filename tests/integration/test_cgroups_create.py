"""core.cgroups.create on this host's real hierarchies (root): what a VM's jailer must be able to join."""

from __future__ import annotations

import secrets
import subprocess

from core import cgroups


def test_a_cgroup_below_a_parent_someone_else_made_can_be_joined():
    """A pod's cgroup parent made by another (kubelet, or a concurrent pod start that has not yet filled it in):
    on a v1 cpuset hierarchy it has no CPUs yet, and a cgroup below it would take that emptiness (ENOSPC on join)."""
    parent = f"/tandem-test-{secrets.token_hex(4)}"
    for directory in cgroups.directories(parent):
        directory.mkdir()  # as a bare mkdir leaves it: on v1 cpuset, cpuset.cpus and cpuset.mems empty
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        cgroups.create(f"{parent}/pod/vm")
        cgroups.join(cgroups.directories(f"{parent}/pod/vm"), sleeper.pid)
        assert sleeper.pid in cgroups.processes(f"{parent}/pod/vm")
    finally:
        sleeper.kill()
        sleeper.wait()
        cgroups.remove(parent)
