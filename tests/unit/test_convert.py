"""cri.convert: records to CRI messages."""

from cri.convert import container_stats, container_status, pod_sandbox_status, pod_stats
from protos import cri_pb2 as pb
from sandbox.backend import ContainerUsage
from sandbox.model import ContainerRecord, ContainerState, ProcessUser, SandboxRecord, SandboxState
from tests.support.fake_backend import container, host_network_pod


def sandbox_record(**fields) -> SandboxRecord:
    return SandboxRecord(
        id="s" * 64, config=host_network_pod(), runtime_handler="", backend="runc", trust_reason="t", **fields
    )


def container_record(**fields) -> ContainerRecord:
    return ContainerRecord(
        id="c" * 64, sandbox_id="s" * 64, config=container(), image_id="sha256:i", image_ref="r@sha256:d",
        log_path="/logs/app.log", **fields,
    )  # fmt: skip


def test_pod_status_has_its_ips_and_namespaces():

    status = pod_sandbox_status(sandbox_record(ips=["10.0.0.2", "fd00::2"], state=SandboxState.READY), True)
    assert status.state == pb.SANDBOX_READY
    assert status.network.ip == "10.0.0.2" and [i.ip for i in status.network.additional_ips] == ["fd00::2"]
    assert status.linux.namespaces.options.network == pb.NODE
    assert pod_sandbox_status(sandbox_record(), False).state == pb.SANDBOX_NOTREADY


def test_container_status_carries_the_exit_and_the_user():

    record = container_record(state=ContainerState.EXITED, exit_code=3, reason="Error", user=ProcessUser(1, 2, [2, 5]))
    status = container_status(record)
    assert (status.state, status.exit_code, status.reason, status.log_path) == (
        pb.CONTAINER_EXITED, 3, "Error", "/logs/app.log",
    )  # fmt: skip
    assert (status.user.linux.uid, status.user.linux.gid, list(status.user.linux.supplemental_groups)) == (1, 2, [2, 5])
    assert not container_status(container_record()).HasField("user")


def test_stats_leave_out_what_the_backend_could_not_measure():

    stats = container_stats(container_record(), ContainerUsage(timestamp=5, cpu_usage_ns=10))
    assert stats.cpu.usage_core_nano_seconds.value == 10 and not stats.cpu.HasField("usage_nano_cores")
    assert not stats.memory.HasField("working_set_bytes") and not stats.HasField("writable_layer")
    usage = ContainerUsage(
        timestamp=5,
        memory_working_set_bytes=-1,
        writable_layer_bytes=7,
        writable_layer_mountpoint="/x",
        writable_layer_timestamp=4,
        cpu_nano_cores=3,
    )
    stats = container_stats(container_record(), usage)
    assert stats.memory.working_set_bytes.value == 0  # never negative
    assert (stats.writable_layer.used_bytes.value, stats.writable_layer.fs_id.mountpoint) == (7, "/x")
    assert stats.writable_layer.timestamp == 4  # when the layer was last measured, not the sample's time
    assert stats.cpu.usage_nano_cores.value == 3


def test_stats_saturate_where_guest_figures_overflow_a_uint64():
    # A VM guest reports any uint64 it likes: a rate computed from two of them, or a pod's sum of them, must
    # not make the whole node's stats call fail with "Value out of range".
    top = 2**64 - 1
    usage = ContainerUsage(timestamp=5, cpu_usage_ns=top, memory_working_set_bytes=top, cpu_nano_cores=top * 10**9)
    stats = container_stats(container_record(), usage)
    assert stats.cpu.usage_nano_cores.value == top
    pod = pod_stats(sandbox_record(), [stats, stats])
    assert pod.linux.cpu.usage_core_nano_seconds.value == top
    assert pod.linux.cpu.usage_nano_cores.value == top
    assert pod.linux.memory.working_set_bytes.value == top
