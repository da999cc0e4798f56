"""RuntimeService over gRPC on a fake backend: the status codes kubelet sees, events, stats; no root, fast."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import grpc
import pytest

from core.settings import Config
from cri.encoded import add_servicer
from cri.errors import ErrorInterceptor
from cri.runtime_service import RuntimeServicer
from cri.streaming.pods import PodStreams
from cri.streaming.server import StreamingServer
from protos import cri_pb2 as pb
from protos import cri_pb2_grpc
from sandbox.backend import BackendFeatures
from tests.support.fake_backend import FakeBackend, container, fake_manager, host_network_pod


@pytest.fixture
async def cri(tmp_path):
    short = Path(tempfile.mkdtemp(prefix="cri-", dir="/tmp"))  # a unix socket path must stay short
    fake = FakeBackend(tmp_path / "fake")
    pods = fake_manager(tmp_path, fake)
    await pods.recover()
    streaming = StreamingServer(Config().streaming, PodStreams(pods))
    await streaming.start()
    server = grpc.aio.server(interceptors=[ErrorInterceptor()])
    config = Config(state_dir=tmp_path / "state", runtime_dir=tmp_path / "run")
    add_servicer(cri_pb2_grpc.add_RuntimeServiceServicer_to_server, RuntimeServicer(config, pods, streaming), server)
    server.add_insecure_port(f"unix://{short}/cri.sock")
    await server.start()
    channel = grpc.aio.insecure_channel(f"unix://{short}/cri.sock")
    yield cri_pb2_grpc.RuntimeServiceStub(channel), fake
    await channel.close()
    await server.stop(0)
    await streaming.stop()
    await pods.close()
    shutil.rmtree(short)


async def code_of(call) -> grpc.StatusCode:
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        await call
    return failed.value.code()


async def start(rt, name: str = "app") -> tuple[str, str, pb.PodSandboxConfig]:
    pod = host_network_pod()
    pod_id = (await rt.RunPodSandbox(pb.RunPodSandboxRequest(config=pod))).pod_sandbox_id
    request = pb.CreateContainerRequest(pod_sandbox_id=pod_id, config=container(name), sandbox_config=pod)
    cid = (await rt.CreateContainer(request)).container_id
    await rt.StartContainer(pb.StartContainerRequest(container_id=cid))
    return pod_id, cid, pod


async def test_status_codes(cri):
    rt, _ = cri
    pod_id, cid, pod = await start(rt)
    assert (
        await code_of(rt.ContainerStatus(pb.ContainerStatusRequest(container_id="0" * 64))) == grpc.StatusCode.NOT_FOUND
    )
    assert await code_of(rt.PodSandboxStatus(pb.PodSandboxStatusRequest(pod_sandbox_id="0" * 64))) == (
        grpc.StatusCode.NOT_FOUND
    )
    assert await code_of(rt.StartContainer(pb.StartContainerRequest(container_id=cid))) == (
        grpc.StatusCode.FAILED_PRECONDITION
    )
    again = pb.CreateContainerRequest(pod_sandbox_id=pod_id, config=container(), sandbox_config=pod)
    assert await code_of(rt.CreateContainer(again)) == grpc.StatusCode.ALREADY_EXISTS
    assert await code_of(rt.ExecSync(pb.ExecSyncRequest(container_id=cid))) == grpc.StatusCode.INVALID_ARGUMENT
    both = pb.ExecRequest(container_id=cid, cmd=["sh"], tty=True, stderr=True)
    assert await code_of(rt.Exec(both)) == grpc.StatusCode.INVALID_ARGUMENT
    kata = pb.RunPodSandboxRequest(config=host_network_pod("kata"), runtime_handler="kata")
    assert await code_of(rt.RunPodSandbox(kata)) == grpc.StatusCode.NOT_FOUND
    vm_pod = host_network_pod("guest")
    vm_pod.linux.security_context.namespace_options.network = pb.POD
    vm = pb.RunPodSandboxRequest(config=vm_pod, runtime_handler="vm")
    assert await code_of(rt.RunPodSandbox(vm)) == grpc.StatusCode.FAILED_PRECONDITION  # no vm backend here
    checkpoint = pb.CheckpointContainerRequest(container_id=cid)
    assert await code_of(rt.CheckpointContainer(checkpoint)) == grpc.StatusCode.UNIMPLEMENTED


async def test_stop_and_remove_of_anything_unknown_is_success(cri):
    rt, _ = cri
    await rt.StopContainer(pb.StopContainerRequest(container_id="0" * 64))
    await rt.RemoveContainer(pb.RemoveContainerRequest(container_id="0" * 64))
    await rt.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id="0" * 64))
    await rt.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id="0" * 64))


async def test_an_exit_reaches_get_container_events_with_the_pods_statuses(cri):
    rt, fake = cri
    events = rt.GetContainerEvents(pb.GetEventsRequest(), timeout=10)
    pod_id, cid, _ = await start(rt)
    seen = [await events.read(), await events.read()]
    assert [(e.container_id, e.container_event_type) for e in seen] == [
        (cid, pb.CONTAINER_CREATED_EVENT),
        (cid, pb.CONTAINER_STARTED_EVENT),
    ]
    fake.exit(cid, 7)
    stopped = await events.read()
    assert (stopped.container_id, stopped.container_event_type) == (cid, pb.CONTAINER_STOPPED_EVENT)
    assert stopped.pod_sandbox_status.id == pod_id
    (status,) = stopped.containers_statuses
    assert (status.state, status.exit_code, status.reason) == (pb.CONTAINER_EXITED, 7, "Error")
    await rt.RemoveContainer(pb.RemoveContainerRequest(container_id=cid))
    deleted = await events.read()
    assert (deleted.container_id, deleted.container_event_type) == (cid, pb.CONTAINER_DELETED_EVENT)
    events.cancel()


async def test_stats_and_status_come_through_the_manager(cri):
    rt, _ = cri
    pod_id, cid, _ = await start(rt)
    stats = (await rt.ContainerStats(pb.ContainerStatsRequest(container_id=cid))).stats
    assert (stats.cpu.usage_core_nano_seconds.value, stats.memory.working_set_bytes.value) == (1000, 4096)
    (pod_stats,) = (await rt.ListPodSandboxStats(pb.ListPodSandboxStatsRequest())).stats
    assert pod_stats.attributes.id == pod_id and [c.attributes.id for c in pod_stats.linux.containers] == [cid]
    (pod_metrics,) = (await rt.ListPodSandboxMetrics(pb.ListPodSandboxMetricsRequest())).pod_metrics
    assert pod_metrics.pod_sandbox_id == pod_id and pod_metrics.container_metrics[0].container_id == cid
    info = json.loads((await rt.Status(pb.StatusRequest(verbose=True))).info["config"])
    assert info["backendsAvailable"] == ["runc"]
    listed = (await rt.ListContainers(pb.ListContainersRequest())).containers
    assert [(c.id, c.state) for c in listed] == [(cid, pb.CONTAINER_RUNNING)]


async def test_each_runtime_handler_reports_its_backends_features(cri):
    rt, fake = cri
    fake.features = BackendFeatures(recursive_read_only_mounts=True, user_namespaces=True)
    handlers = {h.name: h.features for h in (await rt.Status(pb.StatusRequest())).runtime_handlers}
    assert set(handlers) == {"", "runc", "vm"}
    both = pb.RuntimeHandlerFeatures(recursive_read_only_mounts=True, user_namespaces=True)
    assert handlers[""] == handlers["runc"] == both
    assert handlers["vm"] == pb.RuntimeHandlerFeatures()  # its backend is not even available here
