"""The daemon itself: socket, lifecycle, and the runtime-wide RuntimeService calls."""

from __future__ import annotations

import json
import stat
import subprocess
import sys

import grpc
import pytest

from protos import cri_pb2 as pb
from tests.support.daemon import TandemDaemon
from tests.support.pods import pod_config

pytestmark = pytest.mark.integration


@pytest.fixture
def daemon(tmp_path):
    d = TandemDaemon.isolated(tmp_path).start()
    yield d
    d.stop()


def test_version(daemon):
    v = daemon.runtime.Version(pb.VersionRequest())
    assert (v.version, v.runtime_name, v.runtime_api_version) == ("0.1.0", "tandem", "v1")
    assert v.runtime_version


def test_socket_is_root_only_and_sigterm_is_graceful(daemon):
    mode = daemon.socket.stat().st_mode
    assert stat.S_ISSOCK(mode) and mode & 0o077 == 0
    assert daemon.stop() == 0
    assert not daemon.socket.exists()


def test_only_a_socket_directory_tandem_creates_is_made_private(tmp_path):
    shared = tmp_path / "shared"  # stands for /run: other services' sockets live there too
    shared.mkdir()
    shared.chmod(0o755)
    new = tmp_path / "new" / "sockets"
    for socket, directory, mode in ((shared / "tandem.sock", shared, 0o755), (new / "tandem.sock", new, 0o700)):
        daemon = TandemDaemon.isolated(tmp_path)
        daemon.socket = socket
        daemon.start()
        try:
            assert stat.S_IMODE(directory.stat().st_mode) == mode
            assert stat.S_IMODE(socket.stat().st_mode) == 0o600
        finally:
            daemon.stop()


def test_status_reports_network_readiness_from_cni_config(daemon, tmp_path):
    response = daemon.runtime.Status(pb.StatusRequest(verbose=True))
    conditions = {c.type: c for c in response.status.conditions}
    assert conditions["RuntimeReady"].status
    assert conditions["NetworkReady"].status, conditions["NetworkReady"].message  # the default network's
    assert json.loads(response.info["podNetwork"])["default"] is True

    netd = tmp_path / "net.d"
    netd.mkdir(exist_ok=True)
    conflist = netd / "10-test.conflist"
    conflist.write_text(json.dumps({"cniVersion": "1.0.0", "name": "test", "plugins": [{"type": "not-installed"}]}))
    conditions = {c.type: c for c in daemon.runtime.Status(pb.StatusRequest()).status.conditions}
    assert not conditions["NetworkReady"].status  # the conf dir's network rules, and it cannot run
    assert conditions["NetworkReady"].reason == "NetworkPluginNotReady"
    assert "not-installed" in conditions["NetworkReady"].message

    conflist.write_text(json.dumps({"cniVersion": "1.0.0", "name": "test", "plugins": [{"type": "loopback"}]}))
    response = daemon.runtime.Status(pb.StatusRequest(verbose=True))
    conditions = {c.type: c for c in response.status.conditions}
    assert conditions["NetworkReady"].status, conditions["NetworkReady"].message
    assert json.loads(response.info["podNetwork"])["network"] == "test"
    assert json.loads(response.info["config"])["runtimes"] == {"runc": "runc", "vm": "vm"}
    assert json.loads(response.info["config"])["hostPodsOnUntrustedNode"] == "refuse"
    assert [h.name for h in response.runtime_handlers] == ["", "runc", "vm"]


def test_runtime_config_and_update(daemon):
    assert daemon.runtime.RuntimeConfig(pb.RuntimeConfigRequest()).linux.cgroup_driver == pb.CGROUPFS
    daemon.runtime.UpdateRuntimeConfig(
        pb.UpdateRuntimeConfigRequest(
            runtime_config=pb.RuntimeConfig(network_config=pb.NetworkConfig(pod_cidr="10.1.0.0/24"))
        )
    )
    info = json.loads(daemon.runtime.Status(pb.StatusRequest(verbose=True)).info["config"])
    assert info["podCIDR"] == "10.1.0.0/24"


def test_unserved_rpcs_say_so(daemon):
    with pytest.raises(grpc.RpcError) as err:
        daemon.runtime.CheckpointContainer(pb.CheckpointContainerRequest(container_id="x"))
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED and "checkpoint" in err.value.details()


def test_bad_pod_requests_are_invalid_and_leave_nothing(daemon):
    with pytest.raises(grpc.RpcError) as err:
        daemon.runtime.RunPodSandbox(pb.RunPodSandboxRequest())
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert daemon.runtime.ListPodSandbox(pb.ListPodSandboxRequest()).items == []


def test_on_an_untrusted_node_an_annotation_cannot_raise_trust_and_host_pods_are_refused(tmp_path):
    daemon = TandemDaemon.isolated(tmp_path, 'default_workload_trust = "untrusted"').start()
    try:
        raising = pod_config("raising", tmp_path / "logs", **{"tandem.dev/trust": "trusted"})
        raising.linux.security_context.namespace_options.network = pb.NODE
        raising.linux.security_context.privileged = True
        with pytest.raises(grpc.RpcError) as err:
            daemon.runtime.RunPodSandbox(pb.RunPodSandboxRequest(config=raising))
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "host_pods_on_untrusted_node" in err.value.details()

        plain = pod_config("plain", tmp_path / "logs", **{"tandem.dev/trust": "trusted"})
        with pytest.raises(grpc.RpcError) as err:  # this daemon has no guest assets: the VM route fails
            daemon.runtime.RunPodSandbox(pb.RunPodSandboxRequest(config=plain))
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "vm backend not available" in err.value.details() and "trusted ignored" in err.value.details()
        assert daemon.runtime.ListPodSandbox(pb.ListPodSandboxRequest()).items == []
    finally:
        daemon.stop()


def test_a_second_daemon_on_the_same_socket_is_refused(daemon, tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "cri.cli",
            "serve",
            "--config",
            str(daemon.config_path),
            "--socket",
            str(daemon.socket),
            "--state-dir",
            str(tmp_path / "other"),
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert "already serving" in result.stderr
    daemon.runtime.Version(pb.VersionRequest())  # the first one is unharmed


def test_a_bad_config_stops_the_daemon_with_key_and_reason(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('default_workload_trust = "sometimes"\n')
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "cri.cli",
            "serve",
            "--config",
            str(bad),
            "--socket",
            str(tmp_path / "s.sock"),
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert "default_workload_trust" in result.stderr and "must be one of" in result.stderr
