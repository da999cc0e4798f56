"""Pod networking for real: netns from sandbox.netns, Debian's bridge/host-local/portmap plugins via sandbox.cni.

Everything stays on this host: a bridge of our own with a private /24 that has
no NAT and no route anywhere else, netns files under tmp, and host-local
leases under tmp. The only traffic is TCP from the host to the test's own pods.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from core.errors import AlreadyExists, TandemError
from sandbox import netns
from sandbox.cni import CniAttachment, CniPlugins, PortMapping
from tests.support.network import private_network

pytestmark = pytest.mark.integration

BIN_DIRS = (Path("/usr/lib/cni"), Path("/opt/cni/bin"))

# Inside the pod: accept `count` connections on `port`, answer each with b"pod", give up after 10 s.
LISTENER = """
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1])))
s.listen()
s.settimeout(10)
print("ready", flush=True)
for _ in range(int(sys.argv[2])):
    conn, _ = s.accept()
    conn.sendall(b"pod")
    conn.close()
"""


def sh(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=30)


@dataclass
class Pod:
    id: str
    path: Path
    attachment: CniAttachment | None = None
    ports: list[PortMapping] = field(default_factory=list)


@dataclass
class Net:
    """One test's private network: a conflist, a bridge name, a lease dir and the pods made on it."""

    plugins: CniPlugins
    bridge: str
    subnet: str
    leases: Path
    netns_root: Path
    pods: list[Pod] = field(default_factory=list)

    async def pod(self, ports: list[PortMapping] | None = None) -> Pod:
        pod_id = secrets.token_hex(16)
        pod = Pod(pod_id, self.netns_root / pod_id, ports=ports or [])
        self.pods.append(pod)
        await netns.create(self.netns_root, pod_id)
        pod.attachment = await self.plugins.setup(pod.id, pod.path, port_mappings=pod.ports, **self.meta(pod))
        return pod

    async def teardown(self, pod: Pod) -> None:
        assert pod.attachment is not None
        await self.plugins.teardown(pod.id, pod.path, pod.attachment, port_mappings=pod.ports, **self.meta(pod))

    @staticmethod
    def meta(pod: Pod) -> dict[str, str]:
        return {"pod_name": f"p-{pod.id[:6]}", "pod_namespace": "tandem-test", "pod_uid": pod.id}

    def lease(self, ip: str) -> Path:
        return self.leases / "tandem-test" / ip


@pytest.fixture
async def net(tmp_path: Path) -> AsyncIterator[Net]:
    bridge = f"tdt{secrets.token_hex(2)}"
    subnet = str(private_network().subnet)
    conf_dir = tmp_path / "net.d"
    conf_dir.mkdir()
    conflist = {
        "cniVersion": "1.0.0",
        "name": "tandem-test",
        "plugins": [
            {
                "type": "bridge",
                "bridge": bridge,
                "isGateway": True,
                "ipMasq": False,
                "ipam": {"type": "host-local", "ranges": [[{"subnet": subnet}]], "dataDir": str(tmp_path / "ipam")},
            },
            {"type": "portmap", "capabilities": {"portMappings": True}},
        ],
    }
    (conf_dir / "10-test.conflist").write_text(json.dumps(conflist))
    n = Net(CniPlugins(conf_dir, BIN_DIRS, timeout=30), bridge, subnet, tmp_path / "ipam", tmp_path / "netns")
    try:
        yield n
    finally:
        for pod in n.pods:
            if pod.attachment is not None:
                try:
                    await n.teardown(pod)
                except Exception as e:  # best effort: the bridge and netns still go below
                    print(f"cleanup: teardown of {pod.id}: {e}", file=sys.stderr)
            await netns.remove(pod.path)
        sh("ip", "link", "del", bridge)
        if sh("mountpoint", "-q", str(n.netns_root)).returncode == 0:
            sh("umount", str(n.netns_root))


def inside(pod: Pod, *argv: str) -> str:
    return sh("nsenter", f"--net={pod.path}", *argv).stdout


def link_exists(name: str) -> bool:
    return sh("ip", "link", "show", name).returncode == 0


def host_veth(net: Net, attachment: CniAttachment) -> str:
    """The host end of the pod's veth: bridge's result lists the bridge, that end, then eth0 in the netns."""
    (veth,) = [i["name"] for i in attachment.result["interfaces"] if not i.get("sandbox") and i["name"] != net.bridge]
    return veth


