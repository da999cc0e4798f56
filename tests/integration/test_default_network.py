"""The default network for real: a daemon whose CNI conf dir is empty runs pods on a bridge of its own,
and a network installed in the dir takes over for the next pod without a restart.

The default network here is a private one (its own bridge name and a /24 no route of this host uses,
masquerade off): the tests touch only namespaces and bridges they create, with no NAT or route out.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from protos import cri_pb2 as pb
from tests.support.crictl import Crictl
from tests.support.daemon import TandemDaemon
from tests.support.network import PrivateNetwork, delete_bridge, private_network, write_bridge_network
from tests.support.pods import pod_config, pod_leftovers

pytestmark = pytest.mark.integration


@dataclass
class Node:
    daemon: TandemDaemon
    default: PrivateNetwork
    tmp: Path
    installed: list[PrivateNetwork]

    @property
    def conf_dir(self) -> Path:
        return self.tmp / "net.d"

    def run_pod(self, name: str) -> tuple[str, str]:
        """A READY pod's ID and IP."""
        request = pb.RunPodSandboxRequest(config=pod_config(name, self.tmp / "logs"))
        pod_id = self.daemon.runtime.RunPodSandbox(request).pod_sandbox_id
        status = self.daemon.runtime.PodSandboxStatus(pb.PodSandboxStatusRequest(pod_sandbox_id=pod_id)).status
        assert status.state == pb.SANDBOX_READY
        return pod_id, status.network.ip

    def remove_pod(self, pod_id: str) -> None:
        self.daemon.runtime.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=pod_id))
        self.daemon.runtime.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=pod_id))

    def pod_network(self) -> dict:
        """What Status says about the network new pods join (its verbose info, as `crictl info` shows it)."""
        return json.loads(self.daemon.runtime.Status(pb.StatusRequest(verbose=True)).info["podNetwork"])

    def lease(self, ip: str) -> Path:
        return self.tmp / "run" / "cni" / "ipam" / "tandem-default" / ip


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Node]:
    """A daemon on an empty conf dir, its default network private (own bridge, free /24, no masquerade)."""
    (tmp_path / "net.d").mkdir()
    default = private_network()
    node = Node(TandemDaemon.isolated(tmp_path, default.toml()), default, tmp_path, [])
    node.daemon.start()
    yield node
    for sandbox in node.daemon.runtime.ListPodSandbox(pb.ListPodSandboxRequest()).items:
        node.remove_pod(sandbox.id)
    node.daemon.stop()
    node.daemon.unmount_workdir(tmp_path)
    for network in (default, *node.installed):
        delete_bridge(network.bridge)


def ping(ip: str) -> bool:
    return subprocess.run(["ping", "-c1", "-W5", ip], capture_output=True).returncode == 0


def test_an_empty_conf_dir_gives_pods_the_default_network(node):
    status = node.daemon.runtime.Status(pb.StatusRequest(verbose=True)).status
    network_ready = {c.type: c for c in status.conditions}["NetworkReady"]
    assert network_ready.status, network_ready.message
    generated = node.tmp / "run" / "cni" / "tandem-default.conflist"
    assert node.pod_network() == {
        "network": "tandem-default",
        "source": str(generated),
        "default": True,
        "why": f"{node.conf_dir} holds no valid network config",
    }
    assert 'msg="pod network" network=tandem-default' in node.daemon.log()

    pod_id, ip = node.run_pod("on-default")
    assert node.default.holds(ip) and ping(ip)
    assert node.lease(ip).exists()
    assert list(node.conf_dir.iterdir()) == []  # Tandem wrote nothing into the node's CNI directory
    (bridge,) = [p for p in json.loads(generated.read_text())["plugins"] if p["type"] == "bridge"]
    assert (bridge["bridge"], bridge["ipMasq"]) == (node.default.bridge, False)
    assert str(node.default.subnet) not in subprocess.run(["iptables", "-w", "-t", "nat", "-S"],
                                                          capture_output=True, text=True).stdout  # fmt: skip

    node.remove_pod(pod_id)
    assert not node.lease(ip).exists()
    assert pod_leftovers(node.daemon, ("conmon",), (str(node.tmp),)) == []


