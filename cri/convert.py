"""Pod-model records to CRI messages. Pure functions: no I/O, no decisions."""

from __future__ import annotations

import json
from typing import Any

from google.protobuf import json_format
from google.protobuf.message import Message

from protos import cri_pb2 as pb
from sandbox.backend import BackendFeatures, ContainerUsage
from sandbox.model import ContainerRecord, ContainerState, SandboxRecord

CONTAINER_STATES = {
    ContainerState.CREATED: pb.CONTAINER_CREATED,
    ContainerState.RUNNING: pb.CONTAINER_RUNNING,
    ContainerState.EXITED: pb.CONTAINER_EXITED,
    ContainerState.UNKNOWN: pb.CONTAINER_UNKNOWN,
}


def handler_features(features: BackendFeatures) -> pb.RuntimeHandlerFeatures:
    return pb.RuntimeHandlerFeatures(
        recursive_read_only_mounts=features.recursive_read_only_mounts, user_namespaces=features.user_namespaces
    )


def _sandbox_state(ready: bool) -> pb.PodSandboxState:
    return pb.SANDBOX_READY if ready else pb.SANDBOX_NOTREADY


def pod_sandbox(sandbox: SandboxRecord, ready: bool) -> pb.PodSandbox:
    return pb.PodSandbox(
        id=sandbox.id,
        metadata=sandbox.config.metadata,
        state=_sandbox_state(ready),
        created_at=sandbox.created_at,
        labels=sandbox.config.labels,
        annotations=sandbox.config.annotations,
        runtime_handler=sandbox.runtime_handler,
    )


def pod_sandbox_status(sandbox: SandboxRecord, ready: bool) -> pb.PodSandboxStatus:
    network = pb.PodSandboxNetworkStatus()
    if sandbox.ips:
        network.ip = sandbox.ips[0]
        network.additional_ips.extend(pb.PodIP(ip=ip) for ip in sandbox.ips[1:])
    options = sandbox.config.linux.security_context.namespace_options
    return pb.PodSandboxStatus(
        id=sandbox.id,
        metadata=sandbox.config.metadata,
        state=_sandbox_state(ready),
        created_at=sandbox.created_at,
        network=network,
        linux=pb.LinuxPodSandboxStatus(namespaces=pb.Namespace(options=options)),
        labels=sandbox.config.labels,
        annotations=sandbox.config.annotations,
        runtime_handler=sandbox.runtime_handler,
    )


def sandbox_info(sandbox: SandboxRecord, backend_info: dict[str, Any]) -> dict[str, str]:
    """Verbose PodSandboxStatus: the records, and what the backend knows beyond them (`backendInfo`)."""
    return {
        "info": json.dumps(
            {
                "backend": sandbox.backend,
                "trustReason": sandbox.trust_reason,
                "runtimeHandler": sandbox.runtime_handler,
                "netns": sandbox.netns_path,
                "backendState": sandbox.backend_state,
                "backendInfo": backend_info,
                "config": json.loads(_message_json(sandbox.config)),
            }
        )
    }


def _message_json(message: Message) -> str:
    return json_format.MessageToJson(message)


def _image_name(container: ContainerRecord) -> str:
    spec = container.config.image
    return spec.user_specified_image or spec.image


def container(c: ContainerRecord) -> pb.Container:
    return pb.Container(
        id=c.id,
        pod_sandbox_id=c.sandbox_id,
        metadata=c.config.metadata,
        image=pb.ImageSpec(image=_image_name(c), annotations=c.config.image.annotations),
        image_ref=c.image_ref,
        image_id=c.image_id,
        state=CONTAINER_STATES[c.state],
        created_at=c.created_at,
        labels=c.config.labels,
        annotations=c.config.annotations,
    )


