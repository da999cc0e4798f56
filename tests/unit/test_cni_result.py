"""CNI results, CNI_ARGS and libcni's ADD/DEL chaining, run against tiny fake plugins (real executables)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from core.errors import FailedPrecondition, Unavailable
from sandbox.cni import CniAttachment, CniPlugins, PortMapping, k8s_args

BRIDGE_RESULT_1_0 = {
    "cniVersion": "1.0.0",
    "interfaces": [
        {"name": "cni0", "mac": "aa:00:00:00:00:01"},
        {"name": "veth1234", "mac": "aa:00:00:00:00:02"},
        {"name": "eth0", "mac": "aa:00:00:00:00:03", "sandbox": "/run/tandem/netns/p1"},
    ],
    "ips": [
        {"interface": 2, "address": "fd00:10::5/64", "gateway": "fd00:10::1"},
        {"interface": 0, "address": "10.88.0.1/16"},
        {"interface": 2, "address": "10.88.0.5/16", "gateway": "10.88.0.1"},
    ],
    "routes": [{"dst": "0.0.0.0/0"}],
}

FAKE_PLUGIN = """#!/bin/sh
# A CNI plugin stand-in: records how it was called, then answers from files beside it.
dir=$(dirname "$0"); name=$(basename "$0")
echo "$name $CNI_COMMAND" >> "$dir/calls.log"
cat > "$dir/$name-$CNI_COMMAND.stdin"
env | grep '^CNI_' | sort > "$dir/$name-$CNI_COMMAND.env"
if [ -f "$dir/$name.fail" ]; then cat "$dir/$name.fail"; exit 1; fi
if [ "$CNI_COMMAND" = ADD ]; then cat "$dir/$name.result"; fi
"""

POD = {"pod_name": "web", "pod_namespace": "default", "pod_uid": "uid-1"}
PORTS = [PortMapping(80, 8080), PortMapping(53, 5353, "UDP", "127.0.0.1"), PortMapping(9000, 0)]


def test_ips_of_a_1_0_0_result_skip_host_interfaces_and_put_ipv4_first():
    assert CniAttachment({}, "eth0", BRIDGE_RESULT_1_0).ips() == ["10.88.0.5", "fd00:10::5"]


@pytest.mark.parametrize("version", ["0.4.0", "0.3.1"])
def test_ips_of_older_results_with_and_without_interface_index(version):
    result = {
        "cniVersion": version,
        "interfaces": [{"name": "eth0", "sandbox": "/proc/1/ns/net"}],
        "ips": [
            {"version": "6", "address": "fd00::7/64"},
            {"version": "4", "address": "192.168.5.7/24", "interface": 0},
            {"version": "4", "address": "192.168.5.7/24", "interface": 0},
        ],
    }
    assert CniAttachment({}, "eth0", result).ips() == ["192.168.5.7", "fd00::7"]


def test_empty_result_has_no_ips_and_attachment_round_trips_through_json():
    assert CniAttachment({}, "eth0", {"cniVersion": "1.0.0"}).ips() == []
    attachment = CniAttachment({"name": "pods", "cniVersion": "1.0.0", "plugins": []}, "eth1", BRIDGE_RESULT_1_0)
    assert CniAttachment.from_dict(json.loads(json.dumps(attachment.to_dict()))) == attachment


def test_k8s_args():
    assert k8s_args(pod_namespace="ns", pod_name="web", container_id="abc", pod_uid="u-1") == (
        "IgnoreUnknown=1;K8S_POD_NAMESPACE=ns;K8S_POD_NAME=web;K8S_POD_INFRA_CONTAINER_ID=abc;K8S_POD_UID=u-1"
    )


class Fakes:
    """A conf dir and a bin dir of fake plugins, and what the plugins saw."""

    def __init__(self, root: Path) -> None:
        self.conf, self.bin = root / "net.d", root / "bin"
        self.conf.mkdir()
        self.bin.mkdir()
        self.plugins = CniPlugins(self.conf, (root / "nowhere", self.bin), timeout=10)

    def network(self, version: str, *plugins: dict[str, Any]) -> None:
        doc = {"cniVersion": version, "name": "pods", "plugins": list(plugins)}
        (self.conf / "10-pods.conflist").write_text(json.dumps(doc))

    def plugin(self, name: str, result: dict[str, Any]) -> None:
        script = self.bin / name
        script.write_text(FAKE_PLUGIN)
        script.chmod(0o755)
        (self.bin / f"{name}.result").write_text(json.dumps(result))

    def fail(self, name: str, error: dict[str, Any]) -> None:
        (self.bin / f"{name}.fail").write_text(json.dumps(error))

    def calls(self) -> list[str]:
        log = self.bin / "calls.log"
        return log.read_text().splitlines() if log.exists() else []

    def stdin(self, name: str, command: str) -> dict[str, Any]:
        return json.loads((self.bin / f"{name}-{command}.stdin").read_text())

    def env(self, name: str, command: str) -> dict[str, str]:
        lines = (self.bin / f"{name}-{command}.env").read_text().splitlines()
        return dict(line.split("=", 1) for line in lines)


@pytest.fixture
def fakes(tmp_path):
    return Fakes(tmp_path)


A_RESULT = {"cniVersion": "1.0.0", "ips": [{"address": "10.9.0.2/24"}]}
B_RESULT = {"cniVersion": "1.0.0", "ips": [{"address": "10.9.0.2/24"}], "dns": {"nameservers": ["10.9.0.1"]}}


async def test_setup_chains_prev_results_and_injects_name_version_capabilities_and_env(fakes, tmp_path):
    fakes.network("1.0.0", {"type": "fake-a", "mtu": 1400}, {"type": "fake-b", "capabilities": {"portMappings": True}})
    fakes.plugin("fake-a", A_RESULT)
    fakes.plugin("fake-b", B_RESULT)
    netns = tmp_path / "netns"

    attachment = await fakes.plugins.setup("c1", netns, port_mappings=PORTS, **POD)

    assert fakes.calls() == ["fake-a ADD", "fake-b ADD"]
    assert fakes.stdin("fake-a", "ADD") == {"type": "fake-a", "mtu": 1400, "name": "pods", "cniVersion": "1.0.0"}
    b = fakes.stdin("fake-b", "ADD")
    assert b["prevResult"] == A_RESULT and (b["name"], b["cniVersion"]) == ("pods", "1.0.0")
    assert b["runtimeConfig"] == {
        "portMappings": [
            {"hostPort": 8080, "containerPort": 80, "protocol": "tcp", "hostIP": ""},
            {"hostPort": 5353, "containerPort": 53, "protocol": "udp", "hostIP": "127.0.0.1"},
        ]
    }
    env = fakes.env("fake-a", "ADD")
    assert env["CNI_COMMAND"] == "ADD" and env["CNI_CONTAINERID"] == "c1"
    assert env["CNI_NETNS"] == str(netns) and env["CNI_IFNAME"] == "eth0"
    assert env["CNI_PATH"] == f"{tmp_path / 'nowhere'}:{fakes.bin}"
    assert env["CNI_ARGS"] == k8s_args(pod_namespace="default", pod_name="web", container_id="c1", pod_uid="uid-1")
    assert attachment.result == B_RESULT and attachment.ifname == "eth0" and attachment.ips() == ["10.9.0.2"]
    assert attachment.network["plugins"][0] == {"type": "fake-a", "mtu": 1400}


async def test_teardown_deletes_in_reverse_with_the_stored_result_and_config(fakes, tmp_path):
    fakes.network("1.0.0", {"type": "fake-a"}, {"type": "fake-b", "capabilities": {"portMappings": True}})
    fakes.plugin("fake-a", A_RESULT)
    fakes.plugin("fake-b", B_RESULT)
    attachment = await fakes.plugins.setup("c1", tmp_path / "netns", port_mappings=PORTS, **POD)
    (fakes.conf / "10-pods.conflist").unlink()  # teardown must not need the conf dir any more

    for _ in range(2):
        await fakes.plugins.teardown("c1", tmp_path / "netns", attachment, port_mappings=PORTS, **POD)

    assert fakes.calls()[2:] == ["fake-b DEL", "fake-a DEL"] * 2
    assert fakes.stdin("fake-a", "DEL")["prevResult"] == B_RESULT
    assert fakes.stdin("fake-b", "DEL")["runtimeConfig"]["portMappings"][0]["hostPort"] == 8080
    # A path that is no mounted netns is passed as an empty CNI_NETNS, as the spec allows for DEL.
    assert fakes.env("fake-b", "DEL")["CNI_NETNS"] == ""


async def test_0_3_1_del_gets_no_prev_result(fakes, tmp_path):
    fakes.network("0.3.1", {"type": "fake-a"})
    fakes.plugin("fake-a", {"cniVersion": "0.3.1", "ips": [{"version": "4", "address": "10.9.0.3/24"}]})
    attachment = await fakes.plugins.setup("c1", tmp_path / "netns", port_mappings=[], **POD)
    await fakes.plugins.teardown("c1", None, attachment, port_mappings=[], **POD)
    assert "prevResult" not in fakes.stdin("fake-a", "DEL")
    assert "runtimeConfig" not in fakes.stdin("fake-a", "DEL")


@pytest.mark.parametrize(("code", "kind"), [(7, FailedPrecondition), (11, Unavailable), (999, Unavailable)])
async def test_failure_part_way_deletes_what_was_added_and_reports_plugin_and_msg(fakes, tmp_path, code, kind):
    fakes.network("1.0.0", {"type": "fake-a"}, {"type": "fake-b"}, {"type": "fake-c"})
    for name in ("fake-a", "fake-b", "fake-c"):
        fakes.plugin(name, A_RESULT)
    fakes.fail("fake-b", {"cniVersion": "1.0.0", "code": code, "msg": "no bridge", "details": "cni0 is down"})

    with pytest.raises(kind, match="fake-b ADD failed: no bridge: cni0 is down"):
        await fakes.plugins.setup("c1", tmp_path / "netns", port_mappings=[], **POD)

    assert fakes.calls() == ["fake-a ADD", "fake-b ADD", "fake-b DEL", "fake-a DEL"]
    assert fakes.stdin("fake-a", "DEL")["prevResult"] == A_RESULT


async def test_del_tries_every_plugin_and_raises_the_first_error(fakes, tmp_path):
    fakes.network("1.0.0", {"type": "fake-a"}, {"type": "fake-b"})
    fakes.plugin("fake-a", A_RESULT)
    fakes.plugin("fake-b", A_RESULT)
    attachment = await fakes.plugins.setup("c1", tmp_path / "netns", port_mappings=[], **POD)
    (fakes.bin / "fake-b").write_text("#!/bin/sh\necho 'iptables: locked' >&2\nexit 2\n")

    with pytest.raises(Unavailable, match="fake-b DEL failed: iptables: locked"):
        await fakes.plugins.teardown("c1", None, attachment, port_mappings=[], **POD)
    assert fakes.calls()[-1] == "fake-a DEL"


async def test_missing_config_plugin_or_result(fakes, tmp_path):
    with pytest.raises(FailedPrecondition, match=re.escape(f"no valid CNI network config in {fakes.conf}")):
        await fakes.plugins.setup("c1", tmp_path / "netns", port_mappings=[], **POD)

    fakes.network("1.0.0", {"type": "fake-a"}, {"type": "absent"})
    fakes.plugin("fake-a", A_RESULT)
    with pytest.raises(FailedPrecondition, match="CNI plugin absent not in"):
        await fakes.plugins.setup("c1", tmp_path / "netns", port_mappings=[], **POD)
    assert fakes.calls() == ["fake-a ADD", "fake-a DEL"]

    fakes.network("1.0.0", {"type": "fake-a"})
    (fakes.bin / "fake-a.result").write_text("")
    with pytest.raises(Unavailable, match="fake-a ADD printed no result"):
        await fakes.plugins.setup("c1", tmp_path / "netns", port_mappings=[], **POD)
