"""RuntimeClass manifests for this node's handlers: `tandem config runtimeclasses` (and `make install`).

One per `[runtimes.*]` entry. A VM handler's pods carry their VM: its `overhead.podFixed`
is what a VM pod costs beyond its containers (`vm_backend.resources.pod_fixed_overhead`,
with the measurements behind it), for the accelerator this node's VMs use, so that the
scheduler counts it and the kubelet's pod cgroup leaves room for the VMM.
"""

from __future__ import annotations

from core.settings import Config
from vm_backend import accel, resources

HEADER = """\
# RuntimeClasses for the handlers of {source} (printed by `tandem config runtimeclasses`).
# Apply with `kubectl apply -f`. A VM handler's overhead.podFixed is what one VM pod costs beyond its
# containers' limits on this node (accelerator {accel}): memory = [vm] default_memory_mib ({memory_default} MiB
# of guest RAM) + the VMM's overhead under {accel} ({vmm} MiB{cache}; measured under TCG, estimated for KVM),
# which is the VM cgroup's limit beyond the containers' own (an idle pod's PSS, measured by bench.vm under TCG
# with the default cache, is 147 MiB with 3 pods, 117 MiB with 150); cpu = {cpu}m (an idle pod's QEMU +
# virtiofsd measured 7m by bench.vm, plus room for the VMM's I/O emulation).
# The figures and how they were measured: vm_backend/resources.py.
"""


def node_accel(config: Config) -> str:
    """The accelerator VMs use here: the configured one, else the cached probe's, else TCG (the larger cost)."""
    if config.vm.accel != "auto":
        return config.vm.accel
    choice = accel.cached_choice(config.state_dir)
    return choice.accel if choice is not None else "tcg"


def runtime_classes(config: Config) -> str:
    node = node_accel(config)
    vmm = resources.vmm_overhead_mib(node, config.vm.tcg_cache_mib)
    cpu, memory = resources.pod_fixed_overhead(config.vm.default_memory_mib, vmm)
    text = HEADER.format(
        source=config.source,
        accel=node,
        memory_default=config.vm.default_memory_mib,
        vmm=vmm,
        cache=f", with [vm] tcg_cache_mib = {config.vm.tcg_cache_mib}" if node == "tcg" else "",
        cpu=cpu,
    )
    for name, handler in sorted(config.runtimes.items()):
        text += f"---\napiVersion: node.k8s.io/v1\nkind: RuntimeClass\nmetadata:\n  name: {name}\nhandler: {name}\n"
        if handler.backend == "vm":
            text += f'overhead:\n  podFixed:\n    cpu: "{cpu}m"\n    memory: "{memory}Mi"\n'
    return text
