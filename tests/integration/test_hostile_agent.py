"""A hostile agent: what a guest that owns its kernel (and so its agent) can send the host over the agent
channel, against the host's real code (VmBackend's pod handles, their event router, AgentClient, the pod
manager), with `tests.support.fake_agent` on each pod's agent socket in place of QEMU's chardev. No VM.

The attack list: path-traversal, absolute, empty and another pod's container IDs, unknown exec and port IDs,
events of no known kind, out-of-range exit codes and timestamps, oversized and undecodable frames, a
disconnect mid-frame, an event flood, events it never lets the host acknowledge, output past its credit.
What must hold: the host stays up and serves; the other pod is untouched; no file is written but the pod's
own container logs (a sentinel tree around them is compared before and after); memory stays bounded (the
buffers' sizes, and tracemalloc's peak); what it sends is counted in the pod's verbose info.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import os
import secrets
import shutil
import subprocess
import tempfile
import time
import tracemalloc
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from core.records import RecordStore
from core.settings import Config, LogSettings
from protos import agent_pb2 as pb
from protos import cri_pb2 as cri
from sandbox.cni import CniPlugins
from sandbox.crilog import PIECE
from sandbox.manager import PodManager
from sandbox.model import ContainerRecord, ContainerState, ExitStatus, SandboxRecord, SandboxState
from tests.support.fake_agent import FakeAgent, stand_in_qemu
from tests.support.fake_backend import FakeImages
from tests.support.pods import log_entries
from vm_backend import channel
from vm_backend.agent.framing import MAX_FRAME
from vm_backend.backend import VmBackend
from vm_backend.flow import WINDOW
from vm_backend.guest_image import GuestAssets

pytestmark = pytest.mark.integration

LOG_CAP = 1 * 2**20


@dataclass
class Pod:
    sandbox: SandboxRecord
    container: ContainerRecord
    agent: FakeAgent
    qemu: subprocess.Popen[bytes]

    @property
    def log(self) -> Path:
        return Path(self.container.log_path)


@dataclass
class Host:
    root: Path  # everything the host may touch, and the sentinels beside it
    backend: VmBackend
    exits: list[tuple[str, ExitStatus | None, int]] = field(default_factory=list)  # (cid, status, acks by then)
    pods: list[Pod] = field(default_factory=list)

    def listener(self, container_id: str | None, status: ExitStatus | None = None) -> None:
        """The manager's part: persist (here: record) the exit; the router acks only after this returned."""
        acked = max((a for p in self.pods for a in p.agent.acks if p.container.id == container_id), default=0)
        self.exits.append((container_id or "", status, acked))

    def exit_of(self, container_id: str) -> ExitStatus | None:
        return next((s for c, s, _ in self.exits if c == container_id), None)

    def info(self, pod: Pod) -> dict:
        return self.backend.sandbox_info(pod.sandbox)


def sandbox_record(root: Path, name: str) -> SandboxRecord:
    pod_id = secrets.token_hex(32)
    config = cri.PodSandboxConfig(metadata=cri.PodSandboxMetadata(name=name, namespace="n", uid=name))
    run_dir = root / "run" / "vm" / pod_id[:16]
    return SandboxRecord(
        id=pod_id, config=config, runtime_handler="vm", backend="vm", trust_reason="test", state=SandboxState.READY,
        backend_state={"run_dir": str(run_dir)},
    )  # fmt: skip


def container_record(root: Path, sandbox: SandboxRecord, name: str) -> ContainerRecord:
    config = cri.ContainerConfig(metadata=cri.ContainerMetadata(name=name), image=cri.ImageSpec(image="busybox"))
    return ContainerRecord(
        id=secrets.token_hex(32), sandbox_id=sandbox.id, config=config, image_id="i", image_ref="busybox",
        log_path=str(root / "logs" / sandbox.config.metadata.name / f"{name}.log"), state=ContainerState.RUNNING,
        created_at=time.time_ns() - 10**9, started_at=time.time_ns() - 10**9,
    )  # fmt: skip


def make_backend(root: Path) -> VmBackend:
    config = Config(state_dir=root / "state", runtime_dir=root / "run", logs=LogSettings(max_size_bytes=LOG_CAP))
    assets = GuestAssets(root, "d", root / "vmlinuz", root / "initrd", root / "userland.img", 2**21, "6.1", {})
    return VmBackend(config.vm_backend(), assets)


