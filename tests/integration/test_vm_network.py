"""vm_backend.network on a real CNI bridge network, with the test playing the VM on the tap instead of QEMU.

Everything stays on this host: a bridge of the test's own with a private /24,
no NAT and no route anywhere else, netns files and host-local leases under
tmp. The only traffic is the host pinging the test's pod.
"""

from __future__ import annotations

import ctypes
import fcntl
import json
import os
import secrets
import select
import struct
import subprocess
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from core import proc
from core.errors import FailedPrecondition
from sandbox import netns
from sandbox.cni import CniAttachment, CniPlugins
from tests.support.network import private_network
from vm_backend.network import Route, attach_tap, detach_tap

pytestmark = pytest.mark.integration

BIN_DIRS = (Path("/usr/lib/cni"), Path("/opt/cni/bin"))
MTU = 1400  # not the default, to see it reach the tap and the guest's Interface

_TUNSETIFF = 0x400454CA
_IFF_TAP = 0x0002
_IFF_NO_PI = 0x1000
_ARP = 0x0806
_IPV4 = 0x0800


def sh(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=30)


def inside(path: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    return sh("nsenter", f"--net={path}", *argv)


def link(path: Path, name: str) -> dict[str, Any]:
    (found,) = json.loads(inside(path, "ip", "-j", "-d", "addr", "show", "dev", name).stdout)
    return found


def enter_netns(path: Path) -> None:
    """Move the calling thread into the netns at `path` (Python 3.11 has no os.setns)."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if libc.setns(fd, 0x40000000) != 0:
            raise OSError(ctypes.get_errno(), "setns")
    finally:
        os.close(fd)


def checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def mac_bytes(mac: str) -> bytes:
    return bytes.fromhex(mac.replace(":", ""))


class FakeGuest(threading.Thread):
    """The VM as the tap sees it: opens the tap as QEMU does, answers ARP and ping for the pod's IP."""

    def __init__(self, path: Path, tap: str, mac: str, ip: str) -> None:
        super().__init__(daemon=True)
        self.path, self.tap, self.mac, self.ip = path, tap, mac_bytes(mac), bytes(map(int, ip.split(".")))
        self.ready = threading.Event()
        self.done = threading.Event()
        self.seen: list[str] = []
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            enter_netns(self.path)  # this thread only, and it ends with the test
            fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
            try:
                fcntl.ioctl(fd, _TUNSETIFF, struct.pack("16sH22x", self.tap.encode(), _IFF_TAP | _IFF_NO_PI))
                self.ready.set()
                while not self.done.is_set():
                    if select.select([fd], [], [], 0.1)[0]:
                        reply = self.answer(os.read(fd, 65536))
                        if reply:
                            os.write(fd, reply)
            finally:
                os.close(fd)
        except BaseException as e:
            self.error = e
            self.ready.set()

    def answer(self, frame: bytes) -> bytes | None:
        """The guest's reply to one frame from the tap, None for frames it ignores."""
        src_mac, (ethertype,) = frame[6:12], struct.unpack("!H", frame[12:14])
        if ethertype == _ARP:
            _, _, _, _, op, sha, spa, _, tpa = struct.unpack("!HHBBH6s4s6s4s", frame[14:42])
            if op != 1 or tpa != self.ip:
                return None
            self.seen.append("arp request")
            arp = struct.pack("!HHBBH6s4s6s4s", 1, _IPV4, 6, 4, 2, self.mac, self.ip, sha, spa)
            return sha + self.mac + struct.pack("!H", _ARP) + arp
        if ethertype == _IPV4:
            ip = frame[14:]
            ihl = (ip[0] & 0x0F) * 4
            total = struct.unpack("!H", ip[2:4])[0]
            if ip[9] != 1 or ip[16:20] != self.ip or ip[ihl] != 8:  # ICMP echo request to us
                return None
            self.seen.append("echo request")
            header = bytearray(ip[:ihl])
            header[8] = 64  # TTL
            header[12:16], header[16:20] = ip[16:20], ip[12:16]
            header[10:12] = b"\0\0"
            header[10:12] = struct.pack("!H", checksum(bytes(header)))
            icmp = bytearray(ip[ihl:total])
            icmp[0] = 0  # echo reply
            icmp[2:4] = b"\0\0"
            icmp[2:4] = struct.pack("!H", checksum(bytes(icmp)))
            return src_mac + self.mac + struct.pack("!H", _IPV4) + bytes(header) + bytes(icmp)
        return None


@dataclass
class Pod:
    path: Path
    attachment: CniAttachment
    ip: str
    gateway: str


@dataclass
class Net:
    """One test's private network: the plugins, the bridge, and the pods made on it with their CNI results."""

    plugins: CniPlugins
    bridge: str
    root: Path
    pods: dict[Path, CniAttachment | None] = field(default_factory=dict)

    async def netns(self) -> Path:
        path = await netns.create(self.root, secrets.token_hex(16))
        self.pods[path] = None
        return path

    async def pod(self) -> Pod:
        path = await self.netns()
        attachment = self.pods[path] = await self.plugins.setup(path.name, path, port_mappings=[], **meta(path.name))
        (ip,) = [i for i in attachment.result["ips"] if "." in i["address"]]
        return Pod(path, attachment, ip["address"].partition("/")[0], ip["gateway"])


def meta(pod_id: str) -> dict[str, str]:
    return {"pod_name": f"p-{pod_id[:6]}", "pod_namespace": "tandem-test", "pod_uid": pod_id}


@pytest.fixture
async def net(tmp_path: Path) -> AsyncIterator[Net]:
    bridge = f"tdv{secrets.token_hex(2)}"
    conf_dir = tmp_path / "net.d"
    conf_dir.mkdir()
    conflist = {
        "cniVersion": "1.0.0",
        "name": "tandem-vm-test",
        "plugins": [
            {
                "type": "bridge",
                "bridge": bridge,
                "isGateway": True,
                "ipMasq": False,
                "mtu": MTU,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": str(private_network().subnet)}]],
                    "routes": [{"dst": "0.0.0.0/0"}],  # the pod's only: the host's routes stay as they are
                    "dataDir": str(tmp_path / "ipam"),
                },
            }
        ],
    }
    (conf_dir / "10-test.conflist").write_text(json.dumps(conflist))
    n = Net(CniPlugins(conf_dir, BIN_DIRS, timeout=30), bridge, tmp_path / "netns")
    try:
        yield n
    finally:
        for path, attachment in n.pods.items():
            if attachment is not None:
                try:
                    await n.plugins.teardown(path.name, path, attachment, port_mappings=[], **meta(path.name))
                except Exception as e:  # best effort: the bridge and netns still go below
                    print(f"cleanup: CNI DEL of {path.name}: {e}")
            await netns.remove(path)
        sh("ip", "link", "del", bridge)
        if sh("mountpoint", "-q", str(n.root)).returncode == 0:
            sh("umount", str(n.root))


