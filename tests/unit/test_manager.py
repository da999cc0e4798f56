"""sandbox.manager over a fake backend: states, idempotence, refusals, recovery and pushed exits, in milliseconds."""

from __future__ import annotations

import asyncio
import signal
import time

import pytest

from core.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, Unimplemented
from core.records import RecordStore
from protos import cri_pb2 as pb
from sandbox.backend import BackendFeatures
from sandbox.events import ContainerEvent, Subscription
from sandbox.model import ContainerRecord, ContainerState, ExitStatus, ProcessUser, SandboxRecord, SandboxState
from tests.support.fake_backend import IMAGE_ID, FakeBackend, container, fake_manager, host_network_pod


@pytest.fixture
async def env(tmp_path):
    fake = FakeBackend(tmp_path / "fake")
    pods = fake_manager(tmp_path, fake)
    await pods.recover()
    yield pods, fake
    await pods.close()


async def next_event(events: Subscription) -> ContainerEvent:
    return await asyncio.wait_for(anext(events), 5)


async def running(pods, name: str = "app"):
    sandbox = await pods.run_sandbox(host_network_pod(), "")
    record = await pods.create_container(sandbox.id, container(name), sandbox.config)
    await pods.start_container(record.id)
    return sandbox, record


async def test_a_pod_and_its_container_go_through_their_states(env):
    pods, fake = env
    sandbox = await pods.run_sandbox(host_network_pod(), "")
    assert (sandbox.state, sandbox.backend) == (SandboxState.READY, "runc")
    assert await pods.sandbox_ready(sandbox)
    record = await pods.create_container(sandbox.id, container(), sandbox.config)
    assert (record.state, record.image_id, record.user) == (ContainerState.CREATED, IMAGE_ID, ProcessUser(0, 0, [0]))
    created = fake.containers[record.id]
    assert created.spec["process"]["args"] == ["sleep", "3600"]  # the CRI -> OCI conversion happened once, here
    assert created.stop_signal == signal.SIGINT  # the image's StopSignal
    await pods.start_container(record.id)
    assert record.state == ContainerState.RUNNING and record.started_at > 0
    await pods.stop_container(record.id, 10)
    assert (record.state, record.exit_code, record.reason) == (ContainerState.EXITED, 137, "Error")
    await pods.remove_container(record.id)
    with pytest.raises(NotFound):
        pods.container(record.id)
    await pods.stop_sandbox(sandbox.id)
    assert sandbox.state == SandboxState.NOTREADY
    await pods.remove_sandbox(sandbox.id)
    assert pods.list_sandboxes(None) == [] and sandbox.id not in fake.pods


async def test_stop_and_remove_are_idempotent(env):
    pods, fake = env
    sandbox, record = await running(pods)
    for _ in range(2):
        await pods.stop_container(record.id, 0)
        await pods.stop_sandbox(sandbox.id)
    assert fake.calls.count(("stop_container", record.id)) == 1  # an exited container is not stopped again
    for _ in range(2):
        await pods.remove_container(record.id)
        await pods.remove_sandbox(sandbox.id)
    await pods.stop_container("f" * 64, 0)  # unknown IDs are success too
    await pods.remove_sandbox("f" * 64)


async def test_removing_a_pod_stops_and_removes_its_containers(env):
    pods, fake = env
    sandbox, _ = await running(pods)
    await pods.remove_sandbox(sandbox.id)
    assert fake.containers == {} and fake.pods == {}
    assert pods.list_sandboxes(None) == [] and pods.list_containers(None) == []


async def test_refusals(env):
    pods, _ = env
    sandbox, record = await running(pods)
    with pytest.raises(FailedPrecondition, match="not created"):
        await pods.start_container(record.id)
    with pytest.raises(AlreadyExists):
        await pods.create_container(sandbox.id, container(), sandbox.config)
    with pytest.raises(NotFound, match="pull it first"):
        await pods.create_container(sandbox.id, container("other", image="registry.test/none:1"), sandbox.config)
    with pytest.raises(InvalidArgument, match="exec needs a command"):
        await pods.exec_sync(record.id, [], 1)
    with pytest.raises(NotFound):
        await pods.container_status("0" * 64)
    with pytest.raises(AlreadyExists):
        await pods.run_sandbox(host_network_pod(), "")
    with pytest.raises(NotFound, match="runtime handler 'kata'"):
        await pods.run_sandbox(host_network_pod("other"), "kata")
    await pods.stop_sandbox(sandbox.id)
    with pytest.raises(FailedPrecondition, match="not ready"):
        await pods.create_container(sandbox.id, container("late"), sandbox.config)