@contextlib.asynccontextmanager
async def running_pod(host: Host, name: str, **agent_options: object) -> AsyncIterator[Pod]:
    """A pod as a daemon restart finds it: its records, a live "QEMU", its agent on the socket; resumed."""
    sandbox = sandbox_record(host.root, name)
    record = container_record(host.root, sandbox, "app")
    run_dir = Path(sandbox.backend_state["run_dir"])
    qemu = stand_in_qemu(run_dir / "qemu.pid")
    (run_dir / "c" / record.id).mkdir(parents=True)
    (run_dir / "c" / record.id / "process.json").write_text('{"args": ["sh"], "cwd": "/"}')
    try:
        async with FakeAgent(run_dir / "vmm" / "agent.sock", **agent_options) as agent:  # type: ignore[arg-type]
            pod = Pod(sandbox, record, agent, qemu)
            host.pods.append(pod)
            await host.backend.resume_sandbox(sandbox, [record])
            yield pod
            await host.backend._pod(sandbox).close()
    finally:
        qemu.kill()
        qemu.wait()


@pytest.fixture
async def host() -> AsyncIterator[Host]:
    root = Path(tempfile.mkdtemp(prefix="th-", dir="/tmp"))  # unix socket paths must stay short
    sentinel = root / "sentinel"
    (sentinel / "etc").mkdir(parents=True)
    (sentinel / "etc" / "ld.so.preload").write_text("")
    (sentinel / "exit").write_text("sentinel\n")
    backend = make_backend(root)
    h = Host(root, backend)
    await backend.watch_exits(h.listener)
    try:
        yield h
    finally:
        await backend.close()
        shutil.rmtree(root, ignore_errors=True)


def tree(root: Path, skip: tuple[Path, ...] = ()) -> dict[str, tuple[int, int]]:
    """Every file and directory under `root` (but `skip`), with its size and mtime: what a write would change."""
    found = {}
    for directory, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(directory) / name
            if path in skip or any(s in path.parents for s in skip):
                continue
            st = path.lstat()
            found[str(path.relative_to(root))] = (st.st_size if not path.is_dir() else 0, st.st_mtime_ns)
    return found


async def exchange(pod: Pod, *frames: pb.Frame) -> None:
    """Send `frames`, then a marker output line for the pod's own container, and wait until it is in the log:
    everything before it was handled (events are delivered in order)."""
    marker = f"marker-{secrets.token_hex(4)}".encode()
    output = pb.Output(container_id=pod.container.id, data=marker + b"\n", timestamp_unix_ns=time.time_ns())
    await pod.agent.send(*frames, pod.agent.event(output=output))
    await pod.agent.wait_for(lambda: pod.log.exists() and marker in pod.log.read_bytes())


def log_ns(stamp: str) -> int:
    """A CRI log line's RFC 3339 time (UTC, nanoseconds) in ns since the epoch."""
    seconds = datetime.datetime.strptime(stamp[:19], "%Y-%m-%dT%H:%M:%S").replace(tzinfo=datetime.UTC)
    return int(seconds.timestamp()) * 10**9 + int(stamp[20:29])


HOSTILE_IDS = ["../../sentinel/exit", "../" * 12 + "etc/ld.so.preload", "", ".", "..", "c/../../x"]


