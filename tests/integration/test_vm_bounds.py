"""VM pods for real (TCG), where the bounds of the VM boundary matter: 100 MiB through `cat` in the guest with a
client that stops reading, with the daemon's memory measured; and kubelet's List and Status calls after a daemon
restart while every pod's QEMU is stopped (SIGSTOP), so no agent can answer."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import time
from pathlib import Path

import pytest

from protos import cri_pb2 as pb
from tests.support.pods import container_config, pod_config, pod_leftovers
from tests.support.streams import CLOSE, STDIN, STDOUT, WebsocketsLink
from tests.support.wait import eventually, wait_for

pytestmark = pytest.mark.integration

MIB = 2**20


def start_pod(daemon, image: str, tmp: Path, name: str) -> tuple[str, str]:
    """A VM pod running one sleeping container: (pod id, container id)."""
    pod = pod_config(name, tmp / "logs")
    pod_id = daemon.runtime.RunPodSandbox(pb.RunPodSandboxRequest(config=pod, runtime_handler="vm")).pod_sandbox_id
    request = pb.CreateContainerRequest(
        pod_sandbox_id=pod_id, config=container_config("sleeper", image, "sleep", "3600"), sandbox_config=pod
    )
    cid = daemon.runtime.CreateContainer(request).container_id
    daemon.runtime.StartContainer(pb.StartContainerRequest(container_id=cid))
    return pod_id, cid


def remove_pods(daemon, tmp: Path, *pod_ids: str) -> None:
    for pod_id in pod_ids:
        daemon.runtime.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=pod_id))
        daemon.runtime.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=pod_id))
    wait_for(lambda: pod_leftovers(daemon, ("qemu", "virtiofsd"), (str(tmp),)) == [], timeout=30, what="no leftovers")


def memory_kib(pid: int, field: str) -> int:
    """A /proc/<pid>/status figure (VmRSS, VmHWM) in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} for {pid}")