async def test_a_pod_for_a_backend_this_host_lacks_is_refused_before_anything_runs(env):
    pods, fake = env
    untrusted = host_network_pod("vm-pod")
    untrusted.linux.security_context.namespace_options.network = pb.POD
    with pytest.raises(FailedPrecondition, match="vm backend not available"):
        await pods.run_sandbox(untrusted, "vm")
    assert pods.list_sandboxes(None) == [] and fake.calls == []


async def test_a_failed_start_is_an_exit_with_its_reason(env):
    pods, fake = env
    fake.fail_start.add("broken")
    sandbox = await pods.run_sandbox(host_network_pod(), "")
    record = await pods.create_container(sandbox.id, container("broken"), sandbox.config)
    with pytest.raises(FailedPrecondition, match="refuses"):
        await pods.start_container(record.id)
    assert (record.state, record.exit_code, record.reason) == (ContainerState.EXITED, 128, "StartError")


async def test_a_container_that_survives_its_kill_is_reported(env):
    pods, fake = env
    _, record = await running(pods)
    fake.containers[record.id].ignores_signals = True
    with pytest.raises(FailedPrecondition, match="still running after being killed"):
        await pods.stop_container(record.id, 0)
    assert record.state == ContainerState.RUNNING


async def test_a_pod_whose_holder_ends_its_containers_stops_and_goes_even_if_one_survived_its_kill(env):
    # kubelet found this: a VM whose guest could not kill a container kept StopPodSandbox failing forever,
    # though stopping the VM ends every container in it
    pods, fake = env
    fake.holder_ends_containers = True
    sandbox, record = await running(pods)
    fake.containers[record.id].ignores_signals = True
    await pods.stop_sandbox(sandbox.id)
    assert sandbox.state == SandboxState.NOTREADY
    assert (record.state, record.exit_code, record.reason) == (ContainerState.EXITED, 255, "VMDied")
    await pods.remove_sandbox(sandbox.id)
    assert pods.list_sandboxes(None) == [] and record.id not in fake.containers


async def test_a_container_that_outlives_its_pods_holder_still_fails_the_pods_stop(env):
    pods, fake = env
    sandbox, record = await running(pods)
    fake.containers[record.id].ignores_signals = True
    with pytest.raises(FailedPrecondition, match="still running after being killed"):
        await pods.stop_sandbox(sandbox.id)
    with pytest.raises(FailedPrecondition, match="still running after being killed"):
        await pods.remove_sandbox(sandbox.id)
    assert record.state == ContainerState.RUNNING and pods.sandbox(sandbox.id) is sandbox


async def test_an_exit_is_recorded_and_published_when_the_backend_tells(env):
    pods, fake = env
    events = pods.events.subscribe()
    sandbox, record = await running(pods)
    assert [(await next_event(events)).kind for _ in range(2)] == ["created", "started"]
    fake.exit(record.id, 3)
    stopped = await next_event(events)  # no status call in between: nobody polls
    assert (stopped.kind, stopped.container_id, stopped.sandbox_id) == ("stopped", record.id, sandbox.id)
    assert (record.state, record.exit_code, record.reason) == (ContainerState.EXITED, 3, "Error")
    events.close()


async def test_an_exit_during_start_lands_after_the_start(env):
    pods, fake = env
    fake.exit_on_start["quick"] = 0
    events = pods.events.subscribe()
    sandbox = await pods.run_sandbox(host_network_pod(), "")
    record = await pods.create_container(sandbox.id, container("quick"), sandbox.config)
    await pods.start_container(record.id)
    kinds = [(await next_event(events)).kind for _ in range(3)]
    assert kinds == ["created", "started", "stopped"]
    assert (record.state, record.exit_code, record.reason) == (ContainerState.EXITED, 0, "Completed")
    events.close()