async def test_events_for_ids_the_host_did_not_create_are_dropped_and_counted(host: Host) -> None:
    async with running_pod(host, "hostile") as bad, running_pod(host, "bystander") as good:
        await bad.agent.writer()
        await good.agent.writer()
        ids = [*HOSTILE_IDS, str(host.root / "sentinel" / "abs"), good.container.id, good.container.id[:12]]
        before = tree(host.root, skip=(host.root / "logs", host.root / "run"))
        frames = []
        for cid in ids:
            frames += [
                bad.agent.event(output=pb.Output(container_id=cid, data=b"LD_PRELOAD=/x.so\n")),
                bad.agent.event(process_exited=pb.ProcessExited(container_id=cid, exit_code=0)),
            ]
        own = bad.container.id
        frames += [
            bad.agent.event(output=pb.Output(container_id=own, process_id="x0123456789abcdef", data=b"no exec\n")),
            bad.agent.event(process_exited=pb.ProcessExited(container_id=own, process_id="../../x", exit_code=1)),
            bad.agent.event(port_data=pb.PortData(stream_id="p0123", data=b"no stream")),
            bad.agent.event(port_closed=pb.PortClosed(stream_id="/etc/passwd")),
            bad.agent.event(),  # no kind at all
        ]
        await exchange(bad, *frames)
        assert host.info(bad)["droppedEvents"] == len(frames)

        # The pod's own container: its timestamps and exit code made sane (1970, and the far future).
        past = pb.Output(container_id=own, data=b"from 1970\n", timestamp_unix_ns=1)
        future = pb.Output(container_id=own, data=b"from 2200\n", timestamp_unix_ns=2**62)
        await exchange(bad, bad.agent.event(output=past), bad.agent.event(output=future))
        stamps = {text: log_ns(stamp) for stamp, _, _, text in log_entries(bad.log)}
        assert bad.container.started_at <= stamps["from 1970"] <= time.time_ns()
        assert bad.container.started_at <= stamps["from 2200"] <= time.time_ns()
        ended = bad.agent.event(
            process_exited=pb.ProcessExited(container_id=own, exit_code=-9, finished_unix_ns=2**62, oom_killed=True)
        )
        await bad.agent.send(ended, ended)  # told twice: the first stands
        await bad.agent.wait_for(lambda: host.exit_of(own) is not None)
        status = host.exit_of(own)
        assert status is not None and status.exit_code == 255 and status.reason == "OOMKilled"
        assert bad.container.started_at <= status.finished_at <= time.time_ns()
        # Persisted (here: recorded by the listener) before the agent was told it may forget the exit.
        ((_, _, acked_then),) = [e for e in host.exits if e[0] == own]
        assert acked_then < ended.event.seq
        await bad.agent.wait_for(lambda: max(bad.agent.acks, default=0) >= ended.event.seq)

        # The bystander pod: its log and exit untouched by all this, and its own events still flow.
        await exchange(good)
        assert host.exit_of(good.container.id) is None
        assert b"LD_PRELOAD" not in good.log.read_bytes() and b"LD_PRELOAD" not in bad.log.read_bytes()
        assert host.info(good)["droppedEvents"] == 0
        assert tree(host.root, skip=(host.root / "logs", host.root / "run")) == before
        assert sorted(p.name for p in (host.root / "logs").rglob("*") if p.is_file()) == ["app.log", "app.log"]


async def test_garbage_oversized_frames_and_a_cut_connection_only_cost_a_reconnect(host: Host) -> None:
    async with running_pod(host, "garbage") as pod:
        attacks = [
            FakeAgent.length_header(MAX_FRAME + 1),  # refused from its header: nothing is read or allocated
            FakeAgent.length_header(2**32 - 1),
            FakeAgent.length_header(7) + b"\xff" * 7,  # undecodable
            FakeAgent.length_header(3) + b"\x0a\x01\x00",  # a frame with no body
            FakeAgent.length_header(2**20) + b"\0" * 1000,  # then the connection is cut mid-frame
        ]
        for i, attack in enumerate(attacks, start=2):
            await pod.agent.send_raw(attack)
            if i == len(attacks) + 1:
                pod.agent.disconnect()
            await pod.agent.wait_for(lambda i=i: pod.agent.connections >= i)
            await exchange(pod)  # the next connection works
        client = host.backend._pod(pod.sandbox).client
        assert client is not None and client.intake.peak_bytes < 64 * 1024


async def test_a_flood_of_events_never_acknowledged_stays_bounded(host: Host) -> None:
    async with running_pod(host, "flood", ignore_acks=True) as pod:
        await pod.agent.writer()
        newlines = pb.Output(container_id=pod.container.id, data=b"\n" * (64 * 1024))  # 40-fold as log lines
        text = pb.Output(container_id=pod.container.id, data=b"x" * (64 * 1024))
        tracemalloc.start()
        try:
            baseline = tracemalloc.get_traced_memory()[0]
            for i in range(512):  # 32 MiB of output (1/16 of it newlines: 90 MiB of log lines), 20480 strangers
                await pod.agent.send(pod.agent.event(output=newlines if i % 16 == 0 else text))
                await pod.agent.send(*(pod.agent.event(output=pb.Output(container_id=f"../{i}/{j}", data=b"x"))
                                       for j in range(40)))  # fmt: skip
            await exchange(pod)
            peak = tracemalloc.get_traced_memory()[1] - baseline
        finally:
            tracemalloc.stop()
        client = host.backend._pod(pod.sandbox).client
        assert client is not None
        print(f"flood: traced peak {peak / 2**20:.1f} MiB, intake peak {client.intake.peak_bytes / 2**20:.2f} MiB")
        assert client.intake.peak_bytes <= channel.INTAKE_BYTES + 128 * 1024
        assert peak < channel.INTAKE_BYTES + 2 * MAX_FRAME  # the decoder's buffer, one frame, one log piece
        assert host.info(pod)["droppedEvents"] == 512 * 40
        assert pod.log.stat().st_size <= LOG_CAP + 64 * PIECE  # the log started over at its cap, many times
        assert len(pod.agent.acks) <= 1  # one ack waits for its answer; nothing piles up behind it