def nat_rules() -> str:
    return sh("iptables", "-w", "-t", "nat", "-S").stdout


async def fetch(host: str, port: int) -> bytes:
    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 3)
    try:
        return await asyncio.wait_for(reader.read(3), 3)
    finally:
        writer.close()


async def test_netns_create_exists_remove(tmp_path):
    # Under a shared mount, as /run is on systemd hosts: the root must still end up private.
    shared = tmp_path / "run"
    shared.mkdir()
    sh("mount", "--bind", str(shared), str(shared))
    sh("mount", "--make-shared", str(shared))
    root = shared / "netns"
    try:
        path = await netns.create(root, "one")
        assert netns.exists(path) and path == root / "one"
        assert "UP" in sh("nsenter", f"--net={path}", "ip", "-br", "link", "show", "lo").stdout
        assert not netns.exists(root) and not netns.exists(root / "missing")
        assert sh("findmnt", "-n", "-o", "PROPAGATION", str(root)).stdout.strip() == "private"
        await netns.create(root, "two")
        assert sh("findmnt", "-n", "-o", "TARGET", str(root)).stdout.count("\n") == 1  # bound once only
        with pytest.raises(AlreadyExists):
            await netns.create(root, "one")
        await netns.remove(path)
        await netns.remove(path)
        assert not path.exists() and not netns.exists(path)
    finally:
        for name in ("one", "two"):
            await netns.remove(root / name)
        sh("umount", str(root))
        sh("umount", str(shared))


async def test_pod_gets_an_ip_on_eth0_reachable_from_the_host_and_a_host_port(net):
    host_port = 20000 + secrets.randbelow(20000)
    pod = await net.pod([PortMapping(8080, host_port)])
    assert pod.attachment is not None
    (ip,) = pod.attachment.ips()
    gateway = net.subnet.replace(".0/24", ".1")
    assert ip.startswith(net.subnet.rsplit(".", 1)[0] + ".") and ip != gateway
    assert f"inet {ip}/24" in inside(pod, "ip", "-4", "-o", "addr", "show", "dev", "eth0")
    assert net.lease(ip).exists()
    veth = host_veth(net, pod.attachment)
    assert link_exists(veth)
    assert f"--dport {host_port}" in nat_rules()

    listener = await asyncio.create_subprocess_exec(
        *["nsenter", f"--net={pod.path}", sys.executable, "-c", LISTENER, "8080", "2"],
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert listener.stdout is not None
        assert await asyncio.wait_for(listener.stdout.readline(), 10) == b"ready\n"
        assert await fetch(ip, 8080) == b"pod"  # host -> bridge -> veth -> pod
        assert await fetch(gateway, host_port) == b"pod"  # portmap's DNAT of a local address
    finally:
        if listener.returncode is None:
            listener.kill()
        await listener.wait()

    await net.teardown(pod)
    await net.teardown(pod)  # DEL twice is fine
    assert not net.lease(ip).exists()
    assert f"--dport {host_port}" not in nat_rules()
    assert not link_exists(veth)


async def test_teardown_after_the_netns_is_gone_still_frees_the_lease(net):
    host_port = 20000 + secrets.randbelow(20000)
    pod = await net.pod([PortMapping(80, host_port, "UDP")])
    assert pod.attachment is not None
    (ip,) = pod.attachment.ips()
    await netns.remove(pod.path)
    assert not pod.path.exists()

    await net.teardown(pod)

    assert not net.lease(ip).exists()
    assert f"--dport {host_port}" not in nat_rules()


async def test_parallel_pods_get_different_ips(net):
    a, b = await asyncio.gather(net.pod(), net.pod())
    assert a.attachment is not None and b.attachment is not None
    ips = a.attachment.ips() + b.attachment.ips()
    assert len(ips) == 2 and ips[0] != ips[1]
    await asyncio.gather(net.teardown(a), net.teardown(b))
    assert not any(net.lease(ip).exists() for ip in ips)


async def test_a_plugin_failing_part_way_rolls_back_the_plugins_before_it(net):
    with pytest.raises(TandemError, match=r"CNI plugin portmap ADD failed: .*container port"):
        await net.pod([PortMapping(0, 20000 + secrets.randbelow(20000))])
    assert not list(net.leases.glob("tandem-test/10.*"))
    assert not sh("ip", "-o", "link", "show", "master", net.bridge).stdout  # bridge's veth is gone again