async def test_when_exits_may_have_been_missed_every_running_container_is_checked(env):
    pods, fake = env
    events = pods.events.subscribe()
    sandbox, first = await running(pods, "first")
    second = await pods.create_container(sandbox.id, container("second"), sandbox.config)
    await pods.start_container(second.id)
    fake.exit(first.id, 1, notify=False)
    fake.exit(second.id, 2, notify=False)
    fake.listener(None)
    kinds = [(await next_event(events)) for _ in range(6)]
    assert {(e.kind, e.container_id) for e in kinds[4:]} == {("stopped", first.id), ("stopped", second.id)}
    assert (first.exit_code, second.exit_code) == (1, 2)
    events.close()


async def test_exits_of_unknown_ids_are_ignored(env):
    pods, fake = env
    sandbox, record = await running(pods)
    fake.listener("not-a-container")  # an infra process's exit file, say
    fake.listener(sandbox.id)
    assert record.state == ContainerState.RUNNING


async def test_update_resources_hands_the_backend_oci_resources(env):
    pods, fake = env
    _, record = await running(pods)
    resources = pb.LinuxContainerResources(cpu_quota=50_000, cpu_period=100_000, memory_limit_in_bytes=2**26)
    await pods.update_resources(record.id, resources)
    (applied,) = fake.containers[record.id].resources
    assert applied == {"cpu": {"quota": 50_000, "period": 100_000}, "memory": {"limit": 2**26, "swap": 2**26}}
    assert record.config.linux.resources.cpu_quota == 50_000


async def test_recovery_reconciles_the_records_with_what_still_runs(tmp_path):
    fake = FakeBackend(tmp_path / "fake")
    first = fake_manager(tmp_path, fake)
    await first.recover()
    sandbox, survivor = await running(first, "survivor")
    ended = await first.create_container(sandbox.id, container("ended"), sandbox.config)
    await first.start_container(ended.id)
    dead_pod = await first.run_sandbox(host_network_pod("dead"), "")
    await first.close()  # the daemon goes; pods run on

    fake.exit(ended.id, 4, notify=False)  # what happened while no daemon listened
    fake.pods[dead_pod.id] = False
    second = fake_manager(tmp_path, fake)
    await second.recover()
    assert (await second.container_status(survivor.id)).state == ContainerState.RUNNING
    recovered = await second.container_status(ended.id)
    assert (recovered.state, recovered.exit_code) == (ContainerState.EXITED, 4)
    assert second.sandbox(dead_pod.id).state == SandboxState.NOTREADY
    assert second.sandbox(sandbox.id).state == SandboxState.READY
    with pytest.raises(AlreadyExists):  # names are reserved again
        await second.create_container(sandbox.id, container("survivor"), sandbox.config)
    fake.exit(survivor.id, 0)  # the new manager hears exits too
    await asyncio.wait_for(_exited(second, survivor.id), 5)
    await second.close()


async def _exited(pods, container_id: str) -> None:
    events = pods.events.subscribe()
    try:
        while pods.container(container_id).state != ContainerState.EXITED:
            await next_event(events)
    finally:
        events.close()


async def test_pods_whose_backend_is_gone_are_served_from_their_records_and_refused_the_rest(tmp_path):
    """A backend that existed when the pod was made and is unavailable now (no QEMU any more, say)."""
    vm = FakeBackend(tmp_path / "vm", name="vm")
    first = fake_manager(tmp_path, vm, default_trust="untrusted")
    await first.recover()
    pod = host_network_pod("guest")
    pod.linux.security_context.namespace_options.network = pb.POD
    sandbox = SandboxRecord(
        id="5" * 64, config=pod, runtime_handler="vm", backend="vm", trust_reason="test", state=SandboxState.READY
    )
    first._sandbox_store.put(sandbox)  # a VM pod without a network namespace: the manager would need root
    vm.pods[sandbox.id] = True
    await first.close()
    second = fake_manager(tmp_path, vm)
    await second.recover()
    sandbox = second.sandbox(sandbox.id)
    record = await second.create_container(sandbox.id, container(), sandbox.config)
    await second.start_container(record.id)
    await second.close()

    another = host_network_pod("another-guest", **{"tandem.dev/trust": "untrusted"})
    another.linux.security_context.namespace_options.network = pb.POD
    third = fake_manager(tmp_path, FakeBackend(tmp_path / "runc"))
    await third.recover()  # the daemon starts all the same
    assert third.backend_names() == ["runc"]
    assert not await third.sandbox_ready(third.sandbox(sandbox.id))
    assert (await third.container_status(record.id)).state == ContainerState.RUNNING  # as recorded
    for refused in (
        third.exec_sync(record.id, ["true"], 1),
        third.container_usage(third.container(record.id)),
        third.stop_container(record.id, 0),
        third.run_sandbox(another, ""),
    ):
        with pytest.raises(FailedPrecondition, match="vm backend not available"):
            await refused
    await third.close()