async def test_while_the_callback_is_busy_the_host_stops_reading() -> None:
    """The intake is bounded: a flood stays in the socket (QEMU's buffer, the guest), not in the host."""
    root = Path(tempfile.mkdtemp(prefix="tb-", dir="/tmp"))
    release = asyncio.Event()
    delivered: list[int] = []

    async def slow(event: pb.Event) -> None:
        await release.wait()
        delivered.append(event.seq)

    try:
        async with FakeAgent(root / "agent.sock") as agent:
            client = channel.AgentClient(root / "agent.sock", slow)
            await client.start(10)
            try:
                writer = await agent.writer()
                frames = [agent.event(output=pb.Output(container_id="c", data=b"x" * 100_000)) for _ in range(200)]
                for frame in frames:  # 20 MB, written at once: what the host does not take waits on this side
                    writer.write(channel.encode(frame))
                await agent.wait_for(lambda: client.intake.bytes + 100_200 > channel.INTAKE_BYTES)
                assert client.intake.bytes <= channel.INTAKE_BYTES
                assert agent.unsent > 10 * 2**20  # the host stopped reading: most of the flood is still here
                release.set()
                await agent.wait_for(lambda: delivered[-1:] == [frames[-1].event.seq])
                assert delivered == [frame.event.seq for frame in frames]
                assert client.intake.peak_bytes <= channel.INTAKE_BYTES
            finally:
                await client.close()
    finally:
        shutil.rmtree(root, ignore_errors=True)


async def test_output_past_its_credit_closes_the_stream(host: Host) -> None:
    async with running_pod(host, "credit") as pod:
        await pod.agent.writer()
        process = await host.backend.exec(pod.sandbox, pod.container, ["cat"], tty=False, stdin=True)
        (start,) = [r.start_exec for r in pod.agent.requests if r.HasField("start_exec")]
        assert start.window == WINDOW and start.container_id == pod.container.id

        def output(data: bytes, stream: int = pb.STDOUT) -> pb.Frame:
            out = pb.Output(container_id=pod.container.id, process_id=start.exec_id, stream=stream, data=data)
            return pod.agent.event(output=out)

        # Within the credit: taken, and credit comes back as the client reads.
        await pod.agent.send(output(b"a" * WINDOW), output(b"e" * WINDOW, pb.STDERR))
        assert await process.read_stdout() == b"a" * WINDOW
        await pod.agent.wait_for(lambda: any(r.exec_credit.stdout_limit == 2 * WINDOW for r in pod.agent.requests))
        await pod.agent.send(output(b"b" * WINDOW))  # the new credit, used up
        # Past it: the stream is closed, counted, and the agent told to kill the command and drop its output.
        await pod.agent.send(output(b"c"))
        with pytest.raises(Exception, match="past its credit"):
            await asyncio.wait_for(process.wait(), 10)
        assert host.info(pod)["overrunStreams"] == 1
        assert process.stdout.buffered <= WINDOW and process.stderr.buffered <= WINDOW  # type: ignore[attr-defined]
        await pod.agent.wait_for(lambda: any(r.exec_credit.discard for r in pod.agent.requests))
        await pod.agent.wait_for(lambda: any(r.signal_process.process_id == start.exec_id for r in pod.agent.requests))
        await exchange(pod, output(b"more"))  # in flight as the stream closed: ignored
        assert host.info(pod)["droppedEvents"] == 0

        channel_ = await host.backend.port_forward(pod.sandbox, 80)
        (opened,) = [r.open_port for r in pod.agent.requests if r.HasField("open_port")]
        assert opened.window == WINDOW
        port_data = pb.PortData(stream_id=opened.stream_id, data=b"p" * (WINDOW + 1))
        await exchange(pod, pod.agent.event(port_data=port_data))
        assert await channel_.read() == b""  # closed, not buffered
        assert host.info(pod)["overrunStreams"] == 2
        await pod.agent.wait_for(lambda: any(r.close_port.stream_id == opened.stream_id for r in pod.agent.requests))