def test_a_network_installed_in_the_conf_dir_takes_over_without_a_restart(node):
    daemon_pid = node.daemon.process.pid
    first, first_ip = node.run_pod("before")
    assert node.default.holds(first_ip)

    installed = write_bridge_network(node.conf_dir)
    node.installed.append(installed)
    second, second_ip = node.run_pod("after")
    assert installed.holds(second_ip) and ping(second_ip)
    assert node.pod_network() == {
        "network": f"test-{installed.bridge}",
        "source": str(node.conf_dir / "10-test.conflist"),
        "default": False,
        "why": f"the first valid network config in {node.conf_dir}",
    }
    assert f'msg="pod network" network=test-{installed.bridge}' in node.daemon.log()
    assert node.daemon.process.pid == daemon_pid  # no restart

    # The first pod leaves through the network it joined, though the conf dir names another one by now.
    first_veths = host_veths(node.default.bridge)
    assert first_veths and ping(first_ip)
    node.remove_pod(first)
    assert not node.lease(first_ip).exists()
    assert not any(link_exists(veth) for veth in first_veths)
    assert ping(second_ip)  # the other network's pod is untouched

    (node.conf_dir / "10-test.conflist").unlink()
    third, third_ip = node.run_pod("default-again")
    assert node.default.holds(third_ip)
    for pod_id in (second, third):
        node.remove_pod(pod_id)
    assert pod_leftovers(node.daemon, ("conmon",), (str(node.tmp),)) == []


def host_veths(bridge: str) -> list[str]:
    """The host ends of the veths attached to `bridge`."""
    out = subprocess.run(["ip", "-o", "link", "show", "master", bridge], capture_output=True, text=True).stdout
    return [line.split(": ")[1].split("@")[0] for line in out.splitlines()]


def link_exists(name: str) -> bool:
    return subprocess.run(["ip", "link", "show", name], capture_output=True).returncode == 0


@pytest.mark.crictl
def test_crictl_runp_on_the_default_network(node):
    crictl = Crictl(node.daemon, node.tmp)
    config = node.tmp / "pod.json"
    config.write_text(
        json.dumps({"metadata": {"name": "crictl-pod", "namespace": "tests", "uid": "crictl-pod-uid", "attempt": 0},
                    "log_directory": str(node.tmp / "logs"), "linux": {}})
    )  # fmt: skip
    ran = crictl.run("runp", str(config))
    assert ran.returncode == 0, ran.stderr
    pod_id = ran.stdout.decode().strip()
    inspected = json.loads(crictl.run("inspectp", pod_id).stdout)
    assert inspected["status"]["state"] == "SANDBOX_READY"
    assert node.default.holds(inspected["status"]["network"]["ip"])
    info = json.loads(crictl.run("info").stdout)
    assert info["podNetwork"]["default"] is True and info["podNetwork"]["network"] == "tandem-default"
    assert {c["type"]: c["status"] for c in info["status"]["conditions"]}["NetworkReady"] is True
    node.remove_pod(pod_id)


def test_with_the_default_network_off_kubelet_waits_for_the_cluster_network(tmp_path):
    (tmp_path / "net.d").mkdir()
    default = private_network()
    daemon = TandemDaemon.isolated(tmp_path, default.toml() + "enabled = false\n").start()
    try:
        status = daemon.runtime.Status(pb.StatusRequest()).status
        assert {c.type: c.status for c in status.conditions}["NetworkReady"] is False
        with pytest.raises(grpc.RpcError) as refused:
            daemon.runtime.RunPodSandbox(pb.RunPodSandboxRequest(config=pod_config("waits", tmp_path / "logs")))
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert pod_leftovers(daemon, ("conmon",), (str(tmp_path),)) == []
        assert subprocess.run(["ip", "link", "show", default.bridge], capture_output=True).returncode != 0
    finally:
        daemon.stop()
        daemon.unmount_workdir(tmp_path)