async def test_100_mib_through_cat_in_a_vm_with_a_slow_reader(vm_pod_env):
    """stdin and stdout both streaming through the daemon and the agent; the client stops reading at 10, 40 and
    70 MiB until its writer is held back. Everything arrives intact, and the daemon's peak memory grows by far
    less than the stream: the credit windows hold the guest back, not host memory."""
    daemon, image, tmp = vm_pod_env.daemon, vm_pod_env.image, vm_pod_env.tmp
    pod_id, cid = start_pod(daemon, image, tmp, "cat")
    request = pb.ExecRequest(container_id=cid, cmd=["cat"], stdin=True, stdout=True, stderr=True)
    url = daemon.runtime.Exec(request).url
    pid = daemon.process.pid
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # VmHWM starts again from the current RSS
    before = memory_kib(pid, "VmRSS")
    link = await WebsocketsLink.open(url, "v5.channel.k8s.io")
    size, chunk = 100 * MIB, 64 * 1024
    sent, received = hashlib.sha256(), hashlib.sha256()
    progress = {"sent": 0, "pending_since": 0.0}

    async def feed() -> None:
        for i in range(size // chunk):
            data = bytes([i % 251]) * chunk
            sent.update(data)
            progress["pending_since"] = time.monotonic()
            await link.send(bytes([STDIN]) + data)
            progress["pending_since"] = 0.0
            progress["sent"] += len(data)
        await link.send(bytes([CLOSE, STDIN]))

    def held_back(total: int) -> bool:
        """The writer is stuck (a send waiting a second) or, were nothing bounded, 40 MiB ahead of the reader."""
        pending = progress["pending_since"]
        return (pending and time.monotonic() - pending > 1.0) or progress["sent"] - total > 40 * MIB

    async def read() -> tuple[int, dict | None]:
        total, status, stalls = 0, None, [10 * MIB, 40 * MIB, 70 * MIB]
        while (message := await link.recv()) is not None:
            channel, data = message[0], message[1:]
            if channel == STDOUT:
                total += len(data)
                received.update(data)
                if stalls and total >= stalls[0]:
                    stalls.pop(0)
                    await eventually(lambda total=total: held_back(total), 120, "the writer to be held back")
            elif channel == 3 and data:
                status = json.loads(data)
        return total, status

    started = time.monotonic()
    feeding = asyncio.create_task(feed())
    total, status = await asyncio.wait_for(read(), 900)
    await feeding
    took = time.monotonic() - started
    peak = memory_kib(pid, "VmHWM")
    print(f"100 MiB through cat in a VM: {took:.1f} s; daemon RSS {before / 1024:.0f} MiB, peak {peak / 1024:.0f} MiB")
    assert total == size and received.digest() == sent.digest()
    assert status is not None and status["status"] == "Success"
    assert (peak - before) * 1024 < 48 * MIB  # the stream was 100 MiB each way; the windows and buffers are not
    remove_pods(daemon, tmp, pod_id)


def test_list_and_status_answer_while_every_agent_is_stopped(vm_pod_env):
    """After a daemon crash, with every pod's QEMU stopped (SIGSTOP: no agent can answer), the daemon starts,
    and ListPodSandbox, PodSandboxStatus and ListContainers answer from the records and QEMU's identity (each
    with a deadline shorter than one agent connection's timeout, 10 s; the pods are READY, the containers
    RUNNING). Once the VMs run again, their agents are back without anyone asking."""
    daemon, image, tmp = vm_pod_env.daemon, vm_pod_env.image, vm_pod_env.tmp
    pods = dict(start_pod(daemon, image, tmp, f"stopped-{i}") for i in range(3))
    qemus = [int((daemon.socket.parent / "vm" / p[:16] / "qemu.pid").read_text().split()[0]) for p in pods]
    daemon.kill()
    for qemu in qemus:
        os.kill(qemu, signal.SIGSTOP)
    try:
        began = time.monotonic()
        daemon.start()
        timings = {"start": time.monotonic() - began}
        began = time.monotonic()
        listed = daemon.runtime.ListPodSandbox(pb.ListPodSandboxRequest(), timeout=9)
        timings["ListPodSandbox"] = time.monotonic() - began
        began = time.monotonic()
        containers = daemon.runtime.ListContainers(pb.ListContainersRequest(), timeout=9)
        timings["ListContainers"] = time.monotonic() - began
        began = time.monotonic()
        statuses = [
            daemon.runtime.PodSandboxStatus(pb.PodSandboxStatusRequest(pod_sandbox_id=p, verbose=True), timeout=9)
            for p in pods
        ]
        timings["PodSandboxStatus x3"] = time.monotonic() - began
        print("with 3 stopped VMs: " + ", ".join(f"{k} {v * 1000:.1f} ms" for k, v in timings.items()))
        assert {p.id: p.state for p in listed.items} == dict.fromkeys(pods, pb.SANDBOX_READY)
        assert {c.id: c.state for c in containers.containers} == dict.fromkeys(pods.values(), pb.CONTAINER_RUNNING)
        assert all(s.status.state == pb.SANDBOX_READY for s in statuses)
        assert all(json.loads(s.info["info"])["backendInfo"]["agentConnected"] is False for s in statuses)
    finally:
        for qemu in qemus:
            os.kill(qemu, signal.SIGCONT)

    def connected() -> bool:
        infos = [
            json.loads(daemon.runtime.PodSandboxStatus(pb.PodSandboxStatusRequest(pod_sandbox_id=p, verbose=True))
                       .info["info"])["backendInfo"]
            for p in pods
        ]  # fmt: skip
        return all(i["agentConnected"] for i in infos)

    wait_for(connected, timeout=60, what="the agents to be reconnected in the background")
    for cid in pods.values():
        result = daemon.runtime.ExecSync(pb.ExecSyncRequest(container_id=cid, cmd=["true"], timeout=60))
        assert result.exit_code == 0, result.stderr
    remove_pods(daemon, tmp, *pods)