async def test_a_port_stream_half_closes_both_ways(host: Host) -> None:
    async with running_pod(host, "ports") as pod:
        await pod.agent.writer()
        forward = await host.backend.port_forward(pod.sandbox, 80)
        (opened,) = [r.open_port for r in pod.agent.requests if r.HasField("open_port")]
        await forward.write(b"request")
        await forward.write_eof()
        writes = [r.write_port for r in pod.agent.requests if r.HasField("write_port")]
        assert [(w.data, w.eof) for w in writes] == [(b"request", False), (b"", True)]
        answer = pb.PortData(stream_id=opened.stream_id, data=b"answer", eof=True)
        await pod.agent.send(pod.agent.event(port_data=answer))
        assert await forward.read() == b"answer"
        assert await forward.read() == b""
        await pod.agent.send(pod.agent.event(port_closed=pb.PortClosed(stream_id=opened.stream_id)))
        await forward.close()
        await exchange(pod)
        assert host.info(pod)["droppedEvents"] == 0


async def test_kubelet_never_waits_on_a_silent_agent(host: Host) -> None:
    """Three VM pods whose agents never answer, as a daemon restart finds them: recovery, ListPodSandbox,
    PodSandboxStatus's readiness and ListContainers answer from the records and QEMU's identity, before any
    agent could answer (each agent saw one Hello and nothing else: no call waited on it); when the agents speak,
    what they kept (an exit from while no daemon listened) arrives."""
    state = host.root / "state"
    sandboxes, containers = (
        RecordStore(state / "sandboxes", SandboxRecord),
        RecordStore(state / "containers", ContainerRecord),
    )
    async with contextlib.AsyncExitStack() as stack:
        pods = [await stack.enter_async_context(running_pod(host, f"silent-{i}", silent=True)) for i in range(3)]
        for pod in pods:
            sandboxes.put(pod.sandbox)
            containers.put(pod.container)
        manager = PodManager(
            state_dir=state, runtime_dir=host.root / "run", trust=Config().trust(), images=FakeImages(),  # type: ignore[arg-type]
            backends={"vm": host.backend}, cni=CniPlugins(host.root / "net.d", ()),
        )  # fmt: skip
        started = time.monotonic()
        await asyncio.wait_for(manager.recover(), 60)
        listed = manager.list_containers(None)
        ready = [await asyncio.wait_for(manager.sandbox_ready(s), 60) for s in manager.list_sandboxes(None)]
        took = time.monotonic() - started
        await asyncio.gather(*(pod.agent.wait_for(lambda pod=pod: pod.agent.hellos) for pod in pods))
        assert [pod.agent.hellos for pod in pods] == [1, 1, 1]  # no Hello timed out: nothing waited that long
        assert [c.state for c in listed] == [ContainerState.RUNNING] * 3 and ready == [True] * 3
        print(f"recover + ListContainers + 3 x PodSandboxStatus with 3 silent agents: {took * 1000:.1f} ms")

        first = pods[0]
        first.agent.speak()
        ended = pb.ProcessExited(container_id=first.container.id, exit_code=3, finished_unix_ns=time.time_ns())
        await first.agent.send(first.agent.event(process_exited=ended))
        await first.agent.wait_for(lambda: manager.container(first.container.id).state == ContainerState.EXITED)
        assert manager.container(first.container.id).exit_code == 3
        assert RecordStore(state / "containers", ContainerRecord).get(first.container.id).exit_code == 3
        await manager.close()


async def test_an_exec_whose_client_left_is_forgotten_though_the_guest_never_ends_it(host: Host) -> None:
    # The streaming client went away; the guest keeps the command "running" and never reports its exit. The host
    # must not keep the session (and what it buffered) for the pod's life: one per `kubectl exec`, without end.
    async with running_pod(host, "left") as pod:
        await pod.agent.writer()
        router = host.backend._pod(pod.sandbox).events
        process = await host.backend.exec(pod.sandbox, pod.container, ["sh"], tty=False, stdin=False)
        (start,) = [r.start_exec for r in pod.agent.requests if r.HasField("start_exec")]

        def output(data: bytes) -> pb.Frame:
            out = pb.Output(container_id=pod.container.id, process_id=start.exec_id, data=data)
            return pod.agent.event(output=out)

        await exchange(pod, output(b"x" * WINDOW))
        assert process.stdout.buffered == WINDOW  # type: ignore[attr-defined]
        await process.kill()
        await pod.agent.wait_for(lambda: any(r.signal_process.process_id == start.exec_id for r in pod.agent.requests))
        assert start.exec_id not in router.execs
        await exchange(pod, output(b"y"))  # in flight as the host let go: ignored, not counted
        assert host.info(pod)["droppedEvents"] == 0