async def test_an_exit_reported_with_its_status_is_persisted_before_the_listener_returns(tmp_path):
    """A VM agent's exit event: the manager must have it on disk before the backend acknowledges it."""
    fake = FakeBackend(tmp_path / "fake")
    pods = fake_manager(tmp_path, fake)
    await pods.recover()
    _, record = await running(pods)
    fake.listener(record.id, ExitStatus(3, time.time_ns(), reason="OOMKilled"))  # the backend's own view: running
    on_disk = RecordStore(tmp_path / "state" / "containers", ContainerRecord).get(record.id)
    assert on_disk is not None and (on_disk.state, on_disk.exit_code, on_disk.reason) == (ContainerState.EXITED, 3,
                                                                                        "OOMKilled")  # fmt: skip
    fake.listener(record.id, ExitStatus(9, time.time_ns()))  # told again (a replay): the first stands
    assert record.exit_code == 3
    await pods.close()


async def test_an_exit_reported_while_the_container_starts_lands_after_its_start(env):
    pods, fake = env
    events = pods.events.subscribe()
    sandbox = await pods.run_sandbox(host_network_pod(), "")
    record = await pods.create_container(sandbox.id, container(), sandbox.config)
    starting = fake.start_container

    async def start_and_exit(sandbox, container):  # the exit event overtakes the start's answer
        await starting(sandbox, container)
        fake.listener(container.id, ExitStatus(5, 1))  # a finish time before the start: the start wins
        assert container.state == ContainerState.CREATED and container.exit_report is not None

    fake.start_container = start_and_exit
    await pods.start_container(record.id)
    kinds = [(await next_event(events)).kind for _ in range(3)]
    assert kinds == ["created", "started", "stopped"]
    assert (record.state, record.exit_code) == (ContainerState.EXITED, 5)
    assert record.finished_at >= record.started_at > 0
    events.close()


def test_recursive_read_only_is_advertised_per_handler_by_its_backend(tmp_path):
    runc, vm = FakeBackend(tmp_path / "runc"), FakeBackend(tmp_path / "vm", name="vm")
    vm.features = BackendFeatures(recursive_read_only_mounts=True)
    pods = fake_manager(tmp_path, runc, vm)
    assert pods.handler_features("vm").recursive_read_only_mounts
    assert not pods.handler_features("runc").recursive_read_only_mounts
    assert not pods.handler_features("").recursive_read_only_mounts  # the default (trusted) node's: runc's
    assert pods.handler_features("none") == BackendFeatures()


async def _checks_done(pods) -> None:
    await asyncio.wait_for(asyncio.gather(*pods._exit_checks), 5)


async def test_lists_answer_from_what_is_recorded_and_a_status_call_asks_the_backend(env):
    pods, fake = env
    _, record = await running(pods)
    fake.exit(record.id, 3, notify=False)  # an exit nobody was told of
    assert [c.state for c in pods.list_containers(None)] == [ContainerState.RUNNING]
    assert (await pods.container_status(record.id)).state == ContainerState.EXITED
    assert [c.state for c in pods.list_containers(None)] == [ContainerState.EXITED]


async def test_a_pods_holder_ending_is_pushed_to_the_records(env):
    pods, fake = env
    sandbox, _ = await running(pods)
    quiet = await pods.run_sandbox(host_network_pod("quiet"), "")
    fake.end_pod(quiet.id, notify=False)
    fake.end_pod(sandbox.id)
    await _checks_done(pods)
    assert sandbox.state == SandboxState.NOTREADY and not pods.is_ready(sandbox)
    ready = pb.PodSandboxFilter(state=pb.PodSandboxStateValue(state=pb.SANDBOX_READY))
    assert pods.list_sandboxes(ready) == [quiet]  # not told: as recorded, until asked
    assert not await pods.sandbox_ready(quiet)
    assert quiet.state == SandboxState.NOTREADY


