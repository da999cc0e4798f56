"""What the daemon's parts tell the metrics endpoint: named durations and amounts, nothing more.

The layers below `cri/` report here and never import a metrics library; the
composition root installs a `MetricsSink` (the Prometheus one, when `[metrics]
address` is set) and until then every report is dropped. The names are what the
exporter maps to its series; they say what was timed, not how it is exported.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from enum import StrEnum


class Timing(StrEnum):
    """A duration in seconds, each with the labels named here."""

    SANDBOX_RUN = "sandbox_run"  # RunPodSandbox, request to READY; backend
    SANDBOX_NETWORK = "sandbox_network"  # the pod's netns and CNI ADD
    SANDBOX_RUNTIME_CREATE = "sandbox_runtime_create"  # the backend bringing the pod's holder up; backend
    CONTAINER_CREATE = "container_create"  # backend
    CONTAINER_START = "container_start"  # backend
    VM_BOOT = "vm_boot"  # QEMU started until the guest's init ran
    VM_AGENT_READY = "vm_agent_ready"  # then until the guest agent answered
    VM_SETUP_POD = "vm_setup_pod"  # then SetupPod: the guest's network, hostname, DNS
    IMAGE_PULL = "image_pull"  # a whole pull, manifests to unpacked layers


class Amount(StrEnum):
    """A count that only grows."""

    IMAGE_PULL_BYTES = "image_pull_bytes"  # bytes fetched from registries (manifests, configs, layers)
    IMAGE_PULL_FAILURES = "image_pull_failures"


class MetricsSink:
    """Receives every report; this base drops them (the daemon without `[metrics] address`)."""

    def timing(self, what: Timing, seconds: float, backend: str = "") -> None:
        """`what` took `seconds`; `backend` for the timings that are per backend."""

    def amount(self, what: Amount, value: float = 1.0) -> None:
        """`what` grew by `value`."""


_sink = MetricsSink()


def install(sink: MetricsSink) -> MetricsSink:
    """Make `sink` receive every report from now on; returns the one it replaces."""
    global _sink
    previous, _sink = _sink, sink
    return previous


def timing(what: Timing, seconds: float, backend: str = "") -> None:
    _sink.timing(what, seconds, backend)


def amount(what: Amount, value: float = 1.0) -> None:
    _sink.amount(what, value)


@contextmanager
def timed(what: Timing, backend: str = "") -> Iterator[None]:
    """Report how long the block took, if it finished without an exception (failures are counted elsewhere)."""
    began = time.monotonic()
    yield
    _sink.timing(what, time.monotonic() - began, backend)
