"""The pure parts of vm_backend.network: what the guest is told, from what the netns held."""

from __future__ import annotations

import socket
from typing import Any

from pyroute2.netlink.rtnl.ifaddrmsg import ifaddrmsg
from pyroute2.netlink.rtnl.rtmsg import rtmsg

from vm_backend.network import Route, addresses_from, random_mac, routes_from

ETH0 = 3


def route(**fields: Any) -> dict[str, Any]:
    """A route as pyroute2's .get() shows it; by default a unicast route of the main table via eth0."""
    return {"family": socket.AF_INET, "table": 254, "type": 1, "proto": 3, "oif": ETH0, "dst_len": 0, **fields}


def test_random_mac_is_unicast_locally_administered_and_random() -> None:
    macs = {random_mac() for _ in range(200)}
    assert len(macs) == 200
    for mac in macs:
        octets = [int(x, 16) for x in mac.split(":")]
        assert len(octets) == 6
        assert octets[0] & 0x02, mac  # locally administered
        assert not octets[0] & 0x01, mac  # unicast


def test_addresses_keep_global_ones_with_prefix_and_drop_link_local() -> None:
    addrs = [
        {"family": socket.AF_INET, "prefixlen": 24, "scope": 0, "address": "10.88.0.5", "local": "10.88.0.5"},
        {"family": socket.AF_INET6, "prefixlen": 64, "scope": 0, "address": "fd00:1::5"},
        {"family": socket.AF_INET6, "prefixlen": 64, "scope": 253, "address": "fe80::1"},
        {"family": socket.AF_INET, "prefixlen": 8, "scope": 254, "address": "127.0.0.1"},
        {"family": socket.AF_INET, "prefixlen": 24, "scope": 0, "address": "10.88.0.5", "local": "10.88.0.5"},
    ]
    assert addresses_from(addrs) == ["10.88.0.5/24", "fd00:1::5/64"]


def test_point_to_point_address_is_the_local_end() -> None:
    addrs = [{"family": socket.AF_INET, "prefixlen": 32, "scope": 0, "address": "169.254.1.1", "local": "10.0.0.7"}]
    assert addresses_from(addrs) == ["10.0.0.7/32"]


def test_routes_keep_main_table_routes_through_the_veth_on_link_first() -> None:
    routes = [
        route(gateway="10.88.0.1"),  # default
        route(dst="10.88.0.0", dst_len=24, proto=2, scope=253),  # made by the kernel for the address
        route(dst="10.96.0.0", dst_len=12, gateway="10.88.0.1"),
        route(dst="10.244.0.0", dst_len=16),  # on-link
        route(dst="10.88.0.5", dst_len=32, table=255, type=2),  # local table
        route(dst="192.168.0.0", dst_len=16, oif=ETH0 + 1),  # another interface
        route(family=socket.AF_INET6, gateway="fd00:1::1"),
        route(family=socket.AF_INET6, dst="fe80::", dst_len=64, proto=2),
        route(family=socket.AF_INET6, dst="ff00::", dst_len=8, type=5, table=255),
        route(gateway="10.88.0.1"),  # duplicate
    ]
    assert routes_from(routes, ETH0, "eth0") == [
        Route("10.244.0.0/16", "", "eth0"),
        Route("0.0.0.0/0", "10.88.0.1", "eth0"),
        Route("10.96.0.0/12", "10.88.0.1", "eth0"),
        Route("::/0", "fd00:1::1", "eth0"),
    ]


def test_routes_name_the_guest_device() -> None:
    assert routes_from([route(gateway="10.0.0.1")], ETH0, "net1") == [Route("0.0.0.0/0", "10.0.0.1", "net1")]


def test_real_pyroute2_messages() -> None:
    """The same extraction from messages as pyroute2 decodes them off the wire."""
    addr = ifaddrmsg()
    addr["family"], addr["prefixlen"], addr["scope"], addr["index"] = socket.AF_INET, 16, 0, ETH0
    addr["attrs"] = [("IFA_ADDRESS", "10.88.3.4"), ("IFA_LOCAL", "10.88.3.4")]
    default = rtmsg()
    default["family"], default["dst_len"], default["table"], default["type"], default["proto"] = 2, 0, 254, 1, 3
    default["attrs"] = [("RTA_TABLE", 254), ("RTA_GATEWAY", "10.88.0.1"), ("RTA_OIF", ETH0)]
    decoded = []
    for msg in (addr, default):
        msg.encode()
        copy = type(msg)(msg.data)
        copy.decode()
        decoded.append(copy)
    assert addresses_from([decoded[0]]) == ["10.88.3.4/16"]
    assert routes_from([decoded[1]], ETH0, "eth0") == [Route("0.0.0.0/0", "10.88.0.1", "eth0")]