def container_status(c: ContainerRecord) -> pb.ContainerStatus:
    return pb.ContainerStatus(
        id=c.id,
        metadata=c.config.metadata,
        state=CONTAINER_STATES[c.state],
        created_at=c.created_at,
        started_at=c.started_at,
        finished_at=c.finished_at,
        exit_code=c.exit_code,
        image=pb.ImageSpec(image=_image_name(c), annotations=c.config.image.annotations),
        image_ref=c.image_ref,
        image_id=c.image_id,
        reason=c.reason,
        message=c.message,
        labels=c.config.labels,
        annotations=c.config.annotations,
        mounts=c.config.mounts,
        log_path=c.log_path,
        resources=pb.ContainerResources(linux=c.config.linux.resources),
        user=None
        if c.user is None
        else pb.ContainerUser(
            linux=pb.LinuxContainerUser(uid=c.user.uid, gid=c.user.gid, supplemental_groups=c.user.groups)
        ),
    )


def container_info(c: ContainerRecord, backend: str) -> dict[str, str]:
    return {
        "info": json.dumps(
            {
                "backend": backend,
                "sandboxID": c.sandbox_id,
                "backendState": c.backend_state,
                "config": json.loads(_message_json(c.config)),
            }
        )
    }


_U64_MAX = 2**64 - 1


def _saturated(value: int) -> int:
    """`value` within a uint64: a VM guest reports any uint64 it likes, so a rate or a sum of its figures can
    exceed one, and one field out of range would fail the stats call of every pod on the node."""
    return min(max(0, value), _U64_MAX)


def _u64(value: int | None) -> pb.UInt64Value | None:
    return None if value is None else pb.UInt64Value(value=_saturated(value))


def container_stats(c: ContainerRecord, usage: ContainerUsage) -> pb.ContainerStats:
    stats = pb.ContainerStats(
        attributes=pb.ContainerAttributes(
            id=c.id, metadata=c.config.metadata, labels=c.config.labels, annotations=c.config.annotations
        ),
        cpu=pb.CpuUsage(
            timestamp=usage.timestamp,
            usage_core_nano_seconds=_u64(usage.cpu_usage_ns),
            usage_nano_cores=_u64(usage.cpu_nano_cores),
        ),
        memory=pb.MemoryUsage(
            timestamp=usage.timestamp,
            working_set_bytes=_u64(usage.memory_working_set_bytes),
            available_bytes=_u64(usage.memory_available_bytes),
            usage_bytes=_u64(usage.memory_usage_bytes),
            rss_bytes=_u64(usage.memory_rss_bytes),
            page_faults=_u64(usage.page_faults),
            major_page_faults=_u64(usage.major_page_faults),
        ),
    )
    if usage.writable_layer_bytes is not None:
        stats.writable_layer.CopyFrom(
            pb.FilesystemUsage(
                timestamp=usage.writable_layer_timestamp or usage.timestamp,
                fs_id=pb.FilesystemIdentifier(mountpoint=usage.writable_layer_mountpoint),
                used_bytes=_u64(usage.writable_layer_bytes),
                inodes_used=_u64(usage.writable_layer_inodes),
            )
        )
    return stats


def pod_stats(sandbox: SandboxRecord, containers: list[pb.ContainerStats]) -> pb.PodSandboxStats:
    """A pod's stats: its containers' and their sums (at the latest of their timestamps)."""
    now = max((c.cpu.timestamp for c in containers), default=0)
    cpu = pb.CpuUsage(timestamp=now)
    memory = pb.MemoryUsage(timestamp=now)
    if containers:
        cpu.usage_core_nano_seconds.value = _saturated(sum(c.cpu.usage_core_nano_seconds.value for c in containers))
        cpu.usage_nano_cores.value = _saturated(sum(c.cpu.usage_nano_cores.value for c in containers))
        memory.working_set_bytes.value = _saturated(sum(c.memory.working_set_bytes.value for c in containers))
        memory.usage_bytes.value = _saturated(sum(c.memory.usage_bytes.value for c in containers))
        memory.rss_bytes.value = _saturated(sum(c.memory.rss_bytes.value for c in containers))
    return pb.PodSandboxStats(
        attributes=pb.PodSandboxAttributes(
            id=sandbox.id,
            metadata=sandbox.config.metadata,
            labels=sandbox.config.labels,
            annotations=sandbox.config.annotations,
        ),
        linux=pb.LinuxPodSandboxStats(cpu=cpu, memory=memory, containers=containers),
    )
