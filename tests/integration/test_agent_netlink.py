"""vm_backend.agent.netlink against the real kernel, inside a network namespace of the test's own.

The namespace holds a veth pair (v0, v1) and nothing else: no interface or
route of the host is touched. The client runs in a subprocess started inside
the namespace (`ip netns exec`), and `ip -j` reads the result back.
"""

from __future__ import annotations

import errno
import json
import secrets
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]

# Inside the namespace: apply [method, args, kwargs] calls in order on one client and print, as JSON,
# [exception class or "", errno or 0, message] for each (a failed call does not stop the others).
RUNNER = """
import json, sys
from vm_backend.agent.netlink import NetlinkError, Rtnetlink
results = []
with Rtnetlink() as nl:
    for method, args, kwargs in json.loads(sys.argv[1]):
        try:
            getattr(nl, method)(*args, **kwargs)
            results.append(["", 0, ""])
        except (NetlinkError, ValueError) as e:
            results.append([type(e).__name__, getattr(e, "errno", 0), str(e)])
print(json.dumps(results))
"""


def sh(*argv: str) -> str:
    """Run argv from the repository root (the subprocess imports vm_backend) and return its stdout."""
    result = subprocess.run(argv, capture_output=True, text=True, timeout=30, cwd=REPO)
    assert result.returncode == 0, f"{' '.join(argv)}: {result.stderr}"
    return result.stdout


def call(method: str, *args: Any, **kwargs: Any) -> list[Any]:
    return [method, args, kwargs]


@pytest.fixture
def ns() -> Iterator[str]:
    """A fresh network namespace with lo and a veth pair v0/v1 (v1 up, so that v0 has a carrier once up)."""
    name = f"tandem-nltest-{secrets.token_hex(4)}"
    sh("ip", "netns", "add", name)
    try:
        sh("ip", "-n", name, "link", "add", "v0", "type", "veth", "peer", "name", "v1")
        sh("ip", "-n", name, "link", "set", "v1", "up")
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30)


def apply(ns: str, *calls: list[Any]) -> list[list[Any]]:
    return json.loads(sh("ip", "netns", "exec", ns, sys.executable, "-c", RUNNER, json.dumps(calls)))


def ok(ns: str, *calls: list[Any]) -> None:
    assert apply(ns, *calls) == [["", 0, ""]] * len(calls)


def ip_json(ns: str, *argv: str) -> list[dict[str, Any]]:
    return json.loads(sh("ip", "-n", ns, "-j", *argv))


def boot_routes(ns: str, family: str) -> dict[str, dict[str, Any]]:
    """The main table's routes of protocol boot (ours) by destination, each destination once (replaced, not added).

    `-d`, as `ip` does not print the protocol boot otherwise.
    """
    ours = [r for r in ip_json(ns, "-d", family, "route", "show", "table", "main") if r["protocol"] == "boot"]
    by_destination = {r["dst"]: r for r in ours if r["type"] == "unicast"}
    assert len(by_destination) == len(ours), ours
    return by_destination


def configure(ns: str) -> None:
    """What SetupPod does to a NIC: down, rename, MTU, addresses, up."""
    ok(
        ns,
        call("set_link", "lo", up=True),
        call("set_link", "v0", up=False),
        call("set_link", "v0", new_name="eth0", mtu=1400),
        call("add_address", "eth0", "192.0.2.10/24"),
        call("add_address", "eth0", "2001:db8::10/64"),
        call("set_link", "eth0", up=True),
    )


def test_links_are_renamed_resized_and_brought_up(ns: str) -> None:
    configure(ns)
    links = {link["ifname"]: link for link in ip_json(ns, "link", "show")}
    assert "v0" not in links
    assert links["eth0"]["mtu"] == 1400 and "UP" in links["eth0"]["flags"]
    assert "UP" in links["lo"]["flags"]
    ok(ns, call("set_link", "eth0", up=False), call("set_link", "eth0", mtu=1500))
    (eth0,) = ip_json(ns, "link", "show", "eth0")
    assert eth0["mtu"] == 1500 and "UP" not in eth0["flags"]


def test_addresses_are_added_once(ns: str) -> None:
    configure(ns)
    (eth0,) = ip_json(ns, "addr", "show", "dev", "eth0")
    addresses = {(a["family"], a["local"], a["prefixlen"], a["scope"]) for a in eth0["addr_info"]}
    assert ("inet", "192.0.2.10", 24, "global") in addresses
    assert ("inet6", "2001:db8::10", 64, "global") in addresses
    (v4_again, v6_again) = apply(
        ns, call("add_address", "eth0", "192.0.2.10/24"), call("add_address", "eth0", "2001:db8::10/64")
    )
    assert v4_again[:2] == v6_again[:2] == ["NetlinkError", errno.EEXIST]
    assert v4_again[2].startswith("add address 192.0.2.10/24 to eth0: File exists")


def test_routes_are_replaced_idempotently(ns: str) -> None:
    configure(ns)
    routes = [
        call("replace_route", "0.0.0.0/0", gateway="192.0.2.1"),
        call("replace_route", "198.51.100.7/24", device="eth0"),  # host bits are dropped
        call("replace_route", "::/0", gateway="2001:db8::1", device="eth0"),
        call("replace_route", "2001:db8:1::/48", device="eth0"),
    ]
    ok(ns, *routes, *routes)
    v4 = boot_routes(ns, "-4")
    assert v4.keys() == {"default", "198.51.100.0/24"}
    assert v4["default"]["gateway"] == "192.0.2.1" and v4["default"]["dev"] == "eth0"
    assert v4["default"]["scope"] == "global"
    assert v4["198.51.100.0/24"]["scope"] == "link" and "gateway" not in v4["198.51.100.0/24"]
    v6 = boot_routes(ns, "-6")
    assert v6.keys() == {"default", "2001:db8:1::/48"}
    assert v6["default"]["gateway"] == "2001:db8::1" and v6["default"]["dev"] == "eth0"

    ok(ns, call("replace_route", "0.0.0.0/0", gateway="192.0.2.254", device="eth0"))
    v4 = boot_routes(ns, "-4")
    assert v4.keys() == {"default", "198.51.100.0/24"} and v4["default"]["gateway"] == "192.0.2.254"


def test_refusals_name_the_operation_and_carry_the_errno(ns: str) -> None:
    configure(ns)
    unreachable, no_device, unknown_link, tiny_mtu, mixed = apply(
        ns,
        call("replace_route", "203.0.113.0/24", gateway="198.51.100.1"),
        call("replace_route", "203.0.113.0/24", device="nope0"),
        call("set_link", "nope0", up=True),
        call("set_link", "eth0", mtu=10),
        call("replace_route", "0.0.0.0/0", gateway="2001:db8::1"),
    )
    assert unreachable[:2] == ["NetlinkError", errno.ENETUNREACH]
    assert unreachable[2].startswith("replace route to 203.0.113.0/24 via 198.51.100.1: Network is unreachable")
    assert no_device == ["NetlinkError", errno.ENODEV, "find interface nope0: No such device"]
    assert unknown_link[:2] == ["NetlinkError", errno.ENODEV]
    assert tiny_mtu[:2] == ["NetlinkError", errno.EINVAL] and tiny_mtu[2].startswith("set link eth0:")
    assert mixed[0] == "ValueError"
    assert ip_json(ns, "-4", "route", "show", "203.0.113.0/24") == []
