"""RuntimeService: runtime-wide calls. Pod and container calls arrive with the backends."""

from __future__ import annotations

import json
import logging

import grpc

from cri.config import Config
from cri.errors import answer_unimplemented
from cri.version import CRI_API_VERSION, KUBELET_API_VERSION, RUNTIME_NAME, RUNTIME_VERSION
from protos import cri_pb2 as pb
from protos import cri_pb2_grpc
from sandbox import cni

log = logging.getLogger("tandem.cri")


class RuntimeServicer(cri_pb2_grpc.RuntimeServiceServicer):
    def __init__(self, config: Config) -> None:
        self.config = config
        self.pod_cidr = ""

    async def Version(
        self, request: pb.VersionRequest, context: grpc.aio.ServicerContext
    ) -> pb.VersionResponse:
        return pb.VersionResponse(
            version=KUBELET_API_VERSION,
            runtime_name=RUNTIME_NAME,
            runtime_version=RUNTIME_VERSION,
            runtime_api_version=CRI_API_VERSION,
        )

    async def Status(self, request: pb.StatusRequest, context: grpc.aio.ServicerContext) -> pb.StatusResponse:
        network = cni.readiness(self.config.cni.conf_dir, self.config.cni.bin_dirs)
        conditions = [
            pb.RuntimeCondition(type="RuntimeReady", status=True),
            pb.RuntimeCondition(
                type="NetworkReady", status=network.ready, reason=network.reason, message=network.message
            ),
        ]
        handlers = [pb.RuntimeHandler(name="", features=pb.RuntimeHandlerFeatures())]
        handlers += [
            pb.RuntimeHandler(name=name, features=pb.RuntimeHandlerFeatures())
            for name in sorted(self.config.runtimes)
        ]
        info = {}
        if request.verbose:
            info["config"] = json.dumps(
                {
                    "configSource": self.config.source,
                    "defaultWorkloadTrust": self.config.default_workload_trust,
                    "runtimes": {n: h.backend for n, h in sorted(self.config.runtimes.items())},
                    "stateDir": str(self.config.state_dir),
                    "cniConfDir": str(self.config.cni.conf_dir),
                    "cniBinDirs": [str(d) for d in self.config.cni.bin_dirs],
                    "registryMirrors": self.config.registry.mirrors,
                    "podCIDR": self.pod_cidr,
                }
            )
        return pb.StatusResponse(
            status=pb.RuntimeStatus(conditions=conditions),
            info=info,
            runtime_handlers=handlers,
            features=pb.RuntimeFeatures(),
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


answer_unimplemented(RuntimeServicer, cri_pb2_grpc.RuntimeServiceServicer, "RuntimeService")
