"""The SetupPod request for a pod's VM: its name, DNS, hosts file, network and sysctls, as CRI asked."""

from __future__ import annotations

import time

from protos import agent_pb2
from sandbox import podfiles
from sandbox.model import SandboxRecord
from vm_backend.network import GuestNetwork


def setup_pod(sandbox: SandboxRecord, guest: GuestNetwork, share_tag: str, current_mac: str = "") -> agent_pb2.SetupPod:
    """What the agent makes of the guest for `sandbox`; `current_mac` is the NIC's MAC when the VM booted before
    its pod's network existed (a warm VM's): the agent finds the NIC by it and gives it the veth's."""
    config = sandbox.config
    hostname = podfiles.hostname(config)
    return agent_pb2.SetupPod(
        hostname=hostname,
        resolv_conf=podfiles.resolv_conf(config.dns_config),
        hosts=podfiles.hosts(hostname, sandbox.ips),
        interfaces=[
            agent_pb2.Interface(name=i.name, mac=i.mac, addresses=i.addresses, mtu=i.mtu, current_mac=current_mac)
            for i in guest.interfaces
        ],
        routes=[agent_pb2.Route(destination=r.destination, gateway=r.gateway, device=r.device) for r in guest.routes],
        sysctls=dict(config.linux.sysctls),
        host_time_unix_ns=time.time_ns(),
        shared_dir_tag=share_tag,
    )