async def test_when_exits_were_missed_every_pod_and_container_is_looked_at(env):
    pods, fake = env
    sandbox, record = await running(pods)
    fake.exit(record.id, 1, notify=False)
    fake.end_pod(sandbox.id, notify=False)
    fake.listener(None)  # the kernel's event queue overflowed
    await _checks_done(pods)
    assert (record.state, sandbox.state) == (ContainerState.EXITED, SandboxState.NOTREADY)


async def test_a_holders_end_heard_while_its_pod_is_removed_leaves_no_record(env):
    pods, fake = env
    sandbox = await pods.run_sandbox(host_network_pod(), "")
    fake.end_pod(sandbox.id)  # its check runs once the removal, which holds the pod's lock, is done
    await pods.remove_sandbox(sandbox.id)
    await _checks_done(pods)
    assert pods._sandbox_store.load_all() == {} and pods.list_sandboxes(None) == []


async def test_handlers_report_their_backends_features_and_requests_beyond_them_are_unimplemented(tmp_path):
    runc = FakeBackend(tmp_path / "runc")
    runc.features = BackendFeatures(recursive_read_only_mounts=True, user_namespaces=True)
    vm = FakeBackend(tmp_path / "vm", name="vm")
    pods = fake_manager(tmp_path, runc, vm)
    await pods.recover()
    assert pods.handler_features("") == pods.handler_features("runc") == runc.features
    assert pods.handler_features("vm") == BackendFeatures() and pods.handler_features("nonesuch") == BackendFeatures()
    assert fake_manager(tmp_path, runc, vm, default_trust="untrusted").handler_features("") == BackendFeatures()

    userns = host_network_pod("guest")
    userns.linux.security_context.namespace_options.network = pb.POD  # refused before any network is made
    userns.linux.security_context.namespace_options.userns_options.CopyFrom(
        pb.UserNamespace(mode=pb.POD, uids=[pb.IDMapping(host_id=65536, length=65536)] * 1,
                         gids=[pb.IDMapping(host_id=65536, length=65536)])
    )  # fmt: skip
    with pytest.raises(Unimplemented, match="user namespaces are not supported on the vm backend"):
        await pods.run_sandbox(userns, "vm")
    assert pods.list_sandboxes(None) == [] and vm.pods == {}

    rro = pb.Mount(container_path="/ro", host_path=str(tmp_path), readonly=True, recursive_read_only=True)
    guest = await pods.run_sandbox(host_network_pod("guest"), "")
    record = await pods.create_container(guest.id, container(mounts=[rro]), guest.config)
    assert ["rbind", "rprivate", "ro", "rro"] in [m["options"] for m in runc.containers[record.id].spec["mounts"]]
    vm_pod = SandboxRecord(id="6" * 64, config=host_network_pod("in-vm"), runtime_handler="vm", backend="vm",
                           trust_reason="test", state=SandboxState.READY)  # fmt: skip
    pods.table.sandboxes[vm_pod.id] = vm_pod  # a VM pod without its network: making one needs root
    with pytest.raises(Unimplemented, match="recursive read-only mounts \\(/ro\\) are not supported on the vm"):
        await pods.create_container(vm_pod.id, container(mounts=[rro]), vm_pod.config)
    await pods.close()


async def test_update_sandbox_resources_hands_the_backend_oci_resources_and_records_them(env):
    pods, fake = env
    sandbox = await pods.run_sandbox(host_network_pod(), "")
    resources = pb.LinuxContainerResources(memory_limit_in_bytes=64 * 2**20, cpu_quota=50_000, cpu_period=100_000)
    await pods.update_sandbox_resources(sandbox.id, resources)
    assert fake.sandbox_resources[sandbox.id] == {
        "cpu": {"quota": 50_000, "period": 100_000},
        "memory": {"limit": 64 * 2**20, "swap": 64 * 2**20},
    }
    assert sandbox.config.linux.resources.memory_limit_in_bytes == 64 * 2**20
    await pods.stop_sandbox(sandbox.id)
    with pytest.raises(FailedPrecondition, match="is not ready"):
        await pods.update_sandbox_resources(sandbox.id, resources)
