"""Tandem's own pod network, for a node whose CNI conf dir holds no network yet.

A new node has no CNI configuration until a cluster's network add-on installs
one; until then pods join this network instead of failing: a bridge of Tandem's
own with host-local addresses on one subnet, portmap for hostPorts, loopback,
all of them Debian's containernetworking-plugins. Its conflist is written under
Tandem's runtime dir, never into the node's conf dir, so a cluster's network,
once installed there, takes over for new pods (sandbox/cni.py makes the choice).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from core.files import atomic_write_bytes
from sandbox.cni import NetworkConfigList

NAME = "tandem-default"
CONFLIST = f"{NAME}.conflist"
PLUGINS = ("loopback", "bridge", "host-local", "portmap")
"""Every plugin the network runs (host-local as the bridge's IPAM): NetworkReady needs them all installed."""


def default_conflist(*, bridge: str, subnet: str, masquerade: bool, lease_dir: Path) -> dict[str, Any]:
    """The network as a CNI conflist (spec 1.0.0, which Debian 12's plugins 1.1.1 speak).

    The bridge is the pods' gateway (isGateway) with a default route through it; hairpin mode lets a
    pod reach itself through its own hostPort. Leases live in `lease_dir`, beside the conflist.
    """
    return {
        "cniVersion": "1.0.0",
        "name": NAME,
        "plugins": [
            {"type": "loopback"},
            {
                "type": "bridge",
                "bridge": bridge,
                "isGateway": True,
                "ipMasq": masquerade,
                "hairpinMode": True,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": subnet}]],
                    "routes": [{"dst": "0.0.0.0/0"}],
                    "dataDir": str(lease_dir),
                },
            },
            {"type": "portmap", "capabilities": {"portMappings": True}},
        ],
    }


def default_network(directory: Path, *, bridge: str, subnet: str, masquerade: bool) -> NetworkConfigList:
    """The default network as it would be written to `directory` (for `tandem doctor`, which writes nothing)."""
    doc = default_conflist(bridge=bridge, subnet=subnet, masquerade=masquerade, lease_dir=directory / "ipam")
    return NetworkConfigList(doc["name"], doc["cniVersion"], doc["plugins"], directory / CONFLIST)


def write_default_network(directory: Path, *, bridge: str, subnet: str, masquerade: bool) -> NetworkConfigList:
    """Write the default network's conflist into `directory` (Tandem's own, under its runtime dir)."""
    network = default_network(directory, bridge=bridge, subnet=subnet, masquerade=masquerade)
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    atomic_write_bytes(network.source, json.dumps(network.conflist(), indent=2).encode() + b"\n", mode=0o644)
    return network
