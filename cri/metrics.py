"""Prometheus-style container metrics for kubelet's CRI metrics path (ListPodSandboxMetrics).

The names are cAdvisor's, so dashboards built on them keep working; the values
come from the same usage the stats RPCs report. CRI carries metric values as
unsigned integers, so CPU time is whole seconds.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from protos import cri_pb2 as pb
from sandbox.backend import ContainerUsage
from sandbox.model import ContainerRecord

LABEL_KEYS = ["id", "name", "image"]


@dataclass(frozen=True)
class MetricSpec:
    name: str
    help: str
    kind: pb.MetricType
    value: Callable[[ContainerUsage], int | None]


METRICS = [
    MetricSpec(
        "container_cpu_usage_seconds_total",
        "Cumulative CPU time consumed, in whole seconds.",
        pb.COUNTER,
        lambda u: None if u.cpu_usage_ns is None else u.cpu_usage_ns // 10**9,
    ),
    MetricSpec(
        "container_memory_usage_bytes",
        "Current memory usage, including page cache.",
        pb.GAUGE,
        lambda u: u.memory_usage_bytes,
    ),
    MetricSpec(
        "container_memory_working_set_bytes",
        "Current working set: usage minus inactive file pages, what eviction decisions use.",
        pb.GAUGE,
        lambda u: u.memory_working_set_bytes,
    ),
    MetricSpec("container_memory_rss", "Anonymous and swap-cache memory.", pb.GAUGE, lambda u: u.memory_rss_bytes),
    MetricSpec("container_processes", "Number of processes running in the container.", pb.GAUGE, lambda u: u.pids),
    MetricSpec(
        "container_fs_usage_bytes",
        "Bytes used by the container's writable layer.",
        pb.GAUGE,
        lambda u: u.writable_layer_bytes,
    ),
]


def descriptors() -> list[pb.MetricDescriptor]:
    return [pb.MetricDescriptor(name=m.name, help=m.help, label_keys=LABEL_KEYS) for m in METRICS]


def container_metrics(container: ContainerRecord, usage: ContainerUsage) -> pb.ContainerMetrics:
    labels = [container.id, container.name, container.config.image.user_specified_image or container.config.image.image]
    metrics = []
    for spec in METRICS:
        value = spec.value(usage)
        if value is not None:
            metrics.append(
                pb.Metric(
                    name=spec.name,
                    timestamp=usage.timestamp,
                    metric_type=spec.kind,
                    label_values=labels,
                    value=pb.UInt64Value(value=max(0, value)),
                )
            )
    return pb.ContainerMetrics(container_id=container.id, metrics=metrics)