def own_netns() -> str:
    return os.readlink("/proc/thread-self/ns/net")


async def test_host_pings_a_guest_through_tap_and_redirects(net: Net) -> None:
    pod = await net.pod()
    original_mac = link(pod.path, "eth0")["address"]
    before = own_netns()

    guest = await attach_tap(pod.path)

    assert own_netns() == before
    assert guest.tap_name == "tap0"
    (nic,) = guest.interfaces
    assert (nic.name, nic.mac, nic.mtu) == ("eth0", original_mac, MTU)
    assert nic.addresses == [f"{pod.ip}/24"]
    assert Route("0.0.0.0/0", pod.gateway, "eth0") in guest.routes
    assert all(r.gateway for r in guest.routes)  # the subnet's own route is the guest kernel's to make

    veth = link(pod.path, "eth0")
    assert veth["address"] != original_mac
    assert int(veth["address"][:2], 16) & 0x03 == 0x02  # locally administered unicast
    assert veth["addr_info"] == []
    assert inside(pod.path, "ip", "-4", "route").stdout.strip() == ""
    tap = link(pod.path, "tap0")
    assert (tap["mtu"], "UP" in tap["flags"]) == (MTU, True)
    # What QEMU's `-netdev tap,ifname=tap0` can open: a tap without packet info, one queue, persistent.
    assert tap["linkinfo"]["info_kind"] == "tun"
    assert tap["linkinfo"]["info_data"] == {
        "type": "tap",
        "pi": False,
        "vnet_hdr": False,
        "multi_queue": False,
        "persist": True,
    }
    for dev, peer in (("eth0", "tap0"), ("tap0", "eth0")):
        shown = inside(pod.path, "tc", "filter", "show", "dev", dev, "ingress").stdout
        assert f"Egress Redirect to device {peer}" in shown, shown

    fake = FakeGuest(pod.path, "tap0", nic.mac, pod.ip)
    fake.start()
    try:
        assert fake.ready.wait(5)
        assert fake.error is None, fake.error
        # No cached neighbour entry: the host must ask, so the ARP request crosses too.
        sh("ip", "neigh", "flush", "to", pod.ip, "dev", net.bridge)
        ping = await proc.run(["ping", "-c1", "-W2", pod.ip], check=False, timeout=10)
        assert ping.returncode == 0, ping.stdout.decode() + ping.stderr.decode()
    finally:
        fake.done.set()
        fake.join(5)
    assert fake.error is None, fake.error
    assert fake.seen[:2] == ["arp request", "echo request"]
    # The host's neighbour entry for the pod names the guest's MAC, which is the MAC CNI reported.
    assert original_mac in sh("ip", "neigh", "show", "to", pod.ip, "dev", net.bridge).stdout

    await detach_tap(pod.path)
    assert inside(pod.path, "ip", "link", "show", "tap0").returncode != 0
    assert "ingress" not in inside(pod.path, "tc", "qdisc", "show", "dev", "eth0").stdout
    assert inside(pod.path, "tc", "filter", "show", "dev", "eth0", "ingress").stdout.strip() == ""
    await detach_tap(pod.path)  # idempotent
    assert own_netns() == before


async def test_detach_after_the_netns_is_gone(net: Net) -> None:
    pod = await net.pod()
    await attach_tap(pod.path)
    await netns.remove(pod.path)
    await detach_tap(pod.path)
    await detach_tap(net.root / "never-was")


async def test_attach_without_cni_fails_and_leaves_no_tap(net: Net) -> None:
    path = await net.netns()
    with pytest.raises(FailedPrecondition, match="eth0"):
        await attach_tap(path)
    assert inside(path, "ip", "link", "show", "tap0").returncode != 0


async def test_attach_twice_fails_and_leaves_the_first_tap_alone(net: Net) -> None:
    """A second attach finds the addresses gone; its cleanup must not break the running pod's plumbing."""
    pod = await net.pod()
    await attach_tap(pod.path)
    with pytest.raises(FailedPrecondition, match="no address"):
        await attach_tap(pod.path)
    assert inside(pod.path, "ip", "link", "show", "tap0").returncode == 0
    assert "Redirect to device tap0" in inside(pod.path, "tc", "filter", "show", "dev", "eth0", "ingress").stdout
