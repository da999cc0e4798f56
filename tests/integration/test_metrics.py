"""The Prometheus endpoint: a scrape after pod starts shows each series named in cri/prometheus.py moved."""

from __future__ import annotations

import re
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from protos import cri_pb2 as pb
from tests.support.pods import container_config, pod_config
from tests.support.wait import wait_for
from vm_backend.guest_image import GuestAssets, assets_root

pytestmark = pytest.mark.integration


def scrape(url: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of a scrape: (name, labels) -> value."""
    with urllib.request.urlopen(url, timeout=10) as answer:
        assert answer.headers["Content-Type"].startswith("text/plain; version=")
        text = answer.read().decode()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def test_a_scrape_shows_what_pod_starts_did(pod_env, guest_assets: GuestAssets, tmp_path: Path) -> None:
    root = assets_root(tmp_path / "state")
    root.mkdir(parents=True)
    (root / "current").symlink_to(guest_assets.dir)
    env = pod_env('[vm]\naccel = "tcg"\n[metrics]\naddress = "127.0.0.1:0"\n')
    daemon = env.daemon
    url = wait_for(lambda: (m := re.search(r'msg="metrics listening" url=(\S+)', daemon.log())) and m.group(1))
    before = scrape(url)
    assert value(before, "tandem_image_pull_seconds_count") == 1  # the fixture's pull
    assert value(before, "tandem_image_pulls_bytes_total") > 100_000  # busybox's layer, its manifest, its config
    assert value(before, "tandem_vm_boot_seconds_count") == 0

    started = {}
    for backend, handler in (("runc", ""), ("vm", "vm")):
        config = pod_config(f"metrics-{backend}", env.tmp / "logs")
        pod_id = daemon.runtime.RunPodSandbox(
            pb.RunPodSandboxRequest(config=config, runtime_handler=handler)
        ).pod_sandbox_id
        cid = daemon.runtime.CreateContainer(
            pb.CreateContainerRequest(
                pod_sandbox_id=pod_id,
                config=container_config(f"app-{backend}", env.image, "sleep", "3600"),
                sandbox_config=config,
            )
        ).container_id
        daemon.runtime.StartContainer(pb.StartContainerRequest(container_id=cid))
        started[backend] = pod_id
    with pytest.raises(grpc.RpcError) as missing:
        daemon.runtime.ContainerStatus(pb.ContainerStatusRequest(container_id="no-such-container"))
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND

    after = scrape(url)
    service = "runtime.v1.RuntimeService"
    rpc = {"grpc_service": service, "grpc_type": "unary"}
    assert value(after, "grpc_server_handled_total", grpc_method="RunPodSandbox", grpc_code="OK", **rpc) == 2
    # an abort sends the status before the handler unwinds, so the client may hear it before the count moves
    failed = {"grpc_method": "ContainerStatus", "grpc_code": "NOT_FOUND", **rpc}
    assert wait_for(lambda: value(scrape(url), "grpc_server_handled_total", **failed)) == 1
    assert value(after, "grpc_server_handling_seconds_count", grpc_method="StartContainer", **rpc) == 2
    assert value(after, "grpc_server_handling_seconds_bucket", grpc_method="RunPodSandbox", le="+Inf", **rpc) == 2
    for backend in ("runc", "vm"):
        for series in (
            "tandem_cri_sandbox_run_seconds_count",
            "tandem_cri_sandbox_runtime_create_seconds_count",
            "tandem_cri_container_create_seconds_count",
            "tandem_cri_container_start_seconds_count",
        ):
            assert value(after, series, backend=backend) == 1, (series, backend)
        assert value(after, "tandem_cri_sandbox_count", backend=backend, state="ready") == 1
        assert value(after, "tandem_cri_container_count", backend=backend, state="running") == 1
    assert value(after, "tandem_cri_sandbox_create_network_seconds_count") == 2
    for series in ("tandem_vm_boot_seconds", "tandem_vm_agent_ready_seconds", "tandem_vm_setup_pod_seconds"):
        assert value(after, f"{series}_count") == 1, series
        assert value(after, f"{series}_sum") > 0, series

    daemon.runtime.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=started["runc"]))
    gone = scrape(url)
    assert value(gone, "tandem_cri_sandbox_count", backend="runc", state="ready") == 0
    assert value(gone, "tandem_cri_sandbox_count", backend="vm", state="ready") == 1
    with pytest.raises(urllib.error.HTTPError) as elsewhere:
        urllib.request.urlopen(url.replace("/metrics", "/other"), timeout=10)
    assert elsewhere.value.code == 404


def test_metrics_are_off_by_default(pod_env) -> None:
    env = pod_env()
    env.daemon.runtime.Version(pb.VersionRequest())
    assert "metrics listening" not in env.daemon.log()
