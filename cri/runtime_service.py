"""RuntimeService: CRI runtime calls translated onto the pod manager.

Each handler validates the request first (`cri.validate`: INVALID_ARGUMENT naming the field, before
anything runs), calls `sandbox.manager`, and converts the answer (`cri.convert`). Errors are domain exceptions, mapped
to status codes by `cri.errors`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Iterator
from typing import TypeVar

import grpc

from core.errors import FailedPrecondition, InvalidArgument, NotFound, Unimplemented
from core.settings import Config
from cri import convert, metrics, validate
from cri.encoded import Encoded, EntryCache
from cri.errors import answer_unimplemented
from cri.streaming.server import StreamingServer
from cri.version import CRI_API_VERSION, KUBELET_API_VERSION, RUNTIME_NAME, RUNTIME_VERSION
from protos import cri_pb2 as pb
from protos import cri_pb2_grpc
from sandbox.manager import PodManager
from sandbox.model import ContainerRecord, ContainerState, SandboxRecord

log = logging.getLogger("tandem.cri")

T = TypeVar("T")
STREAM_CHUNK = 100
EVENT_KINDS = {
    "created": pb.CONTAINER_CREATED_EVENT,
    "started": pb.CONTAINER_STARTED_EVENT,
    "stopped": pb.CONTAINER_STOPPED_EVENT,
    "deleted": pb.CONTAINER_DELETED_EVENT,
}


def _chunks(items: list[T]) -> Iterator[list[T]]:
    for start in range(0, len(items), STREAM_CHUNK):
        yield items[start : start + STREAM_CHUNK]


class RuntimeServicer(cri_pb2_grpc.RuntimeServiceServicer):
    def __init__(self, config: Config, pods: PodManager, streaming: StreamingServer) -> None:
        self.config = config
        self.pods = pods
        self.streaming = streaming
        self.pod_cidr = ""
        self._pod_entries = EntryCache[SandboxRecord](
            "cri.list-pod-entry",
            pods.is_ready,
            lambda s: pb.ListPodSandboxResponse(items=[convert.pod_sandbox(s, pods.is_ready(s))]).SerializeToString(),
        )
        self._container_entries = EntryCache[ContainerRecord](
            "cri.list-container-entry",
            lambda c: c.state,
            lambda c: pb.ListContainersResponse(containers=[convert.container(c)]).SerializeToString(),
        )

    # ---- runtime ---------------------------------------------------------------------------

    async def Version(self, request: pb.VersionRequest, context: grpc.aio.ServicerContext) -> pb.VersionResponse:
        return pb.VersionResponse(
            version=KUBELET_API_VERSION,
            runtime_name=RUNTIME_NAME,
            runtime_version=RUNTIME_VERSION,
            runtime_api_version=CRI_API_VERSION,
        )

    async def Status(self, request: pb.StatusRequest, context: grpc.aio.ServicerContext) -> pb.StatusResponse:
        network = self.pods.network.readiness()
        conditions = [
            pb.RuntimeCondition(type="RuntimeReady", status=True),
            pb.RuntimeCondition(
                type="NetworkReady", status=network.ready, reason=network.reason, message=network.message
            ),
        ]
        handlers = [
            pb.RuntimeHandler(name=name, features=convert.handler_features(self.pods.handler_features(name)))
            for name in ["", *sorted(self.config.runtimes)]
        ]
        info = {}
        if request.verbose:
            info["config"] = json.dumps(
                {
                    "configSource": self.config.source,
                    "defaultWorkloadTrust": self.config.default_workload_trust,
                    "hostPodsOnUntrustedNode": self.config.policy.host_pods_on_untrusted_node,
                    "runtimes": {n: h.backend for n, h in sorted(self.config.runtimes.items())},
                    "backendsAvailable": self.pods.backend_names(),
                    "stateDir": str(self.config.state_dir),
                    "cniConfDir": str(self.config.cni.conf_dir),
                    "cniBinDirs": [str(d) for d in self.config.cni.bin_dirs],
                    "registryMirrors": self.config.registry.mirrors,
                    "podCIDR": self.pod_cidr,
                }
            )
            info["podNetwork"] = json.dumps(self.pods.network.current().describe())
        return pb.StatusResponse(
            status=pb.RuntimeStatus(conditions=conditions),
            info=info,
            runtime_handlers=handlers,
            features=pb.RuntimeFeatures(supplemental_groups_policy=True),
        )

    async def RuntimeConfig(
        self, request: pb.RuntimeConfigRequest, context: grpc.aio.ServicerContext
    ) -> pb.RuntimeConfigResponse:
        return pb.RuntimeConfigResponse(linux=pb.LinuxRuntimeConfiguration(cgroup_driver=pb.CGROUPFS))

    async def UpdateRuntimeConfig(
        self, request: pb.UpdateRuntimeConfigRequest, context: grpc.aio.ServicerContext
    ) -> pb.UpdateRuntimeConfigResponse:
        cidr = request.runtime_config.network_config.pod_cidr
        if cidr and cidr != self.pod_cidr:
            log.info("pod CIDR updated", extra={"pod_cidr": cidr})
            self.pod_cidr = cidr
        return pb.UpdateRuntimeConfigResponse()

    # ---- pods ------------------------------------------------------------------------------

    async def RunPodSandbox(
        self, request: pb.RunPodSandboxRequest, context: grpc.aio.ServicerContext
    ) -> pb.RunPodSandboxResponse:
        validate.run_pod_sandbox(request)
        sandbox = await self.pods.run_sandbox(request.config, request.runtime_handler)
        return pb.RunPodSandboxResponse(pod_sandbox_id=sandbox.id)

    async def StopPodSandbox(
        self, request: pb.StopPodSandboxRequest, context: grpc.aio.ServicerContext
    ) -> pb.StopPodSandboxResponse:
        await self.pods.stop_sandbox(request.pod_sandbox_id)
        return pb.StopPodSandboxResponse()

    async def RemovePodSandbox(
        self, request: pb.RemovePodSandboxRequest, context: grpc.aio.ServicerContext
    ) -> pb.RemovePodSandboxResponse:
        await self.pods.remove_sandbox(request.pod_sandbox_id)
        return pb.RemovePodSandboxResponse()

    async def PodSandboxStatus(
        self, request: pb.PodSandboxStatusRequest, context: grpc.aio.ServicerContext
    ) -> pb.PodSandboxStatusResponse:
        sandbox = self.pods.sandbox(request.pod_sandbox_id)
        ready = await self.pods.sandbox_ready(sandbox)
        containers = self.pods.containers_of(sandbox.id)
        return pb.PodSandboxStatusResponse(
            status=convert.pod_sandbox_status(sandbox, ready),
            info=convert.sandbox_info(sandbox, self.pods.backend_info(sandbox)) if request.verbose else {},
            containers_statuses=[convert.container_status(c) for c in containers],
        )

    async def ListPodSandbox(
        self, request: pb.ListPodSandboxRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListPodSandboxResponse | Encoded:
        """From memory, each pod's entry encoded once per state (`cri.encoded`): kubelet relists every second."""
        sandboxes = self.pods.list_sandboxes(request.filter if request.HasField("filter") else None)
        return self._pod_entries.answer(sandboxes)

    async def StreamPodSandboxes(
        self, request: pb.StreamPodSandboxesRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.StreamPodSandboxesResponse]:
        sandboxes = self.pods.list_sandboxes(request.filter if request.HasField("filter") else None)
        for chunk in _chunks([convert.pod_sandbox(s, self.pods.is_ready(s)) for s in sandboxes]):
            yield pb.StreamPodSandboxesResponse(pod_sandboxes=chunk)

    # ---- containers ------------------------------------------------------------------------

    async def CreateContainer(
        self, request: pb.CreateContainerRequest, context: grpc.aio.ServicerContext
    ) -> pb.CreateContainerResponse:
        validate.create_container(request)
        container = await self.pods.create_container(request.pod_sandbox_id, request.config, request.sandbox_config)
        return pb.CreateContainerResponse(container_id=container.id)

    async def StartContainer(
        self, request: pb.StartContainerRequest, context: grpc.aio.ServicerContext
    ) -> pb.StartContainerResponse:
        await self.pods.start_container(request.container_id)
        return pb.StartContainerResponse()

    async def StopContainer(
        self, request: pb.StopContainerRequest, context: grpc.aio.ServicerContext
    ) -> pb.StopContainerResponse:
        await self.pods.stop_container(request.container_id, max(0, request.timeout))
        return pb.StopContainerResponse()

    async def RemoveContainer(
        self, request: pb.RemoveContainerRequest, context: grpc.aio.ServicerContext
    ) -> pb.RemoveContainerResponse:
        await self.pods.remove_container(request.container_id)
        return pb.RemoveContainerResponse()

    async def ListContainers(
        self, request: pb.ListContainersRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListContainersResponse | Encoded:
        """From memory, each container's entry encoded once per state (`cri.encoded`)."""
        containers = self.pods.list_containers(request.filter if request.HasField("filter") else None)
        return self._container_entries.answer(containers)

    async def StreamContainers(
        self, request: pb.StreamContainersRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.StreamContainersResponse]:
        containers = self.pods.list_containers(request.filter if request.HasField("filter") else None)
        for chunk in _chunks([convert.container(c) for c in containers]):
            yield pb.StreamContainersResponse(containers=chunk)

    async def ContainerStatus(
        self, request: pb.ContainerStatusRequest, context: grpc.aio.ServicerContext
    ) -> pb.ContainerStatusResponse:
        container = await self.pods.container_status(request.container_id)
        backend = self.pods.sandbox(container.sandbox_id).backend
        return pb.ContainerStatusResponse(
            status=convert.container_status(container),
            info=convert.container_info(container, backend) if request.verbose else {},
        )

    async def UpdateContainerResources(
        self, request: pb.UpdateContainerResourcesRequest, context: grpc.aio.ServicerContext
    ) -> pb.UpdateContainerResourcesResponse:
        validate.update_container_resources(request)
        await self.pods.update_resources(request.container_id, request.linux)
        return pb.UpdateContainerResourcesResponse()

    async def UpdatePodSandboxResources(
        self, request: pb.UpdatePodSandboxResourcesRequest, context: grpc.aio.ServicerContext
    ) -> pb.UpdatePodSandboxResourcesResponse:
        validate.update_pod_sandbox_resources(request)
        await self.pods.update_sandbox_resources(request.pod_sandbox_id, request.resources)
        return pb.UpdatePodSandboxResourcesResponse()

    async def ReopenContainerLog(
        self, request: pb.ReopenContainerLogRequest, context: grpc.aio.ServicerContext
    ) -> pb.ReopenContainerLogResponse:
        await self.pods.reopen_log(request.container_id)
        return pb.ReopenContainerLogResponse()

    async def ExecSync(self, request: pb.ExecSyncRequest, context: grpc.aio.ServicerContext) -> pb.ExecSyncResponse:
        validate.exec_sync(request)
        result = await self.pods.exec_sync(request.container_id, list(request.cmd), request.timeout)
        return pb.ExecSyncResponse(stdout=result.stdout, stderr=result.stderr, exit_code=result.exit_code)

    # ---- streaming: each call validates and answers with a one-time URL on the streaming server ----

    @staticmethod
    def _check_streams(request: pb.ExecRequest | pb.AttachRequest) -> None:
        """kubelet's streaming server's rules: some stream, and no stderr beside a tty (it has only one output)."""
        if not (request.stdin or request.stdout or request.stderr):
            raise InvalidArgument("one of stdin, stdout or stderr must be set")
        if request.tty and request.stderr:
            raise InvalidArgument("tty and stderr cannot both be set: a terminal has a single output")

    async def Exec(self, request: pb.ExecRequest, context: grpc.aio.ServicerContext) -> pb.ExecResponse:
        validate.exec_request(request)
        self._check_streams(request)
        _, container = await self.pods.running(request.container_id)
        cached = pb.ExecRequest()
        cached.CopyFrom(request)
        cached.container_id = container.id
        return pb.ExecResponse(url=self.streaming.url(cached))

    async def Attach(self, request: pb.AttachRequest, context: grpc.aio.ServicerContext) -> pb.AttachResponse:
        self._check_streams(request)
        _, container = await self.pods.running(request.container_id)
        cached = pb.AttachRequest()
        cached.CopyFrom(request)
        cached.container_id = container.id
        return pb.AttachResponse(url=self.streaming.url(cached))

    async def PortForward(
        self, request: pb.PortForwardRequest, context: grpc.aio.ServicerContext
    ) -> pb.PortForwardResponse:
        sandbox = self.pods.sandbox(request.pod_sandbox_id)
        if not await self.pods.sandbox_ready(sandbox):
            raise FailedPrecondition(f"pod sandbox {sandbox.id} is not ready")
        if bad := [p for p in request.port if not 0 < p < 65536]:
            raise InvalidArgument(f"ports must be 1-65535, got {bad}")
        cached = pb.PortForwardRequest()
        cached.CopyFrom(request)
        cached.pod_sandbox_id = sandbox.id
        return pb.PortForwardResponse(url=self.streaming.url(cached))

    # ---- stats -----------------------------------------------------------------------------

    async def ContainerStats(
        self, request: pb.ContainerStatsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ContainerStatsResponse:
        container = await self.pods.container_status(request.container_id)
        usage = await self.pods.container_usage(container)
        return pb.ContainerStatsResponse(stats=convert.container_stats(container, usage))

    async def _stats_of(self, containers: list[ContainerRecord]) -> list[pb.ContainerStats]:
        """Those of `containers` that run, with their latest sample (shared by concurrent calls: `sandbox.stats`)."""
        running = [c for c in containers if c.state == ContainerState.RUNNING]
        usage = await self.pods.usage(running)
        return [convert.container_stats(c, usage[c.id]) for c in running if c.id in usage]

    async def _list_container_stats(self, flt: pb.ContainerStatsFilter | None) -> list[pb.ContainerStats]:
        cflt = pb.ContainerFilter()
        if flt is not None:
            cflt = pb.ContainerFilter(id=flt.id, pod_sandbox_id=flt.pod_sandbox_id, label_selector=flt.label_selector)
        cflt.state.state = pb.CONTAINER_RUNNING
        return await self._stats_of(self.pods.list_containers(cflt))

    async def ListContainerStats(
        self, request: pb.ListContainerStatsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListContainerStatsResponse:
        stats = await self._list_container_stats(request.filter if request.HasField("filter") else None)
        return pb.ListContainerStatsResponse(stats=stats)

    async def StreamContainerStats(
        self, request: pb.StreamContainerStatsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.StreamContainerStatsResponse]:
        stats = await self._list_container_stats(request.filter if request.HasField("filter") else None)
        for chunk in _chunks(stats):
            yield pb.StreamContainerStatsResponse(container_stats=chunk)

    def _running_by_pod(self, sandboxes: list[SandboxRecord]) -> dict[str, list[ContainerRecord]]:
        running = ContainerState.RUNNING
        return {s.id: [c for c in self.pods.containers_of(s.id) if c.state == running] for s in sandboxes}

    async def _pods_stats(self, sandboxes: list[SandboxRecord]) -> list[pb.PodSandboxStats]:
        """Each pod's stats: its running containers' and their sums, from one shared collection."""
        running = self._running_by_pod(sandboxes)
        usage = await self.pods.usage([c for containers in running.values() for c in containers])
        return [
            convert.pod_stats(s, [convert.container_stats(c, usage[c.id]) for c in running[s.id] if c.id in usage])
            for s in sandboxes
        ]

    async def PodSandboxStats(
        self, request: pb.PodSandboxStatsRequest, context: grpc.aio.ServicerContext
    ) -> pb.PodSandboxStatsResponse:
        (stats,) = await self._pods_stats([self.pods.sandbox(request.pod_sandbox_id)])
        return pb.PodSandboxStatsResponse(stats=stats)

    async def _list_pod_stats(self, flt: pb.PodSandboxStatsFilter | None) -> list[pb.PodSandboxStats]:
        sflt = None
        if flt is not None:
            sflt = pb.PodSandboxFilter(id=flt.id, label_selector=flt.label_selector)
        return await self._pods_stats([s for s in self.pods.list_sandboxes(sflt) if self.pods.is_ready(s)])

    async def ListPodSandboxStats(
        self, request: pb.ListPodSandboxStatsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListPodSandboxStatsResponse:
        stats = await self._list_pod_stats(request.filter if request.HasField("filter") else None)
        return pb.ListPodSandboxStatsResponse(stats=stats)

    async def StreamPodSandboxStats(
        self, request: pb.StreamPodSandboxStatsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.StreamPodSandboxStatsResponse]:
        stats = await self._list_pod_stats(request.filter if request.HasField("filter") else None)
        for chunk in _chunks(stats):
            yield pb.StreamPodSandboxStatsResponse(pod_sandbox_stats=chunk)

    # ---- metrics ---------------------------------------------------------------------------

    async def ListMetricDescriptors(
        self, request: pb.ListMetricDescriptorsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListMetricDescriptorsResponse:
        return pb.ListMetricDescriptorsResponse(descriptors=metrics.descriptors())

    async def _pod_metrics(self) -> list[pb.PodSandboxMetrics]:
        sandboxes = [s for s in self.pods.list_sandboxes(None) if self.pods.is_ready(s)]
        running = self._running_by_pod(sandboxes)
        usage = await self.pods.usage([c for containers in running.values() for c in containers])
        return [
            pb.PodSandboxMetrics(
                pod_sandbox_id=s.id,
                container_metrics=[metrics.container_metrics(c, usage[c.id]) for c in running[s.id] if c.id in usage],
            )
            for s in sandboxes
        ]

    async def ListPodSandboxMetrics(
        self, request: pb.ListPodSandboxMetricsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListPodSandboxMetricsResponse:
        return pb.ListPodSandboxMetricsResponse(pod_metrics=await self._pod_metrics())

    async def StreamPodSandboxMetrics(
        self, request: pb.StreamPodSandboxMetricsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.StreamPodSandboxMetricsResponse]:
        for chunk in _chunks(await self._pod_metrics()):
            yield pb.StreamPodSandboxMetricsResponse(pod_sandbox_metrics=chunk)

    # ---- events ----------------------------------------------------------------------------

    async def GetContainerEvents(
        self, request: pb.GetEventsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ContainerEventResponse]:
        subscription = self.pods.events.subscribe()
        try:
            async for event in subscription:
                response = pb.ContainerEventResponse(
                    container_id=event.container_id,
                    container_event_type=EVENT_KINDS[event.kind],
                    created_at=event.at,
                )
                try:
                    sandbox = self.pods.sandbox(event.sandbox_id)
                except NotFound:  # the pod may be gone by the time its event is sent
                    yield response
                    continue
                response.pod_sandbox_status.CopyFrom(convert.pod_sandbox_status(sandbox, sandbox.state == "ready"))
                response.containers_statuses.extend(
                    convert.container_status(c) for c in self.pods.containers_of(sandbox.id)
                )
                yield response
        finally:
            subscription.close()

    async def CheckpointContainer(
        self, request: pb.CheckpointContainerRequest, context: grpc.aio.ServicerContext
    ) -> pb.CheckpointContainerResponse:
        raise Unimplemented("CheckpointContainer: Tandem does not checkpoint containers (no CRIU integration)")


answer_unimplemented(RuntimeServicer, cri_pb2_grpc.RuntimeServiceServicer, "RuntimeService")
