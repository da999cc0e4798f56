"""A pod's network: its own network namespace and CNI attachment, the same for both backends.

Each step is persisted as soon as it is taken (through `persist`), so a crash
at any point leaves a record that `disconnect` can undo.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path

from protos import cri_pb2 as pb
from sandbox import cni, netns
from sandbox.cni import CniAttachment, CniPlugins, PortMapping
from sandbox.model import SandboxRecord


def port_mappings(config: pb.PodSandboxConfig) -> list[PortMapping]:
    protocols = {pb.TCP: "tcp", pb.UDP: "udp", pb.SCTP: "sctp"}
    return [
        PortMapping(p.container_port, p.host_port, protocols.get(p.protocol, "tcp"), p.host_ip)
        for p in config.port_mappings
        if p.host_port > 0
    ]


class PodNetworking:
    """Network namespaces pinned under `netns_root`, attached by `cni`."""

    def __init__(self, netns_root: Path, cni: CniPlugins, persist: Callable[[SandboxRecord], None]) -> None:
        self.netns_root = netns_root
        self.cni = cni
        self._persist = persist

    def readiness(self) -> cni.Readiness:
        """NetworkReady as kubelet reads it: there is a network for new pods and its plugins are installed."""
        return self.cni.readiness()

    def current(self) -> cni.PodNetwork:
        """The network new pods join now, and why."""
        return self.cni.current()

    async def connect(
        self, sandbox: SandboxRecord, create_netns: Callable[[Path], Awaitable[None]] = netns.create_at
    ) -> None:
        """Give the pod its network namespace and CNI attachment (none for host-network pods).

        `create_netns` makes the namespace at the path it is given (the pod's
        backend decides which user namespace owns it).
        """
        if sandbox.host_network:
            return
        network = self.cni.network_for_new_pod()
        path = await netns.reserve(self.netns_root, sandbox.id)
        try:
            await create_netns(path)
        except BaseException:
            await netns.remove(path)
            raise
        sandbox.netns_path = str(path)
        # Recorded before ADD, so a crash mid-ADD is undone on the network that was used, whatever the conf dir
        # says by then; ADD's result replaces it below.
        sandbox.cni_result = CniAttachment(network.conflist(), "eth0", {}).to_dict()
        self._persist(sandbox)
        m = sandbox.config.metadata
        attachment = await self.cni.setup(
            sandbox.id,
            Path(sandbox.netns_path),
            pod_name=m.name,
            pod_namespace=m.namespace,
            pod_uid=m.uid,
            port_mappings=port_mappings(sandbox.config),
            network=network,
        )
        sandbox.cni_result = attachment.to_dict()
        sandbox.ips = attachment.ips()
        self._persist(sandbox)

    async def disconnect(self, sandbox: SandboxRecord) -> None:
        """Undo `connect` with the network recorded there: DEL with ADD's result, or, after a crash mid-ADD,
        without one (the plugins clean up by container ID)."""
        netns_path = Path(sandbox.netns_path) if sandbox.netns_path else None
        attachment = CniAttachment.from_dict(sandbox.cni_result) if sandbox.cni_result is not None else None
        if attachment is not None:
            m = sandbox.config.metadata
            await self.cni.teardown(
                sandbox.id,
                netns_path,
                attachment,
                pod_name=m.name,
                pod_namespace=m.namespace,
                pod_uid=m.uid,
                port_mappings=port_mappings(sandbox.config),
            )
            sandbox.cni_result = None
        if netns_path is not None:
            await netns.remove(netns_path)
            sandbox.netns_path = ""
        self._persist(sandbox)
