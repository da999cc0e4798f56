"""Private pod networks for tests: a bridge name and a subnet nothing on this host uses, no NAT, no route out."""

from __future__ import annotations

import ipaddress
import json
import secrets
import subprocess
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class PrivateNetwork:
    bridge: str
    subnet: ipaddress.IPv4Network

    def holds(self, ip: str) -> bool:
        return ipaddress.ip_address(ip) in self.subnet

    def toml(self) -> str:
        """`[cni.default]` for a daemon whose default network is this one, masquerade off."""
        return f'[cni.default]\nbridge = "{self.bridge}"\nsubnet = "{self.subnet}"\nmasquerade = false\n'


def _networks_in_use() -> list[ipaddress.IPv4Network]:
    out = subprocess.run(["ip", "-j", "-4", "route", "show", "table", "all"], capture_output=True, check=True).stdout
    return [
        ipaddress.IPv4Network(route["dst"], strict=False)
        for route in json.loads(out or b"[]")
        if route.get("dst", "default") != "default"
    ]


def private_network() -> PrivateNetwork:
    """A fresh bridge name and a 10.x.y.0/24 that overlaps no route of this host (tests run side by side)."""
    in_use = _networks_in_use()
    for _ in range(100):
        subnet = ipaddress.IPv4Network(f"10.{190 + secrets.randbelow(50)}.{secrets.randbelow(256)}.0/24")
        if not any(subnet.overlaps(used) for used in in_use):
            return PrivateNetwork(f"tdt{secrets.token_hex(3)}", subnet)
    raise RuntimeError("no free 10.x.y.0/24 on this host")


def bridge_conflist(network: PrivateNetwork, lease_dir: Path, name: str = "") -> dict:
    """A bridge + host-local + portmap conflist on `network`: pods reach the host and each other only."""
    return {
        "cniVersion": "1.0.0",
        "name": name or f"test-{network.bridge}",
        "plugins": [
            {
                "type": "bridge",
                "bridge": network.bridge,
                "isGateway": True,
                "ipMasq": False,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": str(network.subnet)}]],
                    "dataDir": str(lease_dir),
                },
            },
            {"type": "portmap", "capabilities": {"portMappings": True}},
        ],
    }


def write_bridge_network(conf_dir: Path, file: str = "10-test.conflist") -> PrivateNetwork:
    """A private network written into `conf_dir` as a conflist; leases beside the dir."""
    network = private_network()
    conf_dir.mkdir(parents=True, exist_ok=True)
    (conf_dir / file).write_text(json.dumps(bridge_conflist(network, conf_dir.parent / "ipam")))
    return network


def delete_bridge(bridge: str) -> None:
    subprocess.run(["ip", "link", "delete", bridge], capture_output=True, check=False)
